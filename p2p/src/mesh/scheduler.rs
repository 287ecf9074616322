//! The swarm scheduler: which chunk to ask from whom, and when to fall back to the
//! coordinator.
//!
//! [`Scheduler`] is sans-IO: a plain state machine with no sockets, no clock, no tasks
//! and no async. Its driver (the agent runtime with real libp2p streams, or the simulator
//! with simulated links) feeds it [`Event`]s together with the current monotonic time and
//! carries out the [`Action`]s it returns. Given the same seed and the same timed events
//! it returns the same actions, so a simulated run replays exactly.
//!
//! # Policy
//!
//! - **Rarest first.** Missing chunks that are not in flight are requested in order of
//!   how few connected, unbanned peers may serve them, ties broken by a per-chunk random
//!   key drawn from the seed (so different agents start on different chunks). Each goes
//!   to the least-loaded holder with a free slot, ties broken at random. A peer is only
//!   ever asked for a chunk it announced (in [`Event::PeerJoined`] or [`Event::Have`]).
//! - **Limits.** At most [`max_inflight_per_peer`](SchedulerConfig::max_inflight_per_peer)
//!   requests per peer, [`server_max_inflight`](SchedulerConfig::server_max_inflight) at
//!   the server and [`max_inflight_total`](SchedulerConfig::max_inflight_total) in all
//!   (server included), duplicates included.
//! - **Busy window.** New peer requests (not hedges or endgame duplicates) are also held
//!   to a window that a busy answer cuts by a quarter, once per round (answers to
//!   requests sent before the last cut do not cut again), down to twice
//!   `max_inflight_per_peer`, and that each chunk from a peer widens by one, up to
//!   `max_inflight_total`. An agent among peers whose upload slots are all taken asks
//!   for about what they can send instead of replacing every refused request at once:
//!   in a modelled fleet of 1,000, busy answers outnumbered the chunks delivered eleven
//!   to one, and two to one with the window. (Halving, down to `max_inflight_per_peer`,
//!   left uploads idle: 1.51 × the bound instead of 1.15.) A chunk that took half of
//!   `hedge_after` or longer to arrive cuts the window the same way (more is asked than
//!   arrives in time) and does not widen it. A request without progress for half the
//!   hedge delay (below) no longer holds a place: it is presumed stalled at a slow
//!   peer, and must not keep the agent from asking anyone else.
//! - **Peers before the server.** The server is not asked for starved chunks while the
//!   agent's peer requests fill its busy window: an agent busy with peers does not need
//!   the coordinator, and in a large fleet every agent asking about every chunk its
//!   peers do not show yet was most of the coordinator's traffic (in the modelled fleet
//!   of 1,000, with the pacing that follows: 708 k redirects → 18 k). After a redirect
//!   ([`Event::ServerDeferred`]) no starved chunk goes to the server, and no endgame
//!   duplicate either, for half the redirect's wait; hedges of stalled requests still
//!   may.
//! - **Server fallback.** The server is the source of last resort. It is asked for a
//!   chunk only when (a) no connected peer that may serve it has existed for
//!   [`server_fallback_after`](SchedulerConfig::server_fallback_after) (the clock of a
//!   chunk nobody holds at start starts at the first [`Scheduler::handle`]), or at once
//!   when every peer that held it has failed it; (b) as the hedge of a stalled request
//!   (see below) when no other connected peer holds the chunk;
//!   (c) in the endgame, for a chunk whose only request is older than
//!   `server_fallback_after` and no other peer can take it. After
//!   [`Event::ServerBusy`] it is not asked again before `now + retry_after`.
//! - **Endgame.** When every missing chunk is in flight and at most
//!   [`endgame_chunks`](SchedulerConfig::endgame_chunks) are missing, each chunk with a
//!   single request gets a duplicate at another holder with a free slot (or the server,
//!   as above), at most [`endgame_budget_percent`](SchedulerConfig::endgame_budget_percent)
//!   of the content's chunks in one fetch besides those rescued from a slow peer (more
//!   than twice as slow as the agent's peers together, or silent for longer). When a
//!   chunk arrives every other request for it is cancelled.
//! - **Hedging and timeouts.** A chunk whose only request went without progress for
//!   the hedge delay — its peer delivered nothing since it was sent for
//!   `max(hedge_after, 2 × the agent's usual request-to-arrival time)`, or it is
//!   [`STALL_AGE_CAP`] hedge delays old — gets one duplicate at another source; the
//!   endgame duplicates only requests older than twice their peer's usual time; a
//!   chunk never has more than two requests
//!   from hedging or the endgame. A request older than
//!   [`request_timeout`](SchedulerConfig::request_timeout) is cancelled and counts as a
//!   failure.
//! - **Misbehaviour.** A bad chunk bans its peer at once. A failure or timeout is a
//!   strike, and so is losing a race for a chunk after holding its request without
//!   progress for the hedge delay (a stalled or very slow peer: its request never times out
//!   because the hedge's win cancels it first);
//!   [`max_strikes`](SchedulerConfig::max_strikes) strikes ban the peer. A
//!   banned peer's bitfield and requests are forgotten and its later events ignored.
//!   While the server is allowed, a peer that failed a chunk is not asked for that chunk
//!   again; without the server it may be asked again (until its strikes ban it), so
//!   that a chunk only it holds can still complete.
//!
//! Completion: with the server allowed every run completes whatever the peers do (the
//! server is assumed to answer eventually); without it a run completes whenever the
//! honest peers together hold every chunk.
//!
//! # Driver contract
//!
//! - Call `handle(now, Event::Tick)` periodically (every 100 ms is plenty): timeouts,
//!   hedges and fallbacks happen only inside `handle`. `now` must not go backwards.
//! - Answer each [`Action::Request`] with exactly one of [`Event::ChunkArrived`] (after
//!   verifying and writing the chunk), [`Event::ChunkBad`] or [`Event::RequestFailed`]
//!   — or, for a peer out of upload slots, [`Event::PeerBusy`] (no strike; the peer is
//!   left alone for a while), for the server [`Event::ServerBusy`] or
//!   [`Event::ServerDeferred`].
//! - [`Action::Cancel`] voids a request: abort it and drop its answer. A request that
//!   timed out is cancelled this way. [`Event::ServerBusy`] voids every outstanding
//!   server request (each gets a `Cancel`).
//! - [`Action::Ban`] voids every request to that peer (no `Cancel` is sent for them):
//!   disconnect or ignore the peer for this content. No `PeerLeft` is needed for it.
//! - Answers to requests that are not outstanding (never made, cancelled, timed out, or
//!   to a banned peer) are ignored, so a late or unsolicited chunk is never counted.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Debug;
use std::hash::Hash;
use std::ops::Bound;
use std::time::Duration;

