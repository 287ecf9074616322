//! A fleet scenario: who fetches what over which links, with churn. One description
//! drives both engines — [`crate::swarm`] (the real stack: a real coordinator and real
//! agents on loopback) and [`crate::model`] (the discrete-event model for fleets far
//! beyond one machine) — so their figures are comparable.
//!
//! Scenario files are TOML (see `simulations/scenarios/`); every key is optional but
//! `agents` and `plugins`:
//!
//! ```toml
//! name = "uniform"
//! engine = "real"            # "real" (default) or "model": what `arcade-sim run` uses
//! network = "loopback"       # real engine: "loopback" (default; our limiters shape) or
//!                            # "netns" (a namespace per agent, tc tbf shapes as well)
//! agents = 32
//! seed = 1
//! p2p = true                 # false: everything from the coordinator (the seed design)
//! dht = false                # real engine: agents also run the Kademlia DHT (mesh.dht)
//! compression = true         # real engine: zstd per chunk where it pays
//! compression_level = 1      # real engine: peers' zstd level (the coordinator's is 3)
//! content_file = "path"      # real engine: the plugin is this file's first size_mib MiB
//! chunk_kib = 256            # chunk size; the model uses it too
//! plugins = [{ size_mib = 64 }]        # several entries = several plugins in one job
//! [server]
//! up_mibps = 20              # coordinator egress cap
//! latency_ms = 1             # one-way (model only)
//! [agent]
//! up_mibps = 10              # every agent's upload cap
//! down_mibps = 0             # download cap, 0 = unlimited (model and netns)
//! latency_ms = 1             # one-way (model only)
//! [[group]]                  # a share of the fleet with other links (heterogeneous, slow peers)
//! fraction = 0.25
//! up_mibps = 1
//! [churn]
//! leave_fraction = 0.25      # this share of agents leaves mid-transfer…
//! leave_after_s = 2.0        # …this long after the jobs are created
//! late_fraction = 0.25       # this share joins late…
//! late_after_s = 3.0         # …this long after the jobs are created
//! ```

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

const MIB: f64 = (1u64 << 20) as f64;

/// Which engine runs a scenario.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Engine {
    /// Real coordinator and agents on loopback.
    #[default]
    Real,
    /// The discrete-event model.
    Model,
}

/// How the real engine's agents are connected.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Network {
    /// Everything on loopback in one namespace; links shaped only by the project's own
    /// limiters (coordinator egress, agent upload).
    #[default]
    Loopback,
    /// A network namespace per agent behind a veth pair, links shaped by `tc tbf` as
    /// well (upload and download), see [`crate::netns`]. Needs root.
    Netns,
}

/// One plugin of the job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PluginSpec {
    /// Size in MiB.
    pub size_mib: u64,
}

/// A link: upload and download caps and one-way latency.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Link {
    /// Upload cap, MiB/s (0 = unlimited).
    pub up_mibps: f64,
    /// Download cap, MiB/s (0 = unlimited).
    pub down_mibps: f64,
    /// One-way latency, milliseconds.
    pub latency_ms: f64,
}

impl Default for Link {
    fn default() -> Self {
        Self {
            up_mibps: 10.0,
            down_mibps: 0.0,
            latency_ms: 1.0,
        }
    }
}

impl Link {
    /// Upload in bytes/s (`f64::INFINITY` when unlimited).
    pub fn up_bps(&self) -> f64 {
        rate(self.up_mibps)
    }

    /// Download in bytes/s (`f64::INFINITY` when unlimited).
    pub fn down_bps(&self) -> f64 {
        rate(self.down_mibps)
    }
}

fn rate(mibps: f64) -> f64 {
    if mibps <= 0.0 {
        f64::INFINITY
    } else {
        mibps * MIB
    }
}

/// A share of the fleet with its own links.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Group {
    /// Share of the agents, 0–1 (rounded down to whole agents).
    pub fraction: f64,
    /// Upload cap, MiB/s (absent = the `[agent]` value).
    pub up_mibps: Option<f64>,
    /// Download cap, MiB/s (absent = the `[agent]` value).
    pub down_mibps: Option<f64>,
    /// One-way latency, ms (absent = the `[agent]` value).
    pub latency_ms: Option<f64>,
}

/// Agents that leave mid-transfer and agents that join late.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Churn {
    /// Share of agents that leave (they are not counted as completed or failed).
    pub leave_fraction: f64,
    /// When they leave, seconds after the jobs are created.
    pub leave_after_s: f64,
    /// Share of agents that start late.
    pub late_fraction: f64,
    /// When they start, seconds after the jobs are created.
    pub late_after_s: f64,
}

