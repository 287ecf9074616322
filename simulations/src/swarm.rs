//! `arcade-sim swarm` and the real-stack engine of `arcade-sim run`: a real coordinator
//! (embedded, real gRPC over TCP, real redb) and N real agents in this process, each
//! with its own libp2p host, gRPC session, cache directory and upload limiter, on
//! loopback. Every agent gets one job (pinned to it by a `name` label) that needs every
//! plugin of the [`Scenario`]; the jobs are created at once, so the whole fleet wants the
//! same content at the same moment.
//!
//! Bandwidth is shaped by the project's own limiters: the coordinator's
//! `serve.egress_rate` (the server link's `up_mibps`) and each agent's
//! `mesh.upload_rate` (its link's `up_mibps`). With `network = "loopback"` (the default)
//! nothing else shapes: no download cap, no latency. With `network = "netns"` every
//! agent runs in its own network namespace and runtime ([`crate::netns`]) and the
//! kernel shapes the links as well (`tc tbf`: uploads, downloads, the coordinator's
//! egress), as a real network would behind the same settings. Latency is the model's
//! only. Churn: late
//! joiners start `late_after_s` after the jobs are created; leavers are dropped (stopped
//! at once, connections reset, like a killed process) `leave_after_s` after.
//!
//! Figures (see [`FleetReport`]): per agent, time from job creation to its first plugin
//! stage (every plugin fetched and verified, millisecond resolution), bytes by source
//! from the agent's metrics; coordinator egress from its served-bytes metric; after the
//! run every completed agent's cached plugin files are hashed and compared with the
//! pushed SHA-256 (`verified`).

use std::time::{Duration, Instant};

use arcade_agent::runtime::RunningAgent;
use arcade_coordinator::RunningCoordinator;
use arcade_coordinator::metrics::PluginVersionLabels;
use arcade_p2p::ContentId;
use arcade_p2p::settings::{ByteSize, Seconds};
use arcade_proto::v1 as pb;

use crate::client::Conn;
use crate::local;
use crate::netns::{self, Namespaces};
use crate::report::{AgentOutcome, FleetReport, cpu_seconds};
use crate::scenario::{Network, Scenario};

/// Most agents the real engine starts (ports, file descriptors and two cores).
pub const MAX_REAL_AGENTS: usize = 256;

fn mib_rate(mibps: f64) -> ByteSize {
    if mibps <= 0.0 || !mibps.is_finite() {
        ByteSize(0)
    } else {
        ByteSize((mibps * (1u64 << 20) as f64) as u64)
    }
}

/// Runs `scenario` on the real stack.
pub async fn run(scenario: &Scenario) -> anyhow::Result<FleetReport> {
    scenario.validate()?;
    anyhow::ensure!(
        scenario.agents <= MAX_REAL_AGENTS,
        "the real stack runs at most {MAX_REAL_AGENTS} agents on one machine; use `arcade-sim model` for {}",
        scenario.agents
    );
    match scenario.network {
        Network::Loopback => run_on(scenario, None).await,
        Network::Netns => {
            let server = scenario.server.clone();
            let links: Vec<_> = scenario.plan().into_iter().map(|p| p.link).collect();
            let ns = std::sync::Arc::new(
                tokio::task::spawn_blocking(move || Namespaces::create(&server, &links)).await??,
            );
            // The coordinator and this harness live in the hub namespace.
            let hub = netns::runtime_in(&ns.hub(), 2)?;
            let (s, n) = (scenario.clone(), ns.clone());
            let report = hub.spawn(async move { run_on(&s, Some(&n)).await }).await;
            hub.shutdown_background();
            tokio::task::spawn_blocking(move || drop(ns)).await?;
            report?
        }
    }
}

