//! The local volume API and the operator CLI against the real, running agent.

use std::path::Path;
use std::process::Command;

use e2e::wiremock::matchers::{method, path};
use e2e::wiremock::{Mock, MockServer, ResponseTemplate};
use e2e::*;
use reqwest::StatusCode;
use serde_json::{json, Value};

/// A central API that knows nothing (404 everywhere): the agent destroys nothing.
async fn start_with(settings: &AgentSettings) -> (MockServer, Agent, Local) {
    let server = MockServer::start().await;
    let agent = Agent::start(&server.uri(), settings);
    let local = Local::new(&agent);
    (server, agent, local)
}

async fn start() -> (MockServer, Agent, Local) {
    start_with(&AgentSettings::default()).await
}

async fn post(local: &Local, body: Value) -> (StatusCode, Value) {
    let resp = local
        .http
        .post(format!("{}/volumes", local.base))
        .json(&body)
        .send()
        .await
        .expect("post");
    let status = resp.status();
    (status, resp.json().await.unwrap_or(Value::Null))
}

async fn send(
    local: &Local,
    m: reqwest::Method,
    url: &str,
    body: Option<Value>,
) -> (StatusCode, Value) {
    let mut req = local.http.request(m, format!("{}{url}", local.base));
    if let Some(b) = body {
        req = req.json(&b);
    }
    let resp = req.send().await.expect("request");
    let status = resp.status();
    (status, resp.json().await.unwrap_or(Value::Null))
}

async fn list(local: &Local, query: &str) -> Value {
    send(
        local,
        reqwest::Method::GET,
        &format!("/volumes{query}"),
        None,
    )
    .await
    .1
}

async fn set_state(local: &Local, h: &str, state: &str) -> StatusCode {
    send(
        local,
        reqwest::Method::PUT,
        &format!("/volumes/{h}/state"),
        Some(json!({"state": state})),
    )
    .await
    .0
}

/// Sends `method path` as written (no client-side normalization); returns the status.
fn raw_status(base: &str, method: &str, path: &str) -> u16 {
    use std::io::{Read, Write};
    let host = base.trim_start_matches("http://");
    let mut s = std::net::TcpStream::connect(host).expect("connect");
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {host}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .expect("write");
    let mut buf = String::new();
    s.read_to_string(&mut buf).expect("read");
    buf.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("status line")
}

/// Every path under the agent's temp dir except its own state and logs.
fn disk_listing(agent: &Agent) -> Vec<String> {
    fn walk(dir: &Path, base: &Path, out: &mut Vec<String>) {
        for e in std::fs::read_dir(dir).expect("read dir").flatten() {
            let p = e.path();
            let rel = p
                .strip_prefix(base)
                .expect("under base")
                .display()
                .to_string();
            if rel.starts_with("state") || rel == "agent.log" {
                continue;
            }
            out.push(rel);
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                walk(&p, base, out);
            }
        }
    }
    let mut out = Vec::new();
    walk(agent.dir.path(), agent.dir.path(), &mut out);
    out.sort();
    out
}

