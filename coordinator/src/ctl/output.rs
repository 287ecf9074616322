//! What `arcadectl` prints: the `--json` shapes (one serde struct each, stable
//! snake_case field names) and the short human tables and lines.

use std::collections::BTreeMap;
use std::io::Write as _;

use arcade_proto::v1 as pb;
use serde::Serialize;

use super::error::CtlError;

/// A plugin version (`plugin push/list/get --json`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PluginJson {
    /// Plugin id, e.g. `notify/slack`.
    pub id: String,
    /// Semantic version.
    pub version: String,
    /// Plugin type.
    #[serde(rename = "type")]
    pub plugin_type: String,
    /// Display name.
    pub name: String,
    /// Description.
    pub description: String,
    /// SHA-256 of the content, lowercase hex.
    pub sha256: String,
    /// Content size in bytes.
    pub size: u64,
    /// Chunk size of the manifest (0 for content-defined chunks).
    pub chunk_size: u32,
    /// Content-defined chunks: their bounds in bytes (absent for fixed-size chunks).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cdc: Option<CdcJson>,
    /// Number of chunks.
    pub chunks: u32,
    /// Labels an agent must carry to get the plugin.
    pub allowed_labels: BTreeMap<String, String>,
    /// Whether new jobs may use it.
    pub enabled: bool,
    /// Unix milliseconds.
    pub created_at: i64,
    /// The publisher key that signed it (`ed25519:<hex>`), empty when unsigned.
    pub signed_by: String,
    /// Patches that yield this version from older ones (`plugin get` only).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub patches: Vec<PatchJson>,
}

/// Bounds of content-defined chunks, bytes.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CdcJson {
    pub min: u32,
    pub avg: u32,
    pub max: u32,
}

/// A patch to a plugin version from an older one.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PatchJson {
    /// The older version (when the patch was built) and its content.
    pub base_version: String,
    pub base_sha256: String,
    /// The patch's own content and size.
    pub sha256: String,
    pub size: u64,
    /// zstd level and window (log2 bytes).
    pub level: i32,
    pub window_log: u32,
    /// Unix milliseconds.
    pub created_at: i64,
}

impl From<pb::PatchInfo> for PatchJson {
    fn from(p: pb::PatchInfo) -> Self {
        Self {
            base_version: p.base_version,
            base_sha256: p.base_sha256,
            sha256: p.patch_sha256,
            size: p.patch_size,
            level: p.level,
            window_log: p.window_log,
            created_at: p.created_at,
        }
    }
}

impl From<pb::PluginVersion> for PluginJson {
    fn from(p: pb::PluginVersion) -> Self {
        Self {
            id: p.plugin_id,
            version: p.version,
            plugin_type: p.plugin_type,
            name: p.name,
            description: p.description,
            sha256: p.sha256,
            size: p.size,
            chunk_size: p.chunk_size,
            cdc: p.cdc.map(|c| CdcJson {
                min: c.min_size,
                avg: c.avg_size,
                max: c.max_size,
            }),
            chunks: p.chunks,
            allowed_labels: label_map(p.allowed_labels),
            signed_by: arcade_p2p::publisher::PublisherId::from_bytes(&p.signer)
                .map(|k| k.to_string())
                .unwrap_or_default(),
            enabled: p.enabled,
            created_at: p.created_at,
            patches: Vec::new(),
        }
    }
}

/// A plugin a job requires.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RequiredPluginJson {
    /// Plugin id.
    pub id: String,
    /// Version (what the coordinator resolved a selector to).
    pub version: String,
    /// The selector the job named (`^1.2`, `latest`, …); empty when it named `version`.
    pub requested: String,
    /// Stage names (`before`, `on_success`, `on_failure`, `after`).
    pub stages: Vec<String>,
}

/// One plugin run in one stage of a job (proto field names).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PluginResultJson {
    /// Plugin id.
    pub plugin_id: String,
    /// Plugin display name.
    pub plugin_name: String,
    /// Version.
    pub version: String,
    /// Stage name.
    pub stage: String,
    /// Whether the run succeeded.
    pub success: bool,
    /// Why it failed.
    pub error_message: String,
    /// Unix milliseconds.
    pub start_time: i64,
    /// Unix milliseconds.
    pub end_time: i64,
    /// The plugin's result (JSON text).
    pub result: String,
}

