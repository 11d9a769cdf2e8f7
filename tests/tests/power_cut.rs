//! Power cuts: the real agent runs with its state directory and volumes root on LazyFS
//! (see `e2e::lazyfs`), creates and destroys volumes while the test records every operation
//! it acknowledged; then SIGKILL, then LazyFS drops every write that was not fsynced (the
//! power cut), then the agent starts again on the same mount. It must start cleanly (no
//! store rebuilt, nothing quarantined), every acknowledged create must be listed in its
//! acknowledged state with its data intact, no acknowledged destroy may come back, sled and
//! `live/` must agree, and no volume may be listed without its parent.
//!
//! Data in a volume: the test plays a well-behaved client and fsyncs the files it writes
//! (its half of the bargain). A copy-on-write child of the naive driver gets a copy of its
//! parent's files, which the agent fsyncs file by file before it answers (never `syncfs`,
//! which LazyFS could not see): every acknowledged copy must be byte-identical too.
//!
//! Needs root, `/dev/fuse` and a LazyFS binary (`LAZYFS_BIN` or `lazyfs` on `PATH`);
//! without them each test prints why and returns (and fails with
//! `POWER_CUT_REQUIRE_LAZYFS=1`, which CI sets). They
//! are `#[ignore]`d so `cargo test` on a developer machine does not mount anything; CI runs
//! them through `.ci/steps/power-cut.sh`.
//!
//! `POWER_CUT_ROUNDS` (default 20) sets the power cuts per test, `POWER_CUT_SEED` repeats a run.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use e2e::faults::*;
use e2e::lazyfs::{self, LazyFs};
use e2e::wiremock::ResponseTemplate;
use e2e::*;
use protocol::local::VolumeJson;
use protocol::native::DesiredVolume;
use protocol::VolumeState;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// LazyFS's cache: well above what a round writes (checked before every power cut).
const CACHE: &str = "256mb";

/// What the test knows about one volume.
#[derive(Debug, Default)]
struct Vol {
    parent: Option<String>,
    /// `POST /volumes` answered 201.
    created: bool,
    /// `PUT .../state` to `initialized` answered 204.
    initialized: bool,
    /// The client's own files (each fsynced by the test), by name.
    own: BTreeMap<PathBuf, Vec<u8>>,
    /// The files the agent copied from the parent, by name.
    copied: BTreeMap<PathBuf, Vec<u8>>,
    /// A destroy was asked for (`DELETE` sent, or named `destroying`).
    destroy_asked: bool,
    /// By `DELETE` (else by the central side).
    destroy_local: bool,
    /// `DELETE` answered 204, or the volume was reported destroyed to the central side.
    destroy_acked: bool,
    /// The destroy was acknowledged, or the volume was seen gone after a destroy was asked
    /// for: it must never come back.
    gone: bool,
}

impl Vol {
    fn live(&self) -> bool {
        self.created && !self.gone
    }
}

type Model = Arc<Mutex<BTreeMap<String, Vol>>>;

fn lock(m: &Model) -> std::sync::MutexGuard<'_, BTreeMap<String, Vol>> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[derive(Debug, Default)]
struct Figures {
    rounds: usize,
    creates_acked: usize,
    initialized_acked: usize,
    /// Creates sent but not answered when the agent died.
    creates_in_flight_at_kill: usize,
    destroys_acked_local: usize,
    destroys_acked_central: usize,
    /// Volumes checked after a power cut (summed over rounds).
    volumes_checked: usize,
    files_checked: usize,
    /// Files of copies made by the agent (cow children) checked byte for byte.
    copies_intact: usize,
    /// From the agent's "volume inventory open" lines after the power cuts.
    creates_undone: usize,
    destroys_finished: usize,
    max_cache_usage: f64,
    /// Rounds where LazyFS itself died during the operations (its cache with it: the power
    /// cut came early); see `LazyFs::remount_after_crash`.
    lazyfs_crashes: usize,
    /// Restarts and checks done again because LazyFS died during them (see
    /// [`restart_and_check`]).
    checks_redone_after_lazyfs_crash: usize,
}

/// The LazyFS binary, or `None` after printing why the test cannot run here.
fn lazyfs_or_skip(test: &str) -> Option<PathBuf> {
    match lazyfs::binary() {
        Ok(bin) => Some(bin),
        Err(why) if lazyfs::required() => {
            panic!("{test}: POWER_CUT_REQUIRE_LAZYFS=1 but the test cannot run: {why}")
        }
        Err(why) => {
            eprintln!("SKIPPED {test}: {why}");
            None
        }
    }
}