use super::bitfield::Bitfield;

/// The knobs of the [`Scheduler`]. Every in-flight set it keeps is bounded by these.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SchedulerConfig {
    /// Most outstanding requests to one peer (default 4).
    pub max_inflight_per_peer: usize,
    /// Most outstanding requests in all, server and duplicates included (default 32).
    pub max_inflight_total: usize,
    /// Most outstanding requests to the server (default 4).
    pub server_max_inflight: usize,
    /// A request older than this has failed: it is cancelled and counts a strike
    /// (default 10 s).
    pub request_timeout: Duration,
    /// A chunk whose only request is older than this gets a duplicate at another source
    /// (default 3 s).
    pub hedge_after: Duration,
    /// When no unrequested chunk is left and at most this many are missing, in-flight
    /// requests are duplicated to other holders (default 8; 0 disables the endgame).
    pub endgame_chunks: u32,
    /// Most endgame duplicates one fetch sends, as a percentage of the content's chunks
    /// (rounded up, at least one; default 3). Under CPU starvation every request looks
    /// overdue and an unbounded endgame sent 8–16 % of a fleet's bytes twice without
    /// finishing sooner. Hedges of stalled requests, and duplicates of requests at a
    /// peer usually more than twice as slow as the agent's peers together, or never
    /// heard from in more than twice their usual time (a slow holder, which the
    /// endgame is for), do not count against it.
    pub endgame_budget_percent: u32,
    /// A missing chunk that no connected peer may serve for this long goes to the server
    /// (default 500 ms).
    pub server_fallback_after: Duration,
    /// Whether the server may be asked at all (default true).
    pub server_allowed: bool,
    /// Failures and timeouts before a peer is banned for this content (default 3).
    pub max_strikes: u32,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            max_inflight_per_peer: 4,
            max_inflight_total: 32,
            server_max_inflight: 4,
            request_timeout: Duration::from_secs(10),
            hedge_after: Duration::from_secs(3),
            endgame_chunks: 8,
            endgame_budget_percent: 3,
            server_fallback_after: Duration::from_millis(500),
            server_allowed: true,
            max_strikes: 3,
        }
    }
}

/// A [`SchedulerConfig`] that would stall or misbehave.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SchedulerConfigError {
    /// A limit is zero, which would never let a request out (or ban on nothing).
    #[error("scheduler setting {key} must be at least 1")]
    Zero {
        /// The offending setting.
        key: &'static str,
    },
    /// The request timeout is zero: every request would time out at once.
    #[error("scheduler setting request_timeout must be longer than zero")]
    ZeroTimeout,
}

/// The endgame duplicates a fetch of `chunks` chunks may send: `percent` of them,
/// rounded up, at least one.
fn endgame_budget(chunks: u32, percent: u32) -> u32 {
    let share = (u64::from(chunks) * u64::from(percent)).div_ceil(100);
    u32::try_from(share).unwrap_or(u32::MAX).max(1)
}

impl SchedulerConfig {
    /// Checks that every limit lets the scheduler make progress.
    ///
    /// [`Scheduler::new`] does not fail on a bad config: it raises zero limits to 1.
    pub fn validate(&self) -> Result<(), SchedulerConfigError> {
        let zero = |key| Err(SchedulerConfigError::Zero { key });
        if self.max_inflight_per_peer == 0 {
            return zero("max_inflight_per_peer");
        }
        if self.max_inflight_total == 0 {
            return zero("max_inflight_total");
        }
        if self.server_allowed && self.server_max_inflight == 0 {
            return zero("server_max_inflight");
        }
        if self.max_strikes == 0 {
            return zero("max_strikes");
        }
        if self.request_timeout.is_zero() {
            return Err(SchedulerConfigError::ZeroTimeout);
        }
        Ok(())
    }

    fn sanitized(mut self) -> Self {
        self.max_inflight_per_peer = self.max_inflight_per_peer.max(1);
        self.max_inflight_total = self.max_inflight_total.max(1);
        self.server_max_inflight = self.server_max_inflight.max(1);
        self.max_strikes = self.max_strikes.max(1);
        self.request_timeout = self.request_timeout.max(Duration::from_millis(1));
        self
    }
}

/// Where a chunk comes from: a peer, or the coordinator.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Source<P> {
    /// A peer, by its key.
    Peer(P),
    /// The coordinator.
    Server,
}

/// What the driver tells the [`Scheduler`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event<P> {
    /// A peer connected for this content, with the chunks it holds (may be empty). For a
    /// peer already connected the bitfield adds to what it announced before. Ignored for
    /// a banned peer; bits at or past the content's chunk count are ignored.
    PeerJoined {
        /// The peer.
        peer: P,
        /// Its chunks.
        have: Bitfield,
    },
    /// A peer disconnected: its requests are void and its chunks no longer count.
    PeerLeft {
        /// The peer.
        peer: P,
    },
    /// A connected peer announced a new chunk.
    Have {
        /// The peer.
        peer: P,
        /// The chunk.
        chunk: u32,
    },
    /// A requested chunk arrived, was verified against the manifest and written.
    ChunkArrived {
        /// Who sent it.
        source: Source<P>,
        /// The chunk.
        chunk: u32,
    },
    /// A chunk failed its BLAKE3 check: a peer is banned for it; the server is retried.
    ChunkBad {
        /// Who sent it.
        source: Source<P>,
        /// The chunk.
        chunk: u32,
    },
    /// A peer refused a request because every upload slot it has is taken: the request
    /// is void, and the peer is not asked for anything before `now + retry_after`, a
    /// pause that doubles with each busy round in a row (see [`BUSY_MAX_DOUBLINGS`]). Not a
    /// failure and no strike: a popular holder is busy, not broken (a swarm where busy
    /// answers counted as strikes banned its best holders in a herd).
    PeerBusy {
        /// The peer.
        peer: P,
        /// The chunk.
        chunk: u32,
        /// How long to leave the peer alone.
        retry_after: Duration,
    },
    /// A request failed (error or refusal); a strike for a peer.
    RequestFailed {
        /// Who was asked.
        source: Source<P>,
        /// The chunk.
        chunk: u32,
    },
    /// The server declined one chunk and pointed at peers ("get it from peers"): its
    /// request for `chunk` is over, and the server is not asked for that chunk again
    /// before `now + retry_after` (other server requests are unaffected).
    ServerDeferred {
        /// The chunk.
        chunk: u32,
        /// How long to leave that chunk to peers.
        retry_after: Duration,
    },
    /// The coordinator refused to serve (busy, or failing): every outstanding server
    /// request is void and the server is not asked again before `now + retry_after`.
    ServerBusy {
        /// How long to leave the server alone.
        retry_after: Duration,
        /// Peers the coordinator suggests. Informational: the driver connects them and
        /// sends [`Event::PeerJoined`] with their bitfields.
        holders: Vec<P>,
    },
    /// Time passed; the time is the `now` argument of [`Scheduler::handle`].
    Tick,
}

