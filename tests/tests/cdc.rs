//! Content-defined chunks and chunks reused from held content, end to end through the
//! real `arcadectl`, a coordinator and an agent: `plugin push --chunking cdc` stores a
//! manifest of content-defined chunks (shown by `plugin get`); an agent holding 1.0.0
//! gets 1.1.0 — bytes inserted near the start, an edit further on — by copying every
//! chunk the two share from its own cache and asking the coordinator only for the
//! rest; a version pushed with fixed chunks shares nothing with them; a held file
//! altered on disk gives no bytes (its chunk fails BLAKE3 and is fetched instead); bad
//! `--chunking` values get clear errors.

use std::collections::HashSet;

use arcade_p2p::cdc::CdcParams;
use arcade_p2p::{ContentId, Manifest};
use arcade_tests::agents::TestAgent;
use arcade_tests::process::{arcadectl_async, stderr_failed, stdout_ok};
use arcade_tests::{ENROLL, TestCoordinator, next_release, run_ok, script};

const ID: &str = "cdc/tree";

/// A 2 MiB script that exits 0, then noise (an archive's worth of distinct bytes).
fn base() -> Vec<u8> {
    script(2 << 20, 7)
}

fn next(prev: &[u8], seed: u8) -> Vec<u8> {
    next_release(prev, seed)
}

/// `arcadectl plugin push FILE --id ID --version V --chunking C [--json]`.
async fn push_file(
    c: &TestCoordinator,
    file: &std::path::Path,
    version: &str,
    chunking: &str,
    json: bool,
) -> std::process::Output {
    let mut args = vec![
        "plugin",
        "push",
        file.to_str().unwrap(),
        "--id",
        ID,
        "--version",
        version,
        "--chunking",
        chunking,
    ];
    if json {
        args.push("--json");
    }
    arcadectl_async(&c.url, &args).await
}

async fn push(
    c: &TestCoordinator,
    version: &str,
    data: &[u8],
    chunking: &str,
) -> serde_json::Value {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("plugin");
    std::fs::write(&file, data).unwrap();
    let out = push_file(c, &file, version, chunking, true).await;
    serde_json::from_str(&stdout_ok(&out)).expect("push --json prints JSON")
}

/// Bytes of `target`'s chunks whose BLAKE3 is among `held`'s.
fn shared_bytes(target: &Manifest, held: &HashSet<[u8; 32]>) -> u64 {
    (0..target.chunk_count())
        .filter(|&i| held.contains(target.chunk_hash(i).unwrap()))
        .map(|i| {
            let r = target.chunk_range(i).unwrap();
            r.end - r.start
        })
        .sum()
}

