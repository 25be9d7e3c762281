//! conclave's deterministic simulator: whole clusters of the real actors in one
//! process, faults drawn from a seed, oracles checked during and after every run.
//!
//! [`cluster::Cluster`] is the deterministic driver: the domain's actors on one
//! thread, a virtual clock, random sources derived from one seed, an in-memory
//! network and in-memory disks with crash semantics.
#![warn(missing_docs)]

pub mod cluster;
pub mod draw;
pub mod faults;
pub mod hash;
pub mod model;
pub mod options;
pub mod oracle;
pub mod probes;
pub mod run;
pub mod workload;

pub use cluster::Cluster;
pub use options::Options;
pub use run::{run, run_with, Failure, Report};
