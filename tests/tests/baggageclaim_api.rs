//! The real agent driven the way baggageclaim's Go client drives a worker's volumes:
//! async creates, exact JSON content types, privileged, streams in and out, bulk destroy.

use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use e2e::wiremock::MockServer;
use e2e::*;
use reqwest::StatusCode;
use serde_json::{json, Value};

/// A central API that knows nothing (404 everywhere): the agent destroys nothing.
async fn start() -> (MockServer, Agent, Local) {
    let server = MockServer::start().await;
    let agent = Agent::start(&server.uri(), &AgentSettings::default());
    let local = Local::new(&agent);
    (server, agent, local)
}

/// Starts a create that must fail; returns the poll's status and error body.
async fn failed_create(local: &Local, body: Value) -> (StatusCode, Value) {
    let h = body["handle"].as_str().expect("handle").to_string();
    create_async(local, body).await;
    let (status, _, err) = poll(local, &h).await;
    assert!(err["error"].is_string(), "{err}");
    (status, err)
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(data).expect("gzip");
    e.finish().expect("gzip")
}

fn gunzip(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(data), &mut out).expect("gunzip");
    out
}

/// A tar whose names and link names are written raw (so `..` and `/x` can be sent).
fn raw_tar(entries: &[(&str, tar::EntryType, Option<&str>, &[u8])]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (name, kind, link, data) in entries {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(*kind);
        h.set_mode(if *kind == tar::EntryType::Directory {
            0o755
        } else {
            0o644
        });
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_700_000_000);
        h.set_size(data.len() as u64);
        let old = h.as_old_mut();
        old.name[..name.len()].copy_from_slice(name.as_bytes());
        if let Some(l) = link {
            old.linkname[..l.len()].copy_from_slice(l.as_bytes());
        }
        h.set_cksum();
        b.append(&h, *data).expect("append");
    }
    b.into_inner().expect("tar")
}

async fn stream_in(
    local: &Local,
    h: &str,
    path: &str,
    enc: &str,
    body: Vec<u8>,
) -> (StatusCode, Value) {
    let resp = local
        .http
        .put(format!("{}/volumes/{h}/stream-in", local.base))
        .query(&[("path", path)])
        .header("Content-Encoding", enc)
        .body(body)
        .send()
        .await
        .expect("stream-in");
    let status = resp.status();
    (status, resp.json().await.unwrap_or(Value::Null))
}

async fn stream_out(local: &Local, h: &str, path: &str, enc: &str) -> (StatusCode, Vec<u8>) {
    let resp = local
        .http
        .put(format!("{}/volumes/{h}/stream-out", local.base))
        .query(&[("path", path)])
        .header("Accept-Encoding", enc)
        .send()
        .await
        .expect("stream-out");
    let status = resp.status();
    (status, resp.bytes().await.expect("body").to_vec())
}

fn entry_names(tar: &[u8]) -> Vec<String> {
    tar::Archive::new(tar)
        .entries()
        .expect("entries")
        .map(|e| String::from_utf8_lossy(&e.expect("entry").path_bytes()).into_owned())
        .collect()
}

fn sample_tree() -> Vec<u8> {
    let big: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    raw_tar(&[
        ("./", tar::EntryType::Directory, None, b""),
        ("./dir/", tar::EntryType::Directory, None, b""),
        ("./dir/hello.txt", tar::EntryType::Regular, None, b"hello"),
        ("./big.bin", tar::EntryType::Regular, None, &big),
        (
            "./dir/link",
            tar::EntryType::Symlink,
            Some("hello.txt"),
            b"",
        ),
        ("./hard", tar::EntryType::Link, Some("./dir/hello.txt"), b""),
    ])
}