/// What the [`Scheduler`] asks the driver to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action<P> {
    /// Ask `source` for `chunk`.
    Request {
        /// Whom to ask.
        source: Source<P>,
        /// The chunk.
        chunk: u32,
    },
    /// Abort the request for `chunk` at `source` and drop its answer.
    Cancel {
        /// Who was asked.
        source: Source<P>,
        /// The chunk.
        chunk: u32,
    },
    /// Disconnect or ignore this peer for this content (bad chunk or too many strikes).
    /// Every request to it is void. Emitted at most once per peer.
    Ban {
        /// The peer.
        peer: P,
        /// Why, for logs.
        reason: String,
    },
    /// Every chunk is here. Emitted exactly once; no action follows it.
    Done,
}

/// Counters of one [`Scheduler`]'s run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SchedulerStats {
    /// Chunks that arrived from peers.
    pub chunks_from_peers: u64,
    /// Chunks that arrived from the server.
    pub chunks_from_server: u64,
    /// Requests sent to peers (duplicates included).
    pub requests_to_peers: u64,
    /// Requests sent to the server (duplicates included).
    pub requests_to_server: u64,
    /// Duplicate requests issued by hedging or the endgame.
    pub duplicates: u64,
    /// Of [`duplicates`](Self::duplicates), those the endgame issued.
    pub endgame_duplicates: u64,
    /// [`Action::Cancel`]s issued (losers of a duplicate race, timeouts, server busy).
    pub cancels: u64,
    /// Peers banned.
    pub bans: u64,
    /// Requests that timed out.
    pub timeouts: u64,
    /// Requests answered with [`Event::RequestFailed`], or a bad chunk from the server.
    pub failures: u64,
    /// [`Event::ServerBusy`] answers received.
    pub server_busy: u64,
    /// [`Event::PeerBusy`] answers received.
    pub peer_busy: u64,
    /// Strikes for losing a race after holding a request without progress for the hedge
    /// delay.
    pub slow_strikes: u64,
    /// Chunks from peers that took half of `hedge_after` or longer (each round of them
    /// cut the busy window).
    pub late_chunks: u64,
}

/// One outstanding request.
#[derive(Debug, Clone)]
struct Outstanding<P> {
    source: Source<P>,
    sent: Duration,
}

/// What the scheduler tracks about one chunk.
#[derive(Debug, Clone)]
struct ChunkSlot<P> {
    /// The random tie-break of the chunk: distinct per chunk, fixed for the run.
    key: u64,
    /// Connected, unbanned peers that announced the chunk and did not fail it.
    eligible: u32,
    /// When `eligible == 0`: when the server may be asked for it.
    ready_at: Duration,
    /// Peers that failed or timed out on this chunk (only while the server is allowed).
    failed: Vec<P>,
}

/// What the scheduler tracks about one connected peer.
#[derive(Debug, Clone)]
struct PeerSlot {
    have: Bitfield,
    inflight: usize,
    /// Not asked before this time (it answered busy).
    busy_until: Duration,
    /// Busy answers since its last chunk: each doubles the pause of the next one.
    busy_streak: u32,
    /// When its last chunk arrived (zero before the first): a peer that delivers is
    /// progressing, and its queued requests are not hedged.
    delivered_at: Duration,
    /// Smoothed time from request to arrival of its chunks (`None` before the first).
    latency: Option<Duration>,
}

/// A peer's pause after a busy answer doubles with each busy answer in a row, up to
/// `2^BUSY_MAX_DOUBLINGS` times the `retry_after` it gave; a chunk from it resets it.
/// In a large swarm most requests to a popular holder find its slots taken; a fixed
/// pause had every agent ask it again every `retry_after`, and busy answers outnumbered
/// chunks 50 to 1.
pub const BUSY_MAX_DOUBLINGS: u32 = 4;

/// A request this many hedge delays old is stalled even at a peer that still delivers
/// other chunks (see `Scheduler::stalled_for`).
pub const STALL_AGE_CAP: u32 = 3;

/// `(eligible holders, random key, chunk)`: the rarest-first order.
type QueueKey = (u32, u64, u32);
/// `(ready_at, random key, chunk)`: the server fallback order.
type StarvedKey = (Duration, u64, u32);

/// The sans-IO swarm scheduler of one content; see the [module docs](self).
///
/// `P` is the peer key (a libp2p `PeerId` in the agent, an index in the simulator).
#[derive(Debug, Clone)]
pub struct Scheduler<P> {
    config: SchedulerConfig,
    have: Bitfield,
    rng: SplitMix64,
    slots: Vec<ChunkSlot<P>>,
    peers: BTreeMap<P, PeerSlot>,
    strikes: BTreeMap<P, u32>,
    banned: BTreeSet<P>,
    /// Outstanding requests by chunk; an entry is never empty.
    outstanding: BTreeMap<u32, Vec<Outstanding<P>>>,
    inflight_total: usize,
    server_inflight: usize,
    /// No outstanding request was sent before this (a lower bound, made exact whenever
    /// the requests are scanned for timeouts and hedges): most calls skip the scans.
    oldest_sent: Duration,
    server_blocked_until: Duration,
    /// No starved chunk goes to the server before this (half a redirect's wait; hedges
    /// and endgame duplicates are not held back: they rescue requests stuck at slow
    /// peers).
    fallback_paced_until: Duration,
    /// Smoothed request-to-arrival time of chunks from all peers (`None` before the
    /// first): what "slow" means for this agent now.
    latency: Option<Duration>,
    /// Most outstanding new peer requests (the busy window).
    window: usize,
    /// When the window was last cut: busy answers to older requests do not cut it again.
    window_cut_at: Duration,
    /// Missing chunks with no request and `eligible > 0` (the rarest-first order is
    /// read from their slots when requests are sent: an announcement only counts).
    queue: Bitfield,
    /// How many chunks `queue` holds.
    queued: u32,
    /// Missing chunks with `eligible == 0`, requested or not.
    starved: BTreeSet<StarvedKey>,
    started: bool,
    done_emitted: bool,
    /// Endgame duplicates this fetch may still send.
    endgame_left: u32,
    stats: SchedulerStats,
}