#[tokio::test]
async fn create_empty_answers_201_with_an_existing_absolute_path() {
    let (_s, _agent, local) = start().await;
    let (status, v) = post(
        &local,
        json!({"handle": "e1", "strategy": {"type": "empty"}, "properties": {"k": "v"}}),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(v["handle"], "e1");
    assert_eq!(v["state"], "created");
    assert_eq!(v["parent"], Value::Null);
    assert_eq!(v["properties"], json!({"k": "v"}));
    assert_eq!(v["privileged"], false);
    let p = Path::new(v["path"].as_str().expect("path"));
    assert!(p.is_absolute() && p.is_dir(), "{p:?}");
}

#[tokio::test]
async fn create_cow_answers_201_with_the_parents_data() {
    let (_s, _agent, local) = start().await;
    local.make("parent", None).await;
    let (status, v) = post(
        &local,
        json!({"handle": "kid", "strategy": {"type": "cow", "volume": "parent"}}),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{v}");
    assert_eq!(v["parent"], "parent");
    let p = Path::new(v["path"].as_str().expect("path"));
    assert!(p.is_absolute());
    assert_eq!(
        std::fs::read(p.join("parent.txt")).expect("copied data"),
        b"parent"
    );
}

#[tokio::test]
async fn list_filters_by_every_property_and_never_answers_null() {
    let (_s, _agent, local) = start().await;
    for (h, props) in [
        ("a", json!({"x": "1", "y": "2"})),
        ("b", json!({"x": "1"})),
        ("c", json!({})),
    ] {
        let (status, _) = post(
            &local,
            json!({"handle": h, "strategy": {"type": "empty"}, "properties": props}),
        )
        .await;
        assert_eq!(status, StatusCode::CREATED);
    }
    let handles = |v: Value| -> Vec<String> {
        v.as_array()
            .expect("array")
            .iter()
            .map(|v| v["handle"].as_str().expect("h").to_string())
            .collect()
    };
    assert_eq!(handles(list(&local, "?x=1").await), ["a", "b"]);
    assert_eq!(handles(list(&local, "?x=1&y=2").await), ["a"]);
    assert_eq!(list(&local, "?x=2").await, json!([]));
    assert_eq!(handles(list(&local, "").await), ["a", "b", "c"]);
}

#[tokio::test]
async fn get_answers_the_volume_and_404_for_unknown() {
    let (_s, _agent, local) = start().await;
    local.make("g", None).await;
    let (status, v) = send(&local, reqwest::Method::GET, "/volumes/g", None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(v["state"], "initialized");
    let (status, v) = send(&local, reqwest::Method::GET, "/volumes/nope", None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(v["error"].is_string());
}

#[tokio::test]
async fn destroy_answers_204_and_removes_the_data() {
    let (_s, _agent, local) = start().await;
    let v = local.make("d", None).await;
    let (status, _) = send(&local, reqwest::Method::DELETE, "/volumes/d", None).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    assert!(!Path::new(&v.path).exists());
    assert!(local.handles().await.is_empty());
}

#[tokio::test]
async fn destroy_of_unknown_handle_is_404() {
    let (_s, _agent, local) = start().await;
    let (status, v) = send(&local, reqwest::Method::DELETE, "/volumes/ghost", None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(v["error"].as_str().expect("error").contains("ghost"));
}

#[tokio::test]
async fn destroy_of_a_parent_with_children_is_409_naming_them() {
    let (_s, _agent, local) = start().await;
    local.make("p", None).await;
    local.make("c1", Some("p")).await;
    let (status, v) = send(&local, reqwest::Method::DELETE, "/volumes/p", None).await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert!(v["error"].as_str().expect("error").contains("c1"), "{v}");
    assert_eq!(local.handles().await, ["c1", "p"]);
}

#[tokio::test]
async fn set_property_answers_204_and_shows_in_get() {
    let (_s, _agent, local) = start().await;
    local.make("sp", None).await;
    let (status, _) = send(
        &local,
        reqwest::Method::PUT,
        "/volumes/sp/properties/owner",
        Some(json!({"value": "me"})),
    )
    .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (_, v) = send(&local, reqwest::Method::GET, "/volumes/sp", None).await;
    assert_eq!(v["properties"]["owner"], "me");
}

#[tokio::test]
async fn state_moves_forward_only_and_repeating_it_is_a_no_op() {
    let (_s, _agent, local) = start().await;
    post(
        &local,
        json!({"handle": "st", "strategy": {"type": "empty"}}),
    )
    .await;
    assert_eq!(
        set_state(&local, "st", "initializing").await,
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        set_state(&local, "st", "initializing").await,
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        set_state(&local, "st", "initialized").await,
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        set_state(&local, "st", "initialized").await,
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        set_state(&local, "st", "initializing").await,
        StatusCode::CONFLICT
    );
    assert_eq!(
        set_state(&local, "st", "created").await,
        StatusCode::CONFLICT
    );
    let (_, v) = send(&local, reqwest::Method::GET, "/volumes/st", None).await;
    assert_eq!(v["state"], "initialized");
}

#[tokio::test]
async fn bad_handles_in_path_or_body_are_400_and_create_nothing_on_disk() {
    let (_s, agent, local) = start().await;
    let before = disk_listing(&agent);
    let long = "x".repeat(129);
    for bad in ["..", "a/b", long.as_str(), "../escape", "/etc", "."] {
        let (status, v) = post(
            &local,
            json!({"handle": bad, "strategy": {"type": "empty"}}),
        )
        .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}: {v}");
        assert!(v["error"].is_string(), "{bad}");
        let (status, _) = post(
            &local,
            json!({"handle": "ok", "strategy": {"type": "cow", "volume": bad}}),
        )
        .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "parent {bad}");
    }
    for url in [
        "/volumes/%2e%2e",
        "/volumes/%2E%2E",
        &format!("/volumes/{long}"),
        "/volumes/a%2Fb",
    ] {
        let (status, _) = send(&local, reqwest::Method::GET, url, None).await;
        assert!(
            status == StatusCode::BAD_REQUEST || status == StatusCode::NOT_FOUND,
            "{url}: {status}"
        );
        let (status, _) = send(
            &local,
            reqwest::Method::PUT,
            &format!("{url}/state"),
            Some(json!({"state": "initialized"})),
        )
        .await;
        assert!(
            status == StatusCode::BAD_REQUEST || status == StatusCode::NOT_FOUND,
            "{url}: {status}"
        );
    }
    // Sent raw: an HTTP client library would resolve `%2e%2e` as a dot segment itself.
    for raw in ["/volumes/%2e%2e", "/volumes/%2E%2E", "/volumes/.."] {
        assert_eq!(raw_status(&local.base, "GET", raw), 400, "{raw}");
    }
    assert_eq!(
        disk_listing(&agent),
        before,
        "nothing may be created on disk"
    );
    assert!(local.handles().await.is_empty());
}

#[tokio::test]
async fn unknown_parent_is_422() {
    let (_s, _agent, local) = start().await;
    let (status, v) = post(
        &local,
        json!({"handle": "c", "strategy": {"type": "cow", "volume": "ghost"}}),
    )
    .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(v["error"].as_str().expect("error").contains("ghost"));
}

#[tokio::test]
async fn parent_not_initialized_is_422() {
    let (_s, _agent, local) = start().await;
    post(
        &local,
        json!({"handle": "raw", "strategy": {"type": "empty"}}),
    )
    .await;
    let (status, v) = post(
        &local,
        json!({"handle": "c", "strategy": {"type": "cow", "volume": "raw"}}),
    )
    .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(
        v["error"].as_str().expect("error").contains("initialized"),
        "{v}"
    );
}

#[tokio::test]
async fn duplicate_handle_is_409() {
    let (_s, _agent, local) = start().await;
    let (status, _) = post(
        &local,
        json!({"handle": "dup", "strategy": {"type": "empty"}}),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED);
    let (status, v) = post(
        &local,
        json!({"handle": "dup", "strategy": {"type": "empty"}}),
    )
    .await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert!(v["error"].as_str().expect("error").contains("dup"));
}

#[tokio::test]
async fn body_over_the_limit_is_413() {
    let settings = AgentSettings {
        api_max_body_bytes: Some(1024),
        ..AgentSettings::default()
    };
    let (_s, _agent, local) = start_with(&settings).await;
    let props: serde_json::Map<String, Value> = (0..200)
        .map(|i| (format!("key{i}"), json!("value")))
        .collect();
    let (status, v) = post(
        &local,
        json!({"handle": "big", "strategy": {"type": "empty"}, "properties": props}),
    )
    .await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert!(v["error"].is_string());
    assert!(local.handles().await.is_empty());
}

#[tokio::test]
async fn rejected_requests_change_nothing() {
    let (_s, agent, local) = start().await;
    local.make("p", None).await;
    local.make("c", Some("p")).await;
    let before = list(&local, "").await;
    let disk = disk_listing(&agent);
    let attempts: Vec<(reqwest::Method, &str, Option<Value>)> = vec![
        (
            reqwest::Method::POST,
            "/volumes",
            Some(json!({"handle": "p", "strategy": {"type": "empty"}})),
        ),
        (
            reqwest::Method::POST,
            "/volumes",
            Some(json!({"handle": "x", "strategy": {"type": "cow", "volume": "ghost"}})),
        ),
        (
            reqwest::Method::POST,
            "/volumes",
            Some(json!({"handle": "x", "strategy": {"type": "bogus"}})),
        ),
        (reqwest::Method::DELETE, "/volumes/p", None),
        (
            reqwest::Method::PUT,
            "/volumes/p/state",
            Some(json!({"state": "created"})),
        ),
        (
            reqwest::Method::PUT,
            "/volumes/ghost/properties/k",
            Some(json!({"value": "v"})),
        ),
    ];
    for (m, url, body) in attempts {
        let (status, v) = send(&local, m.clone(), url, body).await;
        assert!(status.is_client_error(), "{m} {url}: {status}");
        assert!(v["error"].is_string(), "{m} {url}: {v}");
    }
    assert_eq!(list(&local, "").await, before);
    assert_eq!(disk_listing(&agent), disk);
}

#[tokio::test]
async fn parent_being_destroyed_is_409_for_a_new_child() {
    let (_s, agent, local) = start().await;
    let v = local.make("dying", None).await;
    // A mount inside the volume makes its removal stop (the remover refuses to cross
    // mount points), so the parent stays `destroying`.
    let mnt = Path::new(&v.path).join("mnt");
    std::fs::create_dir(&mnt).expect("mnt");
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "none"])
        .arg(&mnt)
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !mounted {
        eprintln!("skipping: cannot mount a tmpfs here (needs root and mount rights)");
        return;
    }
    let (status, _) = send(&local, reqwest::Method::DELETE, "/volumes/dying", None).await;
    assert!(!status.is_success(), "the destroy must stop at the mount");
    let (_, got) = send(&local, reqwest::Method::GET, "/inventory/dying", None).await;
    assert_eq!(got["state"], "destroying", "{got}");
    // Baggageclaim's lookups do not see a volume being destroyed (it sits in `dead/`).
    let (status, _) = send(&local, reqwest::Method::GET, "/volumes/dying", None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (_, listed) = send(&local, reqwest::Method::GET, "/volumes", None).await;
    assert_eq!(listed, json!([]), "GET /volumes hides it");
    let (status, _) = send(
        &local,
        reqwest::Method::GET,
        "/volumes/dying/privileged",
        None,
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, err) = post(
        &local,
        json!({"handle": "orphan", "strategy": {"type": "cow", "volume": "dying"}}),
    )
    .await;
    assert_eq!(status, StatusCode::CONFLICT, "{err}");
    assert!(
        err["error"]
            .as_str()
            .expect("error")
            .contains("being destroyed"),
        "{err}"
    );
    // Unmount wherever the volume went (live/ or dead/) so the temp dir can be removed.
    let _ = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "grep ' {}' /proc/self/mounts | cut -d' ' -f2 | xargs -r umount -l",
            agent.dir.path().display()
        ))
        .status();
}

