//! The inventory's lifecycle rules with real sled and real files (naive driver).

#[path = "inventory_support.rs"]
mod support;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::sync::mpsc;

use support::{assert_consistent, child, config, h, initialized_root, open};
use volume_agent::inventory::{
    CreateSpec, DestroyOutcome, DriverChoice, DriverKind, Inventory, InventoryError, VolumeState,
};

fn naive() -> (tempfile::TempDir, Inventory) {
    let dir = tempfile::tempdir().expect("tempdir");
    let inv = open(&config(dir.path(), DriverChoice::Naive));
    (dir, inv)
}

#[test]
fn creates_an_empty_volume_in_created_state_with_its_data_dir() {
    let (_dir, inv) = naive();
    let rec = inv.create(CreateSpec::empty(h("a"))).expect("create");
    assert_eq!(rec.state, VolumeState::Created);
    assert_eq!(rec.driver, DriverKind::Naive);
    assert!(rec.path.is_absolute());
    assert!(rec.path.starts_with(inv.volumes_root()));
    assert!(rec.path.is_dir());
    assert_eq!(std::fs::read_dir(&rec.path).expect("read").count(), 0);
    assert_eq!(inv.get(&h("a")).expect("get"), Some(rec.clone()));
    assert_eq!(inv.list().expect("list"), vec![rec]);
    assert_consistent(&inv);
}

#[test]
fn refuses_a_duplicate_handle_and_leaves_the_first_volume_alone() {
    let (_dir, inv) = naive();
    let first = inventory_file(&inv, "a");
    let err = inv
        .create(CreateSpec::empty(h("a")))
        .expect_err("duplicate");
    assert!(
        matches!(err, InventoryError::AlreadyExists(ref x) if *x == h("a")),
        "{err}"
    );
    assert!(first.exists(), "first volume's data survived");
    assert_consistent(&inv);
}

fn inventory_file(inv: &Inventory, name: &str) -> std::path::PathBuf {
    let rec = inv.create(CreateSpec::empty(h(name))).expect("create");
    let f = rec.path.join("file");
    std::fs::write(&f, b"data").expect("write");
    f
}

#[test]
fn state_moves_forward_only_and_repeating_it_is_a_no_op() {
    let (_dir, inv) = naive();
    inv.create(CreateSpec::empty(h("a"))).expect("create");
    let r = inv
        .set_state(&h("a"), VolumeState::Initializing)
        .expect("forward");
    assert_eq!(r.state, VolumeState::Initializing);
    let again = inv
        .set_state(&h("a"), VolumeState::Initializing)
        .expect("same");
    assert_eq!(
        again.changed_at, r.changed_at,
        "no-op does not touch the record"
    );
    inv.set_state(&h("a"), VolumeState::Initialized)
        .expect("forward");
    let err = inv
        .set_state(&h("a"), VolumeState::Created)
        .expect_err("backwards");
    assert!(
        matches!(
            err,
            InventoryError::InvalidTransition {
                from: VolumeState::Initialized,
                to: VolumeState::Created,
                ..
            }
        ),
        "{err}"
    );
    let err = inv
        .set_state(&h("a"), VolumeState::Destroying)
        .expect_err("destroying is the destroy path's business");
    assert!(
        matches!(err, InventoryError::InvalidTransition { .. }),
        "{err}"
    );
    let err = inv
        .set_state(&h("nope"), VolumeState::Initialized)
        .expect_err("unknown");
    assert!(matches!(err, InventoryError::NotFound(_)), "{err}");
}

