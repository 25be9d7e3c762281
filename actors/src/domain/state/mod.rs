//! The domain's tables and the queries over them, apart from the actors.
//!
//! Actors decide and apply; what they read and write lives here, so that no actor
//! imports another to read its tables, and so that a later replicated log can apply
//! the same writes on every replica. Every scan has a named bound (no
//! `usize::MAX`), and what is read back is checked against what it must be.
//!
//! | module | holds |
//! |---|---|
//! | [`registry`] | the node's users (role, status, bound X25519 key) |
//! | [`rooms`] | each room's record, members, frames, message ids, local readers' visibility, and its signed creation |
//! | [`keys`] | sealed epoch keys by (room, user, epoch) |

pub mod keys;
pub mod registry;
pub mod rooms;
