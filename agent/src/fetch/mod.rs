//! The fetch path: plugin info + manifest in, a verified cached plugin out.
//!
//! 1. Cache hit (by id@version and SHA-256) → no network.
//! 2. Miss → the partial file `temp/<sha>.part` is opened at full size; chunks recorded
//!    as done by an earlier run are re-verified (BLAKE3) and kept, so a restarted agent
//!    fetches only what is missing. Chunks that content already in the cache contains
//!    (same BLAKE3) are copied from it and verified (`cache/reuse.rs`): peers and the
//!    coordinator are never asked for them.
//! 3. The swarm scheduler (`run.rs`, the one decision of *where a chunk comes from*)
//!    asks peers that hold chunks — from the coordinator's peer hints and the DHT —
//!    rarest first, and the coordinator for what no peer has in time. Every chunk is
//!    checked against the manifest's BLAKE3 before it is written at its offset; a bad
//!    chunk is counted, its peer banned, and the chunk fetched elsewhere. Progress is
//!    recorded every few chunks.
//! 4. Coordinator failures are retried `download.retry` times with exponential backoff
//!    and jitter; errors that retrying cannot fix (not found, permission denied) end at
//!    once; peer failures are handled by the scheduler (strikes, bans).
//! 5. The cache publishes the file: whole SHA-256 check, `chmod +x`, rename into
//!    `downloaded/`, index update, eviction.
//!
//! At most `download.concurrent` plugins are fetched at once; two jobs needing the same
//! content share one fetch. Memory per fetch is one chunk in flight plus the stream's
//! buffers; nothing scales with plugin size.

mod patch;
mod run;
pub use run::PEER_BUSY_RETRY;
pub mod source;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arcade_p2p::{ContentId, Manifest, PluginRef};
use arcade_proto::v1 as pb;
use rand::Rng as _;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::cache::{CacheError, CachedPlugin, PluginCache};
use crate::config::DownloadConfig;
use crate::mesh::MeshNode;
use crate::metrics::{DownloadLabels, Metrics, PluginIdLabel, ReasonLabel, SourceLabel};
use arcade_p2p::mesh::bitfield::Bitfield;
use arcade_p2p::mesh::host::Multiaddr;
use arcade_p2p::mesh::scheduler::{Scheduler, SchedulerConfig, SchedulerStats};
use arcade_p2p::mesh::ticket::PeerId;
use run::FetchRun;
use source::{ChunkSource, SourceError};
use tokio::task::JoinSet;

/// A plugin could not be had.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// The job's plugin info is unusable.
    #[error("plugin info for {plugin} is invalid: {reason}")]
    BadInfo {
        /// id@version as given.
        plugin: String,
        /// Why.
        reason: String,
    },
    /// A source refused in a way retrying cannot fix.
    #[error("cannot fetch {plugin}: {source}")]
    Refused {
        /// id@version.
        plugin: String,
        /// The refusal.
        #[source]
        source: SourceError,
    },
    /// Every attempt failed.
    #[error("cannot fetch {plugin} after {attempts} attempt(s); last error: {last}")]
    Exhausted {
        /// id@version.
        plugin: String,
        /// Attempts made.
        attempts: u32,
        /// The last error.
        last: String,
    },
    /// The cache failed (disk full, I/O).
    #[error("cache error for {plugin}: {source}")]
    Cache {
        /// id@version.
        plugin: String,
        /// The cache error.
        #[source]
        source: Box<CacheError>,
    },
    /// The agent is shutting down.
    #[error("fetch of {0} cancelled: agent shutting down")]
    Cancelled(String),
    /// The whole fetch took longer than `download.timeout`.
    #[error(
        "cannot fetch {plugin}: not fetched and verified within download.timeout = {after:?} (what was verified is kept for the next attempt)"
    )]
    TimedOut {
        /// id@version.
        plugin: String,
        /// The deadline.
        after: Duration,
    },
}

/// Burst of `mesh.download_rate`: one 1 MiB chunk.
const MAX_CHUNK_BURST: u32 = 1 << 20;

