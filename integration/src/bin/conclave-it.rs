//! The `conclave` command line, built inside this package so that its tests can
//! run it as processes (`CARGO_BIN_EXE_conclave-it`). Same code as `conclave`
//! (the `conclave-cli` crate).

fn main() -> std::process::ExitCode {
    conclave_cli::main()
}
