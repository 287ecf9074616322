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

/// Runs `arcade-sim ARGS`, which must succeed, and returns the JSON object on the last
/// line of its stdout after checking it has every field the issue names.
fn fleet_json(args: &[std::ffi::OsString]) -> serde_json::Value {
    let out = sim().args(args).output().expect("run arcade-sim");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let last = text.lines().last().unwrap_or_default();
    let v: serde_json::Value = serde_json::from_str(last)
        .unwrap_or_else(|e| panic!("last line is not JSON ({e}): {text}"));
    for f in FIELDS {
        assert!(v.get(f).is_some(), "missing {f}: {v}");
    }
    v
}

fn os(args: &[&str]) -> Vec<std::ffi::OsString> {
    args.iter().map(Into::into).collect()
}

#[test]
fn swarm_json_has_every_figure() {
    let args = os(&[
        "swarm",
        "--agents",
        "3",
        "--size-mib",
        "2",
        "--chunk-kib",
        "256",
        "--json",
    ]);
    let v = fleet_json(&args);
    assert_eq!(v["agents"], 3);
    assert_eq!(v["completed"], 3);
    assert_eq!(v["verified"], true);
    assert_eq!(v["engine"], "real");
}

#[test]
fn model_json_and_out_dir_with_charts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut args = os(&[
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
    ]);
    args.push(dir.path().into());
    let v = fleet_json(&args);
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

/// README command #1 (smaller): every agent runs the sample plugin, and the
/// coordinator sends less than one copy per agent.
#[test]
fn demo_runs_the_plugin_on_every_agent() {
    let out = sim()
        .args(["demo", "--agents", "4", "--size-mib", "4", "--json"])
        .output()
        .expect("run arcade-sim demo");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let v: serde_json::Value = serde_json::from_str(text.lines().last().unwrap_or_default())
        .unwrap_or_else(|e| panic!("last line is not JSON ({e}): {text}"));
    let agents = v["agents"].as_array().expect("agents rows");
    assert_eq!(agents.len(), 4, "{v}");
    let size = v["size"].as_u64().expect("size");
    for a in agents {
        assert_eq!(a["result"], "succeeded", "{a}");
        let got =
            a["bytes_from_peers"].as_u64().unwrap() + a["bytes_from_coordinator"].as_u64().unwrap();
        assert_eq!(got, size, "every verified byte counted once: {a}");
    }
    assert!(
        v["egress_over_size"].as_f64().unwrap() < 4.0,
        "the mesh saves coordinator egress: {v}"
    );
}
