//! Agent configuration: a TOML file (every key optional) with `ARCADE_…` environment
//! overrides (the loader shared with the coordinator), then command-line overrides,
//! validated before anything starts. It holds every key of the original design's agent
//! config (`id`, `plugins.directory`, `download.*`, `cache.*`, `builtin`) plus the
//! fallback policy, job limits and the metrics listener. `arcade-agent
//! --print-default-config` prints [`DEFAULT_CONFIG_TOML`].

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use arcade_p2p::PluginRef;
use arcade_p2p::labels::{self, Labels};
use arcade_p2p::settings::{self, ByteSize, Seconds, SettingsError};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::cache::EvictionPolicy;

/// Prefix of every environment override.
pub const ENV_PREFIX: &str = "ARCADE";

/// The whole agent configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AgentConfig {
    /// Agent id; empty = the host name.
    pub id: String,
    /// Coordinator gRPC URL.
    pub coordinator: String,
    /// Enrollment token for `Register`.
    pub enroll_token: String,
    /// A file holding the enrollment token (instead of `enroll_token`).
    pub enroll_token_file: PathBuf,
    /// Base directory for plugins and job work directories; empty = `~/.arcade`.
    pub data_dir: PathBuf,
    /// Prometheus `/metrics` listen address, or `off`.
    pub metrics_listen: String,
    /// Jobs run at once.
    pub max_concurrent_jobs: u32,
    /// Log format: `human` or `json`.
    pub log_format: String,
    /// Labels reported at registration (`zone`, `os`, …).
    pub labels: BTreeMap<String, String>,
    /// `[plugins]`.
    pub plugins: PluginsConfig,
    /// `[download]`.
    pub download: DownloadConfig,
    /// `[cache]`.
    pub cache: CacheConfig,
    /// `[jobs]`.
    pub jobs: JobsConfig,
    /// `[mesh]`.
    pub mesh: MeshConfig,
    /// `[tls]`: how the coordinator's TLS is checked.
    pub tls: TlsConfig,
    /// `[trust]`: which publishers' signatures this agent accepts.
    pub trust: TrustConfig,
    /// `[[builtin]]`: pre-installed plugins, `plugin = "id@version"`, `file` under `builtin/`.
    pub builtin: Vec<BuiltinPlugin>,
}

/// `[trust]`: publisher signatures (`arcade_p2p::publisher`), checked against these keys
/// and never against the coordinator's word.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct TrustConfig {
    /// Publisher public keys, `ed25519:<64 hex digits>` (`arcadectl key generate`).
    pub publisher_keys: Vec<String>,
    /// Refuse to run a plugin that is unsigned or signed by a key not listed here.
    pub require_signature: bool,
    /// The same, for plugin ids starting with one of these prefixes only (`deploy/`).
    pub require_signature_for: Vec<String>,
}

/// `[tls]`: TLS towards the coordinator (an `https://` URL).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM CA bundle that signed the coordinator's certificate; empty = the system roots.
    pub ca: PathBuf,
    /// PEM client certificate, for a coordinator that requires mutual TLS.
    pub cert: PathBuf,
    /// PEM private key of `cert`.
    pub key: PathBuf,
    /// Allow a plaintext `http://` coordinator URL whose host is not loopback.
    pub insecure: bool,
}

impl TlsConfig {
    /// The client settings.
    pub fn client(&self) -> arcade_proto::ClientTls {
        arcade_proto::ClientTls {
            ca: self.ca.clone(),
            cert: self.cert.clone(),
            key: self.key.clone(),
            insecure: self.insecure,
        }
    }
}

/// `[plugins]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct PluginsConfig {
    /// Plugin cache root; empty = `<data_dir>/plugins`.
    pub directory: PathBuf,
}

/// What to do when a plugin cannot be had.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Fallback {
    /// Fail the job, naming the plugin and the last error.
    #[default]
    Fail,
    /// Use the newest cached version of the same plugin id, recorded in the results.
    PreviousVersion,
}

