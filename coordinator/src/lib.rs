//! The Arcade Mesh coordinator: stores plugins (content-addressed blobs + redb metadata),
//! assigns jobs to agents under leases, and serves plugin content in verified chunks.
//!
//! Module map (the tree is the architecture):
//! - [`config`] — TOML + env configuration, validated before any port is bound.
//! - [`blob`] — the content-addressed blob store trait and its filesystem backend.
//! - [`store`] — durable metadata behind the [`store::MetaStore`] trait; redb with group
//!   commit is the embedded default.
//! - [`dispatch`] — job dispatch (sans-IO): the queue by need, waiting agents by label,
//!   hand-off of each new job to one eligible waiter.
//! - `service` — the gRPC services (`Agent`, `Fleet`, `Jobs`, `PluginAdmin`) and the
//!   state they share (auth, the fleet and its indexes, lease deadlines, caches).
//! - [`herd`] — herd protection (sans-IO): which chunk requests the coordinator serves
//!   and which it points at peers; also driven by the `arcade-sim model` simulator.
//! - [`metrics`] — Prometheus metrics in a per-coordinator registry.
//! - [`server`] — start/stop: listeners, tasks, graceful shutdown.
//! - [`cli`] — the `arcade-coordinator` command line.
//! - [`ctl`] — the `arcadectl` admin client.
//!
//! See `DESIGN.md` beside this crate for the crash model and wire limits.
#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]

pub mod blob;
pub mod cli;
pub mod config;
pub mod ctl;
pub mod dispatch;
pub mod listener;
pub mod metrics;
pub mod server;
mod service;
pub mod tls;
pub use service::herd;
pub mod store;

pub use config::{CoordinatorConfig, ValidConfig};
pub use server::{RunningCoordinator, StartError};

/// Installs the tracing subscriber for a binary (`RUST_LOG` filters; default `info`).
pub fn init_logging(format: config::LogFormat) {
    arcade_p2p::logging::init(format == config::LogFormat::Json);
}
