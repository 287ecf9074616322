//! `arcade-sim bench-mesh`: one embedded coordinator and N in-process agents (each its
//! own libp2p host, gRPC session, cache and upload limiter) on loopback; every agent
//! gets a job needing the same generated plugin at once. Bandwidth is shaped by the
//! project's own limiters: the coordinator's `serve.egress_rate` and each agent's
//! `mesh.upload_rate`. The same run is repeated with the mesh off (everything from the
//! coordinator, the original design) for comparison.
//!
//! Figures: fleet completion time (job creation → last job succeeded), the physical
//! lower bound `max(S/u_server, N·S/(u_server + Σ u_agent))` and the ratio, coordinator
//! egress ÷ S (from its served-bytes metric), bytes from peers vs the coordinator, and
//! CPU seconds of this process per GiB delivered.

use std::time::{Duration, Instant};

use arcade_agent::config::AgentConfig;
use arcade_agent::runtime::RunningAgent;
use arcade_coordinator::RunningCoordinator;
use arcade_coordinator::config::CoordinatorConfig;
use arcade_coordinator::metrics::PluginVersionLabels;
use arcade_p2p::settings::{ByteSize, Seconds};
use arcade_proto::v1 as pb;
use serde::Serialize;

use crate::client::Conn;

/// What a run is.
#[derive(Debug, Clone)]
pub struct MeshOptions {
    /// Agents.
    pub agents: usize,
    /// Plugin size, MiB.
    pub size_mib: u64,
    /// Coordinator egress, MiB/s.
    pub server_mibps: u64,
    /// Each agent's upload, MiB/s.
    pub peer_mibps: u64,
}

/// Figures of one run.
#[derive(Debug, Clone, Serialize)]
pub struct RunFigures {
    /// Mesh on?
    pub mesh: bool,
    /// Seconds from job creation to the last success.
    pub fleet_seconds: f64,
    /// The physical lower bound, seconds.
    pub bound_seconds: f64,
    /// fleet / bound.
    pub over_bound: f64,
    /// Coordinator egress for the plugin ÷ plugin size.
    pub egress_over_size: f64,
    /// Bytes the agents got from peers.
    pub bytes_from_peers: u64,
    /// Bytes the agents got from the coordinator.
    pub bytes_from_server: u64,
    /// CPU seconds (user + system) of this process per GiB delivered to agents.
    pub cpu_seconds_per_gib: f64,
}

/// Both runs.
#[derive(Debug, Clone, Serialize)]
pub struct MeshFigures {
    /// Agents.
    pub agents: usize,
    /// Plugin bytes.
    pub plugin_bytes: u64,
    /// Coordinator egress cap, bytes/s.
    pub server_bytes_per_s: u64,
    /// Agent upload cap, bytes/s.
    pub peer_bytes_per_s: u64,
    /// With the mesh, then without.
    pub runs: Vec<RunFigures>,
}

fn cpu_seconds() -> f64 {
    // utime and stime are fields 14 and 15 of /proc/self/stat, in clock ticks (100/s).
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (ticks(11) + ticks(12)) / 100.0
}