fn hashes(m: &Manifest) -> HashSet<[u8; 32]> {
    (0..m.chunk_count())
        .map(|i| *m.chunk_hash(i).unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_reuse_the_chunks_they_hold_and_fetch_only_the_rest() {
    let c = TestCoordinator::start(|_| {}).await;
    let v1 = base();
    let v2 = next(&v1, 10);
    let v3 = next(&v2, 20);
    let v4 = next(&v2, 30);
    let cdc = |data: &[u8]| Manifest::from_reader_cdc(data, CdcParams::DEFAULT).unwrap();
    let (m1, m2, m4) = (cdc(&v1), cdc(&v2), cdc(&v4));

    // `--chunking cdc`: the documented bounds, recorded and shown.
    let pushed = push(&c, "1.0.0", &v1, "cdc").await;
    assert_eq!(pushed["chunk_size"], 0);
    assert_eq!(
        pushed["cdc"],
        serde_json::json!({"min": 4096, "avg": 16384, "max": 65536})
    );
    assert_eq!(pushed["chunks"], m1.chunk_count());
    let shown =
        stdout_ok(&arcadectl_async(&c.url, &["plugin", "get", &format!("{ID}@1.0.0")]).await);
    assert!(
        shown.contains(&format!(
            "{} content-defined (4096 / 16384 / 65536 bytes min / avg / max)",
            m1.chunk_count()
        )),
        "{shown}"
    );

    let a = TestAgent::start(&c.url, ENROLL, "reuser", |cfg, _| {
        cfg.mesh.enabled = false;
        // Patches would make 1.1.0 smaller still; this test is about chunks.
        cfg.download.patches = false;
    })
    .await;
    let m = a.agent().metrics();
    run_ok(&c, ID, "1.0.0", &[]).await;
    assert_eq!(a.server_bytes(), v1.len() as u64);
    assert_eq!(m.fetched_from("local"), 0);

    // 1.1.0: every chunk it shares with 1.0.0 is copied locally, the rest fetched.
    push(&c, "1.1.0", &v2, "cdc").await;
    let expected_local = shared_bytes(&m2, &hashes(&m1));
    assert!(
        expected_local > v2.len() as u64 * 9 / 10,
        "the edits leave most chunks alike ({expected_local} of {} bytes)",
        v2.len()
    );
    let before = a.server_bytes();
    run_ok(&c, ID, "1.1.0", &[]).await;
    assert_eq!(m.fetched_from("local"), expected_local);
    assert_eq!(
        a.server_bytes() - before,
        v2.len() as u64 - expected_local,
        "the coordinator sent only the chunks the agent did not hold"
    );
    let cached = |data: &[u8]| {
        std::fs::read(
            a.plugin_dir()
                .join("downloaded")
                .join(ContentId::of_bytes(data).to_hex()),
        )
        .unwrap()
    };
    assert_eq!(cached(&v2), v2);

    // Fixed-size chunks of a shifted version share nothing with what is held.
    let fixed = push(&c, "1.2.0", &v3, "fixed").await;
    assert_eq!(fixed["chunk_size"], 64 * 1024);
    assert!(fixed.get("cdc").is_none());
    let (local, server) = (m.fetched_from("local"), a.server_bytes());
    run_ok(&c, ID, "1.2.0", &[]).await;
    assert_eq!(m.fetched_from("local"), local);
    assert_eq!(a.server_bytes() - server, v3.len() as u64);

    // A held chunk altered on disk (in both 1.0.0 and 1.1.0, which share it) fails
    // BLAKE3 when copied: it is fetched, the job runs the exact bytes of 1.3.0.
    let at = 1_000_000usize;
    let chunk = (0..m1.chunk_count())
        .find(|&i| m1.chunk_range(i).unwrap().contains(&(at as u64)))
        .unwrap();
    let altered = *m1.chunk_hash(chunk).unwrap();
    assert!(
        hashes(&m4).contains(&altered),
        "1.3.0 needs the altered chunk"
    );
    for (data, offset) in [(&v1, at), (&v2, at + 1500)] {
        let file = a
            .plugin_dir()
            .join("downloaded")
            .join(ContentId::of_bytes(data).to_hex());
        let mut bytes = std::fs::read(&file).unwrap();
        assert_eq!(bytes[offset], data[offset]);
        bytes[offset] ^= 0xff;
        std::fs::write(&file, &bytes).unwrap();
    }
    push(&c, "1.3.0", &v4, "cdc").await;
    let mut usable = hashes(&m1);
    usable.extend(hashes(&m2));
    usable.remove(&altered);
    let expected_local = shared_bytes(&m4, &usable);
    let (local, server) = (m.fetched_from("local"), a.server_bytes());
    run_ok(&c, ID, "1.3.0", &[]).await;
    assert_eq!(m.fetched_from("local") - local, expected_local);
    assert_eq!(a.server_bytes() - server, v4.len() as u64 - expected_local);
    assert_eq!(cached(&v4), v4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_chunking_values_are_refused() {
    let c = TestCoordinator::start(|_| {}).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("plugin");
    std::fs::write(&file, base()).unwrap();
    for (chunking, says) in [
        ("cdc:1000", "power of two"),
        ("cdc:128MiB", "exceeds the limit"),
        ("rabin", "use fixed, cdc or cdc:AVG"),
        ("cdc:lots", "not a size"),
    ] {
        let out = push_file(&c, &file, "1.0.0", chunking, false).await;
        let err = stderr_failed(&out);
        assert!(err.contains(says), "--chunking {chunking}: {err}");
    }
    // Nothing was stored, and `cdc:64KiB` works.
    let out = push_file(&c, &file, "1.0.0", "cdc:64KiB", true).await;
    let pushed: serde_json::Value = serde_json::from_str(&stdout_ok(&out)).unwrap();
    assert_eq!(
        pushed["cdc"],
        serde_json::json!({"min": 16384, "avg": 65536, "max": 262144})
    );
}

/// Content-defined chunks travel over the mesh like fixed ones: with the coordinator
/// refusing every chunk to the second agent, it gets the whole plugin from the first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_serve_content_defined_chunks() {
    use std::sync::atomic::Ordering;
    use std::time::Duration;

    use arcade_p2p::settings::Seconds;
    use arcade_proto::v1 as pb;
    use arcade_tests::proxy::AgentProxy;

    let c = TestCoordinator::start(|cfg| {
        cfg.jobs.heartbeat_interval = Seconds(Duration::from_millis(300));
    })
    .await;
    let data = base();
    let header = pb::PushPluginHeader {
        cdc: Some(arcade_p2p::manifest::cdc_to_proto(&CdcParams::DEFAULT)),
        ..Default::default()
    };
    c.push(ID, "1.0.0", &data, header).await.unwrap();
    let sha = ContentId::of_bytes(&data).to_hex();
    let agent = |url: String, who: &'static str| async move {
        TestAgent::start(&url, ENROLL, who, |cfg, _| {
            cfg.labels.insert("name".into(), who.into());
        })
        .await
    };
    let run_on = |who: &'static str| {
        let c = &c;
        async move { run_ok(c, ID, "1.0.0", &[("name", who)]).await }
    };
    let seed = agent(c.url.clone(), "seed").await;
    run_on("seed").await;
    assert_eq!(seed.server_bytes(), data.len() as u64);
    arcade_tests::wait_holder(&c, "seed", &sha).await;

    let proxy = AgentProxy::start(&c.url).await;
    proxy.tamper.refuse_downloads.store(true, Ordering::SeqCst);
    let b = agent(proxy.url.clone(), "b").await;
    run_on("b").await;
    assert_eq!(b.server_bytes(), 0);
    assert_eq!(b.agent().metrics().fetched_from("peer"), data.len() as u64);
    let cached = std::fs::read(b.plugin_dir().join("downloaded").join(&sha)).unwrap();
    assert_eq!(cached, data);
}