fn assert_sample_tree(dir: &Path) {
    assert_eq!(
        std::fs::read(dir.join("dir/hello.txt")).expect("hello"),
        b"hello"
    );
    assert_eq!(
        std::fs::read(dir.join("big.bin")).expect("big").len(),
        200_000
    );
    assert_eq!(
        std::fs::read_link(dir.join("dir/link")).expect("link"),
        Path::new("hello.txt")
    );
    assert_eq!(
        std::fs::metadata(dir.join("hard")).expect("hard").ino(),
        std::fs::metadata(dir.join("dir/hello.txt"))
            .expect("hello")
            .ino()
    );
}

#[tokio::test]
async fn async_create_polls_to_an_initialized_volume_and_cancel_forgets_the_future() {
    let (_s, _agent, local) = start().await;
    let v = make_async(&local, "v1", json!({"type": "empty"}), false).await;
    assert_eq!(v["handle"], "v1");
    assert_eq!(v["state"], "initialized");
    assert_eq!(v["privileged"], false);
    assert!(Path::new(v["path"].as_str().expect("path")).is_dir());
    let (status, _, _) = poll(&local, "v1").await;
    assert_eq!(
        status,
        StatusCode::NOT_FOUND,
        "a deleted future is forgotten"
    );
    assert_eq!(local.handles().await, ["v1"], "the volume stays");
}

#[tokio::test]
async fn async_create_with_unknown_fields_ignores_them_as_go_does() {
    let (_s, _agent, local) = start().await;
    let body = json!({
        "handle": "x",
        "strategy": {"type": "empty", "Uid": 1000, "Gid": 1000},
        "properties": null,
        "Uid": 1000,
        "Gid": 1000,
        "something_newer": {"nested": true},
    });
    create_async(&local, body).await;
    let (status, _, v) = poll(&local, "x").await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v["handle"], "x");
    assert_eq!(cancel(&local, "x").await, StatusCode::NO_CONTENT);
    assert_eq!(local.handles().await, ["x"]);
}

#[tokio::test]
async fn async_poll_answers_exact_json_content_type() {
    let (_s, _agent, local) = start().await;
    create_async(
        &local,
        json!({"handle": "ct", "strategy": {"type": "empty"}}),
    )
    .await;
    let (status, ct, _) = poll(&local, "ct").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(ct, "application/json");
    for url in ["/volumes", "/volumes/ct", "/volumes?x=y"] {
        let resp = local
            .http
            .get(format!("{}{url}", local.base))
            .send()
            .await
            .expect("get");
        assert_eq!(resp.status(), StatusCode::OK, "{url}");
        assert_eq!(content_type(&resp), "application/json", "{url}");
    }
}

#[tokio::test]
async fn async_poll_of_unknown_future_is_404() {
    let (_s, _agent, local) = start().await;
    let (status, _, body) = poll(&local, "never-made").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(body["error"].is_string(), "{body}");
}

#[tokio::test]
async fn async_create_with_unknown_parent_fails_422_on_poll() {
    let (_s, _agent, local) = start().await;
    let (status, body) = failed_create(
        &local,
        json!({"handle": "c", "strategy": {"type": "cow", "volume": "ghost"}}),
    )
    .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(
        body["error"].as_str().expect("error").contains("ghost"),
        "{body}"
    );
    assert_eq!(cancel(&local, "c").await, StatusCode::NO_CONTENT);
    assert!(local.handles().await.is_empty());
}

#[tokio::test]
async fn async_create_with_bad_strategy_fails_422_on_poll() {
    let (_s, _agent, local) = start().await;
    let (status, body) = failed_create(
        &local,
        json!({"handle": "b", "strategy": {"type": "teleport"}}),
    )
    .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(body["error"].is_string(), "{body}");
    assert!(local.handles().await.is_empty());
}

#[tokio::test]
async fn async_create_of_duplicate_handle_fails_409_on_poll() {
    let (_s, _agent, local) = start().await;
    local.make("dup", None).await;
    let (status, body) = failed_create(
        &local,
        json!({"handle": "dup", "strategy": {"type": "empty"}}),
    )
    .await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert!(
        body["error"].as_str().expect("error").contains("dup"),
        "{body}"
    );
}

