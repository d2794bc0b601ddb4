//! The shipped Prometheus rules and Grafana dashboard: `promtool` accepts the rules and their
//! unit tests pass, and every query in the dashboard and the rules uses only metrics that
//! `docs/metrics.md` documents. No root needed; the promtool tests need `promtool`.
use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    process::Command,
};

use serde_json::Value;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn read(rel: &str) -> String {
    let path = repo().join(rel);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// `promtool`, or None (after saying "skipped") when it is not installed. Runs that require
/// every test (`TRACER_REQUIRE_ROOT_TESTS`, as in CI) fail instead.
fn promtool() -> Option<Command> {
    let found = Command::new("promtool").arg("--version").output().is_ok();
    if found {
        let mut cmd = Command::new("promtool");
        cmd.current_dir(repo().join("deploy/prometheus"));
        return Some(cmd);
    }
    if std::env::var_os("TRACER_REQUIRE_ROOT_TESTS").is_some() {
        panic!("promtool is not installed (apt-get install prometheus)");
    }
    eprintln!("skipped: promtool is not installed (apt-get install prometheus)");
    None
}

fn assert_success(cmd: &mut Command) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("spawning {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn promtool_check_rules_accepts_the_alerts() {
    let Some(mut cmd) = promtool() else { return };
    assert_success(cmd.args(["check", "rules", "alerts.yml"]));
}

#[test]
fn promtool_unit_tests_of_the_alerts_pass() {
    let Some(mut cmd) = promtool() else { return };
    assert_success(cmd.args(["test", "rules", "alerts_test.yml"]));
}

/// Operators and aggregations: never metric names (`sum by (x) (...)` puts `by` before the
/// parenthesis).
const PROMQL_KEYWORDS: [&str; 26] = [
    "sum",
    "min",
    "max",
    "avg",
    "group",
    "stddev",
    "stdvar",
    "count",
    "count_values",
    "bottomk",
    "topk",
    "quantile",
    "and",
    "or",
    "unless",
    "offset",
    "bool",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "inf",
    "nan",
    "atan2",
];

/// Metric names a PromQL expression selects. Strings, label matchers, range and subquery
/// brackets and grouping label lists are skipped; an identifier followed by `(` is a function
/// or aggregation. Grafana variables (`$x`, `${x}`) are skipped too.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let chars: Vec<char> = expr.chars().collect();
    let mut names = BTreeSet::new();
    let mut i = 0;
    // Skips a balanced group opened at chars[i], honouring strings inside it.
    let skip_group = |mut i: usize, open: char, close: char| -> usize {
        let mut depth = 0;
        let mut quote: Option<char> = None;
        while i < chars.len() {
            let c = chars[i];
            match quote {
                Some(_) if c == '\\' => i += 1,
                Some(q) if c == q => quote = None,
                Some(_) => {}
                None if c == '"' || c == '\'' || c == '`' => quote = Some(c),
                None if c == open => depth += 1,
                None if c == close => {
                    depth -= 1;
                    if depth == 0 {
                        return i + 1;
                    }
                }
                None => {}
            }
            i += 1;
        }
        i
    };
    let is_start = |c: char| c.is_ascii_alphabetic() || c == '_' || c == ':';
    let is_part = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
    let next_non_space = |mut j: usize| {
        while j < chars.len() && chars[j].is_whitespace() {
            j += 1;
        }
        j
    };
    while i < chars.len() {
        let c = chars[i];
        if c == '"' || c == '\'' || c == '`' {
            i += 1;
            while i < chars.len() && chars[i] != c {
                i += if chars[i] == '\\' { 2 } else { 1 };
            }
            i += 1;
        } else if c == '{' {
            i = skip_group(i, '{', '}');
        } else if c == '[' {
            i = skip_group(i, '[', ']');
        } else if c == '$' {
            i += 1;
            if chars.get(i) == Some(&'{') {
                i = skip_group(i, '{', '}');
            }
            while i < chars.len() && is_part(chars[i]) {
                i += 1;
            }
        } else if c.is_ascii_digit() || c == '.' {
            // Numbers and durations (`30m`, `1e3`, `0x1f`).
            while i < chars.len() && (is_part(chars[i]) || chars[i] == '.') {
                i += 1;
            }
        } else if is_start(c) {
            let start = i;
            while i < chars.len() && is_part(chars[i]) {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            let j = next_non_space(i);
            let lower = word.to_ascii_lowercase();
            if matches!(
                lower.as_str(),
                "by" | "without" | "on" | "ignoring" | "group_left" | "group_right"
            ) {
                // Label lists, not metrics.
                if chars.get(j) == Some(&'(') {
                    i = skip_group(j, '(', ')');
                }
            } else if chars.get(j) == Some(&'(') || PROMQL_KEYWORDS.contains(&lower.as_str()) {
                // Function, aggregation or operator keyword.
            } else {
                names.insert(word);
            }
        } else {
            i += 1;
        }
    }
    names
}

#[test]
fn metric_name_extraction() {
    let names = |e: &str| metric_names(e).into_iter().collect::<Vec<_>>();
    assert_eq!(
        names(
            r#"histogram_quantile(0.99, sum by (le, comm) (rate(a_bucket{comm=~"x|y", b="}"}[$__rate_interval])))"#
        ),
        ["a_bucket"]
    );
    assert_eq!(
        names(
            "(sum by (instance) (m1) - min_over_time(sum by (instance) (m1)[30m:1m])) > 20 \
             and on (instance) sum without (state) (deriv(m2[10m] offset 5m)) > 0 or absent(up{job=\"j\"})"
        ),
        ["m1", "m2", "up"]
    );
    assert_eq!(
        names("sum(x{a=\"$v\"}) / ignoring(le) group_left(foo) y * 1e3 + ${var} + $var"),
        ["x", "y"]
    );
    assert_eq!(
        names("max without (state) (m4) + count by (le) (m5)"),
        ["m4", "m5"]
    );
    assert_eq!(names("label_values(m3{i=~\"$i\"}, comm)"), ["comm", "m3"]);
}

/// Every metric name `docs/metrics.md` documents (each is written as `name` in code format).
fn documented(metrics_md: &str, name: &str) -> bool {
    metrics_md.contains(&format!("`{name}`"))
}

/// Prometheus's own series that rules may use besides the documented ones.
const PROMETHEUS_BUILTINS: [&str; 1] = ["up"];

fn dashboard() -> Value {
    serde_json::from_str(&read("deploy/grafana/pgconn-dashboard.json"))
        .expect("deploy/grafana/pgconn-dashboard.json is valid JSON")
}

/// All panels, with those nested in rows.
fn panels(dash: &Value) -> Vec<&Value> {
    fn walk<'a>(list: &'a Value, out: &mut Vec<&'a Value>) {
        for p in list.as_array().into_iter().flatten() {
            out.push(p);
            walk(&p["panels"], out);
        }
    }
    let mut out = Vec::new();
    walk(&dash["panels"], &mut out);
    out
}

