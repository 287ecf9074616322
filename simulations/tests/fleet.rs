//! Small fleet scenarios on both engines: correctness, never time. Every agent that
//! stays ends with the right SHA-256, the mesh keeps coordinator egress below N × S, and
//! the model and the real stack agree on where chunks came from in a fixed scenario.

use arcade_simulations::model::ModelOptions;
use arcade_simulations::report::FleetReport;
use arcade_simulations::scenario::Scenario;

fn small(agents: usize, size_mib: u64) -> Scenario {
    let mut s = Scenario::uniform(agents, size_mib, 16.0, 16.0);
    s.chunk_kib = 256;
    s
}

fn assert_all_verified(r: &FleetReport) {
    assert_eq!(r.failed, 0, "{}", r.table());
    assert!(
        r.verified,
        "every completed agent's SHA-256 checked: {}",
        r.table()
    );
    assert_eq!(r.completed + r.left, r.agents, "{}", r.table());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_fleet_with_the_mesh_sends_less_than_one_copy_per_agent() {
    let s = small(6, 4);
    let r = arcade_simulations::swarm::run(&s).await.expect("run");
    assert_all_verified(&r);
    assert_eq!(r.completed, 6);
    let n_s = 6 * s.total_bytes();
    assert!(
        r.server_egress_bytes < n_s,
        "egress {} must be below N × S = {n_s}: {}",
        r.server_egress_bytes,
        r.table()
    );
    assert!(r.peer_bytes > 0, "{}", r.table());
    let delivered: u64 = r
        .per_agent
        .iter()
        .map(|a| a.peer_bytes + a.server_bytes)
        .sum();
    assert!(
        delivered >= n_s,
        "every agent got every byte: {delivered} < {n_s}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_fleet_with_several_plugins_and_leavers_completes() {
    let mut s = small(6, 2);
    s.plugins = vec![
        arcade_simulations::scenario::PluginSpec { size_mib: 3 },
        arcade_simulations::scenario::PluginSpec { size_mib: 1 },
    ];
    s.server.up_mibps = 4.0;
    s.agent.up_mibps = 4.0;
    s.churn.leave_fraction = 0.34;
    s.churn.leave_after_s = 0.4;
    let r = arcade_simulations::swarm::run(&s).await.expect("run");
    assert_all_verified(&r);
    assert_eq!(r.completed, 4, "{}", r.table());
    assert_eq!(r.size_bytes, 4 << 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_mesh_every_byte_comes_from_the_coordinator() {
    let mut s = small(3, 2);
    s.p2p = false;
    let r = arcade_simulations::swarm::run(&s).await.expect("run");
    assert_all_verified(&r);
    assert_eq!(r.peer_bytes, 0);
    assert_eq!(r.server_egress_bytes, 3 * s.total_bytes(), "{}", r.table());
}

/// agent-0000 is alone; agent-0001 starts after agent-0000 has the plugin. Both engines
/// must say: agent-0000 got every chunk from the coordinator, agent-0001 every chunk
/// from its peer, and the coordinator sent exactly one copy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn model_and_real_stack_agree_on_where_chunks_came_from() {
    let mut s = small(2, 2);
    s.churn.late_fraction = 0.5;
    s.churn.late_after_s = 2.5;
    let size = s.total_bytes();
    let real = arcade_simulations::swarm::run(&s).await.expect("real");
    let model = arcade_simulations::model::run(&s, &ModelOptions::default()).expect("model");
    for r in [&real, &model] {
        assert_all_verified(r);
        let (a, b) = (&r.per_agent[0], &r.per_agent[1]);
        let shown = format!("{} engine: {:?}", r.engine, r.per_agent);
        assert_eq!((a.server_bytes, a.peer_bytes), (size, 0), "{shown}");
        assert_eq!((b.server_bytes, b.peer_bytes), (0, size), "{shown}");
        assert_eq!(r.server_egress_bytes, size, "{shown}");
    }
    assert_eq!(real.engine, "real");
    assert_eq!(model.engine, "model");
}
