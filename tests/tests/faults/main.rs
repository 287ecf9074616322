//! The fault suite (`arcade_tests::faults`) as tests: every scenario runs against real
//! components and fails the test when a property does not hold. `cargo run -p
//! arcade-tests --bin fault-suite` runs the same scenarios and prints their table.

mod admin;
mod agent_crash;
mod auth;
mod bad_input;
mod cache_tamper;
mod churn;
mod coordinator_crash;
mod disk_full;
mod hostile;
mod identity;
mod outsiders;
mod secrets;
mod stalled;
mod storage_full;

use std::time::Duration;

/// Runs one scenario of the suite and fails with its error.
pub async fn check(name: &str) {
    match arcade_tests::faults::run(name, Duration::from_secs(240)).await {
        Ok(o) => eprintln!("{name}: {} ({:.1} s)", o.outcome, o.seconds),
        Err(e) => panic!("fault scenario `{name}` failed: {e:#}"),
    }
}

#[test]
fn every_scenario_has_a_unique_name() {
    let names: Vec<&str> = arcade_tests::faults::scenarios()
        .iter()
        .map(|(n, _)| *n)
        .collect();
    let mut sorted = names.clone();
    sorted.sort_unstable();
    sorted.dedup();
    assert_eq!(
        sorted.len(),
        names.len(),
        "duplicate scenario names: {names:?}"
    );
}
