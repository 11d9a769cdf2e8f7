//! Bad inputs to the local API, at random: handles that try to be paths, malformed and
//! hostile JSON, odd property keys, stream paths, junk routes, oversized bodies, sent as
//! raw bytes (no client normalizes `..` away). The agent must answer every one with a 4xx
//! (or a success), never a 5xx, never die, and never create anything outside its volumes
//! root.
//!
//! `FUZZ_CASES` (default 2000) sets the number of requests, `FUZZ_SEED` repeats a run.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use e2e::faults::*;
use e2e::*;
use rand::seq::SliceRandom;
use rand::Rng;

/// Marker in every hostile name: nothing with it may appear outside the volumes root.
const MARK: &str = "zzfuzz";

/// Sends one request as raw bytes; the status code, or `None` when the connection failed.
fn raw(addr: &str, method: &str, target: &[u8], ctype: Option<&str>, body: &[u8]) -> Option<u16> {
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(30))).ok()?;
    let mut req = Vec::new();
    req.extend_from_slice(method.as_bytes());
    req.push(b' ');
    req.extend_from_slice(target);
    req.extend_from_slice(b" HTTP/1.1\r\nHost: ");
    req.extend_from_slice(addr.as_bytes());
    req.extend_from_slice(b"\r\nConnection: close\r\n");
    if let Some(ct) = ctype {
        req.extend_from_slice(format!("Content-Type: {ct}\r\n").as_bytes());
    }
    req.extend_from_slice(format!("Content-Length: {}\r\n\r\n", body.len()).as_bytes());
    req.extend_from_slice(body);
    // A server may answer (413) and close before reading a large body: ignore write errors.
    let _ = s.write_all(&req);
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf);
    text.split_whitespace().nth(1)?.parse().ok()
}

fn random_handle(rng: &mut impl Rng, known: &[String]) -> String {
    const CHARS: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-";
    match rng.gen_range(0..24) {
        0..=5 => known.choose(rng).cloned().unwrap_or_else(|| "a".into()),
        6..=9 => {
            let n = rng.gen_range(1..=128);
            (0..n)
                .map(|_| CHARS[rng.gen_range(0..CHARS.len())] as char)
                .collect()
        }
        10 => String::new(),
        11 => ".".into(),
        12 => "..".into(),
        13 => format!("../{MARK}"),
        14 => format!("../../{MARK}"),
        15 => format!("..%2F{MARK}"),
        16 => format!("%2e%2e%2f%2e%2e%2f{MARK}"),
        17 => format!("/tmp/{MARK}"),
        18 => format!("{MARK}%00x"),
        19 => "a".repeat(129),
        20 => format!("ü{MARK}"),
        21 => format!("a b{MARK}"),
        22 => format!("$(touch {MARK})"),
        _ => format!("..\\..\\{MARK}"),
    }
}

/// The bytes of a URL path segment: sometimes raw, sometimes percent-encoded.
fn segment(rng: &mut impl Rng, s: &str) -> String {
    if rng.gen_bool(0.5) {
        s.to_string()
    } else {
        s.bytes()
            .map(|b| {
                if b.is_ascii_alphanumeric() || b"._-".contains(&b) {
                    (b as char).to_string()
                } else {
                    format!("%{b:02X}")
                }
            })
            .collect()
    }
}

fn json_str(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into())
}

fn random_key(rng: &mut impl Rng) -> String {
    match rng.gen_range(0..8) {
        0 => String::new(),
        1 => format!("../../{MARK}"),
        2 => "k".repeat(rng.gen_range(1..5000)),
        3 => "a\u{0}b".into(),
        4 => "ключ".into(),
        5 => "/etc/passwd".into(),
        _ => format!("key{}", rng.gen_range(0..5)),
    }
}

