//! The `arcade-coordinator` command line: parse flags, load and validate the config,
//! start the coordinator, print one line per listener, run until SIGTERM/SIGINT.

use std::path::PathBuf;
use std::process::ExitCode;

use crate::config::{CoordinatorConfig, DEFAULT_CONFIG_TOML, LogFormat};
use crate::{RunningCoordinator, init_logging};
use clap::Parser;

/// The Arcade Mesh coordinator: plugin registry, jobs and chunked plugin serving.
#[derive(Debug, Parser)]
#[command(name = "arcade-coordinator", version)]
struct Args {
    /// TOML config file (every key optional; see --print-default-config).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// gRPC listen address (overrides `listen`; port 0 picks a free port).
    #[arg(long, value_name = "ADDR")]
    listen: Option<String>,
    /// Metrics listen address or `off` (overrides `metrics_listen`).
    #[arg(long, value_name = "ADDR")]
    metrics_listen: Option<String>,
    /// Data directory (overrides `data_dir`).
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// Admin token (overrides `admin_token`). Visible to every local user in
    /// /proc/PID/cmdline: prefer --admin-token-file or env ARCADE_ADMIN_TOKEN.
    #[arg(long, value_name = "T")]
    admin_token: Option<String>,
    /// A file holding the admin token (overrides `admin_token_file`).
    #[arg(long, value_name = "FILE")]
    admin_token_file: Option<PathBuf>,
    /// Enrollment token (overrides `enroll_token`). Visible to every local user: prefer
    /// --enroll-token-file or env ARCADE_ENROLL_TOKEN.
    #[arg(long, value_name = "T")]
    enroll_token: Option<String>,
    /// A file holding the enrollment token (overrides `enroll_token_file`).
    #[arg(long, value_name = "FILE")]
    enroll_token_file: Option<PathBuf>,
    /// Log format: human or json (overrides `log_format`).
    #[arg(long, value_name = "FORMAT")]
    log_format: Option<LogFormatArg>,
    /// Print a commented default configuration and exit.
    #[arg(long)]
    print_default_config: bool,
}

impl std::str::FromStr for LogFormatArg {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "human" => Ok(Self(LogFormat::Human)),
            "json" => Ok(Self(LogFormat::Json)),
            other => Err(format!("unknown log format {other:?}: use human or json")),
        }
    }
}

#[derive(Debug, Clone)]
struct LogFormatArg(LogFormat);

/// Runs `arcade-coordinator` with the process arguments.
pub fn main() -> ExitCode {
    main_with(std::env::args_os())
}

/// Runs `arcade-coordinator` with `args` (the first is the program name).
pub fn main_with<I, T>(args: I) -> ExitCode
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
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
    let mut config =
        match CoordinatorConfig::load(args.config.as_deref(), |k| std::env::var(k).ok()) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("arcade-coordinator: config error: {e}");
                return ExitCode::from(2);
            }
        };
    if let Some(v) = args.listen {
        config.listen = v;
    }
    if let Some(v) = args.metrics_listen {
        config.metrics_listen = v;
    }
    if let Some(v) = args.data_dir {
        config.data_dir = v;
    }
    let mut on_command_line = Vec::new();
    if let Some(v) = args.admin_token {
        config.admin_token = v;
        config.admin_token_file = PathBuf::new();
        on_command_line.push("--admin-token");
    }
    if let Some(v) = args.admin_token_file {
        config.admin_token_file = v;
        config.admin_token = String::new();
    }
    if let Some(v) = args.enroll_token {
        config.enroll_token = v;
        config.enroll_token_file = PathBuf::new();
        on_command_line.push("--enroll-token");
    }
    if let Some(v) = args.enroll_token_file {
        config.enroll_token_file = v;
        config.enroll_token = String::new();
    }
    if let Some(v) = args.log_format {
        config.log_format = v.0;
    }
    let config = match config.validate() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("arcade-coordinator: config error: {e}");
            return ExitCode::from(2);
        }
    };
    init_logging(config.raw.log_format);
    for flag in on_command_line {
        tracing::warn!(
            "a token was given with {flag}, where every local user can read it (/proc/PID/cmdline); use {flag}-file or the ARCADE_ environment variable"
        );
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("arcade-coordinator: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        let running = match RunningCoordinator::start(config).await {
            Ok(r) => r,
            Err(e) => {
                eprintln!("arcade-coordinator: {e}");
                return ExitCode::FAILURE;
            }
        };
        // Handlers first: a SIGTERM right after the announcement must not be lost.
        let termination = arcade_p2p::shutdown::Termination::install();
        println!("grpc listening on {}", running.grpc_addr);
        if let Some(addr) = running.metrics_addr {
            println!("metrics listening on {addr}");
        }
        use std::io::Write as _;
        let _ = std::io::stdout().flush();
        let token = running.shutdown_token();
        tokio::spawn(async move {
            termination.wait().await;
            tracing::info!("signal received: shutting down");
            token.cancel();
        });
        running.wait().await;
        ExitCode::SUCCESS
    })
}
