//! conclave: end-to-end-encrypted group messaging between nodes.
//!
//! This crate is the runtime: it hosts conclave's sans-IO actors on actix (a
//! private driver), keeps node identities on disk ([`identity_file`]), offers the
//! embedding API ([`Node`], [`User`]; see [`api`]), and provides the `conclave`
//! binary.
#![warn(missing_docs)]

pub mod api;
pub mod bench;
pub mod cli;
pub mod client;
mod host;
pub mod identity_file;
pub mod observe;
pub mod user;

pub use api::{LocalFrames, Node, NodeBuilder, StartError};
pub use client::RemoteNode;
pub use conclave_actors::domain::{Denial, History, Policy, RoomRole, UserRole};
pub use conclave_actors::{Identity, NodeId, PublicIdentity, UserId};
pub use host::{RouteError, StartError as RuntimeStartError, ACTIVE_ACTORS_MAX, MAILBOX_DEPTH_MAX};
pub use user::{ApiError, Backend, FrameSource, Message, Position, Receipt, Subscription, User};