/// The `bytes_by_source` key (and `arcade_agent_fetched_bytes_total` source) of chunks
/// copied from content the agent already held.
pub const LOCAL_SOURCE: &str = "local";

/// What a fetch did.
#[derive(Debug, Clone)]
pub struct Fetched {
    /// The cached plugin.
    pub plugin: CachedPlugin,
    /// True when it was already cached.
    pub cache_hit: bool,
    /// Verified bytes received, by source kind (`server`, `peer`, and [`LOCAL_SOURCE`]
    /// for chunks copied from content the agent held).
    pub bytes_by_source: HashMap<&'static str, u64>,
    /// What the swarm scheduler did (requests, duplicates, busy answers, …); zero for a
    /// cache hit.
    pub swarm: SchedulerStats,
}

/// The swarm scheduler's settings for every fetch (the model in `arcade-sim` uses them
/// too): the scheduler's defaults with the request timeout from `download.request_timeout`. The
/// coordinator is the shared, expensive source: few requests each, and duplicates only
/// for requests stalled for a while.
pub fn scheduler_config(download: &DownloadConfig) -> SchedulerConfig {
    SchedulerConfig {
        request_timeout: download.request_timeout.get(),
        server_max_inflight: 2,
        hedge_after: Duration::from_secs(5),
        // Peers on a LAN answer their first bitfield query within milliseconds; waiting
        // longer for chunks none of them holds only idles the coordinator at the start
        // (500 ms was 15 % of fleet (a)'s bound). Later askers are redirected anyway.
        server_fallback_after: Duration::from_millis(100),
        ..SchedulerConfig::default()
    }
}

/// How long a fetch leaves chunks that no peer shows to peers before it asks the
/// coordinator for them, for an agent that uploads `upload_rate` bytes/s (0 =
/// unlimited) and a content of `chunk_bytes` chunks: twice the time its uplink takes to
/// pass one chunk on, at least `floor` (the scheduler's `server_fallback_after`) and at
/// most 2 s.
///
/// The coordinator's herd protection hands each chunk to its first askers and points
/// everyone else at them. An agent with a slow uplink that asked as early as the rest
/// became the only holder of a share of the chunks, which the fleet then waited for at
/// its rate (a quarter of the fleet at 0.25 MiB/s took 19 × the bound in the model);
/// asking later, it finds those chunks already handed to agents that can pass them on,
/// and fetches them from those.
pub fn first_copy_delay(floor: Duration, upload_rate: u64, chunk_bytes: u64) -> Duration {
    const SLOWEST: Duration = Duration::from_secs(2);
    if upload_rate == 0 {
        return floor;
    }
    let chunk_times = 2.0 * chunk_bytes as f64 / upload_rate as f64;
    Duration::from_secs_f64(chunk_times.min(SLOWEST.as_secs_f64())).max(floor)
}

/// Fetches plugins into the cache. Cheap to clone.
#[derive(Clone)]
pub struct Fetcher {
    cache: PluginCache,
    server: Arc<dyn ChunkSource>,
    config: DownloadConfig,
    metrics: Metrics,
    agent_id: String,
    /// The mesh node that serves what we hold (None = mesh off).
    mesh: Option<MeshNode>,
    permits: Arc<Semaphore>,
    /// `mesh.download_rate`: every chunk request, to peers or the coordinator, waits
    /// for its bytes here before it is sent.
    download_limit: arcade_p2p::mesh::limiter::RateLimiter,
    /// Per-content locks: one fetch per content at a time.
    inflight: Arc<Mutex<HashMap<ContentId, Arc<tokio::sync::Mutex<()>>>>>,
}

impl std::fmt::Debug for Fetcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fetcher")
            .field("agent_id", &self.agent_id)
            .finish_non_exhaustive()
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, CacheError> + Send + 'static,
) -> Result<T, CacheError> {
    tokio::task::spawn_blocking(f).await.unwrap_or_else(|e| {
        Err(CacheError::from(std::io::Error::other(format!(
            "cache task failed: {e}"
        ))))
    })
}

