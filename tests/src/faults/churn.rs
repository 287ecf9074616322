//! Half the agents holding the plugin are killed in the middle of a fleet fetch.
//!
//! `churn`: four seed agents get an 8 MiB plugin (128 chunks) and upload at most
//! 1 MiB/s each; six more agents then fetch it at once. As soon as the fetchers have
//! some of it from peers and none has all of it, two of the four seeds are killed.
//!
//! "Killed": the seeds are real `arcade-agent` processes, killed with SIGKILL — their
//! connections drop in the middle of whatever chunk they were sending and their
//! heartbeats stop, so the coordinator drops them from peer hints three heartbeats
//! later. The fetchers run in this process (their metrics give the bytes by source).
//!
//! Properties: every fetcher's job succeeds, its cached plugin has the pushed SHA-256,
//! every plugin execution ran the pushed bytes, and the fetchers served each other
//! some of it. The outcome reports the bytes the
//! fetchers got from peers and from the coordinator, before and after the kill.

use std::time::Duration;

use anyhow::{Context as _, bail, ensure};
use arcade_p2p::ContentId;
use arcade_p2p::settings::ByteSize;

use super::hostile::{
    all_succeeded, check_cached, check_executions, fast_fleet, fetched, labelled_agent,
    self_checking_plugin, start_jobs, wait_holder,
};
use super::{Outcome, Scenario};
use crate::agents::{TestAgent, agent_config};
use crate::process::AgentProcess;
use crate::{ENROLL, TestCoordinator, eventually};

/// The scenarios of this module.
pub const SCENARIOS: &[(&str, Scenario)] = &[("churn", || Box::pin(churn()))];

const SEEDS: usize = 4;
const KILLED: usize = 2;
const FETCHERS: usize = 6;
/// Plugin payload: 128 chunks of 64 KiB.
const SIZE: usize = 8 << 20;

fn slow_uploads(cfg: &mut arcade_agent::config::AgentConfig) {
    cfg.mesh.upload_rate = ByteSize::mib(1);
}

fn sum(agents: &[TestAgent], source: &str) -> u64 {
    agents.iter().map(|a| fetched(a, source)).sum()
}

/// The `churn` scenario.
pub async fn churn() -> anyhow::Result<Outcome> {
    let c = TestCoordinator::start(fast_fleet).await;
    let logs = tempfile::tempdir()?;
    let log = logs.path().join("executions");
    let data = self_checking_plugin(&log, SIZE, 11);
    let size = data.len() as u64;
    let sha = ContentId::of_bytes(&data);
    c.push("churn/tool", "1.0.0", &data, Default::default())
        .await?;
    drop(data);
    let mut job_ids = Vec::new();

    // The seeds (real processes) get the plugin and are listed as holders.
    let seed_names: Vec<String> = (0..SEEDS).map(|i| format!("seed-{i}")).collect();
    let seed_dir = tempfile::tempdir()?;
    let mut seeds = Vec::new();
    for n in &seed_names {
        let mut cfg = agent_config(seed_dir.path(), &c.url, ENROLL, n);
        cfg.data_dir = seed_dir.path().join(n);
        cfg.labels.insert("name".into(), n.clone());
        slow_uploads(&mut cfg);
        let path = seed_dir.path().join(format!("{n}.toml"));
        std::fs::write(&path, toml::to_string(&cfg)?)?;
        seeds.push(Some(AgentProcess::start(&path)?));
    }
    let jobs = start_jobs(&c, "churn/tool", &seed_names).await;
    all_succeeded(
        &c,
        &jobs,
        Duration::from_secs(60),
        "the seeds get the plugin",
    )
    .await?;
    job_ids.extend(jobs.into_iter().map(|(_, id)| id));
    for n in &seed_names {
        wait_holder(&c, n, &sha, Duration::from_secs(20)).await?;
    }

    // The fleet fetch.
    let names: Vec<String> = (0..FETCHERS).map(|i| format!("fetcher-{i}")).collect();
    let mut fetchers = Vec::new();
    for n in &names {
        fetchers.push(labelled_agent(&c.url, n, slow_uploads).await);
    }
    let jobs = start_jobs(&c, "churn/tool", &names).await;

    // Mid-fetch: the fetchers hold an eighth of what they need, from peers, and none is
    // done.
    let total = size * FETCHERS as u64;
    let mid = eventually(Duration::from_secs(60), || async {
        let got = sum(&fetchers, "peer") + sum(&fetchers, "server");
        if fetchers
            .iter()
            .any(|a| fetched(a, "peer") + fetched(a, "server") >= size)
        {
            return Some(Err(got));
        }
        (sum(&fetchers, "peer") >= total / 8).then_some(Ok(got))
    })
    .await
    .context("the fleet fetch never got an eighth of the way")?;
    let at_kill = match mid {
        Ok(got) => got,
        Err(got) => bail!(
            "a fetcher completed before the kill ({got} of {total} bytes fetched): the scenario did not test churn"
        ),
    };
    let (peer_before, server_before) = (sum(&fetchers, "peer"), sum(&fetchers, "server"));
    for seed in &mut seeds[..KILLED] {
        if let Some(process) = seed.take() {
            process.kill9();
        }
    }

    all_succeeded(
        &c,
        &jobs,
        Duration::from_secs(120),
        "every remaining agent completes after half the holders died",
    )
    .await?;
    job_ids.extend(jobs.into_iter().map(|(_, id)| id));
    let fetcher_refs: Vec<&TestAgent> = fetchers.iter().collect();
    check_cached(&fetcher_refs, &sha)?;
    let runs = check_executions(&log, &sha, &job_ids)?;
    let (peer, server) = (sum(&fetchers, "peer"), sum(&fetchers, "server"));
    ensure!(
        peer + server >= total,
        "the fetchers counted {} verified bytes for {total} needed",
        peer + server
    );
    let bans: u64 = fetchers
        .iter()
        .map(|a| a.agent().metrics().peer_bans.get())
        .sum();
    // Heartbeats copy the hosts' upload counters into the metrics.
    let shared: u64 = fetchers
        .iter()
        .map(|a| a.agent().metrics().uploaded_bytes.get())
        .sum();
    // Fetchers learn of each other (the coordinator hints agents still fetching, and a
    // fetch meets the peers that asked it for a bitfield): they do not all wait on the
    // seeds.
    ensure!(
        shared > 0,
        "the fetchers served each other nothing: every byte came from the seeds"
    );
    let mib = |b: u64| b as f64 / 1048576.0;
    Ok(Outcome {
        outcome: format!(
            "{FETCHERS}/{FETCHERS} fetchers verified after {KILLED}/{SEEDS} holders were killed at {:.0} % of the fleet fetch ({runs} runs, all of the pushed bytes); after the kill {:.1} MiB from peers, {:.1} MiB from the coordinator; fetchers served each other {:.1} MiB; {bans} peer bans",
            100.0 * at_kill as f64 / total as f64,
            mib(peer - peer_before),
            mib(server - server_before),
            mib(shared),
        ),
        peer_bytes: peer,
        server_bytes: server,
        bans,
        ..Default::default()
    })
}