#[tokio::test]
async fn health_readiness_and_metrics_names() {
    let (_s, _agent, local) = start().await;
    let (status, _) = send(&local, reqwest::Method::GET, "/healthz", None).await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = send(&local, reqwest::Method::GET, "/readyz", None).await;
    assert_eq!(status, StatusCode::OK);
    let text = local.metrics().await;
    for name in [
        "volume_agent_volumes",
        "volume_agent_destroys_total",
        "volume_agent_destroys_failed_total",
        "volume_agent_destroy_duration_seconds",
        "volume_agent_blocked_volumes",
        "volume_agent_plans_refused_total",
        "volume_agent_central_requests_total",
        "volume_agent_last_sync_timestamp_seconds",
        "volume_agent_desired_revision",
    ] {
        assert!(
            text.contains(&format!("# TYPE {name} ")),
            "metric {name} missing:\n{text}"
        );
    }
}

async fn scripted_central(script: &DesiredScript) -> MockServer {
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path("/api/v1/workers/w1/volumes/desired"))
        .respond_with(script.clone())
        .mount(&server)
        .await;
    Mock::given(method("PUT"))
        .respond_with(ResponseTemplate::new(204))
        .mount(&server)
        .await;
    server
}

fn cli(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(agent_binary())
        .args(args)
        .output()
        .expect("run the CLI");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn cli_lists_inspects_plans_and_resets_through_the_daemon() {
    let script = DesiredScript::new("w1");
    let server = scripted_central(&script).await;
    let agent = Agent::start(&server.uri(), &AgentSettings::default());
    let local = Local::new(&agent);
    local.make("cli-vol", None).await;
    script.set(&[("cli-vol", None)], &[]);
    let api = agent.api.clone();
    let run = move |args: Vec<&'static str>| {
        let api = api.clone();
        tokio::task::spawn_blocking(move || {
            let mut all: Vec<&str> = args.clone();
            all.extend(["--api", api.as_str()]);
            cli(&all)
        })
    };
    let (code, out, err) = run(vec!["volumes", "list"]).await.expect("cli");
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("cli-vol"), "{out}");
    let (code, out, err) = run(vec!["volumes", "inspect", "cli-vol"])
        .await
        .expect("cli");
    assert_eq!(code, 0, "{err}");
    let v: Value = serde_json::from_str(&out).expect("inspect prints JSON");
    assert_eq!(v["handle"], "cli-vol");
    let (code, _, err) = run(vec!["volumes", "inspect", "ghost"]).await.expect("cli");
    assert_ne!(code, 0);
    assert!(err.contains("ghost"), "{err}");
    eventually("the agent applied a desired set", || async {
        local
            .metric("volume_agent_desired_revision")
            .await
            .unwrap_or(0.0)
            >= 2.0
    })
    .await;
    let (code, out, err) = run(vec!["gc", "plan", "--json"]).await.expect("cli");
    assert_eq!(code, 0, "{err}");
    let plan: Value = serde_json::from_str(&out).expect("plan JSON");
    assert!(plan["actions"].is_array(), "{plan}");
    let (code, _, err) = run(vec!["gc", "reset-revision"]).await.expect("cli");
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        local.handles().await,
        ["cli-vol"],
        "the CLI destroyed nothing"
    );
}

