//! `arcade-agent` — see `arcade_agent::cli` and the README's CLI reference.
#![forbid(unsafe_code)]

fn main() -> std::process::ExitCode {
    arcade_agent::cli::main()
}
