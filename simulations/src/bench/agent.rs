//! `arcade-sim bench-agent`:
//! 1. **Start latency** — an embedded coordinator and an in-process agent on loopback;
//!    `jobs` jobs each need one cached plugin in its `before` stage. For every job the
//!    figure is `before.start_time − job.started_at` (the agent stamps `started_at` when
//!    it receives the job), in milliseconds as the API carries them; p50/p99/max.
//! 2. **Agent peak RSS** — for each plugin size a fresh agent *process* (this binary
//!    re-executed as `arcade-sim agent …`, the same code as `arcade-agent`) fetches a
//!    generated plugin of that size from an embedded coordinator and runs it; its
//!    VmHWM is read from `/proc` when the job is done. With the mesh, an in-process seed
//!    agent fetches and runs the plugin first, and the measured agent gets it from the
//!    seed over libp2p (the coordinator points it there); the figure says how many bytes
//!    the coordinator sent it.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use arcade_agent::config::AgentConfig;
use arcade_agent::runtime::RunningAgent;
use arcade_coordinator::RunningCoordinator;
use arcade_coordinator::config::CoordinatorConfig;
use arcade_coordinator::metrics::PluginVersionLabels;
use arcade_p2p::ContentId;
use arcade_p2p::settings::{ByteSize, Seconds};
use arcade_proto::v1 as pb;
use serde::Serialize;

use crate::client::Conn;

/// Start-latency figures.
#[derive(Debug, Clone, Serialize)]
pub struct StartLatency {
    /// Jobs measured.
    pub jobs: usize,
    /// Median job-received → `before`-started, ms.
    pub p50_ms: i64,
    /// 99th percentile, ms.
    pub p99_ms: i64,
    /// Worst, ms.
    pub max_ms: i64,
    /// Jobs per second through one agent (one job at a time).
    pub jobs_per_s: f64,
}

/// Peak RSS of an agent fetching one plugin.
#[derive(Debug, Clone, Serialize)]
pub struct FetchRss {
    /// Plugin size in bytes.
    pub plugin_bytes: u64,
    /// Seconds from job creation to the job's success.
    pub job_seconds: f64,
    /// Agent peak RSS (VmHWM), MiB.
    pub agent_peak_rss_mib: f64,
    /// Fetched over the mesh from a seed agent (else from the coordinator).
    pub mesh: bool,
    /// Bytes the coordinator served to the measured agent (the seed's copy excluded).
    pub coordinator_bytes: u64,
}

/// Everything `bench-agent` measures.
#[derive(Debug, Clone, Serialize)]
pub struct AgentFigures {
    /// Start latency with a cached plugin.
    pub start_latency: StartLatency,
    /// Peak RSS per plugin size.
    pub fetch_rss: Vec<FetchRss>,
}

async fn coordinator(
    dir: &std::path::Path,
    max: ByteSize,
) -> anyhow::Result<(RunningCoordinator, Conn)> {
    let mut config = CoordinatorConfig {
        listen: "127.0.0.1:0".into(),
        metrics_listen: "off".into(),
        data_dir: dir.join("coordinator"),
        ..Default::default()
    };
    config.plugin.max_plugin_size = max;
    config.jobs.long_poll_max = Seconds::secs(5);
    let running = RunningCoordinator::start(config.validate()?).await?;
    let conn = Conn::of(&running);
    Ok((running, conn))
}

