//! Plugin push, listing, manifests and streamed downloads against a real coordinator
//! over gRPC on loopback.

use arcade_p2p::{ContentId, Manifest};
use arcade_proto::v1 as pb;
use arcade_tests::{ADMIN, TestCoordinator, content, files_under, storage_files};
use tonic::Code;

const CS: usize = 64 * 1024;

#[tokio::test]
async fn push_list_manifest_download_roundtrip_at_boundary_sizes() {
    let c = TestCoordinator::start(|_| {}).await;
    let agent = c.register("a1", &[], vec![]).await;
    for (i, len) in [0, 1, CS - 1, CS, CS + 1, 10 * CS].into_iter().enumerate() {
        let data = content(len, i as u8);
        let version = format!("1.0.{i}");
        let resp = c
            .push(
                "test/sizes",
                &version,
                &data,
                pb::PushPluginHeader::default(),
            )
            .await
            .unwrap_or_else(|e| panic!("push {len}: {e}"));
        assert!(resp.created);
        let p = resp.plugin.unwrap();
        assert_eq!(p.sha256, ContentId::of_bytes(&data).to_hex());
        assert_eq!(p.size, len as u64);
        assert_eq!(p.chunk_size, CS as u32);
        assert_eq!(p.chunks as usize, len.div_ceil(CS));
        assert_eq!(p.plugin_type, "test");

        let mut ac = c.agent(&agent).await;
        let m = ac
            .get_manifest(pb::GetManifestRequest {
                plugin_id: "test/sizes".into(),
                version: version.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let manifest = Manifest::from_proto(m.manifest.as_ref().unwrap()).unwrap();
        assert_eq!(
            manifest,
            Manifest::from_reader(&data[..], CS as u32).unwrap()
        );

        let (msgs, bytes) = c
            .download(
                &agent,
                pb::DownloadPluginRequest {
                    plugin_id: "test/sizes".into(),
                    version: version.clone(),
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        assert_eq!(bytes, data, "download of {len} bytes differs");
        assert_eq!(msgs.len(), len.div_ceil(CS));
        for (n, msg) in msgs.iter().enumerate() {
            assert!(msg.data.len() <= CS, "message larger than one chunk");
            assert_eq!(msg.chunk_index as usize, n);
            assert_eq!(msg.offset as usize, n * CS);
            manifest.verify_chunk(msg.chunk_index, &msg.data).unwrap();
        }
        if let Some(first) = msgs.first() {
            assert_eq!(first.checksum, p.sha256);
            assert_eq!(first.size, len as i64);
        }
    }
    let mut admin = c.plugins(ADMIN).await;
    let listed = admin
        .list_plugins(pb::ListPluginsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .plugins;
    assert_eq!(listed.len(), 6);
    let none = admin
        .list_plugins(pb::ListPluginsRequest {
            plugin_type: "notify".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .plugins;
    assert!(none.is_empty());
}

#[tokio::test]
async fn ranged_download_and_download_by_content_id() {
    let c = TestCoordinator::start(|_| {}).await;
    let agent = c.register("a1", &[], vec![]).await;
    let data = content(10 * CS + 5, 9);
    let sha = ContentId::of_bytes(&data).to_hex();
    c.push("x/y", "2.0.0", &data, pb::PushPluginHeader::default())
        .await
        .unwrap();
    let (msgs, bytes) = c
        .download(
            &agent,
            pb::DownloadPluginRequest {
                sha256: sha.clone(),
                ranges: vec![
                    pb::ChunkRange { start: 3, end: 5 },
                    pb::ChunkRange { start: 10, end: 11 },
                ],
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(
        msgs.iter().map(|m| m.chunk_index).collect::<Vec<_>>(),
        vec![3, 4, 10]
    );
    let mut expected = data[3 * CS..5 * CS].to_vec();
    expected.extend_from_slice(&data[10 * CS..]);
    assert_eq!(bytes, expected);
    for bad in [
        pb::ChunkRange { start: 2, end: 2 },
        pb::ChunkRange { start: 0, end: 12 },
    ] {
        let err = c
            .download(
                &agent,
                pb::DownloadPluginRequest {
                    sha256: sha.clone(),
                    ranges: vec![bad],
                    ..Default::default()
                },
            )
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::OutOfRange, "{err}");
    }
}

#[tokio::test]
async fn push_rejections_store_nothing() {
    let c = TestCoordinator::start(|cfg| {
        cfg.plugin.max_plugin_size = arcade_p2p::settings::ByteSize::kib(300);
    })
    .await;
    let blobs = c.storage();

    // Over max_plugin_size: rejected while streaming, nothing on disk.
    let err = c
        .push(
            "big/one",
            "1.0.0",
            &content(400 * 1024, 1),
            Default::default(),
        )
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err}");
    assert!(err.message().contains("max_plugin_size"));
    assert!(
        storage_files(&blobs).is_empty(),
        "left on disk: {:?}",
        storage_files(&blobs)
    );

    // Expected checksum differs.
    let data = content(1000, 2);
    let err = c
        .push(
            "sum/bad",
            "1.0.0",
            &data,
            pb::PushPluginHeader {
                expected_sha256: ContentId::of_bytes(b"other").to_hex(),
                ..Default::default()
            },
        )
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("checksum mismatch"), "{err}");
    assert!(storage_files(&blobs).is_empty());

    // Malformed checksum.
    let err = c
        .push(
            "sum/bad",
            "1.0.0",
            &data,
            pb::PushPluginHeader {
                expected_sha256: "xyz".into(),
                ..Default::default()
            },
        )
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);

    // Bad ids and versions name the rule.
    for (id, version, needle) in [
        ("Bad/Id", "1.0.0", "[a-z0-9][a-z0-9._-]*"),
        ("a/../b", "1.0.0", "`..`"),
        ("/abs", "1.0.0", "leading"),
        ("a\0b", "1.0.0", "[a-z0-9][a-z0-9._-]*"),
        ("ok/id", "1.0", "semantic version"),
    ] {
        let err = c
            .push(id, version, &data, Default::default())
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{id}");
        assert!(err.message().contains(needle), "{id}: {}", err.message());
    }
    let long = "a".repeat(129);
    let err = c
        .push(&long, "1.0.0", &data, Default::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("128"));

    // Same id@version: same content is idempotent, other content conflicts.
    let first = c
        .push("dup/p", "1.0.0", &data, Default::default())
        .await
        .unwrap();
    assert!(first.created);
    let again = c
        .push("dup/p", "1.0.0", &data, Default::default())
        .await
        .unwrap();
    assert!(!again.created);
    assert_eq!(again.plugin.unwrap().sha256, first.plugin.unwrap().sha256);
    let err = c
        .push("dup/p", "1.0.0", &content(1000, 3), Default::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists, "{err}");
    assert_eq!(
        files_under(&blobs.join("blobs")).len(),
        1,
        "only the first content is stored"
    );
    assert!(files_under(&blobs.join("staging")).is_empty());
}

#[tokio::test]
async fn security_settings_checksum_and_executables() {
    let c = TestCoordinator::start(|cfg| {
        cfg.plugin.security.require_checksum = true;
        cfg.plugin.security.allow_unsafe = false;
    })
    .await;
    let script = b"#!/bin/sh\necho hello\n".to_vec();
    let err = c
        .push("s/p", "1.0.0", &script, Default::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("require_checksum"), "{err}");
    let with_sum = |d: &[u8]| pb::PushPluginHeader {
        expected_sha256: ContentId::of_bytes(d).to_hex(),
        ..Default::default()
    };
    c.push("s/p", "1.0.0", &script, with_sum(&script))
        .await
        .unwrap();
    let elf = [b"\x7fELF".as_slice(), &content(100, 4)].concat();
    c.push("s/elf", "1.0.0", &elf, with_sum(&elf))
        .await
        .unwrap();
    let junk = content(100, 5);
    let err = c
        .push("s/junk", "1.0.0", &junk, with_sum(&junk))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("allow_unsafe"), "{err}");
}

#[tokio::test]
async fn header_must_come_first_and_once() {
    let c = TestCoordinator::start(|_| {}).await;
    let mut client = c.plugins(ADMIN).await;
    let data_first = vec![pb::PushPluginRequest {
        msg: Some(pb::push_plugin_request::Msg::Data(vec![1, 2, 3])),
    }];
    let err = client
        .push_plugin(futures::stream::iter(data_first))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let header = pb::PushPluginRequest {
        msg: Some(pb::push_plugin_request::Msg::Header(pb::PushPluginHeader {
            plugin_id: "h/p".into(),
            version: "1.0.0".into(),
            ..Default::default()
        })),
    };
    let twice = vec![header.clone(), header];
    let err = client
        .push_plugin(futures::stream::iter(twice))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("twice"));
}

#[tokio::test]
async fn disable_hides_and_delete_removes_content() {
    let c = TestCoordinator::start(|_| {}).await;
    let agent = c.register("a1", &[], vec![]).await;
    let data = content(3 * CS, 7);
    c.push("d/p", "1.0.0", &data, Default::default())
        .await
        .unwrap();
    c.push("d/p", "1.1.0", &data, Default::default())
        .await
        .unwrap();
    let mut admin = c.plugins(ADMIN).await;
    admin
        .set_plugin_enabled(pb::SetPluginEnabledRequest {
            plugin_id: "d/p".into(),
            version: "1.0.0".into(),
            enabled: false,
        })
        .await
        .unwrap();
    let mut ac = c.agent(&agent).await;
    let avail = ac
        .list_available_plugins(pb::ListAvailablePluginsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .plugins;
    assert_eq!(
        avail.iter().map(|p| p.version.as_str()).collect::<Vec<_>>(),
        vec!["1.1.0"]
    );
    let mut jobs = c.jobs(ADMIN).await;
    let err = jobs
        .create_job(pb::CreateJobRequest {
            commands: vec!["true".into()],
            required_plugins: vec![pb::RequiredPlugin {
                plugin_id: "d/p".into(),
                version: "1.0.0".into(),
                stages: vec![],
                ..Default::default()
            }],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("disabled"));

    // Shared content stays until its last version is deleted.
    let del = admin
        .delete_plugin(pb::DeletePluginRequest {
            plugin_id: "d/p".into(),
            version: "1.0.0".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!del.content_removed);
    assert_eq!(files_under(&c.storage().join("blobs")).len(), 1);
    let del = admin
        .delete_plugin(pb::DeletePluginRequest {
            plugin_id: "d/p".into(),
            version: "1.1.0".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(del.content_removed);
    assert!(files_under(&c.storage().join("blobs")).is_empty());
    let err = admin
        .get_plugin(pb::GetPluginRequest {
            plugin_id: "d/p".into(),
            version: "1.1.0".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
}

#[tokio::test]
async fn corrupt_stored_blob_is_never_served() {
    let c = TestCoordinator::start(|cfg| cfg.plugin.enable_cache = false).await;
    let agent = c.register("a1", &[], vec![]).await;
    let data = content(3 * CS, 8);
    c.push("c/p", "1.0.0", &data, Default::default())
        .await
        .unwrap();
    let blob = files_under(&c.storage().join("blobs")).pop().unwrap();
    let mut bytes = std::fs::read(&blob).unwrap();
    bytes[CS + 10] ^= 0xff;
    std::fs::write(&blob, bytes).unwrap();
    let err = c
        .download(
            &agent,
            pb::DownloadPluginRequest {
                plugin_id: "c/p".into(),
                version: "1.0.0".into(),
                ..Default::default()
            },
        )
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::DataLoss, "{err}");
    assert!(err.message().contains("chunk 1"));
}

#[tokio::test]
async fn metrics_count_downloads_and_bytes() {
    let c = TestCoordinator::start(|_| {}).await;
    let agent = c.register("a1", &[], vec![]).await;
    let data = content(2 * CS + 1, 3);
    c.push("m/p", "1.0.0", &data, Default::default())
        .await
        .unwrap();
    c.download(
        &agent,
        pb::DownloadPluginRequest {
            plugin_id: "m/p".into(),
            version: "1.0.0".into(),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    // A second agent asks chunk by chunk, as agents do: one fetch, not three.
    let other = c.register("a2", &[], vec![]).await;
    for chunk in 0..3 {
        c.download(
            &other,
            pb::DownloadPluginRequest {
                plugin_id: "m/p".into(),
                version: "1.0.0".into(),
                ranges: vec![pb::ChunkRange {
                    start: chunk,
                    end: chunk + 1,
                }],
                ..Default::default()
            },
        )
        .await
        .unwrap();
    }
    let text = c.metrics_text().await;
    assert!(
        text.starts_with("HTTP/1.0 200") || text.starts_with("HTTP/1.1 200"),
        "{text}"
    );
    assert!(
        text.contains(
            r#"plugin_download_total{plugin_id="m/p",version="1.0.0",status="complete"} 2"#
        ),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            r#"arcade_coordinator_served_bytes_total{{plugin_id="m/p",version="1.0.0"}} {}"#,
            2 * data.len()
        )),
        "{text}"
    );
    assert!(
        text.contains("plugin_download_duration_seconds_count{plugin_id=\"m/p\"} 2"),
        "{text}"
    );
    assert!(
        text.contains(r#"arcade_coordinator_push_total{status="created"} 1"#),
        "{text}"
    );
}