/// A job (`job get/list --json`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct JobJson {
    /// Job id.
    pub id: String,
    /// Job name.
    pub name: String,
    /// `queued`, `running`, `succeeded`, `failed` or `cancelled`.
    pub status: &'static str,
    /// A running job whose cancel was asked for (its agent is stopping it).
    pub cancel_requested: bool,
    /// Why no registered agent could ever run this queued job (empty otherwise).
    pub waiting_reason: String,
    /// The agent holding (or that held) the lease.
    pub agent_id: String,
    /// Leases handed out so far.
    pub attempts: u32,
    /// Commands, in order.
    pub commands: Vec<String>,
    /// Parameters.
    pub parameters: BTreeMap<String, String>,
    /// Labels an agent must carry to run the job.
    pub label_selector: BTreeMap<String, String>,
    /// Commands timeout (0 = the agent's default).
    pub timeout_seconds: u32,
    /// Plugins the job needs.
    pub required_plugins: Vec<RequiredPluginJson>,
    /// Unix milliseconds.
    pub created_at: i64,
    /// Unix milliseconds (0 = not started).
    pub started_at: i64,
    /// Unix milliseconds (0 = not finished).
    pub finished_at: i64,
    /// Exit code of the commands.
    pub exit_code: i32,
    /// Tail of the commands' output.
    pub output_tail: String,
    /// Why the job failed.
    pub error_message: String,
    /// Plugin runs.
    pub plugin_results: Vec<PluginResultJson>,
    /// A running job: where its agent is (last heartbeat).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub progress: Option<ProgressJson>,
}

/// Where a running job is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ProgressJson {
    /// `checking`, `fetching`, `before`, `commands`, `on_success`, `on_failure`, `after`.
    pub phase: String,
    /// The plugin or command running in it.
    pub current: String,
    pub steps_done: u32,
    pub steps_total: u32,
    /// Unix milliseconds when the phase began.
    pub phase_started_at: i64,
}

impl From<pb::JobProgress> for ProgressJson {
    fn from(p: pb::JobProgress) -> Self {
        Self {
            phase: p.phase,
            current: p.current,
            steps_done: p.steps_done,
            steps_total: p.steps_total,
            phase_started_at: p.phase_started_at,
        }
    }
}

impl From<pb::JobDetail> for JobJson {
    fn from(j: pb::JobDetail) -> Self {
        Self {
            progress: j.progress.map(ProgressJson::from),
            status: status_name(j.status),
            cancel_requested: j.cancel_requested,
            waiting_reason: j.waiting_reason,
            id: j.job_id,
            name: j.name,
            agent_id: j.agent_id,
            attempts: j.attempts,
            commands: j.commands,
            parameters: j.parameters.into_iter().collect(),
            label_selector: label_map(j.label_selector),
            timeout_seconds: j.timeout_seconds,
            required_plugins: j
                .required_plugins
                .into_iter()
                .map(|r| RequiredPluginJson {
                    id: r.plugin_id,
                    version: r.version,
                    requested: r.requested,
                    stages: r.stages.into_iter().map(stage_name).collect(),
                })
                .collect(),
            created_at: j.created_at,
            started_at: j.started_at,
            finished_at: j.finished_at,
            exit_code: j.exit_code,
            output_tail: j.output_tail,
            error_message: j.error_message,
            plugin_results: j
                .plugin_results
                .into_iter()
                .map(|r| PluginResultJson {
                    plugin_id: r.plugin_id,
                    plugin_name: r.plugin_name,
                    version: r.version,
                    stage: r.stage,
                    success: r.success,
                    error_message: r.error_message,
                    start_time: r.start_time,
                    end_time: r.end_time,
                    result: r.result,
                })
                .collect(),
        }
    }
}

/// A plugin an agent holds.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct InstalledPluginJson {
    /// Plugin id.
    pub plugin_id: String,
    /// Version.
    pub version: String,
    /// SHA-256, lowercase hex.
    pub sha256: String,
}

