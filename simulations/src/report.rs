//! The figures of one fleet run, the same for both engines ([`crate::swarm`], the real
//! stack, and [`crate::model`], the discrete-event model), so they can be compared and
//! charted. `--json` prints a [`FleetReport`] as one line.

use std::collections::BTreeMap;

use serde::Serialize;

/// One agent's outcome.
#[derive(Debug, Clone, Default, Serialize)]
pub struct AgentOutcome {
    /// Agent id (`agent-0007`).
    pub agent_id: String,
    /// Seconds from job creation until it held every plugin, verified; `None` if it
    /// never did (left, or failed).
    pub t_s: Option<f64>,
    /// Verified bytes it received from peers.
    pub peer_bytes: u64,
    /// Verified bytes it received from the coordinator.
    pub server_bytes: u64,
    /// Verified bytes it uploaded to peers.
    pub uploaded_bytes: u64,
    /// It left mid-transfer by design (churn).
    pub left: bool,
    /// Its job failed (or its fetch did not finish).
    pub failed: bool,
    /// Every plugin's SHA-256 was checked against the pushed one.
    pub verified: bool,
}

/// A whole run; the field names are the `--json` contract of the simulations issue.
#[derive(Debug, Clone, Default, Serialize)]
pub struct FleetReport {
    /// `real` or `model`.
    pub engine: String,
    /// The real engine's network: `loopback` or `netns` (empty for the model).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub network: String,
    /// Scenario name.
    pub scenario: String,
    /// Mesh on?
    pub p2p: bool,
    /// Agents ran the Kademlia DHT (real engine).
    #[serde(default)]
    pub dht: bool,
    /// Chunks travelled zstd-compressed where that paid (real engine).
    #[serde(default)]
    pub compression: bool,
    /// Peers' zstd level (0 with compression off; the coordinator's is 3).
    #[serde(default)]
    pub compression_level: u32,
    /// How the plugin was cut (real engine): `fixed`, `cdc`, `cdc:AVG`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub chunking: String,
    /// Where the plugin's bytes came from: `generated` (incompressible) or a file.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub content: String,
    /// Seed of every random choice.
    pub seed: u64,
    /// Fleet size (leavers included).
    pub agents: usize,
    /// Bytes every agent needs (all plugins of the job).
    pub size_bytes: u64,
    /// Chunk size, bytes.
    pub chunk_bytes: u64,
    /// Agents that got everything, verified.
    pub completed: usize,
    /// Agents that stayed but did not (failed jobs or timeouts).
    pub failed: usize,
    /// Agents that left by design.
    pub left: usize,
    /// Seconds until the last staying agent completed.
    pub t_all_s: f64,
    /// Fastest agent.
    pub t_min_agent_s: f64,
    /// Median agent.
    pub t_p50_s: f64,
    /// 99th percentile agent.
    pub t_p99_s: f64,
    /// Bytes the coordinator sent for the job's plugins.
    pub server_egress_bytes: u64,
    /// `server_egress_bytes ÷ size_bytes`.
    pub server_egress_ratio: f64,
    /// Bytes agents received from peers.
    pub peer_bytes: u64,
    /// Chunk bytes sent by the coordinator and every agent: `server_egress_bytes` plus
    /// every agent's `uploaded_bytes`.
    pub sent_bytes: u64,
    /// `sent_bytes ÷` the bytes agents kept: below 1 when compression paid.
    #[serde(default)]
    pub sent_over_delivered: f64,
    /// Bytes sent that no agent used: `sent_bytes` minus the verified bytes agents
    /// kept (duplicates of chunks already held, answers to cancelled requests, bad
    /// chunks). Only meaningful with compression off or on incompressible content:
    /// compressed chunks make `sent_bytes` smaller than what they carry.
    pub duplicate_bytes: u64,
    /// `duplicate_bytes ÷` the bytes agents kept.
    pub duplicate_ratio: f64,
    /// Peer chunk requests cancelled at the holder before their chunk was sent (real
    /// engine; the bytes they would have cost are not in `sent_bytes`).
    pub cancelled_requests: u64,
    /// The physical lower bound on `t_all_s` for the configured links, seconds:
    /// `max(S/u_server, S/d_min, N·S/(u_server + Σ u_agent))`.
    pub t_min_s: f64,
    /// `t_all_s ÷ t_min_s`.
    pub t_all_over_t_min: f64,
    /// Every completed agent's SHA-256 was checked (real stack: file hashes; model:
    /// every chunk accounted for).
    pub verified: bool,
    /// Wall-clock seconds the run took (the model's own cost, not simulated time).
    pub wall_s: f64,
    /// CPU seconds (user + system) of this process per GiB delivered to agents.
    pub cpu_s_per_gib: f64,
    /// CPU milliseconds per agent per second while the fleet sits idle after its fetch,
    /// every connection still open (real stack only; 0 for the model).
    #[serde(default)]
    pub idle_cpu_ms_per_agent_s: f64,
    /// Per agent, in agent order.
    pub per_agent: Vec<AgentOutcome>,
    /// The engine's own counters (the model: `events`, `peer_requests`, `peer_busy`,
    /// `server_requests`, `redirects`, `connections`, `connections_refused`, …).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub counters: BTreeMap<String, u64>,
    /// The same scenario with the mesh off (the seed's design), when compared in the
    /// same run (`--compare`); its per-agent rows are left out of JSON ([`Self::json_view`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub baseline: Option<Box<FleetReport>>,
}

