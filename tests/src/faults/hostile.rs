//! Hostile peers (30 % of the swarm): corrupted chunks, false claims, stalls mid-chunk,
//! oversized and malformed messages, decompression bombs, replayed and foreign tickets.
//!
//! `hostile-peers`: one honest seed holds the plugin; three hostile peers — real libp2p
//! peers run by this module ([`HostilePeer`]: TCP + noise + yamux and a raw
//! `/arcade/chunks/1` codec, so they control every byte of a response) — enrol with the
//! coordinator as holders of the plugin; six more honest agents then fetch it at once
//! (7 honest, 3 hostile). Each hostile peer claims every chunk and misbehaves towards
//! each requester in one [`Misbehaviour`] (assigned in turn, so every kind meets several
//! agents). Hostile *clients* present to an honest agent an expired ticket (signed with
//! the coordinator's own key from its data directory, as it would have been two hours
//! earlier: the coordinator's shortest ticket TTL, 1 min, is too long to wait for),
//! another active peer's ticket, a ticket of another coordinator, and none.
//!
//! Properties: every honest job succeeded and its cached plugin has the pushed SHA-256;
//! every plugin execution ran the pushed bytes (the plugin logs the SHA-256 of itself);
//! every honest agent banned every hostile peer that misbehaved towards it early enough
//! in its fetch (a bad chunk once, anything else [`STRIKES`] times; a stall counts at the
//! requester's timeout) — its `peer_bans` against what the hostile peers recorded, and a
//! bad chunk counted (`bad_chunks{source="peer"}`) wherever a corrupting peer answered;
//! every kind of misbehaviour met at least one agent that banned it; an oversized length
//! prefix is dropped after a few bytes (no 4 GiB read); the bad tickets get
//! `REFUSAL_NOT_VOUCHED` for the right reason and no byte, while the same client with
//! its own ticket is served.
//!
//! The honest agents run the default download settings. A stalled request is hedged
//! after the scheduler's `hedge_after` (5 s) and the staller gets a strike when the
//! duplicate wins (before that was a strike, a slowloris peer was never banned: the
//! hedge's win cancelled its request before the 300 s request timeout).
//!
//! The helpers at the top (self-checking plugin, job waits, enrolment) are shared with
//! [`super::churn`].

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow, bail, ensure};
use arcade_agent::metrics::SourceLabel;
use arcade_p2p::labels::Labels;
use arcade_p2p::mesh::bitfield::Bitfield;
use arcade_p2p::mesh::host::{MeshError, MeshHandle, Multiaddr};
use arcade_p2p::mesh::protocol::{self, MAX_REQUEST_BYTES, PROTOCOL, refused};
use arcade_p2p::mesh::ticket::{PeerId, TicketIssuer};
use arcade_p2p::settings::{ByteSize, Seconds};
use arcade_p2p::{ContentId, Manifest};
use arcade_proto::v1 as pb;
use futures::{AsyncRead, AsyncWrite, AsyncWriteExt as _, StreamExt as _};
use libp2p::request_response::{self, ProtocolSupport};
use libp2p::swarm::SwarmEvent;
use libp2p::{StreamProtocol, noise, tcp, yamux};

use super::{Outcome, Scenario};
use crate::agents::TestAgent;
use crate::peers::bare_peer_as;
use crate::{ADMIN, Conn, ENROLL, TestCoordinator, content, create_job, eventually, finished_job};
use arcade_simulations::client::signed;

/// The scenarios of this module.
pub const SCENARIOS: &[(&str, Scenario)] = &[("hostile-peers", || Box::pin(hostile_peers()))];

// ----- shared helpers ---------------------------------------------------------------

/// Chunk size of the fault scenarios' coordinators.
pub const CHUNK: u32 = 64 * 1024;

/// Failures that ban a peer (the scheduler's default `max_strikes`).
pub const STRIKES: u32 = 3;

/// A plugin that appends `<sha256 of itself> <stage> <job id>` to `log` each time it
/// runs, then exits 0; `payload` bytes of deterministic content follow (never read by
/// the shell, which stops at `exit`).
pub fn self_checking_plugin(log: &Path, payload: usize, seed: u8) -> Vec<u8> {
    let mut p = format!(
        "#!/bin/sh\nh=$(sha256sum \"$0\")\necho \"${{h%% *}} $1 $ARCADE_JOB_ID\" >> '{}'\nexit 0\n",
        log.display()
    )
    .into_bytes();
    p.extend(content(payload, seed));
    p
}

/// One run of a [`self_checking_plugin`]: the SHA-256 of the bytes that ran, the stage,
/// the job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Execution {
    /// Hex SHA-256 of the executed file.
    pub sha256: String,
    /// Stage.
    pub stage: String,
    /// Job id.
    pub job: String,
}