/// `[download]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DownloadConfig {
    /// Plugins fetched at once.
    pub concurrent: u32,
    /// Deadline of a whole plugin fetch (as the original design means it): a plugin
    /// not fetched and verified within it fails the job, naming this key.
    pub timeout: Seconds,
    /// Timeout of one chunk request (to the coordinator or a peer).
    pub request_timeout: Seconds,
    /// Attempts after the first failure (exponential backoff with jitter).
    pub retry: u32,
    /// First backoff delay (doubles per attempt, capped at 30 s, ±50 % jitter).
    pub backoff: Seconds,
    /// When a plugin cannot be had: `fail` or `previous-version`.
    pub fallback: Fallback,
    /// Ask peers and the coordinator for zstd-compressed chunks (they send a chunk
    /// compressed only when it shrinks; decompression is bounded by the manifest).
    pub compression: bool,
    /// Build a new version from a patch to a version this agent holds, when the
    /// coordinator offers one (falling back to the whole version on any failure).
    pub patches: bool,
    /// Most memory applying a patch may take: the base, the decoder's window and the
    /// new version together; larger patches are not used.
    pub patch_max_memory: ByteSize,
}

/// `[cache]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CacheConfig {
    /// Bytes of downloaded plugins kept (an integer is MiB, as in the original design).
    pub max_size: ByteSize,
    /// `lru`, `lfu` or `fifo`.
    pub eviction: EvictionPolicy,
    /// Unused downloaded plugins are dropped after this long (an integer is hours, as
    /// in the original design; `0` = never).
    pub ttl: HoursTtl,
    /// Size eviction starts when the cache's downloaded bytes exceed this fraction of
    /// `watermark_of` (0 < x ≤ 1)…
    pub high_watermark: f64,
    /// …and removes unpinned plugins until they are at most this fraction
    /// (0 < x ≤ high_watermark; absent: high_watermark).
    pub low_watermark: Option<f64>,
    /// `max_size` or `filesystem` (the file system holding the cache; `max_size` still
    /// caps both marks).
    pub watermark_of: crate::cache::WatermarkBase,
}

/// `[jobs]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct JobsConfig {
    /// Timeout of one plugin stage run.
    pub stage_timeout: Seconds,
    /// Timeout of the job's commands when the job sets none.
    pub command_timeout: Seconds,
    /// Output kept per stream (plugin stages) and for the command tail.
    pub max_output: ByteSize,
    /// On SIGTERM, running jobs get this long to finish before they are stopped and
    /// reported failed.
    pub shutdown_grace: Seconds,
    /// Longest FetchJob long-poll asked for.
    pub poll_wait: Seconds,
}

/// `[mesh]`: the agent's libp2p host.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MeshConfig {
    /// Run the host and serve cached chunks to vouched peers.
    pub enabled: bool,
    /// libp2p listen multiaddresses.
    pub listen: Vec<String>,
    /// Addresses to advertise; empty = the listen addresses, minus loopback,
    /// unspecified and docker-bridge (172.17.0.0/16) ones unless `allow_loopback`.
    pub advertise: Vec<String>,
    /// Also advertise loopback addresses (single-host fleets and tests).
    pub allow_loopback: bool,
    /// Node-wide upload rate to peers, bytes per second (`0B` = unlimited).
    pub upload_rate: ByteSize,
    /// Node-wide download rate, bytes per second, of every fetch together, from peers
    /// and from the coordinator alike (`0B` = unlimited; mesh off: the coordinator's).
    pub download_rate: ByteSize,
    /// Concurrent chunk uploads; more requests are answered "busy".
    pub max_uploads: u32,
    /// A chunk request that would wait longer than this behind uploads already queued
    /// for `upload_rate` is answered "busy", so its requester asks a faster holder
    /// (`0s` = no limit but `max_uploads`).
    pub max_upload_wait: Seconds,
    /// Most peers connected at once (half of them at most untrusted inbound peers).
    pub max_connections: u32,
    /// An inbound connection whose peer shows no valid ticket within this is closed.
    pub unvouched_timeout: Seconds,
    /// Run the Kademlia DHT (provider records and lookups) beside the coordinator's
    /// hints, announcements and askers. Off by default: it found no holder those did
    /// not, and its own bootstraps cost a 64-agent fleet 40 % of its CPU.
    pub dht: bool,
    /// How long a DHT provider record lives.
    pub provider_ttl: Seconds,
    /// How often provider records are republished.
    pub provider_republish: Seconds,
    /// zstd level of chunks sent to peers that ask for compressed chunks (1–19; 0 =
    /// always send raw). A chunk goes compressed only when it shrinks to 7/8 or less.
    pub compression_level: u32,
}

