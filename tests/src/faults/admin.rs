//! Bad results and admin actions that used to misbehave.
//!
//! - `oversized-result`: a plugin prints a 200 KB JSON result (the agent keeps up to
//!   `jobs.max_output` = 1 MiB; the coordinator accepts 64 KiB per result). The job must
//!   end once — succeeded, its result replaced by a note — instead of the agent retrying
//!   a refused report 30 times and the job running again after its lease.
//! - `disabled-plugin`: disabling a plugin fails the queued jobs that need it, saying so,
//!   and the coordinator stops serving it to agents.
//! - `shared-storage`: a second coordinator pointed at the first one's
//!   `plugin.storage_path` refuses to start (before, it deleted the first one's blobs as
//!   unreferenced); a blob damaged on disk is repaired by pushing the plugin again.
//! - `metric-labels`: downloads of made-up plugin ids do not create metric series.
//! - `download-slots`: one agent opening every `DownloadPlugin` stream and never reading
//!   them gets at most `serve.max_streams_per_agent`; another agent still downloads.

use std::time::Duration;

use anyhow::{Context, ensure};
use arcade_p2p::ContentId;
use arcade_p2p::settings::{ByteSize, Seconds};
use arcade_proto::v1 as pb;
use tonic::Code;

use super::{Outcome, Scenario};
use crate::agents::TestAgent;
use crate::{ADMIN, TestCoordinator, create_job, create_job_with, finished_job};

/// The scenarios of this module.
pub const SCENARIOS: &[(&str, Scenario)] = &[
    ("oversized-result", || Box::pin(oversized_result())),
    ("disabled-plugin", || Box::pin(disabled_plugin())),
    ("shared-storage", || Box::pin(shared_storage())),
    ("metric-labels", || Box::pin(metric_labels())),
    ("download-slots", || Box::pin(download_slots())),
];

async fn download_slots() -> anyhow::Result<Outcome> {
    let c = TestCoordinator::start(|c| {
        c.serve.max_streams = 8;
        c.serve.max_streams_per_agent = 4;
        c.serve.stall_timeout = Seconds::secs(2);
    })
    .await;
    // Larger than a stream's flow-control window (4 MiB), so an unread stream stays open.
    let data = crate::content(16 << 20, 4);
    c.push("big/slots", "1.0.0", &data, Default::default())
        .await?;
    let req = || pb::DownloadPluginRequest {
        plugin_id: "big/slots".into(),
        version: "1.0.0".into(),
        ..Default::default()
    };
    // The hog opens every stream it can and reads one message of each.
    let hog = c.register("hog", &[], vec![]).await;
    let mut held = Vec::new();
    let mut refused = Vec::new();
    for _ in 0..8 {
        // Each on its own connection, so the unread streams' flow-control windows do
        // not hold up the next request.
        let mut client = c.agent(&hog).await;
        match client.download_plugin(req()).await {
            Ok(resp) => {
                let mut stream = resp.into_inner();
                match stream.message().await {
                    Ok(_) => held.push(stream),
                    Err(s) => refused.push(s),
                }
            }
            Err(s) => refused.push(s),
        }
    }
    ensure!(
        held.len() == 4,
        "one agent holds {} download streams (serve.max_streams_per_agent = 4)",
        held.len()
    );
    ensure!(
        refused.iter().all(|s| s.code() == Code::ResourceExhausted
            && s.message().contains("serve.max_streams_per_agent")),
        "{refused:?}"
    );
    // Another agent still gets the whole plugin, verified.
    let other = c.register("victim", &[], vec![]).await;
    let (_, got) = c
        .download(&other, req())
        .await
        .context("the other agent's download")?;
    ensure!(got == data, "the other agent's download differs");
    // The unread streams end after serve.stall_timeout (2 s) and free their slots: the
    // hog can open a stream again, and reading an old one ends in DEADLINE_EXCEEDED.
    let freed = crate::eventually(Duration::from_secs(10), || {
        let (c, hog) = (&c, &hog);
        async move {
            let mut client = c.agent(hog).await;
            let mut stream = client.download_plugin(req()).await.ok()?.into_inner();
            stream.message().await.ok().flatten().map(|_| stream)
        }
    })
    .await
    .context("property `stalled streams free their slots` failed: still refused 10 s later")?;
    drop(freed);
    let mut old = held.swap_remove(0);
    let ended = loop {
        match tokio::time::timeout(Duration::from_secs(10), old.message()).await {
            Ok(Ok(Some(_))) => continue,
            Ok(Ok(None)) => break None,
            Ok(Err(s)) => break Some(s),
            Err(_) => anyhow::bail!("a stalled stream neither ended nor sent within 10 s"),
        }
    };
    ensure!(
        ended
            .as_ref()
            .is_some_and(|s| s.code() == Code::DeadlineExceeded
                && s.message().contains("serve.stall_timeout")),
        "a stalled stream must end in DEADLINE_EXCEEDED naming serve.stall_timeout, got {ended:?}"
    );
    drop(held);
    Ok(Outcome {
        outcome: "an agent opening 8 streams and reading none got 4 (serve.max_streams_per_agent), the rest RESOURCE_EXHAUSTED naming the key; another agent downloaded 16 MiB verified meanwhile; the unread streams ended after serve.stall_timeout and freed their slots".into(),
        ..Default::default()
    })
}

