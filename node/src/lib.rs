//! conclave: end-to-end-encrypted group messaging between nodes.
//!
//! This crate is the runtime: it hosts conclave's sans-IO actors on actix
//! ([`host`]), keeps node identities on disk ([`identity_file`]), and provides the
//! `conclave` binary.
#![warn(missing_docs)]

pub mod host;
pub mod identity_file;
