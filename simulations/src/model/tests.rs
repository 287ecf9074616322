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

/// Figures for the model's fleets with the real defaults: `cargo test --release -p
/// arcade-simulations --lib model::tests::figures -- --ignored --nocapture` runs
/// `scenarios/model-10k.toml` at N = 8, 64, 1000 and 10,000 (`MODEL_N=64` for one).
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
            "N={n} wall {wall:.2} s · t_all/t_min {:.3} · server_egress_ratio {:.3}\n{:?}\n",
            r.t_all_over_t_min, r.server_egress_ratio, m.stats
        );
    }
}

/// One run with knobs from the environment, for studies: `S=path.toml` (default: 16
/// agents × 64 MiB at 20/20 MiB/s), `N`, `CHUNK` (KiB), `OFF` (mesh off), `UPLOADS`,
/// `STREAMS`, `REDIRECTS`, `PEERS`, `RETRY_MS` ([`PeerBusy::Retry`]), `RPC_US`, `MAXT`
/// (simulated s), `WALL` (s), `PROGRESS`. `cargo test --release -p arcade-simulations
/// --lib model::tests::explore -- --ignored --nocapture`.
#[test]
#[ignore = "a study tool; run explicitly"]
fn explore() {
    let env = |k: &str| std::env::var(k).ok();
    let num = |k: &str| env(k).map(|v| v.parse::<u64>().expect("a number"));
    let mut s = match env("S") {
        Some(p) => Scenario::load(Path::new(&p)).expect("scenario"),
        None => Scenario::uniform(16, 64, 20.0, 20.0),
    };
    let mut o = ModelOptions::default();
    if let Some(n) = num("N") {
        s.agents = n as usize;
    }
    if let Some(n) = num("CHUNK") {
        s.chunk_kib = n;
    }
    if env("OFF").is_some() {
        s.p2p = false;
    }
    if let Some(n) = num("UPLOADS") {
        o.max_uploads = n as usize;
    }
    if let Some(n) = num("STREAMS") {
        o.max_streams = n as usize;
    }
    if let Some(n) = num("REDIRECTS") {
        o.max_redirects = n as u32;
    }
    if let Some(n) = num("PEERS") {
        o.peers_per_agent = n as usize;
    }
    if let Some(n) = num("RETRY_MS") {
        o.peer_busy = PeerBusy::Retry(Duration::from_millis(n));
    }
    if let Some(n) = num("RPC_US") {
        o.server_rpc_cost = Duration::from_micros(n);
    }
    if let Some(n) = num("MAXT") {
        o.max_sim_time = Some(Duration::from_secs(n));
    }
    if let Some(n) = num("WALL") {
        o.max_wall = Some(Duration::from_secs(n));
    }
    o.progress = env("PROGRESS").is_some();
    let t = Instant::now();
    let m = run_detailed(&s, &o).expect("model run");
    println!(
        "{}wall {:.2} s\n{:?}",
        m.report.table(),
        t.elapsed().as_secs_f64(),
        m.stats
    );
}

/// A fleet the real stack runs near its bound (`arcade-sim swarm --agents 16 --size-mib
/// 64 --server-up-mibps 20 --peer-up-mibps 20`: 1.65 × the bound, egress 1.16 × S on
/// this machine), modelled with the real-stack engine's settings: the model lands in the
/// same range.
#[test]
fn agrees_with_the_real_stack_on_a_small_fleet() {
    let s = Scenario::uniform(16, 64, 20.0, 20.0);
    let m = run_detailed(&s, &ModelOptions::like_swarm_engine(&s)).expect("model run");
    let r = &m.report;
    assert_all_complete(r);
    assert!(r.server_egress_ratio < 1.5, "{}", r.table());
    assert!((1.0..2.5).contains(&r.t_all_over_t_min), "{}", r.table());
}

#[test]
fn retrying_busy_peers_never_strikes_them() {
    let s = small(8, 4);
    let opts = ModelOptions {
        max_uploads: 1,
        peer_busy: PeerBusy::Retry(Duration::from_millis(20)),
        ..ModelOptions::default()
    };
    let m = run_detailed(&s, &opts).expect("model run");
    assert_all_complete(&m.report);
    assert_eq!(m.report.completed, 8);
    assert!(m.stats.peer_busy > 0, "{:?}", m.stats);
    assert_eq!(m.stats.bans, 0, "{:?}", m.stats);
}

/// The slow-peers scenario's mechanism (`agent::fetch::first_copy_delay`): agents whose
/// uplink is slow ask the coordinator later, so the first copies of every chunk go to
/// agents that can pass them on, and the slow ones fetch everything from peers. Before
/// the rule a quarter of the chunks had one holder at 0.25 MiB/s.
#[test]
fn slow_uplinks_leave_the_first_copies_to_fast_agents() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios/slow-peers.toml");
    let s = Scenario::load(&path).expect("slow-peers scenario");
    let m = detailed(&s);
    let r = &m.report;
    assert_all_complete(r);
    assert_eq!(r.completed, s.agents);
    let plans = s.plan();
    let slow: Vec<usize> = (0..s.agents)
        .filter(|&a| plans[a].link.up_mibps < 1.0)
        .collect();
    assert_eq!(slow.len(), s.agents / 4);
    for &a in &slow {
        assert_eq!(
            r.per_agent[a].server_bytes,
            0,
            "slow agent {a} took first copies from the coordinator\n{}",
            r.table()
        );
    }
    assert!(r.server_egress_ratio <= 1.05, "{}", r.table());
}
