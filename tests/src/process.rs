//! Real `arcade-coordinator` and `arcade-agent` processes for the crash tests.
//!
//! Binaries are the ones `cargo test --workspace` builds beside the test executables
//! (`target/<profile>/arcade-coordinator`, `arcade-agent`); `ARCADE_COORDINATOR_BIN` /
//! `ARCADE_AGENT_BIN` name others.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use crate::{ADMIN, Conn, ENROLL};

/// Runs the real `arcadectl` against `coordinator` (its URL) with the admin token.
pub fn arcadectl(coordinator: &str, args: &[&str]) -> std::process::Output {
    Command::new(workspace_bin("arcadectl"))
        .args(args)
        .env("ARCADE_COORDINATOR", coordinator)
        .env("ARCADE_TOKEN", ADMIN)
        .output()
        .expect("run arcadectl")
}

/// [`arcadectl`] off the async workers (agents in the same test share them).
pub async fn arcadectl_async(coordinator: &str, args: &[&str]) -> std::process::Output {
    let (url, args): (String, Vec<String>) = (
        coordinator.into(),
        args.iter().map(|a| a.to_string()).collect(),
    );
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        arcadectl(&url, &args)
    })
    .await
    .expect("arcadectl task")
}

/// The standard output of a command that must have succeeded.
pub fn stdout_ok(out: &std::process::Output) -> String {
    assert!(
        out.status.success(),
        "command failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The standard error of a command that must have failed.
pub fn stderr_failed(out: &std::process::Output) -> String {
    assert!(
        !out.status.success(),
        "command succeeded: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

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
        Self::start_on(config, data_dir, "127.0.0.1:0", metrics)
            .expect("coordinator process starts")
    }

    /// Like [`CoordinatorProcess::start`], listening on `listen` (e.g. the address of a
    /// previous process, so that its clients reconnect by themselves); fails instead of
    /// panicking.
    pub fn start_on(
        config: &Path,
        data_dir: &Path,
        listen: &str,
        metrics: bool,
    ) -> anyhow::Result<Self> {
        let mut cmd = Command::new(workspace_bin("arcade-coordinator"));
        cmd.arg("--config")
            .arg(config)
            .arg("--data-dir")
            .arg(data_dir)
            .args(["--listen", listen])
            .args([
                "--metrics-listen",
                if metrics { "127.0.0.1:0" } else { "off" },
            ])
            .env("RUST_LOG", "warn");
        let inner = arcade_simulations::process::CoordinatorProcess::spawn(cmd, metrics)?;
        let conn = Conn {
            url: inner.url(),
            metrics_addr: inner.metrics_addr,
            admin_token: ADMIN.into(),
            enroll_token: ENROLL.into(),
            insecure: false,
        };
        Ok(Self { inner, conn })
    }

    /// SIGKILL, then reap.
    pub fn kill9(self) {
        self.inner.kill9();
    }

    /// Its current resident set size, bytes.
    pub fn rss(&self) -> Option<u64> {
        self.inner.rss()
    }
}

impl std::ops::Deref for CoordinatorProcess {
    type Target = Conn;
    fn deref(&self) -> &Conn {
        &self.conn
    }
}

/// A loopback address with a port that was free a moment ago (bound, then released), for
/// a server that must come back on the same address after a restart.
pub fn free_loopback_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind 127.0.0.1:0")
}

/// An `arcade-agent` child process started with `--config`; killed (SIGKILL) and
/// reaped when dropped.
pub struct AgentProcess(Child);

impl AgentProcess {
    /// Starts the agent binary with `--config config` (stdout discarded, `RUST_LOG=warn`).
    pub fn start(config: &Path) -> anyhow::Result<Self> {
        Self::spawn(Self::command(config))
    }

    /// The command line [`AgentProcess::start`] runs, to adjust (environment, a wrapper).
    pub fn command(config: &Path) -> Command {
        let mut cmd = Command::new(workspace_bin("arcade-agent"));
        cmd.arg("--config").arg(config).env("RUST_LOG", "warn");
        cmd
    }

    /// Spawns a prepared agent command line (stdin and stdout discarded).
    pub fn spawn(mut cmd: Command) -> anyhow::Result<Self> {
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .map_err(|e| anyhow::anyhow!("cannot start arcade-agent: {e}"))?;
        Ok(Self(child))
    }

    /// Process id.
    pub fn pid(&self) -> u32 {
        self.0.id()
    }

    /// SIGKILL, then reap.
    pub fn kill9(self) {
        drop(self);
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