#[test]
fn dashboard_queries_use_only_documented_metrics() {
    let metrics_md = read("docs/metrics.md");
    let dash = dashboard();
    let mut queries: Vec<(String, String)> = Vec::new();
    for panel in panels(&dash) {
        let title = panel["title"].as_str().unwrap_or("?").to_owned();
        if panel["type"] == "row" {
            continue;
        }
        let targets = panel["targets"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or(&[]);
        assert!(!targets.is_empty(), "panel {title:?} has no query");
        for t in targets {
            let expr = t["expr"]
                .as_str()
                .unwrap_or_else(|| panic!("panel {title:?}: target without expr: {t}"));
            queries.push((format!("panel {title:?}"), expr.to_owned()));
        }
    }
    for var in dash["templating"]["list"].as_array().expect("templating") {
        if var["type"] == "query" {
            let q = var["query"]["query"]
                .as_str()
                .or_else(|| var["query"].as_str())
                .expect("variable query");
            let inner = q
                .strip_prefix("label_values(")
                .and_then(|s| s.strip_suffix(')'))
                .unwrap_or_else(|| panic!("variable {}: unexpected query {q}", var["name"]));
            // label_values(SELECTOR, LABEL): the metric is in the selector.
            let selector = inner.rsplit_once(',').map_or(inner, |(s, _)| s);
            queries.push((format!("variable {}", var["name"]), selector.to_owned()));
        }
    }
    assert!(queries.len() >= 15, "only {} queries found", queries.len());
    let mut seen = BTreeSet::new();
    for (place, expr) in &queries {
        let names = metric_names(expr);
        assert!(!names.is_empty(), "{place}: no metric in {expr}");
        for name in names {
            assert!(
                documented(&metrics_md, &name),
                "{place}: metric {name} is not documented in docs/metrics.md ({expr})"
            );
            seen.insert(name);
        }
    }
    // The dashboard shows every kind of data the brief asks for.
    for must in [
        "pgconn_open_connections",
        "pgconn_leak_suspected_connections",
        "pgconn_stalled_connections",
        "pgconn_oldest_connection_age_seconds",
        "pgconn_max_idle_seconds",
        "pgconn_connections_opened_total",
        "pgconn_connections_closed_total",
        "pgconn_connection_duration_seconds_bucket",
        "pgconn_bytes_sent_total",
        "pgconn_bytes_received_total",
        "pgconn_tracer_events_lost_total",
        "pgconn_tracer_tracked_connections",
    ] {
        assert!(seen.contains(must), "the dashboard never shows {must}");
    }
}

#[test]
fn dashboard_is_importable() {
    let dash = dashboard();
    assert!(dash["schemaVersion"].as_u64().is_some_and(|v| v >= 36));
    assert!(dash["title"].as_str().is_some_and(|t| !t.is_empty()));
    let vars: Vec<&str> = dash["templating"]["list"]
        .as_array()
        .expect("templating")
        .iter()
        .filter_map(|v| v["name"].as_str())
        .collect();
    for v in ["DS_PROMETHEUS", "instance", "comm", "container"] {
        assert!(vars.contains(&v), "template variable {v} missing: {vars:?}");
    }
    let mut ids = BTreeSet::new();
    for panel in panels(&dash) {
        let title = panel["title"].as_str().unwrap_or("?");
        let id = panel["id"].as_u64().expect("panel id");
        assert!(ids.insert(id), "duplicate panel id {id}");
        for key in ["h", "w", "x", "y"] {
            assert!(panel["gridPos"][key].is_u64(), "{title}: gridPos.{key}");
        }
        if panel["type"] == "row" {
            continue;
        }
        assert_eq!(panel["datasource"]["uid"], "${DS_PROMETHEUS}", "{title}");
        for t in panel["targets"].as_array().into_iter().flatten() {
            assert_eq!(t["datasource"]["uid"], "${DS_PROMETHEUS}", "{title}");
        }
    }
}

/// The `expr:` blocks of a rules file (block scalars `expr: |` and one-line `expr: ...`).
fn rule_exprs(yaml: &str) -> Vec<String> {
    let lines: Vec<&str> = yaml.lines().collect();
    let mut exprs = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i];
        let indent = line.len() - line.trim_start().len();
        if let Some(rest) = line.trim_start().strip_prefix("expr:") {
            let rest = rest.trim();
            if rest.starts_with('|') || rest.starts_with('>') {
                let mut body = String::new();
                i += 1;
                while i < lines.len()
                    && (lines[i].trim().is_empty()
                        || lines[i].len() - lines[i].trim_start().len() > indent)
                {
                    body.push_str(lines[i].trim());
                    body.push('\n');
                    i += 1;
                }
                exprs.push(body);
                continue;
            }
            exprs.push(rest.trim_matches(['\'', '"']).to_owned());
        }
        i += 1;
    }
    exprs
}

