//! Coordinator child processes: spawned from a prepared `Command`, ready once they have
//! printed their listener lines, killed (SIGKILL) when dropped, with their peak RSS
//! readable from `/proc`.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// A running coordinator process.
#[derive(Debug)]
pub struct CoordinatorProcess {
    child: Child,
    /// Its gRPC address.
    pub grpc_addr: SocketAddr,
    /// Its metrics address, if it printed one.
    pub metrics_addr: Option<SocketAddr>,
}

impl CoordinatorProcess {
    /// Spawns `cmd` (an `arcade-coordinator` command line) and waits up to 30 s for
    /// `grpc listening on ADDR` (and `metrics listening on ADDR` when `metrics`).
    pub fn spawn(mut cmd: Command, metrics: bool) -> anyhow::Result<Self> {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .map_err(|e| anyhow::anyhow!("cannot start the coordinator: {e}"))?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| anyhow::anyhow!("no stdout"))?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut grpc_addr = None;
        let mut metrics_addr = None;
        while grpc_addr.is_none() || (metrics && metrics_addr.is_none()) {
            let line = match rx.recv_timeout(Duration::from_secs(30)) {
                Ok(l) => l,
                Err(_) => {
                    let _ = child.kill();
                    let status = child.wait().ok();
                    anyhow::bail!(
                        "the coordinator did not print its listener lines within 30 s (exit: {status:?})"
                    );
                }
            };
            if let Some(a) = line.strip_prefix("grpc listening on ") {
                grpc_addr = Some(a.parse()?);
            } else if let Some(a) = line.strip_prefix("metrics listening on ") {
                metrics_addr = Some(a.parse()?);
            }
        }
        Ok(Self {
            child,
            grpc_addr: grpc_addr.expect("loop ends with an address"),
            metrics_addr,
        })
    }

    /// `http://ADDR` of the gRPC listener.
    pub fn url(&self) -> String {
        format!("http://{}", self.grpc_addr)
    }

    /// Process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL, then reap.
    pub fn kill9(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Peak resident set size (VmHWM) in bytes, from `/proc/PID/status`.
    pub fn peak_rss(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).ok()?;
        let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
        let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kib * 1024)
    }

    /// Current resident set size (VmRSS) in bytes.
    pub fn rss(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).ok()?;
        let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
        let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kib * 1024)
    }
}

impl Drop for CoordinatorProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
