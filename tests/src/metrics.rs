//! The metric catalogue as the binaries export it, as README.md lists it, and as the
//! shipped alert rules and dashboard use it (`packaging/monitoring/`). Pure text
//! handling, plus [`scrape_system`], which starts volume-central and a real agent and
//! scrapes both.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::Value;

use crate::system::{Central, Worker};
use crate::{eventually, workspace_root};

/// Metric families of an exposition: name → type, from its `# TYPE` lines.
pub fn families(exposition: &str) -> BTreeMap<String, String> {
    exposition
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| {
            let mut words = l.split_whitespace();
            Some((words.next()?.to_string(), words.next()?.to_string()))
        })
        .collect()
}

/// The series names a query may use: each family's name, and a histogram's `_bucket`,
/// `_sum` and `_count`.
pub fn queryable(families: &BTreeMap<String, String>) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for (name, kind) in families {
        names.insert(name.clone());
        if kind == "histogram" {
            for suffix in ["_bucket", "_sum", "_count"] {
                names.insert(format!("{name}{suffix}"));
            }
        }
    }
    names
}

/// The metrics README.md's "Metrics" section lists: name → type, from the rows of its
/// tables whose first cell is a metric name in backquotes.
pub fn readme_catalogue(readme: &str) -> BTreeMap<String, String> {
    let mut section = false;
    let mut listed = BTreeMap::new();
    for line in readme.lines() {
        if line.starts_with("## ") {
            section = line.trim() == "## Metrics";
            continue;
        }
        if !section {
            continue;
        }
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        // `| name | type | meaning |` splits into ["", name, type, meaning, ""].
        if cells.len() < 4 || !cells[0].is_empty() {
            continue;
        }
        let Some(name) = cells[1].strip_prefix('`').and_then(|c| c.strip_suffix('`')) else {
            continue;
        };
        if name.starts_with("volume_agent_") || name.starts_with("volume_central_") {
            listed.insert(name.to_string(), cells[2].to_string());
        }
    }
    listed
}

/// The `expr` of every rule in a Prometheus rules file (YAML): plain one-line values and
/// block scalars (`|`, `>`) whose lines are indented deeper than the key.
pub fn rule_exprs(yaml: &str) -> Vec<String> {
    let lines: Vec<&str> = yaml.lines().collect();
    let mut exprs = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i];
        let indent = line.len() - line.trim_start().len();
        i += 1;
        let Some(value) = line.trim_start().strip_prefix("expr:") else {
            continue;
        };
        let value = value.trim();
        if value.starts_with('|') || value.starts_with('>') {
            let mut block = Vec::new();
            while i < lines.len() {
                let next = lines[i];
                let deeper = next.len() - next.trim_start().len() > indent;
                if !next.trim().is_empty() && !deeper {
                    break;
                }
                block.push(next.trim());
                i += 1;
            }
            exprs.push(block.join(" "));
        } else {
            exprs.push(unquote(value).to_string());
        }
    }
    exprs
}

fn unquote(v: &str) -> &str {
    for q in ['"', '\''] {
        if let Some(inner) = v.strip_prefix(q).and_then(|v| v.strip_suffix(q)) {
            return inner;
        }
    }
    v
}

/// The `expr` of every target of every panel (rows' nested panels included) of a
/// Grafana dashboard.
pub fn dashboard_exprs(dashboard: &Value) -> Vec<String> {
    fn walk(v: &Value, out: &mut Vec<String>) {
        match v {
            Value::Object(map) => {
                if let Some(Value::Array(targets)) = map.get("targets") {
                    for t in targets {
                        if let Some(Value::String(e)) = t.get("expr") {
                            out.push(e.clone());
                        }
                    }
                }
                for (k, child) in map {
                    if k != "targets" {
                        walk(child, out);
                    }
                }
            }
            Value::Array(items) => items.iter().for_each(|i| walk(i, out)),
            _ => {}
        }
    }
    let mut out = Vec::new();
    walk(dashboard, &mut out);
    out
}

/// PromQL words that are not metric names: keywords, operators spelled as words, and
/// the aggregation operators (which may stand before `by (…)` instead of their
/// parenthesis).
const PROMQL_WORDS: [&str; 27] = [
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
    "limitk",
    "limit_ratio",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "and",
    "or",
    "unless",
    "bool",
    "offset",
    "inf",
    "nan",
];

