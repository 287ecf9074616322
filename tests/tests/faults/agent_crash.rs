//! Tests of the `agent_crash` fault scenarios (`arcade_tests::faults::agent_crash`).

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_kill_9() {
    crate::check("agent-kill-9").await
}
