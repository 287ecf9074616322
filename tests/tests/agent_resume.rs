//! kill -9 of a real agent process in the middle of a 256 MiB plugin download: after a
//! restart it fetches only the chunks it did not have, and the job runs the verified
//! plugin.

use std::process::{Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::Duration;

use arcade_p2p::ContentId;
use arcade_p2p::settings::{ByteSize, Seconds};
use arcade_proto::v1 as pb;
use arcade_tests::process::workspace_bin;
use arcade_tests::proxy::AgentProxy;
use arcade_tests::{ADMIN, ENROLL, TestCoordinator, eventually};

const MIB: u64 = 1 << 20;
const SIZE: u64 = 256 * MIB;

struct AgentProcess(std::process::Child);

impl Drop for AgentProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_agent(config: &std::path::Path) -> AgentProcess {
    AgentProcess(
        Command::new(workspace_bin("arcade-agent"))
            .arg("--config")
            .arg(config)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .expect("start arcade-agent"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_mid_download_resumes_with_only_the_missing_chunks() {
    let c = TestCoordinator::start(|cfg| {
        cfg.plugin.chunk_size = ByteSize::mib(1);
        cfg.plugin.max_plugin_size = ByteSize::mib(300);
        cfg.jobs.lease_ttl = Seconds(Duration::from_secs(2));
        cfg.jobs.heartbeat_interval = Seconds(Duration::from_millis(500));
    })
    .await;
    let pushed = c
        .push_generated("big/plugin", "1.0.0", SIZE, 42)
        .await
        .unwrap()
        .plugin
        .unwrap();
    let expected: ContentId = pushed.sha256.parse().unwrap();

    let proxy = AgentProxy::start(&c.url).await;
    proxy
        .tamper
        .delay_per_chunk_us
        .store(25_000, Ordering::SeqCst); // ~6 s for 256 chunks
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "id = \"resumer\"\ncoordinator = \"{}\"\nenroll_token = \"{ENROLL}\"\ndata_dir = \"{}\"\nmetrics_listen = \"off\"\n[jobs]\npoll_wait = \"2s\"\n[cache]\nmax_size = \"1GiB\"\n[mesh]\nlisten = [\"/ip4/127.0.0.1/tcp/0\"]\n",
            proxy.url,
            dir.path().join("data").display()
        ),
    )
    .unwrap();

    let job = c
        .jobs(ADMIN)
        .await
        .create_job(pb::CreateJobRequest {
            commands: vec!["true".into()],
            required_plugins: vec![pb::RequiredPlugin {
                plugin_id: "big/plugin".into(),
                version: "1.0.0".into(),
                stages: vec![pb::Stage::Before as i32],
            }],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .job_id;

    let first = start_agent(&config);
    eventually(Duration::from_secs(60), || async {
        (proxy.tamper.relayed_chunks.load(Ordering::SeqCst) >= 100).then_some(())
    })
    .await
    .expect("the first agent fetched 100 chunks");
    drop(first); // SIGKILL
    let before_kill = proxy.tamper.relayed_bytes.load(Ordering::SeqCst);
    assert!(before_kill < SIZE, "killed before the download finished");

    proxy.tamper.delay_per_chunk_us.store(0, Ordering::SeqCst);
    let _second = start_agent(&config);
    let done = eventually(Duration::from_secs(120), || async {
        let j = c
            .jobs(ADMIN)
            .await
            .get_job(pb::GetJobRequest {
                job_id: job.clone(),
            })
            .await
            .ok()?
            .into_inner()
            .job?;
        matches!(j.status(), pb::JobStatus::Succeeded | pb::JobStatus::Failed).then_some(j)
    })
    .await
    .expect("the job finished after the restart");
    assert_eq!(
        done.status(),
        pb::JobStatus::Succeeded,
        "{}",
        done.error_message
    );

    let after_restart = proxy.tamper.relayed_bytes.load(Ordering::SeqCst) - before_kill;
    eprintln!(
        "relayed {} MiB before kill -9, {} MiB after restart (plugin {} MiB)",
        before_kill / MIB,
        after_restart / MIB,
        SIZE / MIB
    );
    // Chunks written but not yet recorded (at most one progress batch + what was in
    // flight) may be fetched again; everything recorded is not.
    let slack = 24 * MIB;
    assert!(
        after_restart + before_kill <= SIZE + slack,
        "refetched too much: {} MiB before the kill + {} MiB after",
        before_kill / MIB,
        after_restart / MIB
    );
    assert!(
        after_restart < SIZE - 64 * MIB,
        "resumed instead of starting over: {} MiB after restart",
        after_restart / MIB
    );
    let cached = dir
        .path()
        .join("data/plugins/downloaded")
        .join(expected.to_hex());
    let file = std::fs::File::open(&cached).expect("published plugin");
    arcade_p2p::manifest::verify_sha256(file, expected, SIZE)
        .expect("cached plugin has the pushed SHA-256");
}
