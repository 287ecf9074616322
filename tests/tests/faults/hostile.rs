//! Tests of the `hostile` fault scenarios (`arcade_tests::faults::hostile`).

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_peers() {
    crate::check("hostile-peers").await
}
