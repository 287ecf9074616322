//! Starting and stopping a coordinator: opens the data directory (redb + blob store),
//! resolves tokens, binds the gRPC and metrics listeners, and runs the servers and the
//! lease and retention sweepers until shut down.
//!
//! Ownership: [`RunningCoordinator`] owns every task it starts (gRPC server, metrics
//! server, lease and retention sweepers) through one `CancellationToken`; [`RunningCoordinator::shutdown`]
//! cancels it and waits (bounded) for them to drain.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arcade_proto::v1::agent_server::AgentServer;
use arcade_proto::v1::fleet_server::FleetServer;
use arcade_proto::v1::jobs_server::JobsServer;
use arcade_proto::v1::plugin_admin_server::PluginAdminServer;
use rand::RngCore as _;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::blob::{BlobStore, FsBlobStore};
use crate::config::{MetricsListen, ValidConfig};
use crate::metrics::Metrics;
use crate::service::agents::AgentService;
use crate::service::fleet_api::FleetService;
use crate::service::jobs::JobsService;
use crate::service::plugins::{PluginAdminService, collect_orphans};
use crate::service::{Credentials, Shared};
use crate::store::{MetaStore, RedbStore};
use arcade_p2p::mesh::ticket::TicketIssuer;

/// Largest message the coordinator accepts (pushes, results) and sends (manifests of
/// up to 2^20 chunks, chunks of up to 64 MiB).
const MAX_DECODE: usize = 8 << 20;
const MAX_ENCODE: usize = arcade_proto::MAX_MESSAGE;

