//! The discrete-event model (`arcade-sim model`): fleets far beyond one machine, driven
//! by the *same* decision code as the real stack — one
//! [`Scheduler`](arcade_p2p::mesh::scheduler::Scheduler) per agent and plugin, configured
//! as the real agent configures it, and one coordinator
//! [`Herd`](arcade_coordinator::herd::Herd) with the coordinator's default `[serve]`
//! settings — over simulated links instead of sockets. The model has no bytes: a chunk
//! is an index and a size, and "verified" means every chunk of every plugin was
//! accounted for exactly once, from the coordinator or a connected peer (from the
//! coordinator only with the mesh off).
//!
//! Entry points: [`run`] (the [`FleetReport`]) and [`run_detailed`] (plus where every
//! chunk came from and the run's counters); knobs in [`ModelOptions`].
//!
//! # Time and events
//!
//! Simulated time is integer nanoseconds from job creation. Events are popped in
//! `(time, sequence number)` order (a calendar of 1 ms buckets, each a binary heap), so
//! ties resolve in insertion order and a run is a pure function of the scenario, its
//! seed and the [`ModelOptions`]: only `wall_s` and `cpu_s_per_gib` of the report vary
//! (unless [`ModelOptions::max_wall`] cuts a run short). Every random choice (peer hints,
//! timer phases, each scheduler's seed) derives from the scenario seed.
//!
//! # Links
//!
//! Every node (the coordinator and each agent, from [`Scenario::plan`] and
//! `scenario.server`) has an upload rate, a download rate (unlimited = `f64::INFINITY`)
//! and a one-way latency; between two nodes the one-way latency is the larger of theirs.
//!
//! - **Agent uplink: a FIFO with upload slots.** A chunk request reaches the uploader one
//!   latency after it is sent. It takes one of the uploader's `max_uploads` upload slots
//!   or is refused busy (no queue, like the host's `REFUSAL_BUSY`) — as it is when it
//!   would wait more than `max_upload_wait` behind the bytes queued before it (less the
//!   burst), like `mesh.max_upload_wait`; the refusal travels
//!   back one latency and the agent driver turns it into [`Event::PeerBusy`] (no strike;
//!   the peer is paused for `PEER_BUSY_RETRY`), as `agent/src/fetch/run.rs` does (see
//!   [`PeerBusy`]). An admitted transfer
//!   of `c` bytes starts when the uplink is free (`start = max(now, uplink_free)`,
//!   `uplink_free = start + c/up`). The host holds a slot while its node-wide upload
//!   limiter (a token bucket with a 1 MiB burst, paid in debt) meters the chunk out, so
//!   the model releases it when the bytes queued before it, less the burst, have left.
//!   A cancelled peer request is withdrawn when the cancel reaches the uploader (one
//!   latency later) before the limiter lets its chunk go, as the host does with the
//!   cancels of `/arcade/have/1`: its slot and its share of the uplink are given back
//!   and nothing is sent; later, it is sent and its answer dropped.
//! - **Downlink: a FIFO in the order transfers leave their uplinks.** When the last byte
//!   of a transfer leaves the uplink, the receiver's downlink absorbs it:
//!   `down_free = max(down_free, start) + c/down`; the chunk arrives at
//!   `max(uplink finish, down_free) + latency`. Several uploaders feeding one downlink
//!   thus share it by total bytes; with an unlimited downlink a chunk arrives one latency
//!   after its last byte left.
//! - **Coordinator: herd, streams, then one FIFO uplink at the server link's up rate**
//!   (the egress cap). A request reaches the coordinator one latency after it is sent
//!   (then waits `server_rpc_cost` per request ahead of it, zero by default). The herd
//!   is asked first, exactly as `download_plugin` does: a redirect goes back one latency
//!   later with the holders, and the agent connects them (polled one round trip later,
//!   as the driver's `add_peer`) and feeds [`Event::ServerDeferred`] with the redirect's
//!   own wait ([`REDIRECT_RETRY_AFTER`], doubling with each redirect of that agent for
//!   that chunk). A served request takes one of `serve.max_streams` streams
//!   or is answered busy (retry after 200 ms, no holders → [`Event::ServerBusy`], as the
//!   real driver does). Streams are sent one after another; a stream cancelled before
//!   its turn (the agent aborted it — cancelled, done, or gone — which the coordinator
//!   sees one latency later) is skipped and sends nothing; a started one is sent whole
//!   and counted in the egress. The herd records the holder when it admits the request
//!   (inside [`Herd::admit`]); the service's second [`Herd::served`] call as the chunk
//!   goes out only moves that record by the queueing delay (against a 2 min window) but
//!   prunes the whole herd table (O(entries) per chunk sent), so the model leaves it out.
//!
//! Simplifications: transfers on one link go one after another (FIFO) where real
//! TCP/HTTP/2 streams share the link (same throughput, earlier first completions);
//! request and bitfield messages cost latency but no bandwidth; disk, hashing and the
//! agents' CPU are free; a started coordinator stream is never cut short.
//!
//! # Agents
//!
//! As `agent/src/fetch/`: one scheduler per plugin, at most `download.concurrent` (3)
//! plugins fetched at once in job order, each with the agent's [`SchedulerConfig`]
//! ([`agent_scheduler_config`]). The driver handles `Tick` as a fetch starts and then
//! every 200 ms, and polls the bitfields of connected peers one round trip after the
//! agent starts (the hints' first answers) and then every 250 ms; the phase of both
//! timers is drawn per agent (real agents pick up their jobs at different moments, so
//! their timers are not in step). The answers of one poll round reach the scheduler in
//! one [`Scheduler::handle_all`] call, as the driver feeds the news of one answer. A
//! peer's first answer is [`Event::PeerJoined`] with its
//! bitfield; a later answer that holds new chunks is one `PeerJoined` with those
//! this agent still misses (the scheduler adds it to what the peer announced and
//! ignores announced chunks it already holds; the real driver feeds one [`Event::Have`]
//! per new chunk in one batch — the same information at the same instant); an answer with nothing missing is not fed at all (the scheduler's
//! timers still run at the agent's next event or tick). An answer reflects the peer's
//! holdings at the instant it is delivered (a real answer is one latency older). A peer that has not
//! started yet, or has left, does not answer. Chunks become [`Event::ChunkArrived`];
//! busy refusals [`Event::PeerBusy`]; a departed peer becomes [`Event::PeerLeft`]
//! one latency after it left (its unfinished uploads are lost; that event voids the
//! requests); [`Action::Cancel`] and [`Action::Ban`] drop the answers, as the driver
//! aborts its tasks, and a banned peer is no longer polled.
//!
//! Peers: an agent that starts learns up to `peers_per_agent` peers (like the
//! coordinator's 16 peer hints and the DHT providers, which list agents that hold or
//! fetch the content): a seeded random choice among the agents that have started and not
//! left. Holders named by a redirect are connected too. Connections are symmetric (a
//! libp2p connection serves both ways, so both agents poll each other) and limited to
//! `max_connections` per agent (`mesh.max_connections`; more are refused).
//!
//! Coordinator: the herd's `usable` test holds for an agent that has started and has not
//! been gone for longer than `holder_stale_after` (three heartbeats: the coordinator
//! only notices a silent agent when its heartbeats stop). With `p2p = false` no agent
//! has a peer id: no peers, and the herd is never consulted (as for agents without a
//! peer id), so every chunk comes from the coordinator.
//!
//! Churn: agents start at their plan's `start_s` and leave at `leave_s`; an agent that
//! leaves before it completes is reported `left` (one that completed first keeps its
//! time). A run that cannot finish stops at [`ModelOptions::max_sim_time`] (default
//! 100 × the physical bound + 60 s), [`ModelOptions::max_events`] or
//! [`ModelOptions::max_wall`], and its unfinished agents are reported failed
//! ([`ModelStats::capped`]).
//!
//! # Cost
//!
//! Per event O(1) in the model itself (the slot and outstanding lists it scans are
//! bounded by `max_uploads` and the scheduler's in-flight limits); the scheduler and the
//! herd cost what they cost in the real processes. The bulk of the work is the
//! scheduler's announcements (every agent learns every chunk from every peer: agents ×
//! peers × chunks) and the busy answers of popular holders.
//!
//! [`Event::ServerDeferred`]: arcade_p2p::mesh::scheduler::Event::ServerDeferred
//! [`Event::ServerBusy`]: arcade_p2p::mesh::scheduler::Event::ServerBusy
//! [`Event::RequestFailed`]: arcade_p2p::mesh::scheduler::Event::RequestFailed
//! [`Event::PeerBusy`]: arcade_p2p::mesh::scheduler::Event::PeerBusy
//! [`Event::PeerJoined`]: arcade_p2p::mesh::scheduler::Event::PeerJoined
//! [`Event::Have`]: arcade_p2p::mesh::scheduler::Event::Have
//! [`Event::ChunkArrived`]: arcade_p2p::mesh::scheduler::Event::ChunkArrived
//! [`Event::PeerLeft`]: arcade_p2p::mesh::scheduler::Event::PeerLeft
//! [`Action::Cancel`]: arcade_p2p::mesh::scheduler::Action::Cancel
//! [`Action::Ban`]: arcade_p2p::mesh::scheduler::Action::Ban
//! [`REDIRECT_RETRY_AFTER`]: arcade_coordinator::herd::REDIRECT_RETRY_AFTER
//! [`Scheduler::handle_all`]: arcade_p2p::mesh::scheduler::Scheduler::handle_all
//! [`Herd::admit`]: arcade_coordinator::herd::Herd::admit
//! [`Herd::served`]: arcade_coordinator::herd::Herd::served

