//! The fault suite: end-to-end scenarios where peers are hostile, processes die, disks
//! fill up and input is malformed. Each scenario starts real components (coordinator,
//! agents, libp2p hosts, processes), is bounded in time, stops by itself, and returns an
//! [`Outcome`] — or an error naming the property that did not hold.
//!
//! The integration tests (`tests/tests/faults.rs`) run every scenario and fail on an
//! error; `cargo run -p arcade-tests --bin fault-suite` runs them and prints the table
//! (scenario, outcome, bytes by source, bans, time), or one JSON object with `--json`.

pub mod admin;
pub mod agent_crash;
pub mod auth;
pub mod bad_input;
pub mod cache_tamper;
pub mod churn;
pub mod coordinator_crash;
pub mod disk_full;
pub mod hostile;
pub mod identity;
pub mod outsiders;
pub mod secrets;
pub mod stalled;
pub mod storage_full;

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use serde::Serialize;

/// What one scenario did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Outcome {
    /// The scenario's name (as in [`scenarios`]).
    pub scenario: String,
    /// One line: what held (e.g. "7/7 honest agents verified, 3 hostile banned").
    pub outcome: String,
    /// Verified plugin bytes honest agents got from peers.
    pub peer_bytes: u64,
    /// Verified plugin bytes honest agents got from the coordinator.
    pub server_bytes: u64,
    /// Peers banned by honest agents.
    pub bans: u64,
    /// Wall time of the scenario, seconds.
    pub seconds: f64,
}

/// A scenario: runs to the end and returns its outcome, or the property that failed.
pub type Scenario = fn() -> Pin<Box<dyn Future<Output = anyhow::Result<Outcome>> + Send>>;

/// Every scenario of the suite, by name, in the order the table lists them.
pub fn scenarios() -> Vec<(&'static str, Scenario)> {
    [
        hostile::SCENARIOS,
        churn::SCENARIOS,
        agent_crash::SCENARIOS,
        coordinator_crash::SCENARIOS,
        disk_full::SCENARIOS,
        storage_full::SCENARIOS,
        bad_input::SCENARIOS,
        auth::SCENARIOS,
        identity::SCENARIOS,
        outsiders::SCENARIOS,
        cache_tamper::SCENARIOS,
        secrets::SCENARIOS,
        admin::SCENARIOS,
        stalled::SCENARIOS,
    ]
    .concat()
}

/// Runs the scenario called `name`, timing it, with a hard limit of `limit`.
pub async fn run(name: &str, limit: Duration) -> anyhow::Result<Outcome> {
    let Some((_, scenario)) = scenarios().into_iter().find(|(n, _)| *n == name) else {
        anyhow::bail!("no fault scenario named `{name}`");
    };
    let started = std::time::Instant::now();
    let mut outcome = tokio::time::timeout(limit, scenario())
        .await
        .map_err(|_| anyhow::anyhow!("scenario `{name}` did not finish within {limit:?}"))??;
    outcome.scenario = name.to_string();
    outcome.seconds = started.elapsed().as_secs_f64();
    Ok(outcome)
}

/// The table `fault-suite` prints: one row per outcome, failures included.
pub fn table(rows: &[(String, Result<Outcome, String>)]) -> String {
    let mut out = format!(
        "{:<28} {:<6} {:>10} {:>10} {:>5} {:>7}  {}\n",
        "scenario", "result", "peer MiB", "coord MiB", "bans", "time s", "outcome"
    );
    for (name, row) in rows {
        match row {
            Ok(o) => out.push_str(&format!(
                "{:<28} {:<6} {:>10.2} {:>10.2} {:>5} {:>7.1}  {}\n",
                name,
                "pass",
                o.peer_bytes as f64 / 1048576.0,
                o.server_bytes as f64 / 1048576.0,
                o.bans,
                o.seconds,
                o.outcome
            )),
            Err(e) => out.push_str(&format!(
                "{:<28} {:<6} {:>10} {:>10} {:>5} {:>7}  {}\n",
                name, "FAIL", "-", "-", "-", "-", e
            )),
        }
    }
    out
}
