//! Shared by the examples: a local cluster on loopback in a temporary directory,
//! with one member user per node (each added by that node's seeded admin).

use std::net::{SocketAddr, UdpSocket};

use conclave::{Identity, Node, NodeId, User, UserRole};

/// A started cluster: keep `dir` alive while the nodes run.
pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub ids: Vec<NodeId>,
    pub nodes: Vec<Node>,
    pub users: Vec<User>,
}

/// Starts `n` nodes that know each other, and a member user on each.
pub async fn local_cluster(n: usize) -> anyhow::Result<Cluster> {
    let dir = tempfile::tempdir()?;
    let dirs: Vec<_> = (0..n).map(|i| dir.path().join(format!("n{i}"))).collect();
    // Each node needs the others' ids and addresses before it starts.
    let ids = dirs.iter().map(Node::init).collect::<Result<Vec<_>, _>>()?;
    let addrs = (0..n)
        .map(|_| UdpSocket::bind("127.0.0.1:0")?.local_addr())
        .collect::<Result<Vec<SocketAddr>, _>>()?;
    let mut nodes = Vec::new();
    for i in 0..n {
        let mut builder = Node::builder().data_dir(&dirs[i]).listen(addrs[i]);
        for j in (0..n).filter(|&j| j != i) {
            builder = builder.peer(ids[j], addrs[j]);
        }
        nodes.push(builder.start().await?);
    }
    let mut rng = rand_core::UnwrapErr(getrandom::SysRng);
    let mut users = Vec::new();
    for node in &nodes {
        // The bootstrap: the node's first admin, who then registers a user.
        let admin = Identity::generate(&mut rng);
        node.seed_admin(&admin.public())?;
        let admin = node.user(admin).await?;
        let user = Identity::generate(&mut rng);
        admin.add_user(&user.public(), UserRole::Member).await?;
        users.push(node.user(user).await?);
    }
    Ok(Cluster {
        dir,
        ids,
        nodes,
        users,
    })
}
