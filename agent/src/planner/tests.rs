use super::*;
use chrono::TimeZone;
use proptest::prelude::*;
use std::collections::HashSet;

fn h(s: &str) -> Handle {
    Handle::new(s).expect("test handle")
}

fn t0() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 11, 24, 20, 0, 0)
        .single()
        .expect("valid time")
}

fn vol(handle: &str, parent: Option<&str>, state: VolumeState) -> LocalVolume {
    LocalVolume {
        handle: h(handle),
        parent: parent.map(h),
        state,
        created_at: t0(),
        missing: false,
    }
}

/// An initialized volume whose data directory the drift scan found gone.
fn gone(handle: &str, parent: Option<&str>) -> LocalVolume {
    LocalVolume {
        missing: true,
        ..init(handle, parent)
    }
}

fn init(handle: &str, parent: Option<&str>) -> LocalVolume {
    vol(handle, parent, VolumeState::Initialized)
}

fn native(keep: &[&str], destroying: &[&str], as_of: DateTime<Utc>) -> Desired {
    Desired::Native {
        keep: keep.iter().map(|s| h(s)).collect(),
        destroying: destroying.iter().map(|s| h(s)).collect(),
        as_of,
    }
}

fn later(secs: i64) -> DateTime<Utc> {
    t0() + chrono::Duration::seconds(secs)
}

fn destroyed(p: &Plan) -> Vec<&str> {
    p.destroy.iter().map(|d| d.handle.as_str()).collect()
}

#[test]
fn destroys_child_before_parent_in_one_pass() {
    let local = vec![init("a", None), init("b", Some("a")), init("c", Some("b"))];
    let p = plan(
        &local,
        &native(&[], &["a", "b", "c"], later(1)),
        later(1),
        &Policy::default(),
    );
    assert_eq!(destroyed(&p), ["c", "b", "a"]);
    assert_eq!(p.destroy[1].after, [h("c")]);
    assert_eq!(p.destroy[2].after, [h("b")]);
    assert!(p.blocked.is_empty());
}

#[test]
fn blocks_parent_whose_child_is_desired() {
    let local = vec![init("a", None), init("b", Some("a"))];
    let p = plan(
        &local,
        &native(&["b"], &["a"], later(1)),
        later(1),
        &Policy::default(),
    );
    assert!(p.destroy.is_empty());
    assert_eq!(
        p.blocked,
        [Blocked {
            handle: h("a"),
            reason: Reason::Named,
            by_children: vec![h("b")]
        }]
    );
}

#[test]
fn blocks_parent_whose_child_is_still_creating() {
    let local = vec![init("a", None), vol("b", Some("a"), VolumeState::Creating)];
    let p = plan(
        &local,
        &native(&[], &["a"], later(3600)),
        later(3600),
        &Policy::default(),
    );
    assert!(p.destroy.is_empty());
    assert_eq!(p.blocked[0].by_children, [h("b")]);
    assert_eq!(
        p.waiting,
        [(h("b"), WaitReason::InProgress(VolumeState::Creating))]
    );
}

#[test]
fn unknown_volume_waits_for_the_grace_period_by_both_clocks() {
    let local = vec![init("x", None)];
    let policy = Policy::default();
    // Young by the answer's clock (as_of), old by ours: kept.
    let p = plan(&local, &native(&[], &[], later(10)), later(3600), &policy);
    assert!(p.destroy.is_empty());
    assert!(matches!(p.waiting[0].1, WaitReason::Young { .. }));
    // Old by the answer, young by ours (skew): kept.
    let p = plan(&local, &native(&[], &[], later(3600)), later(10), &policy);
    assert!(p.destroy.is_empty());
    // Old by both: goes.
    let p = plan(&local, &native(&[], &[], later(301)), later(301), &policy);
    assert_eq!(destroyed(&p), ["x"]);
    assert_eq!(p.destroy[0].reason, Reason::Unknown);
}

#[test]
fn never_destroys_in_progress_volume_by_absence() {
    let local = vec![
        vol("c", None, VolumeState::Creating),
        vol("i", None, VolumeState::Initializing),
    ];
    let p = plan(
        &local,
        &native(&[], &[], later(86400)),
        later(86400),
        &Policy::default(),
    );
    assert!(p.destroy.is_empty());
    assert_eq!(p.waiting.len(), 2);
}

#[test]
fn named_volume_goes_even_while_initializing() {
    let local = vec![vol("i", None, VolumeState::Initializing)];
    let p = plan(&local, &native(&[], &["i"], t0()), t0(), &Policy::default());
    assert_eq!(destroyed(&p), ["i"]);
}

#[test]
fn reports_named_handle_it_does_not_have_as_already_gone() {
    let p = plan(
        &[init("a", None)],
        &native(&["a"], &["zz"], t0()),
        t0(),
        &Policy::default(),
    );
    assert_eq!(p.already_gone, [h("zz")]);
    assert!(p.destroy.is_empty());
}

