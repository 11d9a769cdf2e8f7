//! Soak: thousands of creates and destroys through the local API (empty roots with
//! copy-on-write children, destroyed children first) while the central side names other
//! families `destroying`, so reconcile passes run concurrently. The agent's RSS and open
//! file descriptors are sampled as it goes and must stay flat.
//!
//! `SOAK_OPS` (default 1000; the full run is 10000) sets the number of operations,
//! `SOAK_SAMPLE_EVERY` (default a tenth of them) the sampling interval, `SOAK_SEED`
//! repeats a run.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use e2e::faults::*;
use e2e::*;
use rand::Rng;

fn dir_bytes(dir: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            match e.metadata() {
                Ok(m) if m.is_dir() => stack.push(e.path()),
                Ok(m) => total += m.len(),
                Err(_) => {}
            }
        }
    }
    total
}

struct Sample {
    ops: usize,
    rss_kib: u64,
    fds: usize,
    state_bytes: u64,
    secs: f64,
}

impl Sample {
    fn take(pid: u32, ops: usize, state_dir: &Path, started: Instant) -> Sample {
        Sample {
            ops,
            rss_kib: proc_status_kib(pid, "VmRSS").expect("VmRSS"),
            fds: fd_count(pid).expect("fd count"),
            state_bytes: dir_bytes(state_dir),
            secs: started.elapsed().as_secs_f64(),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soak_of_creates_and_destroys_keeps_rss_and_fds_flat() {
    let (mut rng, seed) = seeded_rng("SOAK_SEED");
    let target = env_usize("SOAK_OPS", 1000);
    let every = env_usize("SOAK_SAMPLE_EVERY", (target / 10).max(50));
    let started = Instant::now();
    let script = DesiredScript::new("w1");
    let server = mock_central(&script).await;
    let settings = AgentSettings {
        unknown_grace: "1h",
        ..AgentSettings::default()
    };
    let agent = Agent::start(&server.uri(), &settings);
    let local = Local::new(&agent);
    let pid = running_pid(&agent);
    let state_dir = agent.dir.path().join("state");

    // The central side: every 250 ms, names the families handed to it `destroying`.
    let handed: Arc<Mutex<Vec<String>>> = Arc::new(Mutex::new(Vec::new()));
    let all_named: Arc<Mutex<Vec<String>>> = Arc::new(Mutex::new(Vec::new()));
    let central = {
        let (script, handed, all_named) = (script.clone(), handed.clone(), all_named.clone());
        tokio::spawn(async move {
            let mut window: Vec<String> = Vec::new();
            loop {
                tokio::time::sleep(Duration::from_millis(250)).await;
                let new: Vec<String> =
                    std::mem::take(&mut *handed.lock().unwrap_or_else(|p| p.into_inner()));
                if new.is_empty() {
                    continue;
                }
                all_named
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .extend(new.iter().cloned());
                window.extend(new);
                let excess = window.len().saturating_sub(300);
                window.drain(..excess);
                let named: Vec<&str> = window.iter().map(String::as_str).collect();
                script.set(&[], &named);
            }
        })
    };

    let mut ops = 0usize;
    let mut family = 0usize;
    let mut samples: Vec<Sample> = Vec::new();
    let mut next_sample = every;
    let mut by_central = 0usize;
    while ops < target {
        family += 1;
        let root = format!("s{family}");
        create_with_files(&local, &root, None, &[("f".into(), b"data".to_vec())]).await;
        ops += 1;
        let kids: Vec<String> = (0..rng.gen_range(0..=3))
            .map(|k| format!("s{family}-c{k}"))
            .collect();
        for k in &kids {
            create_with_files(&local, k, Some(&root), &[]).await;
            ops += 1;
        }
        if rng.gen_bool(0.3) {
            // The central side destroys this family (children first, in its passes).
            let mut all = kids.clone();
            all.push(root);
            by_central += all.len();
            ops += all.len();
            handed.lock().unwrap_or_else(|p| p.into_inner()).extend(all);
        } else {
            for v in kids.iter().chain(std::iter::once(&root)) {
                let resp = local
                    .http
                    .delete(format!("{}/volumes/{v}", local.base))
                    .send()
                    .await
                    .expect("delete request");
                assert_eq!(resp.status(), 204, "DELETE {v} (seed {seed})");
                ops += 1;
            }
        }
        if ops >= next_sample {
            next_sample += every;
            samples.push(Sample::take(pid, ops, &state_dir, started));
        }
    }
    // Let the central side's last families go.
    tokio::time::sleep(Duration::from_millis(400)).await;
    eventually("every family named destroying is gone", || async {
        let named = all_named.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let have = local.handles().await;
        handed.lock().unwrap_or_else(|p| p.into_inner()).is_empty()
            && named.iter().all(|n| !have.contains(n))
    })
    .await;
    central.abort();
    assert!(local.handles().await.is_empty(), "volumes left over");
    assert!(entries(&agent.root().join("live")).is_empty());
    assert!(entries(&agent.root().join("dead")).is_empty());
    assert!(entries(&agent.root().join("init")).is_empty());
    samples.push(Sample::take(pid, ops, &state_dir, started));
    running_pid(&agent);
    assert!(healthy(&agent).await);

    eprintln!(
        "soak seed={seed} ops={ops} families={family} destroyed by the central side={by_central}"
    );
    eprintln!("  ops     VmRSS(KiB)  fds  state dir bytes  seconds");
    for s in &samples {
        eprintln!(
            "  {:<7} {:<11} {:<4} {:<16} {:.1}",
            s.ops, s.rss_kib, s.fds, s.state_bytes, s.secs
        );
    }
    // Flat: the first sample is the warm-up baseline.
    let warm = &samples[0];
    let last = samples.last().expect("a sample");
    assert!(
        last.rss_kib <= warm.rss_kib * 3 / 2 + 8 * 1024,
        "RSS grew from {} KiB to {} KiB (seed {seed})",
        warm.rss_kib,
        last.rss_kib
    );
    assert!(
        last.fds <= warm.fds + 10,
        "open fds grew from {} to {} (seed {seed})",
        warm.fds,
        last.fds
    );
}
