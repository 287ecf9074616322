//! The agent's place in the mesh: its libp2p host ([`arcade_p2p::mesh::host`]), the
//! [`ChunkStore`] view of its cache that the host serves from, and the credentials
//! (ticket, coordinator key) that registration brings.
//!
//! What is served: chunks of contents this agent has seen in a job's plugin info (so it
//! knows their manifest and `allowed_labels`) — complete plugins from `downloaded/` and
//! the recorded (verified) chunks of partial downloads from `temp/`. A content whose
//! labels are unknown (e.g. cached before a restart and not yet needed again) is not
//! served: refusing is the safe default.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use arcade_p2p::labels::Labels;
use arcade_p2p::mesh::bitfield::Bitfield;
use arcade_p2p::mesh::buffers::BufferPool;
use arcade_p2p::mesh::host::{ChunkStore, HostConfig, MeshError, MeshHandle, MeshHost, Multiaddr};
use arcade_p2p::{ContentId, Manifest};
use arcade_proto::v1 as pb;

use crate::cache::PluginCache;
use crate::config::ValidConfig;

struct Known {
    labels: Labels,
    manifest: Arc<Manifest>,
    /// The complete, verified file when it is not `downloaded/<sha>` (a builtin).
    file: Option<std::path::PathBuf>,
}

/// The cache as the mesh host sees it.
pub struct CacheChunks {
    cache: PluginCache,
    known: Mutex<HashMap<ContentId, Known>>,
    /// Chunks of contents being fetched right now, verified and written (fresher
    /// than the progress records, which are saved in batches).
    fetching: Mutex<HashMap<ContentId, Bitfield>>,
}

impl CacheChunks {
    fn content_file(&self, content: &ContentId) -> std::path::PathBuf {
        let known = self.known.lock().expect("known lock");
        match known.get(content).and_then(|k| k.file.clone()) {
            Some(file) => file,
            None => self.cache.dir().join("downloaded").join(content.to_hex()),
        }
    }
}

impl ChunkStore for CacheChunks {
    fn allowed_labels(&self, content: &ContentId) -> Option<Labels> {
        self.known
            .lock()
            .expect("known lock")
            .get(content)
            .map(|k| k.labels.clone())
    }

    fn held(&self, content: &ContentId) -> Option<Bitfield> {
        let manifest = self
            .known
            .lock()
            .expect("known lock")
            .get(content)?
            .manifest
            .clone();
        if self.content_file(content).exists() {
            return Some(Bitfield::full(manifest.chunk_count()));
        }
        if let Some(live) = self.fetching.lock().expect("fetching lock").get(content) {
            return Some(live.clone());
        }
        let mut held = Bitfield::new(manifest.chunk_count());
        for i in self.cache.load_progress(content).ok()? {
            if i < manifest.chunk_count() {
                held.set(i);
            }
        }
        Some(held)
    }

    fn read_chunk(&self, content: &ContentId, index: u32) -> std::io::Result<Option<bytes::Bytes>> {
        use std::os::unix::fs::FileExt as _;
        let Some(manifest) = self
            .known
            .lock()
            .expect("known lock")
            .get(content)
            .map(|k| k.manifest.clone())
        else {
            return Ok(None);
        };
        let Some(range) = manifest.chunk_range(index) else {
            return Ok(None);
        };
        let complete = self.content_file(content);
        let path = if complete.exists() {
            complete
        } else if self.held(content).is_some_and(|h| h.get(index)) {
            self.cache.partial_path(content)
        } else {
            return Ok(None);
        };
        // A reused buffer: `read_exact_at` overwrites every byte or fails.
        let mut buf = BufferPool::shared().take((range.end - range.start) as usize);
        std::fs::File::open(path)?.read_exact_at(&mut buf, range.start)?;
        // Never hand out bytes that would fail the requester's check.
        if manifest.verify_chunk(index, &buf).is_err() {
            return Ok(None);
        }
        Ok(Some(buf.freeze()))
    }
}

