//! The agent's libp2p host: TCP + TLS 1.3 ([`super::tls`], AES-GCM first; noise for
//! peers that offer only noise) + yamux, identify, Kademlia in server mode (the
//! DHT key of a content is its SHA-256), the `/arcade/chunks/1` request-response
//! protocol and `/arcade/have/1` subscriptions ([`super::have`]: announcements of
//! verified chunks, and cancels of waiting requests), each served in its own task.
//!
//! Ownership: [`MeshHost::start`] spawns one actor task that owns the swarm; it is
//! driven through a cloneable [`MeshHandle`] (bounded command channel, `oneshot`
//! replies) and stops when the handle's [`MeshHandle::shutdown`] is called or every
//! handle is dropped.
//!
//! Serving: every inbound request must carry a coordinator-signed ticket bound to the
//! requesting connection's peer id ([`super::ticket`]); content restricted by
//! `allowed_labels` is served only when the ticket's labels satisfy them; chunk reads
//! take an upload slot (busy → `REFUSAL_BUSY`, never an unbounded queue) and pass the
//! node-wide upload [`RateLimiter`]. Peers the coordinator revoked (removed agents,
//! learnt through heartbeat answers: [`MeshHandle::revoke`]) are refused and
//! disconnected whatever their ticket says, and never asked.
//!
//! Outsiders: a peer is *trusted* once it presented a valid ticket or when we chose to
//! ask it ourselves. An inbound connection from an untrusted peer is closed when it has
//! shown no valid ticket within [`HostConfig::unvouched_timeout`]; untrusted inbound
//! peers may hold at most half of [`HostConfig::max_connections`] (a newcomer replaces
//! the one that waited longest; the rest is kept for trusted peers and our own dials), and no peer more than [`MAX_CONNECTIONS_PER_PEER`]
//! connections. Only trusted peers enter the DHT routing table, and provider records
//! (`ADD_PROVIDER`) are stored only when the provider is trusted. A response may be no
//! larger than what was asked for: the chunk's length, or the bitfield of the content.
//! The bytes come from a [`ChunkStore`] the agent
//! implements over its cache (complete plugins and partial downloads alike).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use arcade_proto::v1 as pb;
use futures::StreamExt;
pub use libp2p::Multiaddr;
use libp2p::kad::{self, store::MemoryStore};
use libp2p::request_response::{self, OutboundRequestId, ProtocolSupport, ResponseChannel};
use libp2p::swarm::{NetworkBehaviour, SwarmEvent, behaviour::toggle::Toggle};
use libp2p::{PeerId, Swarm, identify, noise, tcp, yamux};
use libp2p_identity::Keypair;
use tokio::sync::{mpsc, oneshot};

use super::bitfield::Bitfield;
use super::have::{self, Announcer, Cancels, HaveNews, Watch};
use super::limiter::{RateLimiter, UploadSlots};
use super::protocol::{ChunkCodec, PROTOCOL, refused};
use super::ticket::{TicketError, TicketVerifier};
use crate::labels::Labels;
use crate::{ContentId, now_ms};

/// What the host serves from: the agent's cache.
pub trait ChunkStore: Send + Sync + 'static {
    /// The labels a requester needs for `content`, or `None` when this node does not
    /// know the content (nothing is served then).
    fn allowed_labels(&self, content: &ContentId) -> Option<Labels>;
    /// The chunks of `content` this node holds.
    fn held(&self, content: &ContentId) -> Option<Bitfield>;
    /// Reads one held chunk (blocking; called off the async runtime). `Ok(None)` when
    /// the chunk is not held. A store reads into a [`super::buffers::BufferPool`]
    /// buffer, so serving does not allocate a zeroed buffer per chunk.
    fn read_chunk(&self, content: &ContentId, index: u32) -> std::io::Result<Option<bytes::Bytes>>;
}

/// Host settings.
#[derive(Debug, Clone)]
pub struct HostConfig {
    /// Listen addresses, e.g. `/ip4/127.0.0.1/tcp/0`.
    pub listen: Vec<Multiaddr>,
    /// Connections idle this long are closed.
    pub idle_timeout: Duration,
    /// Outbound request timeout.
    pub request_timeout: Duration,
    /// Concurrent streams per connection.
    pub max_concurrent_streams: usize,
    /// Upload rate, bytes/s (0 = unlimited).
    pub upload_rate: u64,
    /// Upload burst, bytes.
    pub upload_burst: u64,
    /// Concurrent chunk uploads.
    pub max_uploads: usize,
    /// A chunk request that would wait longer than this behind the uploads already
    /// queued for the upload rate is answered busy instead of queued (zero: no limit
    /// but `max_uploads`).
    pub max_upload_wait: Duration,
    /// Run Kademlia (provider records, lookups). Off, holders come from coordinator
    /// hints, announcements and askers only; see the mesh DESIGN for what the DHT cost.
    pub dht: bool,
    /// Provider record TTL.
    pub provider_ttl: Duration,
    /// Provider republish interval.
    pub provider_republish: Duration,
    /// Most peers connected at once; connections beyond are closed.
    pub max_connections: usize,
    /// An inbound connection whose peer shows no valid ticket within this is closed.
    pub unvouched_timeout: Duration,
    /// zstd level of the chunks this host sends compressed to peers that ask (`None`:
    /// always raw; see [`crate::compress`]).
    pub compression_level: Option<i32>,
    /// Ask peers for compressed chunks.
    pub accept_zstd: bool,
}

/// Most connections one peer may hold to us.
pub const MAX_CONNECTIONS_PER_PEER: usize = 4;
/// Most trusted peers and pending addresses remembered.
const MAX_TRUSTED: usize = 65_536;

impl Default for HostConfig {
    fn default() -> Self {
        Self {
            listen: vec!["/ip4/127.0.0.1/tcp/0".parse().expect("valid multiaddr")],
            idle_timeout: Duration::from_secs(60),
            request_timeout: Duration::from_secs(10),
            max_concurrent_streams: 64,
            upload_rate: 0,
            upload_burst: 1 << 20,
            max_uploads: 8,
            max_upload_wait: Duration::from_secs(1),
            dht: false,
            provider_ttl: Duration::from_secs(15 * 60),
            provider_republish: Duration::from_secs(5 * 60),
            max_connections: 256,
            unvouched_timeout: Duration::from_secs(10),
            compression_level: Some(crate::compress::MESH_LEVEL),
            accept_zstd: true,
        }
    }
}

/// A mesh request failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MeshError {
    /// The peer refused.
    #[error("peer refused ({reason:?}): {message}")]
    Refused {
        /// Why.
        reason: pb::Refusal,
        /// Its message.
        message: String,
    },
    /// The request failed on the network (dial, timeout, stream error).
    #[error("request failed: {0}")]
    Failed(String),
    /// The answer does not match the question.
    #[error("unexpected answer: {0}")]
    Protocol(String),
    /// The host has stopped.
    #[error("mesh host stopped")]
    Closed,
    /// The host could not start.
    #[error("mesh host cannot start: {0}")]
    Start(String),
    /// The peer does not speak the protocol asked for (e.g. `/arcade/have/1`).
    #[error("peer does not support the protocol")]
    Unsupported,
    /// The peer sent a chunk that cannot be what was asked for (a compressed chunk that
    /// does not decompress to the chunk's length, or compressed unasked): treat it like
    /// a chunk that fails verification.
    #[error("corrupt answer: {0}")]
    Corrupt(String),
}

/// What the subscription tasks share with the host.
struct Subscriptions {
    gate: Arc<Gate>,
    announcer: Arc<Announcer>,
    cancels: Arc<Cancels>,
    stats: Arc<HostStats>,
    /// Weak, so that the subscriptions do not keep the host alive.
    commands: mpsc::WeakSender<Command>,
}

/// Accepts `/arcade/have/1` streams and serves each subscription in its own task (at
/// most [`have::MAX_SESSIONS_PER_PEER`] per peer and [`have::MAX_SESSIONS`] in all;
/// beyond, the stream is closed) until `stop`, then ends every session.
async fn accept_subscriptions(
    mut incoming: libp2p_stream::IncomingStreams,
    shared: Subscriptions,
    stop: tokio_util::sync::CancellationToken,
) {
    let mut sessions = tokio::task::JoinSet::new();
    let per_peer: Arc<std::sync::Mutex<HashMap<PeerId, usize>>> = Arc::default();
    loop {
        let (peer, stream) = tokio::select! {
            _ = stop.cancelled() => break,
            Some(_) = sessions.join_next(), if !sessions.is_empty() => continue,
            next = incoming.next() => match next {
                Some(next) => next,
                None => break,
            },
        };
        {
            let mut counts = per_peer
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let count = counts.entry(peer).or_default();
            if *count >= have::MAX_SESSIONS_PER_PEER || sessions.len() >= have::MAX_SESSIONS {
                tracing::debug!(%peer, "too many subscriptions: closing the stream");
                continue;
            }
            *count += 1;
        }
        let gate = shared.gate.clone();
        let store = shared.gate.store.clone();
        let commands = shared.commands.clone();
        let holder = have::Holder {
            admit: Box::new(move |peer, ticket, content| {
                gate.admit(peer, ticket, content)
                    .map_err(|res| match res.kind {
                        Some(pb::chunk_response::Kind::Refused(r)) => r,
                        _ => pb::Refused::default(),
                    })
            }),
            held: Arc::new(move |content| store.held(content)),
            admitted: Box::new(move |peer, content| {
                if let Some(tx) = commands.upgrade() {
                    let _ = tx.try_send(Command::Subscribed(peer, content));
                }
            }),
            announcer: shared.announcer.clone(),
            cancels: shared.cancels.clone(),
        };
        let (stats, per_peer) = (shared.stats.clone(), per_peer.clone());
        sessions.spawn(async move {
            use std::sync::atomic::Ordering::Relaxed;
            stats.subscriptions.fetch_add(1, Relaxed);
            if let Err(e) = have::serve(holder, peer, stream).await {
                tracing::debug!(%peer, error = %e, "subscription ended");
            }
            stats.subscriptions.fetch_sub(1, Relaxed);
            let mut counts = per_peer
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if let Some(count) = counts.get_mut(&peer) {
                *count -= 1;
                if *count == 0 {
                    counts.remove(&peer);
                }
            }
        });
    }
    sessions.shutdown().await;
}

