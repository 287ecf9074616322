//! The gRPC services and the state they share.
//!
//! [`Shared`] is owned by the running coordinator (see `server.rs`) and handed to every
//! service as an `Arc`. It holds the metadata store (behind [`MetaStore`]), the blob
//! store, the metrics, and in-memory state rebuilt from the store at start: the fleet
//! and its indexes (`fleet.rs`), the job queue and waiting agents
//! (`crate::dispatch`), lease deadlines, and the manifest/plugin cache. Locks here guard
//! in-memory steps only; none is held across I/O.
//!
//! - `plugins.rs` — `PluginAdmin` (push, list, get, enable, delete).
//! - `agents.rs` — `Agent`: register, heartbeat, fetch jobs, results, manifests.
//! - `downloads.rs` — `Agent.DownloadPlugin`: streamed, verified chunks; herd checks.
//! - `hints.rs` — peer hints: which agents to fetch a content from.
//! - `fleet.rs` — the fleet in memory and its indexes; `fleet_api.rs` — `Fleet`.
//! - `jobs.rs` — `Jobs` (create, get, list, cancel).
//! - `patches.rs` — patches to a pushed version from older ones, built in the background.
//! - `preheat.rs` — `PluginAdmin.PreheatPlugin`: background fetches and pins ordered
//!   through heartbeat answers.
//! - `leases.rs` — lease deadlines, their sweep, and the retention sweep.
//! - `gate.rs` — the tower layer that refuses unknown tokens before a body is read.
//! - `identity.rs` — enrolment tokens and granted labels, id ↔ key binding, revoked peers.

pub(crate) mod agent_plugins;
pub(crate) mod agents;
pub(crate) mod downloads;
pub(crate) mod fetches;
pub(crate) mod fleet;
pub(crate) mod fleet_api;
pub(crate) mod fleet_status;
pub(crate) mod gate;
pub mod herd;
pub(crate) mod hints;
pub(crate) mod identity;
pub(crate) mod jobs;
pub(crate) mod leases;
pub(crate) mod long_poll;
pub(crate) mod patches;
pub(crate) mod plugins;
pub(crate) mod preheat;

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arcade_p2p::labels::{self, Labels};
use arcade_p2p::{ContentId, Manifest};
use arcade_proto::v1 as pb;
use sha2::{Digest, Sha256};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Status};

use crate::blob::{BlobError, BlobStore};
use crate::config::ValidConfig;
use crate::dispatch::{Dispatch, Need, QueuedJob};
use crate::metrics::Metrics;
use crate::store::{AgentRecord, MetaStore, StoreError, plugin_key};
use fleet::Fleet;
use leases::Leases;

