//! Running one job: check its plugins' publisher signatures (`[trust]`), pin and fetch
//! them (with the configured fallback), then every plugin's `before` → the job's
//! commands → `on_success` or `on_failure` → `after`, each plugin × stage as a child
//! process, and build the report.
//!
//! A failing `before` fails the job and skips the commands (the `on_failure` and
//! `after` stages still run, so notification plugins see the failure). Failures in later
//! stages are recorded, not fatal. A plugin that cannot be fetched fails the job before
//! anything runs — unless the fallback is `previous-version` and an older version is
//! cached, which is then used and recorded as a `fetch` result. A job never runs
//! without a plugin it requires.

use std::path::PathBuf;
use std::time::Duration;

use arcade_p2p::PluginRef;
use arcade_proto::v1 as pb;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::cache::{CachedPlugin, PinGuard, PluginCache};
use crate::config::{Fallback, ValidConfig};
use crate::exec::{self, CommandRun, StageRun};
use crate::fetch::Fetcher;

/// What a job needs to run.
#[derive(Clone, Debug)]
pub struct JobContext {
    /// Agent config.
    pub config: ValidConfig,
    /// The plugin cache.
    pub cache: PluginCache,
    /// The fetcher.
    pub fetcher: Fetcher,
    /// Where the job is, for heartbeats.
    pub progress: crate::progress::ProgressBoard,
}

/// A plugin ready to run for this job.
struct Ready {
    info: pb::PluginInfo,
    cached: CachedPlugin,
    _pin: PinGuard,
}