#[tokio::test]
async fn config_check_accepts_a_good_config_and_names_an_unknown_key() {
    let server = MockServer::start().await;
    let agent = Agent::start(&server.uri(), &AgentSettings::default());
    let config = agent.config_path.to_str().expect("utf-8 path").to_string();
    let (code, out, err) = cli(&["config", "check", "--config", &config]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("ok"), "{out}");
    let bad = agent.dir.path().join("bad.toml");
    let text = std::fs::read_to_string(&agent.config_path).expect("config");
    std::fs::write(&bad, format!("{text}frobnicate_level = 3\n")).expect("bad config");
    let (code, _, err) = cli(&["config", "check", "--config", bad.to_str().expect("utf-8")]);
    // 78 (EX_CONFIG): the systemd unit does not restart on it.
    assert_eq!(code, 78);
    assert!(err.contains("frobnicate_level"), "{err}");
}

/// A `volume-agent run` started by hand (extra flags, another listen address), killed
/// when dropped.
struct Daemon(std::process::Child);

impl Daemon {
    fn start(agent: &Agent, extra: &[&str], log: &Path) -> Daemon {
        Daemon::start_with_rust_log(agent, extra, log, Some("info"))
    }

    /// `rust_log`: the `RUST_LOG` to set, or `None` to leave it unset.
    fn start_with_rust_log(
        agent: &Agent,
        extra: &[&str],
        log: &Path,
        rust_log: Option<&str>,
    ) -> Daemon {
        let log = std::fs::File::create(log).expect("log file");
        let mut cmd = Command::new(agent_binary());
        cmd.env_remove("RUST_LOG");
        if let Some(filter) = rust_log {
            cmd.env("RUST_LOG", filter);
        }
        let child = cmd
            .args(["run", "--config"])
            .arg(&agent.config_path)
            .args(extra)
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone().expect("log fd"))
            .stderr(log)
            .spawn()
            .expect("start volume-agent");
        Daemon(child)
    }

    /// SIGTERM and wait; the exit code.
    fn terminate(mut self) -> Option<i32> {
        // SAFETY: kill(2) on our own child's pid with a valid signal number.
        unsafe {
            libc::kill(self.0.id() as libc::pid_t, libc::SIGTERM);
        }
        self.0.wait().ok().and_then(|s| s.code())
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Waits for `GET {base}/readyz` to answer 200 through `http`.
async fn wait_ready(http: &reqwest::Client, base: &str) {
    eventually("the hand-started agent is ready", || async {
        match http.get(format!("{base}/readyz")).send().await {
            Ok(r) => r.status() == StatusCode::OK,
            Err(_) => false,
        }
    })
    .await;
}

#[tokio::test]
async fn readyz_waits_for_the_first_central_answer() {
    let server = MockServer::start().await;
    let set = protocol::native::DesiredSet {
        worker: "w1".into(),
        revision: 1,
        as_of: chrono::Utc::now(),
        volumes: vec![],
        destroying: vec![],
    };
    Mock::given(method("GET"))
        .and(path("/api/v1/workers/w1/volumes/desired"))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(&set)
                .set_delay(std::time::Duration::from_secs(3)),
        )
        .mount(&server)
        .await;
    let settings = AgentSettings {
        request_timeout: "20s",
        ..AgentSettings::default()
    };
    let started = std::time::Instant::now();
    // Agent::start returns once /readyz answers 200.
    let agent = Agent::start(&server.uri(), &settings);
    let waited = started.elapsed();
    assert!(
        waited >= std::time::Duration::from_millis(2500),
        "ready after {waited:?}, before the first answer (3 s) came"
    );
    let local = Local::new(&agent);
    assert_eq!(local.metric("volume_agent_ready").await, Some(1.0));
}

