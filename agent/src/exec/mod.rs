//! Running plugin stages and job commands as bounded child processes.
//!
//! Plugins are executables — a native binary or a script with a `#!` line — and are
//! always run as child processes, never loaded into the agent. Job commands run as
//! `sh -c COMMAND`. Both go through the same supervision, and neither entry point ever
//! panics or returns an error: a program that cannot start, fails, or hangs is reported
//! in the outcome.
//!
//! # Plugin stages ([`run_stage`])
//!
//! The plugin file is started with
//! - the stage name (`before`, `on_success`, `on_failure`, `after`) as its only
//!   argument;
//! - the working directory set to the job's working directory;
//! - the agent's environment minus every inherited `ARCADE_*` variable (the agent's own
//!   configuration, which may hold its tokens, is not leaked to plugins), plus
//!   `ARCADE_STAGE`, `ARCADE_JOB_ID`, `ARCADE_PLUGIN_ID`, `ARCADE_PLUGIN_VERSION` and,
//!   when the job's status so far is known, `ARCADE_JOB_STATUS` (`succeeded`/`failed`);
//! - the stage context, as one JSON document, on stdin, which is then closed. A plugin
//!   does not have to read it: the context is written concurrently with everything
//!   else and a broken pipe (the plugin exited or closed stdin) is ignored.
//!
//! The stage succeeds when the plugin exits with status 0 before its timeout. Its
//! stdout, trimmed, is the stage's `result` when it parses as JSON (and was not cut by
//! the output bound); otherwise the result is empty. On failure `error_message` says
//! why: `exited with code N` or `killed by signal N (NAME)` followed by the tail of
//! stderr, `timed out after D`, or `cannot start plugin PATH: OS ERROR` (missing file,
//! not executable, missing `#!` interpreter, missing working directory, …).
//!
//! # Job commands ([`run_command`])
//!
//! `sh -c -- COMMAND` in the job's working directory, with the agent's environment minus
//! inherited `ARCADE_*` variables plus the given variables, stdin from `/dev/null`.
//! Stdout and stderr are merged, in order of arrival, into one output tail.
//!
//! # Bounded output
//!
//! Stdout and stderr are separate pipes read concurrently (so a child blocked writing
//! one while the agent waits on the other cannot deadlock). Only the last `max_output`
//! bytes of each stream (of the merged stream for commands) are kept, in a tail buffer:
//! a child writing gigabytes costs the agent at most about `max_output` bytes per
//! stream. Tails are returned as UTF-8 (invalid bytes replaced, a character cut at the
//! front dropped) and are never longer than `max_output` bytes.
//!
//! # Timeouts, process groups and stray descendants
//!
//! Each child is started in a new process group of its own (`process_group(0)`: the
//! group id is the child's pid), so the agent can signal the child *and every
//! descendant* at once with `killpg(SIGKILL)`:
//! - **Timeout**: when `timeout` elapses, the whole group is SIGKILLed, the child is
//!   reaped, output still in the pipes is drained for at most 2 s, and the outcome says
//!   `timed out after D` (`timed_out` for commands).
//! - **Descendants holding the pipes**: a child may exit while a background grandchild
//!   (`sleep 30 &`) still holds its stdout or stderr, so the pipes never reach end of
//!   file. After the main child exited, the pipes get a 1 s grace; then the group is
//!   SIGKILLed and draining gets 2 s more; then the pipes are abandoned (a descendant
//!   that moved to another process group or session cannot be killed this way). The
//!   outcome is still decided by the main child's exit status.
//! - **Leftovers**: when a run ends (or its future is dropped, e.g. a cancelled job),
//!   whatever is left of the process group is SIGKILLed, so no job process outlives its
//!   run. A plugin that must leave a daemon behind has to detach it into its own
//!   session (`setsid`).
//!
//! The group is signalled only while its id cannot have been reused: before the child
//! is reaped, or while some member still exists (Linux does not reuse a pid that is
//! still a process group id).
//!
//! # Zombies
//!
//! The main child is always reaped: by `wait` when it exits, after the SIGKILL on
//! timeout (bounded to 5 s), or, if the run's future is dropped, by tokio
//! (`kill_on_drop(true)` kills it and tokio's orphan queue reaps it). Descendants are
//! reparented to init (or the nearest subreaper) when their parent dies; when the agent
//! itself is PID 1 in a container, run it under an init (`docker run --init`, `tini`)
//! so those get reaped too.
//!
//! # Text file busy
//!
//! Spawning a file that another thread has just written can fail with `ETXTBSY` when a
//! concurrent fork briefly inherited the writer's descriptor. Spawning is retried a few
//! times (about 0.3 s in all) on that error only.

