//! Tests of the `cache_tamper` fault scenario (`arcade_tests::faults::cache_tamper`).

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_tamper() {
    crate::check("cache-tamper").await
}
