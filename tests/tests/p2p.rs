//! Worker-to-worker streaming between two real agents on loopback addresses (127.0.0.2 and
//! 127.0.0.3 are loopback too): `GET /p2p-url` on the destination, `PUT
//! /volumes/{h}/stream-p2p-out` on the source, and the destination's P2P listener, which
//! takes stream-in only, only from `p2p.allowed_networks`, only into volumes nothing has
//! read yet.

use std::path::Path;

use e2e::wiremock::MockServer;
use e2e::*;
use reqwest::StatusCode;
use serde_json::{json, Value};

/// An agent whose P2P listener is on `ip` (any port), admitting `allowed`.
fn p2p_agent(server: &MockServer, worker: &str, ip: &str, allowed: &[&str]) -> Agent {
    let settings = AgentSettings {
        worker: worker.into(),
        extra: format!("\n[p2p]\nlisten = \"{ip}:0\"\nallowed_networks = {allowed:?}\n"),
        ..AgentSettings::default()
    };
    Agent::start(&server.uri(), &settings)
}

async fn p2p_url(local: &Local) -> (StatusCode, String) {
    let resp = local
        .http
        .get(format!("{}/p2p-url", local.base))
        .send()
        .await
        .expect("p2p-url");
    (resp.status(), resp.text().await.unwrap_or_default())
}

/// What baggageclaim's client builds: the p2p URL's scheme and host, the stream-in path.
async fn stream_in_url(dest: &Local, handle: &str, path: &str) -> String {
    let (status, url) = p2p_url(dest).await;
    assert_eq!(status, StatusCode::OK, "{url}");
    format!("{url}/volumes/{handle}/stream-in?path={path}")
}

async fn p2p_out(src: &Local, handle: &str, path: &str, url: &str) -> (StatusCode, Value) {
    let resp = src
        .http
        .put(format!("{}/volumes/{handle}/stream-p2p-out", src.base))
        .query(&[("path", path), ("encoding", "gzip"), ("streamInURL", url)])
        .send()
        .await
        .expect("stream-p2p-out");
    let status = resp.status();
    let text = resp.text().await.unwrap_or_default();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

fn data_dir(v: &Value) -> &Path {
    Path::new(v["path"].as_str().expect("volume path"))
}

#[tokio::test(flavor = "multi_thread")]
async fn streams_a_volume_to_another_worker_only_into_volumes_nothing_has_read() {
    let server = MockServer::start().await;
    // a (127.0.0.2) sends, b (127.0.0.3) receives and admits only a's address.
    let a = p2p_agent(&server, "a", "127.0.0.2", &["127.0.0.2/32"]);
    let b = p2p_agent(&server, "b", "127.0.0.3", &["127.0.0.2/32"]);
    let (la, lb) = (Local::new(&a), Local::new(&b));

    let (status, url) = p2p_url(&lb).await;
    assert_eq!(status, StatusCode::OK);
    assert!(url.starts_with("http://127.0.0.3:"), "{url}");

    let src = la.make("src", None).await;
    std::fs::create_dir_all(Path::new(&src.path).join("out/deep")).expect("dirs");
    std::fs::write(Path::new(&src.path).join("out/deep/f"), b"payload").expect("file");

    // Into an empty volume an async create made (what Concourse streams into).
    let dst = make_async(&lb, "dst", json!({"type": "empty"}), false).await;
    let url = stream_in_url(&lb, "dst", "sub").await;
    let (status, body) = p2p_out(&la, "src", "out", &url).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        body,
        Value::String(String::new()),
        "an empty 200, as baggageclaim"
    );
    let got = std::fs::read(data_dir(&dst).join("sub/deep/f")).expect("streamed file");
    assert_eq!(got, b"payload");

    // Once dst is read (streamed out locally), peers may no longer write into it.
    let resp = lb
        .http
        .put(format!("{}/volumes/dst/stream-out", lb.base))
        .query(&[("path", "sub")])
        .header("Accept-Encoding", "gzip")
        .send()
        .await
        .expect("stream-out");
    assert_eq!(resp.status(), StatusCode::OK);
    let _ = resp.bytes().await;
    let (status, body) = p2p_out(&la, "src", "out", &url).await;
    assert_eq!(status, StatusCode::BAD_GATEWAY, "{body}");
    let msg = body["error"].as_str().unwrap_or_default();
    assert!(
        msg.contains("409") && msg.contains("nothing has read yet"),
        "{msg}"
    );

    // Nor into an initialized volume of the agent's own lifecycle, nor a parent.
    lb.make("sealed", None).await;
    let url = stream_in_url(&lb, "sealed", ".").await;
    let (status, body) = p2p_out(&la, "src", "out", &url).await;
    assert_eq!(status, StatusCode::BAD_GATEWAY, "{body}");
    let parent = make_async(&lb, "parent", json!({"type": "empty"}), false).await;
    make_async(
        &lb,
        "kid",
        json!({"type": "cow", "volume": "parent"}),
        false,
    )
    .await;
    let url = stream_in_url(&lb, "parent", ".").await;
    let (status, body) = p2p_out(&la, "src", "out", &url).await;
    assert_eq!(status, StatusCode::BAD_GATEWAY, "{body}");
    assert!(!data_dir(&parent).join("deep").exists());

    // A volume still `created` takes it.
    let resp = lb
        .http
        .post(format!("{}/volumes", lb.base))
        .json(&json!({"handle": "fresh", "strategy": {"type": "empty"}}))
        .send()
        .await
        .expect("create");
    assert_eq!(resp.status(), StatusCode::CREATED);
    let fresh: Value = resp.json().await.expect("json");
    let url = stream_in_url(&lb, "fresh", ".").await;
    let (status, body) = p2p_out(&la, "src", "out", &url).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(data_dir(&fresh).join("deep/f").is_file());

    // A missing source path is baggageclaim's file-not-found error.
    let (status, body) = p2p_out(&la, "src", "nope", &url).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    assert_eq!(body["error"], "no such file or directory");
    // A missing parameter is the caller's mistake.
    let (status, _) = p2p_out(&la, "src", "", &url).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, _) = p2p_out(&la, "src", "out", "file:///etc/passwd").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
}

