//! zstd on `DownloadPlugin`, end to end: a real coordinator and agents over gRPC on
//! loopback. An agent that asks gets compressible chunks compressed (fewer bytes on the
//! wire, the same verified plugin); an agent that does not ask (as an older agent)
//! gets raw chunks and the same plugin; incompressible content goes raw.

use arcade_p2p::settings::Seconds;
use arcade_tests::agents::TestAgent;
use arcade_tests::{ENROLL, TestCoordinator, content, run_ok};

/// A 1 MiB shell script that exits 0, padded with text (compresses well).
fn script() -> Vec<u8> {
    let mut s = b"#!/bin/sh\nexit 0\n".to_vec();
    while s.len() < 1 << 20 {
        s.extend_from_slice(b"# a comment line such as executables and archives are full of\n");
    }
    s.truncate(1 << 20);
    s
}

async fn run_on(c: &TestCoordinator, agent: &str, plugin: &str) {
    run_ok(c, plugin, "1.0.0", &[("host", agent)]).await;
}

async fn agent(c: &TestCoordinator, id: &str, compression: bool) -> TestAgent {
    TestAgent::start(&c.url, ENROLL, id, |cfg, _| {
        cfg.labels = [("host".to_owned(), id.to_owned())].into();
        cfg.mesh.enabled = false;
        cfg.download.compression = compression;
        cfg.jobs.poll_wait = Seconds::secs(1);
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compressible_plugins_travel_compressed_to_agents_that_ask() {
    let c = TestCoordinator::start(|_| {}).await;
    let text = script();
    c.push("zstd/text", "1.0.0", &text, Default::default())
        .await
        .unwrap();
    let mut noise = b"#!/bin/sh\nexit 0\n#".to_vec();
    noise.extend(content(1 << 20, 7));
    c.push("zstd/noise", "1.0.0", &noise, Default::default())
        .await
        .unwrap();

    let new = agent(&c, "new", true).await;
    run_on(&c, "new", "zstd/text").await;
    assert_eq!(new.server_bytes(), text.len() as u64, "raw bytes verified");
    let (wire, raw) = new.agent().metrics().compressed("from_server");
    assert_eq!(raw, text.len() as u64);
    assert!(wire * 10 < raw, "{wire} bytes on the wire for {raw}");
    let saved = c
        .running
        .as_ref()
        .unwrap()
        .metrics()
        .compression_saved_bytes
        .get();
    assert_eq!(saved, raw - wire);

    // Incompressible content is sent raw.
    run_on(&c, "new", "zstd/noise").await;
    assert_eq!(new.agent().metrics().compressed("from_server").1, raw);

    // An agent that does not ask gets raw chunks, and the same plugin.
    let old = agent(&c, "old", false).await;
    run_on(&c, "old", "zstd/text").await;
    assert_eq!(old.server_bytes(), text.len() as u64);
    assert_eq!(old.agent().metrics().compressed("from_server"), (0, 0));
}
