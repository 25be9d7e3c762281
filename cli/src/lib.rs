//! The `conclave` command line (`conclave --help`): runs nodes, a local cluster of
//! node processes, admin and client commands, the end-to-end check, the demo and
//! the benchmark, on top of the `conclave` runtime library.
//!
//! A library as well as a binary so that other binaries (the integration tests'
//! `conclave-it`) can run the very same command line through [`main`].
//!
//! Modules depend one way: `cli` (arguments, dispatch) uses `check`, `demo`,
//! `bench` and [`cluster`]; those use [`cluster`] and `signal`; [`cluster`] uses
//! only `signal` and the library; `pin` (which node a client command trusts) is used
//! by `cli` only.
#![warn(missing_docs)]

use std::process::ExitCode;

use clap::Parser as _;
use tracing_subscriber::prelude::*;

mod bench;
mod check;
mod cli;
pub mod cluster;
mod demo;
mod pin;
mod signal;

/// Runs the `conclave` command line with this process's arguments and returns its
/// exit code.
pub fn main() -> ExitCode {
    // The actors' lines are rate-limited per call site: a peer or a user can make
    // them log at will.
    tracing_subscriber::registry()
        .with(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with(conclave::logging::ThrottledActorLogs::default())
        .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr))
        .init();
    let cli = cli::Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(cli::run(cli)) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}