/// Unix time in milliseconds.
pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// SHA-256 of a token (tokens are stored and compared only as hashes).
pub(crate) fn token_hash(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

impl From<StoreError> for Status {
    fn from(e: StoreError) -> Self {
        match &e {
            StoreError::Conflict { .. } => Status::already_exists(e.to_string()),
            StoreError::PluginNotFound(_)
            | StoreError::PatchOrphaned(_)
            | StoreError::EnrollTokenNotFound(_)
            | StoreError::JobNotFound(_)
            | StoreError::AgentNotFound(_) => Status::not_found(e.to_string()),
            StoreError::EnrollTokenSpent { .. } | StoreError::Replayed { .. } => {
                Status::permission_denied(e.to_string())
            }
            StoreError::BoundToOtherKey { agent, peer } => identity::bound_elsewhere(agent, peer),
            StoreError::PluginInUse { .. } | StoreError::NotLeased { .. } => {
                Status::failed_precondition(e.to_string())
            }
            StoreError::Aborted | StoreError::Closed => Status::unavailable(e.to_string()),
            StoreError::Db(_) | StoreError::Corrupt { .. } => {
                tracing::error!(error = %e, "metadata store failure");
                Status::internal(e.to_string())
            }
        }
    }
}

impl From<BlobError> for Status {
    fn from(e: BlobError) -> Self {
        match &e {
            BlobError::StorageFull(_) => Status::resource_exhausted(format!(
                "{e}; free space under plugin.storage_path and retry"
            )),
            BlobError::NotFound(_) | BlobError::Truncated { .. } => {
                tracing::error!(error = %e, "stored content missing or damaged");
                Status::data_loss(format!("{e}; re-push the plugin"))
            }
            BlobError::Io(_) | BlobError::InUse(_) => {
                tracing::error!(error = %e, "blob storage failure");
                Status::internal(e.to_string())
            }
        }
    }
}

/// A small bounded map whose entries expire.
pub(crate) struct TtlCache<K, V> {
    ttl: Option<Duration>,
    capacity: usize,
    entries: Mutex<HashMap<K, (V, Instant)>>,
}

impl<K: Eq + Hash + Clone, V: Clone> TtlCache<K, V> {
    /// `ttl = None` disables caching.
    pub(crate) fn new(ttl: Option<Duration>, capacity: usize) -> Self {
        Self {
            ttl,
            capacity,
            entries: Mutex::new(HashMap::new()),
        }
    }

    pub(crate) fn get(&self, k: &K) -> Option<V> {
        let ttl = self.ttl?;
        let mut map = self.entries.lock().expect("cache lock");
        match map.get(k) {
            Some((v, at)) if at.elapsed() < ttl => Some(v.clone()),
            Some(_) => {
                map.remove(k);
                None
            }
            None => None,
        }
    }

    pub(crate) fn put(&self, k: K, v: V) {
        let Some(ttl) = self.ttl else { return };
        let mut map = self.entries.lock().expect("cache lock");
        if map.len() >= self.capacity {
            map.retain(|_, (_, at)| at.elapsed() < ttl);
            if map.len() >= self.capacity {
                map.clear();
            }
        }
        map.insert(k, (v, Instant::now()));
    }

    pub(crate) fn remove(&self, k: &K) {
        self.entries.lock().expect("cache lock").remove(k);
    }
}

/// A token bucket for `Register` calls (`agents.register_rate`).
pub(crate) struct RegisterLimiter {
    rate: f64,
    state: Mutex<(f64, Instant)>,
}

impl RegisterLimiter {
    fn new(rate: u32) -> Self {
        Self {
            rate: f64::from(rate),
            state: Mutex::new((f64::from(rate), Instant::now())),
        }
    }

    /// Takes one token; `Err(wait)` when none is left.
    pub(crate) fn try_take(&self) -> Result<(), Duration> {
        if self.rate == 0.0 {
            return Ok(());
        }
        let mut st = self.state.lock().expect("limiter lock");
        let now = Instant::now();
        let refill = now.duration_since(st.1).as_secs_f64() * self.rate;
        st.0 = (st.0 + refill).min(self.rate);
        st.1 = now;
        if st.0 >= 1.0 {
            st.0 -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - st.0) / self.rate))
        }
    }
}

/// The secrets a coordinator starts with.
pub(crate) struct Credentials<'a> {
    pub(crate) admin_token: &'a str,
    pub(crate) enroll_token: &'a str,
    /// Signs mesh tickets.
    pub(crate) tickets: arcade_p2p::mesh::ticket::TicketIssuer,
}

/// The dispatch state behind its mutex, with the metric gauges it keeps current.
pub(crate) type JobDispatch = Dispatch<oneshot::Sender<QueuedJob>>;

