//! The Arcade Mesh agent: registers with the coordinator, long-polls for jobs, makes
//! sure every plugin a job needs is in its verified cache (fetching what is missing),
//! runs the job's plugin stages and commands as child processes, and reports results.
//!
//! Module map:
//! - [`cache`] — the plugin cache (`builtin/`, `downloaded/`, `temp/`, redb index),
//!   eviction, pins, resumable-download progress.
//! - [`exec`] — running plugin stages and job commands as bounded child processes.
//! - [`fetch`] — the fetch path (cache hit, or verified chunks from a source into a
//!   resumable partial file); [`fetch::source`] is where chunks come from.
//! - [`identity`] — the agent's long-lived key (its id at the coordinator, its peer id).
//! - [`job`] — one job: plugins, stages, commands, the report.
//! - [`mesh`] — the agent's libp2p host and what it serves from the cache.
//! - `preheat` — background fetches and pins the coordinator orders in heartbeat
//!   answers.
//! - [`session`] — the connection and token to the coordinator.
//! - [`runtime`] — the running agent: register, heartbeat, poll, shutdown.
//! - [`config`], [`cli`], [`metrics`].
#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]

pub mod cache;
pub mod cli;
pub mod config;
pub mod exec;
pub mod fetch;
pub mod identity;
pub mod job;
pub mod mesh;
pub mod metrics;
pub(crate) mod preheat;
pub mod progress;
pub mod runtime;
pub mod session;