#[test]
fn properties_and_privilege_are_stored_and_survive_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = config(dir.path(), DriverChoice::Naive);
    {
        let inv = open(&cfg);
        inv.create(CreateSpec::empty(h("a"))).expect("create");
        inv.set_property(&h("a"), "cache", "yes").expect("prop");
        // Root as an unprivileged volume stores it (the highest id), and a set-uid file.
        let data = inv.get(&h("a")).expect("get").expect("exists").path;
        let stored_root = volume_agent::contents::IdMap::for_volume(false)
            .mapped_root()
            .expect("an unprivileged volume maps root");
        let f = data.join("tool");
        std::fs::write(&f, b"x").expect("write");
        std::os::unix::fs::chown(&f, Some(stored_root.0), Some(stored_root.1)).expect("chown");
        std::fs::set_permissions(&f, std::os::unix::fs::PermissionsExt::from_mode(0o4755))
            .expect("chmod");
        inv.set_privileged(&h("a"), true).expect("priv");
        let meta = std::fs::metadata(&f).expect("stat");
        use std::os::unix::fs::MetadataExt;
        assert_eq!((meta.uid(), meta.gid()), (0, 0), "the data is re-owned");
        assert_eq!(meta.mode() & 0o7777, 0o4755, "set-uid kept after the chown");
        inv.set_privileged(&h("a"), true).expect("same again");
        let err = inv.set_property(&h("zz"), "k", "v").expect_err("unknown");
        assert!(matches!(err, InventoryError::NotFound(_)));
    }
    let inv = open(&cfg);
    let rec = inv.get(&h("a")).expect("get").expect("exists");
    assert_eq!(rec.properties.get("cache").map(String::as_str), Some("yes"));
    assert!(rec.privileged);
}

#[test]
fn child_requires_an_initialized_parent() {
    let (_dir, inv) = naive();
    let err = inv
        .create(CreateSpec::child(h("c"), h("missing")))
        .expect_err("no parent");
    assert!(
        matches!(err, InventoryError::ParentNotFound(ref p) if *p == h("missing")),
        "{err}"
    );
    inv.create(CreateSpec::empty(h("p"))).expect("parent");
    let err = inv
        .create(CreateSpec::child(h("c"), h("p")))
        .expect_err("parent only created");
    assert!(
        matches!(
            err,
            InventoryError::ParentNotInitialized { ref parent, state: VolumeState::Created } if *parent == h("p")
        ),
        "{err}"
    );
    assert!(
        err.to_string().contains("initialized"),
        "message names the fix: {err}"
    );
    assert!(
        inv.get(&h("c")).expect("get").is_none(),
        "failed child left no record"
    );
    inv.set_state(&h("p"), VolumeState::Initialized)
        .expect("init");
    let c = child(&inv, "c", "p");
    assert_eq!(c.parent, Some(h("p")));
    assert_eq!(inv.children(&h("p")).expect("children"), vec![h("c")]);
    assert_consistent(&inv);
}

#[test]
fn naive_child_is_a_full_copy_preserving_symlinks_permissions_and_owners() {
    let (_dir, inv) = naive();
    let p = inv
        .create(CreateSpec {
            open_to_peers: false,
            initial_state: VolumeState::Initialized,
            populate: Some(Box::new(|d: &Path| {
                std::fs::create_dir(d.join("sub"))?;
                std::fs::write(d.join("sub/f"), b"hello")?;
                std::fs::set_permissions(d.join("sub/f"), std::fs::Permissions::from_mode(0o640))?;
                std::fs::set_permissions(d.join("sub"), std::fs::Permissions::from_mode(0o750))?;
                std::os::unix::fs::symlink("sub/f", d.join("link"))?;
                std::os::unix::fs::symlink("/nonexistent/target", d.join("dangling"))?;
                std::fs::hard_link(d.join("sub/f"), d.join("hard"))?;
                std::os::unix::fs::lchown(d.join("sub/f"), Some(1234), Some(4321))?;
                Ok(())
            })),
            ..CreateSpec::empty(h("p"))
        })
        .expect("parent");
    let c = child(&inv, "c", "p");
    assert_ne!(c.path, p.path);
    assert_eq!(std::fs::read(c.path.join("sub/f")).expect("read"), b"hello");
    let m = std::fs::metadata(c.path.join("sub/f")).expect("meta");
    assert_eq!(m.mode() & 0o7777, 0o640);
    assert_eq!((m.uid(), m.gid()), (1234, 4321));
    assert_eq!(
        std::fs::metadata(c.path.join("sub")).expect("meta").mode() & 0o7777,
        0o750
    );
    assert_eq!(
        std::fs::read_link(c.path.join("link")).expect("link"),
        Path::new("sub/f")
    );
    assert_eq!(
        std::fs::read_link(c.path.join("dangling")).expect("link"),
        Path::new("/nonexistent/target")
    );
    assert_eq!(
        std::fs::metadata(c.path.join("hard")).expect("meta").ino(),
        m.ino(),
        "hard links stay linked"
    );
    std::fs::write(c.path.join("sub/f"), b"changed").expect("write child");
    assert_eq!(
        std::fs::read(p.path.join("sub/f")).expect("read"),
        b"hello",
        "parent untouched"
    );
}

