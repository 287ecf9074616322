//! Tests of the `churn` fault scenarios (`arcade_tests::faults::churn`).

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn churn() {
    crate::check("churn").await
}
