//! The central API misbehaving in random order: 500s, resets, stalls, malformed and 100 MiB
//! bodies, revisions going backwards, another worker's set, an empty set, an unknown
//! worker. The agent must never destroy a desired volume, never die, and apply the next
//! good answer once the API behaves again.
//!
//! `FAULTS_STEPS` (default 40) sets the number of fault steps, `FAULTS_SEED` repeats a run.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use e2e::faults::*;
use e2e::*;
use protocol::native::DesiredVolume;
use rand::Rng;

const HUNDRED_MIB: u64 = 100 << 20;

fn random_mode(rng: &mut impl Rng) -> Mode {
    match rng.gen_range(0..13) {
        0 => Mode::Status500,
        1 => Mode::ResetOnAccept,
        2 => Mode::ResetAfterRequest,
        3 => Mode::Hang(Duration::from_secs(3)),
        4 => Mode::Malformed,
        5 => Mode::HugeChunked(HUNDRED_MIB),
        6 => Mode::HugeWithLength(HUNDRED_MIB),
        7 => Mode::HalfHeaders,
        8 => Mode::StaleRevision(rng.gen_range(1..=5)),
        9 => Mode::OtherWorker,
        10 => Mode::EmptySet,
        11 => Mode::UnknownWorker,
        _ => Mode::Good,
    }
}

fn mode_label(m: &Mode) -> String {
    let s = format!("{m:?}");
    s.split('(').next().unwrap_or(&s).to_string()
}

