//! Dependency-free SVG charts of fleet runs, written by `arcade-sim --out DIR`.
//!
//! Every chart is a hand-written SVG string: an 800×480 `viewBox`, white background,
//! sans-serif text, a title, axes with "nice" ticks (1, 2 or 5 × 10^k), light grid
//! lines and a legend to the right of the plot. All text is XML-escaped.
//!
//! - [`line_chart`] / [`line_chart_with_ref`] — y against x (linear or log x), one
//!   coloured line with markers per [`Series`], optionally a dashed reference line.
//! - [`cdf_chart`] — empirical CDFs (fraction of agents done by time x), one step
//!   line per run.
//! - [`stacked_bars`] — one stacked bar per item (agent), one segment per source.
//! - [`report_charts`] — the standard figures of a [`FleetReport`]; [`write_all`]
//!   saves them.
//!
//! No input panics: NaN, infinite (and absurdly large, beyond ±1e200) values are
//! skipped, as are x ≤ 0 on a log axis; empty inputs give an empty frame saying
//! "no data"; zero ranges are widened.

use std::fmt::Write as _;
use std::path::Path;

use crate::report::FleetReport;

/// One line of a [`line_chart`]: its legend label and its (x, y) points.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Series {
    /// Legend text.
    pub label: String,
    /// Points; drawn in order of x, non-finite ones skipped.
    pub points: Vec<(f64, f64)>,
}

/// Canvas width (viewBox units).
const W: f64 = 800.0;
/// Canvas height (viewBox units).
const H: f64 = 480.0;
/// Left edge of the plot area (room for y tick labels and the y-axis title).
const PLOT_LEFT: f64 = 76.0;
/// Top edge of the plot area (room for the title and a subtitle).
const PLOT_TOP: f64 = 58.0;
/// Bottom margin of line charts and CDFs (tick labels and the x-axis title).
const BOTTOM_MARGIN: f64 = 56.0;
/// Line charts and CDFs pad their ranges by this fraction of the span per side.
const PAD: f64 = 0.04;
/// More bars than this are drawn as groups (see [`stacked_bars`]).
const MAX_BARS: usize = 200;
/// Series with more points than this get no markers.
const MAX_MARKERS: usize = 100;
/// Distinct colours (matplotlib's tab10), cycled; from the 11th series on, lines are
/// dashed too.
const PALETTE: [&str; 10] = [
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
    "#bcbd22", "#17becf",
];

/// A line chart of `series` with markers, ~5 nice ticks per axis (decades on a log x
/// axis) and a legend. Same as [`line_chart_with_ref`] without a reference line.
pub fn line_chart(
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series],
    log_x: bool,
) -> String {
    line_chart_with_ref(title, x_label, y_label, series, log_x, None)
}

/// A line chart of `series`, each in its own colour with circle markers (none above
/// 100 points), points sorted by x. With `log_x` the x axis is logarithmic: ticks at
/// the data's ends and every decade between (`8, 10, 100, 1000, 10000`), with 2× and
/// 5× ticks too when it spans under two decades; x ≤ 0 is skipped there.
///
/// `reference`, `Some((y, label))`, draws a dashed horizontal line at `y` labelled at
/// its right end (e.g. `(1.0, "bound = 1.0")`); the y range always includes it. The y
/// range is stretched to 0 when all values are on one side of 0 and the smallest
/// magnitude is at most half the largest; both ranges get 4 % margins (none past 0).
pub fn line_chart_with_ref(
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series],
    log_x: bool,
    reference: Option<(f64, &str)>,
) -> String {
    let clean: Vec<Vec<(f64, f64)>> = series
        .iter()
        .map(|s| {
            let mut p: Vec<(f64, f64)> = s
                .points
                .iter()
                .copied()
                .filter(|&(x, y)| usable(x) && usable(y) && (!log_x || x > 0.0))
                .collect();
            p.sort_by(|a, b| a.0.total_cmp(&b.0));
            p
        })
        .collect();
    let reference = reference.filter(|r| usable(r.0));
    let xs = extent(clean.iter().flatten().map(|p| p.0));
    let ys = extent(
        clean
            .iter()
            .flatten()
            .map(|p| p.1)
            .chain(reference.map(|r| r.0)),
    );
    let x_axis = match (xs, log_x) {
        (Some((a, b)), true) => Axis::log(a, b, PAD),
        (Some((a, b)), false) => Axis::padded(a, b, PAD),
        (None, true) => Axis::log(1.0, 10.0, PAD),
        (None, false) => Axis::padded(0.0, 1.0, PAD),
    };
    let y_axis = match ys {
        Some((a, b)) => {
            let (a, b) = with_zero(a, b);
            Axis::padded(a, b, PAD)
        }
        None => Axis::padded(0.0, 1.0, PAD),
    };
    let entries: Vec<(String, Swatch)> = series
        .iter()
        .enumerate()
        .map(|(i, s)| {
            (
                s.label.clone(),
                Swatch::Line {
                    colour: colour(i),
                    dash: dash(i),
                    marker: true,
                },
            )
        })
        .collect();
    let frame = Frame::new(&entries, BOTTOM_MARGIN);
    let mut c = Canvas::new(title, None);
    draw_axes(&mut c, &frame, Some(&x_axis), &y_axis, x_label, y_label);
    if clean.iter().all(Vec::is_empty) {
        no_data(&mut c, &frame);
    }
    if let Some((y, label)) = reference {
        let py = frame.py(y_axis.frac(y));
        let _ = write!(
            c.s,
            r##"<line x1="{l:.1}" y1="{py:.1}" x2="{r:.1}" y2="{py:.1}" stroke="#444" stroke-width="1.2" stroke-dasharray="6 4"/>"##,
            l = frame.left,
            r = frame.right,
        );
        // Label above the line, or below it when the line hugs the top.
        let ty = if py - frame.top < 16.0 {
            py + 14.0
        } else {
            py - 5.0
        };
        c.text(
            frame.right - 4.0,
            ty,
            11.0,
            "end",
            r##"fill="#444""##,
            label,
        );
    }
    for (i, pts) in clean.iter().enumerate() {
        if pts.is_empty() {
            continue;
        }
        let px: Vec<(f64, f64)> = pts
            .iter()
            .map(|&(x, y)| (frame.px(x_axis.frac(x)), frame.py(y_axis.frac(y))))
            .collect();
        c.s.push_str("<g>");
        polyline(&mut c, &px, colour(i), dash(i));
        if pts.len() <= MAX_MARKERS {
            for &(x, y) in &px {
                let _ = write!(
                    c.s,
                    r##"<circle cx="{x:.1}" cy="{y:.1}" r="3.2" fill="{}" stroke="#fff" stroke-width="1"/>"##,
                    colour(i)
                );
            }
        }
        c.s.push_str("</g>");
    }
    draw_legend(&mut c, &frame, &entries);
    c.finish()
}