/// The executions `log` records.
pub fn executions(log: &Path) -> Vec<Execution> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .map(|l| {
            let mut f = l.split(' ');
            let mut next = || f.next().unwrap_or_default().to_owned();
            Execution {
                sha256: next(),
                stage: next(),
                job: next(),
            }
        })
        .collect()
}

/// Checks that every execution in `log` ran `sha` and that each of `jobs` ran it.
pub fn check_executions(log: &Path, sha: &ContentId, jobs: &[String]) -> anyhow::Result<usize> {
    let runs = executions(log);
    if let Some(bad) = runs.iter().find(|r| r.sha256 != sha.to_hex()) {
        bail!(
            "property `no corrupt plugin is ever executed` failed: job {} ran a plugin with SHA-256 {} in stage {} (pushed {sha})",
            bad.job,
            bad.sha256,
            bad.stage
        );
    }
    for job in jobs {
        ensure!(
            runs.iter().any(|r| &r.job == job),
            "job {job} succeeded but its plugin never ran (no line in {})",
            log.display()
        );
    }
    Ok(runs.len())
}

/// Creates one job needing `plugin@1.0.0` for each agent named in `names` (selected by
/// its `name` label); returns `(agent, job id)` pairs.
pub async fn start_jobs(c: &Conn, plugin: &str, names: &[String]) -> Vec<(String, String)> {
    let mut jobs = Vec::new();
    for n in names {
        let id = create_job(c, plugin, "1.0.0", "true", &[("name", n)]).await;
        jobs.push((n.clone(), id));
    }
    jobs
}

/// Waits for every job of [`start_jobs`] and fails unless each succeeded.
pub async fn all_succeeded(
    c: &Conn,
    jobs: &[(String, String)],
    limit: Duration,
    property: &str,
) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + limit;
    for (agent, id) in jobs {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let job = finished_job(c, id, left)
            .await
            .with_context(|| format!("property `{property}` failed: agent {agent}"))?;
        ensure!(
            job.status() == pb::JobStatus::Succeeded,
            "property `{property}` failed: the job of agent {agent} ended {:?}: {}",
            job.status(),
            job.error_message
        );
    }
    Ok(())
}

/// Starts an agent called `name` (label `name=<name>`) with `tweak` applied.
pub async fn labelled_agent(
    url: &str,
    name: &str,
    tweak: impl FnOnce(&mut arcade_agent::config::AgentConfig),
) -> TestAgent {
    TestAgent::start(url, ENROLL, name, |cfg, _| {
        cfg.labels.insert("name".into(), name.into());
        tweak(cfg);
    })
    .await
}

/// The fleet as the coordinator lists it, by agent id.
pub async fn fleet(c: &Conn) -> anyhow::Result<HashMap<String, pb::AgentSummary>> {
    Ok(c.fleet(ADMIN)
        .await
        .list_agents(pb::ListAgentsRequest {})
        .await
        .context("list agents")?
        .into_inner()
        .agents
        .into_iter()
        .map(|a| (a.agent_id.clone(), a))
        .collect())
}

/// Waits (at most `limit`) until the coordinator lists `agent` as holding `sha`.
pub async fn wait_holder(
    c: &Conn,
    agent: &str,
    sha: &ContentId,
    limit: Duration,
) -> anyhow::Result<()> {
    let sha = sha.to_hex();
    eventually(limit, || async {
        let f = fleet(c).await.ok()?;
        f.get(agent)?
            .installed_plugins
            .iter()
            .any(|p| p.sha256 == sha)
            .then_some(())
    })
    .await
    .ok_or_else(|| anyhow!("the coordinator never listed {agent} as a holder of {sha}"))
}

/// SHA-256 of the plugin `a` cached as `sha`.
pub fn cached_sha256(a: &TestAgent, sha: &ContentId) -> anyhow::Result<ContentId> {
    let path = a.plugin_dir().join("downloaded").join(sha.to_hex());
    let bytes = std::fs::read(&path).with_context(|| format!("read {}", path.display()))?;
    Ok(ContentId::of_bytes(&bytes))
}

/// Checks the SHA-256 of the plugin cached by each of `agents`.
pub fn check_cached(agents: &[&TestAgent], sha: &ContentId) -> anyhow::Result<()> {
    for a in agents {
        let got = cached_sha256(a, sha).with_context(|| {
            format!(
                "property `every agent ends with the right SHA-256` failed: agent {}",
                a.config.id
            )
        })?;
        ensure!(
            &got == sha,
            "property `every agent ends with the right SHA-256` failed: agent {} cached {got}, pushed {sha}",
            a.config.id
        );
    }
    Ok(())
}

/// Fast heartbeats and short leases: holders are listed (and dead ones dropped) quickly.
pub fn fast_fleet(cfg: &mut arcade_coordinator::CoordinatorConfig) {
    cfg.jobs.heartbeat_interval = Seconds(Duration::from_millis(300));
    cfg.jobs.lease_ttl = Seconds::secs(5);
}

