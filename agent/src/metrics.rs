//! Prometheus metrics of one agent, in its own registry (several agents can share a
//! process in simulations), served on `metrics_listen` by `arcade_p2p::metrics_http`.
//! Every family is documented in [`METRICS`] (name, type, labels, HELP text): the
//! registry takes its HELP texts from there and the README's metrics table is generated
//! from it (`tests/tests/docs.rs`), so the docs cannot drift from the code.

use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};

use arcade_p2p::metrics_http::{DocumentedRegistry, MetricDoc};

/// Every metric family of the agent: the one list the registry's HELP texts and the
/// README's table come from.
pub const METRICS: &[MetricDoc] = &[
    MetricDoc {
        name: "plugin_download",
        kind: "counter",
        labels: "`plugin_id`, `version`, `status` (`success`, `failed`)",
        help: "Plugin fetches (cache misses), by outcome",
    },
    MetricDoc {
        name: "plugin_download_duration_seconds",
        kind: "histogram",
        labels: "`plugin_id`",
        help: "Time from a cache miss to a verified plugin",
    },
    MetricDoc {
        name: "arcade_agent_fetched_bytes",
        kind: "counter",
        labels: "`source` (`server`, `peer`, `local`)",
        help: "Verified chunk bytes fetches obtained, by source: the coordinator, peers, or copied from content the agent already held",
    },
    MetricDoc {
        name: "arcade_agent_chunk_fetch_duration_seconds",
        kind: "histogram",
        labels: "`source` (`server`, `peer`)",
        help: "Time from asking for a chunk to receiving it, by source",
    },
    MetricDoc {
        name: "arcade_agent_peer_hit_ratio",
        kind: "gauge",
        labels: "—",
        help: "Share of the chunk bytes fetched over the network that came from peers rather than the coordinator, since start (0 to 1)",
    },
    MetricDoc {
        name: "arcade_agent_compressed_wire_bytes",
        kind: "counter",
        labels: "`direction` (`from_server`, `from_peers`, `to_peers`)",
        help: "Bytes on the wire of chunks that travelled zstd-compressed, by direction",
    },
    MetricDoc {
        name: "arcade_agent_compressed_raw_bytes",
        kind: "counter",
        labels: "`direction` (`from_server`, `from_peers`, `to_peers`)",
        help: "Raw bytes of chunks that travelled zstd-compressed, by direction",
    },
    MetricDoc {
        name: "arcade_agent_patch_bytes",
        kind: "counter",
        labels: "—",
        help: "Bytes of patches fetched to build new versions from held ones",
    },
    MetricDoc {
        name: "arcade_agent_patched_bytes",
        kind: "counter",
        labels: "—",
        help: "Bytes of versions built from a patch and verified",
    },
    MetricDoc {
        name: "arcade_agent_patch_fallbacks",
        kind: "counter",
        labels: "—",
        help: "Patches that could not be used (the whole version was fetched instead)",
    },
    MetricDoc {
        name: "arcade_agent_bad_chunks",
        kind: "counter",
        labels: "`source` (`server`, `peer`)",
        help: "Chunks that failed their BLAKE3 check or did not decompress to their manifest length, by source",
    },
    MetricDoc {
        name: "arcade_agent_peer_bans",
        kind: "counter",
        labels: "—",
        help: "Peers dropped for a content (bad chunks, repeated failures)",
    },
    MetricDoc {
        name: "arcade_agent_cache_hits",
        kind: "counter",
        labels: "—",
        help: "Plugins found in the cache",
    },
    MetricDoc {
        name: "arcade_agent_cache_misses",
        kind: "counter",
        labels: "—",
        help: "Plugins not in the cache",
    },
    MetricDoc {
        name: "arcade_agent_cache_evictions",
        kind: "counter",
        labels: "`reason` (`size`, `ttl`)",
        help: "Cache entries evicted, by reason (size: over the high watermark)",
    },
    MetricDoc {
        name: "arcade_agent_cache_bytes",
        kind: "gauge",
        labels: "—",
        help: "Bytes of downloaded plugins in the cache",
    },
    MetricDoc {
        name: "arcade_agent_jobs",
        kind: "counter",
        labels: "`status` (`succeeded`, `failed`, `cancelled`)",
        help: "Jobs run, by final status",
    },
    MetricDoc {
        name: "arcade_agent_running_jobs",
        kind: "gauge",
        labels: "—",
        help: "Jobs running now",
    },
    MetricDoc {
        name: "arcade_agent_uploaded_bytes",
        kind: "counter",
        labels: "—",
        help: "Chunk bytes served to peers",
    },
    MetricDoc {
        name: "arcade_agent_mesh_refused_requests",
        kind: "counter",
        labels: "—",
        help: "Peer requests refused (no ticket, labels, busy, unknown content or chunk)",
    },
    MetricDoc {
        name: "arcade_agent_mesh_cancelled_requests",
        kind: "counter",
        labels: "—",
        help: "Peer chunk requests cancelled by their requester before the chunk was sent",
    },
    MetricDoc {
        name: "arcade_agent_mesh_subscriptions",
        kind: "gauge",
        labels: "—",
        help: "Peers' /arcade/have/1 subscriptions to this agent's chunks, now",
    },
    MetricDoc {
        name: "arcade_agent_mesh_connected_peers",
        kind: "gauge",
        labels: "—",
        help: "libp2p peers connected now",
    },
    MetricDoc {
        name: "arcade_agent_mesh_provided_contents",
        kind: "gauge",
        labels: "—",
        help: "Contents announced (provider records) in the DHT now",
    },
];