mod supervise;
mod tail;

use std::io;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::io::AsyncWriteExt;
use tokio::process::{Child, ChildStdin, Command};

use self::supervise::{Finished, GroupKiller, pump, supervise};
use self::tail::{TailBuffer, lossy_tail};

/// How much of stderr's tail goes into a failed stage's `error_message`.
const STDERR_IN_MESSAGE: usize = 2048;

/// Prefix of inherited environment variables that are not passed on to children.
const AGENT_ENV_PREFIX: &str = "ARCADE_";

/// One plugin in one stage of a job.
#[derive(Debug, Clone)]
pub struct StageRun {
    /// The verified plugin file.
    pub program: PathBuf,
    /// `before`, `on_success`, `on_failure` or `after`.
    pub stage: String,
    pub job_id: String,
    pub plugin_id: String,
    pub plugin_version: String,
    /// The job's status so far (`succeeded`/`failed`), passed as `ARCADE_JOB_STATUS`.
    pub job_status: Option<String>,
    /// The job's working directory (must exist).
    pub workdir: PathBuf,
    /// Written to the plugin's stdin as JSON, then stdin is closed.
    pub context: serde_json::Value,
    pub timeout: Duration,
    /// Bound on the captured bytes of each of stdout and stderr.
    pub max_output: usize,
}

/// What one plugin stage did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StageOutcome {
    /// Exit status 0 and not timed out.
    pub success: bool,
    pub exit_code: Option<i32>,
    /// Empty on success; otherwise why it failed.
    pub error_message: String,
    /// Unix milliseconds.
    pub start_time_ms: i64,
    pub end_time_ms: i64,
    /// Stdout, trimmed, if it is a JSON document; otherwise empty.
    pub result: String,
    pub stdout_tail: String,
    pub stderr_tail: String,
}

/// One job command, run as `sh -c COMMAND`.
#[derive(Debug, Clone)]
pub struct CommandRun {
    pub command: String,
    pub workdir: PathBuf,
    /// Added to the agent's environment (minus inherited `ARCADE_*` variables).
    pub env: Vec<(String, String)>,
    pub timeout: Duration,
    /// Bound on the captured bytes of the merged stdout+stderr.
    pub max_output: usize,
}

/// What one job command did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandOutcome {
    /// Exit status 0 and not timed out.
    pub success: bool,
    pub exit_code: Option<i32>,
    pub timed_out: bool,
    /// The tail of stdout and stderr interleaved in order of arrival: at most
    /// `max_output` bytes of UTF-8 (invalid bytes replaced).
    pub output_tail: String,
    /// Empty on success; otherwise why it failed.
    pub error_message: String,
    /// Unix milliseconds.
    pub start_time_ms: i64,
    pub end_time_ms: i64,
}

