use std::path::Path;
use std::time::{Duration, Instant};

use super::*;
use crate::scenario::{Churn, PluginSpec};

const MIB: u64 = 1 << 20;

/// `n` agents, one plugin of `size_mib` MiB in 256 KiB chunks.
fn small(n: usize, size_mib: u64) -> Scenario {
    let mut s = Scenario::uniform(n, size_mib, 20.0, 10.0);
    s.name = "small".into();
    s.chunk_kib = 256;
    s
}

fn detailed(s: &Scenario) -> ModelRun {
    run_detailed(s, &ModelOptions::default()).expect("model run")
}

fn assert_all_complete(r: &FleetReport) {
    assert_eq!(r.failed, 0, "{}", r.table());
    assert_eq!(r.completed + r.left, r.agents, "{}", r.table());
    assert!(r.verified, "{}", r.table());
    for a in r.per_agent.iter().filter(|a| a.t_s.is_some()) {
        assert!(a.verified, "{a:?}");
        assert_eq!(a.peer_bytes + a.server_bytes, r.size_bytes, "{a:?}");
    }
}

#[test]
fn every_agent_completes_and_the_mesh_saves_coordinator_egress() {
    let s = small(8, 4);
    let m = detailed(&s);
    let r = &m.report;
    assert_eq!(r.engine, "model");
    assert_eq!(r.completed, 8, "{}", r.table());
    assert_all_complete(r);
    let n_s = 8 * s.total_bytes();
    assert!(
        r.server_egress_bytes < n_s,
        "egress {} ≥ N×S {n_s}\n{}",
        r.server_egress_bytes,
        r.table()
    );
    assert!(r.peer_bytes > 0, "{}", r.table());
    // Bytes received from the coordinator never exceed what it sent.
    let from_server: u64 = r.per_agent.iter().map(|a| a.server_bytes).sum();
    assert!(from_server <= r.server_egress_bytes);
    // What peers received was uploaded by someone.
    let uploaded: u64 = r.per_agent.iter().map(|a| a.uploaded_bytes).sum();
    assert!(uploaded >= r.peer_bytes);
    assert!(!m.stats.capped);
    assert!(r.t_all_over_t_min >= 1.0, "{}", r.table());
    // The sources agree with the byte counts.
    for (a, per_plugin) in m.sources.iter().enumerate() {
        let from_peers = per_plugin[0]
            .iter()
            .filter(|s| matches!(s, ChunkSource::Peer(b) if *b != a))
            .count() as u64;
        assert_eq!(from_peers * s.chunk_bytes(), r.per_agent[a].peer_bytes);
    }
}

#[test]
fn mesh_off_sends_everything_from_the_coordinator() {
    let mut s = small(4, 2);
    s.p2p = false;
    let m = detailed(&s);
    let r = &m.report;
    assert_all_complete(r);
    assert_eq!(r.completed, 4);
    assert_eq!(r.server_egress_bytes, 4 * s.total_bytes(), "{}", r.table());
    assert_eq!(r.peer_bytes, 0);
    assert!(
        m.sources
            .iter()
            .flatten()
            .flatten()
            .all(|c| *c == ChunkSource::Server)
    );
    assert_eq!(m.stats.redirects, 0);
    assert_eq!(m.stats.peer_requests, 0);
}

#[test]
fn same_seed_same_run() {
    let mut s = small(6, 3);
    s.churn = Churn {
        leave_fraction: 1.0 / 6.0,
        leave_after_s: 0.2,
        late_fraction: 1.0 / 6.0,
        late_after_s: 0.4,
    };
    let strip = |mut r: FleetReport| {
        r.wall_s = 0.0;
        r.cpu_s_per_gib = 0.0;
        serde_json::to_string(&r).expect("json")
    };
    let a = detailed(&s);
    let b = detailed(&s);
    assert_eq!(a.sources, b.sources);
    assert_eq!(a.stats, b.stats);
    assert_eq!(strip(a.report), strip(b.report));
    // Another seed is another run (different hints and scheduler draws).
    s.seed = 2;
    let c = detailed(&s);
    assert!(c.sources != b.sources || c.stats != b.stats);
}

#[test]
fn a_late_joiner_gets_everything_from_the_first_agent() {
    let mut s = small(2, 1);
    s.churn = Churn {
        late_fraction: 0.5,
        late_after_s: 5.0,
        ..Churn::default()
    };
    let m = detailed(&s);
    let r = &m.report;
    assert_all_complete(r);
    let first = r.per_agent[0].t_s.expect("agent-0000 completes");
    assert!(
        first < 5.0,
        "agent-0000 finished before the late joiner: {first}"
    );
    assert!(r.per_agent[1].t_s.expect("agent-0001 completes") > 5.0);
    assert!(
        m.sources[0][0].iter().all(|c| *c == ChunkSource::Server),
        "{:?}",
        m.sources[0]
    );
    assert!(
        m.sources[1][0].iter().all(|c| *c == ChunkSource::Peer(0)),
        "{:?}",
        m.sources[1]
    );
    assert_eq!(r.server_egress_bytes, s.total_bytes(), "{}", r.table());
    assert_eq!(r.per_agent[0].uploaded_bytes, s.total_bytes());
    assert_eq!(r.per_agent[1].peer_bytes, s.total_bytes());
}