#[derive(NetworkBehaviour)]
struct Behaviour {
    chunks: request_response::Behaviour<ChunkCodec>,
    streams: libp2p_stream::Behaviour,
    identify: identify::Behaviour,
    kad: Toggle<kad::Behaviour<MemoryStore>>,
}

type Reply<T> = oneshot::Sender<Result<T, MeshError>>;

enum Command {
    Request {
        peer: PeerId,
        addrs: Vec<Multiaddr>,
        request: pb::ChunkRequest,
        reply: Reply<pb::ChunkResponse>,
    },
    Credentials {
        ticket: Vec<u8>,
        verifier: TicketVerifier,
    },
    Provide(ContentId, bool),
    Providers(ContentId, Reply<Vec<PeerId>>),
    Askers(ContentId, oneshot::Sender<Vec<PeerId>>),
    ListenAddrs(oneshot::Sender<Vec<Multiaddr>>),
    Respond(ResponseChannel<pb::ChunkResponse>, pb::ChunkResponse),
    Revoke(Vec<PeerId>),
    Connected(PeerId, oneshot::Sender<bool>),
    /// Open a `/arcade/have/1` stream to a peer (with our ticket to subscribe with).
    Watch {
        peer: PeerId,
        addrs: Vec<Multiaddr>,
        reply: Reply<(libp2p::Stream, Vec<u8>)>,
    },
    /// A peer's subscription was admitted: trust it, remember it asked.
    Subscribed(PeerId, ContentId),
    Shutdown(oneshot::Sender<()>),
}

/// Most revoked peers remembered (the oldest are forgotten: their tickets expire).
const MAX_REVOKED: usize = 65_536;

/// A set of peers that forgets its oldest members beyond a bound: the revoked peers
/// (whose tickets expire anyway) and the trusted ones (who show their ticket again).
#[derive(Debug)]
struct PeerSet {
    set: std::collections::HashSet<PeerId>,
    order: std::collections::VecDeque<PeerId>,
    max: usize,
}

impl PeerSet {
    fn new(max: usize) -> Self {
        Self {
            set: std::collections::HashSet::new(),
            order: std::collections::VecDeque::new(),
            max,
        }
    }

    /// Adds `peer`; true when it was not a member.
    fn add(&mut self, peer: PeerId) -> bool {
        if !self.set.insert(peer) {
            return false;
        }
        self.order.push_back(peer);
        while self.order.len() > self.max {
            if let Some(old) = self.order.pop_front() {
                self.set.remove(&old);
            }
        }
        true
    }

    fn contains(&self, peer: &PeerId) -> bool {
        self.set.contains(peer)
    }

    fn remove(&mut self, peer: &PeerId) {
        if self.set.remove(peer) {
            self.order.retain(|p| p != peer);
        }
    }
}

/// Who may be served: the coordinator's key (tickets verify against it) and the peers
/// it revoked. Shared by the swarm task and the subscription tasks.
struct Gate {
    verifier: std::sync::RwLock<Option<TicketVerifier>>,
    revoked: std::sync::Mutex<PeerSet>,
    store: Arc<dyn ChunkStore>,
}

impl Gate {
    fn is_revoked(&self, peer: &PeerId) -> bool {
        self.revoked
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .contains(peer)
    }

    /// Whether `ticket` is valid for `peer` now.
    fn vouches(&self, peer: &PeerId, ticket: &[u8]) -> bool {
        !self.is_revoked(peer)
            && self
                .verifier
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .as_ref()
                .is_some_and(|v| v.verify(ticket, peer, now_ms()).is_ok())
    }

    /// Checks the requester's ticket and access to `content`: the content and when the
    /// ticket expires (unix ms); `Err` is the refusal to send.
    fn admit(
        &self,
        peer: &PeerId,
        ticket: &[u8],
        content: &[u8],
    ) -> Result<(ContentId, i64), pb::ChunkResponse> {
        let ticket = {
            let verifier = self
                .verifier
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let verifier = verifier.as_ref().ok_or_else(|| {
                refused(
                    pb::Refusal::NotVouched,
                    "this peer has not joined the mesh yet",
                )
            })?;
            if self.is_revoked(peer) {
                return Err(refused(
                    pb::Refusal::NotVouched,
                    "this peer's ticket was revoked by the coordinator",
                ));
            }
            verifier
                .verify(ticket, peer, now_ms())
                .map_err(|e: TicketError| refused(pb::Refusal::NotVouched, e.to_string()))?
        };
        let content: [u8; 32] = content
            .try_into()
            .map_err(|_| refused(pb::Refusal::BadRequest, "content must be a 32-byte SHA-256"))?;
        let content = ContentId::from_bytes(content);
        let required = self.store.allowed_labels(&content).ok_or_else(|| {
            refused(
                pb::Refusal::UnknownContent,
                format!("content {content} is not held here"),
            )
        })?;
        if !ticket.allows(&required) {
            return Err(refused(
                pb::Refusal::Forbidden,
                format!(
                    "agent {} lacks the labels content {content} requires",
                    ticket.agent_id
                ),
            ));
        }
        Ok((content, ticket.expires_at_ms))
    }
}

/// Live counters of a host.
#[derive(Debug, Default)]
pub struct HostStats {
    /// Chunk bytes sent to peers.
    pub uploaded_bytes: std::sync::atomic::AtomicU64,
    /// Peers connected now.
    pub connected_peers: std::sync::atomic::AtomicU64,
    /// Contents announced in the DHT now.
    pub provided: std::sync::atomic::AtomicU64,
    /// Requests refused (no ticket, wrong labels, busy, unknown content, no chunk).
    pub refused: std::sync::atomic::AtomicU64,
    /// Chunk requests cancelled by their requester before the chunk was sent.
    pub cancelled: std::sync::atomic::AtomicU64,
    /// `/arcade/have/1` subscriptions served now.
    pub subscriptions: std::sync::atomic::AtomicU64,
    /// Raw bytes of the chunks sent zstd-compressed.
    pub compressed_sent_raw: std::sync::atomic::AtomicU64,
    /// Bytes sent for them.
    pub compressed_sent_wire: std::sync::atomic::AtomicU64,
    /// Bytes received of chunks that came zstd-compressed.
    pub compressed_received_wire: std::sync::atomic::AtomicU64,
    /// Their raw bytes.
    pub compressed_received_raw: std::sync::atomic::AtomicU64,
}

/// A handle to a running host. Cheap to clone.
#[derive(Clone, Debug)]
pub struct MeshHandle {
    tx: mpsc::Sender<Command>,
    peer_id: PeerId,
    /// Ask peers for zstd chunks.
    accept_zstd: bool,
    stats: Arc<HostStats>,
    announcer: Arc<Announcer>,
}

/// Starts hosts.
#[derive(Debug)]
pub struct MeshHost;

struct Actor {
    swarm: Swarm<Behaviour>,
    rx: mpsc::Receiver<Command>,
    /// For upload tasks to hand responses back to the swarm.
    respond: mpsc::Sender<Command>,
    gate: Arc<Gate>,
    ticket: Vec<u8>,
    control: libp2p_stream::Control,
    cancels: Arc<Cancels>,
    request_timeout: Duration,
    /// Stops the task that accepts subscriptions (and its sessions).
    subscriptions: Option<(
        tokio_util::sync::CancellationToken,
        tokio::task::JoinHandle<()>,
    )>,
    limiter: RateLimiter,
    slots: UploadSlots,
    /// See [`HostConfig::max_upload_wait`].
    max_upload_wait: Duration,
    /// See [`HostConfig::compression_level`].
    compressor: Option<Arc<crate::compress::Compressor>>,
    outbound: HashMap<OutboundRequestId, Reply<pb::ChunkResponse>>,
    queries: HashMap<kad::QueryId, (Vec<PeerId>, Reply<Vec<PeerId>>)>,
    stats: Arc<HostStats>,
    provided: std::collections::HashSet<ContentId>,
    max_connections: usize,
    /// Vouched peers that asked for a content's bitfield, most recent last (see
    /// [`MeshHandle::askers`]); at most [`MAX_ASKERS`] per content and
    /// [`MAX_ASKED_CONTENTS`] contents.
    askers: HashMap<ContentId, std::collections::VecDeque<PeerId>>,
    /// Peers that showed a valid ticket, or that we asked ourselves.
    trusted: PeerSet,
    /// Untrusted peers connected to us (inbound), since when.
    unvouched: HashMap<PeerId, std::time::Instant>,
    unvouched_timeout: Duration,
    /// Listen addresses untrusted peers told us (identify), entered into the DHT once
    /// they are trusted.
    pending_addrs: HashMap<PeerId, Vec<Multiaddr>>,
}

