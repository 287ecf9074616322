//! `arcade-sim bench-primitives`: the throughput of the building blocks every transfer
//! is made of, each measured alone so that a slow fleet can be traced to its cause.
//!
//! 1. Manifest building ([`arcade_p2p::ManifestBuilder`]: SHA-256 of the whole and
//!    BLAKE3 per chunk, in one pass) over generated content held in memory, at the
//!    configured chunk size and at 256 KiB; best of 3.
//! 2. Chunk verification ([`arcade_p2p::Manifest::verify_chunk`], BLAKE3) over every
//!    chunk, and whole-content verification ([`arcade_p2p::manifest::verify_sha256`]);
//!    best of 3 each.
//! 3. One peer → one peer over loopback, unshaped: two real mesh hosts
//!    ([`arcade_p2p::mesh::host::MeshHost`]: TCP + noise + yamux) on 127.0.0.1 with
//!    coordinator-signed tickets. Host A serves the content from an agent cache (the
//!    agent's own `ChunkStore`, which reads each chunk from the file and checks it
//!    before serving); host B asks for every chunk with `inflight` requests in flight,
//!    as the agent's fetch loop does, and checks each chunk's BLAKE3 against the
//!    manifest as it arrives. Timed from the first chunk request to the last verified
//!    chunk (the connection is set up beforehand by the bitfield query the agent makes
//!    first); best of 3 rounds over the same connection. Upload rate unlimited
//!    (`mesh.upload_rate = 0`).
//!
//! Host A serves from the agent's cache rather than from an in-memory store because
//! starting a [`arcade_p2p::mesh::host::MeshHost`] directly needs a
//! `libp2p_identity::Keypair`, which this crate cannot name (no `libp2p-identity`
//! dependency); [`arcade_agent::mesh::MeshNode`] makes its own.
//!
//! The content is held in memory once, for the hashing figures; it is written to host
//! A's cache and dropped before the transfer, which holds at most `inflight` chunks.
//! Figures only: nothing here asserts on timing.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use arcade_agent::cache::{CacheOptions, PluginCache};
use arcade_agent::config::AgentConfig;
use arcade_agent::mesh::MeshNode;
use arcade_p2p::labels::Labels;
use arcade_p2p::manifest::verify_sha256;
use arcade_p2p::mesh::host::{MeshError, MeshHandle, Multiaddr};
use arcade_p2p::mesh::ticket::{PeerId, TicketIssuer};
use arcade_p2p::settings::ByteSize;
use arcade_p2p::{Manifest, ManifestBuilder};
use arcade_proto::v1 as pb;
use serde::Serialize;
use tokio::task::JoinSet;

use crate::report::cpu_seconds;
use crate::sample::executable_blocks;

/// The transfer target: one pair on loopback at 1 GiB/s or more.
pub const TARGET_BYTES_PER_S: u64 = 1 << 30;

/// Chunk size always measured besides the configured one (manifest building).
const SMALL_CHUNK_KIB: u32 = 256;

/// Timed repetitions of every figure (the best counts).
const ROUNDS: usize = 3;

/// What a run is.
#[derive(Debug, Clone)]
pub struct PrimitiveOptions {
    /// Content size, MiB.
    pub size_mib: u64,
    /// Chunk size, KiB (a power of two, 1 KiB – 64 MiB).
    pub chunk_kib: u32,
    /// Chunk requests in flight during the transfer (1–64).
    pub inflight: usize,
}

impl Default for PrimitiveOptions {
    fn default() -> Self {
        Self {
            size_mib: 256,
            chunk_kib: 1024,
            inflight: 8,
        }
    }
}

/// Manifest building at one chunk size.
#[derive(Debug, Clone, Serialize)]
pub struct ManifestFigure {
    /// Chunk size, bytes.
    pub chunk_bytes: u64,
    /// Best of 3, seconds.
    pub seconds: f64,
    /// Throughput, 10^6 bytes/s.
    pub mb_per_s: f64,
    /// Throughput, 2^20 bytes/s.
    pub mib_per_s: f64,
}

/// A hashing throughput.
#[derive(Debug, Clone, Serialize)]
pub struct Rate {
    /// Best of 3, seconds.
    pub seconds: f64,
    /// Throughput, 10^6 bytes/s.
    pub mb_per_s: f64,
    /// Throughput, 2^20 bytes/s.
    pub mib_per_s: f64,
}

