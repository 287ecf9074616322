//! `arcadectl`, the admin client of the coordinator.
//!
//! - this file — the command line (clap) and [`run`], which maps every failure to one
//!   `arcadectl: <reason>` line on stderr and a non-zero exit code;
//! - `client` — the connection: admin token on every call, 80 MiB decode limit;
//! - `push` — `plugin push` (streaming hash, then a client-streamed upload);
//! - `commands` — the other plugin, job and agent commands;
//! - `preheat` — `plugin preheat` and `plugin preheat-status` (progress, `--wait`);
//! - `enroll` — `enroll create | list | revoke` (enrolment tokens that grant labels);
//! - `output` — the `--json` shapes and the human tables;
//! - `error` — [`CtlError`].

mod client;
mod commands;
mod enroll;
mod error;
mod fleet;
mod output;
mod preheat;
mod push;

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

pub use client::{Connection, MAX_DECODE};
pub use error::{CtlError, code_words};
pub use output::{
    AgentJson, InstalledPluginJson, JobJson, PluginJson, PluginResultJson, RequiredPluginJson,
};
pub use preheat::{PreheatArgs, PreheatJson, PreheatTargetJson};

/// Default coordinator URL.
pub const DEFAULT_COORDINATOR: &str = "http://127.0.0.1:50051";

/// Admin client of the Arcade Mesh coordinator: plugins, jobs and agents.
#[derive(Debug, Parser)]
#[command(name = "arcadectl", version)]
pub struct Cli {
    /// Coordinator gRPC URL.
    #[arg(
        long,
        global = true,
        env = "ARCADE_COORDINATOR",
        default_value = DEFAULT_COORDINATOR,
        value_name = "URL"
    )]
    pub coordinator: String,
    /// Admin token, sent as `authorization: Bearer <token>`. On the command line it is
    /// visible to every local user: prefer env ARCADE_TOKEN or --token-file.
    #[arg(
        long,
        global = true,
        env = "ARCADE_TOKEN",
        hide_env_values = true,
        value_name = "TOKEN"
    )]
    pub token: Option<String>,
    /// A file holding the admin token (e.g. `<data_dir>/admin.token`).
    #[arg(
        long,
        global = true,
        env = "ARCADE_TOKEN_FILE",
        value_name = "FILE",
        conflicts_with = "token"
    )]
    pub token_file: Option<PathBuf>,
    /// PEM CA bundle that signed the coordinator's certificate (https:// URLs; default:
    /// the system roots).
    #[arg(long, global = true, env = "ARCADE_TLS_CA", value_name = "FILE")]
    pub tls_ca: Option<PathBuf>,
    /// PEM client certificate, for a coordinator that requires mutual TLS.
    #[arg(
        long,
        global = true,
        env = "ARCADE_TLS_CERT",
        value_name = "FILE",
        requires = "tls_key"
    )]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(
        long,
        global = true,
        env = "ARCADE_TLS_KEY",
        value_name = "FILE",
        requires = "tls_cert"
    )]
    pub tls_key: Option<PathBuf>,
    /// Allow a plaintext http:// URL whose host is not loopback (the token then crosses
    /// the network in clear).
    #[arg(long, global = true, env = "ARCADE_INSECURE")]
    pub insecure: bool,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Top-level commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Plugin registry: push, list, get, enable, disable, delete, preheat.
    #[command(subcommand)]
    Plugin(PluginCommand),
    /// Jobs: create, get, list, wait, cancel.
    #[command(subcommand)]
    Job(JobCommand),
    /// Agents: list, remove.
    #[command(subcommand)]
    Agent(AgentCommand),
    /// The fleet at a glance: status.
    #[command(subcommand)]
    Fleet(FleetCommand),
    /// Enrolment tokens that grant labels: create, list, revoke.
    #[command(subcommand)]
    Enroll(EnrollCommand),
    /// Publisher signing keys: generate.
    #[command(subcommand)]
    Key(KeyCommand),
}

/// `arcadectl key …`.
#[derive(Debug, Subcommand)]
pub enum KeyCommand {
    /// Create an ed25519 publisher key in a new file (owner-only, never overwritten)
    /// and print its public key (`ed25519:<hex>`) for agents' `[trust] publisher_keys`.
    Generate {
        /// The key file to create.
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
    },
}

