//! Stream-in and stream-out against the real agent: each finding of the data-plane review
//! as a regression test (chained symlinks, device nodes, sparse entries, limits, stalled
//! uploads, a full stream pool, caller mistakes as 400s, bounded async-create futures).

use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use e2e::wiremock::MockServer;
use e2e::*;
use reqwest::StatusCode;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn start_with(api_extra: &str) -> (MockServer, Agent, Local) {
    let server = MockServer::start().await;
    let settings = AgentSettings {
        api_extra: api_extra.to_string(),
        ..AgentSettings::default()
    };
    let agent = Agent::start(&server.uri(), &settings);
    let local = Local::new(&agent);
    (server, agent, local)
}

/// Creates an empty volume and returns its data path.
async fn volume(local: &Local, h: &str, privileged: bool) -> PathBuf {
    let resp = local
        .http
        .post(format!("{}/volumes", local.base))
        .json(&json!({"handle": h, "strategy": {"type": "empty"}, "privileged": privileged}))
        .send()
        .await
        .expect("create");
    assert!(resp.status().is_success(), "create {h}: {}", resp.status());
    let v: Value = resp.json().await.expect("json");
    PathBuf::from(v["path"].as_str().expect("path"))
}

async fn stream_in(local: &Local, h: &str, enc: &str, body: Vec<u8>) -> (StatusCode, Value) {
    let resp = local
        .http
        .put(format!("{}/volumes/{h}/stream-in", local.base))
        .query(&[("path", ".")])
        .header("Content-Encoding", enc)
        .body(body)
        .send()
        .await
        .unwrap_or_else(|e| panic!("stream-in {h}: {e}"));
    let status = resp.status();
    (status, resp.json().await.unwrap_or(Value::Null))
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    gz.write_all(data).expect("gzip");
    gz.finish().expect("gzip")
}

/// A header with the fields every entry needs.
fn header(kind: tar::EntryType, size: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(0o644);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(0);
    h.set_size(size);
    h
}

/// One entry of a test tar: name, kind, link target, data.
type Entry<'a> = (&'a str, tar::EntryType, Option<&'a str>, &'a [u8]);

/// A tar of `entries`.
fn tar_of(entries: &[Entry<'_>]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (name, kind, link, data) in entries {
        let mut h = header(*kind, data.len() as u64);
        if *kind == tar::EntryType::Directory {
            h.set_mode(0o755);
        }
        match link {
            Some(l) => b.append_link(&mut h, name, l).expect("link"),
            None => b.append_data(&mut h, name, *data).expect("entry"),
        }
    }
    b.into_inner().expect("tar")
}

/// Everything under `dir`, relative to it.
fn names(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).expect("list") {
            let p = e.expect("entry").path();
            out.push(p.strip_prefix(dir).expect("under").display().to_string());
            if std::fs::symlink_metadata(&p).expect("meta").is_dir() {
                stack.push(p);
            }
        }
    }
    out.sort();
    out
}

fn error_of(body: &Value) -> String {
    body["error"].as_str().unwrap_or_default().to_string()
}

#[tokio::test]
async fn chained_relative_symlinks_escaping_the_volume_are_refused_naming_the_entry() {
    let (_s, _agent, local) = start_with("").await;
    let data = volume(&local, "chain", true).await;
    use tar::EntryType::{Directory, Symlink};
    let chain = "d1/d2/d3/d4/d5/d6/d7/d8";
    let dirs: Vec<String> = (1..=8)
        .map(|i| {
            (1..=i)
                .map(|j| format!("d{j}"))
                .collect::<Vec<_>>()
                .join("/")
        })
        .collect();
    let back = format!("{chain}/back");
    let esc_target = format!("{chain}/back/../../../../../../../..");
    let mut entries: Vec<Entry<'_>> = dirs
        .iter()
        .map(|d| (d.as_str(), Directory, None, &b""[..]))
        .collect();
    entries.push((&back, Symlink, Some("../../../../../../../.."), b""));
    entries.push(("esc", Symlink, Some(&esc_target), b""));
    let (status, body) = stream_in(&local, "chain", "gzip", gzip(&tar_of(&entries))).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(error_of(&body).contains("\"esc\""), "{body}");
    assert!(names(&data).is_empty(), "left behind: {:?}", names(&data));
}

/// A device node entry.
fn device(name: &str, kind: tar::EntryType, major: u32, minor: u32) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let mut h = header(kind, 0);
    h.set_mode(0o666);
    h.set_device_major(major).expect("major");
    h.set_device_minor(minor).expect("minor");
    b.append_data(&mut h, name, std::io::empty())
        .expect("entry");
    b.into_inner().expect("tar")
}

