//! The running agent: one main loop that registers, long-polls for jobs and runs up to
//! `max_concurrent_jobs` of them; a heartbeat task that keeps leases alive, reports the
//! installed plugins and re-registers when the coordinator has forgotten us or comes
//! back after an outage; the metrics endpoint.
//!
//! Ownership: [`RunningAgent`] owns every task through two cancellation tokens —
//! `shutdown` (stop taking jobs) and `stop_jobs` (stop running ones, fired after
//! `jobs.shutdown_grace`). SIGTERM → shutdown → running jobs finish or are stopped and
//! reported failed → the process exits 0.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arcade_proto::v1 as pb;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tonic::Code;

use crate::cache::{CacheOptions, PluginCache};
use crate::config::ValidConfig;
use crate::fetch::Fetcher;
use crate::fetch::source::CoordinatorSource;
use crate::job::{JobContext, run_job};
use crate::mesh::MeshNode;
use crate::metrics::{Metrics, StatusLabel};
use crate::preheat::{PreheatContext, Preheater};
use crate::session::{Session, installed_list};

/// Most installed plugins reported (the coordinator's limit).
const MAX_REPORTED: usize = 10_000;

/// Starting the agent failed.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The plugin cache cannot be opened.
    #[error("cannot open the plugin cache at {dir}: {source}")]
    Cache {
        /// The directory.
        dir: std::path::PathBuf,
        /// Why.
        #[source]
        source: crate::cache::CacheError,
    },
    /// A builtin plugin is missing or unusable.
    #[error("builtin plugin {plugin} (file {file}): {source}")]
    Builtin {
        /// id@version.
        plugin: String,
        /// Its file.
        file: String,
        /// Why.
        #[source]
        source: crate::cache::CacheError,
    },
    /// The session cannot be set up.
    #[error(transparent)]
    Session(#[from] crate::session::SessionError),
    /// The metrics listener cannot be bound.
    #[error("cannot listen on {addr} (metrics_listen): {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The mesh host cannot start.
    #[error("mesh: {0}")]
    Mesh(#[source] arcade_p2p::mesh::host::MeshError),
    /// The agent's key cannot be read or created.
    #[error("agent key {path}: {source}")]
    Identity {
        /// The key file.
        path: std::path::PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The coordinator refused to register us (bad enrollment token, bad id).
    #[error("the coordinator refused registration: {0}")]
    Refused(String),
}

/// State shared by the agent's tasks.
struct Core {
    config: ValidConfig,
    /// The agent's long-lived key (`crate::identity`): signs every Register.
    key: libp2p_identity::Keypair,
    /// `revocations_upto` of the last heartbeat answer.
    revocations_seen: std::sync::atomic::AtomicU64,
    /// The libp2p host, when `mesh.enabled`.
    mesh: Option<MeshNode>,
    /// The coordinator's ticket key (from registration), for ticket renewals.
    mesh_key: Mutex<Vec<u8>>,
    session: Session,
    cache: PluginCache,
    fetcher: Fetcher,
    metrics: Metrics,
    /// Preheat orders being carried out, and their reports.
    preheat: Preheater,
    /// Running job id → its stop token.
    running: Mutex<HashMap<String, CancellationToken>>,
    /// Where each running job is (sent with heartbeats).
    progress: crate::progress::ProgressBoard,
    /// Running jobs an admin cancelled (reported as CANCELLED once stopped).
    cancelled: Mutex<std::collections::HashSet<String>>,
    /// What a job report may hold (stated by the coordinator at registration).
    limits: Mutex<crate::session::ReportLimits>,
    /// The installed list the coordinator last accepted (heartbeats send it only when
    /// it changed).
    reported: Mutex<Option<Vec<pb::InstalledPlugin>>>,
    shutdown: CancellationToken,
    stop_jobs: CancellationToken,
}

/// A running agent.
pub struct RunningAgent {
    /// Bound metrics address, if enabled.
    pub metrics_addr: Option<SocketAddr>,
    core: Arc<Core>,
    main: tokio::task::JoinHandle<Result<(), StartError>>,
    background: JoinSet<()>,
}

impl std::fmt::Debug for RunningAgent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunningAgent")
            .field("id", &self.core.config.id)
            .finish_non_exhaustive()
    }
}