impl FleetReport {
    /// Fills the summary fields from `per_agent` and the given totals.
    pub fn summarise(&mut self, t_min_s: f64) {
        let mut times: Vec<f64> = self.per_agent.iter().filter_map(|a| a.t_s).collect();
        times.sort_by(f64::total_cmp);
        self.completed = times.len();
        self.left = self
            .per_agent
            .iter()
            .filter(|a| a.left && a.t_s.is_none())
            .count();
        self.failed = self
            .per_agent
            .iter()
            .filter(|a| !a.left && a.t_s.is_none())
            .count();
        self.t_all_s = times.last().copied().unwrap_or(0.0);
        self.t_min_agent_s = times.first().copied().unwrap_or(0.0);
        self.t_p50_s = percentile(&times, 0.50);
        self.t_p99_s = percentile(&times, 0.99);
        self.peer_bytes = self.per_agent.iter().map(|a| a.peer_bytes).sum();
        let kept: u64 =
            self.peer_bytes + self.per_agent.iter().map(|a| a.server_bytes).sum::<u64>();
        self.sent_bytes =
            self.server_egress_bytes + self.per_agent.iter().map(|a| a.uploaded_bytes).sum::<u64>();
        self.duplicate_bytes = self.sent_bytes.saturating_sub(kept);
        self.duplicate_ratio = self.duplicate_bytes as f64 / kept.max(1) as f64;
        self.sent_over_delivered = self.sent_bytes as f64 / kept.max(1) as f64;
        self.server_egress_ratio = self.server_egress_bytes as f64 / self.size_bytes.max(1) as f64;
        self.t_min_s = t_min_s;
        self.t_all_over_t_min = if t_min_s > 0.0 {
            self.t_all_s / t_min_s
        } else {
            0.0
        };
        self.verified = self.completed > 0
            && self
                .per_agent
                .iter()
                .filter(|a| a.t_s.is_some())
                .all(|a| a.verified);
    }

    /// The report without the per-agent rows (for sweeps and tables).
    pub fn summary(&self) -> FleetReport {
        FleetReport {
            per_agent: Vec::new(),
            baseline: self.baseline.as_ref().map(|b| Box::new(b.summary())),
            ..self.clone()
        }
    }

