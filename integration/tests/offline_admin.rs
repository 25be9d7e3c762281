//! The offline bootstrap (`conclave user add --admin --data DIR`): it writes a
//! stopped node's store, and a running node's directory is refused, as is a second
//! node on the same directory.

use conclave::{seed_admin_offline, DataDirError, Identity, Node, Seeded, StartError};
use conclave::{AdminError, ApiError, Denial};

fn identity() -> Identity {
    Identity::generate(&mut rand_core::UnwrapErr(getrandom::SysRng))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_offline_bootstrap_writes_a_stopped_node_and_refuses_a_running_one() {
    let dir = tempfile::tempdir().unwrap();
    let admin = identity();
    assert_eq!(
        seed_admin_offline(dir.path(), &admin.public()).unwrap(),
        Seeded::Added
    );

    let node = Node::builder().data_dir(dir.path()).start().await.unwrap();
    // The seeded admin is a user of the started node.
    node.user(admin.clone())
        .await
        .expect("the seeded admin acts");
    // While it runs, neither the offline bootstrap nor a second node may take the
    // directory.
    let late = identity();
    match seed_admin_offline(dir.path(), &late.public()) {
        Err(AdminError::DataDir(DataDirError::InUse { dir: reported })) => {
            assert_eq!(reported, dir.path());
        }
        other => panic!("expected in use, got {other:?}"),
    }
    match Node::builder().data_dir(dir.path()).start().await {
        Err(StartError::InUse(DataDirError::InUse { .. })) => {}
        Err(other) => panic!("expected in use, got {other}"),
        Ok(_) => panic!("a second node started on a held directory"),
    }
    // The refused bootstrap changed nothing.
    match node.user(late.clone()).await {
        Err(ApiError::Denied(Denial::NotFound { .. })) => {}
        other => panic!("expected not_found, got {other:?}"),
    }
    node.shutdown().await;

    // Stopped: the bootstrap works again, and a re-run changes nothing.
    assert_eq!(
        seed_admin_offline(dir.path(), &late.public()).unwrap(),
        Seeded::Added
    );
    assert_eq!(
        seed_admin_offline(dir.path(), &admin.public()).unwrap(),
        Seeded::AlreadyRegistered
    );
    let node = Node::builder().data_dir(dir.path()).start().await.unwrap();
    node.user(late)
        .await
        .expect("the admin seeded offline acts");
    node.shutdown().await;
}