#[tokio::test]
async fn async_cow_child_of_async_parent_sees_parent_data() {
    let (_s, _agent, local) = start().await;
    let p = make_async(&local, "p", json!({"type": "empty"}), false).await;
    std::fs::write(
        Path::new(p["path"].as_str().expect("path")).join("f"),
        b"parent",
    )
    .expect("write");
    let c = make_async(&local, "c", json!({"type": "cow", "volume": "p"}), false).await;
    assert_eq!(c["parent"], "p");
    let data = std::fs::read(Path::new(c["path"].as_str().expect("path")).join("f")).expect("read");
    assert_eq!(data, b"parent");
}

#[tokio::test]
async fn import_copies_a_directory_and_extracts_a_tgz() {
    let (_s, agent, local) = start().await;
    let src = tempfile::tempdir_in(agent.imports_dir()).expect("src");
    std::fs::create_dir(src.path().join("rootfs")).expect("rootfs");
    std::fs::write(src.path().join("rootfs/a.txt"), b"dir import").expect("a");
    std::os::unix::fs::symlink("a.txt", src.path().join("rootfs/l")).expect("symlink");
    let v = make_async(
        &local,
        "imp-dir",
        json!({"type": "import", "path": src.path().join("rootfs"), "follow_symlinks": false}),
        true,
    )
    .await;
    let vp = Path::new(v["path"].as_str().expect("path")).to_owned();
    assert_eq!(std::fs::read(vp.join("a.txt")).expect("a"), b"dir import");
    assert_eq!(
        std::fs::read_link(vp.join("l")).expect("l"),
        Path::new("a.txt")
    );

    let followed = make_async(
        &local,
        "imp-follow",
        json!({"type": "import", "path": src.path().join("rootfs"), "follow_symlinks": true}),
        true,
    )
    .await;
    let fp = Path::new(followed["path"].as_str().expect("path")).to_owned();
    assert!(!std::fs::symlink_metadata(fp.join("l"))
        .expect("l")
        .file_type()
        .is_symlink());
    assert_eq!(std::fs::read(fp.join("l")).expect("l"), b"dir import");

    let tgz = src.path().join("image.tgz");
    std::fs::write(&tgz, gzip(&sample_tree())).expect("tgz");
    let t = make_async(
        &local,
        "imp-tgz",
        json!({"type": "import", "path": tgz}),
        true,
    )
    .await;
    assert_sample_tree(Path::new(t["path"].as_str().expect("path")));
}

#[tokio::test]
async fn import_follows_a_symlinked_source_path_even_without_follow_symlinks() {
    let (_s, agent, local) = start().await;
    let src = tempfile::tempdir_in(agent.imports_dir()).expect("src");
    std::fs::create_dir(src.path().join("rootfs")).expect("rootfs");
    std::fs::write(src.path().join("rootfs/a.txt"), b"via link").expect("a");
    std::os::unix::fs::symlink("a.txt", src.path().join("rootfs/l")).expect("symlink");
    std::os::unix::fs::symlink(src.path().join("rootfs"), src.path().join("current"))
        .expect("dir link");
    let v = make_async(
        &local,
        "imp-link-dir",
        json!({"type": "import", "path": src.path().join("current"), "follow_symlinks": false}),
        true,
    )
    .await;
    let vp = Path::new(v["path"].as_str().expect("path")).to_owned();
    assert_eq!(std::fs::read(vp.join("a.txt")).expect("a"), b"via link");
    assert_eq!(
        std::fs::read_link(vp.join("l")).expect("entries beneath stay symlinks"),
        Path::new("a.txt")
    );

    let tgz = src.path().join("image.tgz");
    std::fs::write(&tgz, gzip(&sample_tree())).expect("tgz");
    std::os::unix::fs::symlink(&tgz, src.path().join("image-link.tgz")).expect("tgz link");
    let t = make_async(
        &local,
        "imp-link-tgz",
        json!({"type": "import", "path": src.path().join("image-link.tgz"), "follow_symlinks": false}),
        true,
    )
    .await;
    assert_sample_tree(Path::new(t["path"].as_str().expect("path")));
}

