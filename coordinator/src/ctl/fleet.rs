//! `arcadectl fleet status` (one `Fleet.GetFleetStatus` snapshot as tables or JSON) and
//! `arcadectl job watch` (a job followed live: a line per change until it finishes).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use arcade_proto::v1 as pb;
use serde::Serialize;

use super::Ctx;
use super::commands::{fetch_job, finished, next_poll};
use super::error::CtlError;
use super::output::{JobJson, ProgressJson, emit, emit_json, progress_text, table};

/// How often `job watch` asks.
const WATCH_INTERVAL: Duration = Duration::from_millis(500);

/// `fleet status --json`.
#[derive(Debug, Serialize)]
struct FleetJson {
    agents_online: u32,
    agents_offline: u32,
    /// `key=value` → online / offline agents carrying it.
    labels: BTreeMap<String, LabelJson>,
    jobs_queued: u32,
    jobs_running: u32,
    plugins: Vec<PluginStatusJson>,
}

#[derive(Debug, Serialize)]
struct LabelJson {
    online: u32,
    offline: u32,
}

#[derive(Debug, Serialize)]
struct PluginStatusJson {
    id: String,
    version: String,
    sha256: String,
    holders: u32,
    fetching: u32,
    from_coordinator: u32,
    coordinator_bytes: u64,
}

impl From<pb::FleetStatus> for FleetJson {
    fn from(s: pb::FleetStatus) -> Self {
        Self {
            agents_online: s.agents_online,
            agents_offline: s.agents_offline,
            labels: s
                .labels
                .into_iter()
                .map(|l| {
                    (
                        format!("{}={}", l.key, l.value),
                        LabelJson {
                            online: l.online,
                            offline: l.offline,
                        },
                    )
                })
                .collect(),
            jobs_queued: s.jobs_queued,
            jobs_running: s.jobs_running,
            plugins: s
                .plugins
                .into_iter()
                .map(|p| PluginStatusJson {
                    id: p.plugin_id,
                    version: p.version,
                    sha256: p.sha256,
                    holders: p.holders,
                    fetching: p.fetching,
                    from_coordinator: p.from_coordinator,
                    coordinator_bytes: p.coordinator_bytes,
                })
                .collect(),
        }
    }
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1u64 << 20) as f64)
}

fn fleet_text(f: &FleetJson) -> String {
    let mut out = format!(
        "agents  {} online, {} offline\njobs    {} queued, {} running\n",
        f.agents_online, f.agents_offline, f.jobs_queued, f.jobs_running
    );
    if !f.labels.is_empty() {
        let rows: Vec<Vec<String>> = f
            .labels
            .iter()
            .map(|(l, c)| vec![l.clone(), c.online.to_string(), c.offline.to_string()])
            .collect();
        out.push('\n');
        out.push_str(&table(&["label", "online", "offline"], &rows));
    }
    if !f.plugins.is_empty() {
        let rows: Vec<Vec<String>> = f
            .plugins
            .iter()
            .map(|p| {
                vec![
                    if p.id.is_empty() {
                        format!("({})", &p.sha256[..p.sha256.len().min(12)])
                    } else {
                        p.id.clone()
                    },
                    p.version.clone(),
                    p.holders.to_string(),
                    p.fetching.to_string(),
                    p.from_coordinator.to_string(),
                    mib(p.coordinator_bytes),
                ]
            })
            .collect();
        out.push('\n');
        out.push_str(&table(
            &[
                "plugin",
                "version",
                "holders",
                "fetching",
                "from coordinator",
                "coordinator sent",
            ],
            &rows,
        ));
    }
    out
}

/// Runs `fleet status`.
pub(super) async fn fleet_status(ctx: &Ctx, json: bool) -> Result<(), CtlError> {
    let conn = ctx.connect().await?;
    let status = conn
        .fleet()
        .get_fleet_status(pb::GetFleetStatusRequest {})
        .await
        .map_err(|s| conn.error(s))?
        .into_inner();
    let f = FleetJson::from(status);
    if json {
        emit_json(&f)
    } else {
        emit(&fleet_text(&f))
    }
}

/// What `job watch` reports a change of.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
struct WatchLine {
    job_id: String,
    status: &'static str,
    agent_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    progress: Option<ProgressJson>,
}

impl WatchLine {
    fn of(job: &JobJson) -> Self {
        Self {
            job_id: job.id.clone(),
            status: job.status,
            agent_id: job.agent_id.clone(),
            progress: job.progress.clone(),
        }
    }

    /// The same job state, whatever the clock says (a phase restarted at another
    /// instant is a change).
    fn text(&self) -> String {
        let mut line = format!("{:<9}", self.status);
        if !self.agent_id.is_empty() && self.status == "running" {
            line.push_str(&format!(" on {}", self.agent_id));
        }
        if let Some(p) = &self.progress {
            line.push_str(&format!("  {}", progress_text(p)));
        }
        line
    }
}

fn clock() -> String {
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0);
    let secs = ms.div_euclid(1000).rem_euclid(86_400);
    format!("{:02}:{:02}:{:02}", secs / 3600, secs / 60 % 60, secs % 60)
}

/// Runs `job watch`.
pub(super) async fn job_watch(
    ctx: &Ctx,
    id: String,
    timeout: Option<Duration>,
    json: bool,
) -> Result<(), CtlError> {
    let conn = ctx.connect().await?;
    let start = Instant::now();
    let mut last: Option<WatchLine> = None;
    loop {
        let job = fetch_job(&conn, id.clone()).await?;
        let line = WatchLine::of(&job);
        if last.as_ref() != Some(&line) {
            if json {
                let text = if finished(&job).is_some() {
                    serde_json::to_string(&job)
                } else {
                    serde_json::to_string(&line)
                }
                .map_err(|e| CtlError::Output(e.to_string()))?;
                emit(&text)?;
            } else {
                emit(&format!("{}  {}", clock(), line.text()))?;
            }
            last = Some(line);
        }
        if let Some(outcome) = finished(&job) {
            return outcome;
        }
        tokio::time::sleep(next_poll(&job, timeout, start, WATCH_INTERVAL)?).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fleet_tables_read_well() {
        let f = FleetJson::from(pb::FleetStatus {
            agents_online: 2,
            agents_offline: 1,
            labels: vec![pb::LabelStatus {
                key: "zone".into(),
                value: "eu".into(),
                online: 2,
                offline: 1,
            }],
            jobs_queued: 3,
            jobs_running: 1,
            plugins: vec![pb::PluginStatus {
                plugin_id: "notify/slack".into(),
                version: "1.2.0".into(),
                sha256: "ab".repeat(32),
                holders: 2,
                fetching: 1,
                from_coordinator: 1,
                coordinator_bytes: 3 << 20,
            }],
        });
        let text = fleet_text(&f);
        assert!(text.starts_with("agents  2 online, 1 offline\njobs    3 queued, 1 running\n"));
        assert!(text.contains("zone=eu  2       1"), "{text}");
        assert!(
            text.contains("notify/slack  1.2.0    2        1         1                 3.0 MiB"),
            "{text}"
        );
    }
}
