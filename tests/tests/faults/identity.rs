//! Tests of the `identity` fault scenarios (`arcade_tests::faults::identity`).

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_takeover() {
    crate::check("agent-takeover").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn self_granted_labels() {
    crate::check("self-granted-labels").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_peer() {
    crate::check("revoked-peer").await
}