#[tokio::test]
async fn import_of_missing_path_fails_422_on_poll() {
    let (_s, agent, local) = start().await;
    let missing = agent.imports_dir().join("no-such-image");
    let (status, _) = failed_create(
        &local,
        json!({"handle": "m", "strategy": {"type": "import", "path": missing}}),
    )
    .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(local.handles().await.is_empty());
}

#[tokio::test]
async fn privileged_get_is_a_bare_bool_and_put_changes_it() {
    let (_s, _agent, local) = start().await;
    make_async(&local, "pv", json!({"type": "empty"}), false).await;
    let url = format!("{}/volumes/pv/privileged", local.base);
    let get_text = || async {
        let resp = local.http.get(&url).send().await.expect("get");
        assert_eq!(content_type(&resp), "application/json");
        resp.text().await.expect("text")
    };
    assert_eq!(get_text().await, "false");
    let resp = local
        .http
        .put(&url)
        .json(&json!({"value": true}))
        .send()
        .await
        .expect("put");
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);
    assert_eq!(get_text().await, "true");
}

#[tokio::test]
async fn set_property_answers_204_and_filters_lists() {
    let (_s, _agent, local) = start().await;
    make_async(&local, "pr", json!({"type": "empty"}), false).await;
    let resp = local
        .http
        .put(format!("{}/volumes/pr/properties/role", local.base))
        .json(&json!({"value": "cache"}))
        .send()
        .await
        .expect("put");
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);
    let list = |q: &'static str| {
        let local = &local;
        async move {
            local
                .http
                .get(format!("{}/volumes?{q}", local.base))
                .send()
                .await
                .expect("list")
                .text()
                .await
                .expect("text")
        }
    };
    assert!(list("role=cache").await.contains("\"pr\""));
    assert_eq!(list("role=other").await, "[]");
}

#[tokio::test]
async fn streams_a_gzip_tar_in_and_the_same_tree_out() {
    round_trip("gzip").await;
}

#[tokio::test]
async fn streams_a_zstd_tar_in_and_the_same_tree_out() {
    round_trip("zstd").await;
}

#[tokio::test]
async fn streams_a_raw_tar_in_and_the_same_tree_out() {
    round_trip("raw").await;
}

async fn round_trip(enc: &str) {
    let (_s, _agent, local) = start().await;
    let v = make_async(&local, "s", json!({"type": "empty"}), true).await;
    let tar = sample_tree();
    let body = match enc {
        "gzip" => gzip(&tar),
        "raw" => tar.clone(),
        _ => zstd::encode_all(&tar[..], 3).expect("zstd"),
    };
    let (status, err) = stream_in(&local, "s", "sub/dir", enc, body).await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{err}");
    assert_sample_tree(&Path::new(v["path"].as_str().expect("path")).join("sub/dir"));

    let (status, out) = stream_out(&local, "s", "sub/dir", enc).await;
    assert_eq!(status, StatusCode::OK);
    let out = match enc {
        "gzip" => gunzip(&out),
        "raw" => out,
        _ => zstd::decode_all(&out[..]).expect("unzstd"),
    };
    let names = entry_names(&out);
    assert!(names.iter().all(|n| n.starts_with("./")), "{names:?}");
    let back = tempfile::tempdir().expect("back");
    tar::Archive::new(&out[..])
        .unpack(back.path())
        .expect("unpack");
    assert_sample_tree(back.path());
}

#[tokio::test]
async fn streams_out_a_single_file_under_its_base_name() {
    let (_s, _agent, local) = start().await;
    make_async(&local, "f", json!({"type": "empty"}), true).await;
    let (status, _) = stream_in(&local, "f", ".", "gzip", gzip(&sample_tree())).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, out) = stream_out(&local, "f", "dir/hello.txt", "gzip").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(entry_names(&gunzip(&out)), ["hello.txt"]);
}

