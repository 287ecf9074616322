//! One fetch, driven by the sans-IO swarm scheduler
//! ([`arcade_p2p::mesh::scheduler`]): the scheduler decides which chunk comes from
//! which source — peers holding it (rarest first) or the coordinator for what no peer
//! has in time — and this driver turns its actions into requests, feeds the results
//! back as events, verifies and writes every chunk, and records progress.
//!
//! Sources: the coordinator through [`super::source::ChunkSource`] (one chunk per
//! request), peers through the mesh host. Peers come from the coordinator's peer hints
//! and from the DHT. Each peer is watched over `/arcade/have/1`
//! ([`arcade_p2p::mesh::have`]): its bitfield, then every chunk it verifies, as it
//! verifies it; a cancelled request is cancelled at the peer on the same stream. A peer
//! that cannot be watched (no such protocol, the stream broke) has its bitfield polled
//! every 250 ms instead.
//! Coordinator failures back the server off (exponentially, with jitter) and end the
//! fetch after `download.retry` consecutive failures; peer failures are the
//! scheduler's business (strikes, bans).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use arcade_p2p::Manifest;
use arcade_p2p::PluginRef;
use arcade_p2p::mesh::bitfield::Bitfield;
use arcade_p2p::mesh::have::{HaveNews, Watch};
use arcade_p2p::mesh::host::{MeshError, Multiaddr};
use arcade_p2p::mesh::scheduler::{Action, Event, Scheduler, Source};
use arcade_p2p::mesh::ticket::PeerId;
use futures::StreamExt;
use tokio::task::{AbortHandle, JoinSet};
use tokio_util::sync::CancellationToken;

use super::source::SourceError;
use super::{FetchError, Fetcher, backoff};
use crate::cache::CacheError;
use crate::metrics::SourceLabel;

/// Record progress after this many new chunks.
const PROGRESS_EVERY: usize = 8;

/// How often a fetch adds the peers that asked this agent for the content's bitfield.
const ASKERS_EVERY: Duration = Duration::from_secs(1);

/// A peer that answered busy (every upload slot taken) is left alone this long.
pub const PEER_BUSY_RETRY: Duration = Duration::from_millis(200);

/// What a finished task reports.
pub(super) enum Outcome {
    Chunk {
        source: Source<PeerId>,
        index: u32,
        result: Result<bytes::Bytes, SourceError>,
        /// From the request to the answer.
        took: Duration,
    },
    Held {
        peer: PeerId,
        result: Option<Bitfield>,
    },
    Providers(Vec<PeerId>),
    Watch {
        peer: PeerId,
        result: Result<Watch, MeshError>,
    },
}

#[derive(Default)]
pub(super) struct PeerState {
    addrs: Vec<Multiaddr>,
    held: Option<Bitfield>,
    querying: bool,
    banned: bool,
    /// The peer's `/arcade/have/1` subscription (news arrive on the fetch's channel).
    watch: Option<Watch>,
    /// A subscription is being opened.
    subscribing: bool,
    /// The peer cannot be watched: its bitfield is polled.
    polled: bool,
}

/// News from every watched peer of one fetch.
pub(super) type News = (
    tokio::sync::mpsc::Sender<(PeerId, HaveNews)>,
    tokio::sync::mpsc::Receiver<(PeerId, HaveNews)>,
);

/// Room for news of watched peers waiting for the fetch loop.
pub(super) const NEWS_QUEUE: usize = 1024;

pub(super) struct FetchRun<'a> {
    pub(super) fetcher: &'a Fetcher,
    pub(super) plugin: &'a PluginRef,
    /// Ask the coordinator for the content by its SHA-256 rather than by `plugin` (a
    /// patch to the plugin's content is a content of its own).
    pub(super) by_content: bool,
    pub(super) manifest: &'a Manifest,
    pub(super) file: Arc<std::fs::File>,
    pub(super) have: Vec<bool>,
    pub(super) scheduler: Scheduler<PeerId>,
    pub(super) started: tokio::time::Instant,
    pub(super) tasks: JoinSet<Outcome>,
    pub(super) inflight: HashMap<(Source<PeerId>, u32), AbortHandle>,
    pub(super) peers: HashMap<PeerId, PeerState>,
    pub(super) bytes_by_source: HashMap<&'static str, u64>,
    pub(super) server_failures: u32,
    pub(super) last_error: String,
    pub(super) since_save: usize,
    pub(super) news: News,
}