#[test]
fn reports_desired_volume_it_does_not_have_as_missing() {
    let p = plan(
        &[init("a", None)],
        &native(&["a", "m"], &[], t0()),
        t0(),
        &Policy::default(),
    );
    assert_eq!(p.missing, [h("m")]);
}

#[test]
fn mass_destroy_guard_refuses_destroys_by_absence_but_not_named() {
    let mut local: Vec<LocalVolume> = (0..20).map(|i| init(&format!("v{i:02}"), None)).collect();
    local.push(init("named", None));
    let p = plan(
        &local,
        &native(&[], &["named"], later(3600)),
        later(3600),
        &Policy::default(),
    );
    let refusal = p.refused.as_ref().expect("guard trips");
    assert_eq!(refusal.would_destroy, 20);
    assert_eq!(destroyed(&p), ["named"]);
    assert!(p.waiting.iter().all(|(_, w)| *w == WaitReason::Guard));
}

#[test]
fn mass_destroy_guard_counts_young_unknown_volumes_too() {
    // Volumes age past the grace period a few at a time; the guard must not leak them.
    let mut local: Vec<LocalVolume> = (0..20).map(|i| init(&format!("v{i:02}"), None)).collect();
    for v in local.iter_mut().skip(3) {
        v.created_at = later(3590);
    }
    let p = plan(
        &local,
        &native(&[], &[], later(3600)),
        later(3600),
        &Policy::default(),
    );
    assert!(p.refused.is_some());
    assert!(p.destroy.is_empty());
}

#[test]
fn mass_destroy_guard_allows_small_worker_to_empty() {
    let local: Vec<LocalVolume> = (0..10).map(|i| init(&format!("v{i}"), None)).collect();
    let p = plan(
        &local,
        &native(&[], &[], later(3600)),
        later(3600),
        &Policy::default(),
    );
    assert!(p.refused.is_none());
    assert_eq!(p.destroy.len(), 10);
}

#[test]
fn concourse_dialect_destroys_only_what_is_named() {
    let local = vec![init("a", None), init("b", Some("a")), init("old", None)];
    let p = plan(
        &local,
        &Desired::Concourse {
            destroying: vec![h("a"), h("b")],
        },
        later(86400),
        &Policy::default(),
    );
    assert_eq!(destroyed(&p), ["b", "a"]);
    assert!(p.waiting.is_empty() && p.missing.is_empty());
}

#[test]
fn concourse_dialect_blocks_listed_parent_of_unlisted_child() {
    let local = vec![init("a", None), init("b", Some("a"))];
    let p = plan(
        &local,
        &Desired::Concourse {
            destroying: vec![h("a")],
        },
        t0(),
        &Policy::default(),
    );
    assert!(p.destroy.is_empty());
    assert_eq!(p.blocked[0].by_children, [h("b")]);
}

#[test]
fn finishes_interrupted_destroy_of_a_volume_not_named() {
    let local = vec![vol("d", None, VolumeState::Destroying)];
    let p = plan(&local, &native(&["d"], &[], t0()), t0(), &Policy::default());
    assert_eq!(p.destroy[0].reason, Reason::Resume);
}

#[test]
fn survives_parent_cycle_without_destroying_it() {
    let local = vec![init("a", Some("b")), init("b", Some("a"))];
    let p = plan(
        &local,
        &native(&[], &["a", "b"], t0()),
        t0(),
        &Policy::default(),
    );
    assert!(p.destroy.is_empty());
    assert_eq!(p.blocked.len(), 2);
}

#[test]
fn keeps_desired_volume_whose_directory_is_gone_and_reports_it_missing() {
    let local = vec![gone("v", None), init("ok", None)];
    let p = plan(
        &local,
        &native(&["v", "ok", "elsewhere"], &[], later(1)),
        later(1),
        &Policy::default(),
    );
    assert!(p.destroy.is_empty() && p.blocked.is_empty() && p.waiting.is_empty());
    assert_eq!(p.missing, [h("elsewhere"), h("v")]);
}

#[test]
fn drops_missing_volume_the_central_side_names_destroying() {
    let local = vec![gone("v", None)];
    let p = plan(&local, &native(&[], &["v"], t0()), t0(), &Policy::default());
    assert_eq!(destroyed(&p), ["v"]);
    assert_eq!(p.destroy[0].reason, Reason::Named);
    // Still reported missing until the destroy has dropped the record.
    assert_eq!(p.missing, [h("v")]);
}

