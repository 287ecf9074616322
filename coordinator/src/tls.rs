//! TLS on the gRPC listener (`[tls]`): rustls with the ring provider, ALPN `h2`, the
//! certificate served through a resolver that is reloaded in place — on SIGHUP and when
//! the files' modification times change — so renewing a certificate needs no restart
//! and never drops a connection. Optional mutual TLS: with `client_ca`, a client must
//! present a certificate that CA signed before any request is read.
//!
//! Handshakes run off the accept loop, each bounded by [`HANDSHAKE_TIMEOUT`], at most
//! [`MAX_HANDSHAKES`] at once (beyond it new connections are closed), so a client that
//! opens connections and never speaks TLS cannot stall the listener or pin memory.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_util::sync::CancellationToken;

use crate::config::TlsConfig;
use crate::listener::Conn;

/// Longest TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Most handshakes in progress.
pub const MAX_HANDSHAKES: usize = 512;
/// How often the certificate files are checked for changes.
pub const RELOAD_CHECK: Duration = Duration::from_secs(2);

/// TLS material that cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("{key} {path}: {reason}")]
pub struct TlsError {
    /// The config key.
    pub key: &'static str,
    /// The file.
    pub path: PathBuf,
    /// Why.
    pub reason: String,
}

fn err(key: &'static str, path: &Path, reason: impl ToString) -> TlsError {
    TlsError {
        key,
        path: path.to_owned(),
        reason: reason.to_string(),
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn certs(key: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| err(key, path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| err(key, path, e))?;
    if certs.is_empty() {
        return Err(err(key, path, "holds no PEM certificate"));
    }
    Ok(certs)
}

fn modified(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

/// The listener's certificate, replaced in place when its files change.
#[derive(Debug)]
pub struct CertReloader {
    cert: PathBuf,
    key: PathBuf,
    current: RwLock<Arc<CertifiedKey>>,
    /// Modification times of (cert, key) when last loaded.
    stamp: Mutex<(Option<SystemTime>, Option<SystemTime>)>,
}

impl CertReloader {
    fn load(cert: &Path, key: &Path) -> Result<CertifiedKey, TlsError> {
        let chain = certs("tls.cert", cert)?;
        let der = PrivateKeyDer::from_pem_file(key).map_err(|e| err("tls.key", key, e))?;
        let signing = provider()
            .key_provider
            .load_private_key(der)
            .map_err(|e| err("tls.key", key, e))?;
        let certified = CertifiedKey::new(chain, signing);
        certified
            .keys_match()
            .map_err(|e| err("tls.key", key, format!("does not match tls.cert: {e}")))?;
        Ok(certified)
    }

    fn open(cert: &Path, key: &Path) -> Result<Self, TlsError> {
        let stamp = (modified(cert), modified(key));
        let loaded = Self::load(cert, key)?;
        Ok(Self {
            cert: cert.to_owned(),
            key: key.to_owned(),
            current: RwLock::new(Arc::new(loaded)),
            stamp: Mutex::new(stamp),
        })
    }

    /// Loads the files again when `force`d or when they changed; `Ok(true)` when a new
    /// certificate is in force. A pair that does not load leaves the old one in force.
    pub fn reload(&self, force: bool) -> Result<bool, TlsError> {
        let now = (modified(&self.cert), modified(&self.key));
        {
            let stamp = self.stamp.lock().expect("tls stamp lock");
            if !force && *stamp == now {
                return Ok(false);
            }
        }
        let loaded = Self::load(&self.cert, &self.key);
        // Remember the attempt either way: a broken file is reported once, not every check.
        *self.stamp.lock().expect("tls stamp lock") = now;
        *self.current.write().expect("tls cert lock") = Arc::new(loaded?);
        Ok(true)
    }
}

impl ResolvesServerCert for CertReloader {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.read().expect("tls cert lock").clone())
    }
}

/// The rustls configuration for `[tls]` (which must have `cert` and `key`), and the
/// reloader of its certificate.
pub fn server_config(
    tls: &TlsConfig,
) -> Result<(Arc<rustls::ServerConfig>, Arc<CertReloader>), TlsError> {
    let reloader = Arc::new(CertReloader::open(&tls.cert, &tls.key)?);
    let builder = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| err("tls.cert", &tls.cert, e))?;
    let mut config = if tls.client_ca.as_os_str().is_empty() {
        builder
            .with_no_client_auth()
            .with_cert_resolver(reloader.clone())
    } else {
        let mut roots = rustls::RootCertStore::empty();
        for ca in certs("tls.client_ca", &tls.client_ca)? {
            roots
                .add(ca)
                .map_err(|e| err("tls.client_ca", &tls.client_ca, e))?;
        }
        let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
            .build()
            .map_err(|e| err("tls.client_ca", &tls.client_ca, e))?;
        builder
            .with_client_cert_verifier(verifier)
            .with_cert_resolver(reloader.clone())
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok((Arc::new(config), reloader))
}

/// Runs the TLS handshake of each connection `accepted` (`crate::listener`) and yields
/// those that completed (see the module doc).
pub fn incoming(
    mut accepted: tokio::sync::mpsc::Receiver<Conn>,
    config: Arc<rustls::ServerConfig>,
) -> tokio_stream::wrappers::ReceiverStream<Result<TlsStream<Conn>, std::io::Error>> {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let acceptor = TlsAcceptor::from(config);
    let handshakes = Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
    tokio::spawn(async move {
        while let Some(conn) = accepted.recv().await {
            let Ok(permit) = handshakes.clone().try_acquire_owned() else {
                tracing::warn!("too many TLS handshakes in progress: connection closed");
                continue;
            };
            let (acceptor, tx) = (acceptor.clone(), tx.clone());
            tokio::spawn(async move {
                let _permit = permit;
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(conn)).await {
                    Ok(Ok(stream)) => {
                        let _ = tx.send(Ok(stream)).await;
                    }
                    Ok(Err(e)) => tracing::debug!(error = %e, "TLS handshake failed"),
                    Err(_) => tracing::debug!("TLS handshake timed out"),
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// Reloads the certificate on SIGHUP and when its files change, until `shutdown`.
pub async fn watch(reloader: Arc<CertReloader>, shutdown: CancellationToken) {
    let mut hup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch SIGHUP: the certificate reloads on file change only");
            None
        }
    };
    loop {
        let forced = tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(RELOAD_CHECK) => false,
            Some(()) = async {
                match hup.as_mut() {
                    Some(h) => h.recv().await,
                    None => std::future::pending().await,
                }
            } => true,
        };
        match reloader.reload(forced) {
            Ok(true) => tracing::info!(cert = %reloader.cert.display(), "TLS certificate reloaded"),
            Ok(false) => {}
            Err(e) => {
                tracing::error!(error = %e, "TLS certificate not reloaded; the previous one stays in force")
            }
        }
    }
}
