//! Crash safety of a real coordinator process: kill -9 at arbitrary moments during
//! pushes; after restart every acknowledged push is intact, nothing half-written is
//! visible, redb opens, and jobs are still there.

use std::time::Duration;

use arcade_p2p::ContentId;
use arcade_proto::v1 as pb;
use arcade_tests::process::CoordinatorProcess;
use arcade_tests::{ADMIN, ENROLL, content, files_under};

fn write_config(dir: &std::path::Path) -> std::path::PathBuf {
    let path = dir.join("coordinator.toml");
    std::fs::write(
        &path,
        format!(
            "admin_token = \"{ADMIN}\"\nenroll_token = \"{ENROLL}\"\n[plugin]\nchunk_size = \"64KiB\"\nmax_plugin_size = \"256MiB\"\n[plugin.security]\nrequire_checksum = false\nallow_unsafe = true\n"
        ),
    )
    .unwrap();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_pushes_loses_no_acknowledged_push() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path());
    let data_dir = dir.path().join("data");
    let mut acknowledged: Vec<(String, Vec<u8>)> = Vec::new();
    let mut job_ids = Vec::new();

    for round in 0..4u8 {
        let proc = CoordinatorProcess::start(&config, &data_dir, false);
        // Everything acknowledged in earlier rounds is intact.
        let agent = proc
            .register_with(&format!("a{round}"), &[], vec![], false)
            .await
            .unwrap();
        for (version, data) in &acknowledged {
            let (_, bytes) = proc
                .download(
                    &agent,
                    pb::DownloadPluginRequest {
                        plugin_id: "crash/p".into(),
                        version: version.clone(),
                        ..Default::default()
                    },
                )
                .await
                .unwrap_or_else(|e| panic!("round {round}: acknowledged {version} lost: {e}"));
            assert_eq!(&bytes, data, "round {round}: {version} corrupt");
        }
        for id in &job_ids {
            let job = proc
                .jobs(ADMIN)
                .await
                .get_job(pb::GetJobRequest {
                    job_id: String::clone(id),
                })
                .await
                .unwrap_or_else(|e| panic!("round {round}: job {id} lost: {e}"));
            assert_eq!(
                job.into_inner().job.unwrap().status(),
                pb::JobStatus::Queued
            );
        }
        // Nothing half-written: staging is empty and every blob is referenced.
        let storage = data_dir.join("plugins");
        assert!(
            files_under(&storage.join("staging")).is_empty(),
            "round {round}: staging not empty"
        );
        let listed = proc
            .plugins(ADMIN)
            .await
            .list_plugins(pb::ListPluginsRequest::default())
            .await
            .unwrap()
            .into_inner()
            .plugins;
        let referenced: std::collections::HashSet<String> =
            listed.iter().map(|p| p.sha256.clone()).collect();
        for blob in files_under(&storage.join("blobs")) {
            let name = blob.file_name().unwrap().to_string_lossy().to_string();
            assert!(
                referenced.contains(&name),
                "round {round}: orphan blob {name}"
            );
            let bytes = std::fs::read(&blob).unwrap();
            assert_eq!(
                ContentId::of_bytes(&bytes).to_hex(),
                name,
                "round {round}: blob content differs from its name"
            );
        }

        // Acknowledged work for this round.
        let version = format!("1.{round}.0");
        let data = content(300_000 + usize::from(round) * 1000, round);
        proc.push("crash/p", &version, &data, Default::default())
            .await
            .unwrap();
        acknowledged.push((version, data));
        let job = proc
            .jobs(ADMIN)
            .await
            .create_job(pb::CreateJobRequest {
                commands: vec!["true".into()],
                required_plugins: vec![pb::RequiredPlugin {
                    plugin_id: "crash/p".into(),
                    version: format!("1.{round}.0"),
                    stages: vec![],
                    ..Default::default()
                }],
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .job_id;
        job_ids.push(job);

        // Unacknowledged pushes in flight, then kill -9 at a different moment each round.
        let conn = proc.conn.clone();
        let big = content(24 << 20, 100 + round);
        let inflight = tokio::spawn(async move {
            let _ = conn
                .push(
                    "crash/big",
                    &format!("9.{round}.0"),
                    &big,
                    Default::default(),
                )
                .await;
        });
        tokio::time::sleep(Duration::from_millis(40 + 90 * u64::from(round))).await;
        proc.kill9();
        let _ = tokio::time::timeout(Duration::from_secs(10), inflight).await;
    }

    // Final restart: redb opens and the last round's work is there too.
    let proc = CoordinatorProcess::start(&config, &data_dir, false);
    let listed = proc
        .plugins(ADMIN)
        .await
        .list_plugins(pb::ListPluginsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .plugins;
    for (version, data) in &acknowledged {
        let p = listed
            .iter()
            .find(|p| p.plugin_id == "crash/p" && &p.version == version)
            .unwrap_or_else(|| panic!("acknowledged {version} missing after final restart"));
        assert_eq!(p.sha256, ContentId::of_bytes(data).to_hex());
    }
    assert!(files_under(&data_dir.join("plugins").join("staging")).is_empty());
}

/// One run of a job by a simulated agent, from the moment its lease reached the agent
/// until its result was accepted.
#[derive(Debug, Clone)]
struct Run {
    job: String,
    agent: String,
    start: std::time::Instant,
    end: std::time::Instant,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_under_job_load_loses_no_acknowledged_job_and_runs_none_twice_at_once() {
    use std::collections::{HashMap, HashSet};
    use std::sync::{Arc, Mutex};
    use std::time::Instant;

    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("coordinator.toml");
    std::fs::write(
        &config,
        format!(
            "admin_token = \"{ADMIN}\"\nenroll_token = \"{ENROLL}\"\n[jobs]\nheartbeat_interval = \"300ms\"\nlease_ttl = \"2s\"\nmax_attempts = 10\n[agents]\nregister_rate = 0\n"
        ),
    )
    .unwrap();
    let data_dir = dir.path().join("data");
    let addr = arcade_tests::process::free_loopback_addr().to_string();
    let proc = CoordinatorProcess::start_on(&config, &data_dir, &addr, false).unwrap();
    let conn = proc.conn.clone();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let runs: Arc<Mutex<Vec<Run>>> = Arc::default();
    let accepted: Arc<Mutex<HashMap<String, u32>>> = Arc::default();
    let acked: Arc<Mutex<HashSet<String>>> = Arc::default();

    // Eight simulated agents: long-poll, "run" 20 ms, heartbeat their running job,
    // report; retry through the outage (the channel reconnects to the same address).
    let mut tasks = tokio::task::JoinSet::new();
    for a in 0..8 {
        let (conn, stop, runs, accepted) =
            (conn.clone(), stop.clone(), runs.clone(), accepted.clone());
        tasks.spawn(async move {
            let id = format!("load-{a}");
            let token = conn.register(&id, &[], vec![]).await;
            let mut client = conn.agent(&token).await;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let jobs = match client
                    .fetch_job(pb::FetchJobRequest {
                        agent_id: id.clone(),
                        max_jobs: 1,
                        wait_seconds: 1,
                    })
                    .await
                {
                    Ok(r) => r.into_inner().jobs,
                    Err(_) => {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                for job in jobs {
                    let start = Instant::now();
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    // Report until accepted, refused (lease gone) or given up.
                    for _ in 0..100 {
                        let _ = client
                            .heartbeat(pb::HeartbeatRequest {
                                agent_id: id.clone(),
                                running_jobs: vec![job.job_id.clone()],
                                ..Default::default()
                            })
                            .await;
                        match client
                            .report_job_result(pb::ReportJobResultRequest {
                                agent_id: id.clone(),
                                job_id: job.job_id.clone(),
                                status: pb::JobStatus::Succeeded as i32,
                                ..Default::default()
                            })
                            .await
                        {
                            Ok(_) => {
                                *accepted
                                    .lock()
                                    .unwrap()
                                    .entry(job.job_id.clone())
                                    .or_default() += 1;
                                break;
                            }
                            Err(s) if s.code() == tonic::Code::FailedPrecondition => break,
                            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                        }
                    }
                    // Every run counts for the overlap check, accepted or not.
                    runs.lock().unwrap().push(Run {
                        job: job.job_id.clone(),
                        agent: id.clone(),
                        start,
                        end: Instant::now(),
                    });
                }
            }
        });
    }
    // Four creators; a job counts as acknowledged only once CreateJob returned.
    let creating = Arc::new(std::sync::atomic::AtomicBool::new(true));
    for _ in 0..4 {
        let (conn, creating, acked) = (conn.clone(), creating.clone(), acked.clone());
        tasks.spawn(async move {
            let mut jobs = conn.jobs(ADMIN).await;
            while creating.load(std::sync::atomic::Ordering::SeqCst) {
                match jobs
                    .create_job(pb::CreateJobRequest {
                        commands: vec!["true".into()],
                        ..Default::default()
                    })
                    .await
                {
                    Ok(r) => {
                        acked.lock().unwrap().insert(r.into_inner().job_id);
                    }
                    Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
        });
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let before_kill = acked.lock().unwrap().len();
    proc.kill9();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let proc = CoordinatorProcess::start_on(&config, &data_dir, &addr, false).unwrap();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    creating.store(false, std::sync::atomic::Ordering::SeqCst);
    let acked_ids: Vec<String> = acked.lock().unwrap().iter().cloned().collect();
    assert!(
        before_kill >= 20,
        "only {before_kill} jobs created before the kill"
    );

    // Every acknowledged job ends succeeded, exactly once.
    let mut jobs = proc.jobs(ADMIN).await;
    let all_done = arcade_tests::eventually(Duration::from_secs(60), || {
        let mut jobs = jobs.clone();
        let ids = acked_ids.clone();
        async move {
            for id in &ids {
                let j = jobs
                    .get_job(pb::GetJobRequest { job_id: id.clone() })
                    .await
                    .ok()?
                    .into_inner()
                    .job?;
                if j.status() != pb::JobStatus::Succeeded {
                    return None;
                }
            }
            Some(())
        }
    })
    .await;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    assert!(all_done.is_some(), "acknowledged jobs did not all succeed");
    let runs_of = |id: &str| runs.lock().unwrap().iter().filter(|r| r.job == id).count();
    for id in &acked_ids {
        let j = jobs
            .get_job(pb::GetJobRequest { job_id: id.clone() })
            .await
            .unwrap_or_else(|e| panic!("acknowledged job {id} lost: {e}"));
        assert_eq!(
            j.into_inner().job.unwrap().status(),
            pb::JobStatus::Succeeded
        );
        // At most one result is ever accepted (a result committed just before the kill
        // whose answer was lost is refused when retried: the lease is gone).
        let n = accepted.lock().unwrap().get(id).copied().unwrap_or(0);
        assert!(n <= 1, "job {id} had {n} accepted results");
        assert!(
            runs_of(id) >= 1,
            "job {id} succeeded without any agent running it"
        );
    }
    // No two runs of one job overlapped in time.
    let runs = runs.lock().unwrap().clone();
    let mut by_job: HashMap<&str, Vec<&Run>> = HashMap::new();
    for r in &runs {
        by_job.entry(&r.job).or_default().push(r);
    }
    for (job, rs) in by_job {
        for (i, a) in rs.iter().enumerate() {
            for b in &rs[i + 1..] {
                assert!(
                    a.end <= b.start || b.end <= a.start,
                    "job {job} ran on {} and {} at the same time",
                    a.agent,
                    b.agent
                );
            }
        }
    }
    tasks.abort_all();
}