impl Rate {
    fn of(bytes: u64, seconds: f64) -> Self {
        let per_s = bytes as f64 / seconds.max(1e-9);
        Self {
            seconds,
            mb_per_s: per_s / 1e6,
            mib_per_s: per_s / f64::from(1u32 << 20),
        }
    }
}

/// The one peer → one peer transfer.
#[derive(Debug, Clone, Serialize)]
pub struct TransferFigures {
    /// What host A serves from.
    pub store: String,
    /// Chunk requests in flight.
    pub inflight: usize,
    /// Chunks of the content.
    pub chunks: u32,
    /// Chunks received whose BLAKE3 matched the manifest (best round).
    pub chunks_verified: u32,
    /// Verified bytes received (best round).
    pub bytes: u64,
    /// Every chunk arrived and verified, in every round.
    pub all_verified: bool,
    /// "Busy" refusals (no upload slot) that were asked again, all rounds.
    pub busy_retries: u64,
    /// Bytes host A counted as uploaded, all rounds.
    pub uploaded_bytes: u64,
    /// First chunk request → last verified chunk, seconds (best of 3 rounds; the
    /// figures below are of that round).
    pub seconds: f64,
    /// Throughput, 10^6 bytes/s.
    pub mb_per_s: f64,
    /// Throughput, 2^20 bytes/s.
    pub mib_per_s: f64,
    /// Throughput of each round, 10^6 bytes/s.
    pub rounds_mb_per_s: Vec<f64>,
    /// The target, 10^6 bytes/s (1 GiB/s).
    pub target_mb_per_s: f64,
    /// Target check: one pair on loopback ≥ 1 GiB/s.
    pub meets_1gib_per_s: bool,
    /// CPU seconds (user + system) of this process (both hosts) during the transfer.
    pub cpu_seconds: f64,
    /// CPU seconds per GiB transferred.
    pub cpu_seconds_per_gib: f64,
    /// CPU utilisation during the transfer, in cores (cpu seconds ÷ wall seconds).
    pub cpu_cores_busy: f64,
}

/// Every figure of one run.
#[derive(Debug, Clone, Serialize)]
pub struct PrimitiveFigures {
    /// `release` or `dev` (debug assertions on): the figures depend on it.
    pub build: String,
    /// Hardware threads available.
    pub cpus: usize,
    /// Content size, bytes.
    pub content_bytes: u64,
    /// Chunk size of the verification and transfer figures, bytes.
    pub chunk_bytes: u64,
    /// Manifest building (SHA-256 + BLAKE3 per chunk), per chunk size.
    pub manifest_build: Vec<ManifestFigure>,
    /// `verify_chunk` (length + BLAKE3) over every chunk.
    pub verify_chunk: Rate,
    /// `verify_sha256` of the whole content.
    pub verify_sha256: Rate,
    /// One peer → one peer over loopback.
    pub transfer: TransferFigures,
}

impl PrimitiveFigures {
    /// A short human-readable table.
    pub fn table(&self) -> String {
        let mut out = format!(
            "{} build · {} cpus · {:.0} MiB content · {} KiB chunks\n",
            self.build,
            self.cpus,
            self.content_bytes as f64 / f64::from(1u32 << 20),
            self.chunk_bytes / 1024,
        );
        let row =
            |name: String, mb: f64, mib: f64| format!("{name:<36} {mb:>7.0} MB/s {mib:>7.0} MiB/s");
        for m in &self.manifest_build {
            out += &row(
                format!("manifest build ({} KiB chunks)", m.chunk_bytes / 1024),
                m.mb_per_s,
                m.mib_per_s,
            );
            out += "\n";
        }
        out += &row(
            "verify_chunk (BLAKE3)".into(),
            self.verify_chunk.mb_per_s,
            self.verify_chunk.mib_per_s,
        );
        out += "\n";
        out += &row(
            "verify_sha256 (whole content)".into(),
            self.verify_sha256.mb_per_s,
            self.verify_sha256.mib_per_s,
        );
        out += "\n";
        let t = &self.transfer;
        out += &row(
            format!("pair transfer ({} in flight)", t.inflight),
            t.mb_per_s,
            t.mib_per_s,
        );
        out += &format!(
            " · {:.2} s · {}/{} chunks verified · ≥ 1 GiB/s: {} · CPU {:.2} s/GiB ({:.2} cores)\n",
            t.seconds,
            t.chunks_verified,
            t.chunks,
            if t.meets_1gib_per_s { "yes" } else { "no" },
            t.cpu_seconds_per_gib,
            t.cpu_cores_busy,
        );
        out
    }
}