async fn oversized_result() -> anyhow::Result<Outcome> {
    let c = TestCoordinator::start(|c| {
        c.jobs.lease_ttl = Seconds::secs(3);
        c.jobs.heartbeat_interval = Seconds(Duration::from_millis(500));
    })
    .await;
    let dir = tempfile::tempdir()?;
    let runs = dir.path().join("runs");
    // Prints {"blob":"xxx…"} of 200,000 bytes as its result, once per stage run.
    let plugin = format!(
        "#!/bin/sh\necho run >> {}\nprintf '{{\"blob\":\"'\nhead -c 200000 /dev/zero | tr '\\0' x\nprintf '\"}}\\n'\n",
        runs.display()
    );
    c.push("big/result", "1.0.0", plugin.as_bytes(), Default::default())
        .await?;
    let mut agent = TestAgent::start(&c.url, &c.enroll_token, "reporter", |a, _| {
        a.jobs.max_output = ByteSize::mib(1);
    })
    .await;
    let id = create_job(&c, "big/result", "1.0.0", "true", &[]).await;
    let job = finished_job(&c, &id, Duration::from_secs(40))
        .await
        .context("the job with an oversized result never ended")?;
    ensure!(
        job.status() == pb::JobStatus::Succeeded,
        "{:?}: {}",
        job.status(),
        job.error_message
    );
    ensure!(job.attempts == 1, "the job ran {} times", job.attempts);
    let cut = job
        .plugin_results
        .iter()
        .filter(|r| r.result.contains("\"truncated\":true"))
        .count();
    ensure!(
        cut >= 1,
        "no result says it was cut: {:?}",
        job.plugin_results
    );
    // It does not run again later either.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let runs_n = std::fs::read_to_string(&runs)?.lines().count();
    ensure!(
        runs_n == 3,
        "the plugin ran {runs_n} times for the 3 stages (before, on_success, after) of one job"
    );
    agent.stop().await;
    Ok(Outcome {
        outcome: format!(
            "a 200 KB plugin result (limit 64 KiB) ended its job once, succeeded, {cut} result(s) replaced by a truncation note, {runs_n} stage runs"
        ),
        ..Default::default()
    })
}

async fn disabled_plugin() -> anyhow::Result<Outcome> {
    let c = TestCoordinator::start(|_| {}).await;
    c.push(
        "team/tool",
        "1.0.0",
        b"#!/bin/sh\ntrue\n",
        Default::default(),
    )
    .await?;
    let queued = create_job(&c, "team/tool", "1.0.0", "true", &[("nobody", "x")]).await;
    let other = create_job_with(&c, "true", &[("nobody", "x")]).await;
    c.plugins(ADMIN)
        .await
        .set_plugin_enabled(pb::SetPluginEnabledRequest {
            plugin_id: "team/tool".into(),
            version: "1.0.0".into(),
            enabled: false,
        })
        .await?;
    let job = finished_job(&c, &queued, Duration::from_secs(5)).await?;
    ensure!(
        job.status() == pb::JobStatus::Failed && job.error_message.contains("disabled"),
        "the queued job of a disabled plugin: {:?} {:?}",
        job.status(),
        job.error_message
    );
    let untouched = c
        .jobs(ADMIN)
        .await
        .get_job(pb::GetJobRequest { job_id: other })
        .await?
        .into_inner()
        .job
        .context("job")?;
    ensure!(
        untouched.status() == pb::JobStatus::Queued,
        "an unrelated job changed"
    );
    let token = c.register("asker", &[], vec![]).await;
    let err = c
        .agent(&token)
        .await
        .get_manifest(pb::GetManifestRequest {
            plugin_id: "team/tool".into(),
            version: "1.0.0".into(),
            ..Default::default()
        })
        .await
        .err()
        .context("a disabled plugin's manifest was served")?;
    ensure!(
        err.code() == Code::FailedPrecondition && err.message().contains("disabled"),
        "{err:?}"
    );
    let err = c
        .download(
            &token,
            pb::DownloadPluginRequest {
                plugin_id: "team/tool".into(),
                version: "1.0.0".into(),
                ..Default::default()
            },
        )
        .await
        .err()
        .context("a disabled plugin's content was served")?;
    ensure!(err.code() == Code::FailedPrecondition, "{err:?}");
    Ok(Outcome {
        outcome: "disabling failed the queued job that needed it (\"disabled\"), left others queued, and stopped GetManifest and DownloadPlugin for it (FAILED_PRECONDITION)".into(),
        ..Default::default()
    })
}

