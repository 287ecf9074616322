//! Coordinator configuration: a TOML file (every key optional) with `ARCADE_…`
//! environment overrides, then command-line overrides, validated before any port is bound.
//!
//! The original design's keys live under `[plugin]` and `[plugin.security]`; the rest
//! (listeners, data directory, tokens, job leasing) are ours. `arcade-coordinator
//! --print-default-config` prints [`DEFAULT_CONFIG_TOML`], which documents every key.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use arcade_p2p::manifest::check_chunk_size;
use arcade_p2p::settings::{self, ByteSize, Seconds, SettingsError};
use serde::{Deserialize, Serialize};

/// Prefix of every environment override.
pub const ENV_PREFIX: &str = "ARCADE";

/// The whole coordinator configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CoordinatorConfig {
    /// gRPC listen address (port 0 picks a free port).
    pub listen: String,
    /// Prometheus `/metrics` listen address, or `off`.
    pub metrics_listen: String,
    /// Directory for the redb database, generated tokens and (by default) blobs.
    pub data_dir: PathBuf,
    /// Admin token for plugin and job calls; empty = generate one into
    /// `<data_dir>/admin.token` on first start.
    pub admin_token: String,
    /// Enrollment token agents present to `Register`; empty = generate one into
    /// `<data_dir>/enroll.token` on first start.
    pub enroll_token: String,
    /// A file holding the admin token (instead of `admin_token`).
    pub admin_token_file: PathBuf,
    /// A file holding the enrollment token (instead of `enroll_token`).
    pub enroll_token_file: PathBuf,
    /// Log format: `human` or `json`.
    pub log_format: LogFormat,
    /// Plugin storage (the original design's `[plugin]`).
    pub plugin: PluginConfig,
    /// Job leasing.
    pub jobs: JobsConfig,
    /// The agent mesh.
    pub mesh: MeshConfig,
    /// `[serve]`: serving plugin content (herd protection).
    pub serve: ServeConfig,
    /// `[agents]`: limits on the registered fleet.
    pub agents: AgentsConfig,
    /// `[store]`: the metadata database.
    pub store: StoreConfig,
    /// `[tls]`: TLS of the gRPC listener.
    pub tls: TlsConfig,
    /// `[grpc]`: limits of the gRPC listener.
    pub grpc: GrpcConfig,
}

/// `[grpc]`: what one client connection may hold.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GrpcConfig {
    /// Concurrent HTTP/2 streams (calls) per connection.
    pub max_streams_per_connection: u32,
    /// A connection that does not answer a keep-alive ping within this is closed.
    pub keepalive_timeout: Seconds,
    /// Open connections from one IP address; more are closed on accept (0 = no limit).
    pub max_connections_per_address: u32,
    /// A call whose request body sends nothing for this long is ended (its memory and
    /// slots freed).
    pub request_idle_timeout: Seconds,
}

impl Default for GrpcConfig {
    fn default() -> Self {
        Self {
            max_streams_per_connection: 256,
            keepalive_timeout: Seconds::secs(20),
            max_connections_per_address: 1024,
            request_idle_timeout: Seconds::secs(30),
        }
    }
}

/// `[agents]`: bounds on what agents may make the coordinator remember.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AgentsConfig {
    /// Most registered agents; a Register for a new id beyond it is refused
    /// (RESOURCE_EXHAUSTED) until `arcadectl agent remove` makes room.
    pub max_agents: u32,
    /// Register calls accepted per second (burst of the same size); more are answered
    /// RESOURCE_EXHAUSTED with a retry hint (0 = unlimited).
    pub register_rate: u32,
    /// Most installed plugins one agent may declare.
    pub max_installed: u32,
    /// Label keys an agent may carry only with a value its enrolment token grants
    /// (besides these, every key a plugin's `allowed_labels` uses is restricted).
    pub restricted_label_keys: Vec<String>,
}

impl Default for AgentsConfig {
    fn default() -> Self {
        Self {
            max_agents: 20_000,
            register_rate: 500,
            max_installed: 10_000,
            restricted_label_keys: Vec::new(),
        }
    }
}