/// Verified plugin bytes `a` got from `source` (`peer` or `server`).
pub fn fetched(a: &TestAgent, source: &str) -> u64 {
    a.agent().metrics().fetched_from(source)
}

/// Chunks from peers that failed their BLAKE3 check at `a`.
pub fn bad_peer_chunks(a: &TestAgent) -> u64 {
    a.agent()
        .metrics()
        .bad_chunks
        .get_or_create(&SourceLabel {
            source: "peer".into(),
        })
        .get()
}

/// A peer enrolled with the coordinator by hand as a holder of a plugin, kept online by
/// heartbeats until dropped.
pub struct Enrolled {
    /// What registration returned (its mesh ticket, the coordinator key).
    pub registration: pb::RegisterResponse,
    keepalive: tokio::task::JoinHandle<()>,
}

impl Drop for Enrolled {
    fn drop(&mut self) {
        self.keepalive.abort();
    }
}

/// Registers `agent_id` as libp2p peer `peer` at `addrs`, holding `installed`, and
/// heartbeats for it every 200 ms.
pub async fn enroll(
    c: &Conn,
    agent_id: &str,
    peer: &PeerId,
    addrs: &[Multiaddr],
    installed: Vec<pb::InstalledPlugin>,
) -> anyhow::Result<Enrolled> {
    let registration = c
        .agent(ENROLL)
        .await
        .register(signed(pb::RegisterRequest {
            agent_id: agent_id.into(),
            peer_id: peer.to_string(),
            addrs: addrs.iter().map(ToString::to_string).collect(),
            installed_plugins: installed,
            ..Default::default()
        }))
        .await
        .with_context(|| format!("register {agent_id}"))?
        .into_inner();
    let mut client = c.agent(&registration.agent_token).await;
    let keepalive = tokio::spawn(async move {
        loop {
            let _ = client.heartbeat(pb::HeartbeatRequest::default()).await;
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    Ok(Enrolled {
        registration,
        keepalive,
    })
}

/// When each of some agents held a whole plugin, as watched by [`watch_completion`];
/// the watch stops when dropped.
pub struct CompletionWatch(Option<tokio::task::JoinHandle<Vec<Option<Instant>>>>);

impl CompletionWatch {
    /// When each agent got there (`None`: not within the watch's limit).
    pub async fn done(mut self) -> anyhow::Result<Vec<Option<Instant>>> {
        let task = self.0.take().context("the watch was already read")?;
        Ok(task.await?)
    }
}

impl Drop for CompletionWatch {
    fn drop(&mut self) {
        if let Some(task) = self.0.take() {
            task.abort();
        }
    }
}

/// Watches the agents' metrics (for at most `limit`) until each holds `size` verified
/// bytes.
pub fn watch_completion(agents: &[&TestAgent], size: u64, limit: Duration) -> CompletionWatch {
    let metrics: Vec<_> = agents.iter().map(|a| a.agent().metrics().clone()).collect();
    CompletionWatch(Some(tokio::spawn(async move {
        let mut done = vec![None; metrics.len()];
        let deadline = Instant::now() + limit;
        while done.iter().any(Option::is_none) && Instant::now() < deadline {
            for (d, m) in done.iter_mut().zip(&metrics) {
                if d.is_none() && m.fetched_from("peer") + m.fetched_from("server") >= size {
                    *d = Some(Instant::now());
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        done
    })))
}

// ----- hostile peers ----------------------------------------------------------------

/// How a hostile peer answers one requester's chunk requests (it always claims every
/// chunk when asked for its bitfield).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Misbehaviour {
    /// Well-formed chunks of the right size with the wrong bytes.
    Corrupt,
    /// "I do not hold that chunk" (`REFUSAL_NO_CHUNK`) after claiming all of them.
    Liar,
    /// A length prefix of 4 GiB (over `MAX_RESPONSE_BYTES`), then bytes as fast as the
    /// requester takes them.
    Oversized,
    /// A valid length prefix followed by bytes that are not protobuf.
    Malformed,
    /// The prefix and half of a chunk, then nothing (slowloris).
    Slowloris,
    /// A zstd "chunk" that declares no size and decompresses to 64 times the chunk's
    /// length (a decompression bomb).
    Bomb,
}

impl Misbehaviour {
    /// Every kind, in the order requesters are assigned them.
    pub const ALL: [Misbehaviour; 6] = [
        Self::Corrupt,
        Self::Liar,
        Self::Oversized,
        Self::Malformed,
        Self::Slowloris,
        Self::Bomb,
    ];

    /// Chunk requests after which a requester must have banned the peer.
    pub fn bans_after(self) -> u32 {
        match self {
            Self::Corrupt | Self::Bomb => 1,
            _ => STRIKES,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::Corrupt => "corrupt",
            Self::Liar => "liar",
            Self::Oversized => "oversized",
            Self::Malformed => "malformed",
            Self::Slowloris => "slowloris",
            Self::Bomb => "bomb",
        }
    }
}

/// What a hostile peer saw of one requester.
#[derive(Debug, Clone)]
pub struct Contact {
    /// How it treats this requester.
    pub misbehaviour: Misbehaviour,
    /// Bitfield requests (answered: every chunk).
    pub bitfields: u32,
    /// When each chunk request came (answered with the misbehaviour).
    pub chunks: Vec<Instant>,
}

impl Contact {
    /// Whether the requester must have banned this peer, given that its fetch ended at
    /// `done`: enough chunk requests came early enough for their failures (immediate,
    /// or `stall_struck_after` for a stall) to count before the end, with `slack`.
    pub fn ban_due(&self, done: Instant, stall_struck_after: Duration, slack: Duration) -> bool {
        let answered_within = match self.misbehaviour {
            Misbehaviour::Slowloris => stall_struck_after,
            _ => Duration::ZERO,
        };
        let counted = self
            .chunks
            .iter()
            .filter(|&&at| at + answered_within + slack <= done)
            .count();
        counted as u32 >= self.misbehaviour.bans_after()
    }
}

/// How an oversized response ended on the hostile side.
#[derive(Debug, Clone)]
pub struct OversizedPush {
    /// Bytes written after the 4 GiB length prefix before the stream failed or stalled.
    pub pushed: u64,
    /// `reset` (the requester dropped the stream), `blocked` (it stopped reading) or
    /// `accepted` (it read everything offered: the limit was not enforced).
    pub ended: &'static str,
}

#[derive(Debug, Default)]
struct Ledger {
    contacts: HashMap<PeerId, Contact>,
    oversized: Vec<OversizedPush>,
}

/// Most bytes an oversized response offers after its prefix.
const OVERSIZED_OFFER: u64 = 64 << 20;
/// How long a slowloris response holds its stream.
const STALL: Duration = Duration::from_secs(30);

/// A response of the hostile codec.
#[derive(Debug)]
enum Reply {
    /// A well-formed message.
    Message(pb::ChunkResponse),
    Oversized,
    Malformed,
    /// Half of this (well-formed) chunk response, then a stall.
    Stall(pb::ChunkResponse),
}

/// The `/arcade/chunks/1` codec of a hostile peer: reads requests like the real one,
/// writes whatever [`Reply`] says, byte by byte.
#[derive(Clone)]
struct HostileCodec {
    ledger: Arc<Mutex<Ledger>>,
}

fn unsupported<T>() -> std::io::Result<T> {
    Err(std::io::Error::new(
        std::io::ErrorKind::Unsupported,
        "a hostile peer only answers",
    ))
}

impl HostileCodec {
    async fn write<T>(&self, io: &mut T, reply: Reply) -> std::io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        match reply {
            Reply::Message(m) => protocol::write_response(io, &m).await,
            Reply::Malformed => {
                // Field 1 with wire type 7, which does not exist.
                let mut bytes = 64u32.to_be_bytes().to_vec();
                bytes.extend([0x0F; 64]);
                io.write_all(&bytes).await?;
                io.close().await
            }
            Reply::Stall(m) => {
                let mut framed = futures::io::Cursor::new(Vec::new());
                protocol::write_response(&mut framed, &m).await?;
                let framed = framed.into_inner();
                io.write_all(&framed[..framed.len() / 2]).await?;
                io.flush().await?;
                tokio::time::sleep(STALL).await;
                unsupported()
            }
            Reply::Oversized => {
                io.write_all(&u32::MAX.to_be_bytes()).await?;
                io.flush().await?;
                let block = vec![0u8; 64 * 1024];
                let mut push = OversizedPush {
                    pushed: 0,
                    ended: "accepted",
                };
                while push.pushed < OVERSIZED_OFFER {
                    match tokio::time::timeout(Duration::from_secs(1), io.write_all(&block)).await {
                        Ok(Ok(())) => push.pushed += block.len() as u64,
                        Ok(Err(_)) => {
                            push.ended = "reset";
                            break;
                        }
                        Err(_) => {
                            push.ended = "blocked";
                            break;
                        }
                    }
                }
                self.ledger
                    .lock()
                    .expect("ledger lock")
                    .oversized
                    .push(push);
                unsupported()
            }
        }
    }
}

#[async_trait::async_trait]
impl request_response::Codec for HostileCodec {
    type Protocol = StreamProtocol;
    type Request = pb::ChunkRequest;
    type Response = Reply;

    async fn read_request<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
    ) -> std::io::Result<pb::ChunkRequest>
    where
        T: AsyncRead + Unpin + Send,
    {
        protocol::read_message(io, MAX_REQUEST_BYTES).await
    }

    async fn read_response<T>(&mut self, _: &StreamProtocol, _: &mut T) -> std::io::Result<Reply>
    where
        T: AsyncRead + Unpin + Send,
    {
        unsupported()
    }

    async fn write_request<T>(
        &mut self,
        _: &StreamProtocol,
        _: &mut T,
        _: pb::ChunkRequest,
    ) -> std::io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        unsupported()
    }

    async fn write_response<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        reply: Reply,
    ) -> std::io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        self.write(io, reply).await
    }
}

