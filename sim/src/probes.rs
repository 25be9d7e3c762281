//! Proposals to the Raft groups: until rooms live on them (issue 15's next
//! steps), the workload gives every group entries to replicate, so that the
//! Raft oracle has committed logs to compare. Drawn from a stream of their own,
//! so the rest of the workload stays what it was.

use conclave_actors::replication::host::replicas_of;
use conclave_actors::replication::{ProposalId, ReplicasMsg};
use rand_chacha::ChaCha20Rng;
use rand_core::Rng;

use crate::cluster::{derive_rng, Cluster};

/// One workload step in this many proposes nothing.
const SKIP_ONE_IN: u64 = 3;

/// See the module docs.
pub struct Probes {
    rng: ChaCha20Rng,
    sent: u64,
}

impl Probes {
    /// The probes of `seed`.
    pub fn new(seed: u64) -> Self {
        Self {
            rng: derive_rng(seed, 0, "raft-probes"),
            sent: 0,
        }
    }

    /// Proposes one entry to a group, through a node picked at random (a node
    /// that does not replicate the group, or knows no leader, refuses it).
    pub fn step(&mut self, c: &mut Cluster) {
        let Some(config) = c.config().replication else {
            return;
        };
        if self.rng.next_u64().is_multiple_of(SKIP_ONE_IN) {
            return;
        }
        let node = (self.rng.next_u64() % c.nodes.len() as u64) as usize;
        let group = self.rng.next_u64() % (u64::from(config.shards) + 1);
        let mut id = [0; 16];
        self.rng.fill_bytes(&mut id);
        let id = ProposalId(id);
        self.sent += 1;
        let data = format!("probe {}", self.sent).into_bytes();
        let request = c.new_request();
        c.proposed.push((node, request, group, id));
        let to = replicas_of(c.nodes[node].id);
        c.tell(
            to,
            ReplicasMsg::Propose {
                group,
                id,
                data,
                request,
            },
        );
    }
}