impl<P: Clone + Eq + Hash + Ord + Debug> Scheduler<P> {
    /// A scheduler for a content of `chunks` chunks of which `have` are already here.
    ///
    /// Zero limits in `config` are raised to 1 (see [`SchedulerConfig::validate`]).
    /// `seed` drives every random choice.
    ///
    /// # Panics
    ///
    /// If `have.len() != chunks`.
    pub fn new(chunks: u32, have: Bitfield, config: SchedulerConfig, seed: u64) -> Self {
        assert_eq!(
            have.len(),
            chunks,
            "the bitfield of chunks already here must cover the {chunks} chunks of the content"
        );
        let mut rng = SplitMix64(seed);
        let key_seed = rng.next_u64();
        let endgame_left = endgame_budget(chunks, config.endgame_budget_percent);
        Self {
            window: config.max_inflight_total.max(1),
            config: config.sanitized(),
            have,
            rng,
            slots: (0..chunks)
                .map(|c| ChunkSlot {
                    key: mix64(key_seed.wrapping_add(u64::from(c).wrapping_mul(SplitMix64::GAMMA))),
                    eligible: 0,
                    ready_at: Duration::ZERO,
                    failed: Vec::new(),
                })
                .collect(),
            peers: BTreeMap::new(),
            strikes: BTreeMap::new(),
            banned: BTreeSet::new(),
            outstanding: BTreeMap::new(),
            inflight_total: 0,
            server_inflight: 0,
            oldest_sent: Duration::ZERO,
            server_blocked_until: Duration::ZERO,
            fallback_paced_until: Duration::ZERO,
            window_cut_at: Duration::ZERO,
            latency: None,
            queue: Bitfield::new(chunks),
            queued: 0,
            starved: BTreeSet::new(),
            started: false,
            done_emitted: false,
            endgame_left,
            stats: SchedulerStats::default(),
        }
    }

    /// Feeds one event at time `now` (monotonic, from an arbitrary origin) and returns
    /// what to do. Expires, hedges and schedules requests on every call.
    pub fn handle(&mut self, now: Duration, event: Event<P>) -> Vec<Action<P>> {
        self.handle_all(now, std::iter::once(event))
    }

    /// Feeds several events that happened at `now`, in order, and schedules once after
    /// the last: what a driver does with a batch of news (one bitfield answer that
    /// announces many chunks, or the answers of every peer polled at once). Scheduling
    /// after each event instead would cost a full pass per event and, for announcements,
    /// hand requests to whichever peer happened to be fed first. Events after the one
    /// that completes the content are ignored.
    pub fn handle_all(
        &mut self,
        now: Duration,
        events: impl IntoIterator<Item = Event<P>>,
    ) -> Vec<Action<P>> {
        let mut out = Vec::new();
        if !self.started {
            self.start(now);
        }
        if self.done_emitted {
            return out;
        }
        if self.have.is_full() {
            self.finish(&mut out);
            return out;
        }
        for event in events {
            self.apply(now, event, &mut out);
            if self.done_emitted {
                return out;
            }
        }
        self.expire(now, &mut out);
        self.schedule(now, &mut out);
        out
    }

    fn apply(&mut self, now: Duration, event: Event<P>, out: &mut Vec<Action<P>>) {
        match event {
            Event::PeerJoined { peer, have } => self.peer_joined(peer, &have),
            Event::PeerLeft { peer } => {
                self.remove_peer(now, &peer);
            }
            Event::Have { peer, chunk } => self.announce(&peer, chunk),
            Event::ChunkArrived { source, chunk } => self.chunk_arrived(now, source, chunk, out),
            Event::ChunkBad { source, chunk } => self.chunk_bad(now, source, chunk, out),
            Event::PeerBusy {
                peer,
                chunk,
                retry_after,
            } => {
                if let Some(sent) = self.drop_request(chunk, &Source::Peer(peer.clone())) {
                    self.stats.peer_busy += 1;
                    self.narrow_window(sent, now);
                    // Answers to requests sent before the current pause are one round.
                    if let Some(slot) = self.peers.get_mut(&peer)
                        && slot.busy_until <= now
                    {
                        let pause = retry_after.saturating_mul(1 << slot.busy_streak);
                        slot.busy_streak = (slot.busy_streak + 1).min(BUSY_MAX_DOUBLINGS);
                        slot.busy_until = now.saturating_add(pause);
                    }
                }
            }
            Event::RequestFailed { source, chunk } => {
                if self.drop_request(chunk, &source).is_some() {
                    self.stats.failures += 1;
                    if let Source::Peer(peer) = source {
                        self.strike(now, peer, chunk, out);
                    }
                }
            }
            Event::ServerBusy { retry_after, .. } => self.server_busy(now, retry_after, out),
            Event::ServerDeferred { chunk, retry_after } => {
                self.server_deferred(now, chunk, retry_after)
            }
            Event::Tick => {}
        }
    }

    /// The chunks already here.
    pub fn have(&self) -> &Bitfield {
        &self.have
    }

    /// Whether every chunk is here.
    pub fn is_done(&self) -> bool {
        self.have.is_full()
    }

    /// Outstanding requests, server and duplicates included.
    pub fn inflight(&self) -> usize {
        self.inflight_total
    }

    /// Counters of this run.
    pub fn stats(&self) -> SchedulerStats {
        self.stats
    }

    /// The configuration in effect (zero limits raised to 1).
    pub fn config(&self) -> &SchedulerConfig {
        &self.config
    }

    /// The busy window: most new peer requests outstanding at once (see the module docs).
    pub fn peer_window(&self) -> usize {
        self.window
    }

    /// Whether `peer` is banned for this content.
    pub fn is_banned(&self, peer: &P) -> bool {
        self.banned.contains(peer)
    }

    // ----- events -------------------------------------------------------------------