/// The shortest of `rounds` timings of `f`.
fn best_of(rounds: usize, mut f: impl FnMut() -> anyhow::Result<()>) -> anyhow::Result<f64> {
    let mut best = f64::INFINITY;
    for _ in 0..rounds {
        let started = Instant::now();
        f()?;
        best = best.min(started.elapsed().as_secs_f64());
    }
    Ok(best)
}

/// Builds the manifest of `content` as it would stream in: fed in 1 MiB blocks.
fn build_manifest(content: &[u8], chunk_size: u32) -> anyhow::Result<Manifest> {
    let mut builder = ManifestBuilder::new(chunk_size)?;
    for block in content.chunks(1 << 20) {
        builder.update(block)?;
    }
    Ok(builder.finish())
}

/// Runs the benchmark.
pub async fn run(opts: &PrimitiveOptions) -> anyhow::Result<PrimitiveFigures> {
    if opts.size_mib == 0 {
        bail!("size must be at least 1 MiB");
    }
    if !(1..=64).contains(&opts.inflight) {
        bail!("inflight must be between 1 and 64");
    }
    let size = opts.size_mib << 20;
    let chunk_size = arcade_p2p::manifest::check_chunk_size(u64::from(opts.chunk_kib) * 1024)
        .context("chunk size")?;
    let content_len = usize::try_from(size).context("content size")?;

    // The content, generated once (generation is not timed).
    let (content, manifest, manifest_build, verify_chunk, verify_whole) =
        tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
            let mut content = Vec::with_capacity(content_len);
            for block in executable_blocks(size, 42) {
                content.extend_from_slice(&block);
            }
            let mut sizes = vec![chunk_size];
            if chunk_size != SMALL_CHUNK_KIB * 1024 {
                sizes.push(SMALL_CHUNK_KIB * 1024);
            }
            let mut manifest_build = Vec::new();
            let mut manifest = None;
            for &cs in &sizes {
                let mut built = None;
                let seconds = best_of(ROUNDS, || {
                    built = Some(std::hint::black_box(build_manifest(&content, cs)?));
                    Ok(())
                })?;
                let rate = Rate::of(size, seconds);
                manifest_build.push(ManifestFigure {
                    chunk_bytes: u64::from(cs),
                    seconds,
                    mb_per_s: rate.mb_per_s,
                    mib_per_s: rate.mib_per_s,
                });
                if cs == chunk_size {
                    manifest = built;
                }
            }
            let manifest = manifest.context("manifest was built")?;
            let seconds = best_of(ROUNDS, || {
                for i in 0..manifest.chunk_count() {
                    let range = manifest.chunk_range(i).context("chunk range")?;
                    let data = &content[range.start as usize..range.end as usize];
                    manifest.verify_chunk(i, std::hint::black_box(data))?;
                }
                Ok(())
            })?;
            let verify_chunk = Rate::of(size, seconds);
            let seconds = best_of(ROUNDS, || {
                verify_sha256(
                    std::hint::black_box(&content[..]),
                    manifest.content_id(),
                    size,
                )?;
                Ok(())
            })?;
            let verify_whole = Rate::of(size, seconds);
            Ok((
                content,
                manifest,
                manifest_build,
                verify_chunk,
                verify_whole,
            ))
        })
        .await??;

    let dir = tempfile::tempdir()?;
    let transfer = transfer(dir.path(), content, &manifest, opts.inflight).await?;
    Ok(PrimitiveFigures {
        build: if cfg!(debug_assertions) {
            "dev"
        } else {
            "release"
        }
        .into(),
        cpus: std::thread::available_parallelism().map_or(1, usize::from),
        content_bytes: size,
        chunk_bytes: u64::from(chunk_size),
        manifest_build,
        verify_chunk,
        verify_sha256: verify_whole,
        transfer,
    })
}

