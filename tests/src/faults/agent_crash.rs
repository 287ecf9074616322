//! An agent process killed with SIGKILL mid-download and restarted.
//!
//! `agent-kill-9`: a real `arcade-agent` process fetches a 256 MiB plugin (1 MiB chunks)
//! through a proxy that slows chunks down and counts them; it is killed with SIGKILL
//! after 100 chunks and started again on the same data directory. The job must
//! succeed, the published plugin must have the pushed SHA-256, and the restarted agent
//! must fetch only the chunks its progress record did not name as verified: not one
//! recorded chunk is fetched again.

use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use arcade_agent::cache::{CacheOptions, PluginCache};
use arcade_p2p::ContentId;
use arcade_p2p::settings::{ByteSize, Seconds};
use arcade_proto::v1 as pb;

use super::{Outcome, Scenario};
use crate::process::AgentProcess;
use crate::proxy::AgentProxy;
use crate::{ADMIN, ENROLL, TestCoordinator, eventually};

/// The scenarios of this module.
pub const SCENARIOS: &[(&str, Scenario)] = &[("agent-kill-9", || Box::pin(agent_kill9()))];

const MIB: u64 = 1 << 20;
/// Plugin size: 256 chunks of 1 MiB.
const SIZE: u64 = 256 * MIB;
const CHUNK: u64 = MIB;
/// Chunks relayed to the first agent before it is killed.
const KILL_AFTER: u64 = 100;

/// The agent config file of the agent process (same file for both runs).
fn agent_toml(coordinator: &str, data_dir: &std::path::Path) -> String {
    format!(
        "id = \"resumer\"\ncoordinator = \"{coordinator}\"\nenroll_token = \"{ENROLL}\"\ndata_dir = \"{}\"\nmetrics_listen = \"off\"\n[jobs]\npoll_wait = \"2s\"\n[cache]\nmax_size = \"1GiB\"\n[mesh]\nlisten = [\"/ip4/127.0.0.1/tcp/0\"]\n",
        data_dir.display()
    )
}

async fn agent_kill9() -> anyhow::Result<Outcome> {
    let c = TestCoordinator::start(|cfg| {
        cfg.plugin.chunk_size = ByteSize::mib(1);
        cfg.plugin.max_plugin_size = ByteSize::mib(300);
        cfg.jobs.lease_ttl = Seconds(Duration::from_secs(2));
        cfg.jobs.heartbeat_interval = Seconds(Duration::from_millis(500));
    })
    .await;
    let pushed = c
        .push_generated("big/plugin", "1.0.0", SIZE, 42, Default::default())
        .await
        .context("push the 256 MiB plugin")?
        .plugin
        .context("push answered without the plugin")?;
    let expected: ContentId = pushed.sha256.parse()?;
    let chunks = SIZE / CHUNK;

    let proxy = AgentProxy::start(&c.url).await;
    // ~6 s for the whole plugin: the kill lands mid-download.
    proxy
        .tamper
        .delay_per_chunk_us
        .store(25_000, Ordering::SeqCst);
    let dir = tempfile::tempdir()?;
    let data_dir = dir.path().join("data");
    let config = dir.path().join("agent.toml");
    std::fs::write(&config, agent_toml(&proxy.url, &data_dir))?;

    let job = c
        .jobs(ADMIN)
        .await
        .create_job(pb::CreateJobRequest {
            commands: vec!["true".into()],
            required_plugins: vec![pb::RequiredPlugin {
                plugin_id: "big/plugin".into(),
                version: "1.0.0".into(),
                stages: vec![pb::Stage::Before as i32],
                ..Default::default()
            }],
            ..Default::default()
        })
        .await
        .context("create the job")?
        .into_inner()
        .job_id;

    let first = AgentProcess::start(&config)?;
    eventually(Duration::from_secs(60), || async {
        (proxy.tamper.relayed_chunks.load(Ordering::SeqCst) >= KILL_AFTER).then_some(())
    })
    .await
    .with_context(|| format!("the first agent did not fetch {KILL_AFTER} chunks within 60 s"))?;
    first.kill9();
    // Chunks the proxy was delaying when the agent died are counted a moment later:
    // let them settle so that they count as fetched before the kill.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before_kill = proxy.tamper.relayed_bytes.load(Ordering::SeqCst);
    let chunks_before = proxy.tamper.relayed_chunks.load(Ordering::SeqCst);
    ensure!(
        before_kill < SIZE,
        "the agent was killed only after the whole download ({} MiB relayed)",
        before_kill / MIB
    );

    // What the killed agent recorded as written and verified (its progress record).
    let plugin_dir = data_dir.join("plugins");
    let recorded = tokio::task::spawn_blocking(move || -> anyhow::Result<u64> {
        let cache = PluginCache::open(
            &plugin_dir,
            CacheOptions {
                max_size: 1 << 30,
                eviction: Default::default(),
                ttl: None,
                watermarks: Default::default(),
            },
        )?;
        Ok(cache.load_progress(&expected)?.len() as u64)
    })
    .await?
    .context("open the killed agent's plugin cache")?;
    ensure!(
        recorded > 0,
        "the killed agent recorded no verified chunk after {chunks_before} chunks were relayed to it"
    );

    proxy.tamper.delay_per_chunk_us.store(0, Ordering::SeqCst);
    let _second = AgentProcess::start(&config)?;
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
    .context("the job did not finish within 120 s of the agent's restart")?;
    if done.status() != pb::JobStatus::Succeeded {
        bail!(
            "the job failed after the agent's restart: {}",
            done.error_message
        );
    }

    let after_restart = proxy.tamper.relayed_bytes.load(Ordering::SeqCst) - before_kill;
    let chunks_after = proxy.tamper.relayed_chunks.load(Ordering::SeqCst) - chunks_before;
    // Chunks written but not yet recorded (at most one progress batch + what was in
    // flight) may be fetched again; everything recorded is not.
    let slack = 24 * MIB;
    ensure!(
        after_restart + before_kill <= SIZE + slack,
        "refetched too much: {} MiB before the kill + {} MiB after",
        before_kill / MIB,
        after_restart / MIB
    );
    ensure!(
        after_restart < SIZE - 64 * MIB,
        "started over instead of resuming: {} MiB fetched after the restart",
        after_restart / MIB
    );
    let missing = chunks - recorded;
    let refetched_verified = chunks_after.saturating_sub(missing);
    ensure!(
        refetched_verified == 0,
        "the restarted agent refetched {refetched_verified} chunk(s) its progress record named as verified ({chunks_after} fetched after the restart, {missing} were missing)"
    );

    let cached = data_dir.join("plugins/downloaded").join(expected.to_hex());
    tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
        let file = std::fs::File::open(&cached)
            .with_context(|| format!("published plugin {} is missing", cached.display()))?;
        arcade_p2p::manifest::verify_sha256(file, expected, SIZE)
            .context("the cached plugin does not have the pushed SHA-256")?;
        Ok(())
    })
    .await??;

    Ok(Outcome {
        outcome: format!(
            "resumed: refetched {refetched_verified} verified chunks, {chunks_after} of {chunks} fetched after restart ({recorded} recorded before kill -9)"
        ),
        // Verified: the chunks recorded before the kill and all fetched after it (the
        // published plugin passed its SHA-256).
        server_bytes: recorded * CHUNK + after_restart,
        ..Default::default()
    })
}