/// `[tls]`: TLS on the gRPC listener (rustls). Without a certificate the listener is
/// plaintext, which is allowed only on a loopback address or with `insecure = true`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain of the listener (re-read on SIGHUP and when it changes).
    pub cert: PathBuf,
    /// PEM private key of `cert`.
    pub key: PathBuf,
    /// PEM CA bundle: when set, every client must present a certificate it signed
    /// (mutual TLS; the bearer tokens are still required).
    pub client_ca: PathBuf,
    /// Serve plaintext gRPC on a non-loopback address.
    pub insecure: bool,
}

/// `[store]`: the embedded metadata database (redb).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StoreConfig {
    /// Page cache of the metadata database.
    pub cache_size: ByteSize,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            cache_size: ByteSize::mib(64),
        }
    }
}

/// `[serve]`: how the coordinator serves plugin content to agents.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServeConfig {
    /// Concurrent `DownloadPlugin` streams; more are answered RESOURCE_EXHAUSTED.
    pub max_streams: u32,
    /// Concurrent `DownloadPlugin` streams of one agent, so that one agent cannot hold
    /// every stream; more are answered RESOURCE_EXHAUSTED.
    pub max_streams_per_agent: u32,
    /// A `DownloadPlugin` stream whose next chunk the client has not taken for this long
    /// is ended (`DEADLINE_EXCEEDED`) and its slots freed.
    pub stall_timeout: Seconds,
    /// Total egress rate for plugin content, bytes per second (`0B` = unlimited).
    pub egress_rate: ByteSize,
    /// A chunk served to an agent within this window is not served again to another
    /// mesh agent: it is pointed at the holders instead.
    pub herd_window: Seconds,
    /// How often one agent is pointed at peers for one chunk before it is served anyway
    /// (0 = never redirect).
    pub max_redirects: u32,
    /// zstd level of chunks sent to agents that ask for compressed chunks (1–19; 0 =
    /// always raw). A chunk goes compressed only when it shrinks to 7/8 or less.
    pub compression_level: u32,
}

impl Default for ServeConfig {
    fn default() -> Self {
        Self {
            max_streams: 64,
            max_streams_per_agent: 16,
            stall_timeout: Seconds::secs(30),
            egress_rate: ByteSize(0),
            herd_window: Seconds::secs(120),
            max_redirects: 8,
            compression_level: 3,
        }
    }
}

/// `[mesh]`: what the coordinator does for the agent mesh.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MeshConfig {
    /// Lifetime of the tickets that admit an agent's libp2p peer to the mesh; agents
    /// get a fresh one in a heartbeat once half of it has passed.
    pub ticket_ttl: Seconds,
}

impl Default for MeshConfig {
    fn default() -> Self {
        Self {
            ticket_ttl: Seconds::secs(3600),
        }
    }
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Human,
    /// One JSON object per line.
    Json,
}

/// Longest preheat (`plugin.preheat_pin`, `PreheatPluginRequest.pin_seconds`).
pub const MAX_PREHEAT_PIN: std::time::Duration = std::time::Duration::from_secs(30 * 86_400);

/// `[plugin]`: storage and limits of plugin content.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PluginConfig {
    /// Where content blobs are stored; empty = `<data_dir>/plugins`.
    pub storage_path: PathBuf,
    /// Largest accepted plugin (an integer is MiB, as in the original design).
    pub max_plugin_size: ByteSize,
    /// Chunk size of new manifests (power of two, 1KiB..64MiB).
    pub chunk_size: ByteSize,
    /// Keep decoded manifests and plugin records in memory.
    pub enable_cache: bool,
    /// How long a cached manifest or record is kept (integer = seconds).
    pub cache_ttl: Seconds,
    /// How long a preheat lasts and agents keep its content pinned, when the request
    /// does not say (integer = seconds).
    pub preheat_pin: Seconds,
    /// Most preheats active at once.
    pub max_preheats: u32,
    /// Patches built to each new version, from the newest older enabled versions (0 =
    /// none).
    pub patch_bases: u32,
    /// zstd level of patches (1–19; 19 makes patches about a third smaller and takes
    /// about a hundred times longer).
    pub patch_level: u32,
    /// Largest base plus target a patch is built for (both are held in memory).
    pub patch_max_size: ByteSize,
    /// `[plugin.security]`.
    pub security: SecurityConfig,
}

