//! The coordinator process killed with SIGKILL while jobs are queued, leased and running.
//!
//! `coordinator-kill-9`: a real `arcade-coordinator` process on a fixed loopback port,
//! three in-process agents (two job slots each) and twelve jobs that each run for three
//! seconds and log the start and end of every run (job id, shell pid, wall clock in ns)
//! to a shared file. Once the first runs are two seconds in — some jobs running under
//! lease, some still queued (checked through the admin API) — the coordinator is killed
//! with SIGKILL and restarted a second later on the same data directory and port.
//!
//! Properties (`coordinator/DESIGN.md`, crash model): a job is either queued or leased,
//! never lost; leases survive the restart and get a fresh `lease_ttl`; a job has at
//! most one valid holder, and may run again only on a new lease (attempt). So after
//! the restart every job ends `Succeeded`, every job ran at least once and at most
//! `attempts` times, no two runs of a job overlap in time, and every agent — never
//! restarted — talked to the new coordinator process by itself.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use arcade_proto::v1 as pb;

use super::{Outcome, Scenario};
use crate::agents::TestAgent;
use crate::process::{CoordinatorProcess, free_loopback_addr};
use crate::{ADMIN, Conn, ENROLL, eventually};

/// The scenarios of this module.
pub const SCENARIOS: &[(&str, Scenario)] =
    &[("coordinator-kill-9", || Box::pin(coordinator_kill9()))];

const AGENTS: usize = 3;
/// Job slots per agent.
const SLOTS: u32 = 2;
/// Twice the slots: a second wave is queued when the coordinator dies.
const JOBS: usize = 12;
/// How long each job's command runs.
const JOB_SECONDS: u64 = 3;
/// How far into the first runs the coordinator is killed: they end while it is down,
/// so their results must be retried until the restarted coordinator takes them.
const KILL_INTO_RUN: Duration = Duration::from_secs(2);
/// How long the coordinator stays down.
const DOWN: Duration = Duration::from_secs(1);

fn write_config(dir: &Path) -> anyhow::Result<PathBuf> {
    let path = dir.join("coordinator.toml");
    std::fs::write(
        &path,
        format!(
            "admin_token = \"{ADMIN}\"\nenroll_token = \"{ENROLL}\"\n[plugin]\nchunk_size = \"64KiB\"\n[plugin.security]\nrequire_checksum = false\nallow_unsafe = true\n[jobs]\nlease_ttl = \"5s\"\nheartbeat_interval = \"1s\"\nmax_attempts = 3\n"
        ),
    )?;
    Ok(path)
}

/// One run of a job's command, from the shared log.
#[derive(Debug, Default, Clone, Copy)]
struct Run {
    start_ns: u128,
    end_ns: Option<u128>,
}

/// Parses `start|end JOB PID NS` lines into runs per job (a run is one shell pid).
fn runs(log: &Path) -> anyhow::Result<BTreeMap<String, Vec<Run>>> {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let mut by_run: BTreeMap<(String, String), Run> = BTreeMap::new();
    for line in text.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        let [what, job, pid, ns] = f[..] else {
            bail!("bad line in the job log: {line:?}");
        };
        let ns: u128 = ns
            .parse()
            .with_context(|| format!("bad time in the job log: {line:?}"))?;
        let run = by_run.entry((job.into(), pid.into())).or_default();
        match what {
            "start" => run.start_ns = ns,
            "end" => run.end_ns = Some(ns),
            _ => bail!("bad line in the job log: {line:?}"),
        }
    }
    let mut out: BTreeMap<String, Vec<Run>> = BTreeMap::new();
    for ((job, _), run) in by_run {
        out.entry(job).or_default().push(run);
    }
    for list in out.values_mut() {
        list.sort_by_key(|r| r.start_ns);
    }
    Ok(out)
}

/// True when two of a job's runs (sorted by start) overlap in time. A run with no end
/// line was stopped mid-way: it may have lasted until the next one started.
fn overlapping(runs: &[Run]) -> bool {
    runs.windows(2)
        .any(|pair| pair[0].end_ns.is_none_or(|end| end > pair[1].start_ns))
}

fn now_ns() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