/// Makes this process non-dumpable (Linux `PR_SET_DUMPABLE` = 0): its `/proc/PID/environ`,
/// `mem` and the like become readable by root only, and other processes of the same user
/// — the jobs and plugins it runs — cannot ptrace it, so they cannot read its tokens.
/// (`/proc/PID/cmdline` stays readable by everyone: tokens do not belong there.) Called
/// by the `arcade-agent` binary; an embedding process decides for itself.
pub fn protect_secrets() {
    #[cfg(target_os = "linux")]
    if let Err(e) = nix::sys::prctl::set_dumpable(false) {
        tracing::warn!(error = %e, "cannot make the agent non-dumpable; jobs may read its tokens from /proc");
    }
}

fn backoff_step(current: Duration) -> Duration {
    (current * 2).min(Duration::from_secs(10))
}

impl Core {
    async fn installed(&self) -> Vec<pb::InstalledPlugin> {
        let cache = self.cache.clone();
        match tokio::task::spawn_blocking(move || cache.installed()).await {
            Ok(Ok(mut list)) => {
                list.truncate(MAX_REPORTED);
                installed_list(&list)
            }
            _ => Vec::new(),
        }
    }

    async fn register(&self) -> Result<Duration, tonic::Status> {
        let mut req = pb::RegisterRequest {
            agent_id: self.config.id.clone(),
            hostname: std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_owned())
                .unwrap_or_default(),
            labels: arcade_p2p::labels::to_proto(&self.config.labels),
            agent_version: env!("CARGO_PKG_VERSION").into(),
            peer_id: self
                .mesh
                .as_ref()
                .map(MeshNode::peer_id)
                .unwrap_or_default(),
            addrs: self
                .mesh
                .as_ref()
                .map(|m| m.advertise.iter().map(ToString::to_string).collect())
                .unwrap_or_default(),
            max_concurrent_jobs: self.config.raw.max_concurrent_jobs,
            installed_plugins: self.installed().await,
            ..Default::default()
        };
        arcade_p2p::identity::sign_register(&mut req, &self.key, arcade_p2p::now_ms());
        let sent = req.installed_plugins.clone();
        let reg = self.session.register(req).await?;
        *self.reported.lock().expect("reported lock") = Some(sent);
        *self.limits.lock().expect("limits lock") = reg.limits;
        tracing::info!(agent = %self.config.id, "registered with the coordinator");
        if let Some(mesh) = &self.mesh {
            mesh.set_credentials(reg.mesh_ticket, &reg.mesh_public_key)
                .await;
            *self.mesh_key.lock().expect("mesh key lock") = reg.mesh_public_key;
        }
        Ok(reg.heartbeat_interval)
    }

    /// Registers, retrying transient failures until shutdown. `Ok(None)` = shut down.
    async fn register_until_ok(&self) -> Result<Option<Duration>, StartError> {
        let mut delay = Duration::from_millis(200);
        loop {
            match self.register().await {
                Ok(interval) => return Ok(Some(interval)),
                Err(s)
                    if matches!(
                        s.code(),
                        Code::Unauthenticated | Code::InvalidArgument | Code::PermissionDenied
                    ) =>
                {
                    return Err(StartError::Refused(format!(
                        "{:?}: {}",
                        s.code(),
                        s.message()
                    )));
                }
                Err(s) => {
                    tracing::warn!(error = %s.message(), code = ?s.code(), "cannot register yet; retrying");
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = self.shutdown.cancelled() => return Ok(None),
            }
            delay = backoff_step(delay);
        }
    }

    fn running_ids(&self) -> Vec<String> {
        self.running
            .lock()
            .expect("running lock")
            .keys()
            .cloned()
            .collect()
    }

    async fn heartbeat_loop(self: Arc<Self>, mut interval: Duration) {
        let mut was_down = false;
        let mut beats = 0u64;
        loop {
            tokio::select! {
                _ = tokio::time::sleep(interval) => {}
                _ = self.stop_jobs.cancelled() => return,
            }
            beats += 1;
            if let Some(mesh) = &self.mesh {
                self.metrics.sync_mesh(mesh.handle().stats());
            }
            let installed = self.installed().await;
            let changed = self.reported.lock().expect("reported lock").as_ref() != Some(&installed);
            let reports = self.preheat.take_reports();
            let req = pb::HeartbeatRequest {
                agent_id: self.config.id.clone(),
                running_jobs: self.running_ids(),
                installed_plugins: if changed {
                    installed.clone()
                } else {
                    Vec::new()
                },
                installed_set: changed,
                revocations_seen: self
                    .revocations_seen
                    .load(std::sync::atomic::Ordering::Relaxed),
                preheat_reports: reports.clone(),
                job_progress: self.progress.snapshot(),
                fetching: self
                    .fetcher
                    .fetching()
                    .iter()
                    .map(arcade_p2p::ContentId::to_hex)
                    .collect(),
            };
            match self.session.client().heartbeat(req).await {
                Ok(resp) => {
                    if changed {
                        *self.reported.lock().expect("reported lock") = Some(installed);
                    }
                    let resp = resp.into_inner();
                    self.preheat.handle(resp.preheat);
                    self.revocations_seen
                        .store(resp.revocations_upto, std::sync::atomic::Ordering::Relaxed);
                    if let (Some(mesh), false) = (&self.mesh, resp.revoked_peers.is_empty()) {
                        let peers: Vec<_> = resp
                            .revoked_peers
                            .iter()
                            .filter_map(|p| p.parse().ok())
                            .collect();
                        tracing::info!(
                            peers = peers.len(),
                            "mesh peers revoked by the coordinator"
                        );
                        if let Err(e) = mesh.handle().revoke(peers).await {
                            tracing::warn!(error = %e, "cannot pass revocations to the mesh host");
                        }
                    }
                    if let (Some(mesh), false) = (&self.mesh, resp.mesh_ticket.is_empty()) {
                        let key = self.mesh_key.lock().expect("mesh key lock").clone();
                        mesh.set_credentials(resp.mesh_ticket.clone(), &key).await;
                    }
                    if was_down {
                        // The coordinator may have restarted: tell it everything again.
                        if let Ok(i) = self.register().await {
                            interval = i;
                        }
                        was_down = false;
                    }
                    for job in resp.revoked_jobs {
                        if let Some(token) = self.running.lock().expect("running lock").get(&job) {
                            tracing::warn!(job = %job, "lease revoked by the coordinator: stopping the job");
                            token.cancel();
                        }
                    }
                    for job in resp.cancelled_jobs {
                        if let Some(token) = self.running.lock().expect("running lock").get(&job) {
                            tracing::warn!(job = %job, "job cancelled by an admin: killing its processes");
                            self.cancelled
                                .lock()
                                .expect("cancelled lock")
                                .insert(job.clone());
                            token.cancel();
                        }
                    }
                }
                Err(s) if s.code() == Code::Unauthenticated => {
                    self.preheat.restore(reports);
                    tracing::warn!("coordinator does not know our token: registering again");
                    if let Ok(i) = self.register().await {
                        interval = i;
                    }
                }
                Err(s) => {
                    self.preheat.restore(reports);
                    if !was_down {
                        tracing::warn!(error = %s.message(), "heartbeat failed; coordinator unreachable?");
                    }
                    was_down = true;
                }
            }
            if beats % 6 == 0 {
                let cache = self.cache.clone();
                if let Ok(Ok(evicted)) = tokio::task::spawn_blocking(move || cache.evict()).await {
                    if !evicted.is_empty() {
                        self.fetcher.refresh_cache_metrics().await;
                    }
                    if let Some(mesh) = &self.mesh {
                        for e in &evicted {
                            mesh.forget(e.sha256).await;
                        }
                    }
                }
            }
        }
    }

    /// Reports a result until it is accepted, refused for good or 30 attempts failed.
    /// The report is cut to the coordinator's limits first. A refusal of its content
    /// (`INVALID_ARGUMENT`, `OUT_OF_RANGE`, …) is not retried: a minimal report saying
    /// why replaces it once, so the job ends instead of being re-run after its lease.
    async fn report(&self, mut report: pb::ReportJobResultRequest) {
        let job = report.job_id.clone();
        let limits = *self.limits.lock().expect("limits lock");
        if limits.fit(&mut report) {
            tracing::warn!(job = %job, "job result cut to the coordinator's limits");
        }
        let mut delay = Duration::from_millis(200);
        let mut fallback_sent = false;
        for attempt in 0..30 {
            match self
                .session
                .client()
                .report_job_result(report.clone())
                .await
            {
                Ok(_) => return,
                Err(s) if s.code() == Code::FailedPrecondition => {
                    tracing::warn!(job = %job, error = %s.message(), "result not accepted: the lease is gone");
                    return;
                }
                Err(s) if s.code() == Code::Unauthenticated => {
                    let _ = self.register().await;
                }
                Err(s)
                    if matches!(
                        s.code(),
                        Code::InvalidArgument
                            | Code::OutOfRange
                            | Code::PermissionDenied
                            | Code::NotFound
                    ) =>
                {
                    if fallback_sent {
                        tracing::error!(job = %job, error = %s.message(), "the coordinator refused even the minimal result; giving up");
                        return;
                    }
                    tracing::error!(job = %job, code = ?s.code(), error = %s.message(), "the coordinator refused the result; sending a minimal one");
                    report = pb::ReportJobResultRequest {
                        agent_id: report.agent_id.clone(),
                        job_id: report.job_id.clone(),
                        status: pb::JobStatus::Failed as i32,
                        exit_code: report.exit_code,
                        output_tail: String::new(),
                        error_message: format!(
                            "the coordinator refused this job's result ({:?}: {}); its output and plugin results were dropped",
                            s.code(),
                            s.message().chars().take(512).collect::<String>()
                        ),
                        plugin_results: Vec::new(),
                        started_at: report.started_at,
                        finished_at: report.finished_at,
                    };
                    fallback_sent = true;
                    continue;
                }
                Err(s) => {
                    tracing::warn!(job = %job, attempt, error = %s.message(), "cannot report the result yet; retrying");
                }
            }
            tokio::time::sleep(delay).await;
            delay = backoff_step(delay);
        }
        tracing::error!(job = %job, "giving up reporting the result");
    }

    async fn run_and_report(self: Arc<Self>, job: pb::Job) {
        let token = self.stop_jobs.child_token();
        self.running
            .lock()
            .expect("running lock")
            .insert(job.job_id.clone(), token.clone());
        self.metrics.running_jobs.inc();
        let ctx = JobContext {
            config: self.config.clone(),
            cache: self.cache.clone(),
            fetcher: self.fetcher.clone(),
            progress: self.progress.clone(),
        };
        let id = job.job_id.clone();
        tracing::info!(job = %id, plugins = job.plugins.len(), "job started");
        let mut report = run_job(&ctx, job, &token).await;
        self.progress.finish(&id);
        if self.cancelled.lock().expect("cancelled lock").remove(&id) {
            report.status = pb::JobStatus::Cancelled as i32;
        }
        let status = match pb::JobStatus::try_from(report.status) {
            Ok(pb::JobStatus::Succeeded) => "succeeded",
            Ok(pb::JobStatus::Cancelled) => "cancelled",
            _ => "failed",
        };
        tracing::info!(job = %id, status, error = %report.error_message, "job finished");
        self.report(report).await;
        self.running.lock().expect("running lock").remove(&id);
        self.metrics.running_jobs.dec();
        self.metrics
            .jobs
            .get_or_create(&StatusLabel {
                status: status.into(),
            })
            .inc();
    }

    /// Serves to peers what the cache held before any job asked for it — builtin
    /// plugins and plugins cached before a restart — once their manifests (and access
    /// labels) come from the coordinator. Plugins the coordinator does not describe to
    /// this agent (unknown, or restricted) are not served. Runs once, after the first
    /// registration, one plugin at a time.
    async fn serve_cached(self: Arc<Self>) {
        let Some(mesh) = &self.mesh else { return };
        let cache = self.cache.clone();
        let Ok(Ok(mut held)) = tokio::task::spawn_blocking(move || cache.installed()).await else {
            return;
        };
        held.truncate(MAX_REPORTED);
        let mut served = 0usize;
        for p in held {
            if self.shutdown.is_cancelled() {
                return;
            }
            if mesh.serves(&p.sha256) {
                continue;
            }
            let req = pb::GetManifestRequest {
                agent_id: self.config.id.clone(),
                plugin_id: p.plugin.id.to_string(),
                version: p.plugin.version.to_string(),
                ..Default::default()
            };
            let resp = match self.session.client().get_manifest(req).await {
                Ok(r) => r.into_inner(),
                Err(s) => {
                    tracing::debug!(plugin = %p.plugin, error = %s.message(), "cached plugin not served to peers: no manifest from the coordinator");
                    continue;
                }
            };
            let (Some(info), Some(m)) = (resp.plugin, resp.manifest) else {
                continue;
            };
            match arcade_p2p::Manifest::from_proto(&m) {
                // Only what matches the cached, verified bytes.
                Ok(manifest) if manifest.content_id() == p.sha256 && manifest.size() == p.size => {
                    mesh.serve_cached(&info, &manifest, p.path.clone()).await;
                    served += 1;
                }
                _ => {
                    tracing::warn!(plugin = %p.plugin, "the coordinator's manifest does not match the cached plugin: not served")
                }
            }
        }
        if served > 0 {
            tracing::info!(served, "cached plugins served to peers");
        }
    }

    async fn main_loop(self: Arc<Self>) -> Result<(), StartError> {
        let Some(interval) = self.register_until_ok().await? else {
            return Ok(());
        };
        let heartbeat = tokio::spawn(self.clone().heartbeat_loop(interval));
        let serving = tokio::spawn(self.clone().serve_cached());
        let slots = Arc::new(Semaphore::new(self.config.raw.max_concurrent_jobs as usize));
        let mut jobs = JoinSet::new();
        let mut delay = Duration::from_millis(200);
        loop {
            while jobs.try_join_next().is_some() {}
            let permit = tokio::select! {
                p = slots.clone().acquire_owned() => p.expect("semaphore is never closed"),
                _ = self.shutdown.cancelled() => break,
            };
            let req = pb::FetchJobRequest {
                agent_id: self.config.id.clone(),
                max_jobs: 1,
                wait_seconds: self.config.raw.jobs.poll_wait.get().as_secs() as u32,
            };
            let mut client = self.session.client();
            let fetched = tokio::select! {
                r = client.fetch_job(req) => r,
                _ = self.shutdown.cancelled() => break,
            };
            match fetched {
                Ok(resp) => {
                    delay = Duration::from_millis(200);
                    let mut permit = Some(permit);
                    for job in resp.into_inner().jobs {
                        let core = self.clone();
                        let held = permit.take();
                        jobs.spawn(async move {
                            let _slot = held;
                            core.run_and_report(job).await;
                        });
                    }
                }
                Err(s) => {
                    drop(permit);
                    if s.code() == Code::Unauthenticated {
                        tracing::warn!("coordinator does not know our token: registering again");
                        if let Err(e) = self.register().await {
                            tracing::warn!(error = %e.message(), "re-registration failed");
                        }
                    } else {
                        tracing::warn!(error = %s.message(), code = ?s.code(), "cannot fetch jobs; retrying");
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = self.shutdown.cancelled() => break,
                    }
                    delay = backoff_step(delay);
                }
            }
        }
        // Shutdown: no new jobs; running ones get the grace period, then are stopped.
        let grace = self.config.raw.jobs.shutdown_grace.get();
        if !jobs.is_empty() {
            tracing::info!(
                running = jobs.len(),
                grace_s = grace.as_secs(),
                "waiting for running jobs"
            );
        }
        let drained =
            tokio::time::timeout(grace, async { while jobs.join_next().await.is_some() {} }).await;
        if drained.is_err() {
            tracing::warn!("grace period over: stopping running jobs");
            self.stop_jobs.cancel();
            let _ = tokio::time::timeout(Duration::from_secs(30), async {
                while jobs.join_next().await.is_some() {}
            })
            .await;
        }
        self.stop_jobs.cancel();
        self.preheat.drain().await;
        serving.abort();
        let _ = serving.await;
        let _ = heartbeat.await;
        if let Some(mesh) = &self.mesh {
            mesh.shutdown().await;
        }
        Ok(())
    }
}