fn stage_name(stage: pb::Stage) -> &'static str {
    match stage {
        pb::Stage::Before => "before",
        pb::Stage::OnSuccess => "on_success",
        pb::Stage::OnFailure => "on_failure",
        pb::Stage::After => "after",
        pb::Stage::Unspecified => "unspecified",
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Steps a job plans: one fetch per plugin, its stage runs (`before`, one of
/// `on_success`/`on_failure`, `after`, as far as it takes part) and the commands.
fn planned_steps(job: &pb::Job) -> u32 {
    let has = |info: &pb::PluginInfo, s: pb::Stage| info.stages.contains(&(s as i32));
    let stages: usize = job
        .plugins
        .iter()
        .map(|p| {
            1 + usize::from(has(p, pb::Stage::Before))
                + usize::from(has(p, pb::Stage::OnSuccess) || has(p, pb::Stage::OnFailure))
                + usize::from(has(p, pb::Stage::After))
        })
        .sum();
    u32::try_from(stages + job.commands.len()).unwrap_or(u32::MAX)
}

fn plugin_name(r: &Ready) -> String {
    format!("{}@{}", r.info.plugin_id, r.cached.plugin.version)
}

/// Runs `job` and returns the report to send (never fails: failures are reported).
pub async fn run_job(
    ctx: &JobContext,
    job: pb::Job,
    cancel: &CancellationToken,
) -> pb::ReportJobResultRequest {
    let started_at = now_ms();
    let mut results: Vec<pb::PluginExecutionResult> = Vec::new();
    let mut report = pb::ReportJobResultRequest {
        agent_id: ctx.config.id.clone(),
        job_id: job.job_id.clone(),
        started_at,
        ..Default::default()
    };
    let progress = &ctx.progress;
    let id = job.job_id.as_str();
    progress.start(id, planned_steps(&job));
    let fail = |mut report: pb::ReportJobResultRequest, results, message: String| {
        report.status = pb::JobStatus::Failed as i32;
        report.error_message = message;
        report.plugin_results = results;
        report.exit_code = -1;
        report.finished_at = now_ms();
        report
    };

    // 1. Publisher signatures, against this agent's own keys: a refused plugin fails
    //    the job before anything is fetched or run.
    for info in &job.plugins {
        if let Err(message) = check_signature(&ctx.config.trust, info) {
            tracing::warn!(job = %job.job_id, plugin = %info.plugin_id, version = %info.version, %message, "plugin refused");
            results.push(not_ready(info, "signature", &message, started_at));
            return fail(report, results, message);
        }
    }

    // 2. Plugins: pinned for the whole job, fetched (concurrently, bounded by the fetcher).
    let names: Vec<String> = job
        .plugins
        .iter()
        .map(|p| format!("{}@{}", p.plugin_id, p.version))
        .collect();
    progress.phase(id, "fetching", &names.join(", "));
    let fetches = job
        .plugins
        .iter()
        .map(|info| ensure_plugin(ctx, info, cancel));
    let mut ready = Vec::new();
    for (info, outcome) in job
        .plugins
        .iter()
        .zip(futures::future::join_all(fetches).await)
    {
        match outcome {
            Ok((r, note)) => {
                if let Some(note) = note {
                    results.push(note);
                }
                ready.push(r);
                progress.step(id);
            }
            Err(message) => {
                results.push(not_ready(info, "fetch", &message, started_at));
                return fail(report, results, message);
            }
        }
    }

    // 3. Working directory.
    let workdir = ctx.config.jobs_dir.join(sanitize(&job.job_id));
    if let Err(e) = fresh_dir(&workdir).await {
        return fail(
            report,
            results,
            format!("cannot create job directory {}: {e}", workdir.display()),
        );
    }

    // 4. Stages and commands.
    let mut failed = false;
    let mut why = String::new();
    for r in &ready {
        progress.phase(id, "before", &plugin_name(r));
        if let Some(res) = run_plugin_stage(ctx, &job, r, pb::Stage::Before, None, &workdir).await {
            progress.step(id);
            if !res.success && !failed {
                failed = true;
                why = format!(
                    "before stage of {}@{} failed: {}",
                    r.info.plugin_id, r.cached.plugin.version, res.error_message
                );
            }
            results.push(res);
        }
    }
    let mut output = String::new();
    let max_output = ctx.config.raw.jobs.max_output.bytes() as usize;
    if !failed {
        let timeout = if job.timeout_seconds > 0 {
            Duration::from_secs(u64::from(job.timeout_seconds))
        } else {
            ctx.config.raw.jobs.command_timeout.get()
        };
        for command in &job.commands {
            let env = job
                .parameters
                .iter()
                .filter(|(k, _)| k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'))
                .map(|(k, v)| {
                    (
                        format!("ARCADE_PARAM_{}", k.to_ascii_uppercase()),
                        v.clone(),
                    )
                })
                .chain([("ARCADE_JOB_ID".to_string(), job.job_id.clone())])
                .collect();
            progress.phase(id, "commands", command);
            let run = CommandRun {
                command: command.clone(),
                workdir: workdir.clone(),
                env,
                timeout,
                max_output,
            };
            let out = tokio::select! {
                out = exec::run_command(&run) => out,
                _ = cancel.cancelled() => {
                    failed = true;
                    why = "agent shutting down: job stopped".into();
                    break;
                }
            };
            progress.step(id);
            output.push_str(&out.output_tail);
            report.exit_code = out.exit_code.unwrap_or(-1);
            if !out.success {
                failed = true;
                why = if out.timed_out {
                    format!("command {command:?} timed out after {timeout:?}")
                } else {
                    format!("command {command:?} failed: {}", out.error_message)
                };
                break;
            }
        }
    }
    let status = if failed { "failed" } else { "succeeded" };
    let finish = if failed {
        pb::Stage::OnFailure
    } else {
        pb::Stage::OnSuccess
    };
    for stage in [finish, pb::Stage::After] {
        for r in &ready {
            progress.phase(id, stage_name(stage), &plugin_name(r));
            if let Some(res) = run_plugin_stage(ctx, &job, r, stage, Some(status), &workdir).await {
                progress.step(id);
                results.push(res);
            }
        }
    }

    let _ = tokio::fs::remove_dir_all(&workdir).await;
    report.status = if failed {
        pb::JobStatus::Failed
    } else {
        pb::JobStatus::Succeeded
    } as i32;
    report.error_message = why;
    report.output_tail = tail(&output, max_output);
    report.plugin_results = results;
    report.finished_at = now_ms();
    report
}

/// Fetches (or finds) one plugin, applying the fallback policy. Returns the ready
/// plugin and, when a fallback was used, the result that records it.
/// The result of a plugin that could not be made ready at `stage` (`signature`,
/// `fetch`): it fails the job before anything runs.
fn not_ready(
    info: &pb::PluginInfo,
    stage: &str,
    message: &str,
    started_at: i64,
) -> pb::PluginExecutionResult {
    pb::PluginExecutionResult {
        plugin_id: info.plugin_id.clone(),
        plugin_name: info.name.clone(),
        version: info.version.clone(),
        stage: stage.into(),
        success: false,
        error_message: message.into(),
        start_time: started_at,
        end_time: now_ms(),
        ..Default::default()
    }
}

/// Checks `info`'s publisher signature under `trust`; the error says why it is refused.
pub(crate) fn check_signature(
    trust: &arcade_p2p::publisher::TrustPolicy,
    info: &pb::PluginInfo,
) -> Result<(), String> {
    let refused =
        |why: String| format!("plugin {}@{} refused: {why}", info.plugin_id, info.version);
    let content: arcade_p2p::ContentId = info
        .checksum
        .parse()
        .map_err(|e| refused(format!("its sha256 {:?} is invalid: {e}", info.checksum)))?;
    let statement = arcade_p2p::publisher::statement(
        &info.plugin_id,
        &info.version,
        &content,
        u64::try_from(info.size).unwrap_or(u64::MAX),
    );
    trust
        .check(&info.plugin_id, &info.signer, &info.signature, &statement)
        .map(|_| ())
        .map_err(|e| refused(e.to_string()))
}

async fn ensure_plugin(
    ctx: &JobContext,
    info: &pb::PluginInfo,
    cancel: &CancellationToken,
) -> Result<(Ready, Option<pb::PluginExecutionResult>), String> {
    let wanted = PluginRef::new(&info.plugin_id, &info.version)
        .map_err(|e| format!("plugin {}@{} is invalid: {e}", info.plugin_id, info.version))?;
    let pin = ctx.cache.pin(&wanted);
    let started = now_ms();
    let error = match ctx.fetcher.ensure(info, cancel).await {
        Ok(f) => {
            return Ok((
                Ready {
                    info: info.clone(),
                    cached: f.plugin,
                    _pin: pin,
                },
                None,
            ));
        }
        Err(e) => e,
    };
    let message = format!("plugin {wanted} unavailable: {error}");
    if ctx.config.raw.download.fallback != Fallback::PreviousVersion {
        return Err(message);
    }
    let cache = ctx.cache.clone();
    let (id, version) = (wanted.id.clone(), wanted.version.clone());
    let previous = tokio::task::spawn_blocking(move || cache.newest_other_version(&id, &version))
        .await
        .ok()
        .and_then(Result::ok)
        .flatten();
    let Some(previous) = previous else {
        return Err(format!(
            "{message}; fallback previous-version found no cached version of {}",
            wanted.id
        ));
    };
    tracing::warn!(plugin = %wanted, using = %previous.plugin, "plugin unavailable: using the newest cached version");
    let note = pb::PluginExecutionResult {
        plugin_id: info.plugin_id.clone(),
        plugin_name: info.name.clone(),
        version: previous.plugin.version.to_string(),
        stage: "fetch".into(),
        success: false,
        error_message: format!(
            "{message}; fallback previous-version: ran {} instead",
            previous.plugin
        ),
        start_time: started,
        end_time: now_ms(),
        ..Default::default()
    };
    let pin = ctx.cache.pin(&previous.plugin);
    Ok((
        Ready {
            info: info.clone(),
            cached: previous,
            _pin: pin,
        },
        Some(note),
    ))
}

/// Runs plugin `r` in `stage` if it takes part in it.
async fn run_plugin_stage(
    ctx: &JobContext,
    job: &pb::Job,
    r: &Ready,
    stage: pb::Stage,
    job_status: Option<&str>,
    workdir: &std::path::Path,
) -> Option<pb::PluginExecutionResult> {
    if !r.info.stages.contains(&(stage as i32)) {
        return None;
    }
    let name = stage_name(stage);
    let version = r.cached.plugin.version.to_string();
    let context = json!({
        "job_id": job.job_id,
        "job_name": job.name,
        "stage": name,
        "job_status": job_status.unwrap_or("running"),
        "plugin_id": r.info.plugin_id,
        "plugin_version": version,
        "parameters": job.parameters,
        "attempt": job.attempt,
    });
    let out = exec::run_stage(&StageRun {
        program: r.cached.path.clone(),
        stage: name.into(),
        job_id: job.job_id.clone(),
        plugin_id: r.info.plugin_id.clone(),
        plugin_version: version.clone(),
        job_status: job_status.map(str::to_owned),
        workdir: workdir.to_owned(),
        context,
        timeout: ctx.config.raw.jobs.stage_timeout.get(),
        max_output: ctx.config.raw.jobs.max_output.bytes() as usize,
    })
    .await;
    Some(pb::PluginExecutionResult {
        plugin_id: r.info.plugin_id.clone(),
        plugin_name: r.info.name.clone(),
        version,
        stage: name.into(),
        success: out.success,
        error_message: out.error_message,
        start_time: out.start_time_ms,
        end_time: out.end_time_ms,
        result: out.result,
    })
}

/// A job id as a directory name.
fn sanitize(id: &str) -> String {
    id.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .take(64)
        .collect()
}

async fn fresh_dir(dir: &PathBuf) -> std::io::Result<()> {
    let _ = tokio::fs::remove_dir_all(dir).await;
    tokio::fs::create_dir_all(dir).await?;
    // Job directories (and the jobs dir above them) are the agent user's alone.
    if let Some(parent) = dir.parent() {
        arcade_p2p::settings::restrict(parent, 0o700)?;
    }
    arcade_p2p::settings::restrict(dir, 0o700)
}

/// The last `max` bytes of `s` on a char boundary.
fn tail(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let mut start = s.len() - max;
    while !s.is_char_boundary(start) {
        start += 1;
    }
    s[start..].to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use arcade_p2p::ContentId;
    use arcade_p2p::publisher::{PublisherKey, TrustPolicy, statement};

    /// What a coordinator (or its storage) could change after a publisher signed:
    /// every field the signature covers is checked by the agent itself.
    #[test]
    fn a_record_altered_after_signing_is_refused() {
        let key = PublisherKey::generate();
        let content = ContentId::of_bytes(b"#!/bin/sh\n");
        let signed = pb::PluginInfo {
            plugin_id: "a/p".into(),
            version: "1.0.0".into(),
            checksum: content.to_hex(),
            size: 10,
            signer: key.id().as_bytes().to_vec(),
            signature: key.sign(&statement("a/p", "1.0.0", &content, 10)),
            ..Default::default()
        };
        let trust = TrustPolicy::new([key.id().to_string().as_str()], true).unwrap();
        assert_eq!(check_signature(&trust, &signed), Ok(()));
        let other = ContentId::of_bytes(b"#!/bin/sh\nrm -rf /\n").to_hex();
        for altered in [
            pb::PluginInfo {
                checksum: other,
                ..signed.clone()
            },
            pb::PluginInfo {
                size: 11,
                ..signed.clone()
            },
            pb::PluginInfo {
                version: "1.0.1".into(),
                ..signed.clone()
            },
            pb::PluginInfo {
                plugin_id: "a/q".into(),
                ..signed.clone()
            },
        ] {
            let why = check_signature(&trust, &altered).unwrap_err();
            assert!(why.contains("does not match"), "{why}");
        }
        let unsigned = pb::PluginInfo {
            signer: Vec::new(),
            signature: Vec::new(),
            ..signed
        };
        let why = check_signature(&trust, &unsigned).unwrap_err();
        assert!(why.contains("refused: the plugin is not signed"), "{why}");
        assert_eq!(check_signature(&TrustPolicy::default(), &unsigned), Ok(()));
    }
}
