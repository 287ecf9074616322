//! An agent whose data directory (a small tmpfs) fills up.
//!
//! `agent-disk-full`: an agent runs on a 4 MiB tmpfs; a job needs an 8 MiB plugin. The
//! job fails with an error naming the plugin and the bytes needed, nothing of the
//! plugin is published (nor left taking the space), a job with a small plugin still
//! runs, the cache reopens cleanly after a restart, and once the tmpfs is grown the
//! same big job succeeds with the right SHA-256 on disk.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context as _, bail, ensure};
use arcade_p2p::ContentId;
use arcade_proto::v1 as pb;

use super::{Outcome, Scenario};
use crate::agents::TestAgent;
use crate::{ENROLL, TestCoordinator, content, create_job, eventually, files_under, wait_job};

/// The scenarios of this module.
pub const SCENARIOS: &[(&str, Scenario)] = &[("agent-disk-full", || Box::pin(agent_disk_full()))];

const SMALL_DISK: u64 = 4 << 20;
const BIG_DISK: u64 = 32 << 20;
const BIG_PLUGIN: usize = 8 << 20;
const SMALL_PLUGIN: usize = 100_000;

/// A tmpfs mounted on a fresh directory; unmounted (lazily) when dropped.
struct Tmpfs {
    dir: PathBuf,
    _parent: tempfile::TempDir,
}

/// Why a tmpfs could not be mounted.
enum MountError {
    /// Not allowed here (not root, no CAP_SYS_ADMIN).
    Permission(String),
    /// Anything else.
    Other(anyhow::Error),
}

fn mount_cmd(args: &[&str], dir: &Path) -> Result<(), MountError> {
    let out = Command::new("mount")
        .args(args)
        .arg(dir)
        .output()
        .map_err(|e| MountError::Other(anyhow::anyhow!("cannot run mount: {e}")))?;
    if out.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&out.stderr).trim().to_owned();
    let lower = stderr.to_lowercase();
    if lower.contains("permission denied")
        || lower.contains("operation not permitted")
        || lower.contains("must be superuser")
        || lower.contains("only root")
    {
        Err(MountError::Permission(stderr))
    } else {
        Err(MountError::Other(anyhow::anyhow!(
            "mount {} failed ({}): {stderr}",
            args.join(" "),
            out.status
        )))
    }
}

impl Tmpfs {
    fn mount(size: u64) -> Result<Self, MountError> {
        let parent = tempfile::tempdir().map_err(|e| MountError::Other(e.into()))?;
        let dir = parent.path().join("agent-data");
        std::fs::create_dir(&dir).map_err(|e| MountError::Other(e.into()))?;
        mount_cmd(
            &["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"],
            &dir,
        )?;
        Ok(Self {
            dir,
            _parent: parent,
        })
    }

    /// Grows (or shrinks) the mounted file system; its files stay.
    fn resize(&self, size: u64) -> anyhow::Result<()> {
        mount_cmd(&["-o", &format!("remount,size={size}")], &self.dir).map_err(|e| match e {
            MountError::Permission(m) => anyhow::anyhow!("remount refused: {m}"),
            MountError::Other(e) => e,
        })
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
    }
}

fn plugin_bytes(len: usize, seed: u8) -> Vec<u8> {
    let mut p = b"#!/bin/sh\nexit 0\n".to_vec();
    p.extend(content(len - p.len(), seed));
    p
}

/// Bytes the files under `dir` occupy on disk (sparse holes not counted).
fn allocated_under(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt as _;
    files_under(dir)
        .iter()
        .filter_map(|p| std::fs::metadata(p).ok())
        .map(|m| m.blocks() * 512)
        .sum()
}

/// The agent `full` with its data directory at `dir`.
async fn start_agent(c: &TestCoordinator, dir: &Path) -> TestAgent {
    let dir = dir.to_owned();
    TestAgent::start(&c.url, ENROLL, "full", move |cfg, _| cfg.data_dir = dir).await
}

/// Runs one job needing `plugin@1.0.0` and returns it once finished.
async fn run_job(c: &TestCoordinator, plugin: &str) -> pb::JobDetail {
    let id = create_job(c, plugin, "1.0.0", "true", &[]).await;
    wait_job(c, &id).await
}

/// What the agent tells the coordinator it holds.
async fn installed(c: &TestCoordinator, agent: &str) -> anyhow::Result<Vec<String>> {
    let agents = c
        .fleet(&c.admin_token)
        .await
        .list_agents(pb::ListAgentsRequest {})
        .await?
        .into_inner()
        .agents;
    let a = agents
        .into_iter()
        .find(|a| a.agent_id == agent)
        .with_context(|| format!("agent {agent} is not registered"))?;
    Ok(a.installed_plugins
        .iter()
        .map(|p| format!("{}@{}={}", p.plugin_id, p.version, p.sha256))
        .collect())
}

/// Checks that the cache under `plugins` holds nothing of `sha`: no published file and
/// no partial bytes.
fn nothing_of(plugins: &Path, sha: &ContentId) -> anyhow::Result<()> {
    let hex = sha.to_hex();
    let downloaded = plugins.join("downloaded").join(&hex);
    ensure!(
        !downloaded.exists(),
        "cache consistency: the plugin that did not fit was published at {}",
        downloaded.display()
    );
    let partial_bytes: u64 = files_under(&plugins.join("temp"))
        .iter()
        .filter(|p| p.to_string_lossy().contains(&hex))
        .filter_map(|p| std::fs::metadata(p).ok())
        .map(|m| std::os::unix::fs::MetadataExt::blocks(&m) * 512)
        .sum();
    ensure!(
        partial_bytes == 0,
        "cache consistency: the failed download left {partial_bytes} bytes of partial content taking the space"
    );
    Ok(())
}