impl Default for MeshConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            listen: vec!["/ip4/0.0.0.0/tcp/0".into()],
            advertise: Vec::new(),
            allow_loopback: false,
            upload_rate: ByteSize(0),
            download_rate: ByteSize(0),
            max_uploads: 8,
            max_upload_wait: Seconds::secs(1),
            max_connections: 256,
            unvouched_timeout: Seconds::secs(10),
            dht: false,
            provider_ttl: Seconds::secs(15 * 60),
            provider_republish: Seconds::secs(5 * 60),
            compression_level: 1,
        }
    }
}

/// A builtin plugin: `plugin = "id@version"`, `file` relative to `builtin/`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BuiltinPlugin {
    /// `id@version`.
    pub plugin: String,
    /// File under `<plugins.directory>/builtin/`.
    pub file: String,
}

/// `cache.ttl`: an integer is hours (original design), a string has a unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct HoursTtl(pub Seconds);

impl Serialize for HoursTtl {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(s)
    }
}

impl<'de> Deserialize<'de> for HoursTtl {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        settings::duration_with_int_unit(d, 3600).map(Self)
    }
}

impl Default for AgentConfig {
    fn default() -> Self {
        Self {
            id: String::new(),
            coordinator: "http://127.0.0.1:50051".into(),
            enroll_token: String::new(),
            enroll_token_file: PathBuf::new(),
            data_dir: PathBuf::new(),
            metrics_listen: "127.0.0.1:9465".into(),
            max_concurrent_jobs: 2,
            log_format: "human".into(),
            labels: BTreeMap::new(),
            plugins: PluginsConfig::default(),
            download: DownloadConfig::default(),
            cache: CacheConfig::default(),
            jobs: JobsConfig::default(),
            mesh: MeshConfig::default(),
            tls: TlsConfig::default(),
            trust: TrustConfig::default(),
            builtin: Vec::new(),
        }
    }
}

impl Default for DownloadConfig {
    fn default() -> Self {
        Self {
            concurrent: 3,
            timeout: Seconds::secs(300),
            request_timeout: Seconds::secs(30),
            retry: 3,
            backoff: Seconds(Duration::from_millis(500)),
            fallback: Fallback::Fail,
            compression: true,
            patches: true,
            patch_max_memory: ByteSize::gib(1),
        }
    }
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            max_size: ByteSize::mib(1000),
            eviction: EvictionPolicy::Lru,
            ttl: HoursTtl(Seconds::secs(24 * 3600)),
            high_watermark: 1.0,
            low_watermark: None,
            watermark_of: crate::cache::WatermarkBase::MaxSize,
        }
    }
}

impl Default for JobsConfig {
    fn default() -> Self {
        Self {
            stage_timeout: Seconds::secs(300),
            command_timeout: Seconds::secs(3600),
            max_output: ByteSize::kib(64),
            shutdown_grace: Seconds::secs(30),
            poll_wait: Seconds::secs(30),
        }
    }
}

/// The commented default configuration printed by `--print-default-config`.
pub const DEFAULT_CONFIG_TOML: &str = r##"# Arcade Mesh agent configuration. Every key is optional; the values below are the
# defaults. Any key can be overridden by an environment variable ARCADE_<PATH>, e.g.
# ARCADE_ENROLL_TOKEN=... or ARCADE_DOWNLOAD_RETRY=5.
# Sizes: an integer is MiB, or a string like "512KiB", "1GiB".
# Durations: an integer is seconds (cache.ttl: hours), or a string like "30s", "5m", "2h".

