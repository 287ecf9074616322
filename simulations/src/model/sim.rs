//! The event loop of the model; see the [module docs](super) for what it models.

use std::cmp::Ordering;
use std::collections::{BinaryHeap, VecDeque};
use std::time::{Duration, Instant};

use arcade_coordinator::herd::{Admission, Herd};
use arcade_p2p::ContentId;
use arcade_p2p::mesh::bitfield::Bitfield;
use arcade_p2p::mesh::scheduler::{Action, Event, Scheduler, SchedulerConfig, Source};

use super::{ChunkSource, ModelOptions, ModelRun, ModelStats, PeerBusy};
use crate::report::{AgentOutcome, FleetReport, cpu_seconds};
use crate::scenario::Scenario;

/// The coordinator, where an agent index would be.
const SERVER: u32 = u32::MAX;
/// A chunk not (yet) received, in a run's source table.
const MISSING: u32 = u32::MAX - 1;
/// No time at all.
const NEVER: u64 = u64::MAX;
/// An agent that does not answer bitfield queries (not started, or gone).
const NO_ANSWER: u32 = u32::MAX;

#[derive(Debug, Clone, Copy)]
enum Ev {
    /// An agent starts: hints, fetches, timers.
    Start(u32),
    /// An agent leaves (churn).
    Leave(u32),
    /// The agent's 200 ms scheduler tick.
    Tick(u32),
    /// The agent's bitfield polls of every connected peer (`periodic`: the 250 ms timer).
    Refresh { agent: u32, periodic: bool },
    /// The answer to the first bitfield query of one newly connected peer.
    Poll { agent: u32, edge: u32 },
    /// A chunk request reaches a peer.
    PeerReq(u32),
    /// A peer's busy refusal reaches the requester.
    Refused(u32),
    /// The requester asks a busy peer again ([`PeerBusy::Retry`]).
    Resend(u32),
    /// The last byte of a transfer left its uplink.
    UpDone(u32),
    /// A chunk reaches its requester.
    Arrive(u32),
    /// A chunk request reaches the coordinator.
    ServerReq(u32),
    /// The coordinator gets to a queued chunk request (`server_rpc_cost`).
    ServerHandle(u32),
    /// The coordinator's redirect or busy answer reaches the requester.
    ServerReply(u32),
    /// An agent learns that a connected peer is gone.
    PeerGone { agent: u32, peer: u32 },
}

/// A queued event: earliest time first, then insertion order.
struct Entry {
    t: u64,
    seq: u64,
    ev: Ev,
}

impl PartialEq for Entry {
    fn eq(&self, other: &Self) -> bool {
        (self.t, self.seq) == (other.t, other.seq)
    }
}
impl Eq for Entry {}
impl PartialOrd for Entry {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Entry {
    /// Reversed, so that `BinaryHeap` pops the earliest.
    fn cmp(&self, other: &Self) -> Ordering {
        (other.t, other.seq).cmp(&(self.t, self.seq))
    }
}

/// The event queue: a calendar of ~1 ms buckets over a ~4 s horizon, each sorted (a
/// binary heap) only when it becomes current, and a heap for events beyond the horizon.
/// Pops in exact `(time, sequence)` order, like one binary heap, but the heap it works
/// in holds one millisecond of events, not all of them.
struct Queue {
    buckets: Vec<Vec<Entry>>,
    /// The absolute index (`t >> SHIFT`) of the current bucket.
    cur: u64,
    current: BinaryHeap<Entry>,
    far: BinaryHeap<Entry>,
    /// Entries in `buckets`.
    ring: usize,
}

impl Queue {
    /// Bucket width: 2^20 ns ≈ 1 ms.
    const SHIFT: u32 = 20;
    /// Buckets in the ring (a power of two): ≈ 4.4 s ahead.
    const SLOTS: u64 = 4096;

    fn new() -> Self {
        Self {
            buckets: (0..Self::SLOTS).map(|_| Vec::new()).collect(),
            cur: 0,
            current: BinaryHeap::new(),
            far: BinaryHeap::new(),
            ring: 0,
        }
    }

    fn push(&mut self, e: Entry) {
        let b = e.t >> Self::SHIFT;
        if b <= self.cur {
            self.current.push(e);
        } else if b < self.cur + Self::SLOTS {
            self.buckets[(b & (Self::SLOTS - 1)) as usize].push(e);
            self.ring += 1;
        } else {
            self.far.push(e);
        }
    }

