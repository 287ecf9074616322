//! Publisher-signed plugins: an agent with `[trust] require_signature` runs only what a
//! key it lists signed — whatever the coordinator serves — and says why in the job
//! result; the coordinator refuses a signature that does not match the pushed bytes;
//! and a coordinator whose store was rewritten (a signed name pointed at other bytes,
//! a signature stripped) cannot make an agent run them. Real coordinator and agent over
//! gRPC on loopback, the store tampered with in its redb file while stopped.

use std::path::Path;

use arcade_p2p::ContentId;
use arcade_p2p::publisher::{self, PublisherKey};
use arcade_proto::v1 as pb;
use arcade_tests::agents::TestAgent;
use arcade_tests::{ENROLL, TestCoordinator, create_job, run_ok, wait_job};
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
    // A signature cannot be added to (or swapped on) a version already pushed.
    let err = c
        .push(
            "sig/unsigned",
            "1.0.0",
            &unsigned,
            signed_header(&trusted, "sig/unsigned", "1.0.0", &unsigned),
        )
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists, "{}", err.message());
    assert!(
        err.message().contains("unsigned") && err.message().contains("push a new version"),
        "{}",
        err.message()
    );
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

    run_ok(&c, "sig/ok", "1.0.0", &[]).await;
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

/// Rewrites the stored record of `key` (`id@version`) in a stopped coordinator's redb
/// file, as someone with the coordinator host's disk could.
fn tamper(data_dir: &Path, key: &str, change: impl FnOnce(&mut pb::PluginVersion)) {
    use prost::Message as _;
    use redb::ReadableTable as _;
    let plugins: redb::TableDefinition<'_, &str, &[u8]> = redb::TableDefinition::new("plugins");
    let db = redb::Database::open(data_dir.join("coordinator.redb")).expect("open the store");
    let tx = db.begin_write().unwrap();
    {
        let mut table = tx.open_table(plugins).unwrap();
        let mut record =
            pb::PluginVersion::decode(table.get(key).unwrap().expect("stored").value()).unwrap();
        change(&mut record);
        table
            .insert(key, record.encode_to_vec().as_slice())
            .unwrap();
    }
    tx.commit().unwrap();
}

/// The attack the signatures are for: the coordinator's store is rewritten so that a
/// signed plugin's record names other bytes, or loses its signature. The coordinator
/// serves what its store says; the agent refuses it and nothing runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tampered_coordinator_store_cannot_make_agents_run_other_code() {
    let mut c = TestCoordinator::start(|_| {}).await;
    let publisher = PublisherKey::generate();
    let dir = tempfile::tempdir().unwrap();
    let marker = |name: &str| dir.path().join(name);
    let good = plugin(&marker("good"));
    let evil = plugin(&marker("evil"));
    for id in ["sig/swapped", "sig/stripped"] {
        c.push(
            id,
            "1.0.0",
            &good,
            signed_header(&publisher, id, "1.0.0", &good),
        )
        .await
        .unwrap();
    }
    // The attacker's bytes reach the store the ordinary way, unsigned.
    let evil_record = c
        .push("x/evil", "1.0.0", &evil, Default::default())
        .await
        .unwrap()
        .plugin
        .unwrap();
    let point_at_evil = |r: &mut pb::PluginVersion| {
        r.sha256 = evil_record.sha256.clone();
        r.size = evil_record.size;
        r.chunks = evil_record.chunks;
        r.chunk_size = evil_record.chunk_size;
    };
    c.restart_after(|data| {
        tamper(data, "sig/swapped@1.0.0", point_at_evil);
        tamper(data, "sig/stripped@1.0.0", |r| {
            point_at_evil(r);
            r.signer.clear();
            r.signature.clear();
        });
    })
    .await;
    // The coordinator now describes the attacker's bytes under the signed names.
    let listed = c
        .plugins(arcade_tests::ADMIN)
        .await
        .get_plugin(pb::GetPluginRequest {
            plugin_id: "sig/swapped".into(),
            version: "1.0.0".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .plugin
        .unwrap();
    assert_eq!(listed.sha256, evil_record.sha256);

    let key = publisher.id().to_string();
    let _agent = TestAgent::start(&c.url, ENROLL, "strict", |cfg, _| {
        cfg.trust.publisher_keys = vec![key.clone()];
        cfg.trust.require_signature = true;
    })
    .await;
    for (id, why) in [
        (
            "sig/swapped",
            "does not match this plugin's id, version and content",
        ),
        ("sig/stripped", "is not signed"),
    ] {
        let job = wait_job(&c, &create_job(&c, id, "1.0.0", "true", &[]).await).await;
        assert_eq!(job.status(), pb::JobStatus::Failed, "{id}");
        assert!(
            job.error_message.contains(why),
            "{id}: {}",
            job.error_message
        );
        assert_eq!(job.plugin_results[0].stage, "signature", "{id}");
    }
    assert!(!marker("evil").exists(), "the attacker's plugin ran");
}
