//! Results as a JSON file, a Markdown table and an SVG plot of latency percentiles against
//! throughput across steps.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result};
use plotters::prelude::*;
use serde::Serialize;

use crate::stats::StepResult;

/// Everything one run measured, with what it ran against.
#[derive(Debug, Serialize)]
pub struct Report {
    pub target: String,
    pub model: String,
    pub protocol: String,
    pub steps: Vec<StepResult>,
}

/// A Markdown table, one row per step.
pub fn markdown(steps: &[StepResult]) -> String {
    let mut s = String::from(
        "| protocol | step | ok | errors | req/s | infer/s | p50 µs | p90 µs | p95 µs | p99 µs | p99.9 µs | max µs |\n\
         |---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for r in steps {
        let errors = if r.errors.is_empty() {
            "0".to_string()
        } else {
            r.errors.iter().map(|(k, v)| format!("{v} {k}")).collect::<Vec<_>>().join(", ")
        };
        // A step with no answer has no latencies: "—", not percentiles of 0 that read as fast.
        let l = &r.latency_us;
        let latencies = if r.ok == 0 {
            vec!["—".to_string(); 6]
        } else {
            [l.p50, l.p90, l.p95, l.p99, l.p999, l.max].iter().map(|v| format!("{v:.0}")).collect()
        };
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {:.0} | {:.0} | {} |",
            r.protocol,
            r.label,
            r.ok,
            errors,
            r.throughput,
            r.inferences_per_second,
            latencies.join(" | ")
        );
    }
    // Over 1 % of a step's sends late: its latencies carry the tester's own delay.
    for r in steps.iter().filter(|r| r.late_sends * 100 > r.ok + r.error_count()) {
        let _ = writeln!(
            s,
            "\n{}: {} of {} sends left more than 1 ms after their scheduled time: the load tester fell \
             behind, and these latencies include its delay (give it --threads, or a lower rate)",
            r.label,
            r.late_sends,
            r.ok + r.error_count()
        );
    }
    s
}

/// Writes `report.json`, `report.md` and `latency.svg` into `dir`.
pub fn write_all(report: &Report, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    std::fs::write(dir.join("report.json"), serde_json::to_vec_pretty(report)?)?;
    let md = format!(
        "# Load test: `{}` at {} over {}\n\n{}",
        report.model,
        report.target,
        report.protocol,
        markdown(&report.steps)
    );
    std::fs::write(dir.join("report.md"), md)?;
    plot(&report.steps, &dir.join("latency.svg"), &format!("{} ({})", report.model, report.protocol))?;
    Ok(())
}

/// Latency percentiles (p50, p90, p99; ms) against throughput (req/s), one point per step.
pub fn plot(steps: &[StepResult], path: &Path, title: &str) -> Result<()> {
    let root = SVGBackend::new(path, (800, 500)).into_drawing_area();
    root.fill(&WHITE)?;
    let max_x = steps.iter().map(|s| s.throughput).fold(1.0, f64::max) * 1.1;
    let max_y = steps.iter().map(|s| s.latency_us.p99 / 1000.0).fold(0.1, f64::max) * 1.1;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..max_x, 0.0..max_y)?;
    chart.configure_mesh().x_desc("throughput (req/s)").y_desc("latency (ms)").draw()?;
    type Series = (&'static str, fn(&StepResult) -> f64, RGBColor);
    let series: [Series; 3] = [
        ("p50", |s| s.latency_us.p50, BLUE),
        ("p90", |s| s.latency_us.p90, GREEN),
        ("p99", |s| s.latency_us.p99, RED),
    ];
    for (name, f, color) in series {
        // Steps with no answer have no latencies to plot.
        let points: Vec<(f64, f64)> =
            steps.iter().filter(|s| s.ok > 0).map(|s| (s.throughput, f(s) / 1000.0)).collect();
        chart
            .draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))?
            .label(name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
        chart.draw_series(points.into_iter().map(|p| Circle::new(p, 3, color.filled())))?;
    }
    chart.configure_series_labels().border_style(BLACK).background_style(WHITE).draw()?;
    root.present()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::markdown;
    use crate::stats::{Percentiles, StepResult};

    fn step(ok: u64, p50: f64) -> StepResult {
        StepResult {
            label: "concurrency 1".into(),
            concurrency: Some(1),
            rate: None,
            protocol: "grpc".into(),
            ok,
            errors: BTreeMap::from([("grpc Unavailable".to_string(), 3)]),
            seconds: 1.0,
            throughput: ok as f64,
            inferences_per_second: ok as f64,
            drain_seconds: 0.0,
            latency_us: Percentiles { p50, ..Percentiles::default() },
            started_unix_s: 0.0,
            late_sends: 0,
            requests: Vec::new(),
        }
    }

    /// A step that sent more than 1 % of its requests late says so under the table; one at
    /// 1 % or under does not.
    #[test]
    fn a_step_whose_sends_left_late_says_so() {
        let mut late = step(97, 100.0);
        late.late_sends = 1;
        assert!(!markdown(std::slice::from_ref(&late)).contains("fell behind"), "1 of 100");
        late.late_sends = 5;
        let table = markdown(&[late]);
        assert!(table.contains("concurrency 1: 5 of 100 sends left more than 1 ms"), "{table}");
    }

    #[test]
    fn a_step_with_no_answer_shows_no_latencies() {
        let table = markdown(&[step(0, 0.0), step(5, 120.0)]);
        let rows: Vec<&str> = table.lines().skip(2).collect();
        assert!(rows[0].ends_with("| 0 | 0 | — | — | — | — | — | — |"), "{}", rows[0]);
        assert!(rows[1].contains("| 5 | 5 | 120 |"), "{}", rows[1]);
    }
}