/// One agent of the run and, in a namespace, the runtime its tasks run on.
struct Member {
    /// Present until [`Member::shutdown`].
    agent: Option<RunningAgent>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl Member {
    async fn start(
        config: arcade_agent::config::ValidConfig,
        ns: Option<(&Namespaces, usize)>,
    ) -> anyhow::Result<Self> {
        let Some((ns, n)) = ns else {
            return Ok(Self {
                agent: Some(RunningAgent::start(config).await?),
                runtime: None,
            });
        };
        let runtime = netns::runtime_in(&ns.agent(n), 1)?;
        // Spawned, not `block_on`: the agent's sockets are made on the runtime's own
        // threads, inside its namespace.
        let agent = runtime.spawn(RunningAgent::start(config)).await??;
        Ok(Self {
            agent: Some(agent),
            runtime: Some(runtime),
        })
    }

    async fn shutdown(mut self) -> anyhow::Result<()> {
        if let Some(agent) = self.agent.take() {
            agent.shutdown().await?;
        }
        Ok(())
    }
}

impl std::ops::Deref for Member {
    type Target = RunningAgent;

    fn deref(&self) -> &RunningAgent {
        self.agent.as_ref().expect("present until shutdown")
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        // The agent first (it cancels its tasks), then the runtime they ran on.
        drop(self.agent.take());
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// How long a fleet sits idle after its fetch while its CPU is measured
/// ([`FleetReport::idle_cpu_ms_per_agent_s`]).
const IDLE_WINDOW: Duration = Duration::from_secs(2);

async fn run_on(scenario: &Scenario, ns: Option<&Namespaces>) -> anyhow::Result<FleetReport> {
    let mib = 1u64 << 20;
    let sizes = scenario.plugin_bytes();
    let total = scenario.total_bytes();
    let dir = tempfile::tempdir()?;
    let mut cc = local::coordinator_config(dir.path());
    cc.plugin.max_plugin_size = ByteSize(sizes.iter().max().copied().unwrap_or(0) + mib);
    cc.plugin.chunk_size = ByteSize(scenario.chunk_bytes());
    cc.serve.egress_rate = mib_rate(scenario.server.up_mibps);
    cc.jobs.lease_ttl = Seconds::secs(120);
    let level = if scenario.compression {
        scenario.compression_level
    } else {
        0
    };
    // The coordinator keeps its default level (3); off with compression off.
    if !scenario.compression {
        cc.serve.compression_level = 0;
    }
    if ns.is_some() {
        // Plaintext gRPC, as on loopback: the hub's bridge is private to this run.
        cc.listen = format!("{}:0", netns::HUB_IP);
        cc.tls.insecure = true;
    }
    let coordinator = RunningCoordinator::start(cc.validate()?).await?;
    let conn = Conn {
        insecure: ns.is_some(),
        ..Conn::of(&coordinator)
    };

    let cdc = arcade_p2p::cdc::parse_chunking(&scenario.chunking)
        .map_err(|e| anyhow::anyhow!("chunking: {e}"))?
        .map(|p| arcade_p2p::manifest::cdc_to_proto(&p));
    let mut plugins = Vec::new();
    for (i, size) in sizes.iter().enumerate() {
        let id = format!("sim/plugin-{i}");
        let pushed = match &scenario.content_file {
            Some(path) => {
                // A script that exits 0 (the job runs it) carrying the file's bytes.
                let file = std::fs::read(path)
                    .map_err(|e| anyhow::anyhow!("content_file {}: {e}", path.display()))?;
                let mut bytes = b"#!/bin/sh\nexit 0\n".to_vec();
                let take = (*size as usize).saturating_sub(bytes.len());
                anyhow::ensure!(
                    file.len() >= take,
                    "content_file {} has {} bytes, fewer than the plugin's {size}",
                    path.display(),
                    file.len()
                );
                bytes.extend_from_slice(&file[..take]);
                let header = pb::PushPluginHeader {
                    expected_sha256: ContentId::of_bytes(&bytes).to_hex(),
                    cdc,
                    ..Default::default()
                };
                conn.push(&id, "1.0.0", &bytes, header).await?
            }
            None => {
                let header = pb::PushPluginHeader {
                    cdc,
                    ..Default::default()
                };
                conn.push_generated(
                    &id,
                    "1.0.0",
                    *size,
                    scenario.seed.wrapping_add(i as u64),
                    header,
                )
                .await?
            }
        }
        .plugin
        .ok_or_else(|| anyhow::anyhow!("push of {id} returned no plugin"))?;
        plugins.push((id, pushed.sha256));
    }

    let plans = scenario.plan();
    let agent_config = |n: usize| -> anyhow::Result<_> {
        let mut c = local::agent_config(&conn, dir.path(), &format!("agent-{n:04}"));
        c.max_concurrent_jobs = 1;
        c.download.timeout = Seconds::secs(3600);
        c.download.request_timeout = Seconds::secs(120);
        c.mesh.enabled = scenario.p2p;
        c.mesh.upload_rate = mib_rate(plans[n].link.up_mibps);
        c.mesh.max_uploads = 16;
        c.mesh.dht = scenario.dht;
        c.mesh.compression_level = level;
        c.download.compression = scenario.compression;
        if ns.is_some() {
            c.mesh.listen = vec![format!("/ip4/{}/tcp/0", netns::agent_ip(n))];
            c.tls.insecure = true;
        }
        Ok(c.validate()?)
    };
    let mut agents: Vec<Option<Member>> = Vec::new();
    for (n, plan) in plans.iter().enumerate() {
        agents.push(if plan.start_s > 0.0 {
            None
        } else {
            Some(Member::start(agent_config(n)?, ns.map(|ns| (ns, n))).await?)
        });
    }
    // Let every agent register before the herd arrives.
    tokio::time::sleep(Duration::from_millis(500)).await;

    let cpu_before = cpu_seconds();
    let started = Instant::now();
    let mut jobs = conn.jobs(&conn.admin_token).await;
    let plugin_ids: Vec<&str> = plugins.iter().map(|(id, _)| id.as_str()).collect();
    let mut ids = Vec::new();
    for n in 0..scenario.agents {
        let id = jobs
            .create_job(local::pinned_job(
                "swarm",
                &format!("agent-{n:04}"),
                "true",
                &plugin_ids,
                "1.0.0",
                &[pb::Stage::Before],
            ))
            .await?
            .into_inner()
            .job_id;
        ids.push(id);
    }

    let limit = Duration::from_secs_f64(
        (10.0 * scenario.bound_seconds() + 120.0).min(3600.0)
            + plans.iter().map(|p| p.start_s).fold(0.0, f64::max),
    );
    let mut cancelled = 0u64;
    let mut outcomes: Vec<AgentOutcome> = (0..scenario.agents)
        .map(|n| AgentOutcome {
            agent_id: format!("agent-{n:04}"),
            ..Default::default()
        })
        .collect();
    let mut done = vec![false; scenario.agents];
    let mut seen = Vec::new();
    loop {
        let t = started.elapsed().as_secs_f64();
        for (n, plan) in plans.iter().enumerate() {
            if plan.start_s > 0.0 && agents[n].is_none() && !done[n] && t >= plan.start_s {
                agents[n] = Some(Member::start(agent_config(n)?, ns.map(|ns| (ns, n))).await?);
            }
            if let Some(leave) = plan.leave_s
                && t >= leave
                && !done[n]
                && let Some(agent) = agents[n].take()
            {
                outcomes[n].peer_bytes = agent.metrics().fetched_from("peer");
                outcomes[n].server_bytes = agent.metrics().fetched_from("server");
                outcomes[n].uploaded_bytes = agent.metrics().uploaded_bytes.get();
                cancelled += agent.metrics().mesh_cancelled.get();
                outcomes[n].left = true;
                done[n] = true;
                drop(agent);
            }
        }
        // One call for every job's status: the harness shares the fleet's CPU, and a
        // call per agent every 50 ms (1,280 calls/s for 64 agents) was counted in the
        // fleet's CPU per GiB. A job's time comes from its own timestamps, not from
        // when the harness saw it finish.
        let listed = jobs
            .list_jobs(pb::ListJobsRequest {
                status: pb::JobStatus::Unspecified as i32,
                limit: (ids.len() as u32).clamp(1, 1000),
            })
            .await?
            .into_inner()
            .jobs;
        let mut listed: std::collections::HashMap<String, pb::JobDetail> =
            listed.into_iter().map(|j| (j.job_id.clone(), j)).collect();
        for (n, id) in ids.iter().enumerate() {
            if done[n] {
                continue;
            }
            let j = match listed.remove(id) {
                Some(j) => j,
                None => jobs
                    .get_job(pb::GetJobRequest { job_id: id.clone() })
                    .await?
                    .into_inner()
                    .job
                    .ok_or_else(|| anyhow::anyhow!("job {id} missing"))?,
            };
            match j.status() {
                pb::JobStatus::Succeeded => {
                    let first_stage = j.plugin_results.iter().map(|r| r.start_time).min();
                    outcomes[n].t_s =
                        first_stage.map(|s| (s - j.created_at).max(0) as f64 / 1000.0);
                    done[n] = true;
                    seen.push(n);
                }
                pb::JobStatus::Failed => {
                    tracing::warn!(agent = n, error = %j.error_message, "job failed");
                    outcomes[n].failed = true;
                    done[n] = true;
                }
                _ => {}
            }
        }
        if done.iter().all(|d| *d) || started.elapsed() > limit {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let cpu = cpu_seconds() - cpu_before;
    let wall = started.elapsed().as_secs_f64();
    // What the fleet costs doing nothing, connections and all: timers, heartbeats,
    // announcements, libp2p's per-connection work. Charged per agent-second, so a
    // cost that grows with N shows apart from the per-byte cost.
    let idle_before = cpu_seconds();
    tokio::time::sleep(IDLE_WINDOW).await;
    let idle_cpu = cpu_seconds() - idle_before;
    let online = agents.iter().flatten().count().max(1);

    let mut egress = 0;
    for (id, _) in &plugins {
        egress += coordinator
            .metrics()
            .served_bytes
            .get_or_create(&PluginVersionLabels {
                plugin_id: id.clone(),
                version: "1.0.0".into(),
            })
            .get();
    }
    for (n, slot) in agents.iter().enumerate() {
        let Some(agent) = slot else { continue };
        let o = &mut outcomes[n];
        o.peer_bytes = agent.metrics().fetched_from("peer");
        o.server_bytes = agent.metrics().fetched_from("server");
        o.uploaded_bytes = agent.metrics().uploaded_bytes.get();
        cancelled += agent.metrics().mesh_cancelled.get();
        if !done[n] {
            o.failed = true;
        }
    }
    // Hash every completed agent's plugin files against the pushed SHA-256s.
    for &n in &seen {
        let Some(agent) = &agents[n] else { continue };
        let installed = agent.cache().installed()?;
        let mut all = true;
        for (_, sha) in &plugins {
            let file = installed.iter().find(|c| c.sha256.to_hex() == *sha);
            all &= match file {
                Some(c) => verify_file(c.path.clone(), c.sha256, c.size).await,
                None => false,
            };
        }
        outcomes[n].verified = all;
    }
    for agent in agents.into_iter().flatten() {
        agent.shutdown().await?;
    }
    coordinator.shutdown().await;

    let delivered: u64 = outcomes.iter().map(|o| o.peer_bytes + o.server_bytes).sum();
    let mut report = FleetReport {
        engine: "real".into(),
        network: if ns.is_some() { "netns" } else { "loopback" }.into(),
        scenario: scenario.name.clone(),
        p2p: scenario.p2p,
        dht: scenario.dht,
        compression: scenario.compression,
        compression_level: if scenario.compression {
            scenario.compression_level
        } else {
            0
        },
        chunking: scenario.chunking.clone(),
        content: scenario
            .content_file
            .as_ref()
            .map_or_else(|| "generated".to_owned(), |p| p.display().to_string()),
        seed: scenario.seed,
        agents: scenario.agents,
        size_bytes: total,
        chunk_bytes: scenario.chunk_bytes(),
        server_egress_bytes: egress,
        wall_s: wall,
        cpu_s_per_gib: cpu / (delivered as f64 / (1u64 << 30) as f64).max(1e-9),
        idle_cpu_ms_per_agent_s: idle_cpu * 1000.0 / (online as f64 * IDLE_WINDOW.as_secs_f64()),
        per_agent: outcomes,
        cancelled_requests: cancelled,
        ..Default::default()
    };
    report.summarise(scenario.bound_seconds());
    Ok(report)
}

/// Whether a file's size and SHA-256 match ([`arcade_p2p::manifest::verify_sha256`]),
/// read off the async runtime.
async fn verify_file(path: std::path::PathBuf, sha256: ContentId, size: u64) -> bool {
    tokio::task::spawn_blocking(move || {
        std::fs::File::open(&path)
            .is_ok_and(|f| arcade_p2p::manifest::verify_sha256(f, sha256, size).is_ok())
    })
    .await
    .unwrap_or(false)
}
