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
            .register_with(&format!("a{round}"), &[], vec![], "")
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
