//! Arcade Mesh simulations and benchmarks, driven by the `arcade-sim` command:
//!
//! - [`demo`] — the one-command demo: an embedded coordinator on loopback, a generated
//!   sample plugin pushed and fetched, verified chunk by chunk, by several agents.
//! - [`bench`] — the coordinator benchmark: push and streamed-download throughput of a
//!   large plugin over loopback and the coordinator's peak RSS, with `--json` figures.
//! - [`fleet`] — runs scenarios on either engine, compares, sweeps, writes `--out` dirs.
//! - [`process`] — real coordinator child processes (for benchmarks and crash tests).
//! - [`client`] — authenticated gRPC clients and streaming push/download helpers.
//! - [`model`] — the discrete-event model: the real scheduler and herd over simulated links.
//! - [`report`] — the figures of a fleet run, the same for both engines (`--json`).
//! - [`chart`] — dependency-free SVG charts of fleet runs (CDFs, stacked bars, lines).
//! - [`sample`] — deterministic generated content and sample plugins.
//! - [`swarm`] — the real-stack engine: a real coordinator and N real agents on loopback.
//! - [`local`] — what the demo and the real-stack engine share: embedded coordinator and
//!   loopback agent configs, jobs pinned to one agent.
//! - [`scenario`] — fleet scenarios (TOML) shared by the real-stack and model engines.
#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]

pub mod bench;
pub mod chart;
pub mod client;
pub mod demo;
pub mod fleet;
pub mod local;
pub mod model;
pub mod netns;
pub mod process;
pub mod report;
pub mod sample;
pub mod scenario;
pub mod swarm;