impl Drop for RunningAgent {
    /// A dropped agent stops at once (no grace): its tasks must not outlive it.
    fn drop(&mut self) {
        self.core.shutdown.cancel();
        self.core.stop_jobs.cancel();
    }
}

impl RunningAgent {
    /// Opens the cache, registers builtins, binds metrics and starts the loops.
    pub async fn start(config: ValidConfig) -> Result<Self, StartError> {
        let dir = config.plugin_dir.clone();
        // The data directory holds the peer key and the cache index: the agent's alone.
        arcade_p2p::settings::private_dir(&config.base_dir).map_err(|e| StartError::Cache {
            dir: config.base_dir.clone(),
            source: e.into(),
        })?;
        let opts = CacheOptions {
            max_size: config.raw.cache.max_size.bytes(),
            eviction: config.raw.cache.eviction,
            ttl: Some(config.raw.cache.ttl.0.get()).filter(|d| !d.is_zero()),
            watermarks: crate::cache::Watermarks {
                high: config.raw.cache.high_watermark,
                low: config
                    .raw
                    .cache
                    .low_watermark
                    .unwrap_or(config.raw.cache.high_watermark),
                of: config.raw.cache.watermark_of,
            },
        };
        let d = dir.clone();
        let cache = tokio::task::spawn_blocking(move || PluginCache::open(&d, opts))
            .await
            .map_err(|e| StartError::Cache {
                dir: dir.clone(),
                source: std::io::Error::other(e.to_string()).into(),
            })?
            .map_err(|source| StartError::Cache {
                dir: dir.clone(),
                source,
            })?;
        for (plugin, file) in config.builtin.clone() {
            let c = cache.clone();
            let (p, f) = (plugin.clone(), file.clone());
            tokio::task::spawn_blocking(move || c.register_builtin(&p, &f))
                .await
                .map_err(|e| StartError::Builtin {
                    plugin: plugin.to_string(),
                    file: file.clone(),
                    source: std::io::Error::other(e.to_string()).into(),
                })?
                .map_err(|source| StartError::Builtin {
                    plugin: plugin.to_string(),
                    file: file.clone(),
                    source,
                })?;
            tracing::info!(plugin = %plugin, "builtin plugin registered");
        }
        if config.raw.coordinator.starts_with("http://") {
            tracing::warn!(coordinator = %config.raw.coordinator, "plaintext gRPC to the coordinator: tokens cross the network in clear");
        }
        let session = Session::new(
            &config.raw.coordinator,
            &config.raw.tls.client(),
            &config.id,
            &config.raw.enroll_token,
        )?;
        let key = crate::identity::load_or_create(&config.mesh_identity).map_err(|source| {
            StartError::Identity {
                path: config.mesh_identity.clone(),
                source,
            }
        })?;
        let mesh = if config.raw.mesh.enabled {
            Some(
                MeshNode::start(&config, cache.clone(), key.clone())
                    .await
                    .map_err(StartError::Mesh)?,
            )
        } else {
            None
        };
        let metrics = Metrics::new();
        let fetcher = Fetcher::new(
            cache.clone(),
            Arc::new(CoordinatorSource::new(
                session.clone(),
                config.raw.download.compression,
            )),
            config.raw.download.clone(),
            metrics.clone(),
            config.id.clone(),
            mesh.clone(),
        )
        .limit_downloads(config.raw.mesh.download_rate.bytes());
        fetcher.refresh_cache_metrics().await;
        let shutdown = CancellationToken::new();
        let stop_jobs = CancellationToken::new();
        let mut background = JoinSet::new();
        let metrics_addr = match config.metrics_listen {
            None => None,
            Some(addr) => {
                let listener = tokio::net::TcpListener::bind(addr)
                    .await
                    .map_err(|source| StartError::Bind { addr, source })?;
                let bound = listener.local_addr().ok();
                let m = metrics.clone();
                background.spawn(arcade_p2p::metrics_http::serve_metrics(
                    listener,
                    move || m.render(),
                    stop_jobs.clone(),
                ));
                bound
            }
        };
        let preheat = Preheater::new(PreheatContext {
            agent_id: config.id.clone(),
            session: session.clone(),
            fetcher: fetcher.clone(),
            cache: cache.clone(),
            trust: config.trust.clone(),
            stop: stop_jobs.clone(),
        });
        let core = Arc::new(Core {
            preheat,
            config,
            key,
            revocations_seen: std::sync::atomic::AtomicU64::new(0),
            mesh,
            mesh_key: Mutex::new(Vec::new()),
            session,
            cache,
            fetcher,
            metrics,
            running: Mutex::new(HashMap::new()),
            progress: crate::progress::ProgressBoard::default(),
            cancelled: Mutex::new(Default::default()),
            reported: Mutex::new(None),
            limits: Mutex::new(Default::default()),
            shutdown,
            stop_jobs,
        });
        let main = tokio::spawn(core.clone().main_loop());
        Ok(Self {
            metrics_addr,
            core,
            main,
            background,
        })
    }

    /// The agent's metrics, the mesh host's counters brought up to date.
    pub fn metrics(&self) -> &Metrics {
        if let Some(mesh) = &self.core.mesh {
            self.core.metrics.sync_mesh(mesh.handle().stats());
        }
        &self.core.metrics
    }

    /// The plugin cache.
    pub fn cache(&self) -> &PluginCache {
        &self.core.cache
    }

    /// A token that starts a graceful shutdown when cancelled.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.core.shutdown.clone()
    }

    /// Runs until shut down (or a fatal registration refusal), then drains.
    pub async fn wait(mut self) -> Result<(), StartError> {
        let result = match (&mut self.main).await {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = %e, "agent main loop failed");
                Ok(())
            }
        };
        self.core.shutdown.cancel();
        self.core.stop_jobs.cancel();
        while self.background.join_next().await.is_some() {}
        result
    }

    /// Graceful shutdown: stop taking jobs, let running ones finish within the grace
    /// period, report them, stop.
    pub async fn shutdown(self) -> Result<(), StartError> {
        self.core.shutdown.cancel();
        self.wait().await
    }
}
