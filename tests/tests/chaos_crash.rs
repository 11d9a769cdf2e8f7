//! Crash chaos: SIGKILL the real agent at random moments of its destroy passes over random
//! forests of volumes, restart it on the same directories, and check that nothing desired
//! was lost, everything undesired went, children always went before their parents, and
//! sled and the disk agree.
//!
//! How the order is checked: one inotify instance watches `init/`, `live/` and `dead/` of
//! the volumes root for the whole run (it lives in the test process, so it keeps recording
//! across kills and restarts). The kernel queues the events of the three watches in one
//! queue, in the order the renames and deletions happened. A destroy moves `live/<h>` to
//! `dead/<h>` (or, on a full disk, removes it in place) and finally deletes `dead/<h>`.
//! So "child before parent" is: the child's directory was deleted (its last "left" event)
//! before the parent's directory first left `live/`. Polling between kills would miss
//! orderings inside one pass, and the agent's log lines are written after the fact (and a
//! SIGKILL can cut them off), so neither is sound; the kernel's event queue is.
//!
//! `CHAOS_KILLS` (default 100) sets the number of kills, `CHAOS_SEED` repeats a run.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use e2e::faults::*;
use e2e::*;
use protocol::native::DesiredVolume;
use rand::Rng;

struct Vol {
    parent: Option<String>,
    /// Expected to survive (desired, or an ancestor of a desired volume).
    keep: bool,
    named: bool,
    content: BTreeMap<PathBuf, Vec<u8>>,
}

#[derive(Default, Debug)]
struct Figures {
    rounds: usize,
    volumes: usize,
    kept: usize,
    destroyed: usize,
    blocked_parents: usize,
    kills: usize,
    kills_with_work_pending: usize,
    kills_with_dead_leftover: usize,
    kills_on_event: usize,
    create_secs: f64,
    chaos_secs: f64,
}

fn random_files(rng: &mut impl Rng, handle: &str) -> Vec<(String, Vec<u8>)> {
    (0..rng.gen_range(1..=4))
        .map(|i| {
            let name = if rng.gen_bool(0.3) {
                format!("sub{i}/{handle}-{i}.bin")
            } else {
                format!("{handle}-{i}.bin")
            };
            let len = rng.gen_range(0..4096);
            (name, (0..len).map(|_| rng.gen()).collect())
        })
        .collect()
}