/// State shared by every service.
pub(crate) struct Shared {
    pub(crate) config: ValidConfig,
    pub(crate) store: Arc<dyn MetaStore>,
    pub(crate) blobs: Arc<dyn BlobStore>,
    pub(crate) metrics: Metrics,
    pub(crate) admin_hash: [u8; 32],
    /// Signs mesh tickets.
    pub(crate) tickets: arcade_p2p::mesh::ticket::TicketIssuer,
    pub(crate) enroll_hash: [u8; 32],
    /// Enrolment tokens, restricted label keys, revoked peers.
    pub(crate) identity: identity::Identity,
    pub(crate) fleet: Mutex<Fleet>,
    /// Running jobs: holder, deadline, cancel asked for.
    pub(crate) leases: Mutex<Leases>,
    /// Queued jobs and waiting agents.
    pub(crate) dispatch: Mutex<JobDispatch>,
    pub(crate) manifests: TtlCache<ContentId, Arc<Manifest>>,
    pub(crate) plugins: TtlCache<String, pb::PluginVersion>,
    /// Patch content → its record, for `DownloadPlugin` of patch chunks (one lookup per
    /// chunk request otherwise scans the plugins and patches).
    pub(crate) patch_of: TtlCache<ContentId, pb::PatchInfo>,
    /// Herd protection: which chunks went to whom.
    pub(crate) herd: Mutex<herd::Herd>,
    /// Plugin fetches being served (`fetches.rs`).
    pub(crate) fetches: Mutex<fetches::FetchBook>,
    /// Bounds concurrent `DownloadPlugin` streams (`serve.max_streams`).
    pub(crate) streams: Arc<tokio::sync::Semaphore>,
    /// Open `DownloadPlugin` streams per agent (`serve.max_streams_per_agent`).
    pub(crate) agent_streams: Mutex<HashMap<String, usize>>,
    /// Compresses chunks for agents that ask (`serve.compression_level`; None = off).
    pub(crate) compressor: Option<Arc<arcade_p2p::compress::Compressor>>,
    /// Coordinator egress limit (`serve.egress_rate`).
    pub(crate) egress: arcade_p2p::mesh::limiter::RateLimiter,
    /// `agents.register_rate`.
    pub(crate) registrations: RegisterLimiter,
    /// Serialises blob commit/removal with the metadata write that references it.
    pub(crate) content_lock: tokio::sync::Mutex<()>,
    /// Active preheats.
    pub(crate) preheats: Mutex<preheat::PreheatBook>,
    /// One patch build at a time.
    pub(crate) patch_builds: Arc<tokio::sync::Semaphore>,
    pub(crate) shutdown: CancellationToken,
}

/// The token of `authorization: Bearer <token>`, the one parser of that header.
pub(crate) fn bearer(headers: &tonic::codegen::http::HeaderMap) -> Result<&str, Status> {
    let value = headers.get(arcade_proto::AUTHORIZATION).ok_or_else(|| {
        Status::unauthenticated("missing `authorization: Bearer <token>` metadata")
    })?;
    let value = value
        .to_str()
        .map_err(|_| Status::unauthenticated("authorization metadata is not text"))?;
    value
        .strip_prefix("Bearer ")
        .filter(|t| !t.is_empty())
        .ok_or_else(|| Status::unauthenticated("authorization metadata must be `Bearer <token>`"))
}

/// The SHA-256 of a call's bearer token, as the admission gate (`gate.rs`) computed it
/// and left in the request's extensions, so it is hashed once per call.
#[derive(Debug, Clone, Copy)]
pub(crate) struct CallerToken(pub(crate) [u8; 32]);

/// The caller's token hash: from the gate, or (a service used without it, as in unit
/// tests) parsed and hashed here.
fn caller_hash<T>(req: &Request<T>) -> Result<[u8; 32], Status> {
    if let Some(CallerToken(hash)) = req.extensions().get::<CallerToken>() {
        return Ok(*hash);
    }
    Ok(token_hash(bearer(req.metadata().as_ref())?))
}