#[tokio::test]
async fn stream_out_of_a_missing_path_is_404_no_such_file_or_directory() {
    let (_s, _agent, local) = start().await;
    make_async(&local, "nf", json!({"type": "empty"}), true).await;
    let resp = local
        .http
        .put(format!("{}/volumes/nf/stream-out", local.base))
        .query(&[("path", "missing")])
        .header("Accept-Encoding", "gzip")
        .send()
        .await
        .expect("stream-out");
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    let body: Value = resp.json().await.expect("json");
    assert_eq!(body, json!({"error": "no such file or directory"}));
}

#[tokio::test]
async fn stream_out_never_reads_outside_the_volume() {
    let (_s, agent, local) = start().await;
    let v = make_async(&local, "o", json!({"type": "empty"}), true).await;
    let vp = Path::new(v["path"].as_str().expect("path")).to_owned();
    let secret = agent.dir.path().join("secret");
    std::fs::create_dir(&secret).expect("secret");
    std::fs::write(secret.join("key"), b"secret").expect("key");
    std::os::unix::fs::symlink(&secret, vp.join("escape")).expect("symlink");
    for path in ["../../..", "escape", "escape/key"] {
        let (status, out) = stream_out(&local, "o", path, "gzip").await;
        if status == StatusCode::OK {
            let tar = gunzip(&out);
            let mut a = tar::Archive::new(&tar[..]);
            for e in a.entries().expect("entries") {
                let e = e.expect("entry");
                assert_ne!(
                    e.header().entry_type(),
                    tar::EntryType::Regular,
                    "{path} read a file through a symlink"
                );
            }
        } else {
            assert!(status.is_client_error(), "{path}: {status}");
        }
    }
}

async fn assert_refused(entries: &[(&str, tar::EntryType, Option<&str>, &[u8])], outside: &Path) {
    let (_s, _agent, local) = start().await;
    let v = make_async(&local, "r", json!({"type": "empty"}), true).await;
    let before: Vec<_> = std::fs::read_dir(outside).expect("outside").collect();
    let (status, body) = stream_in(&local, "r", ".", "gzip", gzip(&raw_tar(entries))).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(body["error"].is_string(), "{body}");
    let after: Vec<_> = std::fs::read_dir(outside).expect("outside").collect();
    assert_eq!(
        before.len(),
        after.len(),
        "something was written outside the volume"
    );
    assert!(Path::new(v["path"].as_str().expect("path")).is_dir());
}

#[tokio::test]
async fn stream_in_refuses_parent_dir_entries() {
    let outside = tempfile::tempdir().expect("outside");
    let name = format!("../../../../../../../../..{}/x", outside.path().display());
    assert_refused(
        &[(name.as_str(), tar::EntryType::Regular, None, b"x")],
        outside.path(),
    )
    .await;
}

#[tokio::test]
async fn stream_in_refuses_absolute_entries() {
    let outside = tempfile::tempdir().expect("outside");
    let name = format!("{}/x", outside.path().display());
    assert_refused(
        &[(name.as_str(), tar::EntryType::Regular, None, b"x")],
        outside.path(),
    )
    .await;
    assert!(!Path::new("/etc/x-volume-agent-test").exists());
}

#[tokio::test]
async fn stream_in_refuses_outward_symlinks() {
    let outside = tempfile::tempdir().expect("outside");
    assert_refused(
        &[(
            "out",
            tar::EntryType::Symlink,
            Some("../../../../../../../../../tmp"),
            b"",
        )],
        outside.path(),
    )
    .await;
    // An absolute link is kept (it names a path inside the container), but never written through.
    let target = outside.path().display().to_string();
    assert_refused(
        &[
            ("abs", tar::EntryType::Symlink, Some(target.as_str()), b""),
            ("abs/x", tar::EntryType::Regular, None, b"x"),
        ],
        outside.path(),
    )
    .await;
}