#[test]
fn marking_destroying_fails_naming_children_in_any_state() {
    let (_dir, inv) = naive();
    initialized_root(&inv, "p", &[]);
    child(&inv, "c1", "p");
    child(&inv, "c2", "p");
    inv.set_state(&h("c2"), VolumeState::Initialized)
        .expect("init");
    let err = inv.mark_destroying(&h("p")).expect_err("has children");
    match &err {
        InventoryError::HasChildren { handle, children } => {
            assert_eq!(*handle, h("p"));
            assert_eq!(children, &vec![h("c1"), h("c2")]);
        }
        other => panic!("expected HasChildren, got {other}"),
    }
    assert!(err.to_string().contains("c1"), "{err}");
    let err = inv.destroy(&h("p")).expect_err("destroy refuses too");
    assert!(matches!(err, InventoryError::HasChildren { .. }));
    assert_eq!(
        inv.get(&h("p")).expect("get").expect("kept").state,
        VolumeState::Initialized
    );
    // A child marked destroying still pins its parent.
    inv.mark_destroying(&h("c1")).expect("mark child");
    assert!(matches!(
        inv.mark_destroying(&h("p")),
        Err(InventoryError::HasChildren { .. })
    ));
    inv.destroy(&h("c1")).expect("destroy child");
    inv.destroy(&h("c2")).expect("destroy child");
    assert_eq!(
        inv.destroy(&h("p")).expect("parent now"),
        DestroyOutcome::Destroyed
    );
    assert_consistent(&inv);
}

/// Starts `spec`'s create on a thread and returns once it is inside populate (still
/// `creating`); sending on the returned channel lets it finish.
fn create_paused(
    inv: &Inventory,
    spec: CreateSpec,
) -> (
    std::thread::JoinHandle<Result<volume_agent::inventory::VolumeRecord, InventoryError>>,
    mpsc::Sender<()>,
) {
    let (entered_tx, entered_rx) = mpsc::channel::<()>();
    let (release_tx, release_rx) = mpsc::channel::<()>();
    let inv2 = inv.clone();
    let creator = std::thread::spawn(move || {
        inv2.create(CreateSpec {
            open_to_peers: false,
            populate: Some(Box::new(move |_d: &Path| {
                entered_tx.send(()).expect("signal");
                release_rx.recv().expect("wait");
                Ok(())
            })),
            ..spec
        })
    });
    entered_rx.recv().expect("create is in populate");
    (creator, release_tx)
}

#[test]
fn child_pins_its_parent_while_still_creating() {
    let (_dir, inv) = naive();
    initialized_root(&inv, "p", &[("f", "x")]);
    let (creator, release_tx) = create_paused(&inv, CreateSpec::child(h("c"), h("p")));
    assert_eq!(
        inv.get(&h("c")).expect("get").expect("record").state,
        VolumeState::Creating
    );
    let err = inv
        .destroy(&h("p"))
        .expect_err("creating child pins parent");
    assert!(
        matches!(err, InventoryError::HasChildren { ref children, .. } if children == &vec![h("c")]),
        "{err}"
    );
    release_tx.send(()).expect("release");
    creator.join().expect("thread").expect("child created");
    assert_consistent(&inv);
}

#[test]
fn destroy_removes_dir_and_record_and_unknown_handle_is_already_gone() {
    let (_dir, inv) = naive();
    let f = inventory_file(&inv, "a");
    assert_eq!(
        inv.destroy(&h("a")).expect("destroy"),
        DestroyOutcome::Destroyed
    );
    assert!(!f.exists());
    assert!(inv.get(&h("a")).expect("get").is_none());
    assert_eq!(
        inv.destroy(&h("a")).expect("again"),
        DestroyOutcome::AlreadyGone
    );
    assert_eq!(
        inv.mark_destroying(&h("zz")).expect("unknown"),
        DestroyOutcome::AlreadyGone
    );
    assert_consistent(&inv);
}

#[test]
fn a_failed_populate_leaves_nothing_behind() {
    let (_dir, inv) = naive();
    let err = inv
        .create(CreateSpec {
            open_to_peers: false,
            populate: Some(Box::new(|d: &Path| {
                std::fs::write(d.join("partial"), b"x")?;
                Err(std::io::Error::other("import failed"))
            })),
            ..CreateSpec::empty(h("a"))
        })
        .expect_err("populate fails");
    assert!(matches!(err, InventoryError::Populate { .. }), "{err}");
    assert!(inv.get(&h("a")).expect("get").is_none());
    assert_consistent(&inv);
    inv.create(CreateSpec::empty(h("a")))
        .expect("handle usable again");
}