/// A hostile libp2p peer that claims every chunk of one content and misbehaves towards
/// each requester; stops when dropped.
pub struct HostilePeer {
    peer_id: PeerId,
    addrs: Vec<Multiaddr>,
    ledger: Arc<Mutex<Ledger>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for HostilePeer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// What the hostile peer's swarm task needs to answer.
struct Claim {
    manifest: Manifest,
    /// Index of this peer: requester `k` (in order of first contact) gets
    /// `Misbehaviour::ALL[(turn + k) % 6]`.
    turn: usize,
    ledger: Arc<Mutex<Ledger>>,
}

impl Claim {
    fn answer(&self, peer: PeerId, request: &pb::ChunkRequest) -> Reply {
        if request.content.as_slice() != self.manifest.content_id().as_bytes() {
            return Reply::Message(refused(pb::Refusal::UnknownContent, "unknown content"));
        }
        let mut ledger = self.ledger.lock().expect("ledger lock");
        let seen = ledger.contacts.len();
        let contact = ledger.contacts.entry(peer).or_insert_with(|| Contact {
            misbehaviour: Misbehaviour::ALL[(self.turn + seen) % Misbehaviour::ALL.len()],
            bitfields: 0,
            chunks: Vec::new(),
        });
        let index = match request.kind {
            Some(pb::chunk_request::Kind::Chunk(i)) => i,
            _ => {
                contact.bitfields += 1;
                let all = Bitfield::full(self.manifest.chunk_count());
                return Reply::Message(pb::ChunkResponse {
                    kind: Some(pb::chunk_response::Kind::Held(pb::HeldChunks {
                        chunks: all.len(),
                        bits: all.to_bytes(),
                    })),
                });
            }
        };
        contact.chunks.push(Instant::now());
        let len = self
            .manifest
            .chunk_range(index)
            .map_or(CHUNK as u64, |r| r.end - r.start) as usize;
        let chunk = |fill: u8| pb::ChunkResponse {
            kind: Some(pb::chunk_response::Kind::Chunk(pb::ChunkData {
                index,
                data: vec![fill; len].into(),
                encoding: pb::ChunkEncoding::Raw as i32,
            })),
        };
        let bomb = || {
            let mut enc = zstd::stream::Encoder::new(Vec::new(), 3).expect("zstd encoder");
            let _ = enc.include_contentsize(false);
            let _ = std::io::Write::write_all(&mut enc, &vec![0u8; len * 64]);
            pb::ChunkResponse {
                kind: Some(pb::chunk_response::Kind::Chunk(pb::ChunkData {
                    index,
                    data: enc.finish().expect("zstd frame").into(),
                    encoding: pb::ChunkEncoding::Zstd as i32,
                })),
            }
        };
        match contact.misbehaviour {
            Misbehaviour::Corrupt => Reply::Message(chunk(0xAA)),
            Misbehaviour::Liar => Reply::Message(refused(
                pb::Refusal::NoChunk,
                format!("chunk {index} is not held here"),
            )),
            Misbehaviour::Oversized => Reply::Oversized,
            Misbehaviour::Malformed => Reply::Malformed,
            Misbehaviour::Slowloris => Reply::Stall(chunk(0x55)),
            Misbehaviour::Bomb => Reply::Message(bomb()),
        }
    }
}

impl HostilePeer {
    /// Starts a hostile peer on loopback claiming `manifest`'s content; `turn` staggers
    /// the misbehaviours of several hostile peers.
    pub async fn start(manifest: Manifest, turn: usize) -> anyhow::Result<Self> {
        let ledger = Arc::new(Mutex::new(Ledger::default()));
        let codec = HostileCodec {
            ledger: ledger.clone(),
        };
        // It enrols as `hostile-{turn}`, so it has that simulated agent's key.
        let key = arcade_simulations::client::agent_key(&format!("hostile-{turn}"));
        let mut swarm = libp2p::SwarmBuilder::with_existing_identity(key)
            .with_tokio()
            .with_tcp(
                tcp::Config::default().nodelay(true),
                noise::Config::new,
                yamux::Config::default,
            )?
            .with_behaviour(|_| {
                request_response::Behaviour::with_codec(
                    codec,
                    [(PROTOCOL, ProtocolSupport::Inbound)],
                    request_response::Config::default()
                        .with_request_timeout(STALL * 2)
                        .with_max_concurrent_streams(256),
                )
            })
            .map_err(|e| anyhow!("hostile behaviour: {e}"))?
            .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(60)))
            .build();
        swarm.listen_on("/ip4/127.0.0.1/tcp/0".parse()?)?;
        let addr = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                if let SwarmEvent::NewListenAddr { address, .. } = swarm.select_next_some().await {
                    return address;
                }
            }
        })
        .await
        .context("the hostile peer's listener did not come up")?;
        let peer_id = *swarm.local_peer_id();
        let claim = Claim {
            manifest,
            turn,
            ledger: ledger.clone(),
        };
        let task = tokio::spawn(async move {
            loop {
                if let SwarmEvent::Behaviour(request_response::Event::Message {
                    peer,
                    message:
                        request_response::Message::Request {
                            request, channel, ..
                        },
                    ..
                }) = swarm.select_next_some().await
                {
                    let reply = claim.answer(peer, &request);
                    let _ = swarm.behaviour_mut().send_response(channel, reply);
                }
            }
        });
        Ok(Self {
            peer_id,
            addrs: vec![addr],
            ledger,
            task,
        })
    }

    /// Its peer id.
    pub fn peer_id(&self) -> PeerId {
        self.peer_id
    }

    /// Its listen addresses.
    pub fn addrs(&self) -> &[Multiaddr] {
        &self.addrs
    }

    /// What it saw of `requester`.
    pub fn contact(&self, requester: &PeerId) -> Option<Contact> {
        self.ledger
            .lock()
            .expect("ledger lock")
            .contacts
            .get(requester)
            .cloned()
    }

    /// How its oversized responses ended.
    pub fn oversized(&self) -> Vec<OversizedPush> {
        self.ledger.lock().expect("ledger lock").oversized.clone()
    }
}