impl Shared {
    /// Builds the shared state, loading agents, leases and the queue from the store.
    pub(crate) async fn new(
        config: ValidConfig,
        store: Arc<dyn MetaStore>,
        blobs: Arc<dyn BlobStore>,
        metrics: Metrics,
        credentials: Credentials<'_>,
        shutdown: CancellationToken,
    ) -> Result<Self, StoreError> {
        let Credentials {
            admin_token,
            enroll_token,
            tickets,
        } = credentials;
        let mut fleet = Fleet::default();
        for record in store.list_agents().await? {
            fleet.insert(record, 0);
        }
        // Leases survive a restart; their agents get one full lease_ttl to heartbeat.
        let mut leases = Leases::default();
        let deadline = Instant::now() + config.raw.jobs.lease_ttl.get();
        for (job, agent) in store.leases().await? {
            leases.start(job, agent, deadline);
        }
        let mut acl_keys = std::collections::BTreeSet::new();
        for p in store.list_plugins("").await? {
            acl_keys.extend(p.allowed_labels.into_iter().map(|l| l.key));
        }
        let identity = identity::Identity::new(store.list_enroll_grants().await?, acl_keys);
        let ttl = config
            .raw
            .plugin
            .enable_cache
            .then(|| config.raw.plugin.cache_ttl.get());
        let shared = Self {
            store,
            blobs,
            metrics,
            admin_hash: token_hash(admin_token),
            tickets,
            enroll_hash: token_hash(enroll_token),
            identity,
            fleet: Mutex::new(fleet),
            leases: Mutex::new(leases),
            dispatch: Mutex::new(Dispatch::default()),
            manifests: TtlCache::new(ttl, 1024),
            plugins: TtlCache::new(ttl, 4096),
            patch_of: TtlCache::new(ttl, 1024),
            fetches: Mutex::new(fetches::FetchBook::default()),
            herd: Mutex::new(herd::Herd::new(
                config.raw.serve.herd_window.get(),
                config.raw.serve.max_redirects,
            )),
            streams: Arc::new(tokio::sync::Semaphore::new(
                config.raw.serve.max_streams as usize,
            )),
            agent_streams: Mutex::new(HashMap::new()),
            compressor: (config.raw.serve.compression_level > 0).then(|| {
                Arc::new(arcade_p2p::compress::Compressor::new(
                    config.raw.serve.compression_level as i32,
                ))
            }),
            egress: arcade_p2p::mesh::limiter::RateLimiter::new(
                config.raw.serve.egress_rate.bytes(),
                // One chunk of burst: the cap holds from the first second.
                1 << 20,
            ),
            registrations: RegisterLimiter::new(config.raw.agents.register_rate),
            content_lock: tokio::sync::Mutex::new(()),
            preheats: Mutex::new(preheat::PreheatBook::default()),
            patch_builds: Arc::new(tokio::sync::Semaphore::new(1)),
            shutdown,
            config,
        };
        for job in shared.store.queued_jobs().await? {
            match shared.need_of(&job).await {
                Ok(need) => shared.enqueue(job.job_id, need),
                Err(e) => {
                    tracing::error!(job = %job.job_id, error = %e.message(), "queued job cannot be dispatched")
                }
            }
        }
        Ok(shared)
    }

    /// What an agent must carry to run `job`: its selector and its plugins' access rules.
    pub(crate) async fn need_of(&self, job: &pb::JobDetail) -> Result<Need, Status> {
        let selector: Labels = job
            .label_selector
            .iter()
            .map(|l| (l.key.clone(), l.value.clone()))
            .collect();
        let mut acls = Vec::with_capacity(job.required_plugins.len());
        for r in &job.required_plugins {
            acls.push(allowed_labels(
                &self.plugin(&plugin_key(&r.plugin_id, &r.version)).await?,
            ));
        }
        Ok(Need::new(&selector, acls.iter()))
    }

    /// Queues a job for dispatch (it is durable as queued already): handed to one
    /// waiting agent that may run it, or kept in the queue.
    pub(crate) fn enqueue(&self, job_id: String, need: Need) {
        let mut d = self.dispatch.lock().expect("dispatch lock");
        d.enqueue(job_id, need);
        self.sync_dispatch_gauges(&d);
    }

    pub(crate) fn sync_dispatch_gauges(&self, d: &JobDispatch) {
        self.metrics.jobs_queued.set(d.queued() as i64);
        self.metrics.agents_waiting.set(d.waiting() as i64);
    }

    /// A mesh ticket for `agent` (empty when it registered without a peer id), and
    /// its expiry.
    pub(crate) fn issue_ticket(&self, agent: &AgentRecord) -> Result<(Vec<u8>, i64), Status> {
        if agent.peer_id.is_empty() {
            return Ok((Vec::new(), 0));
        }
        let peer: arcade_p2p::mesh::ticket::PeerId = agent.peer_id.parse().map_err(|_| {
            Status::invalid_argument(format!(
                "peer_id {:?} is not a libp2p peer id",
                shown(&agent.peer_id)
            ))
        })?;
        let now = now_ms();
        let ttl = self.config.raw.mesh.ticket_ttl.get().as_millis() as i64;
        let ticket = self
            .tickets
            .issue(&peer, &agent.agent_id, &agent.labels, now, ttl)
            .map_err(|e| Status::internal(e.to_string()))?;
        Ok((ticket, now + ttl))
    }

