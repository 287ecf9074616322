//! End-to-end tests of the `arcadectl` and `arcade-coordinator` binaries: a real
//! coordinator process on a loopback port, driven through `arcadectl`.
//!
//! Every child process is bounded in time and killed by a drop guard.

use std::io::{BufRead as _, BufReader, Read as _};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;
use sha2::{Digest as _, Sha256};

const ADMIN: &str = "admin-token-test-1";
const ENROLL: &str = "enroll-token-test-1";
/// The longest any one child process may run.
const PROCESS_TIMEOUT: Duration = Duration::from_secs(30);

/// A running coordinator, killed when dropped.
struct Coordinator {
    child: Child,
    url: String,
    dir: tempfile::TempDir,
}

impl Drop for Coordinator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Coordinator {
    /// Starts `arcade-coordinator` on a free port with a 64 KiB chunk size.
    fn start() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = dir.path().join("coordinator.toml");
        std::fs::write(
            &config,
            "[plugin]\nchunk_size = \"64KiB\"\n\n[plugin.security]\nrequire_checksum = true\nallow_unsafe = false\n",
        )
        .expect("write config");
        let log = std::fs::File::create(dir.path().join("coordinator.log")).expect("log file");
        let child = Command::new(env!("CARGO_BIN_EXE_arcade-coordinator"))
            .arg("--config")
            .arg(&config)
            .args(["--listen", "127.0.0.1:0", "--metrics-listen", "off"])
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .args(["--admin-token", ADMIN, "--enroll-token", ENROLL])
            .env_remove("ARCADE_ADMIN_TOKEN")
            .env_remove("ARCADE_ENROLL_TOKEN")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("spawn arcade-coordinator");
        // The guard exists before anything can fail, so the process never leaks.
        let mut guard = Self {
            child,
            url: String::new(),
            dir,
        };
        let stdout = guard.child.stdout.take().expect("piped stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            let _ = tx.send(lines.next());
            // Keep draining so the coordinator never blocks on a full pipe.
            for _ in lines {}
        });
        let line = match rx.recv_timeout(PROCESS_TIMEOUT) {
            Ok(Some(Ok(line))) => line,
            other => panic!(
                "coordinator did not announce its port ({other:?}); log:\n{}",
                guard.log()
            ),
        };
        let addr = line
            .strip_prefix("grpc listening on ")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"));
        let port: u16 = addr
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("no port in {line:?}"));
        assert!(addr.starts_with("127.0.0.1:"), "{line}");
        guard.url = format!("http://127.0.0.1:{port}");
        guard
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("coordinator.log")).unwrap_or_default()
    }

    /// A file holding the admin token, as `--token-file` takes it.
    fn token_file(&self) -> String {
        let file = self.path("admin-token-file");
        if !file.exists() {
            std::fs::write(&file, format!("{ADMIN}\n")).expect("write token file");
        }
        file.to_str().expect("utf-8").to_owned()
    }

    /// Runs `arcadectl` against this coordinator with the admin token (from a file).
    fn ctl(&self, args: &[&str]) -> Output {
        let tf = self.token_file();
        let mut all = vec!["--coordinator", &self.url, "--token-file", &tf];
        all.extend_from_slice(args);
        arcadectl(&all)
    }

    /// Runs `arcadectl`, expecting success; returns stdout.
    fn ok(&self, args: &[&str]) -> String {
        let out = self.ctl(args);
        assert_eq!(
            out.code,
            Some(0),
            "arcadectl {args:?} failed: {}\ncoordinator log:\n{}",
            out.stderr,
            self.log()
        );
        out.stdout
    }

    /// Runs `arcadectl` with `--json`-style output, expecting success; parses stdout.
    fn json(&self, args: &[&str]) -> Value {
        let text = self.ok(args);
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{args:?}: bad JSON {e}: {text}"))
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

/// What a finished process left behind.
#[derive(Debug)]
struct Output {
    code: Option<i32>,
    stdout: String,
    stderr: String,
    elapsed: Duration,
}

impl Output {
    /// Asserts a failure reported as exactly one `arcadectl: …` line containing `needle`.
    fn assert_failed_with(&self, needle: &str) {
        assert!(
            matches!(self.code, Some(c) if c != 0),
            "expected a failure, got {self:?}"
        );
        let lines: Vec<&str> = self.stderr.lines().collect();
        assert_eq!(lines.len(), 1, "expected one stderr line: {self:?}");
        assert!(lines[0].starts_with("arcadectl: "), "{self:?}");
        assert!(
            lines[0].contains(needle),
            "stderr {:?} lacks {needle:?}",
            lines[0]
        );
        assert!(self.stdout.is_empty(), "nothing on stdout: {self:?}");
    }
}

/// Runs a binary with a deadline, capturing its output.
fn run(program: &str, args: &[&str]) -> Output {
    let start = Instant::now();
    let mut child = Command::new(program)
        .args(args)
        .env_remove("ARCADE_COORDINATOR")
        .env_remove("ARCADE_TOKEN")
        .env_remove("ARCADE_TOKEN_FILE")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {program}: {e}"));
    let drain = |mut r: Box<dyn std::io::Read + Send>| {
        std::thread::spawn(move || {
            let mut s = String::new();
            let _ = r.read_to_string(&mut s);
            s
        })
    };
    let out = drain(Box::new(child.stdout.take().expect("stdout")));
    let err = drain(Box::new(child.stderr.take().expect("stderr")));
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if start.elapsed() > PROCESS_TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{program} {args:?} did not finish within {PROCESS_TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Output {
        code: status.code(),
        stdout: out.join().expect("stdout reader"),
        stderr: err.join().expect("stderr reader"),
        elapsed: start.elapsed(),
    }
}

fn arcadectl(args: &[&str]) -> Output {
    run(env!("CARGO_BIN_EXE_arcadectl"), args)
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// A `#!/bin/sh` script of about `size` bytes.
fn write_script(path: &Path, size: usize) -> Vec<u8> {
    let mut body = b"#!/bin/sh\necho plugin\n".to_vec();
    let mut i = 0u64;
    while body.len() < size {
        body.extend_from_slice(
            format!("# line {i} {}\n", i.wrapping_mul(2_654_435_761)).as_bytes(),
        );
        i += 1;
    }
    std::fs::write(path, &body).expect("write script");
    body
}

fn find<'a>(list: &'a Value, key: &str, value: &str) -> &'a Value {
    list.as_array()
        .expect("a JSON array")
        .iter()
        .find(|v| v[key] == value)
        .unwrap_or_else(|| panic!("no {key}={value} in {list}"))
}

#[test]
fn plugin_push_list_get_enable_delete() {
    let c = Coordinator::start();
    let file = c.path("notify.sh");
    let body = write_script(&file, 200_000);
    let sha = sha256_hex(&body);
    let file_arg = file.to_str().expect("utf-8 path");
    let chunks = body.len().div_ceil(64 * 1024);
    let push = [
        "plugin",
        "push",
        file_arg,
        "--id",
        "notify/x",
        "--version",
        "1.0.0",
        "--name",
        "Notifier",
        "--description",
        "says hi",
        "--allowed-label",
        "zone=eu",
    ];

    let first = c.ctl(&push);
    assert_eq!(first.code, Some(0), "{first:?}");
    assert_eq!(
        first.stdout,
        format!(
            "pushed notify/x@1.0.0 sha256={sha} size={} chunks={chunks}\n",
            body.len()
        )
    );
    assert_eq!(
        first.stderr, "",
        "no progress bar when stderr is not a terminal"
    );
    assert_eq!(
        c.ok(&push),
        format!(
            "unchanged notify/x@1.0.0 sha256={sha} size={} chunks={chunks}\n",
            body.len()
        )
    );

    // Other content under the same version is refused, by the coordinator.
    let other = c.path("other.sh");
    write_script(&other, 100);
    c.ctl(&[
        "plugin",
        "push",
        other.to_str().expect("utf-8"),
        "--id",
        "notify/x",
        "--version",
        "1.0.0",
    ])
    .assert_failed_with("already exists: plugin notify/x@1.0.0 already exists");

    // A wrong --sha256 is checked by the coordinator; a malformed one locally.
    c.ctl(&[
        "plugin",
        "push",
        file_arg,
        "--id",
        "notify/x",
        "--version",
        "2.0.0",
        "--sha256",
        &"0".repeat(64),
    ])
    .assert_failed_with("invalid argument: checksum mismatch");
    c.ctl(&[
        "plugin",
        "push",
        file_arg,
        "--id",
        "notify/x",
        "--version",
        "2.0.0",
        "--sha256",
        "abc",
    ])
    .assert_failed_with("--sha256");

    // A multi-MiB file goes up in several messages, with a correct hash.
    let big = c.path("big.sh");
    let big_body = write_script(&big, 2_500_000);
    let pushed: Value = c.json(&[
        "plugin",
        "push",
        big.to_str().expect("utf-8"),
        "--id",
        "build/big",
        "--version",
        "0.1.0-rc.1",
        "--type",
        "builder",
        "--json",
    ]);
    assert_eq!(pushed["sha256"], sha256_hex(&big_body));
    assert_eq!(pushed["size"], big_body.len() as u64);
    assert_eq!(pushed["type"], "builder");

    let list = c.json(&["plugin", "list", "--json"]);
    assert_eq!(list.as_array().map(Vec::len), Some(2), "{list}");
    let x = find(&list, "id", "notify/x");
    assert_eq!(x["sha256"], sha);
    assert_eq!(x["size"], body.len() as u64);
    assert_eq!(x["enabled"], true);
    let only = c.json(&["plugin", "list", "--type", "builder", "--json"]);
    assert_eq!(only.as_array().map(Vec::len), Some(1), "{only}");
    assert_eq!(only[0]["id"], "build/big");

    let table = c.ok(&["plugin", "list"]);
    assert!(table.starts_with("ID"), "{table}");
    assert!(
        table.contains("notify/x") && table.contains(&sha[..12]),
        "{table}"
    );

    let got = c.json(&["plugin", "get", "notify/x@1.0.0", "--json"]);
    assert_eq!(got["id"], "notify/x");
    assert_eq!(got["version"], "1.0.0");
    assert_eq!(got["type"], "notify");
    assert_eq!(got["name"], "Notifier");
    assert_eq!(got["description"], "says hi");
    assert_eq!(got["sha256"], sha);
    assert_eq!(got["size"], body.len() as u64);
    assert_eq!(got["chunk_size"], 64 * 1024);
    assert_eq!(got["chunks"], chunks as u64);
    assert_eq!(got["allowed_labels"], serde_json::json!({"zone": "eu"}));
    assert_eq!(got["enabled"], true);
    assert!(got["created_at"].as_i64().is_some_and(|t| t > 0), "{got}");

    assert_eq!(
        c.ok(&["plugin", "disable", "notify/x@1.0.0"]),
        "disabled notify/x@1.0.0\n"
    );
    assert_eq!(
        c.json(&["plugin", "get", "notify/x@1.0.0", "--json"])["enabled"],
        false
    );
    c.ctl(&["job", "create", "--plugin", "notify/x@1.0.0", "--", "true"])
        .assert_failed_with("failed precondition: plugin notify/x@1.0.0 is disabled");
    c.ok(&["plugin", "enable", "notify/x@1.0.0"]);
    assert_eq!(
        c.json(&["plugin", "get", "notify/x@1.0.0", "--json"])["enabled"],
        true
    );

    assert!(
        c.ok(&["plugin", "delete", "build/big@0.1.0-rc.1"])
            .starts_with("deleted build/big@0.1.0-rc.1")
    );
    c.ctl(&["plugin", "get", "build/big@0.1.0-rc.1"])
        .assert_failed_with("not found: plugin build/big@0.1.0-rc.1 does not exist");
}

#[test]
fn job_create_get_list_wait_and_agents() {
    let c = Coordinator::start();
    let file = c.path("p.sh");
    write_script(&file, 64);
    c.ok(&[
        "plugin",
        "push",
        file.to_str().expect("utf-8"),
        "--id",
        "notify/x",
        "--version",
        "1.0.0",
    ]);

    let out = c.ok(&[
        "job",
        "create",
        "--plugin",
        "notify/x@1.0.0:before,after",
        "--label",
        "os=linux",
        "--param",
        "greeting=hello world",
        "--name",
        "hello",
        "--timeout",
        "60",
        "--cmd",
        "make build",
        "--",
        "echo",
        "hi",
    ]);
    let id = out.strip_suffix('\n').expect("one line");
    assert!(
        !id.is_empty() && !id.contains(char::is_whitespace),
        "job id alone: {out:?}"
    );

    let job = c.json(&["job", "get", id, "--json"]);
    assert_eq!(job["id"], id);
    assert_eq!(job["status"], "queued");
    assert_eq!(job["name"], "hello");
    assert_eq!(
        job["commands"],
        serde_json::json!(["make build", "echo hi"])
    );
    assert_eq!(
        job["parameters"],
        serde_json::json!({"greeting": "hello world"})
    );
    assert_eq!(job["label_selector"], serde_json::json!({"os": "linux"}));
    assert_eq!(job["timeout_seconds"], 60);
    assert_eq!(
        job["required_plugins"],
        serde_json::json!([{"id": "notify/x", "version": "1.0.0", "requested": "", "stages": ["before", "after"]}])
    );
    assert_eq!(job["attempts"], 0);
    assert_eq!(job["plugin_results"], serde_json::json!([]));

    // No stages listed means all four.
    let all = c.ok(&["job", "create", "--plugin", "notify/x@1.0.0"]);
    let all = c.json(&["job", "get", all.trim(), "--json"]);
    assert_eq!(
        all["required_plugins"][0]["stages"],
        serde_json::json!(["before", "on_success", "on_failure", "after"])
    );

    let listed = c.json(&["job", "list", "--json"]);
    assert_eq!(listed.as_array().map(Vec::len), Some(2), "{listed}");
    find(&listed, "id", id);
    let limited = c.json(&["job", "list", "--limit", "1", "--json"]);
    assert_eq!(limited.as_array().map(Vec::len), Some(1), "{limited}");
    assert_eq!(
        c.json(&["job", "list", "--status", "succeeded", "--json"]),
        serde_json::json!([])
    );
    assert!(c.ok(&["job", "get", id]).contains("queued"));

    // Nothing runs it: waiting ends with a reason after about the timeout.
    let wait = c.ctl(&["job", "wait", id, "--timeout", "1"]);
    wait.assert_failed_with("still queued");
    assert!(
        wait.elapsed >= Duration::from_millis(900) && wait.elapsed < Duration::from_secs(10),
        "{wait:?}"
    );
    c.ctl(&["job", "wait", "no-such-job", "--timeout", "1"])
        .assert_failed_with("not found: job no-such-job does not exist");

    assert_eq!(c.json(&["agent", "list", "--json"]), serde_json::json!([]));
    assert_eq!(c.ok(&["agent", "list"]), "no agents\n");
}

#[test]
fn failures_are_one_line_reasons() {
    let c = Coordinator::start();

    let wrong_file = c.path("wrong-token-file");
    std::fs::write(&wrong_file, "wrong-token-1").unwrap();
    let wrong = arcadectl(&[
        "--coordinator",
        &c.url,
        "--token-file",
        wrong_file.to_str().unwrap(),
        "plugin",
        "list",
    ]);
    wrong.assert_failed_with("unauthenticated");
    // A token on the command line still works, with a warning about who can see it.
    let flagged = arcadectl(&["--coordinator", &c.url, "--token", ADMIN, "plugin", "list"]);
    assert_eq!(flagged.code, Some(0), "{flagged:?}");
    assert!(
        flagged
            .stderr
            .contains("warning: --token on the command line is visible"),
        "{flagged:?}"
    );
    let missing = arcadectl(&[
        "--coordinator",
        &c.url,
        "--token-file",
        "/nonexistent/token",
        "plugin",
        "list",
    ]);
    missing.assert_failed_with("--token-file");

    c.ctl(&[
        "job",
        "create",
        "--plugin",
        "notify/nope@1.0.0",
        "--",
        "echo",
        "hi",
    ])
    .assert_failed_with("not found: plugin notify/nope@1.0.0 does not exist");

    let file = c.path("p.sh");
    write_script(&file, 64);
    let bad_id = c.ctl(&[
        "plugin",
        "push",
        file.to_str().expect("utf-8"),
        "--id",
        "Bad/../x",
        "--version",
        "1.0.0",
    ]);
    bad_id.assert_failed_with("must match [a-z0-9][a-z0-9._-]*");
    c.ctl(&["plugin", "get", "notify/x@one"])
        .assert_failed_with("not a semantic version");
    c.ctl(&["job", "create", "--plugin", "notify/x@1.0.0:during"])
        .assert_failed_with("stage \"during\"");
    c.ctl(&["job", "create", "--label", "novalue", "--", "true"])
        .assert_failed_with("KEY=VALUE");

    // A port nobody listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let url = format!("http://127.0.0.1:{port}");
    let tf = c.token_file();
    arcadectl(&["--coordinator", &url, "--token-file", &tf, "agent", "list"])
        .assert_failed_with(&format!("cannot reach coordinator at {url}"));

    // No token at all, and usage errors, are one line too.
    arcadectl(&["--coordinator", &c.url, "plugin", "list"]).assert_failed_with("--token");
    let usage = arcadectl(&["plugin", "lst"]);
    usage.assert_failed_with("lst");
    assert_eq!(usage.code, Some(2));
}

#[test]
fn coordinator_cli_config_and_flags() {
    let printed = run(
        env!("CARGO_BIN_EXE_arcade-coordinator"),
        &["--print-default-config"],
    );
    assert_eq!(printed.code, Some(0), "{printed:?}");
    let parsed: toml::Table = toml::from_str(&printed.stdout).expect("default config is TOML");
    assert_eq!(parsed["listen"].as_str(), Some("127.0.0.1:50051"));
    assert_eq!(
        parsed["plugin"]["security"]["allow_unsafe"].as_bool(),
        Some(false)
    );

    let dir = tempfile::tempdir().expect("tempdir");
    let bad = run(
        env!("CARGO_BIN_EXE_arcade-coordinator"),
        &[
            "--listen",
            "nope",
            "--data-dir",
            dir.path().to_str().expect("utf-8"),
        ],
    );
    assert_eq!(bad.code, Some(2), "{bad:?}");
    assert!(bad.stderr.contains("listen"), "{bad:?}");
}

#[test]
fn key_generate_and_signed_push() {
    let c = Coordinator::start();
    let key = c.path("publisher.key");
    let key_arg = key.to_str().expect("utf-8 path");
    let public = c.ok(&["key", "generate", "--out", key_arg]);
    let public = public.trim();
    assert!(
        public.starts_with("ed25519:") && public.len() == 8 + 64,
        "{public}"
    );
    // Never overwritten.
    c.ctl(&["key", "generate", "--out", key_arg])
        .assert_failed_with("publisher key file");

    let file = c.path("signed.sh");
    write_script(&file, 1000);
    let file_arg = file.to_str().expect("utf-8 path");
    let push = |id: &str, key: &str| {
        c.ctl(&[
            "plugin",
            "push",
            file_arg,
            "--id",
            id,
            "--version",
            "1.0.0",
            "--sign-key",
            key,
        ])
    };
    let out = push("signed/x", key_arg);
    assert_eq!(out.code, Some(0), "{out:?}");
    let got = c.json(&["plugin", "get", "signed/x@1.0.0", "--json"]);
    assert_eq!(got["signed_by"], public);
    assert!(
        c.ok(&["plugin", "get", "signed/x@1.0.0"])
            .contains(&format!("signed by       {public}")),
    );
    // A file that is no key: a usage error before anything is sent.
    push("signed/y", file_arg).assert_failed_with("--sign-key: publisher key file");
    let unsigned = c.json(&["plugin", "list", "--json"]);
    assert_eq!(find(&unsigned, "id", "signed/x")["signed_by"], public);
    assert!(
        unsigned
            .as_array()
            .expect("array")
            .iter()
            .all(|p| p["id"] != "signed/y"),
        "{unsigned}"
    );
}
