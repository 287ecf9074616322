//! Prometheus metrics of one coordinator, in its own registry (no global state), served
//! as text on `/metrics` by `arcade_p2p::metrics_http`.
//!
//! | name | type | labels |
//! |---|---|---|
//! | `plugin_download_total` | counter | `plugin_id`, `version`, `status`: plugin fetches served (one agent, one content, any number of calls; `service/fetches.rs`) that ended `complete` (every chunk from here), `partial` (the rest from peers) or `failed`; requests refused: `denied`, `error` (unknown plugin or bad input, labelled `unknown`) |
//! | `plugin_download_duration_seconds` | histogram | `plugin_id` (first to last chunk served of a fetch) |
//! | `arcade_coordinator_served_bytes_total` | counter | `plugin_id`, `version` |
//! | `arcade_coordinator_push_total` | counter | `status` (`created`, `existing`, `rejected`) |
//! | `arcade_coordinator_compression_saved_bytes_total` | counter | — |
//! | `arcade_coordinator_pushed_bytes_total` | counter | — |
//! | `arcade_coordinator_jobs_created_total` | counter | — |
//! | `arcade_coordinator_jobs_finished_total` | counter | `status` (`succeeded`, `failed`, `cancelled`) |
//! | `arcade_coordinator_leases_expired_total` | counter | `outcome` (`requeued`, `failed`, `cancelled`) |
//! | `arcade_coordinator_agent_registrations_total` | counter | — |
//! | `arcade_coordinator_chunk_redirects_total` | counter | — |
//! | `arcade_coordinator_store_writes_total` | counter | `op` (`create_job`, `claim_job`, `complete_job`, …) |
//! | `arcade_coordinator_store_commits_total` | counter | — |
//! | `arcade_coordinator_jobs_queued` | gauge | — |
//! | `arcade_coordinator_agents_waiting` | gauge | — |

use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Labels of a plugin download.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DownloadLabels {
    /// Plugin id.
    pub plugin_id: String,
    /// Version.
    pub version: String,
    /// Outcome.
    pub status: String,
}

/// Labels naming a plugin id.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PluginIdLabel {
    /// Plugin id.
    pub plugin_id: String,
}

/// Labels naming a plugin version.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PluginVersionLabels {
    /// Plugin id.
    pub plugin_id: String,
    /// Version.
    pub version: String,
}

/// A `status` or `outcome` label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StatusLabel {
    /// The status.
    pub status: String,
}

/// An `outcome` label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    /// The outcome.
    pub outcome: String,
}

/// An `op` label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OpLabel {
    /// The store operation.
    pub op: String,
}

/// What the metadata store counts: write operations and the group commits they
/// shared (so `writes / commits` is the batching factor).
#[derive(Clone, Debug, Default)]
pub struct StoreMetrics {
    writes: Family<OpLabel, Counter>,
    /// `arcade_coordinator_store_commits_total`.
    pub commits: Counter,
}

impl StoreMetrics {
    /// Counts one write operation `op`.
    pub fn writes(&self, op: &str) -> Counter {
        self.writes
            .get_or_create(&OpLabel { op: op.to_owned() })
            .clone()
    }

    /// Write operations `op` so far.
    pub fn write_count(&self, op: &str) -> u64 {
        self.writes(op).get()
    }

    /// Write transactions committed so far.
    pub fn commit_count(&self) -> u64 {
        self.commits.get()
    }
}

fn duration_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.005, 2.0, 16))
}