#[tokio::test]
async fn readyz_is_ready_while_central_errors_are_retried() {
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .respond_with(ResponseTemplate::new(500))
        .mount(&server)
        .await;
    let agent = Agent::start(&server.uri(), &AgentSettings::default());
    let local = Local::new(&agent);
    let (status, body) = send(&local, reqwest::Method::GET, "/readyz", None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(
        local
            .metric(
                "volume_agent_central_requests_total{endpoint=\"desired\",outcome=\"status_5xx\"}"
            )
            .await
            .unwrap_or(0.0)
            >= 1.0
    );
}

/// Rewrites the (stopped) agent's `api.listen` to the unix socket `sock`.
fn listen_on_unix_socket(agent: &Agent, sock: &Path) {
    let text = std::fs::read_to_string(&agent.config_path).expect("config");
    let tcp_line = text
        .lines()
        .find(|l| l.starts_with("listen = "))
        .expect("listen line")
        .to_string();
    let text = text.replace(&tcp_line, &format!("listen = \"unix:{}\"", sock.display()));
    std::fs::write(&agent.config_path, text).expect("config");
}

#[tokio::test]
async fn local_api_and_cli_work_over_a_unix_socket() {
    let server = MockServer::start().await;
    let mut agent = Agent::start(&server.uri(), &AgentSettings::default());
    assert_eq!(agent.terminate(), Some(0));
    // The same agent, now on a unix socket in a directory that does not exist yet.
    let sock = agent.dir.path().join("run/api.sock");
    listen_on_unix_socket(&agent, &sock);
    let log = agent.dir.path().join("uds.log");
    let daemon = Daemon::start(&agent, &[], &log);
    let http = reqwest::Client::builder()
        .unix_socket(sock.as_path())
        .build()
        .expect("client");
    wait_ready(&http, "http://localhost").await;
    let local = Local {
        base: "http://localhost".into(),
        http,
    };
    local.make("over-uds", None).await;
    assert_eq!(local.handles().await, ["over-uds"]);

    let config = agent.config_path.to_str().expect("utf-8").to_string();
    let api = format!("unix:{}", sock.display());
    let (code, out, err) = tokio::task::spawn_blocking(move || {
        // No --api: the address comes from the config's api.listen.
        let list = cli(&["volumes", "list", "--config", &config]);
        let inspect = cli(&["volumes", "inspect", "over-uds", "--api", &api]);
        (list, inspect)
    })
    .await
    .map(|(list, inspect)| {
        assert_eq!(inspect.0, 0, "{}", inspect.2);
        let v: Value = serde_json::from_str(&inspect.1).expect("inspect prints JSON");
        assert_eq!(v["handle"], "over-uds");
        list
    })
    .expect("cli");
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("over-uds"), "{out}");

    assert_eq!(daemon.terminate(), Some(0));
    assert!(!sock.exists(), "the socket is removed at shutdown");
}