mod sim;
#[cfg(test)]
mod tests;

use std::time::Duration;

use arcade_p2p::mesh::scheduler::SchedulerConfig;

use crate::report::FleetReport;
use crate::scenario::Scenario;

/// The knobs of the model. [`Default`] takes every value that models a real setting from
/// the real defaults (agent `[download]`/`[mesh]`, coordinator `[serve]`).
#[derive(Debug, Clone, PartialEq)]
pub struct ModelOptions {
    /// Peers an agent learns when it starts (default 16, the coordinator's
    /// `MAX_PEER_HINTS`).
    pub peers_per_agent: usize,
    /// Concurrent chunk uploads per agent; more requests are refused busy (default: the
    /// agent's `mesh.max_uploads`, 8).
    pub max_uploads: usize,
    /// The burst of the agent's node-wide upload limiter, bytes (1 MiB, as the agent
    /// configures its host): an upload slot is released when the limiter lets its chunk
    /// go, i.e. when the bytes queued before it, less this burst, have left the uplink.
    pub upload_burst: u64,
    /// A request that would wait longer than this behind the uploads already queued at
    /// its uploader (less the burst) is refused busy (default: the agent's
    /// `mesh.max_upload_wait`, 1 s; zero: no limit).
    pub max_upload_wait: Duration,
    /// Most peers connected to one agent (default: `mesh.max_connections`, 256).
    pub max_connections: usize,
    /// Plugins one agent fetches at once (default: `download.concurrent`, 3).
    pub concurrent_fetches: usize,
    /// The scheduler configuration of every fetch (default: [`agent_scheduler_config`]).
    pub scheduler: SchedulerConfig,
    /// How often the driver ticks the scheduler (the real driver: 200 ms).
    pub tick: Duration,
    /// How often connected peers' bitfields are polled (the real driver: 250 ms).
    pub refresh: Duration,
    /// Herd window (default: coordinator `serve.herd_window`, 2 min).
    pub herd_window: Duration,
    /// Redirects per agent and chunk before it is served anyway (default: coordinator
    /// `serve.max_redirects`, 8; 0 disables herd protection).
    pub max_redirects: u32,
    /// Concurrent coordinator streams (default: `serve.max_streams`, 64).
    pub max_streams: usize,
    /// The retry-after of a coordinator busy with `max_streams` streams (200 ms, as in
    /// `download_plugin`).
    pub server_busy_retry: Duration,
    /// Coordinator time per chunk request, all cores together (requests are handled
    /// one after another, each taking this long, before the herd and the stream limit
    /// are asked). Default zero: an infinitely fast coordinator.
    pub server_rpc_cost: Duration,
    /// How long a departed agent still counts as online to the coordinator (default:
    /// three coordinator `jobs.heartbeat_interval`s, 30 s).
    pub holder_stale_after: Duration,
    /// What the agent driver does with a peer's busy refusal (default
    /// [`PeerBusy::Pause`] for the agent's `PEER_BUSY_RETRY`, as `agent/src/fetch/run.rs`
    /// does).
    pub peer_busy: PeerBusy,
    /// Stop at this simulated time (None: 100 × the scenario's bound + 60 s).
    pub max_sim_time: Option<Duration>,
    /// Stop after this many events (default 2 × 10⁹).
    pub max_events: u64,
    /// Stop after this much wall-clock time (default 5 min): a safety net for runs that
    /// would take hours (a fleet that collapses onto the coordinator). A run cut short
    /// this way is not reproducible; [`ModelStats::capped`] says so.
    pub max_wall: Option<Duration>,
    /// Print one line of progress to stderr per simulated second.
    pub progress: bool,
}