// ----- hostile clients (tickets) ----------------------------------------------------

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// The honest agent a hostile client targets.
struct Target {
    peer: PeerId,
    addrs: Vec<Multiaddr>,
    content: ContentId,
    chunks: u32,
}

impl Target {
    /// Asks for the bitfield and chunk 0 with `ticket`: `Ok(refusal message)` when both
    /// are refused as not vouched, an error naming what was served otherwise.
    async fn refused(
        &self,
        thief: &MeshHandle,
        ticket: Vec<u8>,
        key: &[u8],
    ) -> anyhow::Result<String> {
        thief.set_credentials(ticket, key).await?;
        let held = thief
            .held(self.peer, self.addrs.clone(), &self.content, self.chunks)
            .await;
        let chunk = thief
            .chunk(self.peer, self.addrs.clone(), &self.content, 0)
            .await;
        match (held, chunk) {
            (
                Err(MeshError::Refused {
                    reason: pb::Refusal::NotVouched,
                    ..
                }),
                Err(MeshError::Refused {
                    reason: pb::Refusal::NotVouched,
                    message,
                }),
            ) => Ok(message),
            (held, chunk) => bail!(
                "bitfield answer {:?}, chunk answer {:?}",
                held.map(|b| b.count()),
                chunk.map(|c| c.len())
            ),
        }
    }
}

