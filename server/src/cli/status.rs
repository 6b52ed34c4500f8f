//! `sluice status` for people: one row per running version, like `kubectl get` — application,
//! deployment, status, version, replicas ready/desired, traffic weight, requests per second,
//! p50/p99 latency, queue depth and the deployment's last event (`-o wide`: and where each
//! replica runs) — then a line for each application that is not running and for each config
//! field it ignores.

use sluice_controller::{ApplicationState, Status, VersionStatus};

/// How `sluice status` prints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    /// A table to read at a glance.
    Table,
    /// The table, and where each replica runs (`node_ip/pid`; replicas waiting for a node).
    Wide,
    /// The admin API's JSON, pretty-printed.
    Json,
    Yaml,
}

/// `status` in the chosen form; `now_s` (seconds since the Unix epoch) dates the events.
pub fn render(status: &Status, output: Output, now_s: f64) -> Result<String, String> {
    match output {
        Output::Table => Ok(table(status, now_s, false)),
        Output::Wide => Ok(table(status, now_s, true)),
        Output::Json => serde_json::to_string_pretty(status).map_err(|e| e.to_string()),
        Output::Yaml => serde_saphyr::to_string(status).map_err(|e| e.to_string()),
    }
}

const HEADER: [&str; 12] = [
    "APPLICATION",
    "DEPLOYMENT",
    "STATUS",
    "VERSION",
    "READY",
    "WEIGHT",
    "REQ/S",
    "P50",
    "P99",
    "QUEUE",
    "LAST EVENT",
    "REPLICAS ON",
];

/// Columns of a row (the last only with `-o wide`).
type Row = [String; 12];

/// The longest event message shown in a cell.
const EVENT_CHARS: usize = 60;

fn table(status: &Status, now_s: f64, wide: bool) -> String {
    let mut rows: Vec<Row> = vec![HEADER.map(String::from)];
    let mut notes = Vec::new();
    for (app_name, app) in &status.applications {
        if app.status != ApplicationState::Running || !app.message.is_empty() {
            let state = serde_json::to_value(app.status).ok().and_then(|v| v.as_str().map(String::from));
            let state = state.unwrap_or_default();
            let message = if app.message.is_empty() { String::new() } else { format!(": {}", app.message) };
            notes.push(format!("{app_name}: {state}{message}"));
        }
        notes.extend(app.ignored.iter().map(|i| format!("{app_name} ignores {i}")));
        if app.deployments.is_empty() {
            let state = serde_json::to_value(app.status).ok().and_then(|v| v.as_str().map(String::from));
            let mut row: Row = Default::default();
            row[0] = app_name.clone();
            row[1] = "-".into();
            row[2] = state.unwrap_or_default();
            rows.push(row);
        }
        for (name, d) in &app.deployments {
            let last = status.events.iter().rev().find(|e| &e.deployment == name);
            let state = serde_json::to_value(d.status).ok().and_then(|v| v.as_str().map(String::from));
            for (i, v) in d.versions.iter().enumerate() {
                if let Some(sh) = &v.shadow {
                    notes.push(shadow_note(name, v, sh));
                }
                let mut row = version_row(v);
                if i == 0 {
                    row[0] = app_name.clone();
                    row[1] = name.clone();
                    row[2] = state.clone().unwrap_or_default();
                    row[10] = last.map(|e| event(now_s - e.time, &e.message)).unwrap_or_else(|| "-".into());
                }
                rows.push(row);
            }
        }
    }
    let mut out = String::new();
    let columns = if wide { 12 } else { 11 };
    let widths: Vec<usize> =
        (0..columns).map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0)).collect();
    for row in &rows {
        let cells: Vec<String> = row.iter().zip(&widths).map(|(cell, w)| format!("{cell:<w$}")).collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    for n in notes {
        out.push('\n');
        out.push_str(&n);
    }
    if status.applications.is_empty() {
        out.push_str("\nno applications");
    }
    printable(out.trim_end())
}

/// `text` with its control characters but newlines and tabs written as escapes: error and
/// event messages can quote a model file's bytes, and an escape sequence among them would
/// reach the operator's terminal.
fn printable(text: &str) -> String {
    text.chars()
        .map(|c| match c {
            '\n' | '\t' => c.to_string(),
            c if c.is_control() => c.escape_unicode().to_string(),
            c => c.to_string(),
        })
        .collect()
}