/// Runs one plugin in one stage; see the module docs. Never panics; every failure is
/// described by the outcome.
pub async fn run_stage(run: &StageRun) -> StageOutcome {
    let start_time_ms = now_ms();
    let program = std::path::absolute(&run.program).unwrap_or_else(|_| run.program.clone());

    let mut cmd = Command::new(&program);
    prepare(&mut cmd);
    cmd.arg(&run.stage)
        .current_dir(&run.workdir)
        .env("ARCADE_STAGE", &run.stage)
        .env("ARCADE_JOB_ID", &run.job_id)
        .env("ARCADE_PLUGIN_ID", &run.plugin_id)
        .env("ARCADE_PLUGIN_VERSION", &run.plugin_version)
        .stdin(Stdio::piped());
    if let Some(status) = &run.job_status {
        cmd.env("ARCADE_JOB_STATUS", status);
    }

    let mut child = match spawn(&mut cmd).await {
        Ok(child) => child,
        Err(err) => {
            return StageOutcome {
                success: false,
                exit_code: None,
                error_message: format!(
                    "cannot start plugin {}: {}",
                    program.display(),
                    describe_spawn_error(&err, Some(&program), &run.workdir).await
                ),
                start_time_ms,
                end_time_ms: now_ms(),
                result: String::new(),
                stdout_tail: String::new(),
                stderr_tail: String::new(),
            };
        }
    };
    let group = GroupKiller::new(child.id());
    let stdin = child.stdin.take();
    let stdout = child.stdout.take();
    let stderr = child.stderr.take();
    // A serde_json::Value always serialises; "null" is only a never-taken fallback.
    let context = serde_json::to_vec(&run.context).unwrap_or_else(|_| b"null".to_vec());

    let out = Mutex::new(TailBuffer::new(run.max_output));
    let err = Mutex::new(TailBuffer::new(run.max_output));
    let io = async {
        tokio::join!(
            feed_stdin(stdin, &context),
            async {
                if let Some(stdout) = stdout {
                    pump(stdout, &out).await;
                }
            },
            async {
                if let Some(stderr) = stderr {
                    pump(stderr, &err).await;
                }
            },
        );
    };
    let finished = supervise(&mut child, &group, io, run.timeout).await;
    // Kill whatever is left of the group (background descendants).
    drop(group);
    let end_time_ms = now_ms();

    let out = into_inner(out);
    let err = into_inner(err);
    let success = is_success(&finished);
    let error_message = if success {
        String::new()
    } else {
        let mut message = failure_reason(&finished, run.timeout);
        let stderr_excerpt = lossy_tail(&err.bytes(), STDERR_IN_MESSAGE, err.truncated());
        let stderr_excerpt = stderr_excerpt.trim();
        if !stderr_excerpt.is_empty() {
            message.push_str("; stderr: ");
            message.push_str(stderr_excerpt);
        }
        message
    };
    if finished.io_abandoned {
        tracing::warn!(
            plugin_id = %run.plugin_id,
            stage = %run.stage,
            "plugin output pipes were still held open by an escaped descendant"
        );
    }

    StageOutcome {
        success,
        exit_code: finished.status.and_then(|s| s.code()),
        error_message,
        start_time_ms,
        end_time_ms,
        result: json_result(&out),
        stdout_tail: out.to_string_lossy(),
        stderr_tail: err.to_string_lossy(),
    }
}

/// Runs one job command as `sh -c COMMAND`; see the module docs. Never panics; every
/// failure is described by the outcome.
pub async fn run_command(run: &CommandRun) -> CommandOutcome {
    let start_time_ms = now_ms();

    let mut cmd = Command::new("sh");
    prepare(&mut cmd);
    cmd.arg("-c")
        .arg("--")
        .arg(&run.command)
        .current_dir(&run.workdir)
        .envs(run.env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null());

    let mut child = match spawn(&mut cmd).await {
        Ok(child) => child,
        Err(err) => {
            return CommandOutcome {
                success: false,
                exit_code: None,
                timed_out: false,
                output_tail: String::new(),
                error_message: format!(
                    "cannot start sh: {}",
                    describe_spawn_error(&err, None, &run.workdir).await
                ),
                start_time_ms,
                end_time_ms: now_ms(),
            };
        }
    };
    let group = GroupKiller::new(child.id());
    let stdout = child.stdout.take();
    let stderr = child.stderr.take();

    let output = Mutex::new(TailBuffer::new(run.max_output));
    let io = async {
        tokio::join!(
            async {
                if let Some(stdout) = stdout {
                    pump(stdout, &output).await;
                }
            },
            async {
                if let Some(stderr) = stderr {
                    pump(stderr, &output).await;
                }
            },
        );
    };
    let finished = supervise(&mut child, &group, io, run.timeout).await;
    drop(group);
    let end_time_ms = now_ms();

    let output = into_inner(output);
    let success = is_success(&finished);
    CommandOutcome {
        success,
        exit_code: finished.status.and_then(|s| s.code()),
        timed_out: finished.timed_out,
        output_tail: output.to_string_lossy(),
        error_message: if success {
            String::new()
        } else {
            failure_reason(&finished, run.timeout)
        },
        start_time_ms,
        end_time_ms,
    }
}

/// Settings shared by stages and commands: piped output, own process group, killed
/// when dropped, inherited `ARCADE_*` variables removed. Call it first: variables set
/// afterwards are passed to the child.
fn prepare(cmd: &mut Command) {
    for (key, _) in std::env::vars_os() {
        if key
            .to_str()
            .is_some_and(|key| key.starts_with(AGENT_ENV_PREFIX))
        {
            cmd.env_remove(&key);
        }
    }
    cmd.stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
}