#[tokio::test]
async fn device_nodes_are_refused_in_an_unprivileged_volume() {
    let (_s, _agent, local) = start_with("").await;
    let data = volume(&local, "dev", false).await;
    for (name, kind, major, minor) in [
        ("disk", tar::EntryType::Block, 254, 0),
        ("mem", tar::EntryType::Char, 1, 1),
    ] {
        let (status, body) =
            stream_in(&local, "dev", "raw", device(name, kind, major, minor)).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
        assert!(error_of(&body).contains(&format!("\"{name}\"")), "{body}");
        assert!(error_of(&body).contains("privileged"), "{body}");
    }
    assert!(names(&data).is_empty(), "{:?}", names(&data));
    // A privileged volume takes them (a root agent can make them).
    let pdata = volume(&local, "pdev", true).await;
    let (status, body) = stream_in(
        &local,
        "pdev",
        "raw",
        device("null", tar::EntryType::Char, 1, 3),
    )
    .await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
    assert!(std::os::unix::fs::FileTypeExt::is_char_device(
        &std::fs::symlink_metadata(pdata.join("null"))
            .expect("node")
            .file_type()
    ));
}

fn octal(field: &mut [u8], value: u64) {
    let s = format!("{value:0width$o}", width = field.len() - 1);
    field[..s.len()].copy_from_slice(s.as_bytes());
    field[s.len()] = 0;
}

#[tokio::test]
async fn a_small_sparse_tar_leaves_holes_instead_of_writing_gigabytes() {
    let (_s, _agent, local) = start_with("").await;
    let data = volume(&local, "sparse", true).await;
    let size: u64 = 1 << 30;
    let mut h = header(tar::EntryType::GNUSparse, 4096);
    h.set_path("big").expect("name");
    {
        let g = h.as_gnu_mut().expect("gnu");
        octal(&mut g.sparse[0].offset, size - 4096);
        octal(&mut g.sparse[0].numbytes, 4096);
        octal(&mut g.realsize, size);
    }
    h.set_cksum();
    let mut tar = h.as_bytes().to_vec();
    tar.extend_from_slice(&[b'x'; 4096]);
    tar.extend_from_slice(&[0u8; 1024]);
    assert!(tar.len() <= 10 * 1024);
    let (status, body) = stream_in(&local, "sparse", "raw", tar).await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
    let m = std::fs::metadata(data.join("big")).expect("big");
    assert_eq!(m.len(), size);
    assert!(
        m.blocks() * 512 < 1 << 20,
        "{} bytes written for 4 KiB of data",
        m.blocks() * 512
    );
}

/// A gzip stream-in over a connection of its own; the whole answer as text.
async fn raw_stream_in(local: &Local, h: &str, body: &[u8]) -> String {
    let addr = local.base.trim_start_matches("http://").to_string();
    let mut s = tokio::net::TcpStream::connect(&addr)
        .await
        .expect("connect");
    let head = format!(
        "PUT /volumes/{h}/stream-in?path=. HTTP/1.1\r\nHost: {addr}\r\nContent-Encoding: gzip\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).await.expect("headers");
    let _ = s.write_all(body).await;
    answer(&mut s).await
}

#[tokio::test]
async fn limits_refuse_a_gzip_bomb_and_an_inode_flood_with_413_leaving_nothing() {
    let (_s, _agent, local) =
        start_with("stream_in_max_bytes = 1048576\nstream_in_max_entries = 1000\n").await;
    let data = volume(&local, "lim", true).await;
    std::fs::write(data.join("keep"), b"was here").expect("keep");
    let zeros = vec![0u8; 64 << 20];
    let bomb = gzip(&tar_of(&[
        ("a", tar::EntryType::Directory, None, b""),
        ("a/bomb", tar::EntryType::Regular, None, &zeros),
    ]));
    assert!(bomb.len() < 2 << 20);
    let got = raw_stream_in(&local, "lim", &bomb).await;
    assert!(got.starts_with("HTTP/1.1 413"), "{got}");
    assert!(got.contains("api.stream_in_max_bytes"), "{got}");
    assert_eq!(names(&data), ["keep"]);

    let mut b = tar::Builder::new(Vec::new());
    for i in 0..200_000u32 {
        let mut h = header(tar::EntryType::Regular, 0);
        b.append_data(&mut h, format!("d{}/f{i}", i % 100), std::io::empty())
            .expect("entry");
    }
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&b.into_inner().expect("tar")).expect("gzip");
    let flood = gz.finish().expect("gzip");
    let got = raw_stream_in(&local, "lim", &flood).await;
    assert!(got.starts_with("HTTP/1.1 413"), "{got}");
    assert!(got.contains("api.stream_in_max_entries"), "{got}");
    assert_eq!(names(&data), ["keep"]);
}