    /// Checks the admin token. A token the coordinator knows as another kind (an
    /// agent's, the enrollment token) identifies a caller without the right:
    /// `PERMISSION_DENIED`; any other token is `UNAUTHENTICATED`.
    pub(crate) fn require_admin<T>(&self, req: &Request<T>) -> Result<(), Status> {
        let hash = caller_hash(req)?;
        if hash == self.admin_hash {
            return Ok(());
        }
        if hash == self.enroll_hash || self.identity.knows_grant(&hash) {
            return Err(Status::permission_denied(
                "the enrollment token only allows Register: admin calls need the admin token",
            ));
        }
        if let Some(agent) = self.fleet.lock().expect("fleet lock").tokens.get(&hash) {
            return Err(Status::permission_denied(format!(
                "this token belongs to agent {agent}: admin calls need the admin token"
            )));
        }
        Err(Status::unauthenticated("invalid admin token"))
    }

    /// Checks a per-agent token and that `claimed_id` (if given) is that agent.
    pub(crate) fn require_agent<T>(
        &self,
        req: &Request<T>,
        claimed_id: &str,
    ) -> Result<Arc<AgentRecord>, Status> {
        let hash = caller_hash(req)?;
        let mut fleet = self.fleet.lock().expect("fleet lock");
        let id = fleet
            .tokens
            .get(&hash)
            .cloned()
            .ok_or_else(|| Status::unauthenticated("invalid agent token: Register again"))?;
        if !claimed_id.is_empty() && claimed_id != id {
            return Err(Status::permission_denied(format!(
                "this token belongs to agent {id}, not {claimed_id}"
            )));
        }
        let live = fleet
            .agents
            .get_mut(&id)
            .ok_or_else(|| Status::unauthenticated("unknown agent: Register again"))?;
        live.last_seen = now_ms();
        Ok(live.record.clone())
    }

    /// Whether `agent` is still registered under the same token (not removed or
    /// re-registered since it was authenticated).
    pub(crate) fn is_current(&self, agent: &AgentRecord) -> bool {
        self.with_live(&agent.agent_id, |l| l.record.token_hash == agent.token_hash)
            .unwrap_or(false)
    }

    /// Runs `f` on the live view of agent `id` under the fleet lock (`None`: not
    /// registered). The one way the services read or update a single agent.
    pub(crate) fn with_live<T>(
        &self,
        id: &str,
        f: impl FnOnce(&mut fleet::LiveAgent) -> T,
    ) -> Option<T> {
        self.fleet
            .lock()
            .expect("fleet lock")
            .agents
            .get_mut(id)
            .map(f)
    }

    /// A plugin version, through the cache.
    pub(crate) async fn plugin(&self, key: &str) -> Result<pb::PluginVersion, Status> {
        if let Some(p) = self.plugins.get(&key.to_owned()) {
            return Ok(p);
        }
        let p = self
            .store
            .get_plugin(key)
            .await?
            .ok_or_else(|| Status::not_found(format!("plugin {key} does not exist")))?;
        self.plugins.put(key.to_owned(), p.clone());
        Ok(p)
    }

    /// A manifest, through the cache.
    pub(crate) async fn manifest(&self, id: ContentId) -> Result<Arc<Manifest>, Status> {
        if let Some(m) = self.manifests.get(&id) {
            return Ok(m);
        }
        let m = self.store.get_manifest(id).await?.ok_or_else(|| {
            Status::data_loss(format!(
                "manifest of content {id} is missing; re-push the plugin"
            ))
        })?;
        let m = Arc::new(m);
        self.manifests.put(id, m.clone());
        Ok(m)
    }

    /// Forgets cached records of a plugin version.
    pub(crate) fn invalidate_plugin(&self, key: &str) {
        self.plugins.remove(&key.to_owned());
    }

    /// Whether `agent` may have `plugin`; the error names the missing labels.
    pub(crate) fn check_acl(agent: &AgentRecord, plugin: &pb::PluginVersion) -> Result<(), Status> {
        let required = allowed_labels(plugin);
        if labels::satisfies(&agent.labels, &required) {
            Ok(())
        } else {
            Err(Status::permission_denied(format!(
                "agent {} lacks the label(s) {} that plugin {} requires",
                agent.agent_id,
                labels::missing(&agent.labels, &required).join(", "),
                plugin_key(&plugin.plugin_id, &plugin.version)
            )))
        }
    }
}

/// A plugin's `allowed_labels` as a map.
pub(crate) fn allowed_labels(plugin: &pb::PluginVersion) -> Labels {
    plugin
        .allowed_labels
        .iter()
        .map(|l| (l.key.clone(), l.value.clone()))
        .collect()
}

