//! Agents fetch plugin chunks from each other: once one agent holds a plugin, others
//! get it from that peer even when the coordinator refuses to serve chunks; a peer
//! serving corrupted chunks is detected and banned, and the fetch still completes.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use arcade_agent::metrics::SourceLabel;
use arcade_p2p::labels::Labels;
use arcade_p2p::mesh::bitfield::Bitfield;
use arcade_p2p::mesh::host::{ChunkStore, HostConfig, MeshHost};
use arcade_p2p::settings::Seconds;
use arcade_p2p::{ContentId, Manifest};
use arcade_proto::v1 as pb;
use arcade_tests::agents::TestAgent;
use arcade_tests::proxy::AgentProxy;
use arcade_tests::{ENROLL, TestCoordinator, content, create_job, eventually, wait_job};

const CS: u32 = 64 * 1024;

fn plugin(bytes: usize, seed: u8) -> Vec<u8> {
    let mut p = b"#!/bin/sh\nexit 0\n".to_vec();
    p.extend(content(bytes, seed));
    p
}

fn coordinator_tweaks(cfg: &mut arcade_coordinator::CoordinatorConfig) {
    cfg.jobs.heartbeat_interval = Seconds(Duration::from_millis(300));
    cfg.jobs.lease_ttl = Seconds(Duration::from_secs(5));
}

async fn run_job_on(c: &TestCoordinator, plugin: &str, who: &str) -> pb::JobDetail {
    let id = create_job(c, plugin, "1.0.0", "true", &[("name", who)]).await;
    wait_job(c, &id).await
}

async fn agent(url: &str, who: &str) -> TestAgent {
    TestAgent::start(url, ENROLL, who, |cfg, _| {
        cfg.labels.insert("name".into(), who.into());
    })
    .await
}

async fn wait_holder(c: &TestCoordinator, agent: &str, sha: &str) {
    arcade_tests::wait_holder(c, agent, sha).await;
}

fn peer_bytes(a: &TestAgent) -> u64 {
    a.agent().metrics().fetched_from("peer")
}