# Agent id. Empty: the host name. Flag: --id.
id = ""
# Coordinator gRPC URL. Flag: --coordinator.
coordinator = "http://127.0.0.1:50051"
# Enrollment token for Register. Env: ARCADE_ENROLL_TOKEN. Prefer enroll_token_file (or
# the env variable): a token given as --enroll-token is visible to every local user.
enroll_token = ""
# A file holding the enrollment token (mode 0600), instead of enroll_token.
# Flag: --enroll-token-file.
enroll_token_file = ""
# Base directory: plugins under <data_dir>/plugins, job work dirs under <data_dir>/jobs.
# Empty: ~/.arcade. Flag: --data-dir.
data_dir = ""
# Prometheus /metrics listen address (port 0 picks a free port), or "off".
# Flag: --metrics-listen.
metrics_listen = "127.0.0.1:9465"
# Jobs run at once.
max_concurrent_jobs = 2
# Log format: "human" or "json".
log_format = "human"
# Builtin plugins (repeat the block). `file` is relative to <plugins.directory>/builtin/.
builtin = []
# [[builtin]]
# plugin = "notify/stdout@1.0.0"
# file = "notify-stdout"

# Labels reported at registration; jobs and plugins may require them. Flag: --label K=V.
[labels]
# zone = "eu-west-1a"

[plugins]
# Plugin cache (builtin/, downloaded/, temp/, index.redb). Empty: <data_dir>/plugins.
directory = ""

[download]
# Plugins fetched at once.
concurrent = 3
# Deadline of a whole plugin fetch: a plugin not fetched and verified within it fails
# the job (what is verified so far is kept for the next attempt).
timeout = "5m"
# Timeout of one chunk request (to the coordinator or a peer).
request_timeout = "30s"
# Attempts after the first failure, with exponential backoff and jitter.
retry = 3
# First backoff delay (doubles per attempt, at most 30s, +-50% jitter).
backoff = "500ms"
# A plugin that cannot be had: "fail" the job (naming the plugin and the last error),
# or use the newest cached "previous-version" of the same plugin (recorded in results).
fallback = "fail"
# Ask peers and the coordinator for zstd-compressed chunks; they compress a chunk only
# when it shrinks to 7/8 or less, and every chunk is still verified as raw bytes.
compression = true
# Build a new version from a patch to a version this agent holds, when the coordinator
# offers one; the result's SHA-256 is checked and any failure falls back to fetching
# the whole version.
patches = true
# Most memory applying a patch may take (base + decoder window + new version).
patch_max_memory = "1GiB"

[cache]
# Bytes of downloaded plugins kept (builtin plugins do not count and are never evicted).
max_size = "1000MiB"
# Eviction order when over max_size: "lru", "lfu" or "fifo".
eviction = "lru"
# Unused downloaded plugins are dropped after this long ("0s" = never).
ttl = "1d"
# Size eviction starts when the cache's own downloaded bytes exceed high_watermark
# (a fraction of watermark_of) and removes unpinned plugins, in eviction order, until
# they are at most low_watermark (default: high_watermark). watermark_of = "max_size"
# or "filesystem" (the size of the file system holding the cache; max_size still caps
# both). E.g. high_watermark = 0.8, low_watermark = 0.6, watermark_of = "filesystem".
high_watermark = 1.0
watermark_of = "max_size"

[jobs]
# Timeout of one plugin stage run.
stage_timeout = "5m"
# Timeout of a job's commands when the job sets none.
command_timeout = "1h"
# Output kept per plugin stream and for the command output tail.
max_output = "64KiB"
# On SIGTERM, running jobs get this long to finish before they are stopped.
shutdown_grace = "30s"
# Longest FetchJob long-poll.
poll_wait = "30s"

[tls]
# PEM CA bundle that signed the coordinator's certificate (https:// URLs); empty = the
# system roots.
ca = ""
# PEM client certificate and key, for a coordinator that requires mutual TLS.
cert = ""
key = ""
# Allow a plaintext http:// coordinator URL whose host is not loopback (tokens then
# cross the network in clear).
insecure = false

