//! The local API serves only trusted local callers (SECURITY.md, "volume-agent"): the real
//! agent, with a probe run as uid 65534 (`nobody`) in a child process.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use e2e::wiremock::MockServer;
use e2e::*;
use reqwest::StatusCode;
use serde_json::{json, Value};

const NOBODY: u32 = 65534;

/// Every route of the local API, with a body where the route takes one.
const ROUTES: &[(&str, &str, &str)] = &[
    ("GET", "/healthz", ""),
    ("GET", "/readyz", ""),
    ("GET", "/metrics", ""),
    ("GET", "/usage", ""),
    ("GET", "/gc/plan", ""),
    ("POST", "/gc/reset-revision", ""),
    (
        "POST",
        "/volumes",
        r#"{"handle":"x","strategy":{"type":"empty"}}"#,
    ),
    ("GET", "/volumes", ""),
    ("DELETE", "/volumes/destroy", r#"["v"]"#),
    ("GET", "/volumes/v", ""),
    ("GET", "/inventory", ""),
    ("GET", "/inventory/v", ""),
    ("GET", "/p2p-url", ""),
    (
        "PUT",
        "/volumes/v/stream-p2p-out?path=.&encoding=gzip&streamInURL=http://127.0.0.1:9/volumes/w/stream-in",
        "",
    ),
    ("DELETE", "/volumes/v", ""),
    ("PUT", "/volumes/v/properties/k", r#"{"value":"x"}"#),
    ("PUT", "/volumes/v/state", r#"{"state":"initialized"}"#),
    ("GET", "/volumes/v/privileged", ""),
    ("PUT", "/volumes/v/privileged", r#"{"value":true}"#),
    ("PUT", "/volumes/v/stream-in?path=.", ""),
    ("PUT", "/volumes/v/stream-out?path=.", ""),
    (
        "POST",
        "/volumes-async",
        r#"{"handle":"y","strategy":{"type":"import","path":"/etc"}}"#,
    ),
    ("GET", "/volumes-async/v", ""),
    ("DELETE", "/volumes-async/v", ""),
    ("GET", "/no-such-route", ""),
];

/// What `api-probe` got: the status (`None` when it could not connect) and the body or
/// the connection error.
struct Probe {
    status: Option<u16>,
    text: String,
}

/// Makes the agent's directory traversable and puts a copy of `api-probe` in it, so a
/// process of another user can run it and reach the socket.
fn probe_for_others(agent: &Agent) -> PathBuf {
    std::fs::set_permissions(agent.dir.path(), std::fs::Permissions::from_mode(0o755))
        .expect("chmod agent dir");
    let copy = agent.dir.path().join("api-probe");
    if !copy.exists() {
        std::fs::copy(env!("CARGO_BIN_EXE_api-probe"), &copy).expect("copy api-probe");
    }
    copy
}

/// One request to the agent's API from a process running as `uid` (group `gid`, no
/// supplementary groups), with `headers`.
fn probe_as(
    agent: &Agent,
    uid: u32,
    gid: u32,
    (method, path, body): (&str, &str, &str),
    headers: &[&str],
) -> Probe {
    let exe = probe_for_others(agent);
    let target = match agent.socket() {
        Some(sock) => format!("unix:{}", sock.display()),
        None => agent.api.trim_start_matches("http://").to_string(),
    };
    let run = || {
        let mut cmd = Command::new(&exe);
        cmd.args([&target, method, path, "--body", body]);
        for h in headers {
            cmd.args(["--header", h]);
        }
        // As root, std drops the supplementary groups when it sets the uid.
        cmd.uid(uid).gid(gid);
        cmd.output()
    };
    // A test on another thread may fork while the copy is still open for writing; its child
    // holds that descriptor until it execs, and exec of the copy fails with ETXTBSY meanwhile.
    let mut tries = 0;
    let out = loop {
        match run() {
            Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) && tries < 100 => {
                tries += 1;
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            other => break other.expect("run api-probe"),
        }
    };
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    match out.status.code() {
        Some(0) => {
            let (status, body) = stdout.split_once('\n').unwrap_or((&stdout, ""));
            Probe {
                status: status.trim().parse().ok(),
                text: body.to_string(),
            }
        }
        _ => Probe {
            status: None,
            text: String::from_utf8_lossy(&out.stderr).into_owned(),
        },
    }
}

async fn start(settings: AgentSettings) -> (MockServer, Agent, Local) {
    let server = MockServer::start().await;
    let agent = Agent::start(&server.uri(), &settings);
    let local = Local::new(&agent);
    (server, agent, local)
}

/// As uid 65534 every route answers 403 naming the uid and the keys to change; nothing
/// changes; root is still served; the refusal is logged with the uid.
async fn assert_nobody_refused_everywhere(agent: &Agent, local: &Local) {
    local.make("v", None).await;
    for route in ROUTES {
        let p = probe_as(agent, NOBODY, NOBODY, *route, &[]);
        assert_eq!(p.status, Some(403), "{route:?}: {}", p.text);
        let err: Value = serde_json::from_str(
            p.text
                .trim()
                .trim_start_matches(|c: char| c.is_ascii_hexdigit() && c != '{'),
        )
        .unwrap_or(Value::String(p.text.clone()));
        let msg = err["error"].as_str().unwrap_or(&p.text).to_string();
        assert!(msg.contains("uid 65534"), "{route:?}: {msg}");
        assert!(msg.contains("api.allowed_uids"), "{route:?}: {msg}");
    }
    assert_eq!(local.handles().await, vec!["v"], "nothing changed");
    let resp = local
        .http
        .get(format!("{}/volumes/v/privileged", local.base))
        .send()
        .await
        .expect("privileged");
    assert_eq!(resp.text().await.expect("body"), "false");
    let log = agent.log();
    assert!(
        log.lines()
            .any(|l| l.contains("refused a local API caller") && l.contains("uid: 65534")),
        "{log}"
    );
}

#[tokio::test]
async fn every_route_answers_403_to_uid_65534_over_tcp() {
    let (_s, agent, local) = start(AgentSettings::default()).await;
    assert_nobody_refused_everywhere(&agent, &local).await;
}

#[tokio::test]
async fn every_route_answers_403_to_uid_65534_on_the_unix_socket() {
    // The socket's group lets nobody's group connect; SO_PEERCRED still refuses it.
    let (_s, agent, local) = start(AgentSettings {
        unix_socket: true,
        api_extra: format!("group = \"{NOBODY}\"\n"),
        ..AgentSettings::default()
    })
    .await;
    let sock = agent.socket().expect("socket");
    let meta = std::fs::metadata(&sock).expect("socket metadata");
    assert_eq!(meta.mode() & 0o7777, 0o660);
    assert_eq!(meta.gid(), NOBODY);
    assert_nobody_refused_everywhere(&agent, &local).await;
}

#[tokio::test]
async fn socket_is_0660_under_umask_000_and_closed_to_other_users() {
    let (_s, agent, local) = start(AgentSettings {
        unix_socket: true,
        umask: Some(0),
        ..AgentSettings::default()
    })
    .await;
    let meta = std::fs::metadata(agent.socket().expect("socket")).expect("socket metadata");
    assert_eq!(meta.mode() & 0o7777, 0o660);
    assert_eq!(meta.gid(), 0);
    let p = probe_as(&agent, NOBODY, NOBODY, ("GET", "/volumes", ""), &[]);
    assert_eq!(p.status, None, "nobody cannot even connect: {}", p.text);
    assert!(p.text.contains("ermission denied"), "{}", p.text);
    // Root is served on the socket.
    local.make("v", None).await;
    assert_eq!(local.handles().await, vec!["v"]);
}

#[tokio::test]
async fn allowed_uids_and_allowed_groups_admit_a_user() {
    for extra in [
        format!("allowed_uids = [0, {NOBODY}]\n"),
        // nobody's primary group in the user database; TCP reports only the uid.
        format!("allowed_groups = [{}]\n", primary_gid(NOBODY)),
    ] {
        let (_s, agent, local) = start(AgentSettings {
            api_extra: extra.clone(),
            ..AgentSettings::default()
        })
        .await;
        local.make("v", None).await;
        let p = probe_as(&agent, NOBODY, NOBODY, ("GET", "/volumes/v", ""), &[]);
        assert_eq!(p.status, Some(200), "{extra}: {}", p.text);
        assert!(p.text.contains("\"handle\":\"v\""), "{}", p.text);
    }
}

/// The primary gid of `uid` in the user database.
fn primary_gid(uid: u32) -> u32 {
    let passwd = std::fs::read_to_string("/etc/passwd").expect("user database");
    passwd
        .lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .find(|f| f.get(2) == Some(&uid.to_string().as_str()))
        .and_then(|f| f.get(3)?.parse().ok())
        .expect("an entry for the uid")
}

#[tokio::test]
async fn requests_from_a_web_browser_are_refused() {
    let (_s, agent, local) = start(AgentSettings::default()).await;
    for (name, value) in [
        ("Origin", "http://evil.example"),
        ("Sec-Fetch-Site", "cross-site"),
        ("Sec-Fetch-Site", "same-origin"),
    ] {
        let resp = local
            .http
            .post(format!("{}/volumes", local.base))
            .header(name, value)
            .json(&create_request("b", None))
            .send()
            .await
            .expect("request");
        assert_eq!(resp.status(), StatusCode::FORBIDDEN, "{name}");
        let err: Value = resp.json().await.expect("json error");
        let msg = err["error"].as_str().expect("error string");
        assert!(
            msg.to_ascii_lowercase()
                .contains(&name.to_ascii_lowercase()),
            "{msg}"
        );
    }
    assert!(local.handles().await.is_empty());
    // Also for a caller that would be allowed otherwise, on every transport: the probe as
    // root sends the header over a raw connection.
    let p = probe_as(&agent, 0, 0, ("GET", "/volumes", ""), &["Origin: null"]);
    assert_eq!(p.status, Some(403), "{}", p.text);
}

async fn import(local: &Local, handle: &str, path: &Path) -> reqwest::Response {
    local
        .http
        .post(format!("{}/volumes-async", local.base))
        .json(&json!({"handle": handle, "strategy": {"type": "import", "path": path}}))
        .send()
        .await
        .expect("create-async")
}

#[tokio::test]
async fn import_reads_only_beneath_the_import_roots() {
    let (_s, agent, local) = start(AgentSettings::default()).await;
    let inside = agent.imports_dir().join("rootfs");
    std::fs::create_dir(&inside).expect("rootfs");
    std::fs::write(inside.join("a.txt"), b"allowed").expect("a");
    let outside = tempfile::tempdir().expect("outside");
    std::fs::write(outside.path().join("secret"), b"secret").expect("secret");
    std::os::unix::fs::symlink(outside.path(), agent.imports_dir().join("escape"))
        .expect("symlink");

    for (h, path) in [
        ("etc", PathBuf::from("/etc")),
        ("out", outside.path().to_owned()),
        ("link", agent.imports_dir().join("escape")),
        ("dots", agent.imports_dir().join("../resource-types")),
    ] {
        let resp = import(&local, h, &path).await;
        assert_eq!(resp.status(), StatusCode::FORBIDDEN, "{}", path.display());
        let err: Value = resp.json().await.expect("json error");
        let msg = err["error"].as_str().expect("error");
        assert!(msg.contains(&path.display().to_string()), "{msg}");
        assert!(msg.contains("api.import_roots"), "{msg}");
        let poll = local
            .http
            .get(format!("{}/volumes-async/{h}", local.base))
            .send()
            .await
            .expect("poll");
        assert_eq!(
            poll.status(),
            StatusCode::NOT_FOUND,
            "no create was started"
        );
    }
    assert!(local.handles().await.is_empty());

    let resp = import(&local, "ok", &inside).await;
    assert_eq!(resp.status(), StatusCode::CREATED);
    eventually("the import finishes", || async {
        local
            .http
            .get(format!("{}/volumes-async/ok", local.base))
            .send()
            .await
            .is_ok_and(|r| r.status() == StatusCode::OK)
    })
    .await;
    let v: Value = local
        .http
        .get(format!("{}/volumes/ok", local.base))
        .send()
        .await
        .expect("get")
        .json()
        .await
        .expect("json");
    let data = Path::new(v["path"].as_str().expect("path")).join("a.txt");
    assert_eq!(std::fs::read(data).expect("imported"), b"allowed");
}

fn minimal_config(dir: &Path, listen: &str, extra: &str) -> PathBuf {
    let config = dir.join("config.toml");
    std::fs::write(
        &config,
        format!(
            "worker_name = \"w1\"\n[central]\nurl = \"http://127.0.0.1:9\"\n\
             [volumes]\nroot = {:?}\ndriver = \"naive\"\n[state]\ndir = {:?}\n\
             [resource_types]\ndir = {:?}\n[api]\nlisten = \"{listen}\"\n{extra}",
            dir.join("volumes"),
            dir.join("state"),
            dir.join("types"),
        ),
    )
    .expect("write config");
    config
}

#[test]
fn a_non_loopback_listen_address_is_refused_without_allow_remote() {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let config = minimal_config(dir.path(), &format!("0.0.0.0:{port}"), "");
    let out = Command::new(agent_binary())
        .args(["run", "--config"])
        .arg(&config)
        .output()
        .expect("run agent");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("api.allow_remote"), "{stderr}");
    assert!(stderr.contains("0.0.0.0"), "{stderr}");
    assert!(
        !dir.path().join("state").exists(),
        "refused before touching anything"
    );

    let config = minimal_config(
        dir.path(),
        &format!("0.0.0.0:{port}"),
        "allow_remote = true\n",
    );
    let out = Command::new(agent_binary())
        .args(["config", "check", "--config"])
        .arg(&config)
        .output()
        .expect("config check");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn volumes_root_and_state_are_0700_and_metadata_files_0600() {
    // An install from before the rule: everything world-readable.
    let data = tempfile::tempdir().expect("data");
    for d in ["volumes", "state"] {
        std::fs::create_dir(data.path().join(d)).expect("mkdir");
        std::fs::set_permissions(data.path().join(d), std::fs::Permissions::from_mode(0o755))
            .expect("chmod");
    }
    let (_s, agent, local) = start(AgentSettings {
        data_dir: Some(data.path().to_owned()),
        umask: Some(0),
        ..AgentSettings::default()
    })
    .await;
    let v = local.make("v", None).await;
    let mode = |p: &Path| std::fs::metadata(p).expect("metadata").mode() & 0o7777;
    assert_eq!(mode(&agent.root()), 0o700);
    assert_eq!(mode(&agent.state_dir()), 0o700);
    let meta = Path::new(&v.path)
        .parent()
        .expect("volume dir")
        .join("meta.json");
    assert_eq!(mode(&meta), 0o600, "{}", meta.display());
    assert_eq!(mode(&agent.state_dir().join("inventory.lock")), 0o600);
    // The data directory itself stays what the volume needs (the container's root owns it).
    assert_ne!(mode(Path::new(&v.path)) & 0o700, 0);
}

#[tokio::test]
async fn metrics_listener_serves_only_metrics() {
    let port = free_port();
    let (_s, _agent, _local) = start(AgentSettings {
        extra: format!("\n[metrics]\nlisten = \"127.0.0.1:{port}\"\n"),
        ..AgentSettings::default()
    })
    .await;
    let http = reqwest::Client::new();
    let resp = http
        .get(format!("http://127.0.0.1:{port}/metrics"))
        .send()
        .await
        .expect("scrape");
    assert_eq!(resp.status(), StatusCode::OK);
    let text = resp.text().await.expect("text");
    assert!(text.contains("volume_agent_"), "{text}");
    for (method, path) in [
        ("GET", "/volumes"),
        ("GET", "/gc/plan"),
        ("POST", "/volumes"),
        ("GET", "/healthz"),
    ] {
        let resp = http
            .request(
                method.parse().expect("method"),
                format!("http://127.0.0.1:{port}{path}"),
            )
            .send()
            .await
            .expect("request");
        assert_eq!(resp.status(), StatusCode::NOT_FOUND, "{method} {path}");
    }
}
