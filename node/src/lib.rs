//! conclave: end-to-end-encrypted group messaging between nodes.
//!
//! This crate is the runtime library: it hosts conclave's sans-IO actors on actix
//! (a private driver), keeps node identities on disk ([`identity_file`]), offers the
//! embedding API ([`Node`], [`User`]; see [`api`]) and the client protocol
//! ([`RemoteNode`]), serves metrics and health ([`observe`]), and administers a
//! stopped node's data directory ([`admin`]). The `conclave` binary (CLI, local
//! cluster, demo, benchmark) is the `conclave-cli` crate.
//!
//! Its public API carries no actix, LMDB (heed) or quinn type.
#![warn(missing_docs)]

pub mod admin;
mod admission;
pub mod api;
pub mod client;
mod data_dir;
mod host;
pub mod identity_file;
pub mod logging;
pub mod observe;
mod remote;
#[doc(hidden)]
pub mod testing;
pub mod user;

pub use admin::{seed_admin_offline, AdminError, Seeded};
pub use api::{LocalFrames, Node, NodeBuilder, StartError};
pub use conclave_actors::domain::{Asked, Denial, History, Outcome, Policy, RoomRole, UserRole};
pub use conclave_actors::replication::{Replication, ReplicationStatus};
pub use conclave_actors::{
    Epoch, Identity, MessageId, NodeId, PublicIdentity, RoomId, Seq, UserId,
};
pub use data_dir::DataDirError;
pub use host::{RouteError, StartError as RuntimeStartError, ACTIVE_ACTORS_MAX, MAILBOX_DEPTH_MAX};
pub use remote::{RemoteFrames, RemoteNode};
pub use user::{
    ApiError, Backend, FrameSource, Message, Position, Receipt, Subscription, User,
    CHAIN_LINKS_PER_CALL_MAX,
};
