//! Tests of the `disk_full` fault scenarios (`arcade_tests::faults::disk_full`).

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_disk_full() {
    crate::check("agent-disk-full").await
}
