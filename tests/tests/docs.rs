//! The README's metrics tables are generated from the code's own lists
//! (`arcade_coordinator::metrics::METRICS`, `arcade_agent::metrics::METRICS`), and those
//! lists are exactly what the registries expose. Run with `ARCADE_WRITE_README=1` to
//! rewrite the tables after changing a metric. The deploy files (`deploy/`) are checked
//! against the same lists and the binaries: the Grafana dashboard's queries, the
//! systemd units' flags and hardening.

use arcade_p2p::metrics_http::{MetricDoc, markdown_table};

fn readme_path() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .join("README.md")
}

/// The `# TYPE` lines of a rendering: (exposed name, kind).
fn types(rendered: &str) -> Vec<(String, String)> {
    rendered
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|rest| rest.split_once(' '))
        .map(|(n, k)| (n.to_owned(), k.to_owned()))
        .collect()
}

fn check_registry(who: &str, docs: &[MetricDoc], registered: &[&str], rendered: &str) {
    let mut documented: Vec<&str> = docs.iter().map(|d| d.name).collect();
    let mut names = registered.to_vec();
    documented.sort_unstable();
    names.sort_unstable();
    assert_eq!(documented, names, "{who}: METRICS and the registry differ");
    // What is exposed has the documented type (families without samples are not).
    for (n, k) in types(rendered) {
        let d = docs
            .iter()
            .find(|d| d.exposed() == n)
            .unwrap_or_else(|| panic!("{who}: {n} is exposed but not documented"));
        assert_eq!(d.kind, k, "{who}: {n}");
    }
}

#[test]
fn every_metric_is_documented_and_every_documented_metric_exists() {
    let m = arcade_coordinator::metrics::Metrics::new();
    check_registry(
        "coordinator",
        arcade_coordinator::metrics::METRICS,
        m.registered(),
        &m.render(),
    );
    let m = arcade_agent::metrics::Metrics::new();
    check_registry(
        "agent",
        arcade_agent::metrics::METRICS,
        m.registered(),
        &m.render(),
    );
}

/// Replaces what lies between `<!-- metrics:WHO -->` and `<!-- /metrics:WHO -->`.
fn with_table(readme: &str, who: &str, table: &str) -> Option<String> {
    let (begin, end) = (
        format!("<!-- metrics:{who} -->\n"),
        format!("<!-- /metrics:{who} -->"),
    );
    let start = readme.find(&begin)? + begin.len();
    let stop = start + readme[start..].find(&end)?;
    Some(format!("{}{table}{}", &readme[..start], &readme[stop..]))
}

#[test]
fn the_readme_metrics_tables_are_generated_from_the_code() {
    let path = readme_path();
    let readme = std::fs::read_to_string(&path).unwrap();
    let mut generated = readme.clone();
    for (who, docs) in [
        ("coordinator", arcade_coordinator::metrics::METRICS),
        ("agent", arcade_agent::metrics::METRICS),
    ] {
        generated = with_table(&generated, who, &markdown_table(docs))
            .unwrap_or_else(|| panic!("README.md has no <!-- metrics:{who} --> markers"));
    }
    if std::env::var_os("ARCADE_WRITE_README").is_some() {
        std::fs::write(&path, &generated).unwrap();
        return;
    }
    assert!(
        generated == readme,
        "README.md's metrics tables differ from the code's METRICS lists: run `ARCADE_WRITE_README=1 cargo test -p arcade-tests --test docs`"
    );
}

fn deploy(path: &str) -> std::path::PathBuf {
    readme_path().with_file_name("deploy").join(path)
}

/// Every `expr` of the Grafana dashboard, with Grafana's variables given values.
fn dashboard_exprs() -> Vec<String> {
    let text = std::fs::read_to_string(deploy("grafana/arcade-mesh.json")).unwrap();
    let dash: serde_json::Value = serde_json::from_str(&text).expect("the dashboard is JSON");
    let mut out = Vec::new();
    for panel in dash["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"].as_str().expect("a target has an expr");
            out.push(
                expr.replace("$__rate_interval", "5m")
                    .replace("$coordinator_job", "arcade-coordinator")
                    .replace("$agent_job", "arcade-agent"),
            );
        }
    }
    out
}