/// `plugin_id`, `version`, `status`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DownloadLabels {
    /// Plugin id.
    pub plugin_id: String,
    /// Version.
    pub version: String,
    /// Outcome.
    pub status: String,
}

/// `plugin_id`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PluginIdLabel {
    /// Plugin id.
    pub plugin_id: String,
}

/// `source` of chunk bytes.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SourceLabel {
    /// `server` (the coordinator) or `peer`.
    pub source: String,
}

/// `direction` of compressed chunk bytes: `from_server`, `from_peers`, `to_peers`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirectionLabel {
    /// Where the chunks came from or went to.
    pub direction: String,
}

/// One string label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    /// Why.
    pub reason: String,
}

/// A job status.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StatusLabel {
    /// Status.
    pub status: String,
}

fn duration_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.005, 2.0, 18))
}

/// 0.5 ms to ~16 s.
fn chunk_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.0005, 2.0, 16))
}

/// The agent's metric families.
#[derive(Clone)]
pub struct Metrics {
    registry: Arc<DocumentedRegistry>,
    /// `plugin_download_total`.
    pub downloads: Family<DownloadLabels, Counter>,
    /// `plugin_download_duration_seconds`.
    pub download_duration: Family<PluginIdLabel, Histogram, fn() -> Histogram>,
    /// `arcade_agent_fetched_bytes_total`.
    pub fetched_bytes: Family<SourceLabel, Counter>,
    /// `arcade_agent_chunk_fetch_duration_seconds`.
    pub chunk_duration: Family<SourceLabel, Histogram, fn() -> Histogram>,
    /// `arcade_agent_peer_hit_ratio`.
    pub peer_hit_ratio: Gauge<f64, std::sync::atomic::AtomicU64>,
    /// `arcade_agent_compressed_wire_bytes_total`.
    pub compressed_wire: Family<DirectionLabel, Counter>,
    /// `arcade_agent_compressed_raw_bytes_total`.
    pub compressed_raw: Family<DirectionLabel, Counter>,
    /// `arcade_agent_patch_bytes_total`.
    pub patch_bytes: Counter,
    /// `arcade_agent_patched_bytes_total`.
    pub patched_bytes: Counter,
    /// `arcade_agent_patch_fallbacks_total`.
    pub patch_fallbacks: Counter,
    /// `arcade_agent_bad_chunks_total`.
    pub bad_chunks: Family<SourceLabel, Counter>,
    /// `arcade_agent_peer_bans_total`.
    pub peer_bans: Counter,
    /// `arcade_agent_cache_hits_total`.
    pub cache_hits: Counter,
    /// `arcade_agent_cache_misses_total`.
    pub cache_misses: Counter,
    /// `arcade_agent_cache_evictions_total`.
    pub cache_evictions: Family<ReasonLabel, Counter>,
    /// `arcade_agent_cache_bytes`.
    pub cache_bytes: Gauge,
    /// `arcade_agent_jobs_total`.
    pub jobs: Family<StatusLabel, Counter>,
    /// `arcade_agent_running_jobs`.
    pub running_jobs: Gauge,
    /// `arcade_agent_uploaded_bytes_total`.
    pub uploaded_bytes: Counter,
    /// `arcade_agent_mesh_refused_requests_total`.
    pub mesh_refused: Counter,
    /// `arcade_agent_mesh_cancelled_requests_total`.
    pub mesh_cancelled: Counter,
    /// `arcade_agent_mesh_subscriptions`.
    pub mesh_subscriptions: Gauge,
    /// `arcade_agent_mesh_connected_peers`.
    pub connected_peers: Gauge,
    /// `arcade_agent_mesh_provided_contents`.
    pub provided_contents: Gauge,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A fresh registry with every family registered.
    pub fn new() -> Self {
        let mut r = DocumentedRegistry::new(METRICS);
        let downloads = Family::<DownloadLabels, Counter>::default();
        r.register("plugin_download", downloads.clone());
        let download_duration =
            Family::<PluginIdLabel, Histogram, fn() -> Histogram>::new_with_constructor(
                duration_histogram,
            );
        r.register(
            "plugin_download_duration_seconds",
            download_duration.clone(),
        );
        let fetched_bytes = Family::<SourceLabel, Counter>::default();
        r.register("arcade_agent_fetched_bytes", fetched_bytes.clone());
        let chunk_duration =
            Family::<SourceLabel, Histogram, fn() -> Histogram>::new_with_constructor(
                chunk_histogram,
            );
        r.register(
            "arcade_agent_chunk_fetch_duration_seconds",
            chunk_duration.clone(),
        );
        let peer_hit_ratio = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
        r.register("arcade_agent_peer_hit_ratio", peer_hit_ratio.clone());
        let compressed_wire = Family::<DirectionLabel, Counter>::default();
        r.register(
            "arcade_agent_compressed_wire_bytes",
            compressed_wire.clone(),
        );
        let compressed_raw = Family::<DirectionLabel, Counter>::default();
        r.register("arcade_agent_compressed_raw_bytes", compressed_raw.clone());
        let patch_bytes = Counter::default();
        r.register("arcade_agent_patch_bytes", patch_bytes.clone());
        let patched_bytes = Counter::default();
        r.register("arcade_agent_patched_bytes", patched_bytes.clone());
        let patch_fallbacks = Counter::default();
        r.register("arcade_agent_patch_fallbacks", patch_fallbacks.clone());
        let bad_chunks = Family::<SourceLabel, Counter>::default();
        r.register("arcade_agent_bad_chunks", bad_chunks.clone());
        let peer_bans = Counter::default();
        r.register("arcade_agent_peer_bans", peer_bans.clone());
        let cache_hits = Counter::default();
        r.register("arcade_agent_cache_hits", cache_hits.clone());
        let cache_misses = Counter::default();
        r.register("arcade_agent_cache_misses", cache_misses.clone());
        let cache_evictions = Family::<ReasonLabel, Counter>::default();
        r.register("arcade_agent_cache_evictions", cache_evictions.clone());
        let cache_bytes = Gauge::default();
        r.register("arcade_agent_cache_bytes", cache_bytes.clone());
        let jobs = Family::<StatusLabel, Counter>::default();
        r.register("arcade_agent_jobs", jobs.clone());
        let running_jobs = Gauge::default();
        r.register("arcade_agent_running_jobs", running_jobs.clone());
        let uploaded_bytes = Counter::default();
        r.register("arcade_agent_uploaded_bytes", uploaded_bytes.clone());
        let mesh_refused = Counter::default();
        r.register("arcade_agent_mesh_refused_requests", mesh_refused.clone());
        let mesh_cancelled = Counter::default();
        r.register(
            "arcade_agent_mesh_cancelled_requests",
            mesh_cancelled.clone(),
        );
        let mesh_subscriptions = Gauge::default();
        r.register(
            "arcade_agent_mesh_subscriptions",
            mesh_subscriptions.clone(),
        );
        let connected_peers = Gauge::default();
        r.register("arcade_agent_mesh_connected_peers", connected_peers.clone());
        let provided_contents = Gauge::default();
        r.register(
            "arcade_agent_mesh_provided_contents",
            provided_contents.clone(),
        );
        Self {
            registry: Arc::new(r),
            downloads,
            download_duration,
            fetched_bytes,
            chunk_duration,
            peer_hit_ratio,
            compressed_wire,
            compressed_raw,
            patch_bytes,
            patched_bytes,
            patch_fallbacks,
            bad_chunks,
            peer_bans,
            cache_hits,
            cache_misses,
            cache_evictions,
            cache_bytes,
            jobs,
            running_jobs,
            uploaded_bytes,
            mesh_refused,
            mesh_cancelled,
            mesh_subscriptions,
            connected_peers,
            provided_contents,
        }
    }