/// Empirical CDFs, one step line per `(label, values)` run: y is the fraction (0..1)
/// of the run's values ≤ x, e.g. of agents done by time x. Non-finite values are
/// skipped, so the fraction is of the finite ones; put "n of N done" in the label if
/// some never finished. The x range includes 0 when the values are non-negative and
/// the smallest is at most half the largest.
pub fn cdf_chart(title: &str, x_label: &str, series: &[(String, Vec<f64>)]) -> String {
    cdf_chart_marked(title, x_label, series, &[])
}

/// [`cdf_chart`] with dashed vertical marks `(x, label)` (e.g. the bound).
fn cdf_chart_marked(
    title: &str,
    x_label: &str,
    series: &[(String, Vec<f64>)],
    marks: &[(f64, String)],
) -> String {
    let clean: Vec<Vec<f64>> = series
        .iter()
        .map(|(_, v)| {
            let mut v: Vec<f64> = v.iter().copied().filter(|x| usable(*x)).collect();
            v.sort_by(f64::total_cmp);
            v
        })
        .collect();
    let marks: Vec<&(f64, String)> = marks.iter().filter(|m| usable(m.0)).collect();
    let xs = extent(
        clean
            .iter()
            .flatten()
            .copied()
            .chain(marks.iter().map(|m| m.0)),
    );
    let x_axis = match xs {
        Some((a, b)) => {
            let (a, b) = with_zero(a, b);
            Axis::padded(a, b, PAD)
        }
        None => Axis::padded(0.0, 1.0, PAD),
    };
    // Padded at both ends, so the 0 and 1 levels stand off the frame.
    let mut y_axis = Axis::linear(0.0, 1.0);
    (y_axis.lo, y_axis.hi) = (-PAD, 1.0 + PAD);
    let entries: Vec<(String, Swatch)> = series
        .iter()
        .enumerate()
        .map(|(i, (label, _))| {
            (
                label.clone(),
                Swatch::Line {
                    colour: colour(i),
                    dash: dash(i),
                    marker: false,
                },
            )
        })
        .collect();
    let frame = Frame::new(&entries, BOTTOM_MARGIN);
    let mut c = Canvas::new(title, None);
    draw_axes(
        &mut c,
        &frame,
        Some(&x_axis),
        &y_axis,
        x_label,
        "fraction done",
    );
    if clean.iter().all(Vec::is_empty) {
        no_data(&mut c, &frame);
    }
    for (x, label) in marks.iter().map(|m| (m.0, m.1.as_str())) {
        let px = frame.px(x_axis.frac(x));
        let _ = write!(
            c.s,
            r##"<line x1="{px:.1}" y1="{t:.1}" x2="{px:.1}" y2="{b:.1}" stroke="#444" stroke-width="1.2" stroke-dasharray="6 4"/>"##,
            t = frame.top,
            b = frame.bottom,
        );
        let (tx, anchor) = if frame.right - px < 120.0 {
            (px - 4.0, "end")
        } else {
            (px + 4.0, "start")
        };
        c.text(
            tx,
            frame.top + 12.0,
            11.0,
            anchor,
            r##"fill="#444""##,
            label,
        );
    }
    for (i, v) in clean.iter().enumerate() {
        if v.is_empty() {
            continue;
        }
        let n = v.len() as f64;
        let mut pts = Vec::with_capacity(2 * v.len() + 2);
        pts.push((frame.px(0.0), frame.py(y_axis.frac(0.0))));
        for (k, &x) in v.iter().enumerate() {
            let px = frame.px(x_axis.frac(x));
            pts.push((px, frame.py(y_axis.frac(k as f64 / n))));
            pts.push((px, frame.py(y_axis.frac((k + 1) as f64 / n))));
        }
        pts.push((frame.px(1.0), frame.py(y_axis.frac(1.0))));
        c.s.push_str("<g>");
        polyline(&mut c, &pts, colour(i), dash(i));
        c.s.push_str("</g>");
    }
    draw_legend(&mut c, &frame, &entries);
    c.finish()
}