fn job_request(plugin: &str, version: &str) -> pb::CreateJobRequest {
    pb::CreateJobRequest {
        commands: vec!["true".into()],
        required_plugins: vec![pb::RequiredPlugin {
            plugin_id: plugin.into(),
            version: version.into(),
            stages: vec![pb::Stage::Before as i32],
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// Waits until every job in `ids` has finished; returns them (all must succeed).
async fn wait_jobs(
    conn: &Conn,
    ids: &[String],
    limit: Duration,
) -> anyhow::Result<Vec<pb::JobDetail>> {
    let deadline = Instant::now() + limit;
    let mut jobs = conn.jobs(&conn.admin_token).await;
    // Cheap progress check first: nothing queued or running any more.
    loop {
        let mut busy = 0;
        for status in [pb::JobStatus::Queued, pb::JobStatus::Running] {
            busy += jobs
                .list_jobs(pb::ListJobsRequest {
                    status: status as i32,
                    limit: 1,
                })
                .await?
                .into_inner()
                .jobs
                .len();
        }
        if busy == 0 {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "jobs still unfinished after {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut out = Vec::with_capacity(ids.len());
    for id in ids {
        let job = jobs
            .get_job(pb::GetJobRequest { job_id: id.clone() })
            .await?
            .into_inner()
            .job
            .ok_or_else(|| anyhow::anyhow!("job {id} missing"))?;
        anyhow::ensure!(
            job.status() == pb::JobStatus::Succeeded,
            "job {id} did not succeed: {}",
            job.error_message
        );
        out.push(job);
    }
    Ok(out)
}

fn percentile(sorted: &[i64], p: f64) -> i64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Measures start latency over `jobs` jobs with a cached plugin.
pub async fn start_latency(jobs: usize) -> anyhow::Result<StartLatency> {
    let dir = tempfile::tempdir()?;
    let (coordinator, conn) = coordinator(dir.path(), ByteSize::mib(1)).await?;
    let script = b"#!/bin/sh\nexit 0\n".to_vec();
    conn.push(
        "bench/noop",
        "1.0.0",
        &script,
        pb::PushPluginHeader {
            expected_sha256: ContentId::of_bytes(&script).to_hex(),
            ..Default::default()
        },
    )
    .await?;
    let mut config = AgentConfig {
        id: "bench-agent".into(),
        coordinator: conn.url.clone(),
        enroll_token: conn.enroll_token.clone(),
        data_dir: dir.path().join("agent"),
        metrics_listen: "off".into(),
        max_concurrent_jobs: 1,
        ..Default::default()
    };
    config.jobs.poll_wait = Seconds::secs(5);
    config.mesh.listen = vec!["/ip4/127.0.0.1/tcp/0".into()];
    let agent = RunningAgent::start(config.validate()?).await?;
    // Warm the cache with one job, then measure.
    let mut client = conn.jobs(&conn.admin_token).await;
    let warm = client
        .create_job(job_request("bench/noop", "1.0.0"))
        .await?
        .into_inner()
        .job_id;
    wait_jobs(&conn, &[warm], Duration::from_secs(60)).await?;
    let started = Instant::now();
    let mut ids = Vec::with_capacity(jobs);
    for _ in 0..jobs {
        let id = client
            .create_job(job_request("bench/noop", "1.0.0"))
            .await?
            .into_inner()
            .job_id;
        ids.push(id);
    }
    let done = wait_jobs(&conn, &ids, Duration::from_secs(600)).await?;
    let elapsed = started.elapsed();
    let mut delays: Vec<i64> = done
        .iter()
        .filter_map(|j| {
            let before = j.plugin_results.iter().find(|r| r.stage == "before")?;
            Some(before.start_time - j.started_at)
        })
        .collect();
    delays.sort_unstable();
    agent.shutdown().await?;
    coordinator.shutdown().await;
    Ok(StartLatency {
        jobs: delays.len(),
        p50_ms: percentile(&delays, 50.0),
        p99_ms: percentile(&delays, 99.0),
        max_ms: delays.last().copied().unwrap_or(0),
        jobs_per_s: jobs as f64 / elapsed.as_secs_f64(),
    })
}

fn rss_of(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    Some(line.split_whitespace().nth(1)?.parse::<u64>().ok()? * 1024)
}

/// Bytes the coordinator has served of `bench/big`.
fn served(coordinator: &RunningCoordinator) -> u64 {
    coordinator
        .metrics()
        .served_bytes
        .get_or_create(&PluginVersionLabels {
            plugin_id: "bench/big".into(),
            version: "1.0.0".into(),
        })
        .get()
}

/// Creates a job for the agent named `agent` that runs `bench/big` in its `before`
/// stage; returns the job id.
async fn run_big_on(conn: &Conn, agent: &str) -> anyhow::Result<String> {
    let job = crate::local::pinned_job(
        agent,
        agent,
        "true",
        &["bench/big"],
        "1.0.0",
        &[pb::Stage::Before],
    );
    Ok(conn
        .jobs(&conn.admin_token)
        .await
        .create_job(job)
        .await?
        .into_inner()
        .job_id)
}

/// Measures an agent process's peak RSS while it fetches and runs a plugin of `size`,
/// from the coordinator or (`mesh`) from a seed agent over the mesh.
pub async fn fetch_rss(size: u64, mesh: bool) -> anyhow::Result<FetchRss> {
    let dir = tempfile::tempdir()?;
    let (coordinator, conn) = coordinator(dir.path(), ByteSize(size + (1 << 20))).await?;
    conn.push_generated("bench/big", "1.0.0", size, size, Default::default())
        .await?;
    let seed = if mesh {
        let seed = RunningAgent::start(
            crate::local::agent_config(&conn, dir.path(), "rss-seed").validate()?,
        )
        .await?;
        let id = run_big_on(&conn, "rss-seed").await?;
        wait_jobs(&conn, &[id], Duration::from_secs(600)).await?;
        Some(seed)
    } else {
        None
    };
    let served_before = served(&coordinator);
    let mut child = Command::new(std::env::current_exe()?);
    child
        .arg("agent")
        .args([
            "--id",
            "rss-agent",
            "--metrics-listen",
            "off",
            "--coordinator",
            &conn.url,
        ])
        .env("ARCADE_MESH_LISTEN", r#"["/ip4/127.0.0.1/tcp/0"]"#)
        .env("ARCADE_MESH_ALLOW_LOOPBACK", "true")
        .args(["--label", "name=rss-agent"])
        .arg("--data-dir")
        .arg(dir.path().join("agent"))
        .env("ARCADE_ENROLL_TOKEN", &conn.enroll_token)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    let mut child = child.spawn()?;
    let started = Instant::now();
    let id = run_big_on(&conn, "rss-agent").await?;
    let outcome = wait_jobs(&conn, &[id], Duration::from_secs(600)).await;
    let seconds = started.elapsed().as_secs_f64();
    let rss = rss_of(child.id());
    let _ = child.kill();
    let _ = child.wait();
    let coordinator_bytes = served(&coordinator) - served_before;
    if let Some(seed) = seed {
        seed.shutdown().await?;
    }
    coordinator.shutdown().await;
    outcome?;
    Ok(FetchRss {
        plugin_bytes: size,
        job_seconds: seconds,
        agent_peak_rss_mib: rss.unwrap_or(0) as f64 / (1u64 << 20) as f64,
        mesh,
        coordinator_bytes,
    })
}

/// Runs both measurements.
pub async fn run(jobs: usize, sizes_mib: &[u64]) -> anyhow::Result<AgentFigures> {
    let start_latency = start_latency(jobs).await?;
    let mut fetch = Vec::new();
    for mesh in [false, true] {
        for &mib in sizes_mib {
            fetch.push(fetch_rss(mib << 20, mesh).await?);
        }
    }
    Ok(AgentFigures {
        start_latency,
        fetch_rss: fetch,
    })
}

#[cfg(test)]
mod tests {
    use super::percentile;

    #[test]
    fn percentiles_by_rank() {
        let v: Vec<i64> = (1..=100).collect();
        assert_eq!(percentile(&v, 50.0), 50);
        assert_eq!(percentile(&v, 99.0), 99);
        assert_eq!(percentile(&[7], 99.0), 7);
        assert_eq!(percentile(&[], 50.0), 0);
    }
}