async fn count(c: &Conn, status: pb::JobStatus) -> anyhow::Result<usize> {
    Ok(c.jobs(ADMIN)
        .await
        .list_jobs(pb::ListJobsRequest {
            status: status as i32,
            limit: 1000,
        })
        .await?
        .into_inner()
        .jobs
        .len())
}

async fn get_job(c: &Conn, id: &str) -> Option<pb::JobDetail> {
    c.jobs(ADMIN)
        .await
        .get_job(pb::GetJobRequest { job_id: id.into() })
        .await
        .ok()?
        .into_inner()
        .job
}

/// Starts the coordinator on `listen`, retrying for a few seconds while the port is
/// still held by the killed process's sockets.
async fn start_on(
    config: &Path,
    data_dir: &Path,
    listen: &str,
) -> anyhow::Result<CoordinatorProcess> {
    let mut last = None;
    for _ in 0..20 {
        let (c, d, l) = (config.to_owned(), data_dir.to_owned(), listen.to_owned());
        match tokio::task::spawn_blocking(move || CoordinatorProcess::start_on(&c, &d, &l, false))
            .await?
        {
            Ok(p) => return Ok(p),
            Err(e) => last = Some(e),
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    Err(last.expect("at least one attempt")).context(format!("start the coordinator on {listen}"))
}

async fn coordinator_kill9() -> anyhow::Result<Outcome> {
    let dir = tempfile::tempdir()?;
    let config = write_config(dir.path())?;
    let data_dir = dir.path().join("data");
    let log = dir.path().join("runs.log");
    let listen = free_loopback_addr().to_string();
    let url = format!("http://{listen}");

    let mut coordinator = Some(start_on(&config, &data_dir, &listen).await?);
    let c = coordinator.as_ref().expect("started").conn.clone();
    c.push(
        "ci/noop",
        "1.0.0",
        b"#!/bin/sh\nexit 0\n",
        pb::PushPluginHeader::default(),
    )
    .await
    .context("push the job plugin")?;

    let mut agents = Vec::new();
    for i in 0..AGENTS {
        agents.push(
            TestAgent::start(&url, ENROLL, &format!("worker-{i}"), |cfg, _| {
                cfg.max_concurrent_jobs = SLOTS;
                cfg.mesh.enabled = false;
            })
            .await,
        );
    }

    let command = format!(
        "echo \"start $ARCADE_JOB_ID $$ $(date +%s%N)\" >> {log}; sleep {JOB_SECONDS}; echo \"end $ARCADE_JOB_ID $$ $(date +%s%N)\" >> {log}",
        log = log.display()
    );
    let mut ids = Vec::new();
    for _ in 0..JOBS {
        let id = c
            .jobs(ADMIN)
            .await
            .create_job(pb::CreateJobRequest {
                commands: vec![command.clone()],
                required_plugins: vec![pb::RequiredPlugin {
                    plugin_id: "ci/noop".into(),
                    version: "1.0.0".into(),
                    stages: vec![pb::Stage::Before as i32],
                    ..Default::default()
                }],
                ..Default::default()
            })
            .await
            .context("create a job")?
            .into_inner()
            .job_id;
        ids.push(id);
    }

    // Wait until the first runs are KILL_INTO_RUN in, then check the mix and kill.
    let first_start = eventually(Duration::from_secs(60), || async {
        let runs = runs(&log).ok()?;
        runs.values().flatten().map(|r| r.start_ns).min()
    })
    .await
    .context("no job started within 60 s")?;
    let kill_at = first_start + KILL_INTO_RUN.as_nanos();
    let wait = kill_at.saturating_sub(now_ns());
    tokio::time::sleep(Duration::from_nanos(wait as u64)).await;
    let running = count(&c, pb::JobStatus::Running).await?;
    let queued = count(&c, pb::JobStatus::Queued).await?;
    ensure!(
        running > 0 && queued > 0,
        "before the kill, expected jobs both running under lease and queued; got {running} running, {queued} queued"
    );
    let killed_at = now_ns();
    if let Some(p) = coordinator.take() {
        tokio::task::spawn_blocking(move || p.kill9()).await?;
    }
    tokio::time::sleep(DOWN).await;
    let restarted = start_on(&config, &data_dir, &listen).await?;
    let restarted_at = now_ns();
    let c = restarted.conn.clone();
    ensure!(
        c.url == url,
        "the restarted coordinator listens on {} instead of {url}",
        c.url
    );

    // Results arrive: every job ends, through the restarted coordinator.
    let mut finished = Vec::new();
    for id in &ids {
        let job = eventually(Duration::from_secs(90), || async {
            let j = get_job(&c, id).await?;
            matches!(j.status(), pb::JobStatus::Succeeded | pb::JobStatus::Failed).then_some(j)
        })
        .await
        .with_context(|| format!("job {id} lost: not finished within 90 s of the restart"))?;
        finished.push(job);
    }
    let failed: Vec<String> = finished
        .iter()
        .filter(|j| j.status() != pb::JobStatus::Succeeded)
        .map(|j| format!("{} ({})", j.job_id, j.error_message))
        .collect();
    ensure!(
        failed.is_empty(),
        "{} of {JOBS} jobs did not succeed after the restart: {}",
        failed.len(),
        failed.join("; ")
    );

    // Runs: at least one per job, at most one per lease, never two at once.
    let runs = runs(&log)?;
    let mut total_runs = 0;
    let mut overlaps = Vec::new();
    for job in &finished {
        let list = runs.get(&job.job_id).map(Vec::as_slice).unwrap_or_default();
        ensure!(
            list.iter().any(|r| r.end_ns.is_some()),
            "job {} succeeded but its command never ran to the end",
            job.job_id
        );
        ensure!(
            list.len() as u32 <= job.attempts,
            "job {} ran {} times on {} lease(s): it ran without a lease",
            job.job_id,
            list.len(),
            job.attempts
        );
        if overlapping(list) {
            overlaps.push(job.job_id.clone());
        }
        total_runs += list.len();
    }
    ensure!(
        overlaps.is_empty(),
        "jobs ran twice concurrently: {}",
        overlaps.join(", ")
    );
    let stray: Vec<&String> = runs.keys().filter(|id| !ids.contains(id)).collect();
    ensure!(stray.is_empty(), "runs of unknown jobs: {stray:?}");
    let during_outage = runs
        .values()
        .flatten()
        .filter_map(|r| r.end_ns)
        .filter(|end| (killed_at..restarted_at).contains(end))
        .count();

    // Agents reconnected by themselves: the new process has heard from every one.
    let listed = c
        .fleet(ADMIN)
        .await
        .list_agents(pb::ListAgentsRequest {})
        .await
        .context("list agents after the restart")?
        .into_inner()
        .agents;
    for a in &agents {
        let id = &a.config.id;
        let seen = listed
            .iter()
            .find(|s| &s.agent_id == id)
            .is_some_and(|s| s.last_seen > 0);
        ensure!(
            seen,
            "agent {id} did not reconnect to the restarted coordinator"
        );
    }
    drop(agents);
    drop(restarted);

    let reruns = total_runs - JOBS;
    Ok(Outcome {
        outcome: format!(
            "{JOBS}/{JOBS} jobs succeeded after restart, 0 lost, 0 concurrent duplicates, {reruns} re-runs ({running} running + {queued} queued at kill -9, {during_outage} finished while down)"
        ),
        ..Default::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_parses_into_runs_and_overlaps_are_found() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("runs.log");
        std::fs::write(
            &log,
            "start a 1 100\nstart b 2 150\nend a 1 200\nstart a 3 300\nend b 2 400\nend a 3 500\n",
        )
        .unwrap();
        let runs = runs(&log).unwrap();
        assert_eq!(runs["a"].len(), 2);
        assert_eq!(runs["a"][0].end_ns, Some(200));
        assert!(!overlapping(&runs["a"]));
        assert!(!overlapping(&runs["b"]));

        let run = |start_ns, end_ns| Run { start_ns, end_ns };
        assert!(overlapping(&[run(100, Some(350)), run(300, Some(500))]));
        assert!(overlapping(&[run(100, None), run(300, Some(500))]));
        assert!(!overlapping(&[run(100, Some(300)), run(300, None)]));

        std::fs::write(&log, "start a 1\n").unwrap();
        assert!(super::runs(&log).is_err());
    }
}
