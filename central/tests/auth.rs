//! Identities: every route × every kind of caller, and the trust rules' reproducers.

mod common;

use std::time::Duration;

use common::*;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use volume_central::auth::{self, Subject};
use volume_central::{Config, Db, Server};

/// A service with auth on, workers `wa` and `wb`, and one credential of each kind.
struct World {
    server: Server,
    db: Db,
    http: reqwest::Client,
    worker_a: String,
    worker_b: String,
    scheduler: String,
    operator: String,
    revoked: String,
    config: Config,
}

async fn issue(db: &Db, subject: Subject) -> String {
    auth::issue(db, &subject).await.expect("issue").token
}

async fn world() -> World {
    let (config, db) = fresh_db_with_auth().await;
    let worker_a = issue(&db, Subject::Worker("wa".into())).await;
    let worker_b = issue(&db, Subject::Worker("wb".into())).await;
    let scheduler = issue(&db, Subject::Scheduler).await;
    let operator = issue(&db, Subject::Operator).await;
    let old = auth::issue(&db, &Subject::Worker("wa".into()))
        .await
        .expect("issue");
    auth::revoke(&db, old.credential.id).await.expect("revoke");
    let server = start_server(&config).await;
    World {
        server,
        db,
        http: reqwest::Client::new(),
        worker_a,
        worker_b,
        scheduler,
        operator,
        revoked: old.token,
        config,
    }
}

impl World {
    async fn call(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> reqwest::Response {
        let mut req = self
            .http
            .request(method, format!("{}{path}", self.server.url()));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        req.send().await.expect("request")
    }

    async fn ok(&self, method: Method, path: &str, body: Value) -> Value {
        let resp = self
            .call(method, path, Some(&self.scheduler.clone()), Some(body))
            .await;
        assert!(resp.status().is_success(), "{path}: {}", resp.status());
        resp.json().await.unwrap_or(Value::Null)
    }
}

/// Volume `handle` on worker A, initialized and held by a container (not garbage).
async fn owned_volume(w: &World, handle: &str) {
    w.ok(
        Method::POST,
        "/api/v1/workers/wa/containers",
        json!({"handle": "holder"}),
    )
    .await;
    w.ok(
        Method::POST,
        "/api/v1/workers/wa/volumes",
        json!({"handle": handle, "container": "holder"}),
    )
    .await;
    force_state(&w.db, handle, "initialized").await;
}

fn types() -> Value {
    json!({"resource_types": [{"type": "git", "image": "/t/git/rootfs.tgz", "version": "1"}]})
}

/// Every route of volume-central (the open ones, the agent's, the scheduler's, the
/// views), each routes with `{w}` once for worker A's name and once for worker B's, ×
/// no token, a wrong one, a revoked one, worker A's, the scheduler's and an operator's.
#[tokio::test]
async fn every_route_answers_each_kind_of_caller_as_the_trust_rules_say() {
    let w = world().await;
    // Rows the routes act on: worker A's base type and volume, a resource config and cache.
    let agent_a = Some(w.worker_a.as_str());
    let resp = w
        .call(
            Method::PUT,
            "/api/v1/workers/wa/base-resource-types",
            agent_a,
            Some(types()),
        )
        .await;
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);
    w.ok(
        Method::POST,
        "/api/v1/workers/wa/volumes",
        json!({"handle": "va", "base_resource_type": "git"}),
    )
    .await;
    force_state(&w.db, "va", "initialized").await;
    let cfg = w
        .ok(
            Method::POST,
            "/api/v1/resource-configs",
            json!({"base_resource_type": "git", "source_hash": "s"}),
        )
        .await["id"]
        .clone();
    let cache = w
        .ok(
            Method::POST,
            "/api/v1/resource-caches",
            json!({"resource_config": cfg, "version": "v1"}),
        )
        .await["id"]
        .as_i64()
        .expect("cache id");
    let report = json!({"revision_seen": null, "volumes": []});

