//! Prometheus metrics of one coordinator, in its own registry (no global state), served
//! as text on `/metrics` by `arcade_p2p::metrics_http`.
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

/// Every metric family of the coordinator: the one list the registry's HELP texts and the
/// README's table come from.
pub const METRICS: &[MetricDoc] = &[
    MetricDoc {
        name: "plugin_download",
        kind: "counter",
        labels: "`plugin_id`, `version`, `status` (`complete`, `partial`, `failed`, `denied`, `error`)",
        help: "Plugin fetches served to agents, one agent and one content however many calls, by how they ended: complete (every chunk from the coordinator), partial (the agent asked for nothing more for 30 s: the rest came from peers), failed (a chunk could not be served); and refused requests: denied (access), error (unknown plugin or bad input, labelled unknown)",
    },
    MetricDoc {
        name: "plugin_download_duration_seconds",
        kind: "histogram",
        labels: "`plugin_id`",
        help: "Time from the first to the last chunk served in a complete or partial plugin fetch",
    },
    MetricDoc {
        name: "arcade_coordinator_served_bytes",
        kind: "counter",
        labels: "`plugin_id`, `version`",
        help: "Plugin content bytes sent to agents, by plugin (on the wire: a compressed chunk counts its compressed size)",
    },
    MetricDoc {
        name: "arcade_coordinator_push",
        kind: "counter",
        labels: "`status` (`created`, `existing`, `rejected`)",
        help: "Plugin pushes, by outcome",
    },
    MetricDoc {
        name: "arcade_coordinator_compression_saved_bytes",
        kind: "counter",
        labels: "—",
        help: "Raw bytes of served chunks minus the bytes sent for them, for chunks sent zstd-compressed",
    },
    MetricDoc {
        name: "arcade_coordinator_pushed_bytes",
        kind: "counter",
        labels: "—",
        help: "Plugin bytes received by pushes",
    },
    MetricDoc {
        name: "arcade_coordinator_jobs_created",
        kind: "counter",
        labels: "—",
        help: "Jobs created",
    },
    MetricDoc {
        name: "arcade_coordinator_jobs_finished",
        kind: "counter",
        labels: "`status` (`succeeded`, `failed`, `cancelled`)",
        help: "Jobs finished, by status",
    },
    MetricDoc {
        name: "arcade_coordinator_leases_expired",
        kind: "counter",
        labels: "`outcome` (`requeued`, `failed`, `cancelled`)",
        help: "Job leases ended by expiry (no heartbeat) or by the agent's removal, by what became of the job",
    },
    MetricDoc {
        name: "arcade_coordinator_agent_registrations",
        kind: "counter",
        labels: "—",
        help: "Agent Register calls accepted",
    },
    MetricDoc {
        name: "arcade_coordinator_chunk_redirects",
        kind: "counter",
        labels: "—",
        help: "Chunk requests answered 'get it from peers' (herd protection)",
    },
    MetricDoc {
        name: "arcade_coordinator_store_writes",
        kind: "counter",
        labels: "`op` (`create_job`, `claim_job`, `complete_job`, `put_agent`, …)",
        help: "Metadata write operations, by operation",
    },
    MetricDoc {
        name: "arcade_coordinator_store_commits",
        kind: "counter",
        labels: "—",
        help: "Metadata write transactions committed (each a group commit of writes; writes ÷ commits is the batching factor)",
    },
    MetricDoc {
        name: "arcade_coordinator_jobs_queued",
        kind: "gauge",
        labels: "—",
        help: "Jobs queued and not yet leased",
    },
    MetricDoc {
        name: "arcade_coordinator_agents_waiting",
        kind: "gauge",
        labels: "—",
        help: "Agents long-polling FetchJob with no job yet",
    },
];

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
    registry: Arc<DocumentedRegistry>,
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
        let served_bytes = Family::<PluginVersionLabels, Counter>::default();
        r.register("arcade_coordinator_served_bytes", served_bytes.clone());
        let pushes = Family::<StatusLabel, Counter>::default();
        r.register("arcade_coordinator_push", pushes.clone());
        let compression_saved_bytes = Counter::default();
        r.register(
            "arcade_coordinator_compression_saved_bytes",
            compression_saved_bytes.clone(),
        );
        let pushed_bytes = Counter::default();
        r.register("arcade_coordinator_pushed_bytes", pushed_bytes.clone());
        let jobs_created = Counter::default();
        r.register("arcade_coordinator_jobs_created", jobs_created.clone());
        let jobs_finished = Family::<StatusLabel, Counter>::default();
        r.register("arcade_coordinator_jobs_finished", jobs_finished.clone());
        let leases_expired = Family::<OutcomeLabel, Counter>::default();
        r.register("arcade_coordinator_leases_expired", leases_expired.clone());
        let registrations = Counter::default();
        r.register(
            "arcade_coordinator_agent_registrations",
            registrations.clone(),
        );
        let redirects = Counter::default();
        r.register("arcade_coordinator_chunk_redirects", redirects.clone());
        let store = StoreMetrics::default();
        r.register("arcade_coordinator_store_writes", store.writes.clone());
        r.register("arcade_coordinator_store_commits", store.commits.clone());
        let jobs_queued = Gauge::default();
        r.register("arcade_coordinator_jobs_queued", jobs_queued.clone());
        let agents_waiting = Gauge::default();
        r.register("arcade_coordinator_agents_waiting", agents_waiting.clone());
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

    /// The families registered (each documented in [`METRICS`]).
    pub fn registered(&self) -> &[&'static str] {
        self.registry.registered()
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        self.registry.render()
    }
}