#[tokio::test]
async fn stream_in_refuses_outward_hard_links() {
    let outside = tempfile::tempdir().expect("outside");
    std::fs::write(outside.path().join("victim"), b"v").expect("victim");
    let target = format!(
        "../../../../../../../../..{}/victim",
        outside.path().display()
    );
    assert_refused(
        &[("h", tar::EntryType::Link, Some(target.as_str()), b"")],
        outside.path(),
    )
    .await;
    assert_eq!(
        std::fs::metadata(outside.path().join("victim"))
            .expect("victim")
            .nlink(),
        1
    );
}

#[tokio::test]
async fn bulk_destroy_removes_child_before_parent() {
    let (_s, agent, local) = start().await;
    local.make("parent", None).await;
    local.make("child", Some("parent")).await;
    local.make("other", None).await;
    let resp = local
        .http
        .delete(format!("{}/volumes/destroy", local.base))
        .json(&json!(["parent", "child", "unknown"]))
        .send()
        .await
        .expect("bulk destroy");
    assert_eq!(
        resp.status(),
        StatusCode::NO_CONTENT,
        "{}",
        resp.text().await.unwrap_or_default()
    );
    assert_eq!(local.handles().await, ["other"]);
    assert!(!agent.root().join("live/parent").exists());
    assert!(!agent.root().join("live/child").exists());
}

async fn bulk_destroy(local: &Local, handles: Value) -> (StatusCode, Value) {
    let resp = local
        .http
        .delete(format!("{}/volumes/destroy", local.base))
        .json(&handles)
        .send()
        .await
        .expect("bulk destroy");
    let status = resp.status();
    (status, resp.json().await.unwrap_or(Value::Null))
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

#[tokio::test]
async fn bulk_destroy_goes_on_past_a_volume_with_children_and_names_it() {
    let (_s, _agent, local) = start().await;
    local.make("parent", None).await;
    local.make("child", Some("parent")).await;
    local.make("a", None).await;
    local.make("z", None).await;
    let (status, body) = bulk_destroy(&local, json!(["a", "parent", "z"])).await;
    assert!(!status.is_success(), "{status} {body}");
    let err = body["error"].as_str().expect("error");
    assert!(err.contains("parent"), "{err}");
    assert_eq!(
        local.handles().await,
        ["child", "parent"],
        "the others were destroyed"
    );
}

#[tokio::test]
async fn bulk_destroy_tries_every_handle_and_answers_500_naming_the_failed_ones() {
    if !is_root() {
        eprintln!("skipped: making a volume undeletable (chattr +i) needs root");
        return;
    }
    let (_s, agent, local) = start().await;
    let stuck = local.make("stuck", None).await;
    local.make("a", None).await;
    local.make("z", None).await;
    let pinned = Path::new(&stuck.path).join("stuck.txt");
    let ok = std::process::Command::new("chattr")
        .arg("+i")
        .arg(&pinned)
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !ok {
        eprintln!("skipped: chattr +i is not available here");
        return;
    }
    let (status, body) = bulk_destroy(&local, json!(["a", "stuck", "unknown", "z"])).await;
    let _ = std::process::Command::new("chattr")
        .arg("-R")
        .arg("-i")
        .arg(agent.root())
        .status();
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR, "{body}");
    let err = body["error"].as_str().expect("error");
    assert!(err.contains("stuck"), "{err}");
    assert!(
        !err.contains("unknown"),
        "unknown handles are skipped: {err}"
    );
    let left = local.handles().await;
    assert!(!left.contains(&"a".to_string()), "{left:?}");
    assert!(!left.contains(&"z".to_string()), "{left:?}");
}

#[tokio::test]
async fn volume_named_destroy_cannot_shadow_the_bulk_route() {
    let (_s, _agent, local) = start().await;
    local.make("destroy", None).await;
    local.make("gone", None).await;
    let resp = local
        .http
        .delete(format!("{}/volumes/destroy", local.base))
        .json(&json!(["gone"]))
        .send()
        .await
        .expect("bulk destroy");
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);
    assert_eq!(local.handles().await, ["destroy"]);
    let resp = local
        .http
        .get(format!("{}/volumes/destroy", local.base))
        .send()
        .await
        .expect("get");
    assert_eq!(resp.status(), StatusCode::OK);
}

