//! Tests of stage and command execution with real child processes (small `/bin/sh`
//! scripts written into temporary directories). Time bounds are generous: the tests
//! share a small machine with other builds.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Instant;

use serde_json::json;

use super::*;

/// Writes an executable `#!/bin/sh` script.
fn script(dir: &Path, name: &str, body: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

fn stage(program: PathBuf, workdir: &Path) -> StageRun {
    StageRun {
        program,
        stage: "before".to_owned(),
        job_id: "job-1".to_owned(),
        plugin_id: "notify/slack".to_owned(),
        plugin_version: "1.2.3".to_owned(),
        job_status: None,
        workdir: workdir.to_owned(),
        context: json!({"job": {"id": "job-1"}, "parameters": {"channel": "#ci"}}),
        timeout: Duration::from_secs(10),
        max_output: 64 * 1024,
    }
}

fn command(cmd: &str, workdir: &Path) -> CommandRun {
    CommandRun {
        command: cmd.to_owned(),
        workdir: workdir.to_owned(),
        env: Vec::new(),
        timeout: Duration::from_secs(10),
        max_output: 64 * 1024,
    }
}

/// Waits (up to 3 s) until process `pid` no longer runs (gone or a zombie).
async fn wait_until_dead(pid: u32) -> bool {
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let dead = match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Err(_) => true,
            // "pid (comm) STATE ..."; comm may contain spaces, so split after ')'.
            Ok(stat) => stat
                .rsplit_once(')')
                .is_some_and(|(_, rest)| rest.trim_start().starts_with(['Z', 'X'])),
        };
        if dead {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn read_pid(path: &Path) -> u32 {
    for _ in 0..100 {
        if let Ok(text) = std::fs::read_to_string(path) {
            if let Ok(pid) = text.trim().parse() {
                return pid;
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("no pid in {}", path.display());
}

#[tokio::test]
async fn stage_sees_args_env_cwd_and_context() {
    let dir = tempfile::tempdir().unwrap();
    let workdir = dir.path().join("work");
    std::fs::create_dir(&workdir).unwrap();
    let program = script(
        dir.path(),
        "plugin.sh",
        r#"ctx=$(cat)
printf '{"arg":"%s","argc":%d,"stage":"%s","job":"%s","plugin":"%s","version":"%s","status":"%s","cwd":"%s","ctx":%s}\n' \
  "$1" "$#" "$ARCADE_STAGE" "$ARCADE_JOB_ID" "$ARCADE_PLUGIN_ID" "$ARCADE_PLUGIN_VERSION" \
  "${ARCADE_JOB_STATUS-unset}" "$(pwd -P)" "$ctx"
echo "a note on stderr" >&2"#,
    );

    let mut run = stage(program.clone(), &workdir);
    let outcome = run_stage(&run).await;
    assert!(outcome.success, "{outcome:?}");
    assert_eq!(outcome.exit_code, Some(0));
    assert_eq!(outcome.error_message, "");
    assert!(outcome.start_time_ms > 0 && outcome.start_time_ms <= outcome.end_time_ms);
    let result: serde_json::Value = serde_json::from_str(&outcome.result).unwrap();
    assert_eq!(result["arg"], "before");
    assert_eq!(result["argc"], 1);
    assert_eq!(result["stage"], "before");
    assert_eq!(result["job"], "job-1");
    assert_eq!(result["plugin"], "notify/slack");
    assert_eq!(result["version"], "1.2.3");
    assert_eq!(result["status"], "unset");
    let cwd = workdir.canonicalize().unwrap();
    assert_eq!(result["cwd"], cwd.to_str().unwrap());
    assert_eq!(result["ctx"], run.context);
    assert_eq!(outcome.result, outcome.stdout_tail.trim());
    assert_eq!(outcome.stderr_tail, "a note on stderr\n");

    run.stage = "after".to_owned();
    run.job_status = Some("failed".to_owned());
    let outcome = run_stage(&run).await;
    assert!(outcome.success, "{outcome:?}");
    let result: serde_json::Value = serde_json::from_str(&outcome.result).unwrap();
    assert_eq!(result["arg"], "after");
    assert_eq!(result["stage"], "after");
    assert_eq!(result["status"], "failed");
}

#[tokio::test]
async fn non_json_stdout_gives_empty_result() {
    let dir = tempfile::tempdir().unwrap();
    let program = script(dir.path(), "plugin.sh", "echo hello world");
    let outcome = run_stage(&stage(program, dir.path())).await;
    assert!(outcome.success, "{outcome:?}");
    assert_eq!(outcome.result, "");
    assert_eq!(outcome.stdout_tail, "hello world\n");

    let program = script(dir.path(), "empty.sh", "true");
    let outcome = run_stage(&stage(program, dir.path())).await;
    assert!(outcome.success, "{outcome:?}");
    assert_eq!(outcome.result, "");
}

#[tokio::test]
async fn exit_code_fails_with_code_and_stderr_tail() {
    let dir = tempfile::tempdir().unwrap();
    let program = script(
        dir.path(),
        "plugin.sh",
        "echo '{\"partial\":true}'\necho 'webhook returned 500' >&2\nexit 3",
    );
    let outcome = run_stage(&stage(program, dir.path())).await;
    assert!(!outcome.success);
    assert_eq!(outcome.exit_code, Some(3));
    assert!(
        outcome.error_message.contains("code 3"),
        "{}",
        outcome.error_message
    );
    assert!(
        outcome.error_message.contains("webhook returned 500"),
        "{}",
        outcome.error_message
    );
    assert_eq!(outcome.stderr_tail, "webhook returned 500\n");
    // The result is still reported when it parses.
    assert_eq!(outcome.result, r#"{"partial":true}"#);
}

#[tokio::test]
async fn stage_timeout_kills_child_and_background_descendant() {
    let dir = tempfile::tempdir().unwrap();
    let pid_file = dir.path().join("bg.pid");
    let program = script(
        dir.path(),
        "plugin.sh",
        &format!(
            "sleep 30 &\necho $! > '{}'\necho started\nsleep 30",
            pid_file.display()
        ),
    );
    let mut run = stage(program, dir.path());
    run.timeout = Duration::from_millis(500);
    let started = Instant::now();
    let outcome = run_stage(&run).await;
    let elapsed = started.elapsed();
    assert!(elapsed < Duration::from_secs(4), "took {elapsed:?}");
    assert!(!outcome.success);
    assert_eq!(outcome.exit_code, None);
    assert!(
        outcome.error_message.contains("timed out after 500ms"),
        "{}",
        outcome.error_message
    );
    assert_eq!(outcome.stdout_tail, "started\n");
    let bg = read_pid(&pid_file).await;
    assert!(wait_until_dead(bg).await, "background sleep {bg} survived");
}

#[tokio::test]
async fn stage_output_is_bounded_to_its_tail() {
    let dir = tempfile::tempdir().unwrap();
    // ~5 MB on stdout, then a marker; ~5 MB on stderr, then another.
    let program = script(
        dir.path(),
        "plugin.sh",
        "head -c 5000000 /dev/zero | tr '\\0' a\nprintf 'THE-END'\n\
         head -c 5000000 /dev/zero | tr '\\0' b >&2\nprintf 'ERR-END' >&2",
    );
    let mut run = stage(program, dir.path());
    run.max_output = 10_000;
    let outcome = run_stage(&run).await;
    assert!(outcome.success, "{}", outcome.error_message);
    assert_eq!(outcome.stdout_tail.len(), 10_000);
    assert!(outcome.stdout_tail.ends_with("THE-END"));
    assert!(outcome.stdout_tail[..10_000 - 7].bytes().all(|b| b == b'a'));
    assert_eq!(outcome.stderr_tail.len(), 10_000);
    assert!(outcome.stderr_tail.ends_with("ERR-END"));
    // Truncated stdout is never taken as the result.
    assert_eq!(outcome.result, "");
}

#[tokio::test]
async fn truncated_stdout_is_not_a_result_even_if_its_tail_parses() {
    let dir = tempfile::tempdir().unwrap();
    let program = script(dir.path(), "plugin.sh", "echo 1234567");
    let mut run = stage(program, dir.path());
    run.max_output = 4; // the tail "567\n" parses, but it is not the plugin's output
    let outcome = run_stage(&run).await;
    assert!(outcome.success);
    assert_eq!(outcome.stdout_tail, "567\n");
    assert_eq!(outcome.result, "");
}

#[tokio::test]
async fn stage_that_ignores_stdin_succeeds() {
    let dir = tempfile::tempdir().unwrap();
    let program = script(dir.path(), "plugin.sh", "echo '{\"ok\":1}'");
    let mut run = stage(program, dir.path());
    // Far more than a pipe buffer: writing it must not block or fail the run.
    run.context = json!({ "big": "x".repeat(1 << 20) });
    let started = Instant::now();
    let outcome = run_stage(&run).await;
    assert!(outcome.success, "{outcome:?}");
    assert_eq!(outcome.result, r#"{"ok":1}"#);
    assert!(started.elapsed() < Duration::from_secs(3));

    // Closing stdin early and running on is fine as well.
    let program = script(dir.path(), "closer.sh", "exec 0<&-\nsleep 0.2\necho done");
    let mut run = stage(program, dir.path());
    run.context = json!({ "big": "x".repeat(1 << 20) });
    let outcome = run_stage(&run).await;
    assert!(outcome.success, "{outcome:?}");
    assert_eq!(outcome.stdout_tail, "done\n");
}

#[tokio::test]
async fn unstartable_programs_fail_naming_the_program() {
    let dir = tempfile::tempdir().unwrap();

    let missing = dir.path().join("no-such-plugin");
    let outcome = run_stage(&stage(missing.clone(), dir.path())).await;
    assert!(!outcome.success);
    assert_eq!(outcome.exit_code, None);
    assert!(
        outcome.error_message.contains("cannot start")
            && outcome.error_message.contains(missing.to_str().unwrap())
            && outcome.error_message.contains("os error"),
        "{}",
        outcome.error_message
    );

    let not_exec = dir.path().join("not-exec.sh");
    std::fs::write(&not_exec, "#!/bin/sh\necho hi\n").unwrap();
    std::fs::set_permissions(&not_exec, std::fs::Permissions::from_mode(0o644)).unwrap();
    let outcome = run_stage(&stage(not_exec.clone(), dir.path())).await;
    assert!(!outcome.success);
    assert!(
        outcome.error_message.contains(not_exec.to_str().unwrap())
            && outcome.error_message.contains("os error"),
        "{}",
        outcome.error_message
    );

    let bad_shebang = dir.path().join("bad-shebang.sh");
    std::fs::write(&bad_shebang, "#!/no/such/interpreter\necho hi\n").unwrap();
    std::fs::set_permissions(&bad_shebang, std::fs::Permissions::from_mode(0o755)).unwrap();
    let outcome = run_stage(&stage(bad_shebang.clone(), dir.path())).await;
    assert!(!outcome.success);
    assert!(
        outcome
            .error_message
            .contains(bad_shebang.to_str().unwrap())
            && outcome
                .error_message
                .contains("`/no/such/interpreter` is missing"),
        "{}",
        outcome.error_message
    );

    let program = script(dir.path(), "ok.sh", "true");
    let gone = dir.path().join("missing-workdir");
    let outcome = run_stage(&stage(program, &gone)).await;
    assert!(!outcome.success);
    assert!(
        outcome.error_message.contains("working directory"),
        "{}",
        outcome.error_message
    );
}

#[tokio::test]
async fn command_success_and_failure() {
    let dir = tempfile::tempdir().unwrap();

    let outcome = run_command(&command("echo hi", dir.path())).await;
    assert!(outcome.success, "{outcome:?}");
    assert_eq!(outcome.exit_code, Some(0));
    assert!(!outcome.timed_out);
    assert_eq!(outcome.output_tail, "hi\n");
    assert_eq!(outcome.error_message, "");
    assert!(outcome.start_time_ms <= outcome.end_time_ms);

    let outcome = run_command(&command("echo bad >&2; exit 7", dir.path())).await;
    assert!(!outcome.success);
    assert_eq!(outcome.exit_code, Some(7));
    assert!(!outcome.timed_out);
    assert_eq!(outcome.output_tail, "bad\n");
    assert!(
        outcome.error_message.contains("code 7"),
        "{}",
        outcome.error_message
    );

    let outcome = run_command(&command("kill -9 $$", dir.path())).await;
    assert!(!outcome.success);
    assert_eq!(outcome.exit_code, None);
    assert!(
        outcome.error_message.contains("signal 9"),
        "{}",
        outcome.error_message
    );
}

#[tokio::test]
async fn command_merges_streams_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let outcome = run_command(&command(
        "echo one; sleep 0.2; echo two >&2; sleep 0.2; echo three",
        dir.path(),
    ))
    .await;
    assert!(outcome.success, "{outcome:?}");
    assert_eq!(outcome.output_tail, "one\ntwo\nthree\n");
}

#[tokio::test]
async fn command_honours_workdir_and_env() {
    let dir = tempfile::tempdir().unwrap();
    let workdir = dir.path().join("checkout");
    std::fs::create_dir(&workdir).unwrap();
    let mut run = command(
        "pwd -P; printf '%s|%s\\n' \"$FOO\" \"$ARCADE_JOB_ID\"",
        &workdir,
    );
    run.env = vec![
        ("FOO".to_owned(), "bar baz".to_owned()),
        ("ARCADE_JOB_ID".to_owned(), "job-9".to_owned()),
    ];
    let outcome = run_command(&run).await;
    assert!(outcome.success, "{outcome:?}");
    let cwd = workdir.canonicalize().unwrap();
    assert_eq!(
        outcome.output_tail,
        format!("{}\nbar baz|job-9\n", cwd.display())
    );

    // A command starting with '-' is a command, not an option of sh.
    let outcome = run_command(&command("-x-not-an-option 2>/dev/null; echo ok", &workdir)).await;
    assert_eq!(outcome.output_tail, "ok\n");
}

#[tokio::test]
async fn command_timeout_kills_the_group() {
    let dir = tempfile::tempdir().unwrap();
    let pid_file = dir.path().join("bg.pid");
    let mut run = command(
        &format!("sleep 30 & echo $! > '{}'; sleep 30", pid_file.display()),
        dir.path(),
    );
    run.timeout = Duration::from_millis(500);
    let started = Instant::now();
    let outcome = run_command(&run).await;
    let elapsed = started.elapsed();
    assert!(elapsed < Duration::from_secs(4), "took {elapsed:?}");
    assert!(outcome.timed_out);
    assert!(!outcome.success);
    assert_eq!(outcome.exit_code, None);
    assert!(
        outcome.error_message.contains("timed out"),
        "{}",
        outcome.error_message
    );
    let bg = read_pid(&pid_file).await;
    assert!(wait_until_dead(bg).await, "background sleep {bg} survived");
}

#[tokio::test]
async fn command_leaving_a_sleeper_on_stdout_returns_promptly() {
    let dir = tempfile::tempdir().unwrap();
    let pid_file = dir.path().join("bg.pid");
    let run = command(
        &format!("sleep 30 & echo $! > '{}'; echo done", pid_file.display()),
        dir.path(),
    );
    let started = Instant::now();
    let outcome = run_command(&run).await;
    let elapsed = started.elapsed();
    assert!(elapsed < Duration::from_secs(4), "took {elapsed:?}");
    assert!(outcome.success, "{outcome:?}");
    assert!(!outcome.timed_out);
    assert_eq!(outcome.output_tail, "done\n");
    let bg = read_pid(&pid_file).await;
    assert!(wait_until_dead(bg).await, "background sleep {bg} survived");
}

#[tokio::test]
async fn command_output_is_bounded_and_utf8() {
    let dir = tempfile::tempdir().unwrap();
    // Each stream on its own: stdout and stderr share the tail in arrival order, so a
    // marker on one stream can be overtaken by the other's backlog under load.
    for (stream, redirect) in [("OUT", ""), ("ERR", " >&2")] {
        let mut run = command(
            &format!("(head -c 5000000 /dev/zero | tr '\\0' a; printf '{stream}-END'){redirect}"),
            dir.path(),
        );
        run.max_output = 4096;
        let outcome = run_command(&run).await;
        assert!(outcome.success, "{outcome:?}");
        assert_eq!(outcome.output_tail.len(), 4096, "{stream}");
        assert!(
            outcome.output_tail.ends_with(&format!("{stream}-END")),
            "{stream}"
        );
    }

    // Two-byte characters cut at an odd bound: still valid and within the bound.
    let mut run = command(
        "i=0; while [ $i -lt 100 ]; do printf 'é'; i=$((i+1)); done",
        dir.path(),
    );
    run.max_output = 7;
    let outcome = run_command(&run).await;
    assert!(outcome.success, "{outcome:?}");
    assert!(outcome.output_tail.len() <= 7);
    assert_eq!(outcome.output_tail, "ééé");
}

#[tokio::test]
async fn command_in_missing_workdir_cannot_start() {
    let dir = tempfile::tempdir().unwrap();
    let outcome = run_command(&command("true", &dir.path().join("nope"))).await;
    assert!(!outcome.success);
    assert!(!outcome.timed_out);
    assert_eq!(outcome.exit_code, None);
    assert!(
        outcome.error_message.contains("cannot start") && outcome.error_message.contains("nope"),
        "{}",
        outcome.error_message
    );
}

#[tokio::test]
async fn dropping_a_run_kills_its_process_group() {
    let dir = tempfile::tempdir().unwrap();
    let pid_file = dir.path().join("bg.pid");
    let run = command(
        &format!("sleep 30 & echo $! > '{}'; sleep 30", pid_file.display()),
        dir.path(),
    );
    let cancelled = tokio::time::timeout(Duration::from_millis(500), run_command(&run)).await;
    assert!(cancelled.is_err());
    let bg = read_pid(&pid_file).await;
    assert!(wait_until_dead(bg).await, "background sleep {bg} survived");
}
