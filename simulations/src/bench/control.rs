//! `arcade-sim bench-fleet`: the coordinator's control plane at fleet scale. A real
//! coordinator child process (this binary re-executed as `arcade-sim coordinator …`);
//! N simulated agents that speak real gRPC over loopback — each registers, heartbeats
//! every `jobs.heartbeat_interval` (spread over the interval), long-polls `FetchJob` and
//! reports success at once for every job it gets; a creator offering jobs (one command,
//! no plugin) at a fixed rate with a bounded number of `CreateJob` calls in flight.
//!
//! Reported: jobs done per second over the window, create → lease latency (from the
//! moment `CreateJob` was sent to the moment an agent's `FetchJob` returned the job; both
//! clocks are this process's), p50/p99 of every RPC, the coordinator's CPU (cores, from
//! `/proc/PID/stat`) and peak RSS (VmHWM), and its store writes and group commits
//! (from its `/metrics`). The load generator shares the machine: its own CPU is
//! reported too.

use std::collections::HashMap;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use arcade_proto::auth::{Authed, Bearer};
use arcade_proto::v1 as pb;
use arcade_proto::v1::agent_client::AgentClient;
use arcade_proto::v1::jobs_client::JobsClient;
use serde::Serialize;
use tokio::sync::{Mutex, Semaphore};
use tokio_util::sync::CancellationToken;
use tonic::service::interceptor::InterceptedService;

use crate::process::CoordinatorProcess;

const ADMIN: &str = "bench-admin-token";
const ENROLL: &str = "bench-enroll-token";

/// What to run.
#[derive(Debug, Clone)]
pub struct FleetBenchOptions {
    /// Simulated agents.
    pub agents: usize,
    /// Jobs offered per second (0 = as fast as the in-flight bound allows).
    pub jobs_per_s: f64,
    /// Length of the measured window.
    pub seconds: f64,
    /// Most `CreateJob` calls in flight (1 = a CI server creating jobs one at a time).
    pub in_flight: usize,
    /// Heartbeat interval the coordinator asks for.
    pub heartbeat_s: u64,
    /// TCP connections the agents share (agents / connections per connection).
    pub connections: usize,
    /// Another coordinator binary to measure (an `arcade-coordinator` of an earlier
    /// build, say); `None` = this build. Its config gets only the keys every version
    /// knows (`[agents]` limits stay at that binary's defaults).
    pub coordinator_bin: Option<std::path::PathBuf>,
}

/// p50 / p99 / max of one latency, ms.
#[derive(Debug, Clone, Serialize, Default)]
pub struct Latency {
    /// Samples.
    pub count: usize,
    /// Median, ms.
    pub p50_ms: f64,
    /// 99th percentile, ms.
    pub p99_ms: f64,
    /// Largest, ms.
    pub max_ms: f64,
}

impl Latency {
    fn of(mut samples: Vec<f64>) -> Self {
        if samples.is_empty() {
            return Self::default();
        }
        samples.sort_by(f64::total_cmp);
        let at = |q: f64| samples[((samples.len() - 1) as f64 * q).round() as usize];
        Self {
            count: samples.len(),
            p50_ms: at(0.5),
            p99_ms: at(0.99),
            max_ms: *samples.last().expect("not empty"),
        }
    }
}

/// The figures.
#[derive(Debug, Clone, Serialize)]
pub struct FleetFigures {
    /// Simulated agents registered.
    pub agents: usize,
    /// TCP connections they used.
    pub connections: usize,
    /// Offered rate (0 = unbounded).
    pub jobs_per_s_offered: f64,
    /// `CreateJob` calls in flight at most.
    pub in_flight: usize,
    /// Window, s.
    pub seconds: f64,
    /// Jobs created in the window.
    pub jobs_created: u64,
    /// Jobs reported done in the window.
    pub jobs_done: u64,
    /// Jobs done per second over the window.
    pub jobs_done_per_s: f64,
    /// Jobs created in the window that no agent had finished 10 s after it.
    pub jobs_unfinished: u64,
    /// Create (sent) → an agent's FetchJob returned it.
    pub create_to_lease: Latency,
    /// `CreateJob`.
    pub create_job: Latency,
    /// `FetchJob` calls that returned a job (includes the wait for one).
    pub fetch_job: Latency,
    /// `Heartbeat`.
    pub heartbeat: Latency,
    /// `ReportJobResult`.
    pub report_job_result: Latency,
    /// Failed RPCs by method.
    pub errors: HashMap<String, u64>,
    /// Time to register every agent, s.
    pub register_all_s: f64,
    /// Coordinator CPU over the window, cores.
    pub coordinator_cpu_cores: f64,
    /// Load generator (this process) CPU over the window, cores.
    pub load_generator_cpu_cores: f64,
    /// Coordinator peak RSS, MiB.
    pub coordinator_peak_rss_mib: f64,
    /// Store write operations in the window.
    pub store_writes: u64,
    /// Group commits (fsynced write transactions) in the window.
    pub store_commits: u64,
    /// Store writes per job done.
    pub store_writes_per_job: f64,
    /// Commits per second.
    pub store_commits_per_s: f64,
}