impl Default for ModelOptions {
    fn default() -> Self {
        let mesh = arcade_agent::config::MeshConfig::default();
        let download = arcade_agent::config::DownloadConfig::default();
        let serve = arcade_coordinator::config::ServeConfig::default();
        let jobs = arcade_coordinator::config::JobsConfig::default();
        Self {
            peers_per_agent: 16,
            max_uploads: mesh.max_uploads as usize,
            upload_burst: 1 << 20,
            max_upload_wait: mesh.max_upload_wait.get(),
            max_connections: mesh.max_connections as usize,
            concurrent_fetches: download.concurrent as usize,
            scheduler: agent_scheduler_config(),
            tick: Duration::from_millis(200),
            refresh: Duration::from_millis(250),
            herd_window: serve.herd_window.get(),
            max_redirects: serve.max_redirects,
            max_streams: serve.max_streams as usize,
            server_busy_retry: Duration::from_millis(200),
            server_rpc_cost: Duration::ZERO,
            holder_stale_after: jobs.heartbeat_interval.get() * 3,
            peer_busy: PeerBusy::Pause(arcade_agent::fetch::PEER_BUSY_RETRY),
            max_sim_time: None,
            max_events: 2_000_000_000,
            max_wall: Some(Duration::from_secs(300)),
            progress: false,
        }
    }
}

