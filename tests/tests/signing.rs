//! Publisher-signed plugins: an agent with `[trust] require_signature` runs only what a
//! key it lists signed — whatever the coordinator serves — and says why in the job
//! result; the coordinator refuses a signature that does not match the pushed bytes.
//! Real coordinator and agent over gRPC on loopback.

use std::path::Path;

use arcade_p2p::ContentId;
use arcade_p2p::publisher::{self, PublisherKey};
use arcade_proto::v1 as pb;
use arcade_tests::agents::TestAgent;
use arcade_tests::{ENROLL, TestCoordinator, create_job, wait_job};
use tonic::Code;

/// A plugin that leaves `marker` behind when it runs.
fn plugin(marker: &Path) -> Vec<u8> {
    format!("#!/bin/sh\ntouch '{}'\n", marker.display()).into_bytes()
}

fn signed_header(key: &PublisherKey, id: &str, version: &str, data: &[u8]) -> pb::PushPluginHeader {
    let statement =
        publisher::statement(id, version, &ContentId::of_bytes(data), data.len() as u64);
    pb::PushPluginHeader {
        signer: key.id().as_bytes().to_vec(),
        signature: key.sign(&statement),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_run_only_what_a_trusted_publisher_signed() {
    let c = TestCoordinator::start(|_| {}).await;
    let trusted = PublisherKey::generate();
    let stranger = PublisherKey::generate();
    let dir = tempfile::tempdir().unwrap();
    let marker = |name: &str| dir.path().join(name);

    let ok = plugin(&marker("ok"));
    c.push(
        "sig/ok",
        "1.0.0",
        &ok,
        signed_header(&trusted, "sig/ok", "1.0.0", &ok),
    )
    .await
    .unwrap();
    let unsigned = plugin(&marker("unsigned"));
    c.push("sig/unsigned", "1.0.0", &unsigned, Default::default())
        .await
        .unwrap();
    let foreign = plugin(&marker("foreign"));
    c.push(
        "sig/foreign",
        "1.0.0",
        &foreign,
        signed_header(&stranger, "sig/foreign", "1.0.0", &foreign),
    )
    .await
    .unwrap();

    // A signature made for other bytes, or for another version, is refused at push.
    let other = plugin(&marker("other"));
    for (version, signed_for) in [("1.0.0", &ok), ("2.0.0", &other)] {
        let mut header = signed_header(&trusted, "sig/other", "1.0.0", signed_for);
        header.description = format!("signed for 1.0.0, pushed as {version}");
        let err = c
            .push("sig/other", version, &other, header)
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{}", err.message());
        assert!(
            err.message().contains("does not match"),
            "{}",
            err.message()
        );
    }
    let mut half = signed_header(&trusted, "sig/other", "1.0.0", &other);
    half.signature.clear();
    let err = c
        .push("sig/other", "1.0.0", &other, half)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{}", err.message());

    let key = trusted.id().to_string();
    let _agent = TestAgent::start(&c.url, ENROLL, "strict", |cfg, _| {
        cfg.trust.publisher_keys = vec![key.clone()];
        cfg.trust.require_signature = true;
    })
    .await;

    let id = create_job(&c, "sig/ok", "1.0.0", "true", &[]).await;
    let job = wait_job(&c, &id).await;
    assert_eq!(
        job.status(),
        pb::JobStatus::Succeeded,
        "{}",
        job.error_message
    );
    assert!(marker("ok").exists(), "the signed plugin ran");

    for (plugin_id, why) in [
        ("sig/unsigned", "is not signed"),
        ("sig/foreign", "not a trusted publisher key"),
    ] {
        let id = create_job(&c, plugin_id, "1.0.0", "true", &[]).await;
        let job = wait_job(&c, &id).await;
        assert_eq!(job.status(), pb::JobStatus::Failed, "{plugin_id}");
        assert!(
            job.error_message
                .contains(&format!("plugin {plugin_id}@1.0.0 refused"))
                && job.error_message.contains(why),
            "{plugin_id}: {}",
            job.error_message
        );
        let result = &job.plugin_results[0];
        assert_eq!(
            (result.stage.as_str(), result.success),
            ("signature", false)
        );
        assert!(
            !marker(plugin_id.trim_start_matches("sig/")).exists(),
            "{plugin_id} ran"
        );
    }
}
