//! An agent serves the chunks of plugins it holds to peers the coordinator vouched
//! for — and only to them, and only what their labels allow — over real libp2p swarms
//! on loopback.

use std::time::Duration;

use arcade_p2p::mesh::host::{MeshError, Multiaddr};
use arcade_p2p::{ContentId, Manifest};
use arcade_proto::v1 as pb;
use arcade_simulations::client::signed;
use arcade_tests::agents::TestAgent;
use arcade_tests::peers::{bare_peer, bare_peer_as, mesh_address};
use arcade_tests::{ADMIN, ENROLL, TestCoordinator, content, create_job, eventually, wait_job};

fn plugin(bytes: usize, seed: u8) -> Vec<u8> {
    let mut p = b"#!/bin/sh\nexit 0\n".to_vec();
    p.extend(content(bytes, seed));
    p
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_serves_vouched_peers_what_their_labels_allow() {
    let c = TestCoordinator::start(|_| {}).await;
    let open = plugin(300_000, 1);
    let secret = plugin(100_000, 2);
    c.push("mesh/open", "1.0.0", &open, Default::default())
        .await
        .unwrap();
    c.push(
        "mesh/secret",
        "1.0.0",
        &secret,
        pb::PushPluginHeader {
            allowed_labels: vec![pb::Label {
                key: "team".into(),
                value: "red".into(),
            }],
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let red = c.grant(&[("team", "red")]).await.unwrap();
    let _a = TestAgent::start(&c.url, &red, "holder", |cfg, _| {
        cfg.labels.insert("team".into(), "red".into());
        cfg.mesh.dht = true;
    })
    .await;
    for p in ["mesh/open", "mesh/secret"] {
        let id = create_job(&c, p, "1.0.0", "true", &[]).await;
        let job = wait_job(&c, &id).await;
        assert_eq!(
            job.status(),
            pb::JobStatus::Succeeded,
            "the holder ran the job: {}",
            job.error_message
        );
    }
    // Where the holder is, as the coordinator tells agents.
    let holder = c
        .fleet(ADMIN)
        .await
        .list_agents(pb::ListAgentsRequest {})
        .await
        .unwrap()
        .into_inner()
        .agents
        .into_iter()
        .find(|a| a.agent_id == "holder")
        .unwrap();
    let holder_peer: libp2p_identity::PeerId = holder
        .peer_id
        .parse()
        .expect("agent registered its peer id");
    let holder_addrs: Vec<Multiaddr> = holder.addrs.iter().map(|a| a.parse().unwrap()).collect();
    assert!(!holder_addrs.is_empty(), "agent advertised its addresses");

    // A vouched peer (team=blue) registers and gets the open plugin from the holder.
    let blue = bare_peer_as("blue").await.unwrap();
    let blue_token = c.grant(&[("team", "blue")]).await.unwrap();
    let reg = c
        .agent(&blue_token)
        .await
        .register(signed(pb::RegisterRequest {
            agent_id: "blue".into(),
            peer_id: blue.peer_id().to_string(),
            labels: vec![pb::Label {
                key: "team".into(),
                value: "blue".into(),
            }],
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner();
    blue.set_credentials(reg.mesh_ticket, &reg.mesh_public_key)
        .await
        .unwrap();
    let manifest = Manifest::from_reader(&open[..], 64 * 1024).unwrap();
    let sha = manifest.content_id();
    let held = blue
        .held(
            holder_peer,
            holder_addrs.clone(),
            &sha,
            manifest.chunk_count(),
        )
        .await
        .unwrap();
    assert!(held.is_full(), "the holder has every chunk");
    let mut got = Vec::new();
    for i in 0..manifest.chunk_count() {
        let chunk = blue
            .chunk(holder_peer, holder_addrs.clone(), &sha, i)
            .await
            .unwrap();
        manifest
            .verify_chunk(i, &chunk)
            .expect("peer chunk verifies against the manifest");
        got.extend(chunk);
    }
    assert_eq!(got, open);
    // The holder announced the content in the DHT (`mesh.dht` on).
    let providers = eventually(Duration::from_secs(10), || async {
        let p = blue.providers(sha).await.ok()?;
        p.contains(&holder_peer).then_some(p)
    })
    .await;
    assert!(providers.is_some(), "DHT lists the holder as a provider");

    // Team blue may not have the red plugin, from the peer either.
    let secret_sha = ContentId::of_bytes(&secret);
    match blue
        .chunk(holder_peer, holder_addrs.clone(), &secret_sha, 0)
        .await
    {
        Err(MeshError::Refused { reason, .. }) => assert_eq!(reason, pb::Refusal::Forbidden),
        other => panic!("expected Forbidden, got {other:?}"),
    }
    // An outsider the coordinator never vouched for gets nothing.
    let outsider = bare_peer().await.unwrap();
    match outsider.chunk(holder_peer, holder_addrs, &sha, 0).await {
        Err(MeshError::Refused { reason, .. }) => assert_eq!(reason, pb::Refusal::NotVouched),
        other => panic!("expected NotVouched, got {other:?}"),
    }
}

/// What an agent held before any job asked for it — a plugin cached before a restart
/// and a builtin plugin — is served to vouched peers too, as the coordinator's hints
/// (it names every agent that holds a content) promise.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cached_and_builtin_plugins_are_served_after_a_restart() {
    let c = TestCoordinator::start(|_| {}).await;
    let cached = plugin(200_000, 7);
    let builtin = plugin(150_000, 8);
    c.push("mesh/cached", "1.0.0", &cached, Default::default())
        .await
        .unwrap();
    c.push("mesh/builtin", "1.0.0", &builtin, Default::default())
        .await
        .unwrap();
    let keep = tempfile::tempdir().unwrap();
    let data_dir = keep.path().join("holder");
    // First life: the plugin is fetched by a job and cached.
    let d = data_dir.clone();
    let mut first = TestAgent::start(&c.url, ENROLL, "holder", move |cfg, _| {
        cfg.data_dir = d;
    })
    .await;
    let id = create_job(&c, "mesh/cached", "1.0.0", "true", &[]).await;
    assert_eq!(wait_job(&c, &id).await.status(), pb::JobStatus::Succeeded);
    first.stop().await;
    // Second life, with a builtin too: no job runs.
    let (d, b) = (data_dir.clone(), builtin.clone());
    let mut second = TestAgent::start(&c.url, ENROLL, "holder", move |cfg, _| {
        let dir = d.join("plugins").join("builtin");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("mesh-builtin"), &b).unwrap();
        cfg.builtin.push(arcade_agent::config::BuiltinPlugin {
            plugin: "mesh/builtin@1.0.0".into(),
            file: "mesh-builtin".into(),
        });
        cfg.data_dir = d;
    })
    .await;
    let asker = bare_peer_as("asker").await.unwrap();
    let reg = c
        .agent(ENROLL)
        .await
        .register(signed(pb::RegisterRequest {
            agent_id: "asker".into(),
            peer_id: asker.peer_id().to_string(),
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner();
    asker
        .set_credentials(reg.mesh_ticket, &reg.mesh_public_key)
        .await
        .unwrap();
    for data in [&cached, &builtin] {
        let manifest = Manifest::from_reader(&data[..], 64 * 1024).unwrap();
        let sha = manifest.content_id();
        let served = eventually(Duration::from_secs(15), || {
            let (c, asker, manifest) = (&c, &asker, &manifest);
            async move {
                let (peer, addrs) = mesh_address(c, "holder").await.ok()?;
                let held = asker
                    .held(peer, addrs.clone(), &sha, manifest.chunk_count())
                    .await
                    .ok()?;
                if !held.is_full() {
                    return None;
                }
                let chunk = asker.chunk(peer, addrs, &sha, 0).await.ok()?;
                manifest.verify_chunk(0, &chunk).ok()
            }
        })
        .await;
        assert!(
            served.is_some(),
            "content {sha} held before any job asked is not served"
        );
    }
    second.stop().await;
    asker.shutdown().await;
}