#[test]
fn drops_missing_volume_unknown_to_the_central_side_after_the_grace_period() {
    let local = vec![gone("v", None)];
    let young = plan(
        &local,
        &native(&[], &[], later(10)),
        later(10),
        &Policy::default(),
    );
    assert!(young.destroy.is_empty());
    assert!(matches!(young.waiting[..], [(ref w, WaitReason::Young { .. })] if *w == h("v")));
    let old = plan(
        &local,
        &native(&[], &[], later(301)),
        later(301),
        &Policy::default(),
    );
    assert_eq!(destroyed(&old), ["v"]);
    assert_eq!(old.destroy[0].reason, Reason::Unknown);
}

#[test]
fn keeps_missing_parent_while_a_live_child_stays() {
    // The parent's directory is gone; a naive child (a full copy) is still desired.
    let local = vec![gone("p", None), init("kid", Some("p"))];
    let p = plan(
        &local,
        &native(&["kid"], &["p"], later(1)),
        later(1),
        &Policy::default(),
    );
    assert!(p.destroy.is_empty());
    assert_eq!(p.blocked[0].handle, h("p"));
    assert_eq!(p.blocked[0].by_children, [h("kid")]);
    assert_eq!(p.missing, [h("p")]);
}

#[test]
fn drops_missing_overlay_stack_child_first() {
    // An overlay child stacked on a missing parent is missing too; both go, child first.
    let local = vec![gone("p", None), gone("c", Some("p")), init("keep", None)];
    let p = plan(
        &local,
        &native(&["keep"], &["p", "c"], later(1)),
        later(1),
        &Policy::default(),
    );
    assert_eq!(destroyed(&p), ["c", "p"]);
    assert_eq!(p.destroy[1].after, [h("c")]);
    assert_eq!(p.missing, [h("c"), h("p")]);
}

#[test]
fn concourse_dialect_lists_missing_records_and_destroys_only_what_is_named() {
    let local = vec![gone("a", None), gone("b", None)];
    let p = plan(
        &local,
        &Desired::Concourse {
            destroying: vec![h("a")],
        },
        later(86400),
        &Policy::default(),
    );
    assert_eq!(destroyed(&p), ["a"]);
    assert_eq!(p.missing, [h("a"), h("b")]);
}

// ---- properties over random forests and random desired sets ----

#[derive(Debug, Clone)]
struct Case {
    local: Vec<LocalVolume>,
    desired: Desired,
    now: DateTime<Utc>,
}

fn states() -> impl Strategy<Value = VolumeState> {
    prop::sample::select(VolumeState::ALL.to_vec())
}

prop_compose! {
    fn case()(n in 0usize..60)(
        parents in prop::collection::vec(any::<prop::sample::Index>(), n),
        has_parent in prop::collection::vec(any::<bool>(), n),
        states in prop::collection::vec(states(), n),
        ages in prop::collection::vec(0i64..1000, n),
        fate in prop::collection::vec(0u8..4, n),
        missing in prop::collection::vec(prop::bool::weighted(0.2), n),
        ghosts in prop::collection::vec("[g-h][0-9]{1,3}", 0..5),
        concourse in any::<bool>(),
        answer_lag in 0i64..600,
    ) -> Case {
        let now = later(1000);
        let mut local = Vec::with_capacity(parents.len());
        for i in 0..parents.len() {
            // Parents always come earlier, so the volumes form a forest.
            let parent = (i > 0 && has_parent[i]).then(|| local_handle(parents[i].index(i)));
            local.push(LocalVolume {
                handle: h(&local_handle(i)),
                parent: parent.map(|p: String| h(&p)),
                state: states[i],
                created_at: now - chrono::Duration::seconds(ages[i]),
                missing: missing[i],
            });
        }
        let mut keep = Vec::new();
        let mut destroying = Vec::new();
        for (i, f) in fate.iter().enumerate() {
            match f {
                0 => keep.push(local[i].handle.clone()),
                1 => destroying.push(local[i].handle.clone()),
                _ => {}
            }
        }
        destroying.extend(ghosts.iter().map(|g| h(g)));
        let desired = if concourse {
            Desired::Concourse { destroying }
        } else {
            Desired::Native { keep, destroying, as_of: now - chrono::Duration::seconds(answer_lag) }
        };
        Case { local, desired, now }
    }
}

fn local_handle(i: usize) -> String {
    format!("v{i}")
}

fn small_grace() -> Policy {
    Policy {
        unknown_grace: Duration::from_secs(300),
        ..Policy::default()
    }
}