    /// First call: every missing chunk has no holder yet; its fallback clock starts now.
    fn start(&mut self, now: Duration) {
        self.started = true;
        let ready_at = now.saturating_add(self.config.server_fallback_after);
        for c in self.have.iter_missing() {
            self.slots[c as usize].ready_at = ready_at;
            self.starved.insert((ready_at, self.chunk_key(c), c));
        }
    }

    fn finish(&mut self, out: &mut Vec<Action<P>>) {
        if !self.done_emitted {
            self.done_emitted = true;
            out.push(Action::Done);
        }
    }

    fn peer_joined(&mut self, peer: P, have: &Bitfield) {
        if self.banned.contains(&peer) {
            return;
        }
        let chunks = self.chunks();
        self.peers.entry(peer.clone()).or_insert_with(|| PeerSlot {
            have: Bitfield::new(chunks),
            inflight: 0,
            busy_until: Duration::ZERO,
            busy_streak: 0,
            delivered_at: Duration::ZERO,
            latency: None,
        });
        for c in have.iter_set().take_while(|&c| c < chunks) {
            self.announce(&peer, c);
        }
    }

    /// A connected peer holds chunk `c`.
    fn announce(&mut self, peer: &P, c: u32) {
        if c >= self.chunks() {
            return;
        }
        let Some(slot) = self.peers.get_mut(peer) else {
            return;
        };
        if !slot.have.set(c) || self.have.get(c) || self.slots[c as usize].failed.contains(peer) {
            return;
        }
        self.detach(c);
        self.slots[c as usize].eligible += 1;
        self.attach(c);
    }

    /// Forgets a peer: its requests are void and its chunks no longer count.
    fn remove_peer(&mut self, now: Duration, peer: &P) {
        let Some(slot) = self.peers.remove(peer) else {
            return;
        };
        let theirs: Vec<u32> = self
            .outstanding
            .iter()
            .filter(|(_, reqs)| reqs.iter().any(|r| is_peer(&r.source, peer)))
            .map(|(&c, _)| c)
            .collect();
        for c in theirs {
            self.drop_request(c, &Source::Peer(peer.clone()));
        }
        for c in slot.have.iter_set() {
            if !self.have.get(c) && !self.slots[c as usize].failed.contains(peer) {
                self.lose_eligible(now, c);
            }
        }
    }

    fn chunk_arrived(
        &mut self,
        now: Duration,
        source: Source<P>,
        c: u32,
        out: &mut Vec<Action<P>>,
    ) {
        if self.have.get(c) || !self.has_request(c, &source) {
            return;
        }
        self.detach(c);
        self.have.set(c);
        let reqs = self.outstanding.remove(&c).unwrap_or_default();
        let mut slow = Vec::new();
        let mut sent_at = now;
        for r in reqs {
            self.release(&r.source);
            if r.source == source {
                sent_at = r.sent;
            } else {
                if let Source::Peer(peer) = &r.source
                    && self.stalled_for(now, &r) >= self.hedge_delay()
                {
                    slow.push(peer.clone());
                }
                self.stats.cancels += 1;
                out.push(Action::Cancel {
                    source: r.source,
                    chunk: c,
                });
            }
        }
        self.slots[c as usize].failed = Vec::new();
        match source {
            Source::Peer(peer) => {
                let took = now.saturating_sub(sent_at);
                if let Some(slot) = self.peers.get_mut(&peer) {
                    slot.busy_streak = 0;
                    slot.delivered_at = now;
                    slot.latency = Some(smoothed(slot.latency, took, 4));
                }
                self.latency = Some(smoothed(self.latency, took, 8));
                if took >= self.config.hedge_after / 2 {
                    // Late: more is asked than arrives in time (an agent short of CPU or
                    // bandwidth). A quarter off the window, once per round, as for a
                    // busy answer; a late chunk never widens it.
                    self.stats.late_chunks += 1;
                    self.narrow_window(sent_at, now);
                } else {
                    self.window = (self.window + 1).min(self.config.max_inflight_total);
                }
                self.stats.chunks_from_peers += 1;
            }
            Source::Server => self.stats.chunks_from_server += 1,
        }
        if self.have.is_full() {
            self.finish(out);
            return;
        }
        // A peer that sat on the chunk for `hedge_after` and lost the race to another
        // source: a strike. Without it a peer that stalls mid-chunk (slowloris) was never
        // banned — its request was always cancelled by the hedge's win before it could
        // time out — and kept a share of the in-flight slots for the whole fetch.
        for peer in slow {
            self.stats.slow_strikes += 1;
            self.strike(now, peer, c, out);
        }
    }

    fn chunk_bad(&mut self, now: Duration, source: Source<P>, c: u32, out: &mut Vec<Action<P>>) {
        match source {
            Source::Peer(peer) => {
                if !self.banned.contains(&peer) {
                    let reason = format!("sent chunk {c}, which failed its BLAKE3 check");
                    self.ban(now, peer, reason, out);
                }
            }
            Source::Server => {
                if self.drop_request(c, &Source::Server).is_some() {
                    self.stats.failures += 1;
                }
            }
        }
    }

    fn server_busy(&mut self, now: Duration, retry_after: Duration, out: &mut Vec<Action<P>>) {
        self.stats.server_busy += 1;
        self.server_blocked_until = self
            .server_blocked_until
            .max(now.saturating_add(retry_after));
        let at_server: Vec<u32> = self
            .outstanding
            .iter()
            .filter(|(_, reqs)| reqs.iter().any(|r| r.source == Source::Server))
            .map(|(&c, _)| c)
            .collect();
        for c in at_server {
            self.drop_request(c, &Source::Server);
            self.stats.cancels += 1;
            out.push(Action::Cancel {
                source: Source::Server,
                chunk: c,
            });
        }
    }

    fn server_deferred(&mut self, now: Duration, c: u32, retry_after: Duration) {
        self.stats.server_busy += 1;
        self.fallback_paced_until = self
            .fallback_paced_until
            .max(now.saturating_add(retry_after / 2));
        if c as usize >= self.slots.len() || self.have.get(c) {
            return;
        }
        self.drop_request(c, &Source::Server);
        self.detach(c);
        let slot = &mut self.slots[c as usize];
        slot.ready_at = slot.ready_at.max(now.saturating_add(retry_after));
        self.attach(c);
    }