/// Stacked bars: one bar per `(label, segments)` item (e.g. per agent), one segment per
/// `(source, value)` (e.g. "peers", "coordinator"), stacked bottom-up in the order the
/// sources first appear, each source in its own colour, with a legend. Non-finite or
/// negative values count as 0; a source repeated within a bar is summed. Every bar
/// carries a `<title>` tooltip with its values.
///
/// Readability: bar labels that do not fit under their bars are rotated 45° and only
/// every k-th is shown (k = 1, 2, 5, 10, …; labels cut to 14 characters). More than
/// 200 bars (e.g. 10,000 agents) are grouped: consecutive bars are bucketed into at
/// most 200 groups of equal size (the last may be smaller), each drawn as one bar of
/// its group's *mean* per source and labelled with its first item; a subtitle says
/// so, and the tooltip names the group's first and last items.
pub fn stacked_bars(title: &str, y_label: &str, bars: &[(String, Vec<(String, f64)>)]) -> String {
    let mut names: Vec<&str> = Vec::new();
    for (_, segs) in bars {
        for (name, _) in segs {
            if !names.contains(&name.as_str()) {
                names.push(name);
            }
        }
    }
    let rows: Vec<(String, Vec<f64>)> = bars
        .iter()
        .map(|(label, segs)| {
            let mut v = vec![0.0; names.len()];
            for (name, x) in segs {
                if let Some(j) = names.iter().position(|n| n == name)
                    && usable(*x)
                    && *x > 0.0
                {
                    v[j] += x;
                }
            }
            (label.clone(), v)
        })
        .collect();
    let (rows, subtitle): (Vec<Bar>, Option<String>) = if rows.len() > MAX_BARS {
        let per = rows.len().div_ceil(MAX_BARS);
        let groups: Vec<Bar> = rows
            .chunks(per)
            .map(|ch| {
                let mut v = vec![0.0; names.len()];
                for (_, r) in ch {
                    for (a, b) in v.iter_mut().zip(r) {
                        *a += b;
                    }
                }
                for a in &mut v {
                    *a /= ch.len() as f64;
                }
                let first = ch.first().map(|r| r.0.clone()).unwrap_or_default();
                let last = ch.last().map(|r| r.0.clone()).unwrap_or_default();
                (
                    first.clone(),
                    format!("{first} … {last} (mean of {})", ch.len()),
                    v,
                )
            })
            .collect();
        let note = format!(
            "{} bars shown as {} groups of {} consecutive bars; each bar is its group's mean",
            rows.len(),
            groups.len(),
            per
        );
        (groups, Some(note))
    } else {
        let rows = rows.into_iter().map(|(l, v)| (l.clone(), l, v)).collect();
        (rows, None)
    };
    let total_max = rows
        .iter()
        .map(|r| r.2.iter().sum::<f64>())
        .fold(0.0, f64::max);
    let y_axis = Axis::linear(0.0, total_max);
    let entries: Vec<(String, Swatch)> = names
        .iter()
        .enumerate()
        .map(|(j, n)| (n.to_string(), Swatch::Block(colour(j))))
        .collect();

    // Bar label plan: horizontal if every label fits under its bar, else rotated 45°
    // with every k-th shown.
    let plot_w = Frame::new(&entries, 0.0).width();
    let m = rows.len();
    let slot = plot_w / m.max(1) as f64;
    let shown: Vec<String> = rows.iter().map(|r| truncate(&r.0, 14)).collect();
    let label_w = shown.iter().map(|s| text_w(s, 10.0)).fold(0.0, f64::max);
    let rotate = label_w + 6.0 > slot;
    let every = if rotate {
        nice_count((17.0 / slot).ceil() as usize)
    } else {
        1
    };
    let bottom_margin = if rotate {
        (label_w * 0.71 + 24.0).max(30.0)
    } else {
        30.0
    };
    let frame = Frame::new(&entries, bottom_margin);
    let mut c = Canvas::new(title, subtitle.as_deref());
    draw_axes(&mut c, &frame, None, &y_axis, "", y_label);
    if m == 0 {
        no_data(&mut c, &frame);
    }
    let bw = if slot * 0.8 >= 1.0 { slot * 0.8 } else { slot };
    let outline = if bw >= 6.0 {
        r##" stroke="#fff" stroke-width="0.6""##
    } else {
        ""
    };
    for (i, (_, name, v)) in rows.iter().enumerate() {
        let cx = frame.left + (i as f64 + 0.5) * slot;
        let mut tip = name.clone();
        tip.push(':');
        for (j, x) in v.iter().enumerate() {
            let _ = write!(tip, " {} {}", names[j], fmt_sig(*x));
            if j + 1 < v.len() {
                tip.push(',');
            }
        }
        let _ = write!(c.s, "<g><title>{}</title>", esc(&tip));
        let mut acc = 0.0;
        for (j, x) in v.iter().enumerate() {
            let y0 = frame.py(y_axis.frac(acc));
            acc += x;
            let y1 = frame.py(y_axis.frac(acc));
            if y0 - y1 > 0.0 {
                let _ = write!(
                    c.s,
                    r#"<rect x="{x:.2}" y="{y1:.2}" width="{bw:.2}" height="{h:.2}" fill="{f}"{outline}/>"#,
                    x = cx - bw / 2.0,
                    h = y0 - y1,
                    f = colour(j),
                );
            }
        }
        c.s.push_str("</g>");
    }
    // Bar labels (and small ticks under the labelled bars).
    c.s.push_str(r##"<g font-size="10" fill="#333">"##);
    for (i, label) in shown.iter().enumerate().filter(|(i, _)| i % every == 0) {
        let cx = frame.left + (i as f64 + 0.5) * slot;
        let _ = write!(
            c.s,
            r##"<line x1="{cx:.1}" y1="{b:.1}" x2="{cx:.1}" y2="{b4:.1}" stroke="#333"/>"##,
            b = frame.bottom,
            b4 = frame.bottom + 4.0
        );
        let ty = frame.bottom + 14.0;
        if rotate {
            let _ = write!(
                c.s,
                r#"<text x="{cx:.1}" y="{ty:.1}" text-anchor="end" transform="rotate(-45 {cx:.1} {ty:.1})">{}</text>"#,
                esc(label)
            );
        } else {
            let _ = write!(
                c.s,
                r#"<text x="{cx:.1}" y="{ty:.1}" text-anchor="middle">{}</text>"#,
                esc(label)
            );
        }
    }
    c.s.push_str("</g>");
    draw_legend(&mut c, &frame, &entries);
    c.finish()
}

/// A bar as drawn: axis label, tooltip name, value per source.
type Bar = (String, String, Vec<f64>);

/// The standard figures of one fleet run, as `(file name, svg)` pairs:
///
/// - `completion-cdf.svg` — CDF of the agents' completion times (`t_s`, where `Some`),
///   labelled "n/N done", with the run's bound `t_min_s` as a dashed vertical line.
/// - `bytes-by-source.svg` — per agent, MiB received from peers vs from the
///   coordinator (stacked bars, grouped above 200 agents).
pub fn report_charts(report: &FleetReport) -> Vec<(String, String)> {
    let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
    let mesh = if report.p2p { "mesh on" } else { "mesh off" };
    let n = report.per_agent.len();
    let times: Vec<f64> = report.per_agent.iter().filter_map(|a| a.t_s).collect();
    let marks: Vec<(f64, String)> = if report.t_min_s > 0.0 {
        vec![(report.t_min_s, format!("bound {:.2} s", report.t_min_s))]
    } else {
        Vec::new()
    };
    let cdf = cdf_chart_marked(
        &format!(
            "Completion time — {} ({} engine, {} agents, {})",
            report.scenario, report.engine, n, mesh
        ),
        "seconds since job creation",
        &[(format!("{mesh}: {}/{n} done", times.len()), times)],
        &marks,
    );
    let bars: Vec<(String, Vec<(String, f64)>)> = report
        .per_agent
        .iter()
        .enumerate()
        .map(|(i, a)| {
            let label = if a.agent_id.is_empty() {
                format!("#{i}")
            } else {
                a.agent_id.clone()
            };
            (
                label,
                vec![
                    ("peers".to_string(), mib(a.peer_bytes)),
                    ("coordinator".to_string(), mib(a.server_bytes)),
                ],
            )
        })
        .collect();
    let bytes = stacked_bars(
        &format!(
            "Bytes received by source — {} ({} engine, {})",
            report.scenario, report.engine, mesh
        ),
        "MiB received",
        &bars,
    );
    vec![
        ("completion-cdf.svg".to_string(), cdf),
        ("bytes-by-source.svg".to_string(), bytes),
    ]
}

/// Writes each `(file name, svg)` of `charts` into `dir`, creating `dir` (and its
/// parents) first.
pub fn write_all(dir: &Path, charts: &[(String, String)]) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    for (name, svg) in charts {
        std::fs::write(dir.join(name), svg)?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------
// Building blocks.

/// A value we can place on an axis.
fn usable(v: f64) -> bool {
    v.is_finite() && v.abs() <= 1e200
}

/// (min, max) of the values, `None` for none.
fn extent(values: impl Iterator<Item = f64>) -> Option<(f64, f64)> {
    values.fold(None, |acc, v| match acc {
        None => Some((v, v)),
        Some((a, b)) => Some((a.min(v), b.max(v))),
    })
}

/// Widens `[a, b]` to include 0 when it is all on one side of 0 and its near end is at
/// most half as far from 0 as its far end (so 0 would not waste most of the axis).
fn with_zero(a: f64, b: f64) -> (f64, f64) {
    if a > 0.0 && a <= b * 0.5 {
        (0.0, b)
    } else if b < 0.0 && b >= a * 0.5 {
        (a, 0.0)
    } else {
        (a, b)
    }
}

fn colour(i: usize) -> &'static str {
    PALETTE[i % PALETTE.len()]
}

fn dash(i: usize) -> Option<&'static str> {
    (i >= PALETTE.len()).then_some("7 3")
}

/// XML-escapes text (and attribute values); drops control characters XML 1.0 forbids.
fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for ch in s.chars() {
        match ch {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            '\t' | '\n' | '\r' => out.push(' '),
            c if c.is_control() => {}
            c => out.push(c),
        }
    }
    out
}