fn settings(fs: &LazyFs) -> AgentSettings {
    AgentSettings {
        data_dir: Some(fs.mnt.clone()),
        ..AgentSettings::default()
    }
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .build()
        .expect("http client")
}

/// Writes 1–3 random files into `data`, each fsynced, then fsyncs `data`.
fn write_files(
    rng: &mut StdRng,
    data: &Path,
    handle: &str,
) -> std::io::Result<BTreeMap<PathBuf, Vec<u8>>> {
    let mut out = BTreeMap::new();
    for i in 0..rng.gen_range(1..=3) {
        let name = PathBuf::from(format!("{handle}-{i}.bin"));
        let len = rng.gen_range(0..8192);
        let bytes: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
        let f = std::fs::File::create(data.join(&name))?;
        std::io::Write::write_all(&mut &f, &bytes)?;
        f.sync_all()?;
        out.insert(name, bytes);
    }
    std::fs::File::open(data)?.sync_all()?;
    Ok(out)
}

/// Whether the LazyFS mount at `mnt` is dead (its process crashed; see
/// [`LazyFs::is_alive`]): then failures on it are the crash's, not the agent's.
fn mount_dead(mnt: &Path) -> bool {
    std::fs::metadata(mnt)
        .is_err_and(|e| matches!(e.raw_os_error(), Some(libc::ENOTCONN | libc::ECONNABORTED)))
}

enum Sent {
    /// Answered with this status and body.
    Answered(u16, String),
    /// No answer: the agent died with the request in flight.
    Lost,
}

async fn create_req(
    http: &reqwest::Client,
    base: &str,
    handle: &str,
    parent: Option<&str>,
) -> Sent {
    let req = create_request(handle, parent);
    answer(http.post(format!("{base}/volumes")).json(&req).send().await).await
}

async fn initialize_req(http: &reqwest::Client, base: &str, handle: &str) -> Sent {
    let body = protocol::local::SetStateRequest {
        state: VolumeState::Initialized,
    };
    answer(
        http.put(format!("{base}/volumes/{handle}/state"))
            .json(&body)
            .send()
            .await,
    )
    .await
}

async fn delete_req(http: &reqwest::Client, base: &str, handle: &str) -> Sent {
    answer(http.delete(format!("{base}/volumes/{handle}")).send().await).await
}

async fn answer(resp: reqwest::Result<reqwest::Response>) -> Sent {
    let Ok(resp) = resp else { return Sent::Lost };
    let status = resp.status().as_u16();
    match resp.text().await {
        Ok(body) => Sent::Answered(status, body),
        Err(_) => Sent::Lost,
    }
}

/// Creates `handle` (a cow child of `parent` when set), writes its files and initializes
/// it, recording each acknowledgement in `model`. Returns false when the agent stopped
/// answering (it was killed) or the LazyFS mount `mnt` died; any other refusal or failure
/// fails the test.
async fn create_one(
    http: &reqwest::Client,
    base: &str,
    mnt: &Path,
    model: &Model,
    rng: &mut StdRng,
    handle: &str,
    parent: Option<&str>,
) -> bool {
    // What the agent will copy: the parent is initialized, so the test no longer writes
    // to it.
    let copied: BTreeMap<PathBuf, Vec<u8>> = parent
        .map(|p| {
            let m = lock(model);
            let pv = &m[p];
            pv.copied
                .iter()
                .chain(pv.own.iter())
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect()
        })
        .unwrap_or_default();
    lock(model).insert(
        handle.to_owned(),
        Vol {
            parent: parent.map(str::to_owned),
            copied,
            ..Vol::default()
        },
    );
    let data = match create_req(http, base, handle, parent).await {
        Sent::Lost => return false,
        Sent::Answered(201, body) => {
            let v: VolumeJson = serde_json::from_str(&body).expect("volume json");
            lock(model).get_mut(handle).expect("recorded").created = true;
            PathBuf::from(v.path)
        }
        Sent::Answered(_, _) if mount_dead(mnt) => return false,
        Sent::Answered(s, body) => {
            panic!("create {handle} (parent {parent:?}) refused: {s}: {body}")
        }
    };
    let own = match write_files(rng, &data, handle) {
        Ok(own) => own,
        Err(_) if mount_dead(mnt) => return false,
        Err(e) => panic!("writing {handle}'s files: {e}"),
    };
    lock(model).get_mut(handle).expect("recorded").own = own;
    match initialize_req(http, base, handle).await {
        Sent::Lost => false,
        Sent::Answered(204, _) => {
            lock(model).get_mut(handle).expect("recorded").initialized = true;
            true
        }
        Sent::Answered(_, _) if mount_dead(mnt) => false,
        Sent::Answered(s, body) => panic!("initialize {handle} refused: {s}: {body}"),
    }
}