#[tokio::test]
async fn caller_mistakes_in_the_tar_are_400s_naming_the_entry() {
    use tar::EntryType::{Directory, Link, Regular};
    let (_s, _agent, local) = start_with("").await;
    let data = volume(&local, "bad", true).await;
    let long = format!("a/{}", "n".repeat(300));
    let cases: Vec<(Vec<Entry<'_>>, &str)> = vec![
        (vec![("h", Link, Some("missing"), b"")], "\"h\""),
        (
            vec![("d", Directory, None, b""), ("h", Link, Some("d"), b"")],
            "\"h\"",
        ),
        (
            vec![
                ("d", Directory, None, b""),
                ("d/f", Regular, None, b"x"),
                ("d", Regular, None, b"over"),
            ],
            "\"d\"",
        ),
        (vec![(long.as_str(), Regular, None, b"x")], "\"a/nnn"),
    ];
    for (entries, named) in cases {
        let (status, body) = stream_in(&local, "bad", "raw", tar_of(&entries)).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
        assert!(error_of(&body).contains(named), "{named}: {body}");
        assert!(names(&data).is_empty(), "{:?}", names(&data));
    }
}

/// Sends the headers of a stream-in and a tar whose first file (8 KiB) only partly
/// arrives, then stalls.
async fn stalled_upload(local: &Local, h: &str) -> tokio::net::TcpStream {
    let addr = local.base.trim_start_matches("http://").to_string();
    let mut s = tokio::net::TcpStream::connect(&addr)
        .await
        .expect("connect");
    let head = format!(
        "PUT /volumes/{h}/stream-in?path=. HTTP/1.1\r\nHost: {addr}\r\nContent-Encoding: raw\r\nContent-Length: 100000\r\n\r\n"
    );
    let mut entry = header(tar::EntryType::Regular, 8192);
    entry.set_path("partial").expect("name");
    entry.set_cksum();
    s.write_all(head.as_bytes()).await.expect("headers");
    s.write_all(entry.as_bytes()).await.expect("tar header");
    s.write_all(&[b'y'; 1024]).await.expect("some data");
    s
}

