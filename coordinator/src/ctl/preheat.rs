//! `plugin preheat` and `plugin preheat-status`: start a preheat, show or wait for its
//! progress (agents done / total, bytes from peers and from the coordinator).

use std::io::IsTerminal as _;
use std::time::{Duration, Instant};

use arcade_p2p::PluginSelector;
use arcade_proto::v1 as pb;
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

use super::output::{emit, emit_json};
use super::{Connection, CtlError, Ctx};

/// How often `--wait` asks for progress.
const POLL_INTERVAL: Duration = Duration::from_millis(500);
/// Failed agents named in an error.
const SHOWN_FAILURES: usize = 10;

/// `arcadectl plugin preheat`.
#[derive(Debug, clap::Args)]
pub struct PreheatArgs {
    /// `ID@VERSION` or `ID@SELECTOR` (`^1.2`, `~1.2.3`, `latest`, …), resolved now
    /// among the enabled versions.
    #[arg(value_name = "ID@V")]
    pub reference: String,
    /// Only agents carrying this label, `KEY=VALUE` (repeatable; default: every agent
    /// the plugin's allowed labels admit).
    #[arg(long, value_name = "KEY=VALUE")]
    pub label: Vec<String>,
    /// How long the preheat lasts and agents keep the content pinned against eviction,
    /// e.g. `2h`, `7d` (default: the coordinator's `plugin.preheat_pin`; at most 30d).
    #[arg(long, value_parser = arcade_p2p::settings::Seconds::parse)]
    pub pin: Option<arcade_p2p::settings::Seconds>,
    /// Wait until every matching agent holds it verified, showing progress; exits
    /// non-zero if an agent fails or no agent matches.
    #[arg(long)]
    pub wait: bool,
    /// Give up waiting after this long, e.g. `10m` (with --wait).
    #[arg(long, value_parser = arcade_p2p::settings::Seconds::parse, requires = "wait")]
    pub timeout: Option<arcade_p2p::settings::Seconds>,
    /// Print the preheat (its final state with --wait) as JSON.
    #[arg(long)]
    pub json: bool,
}

/// A preheat as `--json` prints it.
#[derive(Debug, Serialize)]
pub struct PreheatJson {
    pub id: String,
    pub plugin_id: String,
    pub version: String,
    pub requested: String,
    pub sha256: String,
    pub size: u64,
    pub labels: std::collections::BTreeMap<String, String>,
    /// Unix milliseconds.
    pub created_at: i64,
    pub expires_at: i64,
    pub total: u32,
    pub done: u32,
    pub failed: u32,
    pub fetching: u32,
    pub pending: u32,
    pub peer_bytes: u64,
    pub coordinator_bytes: u64,
    pub unfinished: Vec<PreheatTargetJson>,
}

/// An agent that has not finished a preheat.
#[derive(Debug, Serialize)]
pub struct PreheatTargetJson {
    pub agent_id: String,
    /// `pending`, `fetching` or `failed`.
    pub state: &'static str,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub error: String,
    pub peer_bytes: u64,
    pub coordinator_bytes: u64,
}

fn state_name(state: i32) -> &'static str {
    match pb::PreheatState::try_from(state).unwrap_or_default() {
        pb::PreheatState::Fetching => "fetching",
        pb::PreheatState::Done => "done",
        pb::PreheatState::Failed => "failed",
        _ => "pending",
    }
}

impl From<pb::PreheatStatus> for PreheatJson {
    fn from(p: pb::PreheatStatus) -> Self {
        Self {
            labels: p.labels.into_iter().map(|l| (l.key, l.value)).collect(),
            unfinished: p
                .unfinished
                .into_iter()
                .map(|t| PreheatTargetJson {
                    agent_id: t.agent_id,
                    state: state_name(t.state),
                    error: t.error,
                    peer_bytes: t.peer_bytes,
                    coordinator_bytes: t.coordinator_bytes,
                })
                .collect(),
            id: p.preheat_id,
            plugin_id: p.plugin_id,
            version: p.version,
            requested: p.requested,
            sha256: p.sha256,
            size: p.size,
            created_at: p.created_at,
            expires_at: p.expires_at,
            total: p.total,
            done: p.done,
            failed: p.failed,
            fetching: p.fetching,
            pending: p.pending,
            peer_bytes: p.peer_bytes,
            coordinator_bytes: p.coordinator_bytes,
        }
    }
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1u64 << 20) as f64)
}

/// One line of progress: `3/5 agents done, 1 fetching, 0 failed; 24.0 MiB from peers,
/// 12.0 MiB from the coordinator`.
fn progress_line(p: &pb::PreheatStatus) -> String {
    format!(
        "{}/{} agents done, {} fetching, {} failed; {} from peers, {} from the coordinator",
        p.done,
        p.total,
        p.fetching,
        p.failed,
        mib(p.peer_bytes),
        mib(p.coordinator_bytes)
    )
}

fn started_line(p: &pb::PreheatStatus) -> String {
    let asked = if p.requested.is_empty() || p.requested == p.version {
        String::new()
    } else {
        format!(" (asked for @{})", p.requested)
    };
    let pin_s = (p.expires_at - p.created_at).max(0) / 1000;
    format!(
        "preheat {}: {}@{}{asked}, {} → {} agent(s) online now; pinned for {pin_s}s",
        p.preheat_id,
        p.plugin_id,
        p.version,
        mib(p.size),
        p.total
    )
}

