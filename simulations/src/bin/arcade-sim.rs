//! `arcade-sim` — the demo and the benchmarks. See the README.
#![forbid(unsafe_code)]

use std::ffi::OsString;
use std::process::ExitCode;

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
    /// Job-start latency with a cached plugin (p50/p99) and agent peak RSS while
    /// fetching plugins of growing size.
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
    /// A fleet of in-process agents fetching one plugin at once, with and without the
    /// mesh, bandwidth shaped by the project's limiters.
    BenchMesh {
        /// Agents.
        #[arg(long, default_value_t = 16)]
        agents: usize,
        /// Plugin size, MiB.
        #[arg(long, default_value_t = 64)]
        size_mib: u64,
        /// Coordinator egress cap, MiB/s.
        #[arg(long, default_value_t = 20)]
        server_up_mibps: u64,
        /// Each agent's upload cap, MiB/s.
        #[arg(long, default_value_t = 20)]
        peer_up_mibps: u64,
        /// Print one JSON document instead of the table.
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
                    println!("{}", serde_json::to_string_pretty(&report)?);
                } else {
                    print!("{}", report.table());
                }
                anyhow::ensure!(
                    report.all_succeeded(),
                    "some agents did not run the job"
                );
                Ok(())
            }
            Cmd::BenchCoordinator { sizes_mib, json } => {
                let figures = arcade_simulations::bench::coordinator::run(&sizes_mib).await?;
                if json {
                    println!("{}", serde_json::to_string_pretty(&figures)?);
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
                    println!("{}", serde_json::to_string_pretty(&f)?);
                } else {
                    let l = &f.start_latency;
                    println!(
                        "job received -> before started (cached plugin, {} jobs): p50 {} ms, p99 {} ms, max {} ms ({:.0} jobs/s)",
                        l.jobs, l.p50_ms, l.p99_ms, l.max_ms, l.jobs_per_s
                    );
                    println!("{:>12} {:>10} {:>20}", "plugin MiB", "job s", "agent peak RSS MiB");
                    for r in &f.fetch_rss {
                        println!("{:>12} {:>10.2} {:>20.1}", r.plugin_bytes >> 20, r.job_seconds, r.agent_peak_rss_mib);
                    }
                }
                Ok(())
            }
            Cmd::BenchMesh {
                agents,
                size_mib,
                server_up_mibps,
                peer_up_mibps,
                json,
            } => {
                let f = arcade_simulations::bench::mesh::run(&arcade_simulations::bench::mesh::MeshOptions {
                    agents,
                    size_mib,
                    server_mibps: server_up_mibps,
                    peer_mibps: peer_up_mibps,
                })
                .await?;
                if json {
                    println!("{}", serde_json::to_string_pretty(&f)?);
                } else {
                    println!(
                        "{} agents, {} MiB plugin, coordinator {} MiB/s, agents {} MiB/s up",
                        f.agents,
                        f.plugin_bytes >> 20,
                        f.server_bytes_per_s >> 20,
                        f.peer_bytes_per_s >> 20
                    );
                    println!(
                        "{:>6} {:>9} {:>9} {:>10} {:>12} {:>12} {:>12} {:>10}",
                        "mesh", "fleet s", "bound s", "÷ bound", "egress ÷ S", "peer MiB", "server MiB", "CPU s/GiB"
                    );
                    for r in &f.runs {
                        println!(
                            "{:>6} {:>9.2} {:>9.2} {:>10.2} {:>12.2} {:>12} {:>12} {:>10.2}",
                            if r.mesh { "on" } else { "off" },
                            r.fleet_seconds,
                            r.bound_seconds,
                            r.over_bound,
                            r.egress_over_size,
                            r.bytes_from_peers >> 20,
                            r.bytes_from_server >> 20,
                            r.cpu_seconds_per_gib
                        );
                    }
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