/// A whole scenario; see the [module docs](self).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    /// Name, for reports.
    #[serde(default = "default_name")]
    pub name: String,
    /// What it shows.
    #[serde(default)]
    pub description: String,
    /// Which engine `arcade-sim run` uses.
    #[serde(default)]
    pub engine: Engine,
    /// How the real engine connects its agents.
    #[serde(default)]
    pub network: Network,
    /// Fleet size.
    pub agents: usize,
    /// Seed for every random choice.
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// Mesh on (false = every byte from the coordinator).
    #[serde(default = "default_true")]
    pub p2p: bool,
    /// Real engine: agents also run the Kademlia DHT (`mesh.dht`; off by default as in
    /// the agent).
    #[serde(default)]
    pub dht: bool,
    /// Chunk size, KiB (power of two, 1 KiB–64 MiB).
    #[serde(default = "default_chunk_kib")]
    pub chunk_kib: u64,
    /// The plugins of the job, all needed by every agent.
    pub plugins: Vec<PluginSpec>,
    /// The coordinator's link.
    #[serde(default = "server_link")]
    pub server: Link,
    /// Every agent's link unless a group says otherwise.
    #[serde(default)]
    pub agent: Link,
    /// Shares of the fleet with other links.
    #[serde(default, rename = "group")]
    pub groups: Vec<Group>,
    /// Leavers and late joiners.
    #[serde(default)]
    pub churn: Churn,
    /// Real engine: the plugin is a `#!/bin/sh` + `exit 0` script carrying this file's
    /// first bytes, `size_mib` MiB in all (one plugin only), e.g. a real executable's,
    /// instead of generated incompressible bytes.
    #[serde(default)]
    pub content_file: Option<PathBuf>,
    /// Real engine: chunks travel zstd-compressed where that pays (`[download]
    /// compression`, `[mesh]` and `[serve] compression_level`).
    #[serde(default = "default_true")]
    pub compression: bool,
    /// Real engine: zstd level of peers (`[mesh] compression_level`; the coordinator
    /// keeps its default, 3).
    #[serde(default = "default_level")]
    pub compression_level: u32,
    /// Real engine: how the plugin is cut (`fixed`: `chunk_kib` chunks; `cdc`,
    /// `cdc:AVG`: content-defined, as `arcadectl plugin push --chunking`).
    #[serde(default = "default_chunking")]
    pub chunking: String,
}

fn default_chunking() -> String {
    "fixed".into()
}

fn default_name() -> String {
    "unnamed".into()
}
fn default_seed() -> u64 {
    1
}
fn default_true() -> bool {
    true
}
fn default_level() -> u32 {
    1
}
fn default_chunk_kib() -> u64 {
    1024
}
fn server_link() -> Link {
    Link {
        up_mibps: 20.0,
        down_mibps: 0.0,
        latency_ms: 1.0,
    }
}

/// What is wrong with a scenario.
#[derive(Debug, thiserror::Error)]
pub enum ScenarioError {
    /// The file cannot be read.
    #[error("cannot read scenario {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The TOML does not parse or has unknown keys.
    #[error("scenario {path}: {message}")]
    Parse {
        /// The file.
        path: String,
        /// The parser's message (names the key and line).
        message: String,
    },
    /// A value is out of range.
    #[error("scenario {name}: {message}")]
    Invalid {
        /// The scenario.
        name: String,
        /// Which key and why.
        message: String,
    },
}

/// Role of one agent in a scenario.
#[derive(Debug, Clone, PartialEq)]
pub struct AgentPlan {
    /// Its link.
    pub link: Link,
    /// Seconds after the jobs are created when it starts (0 = at once).
    pub start_s: f64,
    /// Seconds after the jobs are created when it leaves, if it does.
    pub leave_s: Option<f64>,
}

impl Scenario {
    /// A uniform fleet fetching one plugin.
    pub fn uniform(agents: usize, size_mib: u64, server_mibps: f64, agent_mibps: f64) -> Self {
        Self {
            name: "uniform".into(),
            description: String::new(),
            engine: Engine::Real,
            network: Network::Loopback,
            agents,
            seed: 1,
            p2p: true,
            dht: false,
            chunk_kib: default_chunk_kib(),
            plugins: vec![PluginSpec { size_mib }],
            server: Link {
                up_mibps: server_mibps,
                ..server_link()
            },
            agent: Link {
                up_mibps: agent_mibps,
                ..Link::default()
            },
            groups: Vec::new(),
            churn: Churn::default(),
            content_file: None,
            compression: true,
            compression_level: default_level(),
            chunking: default_chunking(),
        }
    }