fn kind(source: &Source<PeerId>) -> &'static str {
    match source {
        Source::Server => "server",
        Source::Peer(_) => "peer",
    }
}

impl FetchRun<'_> {
    fn now(&self) -> Duration {
        self.started.elapsed()
    }

    fn shown(&self) -> String {
        self.plugin.to_string()
    }

    /// Runs until every chunk is verified and written (or the fetch fails).
    pub(super) async fn drive(
        &mut self,
        hints: Vec<(PeerId, Vec<Multiaddr>)>,
        cancel: &CancellationToken,
    ) -> Result<(), FetchError> {
        let mesh = self.fetcher.mesh.clone();
        if let Some(mesh) = &mesh {
            for (peer, addrs) in hints {
                if peer != mesh.handle().peer_id() {
                    self.add_peer(peer, addrs);
                }
            }
            let (handle, content) = (mesh.handle().clone(), self.manifest.content_id());
            self.tasks.spawn(async move {
                Outcome::Providers(handle.providers(content).await.unwrap_or_default())
            });
        }
        if let Some(mesh) = &mesh {
            let (content, chunks) = (self.manifest.content_id(), self.manifest.chunk_count());
            for (i, _) in self.have.iter().enumerate().filter(|(_, h)| **h) {
                mesh.mark_held(content, chunks, i as u32);
            }
        }
        let mut actions = self.scheduler.handle(self.now(), Event::Tick);
        let mut tick = tokio::time::interval(Duration::from_millis(200));
        let mut refresh = tokio::time::interval(Duration::from_millis(250));
        let mut askers = tokio::time::interval(ASKERS_EVERY);
        loop {
            for action in std::mem::take(&mut actions) {
                if let Action::Request { chunk, .. } = &action {
                    // `mesh.download_rate`: the request goes out once its bytes fit.
                    let len = self
                        .manifest
                        .chunk_range(*chunk)
                        .map_or(0, |r| r.end - r.start);
                    tokio::select! {
                        _ = self.fetcher.download_limit.acquire(len) => {}
                        _ = cancel.cancelled() => {
                            self.fetcher
                                .save_progress(self.manifest.content_id(), &self.have)
                                .await;
                            self.tasks.abort_all();
                            return Err(FetchError::Cancelled(self.shown()));
                        }
                    }
                }
                self.act(action);
            }
            if self.scheduler.is_done() {
                self.fetcher
                    .save_progress(self.manifest.content_id(), &self.have)
                    .await;
                self.tasks.abort_all();
                return Ok(());
            }
            tokio::select! {
                joined = self.tasks.join_next(), if !self.tasks.is_empty() => {
                    if let Some(Ok(outcome)) = joined {
                        actions = self.outcome(outcome).await?;
                    }
                }
                Some((peer, news)) = self.news.1.recv() => actions = self.heard(peer, news),
                _ = tick.tick() => actions = self.scheduler.handle(self.now(), Event::Tick),
                _ = refresh.tick() => self.refresh_bitfields(),
                _ = askers.tick(), if mesh.is_some() => self.meet_askers(),
                _ = cancel.cancelled() => {
                    self.fetcher.save_progress(self.manifest.content_id(), &self.have).await;
                    self.tasks.abort_all();
                    return Err(FetchError::Cancelled(self.shown()));
                }
            }
        }
    }

    fn add_peer(&mut self, peer: PeerId, addrs: Vec<Multiaddr>) {
        let state = self.peers.entry(peer).or_default();
        if state.addrs.is_empty() {
            state.addrs = addrs;
        }
        self.subscribe(peer);
    }

    /// Watches `peer` (its news come back on the fetch's channel), unless it is watched,
    /// banned or polled.
    fn subscribe(&mut self, peer: PeerId) {
        let Some(mesh) = self.fetcher.mesh.clone() else {
            return;
        };
        let Some(state) = self.peers.get_mut(&peer) else {
            return;
        };
        if state.watch.is_some() || state.subscribing || state.banned || state.polled {
            return;
        }
        state.subscribing = true;
        let (addrs, content, chunks, sink) = (
            state.addrs.clone(),
            self.manifest.content_id(),
            self.manifest.chunk_count(),
            self.news.0.clone(),
        );
        self.tasks.spawn(async move {
            let result = mesh
                .handle()
                .watch(peer, addrs, content, chunks, sink)
                .await;
            Outcome::Watch { peer, result }
        });
    }

    /// Polls a peer that cannot be watched.
    fn query_held(&mut self, peer: PeerId) {
        let Some(mesh) = self.fetcher.mesh.clone() else {
            return;
        };
        let Some(state) = self.peers.get_mut(&peer) else {
            return;
        };
        if !state.polled
            || state.querying
            || state.banned
            || state.held.as_ref().is_some_and(Bitfield::is_full)
        {
            return;
        }
        state.querying = true;
        let (addrs, content, chunks) = (
            state.addrs.clone(),
            self.manifest.content_id(),
            self.manifest.chunk_count(),
        );
        self.tasks.spawn(async move {
            let result = mesh.handle().held(peer, addrs, &content, chunks).await.ok();
            Outcome::Held { peer, result }
        });
    }

    /// Peers that asked us for this content's bitfield are fetching or holding it too:
    /// ask them in turn (they come back as [`Outcome::Providers`]).
    fn meet_askers(&mut self) {
        let Some(mesh) = self.fetcher.mesh.clone() else {
            return;
        };
        let content = self.manifest.content_id();
        self.tasks
            .spawn(async move { Outcome::Providers(mesh.handle().askers(content).await) });
    }

    fn refresh_bitfields(&mut self) {
        let peers: Vec<PeerId> = self.peers.keys().copied().collect();
        for peer in peers {
            self.query_held(peer);
        }
    }

    fn act(&mut self, action: Action<PeerId>) {
        match action {
            Action::Request { source, chunk } => self.request(source, chunk),
            Action::Cancel { source, chunk } => {
                if let Some(task) = self.inflight.remove(&(source.clone(), chunk)) {
                    task.abort();
                    // Tell the peer, so that it does not send what nobody waits for.
                    if let Source::Peer(peer) = source
                        && let Some(watch) = self.peers.get(&peer).and_then(|p| p.watch.as_ref())
                    {
                        watch.cancel(chunk);
                    }
                }
            }
            Action::Ban { peer, reason } => {
                tracing::warn!(plugin = %self.plugin, peer = %peer, %reason, "peer banned for this content");
                self.fetcher.metrics.peer_bans.inc();
                if let Some(state) = self.peers.get_mut(&peer) {
                    state.banned = true;
                    // Closing the subscription cancels our requests waiting there.
                    state.watch = None;
                }
                self.inflight.retain(|(s, _), task| {
                    let theirs = matches!(s, Source::Peer(p) if *p == peer);
                    if theirs {
                        task.abort();
                    }
                    !theirs
                });
            }
            Action::Done => {}
        }
    }

    fn request(&mut self, source: Source<PeerId>, chunk: u32) {
        let content = self.manifest.content_id();
        let handle = match &source {
            Source::Server => {
                let server = self.fetcher.server.clone();
                let (id, version) = if self.by_content {
                    (String::new(), String::new())
                } else {
                    (self.plugin.id.to_string(), self.plugin.version.to_string())
                };
                let len = self
                    .manifest
                    .chunk_range(chunk)
                    .map_or(0, |r| (r.end - r.start) as usize);
                let metrics = self.fetcher.metrics.clone();
                self.tasks.spawn(async move {
                    let asked = std::time::Instant::now();
                    let result = async {
                        let mut stream = server
                            .open(content, &id, &version, &[(chunk, chunk + 1)])
                            .await?;
                        match stream.next().await {
                            Some(Ok(c)) if c.index == chunk => {
                                let wire = c.data.len() as u64;
                                let packed = c.encoding == arcade_proto::v1::ChunkEncoding::Zstd;
                                let raw = c.decode(len)?;
                                if packed {
                                    metrics.count_compressed("server", wire, raw.len() as u64);
                                }
                                Ok(raw)
                            }
                            Some(Ok(c)) => Err(SourceError::transient(format!(
                                "coordinator sent chunk {} for {chunk}",
                                c.index
                            ))),
                            Some(Err(e)) => Err(e),
                            None => Err(SourceError::transient(format!(
                                "coordinator ended the stream before chunk {chunk}"
                            ))),
                        }
                    }
                    .await;
                    Outcome::Chunk {
                        source: Source::Server,
                        index: chunk,
                        result,
                        took: asked.elapsed(),
                    }
                })
            }
            Source::Peer(peer) => {
                let Some(mesh) = self.fetcher.mesh.clone() else {
                    return;
                };
                let peer = *peer;
                let addrs = self
                    .peers
                    .get(&peer)
                    .map(|p| p.addrs.clone())
                    .unwrap_or_default();
                // A peer's answer may be no larger than the chunk (its manifest length).
                let len = self
                    .manifest
                    .chunk_range(chunk)
                    .map_or(0, |r| (r.end - r.start) as u32);
                self.tasks.spawn(async move {
                    let asked = std::time::Instant::now();
                    let result = mesh
                        .handle()
                        .chunk_of_len(peer, addrs, &content, chunk, len)
                        .await
                        .map_err(|e| {
                            let busy = matches!(
                                &e,
                                MeshError::Refused { reason, .. }
                                    if *reason == arcade_proto::v1::Refusal::Busy
                            );
                            let mut error = SourceError::transient(format!("peer {peer}: {e}"));
                            error.busy = busy.then_some(PEER_BUSY_RETRY);
                            error.corrupt = matches!(e, MeshError::Corrupt(_));
                            error
                        });
                    Outcome::Chunk {
                        source: Source::Peer(peer),
                        index: chunk,
                        result,
                        took: asked.elapsed(),
                    }
                })
            }
        };
        self.inflight.insert((source, chunk), handle);
    }

    async fn outcome(&mut self, outcome: Outcome) -> Result<Vec<Action<PeerId>>, FetchError> {
        match outcome {
            Outcome::Providers(peers) => {
                let me = self.fetcher.mesh.as_ref().map(|m| m.handle().peer_id());
                for peer in peers {
                    if Some(peer) != me && !self.peers.contains_key(&peer) {
                        self.add_peer(peer, Vec::new());
                    }
                }
                Ok(Vec::new())
            }
            Outcome::Watch { peer, result } => {
                let Some(state) = self.peers.get_mut(&peer) else {
                    return Ok(Vec::new());
                };
                state.subscribing = false;
                match result {
                    Ok(watch) if !state.banned => state.watch = Some(watch),
                    Ok(_) => {}
                    Err(e) => {
                        tracing::debug!(plugin = %self.plugin, %peer, error = %e, "peer cannot be watched: polling it");
                        state.polled = true;
                        self.query_held(peer);
                    }
                }
                Ok(Vec::new())
            }
            Outcome::Held { peer, result } => {
                let Some(state) = self.peers.get_mut(&peer) else {
                    return Ok(Vec::new());
                };
                state.querying = false;
                let Some(held) = result else {
                    return Ok(Vec::new());
                };
                Ok(self.learn(peer, held))
            }
            Outcome::Chunk {
                source,
                index,
                result,
                took,
            } => {
                self.inflight.remove(&(source.clone(), index));
                match result {
                    Ok(data) => {
                        self.fetcher
                            .metrics
                            .chunk_duration
                            .get_or_create(&SourceLabel {
                                source: kind(&source).into(),
                            })
                            .observe(took.as_secs_f64());
                        self.arrived(source, index, data).await
                    }
                    Err(e) => self.failed(source, index, e),
                }
            }
        }
    }

    /// What `peer` holds now (a poll's answer, or a subscription's bitfield).
    fn learn(&mut self, peer: PeerId, held: Bitfield) -> Vec<Action<PeerId>> {
        let now = self.now();
        let Some(state) = self.peers.get_mut(&peer) else {
            return Vec::new();
        };
        match state.held.replace(held.clone()) {
            None => self
                .scheduler
                .handle(now, Event::PeerJoined { peer, have: held }),
            Some(before) => {
                // Every new chunk of the answer in one scheduler call.
                let news = held
                    .iter_set()
                    .filter(|&i| !before.get(i))
                    .map(|chunk| Event::Have { peer, chunk });
                self.scheduler.handle_all(now, news)
            }
        }
    }

    /// News from a watched peer.
    fn heard(&mut self, peer: PeerId, news: HaveNews) -> Vec<Action<PeerId>> {
        let now = self.now();
        let Some(state) = self.peers.get_mut(&peer) else {
            return Vec::new();
        };
        if state.banned {
            return Vec::new();
        }
        match news {
            HaveNews::Held(held) => self.learn(peer, held),
            HaveNews::Haves(chunks) => {
                let Some(held) = state.held.as_mut() else {
                    return Vec::new();
                };
                let fresh: Vec<u32> = chunks.into_iter().filter(|&i| held.set(i)).collect();
                let news = fresh.into_iter().map(|chunk| Event::Have { peer, chunk });
                self.scheduler.handle_all(now, news)
            }
            HaveNews::Ended(reason) => {
                tracing::debug!(plugin = %self.plugin, %peer, %reason, "subscription ended: polling the peer");
                state.watch = None;
                state.polled = true;
                self.query_held(peer);
                Vec::new()
            }
        }
    }

    async fn arrived(
        &mut self,
        source: Source<PeerId>,
        index: u32,
        data: bytes::Bytes,
    ) -> Result<Vec<Action<PeerId>>, FetchError> {
        let now = self.now();
        let k = kind(&source);
        if let Err(e) = self.manifest.verify_chunk(index, &data) {
            return Ok(self.rejected(source, index, &e.to_string()));
        }
        if source == Source::Server {
            self.server_failures = 0;
        }
        if self.have.get(index as usize) == Some(&false) {
            let offset = self
                .manifest
                .chunk_range(index)
                .map(|r| r.start)
                .unwrap_or(0);
            let len = data.len() as u64;
            let file = self.file.clone();
            let written = tokio::task::spawn_blocking(move || {
                use std::os::unix::fs::FileExt as _;
                file.write_all_at(&data, offset)
            })
            .await
            .map_err(|e| std::io::Error::other(e.to_string()))
            .and_then(|r| r);
            if let Err(e) = written {
                // A full disk names the bytes this download still needed.
                let missing: u64 = (0..self.manifest.chunk_count())
                    .filter(|&i| self.have.get(i as usize) == Some(&false))
                    .filter_map(|i| self.manifest.chunk_range(i))
                    .map(|r| r.end - r.start)
                    .sum();
                let partial = self.fetcher.cache.partial_path(&self.manifest.content_id());
                return Err(FetchError::Cache {
                    plugin: self.shown(),
                    source: Box::new(CacheError::from_io(&partial, Some(missing), e)),
                });
            }
            self.have[index as usize] = true;
            if let Some(mesh) = &self.fetcher.mesh {
                mesh.mark_held(
                    self.manifest.content_id(),
                    self.manifest.chunk_count(),
                    index,
                );
            }
            *self.bytes_by_source.entry(k).or_default() += len;
            self.fetcher
                .metrics
                .fetched_bytes
                .get_or_create(&SourceLabel { source: k.into() })
                .inc_by(len);
            self.since_save += 1;
            if self.since_save >= PROGRESS_EVERY {
                self.since_save = 0;
                self.fetcher
                    .save_progress(self.manifest.content_id(), &self.have)
                    .await;
            }
        }
        Ok(self.scheduler.handle(
            now,
            Event::ChunkArrived {
                source,
                chunk: index,
            },
        ))
    }

    /// A chunk that cannot be the one asked for (fails verification, or does not
    /// decompress to its length): counted, and the source struck.
    fn rejected(&mut self, source: Source<PeerId>, index: u32, why: &str) -> Vec<Action<PeerId>> {
        let k = kind(&source);
        self.fetcher
            .metrics
            .bad_chunks
            .get_or_create(&SourceLabel { source: k.into() })
            .inc();
        tracing::warn!(plugin = %self.plugin, chunk = index, source = k, error = %why, "bad chunk rejected");
        self.last_error = format!("chunk {index} from the {k} failed verification: {why}");
        self.scheduler.handle(
            self.now(),
            Event::ChunkBad {
                source,
                chunk: index,
            },
        )
    }

    fn failed(
        &mut self,
        source: Source<PeerId>,
        index: u32,
        error: SourceError,
    ) -> Result<Vec<Action<PeerId>>, FetchError> {
        if error.corrupt {
            return Ok(self.rejected(source, index, &error.message));
        }
        let now = self.now();
        self.last_error = error.message.clone();
        let mut actions = Vec::new();
        if let Source::Peer(peer) = source
            && let Some(retry_after) = error.busy
        {
            return Ok(self.scheduler.handle(
                now,
                Event::PeerBusy {
                    peer,
                    chunk: index,
                    retry_after,
                },
            ));
        }
        if let Source::Peer(_) = source {
            return Ok(self.scheduler.handle(
                now,
                Event::RequestFailed {
                    source,
                    chunk: index,
                },
            ));
        }
        {
            // The coordinator: a busy answer or a failure voids its request through
            // ServerBusy/ServerDeferred (no RequestFailed, which would re-ask it at once).
            if let Some(retry_after) = error.busy {
                // Busy, or "get it from peers": not a failure; meet the holders.
                for holder in &error.holders {
                    let (peer, addrs) = holder.split_once('=').unwrap_or((holder, ""));
                    if let Ok(peer) = peer.parse::<PeerId>() {
                        let addrs = addrs.split(',').filter_map(|a| a.parse().ok()).collect();
                        if !self.peers.contains_key(&peer) {
                            self.add_peer(peer, addrs);
                        }
                    }
                }
                let event = if error.holders.is_empty() {
                    Event::ServerBusy {
                        retry_after,
                        holders: Vec::new(),
                    }
                } else {
                    Event::ServerDeferred {
                        chunk: index,
                        retry_after,
                    }
                };
                actions.extend(self.scheduler.handle(now, event));
                return Ok(actions);
            }
            if !error.retryable {
                return Err(FetchError::Refused {
                    plugin: self.shown(),
                    source: error,
                });
            }
            self.server_failures += 1;
            if self.server_failures > self.fetcher.config.retry {
                return Err(FetchError::Exhausted {
                    plugin: self.shown(),
                    attempts: self.server_failures,
                    last: self.last_error.clone(),
                });
            }
            let retry_after = backoff(self.fetcher.config.backoff.get(), self.server_failures - 1);
            tracing::warn!(plugin = %self.plugin, attempt = self.server_failures, delay_ms = retry_after.as_millis() as u64, error = %error, "coordinator request failed; backing off");
            actions.extend(self.scheduler.handle(
                now,
                Event::ServerBusy {
                    retry_after,
                    holders: Vec::new(),
                },
            ));
        }
        Ok(actions)
    }
}