fn live_has(agent: &Agent, h: &str) -> bool {
    agent.root().join("live").join(h).exists()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_destroy_passes_loses_nothing_and_destroys_children_first() {
    let (mut rng, seed) = seeded_rng("CHAOS_SEED");
    let target_kills = env_usize("CHAOS_KILLS", 100);
    let started = Instant::now();
    let script = DesiredScript::new("w1");
    let server = mock_central(&script).await;
    let settings = AgentSettings {
        unknown_grace: "1s",
        ..AgentSettings::default()
    };
    let mut agent = Agent::start(&server.uri(), &settings);
    let local = Local::new(&agent);
    let watch = DirWatch::new(&agent.root());
    let mut vols: BTreeMap<String, Vol> = BTreeMap::new();
    let mut fig = Figures::default();

    while fig.kills < target_kills {
        fig.rounds += 1;
        let round = fig.rounds;
        // A random forest: each volume is a root or a child of an earlier one.
        let n = rng.gen_range(10..=40);
        let mut shape: Vec<(String, Option<String>)> = Vec::new();
        for i in 0..n {
            let parent = (i > 0 && rng.gen_bool(0.6)).then(|| shape[rng.gen_range(0..i)].0.clone());
            shape.push((format!("r{round}-v{i}"), parent));
        }
        // Keep everything while creating (so nothing is unknown meanwhile).
        let mut keep: Vec<DesiredVolume> = vols
            .iter()
            .filter(|(_, v)| v.keep)
            .map(|(k, v)| DesiredVolume {
                handle: h(k),
                parent: v.parent.as_deref().map(h),
            })
            .collect();
        let earlier_keep = keep.clone();
        keep.extend(shape.iter().map(|(k, p)| DesiredVolume {
            handle: h(k),
            parent: p.as_deref().map(h),
        }));
        script.with(|s| {
            s.keep = keep;
            s.destroying.clear();
            s.revision += 1;
        });
        let t0 = Instant::now();
        for (k, p) in &shape {
            let files = random_files(&mut rng, k);
            let data = create_with_files(&local, k, p.as_deref(), &files).await;
            vols.insert(
                k.clone(),
                Vol {
                    parent: p.clone(),
                    keep: false,
                    named: false,
                    content: snapshot(&data),
                },
            );
        }
        let created_at = Instant::now();
        fig.create_secs += t0.elapsed().as_secs_f64();
        // Which ones stay: a random subset, half the rounds closed under ancestors (what a
        // central database with its foreign key would send), half not (parents blocked).
        let closed = rng.gen_bool(0.5);
        let mut desired: BTreeSet<String> = shape
            .iter()
            .filter(|_| rng.gen_bool(0.4))
            .map(|(k, _)| k.clone())
            .collect();
        let mut survive = desired.clone();
        for d in desired.clone() {
            let mut cur = vols[&d].parent.clone();
            while let Some(p) = cur {
                survive.insert(p.clone());
                if closed {
                    desired.insert(p.clone());
                }
                cur = vols[&p].parent.clone();
            }
        }
        let mut unknown = 0;
        let mut named = Vec::new();
        for (k, _) in &shape {
            let v = vols.get_mut(k).expect("just made");
            v.keep = survive.contains(k);
            if desired.contains(k) {
                continue;
            }
            // The rest is named destroying or left unknown (at most 10 unknown, so the
            // mass-destroy guard stays out of this test).
            if unknown < 10 && rng.gen_bool(0.4) {
                unknown += 1;
            } else {
                v.named = true;
                named.push(h(k));
            }
            if v.keep {
                fig.blocked_parents += 1;
            }
        }
        let gone: Vec<String> = shape
            .iter()
            .filter(|(k, _)| !vols[k].keep)
            .map(|(k, _)| k.clone())
            .collect();
        fig.volumes += shape.len();
        fig.destroyed += gone.len();
        // Unknown volumes must be past the 1 s grace period by the time passes run.
        let grace = Duration::from_millis(1100);
        if created_at.elapsed() < grace {
            tokio::time::sleep(grace - created_at.elapsed()).await;
        }
        let mut keep = earlier_keep;
        keep.extend(
            shape
                .iter()
                .filter(|(k, _)| desired.contains(k))
                .map(|(k, p)| DesiredVolume {
                    handle: h(k),
                    parent: p.as_deref().map(h),
                }),
        );
        script.with(|s| {
            s.keep = keep;
            s.destroying = named;
            s.revision += 1;
        });

        let t1 = Instant::now();
        // Kill it a few times while it works through the round.
        let kills_this_round = rng.gen_range(3..=8).min(target_kills - fig.kills);
        for _ in 0..kills_this_round {
            let remaining = gone.iter().filter(|k| live_has(&agent, k)).count();
            if remaining == 0 && fig.kills > 0 && rng.gen_bool(0.5) {
                break;
            }
            let events_before = watch.len();
            if remaining > 0 && rng.gen_bool(0.5) {
                // Right after the j-th directory change of this life: inside a pass.
                let j = rng.gen_range(1..=remaining.max(1) * 2);
                let deadline = Instant::now() + Duration::from_secs(3);
                while watch.len() < events_before + j && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_micros(200));
                }
                fig.kills_on_event += 1;
            } else {
                tokio::time::sleep(Duration::from_millis(rng.gen_range(0..400))).await;
            }
            agent.kill();
            fig.kills += 1;
            let dead = entries(&agent.root().join("dead"));
            if !dead.is_empty() {
                fig.kills_with_dead_leftover += 1;
            }
            if !dead.is_empty() || gone.iter().any(|k| live_has(&agent, k)) {
                fig.kills_with_work_pending += 1;
            }
            for (k, v) in &vols {
                assert!(
                    !v.keep || live_has(&agent, k),
                    "kept volume {k} vanished (kill {}, seed {seed})",
                    fig.kills
                );
            }
            agent.spawn();
        }
        // Let the last life finish the round.
        eventually("the round's undesired volumes are destroyed", || async {
            let have: BTreeSet<String> = local.handles().await.into_iter().collect();
            gone.iter()
                .all(|k| !have.contains(k) && !live_has(&agent, k))
        })
        .await;
        // And report the named ones before the next round changes the list (a volume
        // removed just before a kill is reported as already gone by a later pass).
        eventually(
            "the round's named volumes are reported destroyed",
            || async {
                let reported: BTreeSet<String> = destroyed(&server).await.into_iter().collect();
                gone.iter().all(|k| !vols[k].named || reported.contains(k))
            },
        )
        .await;
        fig.chaos_secs += t1.elapsed().as_secs_f64();
        // Blocked parents and kept unknown parents become desired from now on.
        fig.kept = vols.values().filter(|v| v.keep).count();
    }

    // A full pass after the last restart: nothing left to destroy.
    let plan_url = format!("{}/gc/plan", agent.api);
    eventually("a pass with nothing left to destroy", || async {
        let plan: serde_json::Value = match reqwest::get(&plan_url).await {
            Ok(r) => r.json().await.unwrap_or_default(),
            Err(_) => return false,
        };
        plan["actions"]
            .as_array()
            .is_some_and(|a| a.iter().all(|x| x["action"] != "destroy"))
    })
    .await;
    eventually("every named volume is reported destroyed", || async {
        let reported: BTreeSet<String> = destroyed(&server).await.into_iter().collect();
        vols.iter()
            .filter(|(_, v)| v.named && !v.keep)
            .all(|(k, _)| reported.contains(k))
    })
    .await;

    // Nothing lost, nothing left.
    let root = agent.root();
    let listed = local.handles().await;
    let expected: Vec<String> = vols
        .iter()
        .filter(|(_, v)| v.keep)
        .map(|(k, _)| k.clone())
        .collect();
    assert_eq!(
        listed, expected,
        "the inventory holds exactly the kept volumes (seed {seed})"
    );
    assert_eq!(
        entries(&root.join("live")),
        listed,
        "sled and live/ agree (seed {seed})"
    );
    assert!(entries(&root.join("init")).is_empty(), "leftovers in init/");
    assert!(entries(&root.join("dead")).is_empty(), "leftovers in dead/");
    assert!(
        entries(&root.join("quarantine")).is_empty(),
        "quarantined directories: {:?}",
        entries(&root.join("quarantine"))
    );
    for (k, v) in vols.iter().filter(|(_, v)| v.keep) {
        let now = snapshot(&root.join("live").join(k).join("volume"));
        assert!(now == v.content, "volume {k}'s files changed (seed {seed})");
    }

    // Order, from the kernel's event queue.
    let events = watch.events();
    let mut first_left_live: HashMap<&str, usize> = HashMap::new();
    let mut last_removed: HashMap<&str, usize> = HashMap::new();
    for (i, e) in events.iter().enumerate() {
        if e.change != Change::Left {
            continue;
        }
        if e.area == Area::Live {
            first_left_live.entry(e.name.as_str()).or_insert(i);
        }
        // The directory itself is gone: deleted from dead/ (or from live/ in place).
        if e.area == Area::Dead || e.area == Area::Live {
            last_removed.insert(e.name.as_str(), i);
        }
    }
    let mut pairs_checked = 0;
    for (k, v) in &vols {
        if v.keep {
            assert!(
                !first_left_live.contains_key(k.as_str()),
                "kept volume {k} left live/ at some point (seed {seed})"
            );
        }
        let Some(p) = &v.parent else { continue };
        if let Some(&parent_left) = first_left_live.get(p.as_str()) {
            let child_removed = last_removed.get(k.as_str()).copied();
            assert!(
                child_removed.is_some_and(|c| c < parent_left),
                "parent {p} left live/ (event {parent_left}) before its child {k} was removed ({child_removed:?}) (seed {seed})"
            );
            pairs_checked += 1;
        }
    }
    let recoveries_finishing = strip_ansi(&agent.log())
        .lines()
        .filter(|l| l.contains("volume inventory open") && !l.contains("destroys_finished=0"))
        .count();
    eprintln!(
        "chaos figures: seed={seed} {fig:?} parent/child pairs checked={pairs_checked} \
         inotify events={} starts that finished an interrupted destroy={recoveries_finishing} \
         elapsed={:.1}s",
        events.len(),
        started.elapsed().as_secs_f64()
    );
    assert!(fig.kills >= target_kills);
    assert!(
        pairs_checked > 0,
        "no parent was destroyed: the check checked nothing"
    );
}