#[tokio::test]
async fn a_file_in_the_way_of_the_unix_socket_is_an_error_and_is_kept() {
    let server = MockServer::start().await;
    let mut agent = Agent::start(&server.uri(), &AgentSettings::default());
    assert_eq!(agent.terminate(), Some(0));
    let sock = agent.dir.path().join("not-a-socket");
    std::fs::write(&sock, "precious").expect("file");
    listen_on_unix_socket(&agent, &sock);
    let log = agent.dir.path().join("uds.log");
    let mut daemon = Daemon::start(&agent, &[], &log);
    let status = daemon.0.wait().expect("wait");
    assert!(!status.success());
    let err = std::fs::read_to_string(&log).expect("log");
    assert!(err.contains("api.listen"), "{err}");
    assert_eq!(std::fs::read_to_string(&sock).expect("kept"), "precious");
}

#[tokio::test]
async fn run_with_log_format_json_writes_json_lines_and_one_per_destroyed_volume() {
    let server = MockServer::start().await;
    let mut agent = Agent::start(&server.uri(), &AgentSettings::default());
    assert_eq!(agent.terminate(), Some(0));
    let log = agent.dir.path().join("json.log");
    let daemon = Daemon::start(&agent, &["--log-format", "json"], &log);
    let local = Local::new(&agent);
    wait_ready(&local.http, &local.base).await;
    local.make("logged", None).await;
    let (status, _) = send(&local, reqwest::Method::DELETE, "/volumes/logged", None).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    assert_eq!(daemon.terminate(), Some(0));
    let text = std::fs::read_to_string(&log).expect("log");
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    assert!(lines.len() > 3, "{text}");
    assert!(lines
        .iter()
        .all(|l| l["level"].is_string() && l["message"].is_string()));
    let destroyed: Vec<&Value> = lines
        .iter()
        .filter(|l| l["message"] == "destroyed volume")
        .collect();
    assert_eq!(destroyed.len(), 1, "{text}");
    assert_eq!(destroyed[0]["handle"], "logged");
    assert!(destroyed[0]["reason"]
        .as_str()
        .is_some_and(|r| !r.is_empty()));
}