    /// Sets `arcade_agent_peer_hit_ratio` from the byte counters.
    pub fn update_peer_hit_ratio(&self) {
        let (peer, server) = (self.fetched_from("peer"), self.fetched_from("server"));
        if peer + server > 0 {
            self.peer_hit_ratio
                .set(peer as f64 / (peer + server) as f64);
        }
    }

    /// Bytes fetched from `source` so far.
    pub fn fetched_from(&self, source: &str) -> u64 {
        self.fetched_bytes
            .get_or_create(&SourceLabel {
                source: source.into(),
            })
            .get()
    }

    /// A chunk of `raw` bytes arrived from the coordinator as `wire` compressed bytes.
    pub fn count_compressed(&self, source: &str, wire: u64, raw: u64) {
        let direction = DirectionLabel {
            direction: format!("from_{source}"),
        };
        self.compressed_wire.get_or_create(&direction).inc_by(wire);
        self.compressed_raw.get_or_create(&direction).inc_by(raw);
    }

    /// Bytes of compressed chunks in `direction` so far: (on the wire, raw).
    pub fn compressed(&self, direction: &str) -> (u64, u64) {
        let label = DirectionLabel {
            direction: direction.into(),
        };
        (
            self.compressed_wire.get_or_create(&label).get(),
            self.compressed_raw.get_or_create(&label).get(),
        )
    }