/// `s` cut to at most `max` characters, with an ellipsis if cut.
fn truncate(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        s.to_string()
    } else {
        let mut t: String = s.chars().take(max.saturating_sub(1)).collect();
        t.push('…');
        t
    }
}

/// Rough rendered width of `s` at font `size` (~0.62 em a character, erring wide).
fn text_w(s: &str, size: f64) -> f64 {
    s.chars().count() as f64 * size * 0.62
}

/// The smallest of 1, 2, 5, 10, 20, 50, … that is ≥ `k`.
fn nice_count(k: usize) -> usize {
    let mut base = 1usize;
    loop {
        for m in [1, 2, 5] {
            if m * base >= k {
                return m * base;
            }
        }
        base = base.saturating_mul(10);
        if base == usize::MAX {
            return usize::MAX;
        }
    }
}

/// `[lo, hi]` ordered, with a zero range widened (`[v, v]` becomes `[0, 2v]`, `[0, 0]`
/// becomes `[0, 1]`) and an unusable one replaced by `[0, 1]`.
fn widen(lo: f64, hi: f64) -> (f64, f64) {
    let (lo, hi) = if usable(lo) && usable(hi) {
        (lo.min(hi), lo.max(hi))
    } else {
        (0.0, 1.0)
    };
    if hi - lo > 1e-12 * lo.abs().max(hi.abs()) {
        (lo, hi)
    } else if lo > 0.0 {
        (0.0, 2.0 * lo)
    } else if lo < 0.0 {
        (2.0 * lo, 0.0)
    } else {
        (0.0, 1.0)
    }
}

/// ~`target` nice ticks (a step of 1, 2 or 5 × 10^k) covering `[lo, hi]`: the first is
/// ≤ `lo` and the last ≥ `hi`; always at least two. Zero or unusable ranges are
/// widened first (`[v, v]` becomes `[0, 2v]`, `[0, 0]` becomes `[0, 1]`).
fn nice_ticks(lo: f64, hi: f64, target: usize) -> Vec<f64> {
    let (lo, hi) = widen(lo, hi);
    let raw = (hi - lo) / target.max(1) as f64;
    let mag = 10f64.powf(raw.log10().floor());
    let norm = raw / mag;
    let step = mag
        * if norm <= 1.0 + 1e-9 {
            1.0
        } else if norm <= 2.0 + 1e-9 {
            2.0
        } else if norm <= 5.0 + 1e-9 {
            5.0
        } else {
            10.0
        };
    let first = (lo / step + 1e-9).floor();
    let last = (hi / step - 1e-9).ceil();
    let n = ((last - first).round().max(1.0) as usize).min(1000);
    (0..=n).map(|i| (first + i as f64) * step).collect()
}

/// Log-axis ticks for `[lo, hi]` (0 < lo < hi): both ends and every decade between
/// (plus 2× and 5× when the range spans under two decades; only every d-th decade
/// when it spans more than eight). An end closer than 2.5 % of the axis to an inner
/// tick is dropped, so labels do not collide.
fn log_ticks(lo: f64, hi: f64) -> Vec<f64> {
    let (l, h) = (lo.log10(), hi.log10());
    let span = h - l;
    if !span.is_finite() || span <= 0.0 {
        return vec![lo, hi];
    }
    let mults: &[f64] = if span < 2.0 { &[1.0, 2.0, 5.0] } else { &[1.0] };
    let every = (span / 8.0).ceil().max(1.0) as i32;
    let mut inner = Vec::new();
    for k in (l.floor() as i32)..=(h.ceil() as i32) {
        if k.rem_euclid(every) != 0 {
            continue;
        }
        for m in mults {
            let t = m * 10f64.powi(k);
            if t > lo * (1.0 + 1e-9) && t < hi * (1.0 - 1e-9) {
                inner.push(t);
            }
        }
    }
    let min_gap = 0.025 * span;
    let mut ticks = Vec::with_capacity(inner.len() + 2);
    if inner.first().is_none_or(|t| t.log10() - l >= min_gap) {
        ticks.push(lo);
    }
    ticks.extend(inner);
    if ticks.last().is_none_or(|t| h - t.log10() >= min_gap) {
        ticks.push(hi);
    }
    ticks
}

/// Tick label for a linear axis with ticks `step` apart.
fn fmt_tick(v: f64, step: f64) -> String {
    let decimals = if step >= 1.0 {
        0
    } else {
        ((-step.log10()) - 1e-9).ceil().clamp(0.0, 10.0) as usize
    };
    if v.abs() < step.abs() * 1e-6 {
        return format!("{:.decimals$}", 0.0);
    }
    let a = v.abs();
    if !(1e-3..1e7).contains(&a) {
        return fmt_exp(v);
    }
    format!("{v:.decimals$}")
}

/// Three significant digits, trailing zeros trimmed (`8`, `8.3`, `10000`, `0.05`).
fn fmt_sig(v: f64) -> String {
    let a = v.abs();
    if a == 0.0 || !a.is_finite() {
        return "0".to_string();
    }
    if !(1e-3..1e7).contains(&a) {
        return fmt_exp(v);
    }
    let decimals = (2 - a.log10().floor() as i32).clamp(0, 10) as usize;
    trim_zeros(&format!("{v:.decimals$}"))
}

/// `2.5e7`-style.
fn fmt_exp(v: f64) -> String {
    let s = format!("{v:.2e}");
    match s.split_once('e') {
        Some((m, e)) => format!("{}e{e}", trim_zeros(m)),
        None => s,
    }
}

fn trim_zeros(s: &str) -> String {
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s.to_string()
    }
}

/// An axis: its range, ticks and their labels.
#[derive(Debug, Clone)]
struct Axis {
    lo: f64,
    hi: f64,
    log: bool,
    ticks: Vec<f64>,
    labels: Vec<String>,
}

impl Axis {
    /// A linear axis over nice ticks covering `[lo, hi]`.
    fn linear(lo: f64, hi: f64) -> Axis {
        let ticks = nice_ticks(lo, hi, 5);
        let step = match ticks.as_slice() {
            [a, b, ..] => b - a,
            _ => 1.0,
        };
        let labels = ticks.iter().map(|&t| fmt_tick(t, step)).collect();
        Axis {
            lo: ticks.first().copied().unwrap_or(0.0),
            hi: ticks.last().copied().unwrap_or(1.0),
            log: false,
            ticks,
            labels,
        }
    }

    /// A linear axis over `[lo, hi]` widened by `pad` of its span on each side (not
    /// below an end that is exactly 0), with the nice ticks inside it: data does not
    /// sit on the frame.
    fn padded(lo: f64, hi: f64, pad: f64) -> Axis {
        let (lo, hi) = widen(lo, hi);
        let snapped = Axis::linear(lo, hi);
        let span = hi - lo;
        let plo = if lo == 0.0 { lo } else { lo - pad * span };
        let phi = if hi == 0.0 { hi } else { hi + pad * span };
        let eps = 1e-9 * span;
        let (ticks, labels): (Vec<f64>, Vec<String>) = snapped
            .ticks
            .iter()
            .zip(&snapped.labels)
            .filter(|(t, _)| **t >= plo - eps && **t <= phi + eps)
            .map(|(t, l)| (*t, l.clone()))
            .unzip();
        if ticks.len() < 2 || !phi.is_finite() || phi <= plo {
            return snapped;
        }
        Axis {
            lo: plo,
            hi: phi,
            log: false,
            ticks,
            labels,
        }
    }

