//! `arcade-sim` — the demo and the benchmarks. See the README.
#![forbid(unsafe_code)]

/// mimalloc instead of glibc malloc: chunk buffers (up to a MiB each, allocated and
/// freed per chunk) made glibc return pages to the kernel and fault them in again,
/// zeroed, for every chunk — a quarter of the mesh's CPU (see p2p/src/mesh/DESIGN.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::ffi::OsString;
use std::process::ExitCode;

use std::path::PathBuf;

use arcade_simulations::fleet;
use arcade_simulations::model::ModelOptions;
use arcade_simulations::scenario::{Engine, Network, Scenario};
use clap::{Parser, Subcommand};

/// Arcade Mesh demo, simulations and benchmarks.
#[derive(Debug, Parser)]
#[command(name = "arcade-sim", version)]
struct Args {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Embedded coordinator and a fleet of real agents on loopback; a generated sample
    /// plugin runs in a job on every agent, fetched over the mesh; prints a table.
    Demo {
        /// Number of agents.
        #[arg(long, default_value_t = 8)]
        agents: usize,
        /// Sample plugin size in MiB.
        #[arg(long, default_value_t = 24)]
        size_mib: u64,
        /// Print one JSON document instead of the table.
        #[arg(long)]
        json: bool,
    },
    /// Push and streamed-download throughput and coordinator peak RSS, per plugin size.
    BenchCoordinator {
        /// Plugin sizes in MiB (comma-separated).
        #[arg(long, value_delimiter = ',', default_value = "64,1024")]
        sizes_mib: Vec<u64>,
        /// Print one JSON document instead of the table.
        #[arg(long)]
        json: bool,
    },
    /// The coordinator's control plane at fleet scale: a real coordinator process, N
    /// simulated agents over real gRPC (register, heartbeat, long-poll, immediate
    /// results) and jobs offered at a fixed rate; prints jobs/s, latencies, CPU, RSS.
    BenchFleet {
        /// Simulated agents.
        #[arg(long, default_value_t = 1000)]
        agents: usize,
        /// Jobs offered per second (0 = as fast as --in-flight allows).
        #[arg(long, default_value_t = 500.0)]
        jobs_per_s: f64,
        /// Measured window, seconds.
        #[arg(long, default_value_t = 20.0)]
        seconds: f64,
        /// Most CreateJob calls in flight (1 = one at a time, like a CI server).
        #[arg(long, default_value_t = 64)]
        in_flight: usize,
        /// Heartbeat interval of the agents, seconds.
        #[arg(long, default_value_t = 10)]
        heartbeat_s: u64,
        /// TCP connections the agents share (default: one per agent).
        #[arg(long)]
        connections: Option<usize>,
        /// Measure this `arcade-coordinator` binary instead of this build's (e.g. one
        /// built from an earlier commit, for a before/after in the same run).
        #[arg(long, value_name = "PATH")]
        coordinator_bin: Option<PathBuf>,
        /// Print one JSON document instead of the table.
        #[arg(long)]
        json: bool,
    },
    /// Job-start latency with a cached plugin (p50/p99) and agent peak RSS while
    /// fetching plugins of growing size, from the coordinator and over the mesh from a
    /// seed agent.
    BenchAgent {
        /// Jobs for the latency figure.
        #[arg(long, default_value_t = 1000)]
        jobs: usize,
        /// Plugin sizes in MiB for the RSS figure (comma-separated).
        #[arg(long, value_delimiter = ',', default_value = "64,1024")]
        sizes_mib: Vec<u64>,
        /// Print one JSON document instead of the table.
        #[arg(long)]
        json: bool,
    },
    /// The real stack: a real coordinator and N real agents (each its own libp2p host,
    /// gRPC session, cache and upload limiter) on loopback, all fetching one plugin at
    /// once; bandwidth shaped by the project's limiters.
    Swarm {
        #[command(flatten)]
        fleet: FleetArgs,
        /// `loopback` (links shaped by the project's limiters only) or `netns` (a
        /// network namespace per agent, links shaped by `tc tbf` as well; needs root).
        #[arg(long, value_parser = parse_network, default_value = "loopback")]
        network: Network,
        /// Each agent's download cap, MiB/s (0 = unlimited; `netns` only).
        #[arg(long, default_value_t = 0.0)]
        peer_down_mibps: f64,
        /// Agents also run the Kademlia DHT (`mesh.dht`, off by default).
        #[arg(long)]
        dht: bool,
        /// The plugin is a script that exits 0 carrying this file's first bytes,
        /// `--size-mib` MiB in all (e.g. a real executable's), instead of generated
        /// incompressible bytes.
        #[arg(long, value_name = "FILE")]
        content_file: Option<PathBuf>,
        /// Chunks travel raw (no zstd on the mesh or from the coordinator).
        #[arg(long)]
        no_compression: bool,
        /// Peers' zstd level (1–19; the coordinator keeps its default, 3).
        #[arg(long, default_value_t = 1)]
        compression_level: u32,
        /// How the plugin is cut: `fixed` (`--chunk-kib` chunks), `cdc` (content-defined,
        /// 4/16/64 KiB) or `cdc:AVG`, as `arcadectl plugin push --chunking`.
        #[arg(long, default_value = "fixed")]
        chunking: String,
    },
    /// The discrete-event model: simulated links driving the real swarm scheduler and
    /// coordinator admission policy, for fleets far beyond one machine.
    Model {
        #[command(flatten)]
        fleet: FleetArgs,
        /// Each agent's download cap, MiB/s (0 = unlimited).
        #[arg(long, default_value_t = 0.0)]
        peer_down_mibps: f64,
        /// One-way latency of every link, ms.
        #[arg(long, default_value_t = 1.0)]
        latency_ms: f64,
        /// Peers each agent learns at start (the coordinator's hints).
        #[arg(long, default_value_t = 16)]
        peers: usize,
    },
    /// Runs a scenario file (see simulations/scenarios/) on the engine it names.
    Run {
        /// The scenario TOML file.
        file: PathBuf,
        /// Override the scenario's engine.
        #[arg(long, value_parser = parse_engine)]
        engine: Option<Engine>,
        /// Override the scenario's network (real engine): `loopback` or `netns`.
        #[arg(long, value_parser = parse_network)]
        network: Option<Network>,
        #[command(flatten)]
        output: OutputArgs,
    },
    /// Fleet size sweep: coordinator egress and completion ÷ bound against N, on the
    /// model (8 to 10,000) and the real stack (8 to 64).
    Sweep {
        /// Base scenario file (default: fleet (c), 32 MiB, coordinator 10 MiB/s,
        /// agents 5 MiB/s, 256 KiB chunks).
        #[arg(long)]
        scenario: Option<PathBuf>,
        /// Fleet sizes for the model (comma-separated; empty to skip).
        #[arg(
            long,
            value_delimiter = ',',
            default_value = "8,32,100,316,1000,3162,10000"
        )]
        model_agents: Vec<usize>,
        /// Fleet sizes for the real stack (comma-separated; empty to skip).
        #[arg(long, value_delimiter = ',', default_value = "8,16,32,64")]
        real_agents: Vec<usize>,
        /// Write sweep.json and SVG charts here.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Print one JSON object on the last line of stdout.
        #[arg(long)]
        json: bool,
    },
    /// Manifest building and chunk verification throughput, and one peer → one peer
    /// transfer over loopback (real libp2p hosts, unshaped).
    BenchPrimitives {
        /// Content size, MiB.
        #[arg(long, default_value_t = 256)]
        size_mib: u64,
        /// Chunk size, KiB.
        #[arg(long, default_value_t = 1024)]
        chunk_kib: u32,
        /// Requests in flight in the pair transfer.
        #[arg(long, default_value_t = 8)]
        inflight: usize,
        /// Print one JSON object on the last line of stdout.
        #[arg(long)]
        json: bool,
    },
    /// Bytes a version bump costs for a real pair of files (old → new): whole, zstd,
    /// the wire's per-chunk zstd, fixed-size and content-defined chunk reuse, and zstd
    /// patches (each applied and checked), with build and apply times.
    BenchDelta {
        /// The old version.
        #[arg(long, value_name = "FILE")]
        base: PathBuf,
        /// The new version.
        #[arg(long, value_name = "FILE")]
        target: PathBuf,
        /// Patch levels, comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "3,19")]
        levels: Vec<i32>,
        /// Content-defined chunkings to measure, comma-separated (`cdc`, `cdc:AVG`).
        #[arg(
            long,
            value_delimiter = ',',
            default_value = "cdc,cdc:64KiB,cdc:256KiB"
        )]
        chunking: Vec<String>,
        /// Print one JSON object on the last line of stdout.
        #[arg(long)]
        json: bool,
    },
    /// Runs a coordinator exactly like `arcade-coordinator ARGS…` (used by benchmarks
    /// to measure a coordinator in its own process).
    #[command(hide = true)]
    Coordinator {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
    /// Runs an agent exactly like `arcade-agent ARGS…` (used by benchmarks).
    #[command(hide = true)]
    Agent {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
}

/// A uniform fleet fetching one plugin, and how to report it.
#[derive(Debug, clap::Args)]
struct FleetArgs {
    /// Agents.
    #[arg(long, default_value_t = 16)]
    agents: usize,
    /// Plugin size, MiB.
    #[arg(long, default_value_t = 64)]
    size_mib: u64,
    /// Coordinator egress cap, MiB/s (0 = unlimited).
    #[arg(long, default_value_t = 20.0)]
    server_up_mibps: f64,
    /// Each agent's upload cap, MiB/s (0 = unlimited).
    #[arg(long, default_value_t = 20.0)]
    peer_up_mibps: f64,
    /// Chunk size, KiB (a power of two).
    #[arg(long, default_value_t = 1024)]
    chunk_kib: u64,
    /// Mesh off: every byte from the coordinator (the seed's design).
    #[arg(long)]
    no_p2p: bool,
    /// Seed of every random choice.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    #[command(flatten)]
    output: OutputArgs,
}

/// Where a fleet run's figures go.
#[derive(Debug, clap::Args)]
struct OutputArgs {
    /// Also run the same fleet with the mesh off, for comparison in the same run.
    #[arg(long)]
    compare: bool,
    /// Write report.json and SVG charts (completion CDF, bytes by source) here.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Print one JSON object on the last line of stdout instead of the table.
    #[arg(long)]
    json: bool,
}

impl FleetArgs {
    fn scenario(&self, name: &str) -> Scenario {
        let mut s = Scenario::uniform(
            self.agents,
            self.size_mib,
            self.server_up_mibps,
            self.peer_up_mibps,
        );
        s.name = name.into();
        s.chunk_kib = self.chunk_kib;
        s.p2p = !self.no_p2p;
        s.seed = self.seed;
        s
    }
}

fn parse_network(s: &str) -> Result<Network, String> {
    match s {
        "loopback" => Ok(Network::Loopback),
        "netns" => Ok(Network::Netns),
        _ => Err(format!("network must be `loopback` or `netns`, not `{s}`")),
    }
}

fn parse_engine(s: &str) -> Result<Engine, String> {
    match s {
        "real" => Ok(Engine::Real),
        "model" => Ok(Engine::Model),
        _ => Err(format!("engine must be `real` or `model`, not `{s}`")),
    }
}

async fn fleet_run(
    scenario: Scenario,
    engine: Engine,
    model: ModelOptions,
    output: &OutputArgs,
) -> anyhow::Result<()> {
    scenario.validate()?;
    if !output.json {
        eprintln!(
            "running {} on the {} engine: {} agents, {} MiB … (bound {:.2} s)",
            scenario.name,
            if engine == Engine::Real {
                "real"
            } else {
                "model"
            },
            scenario.agents,
            scenario.total_bytes() >> 20,
            scenario.bound_seconds()
        );
    }
    let report = fleet::run_compared(&scenario, engine, &model, output.compare).await?;
    if let Some(dir) = &output.out {
        fleet::write_report(dir, &report)?;
    }
    if output.json {
        println!("{}", serde_json::to_string(&report.json_view())?);
    } else {
        print!("{}", report.table());
        if let Some(base) = &report.baseline {
            print!("\n{}", base.table());
        }
        if let Some(dir) = &output.out {
            println!("figures written to {}", dir.display());
        }
    }
    anyhow::ensure!(
        report.failed == 0 && report.verified,
        "{} of {} agents failed or were not verified",
        report.failed,
        report.agents
    );
    Ok(())
}

fn main() -> ExitCode {
    let args = Args::parse();
    match args.command {
        Cmd::Coordinator { args } => {
            let argv = std::iter::once(OsString::from("arcade-coordinator")).chain(args);
            return arcade_coordinator::cli::main_with(argv);
        }
        Cmd::Agent { args } => {
            let argv = std::iter::once(OsString::from("arcade-agent")).chain(args);
            return arcade_agent::cli::main_with(argv);
        }
        _ => {}
    }
    // The in-process coordinator's and agents' logs, only when asked for: they would
    // bury the figures.
    if std::env::var_os("RUST_LOG").is_some() {
        arcade_p2p::logging::init(false);
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("arcade-sim: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        match args.command {
            Cmd::Demo {
                agents,
                size_mib,
                json,
            } => {
                let report =
                    arcade_simulations::demo::run(&arcade_simulations::demo::DemoOptions {
                        agents,
                        size_mib,
                    })
                    .await?;
                if json {
                    println!("{}", serde_json::to_string(&report)?);
                } else {
                    print!("{}", report.table());
                }
                anyhow::ensure!(
                    report.all_succeeded(),
                    "some agents did not run the job"
                );
                Ok(())
            }
            Cmd::BenchFleet {
                agents,
                jobs_per_s,
                seconds,
                in_flight,
                heartbeat_s,
                connections,
                coordinator_bin,
                json,
            } => {
                let opts = arcade_simulations::bench::control::FleetBenchOptions {
                    agents,
                    jobs_per_s,
                    seconds,
                    in_flight,
                    heartbeat_s,
                    connections: connections.unwrap_or(agents),
                    coordinator_bin,
                };
                let f = arcade_simulations::bench::control::run(&opts).await?;
                if json {
                    println!("{}", serde_json::to_string(&f)?);
                } else {
                    let l = |x: &arcade_simulations::bench::control::Latency| {
                        format!("{:.1} / {:.1} ms", x.p50_ms, x.p99_ms)
                    };
                    println!("agents                 {} ({} connections, registered in {:.1} s)", f.agents, f.connections, f.register_all_s);
                    println!("offered                {} jobs/s, {} CreateJob in flight, {:.1} s", f.jobs_per_s_offered, f.in_flight, f.seconds);
                    println!("jobs done              {} of {} created ({:.1}/s); {} not leased 10 s later", f.jobs_done, f.jobs_created, f.jobs_done_per_s, f.jobs_unfinished);
                    println!("create -> lease p50/p99 {}", l(&f.create_to_lease));
                    println!("CreateJob p50/p99      {}", l(&f.create_job));
                    println!("FetchJob (with a job)  {}", l(&f.fetch_job));
                    println!("Heartbeat p50/p99      {}", l(&f.heartbeat));
                    println!("ReportJobResult        {}", l(&f.report_job_result));
                    println!("errors                 {:?}", f.errors);
                    println!("coordinator            {:.2} cores, peak RSS {:.0} MiB", f.coordinator_cpu_cores, f.coordinator_peak_rss_mib);
                    println!("load generator         {:.2} cores", f.load_generator_cpu_cores);
                    println!("store                  {} writes ({:.2} per job), {} commits ({:.0}/s)", f.store_writes, f.store_writes_per_job, f.store_commits, f.store_commits_per_s);
                }
                Ok(())
            }
            Cmd::BenchCoordinator { sizes_mib, json } => {
                let figures = arcade_simulations::bench::coordinator::run(&sizes_mib).await?;
                if json {
                    println!("{}", serde_json::to_string(&figures)?);
                } else {
                    println!(
                        "{:>10} {:>12} {:>15} {:>20} {:>24}",
                        "size MiB",
                        "push MB/s",
                        "download MB/s",
                        "peak RSS push MiB",
                        "peak RSS download MiB"
                    );
                    for f in &figures {
                        println!(
                            "{:>10} {:>12.1} {:>15.1} {:>20.1} {:>24.1}",
                            f.size_bytes >> 20,
                            f.push_mb_per_s,
                            f.download_mb_per_s,
                            f.peak_rss_after_push_mib,
                            f.peak_rss_after_download_mib
                        );
                    }
                }
                Ok(())
            }
            Cmd::BenchAgent { jobs, sizes_mib, json } => {
                let f = arcade_simulations::bench::agent::run(jobs, &sizes_mib).await?;
                if json {
                    println!("{}", serde_json::to_string(&f)?);
                } else {
                    let l = &f.start_latency;
                    println!(
                        "job received -> before started (cached plugin, {} jobs): p50 {} ms, p99 {} ms, max {} ms ({:.0} jobs/s)",
                        l.jobs, l.p50_ms, l.p99_ms, l.max_ms, l.jobs_per_s
                    );
                    println!(
                        "{:>12} {:>12} {:>10} {:>20} {:>18}",
                        "source", "plugin MiB", "job s", "agent peak RSS MiB", "coordinator MiB"
                    );
                    for r in &f.fetch_rss {
                        println!(
                            "{:>12} {:>12} {:>10.2} {:>20.1} {:>18.1}",
                            if r.mesh { "mesh seed" } else { "coordinator" },
                            r.plugin_bytes >> 20,
                            r.job_seconds,
                            r.agent_peak_rss_mib,
                            r.coordinator_bytes as f64 / f64::from(1u32 << 20)
                        );
                    }
                }
                Ok(())
            }
            Cmd::Swarm {
                fleet,
                network,
                peer_down_mibps,
                dht,
                content_file,
                no_compression,
                compression_level,
                chunking,
            } => {
                let mut scenario = fleet.scenario("swarm");
                scenario.network = network;
                scenario.dht = dht;
                scenario.content_file = content_file;
                scenario.compression = !no_compression;
                scenario.compression_level = compression_level;
                scenario.chunking = chunking;
                scenario.agent.down_mibps = peer_down_mibps;
                fleet_run(scenario, Engine::Real, ModelOptions::default(), &fleet.output).await
            }
            Cmd::Model {
                fleet,
                peer_down_mibps,
                latency_ms,
                peers,
            } => {
                let mut scenario = fleet.scenario("model");
                scenario.agent.down_mibps = peer_down_mibps;
                scenario.agent.latency_ms = latency_ms;
                scenario.server.latency_ms = latency_ms;
                let model = ModelOptions {
                    peers_per_agent: peers,
                    ..Default::default()
                };
                fleet_run(scenario, Engine::Model, model, &fleet.output).await
            }
            Cmd::Run {
                file,
                engine,
                network,
                output,
            } => {
                let mut scenario = Scenario::load(&file)?;
                scenario.network = network.unwrap_or(scenario.network);
                let engine = engine.unwrap_or(scenario.engine);
                fleet_run(scenario, engine, ModelOptions::default(), &output).await
            }
            Cmd::Sweep {
                scenario,
                model_agents,
                real_agents,
                out,
                json,
            } => {
                let base = match scenario {
                    Some(file) => Scenario::load(&file)?,
                    None => {
                        let mut s = Scenario::uniform(64, 32, 10.0, 5.0);
                        s.name = "fleet-c".into();
                        s.chunk_kib = 256;
                        s
                    }
                };
                let sweep = fleet::sweep(
                    &base,
                    &model_agents,
                    &real_agents,
                    &ModelOptions::default(),
                    |p| {
                        if !json {
                            eprintln!(
                                "{:>6} N={:<6} t_all/bound {:.3}  egress/S {:.3}  completed {}/{}  wall {:.1} s",
                                p.engine,
                                p.agents,
                                p.report.t_all_over_t_min,
                                p.report.server_egress_ratio,
                                p.report.completed,
                                p.agents,
                                p.report.wall_s
                            );
                        }
                    },
                )
                .await?;
                if let Some(dir) = &out {
                    fleet::write_sweep(dir, &sweep)?;
                }
                if json {
                    println!("{}", serde_json::to_string(&sweep)?);
                } else {
                    println!(
                        "{:>6} {:>7} {:>12} {:>10} {:>10} {:>12} {:>10}",
                        "engine", "agents", "t_all s", "bound s", "÷ bound", "egress ÷ S", "completed"
                    );
                    for p in &sweep.points {
                        let r = &p.report;
                        println!(
                            "{:>6} {:>7} {:>12.2} {:>10.2} {:>10.3} {:>12.3} {:>10}",
                            p.engine, p.agents, r.t_all_s, r.t_min_s, r.t_all_over_t_min, r.server_egress_ratio, r.completed
                        );
                    }
                }
                Ok(())
            }
            Cmd::BenchPrimitives {
                size_mib,
                chunk_kib,
                inflight,
                json,
            } => {
                let f = arcade_simulations::bench::primitives::run(
                    &arcade_simulations::bench::primitives::PrimitiveOptions {
                        size_mib,
                        chunk_kib,
                        inflight,
                    },
                )
                .await?;
                if json {
                    println!("{}", serde_json::to_string(&f)?);
                } else {
                    println!("{}", serde_json::to_string_pretty(&f)?);
                }
                Ok(())
            }
            Cmd::BenchDelta {
                base,
                target,
                levels,
                chunking,
                json,
            } => {
                let opts = arcade_simulations::bench::delta::DeltaOptions {
                    base,
                    target,
                    levels,
                    chunkings: chunking,
                };
                let f = tokio::task::spawn_blocking(move || {
                    arcade_simulations::bench::delta::run(&opts)
                })
                .await??;
                if json {
                    println!("{}", serde_json::to_string(&f)?);
                } else {
                    println!("{}", serde_json::to_string_pretty(&f)?);
                }
                Ok(())
            }
            Cmd::Coordinator { .. } | Cmd::Agent { .. } => unreachable!("handled above"),
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("arcade-sim: {e:#}");
            ExitCode::FAILURE
        }
    }
}