#[test]
fn destroy_of_a_volume_being_created_waits_for_the_create_then_destroys_it() {
    let (_dir, inv) = naive();
    let (creator, release_tx) = create_paused(&inv, CreateSpec::empty(h("a")));
    // destroy waits for the in-flight create of the same handle, then destroys it.
    let inv3 = inv.clone();
    let destroyer = std::thread::spawn(move || inv3.destroy(&h("a")));
    release_tx.send(()).expect("release");
    creator.join().expect("thread").expect("created");
    assert_eq!(
        destroyer.join().expect("thread").expect("destroyed"),
        DestroyOutcome::Destroyed
    );
    assert_consistent(&inv);
}

/// The seed race: a child create and its parent's destroy, run concurrently many times.
/// Exactly one wins each round and nothing is left half made.
#[test]
fn seed_race_child_create_against_parent_destroy_has_exactly_one_winner() {
    let (_dir, inv) = naive();
    let rounds = 200;
    let (mut child_won, mut destroy_won) = (0, 0);
    for round in 0..rounds {
        let p = format!("p{round}");
        let c = format!("c{round}");
        initialized_root(&inv, &p, &[("f", "seed")]);
        let barrier = std::sync::Arc::new(std::sync::Barrier::new(2));
        let (inv_a, inv_b) = (inv.clone(), inv.clone());
        let (b_a, b_b) = (barrier.clone(), barrier.clone());
        let (pa, ca, pb) = (h(&p), h(&c), h(&p));
        let creator = std::thread::spawn(move || {
            b_a.wait();
            inv_a.create(CreateSpec::child(ca, pa))
        });
        let destroyer = std::thread::spawn(move || {
            b_b.wait();
            inv_b.destroy(&pb)
        });
        let created = creator.join().expect("thread");
        let destroyed = destroyer.join().expect("thread");
        match (&created, &destroyed) {
            (Ok(rec), Err(InventoryError::HasChildren { children, .. })) => {
                assert_eq!(children, &vec![h(&c)]);
                assert_eq!(std::fs::read(rec.path.join("f")).expect("copied"), b"seed");
                child_won += 1;
            }
            (
                Err(InventoryError::ParentDestroying(_)) | Err(InventoryError::ParentNotFound(_)),
                Ok(DestroyOutcome::Destroyed),
            ) => {
                assert!(inv.get(&h(&c)).expect("get").is_none());
                destroy_won += 1;
            }
            other => panic!("round {round}: not exactly one winner: {other:?}"),
        }
        assert_consistent(&inv);
    }
    println!("seed race: child won {child_won}, destroy won {destroy_won} of {rounds}");
    assert_eq!(child_won + destroy_won, rounds);
}

#[test]
fn concurrent_operations_from_many_threads_keep_disk_and_store_in_step() {
    let (_dir, inv) = naive();
    initialized_root(&inv, "base", &[("f", "x")]);
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let inv = inv.clone();
            std::thread::spawn(move || {
                for i in 0..25 {
                    let name = format!("t{t}-{i}");
                    inv.create(CreateSpec::child(h(&name), h("base")))
                        .expect("create");
                    if i % 2 == 0 {
                        inv.destroy(&h(&name)).expect("destroy");
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("thread");
    }
    assert_eq!(inv.children(&h("base")).expect("children").len(), 4 * 12);
    assert_consistent(&inv);
}

#[test]
fn inventory_is_clone_send_sync() {
    fn is<T: Clone + Send + Sync + 'static>() {}
    is::<Inventory>();
    let (_dir, inv) = naive();
    let other = inv.clone();
    inv.create(CreateSpec::empty(h("a"))).expect("create");
    assert!(
        other.get(&h("a")).expect("get").is_some(),
        "clones share one store"
    );
}

#[test]
fn a_second_process_on_the_same_state_dir_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = config(dir.path(), DriverChoice::Naive);
    let _inv = open(&cfg);
    let err = Inventory::open(&cfg).expect_err("locked");
    assert!(matches!(err, InventoryError::Locked(_)), "{err}");
}