/// The metric names a PromQL expression selects: every identifier that is not a
/// function call, a keyword, a label name (inside `{…}` or the parentheses after
/// `by`/`without`/`on`/`ignoring`/`group_left`/`group_right`), a string, a number or a
/// duration. Grafana variables (`$__rate_interval`, `${x}`) are skipped.
pub fn promql_metric_names(expr: &str) -> BTreeSet<String> {
    let chars: Vec<char> = expr.chars().collect();
    let mut names = BTreeSet::new();
    let mut i = 0;
    let mut braces = 0usize;
    let mut brackets = 0usize;
    // Parenthesis depths at which a label list opened (after `by (` and the like).
    let mut label_lists: Vec<usize> = Vec::new();
    let mut parens = 0usize;
    let mut after_label_keyword = false;
    while i < chars.len() {
        let c = chars[i];
        if c == '"' || c == '\'' || c == '`' {
            i += 1;
            while i < chars.len() && chars[i] != c {
                if chars[i] == '\\' {
                    i += 1;
                }
                i += 1;
            }
            i += 1;
            continue;
        }
        if c == '$' {
            i += 1;
            if i < chars.len() && chars[i] == '{' {
                while i < chars.len() && chars[i] != '}' {
                    i += 1;
                }
                i += 1;
            }
            while i < chars.len() && (chars[i].is_alphanumeric() || chars[i] == '_') {
                i += 1;
            }
            continue;
        }
        if c.is_ascii_alphabetic() || c == '_' || c == ':' {
            let start = i;
            while i < chars.len()
                && (chars[i].is_ascii_alphanumeric() || chars[i] == '_' || chars[i] == ':')
            {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            let mut j = i;
            while j < chars.len() && chars[j].is_whitespace() {
                j += 1;
            }
            let call = j < chars.len() && chars[j] == '(';
            let lower = word.to_ascii_lowercase();
            if matches!(
                lower.as_str(),
                "by" | "without" | "on" | "ignoring" | "group_left" | "group_right"
            ) {
                after_label_keyword = true;
                continue;
            }
            let in_labels = braces > 0 || label_lists.last() == Some(&parens);
            if !call && !in_labels && brackets == 0 && !PROMQL_WORDS.contains(&lower.as_str()) {
                names.insert(word);
            }
            continue;
        }
        if c.is_ascii_digit() || c == '.' {
            // A number or a duration (`5m`, `1h30m`, `1e3`).
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '.') {
                i += 1;
            }
            continue;
        }
        match c {
            '{' => braces += 1,
            '}' => braces = braces.saturating_sub(1),
            '[' => brackets += 1,
            ']' => brackets = brackets.saturating_sub(1),
            '(' => {
                parens += 1;
                if after_label_keyword {
                    label_lists.push(parens);
                }
            }
            ')' => {
                if label_lists.last() == Some(&parens) {
                    label_lists.pop();
                }
                parens = parens.saturating_sub(1);
            }
            _ => {}
        }
        if !c.is_whitespace() {
            after_label_keyword = false;
        }
        i += 1;
    }
    names
}

/// What both binaries exported in one run.
pub struct Scrape {
    pub agent: String,
    pub central: String,
}

impl Scrape {
    /// Families of both expositions.
    pub fn families(&self) -> BTreeMap<String, String> {
        let mut all = families(&self.agent);
        all.extend(families(&self.central));
        all
    }
}

/// Starts volume-central on a fresh database and a real agent with a base resource type
/// and a volume, waits until every label family has a series (a call to the central
/// API, the resource type, the volume measured, the worker's report), and scrapes both
/// `/metrics`.
pub async fn scrape_system() -> Scrape {
    let central = Central::start().await;
    let w = Worker::start(&central, "w1").await;
    w.set_base_resource_type("git", "1.0");
    let v = w.local.make("v1", None).await;
    std::fs::write(
        std::path::Path::new(&v.path).join("data"),
        vec![7u8; 64 * 1024],
    )
    .expect("write volume data");
    eventually("every agent metric family has a series", || async {
        let text = w.local.metrics().await;
        [
            "volume_agent_central_requests_total{",
            "volume_agent_resource_type_info{",
            "volume_agent_worker_info{",
            "volume_agent_volume_bytes{handle=\"v1\"}",
        ]
        .iter()
        .all(|s| text.contains(s))
    })
    .await;
    let agent = w.local.metrics().await;
    let central_metrics = || async {
        reqwest::get(format!("{}/metrics", central.url()))
            .await
            .expect("central /metrics")
            .text()
            .await
            .expect("central /metrics text")
    };
    eventually("volume-central has the worker's figures", || async {
        central_metrics()
            .await
            .contains("volume_central_worker_disk_free_bytes{worker=\"w1\"}")
    })
    .await;
    let central_text = central_metrics().await;
    Scrape {
        agent,
        central: central_text,
    }
}

/// A file of the repository, as text.
pub fn repo_file(path: &str) -> String {
    let full = workspace_root().join(path);
    std::fs::read_to_string(&full).unwrap_or_else(|e| panic!("read {}: {e}", full.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn promql_names_skip_functions_labels_keywords_and_durations() {
        let names = promql_metric_names(
            r#"sum by (instance, le) (rate(volume_agent_destroy_duration_seconds_bucket{job="x", outcome=~"a|b"}[5m] offset 1h))
               / on (instance) group_left (worker) volume_agent_worker_info > bool 0.5 * max(up) and time() - 1e3 > $__rate_interval
               or max without (job) (volume_central_volumes{state="destroying"})[1h:5m]"#,
        );
        let expected: BTreeSet<String> = [
            "volume_agent_destroy_duration_seconds_bucket",
            "volume_agent_worker_info",
            "volume_central_volumes",
            "up",
        ]
        .into_iter()
        .map(String::from)
        .collect();
        assert_eq!(names, expected);
    }

    #[test]
    fn rule_exprs_read_one_line_and_block_values() {
        let yaml = "groups:\n  - name: g\n    rules:\n      - alert: A\n        expr: up == 0\n        for: 5m\n      - alert: B\n        expr: |\n          rate(x_total[5m])\n            > 0\n        labels:\n          severity: page\n      - alert: C\n        expr: 'y > 1'\n";
        assert_eq!(
            rule_exprs(yaml),
            vec!["up == 0", "rate(x_total[5m]) > 0", "y > 1"]
        );
    }

    #[test]
    fn readme_catalogue_reads_the_metrics_tables_only() {
        let md = "## Other\n| `volume_agent_x` | gauge | no |\n## Metrics\n\n| metric | type | meaning |\n| --- | --- | --- |\n| `volume_agent_a_total` | counter | a |\n| `volume_central_b` | histogram | b |\n\n## Next\n| `volume_agent_y` | gauge | no |\n";
        let got = readme_catalogue(md);
        assert_eq!(got.len(), 2, "{got:?}");
        assert_eq!(got["volume_agent_a_total"], "counter");
        assert_eq!(got["volume_central_b"], "histogram");
    }
}