fn random_body(rng: &mut impl Rng, known: &[String]) -> Vec<u8> {
    let handle = json_str(&random_handle(rng, known));
    let parent = json_str(&random_handle(rng, known));
    match rng.gen_range(0..16) {
        0 => Vec::new(),
        1 => b"null".to_vec(),
        2 => (0..rng.gen_range(1..200)).map(|_| rng.gen()).collect(),
        3 => "[".repeat(rng.gen_range(100..20000)).into_bytes(),
        4 => format!("{{\"handle\": {handle}, \"strategy\": ").into_bytes(),
        // Over the 1 MiB limit (rarer: each costs the server a drain).
        5 if rng.gen_bool(0.3) => vec![b' '; (1 << 20) + rng.gen_range(1..4096)],
        5 => b"{}".to_vec(),
        6 => format!(
            "{{\"handle\": {handle}, \"strategy\": {{\"type\": \"import\", \"path\": {}}}}}",
            json_str(&format!("../../{MARK}"))
        )
        .into_bytes(),
        7 => {
            format!("{{\"handle\": {handle}, \"strategy\": {{\"type\": \"{MARK}\"}}}}").into_bytes()
        }
        8 => br#"{"handle": 12, "strategy": {"type": "empty"}, "privileged": "yes"}"#.to_vec(),
        9 => {
            let props: BTreeMap<String, String> = (0..rng.gen_range(0..4))
                .map(|_| (random_key(rng), random_key(rng)))
                .collect();
            serde_json::json!({"handle": random_handle(rng, known), "strategy": {"type": "empty"},
                "properties": props, "privileged": rng.gen_bool(0.5)})
            .to_string()
            .into_bytes()
        }
        10 => format!(
            "{{\"handle\": {handle}, \"strategy\": {{\"type\": \"cow\", \"volume\": {parent}}}}}"
        )
        .into_bytes(),
        11 => format!("{{\"value\": {}}}", json_str(&random_key(rng))).into_bytes(),
        12 => {
            let states = [
                "created",
                "initializing",
                "initialized",
                "destroying",
                "creating",
                MARK,
            ];
            format!(
                "{{\"state\": \"{}\"}}",
                states.choose(rng).copied().unwrap_or("x")
            )
            .into_bytes()
        }
        13 => format!(
            "{{\"value\": {}}}",
            ["true", "false", "1", "null"]
                .choose(rng)
                .copied()
                .unwrap_or("true")
        )
        .into_bytes(),
        14 => format!("[{handle}, {parent}, 3, null]").into_bytes(),
        _ => br#"{"value": 1e999999, "handle": "\ud800"}"#.to_vec(),
    }
}

fn random_request(rng: &mut impl Rng, known: &[String]) -> (&'static str, Vec<u8>, Vec<u8>) {
    let h = random_handle(rng, known);
    let hs = segment(rng, &h);
    let raw_key = random_key(rng);
    let key = segment(rng, &raw_key);
    let (method, target): (&str, String) = match rng.gen_range(0..18) {
        0 | 1 => ("POST", "/volumes".into()),
        2 => ("POST", "/volumes-async".into()),
        3 => ("GET", format!("/volumes?{key}={hs}&{MARK}=%zz")),
        4 => ("GET", format!("/volumes/{hs}")),
        5 => ("DELETE", format!("/volumes/{hs}")),
        6 => ("PUT", format!("/volumes/{hs}/properties/{key}")),
        7 => ("PUT", format!("/volumes/{hs}/state")),
        8 => ("GET", format!("/volumes/{hs}/privileged")),
        9 => ("PUT", format!("/volumes/{hs}/privileged")),
        10 => ("DELETE", "/volumes/destroy".into()),
        11 => ("PUT", format!("/volumes/{hs}/stream-in?path=../../{MARK}")),
        12 => ("PUT", format!("/volumes/{hs}/stream-out?path=/etc/{MARK}")),
        13 => ("GET", format!("/volumes-async/{hs}")),
        14 => ("GET", "/gc/plan".into()),
        15 => ("PATCH", format!("/volumes/{hs}")),
        16 => ("GET", format!("/{}/../../{MARK}", segment(rng, &h))),
        _ => ("POST", format!("/volumes/{hs}/{key}/../..")),
    };
    let body = if method == "GET" && rng.gen_bool(0.8) {
        Vec::new()
    } else {
        random_body(rng, known)
    };
    (method, target.into_bytes(), body)
}

/// Every path under `dir` (relative), skipping `skip` subtrees.
fn tree(dir: &Path, skip: &[PathBuf]) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let p = e.path();
            if skip.iter().any(|s| p.starts_with(s)) {
                continue;
            }
            out.push(p.strip_prefix(dir).unwrap_or(&p).to_path_buf());
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push(p);
            }
        }
    }
    out.sort();
    out
}