impl ModelOptions {
    /// The defaults with the settings the real-stack engine ([`crate::swarm`]) gives its
    /// coordinator and agents, for comparing the two engines on one scenario:
    /// `mesh.max_uploads = 16`, `serve.max_streams = 4 × agents + 16`,
    /// `download.request_timeout = 120 s` and a 500 ms heartbeat (a departed holder is noticed
    /// after 1.5 s).
    pub fn like_swarm_engine(scenario: &Scenario) -> Self {
        let mut o = Self {
            max_uploads: 16,
            max_streams: 4 * scenario.agents + 16,
            holder_stale_after: Duration::from_millis(1500),
            ..Self::default()
        };
        o.scheduler.request_timeout = Duration::from_secs(120);
        o
    }
}

/// What the agent driver does when a peer refuses a chunk request busy (every upload
/// slot taken).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerBusy {
    /// Feed [`Event::PeerBusy`](arcade_p2p::mesh::scheduler::Event::PeerBusy): the
    /// request is void and the peer is not asked for anything for this long, no strike.
    /// What the real driver does.
    Pause(Duration),
    /// Feed [`Event::RequestFailed`](arcade_p2p::mesh::scheduler::Event::RequestFailed):
    /// a strike for the peer, which is not asked for that chunk again while the
    /// coordinator is allowed. What the real driver did before busy answers were
    /// paused; kept for studies.
    Fail,
    /// Keep the request outstanding and ask the same peer again after this delay (plus
    /// one latency); the scheduler is not told. A driver-only alternative, for studies.
    Retry(Duration),
}

