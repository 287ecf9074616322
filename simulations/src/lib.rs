//! Arcade Mesh simulations and benchmarks, driven by the `arcade-sim` command:
//!
//! - [`demo`] — the one-command demo: an embedded coordinator on loopback, a generated
//!   sample plugin pushed and fetched, verified chunk by chunk, by several agents.
//! - [`bench`] — the coordinator benchmark: push and streamed-download throughput of a
//!   large plugin over loopback and the coordinator's peak RSS, with `--json` figures.
//! - [`process`] — real coordinator child processes (for benchmarks and crash tests).
//! - [`client`] — authenticated gRPC clients and streaming push/download helpers.
//! - [`report`] — the figures of a fleet run, the same for both engines (`--json`).
//! - [`sample`] — deterministic generated content and sample plugins.
//! - [`scenario`] — fleet scenarios (TOML) shared by the real-stack and model engines.
#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]

pub mod bench;
pub mod client;
pub mod demo;
pub mod process;
pub mod report;
pub mod sample;
pub mod scenario;