/// The SHA-256 of the published file of `sha` under `plugins`.
fn published_sha(plugins: &Path, sha: &ContentId) -> anyhow::Result<ContentId> {
    let path = plugins.join("downloaded").join(sha.to_hex());
    let bytes =
        std::fs::read(&path).with_context(|| format!("published plugin {}", path.display()))?;
    Ok(ContentId::of_bytes(&bytes))
}

async fn agent_disk_full() -> anyhow::Result<Outcome> {
    let disk = match Tmpfs::mount(SMALL_DISK) {
        Ok(d) => d,
        Err(MountError::Permission(why)) => {
            eprintln!("agent-disk-full: tmpfs mount refused: {why}");
            return Ok(Outcome {
                outcome: "skipped: mounting a tmpfs needs root".into(),
                ..Default::default()
            });
        }
        Err(MountError::Other(e)) => return Err(e.context("cannot mount the agent's tmpfs")),
    };
    let c = TestCoordinator::start(|_| {}).await;
    let big = plugin_bytes(BIG_PLUGIN, 1);
    let small = plugin_bytes(SMALL_PLUGIN, 2);
    let (big_sha, small_sha) = (ContentId::of_bytes(&big), ContentId::of_bytes(&small));
    c.push("disk/big", "1.0.0", &big, Default::default())
        .await
        .context("push disk/big")?;
    c.push("disk/small", "1.0.0", &small, Default::default())
        .await
        .context("push disk/small")?;

    let data_dir = disk.dir.clone();
    let mut agent = start_agent(&c, &data_dir).await;
    let plugins = agent.plugin_dir();
    let used_at_start = allocated_under(&data_dir);
    ensure!(
        used_at_start + 2 * (SMALL_PLUGIN as u64) < SMALL_DISK,
        "setup: the agent already uses {used_at_start} of the {SMALL_DISK} bytes of its tmpfs"
    );

    // 1. The plugin does not fit: a clear error naming the plugin and the space needed.
    let job = run_job(&c, "disk/big").await;
    ensure!(
        job.status() == pb::JobStatus::Failed,
        "a job whose plugin cannot fit on the agent's disk ended {:?}: {}",
        job.status(),
        job.error_message
    );
    let needed = format!("{} bytes needed", big.len());
    ensure!(
        job.error_message.contains("disk/big@1.0.0") && job.error_message.contains(&needed),
        "the disk-full error must name the plugin (disk/big@1.0.0) and the space needed ({needed}); got: {}",
        job.error_message
    );
    eprintln!(
        "agent-disk-full: the job failed with: {}",
        job.error_message
    );

    // 2. The cache stays consistent: nothing of the big plugin published or left
    //    taking the space; the agent keeps serving.
    nothing_of(&plugins, &big_sha)?;
    let listed = installed(&c, "full").await?;
    ensure!(
        !listed.iter().any(|p| p.starts_with("disk/big@")),
        "cache consistency: the agent reports the plugin that did not fit as installed: {listed:?}"
    );
    ensure!(
        !agent
            .agent()
            .cache()
            .installed()?
            .iter()
            .any(|p| p.sha256 == big_sha),
        "cache consistency: the agent's cache index lists the plugin that did not fit"
    );
    let job = run_job(&c, "disk/small").await;
    ensure!(
        job.status() == pb::JobStatus::Succeeded,
        "after the disk-full failure a job with a small plugin failed: {}",
        job.error_message
    );
    ensure!(
        published_sha(&plugins, &small_sha)? == small_sha,
        "the small plugin's published file fails its SHA-256"
    );

    // 3. The cache reopens cleanly on the same (still small) disk.
    agent.stop().await;
    let mut agent = start_agent(&c, &data_dir).await;
    let cached: Vec<ContentId> = agent
        .agent()
        .cache()
        .installed()?
        .iter()
        .map(|p| p.sha256)
        .collect();
    ensure!(
        cached.contains(&small_sha) && !cached.contains(&big_sha),
        "cache consistency after a restart on the full disk: expected the small plugin only, got {cached:?}"
    );

    // 4. Space freed: the same job succeeds and the file on disk has the right SHA-256.
    disk.resize(BIG_DISK)?;
    let job = run_job(&c, "disk/big").await;
    ensure!(
        job.status() == pb::JobStatus::Succeeded,
        "after the disk grew to {BIG_DISK} bytes the big job still failed: {}",
        job.error_message
    );
    let on_disk = published_sha(&plugins, &big_sha)?;
    ensure!(
        on_disk == big_sha,
        "the big plugin on disk hashes to {on_disk}, expected {big_sha}"
    );
    let reported = eventually(Duration::from_secs(20), || async {
        let l = installed(&c, "full").await.ok()?;
        l.iter()
            .any(|p| *p == format!("disk/big@1.0.0={}", big_sha.to_hex()))
            .then_some(())
    })
    .await;
    if reported.is_none() {
        bail!("the agent never reported disk/big@1.0.0 as installed after the successful job");
    }
    let server_bytes = agent.server_bytes();
    agent.stop().await;
    drop(disk);
    Ok(Outcome {
        outcome: format!(
            "8 MiB plugin on a 4 MiB tmpfs: job failed naming disk/big@1.0.0 and \"{needed}\"; nothing published or left behind; small-plugin job ok; cache reopened clean; tmpfs grown to 32 MiB: same job ok, SHA-256 verified"
        ),
        server_bytes,
        ..Default::default()
    })
}
