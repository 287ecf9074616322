//! Tests of the `outsiders` fault scenarios (`arcade_tests::faults::outsiders`).

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mesh_outsiders() {
    crate::check("mesh-outsiders").await
}