[trust]
# Publisher public keys (ed25519:<hex>, printed by `arcadectl key generate`). A plugin
# signed by one of them must verify, or it is refused.
publisher_keys = []
# Also refuse plugins that are unsigned or signed by a key not listed above, even when
# the coordinator serves them.
require_signature = false
# The same for plugin ids starting with one of these prefixes only, e.g. ["deploy/"].
require_signature_for = []

[mesh]
# Run the libp2p host and serve cached chunks to peers the coordinator vouched for.
enabled = true
# libp2p listen multiaddresses.
listen = ["/ip4/0.0.0.0/tcp/0"]
# Addresses to advertise. Empty: the listen addresses minus loopback, unspecified and
# docker-bridge (172.17.0.0/16) ones.
advertise = []
# Also advertise loopback addresses (single-host fleets, tests).
allow_loopback = false
# Node-wide upload rate to peers per second ("0B" = unlimited).
upload_rate = "0B"
# Node-wide download rate per second, every fetch together, from peers and from the
# coordinator alike ("0B" = unlimited).
download_rate = "0B"
# Concurrent chunk uploads; further requests are answered "busy".
max_uploads = 8
# A chunk request that would wait longer than this behind uploads already queued for
# upload_rate is answered "busy" (its requester asks a faster holder); "0s" = no limit.
max_upload_wait = "1s"
# Most peers connected at once; peers that have not shown a valid ticket (inbound)
# may hold at most half of them, and at most 4 connections each.
max_connections = 256
# An inbound connection whose peer shows no valid ticket within this is closed.
unvouched_timeout = "10s"
# Kademlia DHT (provider records, lookups) beside the coordinator's hints. Off: hints,
# announcements and askers found every holder in every measured fleet, and the DHT's
# own bootstraps and lookups cost CPU that grows with the fleet.
dht = false
# DHT provider records (when dht = true): lifetime and republish interval (minutes, not the 48h default,
# so evicted or departed holders disappear quickly).
provider_ttl = "15m"
provider_republish = "5m"
# zstd level (1-19) of chunks sent compressed to peers that ask; 0 = always send raw.
# 1 by default: a holder compresses every chunk it sends, and level 3 cost a fleet
# sharing two cores 1.6x the CPU of level 1 for 10 % fewer bytes.
compression_level = 1
"##;

/// A configuration checked for consistency, with derived values resolved.
#[derive(Debug, Clone)]
pub struct ValidConfig {
    /// The configuration as given.
    pub raw: AgentConfig,
    /// Resolved agent id.
    pub id: String,
    /// Validated labels.
    pub labels: Labels,
    /// Resolved plugin cache root.
    pub plugin_dir: PathBuf,
    /// Resolved job work directory root.
    pub jobs_dir: PathBuf,
    /// The base data directory (`data_dir`, or `~/.arcade`); made private (0700) at start.
    pub base_dir: PathBuf,
    /// Parsed metrics address (None = off).
    pub metrics_listen: Option<SocketAddr>,
    /// Parsed builtin plugins.
    pub builtin: Vec<(PluginRef, String)>,
    /// Where the agent's key is kept: its identity at the coordinator and its libp2p
    /// peer id (`crate::identity`).
    pub mesh_identity: PathBuf,
    /// `[trust]`, parsed.
    pub trust: arcade_p2p::publisher::TrustPolicy,
}

fn home_dir() -> PathBuf {
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."))
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "agent".into())
}

