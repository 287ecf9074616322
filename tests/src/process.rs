//! Real `arcade-coordinator` processes for the crash tests.
//!
//! Binaries are the ones `cargo test --workspace` builds beside the test executables
//! (`target/<profile>/arcade-coordinator`, `arcade-agent`); `ARCADE_COORDINATOR_BIN` /
//! `ARCADE_AGENT_BIN` name others.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::{ADMIN, Conn, ENROLL};

/// Path of a workspace binary (`arcade-coordinator`, `arcade-agent`): the one built
/// beside the test executables, or `$ARCADE_<NAME>_BIN` (e.g. `ARCADE_AGENT_BIN`).
pub fn workspace_bin(name: &str) -> PathBuf {
    let var = format!("{}_BIN", name.to_ascii_uppercase().replace('-', "_"));
    if let Some(p) = std::env::var_os(&var) {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("current exe");
    let mut dir = exe.parent().expect("exe dir").to_owned();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let bin = dir.join(name);
    assert!(
        bin.exists(),
        "{} is missing: run the tests with `cargo test --workspace` (which builds it) or `cargo build --bins` first",
        bin.display()
    );
    bin
}

/// A coordinator child process with the test tokens; killed when dropped.
pub struct CoordinatorProcess {
    inner: arcade_simulations::process::CoordinatorProcess,
    /// How to reach it.
    pub conn: Conn,
}

impl CoordinatorProcess {
    /// Starts the binary with `--config config --data-dir data_dir` on 127.0.0.1:0.
    /// The config must set the test tokens ([`ADMIN`], [`ENROLL`]).
    pub fn start(config: &Path, data_dir: &Path, metrics: bool) -> Self {
        let mut cmd = Command::new(workspace_bin("arcade-coordinator"));
        cmd.arg("--config")
            .arg(config)
            .arg("--data-dir")
            .arg(data_dir)
            .args(["--listen", "127.0.0.1:0"])
            .args([
                "--metrics-listen",
                if metrics { "127.0.0.1:0" } else { "off" },
            ])
            .env("RUST_LOG", "warn");
        let inner = arcade_simulations::process::CoordinatorProcess::spawn(cmd, metrics)
            .expect("coordinator process starts");
        let conn = Conn {
            url: inner.url(),
            metrics_addr: inner.metrics_addr,
            admin_token: ADMIN.into(),
            enroll_token: ENROLL.into(),
        };
        Self { inner, conn }
    }

    /// SIGKILL, then reap.
    pub fn kill9(self) {
        self.inner.kill9();
    }
}

impl std::ops::Deref for CoordinatorProcess {
    type Target = Conn;
    fn deref(&self) -> &Conn {
        &self.conn
    }
}