fn cached(a: &TestAgent, data: &[u8]) -> Vec<u8> {
    std::fs::read(
        a.plugin_dir()
            .join("downloaded")
            .join(ContentId::of_bytes(data).to_hex()),
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_serve_the_plugin_when_the_coordinator_refuses_chunks() {
    let c = TestCoordinator::start(coordinator_tweaks).await;
    let data = plugin(2 << 20, 5); // 33 chunks of 64 KiB
    c.push("mesh/tool", "1.0.0", &data, Default::default())
        .await
        .unwrap();
    let sha = ContentId::of_bytes(&data).to_hex();

    let seed = agent(&c.url, "seed").await;
    let job = run_job_on(&c, "mesh/tool", "seed").await;
    assert_eq!(
        job.status(),
        pb::JobStatus::Succeeded,
        "{}",
        job.error_message
    );
    assert_eq!(
        seed.server_bytes(),
        data.len() as u64,
        "the first agent fetched from the coordinator"
    );
    wait_holder(&c, "seed", &sha).await;

    // From now on the coordinator refuses every chunk to the others.
    let proxy = AgentProxy::start(&c.url).await;
    proxy.tamper.refuse_downloads.store(true, Ordering::SeqCst);
    let b = agent(&proxy.url, "b").await;
    let job = run_job_on(&c, "mesh/tool", "b").await;
    assert_eq!(
        job.status(),
        pb::JobStatus::Succeeded,
        "{}",
        job.error_message
    );
    assert_eq!(b.server_bytes(), 0, "b got nothing from the coordinator");
    assert_eq!(peer_bytes(&b), data.len() as u64);
    assert_eq!(cached(&b, &data), data);

    wait_holder(&c, "b", &sha).await;
    let cc = agent(&proxy.url, "c").await;
    let job = run_job_on(&c, "mesh/tool", "c").await;
    assert_eq!(
        job.status(),
        pb::JobStatus::Succeeded,
        "{}",
        job.error_message
    );
    assert_eq!(cc.server_bytes(), 0);
    assert_eq!(peer_bytes(&cc), data.len() as u64);
    assert_eq!(cached(&cc, &data), data);
    assert_eq!(proxy.tamper.relayed_bytes.load(Ordering::SeqCst), 0);
    // The holders account for what they uploaded (synced at heartbeats).
    let uploaded = eventually(Duration::from_secs(10), || async {
        let total =
            seed.agent().metrics().uploaded_bytes.get() + b.agent().metrics().uploaded_bytes.get();
        (total >= 2 * data.len() as u64).then_some(total)
    })
    .await;
    assert!(
        uploaded.is_some(),
        "seed and b uploaded what b and c fetched"
    );
    assert!(seed.agent().metrics().connected_peers.get() >= 1);
}

/// A hostile peer that claims every chunk and then serves garbage, or nothing.
struct Liar {
    chunks: u32,
    garbage: bool,
}

impl ChunkStore for Liar {
    fn allowed_labels(&self, _: &ContentId) -> Option<Labels> {
        Some(Labels::new())
    }
    fn held(&self, _: &ContentId) -> Option<Bitfield> {
        Some(Bitfield::full(self.chunks))
    }
    fn read_chunk(&self, _: &ContentId, _: u32) -> std::io::Result<Option<bytes::Bytes>> {
        Ok(self
            .garbage
            .then(|| bytes::Bytes::from(vec![0xAA; CS as usize])))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_serving_corrupted_chunks_is_banned_and_the_fetch_completes() {
    hostile_peer_is_banned(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_claiming_chunks_it_lacks_is_banned_and_the_fetch_completes() {
    hostile_peer_is_banned(false).await;
}

async fn hostile_peer_is_banned(garbage: bool) {
    let c = TestCoordinator::start(coordinator_tweaks).await;
    let data = plugin(2 << 20, 6);
    c.push("mesh/tool", "1.0.0", &data, Default::default())
        .await
        .unwrap();
    let manifest = Manifest::from_reader(&data[..], CS).unwrap();
    let sha = manifest.content_id().to_hex();
    let seed = agent(&c.url, "seed").await;
    assert_eq!(
        run_job_on(&c, "mesh/tool", "seed").await.status(),
        pb::JobStatus::Succeeded
    );
    wait_holder(&c, "seed", &sha).await;

    // A hostile but enrolled peer that claims the plugin.
    let liar = MeshHost::start(
        arcade_simulations::client::agent_key("liar"),
        HostConfig::default(),
        Arc::new(Liar {
            chunks: manifest.chunk_count(),
            garbage,
        }),
    )
    .await
    .unwrap();
    let addrs: Vec<String> = liar
        .listen_addrs()
        .await
        .iter()
        .map(ToString::to_string)
        .collect();
    let reg = c
        .agent(ENROLL)
        .await
        .register(arcade_simulations::client::signed(pb::RegisterRequest {
            agent_id: "liar".into(),
            peer_id: liar.peer_id().to_string(),
            addrs,
            installed_plugins: vec![pb::InstalledPlugin {
                plugin_id: "mesh/tool".into(),
                version: "1.0.0".into(),
                sha256: sha.clone(),
            }],
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner();
    liar.set_credentials(reg.mesh_ticket, &reg.mesh_public_key)
        .await
        .unwrap();
    let liar_client = c.agent(&reg.agent_token).await;
    let keepalive = tokio::spawn(async move {
        let mut client = liar_client;
        loop {
            let _ = client.heartbeat(pb::HeartbeatRequest::default()).await;
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    wait_holder(&c, "liar", &sha).await;

    let d = agent(&c.url, "d").await;
    let job = run_job_on(&c, "mesh/tool", "d").await;
    keepalive.abort();
    assert_eq!(
        job.status(),
        pb::JobStatus::Succeeded,
        "{}",
        job.error_message
    );
    assert_eq!(cached(&d, &data), data, "SHA-256 intact");
    let metrics = d.agent().metrics();
    let bad = metrics
        .bad_chunks
        .get_or_create(&SourceLabel {
            source: "peer".into(),
        })
        .get();
    if garbage {
        assert!(bad >= 1, "the liar's chunks were caught");
    } else {
        assert_eq!(bad, 0, "refusals are failures, not bad chunks");
    }
    assert_eq!(metrics.peer_bans.get(), 1, "the liar was banned once");
    assert!(peer_bytes(&d) > 0, "the honest seed served chunks");
    drop(seed);
}