/// The dashboard queries only metrics the code documents (a histogram through its
/// `_bucket`, `_sum` or `_count` series), and every query is valid PromQL to
/// `promtool check rules` when promtool is installed (`.ci/run` installs it).
#[test]
fn the_grafana_dashboard_queries_documented_metrics_with_valid_promql() {
    let exprs = dashboard_exprs();
    assert!(exprs.len() >= 15, "{} queries", exprs.len());
    let docs: Vec<MetricDoc> = arcade_coordinator::metrics::METRICS
        .iter()
        .chain(arcade_agent::metrics::METRICS)
        .copied()
        .collect();
    let known = |name: &str| {
        docs.iter().any(|d| {
            d.exposed() == name
                || (d.kind == "histogram"
                    && ["_bucket", "_sum", "_count"]
                        .iter()
                        .any(|s| name == format!("{}{s}", d.name)))
        })
    };
    let mut used = std::collections::BTreeSet::new();
    for expr in &exprs {
        let words = expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'));
        for w in words.filter(|w| w.starts_with("arcade_") || w.starts_with("plugin_download")) {
            assert!(
                known(w),
                "the dashboard queries {w}, which no METRICS list has: {expr}"
            );
            used.insert(w.to_owned());
        }
    }
    assert!(
        used.len() >= 20,
        "the dashboard covers {} metrics",
        used.len()
    );

    if std::process::Command::new("promtool")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("promtool is not installed: PromQL syntax not checked");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let rules = dir.path().join("dashboard-rules.yml");
    let mut yaml = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, e) in exprs.iter().enumerate() {
        yaml.push_str(&format!(
            "      - record: arcade:dashboard:{i}\n        expr: {}\n",
            serde_json::to_string(e).unwrap()
        ));
    }
    std::fs::write(&rules, yaml).unwrap();
    let out = std::process::Command::new("promtool")
        .args(["check", "rules"])
        .arg(&rules)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "promtool check rules: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The systemd units run the right binaries with flags they accept, as dedicated users,
/// with systemd's hardening; `systemd-analyze verify` passes on them (pointed at the
/// binaries this build made) when it is installed.
#[test]
fn the_systemd_units_are_hardened_and_verify() {
    let sysusers = std::fs::read_to_string(deploy("systemd/arcade-mesh.sysusers.conf")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    for (unit, bin) in [
        ("arcade-coordinator.service", "arcade-coordinator"),
        ("arcade-agent.service", "arcade-agent"),
    ] {
        let text = std::fs::read_to_string(deploy(&format!("systemd/{unit}"))).unwrap();
        for key in [
            "NoNewPrivileges=yes",
            "ProtectSystem=strict",
            "ProtectHome=yes",
            "PrivateTmp=yes",
            "CapabilityBoundingSet=\n",
            format!("User={bin}").as_str(),
            format!("StateDirectory={bin}").as_str(),
            format!("ExecStart=/usr/local/bin/{bin} --config /etc/arcade/").as_str(),
        ] {
            assert!(text.contains(key), "{unit} lacks {key:?}");
        }
        assert!(
            sysusers
                .lines()
                .any(|l| l.starts_with(&format!("u {bin} "))),
            "no system user {bin}"
        );
        // The flags of ExecStart are the binary's own.
        let exec = text
            .lines()
            .find_map(|l| l.strip_prefix("ExecStart="))
            .unwrap();
        let args: Vec<&str> = exec.split_whitespace().skip(1).collect();
        let real = arcade_tests::process::workspace_bin(bin);
        let help = std::process::Command::new(&real)
            .arg("--help")
            .output()
            .unwrap();
        let help = String::from_utf8_lossy(&help.stdout);
        for flag in args.iter().filter(|a| a.starts_with("--")) {
            assert!(help.contains(flag), "{bin} --help does not know {flag}");
        }
        std::fs::write(
            dir.path().join(unit),
            text.replace(&format!("/usr/local/bin/{bin}"), real.to_str().unwrap()),
        )
        .unwrap();
    }
    let Ok(out) = std::process::Command::new("systemd-analyze")
        .arg("verify")
        .arg(dir.path().join("arcade-coordinator.service"))
        .arg(dir.path().join("arcade-agent.service"))
        .output()
    else {
        eprintln!("systemd-analyze is not installed: units not verified");
        return;
    };
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && said.trim().is_empty(),
        "systemd-analyze verify: {said}"
    );
}
