//! The `arcade-agent` command line: flags over the config file over the environment,
//! validated before anything starts; SIGTERM/SIGINT start a graceful shutdown.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

use crate::config::{AgentConfig, DEFAULT_CONFIG_TOML};
use crate::runtime::RunningAgent;

/// The Arcade Mesh agent: runs jobs and their plugins, with a verified plugin cache.
#[derive(Debug, Parser)]
#[command(name = "arcade-agent", version)]
struct Args {
    /// TOML config file (every key optional; see --print-default-config).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Coordinator gRPC URL (overrides `coordinator`).
    #[arg(long, value_name = "URL")]
    coordinator: Option<String>,
    /// Base data directory (overrides `data_dir`; plugins default under it).
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// Agent id (overrides `id`).
    #[arg(long, value_name = "ID")]
    id: Option<String>,
    /// A label K=V (repeatable; adds to `[labels]`).
    #[arg(long = "label", value_name = "K=V")]
    labels: Vec<String>,
    /// Metrics listen address or `off` (overrides `metrics_listen`; port 0 allowed).
    #[arg(long, value_name = "ADDR")]
    metrics_listen: Option<String>,
    /// Enrollment token (overrides `enroll_token`). Visible to every local user in
    /// /proc/PID/cmdline: prefer --enroll-token-file or env ARCADE_ENROLL_TOKEN.
    #[arg(long, value_name = "T")]
    enroll_token: Option<String>,
    /// A file holding the enrollment token (overrides `enroll_token_file`).
    #[arg(long, value_name = "FILE")]
    enroll_token_file: Option<std::path::PathBuf>,
    /// Log format: human or json (overrides `log_format`).
    #[arg(long, value_name = "FORMAT")]
    log_format: Option<String>,
    /// Print a commented default configuration and exit.
    #[arg(long)]
    print_default_config: bool,
}

/// Runs `arcade-agent` with the process arguments.
pub fn main() -> ExitCode {
    main_with(std::env::args_os())
}

/// Runs `arcade-agent` with `args` (the first is the program name).
pub fn main_with<I, T>(args: I) -> ExitCode
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let args = match Args::try_parse_from(args) {
        Ok(a) => a,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(2)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    if args.print_default_config {
        print!("{DEFAULT_CONFIG_TOML}");
        return ExitCode::SUCCESS;
    }
    let config_error = |e: &dyn std::fmt::Display| {
        eprintln!("arcade-agent: config error: {e}");
        ExitCode::from(2)
    };
    let mut config = match AgentConfig::load(args.config.as_deref(), |k| std::env::var(k).ok()) {
        Ok(c) => c,
        Err(e) => return config_error(&e),
    };
    if let Some(v) = args.coordinator {
        config.coordinator = v;
    }
    if let Some(v) = args.data_dir {
        config.data_dir = v;
    }
    if let Some(v) = args.id {
        config.id = v;
    }
    for l in &args.labels {
        match arcade_p2p::labels::parse_label(l) {
            Ok((k, v)) => {
                config.labels.insert(k, v);
            }
            Err(e) => return config_error(&format!("--label: {e}")),
        }
    }
    if let Some(v) = args.metrics_listen {
        config.metrics_listen = v;
    }
    let token_on_command_line = args.enroll_token.is_some();
    if let Some(v) = args.enroll_token {
        config.enroll_token = v;
        config.enroll_token_file = Default::default();
    }
    if let Some(v) = args.enroll_token_file {
        config.enroll_token_file = v;
        config.enroll_token = String::new();
    }
    if let Some(v) = args.log_format {
        config.log_format = v;
    }
    let config = match config.validate() {
        Ok(c) => c,
        Err(e) => return config_error(&e),
    };
    arcade_p2p::logging::init(config.raw.log_format == "json");
    if token_on_command_line {
        tracing::warn!(
            "the enrollment token was given with --enroll-token, where every local user can read it (/proc/PID/cmdline); use --enroll-token-file or ARCADE_ENROLL_TOKEN"
        );
    }
    crate::runtime::protect_secrets();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("arcade-agent: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        let agent = match RunningAgent::start(config).await {
            Ok(a) => a,
            Err(e) => {
                eprintln!("arcade-agent: {e}");
                return ExitCode::FAILURE;
            }
        };
        // Handlers first: a SIGTERM right after the announcement must not be lost.
        let termination = arcade_p2p::shutdown::Termination::install();
        if let Some(addr) = agent.metrics_addr {
            println!("metrics listening on {addr}");
        }
        use std::io::Write as _;
        let _ = std::io::stdout().flush();
        let token = agent.shutdown_token();
        tokio::spawn(async move {
            termination.wait().await;
            tracing::info!("signal received: shutting down");
            token.cancel();
        });
        match agent.wait().await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("arcade-agent: {e}");
                ExitCode::FAILURE
            }
        }
    })
}