/// Presents bad tickets to `target`: an expired one signed with the coordinator's real
/// key, one the coordinator issued to another (active) peer, a forged one and none.
/// The same client with its own ticket is then served (so the refusals are the
/// tickets' doing). Returns how many bad tickets were refused.
async fn bad_tickets(c: &TestCoordinator, target: &Target) -> anyhow::Result<usize> {
    let property = "property `replayed and foreign tickets are refused` failed";
    let key_bytes =
        std::fs::read(c.config.data_dir.join("mesh.key")).context("coordinator mesh key")?;
    let coordinator = TicketIssuer::from_bytes(&key_bytes).map_err(|e| anyhow!("mesh key: {e}"))?;
    let thief = bare_peer_as("ticket-thief").await?;
    let owner = bare_peer_as("ticket-owner").await?;
    let none: &[Multiaddr] = &[];
    let thief_reg = enroll(c, "ticket-thief", &thief.peer_id(), none, vec![]).await?;
    let owner_reg = enroll(c, "ticket-owner", &owner.peer_id(), none, vec![]).await?;
    let key = thief_reg.registration.mesh_public_key.clone();
    ensure!(
        key == coordinator.public_key(),
        "the key in data_dir is not the one tickets are signed with"
    );
    // The rightful owner uses its ticket first (the target remembers it for that peer).
    owner
        .set_credentials(owner_reg.registration.mesh_ticket.clone(), &key)
        .await?;
    owner
        .held(
            target.peer,
            target.addrs.clone(),
            &target.content,
            target.chunks,
        )
        .await
        .context("the owner of a valid ticket was not served")?;

    let hour = 3_600_000;
    let labels = Labels::new();
    let cases = [
        (
            "an expired ticket",
            coordinator
                .issue(
                    &thief.peer_id(),
                    "ticket-thief",
                    &labels,
                    now_ms() - 2 * hour,
                    hour,
                )
                .map_err(|e| anyhow!("{e}"))?,
            "expired",
        ),
        (
            "another peer's ticket",
            owner_reg.registration.mesh_ticket.clone(),
            "issued to peer",
        ),
        (
            "a ticket of another coordinator",
            TicketIssuer::generate()
                .issue(&thief.peer_id(), "ticket-thief", &labels, now_ms(), hour)
                .map_err(|e| anyhow!("{e}"))?,
            "signature",
        ),
        ("no ticket", Vec::new(), ""),
    ];
    for (what, ticket, says) in &cases {
        let message = target
            .refused(&thief, ticket.clone(), &key)
            .await
            .with_context(|| format!("{property}: {what} was not refused as not vouched"))?;
        ensure!(
            message.contains(says),
            "{property}: {what} was refused for another reason: {message}"
        );
    }
    // Control: the same peer with its own ticket gets a chunk.
    thief
        .set_credentials(thief_reg.registration.mesh_ticket.clone(), &key)
        .await?;
    thief
        .chunk(target.peer, target.addrs.clone(), &target.content, 0)
        .await
        .context("control failed: the client was not served with its own ticket")?;
    thief.shutdown().await;
    owner.shutdown().await;
    Ok(cases.len())
}