/// A running mesh node of an agent.
#[derive(Clone)]
pub struct MeshNode {
    handle: MeshHandle,
    store: Arc<CacheChunks>,
    /// Addresses reported to the coordinator.
    pub advertise: Vec<Multiaddr>,
    /// The node-wide upload rate to peers, bytes/s (0 = unlimited).
    upload_rate: u64,
}

impl std::fmt::Debug for MeshNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeshNode")
            .field("peer_id", &self.handle.peer_id())
            .finish_non_exhaustive()
    }
}

/// Whether `addr` may be advertised by default.
fn advertisable(addr: &Multiaddr, allow_loopback: bool) -> bool {
    use libp2p::multiaddr::Protocol;
    match addr.iter().next() {
        Some(Protocol::Ip4(ip)) => {
            let docker_bridge = ip.octets()[0] == 172 && ip.octets()[1] == 17;
            let hidden_loopback = ip.is_loopback() && !allow_loopback;
            !(ip.is_unspecified() || hidden_loopback || docker_bridge)
        }
        Some(Protocol::Ip6(ip)) => !ip.is_unspecified() && (allow_loopback || !ip.is_loopback()),
        _ => true,
    }
}

impl MeshNode {
    /// Starts the host for `config` over `cache`.
    /// `keypair` is the agent's identity (`crate::identity`).
    pub async fn start(
        config: &ValidConfig,
        cache: PluginCache,
        keypair: libp2p_identity::Keypair,
    ) -> Result<Self, MeshError> {
        let m = &config.raw.mesh;
        let parse = |list: &[String]| -> Result<Vec<Multiaddr>, MeshError> {
            list.iter()
                .map(|a| a.parse().map_err(|e| MeshError::Start(format!("{a}: {e}"))))
                .collect()
        };
        let host_config = HostConfig {
            listen: parse(&m.listen)?,
            upload_rate: m.upload_rate.bytes(),
            upload_burst: 1 << 20,
            max_uploads: m.max_uploads as usize,
            max_upload_wait: m.max_upload_wait.get(),
            // One request's deadline is the scheduler's (`download.request_timeout`):
            // a shorter one in the host failed chunks that were on their way, and their
            // bytes were sent for nothing.
            request_timeout: config.raw.download.request_timeout.get(),
            max_connections: m.max_connections as usize,
            unvouched_timeout: m.unvouched_timeout.get(),
            dht: m.dht,
            provider_ttl: m.provider_ttl.get(),
            provider_republish: m.provider_republish.get(),
            compression_level: (m.compression_level > 0).then_some(m.compression_level as i32),
            accept_zstd: config.raw.download.compression,
            ..HostConfig::default()
        };
        let store = Arc::new(CacheChunks {
            cache,
            known: Mutex::new(HashMap::new()),
            fetching: Mutex::new(HashMap::new()),
        });
        let handle = MeshHost::start(keypair, host_config, store.clone()).await?;
        let advertise = if m.advertise.is_empty() {
            handle
                .listen_addrs()
                .await
                .into_iter()
                .filter(|a| advertisable(a, m.allow_loopback))
                .collect()
        } else {
            parse(&m.advertise)?
        };
        tracing::info!(peer_id = %handle.peer_id(), addrs = ?advertise, "mesh host started");
        Ok(Self {
            handle,
            store,
            advertise,
            upload_rate: m.upload_rate.bytes(),
        })
    }

    /// The node-wide upload rate to peers, bytes/s (0 = unlimited).
    pub fn upload_rate(&self) -> u64 {
        self.upload_rate
    }

    /// This node's peer id (as text, for registration).
    pub fn peer_id(&self) -> String {
        self.handle.peer_id().to_string()
    }

    /// The host handle.
    pub fn handle(&self) -> &MeshHandle {
        &self.handle
    }

    /// Installs the ticket and coordinator key from registration (or a renewal).
    pub async fn set_credentials(&self, ticket: Vec<u8>, coordinator_key: &[u8]) {
        if ticket.is_empty() || coordinator_key.is_empty() {
            return;
        }
        if let Err(e) = self.handle.set_credentials(ticket, coordinator_key).await {
            tracing::warn!(error = %e, "cannot install mesh credentials");
        }
    }