#[derive(Default)]
struct Samples {
    create: Vec<f64>,
    fetch: Vec<f64>,
    heartbeat: Vec<f64>,
    report: Vec<f64>,
    errors: HashMap<String, u64>,
}

struct Shared {
    samples: Mutex<Samples>,
    /// Job id → when its CreateJob was sent.
    sent: Mutex<HashMap<String, Instant>>,
    /// Job id → when an agent got it.
    leased: Mutex<HashMap<String, Instant>>,
    done: AtomicU64,
    measuring: AtomicBool,
    stop: CancellationToken,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the `(comm)`: state is field 3; utime 14, stime 15.
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

fn ticks_per_s() -> f64 {
    // The kernel's USER_HZ is 100 on every Linux this project runs on.
    100.0
}

async fn scrape(addr: std::net::SocketAddr) -> (u64, u64) {
    let text = crate::client::Conn {
        url: String::new(),
        metrics_addr: Some(addr),
        admin_token: String::new(),
        enroll_token: String::new(),
        insecure: false,
    }
    .metrics_text()
    .await;
    let mut writes = 0.0;
    let mut commits = 0.0;
    for line in text.lines() {
        let value = || {
            line.rsplit_once(' ')
                .and_then(|(_, v)| v.parse::<f64>().ok())
                .unwrap_or(0.0)
        };
        if line.starts_with("arcade_coordinator_store_writes_total{") {
            writes += value();
        } else if line.starts_with("arcade_coordinator_store_commits_total ") {
            commits += value();
        }
    }
    (writes as u64, commits as u64)
}

async fn record(shared: &Shared, kind: &str, started: Instant, ok: bool) {
    if !shared.measuring.load(Ordering::Relaxed) {
        return;
    }
    let mut s = shared.samples.lock().await;
    if !ok {
        *s.errors.entry(kind.to_owned()).or_default() += 1;
        return;
    }
    let v = ms(started.elapsed());
    match kind {
        "CreateJob" => s.create.push(v),
        "FetchJob" => s.fetch.push(v),
        "Heartbeat" => s.heartbeat.push(v),
        _ => s.report.push(v),
    }
}

async fn agent_loop(
    shared: Arc<Shared>,
    mut client: AgentClient<Authed>,
    id: String,
    heartbeat: Duration,
) {
    // Heartbeats on their own task, spread over the interval.
    let hb_shared = shared.clone();
    let mut hb_client = client.clone();
    let hb_id = id.clone();
    let offset = Duration::from_millis(rand_u64(&id) % heartbeat.as_millis().max(1) as u64);
    let hb = tokio::spawn(async move {
        tokio::select! {
            _ = tokio::time::sleep(offset) => {}
            _ = hb_shared.stop.cancelled() => return,
        }
        let mut tick = tokio::time::interval(heartbeat);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = hb_shared.stop.cancelled() => return,
            }
            let t = Instant::now();
            let r = hb_client
                .heartbeat(pb::HeartbeatRequest {
                    agent_id: hb_id.clone(),
                    ..Default::default()
                })
                .await;
            record(&hb_shared, "Heartbeat", t, r.is_ok()).await;
        }
    });
    while !shared.stop.is_cancelled() {
        let t = Instant::now();
        let r = tokio::select! {
            r = client.fetch_job(pb::FetchJobRequest {
                agent_id: id.clone(),
                max_jobs: 1,
                wait_seconds: 30,
            }) => r,
            _ = shared.stop.cancelled() => break,
        };
        let jobs = match r {
            Ok(resp) => resp.into_inner().jobs,
            Err(_) => {
                record(&shared, "FetchJob", t, false).await;
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        if jobs.is_empty() {
            continue;
        }
        record(&shared, "FetchJob", t, true).await;
        let got = Instant::now();
        for job in jobs {
            shared.leased.lock().await.insert(job.job_id.clone(), got);
            let t = Instant::now();
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as i64)
                .unwrap_or(0);
            let r = client
                .report_job_result(pb::ReportJobResultRequest {
                    agent_id: id.clone(),
                    job_id: job.job_id,
                    status: pb::JobStatus::Succeeded as i32,
                    started_at: now,
                    finished_at: now,
                    ..Default::default()
                })
                .await;
            let ok = r.is_ok();
            if ok && shared.measuring.load(Ordering::Relaxed) {
                shared.done.fetch_add(1, Ordering::Relaxed);
            }
            record(&shared, "ReportJobResult", t, ok).await;
        }
    }
    let _ = hb.await;
}