    /// A failure or timeout of `peer` on chunk `c`: exclude it for `c` (while the server
    /// is allowed), count a strike, ban at `max_strikes`.
    fn strike(&mut self, now: Duration, peer: P, c: u32, out: &mut Vec<Action<P>>) {
        if self.banned.contains(&peer) {
            return;
        }
        if self.config.server_allowed
            && !self.have.get(c)
            && !self.slots[c as usize].failed.contains(&peer)
        {
            self.slots[c as usize].failed.push(peer.clone());
            if self.peers.get(&peer).is_some_and(|s| s.have.get(c)) {
                self.lose_eligible(now, c);
            }
        }
        let strikes = self.strikes.entry(peer.clone()).or_insert(0);
        *strikes += 1;
        if *strikes >= self.config.max_strikes {
            let reason = format!("{strikes} failed or timed-out requests");
            self.ban(now, peer, reason, out);
        }
    }

    fn ban(&mut self, now: Duration, peer: P, reason: String, out: &mut Vec<Action<P>>) {
        if !self.banned.insert(peer.clone()) {
            return;
        }
        self.remove_peer(now, &peer);
        self.stats.bans += 1;
        out.push(Action::Ban { peer, reason });
    }

    // ----- time ---------------------------------------------------------------------

    /// Cancels every request older than `request_timeout` and counts it as a failure.
    fn expire(&mut self, now: Duration, out: &mut Vec<Action<P>>) {
        let timeout = self.config.request_timeout;
        if now.saturating_sub(self.oldest_sent) < timeout {
            return;
        }
        let expired: Vec<(u32, Source<P>)> = self
            .outstanding
            .iter()
            .flat_map(|(&c, reqs)| {
                reqs.iter()
                    .filter(move |r| now.saturating_sub(r.sent) >= timeout)
                    .map(move |r| (c, r.source.clone()))
            })
            .collect();
        for (c, source) in expired {
            // A ban earlier in this loop may already have voided it.
            if self.drop_request(c, &source).is_none() {
                continue;
            }
            self.stats.timeouts += 1;
            self.stats.cancels += 1;
            out.push(Action::Cancel {
                source: source.clone(),
                chunk: c,
            });
            if let Source::Peer(peer) = source {
                self.strike(now, peer, c, out);
            }
        }
        self.rescan_oldest(now);
    }

    fn schedule(&mut self, now: Duration, out: &mut Vec<Action<P>>) {
        self.hedge(now, out);
        self.fill_from_peers(now, out);
        self.fill_from_server(now, out);
        self.endgame(now, out);
    }

    /// A chunk whose only request went without progress for the hedge delay gets a
    /// duplicate.
    fn hedge(&mut self, now: Duration, out: &mut Vec<Action<P>>) {
        let hedge_after = self.hedge_delay();
        if now.saturating_sub(self.oldest_sent) < hedge_after {
            return;
        }
        let stalled: Vec<u32> = self
            .outstanding
            .iter()
            .filter(|(_, reqs)| reqs.len() == 1 && self.stalled_for(now, &reqs[0]) >= hedge_after)
            .map(|(&c, _)| c)
            .collect();
        for c in stalled {
            if self.inflight_total >= self.config.max_inflight_total {
                break;
            }
            // The coordinator takes the hedge only of a chunk no other peer holds: when
            // others do but are busy, the swarm will serve it, and in a starved fleet
            // hedges sent to the coordinator made its egress 2 copies.
            let server_ok = self.slots[c as usize].eligible <= 1;
            self.duplicate(now, c, server_ok, out);
        }
        self.rescan_oldest(now);
    }

    /// Makes `oldest_sent` exact again after a scan.
    fn rescan_oldest(&mut self, now: Duration) {
        self.oldest_sent = self
            .outstanding
            .values()
            .flatten()
            .map(|r| r.sent)
            .min()
            .unwrap_or(now);
    }

    /// Rarest first: requests unrequested chunks from holders with free slots.
    fn fill_from_peers(&mut self, now: Duration, out: &mut Vec<Action<P>>) {
        let per_peer = self.config.max_inflight_per_peer;
        let window = self.peer_window();
        let mut used = self.window_used(now);
        if self.inflight_total >= self.config.max_inflight_total
            || used >= window
            || self.queued == 0
        {
            return;
        }
        // The chunks some free peer holds: the others are skipped without a search.
        let mut offered = vec![0u64; self.slots.len().div_ceil(64)];
        let mut free_peers = 0;
        for slot in self.peers.values() {
            if slot.inflight < per_peer && slot.busy_until <= now {
                free_peers += 1;
                slot.have.or_into(&mut offered);
            }
        }
        if free_peers == 0 {
            return;
        }
        // Rarest first among the chunks some free peer holds; requesting a chunk only
        // takes that chunk out of the queue, so the order read up front stays valid. The
        // order is sorted in slices of what the limits still allow (most calls send one
        // or two requests).
        let mut order: Vec<QueueKey> = self
            .queue
            .iter_set()
            .filter(|&c| offered[c as usize / 64] >> (c % 64) & 1 == 1)
            .map(|c| {
                let slot = &self.slots[c as usize];
                (slot.eligible, slot.key, c)
            })
            .collect();
        let mut next = 0;
        while next < order.len() {
            let budget = (self
                .config
                .max_inflight_total
                .saturating_sub(self.inflight_total))
            .min(window.saturating_sub(used));
            if free_peers == 0 || budget == 0 {
                break;
            }
            let end = (next + budget).min(order.len());
            if end < order.len() {
                order[next..].select_nth_unstable(end - next - 1);
            }
            order[next..end].sort_unstable();
            for &(_, _, c) in &order[next..end] {
                if free_peers == 0
                    || self.inflight_total >= self.config.max_inflight_total
                    || used >= window
                {
                    break;
                }
                if let Some(peer) = self.pick_peer(now, c) {
                    if self.peers[&peer].inflight + 1 == per_peer {
                        free_peers -= 1;
                    }
                    self.request(now, c, Source::Peer(peer), out);
                    used += 1;
                }
            }
            next = end;
        }
    }

