//! The `arcade-sim` command: `--json` prints one JSON object on the last line of stdout
//! with the figures the simulations issue names, and bad input is a one-line error.

use std::process::Command;

fn sim() -> Command {
    Command::new(env!("CARGO_BIN_EXE_arcade-sim"))
}

const FIELDS: [&str; 14] = [
    "agents",
    "size_bytes",
    "completed",
    "failed",
    "t_all_s",
    "t_p50_s",
    "t_p99_s",
    "server_egress_bytes",
    "server_egress_ratio",
    "peer_bytes",
    "t_min_s",
    "t_all_over_t_min",
    "verified",
    "per_agent",
];

fn last_json(stdout: &[u8]) -> serde_json::Value {
    let text = String::from_utf8_lossy(stdout);
    let last = text.lines().last().unwrap_or_default();
    serde_json::from_str(last).unwrap_or_else(|e| panic!("last line is not JSON ({e}): {text}"))
}

#[test]
fn swarm_json_has_every_figure() {
    let out = sim()
        .args([
            "swarm",
            "--agents",
            "3",
            "--size-mib",
            "2",
            "--chunk-kib",
            "256",
            "--json",
        ])
        .output()
        .expect("run arcade-sim");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v = last_json(&out.stdout);
    for f in FIELDS {
        assert!(v.get(f).is_some(), "missing {f}: {v}");
    }
    assert_eq!(v["agents"], 3);
    assert_eq!(v["completed"], 3);
    assert_eq!(v["verified"], true);
    assert_eq!(v["engine"], "real");
}

#[test]
fn model_json_and_out_dir_with_charts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = sim()
        .args([
            "model",
            "--agents",
            "50",
            "--size-mib",
            "8",
            "--chunk-kib",
            "256",
            "--compare",
            "--json",
            "--out",
        ])
        .arg(dir.path())
        .output()
        .expect("run arcade-sim");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v = last_json(&out.stdout);
    for f in FIELDS {
        assert!(v.get(f).is_some(), "missing {f}: {v}");
    }
    assert_eq!(v["completed"], 50);
    assert_eq!(v["baseline"]["p2p"], false);
    for file in [
        "report.json",
        "completion-cdf.svg",
        "bytes-by-source.svg",
        "completion-cdf-compared.svg",
    ] {
        let text = std::fs::read_to_string(dir.path().join(file))
            .unwrap_or_else(|e| panic!("{file}: {e}"));
        assert!(!text.is_empty(), "{file} is empty");
    }
}

#[test]
fn bad_scenarios_are_one_line_errors() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("bad.toml");
    std::fs::write(
        &file,
        "agents = 4\nplugins = [{ size_mib = 1 }]\n[agent]\nup_mibps = -3\n",
    )
    .expect("write");
    let out = sim()
        .arg("run")
        .arg(&file)
        .output()
        .expect("run arcade-sim");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("agent.up_mibps"), "{err}");
    let out = sim()
        .args(["run", "/nonexistent/scenario.toml"])
        .output()
        .expect("run arcade-sim");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read scenario"));
    let out = sim()
        .args(["swarm", "--agents", "1000", "--size-mib", "1"])
        .output()
        .expect("run arcade-sim");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("arcade-sim model"));
}
