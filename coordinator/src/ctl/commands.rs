//! Every command but `plugin push`: local validation first, then one call (or a poll
//! loop for `job wait`), then output.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use arcade_p2p::{PluginRef, PluginSelector};
use arcade_proto::v1 as pb;

use super::error::CtlError;
use super::output::{
    AgentJson, JobJson, PluginJson, agent_table, emit, emit_json, job_details, job_table,
    plugin_details, plugin_table,
};
use super::{
    AgentCommand, Command, CreateArgs, Ctx, FleetCommand, JobCommand, KeyCommand, PluginCommand,
    StatusArg,
};

/// How often `job wait` polls.
const POLL_INTERVAL: Duration = Duration::from_millis(300);

/// Runs one command.
pub(super) async fn dispatch(ctx: &Ctx, command: Command) -> Result<(), CtlError> {
    match command {
        Command::Plugin(PluginCommand::Push(args)) => super::push::push(ctx, args).await,
        Command::Plugin(PluginCommand::List { plugin_type, json }) => {
            plugin_list(ctx, plugin_type.unwrap_or_default(), json).await
        }
        Command::Plugin(PluginCommand::Get { reference, json }) => {
            plugin_get(ctx, &reference, json).await
        }
        Command::Plugin(PluginCommand::Disable { reference }) => {
            plugin_set_enabled(ctx, &reference, false).await
        }
        Command::Plugin(PluginCommand::Enable { reference }) => {
            plugin_set_enabled(ctx, &reference, true).await
        }
        Command::Plugin(PluginCommand::Delete { reference }) => {
            plugin_delete(ctx, &reference).await
        }
        Command::Plugin(PluginCommand::Preheat(args)) => super::preheat::preheat(ctx, args).await,
        Command::Plugin(PluginCommand::PreheatStatus {
            id,
            wait,
            timeout,
            json,
        }) => super::preheat::status(ctx, id, wait, timeout.map(|t| t.get()), json).await,
        Command::Job(JobCommand::Create(args)) => job_create(ctx, args).await,
        Command::Job(JobCommand::Get { id, json }) => job_get(ctx, id, json).await,
        Command::Job(JobCommand::List {
            status,
            limit,
            json,
        }) => job_list(ctx, status, limit.unwrap_or(0), json).await,
        Command::Job(JobCommand::Wait { id, timeout }) => job_wait(ctx, id, timeout).await,
        Command::Job(JobCommand::Watch { id, timeout, json }) => {
            super::fleet::job_watch(ctx, id, timeout, json).await
        }
        Command::Fleet(FleetCommand::Status { json }) => {
            super::fleet::fleet_status(ctx, json).await
        }
        Command::Job(JobCommand::Cancel { id, json }) => job_cancel(ctx, id, json).await,
        Command::Agent(AgentCommand::List { json }) => agent_list(ctx, json).await,
        Command::Agent(AgentCommand::Remove { id }) => agent_remove(ctx, id).await,
        Command::Enroll(command) => super::enroll::run(ctx, command).await,
        Command::Key(KeyCommand::Generate { out }) => key_generate(&out),
    }
}

fn key_generate(out: &std::path::Path) -> Result<(), CtlError> {
    let key = arcade_p2p::publisher::PublisherKey::generate();
    key.save(out).map_err(|e| CtlError::Usage(e.to_string()))?;
    println!("{}", key.id());
    eprintln!(
        "wrote {}: keep it secret; put the public key above in agents' [trust] publisher_keys",
        out.display()
    );
    Ok(())
}

fn plugin_ref(reference: &str) -> Result<PluginRef, CtlError> {
    reference
        .parse()
        .map_err(|e: arcade_p2p::PluginRefError| CtlError::Usage(e.to_string()))
}

async fn plugin_list(ctx: &Ctx, plugin_type: String, json: bool) -> Result<(), CtlError> {
    let conn = ctx.connect().await?;
    let plugins: Vec<PluginJson> = conn
        .plugins()
        .list_plugins(pb::ListPluginsRequest { plugin_type })
        .await
        .map_err(|s| conn.error(s))?
        .into_inner()
        .plugins
        .into_iter()
        .map(PluginJson::from)
        .collect();
    if json {
        emit_json(&plugins)
    } else if plugins.is_empty() {
        emit("no plugins")
    } else {
        emit(&plugin_table(&plugins))
    }
}

async fn plugin_get(ctx: &Ctx, reference: &str, json: bool) -> Result<(), CtlError> {
    let r = plugin_ref(reference)?;
    let conn = ctx.connect().await?;
    let answer = conn
        .plugins()
        .get_plugin(pb::GetPluginRequest {
            plugin_id: r.id.to_string(),
            version: r.version.to_string(),
        })
        .await
        .map_err(|s| conn.error(s))?
        .into_inner();
    let plugin = answer
        .plugin
        .ok_or_else(|| CtlError::BadAnswer("GetPlugin returned no plugin".into()))?;
    let mut plugin = PluginJson::from(plugin);
    plugin.patches = answer.patches.into_iter().map(Into::into).collect();
    if json {
        emit_json(&plugin)
    } else {
        emit(&plugin_details(&plugin))
    }
}