/// `[plugin.security]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SecurityConfig {
    /// A push must carry the expected SHA-256 of its content.
    pub require_checksum: bool,
    /// Accept content that is not an executable (ELF binary or `#!` script).
    pub allow_unsafe: bool,
}

/// `[jobs]`: leasing and long-polling.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct JobsConfig {
    /// A leased job whose agent sends no heartbeat for this long is re-queued.
    pub lease_ttl: Seconds,
    /// Heartbeat interval the coordinator asks agents to keep.
    pub heartbeat_interval: Seconds,
    /// A job leased this many times without a result fails.
    pub max_attempts: u32,
    /// Longest `FetchJob` long-poll.
    pub long_poll_max: Seconds,
    /// Longest command output tail kept per job.
    pub max_output_tail: ByteSize,
    /// Finished jobs are deleted this long after they finished (0 = kept forever).
    pub retention: Seconds,
}

impl Default for CoordinatorConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:50051".into(),
            metrics_listen: "127.0.0.1:9464".into(),
            data_dir: PathBuf::from("./arcade-data"),
            admin_token: String::new(),
            enroll_token: String::new(),
            admin_token_file: PathBuf::new(),
            enroll_token_file: PathBuf::new(),
            log_format: LogFormat::Human,
            plugin: PluginConfig::default(),
            jobs: JobsConfig::default(),
            mesh: MeshConfig::default(),
            serve: ServeConfig::default(),
            agents: AgentsConfig::default(),
            store: StoreConfig::default(),
            tls: TlsConfig::default(),
            grpc: GrpcConfig::default(),
        }
    }
}

impl Default for PluginConfig {
    fn default() -> Self {
        Self {
            storage_path: PathBuf::new(),
            max_plugin_size: ByteSize::mib(100),
            chunk_size: ByteSize::mib(1),
            enable_cache: true,
            cache_ttl: Seconds::secs(3600),
            preheat_pin: Seconds::secs(86_400),
            max_preheats: 64,
            patch_bases: 2,
            patch_level: 3,
            patch_max_size: ByteSize::mib(512),
            security: SecurityConfig::default(),
        }
    }
}

impl Default for SecurityConfig {
    fn default() -> Self {
        Self {
            require_checksum: true,
            allow_unsafe: false,
        }
    }
}

impl Default for JobsConfig {
    fn default() -> Self {
        Self {
            lease_ttl: Seconds::secs(30),
            heartbeat_interval: Seconds::secs(10),
            max_attempts: 3,
            long_poll_max: Seconds::secs(30),
            max_output_tail: ByteSize::kib(64),
            retention: Seconds::secs(7 * 86_400),
        }
    }
}

/// The commented default configuration printed by `--print-default-config`.
pub const DEFAULT_CONFIG_TOML: &str = r##"# Arcade Mesh coordinator configuration. Every key is optional; the values below are
# the defaults. Any key can be overridden by an environment variable ARCADE_<PATH>,
# e.g. ARCADE_PLUGIN_MAX_PLUGIN_SIZE=200 or ARCADE_JOBS_LEASE_TTL=1m.
# Sizes: an integer is MiB, or a string like "512KiB", "1GiB".
# Durations: an integer is seconds, or a string like "500ms", "30s", "5m", "2h".

# gRPC listen address (port 0 picks a free port). Flag: --listen.
listen = "127.0.0.1:50051"
# Prometheus /metrics listen address, or "off". Flag: --metrics-listen.
metrics_listen = "127.0.0.1:9464"
# Directory of the redb database, generated tokens and (by default) plugin blobs.
# Flag: --data-dir.
data_dir = "./arcade-data"
# Admin token for plugin, job and fleet calls (at least 8 characters). Empty: one is
# generated on first start into <data_dir>/admin.token. Flag/env: --admin-token,
# ARCADE_ADMIN_TOKEN.
admin_token = ""
# Enrollment token agents present to Register. Empty: generated into
# <data_dir>/enroll.token. Flag/env: --enroll-token, ARCADE_ENROLL_TOKEN.
enroll_token = ""
# Files holding the tokens (mode 0600), instead of admin_token / enroll_token: a token
# given as a flag is visible to every local user. Flags: --admin-token-file,
# --enroll-token-file.
admin_token_file = ""
enroll_token_file = ""
# Log format: "human" or "json". Flag: --log-format.
log_format = "human"