#[tokio::test]
async fn log_level_comes_from_the_config_unless_rust_log_is_set() {
    let server = MockServer::start().await;
    let mut agent = Agent::start(&server.uri(), &AgentSettings::default());
    assert_eq!(agent.terminate(), Some(0));
    let mut text = std::fs::read_to_string(&agent.config_path).expect("config");
    text.push_str("[log]\nlevel = \"warn\"\n");
    std::fs::write(&agent.config_path, text).expect("config");
    let local = Local::new(&agent);
    for (rust_log, info_shown) in [(None, false), (Some("info"), true)] {
        let log = agent.dir.path().join("level.log");
        let daemon = Daemon::start_with_rust_log(&agent, &[], &log, rust_log);
        wait_ready(&local.http, &local.base).await;
        assert_eq!(daemon.terminate(), Some(0));
        let text = std::fs::read_to_string(&log).expect("log");
        assert_eq!(
            text.contains("volume-agent running"),
            info_shown,
            "RUST_LOG={rust_log:?}, log.level = warn:\n{text}"
        );
    }
}

#[test]
fn cli_prints_its_version_and_errors_as_one_line_with_a_non_zero_exit() {
    let (code, out, _) = cli(&["--version"]);
    assert_eq!(code, 0);
    assert_eq!(
        out.trim(),
        format!("volume-agent {}", env!("CARGO_PKG_VERSION"))
    );
    // Nothing listens on the port: one line on stderr, exit 1.
    let api = format!("http://127.0.0.1:{}", free_port());
    for args in [
        vec!["volumes", "list", "--api", api.as_str()],
        vec!["gc", "plan", "--api", api.as_str()],
        vec![
            "config",
            "check",
            "--config",
            "/nonexistent/volume-agent.toml",
        ],
    ] {
        let (code, out, err) = cli(&args);
        assert_ne!(code, 0, "{args:?}");
        assert!(out.is_empty(), "{args:?}: {out}");
        assert_eq!(err.trim_end().lines().count(), 1, "{args:?}: {err}");
        assert!(err.starts_with("volume-agent: error: "), "{args:?}: {err}");
    }
}