fn version_row(v: &VersionStatus) -> Row {
    let traffic = v.traffic.as_ref();
    let mut row: Row = Default::default();
    row[3] = match (v.canary, &v.shadow) {
        (true, _) => format!("{} (canary)", v.version),
        (false, Some(_)) => format!("{} (shadow)", v.version),
        (false, None) => v.version.clone(),
    };
    row[4] = format!("{}/{}", v.ready_replicas, v.replicas);
    row[5] = format!("{}%", v.weight);
    row[6] = traffic.map_or_else(|| "-".into(), |t| format!("{:.1}", t.requests_per_s));
    row[7] = ms(traffic.and_then(|t| t.p50_ms));
    row[8] = ms(traffic.and_then(|t| t.p99_ms));
    row[9] = v.queued.to_string();
    let mut on: Vec<String> = v
        .replica_details
        .iter()
        .map(|r| match (&r.node_ip, r.pid) {
            (Some(ip), Some(pid)) => format!("{ip}/{pid}"),
            (Some(ip), None) => ip.clone(),
            _ => "?".into(),
        })
        .collect();
    if !v.waiting.is_empty() {
        on.push(format!("{} waiting", v.waiting.len()));
    }
    row[11] = on.join(",");
    row
}

/// How a shadow version (or a canary gated on agreeing with the primary) compares, below the
/// table: its row's traffic is only what it serves itself.
fn shadow_note(deployment: &str, v: &VersionStatus, sh: &sluice_controller::ShadowStatus) -> String {
    let agreement = sh.agreement.map_or_else(|| "-".into(), |a| format!("{:.2}%", a * 100.0));
    let diff = match (sh.compared, sh.max_abs_diff) {
        (0, _) => "-".into(),
        (_, Some(d)) => format!("{d:.3e}"),
        (_, None) => "inf".into(),
    };
    format!(
        "{deployment} {} shadows {}% of the primary's requests: sent {}, dropped {}, errors {}, compared {}, \
         agreement {agreement} of {} rows, max |diff| {diff}, p50 {}, p99 {}",
        v.version,
        sh.percent,
        sh.sent,
        sh.dropped,
        sh.errors,
        sh.compared,
        sh.rows,
        ms(sh.p50_ms),
        ms(sh.p99_ms)
    )
}

/// A latency with two or three significant digits.
fn ms(value: Option<f64>) -> String {
    match value {
        None => "-".into(),
        Some(ms) if ms >= 1000.0 => format!("{:.2}s", ms / 1000.0),
        Some(ms) if ms >= 100.0 => format!("{ms:.0}ms"),
        Some(ms) if ms >= 10.0 => format!("{ms:.1}ms"),
        Some(ms) => format!("{ms:.2}ms"),
    }
}