[plugin]
# Where plugin content is stored, content-addressed. Empty: <data_dir>/plugins.
storage_path = ""
# Largest accepted plugin; larger pushes fail with RESOURCE_EXHAUSTED while streaming.
max_plugin_size = "100MiB"
# Chunk size of manifests for new content: a power of two from 1KiB to 64MiB.
chunk_size = "1MiB"
# Keep decoded manifests and plugin records in memory for cache_ttl.
enable_cache = true
cache_ttl = "1h"
# How long a preheat (arcadectl plugin preheat) lasts and agents keep its content
# pinned against eviction, unless the preheat says (--pin); at most 30d.
preheat_pin = "1d"
# Most preheats active at once (a new preheat of the same content and labels replaces
# the old one).
max_preheats = 64
# Patches (zstd with the older version as prefix) built in the background, one at a
# time, to each new version from this many of the newest older enabled versions of the
# same plugin (0 = none); kept only when at most 3/4 of the whole version compressed.
patch_bases = 2
# zstd level of patches: 3 builds a 24 MB executable's patch in 0.4 s; 19 makes it a
# third smaller in 40 s.
patch_level = 3
# Largest base plus target a patch is built for (both are read into memory).
patch_max_size = "512MiB"

[plugin.security]
# Every push must state the SHA-256 of its content (arcadectl computes it).
require_checksum = true
# Accept content that is neither an ELF executable nor a "#!" script.
allow_unsafe = false

[jobs]
# A leased job whose agent stops heart-beating for this long is re-queued.
lease_ttl = "30s"
# Heartbeat interval agents are told to keep (must be shorter than lease_ttl).
heartbeat_interval = "10s"
# A job leased this many times without a result is failed.
max_attempts = 3
# Longest FetchJob long-poll.
long_poll_max = "30s"
# Longest command output tail kept per job.
max_output_tail = "64KiB"
# Finished jobs (succeeded, failed, cancelled) are deleted this long after they
# finished, by a background sweep ("0s" = keep them forever).
retention = "7d"

[agents]
# Most registered agents; Register for a new id beyond this is refused with
# RESOURCE_EXHAUSTED until `arcadectl agent remove` makes room.
max_agents = 20000
# Register calls accepted per second (burst of the same size); more are answered
# RESOURCE_EXHAUSTED and agents retry (0 = unlimited).
register_rate = 500
# Most installed plugins one agent may declare (Register, Heartbeat).
max_installed = 10000
# Label keys an agent may carry only with a value its enrolment token grants
# (`arcadectl enroll create --label KEY=VALUE`). Every key some plugin's
# allowed_labels uses is restricted as well; other labels are the agent's own.
restricted_label_keys = []

[store]
# Page cache of the metadata database (<data_dir>/coordinator.redb).
cache_size = "64MiB"

[tls]
# PEM certificate chain and private key of the gRPC listener (rustls). Re-read on
# SIGHUP and when the files change; a bad new pair is logged and the old one kept.
cert = ""
key = ""
# PEM CA bundle: when set, clients must present a certificate it signed (mutual TLS).
client_ca = ""
# Without cert and key the listener is plaintext: allowed on a loopback address, or
# anywhere with insecure = true (tokens then cross the network in clear).
insecure = false

[grpc]
# Calls (HTTP/2 streams) one client connection may have open at once. Calls without a
# token the coordinator knows are refused before their body is read.
max_streams_per_connection = 256
# A connection that does not answer a keep-alive ping within this is closed.
keepalive_timeout = "20s"
# Open connections from one IP address; more are closed as they are accepted (0 = no
# limit). An agent keeps one; raise it for many agents behind one NAT address.
max_connections_per_address = 1024
# A call whose request body (a push, a report) sends nothing for this long is ended.
request_idle_timeout = "30s"

