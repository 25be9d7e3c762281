//! The `conclave` binary.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// conclave: end-to-end-encrypted group messaging between nodes.
#[derive(Parser)]
#[command(version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create this node's identity (or load the existing one) and print the node id.
    ///
    /// The identity is written to DIR/node.id with mode 0600. A damaged identity file
    /// is reported and never replaced.
    ///
    /// Example: conclave init --data ./data/a
    Init {
        /// The node's data directory.
        #[arg(long, value_name = "DIR")]
        data: PathBuf,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Init { data } => {
            let path = data.join("node.id");
            let (identity, created) = conclave::identity_file::load_or_create(&path)?;
            if created {
                eprintln!("created a new node identity in {}", path.display());
            } else {
                eprintln!("node identity already exists in {}", path.display());
            }
            println!("{}", identity.node_id());
            Ok(())
        }
    }
}
