//! The `conclave` binary (see `conclave --help`).

fn main() -> std::process::ExitCode {
    conclave_cli::main()
}