/// Makes `n` desired volumes (random chains), scripted as kept; returns their contents.
async fn desired_volumes(
    local: &Local,
    central: &RawCentral,
    n: usize,
    rng: &mut impl Rng,
) -> BTreeMap<String, BTreeMap<PathBuf, Vec<u8>>> {
    let mut shape: Vec<(String, Option<String>)> = Vec::new();
    for i in 0..n {
        let parent = (i > 0 && rng.gen_bool(0.5)).then(|| shape[rng.gen_range(0..i)].0.clone());
        shape.push((format!("d{i}"), parent));
    }
    central.with(|t| {
        t.keep = shape
            .iter()
            .map(|(k, p)| DesiredVolume {
                handle: h(k),
                parent: p.as_deref().map(h),
            })
            .collect();
        t.revision = 10;
    });
    let mut contents = BTreeMap::new();
    for (k, p) in &shape {
        let files = vec![(format!("{k}.bin"), (0..2048).map(|_| rng.gen()).collect())];
        let data = create_with_files(local, k, p.as_deref(), &files).await;
        contents.insert(k.clone(), snapshot(&data));
    }
    contents
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_central_faults_never_destroy_desired_volumes_and_good_answers_apply_again() {
    let (mut rng, seed) = seeded_rng("FAULTS_SEED");
    let steps = env_usize("FAULTS_STEPS", 40);
    let started = Instant::now();
    let central = RawCentral::start("w1").await;
    let settings = AgentSettings {
        unknown_grace: "1s",
        request_timeout: "1s",
        max_body_bytes: 1 << 20,
        ..AgentSettings::default()
    };
    let agent = Agent::start(&central.url, &settings);
    let local = Local::new(&agent);
    let watch = DirWatch::new(&agent.root());
    let desired = desired_volumes(&local, &central, 14, &mut rng).await;
    eventually("revision 10 applied", || async {
        local.metric("volume_agent_desired_revision").await == Some(10.0)
    })
    .await;
    let pid = running_pid(&agent);
    let hwm_start = proc_status_kib(pid, "VmHWM").unwrap_or(0);

    let mut tried: BTreeMap<String, u64> = BTreeMap::new();
    let mut recoveries = 0;
    for step in 0..steps {
        let mode = random_mode(&mut rng);
        let before = central.served(&mode);
        central.set_mode(mode.clone());
        // Hold the fault until the agent ran into it twice (or a bounded while).
        let deadline = Instant::now() + Duration::from_secs(10);
        while central.served(&mode) < before + 2 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        *tried.entry(mode_label(&mode)).or_default() += central.served(&mode) - before;
        running_pid(&agent);
        assert!(
            healthy(&agent).await,
            "healthz failed under {mode:?} (seed {seed})"
        );
        for k in desired.keys() {
            assert!(
                agent.root().join("live").join(k).exists(),
                "desired {k} destroyed under {mode:?} (seed {seed})"
            );
        }
        if step % 3 == 2 || step + 1 == steps {
            // The API behaves again, with a new answer naming a fresh volume destroying.
            recoveries += 1;
            let victim = format!("t{recoveries}");
            create_with_files(&local, &victim, None, &[]).await;
            let revision = central.with(|t| {
                t.mode = Mode::Good;
                t.revision += 10;
                t.destroying = vec![h(&victim)];
                t.revision
            });
            eventually("the good answer after faults is applied", || async {
                local.metric("volume_agent_desired_revision").await == Some(revision as f64)
                    && !local.handles().await.contains(&victim)
                    && central.destroyed().contains(&victim)
            })
            .await;
        }
    }

    let pid = running_pid(&agent);
    let hwm_end = proc_status_kib(pid, "VmHWM").unwrap_or(0);
    let rss_end = proc_status_kib(pid, "VmRSS").unwrap_or(0);
    let reported: BTreeSet<String> = central.destroyed().into_iter().collect();
    for (k, content) in &desired {
        assert!(
            !reported.contains(k),
            "desired {k} reported destroyed (seed {seed})"
        );
        let now = snapshot(&agent.root().join("live").join(k).join("volume"));
        assert!(&now == content, "desired {k}'s files changed (seed {seed})");
    }
    for e in watch.events() {
        assert!(
            !(e.area == Area::Live && e.change == Change::Left && desired.contains_key(&e.name)),
            "desired {} left live/ (seed {seed})",
            e.name
        );
    }
    let m = |s: &str| {
        let local = &local;
        let s = s.to_string();
        async move { local.metric(&s).await.unwrap_or(0.0) }
    };
    eprintln!(
        "central fault figures: seed={seed} steps={steps} tried(per mode, desired-set requests)={tried:?} \
         recoveries={recoveries} stale_answers={} refused_plans={} huge_bytes_sent={} \
         VmHWM start={hwm_start} KiB end={hwm_end} KiB VmRSS end={rss_end} KiB elapsed={:.1}s",
        m("volume_agent_stale_answers_total").await,
        m("volume_agent_plans_refused_total").await,
        central
            .huge_bytes_sent
            .load(std::sync::atomic::Ordering::Relaxed),
        started.elapsed().as_secs_f64()
    );
    // The 100 MiB answers were refused at the 1 MiB limit, never held.
    assert!(
        hwm_end < hwm_start + 32 * 1024,
        "peak RSS grew from {hwm_start} KiB to {hwm_end} KiB"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_mib_answer_under_the_default_limit_is_refused_and_not_held() {
    let central = RawCentral::start("w1").await;
    let settings = AgentSettings {
        max_body_bytes: 64 << 20,
        ..AgentSettings::default()
    };
    let agent = Agent::start(&central.url, &settings);
    let local = Local::new(&agent);
    local.make("v", None).await;
    central.with(|t| {
        t.keep = vec![DesiredVolume {
            handle: h("v"),
            parent: None,
        }];
        t.revision = 5;
    });
    eventually("revision 5 applied", || async {
        local.metric("volume_agent_desired_revision").await == Some(5.0)
    })
    .await;
    let pid = running_pid(&agent);
    let hwm_before = proc_status_kib(pid, "VmHWM").unwrap_or(0);
    for mode in [
        Mode::HugeChunked(HUNDRED_MIB),
        Mode::HugeWithLength(HUNDRED_MIB),
    ] {
        let before = central.served(&mode);
        central.set_mode(mode.clone());
        eventually("the huge answer is tried twice", || async {
            central.served(&mode) >= before + 2
        })
        .await;
    }
    eventually("too-large answers counted", || async {
        local
            .metric(
                "volume_agent_central_requests_total{endpoint=\"desired\",outcome=\"too_large\"}",
            )
            .await
            .unwrap_or(0.0)
            >= 2.0
    })
    .await;
    let hwm_after = proc_status_kib(pid, "VmHWM").unwrap_or(0);
    eprintln!(
        "100 MiB answers against a 64 MiB limit: VmHWM before={hwm_before} KiB after={hwm_after} KiB \
         (grew {} KiB), bytes the server got out={}",
        hwm_after.saturating_sub(hwm_before),
        central
            .huge_bytes_sent
            .load(std::sync::atomic::Ordering::Relaxed)
    );
    running_pid(&agent);
    assert!(healthy(&agent).await);
    assert_eq!(local.handles().await, ["v"]);
    // Refused by the limit: it never held the whole 100 MiB.
    assert!(
        hwm_after < hwm_before + 96 * 1024,
        "peak RSS grew by {} KiB for a refused answer",
        hwm_after.saturating_sub(hwm_before)
    );
    // It answers well again afterwards.
    central.with(|t| {
        t.mode = Mode::Good;
        t.revision = 6;
    });
    eventually("revision 6 applied", || async {
        local.metric("volume_agent_desired_revision").await == Some(6.0)
    })
    .await;
}