    /// Chunks no peer may serve, once their fallback clock has run out.
    fn fill_from_server(&mut self, now: Duration, out: &mut Vec<Action<P>>) {
        if now < self.fallback_paced_until || self.window_used(now) >= self.peer_window() {
            return;
        }
        let mut cursor: Option<StarvedKey> = None;
        while self.server_available(now) && self.inflight_total < self.config.max_inflight_total {
            let next = match cursor {
                None => self.starved.first().copied(),
                Some(k) => self
                    .starved
                    .range((Bound::Excluded(k), Bound::Unbounded))
                    .next()
                    .copied(),
            };
            let Some(key) = next else { break };
            if key.0 > now {
                break;
            }
            cursor = Some(key);
            let c = key.2;
            if !self.outstanding.contains_key(&c) {
                self.request(now, c, Source::Server, out);
            }
        }
    }

    /// Every missing chunk in flight and few missing: duplicate single requests.
    fn endgame(&mut self, now: Duration, out: &mut Vec<Action<P>>) {
        let missing = self.have.missing();
        if missing == 0 || missing > self.config.endgame_chunks || self.queued > 0 {
            return;
        }
        let missing: Vec<u32> = self.have.iter_missing().collect();
        if missing.iter().any(|c| !self.outstanding.contains_key(c)) {
            return;
        }
        for c in missing {
            if self.inflight_total >= self.config.max_inflight_total {
                break;
            }
            let reqs = &self.outstanding[&c];
            if reqs.len() != 1 {
                continue;
            }
            let age = now.saturating_sub(reqs[0].sent);
            // Only a request that takes longer than its peer usually does: one on its
            // way is left to finish (the duplicates of an endgame that raced every
            // request were a quarter of a 32-chunk plugin's bytes). A request at a peer
            // that is slow for this agent — usually more than twice as slow as its peers
            // together, or never heard from and holding the request over twice their
            // usual time — is rescued outside the budget: that is the slow holder the
            // endgame is for, whereas on a uniformly slow (CPU-starved) fleet a
            // duplicate only races an equal.
            let agent = self.latency;
            let (overdue, slow_peer) = match &reqs[0].source {
                Source::Peer(peer) => {
                    let own = self.peers.get(peer).and_then(|slot| slot.latency);
                    let overdue = own
                        .map(|l| l.max(agent.unwrap_or_default()))
                        .is_none_or(|usual| age >= usual * 2);
                    let slow = match (own, agent) {
                        (Some(o), Some(a)) => o > a * 2,
                        (None, Some(a)) => age > a * 2,
                        _ => false,
                    };
                    (overdue, slow)
                }
                Source::Server => (true, false),
            };
            if overdue && (slow_peer || self.endgame_left > 0) {
                let late =
                    age >= self.config.server_fallback_after && now >= self.fallback_paced_until;
                if self.duplicate(now, c, late, out) {
                    self.stats.endgame_duplicates += 1;
                    if !slow_peer {
                        self.endgame_left -= 1;
                    }
                }
            }
        }
    }

    // ----- requests -----------------------------------------------------------------

    /// A second request for `c` at another holder, else (if `server_ok`) the server;
    /// whether one was sent.
    fn duplicate(
        &mut self,
        now: Duration,
        c: u32,
        server_ok: bool,
        out: &mut Vec<Action<P>>,
    ) -> bool {
        if self.inflight_total >= self.config.max_inflight_total {
            return false;
        }
        let source = match self.pick_peer(now, c) {
            Some(peer) => Source::Peer(peer),
            None if server_ok
                && self.server_available(now)
                && !self.has_request(c, &Source::Server) =>
            {
                Source::Server
            }
            None => return false,
        };
        self.stats.duplicates += 1;
        self.request(now, c, source, out);
        true
    }

    /// The least-loaded connected peer that announced `c`, did not fail it, has a free
    /// slot and is not already asked for `c`; random among equals.
    fn pick_peer(&mut self, now: Duration, c: u32) -> Option<P> {
        let per_peer = self.config.max_inflight_per_peer;
        let failed = &self.slots[c as usize].failed;
        let asked = self.outstanding.get(&c);
        let mut best: Option<(&P, usize)> = None;
        let mut ties = 0u64;
        for (peer, slot) in &self.peers {
            if slot.inflight >= per_peer
                || slot.busy_until > now
                || !slot.have.get(c)
                || failed.contains(peer)
                || asked.is_some_and(|reqs| reqs.iter().any(|r| is_peer(&r.source, peer)))
            {
                continue;
            }
            match best {
                Some((_, load)) if slot.inflight > load => {}
                Some((_, load)) if slot.inflight == load => {
                    ties += 1;
                    if self.rng.below(ties) == 0 {
                        best = Some((peer, load));
                    }
                }
                _ => {
                    best = Some((peer, slot.inflight));
                    ties = 1;
                }
            }
        }
        best.map(|(peer, _)| peer.clone())
    }

    fn request(&mut self, now: Duration, c: u32, source: Source<P>, out: &mut Vec<Action<P>>) {
        if self.inflight_total == 0 {
            self.oldest_sent = now;
        }
        self.detach(c);
        self.outstanding.entry(c).or_default().push(Outstanding {
            source: source.clone(),
            sent: now,
        });
        self.attach(c);
        self.inflight_total += 1;
        match &source {
            Source::Peer(peer) => {
                if let Some(slot) = self.peers.get_mut(peer) {
                    slot.inflight += 1;
                }
                self.stats.requests_to_peers += 1;
            }
            Source::Server => {
                self.server_inflight += 1;
                self.stats.requests_to_server += 1;
            }
        }
        out.push(Action::Request { source, chunk: c });
    }

    /// Removes the outstanding request for `c` at `source`; returns when it was sent.
    fn drop_request(&mut self, c: u32, source: &Source<P>) -> Option<Duration> {
        let reqs = self.outstanding.get(&c)?;
        let i = reqs.iter().position(|r| &r.source == source)?;
        self.detach(c);
        let reqs = self.outstanding.get_mut(&c)?;
        let sent = reqs.swap_remove(i).sent;
        if reqs.is_empty() {
            self.outstanding.remove(&c);
        }
        self.attach(c);
        self.release(source);
        Some(sent)
    }

    fn release(&mut self, source: &Source<P>) {
        self.inflight_total -= 1;
        match source {
            Source::Peer(peer) => {
                if let Some(slot) = self.peers.get_mut(peer) {
                    slot.inflight -= 1;
                }
            }
            Source::Server => self.server_inflight -= 1,
        }
    }

    /// Cuts the busy window by a quarter, down to two peers' worth of requests, for an
    /// answer (busy, or a late chunk) to a request sent at `sent`: answers to requests
    /// sent before the last cut are the same round and do not cut again.
    fn narrow_window(&mut self, sent: Duration, now: Duration) {
        if sent >= self.window_cut_at {
            let floor = 2 * self.config.max_inflight_per_peer;
            self.window = (self.window * 3 / 4).max(floor).min(self.window);
            self.window_cut_at = now;
        }
    }

