//! `arcade-sim demo`: an embedded coordinator (redb in a temp dir) and a small fleet of
//! real agents (each its own libp2p host, gRPC session, cache and job runner) on
//! loopback. A generated sample plugin — a real `#!/bin/sh` executable that reports its
//! stage, padded to a chosen size — is pushed with its SHA-256, then every agent gets a
//! job that runs it in its `before` and `after` stages. The agents fetch the plugin's
//! verified chunks from each other and from the coordinator. Prints per agent: bytes
//! from peers vs the coordinator, time from job creation to the verified plugin's first
//! stage, job result; then coordinator egress ÷ plugin size.

use std::time::{Duration, Instant};

use arcade_agent::runtime::RunningAgent;
use arcade_coordinator::RunningCoordinator;
use arcade_coordinator::metrics::PluginVersionLabels;
use arcade_p2p::ContentId;
use arcade_p2p::settings::ByteSize;
use arcade_proto::v1 as pb;
use serde::Serialize;

use crate::client::Conn;
use crate::local;
use crate::sample::sample_plugin;

/// What the demo runs.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// Fleet size.
    pub agents: usize,
    /// Sample plugin size in MiB.
    pub size_mib: u64,
}

/// One agent's line of the demo table.
#[derive(Debug, Clone, Serialize)]
pub struct AgentRow {
    /// Agent id.
    pub agent_id: String,
    /// Verified bytes received from peers.
    pub bytes_from_peers: u64,
    /// Verified bytes received from the coordinator.
    pub bytes_from_coordinator: u64,
    /// Seconds from job creation to the plugin's `before` stage (fetched and verified).
    pub seconds_to_verified: f64,
    /// `succeeded` or the failure.
    pub result: String,
}

/// The demo's outcome.
#[derive(Debug, Clone, Serialize)]
pub struct DemoReport {
    /// `id@version` of the sample plugin.
    pub plugin: String,
    /// Its SHA-256.
    pub sha256: String,
    /// Its size in bytes.
    pub size: u64,
    /// Chunks in its manifest.
    pub chunks: u32,
    /// Per agent.
    pub agents: Vec<AgentRow>,
    /// Bytes the coordinator served for this plugin (from its metrics).
    pub coordinator_egress_bytes: u64,
    /// Egress divided by plugin size.
    pub egress_over_size: f64,
}

impl DemoReport {
    /// True when every agent's job succeeded.
    pub fn all_succeeded(&self) -> bool {
        self.agents.iter().all(|a| a.result == "succeeded")
    }

    /// The human-readable table.
    pub fn table(&self) -> String {
        let mut out = format!(
            "plugin {} sha256={} size={} bytes chunks={}\n\n",
            self.plugin,
            &self.sha256[..16],
            self.size,
            self.chunks
        );
        out.push_str(&format!(
            "{:<10} {:>14} {:>18} {:>12}  {}\n",
            "agent", "from peers", "from coordinator", "verified in", "job"
        ));
        for a in &self.agents {
            out.push_str(&format!(
                "{:<10} {:>14} {:>18} {:>11.2}s  {}\n",
                a.agent_id,
                a.bytes_from_peers,
                a.bytes_from_coordinator,
                a.seconds_to_verified,
                a.result
            ));
        }
        out.push_str(&format!(
            "\ncoordinator egress: {} bytes = {:.2} x plugin size for {} agents\n",
            self.coordinator_egress_bytes,
            self.egress_over_size,
            self.agents.len()
        ));
        out
    }
}

/// Runs the demo.
pub async fn run(opts: &DemoOptions) -> anyhow::Result<DemoReport> {
    let dir = tempfile::tempdir()?;
    let mut config = local::coordinator_config(dir.path());
    config.plugin.max_plugin_size = ByteSize::mib(opts.size_mib.max(1) + 1);
    let coordinator = RunningCoordinator::start(config.validate()?).await?;
    let conn = Conn::of(&coordinator);

    let (id, version) = ("demo/hello", "1.0.0");
    let data = sample_plugin((opts.size_mib << 20) as usize);
    let pushed = conn
        .push(
            id,
            version,
            &data,
            pb::PushPluginHeader {
                expected_sha256: ContentId::of_bytes(&data).to_hex(),
                description: "Arcade Mesh demo plugin".into(),
                ..Default::default()
            },
        )
        .await?
        .plugin
        .ok_or_else(|| anyhow::anyhow!("push returned no plugin"))?;
    drop(data);

    let mut agents = Vec::new();
    for n in 0..opts.agents {
        let c = local::agent_config(&conn, dir.path(), &format!("agent-{n:02}"));
        agents.push(RunningAgent::start(c.validate()?).await?);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;

    let mut jobs = conn.jobs(&conn.admin_token).await;
    let mut ids = Vec::new();
    for n in 0..opts.agents {
        let job = jobs
            .create_job(local::pinned_job(
                "demo",
                &format!("agent-{n:02}"),
                "echo hello from $(hostname)",
                &[id],
                version,
                &[pb::Stage::Before, pb::Stage::After],
            ))
            .await?
            .into_inner()
            .job_id;
        ids.push(job);
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut details = Vec::new();
    for job in &ids {
        loop {
            let j = jobs
                .get_job(pb::GetJobRequest {
                    job_id: job.clone(),
                })
                .await?
                .into_inner()
                .job
                .ok_or_else(|| anyhow::anyhow!("job {job} missing"))?;
            if matches!(j.status(), pb::JobStatus::Succeeded | pb::JobStatus::Failed) {
                details.push(j);
                break;
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "the fleet did not finish within 120 s"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let mut rows = Vec::new();
    for (n, (agent, job)) in agents.iter().zip(&details).enumerate() {
        let before = job.plugin_results.iter().find(|r| r.stage == "before");
        rows.push(AgentRow {
            agent_id: format!("agent-{n:02}"),
            bytes_from_peers: agent.metrics().fetched_from("peer"),
            bytes_from_coordinator: agent.metrics().fetched_from("server"),
            seconds_to_verified: before
                .map_or(0.0, |b| (b.start_time - job.created_at) as f64 / 1000.0),
            result: if job.status() == pb::JobStatus::Succeeded {
                "succeeded".into()
            } else {
                format!("failed: {}", job.error_message)
            },
        });
    }
    let egress = coordinator
        .metrics()
        .served_bytes
        .get_or_create(&PluginVersionLabels {
            plugin_id: id.into(),
            version: version.into(),
        })
        .get();
    for a in agents {
        a.shutdown().await?;
    }
    coordinator.shutdown().await;
    Ok(DemoReport {
        plugin: format!("{id}@{version}"),
        sha256: pushed.sha256,
        size: pushed.size,
        chunks: pushed.chunks,
        agents: rows,
        coordinator_egress_bytes: egress,
        egress_over_size: egress as f64 / pushed.size.max(1) as f64,
    })
}
