//! Tests of the `storage_full` fault scenarios (`arcade_tests::faults::storage_full`).

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storage_full() {
    crate::check("storage-full").await
}