/// Most askers remembered per content.
pub const MAX_ASKERS: usize = 64;
/// Most contents whose askers are remembered (past it the memory starts over).
pub const MAX_ASKED_CONTENTS: usize = 64;

impl MeshHost {
    /// Starts a host with `keypair` serving from `store`; returns its handle once it
    /// listens.
    pub async fn start(
        keypair: Keypair,
        config: HostConfig,
        store: Arc<dyn ChunkStore>,
    ) -> Result<MeshHandle, MeshError> {
        let peer_id = keypair.public().to_peer_id();
        let start = |e: &dyn std::fmt::Display| MeshError::Start(e.to_string());
        let request_timeout = config.request_timeout;
        let streams = config.max_concurrent_streams;
        let (dht, ttl, republish) = (config.dht, config.provider_ttl, config.provider_republish);
        let mut swarm = libp2p::SwarmBuilder::with_existing_identity(keypair)
            .with_tokio()
            .with_tcp(
                tcp::Config::default().nodelay(true),
                // TLS with AES-GCM first (cheaper per byte here); noise for peers
                // that offer only noise.
                (super::tls::Config::new, noise::Config::new),
                yamux::Config::default,
            )
            .map_err(|e| start(&e))?
            .with_behaviour(|key| {
                let mut kad_config = kad::Config::new(kad::PROTOCOL_NAME);
                kad_config
                    .set_provider_record_ttl(Some(ttl))
                    .set_provider_publication_interval(Some(republish))
                    // Peers are learned from coordinator hints and identify, not from a
                    // bootstrap list: no periodic bootstrap against an empty table.
                    .set_periodic_bootstrap_interval(None)
                    // Only trusted peers enter the routing table, and provider records
                    // are stored only for trusted providers (see the module doc).
                    .set_kbucket_inserts(kad::BucketInserts::Manual)
                    .set_record_filtering(kad::StoreInserts::FilterBoth);
                let store = MemoryStore::with_config(
                    key.public().to_peer_id(),
                    kad::store::MemoryStoreConfig {
                        max_providers_per_key: 1024,
                        ..Default::default()
                    },
                );
                // Off by default: Kademlia bootstraps by itself whenever its routing
                // table is small, which cost a 64-agent fleet 40 % of its CPU and found
                // no holder the coordinator's hints did not (mesh DESIGN, Measured).
                let kad = dht.then(|| {
                    let mut kad =
                        kad::Behaviour::with_config(key.public().to_peer_id(), store, kad_config);
                    kad.set_mode(Some(kad::Mode::Server));
                    kad
                });
                Behaviour {
                    streams: libp2p_stream::Behaviour::new(),
                    chunks: request_response::Behaviour::with_codec(
                        ChunkCodec::default(),
                        [(PROTOCOL, ProtocolSupport::Full)],
                        request_response::Config::default()
                            .with_request_timeout(request_timeout)
                            .with_max_concurrent_streams(streams),
                    ),
                    identify: identify::Behaviour::new(identify::Config::new(
                        "/arcade/1".into(),
                        key.public(),
                    )),
                    kad: kad.into(),
                }
            })
            .map_err(|e| start(&e))?
            .with_swarm_config(|c| c.with_idle_connection_timeout(config.idle_timeout))
            .build();
        for addr in &config.listen {
            swarm.listen_on(addr.clone()).map_err(|e| start(&e))?;
        }
        // Wait until every listener reported its address.
        let mut bound = 0;
        while bound < config.listen.len() {
            match tokio::time::timeout(Duration::from_secs(10), swarm.select_next_some()).await {
                Ok(SwarmEvent::NewListenAddr { .. }) => bound += 1,
                Ok(SwarmEvent::ListenerError { error, .. }) => return Err(start(&error)),
                Ok(_) => {}
                Err(_) => {
                    return Err(MeshError::Start(
                        "listener did not come up within 10 s".into(),
                    ));
                }
            }
        }
        let (tx, rx) = mpsc::channel(256);
        let stats = Arc::new(HostStats::default());
        let gate = Arc::new(Gate {
            verifier: std::sync::RwLock::new(None),
            revoked: std::sync::Mutex::new(PeerSet::new(MAX_REVOKED)),
            store: store.clone(),
        });
        let announcer = Arc::new(Announcer::default());
        let cancels = Arc::new(Cancels::default());
        let mut control = swarm.behaviour().streams.new_control();
        let incoming = control
            .accept(have::PROTOCOL)
            .map_err(|e| MeshError::Start(e.to_string()))?;
        let stop = tokio_util::sync::CancellationToken::new();
        let accepting = tokio::spawn(accept_subscriptions(
            incoming,
            Subscriptions {
                gate: gate.clone(),
                announcer: announcer.clone(),
                cancels: cancels.clone(),
                stats: stats.clone(),
                commands: tx.downgrade(),
            },
            stop.clone(),
        ));
        let actor = Actor {
            stats: stats.clone(),
            provided: std::collections::HashSet::new(),
            max_connections: config.max_connections.max(1),
            swarm,
            rx,
            respond: tx.clone(),
            gate,
            ticket: Vec::new(),
            control,
            cancels,
            request_timeout,
            subscriptions: Some((stop, accepting)),
            limiter: RateLimiter::new(config.upload_rate, config.upload_burst),
            slots: UploadSlots::new(config.max_uploads),
            max_upload_wait: config.max_upload_wait,
            compressor: config
                .compression_level
                .map(|level| Arc::new(crate::compress::Compressor::new(level))),
            outbound: HashMap::new(),
            queries: HashMap::new(),
            askers: HashMap::new(),
            trusted: PeerSet::new(MAX_TRUSTED),
            unvouched: HashMap::new(),
            unvouched_timeout: config.unvouched_timeout,
            pending_addrs: HashMap::new(),
        };
        tokio::spawn(actor.run());
        Ok(MeshHandle {
            tx,
            peer_id,
            accept_zstd: config.accept_zstd,
            stats,
            announcer,
        })
    }
}