/// The [`SchedulerConfig`] the real agent uses with its default `[download]` settings
/// ([`arcade_agent::fetch::scheduler_config`]).
pub fn agent_scheduler_config() -> SchedulerConfig {
    arcade_agent::fetch::scheduler_config(&arcade_agent::config::DownloadConfig::default())
}

/// Where one chunk of one agent's plugin came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ChunkSource {
    /// It never arrived (the agent left or the run was cut short).
    Missing,
    /// From the coordinator.
    Server,
    /// From the agent of this index (`agent-{index:04}`).
    Peer(usize),
}

/// Counters of one model run (for tests and tuning).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ModelStats {
    /// Events processed.
    pub events: u64,
    /// Simulated time when the run stopped, nanoseconds.
    pub end_ns: u64,
    /// The run hit `max_sim_time`, `max_events` or `max_wall`.
    pub capped: bool,
    /// Chunk requests sent to the coordinator.
    pub server_requests: u64,
    /// Of those, redirected by the herd.
    pub redirects: u64,
    /// Of those, answered busy (`max_streams`).
    pub server_busy: u64,
    /// Coordinator streams skipped because the agent cancelled them before their turn.
    pub server_skipped: u64,
    /// Chunk requests sent to peers.
    pub peer_requests: u64,
    /// Of those, refused busy (no upload slot).
    pub peer_busy: u64,
    /// Peer requests withdrawn by a cancel before they were sent.
    pub cancelled_at_holder: u64,
    /// Peer bans issued by schedulers.
    pub bans: u64,
    /// Connections made (hints and redirects).
    pub connections: u64,
    /// Connections refused because one side had `max_connections` already.
    pub connections_refused: u64,
}

impl ModelStats {
    /// The counters by name, as the report shows them.
    pub fn counters(&self) -> std::collections::BTreeMap<String, u64> {
        [
            ("events", self.events),
            ("capped", u64::from(self.capped)),
            ("server_requests", self.server_requests),
            ("redirects", self.redirects),
            ("server_busy", self.server_busy),
            ("server_skipped", self.server_skipped),
            ("peer_requests", self.peer_requests),
            ("peer_busy", self.peer_busy),
            ("cancelled_at_holder", self.cancelled_at_holder),
            ("bans", self.bans),
            ("connections", self.connections),
            ("connections_refused", self.connections_refused),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }
}

/// A model run with its details.
#[derive(Debug, Clone)]
pub struct ModelRun {
    /// The report (the same as [`run`] returns).
    pub report: FleetReport,
    /// Per agent, per plugin (job order), per chunk: where it came from.
    pub sources: Vec<Vec<Vec<ChunkSource>>>,
    /// Counters.
    pub stats: ModelStats,
}

/// Runs `scenario` through the model and returns its report (engine `model`).
pub fn run(scenario: &Scenario, opts: &ModelOptions) -> anyhow::Result<FleetReport> {
    Ok(run_detailed(scenario, opts)?.report)
}

/// Runs `scenario` through the model and returns the report, every chunk's source and
/// the run's counters.
pub fn run_detailed(scenario: &Scenario, opts: &ModelOptions) -> anyhow::Result<ModelRun> {
    scenario.validate()?;
    anyhow::ensure!(
        opts.concurrent_fetches >= 1,
        "concurrent_fetches must be at least 1"
    );
    anyhow::ensure!(opts.max_streams >= 1, "max_streams must be at least 1");
    anyhow::ensure!(
        !opts.tick.is_zero() && !opts.refresh.is_zero(),
        "tick and refresh must be longer than zero"
    );
    Ok(sim::Sim::new(scenario, opts).run())
}