    /// Copies the mesh host's live counters into the metrics.
    pub fn sync_mesh(&self, stats: &arcade_p2p::mesh::host::HostStats) {
        use std::sync::atomic::Ordering::Relaxed;
        let catch_up = |counter: &Counter, total: u64| {
            let seen = counter.get();
            if total > seen {
                counter.inc_by(total - seen);
            }
        };
        catch_up(&self.uploaded_bytes, stats.uploaded_bytes.load(Relaxed));
        for (direction, wire, raw) in [
            (
                "from_peers",
                &stats.compressed_received_wire,
                &stats.compressed_received_raw,
            ),
            (
                "to_peers",
                &stats.compressed_sent_wire,
                &stats.compressed_sent_raw,
            ),
        ] {
            let label = DirectionLabel {
                direction: direction.into(),
            };
            catch_up(
                &self.compressed_wire.get_or_create(&label),
                wire.load(Relaxed),
            );
            catch_up(
                &self.compressed_raw.get_or_create(&label),
                raw.load(Relaxed),
            );
        }
        catch_up(&self.mesh_refused, stats.refused.load(Relaxed));
        catch_up(&self.mesh_cancelled, stats.cancelled.load(Relaxed));
        self.mesh_subscriptions
            .set(stats.subscriptions.load(Relaxed) as i64);
        self.connected_peers
            .set(stats.connected_peers.load(Relaxed) as i64);
        self.provided_contents
            .set(stats.provided.load(Relaxed) as i64);
    }

    /// The families registered (each documented in [`METRICS`]).
    pub fn registered(&self) -> &[&'static str] {
        self.registry.registered()
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        self.registry.render()
    }
}