#[test]
fn leavers_do_not_stop_the_others() {
    let mut s = small(8, 4);
    s.churn = Churn {
        leave_fraction: 0.25,
        leave_after_s: 0.3,
        ..Churn::default()
    };
    let m = detailed(&s);
    let r = &m.report;
    assert_eq!(r.left, 2, "{}", r.table());
    assert_eq!(r.completed, 6, "{}", r.table());
    assert_all_complete(r);
    for a in &r.per_agent[6..] {
        assert!(a.left && a.t_s.is_none(), "{a:?}");
    }
}

#[test]
fn several_plugins_with_a_fetch_limit_all_complete() {
    let mut s = small(5, 1);
    s.plugins = vec![
        PluginSpec { size_mib: 1 },
        PluginSpec { size_mib: 2 },
        PluginSpec { size_mib: 1 },
        PluginSpec { size_mib: 1 },
    ];
    let m = detailed(&s);
    assert_all_complete(&m.report);
    assert_eq!(m.report.completed, 5);
    assert_eq!(m.report.size_bytes, 5 * MIB);
    for per_plugin in &m.sources {
        assert_eq!(per_plugin.len(), 4);
        assert_eq!(per_plugin[1].len(), 8);
        assert!(
            per_plugin
                .iter()
                .flatten()
                .all(|c| *c != ChunkSource::Missing)
        );
    }
}

#[test]
fn a_run_that_cannot_finish_stops_and_reports_failures() {
    let s = small(4, 4);
    let opts = ModelOptions {
        max_sim_time: Some(Duration::from_millis(100)),
        ..ModelOptions::default()
    };
    let m = run_detailed(&s, &opts).expect("model run");
    assert!(m.stats.capped);
    assert_eq!(m.report.failed, 4, "{}", m.report.table());
    assert!(m.report.per_agent.iter().all(|a| a.failed && !a.verified));
}

/// Figures for the model's fleets: `cargo test --release -p arcade-simulations model --
/// --ignored --nocapture` (N = 8, 64, 1000 and `scenarios/model-10k.toml`).
#[test]
#[ignore = "release-build figures; run explicitly"]
fn figures() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios/model-10k.toml");
    let big = Scenario::load(&path).expect("model-10k.toml");
    let only: Option<usize> = std::env::var("MODEL_N").ok().and_then(|v| v.parse().ok());
    for n in [8, 64, 1000, 10_000] {
        if only.is_some_and(|o| o != n) {
            continue;
        }
        let mut s = big.clone();
        s.agents = n;
        if n != 10_000 {
            s.name = format!("model-{n}");
        }
        let started = Instant::now();
        let m = run_detailed(&s, &ModelOptions::default()).expect("model run");
        let wall = started.elapsed().as_secs_f64();
        let r = &m.report;
        println!("{}", r.table());
        println!(
            "N={n} wall {wall:.2} s · t_all/t_min {:.3} · server_egress_ratio {:.3} · {:?}\n",
            r.t_all_over_t_min, r.server_egress_ratio, m.stats
        );
        assert_eq!(r.failed, 0);
        assert!(r.verified);
    }
}

#[test]
#[ignore = "scratch"]
fn scratch() {
    let env = |k: &str| std::env::var(k).ok();
    let mut s = match env("S") {
        Some(p) => Scenario::load(Path::new(&p)).unwrap(),
        None => Scenario::uniform(16, 64, 20.0, 20.0),
    };
    if let Some(n) = env("N") {
        s.agents = n.parse().unwrap();
    }
    if let Some(n) = env("CHUNK") {
        s.chunk_kib = n.parse().unwrap();
    }
    if env("OFF").is_some() {
        s.p2p = false;
    }
    let mut o = ModelOptions::default();
    if let Some(n) = env("UPLOADS") {
        o.max_uploads = n.parse().unwrap();
    }
    if let Some(n) = env("STREAMS") {
        o.max_streams = n.parse().unwrap();
    }
    if let Some(n) = env("REDIRECTS") {
        o.max_redirects = n.parse().unwrap();
    }
    if let Some(n) = env("PEERS") {
        o.peers_per_agent = n.parse().unwrap();
    }
    if let Some(n) = env("RETRY_MS") {
        o.peer_busy = PeerBusy::Retry(Duration::from_millis(n.parse().unwrap()));
    }
    if let Some(n) = env("RPC_US") {
        o.server_rpc_cost = Duration::from_micros(n.parse().unwrap());
    }
    if env("PROGRESS").is_some() {
        o.progress = true;
    }
    if let Some(n) = env("WALL") {
        o.max_wall = Some(Duration::from_secs(n.parse().unwrap()));
    }
    if let Some(n) = env("MAXT") {
        o.max_sim_time = Some(Duration::from_secs(n.parse().unwrap()));
    }
    let t = Instant::now();
    let m = run_detailed(&s, &o).unwrap();
    println!(
        "{}\nwall {:.2}\n{:?}",
        m.report.table(),
        t.elapsed().as_secs_f64(),
        m.stats
    );
}