/// The highest valid id of a `/proc/self` map, as the agent computes it.
fn max_id(file: &str) -> u32 {
    let map = std::fs::read_to_string(format!("/proc/self/{file}")).expect("id map");
    volume_agent::contents::parse_max_id(&map).expect("an id map line")
}

#[tokio::test]
async fn unprivileged_volume_maps_root_on_stream_in_and_back_on_stream_out() {
    let (_s, _agent, local) = start().await;
    let v = make_async(&local, "u", json!({"type": "empty"}), false).await;
    let (status, _) = stream_in(&local, "u", ".", "gzip", gzip(&sample_tree())).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let m = std::fs::metadata(Path::new(v["path"].as_str().expect("path")).join("dir/hello.txt"))
        .expect("meta");
    assert_eq!((m.uid(), m.gid()), (max_id("uid_map"), max_id("gid_map")));
    let (_, out) = stream_out(&local, "u", "dir/hello.txt", "gzip").await;
    assert_eq!(owners(&gunzip(&out)), [(0, 0)]);
}

/// `(uid, gid)` of every entry of a tar.
fn owners(tar: &[u8]) -> Vec<(u64, u64)> {
    tar::Archive::new(tar)
        .entries()
        .expect("entries")
        .map(|e| {
            let h = e.expect("entry").header().clone();
            (h.uid().expect("uid"), h.gid().expect("gid"))
        })
        .collect()
}

#[tokio::test]
async fn cow_child_with_other_privilege_gets_shifted_owners() {
    let (_s, _agent, local) = start().await;
    make_async(&local, "priv", json!({"type": "empty"}), true).await;
    let (status, _) = stream_in(&local, "priv", ".", "gzip", gzip(&sample_tree())).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let c = make_async(
        &local,
        "unpriv",
        json!({"type": "cow", "volume": "priv"}),
        false,
    )
    .await;
    let m = std::fs::metadata(Path::new(c["path"].as_str().expect("path")).join("dir/hello.txt"))
        .expect("meta");
    assert_eq!((m.uid(), m.gid()), (max_id("uid_map"), max_id("gid_map")));
}

fn owner(path: &Path) -> (u32, u32) {
    let m = std::fs::symlink_metadata(path).expect("meta");
    (m.uid(), m.gid())
}

#[tokio::test]
async fn unprivileged_empty_and_import_volumes_have_their_root_owned_by_the_mapped_id() {
    if !is_root() {
        eprintln!("skipped: re-owning a volume's root needs root");
        return;
    }
    let (_s, agent, local) = start().await;
    let top = (max_id("uid_map"), max_id("gid_map"));
    let v = make_async(&local, "ue", json!({"type": "empty"}), false).await;
    assert_eq!(owner(Path::new(v["path"].as_str().expect("path"))), top);
    let p = make_async(&local, "pe", json!({"type": "empty"}), true).await;
    assert_eq!(owner(Path::new(p["path"].as_str().expect("path"))), (0, 0));

    let src = tempfile::tempdir_in(agent.imports_dir()).expect("src");
    std::fs::write(src.path().join("a.txt"), b"a").expect("a");
    let i = make_async(
        &local,
        "ui",
        json!({"type": "import", "path": src.path()}),
        false,
    )
    .await;
    let ip = Path::new(i["path"].as_str().expect("path")).to_owned();
    assert_eq!(owner(&ip), top);
    assert_eq!(owner(&ip.join("a.txt")), top);
}