/// Spawns `cmd`, retrying briefly on `ETXTBSY` (see the module docs).
async fn spawn(cmd: &mut Command) -> io::Result<Child> {
    const RETRIES: u32 = 5;
    let mut delay = Duration::from_millis(10);
    let mut attempt = 0;
    loop {
        match cmd.spawn() {
            Err(err) if is_text_busy(&err) && attempt < RETRIES => {
                attempt += 1;
                tokio::time::sleep(delay).await;
                delay *= 2;
            }
            other => return other,
        }
    }
}

fn is_text_busy(err: &io::Error) -> bool {
    err.raw_os_error() == Some(nix::errno::Errno::ETXTBSY as i32)
}

/// A spawn error, naming what is actually missing when the OS just says "not found":
/// the working directory (a failed `chdir`) or a script's `#!` interpreter.
async fn describe_spawn_error(err: &io::Error, program: Option<&Path>, workdir: &Path) -> String {
    match tokio::fs::metadata(workdir).await {
        Ok(meta) if meta.is_dir() => match program {
            Some(program) if err.kind() == io::ErrorKind::NotFound => {
                match missing_interpreter(program).await {
                    Some(detail) => format!("{err} ({detail})"),
                    None => err.to_string(),
                }
            }
            _ => err.to_string(),
        },
        Ok(_) => format!(
            "{err} (working directory {} is not a directory)",
            workdir.display()
        ),
        Err(dir_err) => format!("{err} (working directory {}: {dir_err})", workdir.display()),
    }
}

/// When `program` exists although exec said "not found", what it needs that is missing.
async fn missing_interpreter(program: &Path) -> Option<String> {
    use tokio::io::AsyncReadExt;

    let file = tokio::fs::File::open(program).await.ok()?;
    let mut head = Vec::with_capacity(256);
    file.take(256).read_to_end(&mut head).await.ok()?;
    let Some(line) = head.strip_prefix(b"#!") else {
        return Some("the file exists: its dynamic loader is missing".to_owned());
    };
    let line = line.split(|&b| b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let interpreter = line.split_whitespace().next().unwrap_or_default();
    Some(format!("its #! interpreter `{interpreter}` is missing"))
}

/// Writes the context to the child's stdin, then closes it. A child that exits or
/// closes stdin without reading is fine.
async fn feed_stdin(stdin: Option<ChildStdin>, data: &[u8]) {
    let Some(mut stdin) = stdin else {
        return;
    };
    match stdin.write_all(data).await {
        Ok(()) => {
            let _ = stdin.flush().await;
        }
        Err(err) if err.kind() == io::ErrorKind::BrokenPipe => {}
        Err(err) => tracing::debug!(%err, "writing the stage context failed"),
    }
    // Dropping `stdin` closes the pipe: the child reads end of file.
}

fn is_success(finished: &Finished) -> bool {
    !finished.timed_out && finished.status.is_some_and(|s| s.success())
}

/// Why a run failed, without its output.
fn failure_reason(finished: &Finished, timeout: Duration) -> String {
    if finished.timed_out {
        return format!("timed out after {timeout:?}; killed");
    }
    match (&finished.status, &finished.wait_error) {
        (Some(status), _) => describe_status(*status),
        (None, Some(err)) => format!("cannot wait for the process: {err}"),
        (None, None) => "the process could not be reaped".to_owned(),
    }
}

fn describe_status(status: ExitStatus) -> String {
    if let Some(code) = status.code() {
        return format!("exited with code {code}");
    }
    if let Some(signal) = status.signal() {
        return match nix::sys::signal::Signal::try_from(signal) {
            Ok(name) => format!("killed by signal {signal} ({name})"),
            Err(_) => format!("killed by signal {signal}"),
        };
    }
    format!("ended abnormally ({status})")
}

/// The stage result: the whole stdout, trimmed, when it is one JSON document.
fn json_result(stdout: &TailBuffer) -> String {
    if stdout.truncated() {
        return String::new();
    }
    let bytes = stdout.bytes();
    let Ok(text) = std::str::from_utf8(&bytes) else {
        return String::new();
    };
    let text = text.trim();
    if text.is_empty() || serde_json::from_str::<serde::de::IgnoredAny>(text).is_err() {
        return String::new();
    }
    text.to_owned()
}

fn into_inner(buffer: Mutex<TailBuffer>) -> TailBuffer {
    buffer
        .into_inner()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests;