    /// Reads and validates a scenario file.
    pub fn load(path: &Path) -> Result<Self, ScenarioError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ScenarioError::Read {
            path: shown.clone(),
            source,
        })?;
        Self::parse(&text, &shown)
    }

    /// Parses and validates scenario TOML; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Self, ScenarioError> {
        let s: Scenario = toml::from_str(text).map_err(|e| ScenarioError::Parse {
            path: origin.into(),
            message: e.to_string().trim().replace('\n', " "),
        })?;
        s.validate()?;
        Ok(s)
    }

    /// Checks every value.
    pub fn validate(&self) -> Result<(), ScenarioError> {
        if self.content_file.is_some() && self.plugins.len() != 1 {
            return Err(ScenarioError::Invalid {
                name: self.name.clone(),
                message: "content_file needs exactly one plugin".into(),
            });
        }
        let bad = |message: String| {
            Err(ScenarioError::Invalid {
                name: self.name.clone(),
                message,
            })
        };
        if self.agents == 0 || self.agents > 1_000_000 {
            return bad(format!("agents = {} must be 1–1000000", self.agents));
        }
        if self.plugins.is_empty() || self.plugins.len() > 16 {
            return bad("plugins must list 1–16 plugins".into());
        }
        if let Some(p) = self
            .plugins
            .iter()
            .find(|p| p.size_mib == 0 || p.size_mib > 16 * 1024)
        {
            return bad(format!("plugin size_mib = {} must be 1–16384", p.size_mib));
        }
        if !self.chunk_kib.is_power_of_two() || !(1..=64 * 1024).contains(&self.chunk_kib) {
            return bad(format!(
                "chunk_kib = {} must be a power of two, 1–65536",
                self.chunk_kib
            ));
        }
        let links = [("server", &self.server), ("agent", &self.agent)];
        for (key, l) in links {
            for (field, v) in [
                ("up_mibps", l.up_mibps),
                ("down_mibps", l.down_mibps),
                ("latency_ms", l.latency_ms),
            ] {
                if !v.is_finite() || v < 0.0 {
                    return bad(format!("{key}.{field} = {v} must be ≥ 0"));
                }
            }
        }
        let mut share = 0.0;
        for g in &self.groups {
            if !(0.0..=1.0).contains(&g.fraction) {
                return bad(format!("group fraction = {} must be 0–1", g.fraction));
            }
            share += g.fraction;
            for v in [g.up_mibps, g.down_mibps, g.latency_ms]
                .into_iter()
                .flatten()
            {
                if !v.is_finite() || v < 0.0 {
                    return bad(format!("group link value {v} must be ≥ 0"));
                }
            }
        }
        if share > 1.0 + 1e-9 {
            return bad(format!("group fractions add up to {share} > 1"));
        }
        let c = &self.churn;
        for (key, v) in [
            ("leave_fraction", c.leave_fraction),
            ("late_fraction", c.late_fraction),
        ] {
            if !(0.0..=1.0).contains(&v) {
                return bad(format!("churn.{key} = {v} must be 0–1"));
            }
        }
        if c.leave_fraction + c.late_fraction > 1.0 + 1e-9 {
            return bad("churn leave_fraction + late_fraction must be ≤ 1".into());
        }
        for (key, v) in [
            ("leave_after_s", c.leave_after_s),
            ("late_after_s", c.late_after_s),
        ] {
            if !v.is_finite() || !(0.0..=3600.0).contains(&v) {
                return bad(format!("churn.{key} = {v} must be 0–3600"));
            }
        }
        Ok(())
    }

    /// Chunk size in bytes.
    pub fn chunk_bytes(&self) -> u64 {
        self.chunk_kib << 10
    }

    /// Sizes of the plugins in bytes.
    pub fn plugin_bytes(&self) -> Vec<u64> {
        self.plugins.iter().map(|p| p.size_mib << 20).collect()
    }

    /// Bytes every agent needs (all plugins).
    pub fn total_bytes(&self) -> u64 {
        self.plugin_bytes().iter().sum()
    }

    /// Per agent, in agent order: link, start and leave times. Groups take the first
    /// agents in the order listed, then leavers are the last agents, late joiners
    /// the ones before them, so the roles do not depend on random draws.
    pub fn plan(&self) -> Vec<AgentPlan> {
        let n = self.agents;
        let mut plans: Vec<AgentPlan> = (0..n)
            .map(|_| AgentPlan {
                link: self.agent.clone(),
                start_s: 0.0,
                leave_s: None,
            })
            .collect();
        let mut next = 0;
        for g in &self.groups {
            let count = (g.fraction * n as f64).floor() as usize;
            for p in plans.iter_mut().skip(next).take(count) {
                p.link = Link {
                    up_mibps: g.up_mibps.unwrap_or(self.agent.up_mibps),
                    down_mibps: g.down_mibps.unwrap_or(self.agent.down_mibps),
                    latency_ms: g.latency_ms.unwrap_or(self.agent.latency_ms),
                };
            }
            next = (next + count).min(n);
        }
        let leave = (self.churn.leave_fraction * n as f64).floor() as usize;
        let late = (self.churn.late_fraction * n as f64).floor() as usize;
        for p in plans.iter_mut().rev().take(leave) {
            p.leave_s = Some(self.churn.leave_after_s);
        }
        for p in plans.iter_mut().rev().skip(leave).take(late) {
            p.start_s = self.churn.late_after_s;
        }
        plans
    }

    /// The physical lower bound on the time until every agent that stays has every
    /// plugin, seconds: `max(S/u_server, S/d_min, N·S/(u_server + Σ u_agent))` with
    /// `Σ u_agent = 0` when the mesh is off (agents that leave or join late are counted
    /// as if present throughout, so the bound stays a lower bound).
    pub fn bound_seconds(&self) -> f64 {
        let s = self.total_bytes() as f64;
        let plans = self.plan();
        let n = plans.iter().filter(|p| p.leave_s.is_none()).count().max(1) as f64;
        let u_server = self.server.up_bps();
        let d_min = plans
            .iter()
            .map(|p| p.link.down_bps())
            .fold(f64::INFINITY, f64::min);
        let sum_up: f64 = if self.p2p {
            plans.iter().map(|p| p.link.up_bps()).sum()
        } else {
            0.0
        };
        (s / u_server)
            .max(s / d_min)
            .max(n * s / (u_server + sum_up))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_shipped_scenario_parses() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios");
        let mut seen = 0;
        for entry in std::fs::read_dir(&dir).expect("scenarios dir") {
            let path = entry.expect("entry").path();
            if path.extension().is_some_and(|e| e == "toml") {
                Scenario::load(&path).unwrap_or_else(|e| panic!("{e}"));
                seen += 1;
            }
        }
        assert!(seen >= 7, "expected the shipped scenarios, found {seen}");
    }

    #[test]
    fn bad_values_are_named() {
        let err = Scenario::parse("agents = 0\nplugins = [{ size_mib = 1 }]", "t")
            .expect_err("zero agents");
        assert!(err.to_string().contains("agents = 0"), "{err}");
        let err = Scenario::parse("agents = 2\nplugins = [{ size_mib = 1 }]\nbogus = 1", "t")
            .expect_err("unknown key");
        assert!(err.to_string().contains("bogus"), "{err}");
        let err = Scenario::parse(
            "agents = 2\nchunk_kib = 3\nplugins = [{ size_mib = 1 }]",
            "t",
        )
        .expect_err("chunk");
        assert!(err.to_string().contains("chunk_kib"), "{err}");
        let err = Scenario::parse(
            "agents = 2\nplugins = [{ size_mib = 1 }]\n[churn]\nleave_fraction = 0.8\nlate_fraction = 0.8",
            "t",
        )
        .expect_err("churn");
        assert!(err.to_string().contains("churn"), "{err}");
    }

    #[test]
    fn plan_assigns_groups_first_and_churn_last() {
        let s = Scenario::parse(
            "agents = 8\nplugins = [{ size_mib = 1 }]\n[agent]\nup_mibps = 10\n[[group]]\nfraction = 0.25\nup_mibps = 1\n[churn]\nleave_fraction = 0.25\nleave_after_s = 2\nlate_fraction = 0.25\nlate_after_s = 3",
            "t",
        )
        .expect("valid");
        let p = s.plan();
        assert_eq!(p[0].link.up_mibps, 1.0);
        assert_eq!(p[1].link.up_mibps, 1.0);
        assert_eq!(p[2].link.up_mibps, 10.0);
        assert_eq!(p[7].leave_s, Some(2.0));
        assert_eq!(p[6].leave_s, Some(2.0));
        assert_eq!(p[5].start_s, 3.0);
        assert_eq!(p[4].start_s, 3.0);
        assert_eq!(p[3].start_s, 0.0);
        assert_eq!(p[3].leave_s, None);
    }

    #[test]
    fn bound_is_the_largest_constraint() {
        // Fleet (c): 64 agents × 32 MiB, server 10, agents 5: N·S/(u_s + Σu) = 64·32/330.
        let s = Scenario::uniform(64, 32, 10.0, 5.0);
        assert!((s.bound_seconds() - 64.0 * 32.0 / 330.0).abs() < 1e-9);
        // Fleet (a): 8 × 64 MiB at 20/20: the server's own S/u_server = 3.2 s binds.
        let a = Scenario::uniform(8, 64, 20.0, 20.0);
        assert!((a.bound_seconds() - 3.2).abs() < 1e-9);
        // One agent: S/u_server.
        let one = Scenario::uniform(1, 64, 20.0, 20.0);
        assert!((one.bound_seconds() - 64.0 / 20.0).abs() < 1e-9);
        // Mesh off: N·S/u_server.
        let mut off = Scenario::uniform(8, 64, 20.0, 20.0);
        off.p2p = false;
        assert!((off.bound_seconds() - 8.0 * 64.0 / 20.0).abs() < 1e-9);
    }
}