/// The coordinator's metric families.
#[derive(Clone)]
pub struct Metrics {
    registry: Arc<Registry>,
    /// `plugin_download_total`.
    pub downloads: Family<DownloadLabels, Counter>,
    /// `plugin_download_duration_seconds`.
    pub download_duration: Family<PluginIdLabel, Histogram, fn() -> Histogram>,
    /// `arcade_coordinator_served_bytes_total`.
    pub served_bytes: Family<PluginVersionLabels, Counter>,
    /// `arcade_coordinator_push_total`.
    pub pushes: Family<StatusLabel, Counter>,
    /// `arcade_coordinator_pushed_bytes_total`.
    pub pushed_bytes: Counter,
    /// `arcade_coordinator_compression_saved_bytes_total`.
    pub compression_saved_bytes: Counter,
    /// `arcade_coordinator_jobs_created_total`.
    pub jobs_created: Counter,
    /// `arcade_coordinator_jobs_finished_total`.
    pub jobs_finished: Family<StatusLabel, Counter>,
    /// `arcade_coordinator_leases_expired_total`.
    pub leases_expired: Family<OutcomeLabel, Counter>,
    /// `arcade_coordinator_agent_registrations_total`.
    pub registrations: Counter,
    /// `arcade_coordinator_chunk_redirects_total`.
    pub redirects: Counter,
    /// `arcade_coordinator_store_*`.
    pub store: StoreMetrics,
    /// `arcade_coordinator_jobs_queued`.
    pub jobs_queued: Gauge,
    /// `arcade_coordinator_agents_waiting`.
    pub agents_waiting: Gauge,
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
        let mut r = Registry::default();
        let downloads = Family::<DownloadLabels, Counter>::default();
        r.register(
            "plugin_download",
            "Plugin fetches served to agents (one agent, one content) by how they ended (complete; partial: the rest came from peers; failed), and refused requests (denied, error)",
            downloads.clone(),
        );
        let download_duration =
            Family::<PluginIdLabel, Histogram, fn() -> Histogram>::new_with_constructor(
                duration_histogram,
            );
        r.register(
            "plugin_download_duration_seconds",
            "Time from the first to the last chunk served in a plugin fetch",
            download_duration.clone(),
        );
        let served_bytes = Family::<PluginVersionLabels, Counter>::default();
        r.register(
            "arcade_coordinator_served_bytes",
            "Plugin content bytes sent to agents (on the wire: compressed chunks count their compressed size)",
            served_bytes.clone(),
        );
        let pushes = Family::<StatusLabel, Counter>::default();
        r.register(
            "arcade_coordinator_push",
            "Plugin pushes, by outcome",
            pushes.clone(),
        );
        let compression_saved_bytes = Counter::default();
        r.register(
            "arcade_coordinator_compression_saved_bytes",
            "Raw bytes of served chunks minus the bytes sent for them, for chunks sent zstd-compressed",
            compression_saved_bytes.clone(),
        );
        let pushed_bytes = Counter::default();
        r.register(
            "arcade_coordinator_pushed_bytes",
            "Plugin bytes received by pushes",
            pushed_bytes.clone(),
        );
        let jobs_created = Counter::default();
        r.register(
            "arcade_coordinator_jobs_created",
            "Jobs created",
            jobs_created.clone(),
        );
        let jobs_finished = Family::<StatusLabel, Counter>::default();
        r.register(
            "arcade_coordinator_jobs_finished",
            "Jobs finished, by status",
            jobs_finished.clone(),
        );
        let leases_expired = Family::<OutcomeLabel, Counter>::default();
        r.register(
            "arcade_coordinator_leases_expired",
            "Job leases that expired without a heartbeat",
            leases_expired.clone(),
        );
        let registrations = Counter::default();
        r.register(
            "arcade_coordinator_agent_registrations",
            "Agent Register calls accepted",
            registrations.clone(),
        );
        let redirects = Counter::default();
        r.register(
            "arcade_coordinator_chunk_redirects",
            "Chunk requests answered 'get it from peers' (herd protection)",
            redirects.clone(),
        );
        let store = StoreMetrics::default();
        r.register(
            "arcade_coordinator_store_writes",
            "Metadata write operations, by operation",
            store.writes.clone(),
        );
        r.register(
            "arcade_coordinator_store_commits",
            "Metadata write transactions committed (each a group commit of writes)",
            store.commits.clone(),
        );
        let jobs_queued = Gauge::default();
        r.register(
            "arcade_coordinator_jobs_queued",
            "Jobs queued and not yet leased",
            jobs_queued.clone(),
        );
        let agents_waiting = Gauge::default();
        r.register(
            "arcade_coordinator_agents_waiting",
            "Agents long-polling FetchJob with no job yet",
            agents_waiting.clone(),
        );
        Self {
            registry: Arc::new(r),
            downloads,
            download_duration,
            served_bytes,
            pushes,
            pushed_bytes,
            compression_saved_bytes,
            jobs_created,
            jobs_finished,
            leases_expired,
            registrations,
            redirects,
            store,
            jobs_queued,
            agents_waiting,
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        arcade_p2p::metrics_http::prometheus_text(&out)
    }
}
