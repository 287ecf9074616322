//! `arcade-sim bench-coordinator`: push and streamed-download throughput of generated
//! plugins over loopback, and the coordinator's peak RSS, measured on a real coordinator
//! child process (this binary re-executed as `arcade-sim coordinator …`, which runs the
//! same code as `arcade-coordinator`).
//!
//! Content is generated and hashed in 1 MiB blocks on the client side, so neither side
//! holds a plugin in memory; the download is verified (every chunk's BLAKE3 against the
//! manifest and the whole SHA-256) as it streams.

use std::process::Command;
use std::time::Instant;

use arcade_p2p::ContentId;
use arcade_proto::v1 as pb;
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::client::Conn;
use crate::process::CoordinatorProcess;
use crate::sample::ContentStream;

const ADMIN: &str = "bench-admin-token";
const ENROLL: &str = "bench-enroll-token";
const BLOCK: usize = 1 << 20;

/// Figures for one plugin size.
#[derive(Debug, Clone, Serialize)]
pub struct SizeFigures {
    /// Plugin size in bytes.
    pub size_bytes: u64,
    /// Push throughput, MB/s (10^6 bytes per second).
    pub push_mb_per_s: f64,
    /// Streamed download throughput (verified), MB/s.
    pub download_mb_per_s: f64,
    /// Coordinator peak RSS after the push, MiB.
    pub peak_rss_after_push_mib: f64,
    /// Coordinator peak RSS after the download, MiB.
    pub peak_rss_after_download_mib: f64,
}

/// Runs the benchmark for each size (MiB) with a fresh coordinator each time.
pub async fn run(sizes_mib: &[u64]) -> anyhow::Result<Vec<SizeFigures>> {
    let mut out = Vec::new();
    for &mib in sizes_mib {
        out.push(one(mib << 20).await?);
    }
    Ok(out)
}

async fn one(size: u64) -> anyhow::Result<SizeFigures> {
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("coordinator.toml");
    std::fs::write(
        &config,
        format!(
            "admin_token = \"{ADMIN}\"\nenroll_token = \"{ENROLL}\"\nmetrics_listen = \"off\"\n[plugin]\nmax_plugin_size = \"{}B\"\n[plugin.security]\nrequire_checksum = true\nallow_unsafe = true\n",
            size.max(1)
        ),
    )?;
    let mut cmd = Command::new(std::env::current_exe()?);
    cmd.arg("coordinator")
        .arg("--config")
        .arg(&config)
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .args(["--listen", "127.0.0.1:0"])
        .env("RUST_LOG", "warn");
    let proc = CoordinatorProcess::spawn(cmd, false)?;
    let conn = Conn {
        url: proc.url(),
        metrics_addr: None,
        admin_token: ADMIN.into(),
        enroll_token: ENROLL.into(),
        insecure: false,
    };

    // The expected SHA-256, computed from the generator (a second pass, untimed).
    let mut sha = Sha256::new();
    let mut content = ContentStream::new(size, size);
    while let Some(block) = content.next_block(BLOCK) {
        sha.update(&block);
    }
    let expected = ContentId::from_bytes(sha.finalize().into());

    let mut content = ContentStream::new(size, size);
    let blocks = std::iter::from_fn(move || content.next_block(BLOCK));
    let started = Instant::now();
    conn.push_stream(
        "bench/plugin",
        "1.0.0",
        pb::PushPluginHeader {
            expected_sha256: expected.to_hex(),
            ..Default::default()
        },
        blocks,
    )
    .await?;
    let push_secs = started.elapsed().as_secs_f64();
    let rss_push = proc.peak_rss().unwrap_or(0);

    let token = conn
        .register_with("bench-agent", &[], vec![], false)
        .await?;
    let started = Instant::now();
    // Verified as it streams: every chunk against the manifest, the whole against the
    // manifest's SHA-256 — which the push already checked against `expected`.
    let received = conn.fetch_verified(&token, "bench/plugin", "1.0.0").await?;
    let download_secs = started.elapsed().as_secs_f64();
    anyhow::ensure!(received == size, "received {received} of {size} bytes");
    let rss_download = proc.peak_rss().unwrap_or(0);
    proc.kill9();
    let mb = size as f64 / 1e6;
    let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
    Ok(SizeFigures {
        size_bytes: size,
        push_mb_per_s: mb / push_secs,
        download_mb_per_s: mb / download_secs,
        peak_rss_after_push_mib: mib(rss_push),
        peak_rss_after_download_mib: mib(rss_download),
    })
}