// ----- the scenario -----------------------------------------------------------------

/// Honest agents fetching at once (besides the seed).
const FETCHERS: usize = 6;
/// Hostile peers: 3 of 10.
const HOSTILE: usize = 3;
/// Margin for a failure to reach the requester's scheduler before its fetch ends.
const SLACK: Duration = Duration::from_millis(1500);
/// Plugin payload size (64 chunks).
const SIZE: usize = 4 << 20;

fn honest(cfg: &mut arcade_agent::config::AgentConfig) {
    // Slow uploads keep most fetches longer than the hedge delay, so requesters meet
    // the stalls' strikes before they are done.
    cfg.mesh.upload_rate = ByteSize::kib(256);
}

/// The `hostile-peers` scenario.
pub async fn hostile_peers() -> anyhow::Result<Outcome> {
    let c = TestCoordinator::start(|cfg| {
        fast_fleet(cfg);
        cfg.serve.egress_rate = ByteSize::mib(1);
    })
    .await;
    let logs = tempfile::tempdir()?;
    let log = logs.path().join("executions");
    let data = self_checking_plugin(&log, SIZE, 7);
    c.push("hostile/tool", "1.0.0", &data, Default::default())
        .await?;
    let manifest = Manifest::from_reader(&data[..], CHUNK)?;
    let sha = manifest.content_id();
    drop(data);
    let mut job_ids = Vec::new();
    let download = arcade_agent::config::AgentConfig::default().download;
    let scheduler = arcade_agent::fetch::scheduler_config(&download);
    ensure!(
        scheduler.max_strikes == STRIKES && scheduler.hedge_after < scheduler.request_timeout,
        "the agents' scheduler changed ({scheduler:?}): revisit STRIKES and the stall rule"
    );
    // A stall is struck when the hedge sent after `hedge_after` wins.
    let stall_struck_after = scheduler.hedge_after;

    // The honest seed gets the plugin from the coordinator.
    let seed = labelled_agent(&c.url, "honest-seed", honest).await;
    let jobs = start_jobs(&c, "hostile/tool", &["honest-seed".into()]).await;
    all_succeeded(
        &c,
        &jobs,
        Duration::from_secs(60),
        "the seed gets the plugin",
    )
    .await?;
    job_ids.extend(jobs.into_iter().map(|(_, id)| id));
    wait_holder(&c, "honest-seed", &sha, Duration::from_secs(20)).await?;

    // Three hostile peers enrol as holders.
    let installed = vec![pb::InstalledPlugin {
        plugin_id: "hostile/tool".into(),
        version: "1.0.0".into(),
        sha256: sha.to_hex(),
    }];
    let mut hostile = Vec::new();
    let mut enrolled = Vec::new();
    for turn in 0..HOSTILE {
        let h = HostilePeer::start(manifest.clone(), turn).await?;
        let name = format!("hostile-{turn}");
        enrolled.push(enroll(&c, &name, &h.peer_id(), h.addrs(), installed.clone()).await?);
        wait_holder(&c, &name, &sha, Duration::from_secs(20)).await?;
        hostile.push(h);
    }

    // Hostile clients with bad tickets against the seed.
    let seed_summary = fleet(&c)
        .await?
        .remove("honest-seed")
        .context("the seed is not listed")?;
    let target = Target {
        peer: seed_summary.peer_id.parse()?,
        addrs: seed_summary
            .addrs
            .iter()
            .filter_map(|a| a.parse().ok())
            .collect(),
        content: sha,
        chunks: manifest.chunk_count(),
    };
    let tickets_refused = bad_tickets(&c, &target).await?;

    // The fleet fetch: six honest agents at once, pointed at the seed and the hostile peers.
    let names: Vec<String> = (0..FETCHERS).map(|i| format!("honest-{i}")).collect();
    let mut fetchers = Vec::new();
    for n in &names {
        fetchers.push(labelled_agent(&c.url, n, honest).await);
    }
    let watch = watch_completion(
        &fetchers.iter().collect::<Vec<_>>(),
        manifest.size(),
        Duration::from_secs(120),
    );
    let jobs = start_jobs(&c, "hostile/tool", &names).await;
    all_succeeded(
        &c,
        &jobs,
        Duration::from_secs(120),
        "every honest agent ends with the right SHA-256",
    )
    .await?;
    job_ids.extend(jobs.into_iter().map(|(_, id)| id));
    let done = watch.done().await?;
    drop(enrolled);

    let mut all: Vec<&TestAgent> = vec![&seed];
    all.extend(fetchers.iter());
    check_cached(&all, &sha)?;
    let runs = check_executions(&log, &sha, &job_ids)?;

    // Bans: each fetcher banned every hostile peer that misbehaved towards it early
    // enough in its fetch to be banned.
    let listed = fleet(&c).await?;
    let mut banned: BTreeMap<Misbehaviour, u32> = BTreeMap::new();
    let mut contacted = [0u32; HOSTILE];
    let mut other_bans = 0;
    for (a, done) in fetchers.iter().zip(done) {
        let id = &a.config.id;
        let done = done.with_context(|| format!("{id} never counted every byte"))?;
        let peer: PeerId = listed
            .get(id)
            .with_context(|| format!("{id} is not listed"))?
            .peer_id
            .parse()?;
        let mut due = Vec::new();
        for (i, h) in hostile.iter().enumerate() {
            let Some(contact) = h.contact(&peer) else {
                continue;
            };
            if !contact.chunks.is_empty() {
                contacted[i] += 1;
            }
            if contact.ban_due(done, stall_struck_after, SLACK) {
                due.push(contact.misbehaviour);
            }
        }
        let bans = a.agent().metrics().peer_bans.get();
        ensure!(
            bans >= due.len() as u64,
            "property `the hostile peers are banned` failed: {id} banned {bans} peer(s), but {} hostile peers misbehaved towards it early enough to be banned: {due:?}",
            due.len()
        );
        if due.contains(&Misbehaviour::Corrupt) || due.contains(&Misbehaviour::Bomb) {
            ensure!(
                bad_peer_chunks(a) >= 1,
                "property `corrupted chunks are caught` failed: {id} got chunks from a corrupting or bombing peer but counted no bad chunk"
            );
        }
        other_bans += bans - due.len() as u64;
        for m in due {
            *banned.entry(m).or_default() += 1;
        }
    }
    for (i, n) in contacted.iter().enumerate() {
        ensure!(
            *n > 0,
            "hostile-{i} was never asked for a chunk: the scenario did not test it"
        );
    }
    for m in Misbehaviour::ALL {
        ensure!(
            banned.contains_key(&m),
            "no honest agent met a {} peer early enough to ban it: the scenario did not test it",
            m.name()
        );
    }
    let oversized: Vec<OversizedPush> = hostile.iter().flat_map(HostilePeer::oversized).collect();
    for push in &oversized {
        ensure!(
            push.ended != "accepted" && push.pushed <= 16 << 20,
            "property `oversized messages are refused before allocation` failed: a requester read {} bytes after a 4 GiB length prefix ({})",
            push.pushed,
            push.ended
        );
    }
    ensure!(
        !oversized.is_empty(),
        "no oversized reply was written: the scenario did not test it"
    );
    let max_pushed = oversized.iter().map(|p| p.pushed).max().unwrap_or(0);

    let peer_bytes = all.iter().map(|a| fetched(a, "peer")).sum();
    let server_bytes = all.iter().map(|a| fetched(a, "server")).sum();
    let bans = all
        .iter()
        .map(|a| a.agent().metrics().peer_bans.get())
        .sum();
    let kinds: Vec<String> = banned
        .iter()
        .map(|(m, n)| format!("{} {n}", m.name()))
        .collect();
    Ok(Outcome {
        outcome: format!(
            "{}/{} honest verified, {runs} runs all of the pushed bytes; {HOSTILE} hostile peers banned in {} (agent, peer) pairs ({}), {other_bans} other bans; {} oversized replies cut after <= {} KiB; {tickets_refused} bad tickets refused",
            all.len(),
            all.len(),
            banned.values().sum::<u32>(),
            kinds.join(", "),
            oversized.len(),
            max_pushed / 1024
        ),
        peer_bytes,
        server_bytes,
        bans,
        ..Default::default()
    })
}