async fn shared_storage() -> anyhow::Result<Outcome> {
    let c = TestCoordinator::start(|_| {}).await;
    let data = crate::content(300_000, 9);
    let sha = ContentId::of_bytes(&data);
    c.push("shared/p", "1.0.0", &data, Default::default())
        .await?;
    // A second coordinator with its own data dir but the first one's storage.
    let other = tempfile::tempdir()?;
    let mut config = crate::test_config(other.path());
    config.plugin.storage_path = c.storage();
    let second = arcade_coordinator::RunningCoordinator::start(config.validate()?).await;
    let err = match second {
        Ok(_) => anyhow::bail!("a second coordinator started on the same plugin.storage_path"),
        Err(e) => e.to_string(),
    };
    ensure!(
        err.contains("in use by another running coordinator"),
        "{err}"
    );
    let token = c.register("reader", &[], vec![]).await;
    let req = || pb::DownloadPluginRequest {
        plugin_id: "shared/p".into(),
        version: "1.0.0".into(),
        ..Default::default()
    };
    let (_, got) = c.download(&token, req()).await?;
    ensure!(got == data, "the first coordinator's plugin changed");

    // Damage the blob on disk: served as DATA_LOSS, then repaired by a re-push.
    let hex = sha.to_hex();
    let blob = c.storage().join("blobs").join(&hex[..2]).join(&hex);
    let mut bytes = std::fs::read(&blob)?;
    bytes[1000] ^= 0xff;
    std::fs::write(&blob, &bytes)?;
    let err = c
        .download(&token, req())
        .await
        .err()
        .context("damaged content was served")?;
    ensure!(err.code() == Code::DataLoss, "{err:?}");
    let again = c
        .push("shared/p", "1.0.0", &data, Default::default())
        .await?;
    ensure!(!again.created, "the re-push created a new version");
    let (_, got) = c.download(&token, req()).await?;
    ensure!(got == data, "the re-push did not repair the stored content");
    Ok(Outcome {
        outcome: "a second coordinator on the same storage_path refused to start (lock), the first one's plugin intact; a blob damaged on disk gave DATA_LOSS and a re-push repaired it".into(),
        ..Default::default()
    })
}

async fn metric_labels() -> anyhow::Result<Outcome> {
    let c = TestCoordinator::start(|_| {}).await;
    let token = c.register("prober", &[], vec![]).await;
    for i in 0..50 {
        let _ = c
            .download(
                &token,
                pb::DownloadPluginRequest {
                    plugin_id: format!("made/up{i}"),
                    version: format!("9.9.{i}"),
                    ..Default::default()
                },
            )
            .await;
    }
    let text = c.metrics_text().await;
    let series = text
        .lines()
        .filter(|l| l.starts_with("plugin_download_total{"))
        .collect::<Vec<_>>();
    ensure!(
        !series.iter().any(|l| l.contains("made/up")),
        "made-up plugin ids became metric labels: {series:?}"
    );
    ensure!(
        series.iter().any(|l| l.contains("plugin_id=\"unknown\"")),
        "the refused downloads were not counted: {series:?}"
    );
    Ok(Outcome {
        outcome: format!(
            "50 downloads of made-up plugins counted under plugin_id=\"unknown\": {} plugin_download_total series",
            series.len()
        ),
        ..Default::default()
    })
}
