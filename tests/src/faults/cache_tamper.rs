//! A job tampers with the agent's plugin cache.
//!
//! `cache-tamper`: a real coordinator and a real agent. Job A runs plugin `team/p` (a
//! script that appends "<stage> good" to a log). Job B — any job, of any team, running
//! as the agent's user — overwrites the cached file of `team/p` in place with a script
//! of the same size that logs "EVIL", and plants the same kind of script under the
//! content name of `team/q`, which the agent has never fetched. Jobs C (needs `team/p`)
//! and D (needs `team/q`) must succeed and run the pushed bytes: the log gets "good"
//! lines only, and the agent fetched `team/p` from the coordinator again.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, ensure};
use arcade_p2p::ContentId;
use arcade_proto::v1 as pb;

use super::{Outcome, Scenario};
use crate::agents::TestAgent;
use crate::{TestCoordinator, create_job, finished_job};

/// The scenarios of this module.
pub const SCENARIOS: &[(&str, Scenario)] = &[("cache-tamper", || Box::pin(cache_tamper()))];

/// A plugin that appends "<stage> <word>" to `log`, padded with a comment to `len` bytes.
fn script(log: &Path, word: &str, len: usize) -> Vec<u8> {
    let mut s = format!("#!/bin/sh\necho \"$1 {word}\" >> {}\n#", log.display()).into_bytes();
    s.resize(len.max(s.len()), b'x');
    s.push(b'\n');
    s
}

async fn run_job(
    c: &TestCoordinator,
    plugin: &str,
    command: &str,
) -> anyhow::Result<pb::JobDetail> {
    let id = create_job(c, plugin, "1.0.0", command, &[]).await;
    let job = finished_job(c, &id, Duration::from_secs(60)).await?;
    ensure!(
        job.status() == pb::JobStatus::Succeeded,
        "job {id} ({plugin}) did not succeed: {} {:?}",
        job.error_message,
        job.plugin_results
    );
    Ok(job)
}

async fn cache_tamper() -> anyhow::Result<Outcome> {
    let c = TestCoordinator::start(|_| {}).await;
    let dir = tempfile::tempdir()?;
    let log = dir.path().join("log");
    let good_p = script(&log, "good", 200);
    let good_q = script(&log, "good-q", 200);
    let evil_p = script(&log, "EVIL", good_p.len() - 1);
    let evil_q = script(&log, "EVIL-q", good_q.len() - 1);
    ensure!(evil_p.len() == good_p.len(), "the attack keeps the size");
    let sha_p = ContentId::of_bytes(&good_p);
    let sha_q = ContentId::of_bytes(&good_q);
    c.push("team/p", "1.0.0", &good_p, Default::default())
        .await?;
    c.push("team/q", "1.0.0", &good_q, Default::default())
        .await?;
    let mut agent = TestAgent::start(&c.url, &c.enroll_token, "victim", |_, _| {}).await;
    let downloaded = agent.plugin_dir().join("downloaded");

    // A: runs the pushed plugin.
    run_job(&c, "team/p", "true").await?;
    let fetched_once = agent.server_bytes();
    let cached = downloaded.join(sha_p.to_hex());
    ensure!(
        cached.exists(),
        "job A left no cached plugin at {}",
        cached.display()
    );

    // B: rewrites the cached plugin in place and plants one for a content not fetched.
    let evil_p_file = dir.path().join("evil-p");
    let evil_q_file = dir.path().join("evil-q");
    std::fs::write(&evil_p_file, &evil_p)?;
    std::fs::write(&evil_q_file, &evil_q)?;
    let attack = format!(
        "chmod u+w {p} && cat {ep} > {p} && cp {eq} {q} && chmod 755 {q}",
        p = cached.display(),
        ep = evil_p_file.display(),
        eq = evil_q_file.display(),
        q = downloaded.join(sha_q.to_hex()).display(),
    );
    let id = crate::command_job(&c, &attack).await;
    let b = finished_job(&c, &id, Duration::from_secs(60)).await?;
    ensure!(
        b.status() == pb::JobStatus::Succeeded,
        "the attacking job itself failed (so it proves nothing): {} {}",
        b.error_message,
        b.output_tail
    );
    ensure!(
        std::fs::read(&cached)? == evil_p,
        "the attack did not rewrite the cached file"
    );

    // C and D: the pushed bytes run, never the job's.
    run_job(&c, "team/p", "true").await?;
    run_job(&c, "team/q", "true").await?;
    let text = std::fs::read_to_string(&log).context("read the plugin log")?;
    ensure!(
        !text.contains("EVIL"),
        "tampered or planted bytes ran:\n{text}"
    );
    let good_runs = text.lines().filter(|l| l.ends_with(" good")).count();
    let q_runs = text.lines().filter(|l| l.ends_with(" good-q")).count();
    ensure!(
        good_runs >= 2 * 3 && q_runs >= 3,
        "expected the pushed plugins' stages to run:\n{text}"
    );
    ensure!(
        std::fs::read(&cached)? == good_p,
        "the cache does not hold the pushed bytes again"
    );
    let refetched = agent.server_bytes() - fetched_once;
    ensure!(
        refetched >= good_p.len() as u64,
        "team/p was not fetched again after the tampering ({refetched} bytes)"
    );
    agent.stop().await;
    Ok(Outcome {
        outcome: format!(
            "a job rewrote a cached plugin in place (same size) and planted one for content never fetched: neither ran; {good_runs} stage runs of the pushed team/p and {q_runs} of team/q, team/p re-fetched ({refetched} bytes) and re-verified"
        ),
        server_bytes: fetched_once + refetched,
        ..Default::default()
    })
}