impl Actor {
    async fn run(mut self) {
        let mut stopped = None;
        let mut sweep = tokio::time::interval(Duration::from_millis(500));
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = sweep.tick() => self.close_unvouched(),
                command = self.rx.recv() => match command {
                    Some(Command::Shutdown(done)) => {
                        stopped = Some(done);
                        break;
                    }
                    Some(c) => self.command(c),
                    // Only our own `respond` sender is left when every handle dropped.
                    None => break,
                },
                event = self.swarm.select_next_some() => self.event(event),
            }
            if self.rx.sender_strong_count() <= 1 && self.outbound.is_empty() && self.rx.is_empty()
            {
                break;
            }
        }
        for (_, reply) in self.outbound.drain() {
            let _ = reply.send(Err(MeshError::Closed));
        }
        if let Some((stop, accepting)) = self.subscriptions.take() {
            stop.cancel();
            let _ = accepting.await;
        }
        // Release the swarm (listeners, connections) and the store before `shutdown`
        // returns: its caller may reopen at once what the store holds (an agent
        // restarted in-process reopens its cache index, which allows one opener).
        drop(self);
        if let Some(done) = stopped {
            let _ = done.send(());
        }
    }

    fn command(&mut self, command: Command) {
        match command {
            Command::Connected(peer, reply) => {
                let _ = reply.send(self.swarm.is_connected(&peer));
            }
            Command::Request { peer, reply, .. } if self.gate.is_revoked(&peer) => {
                let _ = reply.send(Err(MeshError::Failed(format!(
                    "peer {peer} was revoked by the coordinator"
                ))));
            }
            Command::Request {
                peer,
                addrs,
                mut request,
                reply,
            } => {
                // We chose to ask it (a coordinator hint or a DHT provider we looked up).
                self.trust(peer);
                request.ticket = self.ticket.clone();
                let id = self
                    .swarm
                    .behaviour_mut()
                    .chunks
                    .send_request_with_addresses(&peer, request, addrs);
                self.outbound.insert(id, reply);
            }
            Command::Credentials { ticket, verifier } => {
                self.ticket = ticket;
                *self
                    .gate
                    .verifier
                    .write()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(verifier);
            }
            Command::Watch { peer, reply, .. } if self.gate.is_revoked(&peer) => {
                let _ = reply.send(Err(MeshError::Failed(format!(
                    "peer {peer} was revoked by the coordinator"
                ))));
            }
            Command::Watch { peer, addrs, reply } => {
                self.trust(peer);
                if !self.swarm.is_connected(&peer) && !addrs.is_empty() {
                    use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
                    let opts = DialOpts::peer_id(peer)
                        .addresses(addrs)
                        .condition(PeerCondition::DisconnectedAndNotDialing)
                        .build();
                    if let Err(e) = self.swarm.dial(opts) {
                        tracing::debug!(%peer, error = %e, "dial for a subscription not started");
                    }
                }
                let (mut control, ticket, timeout) = (
                    self.control.clone(),
                    self.ticket.clone(),
                    self.request_timeout,
                );
                tokio::spawn(async move {
                    let opened =
                        tokio::time::timeout(timeout, control.open_stream(peer, have::PROTOCOL))
                            .await;
                    let result = match opened {
                        Ok(Ok(stream)) => Ok((stream, ticket)),
                        Ok(Err(libp2p_stream::OpenStreamError::UnsupportedProtocol(_))) => {
                            Err(MeshError::Unsupported)
                        }
                        Ok(Err(e)) => Err(MeshError::Failed(e.to_string())),
                        Err(_) => Err(MeshError::Failed(
                            "no subscription stream within the request timeout".into(),
                        )),
                    };
                    let _ = reply.send(result);
                });
            }
            Command::Subscribed(peer, content) => {
                self.trust(peer);
                self.remember_asker(content, peer);
            }
            Command::Provide(content, on) => {
                let key = kad::RecordKey::new(content.as_bytes());
                let kad = self.swarm.behaviour_mut().kad.as_mut();
                if on {
                    match kad.map(|kad| kad.start_providing(key)) {
                        Some(Err(e)) => {
                            tracing::warn!(content = %content, error = %e, "cannot provide content");
                        }
                        Some(Ok(_)) | None => {
                            self.provided.insert(content);
                        }
                    }
                } else {
                    if let Some(kad) = kad {
                        kad.stop_providing(&key);
                    }
                    self.provided.remove(&content);
                }
                self.stats.provided.store(
                    self.provided.len() as u64,
                    std::sync::atomic::Ordering::Relaxed,
                );
            }
            Command::Providers(content, reply) => {
                match self.swarm.behaviour_mut().kad.as_mut() {
                    Some(kad) => {
                        let id = kad.get_providers(kad::RecordKey::new(content.as_bytes()));
                        self.queries.insert(id, (Vec::new(), reply));
                    }
                    // No DHT: no providers beyond hints, announcements and askers.
                    None => {
                        let _ = reply.send(Ok(Vec::new()));
                    }
                }
            }
            Command::Askers(content, reply) => {
                let askers = self.askers.get(&content);
                let _ = reply.send(askers.into_iter().flatten().copied().collect());
            }
            Command::ListenAddrs(reply) => {
                let _ = reply.send(self.swarm.listeners().cloned().collect());
            }
            Command::Respond(channel, response) => self.reply_to(channel, response),
            Command::Revoke(peers) => {
                for peer in peers {
                    self.trusted.remove(&peer);
                    let added = self
                        .gate
                        .revoked
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .add(peer);
                    if added && self.swarm.is_connected(&peer) {
                        tracing::info!(peer = %peer, "revoked by the coordinator: disconnecting");
                        let _ = self.swarm.disconnect_peer_id(peer);
                    }
                }
            }
            Command::Shutdown(_) => {}
        }
    }

    fn event(&mut self, event: SwarmEvent<BehaviourEvent>) {
        if let SwarmEvent::ConnectionEstablished {
            peer_id,
            num_established,
            connection_id,
            endpoint,
            ..
        } = &event
        {
            self.admit_connection(*peer_id, num_established.get(), *connection_id, endpoint);
        }
        if let SwarmEvent::ConnectionClosed {
            peer_id,
            num_established: 0,
            ..
        } = &event
        {
            self.unvouched.remove(peer_id);
        }
        if matches!(
            event,
            SwarmEvent::ConnectionEstablished { .. } | SwarmEvent::ConnectionClosed { .. }
        ) {
            self.stats.connected_peers.store(
                self.swarm.connected_peers().count() as u64,
                std::sync::atomic::Ordering::Relaxed,
            );
        }
        match event {
            SwarmEvent::Behaviour(BehaviourEvent::Chunks(e)) => self.chunk_event(e),
            SwarmEvent::Behaviour(BehaviourEvent::Identify(identify::Event::Received {
                peer_id,
                info,
                ..
            })) => {
                if !self.swarm.behaviour().kad.is_enabled() {
                    // Addresses are kept only for the DHT's routing table.
                } else if self.trusted.contains(&peer_id) {
                    self.route(peer_id, info.listen_addrs);
                } else if self.pending_addrs.len() < MAX_TRUSTED {
                    let mut addrs = info.listen_addrs;
                    addrs.truncate(16);
                    self.pending_addrs.insert(peer_id, addrs);
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Kad(kad::Event::InboundRequest {
                request:
                    kad::InboundRequest::AddProvider {
                        record: Some(record),
                    },
            })) => {
                if self.trusted.contains(&record.provider) {
                    use kad::store::RecordStore as _;
                    if let Some(Err(e)) = self
                        .swarm
                        .behaviour_mut()
                        .kad
                        .as_mut()
                        .map(|kad| kad.store_mut().add_provider(record))
                    {
                        tracing::debug!(error = %e, "provider record not stored");
                    }
                } else {
                    tracing::debug!(provider = %record.provider, "provider record from an untrusted peer ignored");
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Kad(kad::Event::OutboundQueryProgressed {
                id,
                result: kad::QueryResult::GetProviders(result),
                step,
                ..
            })) => {
                if let (
                    Some((found, _)),
                    Ok(kad::GetProvidersOk::FoundProviders { providers, .. }),
                ) = (self.queries.get_mut(&id), result)
                {
                    found.extend(providers);
                }
                if step.last {
                    if let Some((found, reply)) = self.queries.remove(&id) {
                        let _ = reply.send(Ok(found));
                    }
                }
            }
            _ => {}
        }
    }

    fn chunk_event(&mut self, event: request_response::Event<pb::ChunkRequest, pb::ChunkResponse>) {
        match event {
            request_response::Event::Message { peer, message, .. } => match message {
                request_response::Message::Request {
                    request, channel, ..
                } => self.inbound(peer, request, channel),
                request_response::Message::Response {
                    request_id,
                    response,
                } => {
                    if let Some(reply) = self.outbound.remove(&request_id) {
                        let _ = reply.send(Ok(response));
                    }
                }
            },
            request_response::Event::OutboundFailure {
                request_id, error, ..
            } => {
                if let Some(reply) = self.outbound.remove(&request_id) {
                    let _ = reply.send(Err(MeshError::Failed(error.to_string())));
                }
            }
            _ => {}
        }
    }

    /// Sends a response, counting uploads and refusals.
    fn reply_to(
        &mut self,
        channel: ResponseChannel<pb::ChunkResponse>,
        response: pb::ChunkResponse,
    ) {
        use std::sync::atomic::Ordering::Relaxed;
        match &response.kind {
            Some(pb::chunk_response::Kind::Chunk(c)) => {
                self.stats
                    .uploaded_bytes
                    .fetch_add(c.data.len() as u64, Relaxed);
            }
            // A cancelled request is counted in `cancelled`, not as a refusal.
            Some(pb::chunk_response::Kind::Refused(r)) if r.reason() != pb::Refusal::Cancelled => {
                self.stats.refused.fetch_add(1, Relaxed);
            }
            _ => {}
        }
        let _ = self
            .swarm
            .behaviour_mut()
            .chunks
            .send_response(channel, response);
    }

    fn remember_asker(&mut self, content: ContentId, peer: PeerId) {
        if !self.askers.contains_key(&content) && self.askers.len() >= MAX_ASKED_CONTENTS {
            self.askers.clear();
        }
        let askers = self.askers.entry(content).or_default();
        askers.retain(|p| *p != peer);
        if askers.len() >= MAX_ASKERS {
            askers.pop_front();
        }
        askers.push_back(peer);
    }

    /// Trusts `peer` (see the module doc): its connection stays, its addresses enter the
    /// DHT routing table, its provider records are stored.
    fn trust(&mut self, peer: PeerId) {
        if self.trusted.add(peer) {
            self.unvouched.remove(&peer);
            if let Some(addrs) = self.pending_addrs.remove(&peer) {
                self.route(peer, addrs);
            }
        }
    }

    /// Adds a trusted peer's addresses to the DHT's routing table (when the DHT runs).
    fn route(&mut self, peer: PeerId, addrs: Vec<Multiaddr>) {
        if let Some(kad) = self.swarm.behaviour_mut().kad.as_mut() {
            for addr in addrs {
                kad.add_address(&peer, addr);
            }
        }
    }

    /// Decides on a new connection: revoked peers, a peer's connections beyond
    /// [`MAX_CONNECTIONS_PER_PEER`] and any peer beyond the budget are closed; beyond
    /// half the budget of untrusted inbound peers, the one that waited longest is.
    fn admit_connection(
        &mut self,
        peer: PeerId,
        of_peer: u32,
        connection: libp2p::swarm::ConnectionId,
        endpoint: &libp2p::core::ConnectedPoint,
    ) {
        let connected = self.swarm.connected_peers().count();
        if self.gate.is_revoked(&peer) {
            tracing::debug!(%peer, "revoked peer connected: closing");
            let _ = self.swarm.disconnect_peer_id(peer);
            return;
        }
        if of_peer as usize > MAX_CONNECTIONS_PER_PEER {
            tracing::debug!(%peer, of_peer, "too many connections from one peer: closing the newest");
            self.swarm.close_connection(connection);
            return;
        }
        let trusted = self.trusted.contains(&peer);
        if !trusted && endpoint.is_listener() && of_peer == 1 {
            // Full: the untrusted peer that has waited longest goes (it had its chance
            // to show a ticket; the newcomer may be an agent about to send its own).
            while self.unvouched.len() >= (self.max_connections / 2).max(1) {
                let Some(oldest) = self
                    .unvouched
                    .iter()
                    .min_by_key(|(_, since)| **since)
                    .map(|(p, _)| *p)
                else {
                    break;
                };
                tracing::debug!(peer = %oldest, "room needed for a newer unvouched peer: closing");
                self.unvouched.remove(&oldest);
                let _ = self.swarm.disconnect_peer_id(oldest);
            }
            self.unvouched.insert(peer, std::time::Instant::now());
        }
        if of_peer == 1 && connected > self.max_connections {
            tracing::debug!(%peer, connected, "connection limit reached: closing");
            let _ = self.swarm.disconnect_peer_id(peer);
        }
    }

    /// Closes inbound connections of peers that showed no valid ticket in time.
    fn close_unvouched(&mut self) {
        let timeout = self.unvouched_timeout;
        let late: Vec<PeerId> = self
            .unvouched
            .iter()
            .filter(|(_, since)| since.elapsed() >= timeout)
            .map(|(p, _)| *p)
            .collect();
        for peer in late {
            self.unvouched.remove(&peer);
            if !self.trusted.contains(&peer) {
                tracing::debug!(%peer, "no valid ticket in time: disconnecting");
                self.pending_addrs.remove(&peer);
                let _ = self.swarm.disconnect_peer_id(peer);
            }
        }
    }

    fn inbound(
        &mut self,
        peer: PeerId,
        request: pb::ChunkRequest,
        channel: ResponseChannel<pb::ChunkResponse>,
    ) {
        if !self.trusted.contains(&peer) && self.gate.vouches(&peer, &request.ticket) {
            self.trust(peer);
        }
        let content = match self.gate.admit(&peer, &request.ticket, &request.content) {
            Ok((c, _)) => c,
            Err(refusal) => {
                tracing::debug!(peer = %peer, ?refusal, "chunk request refused");
                self.reply_to(channel, refusal);
                return;
            }
        };
        match request.kind {
            Some(pb::chunk_request::Kind::Bitfield(_)) => {
                self.remember_asker(content, peer);
                let response = match self.gate.store.held(&content) {
                    Some(held) => pb::ChunkResponse {
                        kind: Some(pb::chunk_response::Kind::Held(pb::HeldChunks {
                            chunks: held.len(),
                            bits: held.to_bytes(),
                        })),
                    },
                    None => refused(
                        pb::Refusal::UnknownContent,
                        format!("content {content} is not held here"),
                    ),
                };
                self.reply_to(channel, response);
            }
            Some(pb::chunk_request::Kind::Chunk(index)) => {
                // A requester is better served elsewhere than queued behind more than
                // `max_upload_wait` of uploads: a slow holder that took every request
                // made its askers wait 20 s for chunks fast holders had (slow-peers).
                let backlog = self.limiter.backlog();
                if !self.max_upload_wait.is_zero() && backlog > self.max_upload_wait {
                    self.reply_to(
                        channel,
                        refused(
                            pb::Refusal::Busy,
                            format!("{} ms of uploads already queued", backlog.as_millis()),
                        ),
                    );
                    return;
                }
                let Some(slot) = self.slots.try_acquire() else {
                    self.reply_to(
                        channel,
                        refused(pb::Refusal::Busy, "every upload slot is busy"),
                    );
                    return;
                };
                let (store, limiter, respond) = (
                    self.gate.store.clone(),
                    self.limiter.clone(),
                    self.respond.clone(),
                );
                let compressor = self.compressor.clone().filter(|_| request.accept_zstd);
                // A cancel on the requester's `/arcade/have/1` stream reaches it here
                // while it waits for its upload rate.
                let waiting = self.cancels.wait(peer, content, index);
                let stats = self.stats.clone();
                tokio::spawn(async move {
                    let _slot = slot;
                    // Read and (when asked and it pays) compress off the async workers.
                    let read = tokio::task::spawn_blocking(move || {
                        let data = store.read_chunk(&content, index)?;
                        Ok::<_, std::io::Error>(data.map(|raw| {
                            let packed = compressor.and_then(|c| c.compress(&content, &raw));
                            match packed {
                                Some(p) => (bytes::Bytes::from(p), raw.len(), true),
                                None => (raw.clone(), raw.len(), false),
                            }
                        }))
                    })
                    .await;
                    let response = match read {
                        Ok(Ok(Some((data, raw_len, packed)))) => {
                            // The upload rate counts the bytes that go on the wire.
                            if limiter
                                .acquire_unless(data.len() as u64, &waiting.token)
                                .await
                            {
                                if packed {
                                    use std::sync::atomic::Ordering::Relaxed;
                                    stats.compressed_sent_raw.fetch_add(raw_len as u64, Relaxed);
                                    stats
                                        .compressed_sent_wire
                                        .fetch_add(data.len() as u64, Relaxed);
                                }
                                let encoding = if packed {
                                    pb::ChunkEncoding::Zstd
                                } else {
                                    pb::ChunkEncoding::Raw
                                };
                                pb::ChunkResponse {
                                    kind: Some(pb::chunk_response::Kind::Chunk(pb::ChunkData {
                                        index,
                                        data,
                                        encoding: encoding as i32,
                                    })),
                                }
                            } else {
                                stats
                                    .cancelled
                                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                                refused(
                                    pb::Refusal::Cancelled,
                                    format!("chunk {index}: cancelled by the requester"),
                                )
                            }
                        }
                        Ok(Ok(None)) => refused(
                            pb::Refusal::NoChunk,
                            format!("chunk {index} is not held here"),
                        ),
                        Ok(Err(e)) => refused(
                            pb::Refusal::NoChunk,
                            format!("chunk {index} cannot be read: {e}"),
                        ),
                        Err(e) => refused(pb::Refusal::NoChunk, format!("read task failed: {e}")),
                    };
                    let _ = respond.send(Command::Respond(channel, response)).await;
                });
            }
            None => {
                self.reply_to(
                    channel,
                    refused(
                        pb::Refusal::BadRequest,
                        "request names neither bitfield nor chunk",
                    ),
                );
            }
        }
    }
}

impl MeshHandle {
    /// This host's peer id.
    pub fn peer_id(&self) -> PeerId {
        self.peer_id
    }

    /// Live counters.
    pub fn stats(&self) -> &HostStats {
        &self.stats
    }

    async fn call<T>(&self, make: impl FnOnce(Reply<T>) -> Command) -> Result<T, MeshError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(make(reply))
            .await
            .map_err(|_| MeshError::Closed)?;
        rx.await.map_err(|_| MeshError::Closed)?
    }

    /// The addresses this host listens on.
    pub async fn listen_addrs(&self) -> Vec<Multiaddr> {
        let (reply, rx) = oneshot::channel();
        if self.tx.send(Command::ListenAddrs(reply)).await.is_err() {
            return Vec::new();
        }
        rx.await.unwrap_or_default()
    }

    /// Installs this agent's ticket (sent with every request) and the coordinator key
    /// that tickets of requesters must verify against.
    pub async fn set_credentials(
        &self,
        ticket: Vec<u8>,
        coordinator_key: &[u8],
    ) -> Result<(), MeshError> {
        let verifier =
            TicketVerifier::new(coordinator_key).map_err(|e| MeshError::Start(e.to_string()))?;
        self.tx
            .send(Command::Credentials { ticket, verifier })
            .await
            .map_err(|_| MeshError::Closed)
    }

    /// Whether this host has a connection to `peer` now.
    pub async fn is_connected(&self, peer: PeerId) -> bool {
        let (reply, rx) = oneshot::channel();
        if self.tx.send(Command::Connected(peer, reply)).await.is_err() {
            return false;
        }
        rx.await.unwrap_or(false)
    }

    /// Revokes `peers` (the coordinator removed their agents): their requests are
    /// refused, their connections closed, and they are not asked for chunks.
    pub async fn revoke(&self, peers: Vec<PeerId>) -> Result<(), MeshError> {
        self.tx
            .send(Command::Revoke(peers))
            .await
            .map_err(|_| MeshError::Closed)
    }

    async fn request(
        &self,
        peer: PeerId,
        addrs: Vec<Multiaddr>,
        content: &ContentId,
        kind: pb::chunk_request::Kind,
        expect_bytes: u32,
    ) -> Result<pb::ChunkResponse, MeshError> {
        // Compressed chunks are asked for only when their length is known (the bound
        // of their decompression).
        let chunk_of_known_len =
            matches!(kind, pb::chunk_request::Kind::Chunk(_)) && expect_bytes > 0;
        let request = pb::ChunkRequest {
            ticket: Vec::new(),
            content: content.as_bytes().to_vec(),
            kind: Some(kind),
            expect_bytes,
            accept_zstd: self.accept_zstd && chunk_of_known_len,
        };
        let response = self
            .call(|reply| Command::Request {
                peer,
                addrs,
                request,
                reply,
            })
            .await?;
        if let Some(pb::chunk_response::Kind::Refused(r)) = &response.kind {
            return Err(MeshError::Refused {
                reason: r.reason(),
                message: r.message.clone(),
            });
        }
        Ok(response)
    }

    /// Which chunks of `content` (of `chunks` chunks) `peer` holds.
    pub async fn held(
        &self,
        peer: PeerId,
        addrs: Vec<Multiaddr>,
        content: &ContentId,
        chunks: u32,
    ) -> Result<Bitfield, MeshError> {
        match self
            .request(
                peer,
                addrs,
                content,
                pb::chunk_request::Kind::Bitfield(true),
                chunks.div_ceil(8).max(1),
            )
            .await?
            .kind
        {
            Some(pb::chunk_response::Kind::Held(h)) if h.chunks == chunks => {
                Bitfield::from_bytes(chunks, &h.bits)
                    .map_err(|e| MeshError::Protocol(e.to_string()))
            }
            Some(pb::chunk_response::Kind::Held(h)) => Err(MeshError::Protocol(format!(
                "peer describes {} chunks, the manifest has {chunks}",
                h.chunks
            ))),
            _ => Err(MeshError::Protocol("expected a bitfield".into())),
        }
    }

    /// Chunk `index` of `content` from `peer`, unverified: the caller checks it against
    /// the manifest before using it. Reads an answer of up to the protocol's maximum;
    /// [`MeshHandle::chunk_of_len`] reads no more than the chunk's length.
    pub async fn chunk(
        &self,
        peer: PeerId,
        addrs: Vec<Multiaddr>,
        content: &ContentId,
        index: u32,
    ) -> Result<bytes::Bytes, MeshError> {
        self.chunk_of_len(peer, addrs, content, index, 0).await
    }

    /// [`MeshHandle::chunk`] of a chunk `len` bytes long (from the manifest): a larger
    /// answer is not read (0 = the protocol's maximum).
    pub async fn chunk_of_len(
        &self,
        peer: PeerId,
        addrs: Vec<Multiaddr>,
        content: &ContentId,
        index: u32,
        len: u32,
    ) -> Result<bytes::Bytes, MeshError> {
        match self
            .request(
                peer,
                addrs,
                content,
                pb::chunk_request::Kind::Chunk(index),
                len,
            )
            .await?
            .kind
        {
            Some(pb::chunk_response::Kind::Chunk(c)) if c.index == index => match c.encoding() {
                pb::ChunkEncoding::Raw => Ok(c.data),
                pb::ChunkEncoding::Zstd if self.accept_zstd && len > 0 => {
                    let raw = crate::compress::decompress(&c.data, len as usize)
                        .map_err(|e| MeshError::Corrupt(format!("chunk {index}: {e}")))?;
                    use std::sync::atomic::Ordering::Relaxed;
                    self.stats
                        .compressed_received_wire
                        .fetch_add(c.data.len() as u64, Relaxed);
                    self.stats
                        .compressed_received_raw
                        .fetch_add(raw.len() as u64, Relaxed);
                    Ok(raw)
                }
                pb::ChunkEncoding::Zstd => Err(MeshError::Corrupt(format!(
                    "chunk {index} came compressed, unasked"
                ))),
            },
            _ => Err(MeshError::Protocol(format!("expected chunk {index}"))),
        }
    }

    /// Chunk `index` of `content` is verified here: every peer subscribed to the content
    /// hears of it (`/arcade/have/1`). Cheap; never waits.
    pub fn announce(&self, content: &ContentId, index: u32) {
        self.announcer.announce(content, index);
    }

    /// Subscribes to `peer`'s chunks of `content` (of `chunks` chunks): its bitfield and
    /// then every chunk it verifies arrive at `sink` as `(peer, news)`, until the
    /// returned [`Watch`] is dropped or the peer ends it ([`HaveNews::Ended`]). A peer
    /// without the protocol answers [`MeshError::Unsupported`] (ask it with
    /// [`MeshHandle::held`] instead).
    pub async fn watch(
        &self,
        peer: PeerId,
        addrs: Vec<Multiaddr>,
        content: ContentId,
        chunks: u32,
        sink: mpsc::Sender<(PeerId, HaveNews)>,
    ) -> Result<Watch, MeshError> {
        let (stream, ticket) = self
            .call(|reply| Command::Watch { peer, addrs, reply })
            .await?;
        Watch::start(stream, peer, ticket, content, chunks, sink)
            .await
            .map_err(|e| MeshError::Failed(format!("subscription to {peer}: {e}")))
    }

    /// Starts (or stops) announcing `content` in the DHT.
    pub async fn provide(&self, content: ContentId, on: bool) -> Result<(), MeshError> {
        self.tx
            .send(Command::Provide(content, on))
            .await
            .map_err(|_| MeshError::Closed)
    }

    /// Vouched peers that recently asked this host which chunks of `content` it holds:
    /// agents fetching the same content (or holding it), most recent last. A fetch adds
    /// them as peers: the coordinator's hints name only complete holders and the DHT
    /// lookup runs once, so without them agents fetching at the same time never learned
    /// of each other and all took everything from the seeds.
    pub async fn askers(&self, content: ContentId) -> Vec<PeerId> {
        let (reply, rx) = oneshot::channel();
        if self.tx.send(Command::Askers(content, reply)).await.is_err() {
            return Vec::new();
        }
        rx.await.unwrap_or_default()
    }

    /// Peers the DHT knows to provide `content`.
    pub async fn providers(&self, content: ContentId) -> Result<Vec<PeerId>, MeshError> {
        self.call(|reply| Command::Providers(content, reply)).await
    }

    /// Stops the host.
    pub async fn shutdown(&self) {
        let (done, rx) = oneshot::channel();
        if self.tx.send(Command::Shutdown(done)).await.is_ok() {
            let _ = rx.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mesh::ticket::TicketIssuer;

    /// Required labels and the chunks held (None = missing).
    type Held = (Labels, Vec<Option<Vec<u8>>>);

    /// The chunks present in `chunks`.
    fn bitfield_of(chunks: &[Option<Vec<u8>>]) -> Bitfield {
        let mut b = Bitfield::new(chunks.len() as u32);
        for (i, c) in chunks.iter().enumerate() {
            if c.is_some() {
                b.set(i as u32);
            }
        }
        b
    }

    /// An in-memory store.
    #[derive(Default)]
    struct MemStore(HashMap<ContentId, Held>);

    impl ChunkStore for MemStore {
        fn allowed_labels(&self, content: &ContentId) -> Option<Labels> {
            self.0.get(content).map(|(l, _)| l.clone())
        }
        fn held(&self, content: &ContentId) -> Option<Bitfield> {
            let (_, chunks) = self.0.get(content)?;
            Some(bitfield_of(chunks))
        }
        fn read_chunk(
            &self,
            content: &ContentId,
            index: u32,
        ) -> std::io::Result<Option<bytes::Bytes>> {
            Ok(self
                .0
                .get(content)
                .and_then(|(_, c)| c.get(index as usize).cloned().flatten())
                .map(bytes::Bytes::from))
        }
    }

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| ((*k).into(), (*v).into()))
            .collect()
    }

    /// Gives every host a one-minute ticket from `issuer` (unrestricted labels).
    async fn vouch(issuer: &TicketIssuer, hosts: &[&MeshHandle]) {
        let now = now_ms();
        for h in hosts {
            h.set_credentials(
                issuer
                    .issue(&h.peer_id(), "agent", &Labels::new(), now, 60_000)
                    .unwrap(),
                &issuer.public_key(),
            )
            .await
            .unwrap();
        }
    }

    async fn host(store: MemStore, config: HostConfig) -> (MeshHandle, Vec<Multiaddr>) {
        let h = MeshHost::start(Keypair::generate_ed25519(), config, Arc::new(store))
            .await
            .unwrap();
        let addrs = h.listen_addrs().await;
        assert!(!addrs.is_empty());
        (h, addrs)
    }

    fn with_dht() -> HostConfig {
        HostConfig {
            dht: true,
            ..HostConfig::default()
        }
    }

    /// A store that takes a while to drop and says when it is gone.
    struct SlowDrop(Arc<std::sync::atomic::AtomicBool>);

    impl ChunkStore for SlowDrop {
        fn allowed_labels(&self, _: &ContentId) -> Option<Labels> {
            None
        }
        fn held(&self, _: &ContentId) -> Option<Bitfield> {
            None
        }
        fn read_chunk(&self, _: &ContentId, _: u32) -> std::io::Result<Option<bytes::Bytes>> {
            Ok(None)
        }
    }

    impl Drop for SlowDrop {
        fn drop(&mut self) {
            std::thread::sleep(Duration::from_millis(100));
            self.0.store(true, std::sync::atomic::Ordering::SeqCst);
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn shutdown_returns_after_the_store_is_released() {
        let gone = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let h = MeshHost::start(
            Keypair::generate_ed25519(),
            HostConfig::default(),
            Arc::new(SlowDrop(gone.clone())),
        )
        .await
        .unwrap();
        h.shutdown().await;
        assert!(
            gone.load(std::sync::atomic::Ordering::SeqCst),
            "shutdown returned while the host still held its store"
        );
    }

    fn refusal(r: Result<bytes::Bytes, MeshError>) -> pb::Refusal {
        match r {
            Err(MeshError::Refused { reason, .. }) => reason,
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn serves_vouched_peers_only_and_honours_labels() {
        let issuer = TicketIssuer::generate();
        let key = issuer.public_key();
        let open = ContentId::of_bytes(b"open");
        let secret = ContentId::of_bytes(b"secret");
        let mut store = MemStore::default();
        store.0.insert(
            open,
            (
                Labels::new(),
                vec![Some(b"c0".to_vec()), Some(b"c1".to_vec()), None],
            ),
        );
        store.0.insert(
            secret,
            (labels(&[("team", "red")]), vec![Some(b"s0".to_vec())]),
        );
        let (a, a_addrs) = host(store, HostConfig::default()).await;
        let (b, _) = host(MemStore::default(), HostConfig::default()).await;
        let (c, _) = host(MemStore::default(), HostConfig::default()).await;
        let now = now_ms();
        let ticket =
            |peer: &PeerId, l: Labels| issuer.issue(peer, "agent", &l, now, 60_000).unwrap();
        a.set_credentials(ticket(&a.peer_id(), Labels::new()), &key)
            .await
            .unwrap();
        b.set_credentials(ticket(&b.peer_id(), labels(&[("team", "blue")])), &key)
            .await
            .unwrap();

        // A vouched peer gets the bitfield and the chunks A holds.
        let held = b
            .held(a.peer_id(), a_addrs.clone(), &open, 3)
            .await
            .unwrap();
        assert_eq!(held.iter_set().collect::<Vec<_>>(), vec![0, 1]);
        assert_eq!(a.askers(open).await, vec![b.peer_id()], "a vouched asker");
        assert!(a.askers(secret).await.is_empty());
        assert_eq!(
            b.chunk(a.peer_id(), a_addrs.clone(), &open, 1)
                .await
                .unwrap(),
            &b"c1"[..]
        );
        assert_eq!(
            refusal(b.chunk(a.peer_id(), a_addrs.clone(), &open, 2).await),
            pb::Refusal::NoChunk
        );
        assert_eq!(
            refusal(
                b.chunk(
                    a.peer_id(),
                    a_addrs.clone(),
                    &ContentId::of_bytes(b"other"),
                    0
                )
                .await
            ),
            pb::Refusal::UnknownContent
        );
        // Labels: team=blue may not have content restricted to team=red.
        assert_eq!(
            refusal(b.chunk(a.peer_id(), a_addrs.clone(), &secret, 0).await),
            pb::Refusal::Forbidden
        );
        assert!(matches!(
            b.held(a.peer_id(), a_addrs.clone(), &open, 7).await,
            Err(MeshError::Protocol(_))
        ));

        // An outsider without a ticket, then with B's stolen ticket, gets nothing.
        assert_eq!(
            refusal(c.chunk(a.peer_id(), a_addrs.clone(), &open, 0).await),
            pb::Refusal::NotVouched
        );
        c.set_credentials(ticket(&b.peer_id(), Labels::new()), &key)
            .await
            .unwrap();
        assert_eq!(
            refusal(c.chunk(a.peer_id(), a_addrs.clone(), &open, 0).await),
            pb::Refusal::NotVouched
        );
        // A ticket from another coordinator does not help either.
        let rogue = TicketIssuer::generate()
            .issue(&c.peer_id(), "x", &Labels::new(), now, 60_000)
            .unwrap();
        c.set_credentials(rogue, &key).await.unwrap();
        assert_eq!(
            refusal(c.chunk(a.peer_id(), a_addrs.clone(), &open, 0).await),
            pb::Refusal::NotVouched
        );
        assert!(c.held(a.peer_id(), a_addrs, &open, 3).await.is_err());
        assert_eq!(
            a.askers(open).await,
            vec![b.peer_id()],
            "refused askers are not remembered"
        );
        for h in [a, b, c] {
            h.shutdown().await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn outsiders_are_disconnected_and_their_provider_records_ignored() {
        let issuer = TicketIssuer::generate();
        let content = ContentId::of_bytes(b"c");
        let mut store = MemStore::default();
        store
            .0
            .insert(content, (Labels::new(), vec![Some(b"x".to_vec())]));
        let (a, a_addrs) = host(
            store,
            HostConfig {
                unvouched_timeout: Duration::from_secs(2),
                dht: true,
                ..HostConfig::default()
            },
        )
        .await;
        let (b, _) = host(MemStore::default(), with_dht()).await;
        let (outsider, _) = host(MemStore::default(), with_dht()).await;
        vouch(&issuer, &[&a, &b]).await;
        // Both connect to A; only B shows a valid ticket.
        assert_eq!(
            refusal(
                outsider
                    .chunk(a.peer_id(), a_addrs.clone(), &content, 0)
                    .await
            ),
            pb::Refusal::NotVouched
        );
        b.chunk(a.peer_id(), a_addrs.clone(), &content, 0)
            .await
            .unwrap();
        // Both announce contents to A (they have A in their routing tables).
        let (from_outsider, from_b) = (ContentId::of_bytes(b"o"), ContentId::of_bytes(b"b"));
        outsider.provide(from_outsider, true).await.unwrap();
        b.provide(from_b, true).await.unwrap();
        let mut stored = false;
        for _ in 0..40 {
            if a.providers(from_b).await.unwrap().contains(&b.peer_id()) {
                stored = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(stored, "a trusted peer's provider record is stored");
        assert!(
            !a.providers(from_outsider)
                .await
                .unwrap()
                .contains(&outsider.peer_id()),
            "an untrusted peer's provider record is ignored"
        );
        // The outsider's connection is closed once its time is up; B's stays.
        assert!(a.is_connected(outsider.peer_id()).await);
        let mut closed = false;
        for _ in 0..80 {
            if !a.is_connected(outsider.peer_id()).await {
                closed = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(closed, "the unvouched connection is still open after 4 s");
        assert!(a.is_connected(b.peer_id()).await, "the vouched peer stays");
        for h in [a, b, outsider] {
            h.shutdown().await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_answer_larger_than_the_chunk_asked_for_is_not_read() {
        let issuer = TicketIssuer::generate();
        let content = ContentId::of_bytes(b"big");
        let mut store = MemStore::default();
        store
            .0
            .insert(content, (Labels::new(), vec![Some(vec![7u8; 10_000])]));
        let (a, a_addrs) = host(store, HostConfig::default()).await;
        // Raw answers: a compressed one would be small enough to read (and refused when
        // it decompresses; see `compressed_chunks_...`).
        let raw = HostConfig {
            accept_zstd: false,
            ..HostConfig::default()
        };
        let (b, _) = host(MemStore::default(), raw).await;
        vouch(&issuer, &[&a, &b]).await;
        let got = b
            .chunk_of_len(a.peer_id(), a_addrs.clone(), &content, 0, 10_000)
            .await
            .unwrap();
        assert_eq!(got.len(), 10_000);
        // The manifest says 100 bytes: a 10,000-byte answer is refused unread.
        assert!(matches!(
            b.chunk_of_len(a.peer_id(), a_addrs, &content, 0, 100).await,
            Err(MeshError::Failed(_))
        ));
        for h in [a, b] {
            h.shutdown().await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn compressed_chunks_are_negotiated_bounded_and_skipped_when_they_do_not_shrink() {
        use std::sync::atomic::Ordering::Relaxed;
        let issuer = TicketIssuer::generate();
        let text = ContentId::of_bytes(b"text");
        let noise = ContentId::of_bytes(b"noise");
        let chunk = 64 << 10;
        let prose: Vec<u8> = (0..chunk)
            .map(|i| b"the quick brown fox "[i % 20])
            .collect();
        let random = crate::test_noise(chunk, 7);
        let mut store = MemStore::default();
        store
            .0
            .insert(text, (Labels::new(), vec![Some(prose.clone()); 4]));
        store
            .0
            .insert(noise, (Labels::new(), vec![Some(random.clone()); 8]));
        let (a, a_addrs) = host(store, HostConfig::default()).await;
        let (b, _) = host(MemStore::default(), HostConfig::default()).await;
        let old = HostConfig {
            accept_zstd: false,
            ..HostConfig::default()
        };
        let (c, _) = host(MemStore::default(), old).await;
        vouch(&issuer, &[&a, &b, &c]).await;

        // Asked for, compressible chunks travel compressed and arrive as the raw bytes.
        for i in 0..4 {
            let got = b
                .chunk_of_len(a.peer_id(), a_addrs.clone(), &text, i, chunk as u32)
                .await
                .unwrap();
            assert_eq!(got, prose);
        }
        let (wire, raw) = (
            b.stats().compressed_received_wire.load(Relaxed),
            b.stats().compressed_received_raw.load(Relaxed),
        );
        assert_eq!(raw, 4 * chunk as u64);
        assert!(wire * 20 < raw, "{wire} bytes on the wire for {raw}");
        assert_eq!(a.stats().compressed_sent_wire.load(Relaxed), wire);
        // A requester that does not ask (an older peer) gets raw chunks.
        let got = c
            .chunk_of_len(a.peer_id(), a_addrs.clone(), &text, 0, chunk as u32)
            .await
            .unwrap();
        assert_eq!(got, prose);
        assert_eq!(c.stats().compressed_received_raw.load(Relaxed), 0);
        // Incompressible content goes raw, and the holder stops trying it.
        for i in 0..8 {
            let got = b
                .chunk_of_len(a.peer_id(), a_addrs.clone(), &noise, i, chunk as u32)
                .await
                .unwrap();
            assert_eq!(got, random);
        }
        assert_eq!(b.stats().compressed_received_raw.load(Relaxed), raw);
        // The manifest says 100 bytes: the 64 KiB chunk, compressed to a few hundred
        // bytes, is read but refused as corrupt when it decompresses to more.
        assert!(matches!(
            b.chunk_of_len(a.peer_id(), a_addrs, &text, 0, 100).await,
            Err(MeshError::Corrupt(_))
        ));
        for h in [a, b, c] {
            h.shutdown().await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn received_chunks_reuse_buffers_and_keep_their_own_bytes() {
        use super::super::buffers::BufferPool;
        let issuer = TicketIssuer::generate();
        let content = ContentId::of_bytes(b"pooled");
        // Sixteen 256 KiB chunks, each of its own byte, so a reused buffer that kept
        // an earlier chunk's bytes would show.
        let chunks: Vec<Option<Vec<u8>>> = (0..16u8).map(|i| Some(vec![i; 256 << 10])).collect();
        let mut store = MemStore::default();
        store.0.insert(content, (Labels::new(), chunks));
        let (a, a_addrs) = host(store, HostConfig::default()).await;
        let raw = HostConfig {
            accept_zstd: false,
            ..HostConfig::default()
        };
        let (b, _) = host(MemStore::default(), raw).await;
        vouch(&issuer, &[&a, &b]).await;
        let before = BufferPool::shared().stats().reused;
        for i in 0..16u32 {
            let got = b
                .chunk_of_len(a.peer_id(), a_addrs.clone(), &content, i, 256 << 10)
                .await
                .unwrap();
            assert!(got.iter().all(|&x| x == i as u8), "chunk {i} bytes");
            drop(got);
        }
        // Each response after the first is read into the buffer the one before it
        // gave back (other tests share the pool: they can only add reuses).
        let reused = BufferPool::shared().stats().reused - before;
        assert!(
            reused >= 15,
            "only {reused} of 16 responses reused a buffer"
        );
        for h in [a, b] {
            h.shutdown().await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn busy_when_the_upload_rate_backlog_exceeds_max_upload_wait() {
        let issuer = TicketIssuer::generate();
        let content = ContentId::of_bytes(b"c");
        let mut store = MemStore::default();
        store.0.insert(
            content,
            (
                Labels::new(),
                vec![Some(vec![1u8; 1000]), Some(vec![2u8; 1000])],
            ),
        );
        // 1,000 bytes/s and no burst: the first chunk queues 1 s of uploads.
        let (a, a_addrs) = host(
            store,
            HostConfig {
                upload_rate: 1000,
                upload_burst: 0,
                max_upload_wait: Duration::from_millis(200),
                ..HostConfig::default()
            },
        )
        .await;
        let (b, _) = host(MemStore::default(), HostConfig::default()).await;
        vouch(&issuer, &[&a, &b]).await;
        // While the first chunk waits for its second of rate, a second request would
        // wait longer than max_upload_wait: it is refused busy, not queued.
        let (first, second) =
            tokio::join!(b.chunk(a.peer_id(), a_addrs.clone(), &content, 0), async {
                tokio::time::sleep(Duration::from_millis(300)).await;
                b.chunk(a.peer_id(), a_addrs.clone(), &content, 1).await
            });
        assert_eq!(first.unwrap().len(), 1000);
        assert_eq!(refusal(second), pb::Refusal::Busy);
        for h in [a, b] {
            h.shutdown().await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn busy_when_no_upload_slot_and_providers_found_through_the_dht() {
        let issuer = TicketIssuer::generate();
        let content = ContentId::of_bytes(b"c");
        let mut store = MemStore::default();
        store
            .0
            .insert(content, (Labels::new(), vec![Some(b"x".to_vec())]));
        let (a, a_addrs) = host(
            store,
            HostConfig {
                max_uploads: 0,
                dht: true,
                ..HostConfig::default()
            },
        )
        .await;
        let (b, _) = host(MemStore::default(), with_dht()).await;
        vouch(&issuer, &[&a, &b]).await;
        assert_eq!(
            refusal(b.chunk(a.peer_id(), a_addrs.clone(), &content, 0).await),
            pb::Refusal::Busy
        );
        // Bitfields need no upload slot.
        assert!(
            b.held(a.peer_id(), a_addrs, &content, 1)
                .await
                .unwrap()
                .is_full()
        );

        a.provide(content, true).await.unwrap();
        let mut found = Vec::new();
        for _ in 0..50 {
            found = b.providers(content).await.unwrap();
            if found.contains(&a.peer_id()) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(
            found.contains(&a.peer_id()),
            "DHT lists A as a provider: {found:?}"
        );
        a.shutdown().await;
        b.shutdown().await;
    }

    #[tokio::test]
    async fn without_the_dht_a_host_serves_but_publishes_and_finds_no_providers() {
        let issuer = TicketIssuer::generate();
        let content = ContentId::of_bytes(b"c");
        let mut store = MemStore::default();
        store
            .0
            .insert(content, (Labels::new(), vec![Some(b"x".to_vec())]));
        let (a, a_addrs) = host(store, HostConfig::default()).await;
        let (b, _) = host(MemStore::default(), HostConfig::default()).await;
        vouch(&issuer, &[&a, &b]).await;
        // Connected and trusted both ways, as in the test above, where the DHT found A.
        assert_eq!(
            &b.chunk(a.peer_id(), a_addrs.clone(), &content, 0)
                .await
                .unwrap()[..],
            b"x"
        );
        a.provide(content, true).await.unwrap();
        for _ in 0..10 {
            let found = b.providers(content).await.unwrap();
            assert!(found.is_empty(), "no DHT, yet providers: {found:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        a.shutdown().await;
        b.shutdown().await;
    }

    /// A store whose chunks can be added while it serves.
    #[derive(Default)]
    struct LiveStore(std::sync::Mutex<HashMap<ContentId, Vec<Option<Vec<u8>>>>>);

    impl ChunkStore for Arc<LiveStore> {
        fn allowed_labels(&self, content: &ContentId) -> Option<Labels> {
            self.0.lock().unwrap().get(content).map(|_| Labels::new())
        }
        fn held(&self, content: &ContentId) -> Option<Bitfield> {
            Some(bitfield_of(self.0.lock().unwrap().get(content)?))
        }
        fn read_chunk(
            &self,
            content: &ContentId,
            index: u32,
        ) -> std::io::Result<Option<bytes::Bytes>> {
            let chunks = self.0.lock().unwrap();
            Ok(chunks
                .get(content)
                .and_then(|c| c.get(index as usize).cloned().flatten())
                .map(bytes::Bytes::from))
        }
    }

    async fn next(news: &mut mpsc::Receiver<(PeerId, HaveNews)>) -> (PeerId, HaveNews) {
        tokio::time::timeout(Duration::from_secs(10), news.recv())
            .await
            .expect("news in time")
            .expect("news channel open")
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn watchers_hear_new_chunks_and_cancels_reach_the_holder() {
        let issuer = TicketIssuer::generate();
        let key = issuer.public_key();
        let content = ContentId::of_bytes(b"watched");
        let big = vec![7u8; 256 << 10];
        let store = Arc::new(LiveStore::default());
        store.0.lock().unwrap().insert(
            content,
            vec![Some(b"c0".to_vec()), None, Some(big.clone()), Some(big)],
        );
        // 64 KiB/s: a 256 KiB chunk waits about 4 s for its upload rate.
        let a = MeshHost::start(
            Keypair::generate_ed25519(),
            HostConfig {
                upload_rate: 64 << 10,
                upload_burst: 1024,
                ..HostConfig::default()
            },
            Arc::new(store.clone()),
        )
        .await
        .unwrap();
        let a_addrs = a.listen_addrs().await;
        let (b, _) = host(MemStore::default(), HostConfig::default()).await;
        let (outsider, _) = host(MemStore::default(), HostConfig::default()).await;
        let now = now_ms();
        for h in [&a, &b] {
            let ticket = issuer
                .issue(&h.peer_id(), "agent", &Labels::new(), now, 60_000)
                .unwrap();
            h.set_credentials(ticket, &key).await.unwrap();
        }
        let (sink, mut news) = mpsc::channel(16);
        let watch = b
            .watch(a.peer_id(), a_addrs.clone(), content, 4, sink.clone())
            .await
            .unwrap();
        let (from, first) = next(&mut news).await;
        assert_eq!(from, a.peer_id());
        let HaveNews::Held(held) = first else {
            panic!("the bitfield comes first: {first:?}");
        };
        assert_eq!(held.iter_set().collect::<Vec<_>>(), vec![0, 2, 3]);

        // A verifies chunk 1: the watcher hears of it without asking.
        store.0.lock().unwrap().get_mut(&content).unwrap()[1] = Some(b"c1".to_vec());
        a.announce(&content, 1);
        assert_eq!(next(&mut news).await.1, HaveNews::Haves(vec![1]));
        assert_eq!(
            a.stats()
                .subscriptions
                .load(std::sync::atomic::Ordering::Relaxed),
            1
        );

        // A request waiting for A's upload rate is cancelled on the watch.
        let waiting = {
            let (b, addrs) = (b.clone(), a_addrs.clone());
            let holder = a.peer_id();
            tokio::spawn(async move { b.chunk(holder, addrs, &content, 2).await })
        };
        tokio::time::sleep(Duration::from_millis(500)).await;
        watch.cancel(2);
        assert_eq!(refusal(waiting.await.unwrap()), pb::Refusal::Cancelled);
        assert_eq!(
            a.stats()
                .cancelled
                .load(std::sync::atomic::Ordering::Relaxed),
            1
        );
        assert_eq!(
            a.stats().refused.load(std::sync::atomic::Ordering::Relaxed),
            0
        );

        // Closing the watch cancels what still waits for that content.
        let waiting = {
            let (b, addrs) = (b.clone(), a_addrs.clone());
            let holder = a.peer_id();
            tokio::spawn(async move { b.chunk(holder, addrs, &content, 3).await })
        };
        tokio::time::sleep(Duration::from_millis(500)).await;
        drop(watch);
        assert_eq!(refusal(waiting.await.unwrap()), pb::Refusal::Cancelled);

        // An outsider's subscription is refused, and it hears why.
        let (sink, mut refused_news) = mpsc::channel(4);
        let _w = outsider
            .watch(a.peer_id(), a_addrs, content, 4, sink)
            .await
            .unwrap();
        match next(&mut refused_news).await.1 {
            HaveNews::Ended(reason) => assert!(reason.contains("NotVouched"), "{reason}"),
            other => panic!("an outsider is refused: {other:?}"),
        }
        for h in [a, b, outsider] {
            h.shutdown().await;
        }
    }
}
