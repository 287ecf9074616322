//! Harness for the end-to-end tests: real coordinators started in-process on
//! 127.0.0.1:0 with their own temp data directory (or as real processes, see
//! [`process`]), reached with the authenticated clients of `arcade_simulations::client`
//! over real TCP.
#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]

pub mod agents;
pub mod faults;
pub mod peers;
pub mod process;
pub mod proxy;

use std::path::{Path, PathBuf};
use std::time::Duration;

use arcade_coordinator::RunningCoordinator;
use arcade_coordinator::config::CoordinatorConfig;
use arcade_p2p::settings::{ByteSize, Seconds};
pub use arcade_simulations::client::{Authed, Bearer, Conn};

/// Admin token of test coordinators.
pub const ADMIN: &str = "test-admin-token";
/// Enrollment token of test coordinators.
pub const ENROLL: &str = "test-enroll-token";

/// A test coordinator and its data directory.
pub struct TestCoordinator {
    /// The running coordinator (None once stopped).
    pub running: Option<RunningCoordinator>,
    /// How to reach it.
    pub conn: Conn,
    /// The config it was started with.
    pub config: CoordinatorConfig,
    /// Its temp dir (data_dir is `dir/data`).
    pub dir: tempfile::TempDir,
}

/// A config for tests: loopback port 0, fixed tokens, small chunks, unsafe content
/// allowed (tests push arbitrary bytes), data under `dir`.
pub fn test_config(dir: &Path) -> CoordinatorConfig {
    let mut c = CoordinatorConfig {
        listen: "127.0.0.1:0".into(),
        metrics_listen: "127.0.0.1:0".into(),
        data_dir: dir.join("data"),
        admin_token: ADMIN.into(),
        enroll_token: ENROLL.into(),
        ..Default::default()
    };
    c.plugin.chunk_size = ByteSize::kib(64);
    c.plugin.security.allow_unsafe = true;
    c.plugin.security.require_checksum = false;
    c.jobs.lease_ttl = Seconds::secs(30);
    c
}

impl TestCoordinator {
    /// Starts a coordinator with [`test_config`] adjusted by `tweak`.
    pub async fn start(tweak: impl FnOnce(&mut CoordinatorConfig)) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut config = test_config(dir.path());
        tweak(&mut config);
        let running = RunningCoordinator::start(config.clone().validate().expect("valid config"))
            .await
            .expect("coordinator starts");
        Self {
            conn: Conn::of(&running),
            running: Some(running),
            config,
            dir,
        }
    }

    /// Stops the coordinator (graceful) and starts it again on the same data.
    pub async fn restart(&mut self) {
        self.restart_after(|_| {}).await;
    }

    /// Stops the coordinator (graceful), hands its data directory to `while_stopped`
    /// (to tamper with its files, as a compromised host would), and starts it again.
    pub async fn restart_after(&mut self, while_stopped: impl FnOnce(&Path)) {
        if let Some(r) = self.running.take() {
            r.shutdown().await;
        }
        while_stopped(&self.config.data_dir);
        let mut config = self.config.clone();
        config.listen = "127.0.0.1:0".into();
        let running = RunningCoordinator::start(config.validate().expect("valid config"))
            .await
            .expect("coordinator restarts");
        self.conn = Conn::of(&running);
        self.running = Some(running);
    }

    /// Blob storage root.
    pub fn storage(&self) -> PathBuf {
        self.config.data_dir.join("plugins")
    }
}

impl std::ops::Deref for TestCoordinator {
    type Target = Conn;
    fn deref(&self) -> &Conn {
        &self.conn
    }
}

/// Creates a job running `command` that needs `plugin@version` in every stage, for
/// agents carrying every `selector` label; returns its id.
pub async fn create_job(
    c: &Conn,
    plugin: &str,
    version: &str,
    command: &str,
    selector: &[(&str, &str)],
) -> String {
    submit(
        c,
        command,
        selector,
        vec![arcade_proto::v1::RequiredPlugin {
            plugin_id: plugin.into(),
            version: version.into(),
            stages: vec![],
            ..Default::default()
        }],
    )
    .await
}

/// Queues a job running one shell command (no plugin); returns its id.
pub async fn command_job(c: &Conn, command: &str) -> String {
    submit(c, command, &[], vec![]).await
}

/// Queues a job running one shell command (no plugin) for agents carrying every
/// `selector` label; returns its id.
pub async fn create_job_with(c: &Conn, command: &str, selector: &[(&str, &str)]) -> String {
    submit(c, command, selector, vec![]).await
}

async fn submit(
    c: &Conn,
    command: &str,
    selector: &[(&str, &str)],
    required_plugins: Vec<arcade_proto::v1::RequiredPlugin>,
) -> String {
    c.jobs(&c.admin_token)
        .await
        .create_job(arcade_proto::v1::CreateJobRequest {
            commands: vec![command.into()],
            label_selector: selector
                .iter()
                .map(|(k, v)| arcade_proto::v1::Label {
                    key: (*k).into(),
                    value: (*v).into(),
                })
                .collect(),
            required_plugins,
            ..Default::default()
        })
        .await
        .expect("create job")
        .into_inner()
        .job_id
}