async fn plugin_set_enabled(ctx: &Ctx, reference: &str, enabled: bool) -> Result<(), CtlError> {
    let r = plugin_ref(reference)?;
    let conn = ctx.connect().await?;
    conn.plugins()
        .set_plugin_enabled(pb::SetPluginEnabledRequest {
            plugin_id: r.id.to_string(),
            version: r.version.to_string(),
            enabled,
        })
        .await
        .map_err(|s| conn.error(s))?;
    emit(&format!(
        "{} {r}",
        if enabled { "enabled" } else { "disabled" }
    ))
}

async fn plugin_delete(ctx: &Ctx, reference: &str) -> Result<(), CtlError> {
    let r = plugin_ref(reference)?;
    let conn = ctx.connect().await?;
    let resp = conn
        .plugins()
        .delete_plugin(pb::DeletePluginRequest {
            plugin_id: r.id.to_string(),
            version: r.version.to_string(),
        })
        .await
        .map_err(|s| conn.error(s))?
        .into_inner();
    emit(&format!(
        "deleted {r} ({})",
        if resp.content_removed {
            "content removed"
        } else {
            "content kept: another version uses it"
        }
    ))
}

/// Parses `ID@SELECTOR[:stage,stage]` (an exact version, `^1.2`, `~1.2.3`, `latest`, …;
/// the coordinator resolves selectors).
fn required_plugin(spec: &str) -> Result<pb::RequiredPlugin, CtlError> {
    let bad = |msg: String| CtlError::Usage(format!("--plugin {spec:?}: {msg}"));
    let (reference, stages) = match spec.split_once(':') {
        Some((r, s)) => (r, Some(s)),
        None => (spec, None),
    };
    let r: PluginSelector = reference
        .parse()
        .map_err(|e: arcade_p2p::PluginRefError| bad(e.to_string()))?;
    let mut list = Vec::new();
    for name in stages.into_iter().flat_map(|s| s.split(',')) {
        let stage = match name {
            "before" => pb::Stage::Before,
            "on_success" => pb::Stage::OnSuccess,
            "on_failure" => pb::Stage::OnFailure,
            "after" => pb::Stage::After,
            other => {
                return Err(bad(format!(
                    "stage {other:?} is not one of before, on_success, on_failure, after"
                )));
            }
        } as i32;
        if list.contains(&stage) {
            return Err(bad(format!("stage {name} listed twice")));
        }
        list.push(stage);
    }
    Ok(pb::RequiredPlugin {
        plugin_id: r.id.to_string(),
        version: r.selector.to_string(),
        stages: list,
        requested: String::new(),
    })
}

fn parameters(given: &[String]) -> Result<HashMap<String, String>, CtlError> {
    let mut out = HashMap::new();
    for s in given {
        let (k, v) = s
            .split_once('=')
            .filter(|(k, _)| !k.is_empty())
            .ok_or_else(|| CtlError::Usage(format!("--param {s:?} must be KEY=VALUE")))?;
        if out.insert(k.to_owned(), v.to_owned()).is_some() {
            return Err(CtlError::Usage(format!("--param: {k:?} given twice")));
        }
    }
    Ok(out)
}