#[tokio::test(flavor = "multi_thread")]
async fn p2p_listener_serves_only_stream_in_and_only_to_allowed_networks() {
    let server = MockServer::start().await;
    let b = p2p_agent(&server, "b", "127.0.0.3", &["127.0.0.2/32"]);
    let lb = Local::new(&b);
    make_async(&lb, "dst", json!({"type": "empty"}), false).await;
    let (_, base) = p2p_url(&lb).await;
    let tar_gz = {
        use std::io::Write;
        let mut builder = tar::Builder::new(Vec::new());
        let mut header = tar::Header::new_gnu();
        header.set_size(2);
        header.set_mode(0o644);
        header.set_uid(0);
        header.set_gid(0);
        header.set_mtime(0);
        header.set_cksum();
        builder
            .append_data(&mut header, "x", &b"hi"[..])
            .expect("tar entry");
        let tar = builder.into_inner().expect("tar");
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&tar).expect("gzip");
        gz.finish().expect("gzip")
    };
    let from = |ip: &str| {
        reqwest::Client::builder()
            .local_address(ip.parse::<std::net::IpAddr>().ok())
            .build()
            .expect("client")
    };
    let put = |client: reqwest::Client, path: String| {
        let body = tar_gz.clone();
        async move {
            let resp = client
                .put(path)
                .header("Content-Encoding", "gzip")
                .body(body)
                .send()
                .await
                .expect("peer request");
            let status = resp.status();
            (status, resp.json::<Value>().await.unwrap_or(Value::Null))
        }
    };

    // 127.0.0.1 is not in allowed_networks.
    let (status, err) = put(
        from("127.0.0.1"),
        format!("{base}/volumes/dst/stream-in?path=."),
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{err}");
    let msg = err["error"].as_str().unwrap_or_default();
    assert!(
        msg.contains("127.0.0.1") && msg.contains("p2p.allowed_networks"),
        "{msg}"
    );
    let dst: Value = lb
        .http
        .get(format!("{}/volumes/dst", lb.base))
        .send()
        .await
        .expect("get")
        .json()
        .await
        .expect("json");
    assert!(!data_dir(&dst).join("x").exists(), "nothing written");

    // An allowed peer reaches stream-in and nothing else.
    let peer = from("127.0.0.2");
    for (method, path) in [
        ("GET", "/volumes"),
        ("GET", "/volumes/dst"),
        ("DELETE", "/volumes/dst"),
        ("GET", "/p2p-url"),
        ("PUT", "/volumes/dst/stream-out?path=."),
        ("POST", "/volumes"),
    ] {
        let resp = peer
            .request(method.parse().expect("method"), format!("{base}{path}"))
            .send()
            .await
            .expect("peer request");
        assert_eq!(resp.status(), StatusCode::NOT_FOUND, "{method} {path}");
    }
    // A browser on an allowed address is refused too.
    let resp = peer
        .put(format!("{base}/volumes/dst/stream-in?path=."))
        .header("Origin", "http://evil.example")
        .header("Content-Encoding", "gzip")
        .body(tar_gz.clone())
        .send()
        .await
        .expect("browser request");
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    // Tar mistakes are the same 400s as on the local API.
    let (status, err) = put(
        peer.clone(),
        format!("{base}/volumes/dst/stream-in?path=../.."),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{err}");
    assert!(
        err["error"].as_str().unwrap_or_default().contains(".."),
        "{err}"
    );

    let (status, err) = put(peer, format!("{base}/volumes/dst/stream-in?path=.")).await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{err}");
    assert_eq!(std::fs::read(data_dir(&dst).join("x")).expect("x"), b"hi");
}

#[tokio::test(flavor = "multi_thread")]
async fn p2p_url_is_404_naming_the_setting_when_p2p_is_off() {
    let server = MockServer::start().await;
    let agent = Agent::start(&server.uri(), &AgentSettings::default());
    let (status, body) = p2p_url(&Local::new(&agent)).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(body.contains("p2p.listen"), "{body}");
}