    fn pop(&mut self) -> Option<Entry> {
        loop {
            if let Some(e) = self.current.pop() {
                return Some(e);
            }
            if self.ring == 0 {
                // Jump to the next far event.
                let t = self.far.peek()?.t;
                self.cur = (t >> Self::SHIFT).max(self.cur + 1);
            } else {
                self.cur += 1;
            }
            while self
                .far
                .peek()
                .is_some_and(|e| e.t >> Self::SHIFT < self.cur + Self::SLOTS)
            {
                let e = self.far.pop().expect("peeked");
                self.push(e);
            }
            let bucket = &mut self.buckets[(self.cur & (Self::SLOTS - 1)) as usize];
            self.ring -= bucket.len();
            self.current.extend(bucket.drain(..));
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reply {
    Deferred(Duration),
    Busy,
}

/// One chunk request and, if admitted, its transfer. Lives in a slab; exactly one event
/// refers to it at any time, and the last one frees it.
#[derive(Debug)]
struct Transfer {
    from: u32,
    to: u32,
    plugin: u32,
    chunk: u32,
    bytes: u64,
    /// When its first byte left the uplink.
    up_start: u64,
    /// When the sender learns it was cancelled.
    cancel_at: u64,
    /// A peer took it into an upload slot.
    admitted: bool,
    /// When the uploader's limiter lets the chunk go (its slot is released then): a
    /// cancel that reaches the uploader before this withdraws it.
    slot_release: u64,
    /// Withdrawn by a cancel before it was sent: nothing is sent or delivered.
    withdrawn: bool,
    reply: Reply,
    /// Holders named by a redirect.
    holders: Vec<u32>,
}

/// What one fetch was told about one connected peer.
#[derive(Debug, Clone, Copy, Default)]
struct View {
    joined: bool,
    /// Banned by the scheduler, or gone: not polled any more.
    closed: bool,
    /// How many of the peer's chunks (its arrival log) were announced.
    seen: u32,
}

/// An outstanding request of one fetch: the driver's `inflight` map.
#[derive(Debug, Clone, Copy)]
struct Outstanding {
    src: u32,
    chunk: u32,
    tid: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RunState {
    Waiting,
    Active,
    Done,
}

/// One agent's fetch of one plugin.
struct Run {
    state: RunState,
    sched: Option<Scheduler<u32>>,
    outstanding: Vec<Outstanding>,
    /// Per connected peer, aligned with the agent's `neigh` while active.
    views: Vec<View>,
    /// Chunks held, in arrival order (what a bitfield poll reads).
    log: Vec<u32>,
    /// Per chunk: `SERVER`, the sending agent, or `MISSING`.
    src: Vec<u32>,
    /// A chunk was counted twice (never, unless the model is wrong).
    double: bool,
}

struct Agent {
    up_ns_per_byte: f64,
    down_ns_per_byte: f64,
    lat: u64,
    start: u64,
    started: bool,
    left_at: Option<u64>,
    neigh: Vec<u32>,
    conns: usize,
    up_free: u64,
    /// When each taken upload slot is released (the limiter lets its chunk go).
    slots: Vec<u64>,
    down_free: u64,
    runs: Vec<Run>,
    next_run: usize,
    active: usize,
    done_at: Option<u64>,
    /// Completed or left: no longer counted as unfinished.
    finished: bool,
    peer_bytes: u64,
    server_bytes: u64,
    uploaded_bytes: u64,
}

struct Plugin {
    chunks: u32,
    size: u64,
    content: ContentId,
}

pub(super) struct Sim<'a> {
    scenario: &'a Scenario,
    opts: &'a ModelOptions,
    p2p: bool,
    chunk_bytes: u64,
    plugins: Vec<Plugin>,
    agents: Vec<Agent>,
    /// Per agent and plugin (`agent × plugins + plugin`): the chunks a bitfield query
    /// would list (its arrival log's length), or `NO_ANSWER`.
    answers: Vec<u32>,
    names: Vec<String>,
    /// Agent indices by start time.
    by_start: Vec<u32>,
    server_ns_per_byte: f64,
    server_lat: u64,
    server_queue: VecDeque<u32>,
    server_sending: bool,
    /// When the coordinator has handled every request that reached it.
    server_cpu_free: u64,
    /// Streams queued or sending.
    streams: usize,
    herd: Herd,
    base: Instant,
    transfers: Vec<Transfer>,
    free: Vec<u32>,
    queue: Queue,
    seq: u64,
    now: u64,
    rng: SplitMix64,
    unfinished: usize,
    egress: u64,
    stats: ModelStats,
    tick_ns: u64,
    refresh_ns: u64,
    picked: Vec<u32>,
}

fn ns_per_byte(bps: f64) -> f64 {
    if bps.is_finite() && bps > 0.0 {
        1e9 / bps
    } else {
        0.0
    }
}

fn ms_to_ns(ms: f64) -> u64 {
    (ms * 1e6).round() as u64
}

fn to_ns(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

fn xfer_ns(bytes: u64, ns_per_byte: f64) -> u64 {
    (bytes as f64 * ns_per_byte).round() as u64
}

impl<'a> Sim<'a> {
    pub(super) fn new(scenario: &'a Scenario, opts: &'a ModelOptions) -> Self {
        let chunk_bytes = scenario.chunk_bytes();
        let plugins: Vec<Plugin> = scenario
            .plugin_bytes()
            .iter()
            .enumerate()
            .map(|(i, &size)| Plugin {
                chunks: u32::try_from(size.div_ceil(chunk_bytes)).expect("chunk count fits u32"),
                size,
                content: ContentId::of_bytes(format!("{}/plugin-{i}", scenario.name).as_bytes()),
            })
            .collect();
        let agents: Vec<Agent> = scenario
            .plan()
            .iter()
            .map(|plan| Agent {
                up_ns_per_byte: ns_per_byte(plan.link.up_bps()),
                down_ns_per_byte: ns_per_byte(plan.link.down_bps()),
                lat: ms_to_ns(plan.link.latency_ms),
                start: (plan.start_s * 1e9).round() as u64,
                started: false,
                left_at: None,
                neigh: Vec::new(),
                conns: 0,
                up_free: 0,
                slots: Vec::new(),
                down_free: 0,
                runs: plugins
                    .iter()
                    .map(|_| Run {
                        state: RunState::Waiting,
                        sched: None,
                        outstanding: Vec::new(),
                        views: Vec::new(),
                        log: Vec::new(),
                        src: Vec::new(),
                        double: false,
                    })
                    .collect(),
                next_run: 0,
                active: 0,
                done_at: None,
                finished: false,
                peer_bytes: 0,
                server_bytes: 0,
                uploaded_bytes: 0,
            })
            .collect();
        let mut by_start: Vec<u32> = (0..agents.len() as u32).collect();
        by_start.sort_by_key(|&a| (agents[a as usize].start, a));
        let max_redirects = if scenario.p2p { opts.max_redirects } else { 0 };
        Self {
            scenario,
            opts,
            p2p: scenario.p2p,
            chunk_bytes,
            plugins,
            names: (0..agents.len()).map(|n| format!("agent-{n:04}")).collect(),
            unfinished: agents.len(),
            answers: vec![NO_ANSWER; agents.len() * scenario.plugins.len()],
            agents,
            by_start,
            server_ns_per_byte: ns_per_byte(scenario.server.up_bps()),
            server_lat: ms_to_ns(scenario.server.latency_ms),
            server_queue: VecDeque::new(),
            server_sending: false,
            server_cpu_free: 0,
            streams: 0,
            herd: Herd::new(opts.herd_window, max_redirects),
            base: Instant::now(),
            transfers: Vec::new(),
            free: Vec::new(),
            queue: Queue::new(),
            seq: 0,
            now: 0,
            rng: SplitMix64(scenario.seed ^ 0x005E_ED0F_A6E7),
            egress: 0,
            stats: ModelStats::default(),
            tick_ns: to_ns(opts.tick),
            refresh_ns: to_ns(opts.refresh),
            picked: Vec::new(),
        }
    }

    pub(super) fn run(mut self) -> ModelRun {
        let wall = Instant::now();
        let cpu = cpu_seconds();
        let plans = self.scenario.plan();
        for a in 0..self.agents.len() {
            self.push(self.agents[a].start, Ev::Start(a as u32));
        }
        for (a, plan) in plans.iter().enumerate() {
            if let Some(leave) = plan.leave_s {
                self.push((leave * 1e9).round() as u64, Ev::Leave(a as u32));
            }
        }
        let max_t = match self.opts.max_sim_time {
            Some(d) => to_ns(d),
            None => ((100.0 * self.scenario.bound_seconds() + 60.0) * 1e9) as u64,
        };
        let mut next_report = 0u64;
        while self.unfinished > 0 {
            let Some(e) = self.queue.pop() else { break };
            let out_of_time = self.stats.events % 65_536 == 0
                && self.opts.max_wall.is_some_and(|w| wall.elapsed() >= w);
            if e.t > max_t || self.stats.events >= self.opts.max_events || out_of_time {
                self.stats.capped = true;
                break;
            }
            if self.opts.progress && e.t >= next_report {
                self.progress(wall);
                next_report = (e.t / 1_000_000_000 + 1) * 1_000_000_000;
            }
            self.now = e.t;
            self.stats.events += 1;
            self.dispatch(e.ev);
        }
        self.stats.end_ns = self.now;
        self.finish(wall, cpu)
    }

    /// One line of progress on stderr.
    fn progress(&self, wall: Instant) {
        let chunks: usize = self
            .agents
            .iter()
            .map(|a| a.runs.iter().map(|r| r.log.len()).sum::<usize>())
            .sum();
        let done = self.agents.iter().filter(|a| a.done_at.is_some()).count();
        eprintln!(
            "model t={:.0}s wall={:.1}s chunks={chunks} done={done}/{} egress={}MiB {:?}",
            self.now as f64 / 1e9,
            wall.elapsed().as_secs_f64(),
            self.agents.len(),
            self.egress >> 20,
            self.stats
        );
    }

    fn push(&mut self, t: u64, ev: Ev) {
        self.seq += 1;
        self.queue.push(Entry {
            t,
            seq: self.seq,
            ev,
        });
    }

    fn dispatch(&mut self, ev: Ev) {
        match ev {
            Ev::Start(a) => self.start(a as usize),
            Ev::Leave(a) => self.leave(a as usize),
            Ev::Tick(a) => self.tick(a as usize),
            Ev::Refresh { agent, periodic } => self.refresh(agent as usize, periodic),
            Ev::Poll { agent, edge } => self.poll_edge(agent as usize, edge as usize),
            Ev::PeerReq(tid) => self.peer_request(tid),
            Ev::Refused(tid) => self.refused(tid),
            Ev::Resend(tid) => self.resend(tid),
            Ev::UpDone(tid) => self.up_done(tid),
            Ev::Arrive(tid) => self.arrive(tid),
            Ev::ServerReq(tid) => self.server_arrival(tid),
            Ev::ServerHandle(tid) => self.server_request(tid),
            Ev::ServerReply(tid) => self.server_reply(tid),
            Ev::PeerGone { agent, peer } => self.peer_gone(agent as usize, peer),
        }
    }

    // ----- helpers ------------------------------------------------------------------

    /// One-way latency between agent `a` and node `b` (an agent or `SERVER`).
    fn lat(&self, a: usize, b: u32) -> u64 {
        let other = if b == SERVER {
            self.server_lat
        } else {
            self.agents[b as usize].lat
        };
        self.agents[a].lat.max(other)
    }

    fn chunk_size(&self, p: usize, c: u32) -> u64 {
        let plugin = &self.plugins[p];
        if c + 1 == plugin.chunks {
            plugin.size - u64::from(c) * self.chunk_bytes
        } else {
            self.chunk_bytes
        }
    }

    fn alloc(&mut self, from: u32, to: usize, p: usize, chunk: u32) -> u32 {
        let bytes = self.chunk_size(p, chunk);
        let t = Transfer {
            from,
            to: to as u32,
            plugin: p as u32,
            chunk,
            bytes,
            up_start: 0,
            cancel_at: NEVER,
            admitted: false,
            slot_release: 0,
            withdrawn: false,
            reply: Reply::Busy,
            holders: Vec::new(),
        };
        match self.free.pop() {
            Some(tid) => {
                let slot = &mut self.transfers[tid as usize];
                let holders = std::mem::take(&mut slot.holders);
                *slot = Transfer { holders, ..t };
                slot.holders.clear();
                tid
            }
            None => {
                self.transfers.push(t);
                (self.transfers.len() - 1) as u32
            }
        }
    }

    fn release(&mut self, tid: u32) {
        self.free.push(tid);
    }

    fn gone(&self, a: usize) -> bool {
        self.agents[a].left_at.is_some()
    }

    fn mark_finished(&mut self, a: usize) {
        let agent = &mut self.agents[a];
        if !agent.finished {
            agent.finished = true;
            self.unfinished -= 1;
        }
    }

    /// Connects `a` and `b` both ways; false when already connected, impossible or
    /// refused by the connection limit.
    fn connect(&mut self, a: usize, b: u32) -> bool {
        let bi = b as usize;
        if a == bi || b == SERVER || bi >= self.agents.len() {
            return false;
        }
        let max = self.opts.max_connections;
        {
            let (pa, pb) = (&self.agents[a], &self.agents[bi]);
            if pa.left_at.is_some()
                || pb.left_at.is_some()
                || pb.start > self.now
                || pa.neigh.contains(&b)
            {
                return false;
            }
            if pa.conns >= max || pb.conns >= max {
                self.stats.connections_refused += 1;
                return false;
            }
        }
        for (x, y) in [(a, b), (bi, a as u32)] {
            let agent = &mut self.agents[x];
            agent.neigh.push(y);
            agent.conns += 1;
            for run in &mut agent.runs {
                if run.state == RunState::Active {
                    run.views.push(View::default());
                }
            }
        }
        self.stats.connections += 1;
        true
    }

    /// Feeds one event to agent `a`'s fetch of plugin `p` and carries out its actions.
    fn feed(&mut self, a: usize, p: usize, event: Event<u32>) {
        self.feed_all(a, p, std::iter::once(event));
    }

    /// Feeds events that happen at once in one [`Scheduler::handle_all`] call.
    fn feed_all(&mut self, a: usize, p: usize, events: impl IntoIterator<Item = Event<u32>>) {
        let now = Duration::from_nanos(self.now);
        let run = &mut self.agents[a].runs[p];
        if run.state != RunState::Active {
            return;
        }
        let Some(sched) = run.sched.as_mut() else {
            return;
        };
        let actions = sched.handle_all(now, events);
        for action in actions {
            self.act(a, p, action);
        }
    }

    fn act(&mut self, a: usize, p: usize, action: Action<u32>) {
        match action {
            Action::Request { source, chunk } => {
                let (from, ev_lat) = match source {
                    Source::Server => (SERVER, self.lat(a, SERVER)),
                    Source::Peer(b) => (b, self.lat(a, b)),
                };
                let tid = self.alloc(from, a, p, chunk);
                self.agents[a].runs[p].outstanding.push(Outstanding {
                    src: from,
                    chunk,
                    tid,
                });
                let ev = if from == SERVER {
                    self.stats.server_requests += 1;
                    Ev::ServerReq(tid)
                } else {
                    self.stats.peer_requests += 1;
                    Ev::PeerReq(tid)
                };
                self.push(self.now + ev_lat, ev);
            }
            Action::Cancel { source, chunk } => {
                let src = match source {
                    Source::Server => SERVER,
                    Source::Peer(b) => b,
                };
                let out = &mut self.agents[a].runs[p].outstanding;
                if let Some(i) = out.iter().position(|o| o.src == src && o.chunk == chunk) {
                    let o = out.swap_remove(i);
                    let reaches = self.now + self.lat(a, src);
                    if src == SERVER {
                        self.transfers[o.tid as usize].cancel_at = reaches;
                    } else {
                        self.withdraw(o.tid, reaches);
                    }
                }
            }
            Action::Ban { peer, .. } => {
                self.stats.bans += 1;
                let agent = &mut self.agents[a];
                let run = &mut agent.runs[p];
                if let Some(i) = agent.neigh.iter().position(|&n| n == peer) {
                    run.views[i].closed = true;
                }
                run.outstanding.retain(|o| o.src != peer);
            }
            Action::Done => self.finish_run(a, p),
        }
    }

    fn start_next_run(&mut self, a: usize) {
        let p = self.agents[a].next_run;
        if p >= self.agents[a].runs.len() {
            return;
        }
        // As the agent does: an agent with a slow uplink asks the coordinator later.
        let up_bps = 1e9 / self.agents[a].up_ns_per_byte;
        let upload_rate = if up_bps.is_finite() { up_bps as u64 } else { 0 };
        let config = SchedulerConfig {
            server_fallback_after: arcade_agent::fetch::first_copy_delay(
                self.opts.scheduler.server_fallback_after,
                upload_rate,
                self.chunk_bytes,
            ),
            ..self.opts.scheduler.clone()
        };
        let chunks = self.plugins[p].chunks;
        let seed = mix64(self.scenario.seed ^ mix64(((a as u64) << 8) | p as u64));
        let agent = &mut self.agents[a];
        agent.next_run += 1;
        agent.active += 1;
        let run = &mut agent.runs[p];
        run.state = RunState::Active;
        run.sched = Some(Scheduler::new(chunks, Bitfield::new(chunks), config, seed));
        run.views = vec![View::default(); agent.neigh.len()];
        run.log.reserve_exact(chunks as usize);
        run.src = vec![MISSING; chunks as usize];
        self.feed(a, p, Event::Tick);
    }

    fn finish_run(&mut self, a: usize, p: usize) {
        let lat = self.lat(a, SERVER);
        let now = self.now;
        let agent = &mut self.agents[a];
        let run = &mut agent.runs[p];
        run.state = RunState::Done;
        run.sched = None;
        run.views = Vec::new();
        for o in run.outstanding.drain(..) {
            if o.src == SERVER {
                self.transfers[o.tid as usize].cancel_at = now + lat;
            }
        }
        agent.active -= 1;
        if agent.next_run < agent.runs.len() {
            self.start_next_run(a);
        } else if agent.active == 0 {
            self.agents[a].done_at = Some(now);
            self.mark_finished(a);
        }
    }

    // ----- agent life ---------------------------------------------------------------

    fn start(&mut self, a: usize) {
        if self.gone(a) {
            return;
        }
        self.agents[a].started = true;
        let np = self.plugins.len();
        self.answers[a * np..(a + 1) * np].fill(0);
        if self.p2p {
            self.hints(a);
        }
        for _ in 0..self.opts.concurrent_fetches {
            self.start_next_run(a);
        }
        // The first tick was handled as each fetch started; the timers of different
        // agents are not in step (real agents pick up their jobs at different moments).
        let rtt = 2 * self.agents[a].lat;
        let tick_phase = 1 + self.rng.below(self.tick_ns);
        self.push(self.now + tick_phase, Ev::Tick(a as u32));
        if self.p2p {
            self.push(
                self.now + rtt,
                Ev::Refresh {
                    agent: a as u32,
                    periodic: false,
                },
            );
            let refresh_phase = 1 + self.rng.below(self.refresh_ns);
            self.push(
                self.now + refresh_phase,
                Ev::Refresh {
                    agent: a as u32,
                    periodic: true,
                },
            );
        }
    }

    /// Up to `peers_per_agent` seeded random peers among the agents that have started.
    fn hints(&mut self, a: usize) {
        let now = self.now;
        let agents = &self.agents;
        let candidates = self
            .by_start
            .partition_point(|&b| agents[b as usize].start <= now);
        let want = self.opts.peers_per_agent;
        let mut picked = std::mem::take(&mut self.picked);
        picked.clear();
        if candidates <= want + 1 {
            picked.extend(self.by_start[..candidates].iter().copied());
        } else {
            let mut attempts = 0;
            while picked.len() < want && attempts < 20 * want + 100 {
                attempts += 1;
                let b = self.by_start[self.rng.below(candidates as u64) as usize];
                if b as usize != a && !self.gone(b as usize) && !picked.contains(&b) {
                    picked.push(b);
                }
            }
        }
        for &b in &picked {
            self.connect(a, b);
        }
        self.picked = picked;
    }

    fn leave(&mut self, a: usize) {
        if self.gone(a) {
            return;
        }
        self.agents[a].left_at = Some(self.now);
        let np = self.plugins.len();
        self.answers[a * np..(a + 1) * np].fill(NO_ANSWER);
        self.mark_finished(a);
        let agent = &mut self.agents[a];
        for run in &mut agent.runs {
            run.sched = None;
            run.views = Vec::new();
            run.outstanding.clear();
            if run.state == RunState::Active {
                run.state = RunState::Waiting;
            }
        }
        for i in 0..self.agents[a].neigh.len() {
            let b = self.agents[a].neigh[i];
            if !self.gone(b as usize) {
                let t = self.now + self.lat(a, b);
                self.push(
                    t,
                    Ev::PeerGone {
                        agent: b,
                        peer: a as u32,
                    },
                );
            }
        }
    }

    fn peer_gone(&mut self, a: usize, peer: u32) {
        if self.gone(a) {
            return;
        }
        let Some(i) = self.agents[a].neigh.iter().position(|&n| n == peer) else {
            return;
        };
        self.agents[a].conns -= 1;
        for p in 0..self.plugins.len() {
            let run = &mut self.agents[a].runs[p];
            if run.state != RunState::Active {
                continue;
            }
            run.outstanding.retain(|o| o.src != peer);
            let view = run.views[i];
            run.views[i].closed = true;
            if view.joined && !view.closed {
                self.feed(a, p, Event::PeerLeft { peer });
            }
        }
    }

    fn tick(&mut self, a: usize) {
        if self.gone(a) || self.agents[a].done_at.is_some() {
            return;
        }
        for p in 0..self.plugins.len() {
            if self.agents[a].runs[p].state == RunState::Active {
                self.feed(a, p, Event::Tick);
            }
        }
        self.push(self.now + self.tick_ns, Ev::Tick(a as u32));
    }

    fn refresh(&mut self, a: usize, periodic: bool) {
        if self.gone(a) || self.agents[a].done_at.is_some() {
            return;
        }
        // Every peer's answer in one scheduler call, as the driver feeds a batch.
        let mut news = Vec::new();
        for p in 0..self.plugins.len() {
            if self.agents[a].runs[p].state != RunState::Active {
                continue;
            }
            news.clear();
            for i in 0..self.agents[a].neigh.len() {
                news.extend(self.poll(a, p, i));
            }
            if !news.is_empty() {
                self.feed_all(a, p, news.drain(..));
            }
        }
        if periodic {
            self.push(
                self.now + self.refresh_ns,
                Ev::Refresh {
                    agent: a as u32,
                    periodic,
                },
            );
        }
    }

    fn poll_edge(&mut self, a: usize, edge: usize) {
        if self.gone(a) {
            return;
        }
        for p in 0..self.plugins.len() {
            if self.agents[a].runs[p].state == RunState::Active
                && let Some(news) = self.poll(a, p, edge)
            {
                self.feed(a, p, news);
            }
        }
    }

    /// A bitfield answer from agent `a`'s `i`-th peer to its fetch of plugin `p`: the
    /// event to feed, if it has news.
    fn poll(&mut self, a: usize, p: usize, i: usize) -> Option<Event<u32>> {
        let b = self.agents[a].neigh[i] as usize;
        let view = self.agents[a].runs[p].views[i];
        if view.closed {
            return None;
        }
        let count = self.answers[b * self.plugins.len() + p];
        if count == NO_ANSWER || (view.joined && count == view.seen) {
            return None;
        }
        // Only chunks this agent misses: the scheduler ignores announced chunks it
        // already holds, so an answer with nothing else is not worth a call.
        let mine = &self.agents[a].runs[p].src;
        let mut have: Option<Bitfield> = None;
        for &c in &self.agents[b].runs[p].log[view.seen as usize..count as usize] {
            if mine[c as usize] == MISSING {
                have.get_or_insert_with(|| Bitfield::new(self.plugins[p].chunks))
                    .set(c);
            }
        }
        let v = &mut self.agents[a].runs[p].views[i];
        let first = !v.joined;
        v.joined = true;
        v.seen = count;
        (first || have.is_some()).then(|| Event::PeerJoined {
            peer: b as u32,
            have: have.unwrap_or_else(|| Bitfield::new(self.plugins[p].chunks)),
        })
    }

    // ----- peer transfers -----------------------------------------------------------

    fn peer_request(&mut self, tid: u32) {
        let t = &self.transfers[tid as usize];
        let (u, to, bytes) = (t.from as usize, t.to as usize, t.bytes);
        if self.gone(u) {
            // Its requester gets PeerLeft, which voids the request.
            self.release(tid);
            return;
        }
        let now = self.now;
        if self.transfers[tid as usize].cancel_at <= now {
            // Cancelled on the requester's watch before it arrived (the host answers
            // CANCELLED; the requester has dropped it already).
            self.stats.cancelled_at_holder += 1;
            self.release(tid);
            return;
        }
        let uploader = &mut self.agents[u];
        uploader.slots.retain(|&release| release > now);
        let burst = xfer_ns(self.opts.upload_burst, uploader.up_ns_per_byte);
        let backlog = uploader.up_free.saturating_sub(now).saturating_sub(burst);
        let wait_cap = to_ns(self.opts.max_upload_wait);
        if uploader.slots.len() >= self.opts.max_uploads || (wait_cap > 0 && backlog > wait_cap) {
            self.stats.peer_busy += 1;
            let back = self.lat(to, u as u32);
            self.push(now + back, Ev::Refused(tid));
            return;
        }
        let start = now.max(uploader.up_free);
        uploader.up_free = start + xfer_ns(bytes, uploader.up_ns_per_byte);
        let done = uploader.up_free;
        // The slot is held until the node-wide limiter lets the chunk go: when the
        // bytes queued before it, less the limiter's burst, have left.
        let release = done.saturating_sub(burst).max(now);
        uploader.slots.push(release);
        let t = &mut self.transfers[tid as usize];
        t.up_start = start;
        t.admitted = true;
        t.slot_release = release;
        let cancel_at = t.cancel_at;
        if cancel_at != NEVER {
            // A cancel is on its way.
            self.withdraw(tid, cancel_at);
        }
        self.push(done, Ev::UpDone(tid));
    }

    /// A cancel of peer transfer `tid` reaches its uploader at `at`, as the host's
    /// `/arcade/have/1` cancels do: a request not taken yet is dropped when it arrives,
    /// and one still waiting for the upload rate gives its slot and its reservation
    /// back (later uploads may start sooner) and is never sent.
    fn withdraw(&mut self, tid: u32, at: u64) {
        let t = &mut self.transfers[tid as usize];
        if !t.admitted {
            t.cancel_at = at;
            return;
        }
        if t.withdrawn || at >= t.slot_release {
            return;
        }
        t.withdrawn = true;
        let (from, bytes, release) = (t.from as usize, t.bytes, t.slot_release);
        self.stats.cancelled_at_holder += 1;
        let uploader = &mut self.agents[from];
        if let Some(i) = uploader.slots.iter().position(|&r| r == release) {
            uploader.slots.swap_remove(i);
        }
        let refund = xfer_ns(bytes, uploader.up_ns_per_byte);
        uploader.up_free = uploader.up_free.saturating_sub(refund);
    }

    fn refused(&mut self, tid: u32) {
        let t = &self.transfers[tid as usize];
        let (from, a, p, chunk) = (t.from, t.to as usize, t.plugin as usize, t.chunk);
        if let PeerBusy::Retry(delay) = self.opts.peer_busy {
            if self.is_outstanding(a, p, from, chunk, tid) {
                self.push(self.now + to_ns(delay), Ev::Resend(tid));
                return;
            }
        }
        self.release(tid);
        if self.gone(a) {
            return;
        }
        if self.take_outstanding(a, p, from, chunk, tid) {
            let event = match self.opts.peer_busy {
                PeerBusy::Pause(retry_after) => Event::PeerBusy {
                    peer: from,
                    chunk,
                    retry_after,
                },
                _ => Event::RequestFailed {
                    source: Source::Peer(from),
                    chunk,
                },
            };
            self.feed(a, p, event);
        }
    }

    /// [`PeerBusy::Retry`]: the driver asks the same peer again, unless the request was
    /// cancelled meanwhile (the scheduler is not told about the refusal).
    fn resend(&mut self, tid: u32) {
        let t = &self.transfers[tid as usize];
        let (from, a, p, chunk) = (t.from, t.to as usize, t.plugin as usize, t.chunk);
        if self.is_outstanding(a, p, from, chunk, tid) {
            let at = self.now + self.lat(a, from);
            self.push(at, Ev::PeerReq(tid));
        } else {
            self.release(tid);
        }
    }

    fn is_outstanding(&self, a: usize, p: usize, src: u32, chunk: u32, tid: u32) -> bool {
        let run = &self.agents[a].runs[p];
        !self.gone(a)
            && run.state == RunState::Active
            && run
                .outstanding
                .iter()
                .any(|o| o.tid == tid && o.src == src && o.chunk == chunk)
    }

    /// Removes the outstanding request `(src, chunk)` of transfer `tid`; false when it
    /// is no longer outstanding (cancelled, banned, done).
    fn take_outstanding(&mut self, a: usize, p: usize, src: u32, chunk: u32, tid: u32) -> bool {
        let run = &mut self.agents[a].runs[p];
        if run.state != RunState::Active {
            return false;
        }
        match run
            .outstanding
            .iter()
            .position(|o| o.tid == tid && o.src == src && o.chunk == chunk)
        {
            Some(i) => {
                run.outstanding.swap_remove(i);
                true
            }
            None => false,
        }
    }

    fn up_done(&mut self, tid: u32) {
        let t = &self.transfers[tid as usize];
        let (from, to, bytes, up_start) = (t.from, t.to as usize, t.bytes, t.up_start);
        if from == SERVER {
            self.streams -= 1;
            self.server_sending = false;
        } else {
            if self.transfers[tid as usize].withdrawn {
                self.release(tid);
                return;
            }
            let uploader = &mut self.agents[from as usize];
            if uploader.left_at.is_some() {
                self.release(tid);
                return;
            }
            uploader.uploaded_bytes += bytes;
        }
        if self.gone(to) {
            self.release(tid);
        } else {
            let receiver = &mut self.agents[to];
            let start = receiver.down_free.max(up_start);
            receiver.down_free = start + xfer_ns(bytes, receiver.down_ns_per_byte);
            let at = self.now.max(receiver.down_free) + self.lat(to, from);
            self.push(at, Ev::Arrive(tid));
        }
        if from == SERVER {
            self.server_start_next();
        }
    }

    fn arrive(&mut self, tid: u32) {
        let t = &self.transfers[tid as usize];
        let (from, a, p, chunk, bytes) =
            (t.from, t.to as usize, t.plugin as usize, t.chunk, t.bytes);
        self.release(tid);
        if self.gone(a) || (from != SERVER && self.gone(from as usize)) {
            return;
        }
        if !self.take_outstanding(a, p, from, chunk, tid) {
            return;
        }
        let agent = &mut self.agents[a];
        let run = &mut agent.runs[p];
        if run.src[chunk as usize] == MISSING {
            run.src[chunk as usize] = from;
            run.log.push(chunk);
            self.answers[a * self.plugins.len() + p] += 1;
            if from == SERVER {
                agent.server_bytes += bytes;
            } else {
                agent.peer_bytes += bytes;
            }
        } else {
            run.double = true;
        }
        let source = if from == SERVER {
            Source::Server
        } else {
            Source::Peer(from)
        };
        self.feed(a, p, Event::ChunkArrived { source, chunk });
    }

    // ----- the coordinator ----------------------------------------------------------

    /// A request reaches the coordinator: handled now, or after the requests before it
    /// when handling costs time.
    fn server_arrival(&mut self, tid: u32) {
        let cost = to_ns(self.opts.server_rpc_cost);
        if cost == 0 {
            self.server_request(tid);
        } else {
            self.server_cpu_free = self.server_cpu_free.max(self.now) + cost;
            self.push(self.server_cpu_free, Ev::ServerHandle(tid));
        }
    }

    fn server_request(&mut self, tid: u32) {
        let t = &self.transfers[tid as usize];
        let (a, p, chunk, cancel_at) = (t.to as usize, t.plugin as usize, t.chunk, t.cancel_at);
        if self.gone(a) || cancel_at <= self.now {
            self.release(tid);
            return;
        }
        let back = self.now + self.lat(a, SERVER);
        if self.p2p {
            let now = self.now;
            let stale = to_ns(self.opts.holder_stale_after);
            let agents = &self.agents;
            let usable = |holder: &str| {
                agent_index(holder).is_some_and(|h| {
                    agents.get(h).is_some_and(|x| {
                        x.started && x.left_at.is_none_or(|l| now < l.saturating_add(stale))
                    })
                })
            };
            let decision = self.herd.admit(
                self.plugins[p].content,
                chunk,
                &self.names[a],
                self.base + Duration::from_nanos(now),
                usable,
            );
            if let Admission::Redirect {
                holders,
                retry_after,
            } = decision
            {
                self.stats.redirects += 1;
                let t = &mut self.transfers[tid as usize];
                t.reply = Reply::Deferred(retry_after);
                t.holders.clear();
                t.holders.extend(
                    holders
                        .iter()
                        .filter_map(|h| agent_index(h))
                        .map(|h| h as u32),
                );
                self.push(back, Ev::ServerReply(tid));
                return;
            }
        }
        if self.streams >= self.opts.max_streams {
            self.purge_cancelled_streams();
        }
        if self.streams >= self.opts.max_streams {
            self.stats.server_busy += 1;
            self.transfers[tid as usize].reply = Reply::Busy;
            self.push(back, Ev::ServerReply(tid));
            return;
        }
        self.streams += 1;
        self.server_queue.push_back(tid);
        if !self.server_sending {
            self.server_start_next();
        }
    }

    /// Whether the coordinator knows stream `tid` is void (cancelled, or its agent gone).
    fn stream_void(&self, tid: u32) -> bool {
        let t = &self.transfers[tid as usize];
        let a = t.to as usize;
        t.cancel_at <= self.now
            || self.agents[a]
                .left_at
                .is_some_and(|l| l + self.lat(a, SERVER) <= self.now)
    }

    fn purge_cancelled_streams(&mut self) {
        let queue = std::mem::take(&mut self.server_queue);
        let mut kept = VecDeque::with_capacity(queue.len());
        for tid in queue {
            if self.stream_void(tid) {
                self.streams -= 1;
                self.stats.server_skipped += 1;
                self.release(tid);
            } else {
                kept.push_back(tid);
            }
        }
        self.server_queue = kept;
    }

    /// Starts the next live queued stream on the coordinator's uplink.
    fn server_start_next(&mut self) {
        while let Some(tid) = self.server_queue.pop_front() {
            if self.stream_void(tid) {
                self.streams -= 1;
                self.stats.server_skipped += 1;
                self.release(tid);
                continue;
            }
            let t = &mut self.transfers[tid as usize];
            t.up_start = self.now;
            let bytes = t.bytes;
            // `Herd::admit` recorded this agent as the chunk's holder when it admitted
            // the request; the service's second `served` call as the chunk goes out
            // would only move that record's time by the queueing delay (against a 2 min
            // window), and `served` prunes the whole table on every call, so the model
            // leaves it out.
            self.egress += bytes;
            self.server_sending = true;
            let done = self.now + xfer_ns(bytes, self.server_ns_per_byte);
            self.push(done, Ev::UpDone(tid));
            return;
        }
    }

    fn server_reply(&mut self, tid: u32) {
        let t = &mut self.transfers[tid as usize];
        let (a, p, chunk, reply) = (t.to as usize, t.plugin as usize, t.chunk, t.reply);
        let holders = std::mem::take(&mut t.holders);
        if !self.gone(a) && self.take_outstanding(a, p, SERVER, chunk, tid) {
            match reply {
                Reply::Deferred(retry_after) => {
                    for &h in &holders {
                        if self.connect(a, h) {
                            let edge = (self.agents[a].neigh.len() - 1) as u32;
                            let rtt = 2 * self.lat(a, h);
                            self.push(
                                self.now + rtt,
                                Ev::Poll {
                                    agent: a as u32,
                                    edge,
                                },
                            );
                        }
                    }
                    self.feed(a, p, Event::ServerDeferred { chunk, retry_after });
                }
                Reply::Busy => self.feed(
                    a,
                    p,
                    Event::ServerBusy {
                        retry_after: self.opts.server_busy_retry,
                        holders: Vec::new(),
                    },
                ),
            }
        }
        self.transfers[tid as usize].holders = holders;
        self.release(tid);
    }

    // ----- the report ---------------------------------------------------------------

    fn finish(self, wall: Instant, cpu: f64) -> ModelRun {
        let total = self.scenario.total_bytes();
        let mut per_agent = Vec::with_capacity(self.agents.len());
        let mut sources = Vec::with_capacity(self.agents.len());
        let mut delivered = 0u64;
        for (a, agent) in self.agents.iter().enumerate() {
            let complete = agent.done_at.is_some();
            let verified = complete
                && agent.peer_bytes + agent.server_bytes == total
                && agent.runs.iter().zip(&self.plugins).all(|(run, plugin)| {
                    !run.double
                        && run.log.len() == plugin.chunks as usize
                        && run.src.len() == plugin.chunks as usize
                        && run
                            .src
                            .iter()
                            .all(|&s| s == SERVER || (self.p2p && (s as usize) < self.agents.len()))
                });
            delivered += agent.peer_bytes + agent.server_bytes;
            let left = agent.left_at.is_some();
            let t_s = agent.done_at.map(|t| t as f64 / 1e9);
            per_agent.push(AgentOutcome {
                agent_id: self.names[a].clone(),
                t_s,
                peer_bytes: agent.peer_bytes,
                server_bytes: agent.server_bytes,
                uploaded_bytes: agent.uploaded_bytes,
                left,
                failed: !left && t_s.is_none(),
                verified,
            });
            sources.push(
                agent
                    .runs
                    .iter()
                    .zip(&self.plugins)
                    .map(|(run, plugin)| {
                        (0..plugin.chunks as usize)
                            .map(|c| match run.src.get(c).copied().unwrap_or(MISSING) {
                                MISSING => ChunkSource::Missing,
                                SERVER => ChunkSource::Server,
                                b => ChunkSource::Peer(b as usize),
                            })
                            .collect()
                    })
                    .collect(),
            );
        }
        let wall_s = wall.elapsed().as_secs_f64();
        let gib = delivered as f64 / (1u64 << 30) as f64;
        let mut report = FleetReport {
            engine: "model".into(),
            scenario: self.scenario.name.clone(),
            p2p: self.p2p,
            seed: self.scenario.seed,
            agents: self.agents.len(),
            size_bytes: total,
            chunk_bytes: self.chunk_bytes,
            server_egress_bytes: self.egress,
            wall_s,
            cpu_s_per_gib: if gib > 0.0 {
                (cpu_seconds() - cpu) / gib
            } else {
                0.0
            },
            per_agent,
            cancelled_requests: self.stats.cancelled_at_holder,
            counters: self.stats.counters(),
            ..FleetReport::default()
        };
        report.summarise(self.scenario.bound_seconds());
        ModelRun {
            report,
            sources,
            stats: self.stats,
        }
    }
}

/// `agent-0042` → 42.
fn agent_index(name: &str) -> Option<usize> {
    name.strip_prefix("agent-")?.parse().ok()
}

/// SplitMix64, for the model's own draws (peer hints).
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        mix64(self.0)
    }

    /// Uniform in `0..n` (`n > 0`).
    fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }
}

fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}