/// An agent (`agent list --json`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AgentJson {
    /// Agent id.
    pub agent_id: String,
    /// Host name.
    pub hostname: String,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// libp2p peer id.
    pub peer_id: String,
    /// libp2p addresses.
    pub addrs: Vec<String>,
    /// Agent software version.
    pub agent_version: String,
    /// Plugins the agent holds.
    pub installed_plugins: Vec<InstalledPluginJson>,
    /// Unix milliseconds.
    pub registered_at: i64,
    /// Unix milliseconds (0 = not seen since the coordinator started).
    pub last_seen: i64,
    /// Seen within three heartbeat intervals.
    pub online: bool,
    /// Jobs leased to the agent now.
    pub running_jobs: Vec<String>,
}

impl From<pb::AgentSummary> for AgentJson {
    fn from(a: pb::AgentSummary) -> Self {
        Self {
            agent_id: a.agent_id,
            hostname: a.hostname,
            labels: label_map(a.labels),
            peer_id: a.peer_id,
            addrs: a.addrs,
            agent_version: a.agent_version,
            installed_plugins: a
                .installed_plugins
                .into_iter()
                .map(|i| InstalledPluginJson {
                    plugin_id: i.plugin_id,
                    version: i.version,
                    sha256: i.sha256,
                })
                .collect(),
            registered_at: a.registered_at,
            last_seen: a.last_seen,
            online: a.online,
            running_jobs: a.running_jobs,
        }
    }
}

fn label_map(labels: Vec<pb::Label>) -> BTreeMap<String, String> {
    labels.into_iter().map(|l| (l.key, l.value)).collect()
}

/// The name of a job status (`queued`, `running`, `succeeded`, `failed`, `cancelled`).
pub fn status_name(status: i32) -> &'static str {
    match pb::JobStatus::try_from(status) {
        Ok(pb::JobStatus::Queued) => "queued",
        Ok(pb::JobStatus::Running) => "running",
        Ok(pb::JobStatus::Succeeded) => "succeeded",
        Ok(pb::JobStatus::Failed) => "failed",
        Ok(pb::JobStatus::Cancelled) => "cancelled",
        Ok(pb::JobStatus::Unspecified) | Err(_) => "unspecified",
    }
}

/// The name of a stage (`before`, `on_success`, `on_failure`, `after`).
pub fn stage_name(stage: i32) -> String {
    match pb::Stage::try_from(stage) {
        Ok(pb::Stage::Before) => "before".into(),
        Ok(pb::Stage::OnSuccess) => "on_success".into(),
        Ok(pb::Stage::OnFailure) => "on_failure".into(),
        Ok(pb::Stage::After) => "after".into(),
        Ok(pb::Stage::Unspecified) | Err(_) => format!("stage_{stage}"),
    }
}

/// Writes text to stdout (an error instead of a panic when stdout is closed).
pub fn emit(text: &str) -> Result<(), CtlError> {
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())
        .and_then(|()| {
            if text.ends_with('\n') {
                Ok(())
            } else {
                out.write_all(b"\n")
            }
        })
        .and_then(|()| out.flush())
        .map_err(|e| CtlError::Output(e.to_string()))
}

/// Writes one pretty-printed JSON document to stdout.
pub fn emit_json<T: Serialize + ?Sized>(value: &T) -> Result<(), CtlError> {
    let text = serde_json::to_string_pretty(value).map_err(|e| CtlError::Output(e.to_string()))?;
    emit(&text)
}

/// `before: notify/slack@1.2.0 (2/5 steps)`.
pub fn progress_text(p: &ProgressJson) -> String {
    let current = if p.current.is_empty() {
        String::new()
    } else {
        format!(": {}", p.current)
    };
    format!(
        "{}{current} ({}/{} steps)",
        p.phase, p.steps_done, p.steps_total
    )
}