fn rand_u64(seed: &str) -> u64 {
    use std::hash::{DefaultHasher, Hash, Hasher};
    let mut h = DefaultHasher::new();
    seed.hash(&mut h);
    h.finish()
}

fn authed(channel: tonic::transport::Channel, token: &str) -> anyhow::Result<Authed> {
    Ok(InterceptedService::new(
        channel,
        Bearer::new(token).map_err(|e| anyhow::anyhow!("{e}"))?,
    ))
}

/// Runs the benchmark.
pub async fn run(opts: &FleetBenchOptions) -> anyhow::Result<FleetFigures> {
    anyhow::ensure!(opts.agents > 0, "--agents must be at least 1");
    anyhow::ensure!(opts.seconds > 0.0, "--seconds must be positive");
    let connections = opts.connections.clamp(1, opts.agents);
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("coordinator.toml");
    let mut text = format!(
        "admin_token = \"{ADMIN}\"\nenroll_token = \"{ENROLL}\"\nmetrics_listen = \"127.0.0.1:0\"\n[jobs]\nheartbeat_interval = {hb}\nlease_ttl = {ttl}\nlong_poll_max = \"30s\"\n",
        hb = opts.heartbeat_s,
        ttl = opts.heartbeat_s * 3,
    );
    if opts.coordinator_bin.is_none() {
        text.push_str(&format!(
            "[agents]\nmax_agents = {}\nregister_rate = 0\n[grpc]\nmax_connections_per_address = 0\n",
            opts.agents.max(1)
        ));
    }
    std::fs::write(&config, text)?;
    let mut cmd = match &opts.coordinator_bin {
        Some(bin) => Command::new(bin),
        None => {
            let mut c = Command::new(std::env::current_exe()?);
            c.arg("coordinator");
            c
        }
    };
    cmd.arg("--config")
        .arg(&config)
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .args(["--listen", "127.0.0.1:0"])
        .env("RUST_LOG", "warn");
    let proc = CoordinatorProcess::spawn(cmd, true)?;
    let metrics_addr = proc
        .metrics_addr
        .ok_or_else(|| anyhow::anyhow!("the coordinator printed no metrics address"))?;
    let url = proc.url();
    let mut channels = Vec::with_capacity(connections);
    for _ in 0..connections {
        channels.push(arcade_proto::client_endpoint(&url)?.connect().await?);
    }
    let shared = Arc::new(Shared {
        samples: Mutex::new(Samples::default()),
        sent: Mutex::new(HashMap::new()),
        leased: Mutex::new(HashMap::new()),
        done: AtomicU64::new(0),
        measuring: AtomicBool::new(false),
        stop: Default::default(),
    });

    // Register every agent (bounded concurrency), then start their loops.
    let started = Instant::now();
    let gate = Arc::new(Semaphore::new(256));
    let mut registered = tokio::task::JoinSet::new();
    for i in 0..opts.agents {
        let channel = channels[i % connections].clone();
        let gate = gate.clone();
        registered.spawn(async move {
            let _permit = gate.acquire_owned().await?;
            let id = format!("bench-{i:05}");
            let mut enroll = AgentClient::new(authed(channel.clone(), ENROLL)?);
            let mut delay = Duration::from_millis(50);
            let token = loop {
                match enroll
                    .register(crate::client::signed(pb::RegisterRequest {
                        agent_id: id.clone(),
                        hostname: "bench".into(),
                        labels: vec![pb::Label {
                            key: "pool".into(),
                            value: "bench".into(),
                        }],
                        max_concurrent_jobs: 1,
                        ..Default::default()
                    }))
                    .await
                {
                    Ok(r) => break r.into_inner().agent_token,
                    Err(s) if s.code() == tonic::Code::ResourceExhausted => {
                        tokio::time::sleep(delay).await;
                        delay = (delay * 2).min(Duration::from_secs(2));
                    }
                    Err(s) => anyhow::bail!("register {id}: {s}"),
                }
            };
            anyhow::Ok((id, AgentClient::new(authed(channel, &token)?)))
        });
    }
    let mut agents = Vec::with_capacity(opts.agents);
    while let Some(r) = registered.join_next().await {
        agents.push(r??);
    }
    let register_all_s = started.elapsed().as_secs_f64();
    let heartbeat = Duration::from_secs(opts.heartbeat_s.max(1));
    let mut loops = tokio::task::JoinSet::new();
    for (id, client) in agents {
        loops.spawn(agent_loop(shared.clone(), client, id, heartbeat));
    }
    // Let every agent reach its first long-poll and spread its heartbeats.
    tokio::time::sleep(Duration::from_secs(2)).await;

    let (w0, c0) = scrape(metrics_addr).await;
    let cpu0 = cpu_ticks(proc.pid());
    let self0 = cpu_ticks(std::process::id());
    shared.measuring.store(true, Ordering::SeqCst);
    let window = Duration::from_secs_f64(opts.seconds);
    let t0 = Instant::now();
    let jobs = JobsClient::new(authed(channels[0].clone(), ADMIN)?);
    let in_flight = Arc::new(Semaphore::new(opts.in_flight.max(1)));
    let mut creates = tokio::task::JoinSet::new();
    let mut created = 0u64;
    let interval = (opts.jobs_per_s > 0.0).then(|| Duration::from_secs_f64(1.0 / opts.jobs_per_s));
    while t0.elapsed() < window {
        if let Some(interval) = interval {
            let due = t0 + interval.mul_f64(created as f64);
            tokio::time::sleep_until(due.into()).await;
            if t0.elapsed() >= window {
                break;
            }
        }
        let permit = in_flight.clone().acquire_owned().await?;
        let mut jobs = jobs.clone();
        let shared2 = shared.clone();
        created += 1;
        creates.spawn(async move {
            let _permit = permit;
            let t = Instant::now();
            let r = jobs
                .create_job(pb::CreateJobRequest {
                    commands: vec!["true".into()],
                    ..Default::default()
                })
                .await;
            let ok = r.is_ok();
            if let Ok(resp) = r {
                shared2
                    .sent
                    .lock()
                    .await
                    .insert(resp.into_inner().job_id, t);
            }
            record(&shared2, "CreateJob", t, ok).await;
        });
        while creates.try_join_next().is_some() {}
    }
    let elapsed = t0.elapsed().as_secs_f64();
    let cpu1 = cpu_ticks(proc.pid());
    let self1 = cpu_ticks(std::process::id());
    let (w1, c1) = scrape(metrics_addr).await;
    let done = shared.done.load(Ordering::SeqCst);
    shared.measuring.store(false, Ordering::SeqCst);
    while creates.join_next().await.is_some() {}
    // Give the last jobs up to 10 s to be leased and reported.
    let drain = Instant::now();
    loop {
        let sent = shared.sent.lock().await.len();
        let leased = shared.leased.lock().await.len();
        if leased >= sent || drain.elapsed() > Duration::from_secs(10) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let peak_rss = proc.peak_rss().unwrap_or(0);
    shared.stop.cancel();
    loops.abort_all();
    while loops.join_next().await.is_some() {}

    let sent = shared.sent.lock().await;
    let leased = shared.leased.lock().await;
    let create_to_lease: Vec<f64> = sent
        .iter()
        .filter_map(|(id, at)| leased.get(id).map(|l| ms(l.saturating_duration_since(*at))))
        .collect();
    let unfinished = sent.keys().filter(|id| !leased.contains_key(*id)).count() as u64;
    let samples = std::mem::take(&mut *shared.samples.lock().await);
    let cores = |a: Option<u64>, b: Option<u64>| match (a, b) {
        (Some(a), Some(b)) => (b - a) as f64 / ticks_per_s() / elapsed,
        _ => 0.0,
    };
    let writes = w1.saturating_sub(w0);
    let commits = c1.saturating_sub(c0);
    Ok(FleetFigures {
        agents: opts.agents,
        connections,
        jobs_per_s_offered: opts.jobs_per_s,
        in_flight: opts.in_flight,
        seconds: elapsed,
        jobs_created: created,
        jobs_done: done,
        jobs_done_per_s: done as f64 / elapsed,
        jobs_unfinished: unfinished,
        create_to_lease: Latency::of(create_to_lease),
        create_job: Latency::of(samples.create),
        fetch_job: Latency::of(samples.fetch),
        heartbeat: Latency::of(samples.heartbeat),
        report_job_result: Latency::of(samples.report),
        errors: samples.errors,
        register_all_s,
        coordinator_cpu_cores: cores(cpu0, cpu1),
        load_generator_cpu_cores: cores(self0, self1),
        coordinator_peak_rss_mib: peak_rss as f64 / (1 << 20) as f64,
        store_writes: writes,
        store_commits: commits,
        store_writes_per_job: if done > 0 {
            writes as f64 / done as f64
        } else {
            0.0
        },
        store_commits_per_s: commits as f64 / elapsed,
    })
}