/// `arcadectl enroll …`.
#[derive(Debug, Subcommand)]
pub enum EnrollCommand {
    /// Create a token that enrols agents with the labels it grants; prints the secret
    /// (once) on stdout. Agents may carry restricted labels only with granted values.
    Create {
        /// A label it grants, `KEY=VALUE` (repeatable).
        #[arg(long, value_name = "KEY=VALUE")]
        label: Vec<String>,
        /// Agent ids it may enrol; `*` matches any run of characters (default: any).
        #[arg(long, default_value = "")]
        id_pattern: String,
        /// Lifetime, e.g. `24h`, `7d` (default: never expires).
        #[arg(long, value_parser = arcade_p2p::settings::Seconds::parse)]
        expires: Option<arcade_p2p::settings::Seconds>,
        /// How many new agent ids it may enrol (default 0 = unlimited).
        #[arg(long, default_value_t = 0)]
        uses: u32,
        /// A note for `enroll list`.
        #[arg(long, default_value = "")]
        note: String,
        /// Print the token and its details as JSON.
        #[arg(long)]
        json: bool,
    },
    /// List enrolment tokens (their ids and grants, never the secrets).
    List {
        /// Print a JSON array.
        #[arg(long)]
        json: bool,
    },
    /// End a token at once; agents it enrolled keep their own tokens.
    Revoke {
        /// The token's id (from `enroll list`).
        id: String,
    },
}