/// Left-aligned columns separated by two spaces.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let header_row: Vec<String> = headers.iter().map(|h| h.to_uppercase()).collect();
    for row in std::iter::once(&header_row).chain(rows) {
        let mut line = String::new();
        for (i, (cell, w)) in row.iter().zip(&widths).enumerate() {
            if i + 1 == widths.len() {
                line.push_str(cell);
            } else {
                line.push_str(cell);
                line.extend(std::iter::repeat_n(' ', w - cell.chars().count() + 2));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// Unix milliseconds as `YYYY-MM-DD HH:MM:SS` UTC, `-` for 0.
pub fn time(ms: i64) -> String {
    if ms <= 0 {
        return "-".into();
    }
    let secs = ms.div_euclid(1000);
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

/// `k=v,k=v`, or `-` when empty.
pub fn labels_text(labels: &BTreeMap<String, String>) -> String {
    if labels.is_empty() {
        "-".into()
    } else {
        labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// The first `n` characters of a hex digest.
pub fn short_hash(hash: &str) -> String {
    hash.chars().take(12).collect()
}

/// Plugins as a table.
pub fn plugin_table(plugins: &[PluginJson]) -> String {
    let rows: Vec<Vec<String>> = plugins
        .iter()
        .map(|p| {
            vec![
                p.id.clone(),
                p.version.clone(),
                p.plugin_type.clone(),
                p.size.to_string(),
                short_hash(&p.sha256),
                if p.enabled { "yes" } else { "no" }.into(),
            ]
        })
        .collect();
    table(
        &["id", "version", "type", "size", "sha256", "enabled"],
        &rows,
    )
}

/// One plugin as `key: value` lines.
pub fn plugin_details(p: &PluginJson) -> String {
    let mut out = String::new();
    for (k, v) in [
        ("plugin", format!("{}@{}", p.id, p.version)),
        ("type", p.plugin_type.clone()),
        ("name", p.name.clone()),
        ("description", p.description.clone()),
        ("sha256", p.sha256.clone()),
        ("size", p.size.to_string()),
        (
            "chunks",
            match &p.cdc {
                None => format!("{} x {} bytes", p.chunks, p.chunk_size),
                Some(c) => format!(
                    "{} content-defined ({} / {} / {} bytes min / avg / max)",
                    p.chunks, c.min, c.avg, c.max
                ),
            },
        ),
        ("allowed labels", labels_text(&p.allowed_labels)),
        ("enabled", if p.enabled { "yes" } else { "no" }.into()),
        ("signed by", or_dash(&p.signed_by)),
        ("created", time(p.created_at)),
    ] {
        out.push_str(&format!("{k:<15} {v}\n"));
    }
    for patch in &p.patches {
        out.push_str(&format!(
            "{:<15} from {}: {} bytes ({:.1} % of the version), zstd level {}\n",
            "patch",
            patch.base_version,
            patch.size,
            100.0 * patch.size as f64 / p.size.max(1) as f64,
            patch.level
        ));
    }
    out
}

/// Jobs as a table.
pub fn job_table(jobs: &[JobJson]) -> String {
    let rows: Vec<Vec<String>> = jobs
        .iter()
        .map(|j| {
            vec![
                j.id.clone(),
                j.status.into(),
                or_dash(&j.name),
                or_dash(&j.agent_id),
                j.attempts.to_string(),
                time(j.created_at),
            ]
        })
        .collect();
    table(
        &["id", "status", "name", "agent", "attempts", "created"],
        &rows,
    )
}

/// One job as `key: value` lines (output tail last).
pub fn job_details(j: &JobJson) -> String {
    let plugins = j
        .required_plugins
        .iter()
        .map(|r| {
            let asked = if r.requested.is_empty() {
                String::new()
            } else {
                format!(" (asked for @{})", r.requested)
            };
            format!("{}@{}{asked}:{}", r.id, r.version, r.stages.join(","))
        })
        .collect::<Vec<_>>()
        .join(" ");
    let mut out = String::new();
    for (k, v) in [
        ("job", j.id.clone()),
        ("name", or_dash(&j.name)),
        (
            "status",
            if j.cancel_requested && j.status == "running" {
                "running (cancel requested)".into()
            } else {
                j.status.into()
            },
        ),
        ("agent", or_dash(&j.agent_id)),
        ("attempts", j.attempts.to_string()),
        ("plugins", or_dash(&plugins)),
        ("labels", labels_text(&j.label_selector)),
        ("parameters", labels_text(&j.parameters)),
        (
            "timeout",
            if j.timeout_seconds == 0 {
                "agent default".into()
            } else {
                format!("{}s", j.timeout_seconds)
            },
        ),
        ("created", time(j.created_at)),
        ("started", time(j.started_at)),
        ("finished", time(j.finished_at)),
    ] {
        out.push_str(&format!("{k:<11} {v}\n"));
    }
    if !j.waiting_reason.is_empty() {
        out.push_str(&format!("{:<11} {}\n", "waiting", j.waiting_reason));
    }
    if let Some(p) = &j.progress {
        out.push_str(&format!("{:<11} {}\n", "progress", progress_text(p)));
    }
    for (i, c) in j.commands.iter().enumerate() {
        out.push_str(&format!("{:<11} {c}\n", format!("command {}", i + 1)));
    }
    if j.finished_at > 0 {
        out.push_str(&format!("{:<11} {}\n", "exit code", j.exit_code));
    }
    if !j.error_message.is_empty() {
        out.push_str(&format!("{:<11} {}\n", "error", j.error_message));
    }
    for r in &j.plugin_results {
        out.push_str(&format!(
            "{:<11} {}@{} {} {}{}\n",
            "plugin run",
            r.plugin_id,
            r.version,
            r.stage,
            if r.success { "ok" } else { "failed" },
            if r.error_message.is_empty() {
                String::new()
            } else {
                format!(": {}", r.error_message)
            }
        ));
    }
    if !j.output_tail.is_empty() {
        out.push_str("output:\n");
        out.push_str(&j.output_tail);
    }
    out
}

/// Agents as a table.
pub fn agent_table(agents: &[AgentJson]) -> String {
    let rows: Vec<Vec<String>> = agents
        .iter()
        .map(|a| {
            vec![
                a.agent_id.clone(),
                or_dash(&a.hostname),
                if a.online { "yes" } else { "no" }.into(),
                a.running_jobs.len().to_string(),
                a.installed_plugins.len().to_string(),
                labels_text(&a.labels),
                time(a.last_seen),
            ]
        })
        .collect();
    table(
        &[
            "agent",
            "hostname",
            "online",
            "jobs",
            "plugins",
            "labels",
            "last seen",
        ],
        &rows,
    )
}

fn or_dash(s: &str) -> String {
    if s.is_empty() { "-".into() } else { s.into() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_utc_civil_dates() {
        assert_eq!(time(0), "-");
        assert_eq!(time(1), "1970-01-01 00:00:00");
        assert_eq!(time(951_782_400_000), "2000-02-29 00:00:00");
        assert_eq!(time(1_700_000_000_123), "2023-11-14 22:13:20");
    }

    #[test]
    fn tables_align_columns() {
        let t = table(&["a", "bb"], &[vec!["xxx".into(), "y".into()]]);
        assert_eq!(t, "A    BB\nxxx  y\n");
    }

    #[test]
    fn json_shapes_use_the_documented_names() {
        let p = PluginJson::from(pb::PluginVersion {
            plugin_id: "notify/x".into(),
            version: "1.0.0".into(),
            plugin_type: "notify".into(),
            allowed_labels: vec![pb::Label {
                key: "zone".into(),
                value: "eu".into(),
            }],
            ..Default::default()
        });
        let v = serde_json::to_value(&p).unwrap();
        assert_eq!(v["type"], "notify");
        assert_eq!(v["allowed_labels"]["zone"], "eu");
        let j = JobJson::from(pb::JobDetail {
            status: pb::JobStatus::Failed as i32,
            required_plugins: vec![pb::RequiredPlugin {
                plugin_id: "a".into(),
                version: "1.0.0".into(),
                stages: vec![pb::Stage::OnFailure as i32, 9],
                requested: "^1".into(),
            }],
            ..Default::default()
        });
        let v = serde_json::to_value(&j).unwrap();
        assert_eq!(v["status"], "failed");
        assert_eq!(
            v["required_plugins"][0]["stages"],
            serde_json::json!(["on_failure", "stage_9"])
        );
        assert_eq!(v["required_plugins"][0]["requested"], "^1");
        let shown = job_details(&j);
        assert!(
            shown.contains("a@1.0.0 (asked for @^1):on_failure,stage_9"),
            "{shown}"
        );
    }
}