    /// A log axis over `[lo, hi]` (both > 0) widened by `pad` of its span (in
    /// decades) on each side, ticked by [`log_ticks`] of `[lo, hi]`; a single value
    /// `v` gets `[v/2, 2v]`.
    fn log(lo: f64, hi: f64, pad: f64) -> Axis {
        let (lo, hi) = if hi > lo * (1.0 + 1e-9) {
            (lo, hi)
        } else {
            (lo / 2.0, hi * 2.0)
        };
        let ticks = log_ticks(lo, hi);
        let labels = ticks.iter().map(|&t| fmt_sig(t)).collect();
        let k = 10f64.powf(pad * (hi / lo).log10());
        let (plo, phi) = (lo / k, hi * k);
        let (lo, hi) = if plo > 0.0 && phi.is_finite() {
            (plo, phi)
        } else {
            (lo, hi)
        };
        Axis {
            lo,
            hi,
            log: true,
            ticks,
            labels,
        }
    }

    /// Where `v` falls along the axis, 0 at `lo` and 1 at `hi`.
    fn frac(&self, v: f64) -> f64 {
        let (a, b, v) = if self.log {
            (self.lo.log10(), self.hi.log10(), v.log10())
        } else {
            (self.lo, self.hi, v)
        };
        let f = if b > a { (v - a) / (b - a) } else { 0.5 };
        if f.is_finite() { f } else { 0.0 }
    }
}

/// The plot area.
struct Frame {
    left: f64,
    top: f64,
    right: f64,
    bottom: f64,
    /// Legend box left edge and width (0 without a legend).
    legend_x: f64,
    legend_w: f64,
}

impl Frame {
    /// The plot area given the legend entries (drawn to its right) and the bottom
    /// margin.
    fn new(entries: &[(String, Swatch)], bottom_margin: f64) -> Frame {
        let legend_w = if entries.is_empty() {
            0.0
        } else {
            let widest = entries
                .iter()
                .map(|e| text_w(&truncate(&e.0, LEGEND_CHARS), 12.0))
                .fold(0.0, f64::max);
            (widest + 48.0).clamp(96.0, 230.0)
        };
        let legend_x = W - 12.0 - legend_w;
        let right = if legend_w > 0.0 {
            legend_x - 14.0
        } else {
            W - 24.0
        };
        Frame {
            left: PLOT_LEFT,
            top: PLOT_TOP,
            right,
            bottom: H - bottom_margin,
            legend_x,
            legend_w,
        }
    }

    fn width(&self) -> f64 {
        self.right - self.left
    }

    fn px(&self, fx: f64) -> f64 {
        self.left + fx * (self.right - self.left)
    }

    fn py(&self, fy: f64) -> f64 {
        self.bottom - fy * (self.bottom - self.top)
    }
}

/// Legend labels are cut to this many characters.
const LEGEND_CHARS: usize = 24;

/// A legend entry's symbol.
enum Swatch {
    Line {
        colour: &'static str,
        dash: Option<&'static str>,
        marker: bool,
    },
    Block(&'static str),
}

/// The SVG being written.
struct Canvas {
    s: String,
}

impl Canvas {
    /// The root element, white background, title and optional subtitle.
    fn new(title: &str, subtitle: Option<&str>) -> Canvas {
        let mut c = Canvas {
            s: String::with_capacity(16 * 1024),
        };
        let _ = write!(
            c.s,
            r##"<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {W} {H}" width="{W}" height="{H}" font-family="Helvetica, Arial, sans-serif" font-size="12"><rect width="{W}" height="{H}" fill="#fff"/>"##
        );
        c.text(
            W / 2.0,
            26.0,
            16.0,
            "middle",
            r##"font-weight="bold" fill="#222""##,
            &truncate(title, 84),
        );
        if let Some(sub) = subtitle {
            c.text(
                W / 2.0,
                44.0,
                11.0,
                "middle",
                r##"fill="#666""##,
                &truncate(sub, 120),
            );
        }
        c
    }

    /// A `<text>` element; `text` is escaped here, `attrs` is trusted.
    fn text(&mut self, x: f64, y: f64, size: f64, anchor: &str, attrs: &str, text: &str) {
        let _ = write!(
            self.s,
            r#"<text x="{x:.1}" y="{y:.1}" font-size="{size}" text-anchor="{anchor}" {attrs}>{}</text>"#,
            esc(text)
        );
    }