    /// Outstanding peer requests that hold a place in the busy window: all but those
    /// without progress for half the hedge delay (see [`Self::stalled_for`]). Those are
    /// presumed stalled (a slow or overloaded peer; they are hedged at the hedge delay):
    /// with a window cut down by busy answers, a few requests stuck at slow peers
    /// otherwise kept an agent from asking anyone else (the slow-peers scenario went
    /// from 6 to 61 x its bound). Requests at peers that keep delivering still count:
    /// when every request was slow (an agent short of CPU), letting the old ones out of
    /// the window filled it again and again, and more was asked than could arrive
    /// before the host's request timeout.
    fn window_used(&mut self, now: Duration) -> usize {
        let stalled = self.hedge_delay() / 2;
        if now.saturating_sub(self.oldest_sent) >= stalled {
            self.rescan_oldest(now);
        }
        if now.saturating_sub(self.oldest_sent) < stalled {
            return self.inflight_total - self.server_inflight;
        }
        self.outstanding
            .values()
            .flatten()
            .filter(|r| matches!(r.source, Source::Peer(_)) && self.stalled_for(now, r) < stalled)
            .count()
    }

    /// How long a request goes without progress before it is hedged: `hedge_after`, or
    /// twice the usual request-to-arrival time of this agent's chunks when that is
    /// longer. When every chunk is slow (an agent, or a whole machine, short of CPU)
    /// no peer is slower than the rest, and a duplicate only adds to the load: in a
    /// CPU-starved fleet of 64 agents hedges and endgame duplicates were most of the
    /// requests, and the coordinator served 2.3 copies.
    fn hedge_delay(&self) -> Duration {
        let usual = self.latency.map_or(Duration::ZERO, |l| l.saturating_mul(2));
        self.config.hedge_after.max(usual)
    }

    /// How long request `r` has gone without progress: since it was sent, or since its
    /// peer last delivered a chunk, whichever is later — a peer that keeps delivering is
    /// working through a queue, not stalled, and hedging its queued requests only sent
    /// every chunk twice to CPU-starved fleets (a quarter of the bytes in fleet (c)). A
    /// request older than [`STALL_AGE_CAP`] hedge delays counts as stalled however
    /// its peer progresses, so a peer that trickles one chunk and sits on the others is
    /// still routed around.
    fn stalled_for(&self, now: Duration, r: &Outstanding<P>) -> Duration {
        let age = now.saturating_sub(r.sent);
        let Source::Peer(peer) = &r.source else {
            return age;
        };
        if age >= self.hedge_delay().saturating_mul(STALL_AGE_CAP) {
            return age;
        }
        let since = self
            .peers
            .get(peer)
            .map_or(r.sent, |slot| slot.delivered_at.max(r.sent));
        now.saturating_sub(since)
    }

    fn has_request(&self, c: u32, source: &Source<P>) -> bool {
        self.outstanding
            .get(&c)
            .is_some_and(|reqs| reqs.iter().any(|r| &r.source == source))
    }

    fn server_available(&self, now: Duration) -> bool {
        self.config.server_allowed
            && now >= self.server_blocked_until
            && self.server_inflight < self.config.server_max_inflight
    }

    // ----- the rarest-first and fallback sets ---------------------------------------

    /// One fewer peer may serve missing chunk `c`; when none is left its fallback clock
    /// starts (already run out if some peer failed it).
    fn lose_eligible(&mut self, now: Duration, c: u32) {
        self.detach(c);
        let slot = &mut self.slots[c as usize];
        slot.eligible -= 1;
        if slot.eligible == 0 {
            slot.ready_at = if slot.failed.is_empty() {
                now.saturating_add(self.config.server_fallback_after)
            } else {
                now
            };
        }
        self.attach(c);
    }

    /// Takes missing chunk `c` out of `queue`/`starved` before its state changes.
    fn detach(&mut self, c: u32) {
        if !self.started || self.have.get(c) {
            return;
        }
        let key = self.chunk_key(c);
        let slot = &self.slots[c as usize];
        if slot.eligible == 0 {
            let removed = self.starved.remove(&(slot.ready_at, key, c));
            debug_assert!(removed, "chunk {c} missing from the starved set");
        } else if !self.outstanding.contains_key(&c) {
            let removed = self.queue.clear(c);
            debug_assert!(removed, "chunk {c} missing from the queue");
            self.queued -= 1;
        }
    }

    /// Puts missing chunk `c` back into `queue`/`starved` after its state changed.
    fn attach(&mut self, c: u32) {
        if !self.started || self.have.get(c) {
            return;
        }
        let key = self.chunk_key(c);
        let slot = &self.slots[c as usize];
        if slot.eligible == 0 {
            let inserted = self.starved.insert((slot.ready_at, key, c));
            debug_assert!(inserted, "chunk {c} already in the starved set");
        } else if !self.outstanding.contains_key(&c) {
            let inserted = self.queue.set(c);
            debug_assert!(inserted, "chunk {c} already in the queue");
            self.queued += 1;
        }
    }

    /// The random tie-break of chunk `c`: distinct per chunk, fixed for the run.
    fn chunk_key(&self, c: u32) -> u64 {
        self.slots[c as usize].key
    }

    fn chunks(&self) -> u32 {
        self.have.len()
    }
}

fn is_peer<P: PartialEq>(source: &Source<P>, peer: &P) -> bool {
    matches!(source, Source::Peer(p) if p == peer)
}

/// SplitMix64 (Steele, Lea, Flood 2014): small, fast, and good enough for tie-breaks.
#[derive(Debug, Clone)]
struct SplitMix64(u64);

impl SplitMix64 {
    const GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;

    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(Self::GAMMA);
        mix64(self.0)
    }

    /// Uniform in `0..n` (Lemire's multiply-shift; `n > 0`).
    fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }
}

/// An exponentially weighted mean with `1/weight` for the newest `sample`; the first
/// sample is the mean.
fn smoothed(mean: Option<Duration>, sample: Duration, weight: u32) -> Duration {
    match mean {
        Some(mean) => (mean * (weight - 1) + sample) / weight,
        None => sample,
    }
}

/// The SplitMix64 finaliser: a bijection on `u64`.
fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests;
