//! Tests that start real conclave nodes, in-process and as processes, over real QUIC.
//! They live under `tests/`; this library is empty.