/// `arcadectl plugin preheat`.
pub(super) async fn preheat(ctx: &Ctx, args: PreheatArgs) -> Result<(), CtlError> {
    let wanted: PluginSelector =
        args.reference
            .parse()
            .map_err(|e: arcade_p2p::PluginRefError| {
                CtlError::Usage(format!("{:?}: {e}", args.reference))
            })?;
    let labels = super::parse_labels(&args.label, "--label")?;
    let conn = ctx.connect().await?;
    let started = conn
        .plugins()
        .preheat_plugin(pb::PreheatPluginRequest {
            plugin_id: wanted.id.to_string(),
            version: wanted.selector.to_string(),
            labels: arcade_p2p::labels::to_proto(&labels),
            pin_seconds: args.pin.map_or(0, |p| p.get().as_secs().max(1)),
        })
        .await
        .map_err(|s| conn.error(s))?
        .into_inner()
        .preheat
        .ok_or_else(|| CtlError::BadAnswer("PreheatPlugin returned no preheat".into()))?;
    if !args.wait {
        if args.json {
            return emit_json(&PreheatJson::from(started));
        }
        return emit(&format!(
            "{}\nfollow it with: arcadectl plugin preheat-status {} --wait",
            started_line(&started),
            started.preheat_id
        ));
    }
    if !args.json {
        eprintln!("{}", started_line(&started));
    }
    wait(&conn, started, args.timeout.map(|t| t.get()), args.json).await
}

/// `arcadectl plugin preheat-status`.
pub(super) async fn status(
    ctx: &Ctx,
    id: String,
    wait_for_it: bool,
    timeout: Option<Duration>,
    json: bool,
) -> Result<(), CtlError> {
    let conn = ctx.connect().await?;
    let now = get(&conn, &id).await?;
    if wait_for_it {
        return wait(&conn, now, timeout, json).await;
    }
    if json {
        return emit_json(&PreheatJson::from(now));
    }
    let mut text = format!("{}\n{}", started_line(&now), progress_line(&now));
    for t in &now.unfinished {
        text.push_str(&format!("\n  {}: {}", t.agent_id, state_name(t.state)));
        if !t.error.is_empty() {
            text.push_str(&format!(": {}", t.error));
        }
    }
    emit(&text)
}

async fn get(conn: &Connection, id: &str) -> Result<pb::PreheatStatus, CtlError> {
    conn.plugins()
        .get_preheat(pb::GetPreheatRequest {
            preheat_id: id.to_owned(),
        })
        .await
        .map_err(|s| conn.error(s))?
        .into_inner()
        .preheat
        .ok_or_else(|| CtlError::BadAnswer("GetPreheat returned no preheat".into()))
}

/// A progress bar on a terminal; elsewhere a line on stderr whenever progress changes.
struct Progress {
    bar: Option<ProgressBar>,
    last: String,
}

impl Progress {
    fn new() -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = ProgressBar::new(0);
            if let Ok(style) =
                ProgressStyle::with_template("{spinner} [{bar:30}] {pos}/{len} agents  {msg}")
            {
                bar.set_style(style.progress_chars("=> "));
            }
            bar.enable_steady_tick(Duration::from_millis(200));
            bar
        });
        Self {
            bar,
            last: String::new(),
        }
    }

    fn show(&mut self, p: &pb::PreheatStatus) {
        let line = progress_line(p);
        match &self.bar {
            Some(bar) => {
                bar.set_length(u64::from(p.total));
                bar.set_position(u64::from(p.done));
                bar.set_message(format!(
                    "{} fetching, {} failed; {} from peers, {} from the coordinator",
                    p.fetching,
                    p.failed,
                    mib(p.peer_bytes),
                    mib(p.coordinator_bytes)
                ));
            }
            None if line != self.last => eprintln!("{line}"),
            None => {}
        }
        self.last = line;
    }

    fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

/// Polls until every target is done (exit 0), every target finished with failures,
/// no agent matches, or the timeout passes.
async fn wait(
    conn: &Connection,
    mut now: pb::PreheatStatus,
    timeout: Option<Duration>,
    json: bool,
) -> Result<(), CtlError> {
    let start = Instant::now();
    let mut progress = Progress::new();
    let outcome = loop {
        progress.show(&now);
        if now.total == 0 {
            break Err(CtlError::Job(format!(
                "preheat {}: no online agent matches its labels and may get {}@{}; check the agents' labels and online state with `arcadectl agent list`, or preheat with other --label values",
                now.preheat_id, now.plugin_id, now.version
            )));
        }
        if now.done == now.total {
            break Ok(());
        }
        if now.done + now.failed == now.total {
            let failed: Vec<String> = now
                .unfinished
                .iter()
                .filter(|t| t.state == pb::PreheatState::Failed as i32)
                .take(SHOWN_FAILURES)
                .map(|t| format!("{}: {}", t.agent_id, t.error))
                .collect();
            break Err(CtlError::Job(format!(
                "preheat {}: {} of {} agents failed ({})",
                now.preheat_id,
                now.failed,
                now.total,
                failed.join("; ")
            )));
        }
        if let Some(limit) = timeout {
            if start.elapsed() >= limit {
                break Err(CtlError::Job(format!(
                    "timed out after {:.1}s: preheat {}: {}",
                    limit.as_secs_f64(),
                    now.preheat_id,
                    progress_line(&now)
                )));
            }
        }
        tokio::time::sleep(POLL_INTERVAL).await;
        now = get(conn, &now.preheat_id).await?;
    };
    progress.finish();
    if json {
        emit_json(&PreheatJson::from(now))?;
    } else if outcome.is_ok() {
        emit(&format!(
            "preheat {}: {}@{} held by all {} agent(s); {}",
            now.preheat_id,
            now.plugin_id,
            now.version,
            now.total,
            progress_line(&now)
                .split_once("; ")
                .map_or(String::new(), |(_, bytes)| bytes.to_owned())
        ))?;
    }
    outcome
}