/// `arcadectl plugin …`.
#[derive(Debug, Subcommand)]
pub enum PluginCommand {
    /// Upload a plugin version (an executable or `#!` script).
    Push(PushArgs),
    /// List plugin versions.
    List {
        /// Only plugins of this type.
        #[arg(long = "type", value_name = "T")]
        plugin_type: Option<String>,
        /// Print a JSON array.
        #[arg(long)]
        json: bool,
    },
    /// Show one plugin version.
    Get {
        /// `ID@VERSION`.
        #[arg(value_name = "ID@V")]
        reference: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Stop assigning a plugin version to new jobs.
    Disable {
        /// `ID@VERSION`.
        #[arg(value_name = "ID@V")]
        reference: String,
    },
    /// Allow a disabled plugin version again.
    Enable {
        /// `ID@VERSION`.
        #[arg(value_name = "ID@V")]
        reference: String,
    },
    /// Delete a plugin version (and its content if no other version uses it).
    Delete {
        /// `ID@VERSION`.
        #[arg(value_name = "ID@V")]
        reference: String,
    },
    /// Have the matching online agents fetch a plugin version in the background (over
    /// the mesh, through their heartbeats) and pin it against eviction.
    Preheat(PreheatArgs),
    /// Show a preheat's progress: agents done / total, bytes from peers and from the
    /// coordinator, agents not done.
    PreheatStatus {
        /// The preheat id (`ph-…`) that `plugin preheat` printed.
        id: String,
        /// Wait until every matching agent holds it (as `plugin preheat --wait`).
        #[arg(long)]
        wait: bool,
        /// Give up waiting after this long, e.g. `10m` (with --wait).
        #[arg(long, value_parser = arcade_p2p::settings::Seconds::parse, requires = "wait")]
        timeout: Option<arcade_p2p::settings::Seconds>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

/// `arcadectl plugin push`.
#[derive(Debug, Args)]
pub struct PushArgs {
    /// The plugin file.
    #[arg(value_name = "FILE")]
    pub file: PathBuf,
    /// Plugin id: lowercase path segments, e.g. `notify/slack`.
    #[arg(long, value_name = "ID")]
    pub id: String,
    /// Semantic version, e.g. `1.2.0`.
    #[arg(long, value_name = "V")]
    pub version: String,
    /// Plugin type (default: the id's first segment).
    #[arg(long = "type", value_name = "T")]
    pub plugin_type: Option<String>,
    /// SHA-256 of the file (hex); computed when absent.
    #[arg(long, value_name = "HEX")]
    pub sha256: Option<String>,
    /// Only agents with this label may get the plugin (repeatable).
    #[arg(long, value_name = "K=V")]
    pub allowed_label: Vec<String>,
    /// Display name (default: the id).
    #[arg(long, value_name = "N")]
    pub name: Option<String>,
    /// Description.
    #[arg(long, value_name = "D")]
    pub description: Option<String>,
    /// Sign the plugin (id, version, SHA-256, size) with this publisher key
    /// (`arcadectl key generate`); agents with `[trust] publisher_keys` check it.
    #[arg(long, value_name = "FILE")]
    pub sign_key: Option<PathBuf>,
    /// How the content is cut into chunks: `fixed` (the coordinator's
    /// `plugin.chunk_size`), `cdc` (content-defined, 4 KiB min / 16 KiB average / 64 KiB
    /// max) or `cdc:AVG` (average AVG, a power of two; min AVG/4, max AVG×4). Use `cdc`
    /// for archives and trees, where edits shift bytes: agents then reuse the chunks a
    /// new version shares with content they hold.
    #[arg(long, value_name = "MODE", default_value = "fixed", value_parser = parse_chunking)]
    pub chunking: Chunking,
    /// Print the plugin as JSON.
    #[arg(long)]
    pub json: bool,
}

/// `--chunking`: fixed-size chunks, or content-defined with these bounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Chunking(pub Option<arcade_p2p::cdc::CdcParams>);

fn parse_chunking(s: &str) -> Result<Chunking, String> {
    arcade_p2p::cdc::parse_chunking(s).map(Chunking)
}

/// `arcadectl job …`.
#[derive(Debug, Subcommand)]
pub enum JobCommand {
    /// Queue a job; prints its id.
    Create(CreateArgs),
    /// Show one job.
    Get {
        /// Job id.
        id: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// List jobs, newest first.
    List {
        /// Only jobs in this status.
        #[arg(long, value_name = "S")]
        status: Option<StatusArg>,
        /// At most this many (default 100).
        #[arg(long, value_name = "N")]
        limit: Option<u32>,
        /// Print a JSON array.
        #[arg(long)]
        json: bool,
    },
    /// Cancel a job: a queued job is never run; a running one is killed by its agent
    /// (told at its next heartbeat) and ends `cancelled`.
    Cancel {
        /// Job id.
        id: String,
        /// Print the job as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Wait until a job finishes; exit 0 only if it succeeded.
    Wait {
        /// Job id.
        id: String,
        /// Give up after this many seconds (default: wait forever).
        #[arg(long, value_name = "S", value_parser = parse_seconds)]
        timeout: Option<Duration>,
    },
    /// Follow a job live: a line per change of status, agent or stage (as its agent
    /// reports in heartbeats), until it finishes; exit 0 only if it succeeded.
    Watch {
        /// Job id.
        id: String,
        /// Give up after this many seconds (default: watch until it finishes).
        #[arg(long, value_name = "S", value_parser = parse_seconds)]
        timeout: Option<Duration>,
        /// One JSON object per line per change (the last one has the finished job).
        #[arg(long)]
        json: bool,
    },
}

/// `arcadectl job create`.
#[derive(Debug, Args)]
pub struct CreateArgs {
    /// A plugin the job needs: `ID@V[:stage,stage]` with stages among before,
    /// on_success, on_failure, after (none = all). `V` is a version or a selector the
    /// coordinator resolves among enabled versions: `^1.2`, `~1.2.3`, `>=1.2, <2`,
    /// `latest`. Repeatable.
    #[arg(long, value_name = "ID@V[:STAGES]")]
    pub plugin: Vec<String>,
    /// Only agents with this label may run the job (repeatable).
    #[arg(long, value_name = "K=V")]
    pub label: Vec<String>,
    /// A job parameter (repeatable).
    #[arg(long, value_name = "K=V")]
    pub param: Vec<String>,
    /// Job name.
    #[arg(long, value_name = "N")]
    pub name: Option<String>,
    /// Commands timeout in seconds (default: the agent's).
    #[arg(long, value_name = "SECS")]
    pub timeout: Option<u32>,
    /// A command (repeatable; run before the trailing command).
    #[arg(long, value_name = "CMD")]
    pub cmd: Vec<String>,
    /// The command after `--`, run exactly as typed: each word is shell-quoted and
    /// the words joined into one `sh -c` command line.
    #[arg(last = true, value_name = "CMD")]
    pub command: Vec<String>,
}

/// A job status filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum StatusArg {
    /// Waiting for an agent.
    Queued,
    /// Leased to an agent.
    Running,
    /// Finished successfully.
    Succeeded,
    /// Finished unsuccessfully.
    Failed,
    /// Cancelled by an admin.
    Cancelled,
}

/// `arcadectl fleet …`.
#[derive(Debug, Subcommand)]
pub enum FleetCommand {
    /// Agents online and offline (by label), jobs queued and running, and per plugin
    /// version the agents holding it and fetching it.
    Status {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

/// `arcadectl agent …`.
#[derive(Debug, Subcommand)]
pub enum AgentCommand {
    /// List the agents the coordinator knows.
    List {
        /// Print a JSON array.
        #[arg(long)]
        json: bool,
    },
    /// Forget an agent: its token stops working, its running jobs are re-queued, it is
    /// no longer named as a peer and its mesh ticket is revoked fleet-wide (peers learn
    /// it within a heartbeat). Its id is unbound from its key: it may enrol again.
    #[command(visible_alias = "revoke")]
    Remove {
        /// Agent id.
        id: String,
    },
}

fn parse_seconds(s: &str) -> Result<Duration, String> {
    s.parse::<f64>()
        .ok()
        .and_then(|secs| Duration::try_from_secs_f64(secs).ok())
        .ok_or_else(|| format!("{s:?} is not a number of seconds"))
}

/// Where and as whom to connect.
pub(crate) struct Ctx {
    url: String,
    tls: arcade_proto::ClientTls,
    token: Option<String>,
}

impl Ctx {
    async fn connect(&self) -> Result<Connection, CtlError> {
        Connection::connect(&self.url, &self.tls, self.token.as_deref()).await
    }
}

/// Parses repeated `K=V` labels; a repeated key is an error.
pub(crate) fn parse_labels(
    given: &[String],
    option: &str,
) -> Result<BTreeMap<String, String>, CtlError> {
    let mut out = BTreeMap::new();
    for s in given {
        let (k, v) = arcade_p2p::labels::parse_label(s)
            .map_err(|e| CtlError::Usage(format!("{option}: {e}")))?;
        if out.insert(k.clone(), v).is_some() {
            return Err(CtlError::Usage(format!(
                "{option}: label {k:?} given twice"
            )));
        }
    }
    Ok(out)
}

impl Cli {
    /// Parses the command line. Help and version are printed (exit 0); a usage error is
    /// printed as one `arcadectl: …` line (exit 2). Either way the caller exits with the
    /// returned code.
    pub fn parse_args<I, T>(args: I) -> Result<Self, ExitCode>
    where
        I: IntoIterator<Item = T>,
        T: Into<OsString> + Clone,
    {
        match Self::try_parse_from(args) {
            Ok(cli) => Ok(cli),
            Err(e) if !e.use_stderr() => {
                let _ = e.print();
                Err(ExitCode::SUCCESS)
            }
            Err(e) => {
                // Clap's message: the reason (maybe over several lines), a blank line,
                // then usage. Keep the reason, on one line.
                let text = e.to_string();
                let reason = text
                    .lines()
                    .map(str::trim)
                    .skip_while(|l| l.is_empty())
                    .take_while(|l| !l.is_empty())
                    .collect::<Vec<_>>()
                    .join(" ");
                let reason = reason.strip_prefix("error: ").unwrap_or(&reason);
                let reason = if reason.is_empty() {
                    "invalid arguments"
                } else {
                    reason
                };
                let _ = writeln!(
                    std::io::stderr(),
                    "arcadectl: {reason} (see arcadectl --help)"
                );
                Err(ExitCode::from(2))
            }
        }
    }
}

/// Runs a parsed command line; failures print one `arcadectl: <reason>` line on stderr.
pub fn run(cli: Cli) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            let _ = writeln!(
                std::io::stderr(),
                "arcadectl: cannot start the async runtime: {e}"
            );
            return ExitCode::FAILURE;
        }
    };
    let token = match (&cli.token, &cli.token_file) {
        (_, Some(file)) => match arcade_p2p::settings::read_secret("--token-file", file) {
            Ok(t) => Some(t),
            Err(e) => {
                let _ = writeln!(std::io::stderr(), "arcadectl: {e}");
                return ExitCode::from(2);
            }
        },
        (Some(t), None) => {
            if std::env::var("ARCADE_TOKEN").ok().as_deref() != Some(t.as_str()) {
                let _ = writeln!(
                    std::io::stderr(),
                    "arcadectl: warning: --token on the command line is visible to every local user; use ARCADE_TOKEN or --token-file"
                );
            }
            Some(t.clone())
        }
        (None, None) => None,
    };
    let ctx = Ctx {
        url: cli.coordinator,
        tls: arcade_proto::ClientTls {
            ca: cli.tls_ca.unwrap_or_default(),
            cert: cli.tls_cert.unwrap_or_default(),
            key: cli.tls_key.unwrap_or_default(),
            insecure: cli.insecure,
        },
        token,
    };
    match runtime.block_on(commands::dispatch(&ctx, cli.command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "arcadectl: {}", e.one_line());
            e.exit_code()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_line_parses() {
        let cli = Cli::parse_args([
            "arcadectl",
            "--token",
            "t",
            "job",
            "create",
            "--plugin",
            "a@1.0.0:before",
            "--cmd",
            "make",
            "--",
            "echo",
            "hi",
        ])
        .unwrap();
        let Command::Job(JobCommand::Create(args)) = cli.command else {
            panic!("wrong command")
        };
        assert_eq!(args.command, ["echo", "hi"]);
        assert_eq!(args.cmd, ["make"]);
        assert!(Cli::parse_args(["arcadectl", "nope"]).is_err());
        assert_eq!(parse_seconds("1.5").unwrap(), Duration::from_millis(1500));
        assert!(parse_seconds("-1").is_err());
        assert!(parse_seconds("x").is_err());
    }

    #[test]
    fn labels_reject_repeats_and_bad_keys() {
        let l = parse_labels(&["a=1".into(), "b=".into()], "--label").unwrap();
        assert_eq!(l.len(), 2);
        assert!(parse_labels(&["a=1".into(), "a=2".into()], "--label").is_err());
        assert!(parse_labels(&["noequals".into()], "--label").is_err());
        assert!(parse_labels(&["b d=1".into()], "--label").is_err());
    }
}