/// A random initialized volume to be a parent (not being destroyed), or `None`.
fn pick_parent(model: &Model, rng: &mut StdRng) -> Option<String> {
    let m = lock(model);
    let candidates: Vec<&String> = m
        .iter()
        .filter(|(_, v)| v.live() && v.initialized && !v.destroy_asked)
        .map(|(k, _)| k)
        .collect();
    if candidates.is_empty() {
        return None;
    }
    Some(candidates[rng.gen_range(0..candidates.len())].clone())
}

/// The part of the agent's log written since `from` bytes.
fn log_since(agent: &Agent, from: usize) -> String {
    let log = agent.log();
    strip_ansi(log.get(from..).unwrap_or(&log))
}

/// `key=value` of a log line, as a number.
fn field(line: &str, key: &str) -> Option<usize> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('=')?.parse().ok())
}

/// SIGKILL, check LazyFS's cache never filled, power cut, restart; returns where the
/// restart's log begins. When LazyFS itself died meanwhile, its cache went with it (the
/// power cut happened already): it is mounted again on the same backing directory.
fn power_cut_and_restart(agent: &mut Agent, fs: &mut LazyFs, fig: &mut Figures) -> usize {
    agent.kill();
    if fs.is_alive() {
        let usage = fs.cache_usage();
        fig.max_cache_usage = fig.max_cache_usage.max(usage);
        assert!(
            usage < 90.0,
            "LazyFS's cache is {usage}% full: writes would reach the disk unsynced; raise CACHE"
        );
        fs.power_cut();
    } else {
        fs.remount_after_crash();
        fig.lazyfs_crashes = fs.crashes();
    }
    let log_from = agent.log().len();
    agent.spawn();
    log_from
}

