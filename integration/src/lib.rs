//! Tests that start real conclave nodes, in-process and as processes, over real
//! QUIC. They live under `tests/`; this library holds what several of them use.

pub mod hostile;
pub mod processes;
