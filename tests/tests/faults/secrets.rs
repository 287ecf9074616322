//! Tests of the `secrets` fault scenario (`arcade_tests::faults::secrets`).

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_leak() {
    crate::check("token-leak").await
}