/// Exponential backoff with ±50 % jitter, capped at 30 s.
pub(crate) fn backoff(base: Duration, attempt: u32) -> Duration {
    let exp = base
        .saturating_mul(1u32 << attempt.min(16))
        .min(Duration::from_secs(30));
    let jitter = rand::rng().random_range(0.5..1.5);
    exp.mul_f64(jitter)
}

impl Fetcher {
    /// A fetcher into `cache` from the coordinator `server`.
    pub fn new(
        cache: PluginCache,
        server: Arc<dyn ChunkSource>,
        config: DownloadConfig,
        metrics: Metrics,
        agent_id: String,
        mesh: Option<MeshNode>,
    ) -> Self {
        Self {
            mesh,
            download_limit: arcade_p2p::mesh::limiter::RateLimiter::unlimited(),
            permits: Arc::new(Semaphore::new(config.concurrent as usize)),
            cache,
            server,
            config,
            metrics,
            agent_id,
            inflight: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    /// Limits every fetch together to `bytes_per_s` (0 = unlimited), peers and the
    /// coordinator alike (`mesh.download_rate`); one chunk of burst.
    pub fn limit_downloads(mut self, bytes_per_s: u64) -> Self {
        self.download_limit =
            arcade_p2p::mesh::limiter::RateLimiter::new(bytes_per_s, u64::from(MAX_CHUNK_BURST));
        self
    }

    /// Contents being fetched now (or waiting for a fetch slot).
    pub fn fetching(&self) -> Vec<ContentId> {
        self.inflight
            .lock()
            .expect("inflight lock")
            .keys()
            .copied()
            .collect()
    }

    /// Makes sure the plugin `info` describes is in the cache, fetching what is missing.
    pub async fn ensure(
        &self,
        info: &pb::PluginInfo,
        cancel: &CancellationToken,
    ) -> Result<Fetched, FetchError> {
        let shown = format!("{}@{}", info.plugin_id, info.version);
        let bad = |reason: String| FetchError::BadInfo {
            plugin: shown.clone(),
            reason,
        };
        let plugin =
            PluginRef::new(&info.plugin_id, &info.version).map_err(|e| bad(e.to_string()))?;
        let sha: ContentId = info
            .checksum
            .parse()
            .map_err(|e| bad(format!("checksum: {e}")))?;
        let manifest = Manifest::from_proto(
            info.manifest
                .as_ref()
                .ok_or_else(|| bad("no manifest".into()))?,
        )
        .map_err(|e| bad(format!("manifest: {e}")))?;
        if manifest.content_id() != sha || manifest.size() != info.size as u64 {
            return Err(bad("manifest does not match the checksum and size".into()));
        }
        let cache_err = |source: CacheError| FetchError::Cache {
            plugin: shown.clone(),
            source: Box::new(source),
        };
        // Peers may ask us for this content from now on (partial chunks included).
        if let Some(mesh) = &self.mesh {
            mesh.learn(info, &manifest).await;
        }

        let lookup =
            |cache: PluginCache, plugin: PluginRef| blocking(move || cache.get(&plugin, &sha));
        if let Some(hit) = lookup(self.cache.clone(), plugin.clone())
            .await
            .map_err(cache_err)?
        {
            self.metrics.cache_hits.inc();
            return Ok(Fetched {
                plugin: hit,
                cache_hit: true,
                bytes_by_source: HashMap::new(),
                swarm: SchedulerStats::default(),
            });
        }
        let lock = {
            let mut map = self.inflight.lock().expect("inflight lock");
            map.entry(sha).or_default().clone()
        };
        let _same_content = lock.lock().await;
        // Another job may have fetched it while we waited.
        if let Some(hit) = lookup(self.cache.clone(), plugin.clone())
            .await
            .map_err(cache_err)?
        {
            self.metrics.cache_hits.inc();
            return Ok(Fetched {
                plugin: hit,
                cache_hit: true,
                bytes_by_source: HashMap::new(),
                swarm: SchedulerStats::default(),
            });
        }
        self.metrics.cache_misses.inc();
        let _permit = tokio::select! {
            p = self.permits.acquire() => p.map_err(|_| FetchError::Cancelled(shown.clone()))?,
            _ = cancel.cancelled() => return Err(FetchError::Cancelled(shown)),
        };
        let started = Instant::now();
        let hints = info
            .peer_hints
            .iter()
            .filter_map(|h| {
                let peer: PeerId = h.peer_id.parse().ok()?;
                let addrs = h.addrs.iter().filter_map(|a| a.parse().ok()).collect();
                Some((peer, addrs))
            })
            .collect();
        let deadline = self.config.timeout.get();
        let result = match tokio::time::timeout(
            deadline,
            self.patch_or_fetch(&plugin, &manifest, info, hints, cancel),
        )
        .await
        {
            Ok(r) => r,
            Err(_) => Err(FetchError::TimedOut {
                plugin: shown.clone(),
                after: deadline,
            }),
        };
        {
            let mut map = self.inflight.lock().expect("inflight lock");
            if map.get(&sha).is_some_and(|l| Arc::strong_count(l) <= 2) {
                map.remove(&sha);
            }
        }
        let status = if result.is_ok() { "success" } else { "failed" };
        self.metrics
            .downloads
            .get_or_create(&DownloadLabels {
                plugin_id: plugin.id.to_string(),
                version: plugin.version.to_string(),
                status: status.into(),
            })
            .inc();
        let elapsed = started.elapsed();
        self.metrics.update_peer_hit_ratio();
        match &result {
            Ok(f) => {
                self.metrics
                    .download_duration
                    .get_or_create(&PluginIdLabel {
                        plugin_id: plugin.id.to_string(),
                    })
                    .observe(elapsed.as_secs_f64());
                tracing::info!(
                    agent = %self.agent_id,
                    plugin = %plugin.id,
                    version = %plugin.version,
                    size = manifest.size(),
                    checksum = %&sha.to_hex()[..12],
                    duration_ms = elapsed.as_millis() as u64,
                    bytes_from_server = f.bytes_by_source.get("server").copied().unwrap_or(0),
                    bytes_from_peers = f.bytes_by_source.get("peer").copied().unwrap_or(0),
                    bytes_reused_locally = f.bytes_by_source.get(LOCAL_SOURCE).copied().unwrap_or(0),
                    "plugin downloaded"
                );
                let st = &f.swarm;
                tracing::debug!(
                    plugin = %plugin.id,
                    requests_to_peers = st.requests_to_peers,
                    requests_to_server = st.requests_to_server,
                    duplicates = st.duplicates,
                    endgame_duplicates = st.endgame_duplicates,
                    cancels = st.cancels,
                    timeouts = st.timeouts,
                    failures = st.failures,
                    bans = st.bans,
                    peer_busy = st.peer_busy,
                    server_busy = st.server_busy,
                    late_chunks = st.late_chunks,
                    slow_strikes = st.slow_strikes,
                    "swarm scheduler counters"
                );
            }
            Err(e) => {
                tracing::warn!(agent = %self.agent_id, plugin = %plugin, error = %e, "plugin download failed")
            }
        }
        result
    }

    /// Through a patch from a version this agent holds, when the coordinator offers
    /// one and it works (`patch.rs`); else the whole content.
    async fn patch_or_fetch(
        &self,
        plugin: &PluginRef,
        manifest: &Manifest,
        info: &pb::PluginInfo,
        hints: Vec<(PeerId, Vec<Multiaddr>)>,
        cancel: &CancellationToken,
    ) -> Result<Fetched, FetchError> {
        if self.config.patches && !info.patches.is_empty() {
            match self.via_patch(plugin, manifest, info, cancel).await {
                Ok(Some(fetched)) => return Ok(fetched),
                Ok(None) => {}
                Err(why) => {
                    self.metrics.patch_fallbacks.inc();
                    tracing::warn!(plugin = %plugin, error = %why, "patch not used: fetching the whole version");
                }
            }
        }
        self.fetch_and_publish(plugin, manifest, hints, cancel)
            .await
    }

    async fn fetch_and_publish(
        &self,
        plugin: &PluginRef,
        manifest: &Manifest,
        hints: Vec<(PeerId, Vec<Multiaddr>)>,
        cancel: &CancellationToken,
    ) -> Result<Fetched, FetchError> {
        let (bytes_by_source, swarm) = self
            .fetch_content(plugin, false, manifest, hints, cancel)
            .await?;
        let (cache, p, m) = (self.cache.clone(), plugin.clone(), manifest.clone());
        let published = blocking(move || cache.publish(&p, &m))
            .await
            .map_err(|source| FetchError::Cache {
                plugin: plugin.to_string(),
                source: Box::new(source),
            })?;
        self.refresh_cache_metrics().await;
        Ok(Fetched {
            plugin: published,
            cache_hit: false,
            bytes_by_source,
            swarm,
        })
    }

    /// Fetches `manifest`'s content into its partial file (resuming what verifies),
    /// from the coordinator (asked by `plugin`, or by the content's SHA-256 when
    /// `by_content`) and peers. Returns the bytes by source and the scheduler's counters.
    async fn fetch_content(
        &self,
        plugin: &PluginRef,
        by_content: bool,
        manifest: &Manifest,
        hints: Vec<(PeerId, Vec<Multiaddr>)>,
        cancel: &CancellationToken,
    ) -> Result<(HashMap<&'static str, u64>, SchedulerStats), FetchError> {
        let shown = plugin.to_string();
        let cache_err = |source: CacheError| FetchError::Cache {
            plugin: shown.clone(),
            source: Box::new(source),
        };
        let sha = manifest.content_id();
        let path = self.cache.partial_path(&sha);
        let (cache, m, p) = (self.cache.clone(), manifest.clone(), path.clone());
        // Open the partial file at full size (once the disk has room for what is still
        // missing), keep the recorded chunks that verify and copy those that held
        // content has.
        let (file, have, resumed, reused) = blocking(move || {
            cache.check_space(&m)?;
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&p)?;
            if file.metadata()?.len() != m.size() {
                file.set_len(m.size())?;
            }
            let mut have = vec![false; m.chunk_count() as usize];
            let recorded = cache.load_progress(&m.content_id())?;
            let mut buf = Vec::new();
            for i in recorded {
                let Some(range) = m.chunk_range(i) else {
                    continue;
                };
                buf.resize((range.end - range.start) as usize, 0);
                use std::os::unix::fs::FileExt as _;
                if file.read_exact_at(&mut buf, range.start).is_ok()
                    && m.verify_chunk(i, &buf).is_ok()
                {
                    have[i as usize] = true;
                }
            }
            let resumed = have.iter().filter(|h| **h).count();
            let reused = cache.reuse_held_chunks(&m, &file, &mut have)?;
            if reused.chunks > 0 {
                let done: Vec<u32> = (0..have.len() as u32)
                    .filter(|&i| have[i as usize])
                    .collect();
                cache.save_progress(&m.content_id(), &done)?;
            }
            Ok((Arc::new(file), have, resumed, reused))
        })
        .await
        .map_err(cache_err)?;
        if resumed > 0 {
            tracing::info!(plugin = %plugin, chunks = resumed, of = have.len(), "resuming download");
        }
        if reused.chunks > 0 {
            tracing::info!(
                plugin = %plugin,
                chunks = reused.chunks,
                of = have.len(),
                bytes = reused.bytes,
                from_contents = reused.sources,
                "chunks reused from content this agent holds"
            );
            self.metrics
                .fetched_bytes
                .get_or_create(&SourceLabel {
                    source: LOCAL_SOURCE.into(),
                })
                .inc_by(reused.bytes);
        }
        let mut held = Bitfield::new(manifest.chunk_count());
        for (i, h) in have.iter().enumerate() {
            if *h {
                held.set(i as u32);
            }
        }
        if let Some(mesh) = &self.mesh {
            mesh.fetch_started(manifest.content_id(), &held);
        }
        let mut run = FetchRun {
            fetcher: self,
            plugin,
            by_content,
            manifest,
            file,
            have,
            scheduler: Scheduler::new(
                manifest.chunk_count(),
                held,
                {
                    let config = scheduler_config(&self.config);
                    SchedulerConfig {
                        server_fallback_after: first_copy_delay(
                            config.server_fallback_after,
                            self.mesh.as_ref().map_or(0, MeshNode::upload_rate),
                            u64::from(manifest.max_chunk_len()),
                        ),
                        ..config
                    }
                },
                rand::rng().random(),
            ),
            started: tokio::time::Instant::now(),
            tasks: JoinSet::new(),
            inflight: HashMap::new(),
            peers: HashMap::new(),
            bytes_by_source: if reused.bytes > 0 {
                HashMap::from([(LOCAL_SOURCE, reused.bytes)])
            } else {
                HashMap::new()
            },
            server_failures: 0,
            last_error: String::new(),
            since_save: 0,
            news: tokio::sync::mpsc::channel(run::NEWS_QUEUE),
        };
        let driven = run.drive(hints, cancel).await;
        if let Some(mesh) = &self.mesh {
            // From here on the published file (or the progress records) tell peers.
            mesh.fetch_ended(&manifest.content_id());
        }
        driven?;
        let bytes_by_source = std::mem::take(&mut run.bytes_by_source);
        let swarm = run.scheduler.stats();
        Ok((bytes_by_source, swarm))
    }

    async fn save_progress(&self, sha: ContentId, have: &[bool]) {
        let done: Vec<u32> = (0..have.len() as u32)
            .filter(|&i| have[i as usize])
            .collect();
        let cache = self.cache.clone();
        if let Err(e) = blocking(move || cache.save_progress(&sha, &done)).await {
            tracing::warn!(content = %sha, error = %e, "cannot record download progress");
        }
    }

    /// Brings the cache metrics up to date (bytes gauge, eviction counters) after a
    /// publish or an eviction pass.
    pub async fn refresh_cache_metrics(&self) {
        let cache = self.cache.clone();
        let Ok(stats) = blocking(move || cache.stats()).await else {
            return;
        };
        self.metrics.cache_bytes.set(stats.downloaded_bytes as i64);
        for (reason, total) in [
            ("size", stats.evicted_by_size),
            ("ttl", stats.evicted_by_ttl),
        ] {
            let counter = self.metrics.cache_evictions.get_or_create(&ReasonLabel {
                reason: reason.into(),
            });
            let seen = counter.get();
            if total > seen {
                counter.inc_by(total - seen);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slow_uplinks_ask_the_coordinator_later_within_bounds() {
        let ms = Duration::from_millis;
        let floor = scheduler_config(&DownloadConfig::default()).server_fallback_after;
        assert_eq!(floor, ms(100));
        // Unlimited or fast: the scheduler's own fallback delay.
        assert_eq!(first_copy_delay(floor, 0, 1 << 20), floor);
        assert_eq!(first_copy_delay(floor, 20 << 20, 1 << 20), floor);
        // Two chunk-times of the uplink: 256 KiB at 1 MiB/s.
        assert_eq!(first_copy_delay(floor, 1 << 20, 256 << 10), ms(500));
        // Capped at 2 s however slow.
        assert_eq!(first_copy_delay(floor, 1, 1 << 20), ms(2000));
        assert_eq!(first_copy_delay(floor, 256 << 10, 1 << 20), ms(2000));
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let base = Duration::from_millis(100);
        for attempt in 0..20 {
            let d = backoff(base, attempt);
            let nominal = base
                .saturating_mul(1 << attempt.min(16))
                .min(Duration::from_secs(30));
            assert!(
                d >= nominal.mul_f64(0.5) && d <= nominal.mul_f64(1.5),
                "{attempt}: {d:?}"
            );
        }
    }
}
