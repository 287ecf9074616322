//! `arcade-coordinator` — see `arcade_coordinator::cli` and the README's CLI reference.
#![forbid(unsafe_code)]

fn main() -> std::process::ExitCode {
    arcade_coordinator::cli::main()
}