    fn finish(mut self) -> String {
        self.s.push_str("</svg>");
        self.s
    }
}

/// Grid, axis lines, ticks with labels and axis titles. `x: None` draws no x ticks
/// (bar charts label their bars themselves).
fn draw_axes(c: &mut Canvas, f: &Frame, x: Option<&Axis>, y: &Axis, x_label: &str, y_label: &str) {
    c.s.push_str(r##"<g font-size="11" fill="#333">"##);
    for (t, label) in y.ticks.iter().zip(&y.labels) {
        let py = f.py(y.frac(*t));
        let _ = write!(
            c.s,
            r##"<line x1="{l:.1}" y1="{py:.1}" x2="{r:.1}" y2="{py:.1}" stroke="#e6e6e6"/><text x="{tx:.1}" y="{ty:.1}" text-anchor="end">{}</text>"##,
            esc(label),
            l = f.left,
            r = f.right,
            tx = f.left - 7.0,
            ty = py + 4.0,
        );
    }
    if let Some(x) = x {
        for (t, label) in x.ticks.iter().zip(&x.labels) {
            let px = f.px(x.frac(*t));
            let _ = write!(
                c.s,
                r##"<line x1="{px:.1}" y1="{t:.1}" x2="{px:.1}" y2="{b:.1}" stroke="#e6e6e6"/><line x1="{px:.1}" y1="{b:.1}" x2="{px:.1}" y2="{b4:.1}" stroke="#333"/><text x="{px:.1}" y="{ty:.1}" text-anchor="middle">{}</text>"##,
                esc(label),
                t = f.top,
                b = f.bottom,
                b4 = f.bottom + 4.0,
                ty = f.bottom + 17.0,
            );
        }
    }
    c.s.push_str("</g>");
    let _ = write!(
        c.s,
        r##"<path d="M{l:.1} {t:.1}V{b:.1}H{r:.1}" fill="none" stroke="#333" stroke-width="1"/>"##,
        l = f.left,
        t = f.top,
        b = f.bottom,
        r = f.right,
    );
    if !x_label.is_empty() {
        c.text(
            (f.left + f.right) / 2.0,
            H - 14.0,
            13.0,
            "middle",
            r##"fill="#222""##,
            x_label,
        );
    }
    if !y_label.is_empty() {
        let my = (f.top + f.bottom) / 2.0;
        let _ = write!(
            c.s,
            r##"<text x="20" y="{my:.1}" font-size="13" text-anchor="middle" fill="#222" transform="rotate(-90 20 {my:.1})">{}</text>"##,
            esc(&truncate(y_label, 50))
        );
    }
}

/// "no data" in the middle of the plot.
fn no_data(c: &mut Canvas, f: &Frame) {
    c.text(
        (f.left + f.right) / 2.0,
        (f.top + f.bottom) / 2.0,
        14.0,
        "middle",
        r##"fill="#999""##,
        "no data",
    );
}

/// A polyline through pixel points (merging duplicates and collinear axis-aligned runs).
fn polyline(c: &mut Canvas, pts: &[(f64, f64)], colour: &str, dash: Option<&str>) {
    let pts = compress(pts);
    let dash = dash
        .map(|d| format!(r#" stroke-dasharray="{d}""#))
        .unwrap_or_default();
    let _ = write!(
        c.s,
        r#"<polyline fill="none" stroke="{colour}" stroke-width="2" stroke-linejoin="round"{dash} points=""#
    );
    for (i, (x, y)) in pts.iter().enumerate() {
        if i > 0 {
            c.s.push(' ');
        }
        let _ = write!(c.s, "{x:.1},{y:.1}");
    }
    c.s.push_str(r#""/>"#);
}

/// Rounds to 0.1 and drops points that add nothing: repeats, and middles of straight
/// horizontal or vertical runs that keep going the same way.
fn compress(pts: &[(f64, f64)]) -> Vec<(f64, f64)> {
    let round = |v: f64| (v * 10.0).round() / 10.0;
    let mut out: Vec<(f64, f64)> = Vec::with_capacity(pts.len());
    for &(x, y) in pts {
        let p = (round(x), round(y));
        if out.last() == Some(&p) {
            continue;
        }
        if let [.., a, b] = out.as_slice() {
            let vertical = a.0 == b.0 && b.0 == p.0 && (b.1 - a.1) * (p.1 - b.1) >= 0.0;
            let horizontal = a.1 == b.1 && b.1 == p.1 && (b.0 - a.0) * (p.0 - b.0) >= 0.0;
            if vertical || horizontal {
                if let Some(last) = out.last_mut() {
                    *last = p;
                }
                continue;
            }
        }
        out.push(p);
    }
    out
}

/// The legend, in a light box right of the plot; entries that do not fit are
/// summarised as "+k more".
fn draw_legend(c: &mut Canvas, f: &Frame, entries: &[(String, Swatch)]) {
    if entries.is_empty() {
        return;
    }
    let row = 20.0;
    let fit = (((f.bottom - f.top - 12.0) / row).floor() as usize).max(1);
    let (shown, more) = if entries.len() > fit {
        (fit - 1, entries.len() - (fit - 1))
    } else {
        (entries.len(), 0)
    };
    let rows = shown + usize::from(more > 0);
    let x0 = f.legend_x;
    let _ = write!(
        c.s,
        r##"<g font-size="12" fill="#222"><rect x="{x0:.1}" y="{y:.1}" width="{w:.1}" height="{h:.1}" fill="#fff" stroke="#ccc" rx="3"/>"##,
        y = f.top,
        w = f.legend_w,
        h = rows as f64 * row + 10.0,
    );
    for (i, (label, swatch)) in entries.iter().take(shown).enumerate() {
        let cy = f.top + 15.0 + i as f64 * row;
        match swatch {
            Swatch::Line {
                colour,
                dash,
                marker,
            } => {
                let dash = dash
                    .map(|d| format!(r#" stroke-dasharray="{d}""#))
                    .unwrap_or_default();
                let _ = write!(
                    c.s,
                    r#"<line x1="{a:.1}" y1="{cy:.1}" x2="{b:.1}" y2="{cy:.1}" stroke="{colour}" stroke-width="2"{dash}/>"#,
                    a = x0 + 8.0,
                    b = x0 + 30.0,
                );
                if *marker {
                    let _ = write!(
                        c.s,
                        r##"<circle cx="{m:.1}" cy="{cy:.1}" r="3.2" fill="{colour}" stroke="#fff" stroke-width="1"/>"##,
                        m = x0 + 19.0,
                    );
                }
            }
            Swatch::Block(colour) => {
                let _ = write!(
                    c.s,
                    r#"<rect x="{a:.1}" y="{y:.1}" width="14" height="12" fill="{colour}"/>"#,
                    a = x0 + 12.0,
                    y = cy - 6.0,
                );
            }
        }
        c.text(
            x0 + 36.0,
            cy + 4.0,
            12.0,
            "start",
            "",
            &truncate(label, LEGEND_CHARS),
        );
    }
    if more > 0 {
        let cy = f.top + 15.0 + shown as f64 * row;
        c.text(
            x0 + 36.0,
            cy + 4.0,
            12.0,
            "start",
            r##"fill="#666""##,
            &format!("+{more} more"),
        );
    }
    c.s.push_str("</g>");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::AgentOutcome;

    /// Checks that tags nest properly (a tiny XML well-formedness check) and that the
    /// document is one `<svg>` element with no stray NaN/inf numbers.
    fn assert_well_formed(svg: &str) {
        assert!(svg.starts_with("<svg"), "starts with <svg");
        assert!(svg.ends_with("</svg>"), "ends with </svg>");
        assert_eq!(svg.matches("<g").count(), svg.matches("</g>").count());
        assert!(!svg.contains("NaN") && !svg.contains("inf"), "no NaN/inf");
        let mut stack: Vec<&str> = Vec::new();
        let mut rest = svg;
        while let Some(start) = rest.find('<') {
            let end = rest[start..].find('>').expect("tag closes") + start;
            let tag = &rest[start + 1..end];
            if let Some(name) = tag.strip_prefix('/') {
                assert_eq!(stack.pop(), Some(name.trim()), "closing {name}");
            } else if !tag.ends_with('/') {
                let name = tag.split_whitespace().next().expect("tag name");
                stack.push(name);
            }
            rest = &rest[end + 1..];
            if stack.is_empty() {
                assert!(rest.is_empty(), "one root element");
            }
        }
        assert!(stack.is_empty(), "unclosed {stack:?}");
    }

    fn series(label: &str, points: &[(f64, f64)]) -> Series {
        Series {
            label: label.into(),
            points: points.to_vec(),
        }
    }

    #[test]
    fn line_chart_is_well_formed_with_one_polyline_per_series() {
        let s = [
            series("real", &[(8.0, 1.2), (64.0, 1.5), (1000.0, 2.0)]),
            series(
                "model",
                &[(8.0, 1.1), (64.0, 1.3), (1000.0, 1.6), (10000.0, 1.9)],
            ),
            series("third", &[(10.0, 3.0)]),
        ];
        for log_x in [false, true] {
            let svg = line_chart_with_ref(
                "t_all ÷ bound",
                "agents",
                "ratio",
                &s,
                log_x,
                Some((1.0, "bound = 1.0")),
            );
            assert_well_formed(&svg);
            assert_eq!(svg.matches("<polyline").count(), 3);
            assert!(svg.contains("bound = 1.0"));
            assert!(svg.contains("stroke-dasharray"));
            for label in ["real", "model", "third"] {
                assert!(svg.contains(&format!(">{label}</text>")));
            }
        }
        let log = line_chart("t", "agents", "s", &s, true);
        for tick in ["8", "10", "100", "1000", "10000"] {
            assert!(log.contains(&format!(">{tick}</text>")), "tick {tick}");
        }
    }

    #[test]
    fn text_is_escaped() {
        let nasty = r#"a < b & "c" > 'd'"#;
        let s = [series(nasty, &[(1.0, 2.0), (2.0, 3.0)])];
        let svg = line_chart_with_ref(nasty, nasty, nasty, &s, false, Some((2.5, nasty)));
        assert_well_formed(&svg);
        assert!(svg.contains("a &lt; b &amp; &quot;c&quot; &gt; &#39;d&#39;"));
        assert!(!svg.contains("a < b"));
        let svg = cdf_chart(nasty, nasty, &[(nasty.into(), vec![1.0, 2.0])]);
        assert_well_formed(&svg);
        assert!(!svg.contains("a < b"));
        let svg = stacked_bars(nasty, nasty, &[(nasty.into(), vec![(nasty.into(), 1.0)])]);
        assert_well_formed(&svg);
        assert!(!svg.contains("a < b"));
        assert_eq!(esc("x\u{7}y\nz"), "xy z");
    }

    #[test]
    fn edge_cases_do_not_panic() {
        let nan = f64::NAN;
        let inf = f64::INFINITY;
        let cases: Vec<Vec<Series>> = vec![
            vec![],
            vec![series("empty", &[])],
            vec![series("one", &[(3.0, 4.0)])],
            vec![series("flat", &[(1.0, 5.0), (2.0, 5.0), (3.0, 5.0)])],
            vec![series("same x", &[(2.0, 1.0), (2.0, 3.0)])],
            vec![series("zeros", &[(0.0, 0.0), (0.0, 0.0)])],
            vec![series("neg", &[(-5.0, -3.0), (-1.0, -2.0)])],
            vec![series(
                "bad",
                &[(nan, 1.0), (1.0, inf), (-inf, nan), (1e300, 1.0)],
            )],
            vec![series("tiny", &[(1e-9, 1e-12), (2e-9, 3e-12)])],
            vec![series("huge", &[(1e9, 1e12), (2e9, 3e12)])],
        ];
        for s in &cases {
            for log_x in [false, true] {
                for reference in [None, Some((1.0, "ref")), Some((nan, "nan ref"))] {
                    let svg = line_chart_with_ref("t", "x", "y", s, log_x, reference);
                    assert_well_formed(&svg);
                }
            }
        }
        let nothing = line_chart("t", "x", "y", &[series("bad", &[(nan, nan)])], false);
        assert!(nothing.contains("no data"));
        for v in [
            vec![],
            vec![nan, inf],
            vec![3.0],
            vec![2.0, 2.0],
            vec![0.0],
            vec![-1.0, 5.0],
        ] {
            assert_well_formed(&cdf_chart("t", "x", &[("run".into(), v)]));
        }
        assert_well_formed(&cdf_chart("t", "x", &[]));
        assert!(cdf_chart("t", "x", &[]).contains("no data"));
        assert_well_formed(&stacked_bars("t", "y", &[]));
        assert_well_formed(&stacked_bars("t", "y", &[("a".into(), vec![])]));
        assert_well_formed(&stacked_bars(
            "t",
            "y",
            &[(
                "a".into(),
                vec![("p".into(), nan), ("q".into(), -1.0), ("p".into(), inf)],
            )],
        ));
        assert_eq!(compress(&[]), Vec::<(f64, f64)>::new());
    }

    #[test]
    fn cdf_has_one_step_line_per_run() {
        let on: Vec<f64> = (1..=64).map(|i| 10.0 + f64::from(i) * 0.1).collect();
        let off: Vec<f64> = (1..=64).map(|i| f64::from(i) * 2.0).collect();
        let svg = cdf_chart(
            "Completion",
            "seconds",
            &[
                ("mesh on".into(), on),
                ("mesh off".into(), off),
                ("none".into(), vec![]),
            ],
        );
        assert_well_formed(&svg);
        assert_eq!(svg.matches("<polyline").count(), 2);
        assert!(svg.contains(">mesh on</text>") && svg.contains(">mesh off</text>"));
        assert!(svg.contains(">fraction done</text>"));
        // Step lines: all start at the 0 level and end at the 1 level, above it.
        let ends: Vec<(f64, f64)> = svg
            .split("points=\"")
            .skip(1)
            .map(|rest| {
                let pts = &rest[..rest.find('"').unwrap()];
                let y = |p: &str| p.split(',').nth(1).unwrap().parse::<f64>().unwrap();
                let mut it = pts.split(' ');
                let first = y(it.next().unwrap());
                (first, it.next_back().map_or(first, y))
            })
            .collect();
        // The y of a y-tick label's baseline, minus the 4 it sits below its tick.
        let tick_y = |label: &str| {
            let end = svg
                .find(&format!(r#" text-anchor="end">{label}</text>"#))
                .unwrap();
            let y = &svg[..end];
            let y = &y[y.rfind("y=\"").unwrap() + 3..y.len() - 1];
            y.parse::<f64>().unwrap() - 4.0
        };
        assert_eq!(ends.len(), 2);
        assert!(ends[0] == ends[1], "{ends:?}");
        assert!((ends[0].0 - tick_y("0.0")).abs() < 0.2, "{ends:?}");
        assert!((ends[0].1 - tick_y("1.0")).abs() < 0.2, "{ends:?}");
    }

    #[test]
    fn stacked_bars_stay_readable_and_bounded() {
        let bars = |n: usize| -> Vec<(String, Vec<(String, f64)>)> {
            (0..n)
                .map(|i| {
                    (
                        format!("agent-{i:04}"),
                        vec![
                            ("peers".into(), (i % 7) as f64),
                            ("coordinator".into(), 1.0),
                        ],
                    )
                })
                .collect()
        };
        let few = stacked_bars("Bytes", "MiB", &bars(4));
        assert_well_formed(&few);
        assert!(few.contains(">agent-0003</text>"), "all labels shown");
        assert!(!few.contains("rotate(-45"));

        let n64 = stacked_bars("Bytes", "MiB", &bars(64));
        assert_well_formed(&n64);
        assert!(n64.contains("rotate(-45"));
        let labels = n64.matches("rotate(-45").count();
        assert!((8..=32).contains(&labels), "{labels} labels");
        assert!(n64.contains(">peers</text>") && n64.contains(">coordinator</text>"));

        let big = stacked_bars("Bytes", "MiB", &bars(10_000));
        assert_well_formed(&big);
        assert!(big.contains("10000 bars shown as 200 groups of 50"));
        assert!(big.matches("<rect").count() <= 2 * MAX_BARS + 10);
        assert!(big.len() < 200_000, "{} bytes", big.len());
    }

    #[test]
    fn nice_ticks_cover_the_range() {
        for (lo, hi) in [
            (0.0, 1.0),
            (0.0, 7.0),
            (0.6, 3.3),
            (1.0, 10_000.0),
            (-3.5, 12.1),
            (123.4, 123.9),
            (0.001, 0.0042),
            (5.0, 5.0),
            (0.0, 0.0),
            (-2.0, -2.0),
            (1e9, 3.7e12),
        ] {
            let t = nice_ticks(lo, hi, 5);
            assert!((3..=12).contains(&t.len()), "{lo}..{hi}: {t:?}");
            assert!(t[0] <= lo && *t.last().unwrap() >= hi, "{lo}..{hi}: {t:?}");
            let step = t[1] - t[0];
            let norm = step / 10f64.powf(step.log10().floor());
            assert!(
                [1.0, 2.0, 5.0, 10.0]
                    .iter()
                    .any(|m| (norm - m).abs() < 1e-6),
                "{lo}..{hi}: step {step}"
            );
        }
        assert_eq!(
            nice_ticks(0.0, 1.0, 5),
            vec![0.0, 0.2, 0.4, 0.6000000000000001, 0.8, 1.0]
        );
        let a = Axis::linear(0.0, 1.0);
        assert_eq!(a.labels, ["0.0", "0.2", "0.4", "0.6", "0.8", "1.0"]);
        assert_eq!(
            Axis::linear(0.0, 10_000.0).labels,
            ["0", "2000", "4000", "6000", "8000", "10000"]
        );
        assert_eq!(nice_count(3), 5);
        assert_eq!(nice_count(1), 1);
        assert_eq!(nice_count(11), 20);
    }

    #[test]
    fn log_ticks_are_decades_with_the_ends() {
        let t = log_ticks(8.0, 10_000.0);
        let want = [8.0, 10.0, 100.0, 1000.0, 10_000.0];
        assert_eq!(t.len(), want.len(), "{t:?}");
        for (a, b) in t.iter().zip(want) {
            assert!((a - b).abs() < 1e-9 * b, "{t:?}");
        }
        let a = Axis::log(8.0, 10_000.0, PAD);
        assert_eq!(a.labels, ["8", "10", "100", "1000", "10000"]);
        // Under two decades: 1-2-5 ticks.
        assert_eq!(
            Axis::log(3.0, 40.0, PAD).labels,
            ["3", "5", "10", "20", "40"]
        );
        // An end right next to a decade is dropped.
        assert_eq!(
            Axis::log(9.9, 10_000.0, PAD).labels,
            ["10", "100", "1000", "10000"]
        );
        // Many decades are thinned.
        assert!(Axis::log(1e-3, 1e15, PAD).ticks.len() <= 11);
        // A single value.
        assert!(Axis::log(8.0, 8.0, PAD).ticks.len() >= 2);
    }

    fn sample_report(n: usize) -> FleetReport {
        let per_agent = (0..n)
            .map(|i| AgentOutcome {
                agent_id: format!("agent-{i:04}"),
                t_s: (i % 17 != 5).then(|| 4.0 + (i as f64 * 0.37) % 3.0),
                peer_bytes: (((i * 7919) % 64) as u64) << 20,
                server_bytes: ((64 - (i * 7919) % 64) as u64) << 20,
                verified: true,
                ..Default::default()
            })
            .collect();
        let mut r = FleetReport {
            engine: "model".into(),
            scenario: "uniform".into(),
            p2p: true,
            agents: n,
            size_bytes: 64 << 20,
            per_agent,
            ..Default::default()
        };
        r.summarise(3.5);
        r
    }

    #[test]
    fn report_charts_and_write_all() {
        let charts = report_charts(&sample_report(64));
        let names: Vec<&str> = charts.iter().map(|c| c.0.as_str()).collect();
        assert_eq!(names, ["completion-cdf.svg", "bytes-by-source.svg"]);
        for (_, svg) in &charts {
            assert_well_formed(svg);
        }
        assert!(charts[0].1.contains("bound 3.50 s"));
        assert!(charts[0].1.contains("mesh on: 60/64 done"));
        assert!(
            charts[1].1.contains(">peers</text>") && charts[1].1.contains(">coordinator</text>")
        );
        for (_, svg) in report_charts(&FleetReport::default()) {
            assert_well_formed(&svg);
        }
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("a/b");
        write_all(&out, &charts).unwrap();
        let back = std::fs::read_to_string(out.join("completion-cdf.svg")).unwrap();
        assert_eq!(back, charts[0].1);
    }

    /// Renders sample charts to /tmp/chart-demo for eyeballing:
    /// `cargo test -p arcade-simulations --lib chart::tests::demo -- --ignored`.
    #[test]
    #[ignore]
    fn demo() {
        let dir = Path::new("/tmp/chart-demo");
        let mut charts = report_charts(&sample_report(64));
        charts[0].0 = "report64-completion-cdf.svg".into();
        charts[1].0 = "report64-bytes-by-source.svg".into();
        for (name, svg) in report_charts(&sample_report(10_000)) {
            charts.push((format!("report10000-{name}"), svg));
        }
        let sizes: [f64; 5] = [8.0, 64.0, 256.0, 1000.0, 10_000.0];
        let s = [
            Series {
                label: "real stack".into(),
                points: sizes
                    .iter()
                    .take(3)
                    .map(|&n| (n, 1.1 + n.log10() * 0.08))
                    .collect(),
            },
            Series {
                label: "model".into(),
                points: sizes
                    .iter()
                    .map(|&n| (n, 1.05 + n.log10() * 0.05))
                    .collect(),
            },
        ];
        charts.push((
            "sweep-ratio.svg".into(),
            line_chart_with_ref(
                "t_all ÷ bound by fleet size",
                "agents",
                "t_all ÷ bound",
                &s,
                true,
                Some((1.0, "bound = 1.0")),
            ),
        ));
        let egress = [Series {
            label: "coordinator egress ÷ S".into(),
            points: sizes.iter().map(|&n| (n, 1.0 + 8.0 / n.sqrt())).collect(),
        }];
        charts.push((
            "sweep-egress.svg".into(),
            line_chart(
                "Coordinator egress (linear x)",
                "agents",
                "egress ÷ S",
                &egress,
                false,
            ),
        ));
        let on: Vec<f64> = (0..64).map(|i| 3.6 + f64::from(i % 13) * 0.05).collect();
        let off: Vec<f64> = (0..64).map(|i| 2.0 + f64::from(i) * 1.0).collect();
        charts.push((
            "cdf-compare.svg".into(),
            cdf_chart(
                "Completion time, mesh on vs off",
                "seconds since job creation",
                &[("mesh on".into(), on), ("mesh off".into(), off)],
            ),
        ));
        charts.push((
            "empty.svg".into(),
            line_chart("Nothing <here> & there", "x", "y", &[], false),
        ));
        write_all(dir, &charts).unwrap();
    }
}