#[test]
fn alert_rules_use_only_documented_metrics() {
    let metrics_md = read("docs/metrics.md");
    let exprs = rule_exprs(&read("deploy/prometheus/alerts.yml"));
    assert_eq!(exprs.len(), 6, "expected 6 rules: {exprs:?}");
    for expr in &exprs {
        let names = metric_names(expr);
        assert!(!names.is_empty(), "no metric in {expr}");
        for name in names {
            assert!(
                documented(&metrics_md, &name) || PROMETHEUS_BUILTINS.contains(&name.as_str()),
                "alert expr uses {name}, not documented in docs/metrics.md: {expr}"
            );
        }
    }
}

#[test]
fn metrics_reference_covers_the_spec() {
    let metrics_md = read("docs/metrics.md");
    for name in [
        "pgconn_open_connections",
        "pgconn_connections_opened_total",
        "pgconn_connections_closed_total",
        "pgconn_connection_duration_seconds",
        "pgconn_oldest_connection_age_seconds",
        "pgconn_max_idle_seconds",
        "pgconn_stalled_connections",
        "pgconn_stalls_total",
        "pgconn_leak_suspected_connections",
        "pgconn_bytes_sent_total",
        "pgconn_bytes_received_total",
        "pgconn_tracer_events_lost_total",
        "pgconn_tracer_tracked_connections",
        "pgconn_tracer_build_info",
        "pgconn_tracer_label_sets_overflow_total",
        "~other",
        "/healthz",
    ] {
        assert!(
            documented(&metrics_md, name),
            "docs/metrics.md does not document `{name}`"
        );
    }
}
