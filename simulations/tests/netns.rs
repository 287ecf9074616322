//! The real engine's network-namespace mode: links shaped by the kernel, agents in
//! their own namespaces. These tests make namespaces, so they need root; without it
//! they say so and do nothing (CI runs them as root).

use std::time::Instant;

use arcade_simulations::netns::{self, Namespaces};
use arcade_simulations::scenario::{Link, Network, Scenario};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn root() -> bool {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let root = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().nth(1))
        == Some("0");
    if !root {
        eprintln!("skipped: network namespaces need root");
    }
    root
}

fn link(up_mibps: f64) -> Link {
    Link {
        up_mibps,
        down_mibps: 0.0,
        latency_ms: 0.0,
    }
}

/// An agent's socket lives in its namespace (the hub sees the agent's address) and its
/// upload is held to the link's rate by `tc tbf`, with no limiter of ours involved.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_kernel_shapes_an_agents_upload_in_its_namespace() {
    if !root() {
        return;
    }
    let ns = tokio::task::spawn_blocking(|| Namespaces::create(&link(0.0), &[link(2.0)]))
        .await
        .unwrap()
        .expect("namespaces");
    let hub = netns::runtime_in(&ns.hub(), 1).unwrap();
    let agent = netns::runtime_in(&ns.agent(0), 1).unwrap();

    let listener = hub
        .spawn(tokio::net::TcpListener::bind((netns::HUB_IP, 0)))
        .await
        .unwrap()
        .expect("bind in the hub");
    let addr = listener.local_addr().unwrap();
    let server = hub.spawn(async move {
        let (mut s, peer) = listener.accept().await.unwrap();
        let mut got = Vec::new();
        s.read_to_end(&mut got).await.unwrap();
        (peer, got.len())
    });
    const BYTES: usize = 3 << 20;
    let started = Instant::now();
    agent
        .spawn(async move {
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            s.write_all(&vec![7u8; BYTES]).await.unwrap();
            s.shutdown().await.unwrap();
        })
        .await
        .unwrap();
    let (peer, got) = server.await.unwrap();
    let took = started.elapsed().as_secs_f64();
    assert_eq!(got, BYTES);
    assert_eq!(peer.ip(), netns::agent_ip(0), "the socket was the agent's");
    // 3 MiB at 2 MiB/s with a 100 KiB bucket: about 1.45 s however fast the machine.
    assert!(took >= 1.2, "3 MiB crossed a 2 MiB/s link in {took:.2} s");
    hub.shutdown_background();
    agent.shutdown_background();
    let names = [ns.hub(), ns.agent(0)];
    tokio::task::spawn_blocking(move || drop(ns)).await.unwrap();
    for name in names {
        let path = format!("/var/run/netns/{name}");
        assert!(!std::path::Path::new(&path).exists(), "{path} left behind");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_in_namespaces_completes_verified_through_the_mesh() {
    if !root() {
        return;
    }
    let mut s = Scenario::uniform(4, 4, 16.0, 16.0);
    s.chunk_kib = 256;
    s.network = Network::Netns;
    s.agent.down_mibps = 32.0;
    let r = arcade_simulations::swarm::run(&s).await.expect("run");
    assert_eq!(r.network, "netns");
    assert_eq!(r.failed, 0, "{}", r.table());
    assert_eq!(r.completed, 4, "{}", r.table());
    assert!(r.verified, "{}", r.table());
    assert!(
        r.peer_bytes > 0,
        "chunks went agent to agent: {}",
        r.table()
    );
    assert!(r.server_egress_bytes < 4 * s.total_bytes(), "{}", r.table());
}