/// A mesh node of an agent with its cache under `dir`, listening on loopback.
async fn node(dir: &Path, id: &str, max_uploads: u32) -> anyhow::Result<(MeshNode, PluginCache)> {
    let mut config = AgentConfig {
        id: id.into(),
        data_dir: dir.to_path_buf(),
        metrics_listen: "off".into(),
        ..Default::default()
    };
    config.mesh.listen = vec!["/ip4/127.0.0.1/tcp/0".into()];
    config.mesh.allow_loopback = true;
    config.mesh.upload_rate = ByteSize(0);
    config.mesh.max_uploads = max_uploads;
    config.cache.max_size = ByteSize(u64::MAX / 2);
    let config = config.validate()?;
    let opts = CacheOptions {
        max_size: config.raw.cache.max_size.bytes(),
        eviction: config.raw.cache.eviction,
        ttl: None,
        watermarks: Default::default(),
    };
    let plugin_dir = config.plugin_dir.clone();
    let cache = tokio::task::spawn_blocking(move || PluginCache::open(&plugin_dir, opts)).await??;
    let key = arcade_agent::identity::load_or_create(&config.mesh_identity)?;
    let node = MeshNode::start(&config, cache.clone(), key)
        .await
        .with_context(|| format!("starting mesh host {id}"))?;
    Ok((node, cache))
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// Host A serves `content` (written to its cache, then dropped); host B fetches and
/// verifies every chunk with `inflight` requests in flight.
async fn transfer(
    dir: &Path,
    content: Vec<u8>,
    manifest: &Manifest,
    inflight: usize,
) -> anyhow::Result<TransferFigures> {
    let sha = manifest.content_id();
    let max_uploads = u32::try_from(inflight * 2).unwrap_or(u32::MAX);
    let (a, a_cache) = node(&dir.join("a"), "bench-a", max_uploads).await?;
    let (b, _b_cache) = node(&dir.join("b"), "bench-b", max_uploads).await?;

    // Host A holds the content as a complete download.
    let file = a_cache.dir().join("downloaded").join(sha.to_hex());
    tokio::task::spawn_blocking(move || std::fs::write(file, content)).await??;
    let info = pb::PluginInfo {
        plugin_id: "bench/primitives".into(),
        version: "1.0.0".into(),
        checksum: sha.to_hex(),
        size: manifest.size() as i64,
        manifest: Some(manifest.to_proto()),
        ..Default::default()
    };
    a.learn(&info, manifest).await;

    // Tickets from one coordinator key.
    let issuer = TicketIssuer::generate();
    let key = issuer.public_key();
    for n in [&a, &b] {
        let ticket = issuer.issue(
            &n.handle().peer_id(),
            "bench",
            &Labels::new(),
            now_ms(),
            3_600_000,
        )?;
        n.handle().set_credentials(ticket, &key).await?;
    }

    // Connection set-up and the bitfield query, as the agent makes first (untimed).
    let a_peer = a.handle().peer_id();
    let a_addrs = a.handle().listen_addrs().await;
    let chunks = manifest.chunk_count();
    let held = b
        .handle()
        .held(a_peer, a_addrs.clone(), &sha, chunks)
        .await
        .context("bitfield query")?;
    if !held.is_full() {
        bail!("host A does not hold every chunk");
    }

    let mut runs = Vec::with_capacity(ROUNDS);
    for _ in 0..ROUNDS {
        runs.push(fetch_all(b.handle(), a_peer, &a_addrs, manifest, inflight).await?);
    }
    let uploaded_bytes = a
        .handle()
        .stats()
        .uploaded_bytes
        .load(std::sync::atomic::Ordering::Relaxed);
    b.shutdown().await;
    a.shutdown().await;

    let best = runs
        .iter()
        .min_by(|x, y| x.seconds.total_cmp(&y.seconds))
        .context("no transfer round")?;
    let (seconds, bytes, cpu) = (best.seconds, best.bytes, best.cpu_seconds);
    let rate = Rate::of(bytes, seconds);
    let gib = bytes as f64 / f64::from(1u32 << 30);
    Ok(TransferFigures {
        store: "agent cache (file-backed; each chunk read and BLAKE3-checked before serving)"
            .into(),
        inflight,
        chunks,
        chunks_verified: best.verified,
        bytes,
        all_verified: runs
            .iter()
            .all(|r| r.verified == chunks && r.bytes == manifest.size()),
        busy_retries: runs.iter().map(|r| r.busy).sum(),
        uploaded_bytes,
        seconds,
        mb_per_s: rate.mb_per_s,
        mib_per_s: rate.mib_per_s,
        rounds_mb_per_s: runs
            .iter()
            .map(|r| Rate::of(r.bytes, r.seconds).mb_per_s)
            .collect(),
        target_mb_per_s: TARGET_BYTES_PER_S as f64 / 1e6,
        meets_1gib_per_s: bytes as f64 / seconds.max(1e-9) >= TARGET_BYTES_PER_S as f64,
        cpu_seconds: cpu,
        cpu_seconds_per_gib: if gib > 0.0 { cpu / gib } else { 0.0 },
        cpu_cores_busy: cpu / seconds.max(1e-9),
    })
}

/// Chunk requests in flight: (index, answer).
type ChunkTasks = JoinSet<(u32, Result<bytes::Bytes, MeshError>)>;

/// One fetch of every chunk.
struct Fetched {
    seconds: f64,
    cpu_seconds: f64,
    verified: u32,
    bytes: u64,
    busy: u64,
}

/// Fetches every chunk of `manifest` from `peer` with `inflight` requests in flight,
/// checking each chunk's BLAKE3 as it arrives (as the agent's fetch loop does); the
/// chunks are dropped once verified.
async fn fetch_all(
    fetcher: &MeshHandle,
    peer: PeerId,
    addrs: &[Multiaddr],
    manifest: &Manifest,
    inflight: usize,
) -> anyhow::Result<Fetched> {
    let sha = manifest.content_id();
    let chunks = manifest.chunk_count();
    let spawn = |tasks: &mut ChunkTasks, index: u32| {
        let (fetcher, addrs) = (fetcher.clone(), addrs.to_vec());
        tasks.spawn(async move {
            let r = fetcher.chunk(peer, addrs, &sha, index).await;
            (index, r)
        });
    };
    let mut tasks = JoinSet::new();
    let (mut next, mut verified, mut bytes, mut busy) = (0u32, 0u32, 0u64, 0u64);
    let cpu_before = cpu_seconds();
    let started = Instant::now();
    while next < chunks && tasks.len() < inflight {
        spawn(&mut tasks, next);
        next += 1;
    }
    while let Some(joined) = tasks.join_next().await {
        let (index, result) = joined?;
        let data = match result {
            Ok(data) => data,
            Err(MeshError::Refused {
                reason: pb::Refusal::Busy,
                ..
            }) => {
                busy += 1;
                tokio::time::sleep(Duration::from_millis(1)).await;
                spawn(&mut tasks, index);
                continue;
            }
            Err(e) => bail!("chunk {index}: {e}"),
        };
        manifest
            .verify_chunk(index, &data)
            .with_context(|| format!("chunk {index} from host A"))?;
        verified += 1;
        bytes += data.len() as u64;
        drop(data);
        if next < chunks {
            spawn(&mut tasks, next);
            next += 1;
        }
    }
    Ok(Fetched {
        seconds: started.elapsed().as_secs_f64(),
        cpu_seconds: cpu_seconds() - cpu_before,
        verified,
        bytes,
        busy,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn tiny_run_delivers_every_chunk_verified() {
        let figures = run(&PrimitiveOptions {
            size_mib: 4,
            chunk_kib: 256,
            inflight: 4,
        })
        .await
        .unwrap();
        let t = &figures.transfer;
        assert_eq!(t.chunks, 16);
        assert_eq!(t.chunks_verified, 16);
        assert_eq!(t.bytes, 4 << 20);
        assert!(
            t.all_verified,
            "every round delivered every chunk, verified"
        );
        assert_eq!(t.rounds_mb_per_s.len(), 3);
        assert_eq!(t.uploaded_bytes, 3 * (4 << 20));
        assert_eq!(figures.manifest_build.len(), 1, "256 KiB is measured once");
        assert!(figures.verify_chunk.mb_per_s > 0.0);
    }

    /// The figures at the default size: `cargo test --release -p arcade-simulations
    /// primitives -- --ignored --nocapture`.
    #[tokio::test(flavor = "multi_thread")]
    #[ignore = "a benchmark: run by hand in release"]
    async fn print_default_figures() {
        let figures = run(&PrimitiveOptions::default()).await.unwrap();
        println!("{}", figures.table());
        println!("{}", serde_json::to_string(&figures).unwrap());
        assert!(figures.transfer.all_verified);
    }
}