proptest! {
    #[test]
    fn no_destroyed_volume_has_a_surviving_child(c in case()) {
        let p = plan(&c.local, &c.desired, c.now, &small_grace());
        let gone: HashSet<&str> = p.destroy.iter().map(|d| d.handle.as_str()).collect();
        for v in &c.local {
            if let Some(parent) = &v.parent {
                if gone.contains(parent.as_str()) {
                    prop_assert!(gone.contains(v.handle.as_str()),
                        "{} destroyed while child {} survives", parent, v.handle);
                }
            }
        }
    }

    #[test]
    fn children_come_before_parents_in_the_order(c in case()) {
        let p = plan(&c.local, &c.desired, c.now, &small_grace());
        let pos: HashMap<&str, usize> = p.destroy.iter().enumerate().map(|(i, d)| (d.handle.as_str(), i)).collect();
        for d in &p.destroy {
            for child in &d.after {
                prop_assert!(pos[child.as_str()] < pos[d.handle.as_str()]);
            }
        }
    }

    #[test]
    fn no_desired_volume_is_destroyed(c in case()) {
        let p = plan(&c.local, &c.desired, c.now, &small_grace());
        if let Desired::Native { keep, .. } = &c.desired {
            let keep: HashSet<&str> = keep.iter().map(Handle::as_str).collect();
            for d in &p.destroy {
                let local = c.local.iter().find(|v| v.handle == d.handle).expect("planned volume is local");
                // Only an interrupted local destroy may override the desired set.
                let named = matches!(&c.desired, Desired::Native { destroying, .. } if destroying.contains(&d.handle));
                let allowed = !keep.contains(d.handle.as_str()) || local.state == VolumeState::Destroying || named;
                prop_assert!(allowed, "desired volume {} destroyed", d.handle);
            }
        }
    }

    #[test]
    fn never_destroys_young_or_in_progress_volume_by_absence(c in case()) {
        let p = plan(&c.local, &c.desired, c.now, &small_grace());
        for d in p.destroy.iter().filter(|d| d.reason == Reason::Unknown) {
            let v = c.local.iter().find(|v| v.handle == d.handle).expect("local");
            prop_assert!(!matches!(v.state, VolumeState::Creating | VolumeState::Initializing));
            prop_assert!(age(c.now, v.created_at) >= small_grace().unknown_grace);
        }
    }

    #[test]
    fn every_missing_record_is_reported_missing_and_only_ghosts_besides(c in case()) {
        let p = plan(&c.local, &c.desired, c.now, &small_grace());
        let local: HashMap<&str, &LocalVolume> = c.local.iter().map(|v| (v.handle.as_str(), v)).collect();
        for v in c.local.iter().filter(|v| v.missing) {
            prop_assert!(p.missing.contains(&v.handle), "{} missing but not reported", v.handle);
        }
        for m in &p.missing {
            match local.get(m.as_str()) {
                // A local volume is reported missing only when its directory is gone.
                Some(v) => prop_assert!(v.missing, "{} reported missing but present", m),
                // Otherwise it is a desired volume this worker does not have.
                None => {
                    let desired = matches!(&c.desired, Desired::Native { keep, .. } if keep.contains(m));
                    prop_assert!(desired, "{} reported missing but not desired", m);
                }
            }
        }
        prop_assert!(p.missing.windows(2).all(|w| w[0] < w[1]), "sorted, no repeats");
    }

    #[test]
    fn missing_flag_changes_nothing_but_the_missing_list(c in case()) {
        // Whether a record's directory is gone decides how it is reported, never whether
        // or in which order it is destroyed: the same rules (children first, grace,
        // guard) hold for missing volumes.
        let p = plan(&c.local, &c.desired, c.now, &small_grace());
        let healthy: Vec<LocalVolume> = c.local.iter().cloned().map(|v| LocalVolume { missing: false, ..v }).collect();
        let q = plan(&healthy, &c.desired, c.now, &small_grace());
        prop_assert_eq!(&p.destroy, &q.destroy);
        prop_assert_eq!(&p.blocked, &q.blocked);
        prop_assert_eq!(&p.waiting, &q.waiting);
        prop_assert_eq!(&p.already_gone, &q.already_gone);
    }

    #[test]
    fn plan_is_idempotent(c in case()) {
        let p = plan(&c.local, &c.desired, c.now, &small_grace());
        // Apply: the destroyed volumes are gone; plan again with the same answer.
        let gone: HashSet<&str> = p.destroy.iter().map(|d| d.handle.as_str()).collect();
        let rest: Vec<LocalVolume> = c.local.iter().filter(|v| !gone.contains(v.handle.as_str())).cloned().collect();
        let again = plan(&rest, &c.desired, c.now, &small_grace());
        prop_assert!(again.destroy.is_empty(), "second pass destroys {:?}", again.destroy);
        // Volumes the central side asked for stay blocked by the same children. (Blocked
        // *unknown* volumes may drop out: fewer volumes can trip the guard on pass two.)
        let named = |b: &&Blocked| b.reason != Reason::Unknown;
        prop_assert_eq!(
            again.blocked.iter().filter(named).collect::<Vec<_>>(),
            p.blocked.iter().filter(named).collect::<Vec<_>>()
        );
        // And the same inputs give the same plan.
        prop_assert_eq!(plan(&c.local, &c.desired, c.now, &small_grace()), p);
    }
}