impl AgentConfig {
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
        let id = if self.id.is_empty() {
            host_name()
        } else {
            self.id.clone()
        };
        let id_ok = id.len() <= 128
            && id.as_bytes().first().is_some_and(u8::is_ascii_alphanumeric)
            && id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
        if !id_ok {
            return Err(bad(
                "id",
                format!(
                    "{id:?} must be 1-128 characters of [A-Za-z0-9._-], starting with a letter or digit"
                ),
            ));
        }
        if !(self.coordinator.starts_with("http://") || self.coordinator.starts_with("https://")) {
            return Err(bad(
                "coordinator",
                format!(
                    "{:?} must be a URL like http://127.0.0.1:50051",
                    self.coordinator
                ),
            ));
        }
        if self.tls.cert.as_os_str().is_empty() != self.tls.key.as_os_str().is_empty() {
            return Err(bad(
                "tls.cert",
                "tls.cert and tls.key go together: set both or neither",
            ));
        }
        // Plaintext to a remote host without `tls.insecure`, unreadable TLS files.
        arcade_proto::client_endpoint_with(&self.coordinator, &self.tls.client())
            .map_err(|e| bad("coordinator", e.to_string()))?;
        if !self.enroll_token_file.as_os_str().is_empty() {
            if !self.enroll_token.is_empty() {
                return Err(bad(
                    "enroll_token_file",
                    "give enroll_token or enroll_token_file, not both",
                ));
            }
            self.enroll_token =
                arcade_p2p::settings::read_secret("enroll_token_file", &self.enroll_token_file)?;
        }
        if self
            .enroll_token
            .chars()
            .any(|c| c.is_whitespace() || c.is_control())
            || self.enroll_token.len() > 512
        {
            return Err(bad(
                "enroll_token",
                "must be at most 512 characters without whitespace",
            ));
        }
        let label_list: Vec<arcade_proto::v1::Label> = self
            .labels
            .iter()
            .map(|(k, v)| arcade_proto::v1::Label {
                key: k.clone(),
                value: v.clone(),
            })
            .collect();
        let labels = labels::from_proto(&label_list).map_err(|e| bad("labels", e.to_string()))?;
        let metrics_listen = if self.metrics_listen == "off" {
            None
        } else {
            Some(self.metrics_listen.parse().map_err(|_| {
                bad(
                    "metrics_listen",
                    format!(
                        "{:?} is not an address like 127.0.0.1:9465 or \"off\"",
                        self.metrics_listen
                    ),
                )
            })?)
        };
        if self.max_concurrent_jobs == 0 || self.max_concurrent_jobs > 256 {
            return Err(bad("max_concurrent_jobs", "must be between 1 and 256"));
        }
        if !matches!(self.log_format.as_str(), "human" | "json") {
            return Err(bad("log_format", "must be \"human\" or \"json\""));
        }
        let d = &self.download;
        if d.concurrent == 0 || d.concurrent > 64 {
            return Err(bad("download.concurrent", "must be between 1 and 64"));
        }
        if d.timeout.get() < Duration::from_secs(1) {
            return Err(bad("download.timeout", "must be at least 1s"));
        }
        if d.request_timeout.get() < Duration::from_millis(100)
            || d.request_timeout.get() > d.timeout.get()
        {
            return Err(bad(
                "download.request_timeout",
                "must be at least 100ms and at most download.timeout",
            ));
        }
        if d.retry > 100 {
            return Err(bad("download.retry", "must be at most 100"));
        }
        if d.backoff.get() > Duration::from_secs(60) {
            return Err(bad("download.backoff", "must be at most 60s"));
        }
        if self.cache.max_size.bytes() == 0 {
            return Err(bad("cache.max_size", "must be positive"));
        }
        let high = self.cache.high_watermark;
        if !(high > 0.0 && high <= 1.0) {
            return Err(bad(
                "cache.high_watermark",
                "must be a fraction above 0 and at most 1 (e.g. 0.9)",
            ));
        }
        if let Some(low) = self.cache.low_watermark {
            if !(low > 0.0 && low <= high) {
                return Err(bad(
                    "cache.low_watermark",
                    "must be a fraction above 0 and at most cache.high_watermark",
                ));
            }
        }
        let j = &self.jobs;
        for (key, v) in [
            ("jobs.stage_timeout", j.stage_timeout),
            ("jobs.command_timeout", j.command_timeout),
        ] {
            if v.get() < Duration::from_millis(100) || v.get() > Duration::from_secs(7 * 86_400) {
                return Err(bad(key, "must be between 100ms and 7d"));
            }
        }
        if j.max_output.bytes() < 1024 || j.max_output > ByteSize::mib(16) {
            return Err(bad("jobs.max_output", "must be between 1KiB and 16MiB"));
        }
        if j.shutdown_grace.get() > Duration::from_secs(3600) {
            return Err(bad("jobs.shutdown_grace", "must be at most 1h"));
        }
        if j.poll_wait.get() < Duration::from_secs(1)
            || j.poll_wait.get() > Duration::from_secs(300)
        {
            return Err(bad("jobs.poll_wait", "must be between 1s and 5m"));
        }
        let mut builtin = Vec::new();
        for (i, b) in self.builtin.iter().enumerate() {
            let r: PluginRef = b.plugin.parse().map_err(|e: arcade_p2p::PluginRefError| {
                bad(&format!("builtin[{i}].plugin"), e.to_string())
            })?;
            let f = Path::new(&b.file);
            if b.file.is_empty()
                || f.is_absolute()
                || f.components()
                    .any(|c| !matches!(c, std::path::Component::Normal(_)))
            {
                return Err(bad(
                    &format!("builtin[{i}].file"),
                    "must be a relative path under builtin/ without `..`",
                ));
            }
            builtin.push((r, b.file.clone()));
        }
        let base = if self.data_dir.as_os_str().is_empty() {
            home_dir().join(".arcade")
        } else {
            self.data_dir.clone()
        };
        if self.mesh.max_uploads > 1024 {
            return Err(bad("mesh.max_uploads", "must be at most 1024"));
        }
        if self.mesh.compression_level > arcade_p2p::compress::MAX_LEVEL as u32 {
            return Err(bad(
                "mesh.compression_level",
                "must be between 0 (off) and 19",
            ));
        }
        if self.mesh.max_upload_wait.get() > Duration::from_secs(3600) {
            return Err(bad("mesh.max_upload_wait", "must be at most 1h"));
        }
        let unvouched = self.mesh.unvouched_timeout.get();
        if unvouched < Duration::from_millis(100) || unvouched > Duration::from_secs(3600) {
            return Err(bad(
                "mesh.unvouched_timeout",
                "must be between 100ms and 1h",
            ));
        }
        if self.mesh.max_connections == 0 || self.mesh.max_connections > 100_000 {
            return Err(bad("mesh.max_connections", "must be between 1 and 100000"));
        }
        if self.mesh.provider_republish.get().is_zero()
            || self.mesh.provider_republish >= self.mesh.provider_ttl
        {
            return Err(bad(
                "mesh.provider_republish",
                "must be positive and shorter than mesh.provider_ttl",
            ));
        }
        for (key, list) in [
            ("mesh.listen", &self.mesh.listen),
            ("mesh.advertise", &self.mesh.advertise),
        ] {
            for a in list.iter() {
                if a.parse::<arcade_p2p::mesh::host::Multiaddr>().is_err() {
                    return Err(bad(
                        key,
                        format!("{a:?} is not a multiaddress like /ip4/0.0.0.0/tcp/4001"),
                    ));
                }
            }
        }
        if self.mesh.enabled && self.mesh.listen.is_empty() {
            return Err(bad(
                "mesh.listen",
                "needs at least one address when mesh.enabled = true",
            ));
        }
        let plugin_dir = if self.plugins.directory.as_os_str().is_empty() {
            base.join("plugins")
        } else {
            self.plugins.directory.clone()
        };
        let trust = arcade_p2p::publisher::TrustPolicy::new(
            self.trust.publisher_keys.iter().map(String::as_str),
            self.trust.require_signature,
        )
        .map_err(|e| bad("trust.publisher_keys", e.to_string()))?
        .require_for(self.trust.require_signature_for.iter().cloned());
        if let Some(p) = self
            .trust
            .require_signature_for
            .iter()
            .find(|p| p.is_empty())
        {
            return Err(bad(
                "trust.require_signature_for",
                format!("{p:?}: an empty prefix matches every plugin; use require_signature"),
            ));
        }
        if (self.trust.require_signature || !self.trust.require_signature_for.is_empty())
            && self.trust.publisher_keys.is_empty()
        {
            return Err(bad(
                "trust.require_signature",
                "no plugin could run: list the publishers' keys in trust.publisher_keys",
            ));
        }
        Ok(ValidConfig {
            trust,
            id,
            labels,
            plugin_dir,
            jobs_dir: base.join("jobs"),
            base_dir: base.clone(),
            mesh_identity: base.join("mesh-identity.key"),
            metrics_listen,
            builtin,
            raw: self,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn printed_default_config_is_the_default() {
        let parsed: AgentConfig = toml::from_str(DEFAULT_CONFIG_TOML).unwrap();
        assert_eq!(parsed, AgentConfig::default());
        let c = AgentConfig {
            id: "a1".into(),
            ..Default::default()
        };
        c.validate().unwrap();
    }

    #[test]
    fn seed_style_values_and_directory_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.toml");
        std::fs::write(
            &path,
            "id = \"agent-001\"\ndata_dir = \"/srv/arcade\"\n[download]\nconcurrent = 3\ntimeout = 300\nretry = 3\n[cache]\nmax_size = 1000\neviction = \"lfu\"\nttl = 24\n[[builtin]]\nplugin = \"notify/stdout@1.0.0\"\nfile = \"notify-stdout\"\n",
        )
        .unwrap();
        let v = AgentConfig::load(Some(&path), |_| None)
            .unwrap()
            .validate()
            .unwrap();
        assert_eq!(v.raw.cache.ttl.0, Seconds::secs(24 * 3600));
        assert_eq!(v.raw.cache.max_size, ByteSize::mib(1000));
        assert_eq!(v.raw.cache.eviction, EvictionPolicy::Lfu);
        assert_eq!(v.plugin_dir, PathBuf::from("/srv/arcade/plugins"));
        assert_eq!(v.builtin[0].0.to_string(), "notify/stdout@1.0.0");
    }

    #[test]
    fn the_enroll_token_can_come_from_a_file_but_not_from_both() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("enroll.token");
        std::fs::write(&file, "tok-from-file\n").unwrap();
        let c = AgentConfig {
            enroll_token_file: file.clone(),
            ..Default::default()
        };
        assert_eq!(c.validate().unwrap().raw.enroll_token, "tok-from-file");
        let both = AgentConfig {
            enroll_token: "inline".into(),
            enroll_token_file: file,
            ..Default::default()
        };
        let err = both.validate().unwrap_err().to_string();
        assert!(
            err.contains("enroll_token_file") && err.contains("not both"),
            "{err}"
        );
    }

