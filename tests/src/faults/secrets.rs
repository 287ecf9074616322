//! A job tries to read the agent's secrets, and the modes of what holds them.
//!
//! `token-leak`: a real `arcade-agent` process gets its enrollment token from the
//! environment (`ARCADE_ENROLL_TOKEN`, as documented). Its job reads the agent's
//! `/proc/$PPID/environ`, `/proc/$PPID/cmdline` and its own environment and prints them:
//! the token must appear in none. When the suite runs as root the agent runs as the
//! unprivileged user `nobody` (`setpriv`), because root reads any process's `/proc`
//! files whatever the agent does; the job runs as the agent's user, like any job.
//! The same run checks modes: the agent's data directory and the coordinator's are
//! `0700`, the redb files and tokens `0600`, downloaded plugins `0555`.

use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, ensure};
use arcade_proto::v1 as pb;

use super::{Outcome, Scenario};
use crate::process::AgentProcess;
use crate::{TestCoordinator, finished_job};

/// The scenarios of this module.
pub const SCENARIOS: &[(&str, Scenario)] = &[("token-leak", || Box::pin(token_leak()))];

const NOBODY: u32 = 65534;

fn mode(path: &Path) -> anyhow::Result<u32> {
    Ok(std::fs::metadata(path)
        .with_context(|| format!("stat {}", path.display()))?
        .permissions()
        .mode()
        & 0o777)
}

fn chown_tree(path: &Path, uid: u32) -> anyhow::Result<()> {
    std::os::unix::fs::chown(path, Some(uid), Some(uid))?;
    if path.is_dir() {
        for e in std::fs::read_dir(path)? {
            chown_tree(&e?.path(), uid)?;
        }
    }
    Ok(())
}

async fn token_leak() -> anyhow::Result<Outcome> {
    let c = TestCoordinator::start(|c| {
        c.jobs.heartbeat_interval = arcade_p2p::settings::Seconds(Duration::from_millis(500));
        c.jobs.lease_ttl = arcade_p2p::settings::Seconds::secs(10);
    })
    .await;
    let root = nix_is_root();
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("agent");
    let mut cfg = crate::agents::agent_config(&data, &c.url, "", "leaky");
    cfg.mesh.enabled = false;
    let config = dir.path().join("agent.toml");
    std::fs::write(&config, toml::to_string(&cfg)?)?;
    let mut cmd = AgentProcess::command(&config);
    cmd.env("ARCADE_ENROLL_TOKEN", &c.enroll_token);
    if root {
        std::fs::create_dir_all(&data)?;
        // A copy of the binary `nobody` can reach, wherever the checkout lives (a
        // clone under /root is not traversable by other users).
        let bin = dir.path().join("arcade-agent");
        std::fs::copy(cmd.get_program(), &bin).context("copy the agent binary")?;
        std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755))?;
        chown_tree(dir.path(), NOBODY)?;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))?;
        let args: Vec<_> = cmd.get_args().map(ToOwned::to_owned).collect();
        let mut wrapped = std::process::Command::new("setpriv");
        wrapped
            .args([
                "--reuid",
                "65534",
                "--regid",
                "65534",
                "--clear-groups",
                "--",
            ])
            .arg(bin)
            .args(args)
            .env("RUST_LOG", "warn")
            .env("ARCADE_ENROLL_TOKEN", &c.enroll_token);
        cmd = wrapped;
    }
    let _agent = AgentProcess::spawn(cmd)?;

    let probe = "for f in /proc/$PPID/environ /proc/$PPID/cmdline; do echo \"== $f\"; tr '\\0' '\\n' < $f 2>&1; done; echo '== env'; env";
    let id = crate::command_job(&c, probe).await;
    let job = finished_job(&c, &id, Duration::from_secs(60)).await?;
    ensure!(
        job.status() == pb::JobStatus::Succeeded,
        "the probing job did not run: {} {}",
        job.error_message,
        job.output_tail
    );
    let out = &job.output_tail;
    ensure!(
        out.contains("== env") && out.contains("ARCADE_JOB_ID"),
        "the probe printed nothing useful: {out}"
    );
    ensure!(
        !out.contains(&c.enroll_token),
        "the job read the agent's enrollment token:\n{out}"
    );
    let environ_refused = out.contains("Permission denied");

    // Modes of what holds secrets and what may run.
    let mut checked = 0;
    for (path, want) in [
        (data.join("data"), 0o700),
        (data.join("data").join("plugins"), 0o700),
        (data.join("data").join("plugins").join("index.redb"), 0o600),
        (c.config.data_dir.clone(), 0o700),
        (c.config.data_dir.join("coordinator.redb"), 0o600),
        (c.config.data_dir.join("mesh.key"), 0o600),
        (c.config.data_dir.join("plugins"), 0o700),
    ] {
        if path.exists() {
            let got = mode(&path)?;
            ensure!(
                got == want,
                "{} has mode {got:o}, not {want:o}",
                path.display()
            );
            checked += 1;
        }
    }
    ensure!(
        checked >= 6,
        "only {checked} of the files whose modes matter exist"
    );
    Ok(Outcome {
        outcome: format!(
            "a job of a real agent ({}) read /proc/$PPID/environ and cmdline ({}) and its own environment: no token in any; {checked} data dirs, redb files and keys have modes 0700/0600",
            if root {
                "run as nobody"
            } else {
                "run as this user"
            },
            if environ_refused {
                "permission denied"
            } else {
                "readable, token absent"
            },
        ),
        ..Default::default()
    })
}

fn nix_is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|e| e == "0"))
        })
        .unwrap_or(false)
}