    // Columns: none, wrong, revoked, worker A, scheduler, operator.
    const OPEN: [u16; 6] = [200; 6];
    let table: Vec<(Method, String, Option<Value>, [u16; 6])> = vec![
        (Method::GET, "/healthz".into(), None, OPEN),
        (Method::GET, "/readyz".into(), None, OPEN),
        (Method::GET, "/metrics".into(), None, OPEN),
        // Agent routes: only the worker's own credential (the operator may read).
        (
            Method::PUT,
            "/api/v1/workers/wa/base-resource-types".into(),
            Some(types()),
            [401, 401, 401, 204, 403, 403],
        ),
        (
            Method::PUT,
            "/api/v1/workers/wb/base-resource-types".into(),
            Some(types()),
            [401, 401, 401, 403, 403, 403],
        ),
        (
            Method::GET,
            "/api/v1/workers/wa/volumes/desired".into(),
            None,
            [401, 401, 401, 200, 403, 200],
        ),
        (
            Method::GET,
            "/api/v1/workers/wb/volumes/desired".into(),
            None,
            [401, 401, 401, 403, 403, 200],
        ),
        (
            Method::PUT,
            "/api/v1/workers/wa/volumes/report".into(),
            Some(report.clone()),
            [401, 401, 401, 204, 403, 403],
        ),
        (
            Method::PUT,
            "/api/v1/workers/wb/volumes/report".into(),
            Some(report.clone()),
            [401, 401, 401, 403, 403, 403],
        ),
        // Scheduler routes.
        (
            Method::POST,
            "/api/v1/workers".into(),
            Some(json!({"name": "wa"})),
            [401, 401, 401, 403, 200, 403],
        ),
        (
            Method::POST,
            "/api/v1/workers/wa/volumes".into(),
            Some(json!({"handle": "new-a"})),
            [401, 401, 401, 403, 201, 403],
        ),
        (
            Method::POST,
            "/api/v1/workers/wb/volumes".into(),
            Some(json!({"handle": "new-b"})),
            [401, 401, 401, 403, 201, 403],
        ),
        (
            Method::POST,
            "/api/v1/workers/wa/containers".into(),
            Some(json!({"handle": "ca"})),
            [401, 401, 401, 403, 201, 403],
        ),
        (
            Method::POST,
            "/api/v1/workers/wb/containers".into(),
            Some(json!({"handle": "cb"})),
            [401, 401, 401, 403, 201, 403],
        ),
        (
            Method::DELETE,
            "/api/v1/workers/wa/containers/gone".into(),
            None,
            [401, 401, 401, 403, 204, 403],
        ),
        (
            Method::DELETE,
            "/api/v1/workers/wb/containers/gone".into(),
            None,
            [401, 401, 401, 403, 204, 403],
        ),
        (
            Method::PUT,
            "/api/v1/volumes/va/state".into(),
            Some(json!({"state": "initialized"})),
            [401, 401, 401, 403, 200, 403],
        ),
        (
            Method::POST,
            "/api/v1/resource-configs".into(),
            Some(json!({"base_resource_type": "git", "source_hash": "t"})),
            [401, 401, 401, 403, 201, 403],
        ),
        (
            Method::POST,
            "/api/v1/resource-caches".into(),
            Some(json!({"resource_config": cfg, "version": "v2"})),
            [401, 401, 401, 403, 201, 403],
        ),
        (
            Method::POST,
            format!("/api/v1/resource-caches/{cache}/uses/7"),
            None,
            [401, 401, 401, 403, 204, 403],
        ),
        (
            Method::DELETE,
            format!("/api/v1/resource-caches/{cache}/uses/7"),
            None,
            [401, 401, 401, 403, 204, 403],
        ),
        (
            Method::PUT,
            format!("/api/v1/resource-caches/{cache}/retention"),
            Some(json!({"retention": "keep"})),
            [401, 401, 401, 403, 200, 403],
        ),
        (
            Method::PUT,
            "/api/v1/workers/wa/retention".into(),
            Some(json!({"cache_budget": 1000})),
            [401, 401, 401, 403, 200, 403],
        ),
        // Read-only views: the scheduler and operators.
        (
            Method::GET,
            "/api/v1/workers".into(),
            None,
            [401, 401, 401, 403, 200, 200],
        ),
        (
            Method::GET,
            format!("/api/v1/resource-caches/{cache}/workers"),
            None,
            [401, 401, 401, 403, 200, 200],
        ),
        (
            Method::GET,
            "/api/v1/workers/wa/retention".into(),
            None,
            [401, 401, 401, 403, 200, 200],
        ),
        (
            Method::GET,
            "/api/v1/workers/wa/volumes".into(),
            None,
            [401, 401, 401, 403, 200, 200],
        ),
        (
            Method::GET,
            "/api/v1/workers/wb/volumes".into(),
            None,
            [401, 401, 401, 403, 200, 200],
        ),
    ];
    let wrong = auth::new_token();
    let callers: [(&str, Option<&str>); 6] = [
        ("none", None),
        ("wrong", Some(&wrong)),
        ("revoked", Some(&w.revoked)),
        ("worker A", Some(&w.worker_a)),
        ("scheduler", Some(&w.scheduler)),
        ("operator", Some(&w.operator)),
    ];
    let mut failures = Vec::new();
    for (method, path, body, expected) in &table {
        for ((who, token), want) in callers.iter().zip(expected) {
            let resp = w.call(method.clone(), path, *token, body.clone()).await;
            let got = resp.status().as_u16();
            let challenge = resp.headers().contains_key("www-authenticate");
            let text = resp.text().await.unwrap_or_default();
            if got != *want {
                failures.push(format!(
                    "{method} {path} as {who}: {got}, want {want}: {text}"
                ));
                continue;
            }
            if got == 401 && !(challenge && text.contains("credentials issue")) {
                failures.push(format!(
                    "{method} {path} as {who}: 401 without a challenge or the fix: {text}"
                ));
            }
            if got == 403 && !text.contains("may not") {
                failures.push(format!(
                    "{method} {path} as {who}: 403 body does not say why: {text}"
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    w.server.stop().await;
}

#[tokio::test]
async fn refuses_report_for_another_worker_and_destroys_nothing() {
    let w = world().await;
    owned_volume(&w, "va").await;
    let before = snapshot(&w.db).await;
    let hostile =
        json!({"revision_seen": null, "volumes": [], "destroyed": ["va"], "missing": ["va"]});
    let resp = w
        .call(
            Method::PUT,
            "/api/v1/workers/wa/volumes/report",
            Some(&w.worker_b),
            Some(hostile),
        )
        .await;
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    let body: Value = resp.json().await.expect("json");
    let msg = body["error"].as_str().unwrap_or("");
    assert!(
        msg.contains("worker \"wb\"") && msg.contains("credentials issue --worker wa"),
        "{msg}"
    );
    assert_eq!(snapshot(&w.db).await, before, "nothing changed");
    w.server.stop().await;
}

#[tokio::test]
async fn refuses_missing_report_for_another_worker() {
    let w = world().await;
    owned_volume(&w, "va").await;
    let missing = json!({"revision_seen": null, "volumes": [], "missing": ["va"]});
    for token in [&w.worker_b, &w.scheduler, &w.operator] {
        let resp = w
            .call(
                Method::PUT,
                "/api/v1/workers/wa/volumes/report",
                Some(token),
                Some(missing.clone()),
            )
            .await;
        assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    }
    assert_eq!(
        count(
            &w.db,
            "SELECT count(*) FROM volumes WHERE missing_since IS NOT NULL"
        )
        .await,
        0
    );
    // Worker A itself may: its own report marks its own volume.
    let resp = w
        .call(
            Method::PUT,
            "/api/v1/workers/wa/volumes/report",
            Some(&w.worker_a),
            Some(missing),
        )
        .await;
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);
    assert_eq!(
        count(
            &w.db,
            "SELECT count(*) FROM volumes WHERE missing_since IS NOT NULL"
        )
        .await,
        1
    );
    w.server.stop().await;
}

#[tokio::test]
async fn unknown_worker_in_url_is_404_and_creates_no_row() {
    let w = world().await;
    let calls: [(Method, &str, Option<Value>, &str); 5] = [
        (
            Method::POST,
            "/api/v1/workers/ghost/containers",
            Some(json!({"handle": "c"})),
            &w.scheduler,
        ),
        (
            Method::POST,
            "/api/v1/workers/ghost/volumes",
            Some(json!({"handle": "v"})),
            &w.scheduler,
        ),
        (
            Method::DELETE,
            "/api/v1/workers/ghost/containers/c",
            None,
            &w.scheduler,
        ),
        (
            Method::GET,
            "/api/v1/workers/ghost/volumes",
            None,
            &w.operator,
        ),
        (
            Method::GET,
            "/api/v1/workers/ghost/volumes/desired",
            None,
            &w.operator,
        ),
    ];
    for (method, path, body, token) in calls {
        let resp = w.call(method.clone(), path, Some(token), body).await;
        assert_eq!(resp.status(), StatusCode::NOT_FOUND, "{method} {path}");
        let text = resp.text().await.unwrap_or_default();
        assert!(text.contains("POST /api/v1/workers"), "{text}");
    }
    // Without authentication, the agent routes still never register a worker.
    let (mut config, db) = fresh_db().await;
    config.auth = volume_central::AuthMode::None;
    let open = start_server(&config).await;
    for (method, path, body) in [
        (
            Method::PUT,
            "/api/v1/workers/ghost/base-resource-types",
            Some(types()),
        ),
        (
            Method::PUT,
            "/api/v1/workers/ghost/volumes/report",
            Some(json!({"revision_seen": null, "volumes": []})),
        ),
    ] {
        let mut req = w.http.request(method, format!("{}{path}", open.url()));
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.expect("request");
        assert_eq!(resp.status(), StatusCode::NOT_FOUND, "{path}");
    }
    assert_eq!(count(&db, "SELECT count(*) FROM workers").await, 0);
    assert_eq!(
        count(
            &w.db,
            "SELECT count(*) FROM workers WHERE name NOT IN ('wa', 'wb')"
        )
        .await,
        0
    );
    open.stop().await;
    w.server.stop().await;
}

#[tokio::test]
async fn revoked_credential_is_refused_without_a_restart() {
    let w = world().await;
    let issued = auth::issue(&w.db, &Subject::Scheduler)
        .await
        .expect("issue");
    let list = |token: String| {
        let w = &w;
        async move {
            w.call(Method::GET, "/api/v1/workers", Some(&token), None)
                .await
                .status()
        }
    };
    // A new credential works at once, and is then cached.
    assert_eq!(list(issued.token.clone()).await, StatusCode::OK);
    auth::revoke(&w.db, issued.credential.id)
        .await
        .expect("revoke");
    let mut refused = false;
    for _ in 0..600 {
        match list(issued.token.clone()).await {
            StatusCode::UNAUTHORIZED => {
                refused = true;
                break;
            }
            other => assert_eq!(other, StatusCode::OK),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(refused, "revoked credential still accepted after 30 s");
    let resp = w
        .call(Method::GET, "/api/v1/workers", Some(&issued.token), None)
        .await;
    let text = resp.text().await.unwrap_or_default();
    assert!(text.contains("revoked"), "{text}");
    // Rotation: a new scheduler credential works alongside the old ones.
    let next = issue(&w.db, Subject::Scheduler).await;
    assert_eq!(list(next).await, StatusCode::OK);
    assert_eq!(list(w.scheduler.clone()).await, StatusCode::OK);
    let listed = auth::list(&w.db).await.expect("list");
    let row = listed
        .iter()
        .find(|c| c.id == issued.credential.id)
        .expect("listed");
    assert!(row.revoked_at.is_some() && row.last_used_at.is_some());
    w.server.stop().await;
}

#[tokio::test]
async fn bearer_scheme_is_case_insensitive_and_other_schemes_are_401() {
    let w = world().await;
    let url = format!("{}/api/v1/workers", w.server.url());
    for scheme in ["Bearer", "bearer", "BEARER", "bEaReR"] {
        let resp = w
            .http
            .get(&url)
            .header("Authorization", format!("{scheme} {}", w.operator))
            .send()
            .await
            .expect("get");
        assert_eq!(resp.status(), StatusCode::OK, "{scheme}");
    }
    let resp = w
        .http
        .get(&url)
        .basic_auth("operator", Some(&w.operator))
        .send()
        .await
        .expect("get");
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    let metrics = metrics_text(&w.http, &w.server.url()).await;
    assert!(
        metrics.contains("volume_central_auth_disabled 0")
            && metrics.contains("volume_central_auth_refused_total{status=\"401\"} 1"),
        "{metrics}"
    );
    w.server.stop().await;
}

#[tokio::test]
async fn without_credentials_start_refuses_unless_auth_none() {
    let (mut config, _db) = fresh_db_with_auth().await;
    let err = match volume_central::start(&config).await {
        Ok(_) => panic!("started without any credential"),
        Err(err) => err.to_string(),
    };
    assert!(
        err.contains("credentials issue --scheduler") && err.contains("auth = \"none\""),
        "{err}"
    );
    config.auth = volume_central::AuthMode::None;
    let server = volume_central::start(&config).await.expect("auth none");
    assert_eq!(server.metrics().auth_disabled.get(), 1);
    server.stop().await;
}

#[tokio::test]
async fn a_report_over_the_handle_bound_is_413_naming_the_bound() {
    let mut w = world().await;
    w.server.stop().await;
    w.config.max_report_handles = 3;
    let server = start_server(&w.config).await;
    let body = json!({"revision_seen": null,
        "volumes": [{"handle": "a", "parent": null, "state": "created"}],
        "destroyed": ["b", "c", "d"]});
    let resp = w
        .http
        .put(format!("{}/api/v1/workers/wa/volumes/report", server.url()))
        .bearer_auth(&w.worker_a)
        .json(&body)
        .send()
        .await
        .expect("report");
    assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let text = resp.text().await.unwrap_or_default();
    assert!(text.contains("max_report_handles = 3"), "{text}");
    server.stop().await;
}
