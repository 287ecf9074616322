//! The agent end to end: a real coordinator and real agents over gRPC on loopback,
//! running jobs whose plugins are real executables.

use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::Duration;

use arcade_agent::config::Fallback;
use arcade_p2p::ContentId;
use arcade_proto::v1 as pb;
use arcade_tests::agents::TestAgent;
use arcade_tests::proxy::AgentProxy;
use arcade_tests::{ADMIN, ENROLL, TestCoordinator, create_job, eventually, wait_job};

/// A plugin that appends "<stage> <job status>" to `log` and prints its stage as JSON;
/// it fails in `fail_stage`, if given.
fn stage_logger(log: &Path, fail_stage: Option<&str>) -> Vec<u8> {
    let fail = fail_stage
        .map(|s| format!("if [ \"$1\" = \"{s}\" ]; then echo \"refusing $1\" >&2; exit 1; fi\n"))
        .unwrap_or_default();
    format!(
        "#!/bin/sh\necho \"$1 $ARCADE_JOB_STATUS\" >> {}\n{fail}printf '{{\"stage\":\"%s\",\"plugin\":\"%s\"}}\\n' \"$1\" \"$ARCADE_PLUGIN_ID\"\n",
        log.display()
    )
    .into_bytes()
}

fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stages_run_in_order_and_a_cached_plugin_is_not_fetched_again() {
    let c = TestCoordinator::start(|_| {}).await;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log");
    c.push(
        "notify/log",
        "1.0.0",
        &stage_logger(&log, None),
        Default::default(),
    )
    .await
    .unwrap();
    let a = TestAgent::start(&c.url, ENROLL, "worker-1", |_, _| {}).await;

    let cmd = format!("echo command >> {}", log.display());
    let id = create_job(&c, "notify/log", "1.0.0", &cmd, &[]).await;
    let job = wait_job(&c, &id).await;
    assert_eq!(
        job.status(),
        pb::JobStatus::Succeeded,
        "{}",
        job.error_message
    );
    assert_eq!(
        lines(&log),
        vec![
            "before ",
            "command",
            "on_success succeeded",
            "after succeeded"
        ]
    );
    let stages: Vec<&str> = job
        .plugin_results
        .iter()
        .map(|r| r.stage.as_str())
        .collect();
    assert_eq!(stages, vec!["before", "on_success", "after"]);
    assert!(
        job.plugin_results
            .iter()
            .all(|r| r.success && r.end_time >= r.start_time)
    );
    let result: serde_json::Value = serde_json::from_str(&job.plugin_results[0].result).unwrap();
    assert_eq!(result["stage"], "before");
    assert_eq!(result["plugin"], "notify/log");
    let fetched = a.server_bytes();
    assert!(fetched > 0);
    let hits = a.agent().metrics().cache_hits.get();

    // Second job, same plugin: a cache hit, no bytes from the coordinator.
    std::fs::remove_file(&log).unwrap();
    let id = create_job(&c, "notify/log", "1.0.0", &cmd, &[]).await;
    assert_eq!(wait_job(&c, &id).await.status(), pb::JobStatus::Succeeded);
    assert_eq!(a.server_bytes(), fetched, "no new download");
    assert_eq!(a.agent().metrics().cache_hits.get(), hits + 1);
    assert_eq!(lines(&log).len(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_command_runs_on_failure_and_failing_before_skips_commands() {
    let c = TestCoordinator::start(|_| {}).await;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log");
    let blocker_log = dir.path().join("blocker");
    c.push(
        "notify/log",
        "1.0.0",
        &stage_logger(&log, None),
        Default::default(),
    )
    .await
    .unwrap();
    c.push(
        "gate/block",
        "1.0.0",
        &stage_logger(&blocker_log, Some("before")),
        Default::default(),
    )
    .await
    .unwrap();
    let _a = TestAgent::start(&c.url, ENROLL, "worker-1", |_, _| {}).await;

    let id = create_job(
        &c,
        "notify/log",
        "1.0.0",
        &format!("echo command >> {}; exit 3", log.display()),
        &[],
    )
    .await;
    let job = wait_job(&c, &id).await;
    assert_eq!(job.status(), pb::JobStatus::Failed);
    assert_eq!(job.exit_code, 3);
    assert_eq!(
        lines(&log),
        vec!["before ", "command", "on_failure failed", "after failed"]
    );

    let id = create_job(
        &c,
        "gate/block",
        "1.0.0",
        &format!("echo command >> {}", blocker_log.display()),
        &[],
    )
    .await;
    let job = wait_job(&c, &id).await;
    assert_eq!(job.status(), pb::JobStatus::Failed);
    assert!(
        job.error_message
            .contains("before stage of gate/block@1.0.0"),
        "{}",
        job.error_message
    );
    let got = lines(&blocker_log);
    assert!(
        !got.contains(&"command".to_string()),
        "commands were skipped: {got:?}"
    );
    assert_eq!(got, vec!["before ", "on_failure failed", "after failed"]);
    assert!(!job.plugin_results[0].success);
    assert!(
        job.plugin_results[0]
            .error_message
            .contains("refusing before"),
        "{:?}",
        job.plugin_results[0]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunk_corrupted_in_flight_is_detected_and_refetched() {
    corrupted_in_flight(false).await;
}

/// The same with compressed chunks: the flipped byte lands in a zstd frame, which then
/// fails to decompress to the chunk's length (or yields other bytes): a bad chunk.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compressed_chunk_corrupted_in_flight_is_detected_and_refetched() {
    corrupted_in_flight(true).await;
}

async fn corrupted_in_flight(compression: bool) {
    let c = TestCoordinator::start(|_| {}).await;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log");
    let mut plugin = stage_logger(&log, None);
    plugin.extend(std::iter::repeat_n(b'#', 300_000)); // several 64 KiB chunks
    c.push("notify/log", "1.0.0", &plugin, Default::default())
        .await
        .unwrap();
    let proxy = AgentProxy::start(&c.url).await;
    proxy.tamper.corrupt_next.store(true, Ordering::SeqCst);
    let a = TestAgent::start(&proxy.url, ENROLL, "worker-1", |cfg, _| {
        cfg.download.compression = compression;
    })
    .await;
    let id = create_job(&c, "notify/log", "1.0.0", "true", &[]).await;
    let job = wait_job(&c, &id).await;
    assert_eq!(
        job.status(),
        pb::JobStatus::Succeeded,
        "{}",
        job.error_message
    );
    assert_eq!(
        a.agent()
            .metrics()
            .bad_chunks
            .get_or_create(&arcade_agent::metrics::SourceLabel {
                source: "server".into()
            })
            .get(),
        1
    );
    assert_eq!(
        a.server_bytes(),
        plugin.len() as u64,
        "verified bytes = the plugin, once"
    );
    // Raw chunks: more bytes crossed the proxy than the plugin has. Compressed ones
    // cross in far fewer bytes; the bad-chunk count above shows the refetch.
    if !compression {
        assert!(
            proxy.tamper.relayed_bytes.load(Ordering::SeqCst) > plugin.len() as u64,
            "the bad chunk was fetched again"
        );
    } else {
        let (wire, raw) = a.agent().metrics().compressed("from_server");
        assert!(
            wire < raw && raw > 0,
            "chunks came compressed: {wire} for {raw}"
        );
    }
    let cached = std::fs::read(
        a.plugin_dir()
            .join("downloaded")
            .join(ContentId::of_bytes(&plugin).to_hex()),
    )
    .unwrap();
    assert_eq!(cached, plugin);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn builtin_plugin_is_used_without_download() {
    let c = TestCoordinator::start(|_| {}).await;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log");
    let plugin = stage_logger(&log, None);
    c.push("notify/stdout", "1.0.0", &plugin, Default::default())
        .await
        .unwrap();
    let a = TestAgent::start(&c.url, ENROLL, "worker-1", |cfg, root| {
        let builtin = root.join("data").join("plugins").join("builtin");
        std::fs::create_dir_all(&builtin).unwrap();
        std::fs::write(builtin.join("notify-stdout"), &plugin).unwrap();
        cfg.builtin.push(arcade_agent::config::BuiltinPlugin {
            plugin: "notify/stdout@1.0.0".into(),
            file: "notify-stdout".into(),
        });
    })
    .await;
    let id = create_job(&c, "notify/stdout", "1.0.0", "true", &[]).await;
    let job = wait_job(&c, &id).await;
    assert_eq!(
        job.status(),
        pb::JobStatus::Succeeded,
        "{}",
        job.error_message
    );
    assert_eq!(a.server_bytes(), 0);
    assert_eq!(lines(&log).len(), 3);
    // The coordinator knows the agent holds it.
    let agents = c
        .fleet(ADMIN)
        .await
        .list_agents(pb::ListAgentsRequest {})
        .await
        .unwrap()
        .into_inner()
        .agents;
    assert!(
        agents[0]
            .installed_plugins
            .iter()
            .any(|p| p.plugin_id == "notify/stdout")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unavailable_plugin_fails_the_job_or_falls_back_to_the_previous_version() {
    let c = TestCoordinator::start(|_| {}).await;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log");
    c.push(
        "notify/log",
        "1.0.0",
        &stage_logger(&log, None),
        Default::default(),
    )
    .await
    .unwrap();
    let mut v2 = stage_logger(&log, None);
    v2.extend_from_slice(b"# version 2\n");
    c.push("notify/log", "2.0.0", &v2, Default::default())
        .await
        .unwrap();
    let proxy = AgentProxy::start(&c.url).await;

    for fallback in [Fallback::Fail, Fallback::PreviousVersion] {
        // A fresh data dir is a new key: a new agent id each round.
        let id = format!("worker-{fallback:?}").to_lowercase();
        let mut a = TestAgent::start(&proxy.url, ENROLL, &id, |cfg, _| {
            cfg.download.fallback = fallback;
            cfg.download.retry = 2;
        })
        .await;
        proxy.tamper.refuse_downloads.store(false, Ordering::SeqCst);
        let id = create_job(&c, "notify/log", "1.0.0", "true", &[]).await;
        let job = wait_job(&c, &id).await;
        assert_eq!(
            job.status(),
            pb::JobStatus::Succeeded,
            "{}",
            job.error_message
        );

        proxy.tamper.refuse_downloads.store(true, Ordering::SeqCst);
        let id = create_job(&c, "notify/log", "2.0.0", "true", &[]).await;
        let job = wait_job(&c, &id).await;
        match fallback {
            Fallback::Fail => {
                assert_eq!(job.status(), pb::JobStatus::Failed);
                assert!(
                    job.error_message.contains("notify/log@2.0.0"),
                    "{}",
                    job.error_message
                );
                assert!(
                    job.error_message.contains("downloads refused"),
                    "last error named: {}",
                    job.error_message
                );
                assert!(
                    job.plugin_results.iter().all(|r| r.stage == "fetch"),
                    "nothing ran"
                );
            }
            Fallback::PreviousVersion => {
                assert_eq!(
                    job.status(),
                    pb::JobStatus::Succeeded,
                    "{}",
                    job.error_message
                );
                let note = &job.plugin_results[0];
                assert_eq!(note.stage, "fetch");
                assert_eq!(note.version, "1.0.0");
                assert!(
                    note.error_message.contains("previous-version"),
                    "{}",
                    note.error_message
                );
                assert!(
                    job.plugin_results[1..]
                        .iter()
                        .all(|r| r.version == "1.0.0" && r.success)
                );
            }
        }
        a.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_coordinator_is_retried_and_shutdown_is_clean() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    drop(listener);
    let mut a = TestAgent::start(&url, ENROLL, "lonely", |_, _| {}).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    tokio::time::timeout(Duration::from_secs(10), a.stop())
        .await
        .expect("shutdown completes while the coordinator is unreachable");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_lets_a_running_job_finish_and_report() {
    let c = TestCoordinator::start(|_| {}).await;
    let dir = tempfile::tempdir().unwrap();
    c.push(
        "notify/log",
        "1.0.0",
        &stage_logger(&dir.path().join("log"), None),
        Default::default(),
    )
    .await
    .unwrap();
    let mut a = TestAgent::start(&c.url, ENROLL, "worker-1", |_, _| {}).await;
    let id = create_job(&c, "notify/log", "1.0.0", "sleep 1", &[]).await;
    eventually(Duration::from_secs(20), || async {
        let j = c
            .jobs(ADMIN)
            .await
            .get_job(pb::GetJobRequest { job_id: id.clone() })
            .await
            .ok()?
            .into_inner()
            .job?;
        (j.status() == pb::JobStatus::Running).then_some(())
    })
    .await
    .expect("job running");
    a.stop().await;
    let job = wait_job(&c, &id).await;
    assert_eq!(
        job.status(),
        pb::JobStatus::Succeeded,
        "{}",
        job.error_message
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_enrollment_token_is_a_clear_fatal_error() {
    let c = TestCoordinator::start(|_| {}).await;
    let mut a = TestAgent::start(&c.url, "not-the-enroll-token", "intruder", |_, _| {}).await;
    let agent = a.running.take().unwrap();
    let err = tokio::time::timeout(Duration::from_secs(20), agent.wait())
        .await
        .expect("the agent gives up instead of retrying forever")
        .unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("refused registration") && msg.contains("enrollment token"),
        "{msg}"
    );
}

/// A source that trickles (here the coordinator, one 64 KiB chunk every 500 ms, through
/// a proxy) cannot hold a job for ever: the fetch ends at `download.timeout` (the whole
/// plugin) and the job fails naming it; the chunks verified so far are kept, so the next
/// attempt, at full speed, fetches only the rest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fetch_that_outlasts_download_timeout_fails_the_job_and_keeps_its_chunks() {
    let c = TestCoordinator::start(|_| {}).await;
    let dir = tempfile::tempdir().unwrap();
    let mut plugin = stage_logger(&dir.path().join("log"), None);
    plugin.extend(std::iter::repeat_n(b'#', 40 * 65_536)); // ~41 chunks
    c.push("slow/tool", "1.0.0", &plugin, Default::default())
        .await
        .unwrap();
    let proxy = AgentProxy::start(&c.url).await;
    proxy
        .tamper
        .delay_per_chunk_us
        .store(500_000, Ordering::SeqCst);
    let a = TestAgent::start(&proxy.url, ENROLL, "slow-fetcher", |cfg, _| {
        cfg.download.timeout = arcade_p2p::settings::Seconds::secs(3);
        cfg.download.request_timeout = arcade_p2p::settings::Seconds::secs(2);
        cfg.mesh.enabled = false;
    })
    .await;
    let started = std::time::Instant::now();
    let id = create_job(&c, "slow/tool", "1.0.0", "true", &[]).await;
    let job = wait_job(&c, &id).await;
    assert_eq!(job.status(), pb::JobStatus::Failed, "{}", job.error_message);
    assert!(
        job.error_message.contains("download.timeout"),
        "{}",
        job.error_message
    );
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "the job took {:?}",
        started.elapsed()
    );
    let before = proxy.tamper.relayed_bytes.load(Ordering::SeqCst);
    assert!(before > 0 && before < plugin.len() as u64, "{before}");
    proxy.tamper.delay_per_chunk_us.store(0, Ordering::SeqCst);
    let id = create_job(&c, "slow/tool", "1.0.0", "true", &[]).await;
    let job = wait_job(&c, &id).await;
    assert_eq!(
        job.status(),
        pb::JobStatus::Succeeded,
        "{}",
        job.error_message
    );
    let total = proxy.tamper.relayed_bytes.load(Ordering::SeqCst);
    assert!(
        total < before + plugin.len() as u64,
        "the retry fetched everything again ({before} then {total} of {})",
        plugin.len()
    );
    drop(a);
}
