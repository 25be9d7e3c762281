//! conclave's actors: the sans-IO actor model, the typed wire format, identities and
//! the cryptography every message pays for.
//!
//! Nothing in this crate touches the operating system: time, randomness, storage and
//! sending all come through an actor's [`Context`]. That is what lets the same actors
//! run on actix in production and inside the deterministic simulator.
#![warn(missing_docs)]

pub mod actor;
pub mod crypto;
pub mod domain;
pub mod identity;
pub mod ids;
pub mod lifecycle;
pub mod mutation;
pub mod outbox;
pub mod replication;
pub mod wire;

pub use actor::{Actor, ActorKind, ActorRef, Context, Effect, Handler, System, Time};
pub use identity::{Identity, IdentityError, PublicIdentity};
pub use ids::{Epoch, MessageId, NodeId, RoomId, Seq, UserId};