async fn run_once(opts: &MeshOptions, mesh: bool) -> anyhow::Result<RunFigures> {
    let mib = 1u64 << 20;
    let size = opts.size_mib * mib;
    let dir = tempfile::tempdir()?;
    let mut cc = CoordinatorConfig {
        listen: "127.0.0.1:0".into(),
        metrics_listen: "off".into(),
        data_dir: dir.path().join("coordinator"),
        ..Default::default()
    };
    cc.plugin.max_plugin_size = ByteSize(size + mib);
    cc.serve.egress_rate = ByteSize(opts.server_mibps * mib);
    cc.serve.max_streams = 4 * opts.agents as u32 + 16;
    cc.jobs.heartbeat_interval = Seconds(Duration::from_millis(500));
    cc.jobs.lease_ttl = Seconds::secs(120);
    let coordinator = RunningCoordinator::start(cc.validate()?).await?;
    let conn = Conn::of(&coordinator);

    conn.push_generated("bench/swarm", "1.0.0", size, 11)
        .await?;

    let mut agents = Vec::new();
    for n in 0..opts.agents {
        let mut c = AgentConfig {
            id: format!("agent-{n:03}"),
            coordinator: conn.url.clone(),
            enroll_token: conn.enroll_token.clone(),
            data_dir: dir.path().join(format!("agent-{n:03}")),
            metrics_listen: "off".into(),
            max_concurrent_jobs: 1,
            ..Default::default()
        };
        c.jobs.poll_wait = Seconds::secs(5);
        c.download.timeout = Seconds::secs(60);
        c.mesh.enabled = mesh;
        c.mesh.listen = vec!["/ip4/127.0.0.1/tcp/0".into()];
        c.mesh.allow_loopback = true;
        c.mesh.upload_rate = ByteSize(opts.peer_mibps * mib);
        c.mesh.max_uploads = 16;
        agents.push(RunningAgent::start(c.validate()?).await?);
    }
    // Let every agent register before the herd arrives.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let cpu_before = cpu_seconds();
    let started = Instant::now();
    let mut jobs = conn.jobs(&conn.admin_token).await;
    let mut ids = Vec::new();
    for _ in 0..opts.agents {
        let id = jobs
            .create_job(pb::CreateJobRequest {
                commands: vec!["true".into()],
                required_plugins: vec![pb::RequiredPlugin {
                    plugin_id: "bench/swarm".into(),
                    version: "1.0.0".into(),
                    stages: vec![pb::Stage::Before as i32],
                }],
                ..Default::default()
            })
            .await?
            .into_inner()
            .job_id;
        ids.push(id);
    }
    let deadline = Instant::now() + Duration::from_secs(900);
    let mut fleet_seconds;
    loop {
        let mut done = 0;
        for id in &ids {
            let j = jobs
                .get_job(pb::GetJobRequest { job_id: id.clone() })
                .await?
                .into_inner()
                .job
                .ok_or_else(|| anyhow::anyhow!("job {id} missing"))?;
            match j.status() {
                pb::JobStatus::Succeeded => done += 1,
                pb::JobStatus::Failed => anyhow::bail!("job {id} failed: {}", j.error_message),
                _ => {}
            }
        }
        fleet_seconds = started.elapsed().as_secs_f64();
        if done == ids.len() {
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "fleet did not finish in 900 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let cpu = cpu_seconds() - cpu_before;
    let (mut from_peers, mut from_server) = (0, 0);
    for a in &agents {
        from_peers += a.metrics().fetched_from("peer");
        from_server += a.metrics().fetched_from("server");
    }
    let egress = coordinator
        .metrics()
        .served_bytes
        .get_or_create(&PluginVersionLabels {
            plugin_id: "bench/swarm".into(),
            version: "1.0.0".into(),
        })
        .get();
    for a in agents {
        a.shutdown().await?;
    }
    coordinator.shutdown().await;
    let s = size as f64;
    let n = opts.agents as f64;
    let u_server = (opts.server_mibps * mib) as f64;
    let u_agents = if mesh {
        n * (opts.peer_mibps * mib) as f64
    } else {
        0.0
    };
    let bound = (s / u_server).max(n * s / (u_server + u_agents));
    Ok(RunFigures {
        mesh,
        fleet_seconds,
        bound_seconds: bound,
        over_bound: fleet_seconds / bound,
        egress_over_size: egress as f64 / s,
        bytes_from_peers: from_peers,
        bytes_from_server: from_server,
        cpu_seconds_per_gib: cpu
            / ((from_peers + from_server) as f64 / (1u64 << 30) as f64).max(1e-9),
    })
}

/// Runs with the mesh, then without.
pub async fn run(opts: &MeshOptions) -> anyhow::Result<MeshFigures> {
    let with = run_once(opts, true).await?;
    let without = run_once(opts, false).await?;
    Ok(MeshFigures {
        agents: opts.agents,
        plugin_bytes: opts.size_mib << 20,
        server_bytes_per_s: opts.server_mibps << 20,
        peer_bytes_per_s: opts.peer_mibps << 20,
        runs: vec![with, without],
    })
}