    /// What `--json` and `report.json` show: everything, but the baseline without its
    /// per-agent rows.
    pub fn json_view(&self) -> FleetReport {
        FleetReport {
            baseline: self.baseline.as_ref().map(|b| Box::new(b.summary())),
            ..self.clone()
        }
    }

    /// A short human-readable table.
    pub fn table(&self) -> String {
        let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
        format!(
            "{engine} · {scenario} · {n} agents · {size:.0} MiB · mesh {mesh}\n\
             completed {c}/{n} (failed {f}, left {l}) · verified {v}\n\
             t_all {t_all:.2} s · p50 {p50:.2} s · p99 {p99:.2} s · bound {bound:.2} s · t_all/bound {ratio:.2}\n\
             coordinator egress {egress:.1} MiB = {er:.2} × S · from peers {peers:.1} MiB · duplicates {dup:.1} % · CPU {cpu:.1} s/GiB · idle {idle:.2} CPU ms per agent-second · wall {wall:.1} s\n",
            idle = self.idle_cpu_ms_per_agent_s,
            dup = self.duplicate_ratio * 100.0,
            engine = if self.network.is_empty() {
                self.engine.clone()
            } else {
                format!("{} ({})", self.engine, self.network)
            },
            scenario = self.scenario,
            n = self.agents,
            size = mib(self.size_bytes),
            mesh = match (self.p2p, self.dht) {
                (false, _) => "off",
                (true, false) => "on",
                (true, true) => "on, with the DHT",
            },
            c = self.completed,
            f = self.failed,
            l = self.left,
            v = self.verified,
            t_all = self.t_all_s,
            p50 = self.t_p50_s,
            p99 = self.t_p99_s,
            bound = self.t_min_s,
            ratio = self.t_all_over_t_min,
            egress = mib(self.server_egress_bytes),
            er = self.server_egress_ratio,
            peers = mib(self.peer_bytes),
            cpu = self.cpu_s_per_gib,
            wall = self.wall_s,
        ) + &if self.counters.is_empty() {
            String::new()
        } else {
            let counters: Vec<String> = self
                .counters
                .iter()
                .map(|(k, v)| format!("{k} {v}"))
                .collect();
            format!("counters: {}\n", counters.join(" · "))
        }
    }
}

/// Nearest-rank percentile of sorted values (0 for none).
pub fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// CPU seconds (user + system) this process has used so far.
pub fn cpu_seconds() -> f64 {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 0.5), 50.0);
        assert_eq!(percentile(&v, 0.99), 99.0);
        assert_eq!(percentile(&v, 1.0), 100.0);
        assert_eq!(percentile(&[3.0], 0.99), 3.0);
        assert_eq!(percentile(&[], 0.5), 0.0);
    }

    #[test]
    fn summary_counts_left_failed_and_completed() {
        let mut r = FleetReport {
            size_bytes: 100,
            server_egress_bytes: 150,
            per_agent: vec![
                AgentOutcome {
                    t_s: Some(2.0),
                    verified: true,
                    peer_bytes: 80,
                    server_bytes: 20,
                    ..Default::default()
                },
                AgentOutcome {
                    t_s: Some(4.0),
                    verified: true,
                    server_bytes: 100,
                    uploaded_bytes: 90,
                    ..Default::default()
                },
                AgentOutcome {
                    left: true,
                    ..Default::default()
                },
                AgentOutcome::default(),
            ],
            ..Default::default()
        };
        r.summarise(2.0);
        assert_eq!((r.completed, r.failed, r.left), (2, 1, 1));
        assert_eq!(r.t_all_s, 4.0);
        assert_eq!(r.t_all_over_t_min, 2.0);
        assert_eq!(r.server_egress_ratio, 1.5);
        assert_eq!(r.peer_bytes, 80);
        // Sent 150 + 90, kept 80 + 20 + 100: 40 bytes no one used.
        assert_eq!((r.sent_bytes, r.duplicate_bytes), (240, 40));
        assert_eq!(r.duplicate_ratio, 0.2);
        assert!(r.verified);
    }
}
