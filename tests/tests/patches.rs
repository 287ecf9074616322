//! Patches between versions, built by a real coordinator after pushes over gRPC: a new
//! version gets a patch from each of the newest older versions (`plugin.patch_bases`)
//! that applies to the base's bytes and yields the new version exactly; a version
//! unrelated to the older ones gets none (the patch would not be clearly smaller than
//! the version compressed); deleting a base removes its patches and their blobs; the
//! patches that remain survive a restart (the start-up orphan sweep keeps their blobs).

use std::path::PathBuf;
use std::time::Duration;

use arcade_p2p::ContentId;
use arcade_proto::v1 as pb;
use arcade_tests::agents::TestAgent;
use arcade_tests::{
    ADMIN, ENROLL, TestCoordinator, content, eventually, next_release, run_ok, script,
    storage_files,
};

/// A 1 MiB executable-looking plugin of noise.
fn base() -> Vec<u8> {
    script(1 << 20, 3)
}

fn next(prev: &[u8], seed: u8) -> Vec<u8> {
    next_release(prev, seed)
}

async fn patches(c: &TestCoordinator, version: &str) -> Vec<pb::PatchInfo> {
    c.plugins(ADMIN)
        .await
        .get_plugin(pb::GetPluginRequest {
            plugin_id: "delta/tool".into(),
            version: version.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .patches
}

async fn wait_patches(c: &TestCoordinator, version: &str, n: usize) -> Vec<pb::PatchInfo> {
    eventually(Duration::from_secs(30), || async {
        let p = patches(c, version).await;
        (p.len() >= n).then_some(p)
    })
    .await
    .unwrap_or_else(|| panic!("{n} patch(es) to {version} within 30 s"))
}

fn blob_of(c: &TestCoordinator, sha: &str) -> Option<PathBuf> {
    storage_files(&c.storage())
        .into_iter()
        .find(|f| f.file_name().is_some_and(|n| n == sha))
}

fn apply(base: &[u8], patch: &pb::PatchInfo, c: &TestCoordinator, len: usize) -> Vec<u8> {
    let bytes = std::fs::read(blob_of(c, &patch.patch_sha256).expect("patch blob")).unwrap();
    assert_eq!(bytes.len() as u64, patch.patch_size);
    let mut out = Vec::new();
    arcade_p2p::delta::apply_patch(base, &bytes, &mut out, len as u64, patch.window_log).unwrap();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_versions_get_patches_that_rebuild_them_and_deletes_clean_up() {
    let mut c = TestCoordinator::start(|_| {}).await;
    let v1 = base();
    let v2 = next(&v1, 10);
    let v3 = next(&v2, 20);
    for (version, data) in [("1.0.0", &v1), ("1.1.0", &v2), ("1.2.0", &v3)] {
        c.push("delta/tool", version, data, Default::default())
            .await
            .unwrap();
    }
    let to_v2 = wait_patches(&c, "1.1.0", 1).await;
    assert_eq!(to_v2[0].base_version, "1.0.0");
    assert_eq!(to_v2[0].base_sha256, ContentId::of_bytes(&v1).to_hex());
    assert!(
        to_v2[0].patch_size < v2.len() as u64 / 50,
        "{} bytes of patch for {}",
        to_v2[0].patch_size,
        v2.len()
    );
    assert_eq!(apply(&v1, &to_v2[0], &c, v2.len()), v2);
    // The newest two older versions each get one.
    let to_v3 = wait_patches(&c, "1.2.0", 2).await;
    for p in &to_v3 {
        let base = if p.base_version == "1.0.0" { &v1 } else { &v2 };
        assert_eq!(apply(base, p, &c, v3.len()), v3, "from {}", p.base_version);
    }
    assert!(
        patches(&c, "1.0.0").await.is_empty(),
        "nothing older than 1.0.0"
    );

    // Unrelated bytes: a patch would be no smaller than the version itself.
    let mut other = b"#!/bin/sh\nexit 0\n".to_vec();
    other.extend(content(1 << 20, 99));
    c.push("delta/tool", "2.0.0", &other, Default::default())
        .await
        .unwrap();
    // Another version pushed after it is built only once the 2.0.0 build is done (one
    // at a time), so its patch showing up means 2.0.0's build has finished.
    let v4 = next(&other, 30);
    c.push("delta/tool", "2.1.0", &v4, Default::default())
        .await
        .unwrap();
    wait_patches(&c, "2.1.0", 1).await;
    assert!(
        patches(&c, "2.0.0").await.is_empty(),
        "no patch kept to 2.0.0"
    );

    // Deleting 1.0.0 removes the patches from it, blobs included.
    let from_v1: Vec<String> = to_v3
        .iter()
        .chain(&to_v2)
        .filter(|p| p.base_version == "1.0.0")
        .map(|p| p.patch_sha256.clone())
        .collect();
    c.plugins(ADMIN)
        .await
        .delete_plugin(pb::DeletePluginRequest {
            plugin_id: "delta/tool".into(),
            version: "1.0.0".into(),
        })
        .await
        .unwrap();
    assert!(patches(&c, "1.1.0").await.is_empty());
    assert_eq!(patches(&c, "1.2.0").await.len(), 1);
    for sha in &from_v1 {
        assert!(blob_of(&c, sha).is_none(), "patch blob {sha} removed");
    }

    // What remains survives a restart, blob and all.
    c.restart().await;
    let kept = patches(&c, "1.2.0").await;
    assert_eq!(kept.len(), 1);
    assert_eq!(kept[0].base_version, "1.1.0");
    assert_eq!(apply(&v2, &kept[0], &c, v3.len()), v3);
}

async fn run_job(c: &TestCoordinator, version: &str) {
    run_ok(c, "delta/tool", version, &[]).await;
}

/// An agent holding 1.0.0 gets 1.1.0 as a patch (a few KiB from the coordinator
/// instead of 2 MiB), verified and run; when the base it holds was altered on disk, the
/// patched result fails its SHA-256 and the agent fetches the whole version instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_holding_a_base_fetch_the_patch_and_fall_back_when_it_fails() {
    // One base per version: 1.2.0's only patch is from the 1.1.0 the test alters.
    let c = TestCoordinator::start(|c| c.plugin.patch_bases = 1).await;
    let v1 = script(2 << 20, 1);
    let v2 = next(&v1, 40);
    let v3 = next(&v2, 50);
    c.push("delta/tool", "1.0.0", &v1, Default::default())
        .await
        .unwrap();
    let a = TestAgent::start(&c.url, ENROLL, "patcher", |cfg, _| {
        cfg.mesh.enabled = false;
    })
    .await;
    run_job(&c, "1.0.0").await;
    let full = a.server_bytes();
    assert_eq!(full, v1.len() as u64);

    c.push("delta/tool", "1.1.0", &v2, Default::default())
        .await
        .unwrap();
    let offered = wait_patches(&c, "1.1.0", 1).await;
    run_job(&c, "1.1.0").await;
    let fetched = a.server_bytes() - full;
    assert_eq!(fetched, offered[0].patch_size, "only the patch was fetched");
    let m = a.agent().metrics();
    assert_eq!(m.patched_bytes.get(), v2.len() as u64);
    assert_eq!(m.patch_bytes.get(), offered[0].patch_size);
    assert_eq!(m.patch_fallbacks.get(), 0);
    let cached = std::fs::read(
        a.plugin_dir()
            .join("downloaded")
            .join(ContentId::of_bytes(&v2).to_hex()),
    )
    .unwrap();
    assert_eq!(cached, v2);

    // The base (1.1.0) altered on disk: the patch to 1.2.0 yields other bytes, their
    // SHA-256 does not match, and the whole version is fetched and verified instead.
    let base_file = a
        .plugin_dir()
        .join("downloaded")
        .join(ContentId::of_bytes(&v2).to_hex());
    let mut altered = v2.clone();
    altered[300_000] ^= 0xff;
    std::fs::write(&base_file, &altered).unwrap();
    c.push("delta/tool", "1.2.0", &v3, Default::default())
        .await
        .unwrap();
    wait_patches(&c, "1.2.0", 1).await;
    let before = a.server_bytes();
    run_job(&c, "1.2.0").await;
    assert_eq!(
        m.patch_fallbacks.get(),
        1,
        "the patch failed and was counted"
    );
    let whole = a.server_bytes() - before;
    assert!(
        whole >= v3.len() as u64,
        "the whole version was fetched after the failed patch ({whole} bytes)"
    );
    let cached = std::fs::read(
        a.plugin_dir()
            .join("downloaded")
            .join(ContentId::of_bytes(&v3).to_hex()),
    )
    .unwrap();
    assert_eq!(cached, v3);
}
