//! Tests of the `auth` fault scenarios (`arcade_tests::faults::auth`).

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_matrix() {
    crate::check("auth-matrix").await
}