/// Starting the coordinator failed.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The data directory or a token file cannot be used.
    #[error("{what} {path}: {source}")]
    Path {
        /// What was being done.
        what: &'static str,
        /// Where.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The metadata database cannot be opened.
    #[error("cannot open metadata database: {0}")]
    Store(#[from] crate::store::StoreError),
    /// The blob store cannot be opened.
    #[error("cannot open plugin storage: {0}")]
    Blob(#[from] crate::blob::BlobError),
    /// A listener cannot be bound.
    #[error("cannot listen on {addr} ({key}): {source}")]
    Bind {
        /// The config key.
        key: &'static str,
        /// The address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Reflection descriptors are broken (a build defect).
    #[error("gRPC reflection setup failed: {0}")]
    Reflection(String),
    /// The TLS certificate, key or client CA cannot be used.
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    /// Start-up garbage collection failed.
    #[error("start-up cleanup failed: {0}")]
    Cleanup(String),
}

/// A coordinator that is serving.
#[derive(Debug)]
pub struct RunningCoordinator {
    /// Bound gRPC address.
    pub grpc_addr: SocketAddr,
    /// Bound metrics address, if enabled.
    pub metrics_addr: Option<SocketAddr>,
    /// The admin token in force.
    pub admin_token: String,
    /// The enrollment token in force.
    pub enroll_token: String,
    /// Whether the gRPC listener speaks TLS.
    pub tls: bool,
    metrics: Metrics,
    shutdown: CancellationToken,
    tasks: JoinSet<()>,
    /// The store, to see that shutdown released it (connection tasks may still hold it).
    store: std::sync::Weak<dyn MetaStore>,
    /// Whether the store's database itself is released (reads of cancelled callers may
    /// still run on the blocking pool after the store is dropped).
    store_released: crate::store::ReleaseProbe,
}

fn path_err(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> StartError + use<> {
    let path = path.to_owned();
    move |source| StartError::Path { what, path, source }
}

/// Writes `bytes` to `path` atomically with mode 0600.
fn write_private(path: &Path, bytes: &[u8]) -> Result<(), StartError> {
    use std::io::Write as _;
    let tmp = path.with_extension("tmp");
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        opts.mode(0o600);
    }
    let mut f = opts.open(&tmp).map_err(path_err("cannot write", &tmp))?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .map_err(path_err("cannot write", &tmp))?;
    std::fs::rename(&tmp, path).map_err(path_err("cannot write", path))
}

/// The mesh ticket key in `<data_dir>/mesh.key`, created on first start.
fn mesh_key(data_dir: &Path) -> Result<TicketIssuer, StartError> {
    let path = data_dir.join("mesh.key");
    match std::fs::read(&path) {
        Ok(bytes) => TicketIssuer::from_bytes(&bytes).map_err(|e| StartError::Path {
            what: "unusable mesh key",
            path: path.clone(),
            source: std::io::Error::other(e.to_string()),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let issuer = TicketIssuer::generate();
            let bytes = issuer.to_bytes().map_err(|e| StartError::Path {
                what: "cannot encode mesh key",
                path: path.clone(),
                source: std::io::Error::other(e.to_string()),
            })?;
            write_private(&path, &bytes)?;
            Ok(issuer)
        }
        Err(e) => Err(path_err("cannot read mesh key", &path)(e)),
    }
}

/// The configured token, or the one in `<data_dir>/<file>`, or a new one written there.
fn resolve_token(configured: &str, data_dir: &Path, file: &str) -> Result<String, StartError> {
    if !configured.is_empty() {
        return Ok(configured.to_owned());
    }
    let path = data_dir.join(file);
    match std::fs::read_to_string(&path) {
        Ok(t) if !t.trim().is_empty() => return Ok(t.trim().to_owned()),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(path_err("cannot read token file", &path)(e)),
    }
    let mut raw = [0u8; 24];
    rand::rng().fill_bytes(&mut raw);
    let token = hex::encode(raw);
    write_private(&path, token.as_bytes())?;
    tracing::warn!(path = %path.display(), "no {file} configured: generated one");
    Ok(token)
}

/// Runs `work` every `period` until shutdown; failures are logged, not fatal.
fn spawn_periodic<F, Fut>(
    tasks: &mut JoinSet<()>,
    shutdown: &CancellationToken,
    what: &'static str,
    period: Duration,
    mut work: F,
) where
    F: FnMut() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<(), crate::store::StoreError>> + Send,
{
    let token = shutdown.clone();
    tasks.spawn(async move {
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = token.cancelled() => break,
                _ = tick.tick() => {
                    if let Err(e) = work().await {
                        tracing::error!(error = %e, "{what} failed");
                    }
                }
            }
        }
    });
}

impl RunningCoordinator {
    /// Opens storage, binds listeners and starts serving.
    pub async fn start(config: ValidConfig) -> Result<Self, StartError> {
        let data_dir = config.raw.data_dir.clone();
        arcade_p2p::settings::private_dir(&data_dir)
            .map_err(path_err("cannot create data_dir", &data_dir))?;
        let admin_token = resolve_token(&config.raw.admin_token, &data_dir, "admin.token")?;
        let enroll_token = resolve_token(&config.raw.enroll_token, &data_dir, "enroll.token")?;
        let tickets = mesh_key(&data_dir)?;
        let db_path = data_dir.join("coordinator.redb");
        let metrics = Metrics::new();
        let cache = config.raw.store.cache_size.bytes() as usize;
        let store_metrics = metrics.store.clone();
        let store: Arc<dyn MetaStore> = Arc::new(
            tokio::task::spawn_blocking(move || RedbStore::open(&db_path, cache, store_metrics))
                .await
                .map_err(|e| StartError::Cleanup(e.to_string()))??,
        );
        let store_weak = Arc::downgrade(&store);
        let store_released = store.released_probe();
        let storage = config.storage_path.clone();
        let blobs: Arc<dyn BlobStore> = Arc::new(
            tokio::task::spawn_blocking(move || FsBlobStore::open(&storage))
                .await
                .map_err(|e| StartError::Cleanup(e.to_string()))??,
        );

        let t = &config.raw.tls;
        let tls = if t.cert.as_os_str().is_empty() {
            tracing::warn!(
                listen = %config.listen,
                "serving plaintext gRPC (no [tls] cert): tokens cross the network in clear"
            );
            None
        } else {
            Some(crate::tls::server_config(t)?)
        };
        let grpc_listener =
            tokio::net::TcpListener::bind(config.listen)
                .await
                .map_err(|source| StartError::Bind {
                    key: "listen",
                    addr: config.listen,
                    source,
                })?;
        let grpc_addr = grpc_listener
            .local_addr()
            .map_err(|source| StartError::Bind {
                key: "listen",
                addr: config.listen,
                source,
            })?;
        let metrics_listener = match config.metrics_listen {
            MetricsListen::Off => None,
            MetricsListen::At(addr) => Some(tokio::net::TcpListener::bind(addr).await.map_err(
                |source| StartError::Bind {
                    key: "metrics_listen",
                    addr,
                    source,
                },
            )?),
        };
        let metrics_addr = metrics_listener.as_ref().and_then(|l| l.local_addr().ok());

        let shutdown = CancellationToken::new();
        let shared = Arc::new(
            Shared::new(
                config,
                store,
                blobs,
                metrics,
                Credentials {
                    admin_token: &admin_token,
                    enroll_token: &enroll_token,
                    tickets,
                },
                shutdown.clone(),
            )
            .await?,
        );
        let removed = collect_orphans(&shared)
            .await
            .map_err(|s| StartError::Cleanup(s.message().to_owned()))?;
        if removed > 0 {
            tracing::info!(removed, "removed blobs left by an interrupted push");
        }
        let metrics = shared.metrics.clone();

        // Both reflection versions: grpcurl, grpcui, Postman and Evans still speak
        // v1alpha in many of their versions.
        let reflection = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(arcade_proto::FILE_DESCRIPTOR_SET)
            .build_v1()
            .map_err(|e| StartError::Reflection(e.to_string()))?;
        let reflection_v1alpha = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(arcade_proto::FILE_DESCRIPTOR_SET)
            .build_v1alpha()
            .map_err(|e| StartError::Reflection(e.to_string()))?;
        let (health_reporter, health) = tonic_health::server::health_reporter();
        health_reporter
            .set_serving::<AgentServer<AgentService>>()
            .await;
        health_reporter
            .set_serving::<JobsServer<JobsService>>()
            .await;
        health_reporter
            .set_serving::<PluginAdminServer<PluginAdminService>>()
            .await;
        health_reporter
            .set_serving::<FleetServer<FleetService>>()
            .await;

        let grpc = &shared.config.raw.grpc;
        let router = tonic::transport::Server::builder()
            .tcp_nodelay(true)
            .http2_keepalive_interval(Some(Duration::from_secs(30)))
            // A peer that does not answer a keep-alive ping in time is dropped.
            .http2_keepalive_timeout(Some(grpc.keepalive_timeout.get()))
            .tcp_keepalive(Some(Duration::from_secs(60)))
            .max_concurrent_streams(Some(grpc.max_streams_per_connection))
            .layer(crate::service::gate::AuthGateLayer(shared.clone()))
            .initial_stream_window_size(Some(arcade_proto::STREAM_WINDOW))
            .initial_connection_window_size(Some(arcade_proto::CONNECTION_WINDOW))
            .add_service(health)
            .add_service(reflection)
            .add_service(reflection_v1alpha)
            .add_service(
                AgentServer::new(AgentService(shared.clone()))
                    .max_decoding_message_size(MAX_DECODE)
                    .max_encoding_message_size(MAX_ENCODE),
            )
            .add_service(
                PluginAdminServer::new(PluginAdminService(shared.clone()))
                    .max_decoding_message_size(MAX_DECODE)
                    .max_encoding_message_size(MAX_ENCODE),
            )
            .add_service(
                JobsServer::new(JobsService(shared.clone()))
                    .max_decoding_message_size(MAX_DECODE)
                    .max_encoding_message_size(MAX_ENCODE),
            )
            .add_service(
                FleetServer::new(FleetService(shared.clone()))
                    .max_encoding_message_size(MAX_ENCODE),
            );

        let mut tasks = JoinSet::new();
        let token = shutdown.clone();
        let serves_tls = tls.is_some();
        let accepted = crate::listener::accept(
            grpc_listener,
            grpc.max_connections_per_address as usize,
            token.clone(),
        );
        if let Some((config, reloader)) = tls {
            let incoming = crate::tls::incoming(accepted, config);
            tasks.spawn(crate::tls::watch(reloader, token.clone()));
            tasks.spawn(async move {
                if let Err(e) = router
                    .serve_with_incoming_shutdown(incoming, token.cancelled_owned())
                    .await
                {
                    tracing::error!(error = %e, "gRPC server failed");
                }
            });
        } else {
            tasks.spawn(async move {
                let incoming = crate::listener::plaintext(accepted);
                if let Err(e) = router
                    .serve_with_incoming_shutdown(incoming, token.cancelled_owned())
                    .await
                {
                    tracing::error!(error = %e, "gRPC server failed");
                }
            });
        }
        if let Some(listener) = metrics_listener {
            let token = shutdown.clone();
            let m = metrics.clone();
            tasks.spawn(arcade_p2p::metrics_http::serve_metrics(
                listener,
                move || m.render(),
                token,
            ));
        }
        let jobs = &shared.config.raw.jobs;
        let lease_period =
            (jobs.lease_ttl.get() / 4).clamp(Duration::from_millis(100), Duration::from_secs(5));
        let retention_period = crate::service::leases::retention_period(jobs.retention.get());
        let sweeper = shared.clone();
        spawn_periodic(
            &mut tasks,
            &shutdown,
            "lease sweep",
            lease_period,
            move || {
                let s = sweeper.clone();
                async move { s.sweep_leases().await.map(drop) }
            },
        );
        let sweeper = shared.clone();
        spawn_periodic(
            &mut tasks,
            &shutdown,
            "retention sweep",
            retention_period,
            move || {
                let s = sweeper.clone();
                async move { s.sweep_retention().await.map(drop) }
            },
        );
        let sweeper = shared.clone();
        spawn_periodic(
            &mut tasks,
            &shutdown,
            "fetch sweep",
            Duration::from_secs(5),
            move || {
                let s = sweeper.clone();
                async move {
                    let ended = s
                        .fetches
                        .lock()
                        .expect("fetches lock")
                        .sweep(std::time::Instant::now());
                    for e in &ended {
                        crate::service::fetches::record(&s.metrics, e);
                    }
                    Ok(())
                }
            },
        );
        tracing::info!(grpc = %grpc_addr, metrics = ?metrics_addr, "coordinator started");
        Ok(Self {
            grpc_addr,
            metrics_addr,
            admin_token,
            enroll_token,
            tls: serves_tls,
            metrics,
            shutdown,
            tasks,
            store: store_weak,
            store_released,
        })
    }

    /// `http://ADDR` of the gRPC listener (`https://localhost:PORT` with TLS: test
    /// certificates name `localhost`).
    pub fn url(&self) -> String {
        if self.tls {
            format!("https://localhost:{}", self.grpc_addr.port())
        } else {
            format!("http://{}", self.grpc_addr)
        }
    }

    /// The coordinator's metrics (for tests and embedding).
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// A token that stops the coordinator when cancelled.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Runs until the shutdown token is cancelled, then drains.
    pub async fn wait(self) {
        self.shutdown.cancelled().await;
        self.drain().await;
    }

    /// Stops accepting work and waits (at most 10 s) for in-flight calls to end.
    pub async fn shutdown(self) {
        self.shutdown.cancel();
        self.drain().await;
    }

    async fn drain(mut self) {
        let drain = async { while self.tasks.join_next().await.is_some() {} };
        if tokio::time::timeout(Duration::from_secs(10), drain)
            .await
            .is_err()
        {
            tracing::warn!("shutdown drain timed out; aborting remaining tasks");
            self.tasks.abort_all();
        }
        // Connection tasks outside the set may hold the store a moment longer; the
        // caller may reopen the same files as soon as this returns (a restart).
        let released = async {
            while self.store.strong_count() > 0 || !self.store_released.released() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        };
        if tokio::time::timeout(Duration::from_secs(10), released)
            .await
            .is_err()
        {
            tracing::warn!("the store is still in use 10 s after shutdown");
        }
        tracing::info!("coordinator stopped");
    }
}
