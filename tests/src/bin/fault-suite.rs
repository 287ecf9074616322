//! `fault-suite [--json] [--list] [NAME…]`: runs the fault scenarios of
//! `arcade_tests::faults` (all, or the ones named) against real components on loopback
//! and prints a table: scenario, result, bytes by source, bans, time, outcome. With
//! `--json`, the last line of stdout is one JSON object `{"passed":…,"failed":…,"rows":[…]}`.
//! Exits 1 when any scenario fails, 2 on bad arguments.

use std::time::Duration;

use arcade_tests::faults;

/// Hard limit of one scenario.
const LIMIT: Duration = Duration::from_secs(300);

fn main() {
    let mut json = false;
    let mut names = Vec::new();
    let known: Vec<&str> = faults::scenarios().iter().map(|(n, _)| *n).collect();
    for arg in std::env::args().skip(1) {
        match arg.as_str() {
            "--json" => json = true,
            "--list" => {
                for n in &known {
                    println!("{n}");
                }
                return;
            }
            "-h" | "--help" => {
                println!(
                    "usage: fault-suite [--json] [--list] [NAME…]\nscenarios: {}",
                    known.join(", ")
                );
                return;
            }
            n if known.contains(&n) => names.push(n.to_string()),
            other => {
                eprintln!(
                    "fault-suite: unknown argument or scenario `{other}` (scenarios: {})",
                    known.join(", ")
                );
                std::process::exit(2);
            }
        }
    }
    if names.is_empty() {
        names = known.iter().map(|n| n.to_string()).collect();
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("fault-suite: cannot start the runtime: {e}");
            std::process::exit(1);
        }
    };
    let mut rows = Vec::new();
    for name in names {
        eprintln!("running {name} …");
        let row = runtime
            .block_on(faults::run(&name, LIMIT))
            .map_err(|e| format!("{e:#}"));
        match &row {
            Ok(o) => eprintln!("  pass: {} ({:.1} s)", o.outcome, o.seconds),
            Err(e) => eprintln!("  FAIL: {e}"),
        }
        rows.push((name, row));
    }
    let failed = rows.iter().filter(|(_, r)| r.is_err()).count();
    if json {
        let rows: Vec<serde_json::Value> = rows
            .iter()
            .map(|(name, r)| match r {
                Ok(o) => serde_json::json!({"scenario": name, "passed": true, "outcome": o}),
                Err(e) => serde_json::json!({"scenario": name, "passed": false, "error": e}),
            })
            .collect();
        println!(
            "{}",
            serde_json::json!({"passed": rows.len() - failed, "failed": failed, "rows": rows})
        );
    } else {
        print!("{}", faults::table(&rows));
    }
    if failed > 0 {
        std::process::exit(1);
    }
}
