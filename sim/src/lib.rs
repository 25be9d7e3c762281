//! conclave's deterministic simulator: whole clusters of the real actors in one
//! process, faults drawn from a seed, oracles checked during and after every run.
//!
//! It is built in its own issue; this crate holds its place in the workspace and the
//! clippy rules (`clippy.toml`) that keep it deterministic.
