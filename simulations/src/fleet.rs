//! Running scenarios on either engine, comparing with the mesh off, sweeping fleet sizes
//! and writing `--out` directories (JSON + SVG charts). The `arcade-sim` subcommands
//! `swarm`, `model`, `run` and `sweep` are thin wrappers over this module.

use std::path::Path;

use serde::Serialize;

use crate::chart::{self, Series};
use crate::model::ModelOptions;
use crate::report::FleetReport;
use crate::scenario::{Engine, Scenario};

/// Runs one scenario on one engine.
pub async fn run(
    scenario: &Scenario,
    engine: Engine,
    model: &ModelOptions,
) -> anyhow::Result<FleetReport> {
    match engine {
        Engine::Real => crate::swarm::run(scenario).await,
        Engine::Model => {
            let (s, m) = (scenario.clone(), model.clone());
            tokio::task::spawn_blocking(move || crate::model::run(&s, &m)).await?
        }
    }
}

/// Runs the scenario as given and, when `compare` is set and the mesh is on, again with
/// the mesh off; the second run becomes the first's `baseline`.
pub async fn run_compared(
    scenario: &Scenario,
    engine: Engine,
    model: &ModelOptions,
    compare: bool,
) -> anyhow::Result<FleetReport> {
    let mut report = run(scenario, engine, model).await?;
    if compare && scenario.p2p {
        let mut off = scenario.clone();
        off.p2p = false;
        report.baseline = Some(Box::new(run(&off, engine, model).await?));
    }
    Ok(report)
}

/// One point of a sweep.
#[derive(Debug, Clone, Serialize)]
pub struct SweepPoint {
    /// `real` or `model`.
    pub engine: String,
    /// Fleet size.
    pub agents: usize,
    /// The run's summary (no per-agent rows).
    pub report: FleetReport,
}

/// A sweep over fleet sizes.
#[derive(Debug, Clone, Serialize)]
pub struct Sweep {
    /// The base scenario's name.
    pub scenario: String,
    /// Every run, model points first.
    pub points: Vec<SweepPoint>,
}

/// Runs `base` at each fleet size, on the model then on the real stack.
pub async fn sweep(
    base: &Scenario,
    model_sizes: &[usize],
    real_sizes: &[usize],
    model: &ModelOptions,
    mut progress: impl FnMut(&SweepPoint),
) -> anyhow::Result<Sweep> {
    let mut points = Vec::new();
    for (engine, sizes) in [(Engine::Model, model_sizes), (Engine::Real, real_sizes)] {
        for &n in sizes {
            let mut s = base.clone();
            s.agents = n;
            s.validate()?;
            let r = run(&s, engine, model).await?;
            let point = SweepPoint {
                engine: r.engine.clone(),
                agents: n,
                report: r.summary(),
            };
            progress(&point);
            points.push(point);
        }
    }
    Ok(Sweep {
        scenario: base.name.clone(),
        points,
    })
}

impl Sweep {
    /// Charts: coordinator egress ÷ S and completion ÷ bound against N, per engine.
    pub fn charts(&self) -> Vec<(String, String)> {
        let series = |f: &dyn Fn(&FleetReport) -> f64| -> Vec<Series> {
            ["model", "real"]
                .iter()
                .filter_map(|e| {
                    let points: Vec<(f64, f64)> = self
                        .points
                        .iter()
                        .filter(|p| p.engine == *e)
                        .map(|p| (p.agents as f64, f(&p.report)))
                        .collect();
                    (!points.is_empty()).then(|| Series {
                        label: format!("{e} (mesh on)"),
                        points,
                    })
                })
                .collect()
        };
        vec![
            (
                "egress-vs-agents.svg".into(),
                chart::line_chart_with_ref(
                    &format!("Coordinator egress ÷ plugin size — {}", self.scenario),
                    "agents (N)",
                    "egress ÷ S",
                    &series(&|r| r.server_egress_ratio),
                    true,
                    Some((1.0, "one copy")),
                ),
            ),
            (
                "completion-over-bound-vs-agents.svg".into(),
                chart::line_chart_with_ref(
                    &format!("Fleet completion ÷ physical bound — {}", self.scenario),
                    "agents (N)",
                    "t_all ÷ t_min",
                    &series(&|r| r.t_all_over_t_min),
                    true,
                    Some((1.0, "bound")),
                ),
            ),
        ]
    }
}

/// Writes `report.json` and the run's charts (completion CDF — with the baseline when
/// there is one — and bytes by source per agent) into `dir`.
pub fn write_report(dir: &Path, report: &FleetReport) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    std::fs::write(
        dir.join("report.json"),
        serde_json::to_string_pretty(&report.json_view())?,
    )?;
    let mut charts = chart::report_charts(report);
    if let Some(base) = &report.baseline {
        let times =
            |r: &FleetReport| -> Vec<f64> { r.per_agent.iter().filter_map(|a| a.t_s).collect() };
        charts.push((
            "completion-cdf-compared.svg".into(),
            chart::cdf_chart(
                &format!(
                    "Time to verified plugin — {} ({})",
                    report.scenario, report.engine
                ),
                "seconds since the jobs were created",
                &[
                    ("mesh on".into(), times(report)),
                    ("mesh off (seed design)".into(), times(base)),
                ],
            ),
        ));
    }
    chart::write_all(dir, &charts)?;
    Ok(())
}

/// Writes `sweep.json` and the sweep charts into `dir`.
pub fn write_sweep(dir: &Path, sweep: &Sweep) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join("sweep.json"), serde_json::to_string_pretty(sweep)?)?;
    chart::write_all(dir, &sweep.charts())?;
    Ok(())
}