/// A raw stream-in of `tar`, retried while the stream pool is full (a slot frees once a
/// cut or abandoned stream has stopped).
async fn stream_in_once_free(local: &Local, h: &str, tar: &[u8]) -> StatusCode {
    let mut status = StatusCode::SERVICE_UNAVAILABLE;
    for _ in 0..100 {
        status = stream_in(local, h, "raw", tar.to_vec()).await.0;
        if status != StatusCode::SERVICE_UNAVAILABLE {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    status
}

/// Reads what the agent answers on `s` until it closes (at most a minute, a guard only).
async fn answer(s: &mut tokio::net::TcpStream) -> String {
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(60), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn a_stalled_upload_is_cut_after_the_idle_timeout_and_frees_its_slot() {
    let (_s, _agent, local) = start_with("max_streams = 1\nbody_idle_timeout = \"1s\"\n").await;
    let data = volume(&local, "idle", true).await;
    let mut s = stalled_upload(&local, "idle").await;
    let got = answer(&mut s).await;
    assert!(got.starts_with("HTTP/1.1 408"), "{got}");
    assert!(got.contains("api.body_idle_timeout"), "{got}");
    // The only slot is free again: a stream goes through.
    let tar = tar_of(&[("f", tar::EntryType::Regular, None, b"x")]);
    let status = stream_in_once_free(&local, "idle", &tar).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    assert_eq!(std::fs::read(data.join("f")).expect("f"), b"x");
}

#[tokio::test]
async fn a_full_stream_pool_answers_503_with_retry_after_while_volumes_still_answer() {
    let (_s, _agent, local) = start_with("max_streams = 2\nbody_idle_timeout = \"5m\"\n").await;
    volume(&local, "full", true).await;
    let mut stalled = Vec::new();
    for _ in 0..2 {
        stalled.push(stalled_upload(&local, "full").await);
    }
    let tar = tar_of(&[("f", tar::EntryType::Regular, None, b"x")]);
    let mut refused = None;
    for _ in 0..100 {
        // Under load a stalled upload may reach the agent while a probe holds the other
        // slot, and be refused itself: replace it, so two really stall.
        for s in stalled.iter_mut() {
            let mut buf = [0u8; 64];
            if !matches!(s.try_read(&mut buf), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
            {
                *s = stalled_upload(&local, "full").await;
            }
        }
        let got = raw_stream_in(&local, "full", &gzip(&tar)).await;
        if got.starts_with("HTTP/1.1 503") {
            refused = Some(got);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let got = refused.expect("a third stream is refused while two stall");
    assert!(got.to_ascii_lowercase().contains("retry-after: "), "{got}");
    assert!(got.contains("api.max_streams"), "{got}");
    let get = local
        .http
        .get(format!("{}/volumes/full", local.base))
        .send()
        .await
        .expect("get");
    assert_eq!(get.status(), StatusCode::OK);
    drop(stalled);
    let status = stream_in_once_free(&local, "full", &tar).await;
    assert_eq!(
        status,
        StatusCode::NO_CONTENT,
        "slots are freed when clients go away"
    );
}

/// Waits (at most 5 s) until a stalled upload wrote its first entry, `partial`, into `data`.
async fn wait_until_the_stream_wrote(data: &Path) {
    for _ in 0..100 {
        if data.join("partial").exists() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn destroying_a_volume_cuts_its_running_stream_and_leaves_nothing() {
    let (_s, _agent, local) = start_with("body_idle_timeout = \"5m\"\n").await;
    let data = volume(&local, "cut", true).await;
    let mut s = stalled_upload(&local, "cut").await;
    wait_until_the_stream_wrote(&data).await;
    let resp = local
        .http
        .delete(format!("{}/volumes/cut", local.base))
        .send()
        .await
        .expect("destroy");
    assert!(resp.status().is_success(), "{}", resp.status());
    let got = answer(&mut s).await;
    assert!(got.starts_with("HTTP/1.1 409"), "{got}");
    assert!(!data.exists(), "the volume is gone");
}

#[tokio::test]
async fn async_create_futures_are_bounded_and_keep_short_messages() {
    let (_s, _agent, local) = start_with("").await;
    let huge = "s".repeat(1_000_000);
    let resp = local
        .http
        .post(format!("{}/volumes-async", local.base))
        .json(&json!({"handle": "big", "strategy": {"type": huge}}))
        .send()
        .await
        .expect("post");
    assert_eq!(resp.status(), StatusCode::CREATED);
    let poll = local
        .http
        .get(format!("{}/volumes-async/big", local.base))
        .send()
        .await
        .expect("poll");
    assert_eq!(poll.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let text = poll.text().await.expect("body");
    assert!(text.len() < 2048, "{} bytes kept", text.len());
    // Fill the table with failing creates: the next one is refused with 503.
    let mut last = StatusCode::CREATED;
    for i in 0..1100 {
        let resp = local
            .http
            .post(format!("{}/volumes-async", local.base))
            .json(&json!({"handle": format!("f{i}"), "strategy": {"type": "nope"}}))
            .send()
            .await
            .expect("post");
        last = resp.status();
        if last != StatusCode::CREATED {
            assert!(resp.headers().get("retry-after").is_some());
            break;
        }
    }
    assert_eq!(last, StatusCode::SERVICE_UNAVAILABLE);
}

#[tokio::test]
async fn a_privilege_change_cuts_a_running_stream_so_its_owner_map_is_never_stale() {
    let (_s, _agent, local) = start_with("body_idle_timeout = \"5m\"\n").await;
    let data = volume(&local, "flip", true).await;
    let mut s = stalled_upload(&local, "flip").await;
    wait_until_the_stream_wrote(&data).await;
    let resp = local
        .http
        .put(format!("{}/volumes/flip/privileged", local.base))
        .json(&json!({ "value": false }))
        .send()
        .await
        .expect("set privileged");
    assert!(resp.status().is_success(), "{}", resp.status());
    let got = answer(&mut s).await;
    assert!(got.starts_with("HTTP/1.1 409"), "{got}");
    assert!(
        !data.join("partial").exists(),
        "the cut stream removed what it wrote"
    );
    // A stream after the change maps owners as the volume now is (unprivileged).
    let tar = tar_of(&[("f", tar::EntryType::Regular, None, b"x")]);
    assert_eq!(
        stream_in(&local, "flip", "raw", tar).await.0,
        StatusCode::NO_CONTENT
    );
    assert_ne!(std::fs::metadata(data.join("f")).expect("f").uid(), 0);
}
