//! `arcadectl` — the admin client of the Arcade Mesh coordinator (see
//! `arcade_coordinator::ctl`).
#![forbid(unsafe_code)]

use std::process::ExitCode;

use arcade_coordinator::ctl::{self, Cli};

fn main() -> ExitCode {
    match Cli::parse_args(std::env::args_os()) {
        Ok(cli) => ctl::run(cli),
        Err(code) => code,
    }
}
