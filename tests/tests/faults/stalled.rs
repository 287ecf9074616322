//! Tests of the `stalled` fault scenario (`arcade_tests::faults::stalled`).

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_requests() {
    crate::check("stalled-requests").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_flood() {
    crate::check("connection-flood").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_body() {
    crate::check("stalled-body").await
}