    #[test]
    fn validation_names_the_key() {
        type Mutation = fn(&mut AgentConfig);
        let cases: Vec<(Mutation, &str)> = vec![
            (|c| c.id = "bad id".into(), "id"),
            (|c| c.coordinator = "127.0.0.1:1".into(), "coordinator"),
            (|c| c.metrics_listen = "x".into(), "metrics_listen"),
            (|c| c.download.concurrent = 0, "download.concurrent"),
            (|c| c.max_concurrent_jobs = 0, "max_concurrent_jobs"),
            (|c| c.jobs.max_output = ByteSize(10), "jobs.max_output"),
            (|c| c.cache.high_watermark = 1.5, "cache.high_watermark"),
            (|c| c.cache.high_watermark = 0.0, "cache.high_watermark"),
            (
                |c| c.cache.high_watermark = f64::NAN,
                "cache.high_watermark",
            ),
            (
                |c| {
                    c.cache.high_watermark = 0.5;
                    c.cache.low_watermark = Some(0.6);
                },
                "cache.low_watermark",
            ),
            (
                |c| {
                    c.labels
                        .insert("bad key".into(), "v".into())
                        .map(|_| ())
                        .unwrap_or(())
                },
                "labels",
            ),
            (
                |c| {
                    c.builtin.push(BuiltinPlugin {
                        plugin: "x/y@1.0.0".into(),
                        file: "../etc/passwd".into(),
                    })
                },
                "builtin[0].file",
            ),
        ];
        for (mutate, key) in cases {
            let mut c = AgentConfig {
                id: "a1".into(),
                ..Default::default()
            };
            mutate(&mut c);
            let err = c.validate().unwrap_err().to_string();
            assert!(err.contains(&format!("`{key}`")), "{err}");
        }
        let err = AgentConfig::load(None, |k| {
            (k == "ARCADE_CACHE_EVICTION").then(|| "random".into())
        })
        .unwrap_err();
        assert!(err.to_string().contains("cache.eviction"), "{err}");
    }
}