#[tokio::test]
async fn gc_plan_names_what_the_next_pass_would_destroy_and_why_and_destroys_nothing() {
    let script = DesiredScript::new("w1");
    // An answer from the future: an unknown volume is past the (zero) grace by both clocks.
    script.with(|s| s.as_of = Some(chrono::Utc::now() + chrono::Duration::hours(1)));
    let server = scripted_central(&script).await;
    let settings = AgentSettings {
        unknown_grace: "0s",
        ..AgentSettings::default()
    };
    let agent = Agent::start(&server.uri(), &settings);
    let local = Local::new(&agent);
    local
        .wait_counter(
            "the first answer applied",
            "volume_agent_desired_revision",
            1.0,
        )
        .await;
    // From now on the central side fails: no pass runs, the plan is only shown.
    script.with(|s| s.override_response = Some(ResponseTemplate::new(500)));
    local
        .wait_counter(
            "a failed poll",
            "volume_agent_central_requests_total{endpoint=\"desired\",outcome=\"status_5xx\"}",
            1.0,
        )
        .await;
    let doomed_path = local.make("doomed", None).await.path;
    let api = agent.api.clone();
    let (code, out, err) =
        tokio::task::spawn_blocking(move || cli(&["gc", "plan", "--json", "--api", &api]))
            .await
            .expect("cli");
    assert_eq!(code, 0, "{err}");
    let plan: Value = serde_json::from_str(&out).expect("plan JSON");
    let doomed = plan["actions"]
        .as_array()
        .and_then(|a| a.iter().find(|x| x["handle"] == "doomed"))
        .unwrap_or_else(|| panic!("doomed not in {plan}"));
    assert_eq!(doomed["action"], "destroy", "{plan}");
    assert!(
        doomed["reason"]
            .as_str()
            .is_some_and(|r| r.contains("unknown")),
        "{plan}"
    );
    let api = agent.api.clone();
    let (code, out, err) = tokio::task::spawn_blocking(move || cli(&["gc", "plan", "--api", &api]))
        .await
        .expect("cli");
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("doomed") && out.contains("destroy"), "{out}");
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    assert_eq!(
        local.handles().await,
        ["doomed"],
        "gc plan destroyed nothing"
    );
    assert!(Path::new(&doomed_path).exists());
}