/// Truncates a string to at most `max` bytes, keeping the end (on a char boundary).
pub(crate) fn keep_tail(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let mut start = s.len() - max;
    while !s.is_char_boundary(start) {
        start += 1;
    }
    s[start..].to_owned()
}

/// Shortens untrusted text for an error message.
pub(crate) fn shown(s: &str) -> String {
    s.chars().take(80).collect()
}

pub(crate) type SharedRef = Arc<Shared>;

#[cfg(test)]
mod tests {
    use super::*;

    async fn shared(dir: &std::path::Path) -> Shared {
        let config = crate::config::CoordinatorConfig {
            data_dir: dir.to_owned(),
            ..Default::default()
        }
        .validate()
        .unwrap();
        let metrics = Metrics::new();
        let store =
            crate::store::RedbStore::open(&dir.join("c.redb"), 1 << 20, metrics.store.clone())
                .unwrap();
        let blobs = Arc::new(crate::blob::FsBlobStore::open(&dir.join("plugins")).unwrap());
        let s = Shared::new(
            config,
            Arc::new(store),
            blobs,
            metrics,
            Credentials {
                admin_token: "admin-token",
                enroll_token: "enroll-token",
                tickets: arcade_p2p::mesh::ticket::TicketIssuer::generate(),
            },
            CancellationToken::new(),
        )
        .await
        .unwrap();
        let record = AgentRecord {
            agent_id: "a1".into(),
            hostname: String::new(),
            labels: Labels::new(),
            peer_id: String::new(),
            addrs: Vec::new(),
            agent_version: String::new(),
            installed: Vec::new(),
            registered_at: 0,
            token_hash: token_hash("agent-token"),
            key_id: String::new(),
            proof_at: 0,
            granted: Default::default(),
        };
        s.fleet.lock().unwrap().insert(record, 0);
        s
    }

    fn with_token(token: &str) -> Request<()> {
        let mut req = Request::new(());
        req.metadata_mut().insert(
            arcade_proto::AUTHORIZATION,
            format!("Bearer {token}").parse().unwrap(),
        );
        req
    }

    #[tokio::test]
    async fn admin_calls_tell_unknown_tokens_from_tokens_without_the_right() {
        let dir = tempfile::tempdir().unwrap();
        let s = shared(dir.path()).await;
        s.require_admin(&with_token("admin-token")).unwrap();
        for (token, code, says) in [
            ("agent-token", tonic::Code::PermissionDenied, "agent a1"),
            ("enroll-token", tonic::Code::PermissionDenied, "enrollment"),
            ("wrong-token", tonic::Code::Unauthenticated, "invalid"),
        ] {
            let err = s.require_admin(&with_token(token)).unwrap_err();
            assert_eq!(err.code(), code, "{token}: {err:?}");
            assert!(err.message().contains(says), "{token}: {err:?}");
        }
        let err = s.require_admin(&Request::new(())).unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unauthenticated);
    }

    #[test]
    fn tail_keeps_char_boundaries() {
        assert_eq!(keep_tail("hello", 10), "hello");
        assert_eq!(keep_tail("hello", 3), "llo");
        assert_eq!(keep_tail("aé", 1), "");
        assert_eq!(keep_tail("aéb", 2), "b");
    }

    #[test]
    fn register_limiter_refuses_beyond_the_burst() {
        let l = RegisterLimiter::new(3);
        for _ in 0..3 {
            l.try_take().unwrap();
        }
        let wait = l.try_take().unwrap_err();
        assert!(wait <= Duration::from_millis(334), "{wait:?}");
        RegisterLimiter::new(0).try_take().unwrap();
    }

    #[test]
    fn ttl_cache_expires_and_can_be_disabled() {
        let c = TtlCache::new(Some(Duration::from_millis(30)), 2);
        c.put(1, "a");
        assert_eq!(c.get(&1), Some("a"));
        std::thread::sleep(Duration::from_millis(40));
        assert_eq!(c.get(&1), None);
        let off: TtlCache<i32, &str> = TtlCache::new(None, 2);
        off.put(1, "a");
        assert_eq!(off.get(&1), None);
        c.put(1, "a");
        c.put(2, "b");
        c.put(3, "c");
        assert!(c.entries.lock().unwrap().len() <= 2);
    }
}
