//! The shared foundation of Arcade Mesh, used by the coordinator and the agent alike:
//!
//! - [`manifest`] — the content model: manifests built in one streaming pass, content
//!   identity (SHA-256), per-chunk BLAKE3 verification, whole-content verification and
//!   the deterministic protobuf encoding.
//! - [`plugin_ref`] — plugin ids (`notify/slack`), semver versions, `id@version`.
//! - [`cdc`] — content-defined chunking (FastCDC).
//! - [`compress`] — zstd per chunk on the wire: negotiated, only when it pays, bounded
//!   decompression.
//! - [`delta`] — patches between versions (zstd with the old version as prefix).
//! - [`identity`] — an agent's proof, at registration, that it holds its long-lived key.
//! - [`labels`] — agent labels and label requirements (access control, job selectors).
//! - [`settings`] — TOML configuration with `ARCADE_…` environment overrides, sizes and
//!   durations.
//! - [`logging`] — log setup for the binaries.
//! - [`shutdown`] — the binaries' termination signal.
//! - [`metrics_http`] — the `GET /metrics` endpoint for Prometheus scrapes.
//!
//! The mesh (libp2p host, chunk exchange, swarm scheduler) joins this crate next.
#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]
#![warn(missing_docs)]

pub mod cdc;
pub mod compress;
pub mod delta;
pub mod identity;
pub mod labels;
pub mod logging;
pub mod manifest;
pub mod mesh;
pub mod metrics_http;
pub mod plugin_ref;
pub mod publisher;
pub mod settings;
pub mod shutdown;

pub use manifest::{ContentId, Manifest, ManifestBuilder, VerifyError};
pub use plugin_ref::{PluginId, PluginRef, PluginRefError, PluginSelector, VersionSelector};

/// Unix time in milliseconds (0 if the clock is before 1970): the time of tickets and
/// registration proofs.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Deterministic incompressible bytes (xorshift) for unit tests.
#[cfg(test)]
pub(crate) fn test_noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}
