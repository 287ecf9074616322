//! Tests of the `bad_input` fault scenarios (`arcade_tests::faults::bad_input`).

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input() {
    crate::check("bad-input").await
}