/// Joins words into one `sh -c` command line that runs them exactly as given: a word
/// of only safe characters stays as it is, any other is single-quoted (a `'` inside
/// becomes `'\''`), an empty word becomes `''`.
pub(crate) fn shell_join(words: &[String]) -> String {
    let safe = |c: char| c.is_ascii_alphanumeric() || "_@%+=:,./-".contains(c);
    words
        .iter()
        .map(|w| {
            if !w.is_empty() && w.chars().all(safe) {
                w.clone()
            } else {
                format!("'{}'", w.replace('\'', "'\\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// The request `job create` sends (all local validation happens here).
fn create_request(args: CreateArgs) -> Result<pb::CreateJobRequest, CtlError> {
    let required_plugins = args
        .plugin
        .iter()
        .map(|p| required_plugin(p))
        .collect::<Result<Vec<_>, _>>()?;
    let selector = super::parse_labels(&args.label, "--label")?;
    let parameters = parameters(&args.param)?;
    let mut commands = args.cmd;
    if !args.command.is_empty() {
        commands.push(shell_join(&args.command));
    }
    if commands.is_empty() && required_plugins.is_empty() {
        return Err(CtlError::Usage(
            "a job needs a command (after `--` or with --cmd) or a --plugin".into(),
        ));
    }
    Ok(pb::CreateJobRequest {
        name: args.name.unwrap_or_default(),
        commands,
        parameters,
        label_selector: arcade_p2p::labels::to_proto(&selector),
        timeout_seconds: args.timeout.unwrap_or(0),
        required_plugins,
    })
}

async fn job_create(ctx: &Ctx, args: CreateArgs) -> Result<(), CtlError> {
    let request = create_request(args)?;
    let conn = ctx.connect().await?;
    let id = conn
        .jobs()
        .create_job(request)
        .await
        .map_err(|s| conn.error(s))?
        .into_inner()
        .job_id;
    emit(&id)
}

pub(super) async fn fetch_job(
    conn: &super::Connection,
    job_id: String,
) -> Result<JobJson, CtlError> {
    let job = conn
        .jobs()
        .get_job(pb::GetJobRequest { job_id })
        .await
        .map_err(|s| conn.error(s))?
        .into_inner()
        .job
        .ok_or_else(|| CtlError::BadAnswer("GetJob returned no job".into()))?;
    Ok(JobJson::from(job))
}

async fn job_get(ctx: &Ctx, id: String, json: bool) -> Result<(), CtlError> {
    let conn = ctx.connect().await?;
    let job = fetch_job(&conn, id).await?;
    if json {
        emit_json(&job)
    } else {
        emit(&job_details(&job))
    }
}

async fn job_list(
    ctx: &Ctx,
    status: Option<StatusArg>,
    limit: u32,
    json: bool,
) -> Result<(), CtlError> {
    let status = match status {
        None => pb::JobStatus::Unspecified,
        Some(StatusArg::Queued) => pb::JobStatus::Queued,
        Some(StatusArg::Running) => pb::JobStatus::Running,
        Some(StatusArg::Succeeded) => pb::JobStatus::Succeeded,
        Some(StatusArg::Failed) => pb::JobStatus::Failed,
        Some(StatusArg::Cancelled) => pb::JobStatus::Cancelled,
    };
    let conn = ctx.connect().await?;
    let jobs: Vec<JobJson> = conn
        .jobs()
        .list_jobs(pb::ListJobsRequest {
            status: status as i32,
            limit,
        })
        .await
        .map_err(|s| conn.error(s))?
        .into_inner()
        .jobs
        .into_iter()
        .map(JobJson::from)
        .collect();
    if json {
        emit_json(&jobs)
    } else if jobs.is_empty() {
        emit("no jobs")
    } else {
        emit(&job_table(&jobs))
    }
}

/// One line saying why a job failed.
fn failure_reason(job: &JobJson) -> String {
    let mut reason = format!("job {} failed", job.id);
    if !job.error_message.is_empty() {
        reason.push_str(": ");
        reason.push_str(&job.error_message);
    }
    if job.exit_code != 0 {
        reason.push_str(&format!(" (exit code {})", job.exit_code));
    }
    if let Some(r) = job.plugin_results.iter().find(|r| !r.success) {
        reason.push_str(&format!(
            "; plugin {}@{} failed in stage {}",
            r.plugin_id, r.version, r.stage
        ));
        if !r.error_message.is_empty() {
            reason.push_str(&format!(": {}", r.error_message));
        }
    }
    reason
}

async fn job_wait(ctx: &Ctx, id: String, timeout: Option<Duration>) -> Result<(), CtlError> {
    let conn = ctx.connect().await?;
    let start = Instant::now();
    loop {
        let job = fetch_job(&conn, id.clone()).await?;
        if job.status == "succeeded" {
            return emit(&format!("job {} succeeded", job.id));
        }
        if let Some(outcome) = finished(&job) {
            return outcome;
        }
        tokio::time::sleep(next_poll(&job, timeout, start, POLL_INTERVAL)?).await;
    }
}

/// A finished job's exit for `job wait` and `job watch`: `Ok` if it succeeded, the
/// reason otherwise; `None` while it is queued or running.
pub(super) fn finished(job: &JobJson) -> Option<Result<(), CtlError>> {
    match job.status {
        "succeeded" => Some(Ok(())),
        "failed" => Some(Err(CtlError::Job(failure_reason(job)))),
        "cancelled" => Some(Err(CtlError::Job(format!(
            "job {} was cancelled: {}",
            job.id, job.error_message
        )))),
        _ => None,
    }
}

/// How long to wait before asking again (at most `every`), or the error once
/// `timeout` since `start` has passed.
pub(super) fn next_poll(
    job: &JobJson,
    timeout: Option<Duration>,
    start: Instant,
    every: Duration,
) -> Result<Duration, CtlError> {
    let Some(limit) = timeout else {
        return Ok(every);
    };
    let left = limit.saturating_sub(start.elapsed());
    if left.is_zero() {
        return Err(CtlError::Job(format!(
            "timed out after {:.1}s: job {} is still {}",
            limit.as_secs_f64(),
            job.id,
            job.status
        )));
    }
    Ok(left.min(every))
}

async fn job_cancel(ctx: &Ctx, id: String, json: bool) -> Result<(), CtlError> {
    let conn = ctx.connect().await?;
    let answer = conn
        .jobs()
        .cancel_job(pb::CancelJobRequest { job_id: id })
        .await
        .map_err(|s| conn.error(s))?
        .into_inner();
    let job = answer
        .job
        .ok_or_else(|| CtlError::BadAnswer("CancelJob returned no job".into()))?;
    let job = JobJson::from(job);
    if json {
        return emit_json(&job);
    }
    emit(&match job.status {
        _ if answer.already_finished => {
            format!("job {} had already finished: {}", job.id, job.status)
        }
        "cancelled" => format!("job {} cancelled", job.id),
        "running" => format!(
            "job {} is running on agent {}: cancel requested, the agent stops it at its next heartbeat",
            job.id, job.agent_id
        ),
        other => format!("job {} is {other}", job.id),
    })
}

async fn agent_remove(ctx: &Ctx, id: String) -> Result<(), CtlError> {
    let conn = ctx.connect().await?;
    let requeued = conn
        .fleet()
        .remove_agent(pb::RemoveAgentRequest {
            agent_id: id.clone(),
        })
        .await
        .map_err(|s| conn.error(s))?
        .into_inner()
        .requeued_jobs;
    emit(&format!(
        "agent {id} removed; {} job(s) re-queued{}",
        requeued.len(),
        if requeued.is_empty() {
            String::new()
        } else {
            format!(": {}", requeued.join(", "))
        }
    ))
}

async fn agent_list(ctx: &Ctx, json: bool) -> Result<(), CtlError> {
    let conn = ctx.connect().await?;
    let agents: Vec<AgentJson> = conn
        .fleet()
        .list_agents(pb::ListAgentsRequest {})
        .await
        .map_err(|s| conn.error(s))?
        .into_inner()
        .agents
        .into_iter()
        .map(AgentJson::from)
        .collect();
    if json {
        emit_json(&agents)
    } else if agents.is_empty() {
        emit("no agents")
    } else {
        emit(&agent_table(&agents))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shell_join_quotes_what_the_shell_would_split_or_expand() {
        let w = |v: &[&str]| v.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        assert_eq!(shell_join(&w(&["make", "-j4", "a=b"])), "make -j4 a=b");
        assert_eq!(shell_join(&w(&["echo", ""])), "echo ''");
        assert_eq!(
            shell_join(&w(&["echo", "it's $HOME"])),
            "echo 'it'\\''s $HOME'"
        );
        // The shell itself turns the line back into the same words.
        let words = w(&[
            "printf",
            "%s|",
            "a b",
            "it's",
            "$x",
            "*",
            "",
            "tab\there",
            "é",
        ]);
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(shell_join(&words))
            .output()
            .unwrap();
        assert_eq!(
            String::from_utf8(out.stdout).unwrap(),
            "a b|it's|$x|*||tab\there|é|"
        );
    }

    #[test]
    fn plugin_specs_parse_stages() {
        let p = required_plugin("notify/x@1.0.0:before,after").unwrap();
        assert_eq!(p.plugin_id, "notify/x");
        assert_eq!(
            p.stages,
            [pb::Stage::Before as i32, pb::Stage::After as i32]
        );
        assert!(required_plugin("notify/x@1.0.0").unwrap().stages.is_empty());
        for bad in [
            "notify/x@1.0.0:",
            "notify/x@1.0.0:during",
            "notify/x@1.0.0:after,after",
            "notify/x",
            "Bad@1.0.0",
            "a@one",
        ] {
            assert!(required_plugin(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn create_request_orders_commands() {
        let req = create_request(CreateArgs {
            plugin: vec![],
            label: vec!["os=linux".into()],
            param: vec!["k=v=w".into()],
            name: None,
            timeout: Some(5),
            cmd: vec!["first".into()],
            command: vec!["echo".into(), "hi".into()],
        })
        .unwrap();
        assert_eq!(req.commands, ["first", "echo hi"]);
        let exact = create_request(CreateArgs {
            plugin: vec![],
            label: vec![],
            param: vec![],
            name: None,
            timeout: None,
            cmd: vec![],
            command: vec!["sh".into(), "-c".into(), "echo a >> f".into()],
        })
        .unwrap();
        assert_eq!(exact.commands, ["sh -c 'echo a >> f'"]);
        assert_eq!(req.parameters["k"], "v=w");
        assert_eq!(req.timeout_seconds, 5);
        assert!(parameters(&["=x".into()]).is_err());
        assert!(parameters(&["a=1".into(), "a=2".into()]).is_err());
    }
}