fn marked_entries(dir: &Path) -> Vec<String> {
    entries(dir)
        .into_iter()
        .filter(|e| e.contains(MARK))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_bad_local_api_inputs_never_5xx_crash_or_escape_the_root() {
    let (mut rng, seed) = seeded_rng("FUZZ_SEED");
    let cases = env_usize("FUZZ_CASES", 2000);
    let started = Instant::now();
    // The agent's temp dir goes into a sandbox of our own, so the sandbox's whole tree
    // (everything outside the volumes root and state dir) can be compared before/after.
    let sandbox = tempfile::tempdir().expect("sandbox");
    std::env::set_var("TMPDIR", sandbox.path());
    let script = DesiredScript::new("w1");
    let server = mock_central(&script).await;
    let agent = Agent::start(&server.uri(), &AgentSettings::default());
    std::env::remove_var("TMPDIR");
    let local = Local::new(&agent);
    let pid = running_pid(&agent);
    let addr = agent.api.trim_start_matches("http://").to_string();
    let skip = [
        agent.root(),
        agent.dir.path().join("state"),
        agent.dir.path().join("agent.log"),
    ];
    let before = tree(sandbox.path(), &skip);
    let cwd = std::env::current_dir().expect("cwd");
    let watched: Vec<PathBuf> = vec![
        PathBuf::from("/"),
        PathBuf::from("/tmp"),
        PathBuf::from("/etc"),
        cwd.clone(),
        cwd.parent().map(Path::to_path_buf).unwrap_or_default(),
        agent.dir.path().to_path_buf(),
        agent.root(),
    ];
    let marked_before: Vec<Vec<String>> = watched.iter().map(|d| marked_entries(d)).collect();

    let mut known: Vec<String> = vec!["base".into()];
    create_with_files(&local, "base", None, &[("f".into(), b"x".to_vec())]).await;
    let mut statuses: BTreeMap<u16, u64> = BTreeMap::new();
    let mut five_xx: Vec<String> = Vec::new();
    let mut slowest = (Duration::ZERO, String::new());
    for i in 0..cases {
        let (method, target, body) = random_request(&mut rng, &known);
        let ctype = match rng.gen_range(0..4) {
            0 => None,
            1 => Some("text/plain"),
            _ => Some("application/json"),
        };
        let a = addr.clone();
        let (t, b) = (target.clone(), body.clone());
        let t0 = Instant::now();
        let status = tokio::task::spawn_blocking(move || raw(&a, method, &t, ctype, &b))
            .await
            .expect("request thread");
        let took = t0.elapsed();
        if took > slowest.0 {
            slowest = (
                took,
                format!(
                    "{method} {}",
                    String::from_utf8_lossy(&target[..target.len().min(80)])
                ),
            );
        }
        let Some(status) = status else {
            assert!(
                alive(pid),
                "the agent died on {method} {} (seed {seed}):\n{}",
                String::from_utf8_lossy(&target),
                agent.log()
            );
            *statuses.entry(0).or_default() += 1;
            continue;
        };
        *statuses.entry(status).or_default() += 1;
        if status >= 500 {
            five_xx.push(format!(
                "{status} for {method} {} body {:?}",
                String::from_utf8_lossy(&target),
                String::from_utf8_lossy(&body[..body.len().min(200)])
            ));
        }
        if status == 201 {
            // Remember what got created so later requests reach real volumes.
            for v in local.handles().await {
                if !known.contains(&v) {
                    known.push(v);
                }
            }
        }
        if i % 100 == 99 {
            assert!(alive(pid), "the agent died (seed {seed})");
            assert!(healthy(&agent).await, "healthz failed (seed {seed})");
        }
    }
    assert!(alive(pid), "the agent died (seed {seed})");
    assert!(healthy(&agent).await);

    // Nothing created outside the volumes root.
    let after = tree(sandbox.path(), &skip);
    assert_eq!(
        before, after,
        "entries appeared outside the volumes root (seed {seed})"
    );
    for (d, was) in watched.iter().zip(&marked_before) {
        assert_eq!(
            &marked_entries(d),
            was,
            "a hostile name appeared in {} (seed {seed})",
            d.display()
        );
    }
    // Inside the root, only volume directories named by valid handles, and they agree with
    // the inventory.
    let listed = local.handles().await;
    assert_eq!(
        entries(&agent.root().join("live")),
        listed,
        "sled and live/ disagree"
    );
    for v in &listed {
        assert!(
            protocol::Handle::new(v.clone()).is_ok(),
            "bad handle {v:?} on disk"
        );
    }
    eprintln!(
        "local API fuzz figures: seed={seed} cases={cases} statuses={statuses:?} \
         volumes left={} slowest request={:?} ({}) elapsed={:.1}s",
        listed.len(),
        slowest.0,
        slowest.1,
        started.elapsed().as_secs_f64()
    );
    assert!(
        five_xx.is_empty(),
        "{} answers were 5xx (seed {seed}), e.g.:\n{}",
        five_xx.len(),
        five_xx
            .iter()
            .take(10)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
}