/// One `FetchJob` long-poll (at most one job) as agent `agent_id` with `token`.
pub async fn fetch_one(
    c: &Conn,
    token: &str,
    agent_id: &str,
    wait_seconds: u32,
) -> Vec<arcade_proto::v1::Job> {
    c.agent(token)
        .await
        .fetch_job(arcade_proto::v1::FetchJobRequest {
            agent_id: agent_id.into(),
            max_jobs: 1,
            wait_seconds,
        })
        .await
        .expect("fetch job")
        .into_inner()
        .jobs
}

/// Waits (at most `limit`) until job `id` succeeded, failed or was cancelled; an error
/// names the job.
pub async fn finished_job(
    c: &Conn,
    id: &str,
    limit: Duration,
) -> anyhow::Result<arcade_proto::v1::JobDetail> {
    use arcade_proto::v1::JobStatus;
    eventually(limit, || async {
        let j = c
            .jobs(&c.admin_token)
            .await
            .get_job(arcade_proto::v1::GetJobRequest { job_id: id.into() })
            .await
            .ok()?
            .into_inner()
            .job?;
        matches!(
            j.status(),
            JobStatus::Succeeded | JobStatus::Failed | JobStatus::Cancelled
        )
        .then_some(j)
    })
    .await
    .ok_or_else(|| anyhow::anyhow!("job {id} did not finish within {limit:?}"))
}

/// Waits (at most 60 s) until job `id` succeeded or failed, and returns it.
pub async fn wait_job(c: &Conn, id: &str) -> arcade_proto::v1::JobDetail {
    finished_job(c, id, Duration::from_secs(60))
        .await
        .unwrap_or_else(|e| panic!("{e}"))
}

/// Runs a job that needs `plugin@version` for agents carrying every `selector` label
/// and asserts that it succeeded.
pub async fn run_ok(c: &Conn, plugin: &str, version: &str, selector: &[(&str, &str)]) {
    let id = create_job(c, plugin, version, "true", selector).await;
    let job = wait_job(c, &id).await;
    assert_eq!(
        job.status(),
        arcade_proto::v1::JobStatus::Succeeded,
        "{}",
        job.error_message
    );
}

/// The registered agents (`None` if the call failed), for polling with [`eventually`].
pub async fn registered_agents(c: &Conn) -> Option<Vec<arcade_proto::v1::AgentSummary>> {
    let mut fleet = c.fleet(&c.admin_token).await;
    let answer = fleet
        .list_agents(arcade_proto::v1::ListAgentsRequest {})
        .await
        .ok()?;
    Some(answer.into_inner().agents)
}

/// Waits (at most 20 s) until the coordinator lists `agent` as holding the content
/// `sha256` (hex): its heartbeats reported it, so peer hints name it from now on.
pub async fn wait_holder(c: &Conn, agent: &str, sha256: &str) {
    eventually(Duration::from_secs(20), || async {
        registered_agents(c)
            .await?
            .iter()
            .any(|a| a.agent_id == agent && a.installed_plugins.iter().any(|p| p.sha256 == sha256))
            .then_some(())
    })
    .await
    .unwrap_or_else(|| panic!("the coordinator did not learn that {agent} holds {sha256}"));
}

/// A `#!/bin/sh` script of `len` bytes that exits 0, then deterministic noise (so its
/// chunks neither compress nor repeat).
pub fn script(len: usize, seed: u8) -> Vec<u8> {
    let mut v = b"#!/bin/sh\nexit 0\n".to_vec();
    v.extend(content(len - v.len(), seed));
    v
}

/// The next release of `prev` (at least 603,000 bytes): 1500 bytes inserted at 4 KiB
/// (every later offset moves) and 3000 bytes replaced at 600 KB.
pub fn next_release(prev: &[u8], seed: u8) -> Vec<u8> {
    let mut v = prev[..4096].to_vec();
    v.extend(content(1500, seed));
    v.extend_from_slice(&prev[4096..600_000]);
    v.extend(content(3000, seed.wrapping_add(1)));
    v.extend_from_slice(&prev[603_000..]);
    v
}

/// Deterministic test content of `len` bytes.
pub fn content(len: usize, seed: u8) -> Vec<u8> {
    let mut x = 0x9E37_79B9u32 ^ u32::from(seed).wrapping_mul(0x85EB_CA6B);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

/// Polls `f` every 50 ms until it returns `Some`, for at most `limit`.
pub async fn eventually<T, F, Fut>(limit: Duration, mut f: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if let Some(v) = f().await {
            return Some(v);
        }
        if tokio::time::Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Files a coordinator's plugin storage holds, recursively, without its lock file
/// (`.lock`, there from the start).
pub fn storage_files(dir: &Path) -> Vec<PathBuf> {
    files_under(dir)
        .into_iter()
        .filter(|f| f.file_name().is_none_or(|n| n != ".lock"))
        .collect()
}

/// Files under `dir`, recursively.
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(files_under(&p));
            } else {
                out.push(p);
            }
        }
    }
    out
}
