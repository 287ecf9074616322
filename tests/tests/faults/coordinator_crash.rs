//! Tests of the `coordinator_crash` fault scenarios (`arcade_tests::faults::coordinator_crash`).

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinator_kill_9() {
    crate::check("coordinator-kill-9").await
}