[mesh]
# Lifetime of the coordinator-signed tickets that admit an agent's libp2p peer to the
# mesh (signed with <data_dir>/mesh.key); renewed through heartbeats at half-life.
ticket_ttl = "1h"

[serve]
# Concurrent DownloadPlugin streams; more are answered RESOURCE_EXHAUSTED (agents retry).
max_streams = 64
# Concurrent DownloadPlugin streams of one agent (its token), so that one agent cannot
# hold every stream; more are answered RESOURCE_EXHAUSTED.
max_streams_per_agent = 16
# A DownloadPlugin stream whose client has not taken its next chunk for this long is
# ended with DEADLINE_EXCEEDED and its slots freed.
stall_timeout = "30s"
# Total egress for plugin content per second ("0B" = unlimited).
egress_rate = "0B"
# Herd protection: a chunk served to an agent within this window is not served to
# another mesh agent; it is pointed at the holders (peers) instead ...
herd_window = "2m"
# ... at most this many times per agent and chunk (each redirect asks the agent to
# wait: 300ms, doubling with each redirect up to 4.8s), then served anyway (0 = off).
max_redirects = 8
# zstd level (1-19) of chunks sent compressed to agents that ask; 0 = always raw.
# Compressed only when a chunk shrinks to 7/8 or less (incompressible content is given
# up after a few chunks).
compression_level = 3
"##;

/// Where a metrics listener should go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricsListen {
    /// No metrics listener.
    Off,
    /// Listen here.
    At(SocketAddr),
}

/// A configuration checked for consistency, with derived values resolved.
#[derive(Debug, Clone)]
pub struct ValidConfig {
    /// The configuration as given.
    pub raw: CoordinatorConfig,
    /// Parsed gRPC listen address.
    pub listen: SocketAddr,
    /// Parsed metrics listen address.
    pub metrics_listen: MetricsListen,
    /// Resolved blob storage directory.
    pub storage_path: PathBuf,
    /// Chunk size in bytes.
    pub chunk_size: u32,
}

