//! The checked-in OpenAPI document of the scheduler API is the one the types generate, and
//! every route volume-central serves is described: in `central/openapi.json`, or (the
//! agent-facing native dialect) in `protocol/openapi.json`, and nothing more.

use std::collections::BTreeSet;

use serde_json::Value;

#[test]
fn checked_in_openapi_document_matches_the_types() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/openapi.json");
    let generated = volume_central::openapi::document();
    if std::env::var_os("UPDATE_OPENAPI").is_some() {
        std::fs::write(path, &generated).expect("write openapi.json");
    }
    let on_disk = std::fs::read_to_string(path).unwrap_or_default();
    assert!(
        on_disk == generated,
        "central/openapi.json is out of date with the scheduler API's types; \
         regenerate it with `UPDATE_OPENAPI=1 cargo test -p volume-central --test openapi`"
    );
}

/// `{worker}` and `{w}` name the same segment.
fn shape(path: &str) -> String {
    let mut out = String::new();
    let mut in_param = false;
    for c in path.chars() {
        match c {
            '{' => {
                in_param = true;
                out.push_str("{}");
            }
            '}' => in_param = false,
            _ if in_param => {}
            _ => out.push(c),
        }
    }
    out
}

/// `(METHOD, path shape)` of every operation in an OpenAPI document.
fn operations(doc: &Value, keep: impl Fn(&str) -> bool) -> BTreeSet<(String, String)> {
    let mut out = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        if !keep(path) {
            continue;
        }
        for method in item.as_object().expect("path item").keys() {
            out.insert((method.to_uppercase(), shape(path)));
        }
    }
    out
}

/// `(METHOD, path shape)` of every `.route(PATH, web::METHOD()...)` in `http.rs`,
/// prefixed with `/api/v1` inside its scope.
fn served_routes() -> BTreeSet<(String, String)> {
    let src = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/src/http.rs"))
        .expect("read src/http.rs");
    let flat: String = src.split_whitespace().collect();
    let configure = flat
        .split_once("pubfnconfigure(")
        .map(|(_, rest)| rest)
        .expect("http::configure");
    let scope_at = configure
        .find("web::scope(\"/api/v1\")")
        .expect("the /api/v1 scope");
    let mut out = BTreeSet::new();
    let mut at = 0;
    while let Some(i) = configure[at..].find(".route(\"") {
        let start = at + i + ".route(\"".len();
        let end = start + configure[start..].find('"').expect("end of the path");
        let path = &configure[start..end];
        let rest = &configure[end..];
        let method = rest
            .split_once("web::")
            .and_then(|(_, m)| m.split_once('('))
            .map(|(m, _)| m.to_uppercase())
            .expect("web::METHOD()");
        let full = if start > scope_at {
            format!("/api/v1{path}")
        } else {
            path.to_string()
        };
        out.insert((method, shape(&full)));
        at = end;
    }
    out
}

#[test]
fn every_served_route_is_in_one_openapi_document() {
    let central: Value =
        serde_json::from_str(&volume_central::openapi::document()).expect("document is JSON");
    let native: Value =
        serde_json::from_str(&protocol::openapi::document()).expect("document is JSON");
    let scheduler = operations(&central, |_| true);
    let agent_facing = operations(&native, |p| p.starts_with("/api/v1/"));
    let served = served_routes();
    assert!(served.len() > 20, "routes read from http.rs: {served:?}");
    let described: BTreeSet<_> = scheduler.union(&agent_facing).cloned().collect();
    let undescribed: Vec<_> = served.difference(&described).collect();
    assert!(
        undescribed.is_empty(),
        "served but in neither openapi.json: {undescribed:?}"
    );
    let stale: Vec<_> = scheduler.difference(&served).collect();
    assert!(
        stale.is_empty(),
        "in central/openapi.json but not served: {stale:?}"
    );
    let twice: Vec<_> = scheduler.intersection(&agent_facing).collect();
    assert!(twice.is_empty(), "described twice: {twice:?}");
}

#[test]
fn retention_schemas_carry_the_states_and_budgets() {
    let doc: Value =
        serde_json::from_str(&volume_central::openapi::document()).expect("document is JSON");
    let schemas = &doc["components"]["schemas"];
    assert_eq!(
        schemas["Retention"]["enum"],
        serde_json::json!(["auto", "keep", "drop"])
    );
    for field in ["cache_budget", "min_free"] {
        assert!(
            schemas["SetWorkerRetention"]["properties"][field].is_object(),
            "SetWorkerRetention.{field}"
        );
    }
    for field in ["retained_since", "last_used_at", "workers", "uses"] {
        assert!(
            schemas["CacheRetention"]["properties"][field].is_object(),
            "CacheRetention.{field}"
        );
    }
    for field in [
        "pressure",
        "pressure_since",
        "evictions",
        "effective_min_free",
    ] {
        assert!(
            schemas["WorkerRetention"]["properties"][field].is_object(),
            "WorkerRetention.{field}"
        );
    }
}