/// Power cut, restart and the checks. When LazyFS itself dies meanwhile and a check fails
/// (on a dead mount everything fails), that is one more power cut: the agent is killed,
/// LazyFS mounted again, the agent restarted and every check done again, from the start.
/// A failure while LazyFS is alive fails the test.
async fn restart_and_check(
    agent: &mut Agent,
    fs: &mut LazyFs,
    local: &Local,
    model: &Model,
    fig: &mut Figures,
    context: &str,
) {
    use futures::FutureExt;
    for attempt in 1.. {
        let done = std::panic::AssertUnwindSafe(async {
            let log_from = power_cut_and_restart(agent, fs, fig);
            check_after_power_cut(agent, local, model, log_from, fig, context).await;
        })
        .catch_unwind()
        .await;
        match done {
            Ok(()) => return,
            Err(_) if !fs.is_alive() && attempt < 3 => {
                fig.checks_redone_after_lazyfs_crash += 1;
                eprintln!(
                    "LazyFS died during the restart or the checks ({context}): the failure above \
                     is the dead mount's; power cut again and every check again"
                );
            }
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }
}

/// The checks after a restart (see the module docs). Marks volumes whose asked-for destroy
/// is now seen done as gone.
async fn check_after_power_cut(
    agent: &Agent,
    local: &Local,
    model: &Model,
    log_from: usize,
    fig: &mut Figures,
    context: &str,
) {
    // Starts cleanly.
    let log = log_since(agent, log_from);
    let open = log
        .lines()
        .rfind(|l| l.contains("volume inventory open"))
        .unwrap_or_else(|| {
            panic!("no 'volume inventory open' line after the restart ({context}):\n{log}")
        });
    assert!(
        open.contains("rebuilt_from_disk=false"),
        "the store was rebuilt from disk after the power cut ({context}): {open}"
    );
    assert_eq!(field(open, "quarantined"), Some(0), "{context}: {open}");
    assert!(
        !log.contains("empty/corrupt configuration file found"),
        "sled's conf file did not survive the power cut ({context})"
    );
    fig.creates_undone += field(open, "creates_removed").unwrap_or(0);
    fig.destroys_finished += field(open, "destroys_finished").unwrap_or(0);

    let listed: Vec<VolumeJson> = local
        .http
        .get(format!("{}/inventory", local.base))
        .send()
        .await
        .expect("list volumes")
        .json()
        .await
        .expect("list json");
    let by_handle: BTreeMap<String, &VolumeJson> =
        listed.iter().map(|v| (v.handle.to_string(), v)).collect();
    let root = agent.root();

    // sled and disk agree; nothing half-done is left.
    let names: Vec<String> = by_handle.keys().cloned().collect();
    assert_eq!(
        entries(&root.join("live")),
        names,
        "live/ and the inventory differ ({context})"
    );
    for area in ["init", "dead", "quarantine"] {
        assert!(
            entries(&root.join(area)).is_empty(),
            "{area}/ not empty after recovery ({context}): {:?}",
            entries(&root.join(area))
        );
    }
    // No child without its parent; nothing left half-destroyed.
    for v in &listed {
        assert_ne!(v.state, VolumeState::Destroying, "{} ({context})", v.handle);
        assert_ne!(v.state, VolumeState::Creating, "{} ({context})", v.handle);
        if let Some(p) = &v.parent {
            assert!(
                by_handle.contains_key(p.as_str()),
                "{} is listed without its parent {p} ({context})",
                v.handle
            );
        }
    }

    let mut m = lock(model);
    for (k, vol) in m.iter_mut() {
        let here = by_handle.get(k.as_str());
        if vol.gone {
            assert!(
                here.is_none(),
                "{k}: its destroy was acknowledged, but it came back ({context})"
            );
            continue;
        }
        let Some(v) = here else {
            assert!(
                !vol.created || vol.destroy_asked,
                "{k}: its create was acknowledged, but it is gone ({context})"
            );
            if vol.destroy_asked {
                vol.gone = true;
            }
            continue;
        };
        // A create that was not acknowledged may be there or not; when there, it is whole.
        assert_eq!(
            v.parent.as_ref().map(|p| p.to_string()),
            vol.parent,
            "{k}'s parent ({context})"
        );
        if vol.initialized {
            assert_eq!(v.state, VolumeState::Initialized, "{k} ({context})");
        }
        fig.volumes_checked += 1;
        let data = snapshot(Path::new(&v.path));
        for (name, bytes) in &vol.own {
            fig.files_checked += 1;
            assert!(
                data.get(name) == Some(bytes),
                "{k}: the client's fsynced file {} is {} after the power cut ({context})",
                name.display(),
                match data.get(name) {
                    None => "missing".to_owned(),
                    Some(b) => format!("{} bytes, not the {} written", b.len(), bytes.len()),
                }
            );
        }
        for (name, bytes) in &vol.copied {
            let got = data.get(name).unwrap_or_else(|| {
                panic!("{k}: the copy of {} is missing ({context})", name.display())
            });
            assert!(
                got == bytes,
                "{k}: the agent's copy of {} is {} bytes, not the parent's {}, after the \
                 power cut: the copy was acknowledged before it was durable ({context})",
                name.display(),
                got.len(),
                bytes.len()
            );
            fig.copies_intact += 1;
        }
        let expected: BTreeSet<&PathBuf> = vol.own.keys().chain(vol.copied.keys()).collect();
        let extra: Vec<&PathBuf> = data.keys().filter(|n| !expected.contains(n)).collect();
        assert!(
            extra.is_empty(),
            "{k}: unexpected files {extra:?} ({context})"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root, /dev/fuse and LazyFS: run by .ci/steps/power-cut.sh"]
async fn acknowledged_creates_survive_a_power_cut() {
    let Some(bin) = lazyfs_or_skip("acknowledged_creates_survive_a_power_cut") else {
        return;
    };
    let (mut rng, seed) = seeded_rng("POWER_CUT_SEED");
    let rounds = env_usize("POWER_CUT_ROUNDS", 20);
    let started = Instant::now();
    let mut fs = LazyFs::mount(&bin, CACHE);
    let script = DesiredScript::new("w1");
    // The central side says nothing useful: nothing is destroyed by absence meanwhile.
    script.with(|s| s.override_response = Some(ResponseTemplate::new(503)));
    let server = mock_central(&script).await;
    let mut agent = Agent::start(&server.uri(), &settings(&fs));
    let local = Local::new(&agent);
    let model: Model = Arc::default();
    let mut fig = Figures::default();

    for round in 1..=rounds {
        fig.rounds = round;
        let context = format!("round {round}, POWER_CUT_SEED={seed}");
        // Two clients create roots and copy-on-write children until the agent dies.
        let mut drivers = Vec::new();
        for lane in ["a", "b"] {
            let (model, base, mnt) = (model.clone(), agent.api.clone(), fs.mnt.clone());
            let mut lane_rng = StdRng::seed_from_u64(rng.gen());
            drivers.push(tokio::spawn(async move {
                let http = client();
                for i in 0.. {
                    let handle = format!("r{round}{lane}{i}");
                    let parent = if lane_rng.gen_bool(0.5) {
                        pick_parent(&model, &mut lane_rng)
                    } else {
                        None
                    };
                    if !create_one(
                        &http,
                        &base,
                        &mnt,
                        &model,
                        &mut lane_rng,
                        &handle,
                        parent.as_deref(),
                    )
                    .await
                    {
                        return;
                    }
                }
            }));
        }
        tokio::time::sleep(Duration::from_millis(rng.gen_range(50..=800))).await;
        agent.kill();
        for d in drivers {
            if let Err(e) = d.await {
                panic!("a client task failed ({context}): {e}");
            }
        }
        restart_and_check(&mut agent, &mut fs, &local, &model, &mut fig, &context).await;
    }

    let m = lock(&model);
    fig.creates_acked = m.values().filter(|v| v.created).count();
    fig.initialized_acked = m.values().filter(|v| v.initialized).count();
    fig.creates_in_flight_at_kill = m.values().filter(|v| !v.created).count();
    eprintln!(
        "power-cut figures (creates): POWER_CUT_SEED={seed} {fig:?} elapsed={:.1}s",
        started.elapsed().as_secs_f64()
    );
    assert!(
        fig.creates_acked > rounds,
        "too few creates to mean anything"
    );
}

/// The volume and its descendants, per `model`.
fn subtree(m: &BTreeMap<String, Vol>, top: &str) -> Vec<String> {
    let mut out = vec![top.to_owned()];
    let mut i = 0;
    while i < out.len() {
        let cur = out[i].clone();
        out.extend(
            m.iter()
                .filter(|(_, v)| v.live() && v.parent.as_deref() == Some(cur.as_str()))
                .map(|(k, _)| k.clone()),
        );
        i += 1;
    }
    out
}

fn depth(m: &BTreeMap<String, Vol>, h: &str) -> usize {
    let mut d = 0;
    let mut cur = m[h].parent.clone();
    while let Some(p) = cur {
        d += 1;
        cur = m[&p].parent.clone();
    }
    d
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root, /dev/fuse and LazyFS: run by .ci/steps/power-cut.sh"]
async fn acknowledged_destroys_stay_destroyed_after_a_power_cut() {
    let Some(bin) = lazyfs_or_skip("acknowledged_destroys_stay_destroyed_after_a_power_cut") else {
        return;
    };
    let (mut rng, seed) = seeded_rng("POWER_CUT_SEED");
    let rounds = env_usize("POWER_CUT_ROUNDS", 20);
    let started = Instant::now();
    let mut fs = LazyFs::mount(&bin, CACHE);
    let script = DesiredScript::new("w1");
    let server = mock_central(&script).await;
    let mut agent = Agent::start(&server.uri(), &settings(&fs));
    let local = Local::new(&agent);
    let http = client();
    let model: Model = Arc::default();
    let mut fig = Figures::default();
    let mut reports_seen = 0;

    for round in 1..=rounds {
        fig.rounds = round;
        let context = format!("round {round}, POWER_CUT_SEED={seed}");
        // New volumes, all acknowledged (the agent is alive throughout).
        for i in 0..rng.gen_range(6..=12) {
            let parent = if rng.gen_bool(0.6) {
                pick_parent(&model, &mut rng)
            } else {
                None
            };
            let handle = format!("r{round}v{i}");
            if !create_one(
                &http,
                &agent.api,
                &fs.mnt,
                &model,
                &mut rng,
                &handle,
                parent.as_deref(),
            )
            .await
            {
                // Only a dead mount excuses it; the destroys below then fail on it too.
                assert!(
                    !fs.is_alive(),
                    "the agent stopped answering while alive ({context}):\n{}",
                    agent.log()
                );
                break;
            }
        }
        // Whole subtrees go, some by DELETE, some named `destroying` by the central side;
        // destroys asked for earlier and not seen done are asked again.
        let (local_set, central_set) = {
            let mut m = lock(&model);
            let live: Vec<String> = m
                .iter()
                .filter(|(_, v)| v.live() && !v.destroy_asked)
                .map(|(k, _)| k.clone())
                .collect();
            for top in live {
                if m[&top].destroy_asked || !rng.gen_bool(0.3) {
                    continue;
                }
                let members = subtree(&m, &top);
                // DELETE only works children first: not over a descendant the central side
                // was told to destroy earlier and has not yet (it waits for children itself).
                let by_delete = rng.gen_bool(0.5)
                    && !members
                        .iter()
                        .any(|k| m[k].destroy_asked && !m[k].destroy_local);
                for k in members {
                    let v = m.get_mut(&k).expect("in the model");
                    if !v.destroy_asked {
                        v.destroy_asked = true;
                        v.destroy_local = by_delete;
                    }
                }
            }
            let mut local_set: Vec<String> = m
                .iter()
                .filter(|(_, v)| v.live() && v.destroy_asked && v.destroy_local)
                .map(|(k, _)| k.clone())
                .collect();
            // Children first.
            local_set.sort_by_key(|k| std::cmp::Reverse(depth(&m, k)));
            let central_set: Vec<String> = m
                .iter()
                .filter(|(_, v)| v.live() && v.destroy_asked && !v.destroy_local)
                .map(|(k, _)| k.clone())
                .collect();
            let keep: Vec<DesiredVolume> = m
                .iter()
                .filter(|(_, v)| v.live() && !v.destroy_asked)
                .map(|(k, v)| DesiredVolume {
                    handle: h(k),
                    parent: v.parent.as_deref().map(h),
                })
                .collect();
            script.with(|s| {
                s.override_response = None;
                s.keep = keep;
                s.destroying = central_set.iter().map(|k| h(k)).collect();
                s.revision += 1;
            });
            (local_set, central_set)
        };
        let deleter = {
            let (model, base, mnt) = (model.clone(), agent.api.clone(), fs.mnt.clone());
            tokio::spawn(async move {
                let http = client();
                for k in local_set {
                    match delete_req(&http, &base, &k).await {
                        Sent::Lost => return,
                        Sent::Answered(s @ (204 | 404), _) => {
                            let mut m = lock(&model);
                            let v = m.get_mut(&k).expect("in the model");
                            v.gone = true;
                            v.destroy_acked |= s == 204;
                        }
                        Sent::Answered(_, _) if mount_dead(&mnt) => return,
                        Sent::Answered(s, body) => panic!("DELETE {k}: {s}: {body}"),
                    }
                }
            })
        };
        let limit = if central_set.is_empty() { 300 } else { 1200 };
        tokio::time::sleep(Duration::from_millis(rng.gen_range(0..=limit))).await;
        agent.kill();
        if let Err(e) = deleter.await {
            panic!("the delete task failed ({context}): {e}");
        }
        // Whatever the central side was told was destroyed is acknowledged.
        let reports = reports(&server).await;
        for r in &reports[reports_seen..] {
            for d in &r.destroyed {
                if let Some(v) = lock(&model).get_mut(d.as_str()) {
                    v.gone = true;
                    v.destroy_acked = true;
                }
            }
        }
        reports_seen = reports.len();
        // The restarted agent must not hear the desired set before the checks, or it would
        // destroy again what came back.
        script.with(|s| s.override_response = Some(ResponseTemplate::new(503)));
        restart_and_check(&mut agent, &mut fs, &local, &model, &mut fig, &context).await;
    }

    let m = lock(&model);
    fig.creates_acked = m.values().filter(|v| v.created).count();
    fig.initialized_acked = m.values().filter(|v| v.initialized).count();
    fig.destroys_acked_local = m
        .values()
        .filter(|v| v.destroy_acked && v.destroy_local)
        .count();
    fig.destroys_acked_central = m
        .values()
        .filter(|v| v.destroy_acked && !v.destroy_local)
        .count();
    eprintln!(
        "power-cut figures (destroys): POWER_CUT_SEED={seed} {fig:?} elapsed={:.1}s",
        started.elapsed().as_secs_f64()
    );
    assert!(
        fig.destroys_acked_local + fig.destroys_acked_central > rounds,
        "too few destroys to mean anything"
    );
}