/// `12s ago: message` (cut to [`EVENT_CHARS`]).
fn event(age_s: f64, message: &str) -> String {
    let age = age_s.max(0.0) as u64;
    let ago = match age {
        0..60 => format!("{age}s"),
        60..3600 => format!("{}m", age / 60),
        3600..86400 => format!("{}h", age / 3600),
        _ => format!("{}d", age / 86400),
    };
    let mut text: String = message.chars().take(EVENT_CHARS).collect();
    if message.chars().count() > EVENT_CHARS {
        text.push('…');
    }
    format!("{ago} ago: {text}")
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn status() -> Status {
        serde_json::from_value(json!({
            "applications": {
                "clf": {
                    "status": "RUNNING", "message": "", "route_prefix": null, "last_deployed_time_s": 100.0,
                    "ignored": ["runtime_env: Sluice runs no Python"],
                    "deployments": {"iris": {
                        "status": "HEALTHY", "message": "", "autoscaling": null,
                        "max_ongoing_requests": 5, "max_queued_requests": 64, "num_cpus": 1.0,
                        "versions": [
                            {"version": "1", "model": "/m/iris.onnx", "weight": 90, "replicas": 2, "ready_replicas": 2,
                             "queued": 3, "in_flight": 7,
                             "traffic": {"requests_per_s": 12.345, "p50_ms": 1.23456, "p99_ms": 150.2, "window_s": 30.0}},
                            {"version": "2", "model": "/m/iris2.onnx", "weight": 10, "replicas": 1, "ready_replicas": 0,
                             "queued": 0, "in_flight": 0, "canary": true, "rollout": false, "traffic": null}
                        ]}}
                },
                "new": {"status": "DEPLOY_FAILED", "message": "model `x` cannot load", "deployments": {}}
            },
            "events": [
                {"time": 90.0, "deployment": "iris", "message": "started version 1 with 2 replica(s)"},
                {"time": 160.0, "deployment": "iris", "message": "canary version 2 started at 10% and this message is long enough to be cut"}
            ]
        }))
        .unwrap()
    }

    #[test]
    fn the_table_has_a_row_per_version_and_notes_below() {
        let out = render(&status(), Output::Table, 205.0).unwrap();
        let lines: Vec<&str> = out.lines().collect();
        let cells = |l: &str| {
            l.split("  ").map(str::trim).filter(|c| !c.is_empty()).map(String::from).collect::<Vec<_>>()
        };
        assert_eq!(cells(lines[0]), HEADER[..11].to_vec());
        assert_eq!(
            cells(lines[1]),
            [
                "clf",
                "iris",
                "HEALTHY",
                "1",
                "2/2",
                "90%",
                "12.3",
                "1.23ms",
                "150ms",
                "3",
                "45s ago: canary version 2 started at 10% and this message is long eno…"
            ]
        );
        assert_eq!(cells(lines[2]), ["2 (canary)", "0/1", "10%", "-", "-", "-", "0"]);
        assert_eq!(cells(lines[3]), ["new", "-", "DEPLOY_FAILED"]);
        assert!(out.contains("\nnew: DEPLOY_FAILED: model `x` cannot load"), "{out}");
        assert!(out.contains("\nclf ignores runtime_env: Sluice runs no Python"), "{out}");
        // Columns line up: every row's version cell starts where the header's does.
        let col = lines[0].find("VERSION").unwrap();
        assert_eq!(&lines[1][col..col + 3], "1  ");
        assert_eq!(&lines[2][col..col + 10], "2 (canary)");
    }

    /// A message with control characters (a model file's bytes quoted in a load error) is
    /// shown with them escaped: an escape sequence reached the terminal.
    #[test]
    fn control_characters_in_messages_are_escaped() {
        let mut s = status();
        s.applications.get_mut("new").unwrap().message = "bad \u{1b}[2J\r model".into();
        let out = render(&s, Output::Table, 205.0).unwrap();
        assert!(!out.contains('\u{1b}') && !out.contains('\r'), "{out:?}");
        assert!(out.contains("bad \\u{1b}[2J\\u{d} model"), "{out}");
    }

    /// A shadow version's row says so (it read as an idle version at 0 %), and what its copies
    /// found is a note below the table (it was only in `-o json`).
    #[test]
    fn a_shadow_version_is_marked_and_its_comparison_noted() {
        let mut s = status();
        let versions =
            &mut s.applications.get_mut("clf").unwrap().deployments.get_mut("iris").unwrap().versions;
        let mut shadow = versions[1].clone();
        shadow.version = "3".into();
        shadow.canary = false;
        shadow.weight = 0;
        shadow.shadow = Some(
            serde_json::from_value(json!({
                "percent": 25, "sent": 40, "dropped": 2, "errors": 1, "compared": 37, "rows": 37,
                "agreement": 0.973, "max_abs_diff": 0.0125, "p50_ms": 1.5, "p99_ms": 4.0
            }))
            .unwrap(),
        );
        versions.push(shadow);
        let out = render(&s, Output::Table, 205.0).unwrap();
        let lines: Vec<&str> = out.lines().collect();
        let col = lines[0].find("VERSION").unwrap();
        assert_eq!(&lines[3][col..col + 10], "3 (shadow)", "{out}");
        assert!(
            out.contains(
                "\niris 3 shadows 25% of the primary's requests: sent 40, dropped 2, errors 1, compared 37, \
                 agreement 97.30% of 37 rows, max |diff| 1.250e-2, p50 1.50ms, p99 4.00ms"
            ),
            "{out}"
        );
    }

    #[test]
    fn wide_says_where_each_replica_runs() {
        let mut s = status();
        let v = &mut s.applications.get_mut("clf").unwrap().deployments.get_mut("iris").unwrap().versions[1];
        v.replica_details = serde_json::from_value(json!([
            {"id": 0, "state": "RUNNING", "started_at_s": 1.0, "node_ip": "10.0.0.2", "pid": 42}
        ]))
        .unwrap();
        v.waiting = vec!["infeasible: 64 CPU".into()];
        let out = render(&s, Output::Wide, 205.0).unwrap();
        let lines: Vec<&str> = out.lines().collect();
        assert!(lines[0].ends_with("  REPLICAS ON"), "{out}");
        assert!(lines[2].ends_with("10.0.0.2/42,1 waiting"), "{out}");
        assert!(!render(&s, Output::Table, 205.0).unwrap().contains("REPLICAS ON"));
    }

    #[test]
    fn machine_forms_carry_the_whole_status() {
        let json: serde_json::Value =
            serde_json::from_str(&render(&status(), Output::Json, 0.0).unwrap()).unwrap();
        assert_eq!(json["applications"]["clf"]["deployments"]["iris"]["versions"][0]["queued"], 3);
        let yaml = render(&status(), Output::Yaml, 0.0).unwrap();
        assert!(yaml.contains("DEPLOY_FAILED") && yaml.contains("requests_per_s: 12.345"), "{yaml}");
    }
}
