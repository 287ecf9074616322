//! `arcade-sim demo`: an embedded coordinator (redb in a temp dir) on loopback, a
//! generated sample plugin (a real `#!/bin/sh` executable padded to a chosen size)
//! pushed with its SHA-256, then fetched by a small fleet of registered agent
//! identities, each verifying every chunk's BLAKE3 against the manifest and the whole
//! SHA-256. Prints per agent: bytes from the coordinator and the time to a verified
//! plugin; then coordinator egress ÷ plugin size.
//!
//! Until the mesh lands every byte comes from the coordinator, so egress ÷ size equals
//! the fleet size; the mesh issue brings it down to about 1.

use std::time::{Duration, Instant};

use arcade_coordinator::RunningCoordinator;
use arcade_coordinator::config::CoordinatorConfig;
use arcade_coordinator::metrics::PluginVersionLabels;
use arcade_p2p::ContentId;
use arcade_p2p::settings::ByteSize;
use arcade_proto::v1 as pb;
use serde::Serialize;

use crate::client::Conn;
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
    /// Bytes received from the coordinator.
    pub bytes_from_coordinator: u64,
    /// Seconds from request to a verified plugin.
    pub seconds_to_verified: f64,
    /// `verified` or the error.
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
    /// Seconds to push it.
    pub push_seconds: f64,
    /// Per agent.
    pub agents: Vec<AgentRow>,
    /// Bytes the coordinator served for this plugin (from its metrics).
    pub coordinator_egress_bytes: u64,
    /// Egress divided by plugin size.
    pub egress_over_size: f64,
}

impl DemoReport {
    /// True when every agent verified the plugin.
    pub fn all_verified(&self) -> bool {
        self.agents.iter().all(|a| a.result == "verified")
    }

    /// The human-readable table.
    pub fn table(&self) -> String {
        let mut out = format!(
            "plugin {} sha256={} size={} bytes chunks={} (pushed in {:.2}s)\n\n",
            self.plugin,
            &self.sha256[..16],
            self.size,
            self.chunks,
            self.push_seconds
        );
        out.push_str(&format!(
            "{:<10} {:>18} {:>12}  {}\n",
            "agent", "from coordinator", "verified in", "result"
        ));
        for a in &self.agents {
            out.push_str(&format!(
                "{:<10} {:>18} {:>11.2}s  {}\n",
                a.agent_id, a.bytes_from_coordinator, a.seconds_to_verified, a.result
            ));
        }
        out.push_str(&format!(
            "\ncoordinator egress: {} bytes = {:.2} x plugin size ({} agents; every byte from the coordinator until the mesh lands)\n",
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
    let mut config = CoordinatorConfig {
        listen: "127.0.0.1:0".into(),
        metrics_listen: "off".into(),
        data_dir: dir.path().join("coordinator"),
        ..Default::default()
    };
    config.plugin.max_plugin_size = ByteSize::mib(opts.size_mib.max(1) + 1);
    let running = RunningCoordinator::start(config.validate()?).await?;
    let conn = Conn::of(&running);

    let (id, version) = ("demo/hello", "1.0.0");
    let data = sample_plugin((opts.size_mib << 20) as usize);
    let sha = ContentId::of_bytes(&data);
    let started = Instant::now();
    let pushed = conn
        .push(
            id,
            version,
            &data,
            pb::PushPluginHeader {
                expected_sha256: sha.to_hex(),
                description: "Arcade Mesh demo plugin".into(),
                ..Default::default()
            },
        )
        .await?
        .plugin
        .ok_or_else(|| anyhow::anyhow!("push returned no plugin"))?;
    let push_seconds = started.elapsed().as_secs_f64();
    drop(data);

    let mut tasks = Vec::new();
    for n in 0..opts.agents {
        let agent_id = format!("agent-{n:02}");
        let token = conn
            .register_with(
                &agent_id,
                &[("zone", if n % 2 == 0 { "a" } else { "b" })],
                vec![],
                "",
            )
            .await?;
        let conn = conn.clone();
        tasks.push(tokio::spawn(async move {
            let started = Instant::now();
            let outcome = tokio::time::timeout(
                Duration::from_secs(120),
                conn.fetch_verified(&token, id, version),
            )
            .await;
            let secs = started.elapsed().as_secs_f64();
            let (bytes, result) = match outcome {
                Ok(Ok(b)) => (b, "verified".to_string()),
                Ok(Err(e)) => (0, format!("failed: {e}")),
                Err(_) => (0, "failed: timed out after 120 s".to_string()),
            };
            AgentRow {
                agent_id,
                bytes_from_coordinator: bytes,
                seconds_to_verified: secs,
                result,
            }
        }));
    }
    let mut agents = Vec::new();
    for t in tasks {
        agents.push(t.await?);
    }
    let egress = running
        .metrics()
        .served_bytes
        .get_or_create(&PluginVersionLabels {
            plugin_id: id.into(),
            version: version.into(),
        })
        .get();
    running.shutdown().await;
    Ok(DemoReport {
        plugin: format!("{id}@{version}"),
        sha256: pushed.sha256,
        size: pushed.size,
        chunks: pushed.chunks,
        push_seconds,
        agents,
        coordinator_egress_bytes: egress,
        egress_over_size: egress as f64 / pushed.size.max(1) as f64,
    })
}
