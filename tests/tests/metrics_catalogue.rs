//! The metric catalogue holds together: README.md's "Metrics" section lists exactly what
//! the agent binary and volume-central export (name and type), and the alert rules and
//! the dashboard shipped in `packaging/monitoring/` name only exported metrics.
//! Harness: `e2e::metrics` (volume-central on the throwaway PostgreSQL cluster, the real
//! agent binary).

use std::collections::BTreeSet;

use e2e::metrics::*;

/// The shipped monitoring files: Prometheus rule files and Grafana dashboards.
const RULE_FILES: [&str; 2] = [
    "packaging/monitoring/volume-agent.rules.yml",
    "packaging/monitoring/volume-central.rules.yml",
];
const DASHBOARDS: [&str; 1] = ["packaging/monitoring/volume-fleet.dashboard.json"];

#[actix_rt::test]
async fn every_exported_metric_is_listed_in_the_readme() {
    let exported = scrape_system().await.families();
    let listed = readme_catalogue(&repo_file("README.md"));
    let unlisted: Vec<String> = exported
        .iter()
        .filter(|(name, _)| !listed.contains_key(*name))
        .map(|(name, kind)| format!("{name} ({kind})"))
        .collect();
    assert!(
        unlisted.is_empty(),
        "exported but not in README.md's Metrics section: {unlisted:?}"
    );
}

#[actix_rt::test]
async fn every_metric_the_readme_lists_is_exported_with_that_type() {
    let scrape = scrape_system().await;
    let exported = scrape.families();
    let listed = readme_catalogue(&repo_file("README.md"));
    assert!(
        listed.len() > 20,
        "README.md lists too few metrics: {listed:?}"
    );
    let mut wrong = Vec::new();
    for (name, kind) in &listed {
        match exported.get(name) {
            None => wrong.push(format!("{name}: listed, not exported")),
            Some(k) if k != kind => {
                wrong.push(format!("{name}: listed as {kind}, exported as {k}"))
            }
            Some(_) => {}
        }
    }
    assert!(
        wrong.is_empty(),
        "{wrong:#?}\nagent:\n{}\ncentral:\n{}",
        scrape.agent,
        scrape.central
    );
}

#[actix_rt::test]
async fn alert_rules_and_dashboard_name_only_exported_metrics() {
    let names = queryable(&scrape_system().await.families());
    let mut exprs: Vec<(String, String)> = Vec::new();
    for file in RULE_FILES {
        let text = repo_file(file);
        let found = rule_exprs(&text);
        assert_eq!(
            found.len(),
            text.matches("- alert:").count(),
            "{file}: one expr per alert"
        );
        exprs.extend(found.into_iter().map(|e| (file.to_string(), e)));
    }
    for file in DASHBOARDS {
        let dashboard: serde_json::Value =
            serde_json::from_str(&repo_file(file)).unwrap_or_else(|e| panic!("{file}: {e}"));
        let found = dashboard_exprs(&dashboard);
        assert!(found.len() >= 7, "{file}: too few panel queries: {found:?}");
        exprs.extend(found.into_iter().map(|e| (file.to_string(), e)));
    }
    let mut unknown = Vec::new();
    for (file, expr) in &exprs {
        let used = promql_metric_names(expr);
        assert!(!used.is_empty(), "{file}: `{expr}` names no metric");
        let missing: BTreeSet<&String> = used.iter().filter(|n| !names.contains(*n)).collect();
        if !missing.is_empty() {
            unknown.push(format!("{file}: `{expr}` uses {missing:?}"));
        }
    }
    assert!(
        unknown.is_empty(),
        "metrics the binaries do not export:\n{}",
        unknown.join("\n")
    );
}