    /// Remembers a plugin's manifest and access labels so its chunks can be served, and
    /// announces the content in the DHT.
    pub async fn learn(&self, info: &pb::PluginInfo, manifest: &Manifest) {
        let labels = info
            .allowed_labels
            .iter()
            .map(|l| (l.key.clone(), l.value.clone()))
            .collect();
        let content = manifest.content_id();
        {
            let mut known = self.store.known.lock().expect("known lock");
            // A builtin served from its own file keeps that file.
            let file = known.get(&content).and_then(|k| k.file.clone());
            known.insert(
                content,
                Known {
                    labels,
                    manifest: Arc::new(manifest.clone()),
                    file,
                },
            );
        }
        let _ = self.handle.provide(content, true).await;
    }

    /// Whether the host serves `content` already.
    pub fn serves(&self, content: &ContentId) -> bool {
        self.store
            .known
            .lock()
            .expect("known lock")
            .contains_key(content)
    }

    /// Serves a plugin the cache already holds complete and verified (a builtin, or one
    /// cached before a restart) from `file`, with its manifest and access labels from
    /// the coordinator, and announces it.
    pub async fn serve_cached(
        &self,
        info: &pb::PluginInfo,
        manifest: &Manifest,
        file: std::path::PathBuf,
    ) {
        let labels = info
            .allowed_labels
            .iter()
            .map(|l| (l.key.clone(), l.value.clone()))
            .collect();
        let content = manifest.content_id();
        self.store.known.lock().expect("known lock").insert(
            content,
            Known {
                labels,
                manifest: Arc::new(manifest.clone()),
                file: Some(file),
            },
        );
        let _ = self.handle.provide(content, true).await;
    }

    /// A chunk of a content being fetched is verified and written: peers may have it,
    /// and the peers watching this agent's chunks of the content hear of it.
    pub fn mark_held(&self, content: ContentId, chunks: u32, chunk: u32) {
        {
            let mut fetching = self.store.fetching.lock().expect("fetching lock");
            let held = fetching
                .entry(content)
                .or_insert_with(|| Bitfield::new(chunks));
            if chunk >= held.len() || !held.set(chunk) {
                return;
            }
        }
        self.handle.announce(&content, chunk);
    }

    /// A fetch of `content` starts holding `held` (resumed and reused chunks): peers
    /// that ask see them from now on.
    pub fn fetch_started(&self, content: ContentId, held: &Bitfield) {
        let mut fetching = self.store.fetching.lock().expect("fetching lock");
        let live = fetching
            .entry(content)
            .or_insert_with(|| Bitfield::new(held.len()));
        for i in 0..held.len().min(live.len()) {
            if held.get(i) {
                live.set(i);
            }
        }
    }

    /// The fetch of `content` ended (published or abandoned).
    pub fn fetch_ended(&self, content: &ContentId) {
        self.store
            .fetching
            .lock()
            .expect("fetching lock")
            .remove(content);
    }

    /// Stops serving and announcing a content (it was evicted).
    pub async fn forget(&self, content: ContentId) {
        self.store
            .known
            .lock()
            .expect("known lock")
            .remove(&content);
        let _ = self.handle.provide(content, false).await;
    }

    /// Withdraws every announcement, then stops the host.
    pub async fn shutdown(&self) {
        let known: Vec<ContentId> = self
            .store
            .known
            .lock()
            .expect("known lock")
            .keys()
            .copied()
            .collect();
        for content in known {
            let _ = self.handle.provide(content, false).await;
        }
        self.handle.shutdown().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_advertising_skips_loopback_unspecified_and_docker() {
        let a = |s: &str| s.parse::<Multiaddr>().unwrap();
        assert!(!advertisable(&a("/ip4/127.0.0.1/tcp/1"), false));
        assert!(advertisable(&a("/ip4/127.0.0.1/tcp/1"), true));
        assert!(!advertisable(&a("/ip4/0.0.0.0/tcp/1"), true));
        assert!(!advertisable(&a("/ip4/172.17.0.2/tcp/1"), false));
        assert!(advertisable(&a("/ip4/10.1.2.3/tcp/1"), false));
        assert!(!advertisable(&a("/ip6/::1/tcp/1"), false));
    }
}