impl CoordinatorConfig {
    /// Loads the file (if any) and the `ARCADE_…` environment overrides.
    pub fn load(
        path: Option<&Path>,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, SettingsError> {
        settings::load(path, ENV_PREFIX, env)
    }

    /// Checks every key; errors name the key.
    pub fn validate(mut self) -> Result<ValidConfig, SettingsError> {
        fn bad(key: &str, message: impl Into<String>) -> SettingsError {
            SettingsError::invalid(key, message)
        }
        for (file_key, file, token) in [
            (
                "admin_token_file",
                &self.admin_token_file,
                &mut self.admin_token,
            ),
            (
                "enroll_token_file",
                &self.enroll_token_file,
                &mut self.enroll_token,
            ),
        ] {
            if !file.as_os_str().is_empty() {
                if !token.is_empty() {
                    return Err(bad(
                        file_key,
                        format!(
                            "give {} or {file_key}, not both",
                            &file_key[..file_key.len() - 5]
                        ),
                    ));
                }
                *token = arcade_p2p::settings::read_secret(file_key, file)?;
            }
        }
        let listen: SocketAddr = self.listen.parse().map_err(|_| {
            bad(
                "listen",
                format!("{:?} is not an address like 127.0.0.1:50051", self.listen),
            )
        })?;
        let metrics_listen = if self.metrics_listen == "off" {
            MetricsListen::Off
        } else {
            MetricsListen::At(self.metrics_listen.parse().map_err(|_| {
                bad(
                    "metrics_listen",
                    format!(
                        "{:?} is not an address like 127.0.0.1:9464 or \"off\"",
                        self.metrics_listen
                    ),
                )
            })?)
        };
        if self.data_dir.as_os_str().is_empty() {
            return Err(bad("data_dir", "must not be empty"));
        }
        for (key, token) in [
            ("admin_token", &self.admin_token),
            ("enroll_token", &self.enroll_token),
        ] {
            if !token.is_empty()
                && (token.len() < 8
                    || token.len() > 512
                    || token.chars().any(|c| c.is_whitespace() || c.is_control()))
            {
                return Err(bad(
                    key,
                    "a token must be 8 to 512 characters without whitespace (or empty to generate one)",
                ));
            }
        }
        if !self.admin_token.is_empty() && self.admin_token == self.enroll_token {
            return Err(bad("enroll_token", "must differ from admin_token"));
        }
        let p = &self.plugin;
        if p.max_plugin_size.bytes() == 0 || p.max_plugin_size > ByteSize(1 << 40) {
            return Err(bad("plugin.max_plugin_size", "must be between 1B and 1TiB"));
        }
        let chunk_size = check_chunk_size(p.chunk_size.bytes())
            .map_err(|e| bad("plugin.chunk_size", e.to_string()))?;
        let chunks = p.max_plugin_size.bytes().div_ceil(u64::from(chunk_size));
        if chunks > arcade_p2p::manifest::MAX_CHUNKS {
            return Err(bad(
                "plugin.chunk_size",
                format!(
                    "{} chunks of {} would be needed for plugin.max_plugin_size; raise the chunk size",
                    chunks, p.chunk_size
                ),
            ));
        }
        if p.enable_cache && p.cache_ttl.get().is_zero() {
            return Err(bad(
                "plugin.cache_ttl",
                "must be positive when enable_cache = true",
            ));
        }
        if p.preheat_pin.get().is_zero() || p.preheat_pin.get() > MAX_PREHEAT_PIN {
            return Err(bad("plugin.preheat_pin", "must be between 1s and 30d"));
        }
        if p.patch_bases > 16 {
            return Err(bad("plugin.patch_bases", "must be at most 16"));
        }
        if p.patch_level == 0 || p.patch_level > arcade_p2p::compress::MAX_LEVEL as u32 {
            return Err(bad("plugin.patch_level", "must be between 1 and 19"));
        }
        if p.patch_max_size > ByteSize(1 << arcade_p2p::delta::MAX_WINDOW_LOG) {
            return Err(bad("plugin.patch_max_size", "must be at most 2GiB"));
        }
        if p.max_preheats == 0 || p.max_preheats > 1024 {
            return Err(bad("plugin.max_preheats", "must be between 1 and 1024"));
        }
        let j = &self.jobs;
        if j.lease_ttl.get() < std::time::Duration::from_millis(500)
            || j.lease_ttl.get() > std::time::Duration::from_secs(86_400)
        {
            return Err(bad("jobs.lease_ttl", "must be between 500ms and 1d"));
        }
        if j.heartbeat_interval.get().is_zero() || j.heartbeat_interval >= j.lease_ttl {
            return Err(bad(
                "jobs.heartbeat_interval",
                "must be positive and shorter than jobs.lease_ttl",
            ));
        }
        if j.max_attempts == 0 || j.max_attempts > 100 {
            return Err(bad("jobs.max_attempts", "must be between 1 and 100"));
        }
        if j.long_poll_max.get() > std::time::Duration::from_secs(300) {
            return Err(bad("jobs.long_poll_max", "must be at most 5m"));
        }
        if j.max_output_tail > ByteSize::mib(1) {
            return Err(bad("jobs.max_output_tail", "must be at most 1MiB"));
        }
        if j.retention.get() > std::time::Duration::from_secs(10 * 365 * 86_400) {
            return Err(bad("jobs.retention", "must be at most 10 years (or 0s)"));
        }
        let a = &self.agents;
        if a.max_agents == 0 || a.max_agents > 10_000_000 {
            return Err(bad("agents.max_agents", "must be between 1 and 10000000"));
        }
        if a.register_rate > 1_000_000 {
            return Err(bad(
                "agents.register_rate",
                "must be at most 1000000 (0 = unlimited)",
            ));
        }
        if a.max_installed > 100_000 {
            return Err(bad("agents.max_installed", "must be at most 100000"));
        }
        if a.restricted_label_keys.len() > arcade_p2p::labels::MAX_LABELS {
            return Err(bad(
                "agents.restricted_label_keys",
                "must list at most 64 keys",
            ));
        }
        for key in &a.restricted_label_keys {
            arcade_p2p::labels::parse_label(&format!("{key}=x"))
                .map_err(|e| bad("agents.restricted_label_keys", e.to_string()))?;
        }
        if self.store.cache_size < ByteSize::mib(1) || self.store.cache_size > ByteSize(1 << 40) {
            return Err(bad("store.cache_size", "must be between 1MiB and 1TiB"));
        }
        if self.grpc.max_streams_per_connection == 0
            || self.grpc.max_streams_per_connection > 100_000
        {
            return Err(bad(
                "grpc.max_streams_per_connection",
                "must be between 1 and 100000",
            ));
        }
        let idle = self.grpc.request_idle_timeout.get();
        if idle < std::time::Duration::from_secs(1) || idle > std::time::Duration::from_secs(3600) {
            return Err(bad(
                "grpc.request_idle_timeout",
                "must be between 1s and 1h",
            ));
        }
        if self.grpc.keepalive_timeout.get() < std::time::Duration::from_secs(1) {
            return Err(bad("grpc.keepalive_timeout", "must be at least 1s"));
        }
        if self.serve.max_streams == 0 || self.serve.max_streams > 100_000 {
            return Err(bad("serve.max_streams", "must be between 1 and 100000"));
        }
        if self.serve.max_streams_per_agent == 0
            || self.serve.max_streams_per_agent > self.serve.max_streams
        {
            return Err(bad(
                "serve.max_streams_per_agent",
                "must be between 1 and serve.max_streams",
            ));
        }
        let stall = self.serve.stall_timeout.get();
        if stall < std::time::Duration::from_secs(1) || stall > std::time::Duration::from_secs(3600)
        {
            return Err(bad("serve.stall_timeout", "must be between 1s and 1h"));
        }
        if self.serve.compression_level > arcade_p2p::compress::MAX_LEVEL as u32 {
            return Err(bad(
                "serve.compression_level",
                "must be between 0 (off) and 19",
            ));
        }
        if self.serve.max_redirects > 100 {
            return Err(bad("serve.max_redirects", "must be at most 100"));
        }
        let ttl = self.mesh.ticket_ttl.get();
        if ttl < std::time::Duration::from_secs(60)
            || ttl > std::time::Duration::from_secs(7 * 86_400)
        {
            return Err(bad("mesh.ticket_ttl", "must be between 1m and 7d"));
        }
        let storage_path = if p.storage_path.as_os_str().is_empty() {
            self.data_dir.join("plugins")
        } else {
            p.storage_path.clone()
        };
        let t = &self.tls;
        let set = |p: &PathBuf| !p.as_os_str().is_empty();
        if set(&t.cert) != set(&t.key) {
            return Err(bad(
                "tls.cert",
                "tls.cert and tls.key go together: set both or neither",
            ));
        }
        if set(&t.client_ca) && !set(&t.cert) {
            return Err(bad(
                "tls.client_ca",
                "mutual TLS needs tls.cert and tls.key too",
            ));
        }
        if !set(&t.cert) && !t.insecure && !listen.ip().is_loopback() {
            return Err(bad(
                "tls.cert",
                format!(
                    "listen {listen} is not a loopback address: set tls.cert and tls.key, or tls.insecure = true to serve plaintext gRPC"
                ),
            ));
        }
        Ok(ValidConfig {
            listen,
            metrics_listen,
            storage_path,
            chunk_size,
            raw: self,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plaintext_is_for_loopback_or_when_chosen() {
        let remote = |tls: TlsConfig| CoordinatorConfig {
            listen: "0.0.0.0:50051".into(),
            tls,
            ..Default::default()
        };
        let err = remote(TlsConfig::default()).validate().unwrap_err();
        assert!(err.to_string().contains("tls.insecure"), "{err}");
        remote(TlsConfig {
            insecure: true,
            ..Default::default()
        })
        .validate()
        .unwrap();
        let half = remote(TlsConfig {
            cert: "c.pem".into(),
            ..Default::default()
        });
        assert!(half.validate().unwrap_err().to_string().contains("tls.key"));
        let mtls_only = CoordinatorConfig {
            tls: TlsConfig {
                client_ca: "ca.pem".into(),
                ..Default::default()
            },
            ..Default::default()
        };
        assert!(mtls_only.validate().is_err());
    }

    #[test]
    fn printed_default_config_is_the_default() {
        let parsed: CoordinatorConfig = toml::from_str(DEFAULT_CONFIG_TOML).unwrap();
        assert_eq!(parsed, CoordinatorConfig::default());
        CoordinatorConfig::default().validate().unwrap();
    }

    #[test]
    fn seed_only_file_is_valid() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(
            &path,
            "[plugin]\nstorage_path = \"./plugins\"\nmax_plugin_size = 100\nenable_cache = true\ncache_ttl = 3600\n\n[plugin.security]\nrequire_checksum = true\nallow_unsafe = false\n",
        )
        .unwrap();
        let c = CoordinatorConfig::load(Some(&path), |_| None).unwrap();
        assert_eq!(c.plugin.max_plugin_size, ByteSize::mib(100));
        let v = c.validate().unwrap();
        assert_eq!(v.storage_path, PathBuf::from("./plugins"));
    }

    #[test]
    fn validation_names_the_key() {
        type Mutation = fn(&mut CoordinatorConfig);
        let cases: Vec<(Mutation, &str)> = vec![
            (|c| c.listen = "nowhere".into(), "listen"),
            (|c| c.metrics_listen = "x".into(), "metrics_listen"),
            (
                |c| c.plugin.chunk_size = ByteSize(3000),
                "plugin.chunk_size",
            ),
            (
                |c| c.plugin.max_plugin_size = ByteSize(0),
                "plugin.max_plugin_size",
            ),
            (|c| c.jobs.max_attempts = 0, "jobs.max_attempts"),
            (
                |c| c.jobs.heartbeat_interval = Seconds::secs(60),
                "jobs.heartbeat_interval",
            ),
            (|c| c.admin_token = "short".into(), "admin_token"),
            (
                |c| c.plugin.cache_ttl = Seconds::secs(0),
                "plugin.cache_ttl",
            ),
        ];
        for (mutate, key) in cases {
            let mut c = CoordinatorConfig::default();
            mutate(&mut c);
            let err = c.validate().unwrap_err().to_string();
            assert!(err.contains(&format!("`{key}`")), "{err}");
        }
    }

    #[test]
    fn tokens_can_come_from_files_but_not_from_both() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("admin.token");
        std::fs::write(&file, "  from-a-file-123\n").unwrap();
        let c = CoordinatorConfig {
            admin_token_file: file.clone(),
            ..Default::default()
        };
        assert_eq!(c.validate().unwrap().raw.admin_token, "from-a-file-123");
        let both = CoordinatorConfig {
            admin_token: "inline-token-1".into(),
            admin_token_file: file,
            ..Default::default()
        };
        let err = both.validate().unwrap_err().to_string();
        assert!(
            err.contains("admin_token_file") && err.contains("not both"),
            "{err}"
        );
        let missing = CoordinatorConfig {
            enroll_token_file: dir.path().join("nope"),
            ..Default::default()
        };
        let err = missing.validate().unwrap_err().to_string();
        assert!(err.contains("enroll_token_file"), "{err}");
        std::fs::write(dir.path().join("empty"), "\n").unwrap();
        let empty = CoordinatorConfig {
            enroll_token_file: dir.path().join("empty"),
            ..Default::default()
        };
        assert!(
            empty
                .validate()
                .unwrap_err()
                .to_string()
                .contains("is empty")
        );
    }

    #[test]
    fn env_overrides_apply() {
        let c = CoordinatorConfig::load(None, |k| match k {
            "ARCADE_ADMIN_TOKEN" => Some("admin-token-1".into()),
            "ARCADE_PLUGIN_SECURITY_ALLOW_UNSAFE" => Some("true".into()),
            "ARCADE_JOBS_LEASE_TTL" => Some("2m".into()),
            _ => None,
        })
        .unwrap();
        assert_eq!(c.admin_token, "admin-token-1");
        assert!(c.plugin.security.allow_unsafe);
        assert_eq!(c.jobs.lease_ttl, Seconds::secs(120));
    }
}
