//! Tests of the `admin` fault scenarios (`arcade_tests::faults::admin`).

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_result() {
    crate::check("oversized-result").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disabled_plugin() {
    crate::check("disabled-plugin").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_storage() {
    crate::check("shared-storage").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metric_labels() {
    crate::check("metric-labels").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn download_slots() {
    crate::check("download-slots").await
}
