//! The `arcade-agent` command line: default config, bad config and bad flags.

use std::process::Command;

fn agent() -> Command {
    Command::new(env!("CARGO_BIN_EXE_arcade-agent"))
}

#[test]
fn print_default_config_is_valid_toml_with_every_seed_key() {
    let out = agent().arg("--print-default-config").output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    let parsed: toml::Table = text.parse().expect("valid TOML");
    assert!(parsed.contains_key("id"));
    for (section, keys) in [
        ("plugins", &["directory"][..]),
        (
            "download",
            &["concurrent", "timeout", "retry", "fallback"][..],
        ),
        ("cache", &["max_size", "eviction", "ttl"][..]),
    ] {
        let table = parsed[section]
            .as_table()
            .unwrap_or_else(|| panic!("[{section}]"));
        for k in keys {
            assert!(table.contains_key(*k), "{section}.{k}");
        }
    }
    assert!(parsed.contains_key("builtin"));
    assert!(parsed.contains_key("metrics_listen"));
}

#[test]
fn bad_config_exits_2_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("agent.toml");
    std::fs::write(&file, "[cache]\neviction = \"random\"\n").unwrap();
    let out = agent().arg("--config").arg(&file).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cache.eviction"), "{err}");

    let out = agent()
        .args(["--id", "bad id", "--data-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("`id`"));

    let out = agent().args(["--label", "novalue"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--label"));

    let out = agent().arg("--no-such-flag").output().unwrap();
    assert_eq!(out.status.code(), Some(2));

    let missing = dir.path().join("missing.toml");
    let out = agent().arg("--config").arg(&missing).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("missing.toml"));
}

#[test]
fn sigterm_stops_the_agent_with_exit_0() {
    let dir = tempfile::tempdir().unwrap();
    // Nothing listens on the coordinator port: the agent keeps retrying registration.
    let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", free.local_addr().unwrap());
    drop(free);
    let mut child = agent()
        .args([
            "--id",
            "term-test",
            "--metrics-listen",
            "127.0.0.1:0",
            "--coordinator",
            &url,
        ])
        .env("ARCADE_MESH_LISTEN", r#"["/ip4/127.0.0.1/tcp/0"]"#)
        .arg("--data-dir")
        .arg(dir.path())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // It is up once it prints its metrics line.
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    assert!(
        line.starts_with("metrics listening on 127.0.0.1:"),
        "{line}"
    );
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert_eq!(status.code(), Some(0), "SIGTERM exits 0");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "agent did not stop within 20 s of SIGTERM"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}