#[tokio::test]
async fn stream_in_makes_missing_destination_folders_owned_by_the_mapped_root() {
    if !is_root() {
        eprintln!("skipped: owners other than our own need root");
        return;
    }
    let (_s, _agent, local) = start().await;
    let top = (max_id("uid_map"), max_id("gid_map"));
    let v = make_async(&local, "sf", json!({"type": "empty"}), false).await;
    let tar = raw_tar(&[("f", tar::EntryType::Regular, None, b"f")]);
    let (status, err) = stream_in(&local, "sf", "new/sub", "gzip", gzip(&tar)).await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{err}");
    let vp = Path::new(v["path"].as_str().expect("path")).to_owned();
    assert_eq!(owner(&vp.join("new")), top);
    assert_eq!(owner(&vp.join("new/sub")), top);
    assert_eq!(owner(&vp.join("new/sub/f")), top);
}

async fn set_privileged(local: &Local, h: &str, value: bool) {
    let resp = local
        .http
        .put(format!("{}/volumes/{h}/privileged", local.base))
        .json(&json!({ "value": value }))
        .send()
        .await
        .expect("put privileged");
    assert_eq!(
        resp.status(),
        StatusCode::NO_CONTENT,
        "{}",
        resp.text().await.unwrap_or_default()
    );
}

#[tokio::test]
async fn setting_privileged_re_owns_the_volume_data_both_ways() {
    if !is_root() {
        eprintln!("skipped: re-owning files needs root");
        return;
    }
    let (_s, _agent, local) = start().await;
    let top = (max_id("uid_map"), max_id("gid_map"));
    let v = make_async(&local, "sp", json!({"type": "empty"}), true).await;
    let (status, _) = stream_in(&local, "sp", ".", "gzip", gzip(&sample_tree())).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let vp = Path::new(v["path"].as_str().expect("path")).to_owned();
    std::fs::write(vp.join("theirs"), b"1000").expect("theirs");
    std::os::unix::fs::chown(vp.join("theirs"), Some(1000), Some(1000)).expect("chown");
    assert_eq!(owner(&vp.join("dir/hello.txt")), (0, 0));

    set_privileged(&local, "sp", false).await;
    for p in ["", "dir", "dir/hello.txt", "dir/link", "big.bin"] {
        assert_eq!(owner(&vp.join(p)), top, "{p}");
    }
    assert_eq!(owner(&vp.join("theirs")), (1000, 1000), "other ids stay");
    let (_, out) = stream_out(&local, "sp", "dir/hello.txt", "gzip").await;
    assert_eq!(owners(&gunzip(&out)), [(0, 0)]);

    set_privileged(&local, "sp", true).await;
    for p in ["", "dir", "dir/hello.txt", "dir/link", "big.bin"] {
        assert_eq!(owner(&vp.join(p)), (0, 0), "{p}");
    }
    assert_eq!(owner(&vp.join("theirs")), (1000, 1000), "other ids stay");
}

#[tokio::test]
async fn async_create_without_a_handle_names_the_volume_with_a_uuid() {
    let (_s, _agent, local) = start().await;
    for unnamed in [
        json!({"strategy": {"type": "empty"}}),
        json!({"handle": "", "strategy": {"type": "empty"}}),
    ] {
        let resp = local
            .http
            .post(format!("{}/volumes-async", local.base))
            .json(&unnamed)
            .send()
            .await
            .expect("create-async");
        assert_eq!(resp.status(), StatusCode::CREATED);
        let future: Value = resp.json().await.expect("future json");
        let h = future["handle"].as_str().expect("handle").to_string();
        assert_eq!(h.len(), 36, "{h}");
        assert_eq!(h.split('-').count(), 5, "{h}");
        let (status, _, v) = poll(&local, &h).await;
        assert_eq!(status, StatusCode::OK, "{v}");
        assert_eq!(v["handle"], h.as_str());
        assert_eq!(cancel(&local, &h).await, StatusCode::NO_CONTENT);
    }
    let (status, err) = {
        let resp = local
            .http
            .post(format!("{}/volumes-async", local.base))
            .json(&json!({"handle": 7, "strategy": {"type": "empty"}}))
            .send()
            .await
            .expect("create-async");
        (
            resp.status(),
            resp.json::<Value>().await.unwrap_or(Value::Null),
        )
    };
    assert_eq!(status, StatusCode::BAD_REQUEST, "{err}");
}
