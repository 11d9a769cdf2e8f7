//! Crash tests: a child process (this test binary, re-executed) is killed with SIGKILL at
//! every step of create and destroy, and at random moments of a busy loop; the next open
//! must leave disk and store in agreement, with no parent gone before its child.

#[path = "inventory_support.rs"]
mod support;

use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use support::{
    assert_consistent, child, config, h, initialized_root, open, overlay_works_in, unmount_all,
};
use volume_agent::inventory::{
    CreateSpec, DriverChoice, Inventory, RecoveryReport, Step, VolumeState,
};

const ROLE: &str = "INVENTORY_CRASH_ROLE";
const DIR: &str = "INVENTORY_CRASH_DIR";
const STEP: &str = "INVENTORY_CRASH_STEP";
const DRIVER: &str = "INVENTORY_CRASH_DRIVER";
/// Printed by the busy child once it is open and has made its first volumes.
const READY: &str = "inventory-crash-child-ready";

fn driver_from(s: &str) -> DriverChoice {
    if s == "overlay" {
        DriverChoice::Overlay
    } else {
        DriverChoice::Naive
    }
}

fn kill_self() -> ! {
    // SAFETY: sending a signal to ourselves has no memory-safety preconditions.
    unsafe {
        libc::kill(libc::getpid(), libc::SIGKILL);
    }
    unreachable!("SIGKILL delivered")
}

/// The child role: open, arm the hook, run the operation. Never returns normally when the
/// step is reached.
fn child_role(role: &str) {
    let dir = std::env::var(DIR).expect("dir");
    let cfg = config(
        Path::new(&dir),
        driver_from(&std::env::var(DRIVER).expect("driver")),
    );
    let inv = open(&cfg);
    match role {
        "step" => {
            let step_name = std::env::var(STEP).expect("step");
            let at = Step::ALL
                .into_iter()
                .find(|s| format!("{s:?}") == step_name)
                .expect("known step");
            inv.set_step_hook(Some(Arc::new(move |step, _h| {
                if step == at {
                    kill_self();
                }
                Ok(())
            })));
            if step_name.starts_with("Create") {
                let _ = inv.create(CreateSpec {
                    open_to_peers: false,
                    populate: Some(Box::new(|d: &Path| std::fs::write(d.join("own"), b"c"))),
                    ..CreateSpec::child(h("c"), h("p"))
                });
            } else {
                let _ = inv.destroy(&h("c"));
            }
            // The step was never reached: a test bug.
            std::process::exit(3);
        }
        "busy" => {
            let mut i = 0u64;
            loop {
                if i == 1 {
                    println!("{READY}");
                }
                let name = format!("b{}", i % 8);
                match inv.get(&h(&name)).expect("get") {
                    Some(_) => {
                        let _ = inv.destroy(&h(&name));
                    }
                    None => {
                        let _ = inv.create(CreateSpec::child(h(&name), h("p")));
                    }
                }
                if i % 5 == 0 {
                    let _ = inv.create(CreateSpec::empty(h(&format!("r{i}"))));
                }
                if i % 7 == 0 {
                    let _ = inv.destroy(&h(&format!("r{}", i.saturating_sub(5))));
                }
                i += 1;
            }
        }
        other => panic!("unknown role {other}"),
    }
}

fn run_child(
    test: &str,
    dir: &Path,
    driver: &str,
    role: &str,
    step: Option<Step>,
) -> std::process::Child {
    let mut cmd = Command::new(std::env::current_exe().expect("test binary"));
    cmd.args(["--exact", test, "--nocapture", "--test-threads=1"])
        .env(ROLE, role)
        .env(DIR, dir)
        .env(DRIVER, driver)
        .stdout(std::process::Stdio::piped());
    if let Some(s) = step {
        cmd.env(STEP, format!("{s:?}"));
    }
    cmd.spawn().expect("spawn child")
}

/// After a crash: recovery agrees with disk, the parent and its data are intact.
fn check_after_crash(
    cfg: &volume_agent::inventory::InventoryConfig,
    what: &str,
) -> (Inventory, RecoveryReport) {
    let (inv, report) = Inventory::open(cfg).unwrap_or_else(|e| panic!("{what}: reopen: {e}"));
    assert!(!report.rebuilt_from_disk, "{what}");
    assert!(
        report.quarantined.is_empty(),
        "{what}: {:?}",
        report.quarantined
    );
    assert_consistent(&inv);
    let p = inv
        .get(&h("p"))
        .expect("get")
        .unwrap_or_else(|| panic!("{what}: parent gone"));
    assert_eq!(p.state, VolumeState::Initialized, "{what}");
    assert_eq!(
        std::fs::read(p.path.join("f")).expect("parent data"),
        b"parent",
        "{what}"
    );
    (inv, report)
}

fn crash_at_every_step(test: &str, driver: &str) {
    for step in Step::ALL {
        let tmp = tempfile::tempdir().expect("tempdir");
        let cfg = config(tmp.path(), driver_from(driver));
        {
            let inv = open(&cfg);
            initialized_root(&inv, "p", &[("f", "parent")]);
            if format!("{step:?}").starts_with("Destroy") {
                let c = child(&inv, "c", "p");
                std::fs::write(c.path.join("own"), b"c").expect("write");
            }
        }
        let status = run_child(test, tmp.path(), driver, "step", Some(step))
            .wait()
            .expect("wait");
        assert_eq!(
            status.signal(),
            Some(libc::SIGKILL),
            "{driver} {step:?}: child {status:?}"
        );
        let what = format!("{driver} crash at {step:?}");
        let (inv, report) = check_after_crash(&cfg, &what);
        if format!("{step:?}").starts_with("Create") {
            assert_eq!(report.creates_removed, vec![h("c")], "{what}");
        } else {
            assert_eq!(report.destroys_finished, vec![h("c")], "{what}");
        }
        drop(inv);
        // Recovery is repeatable: a second open finds nothing more to do.
        let (inv, again) = Inventory::open(&cfg).expect("reopen twice");
        assert_eq!(again, RecoveryReport::default(), "{what}");
        assert!(
            inv.get(&h("c")).expect("get").is_none(),
            "{what}: the interrupted volume is gone"
        );
        assert!(
            inv.children(&h("p")).expect("children").is_empty(),
            "{what}"
        );
        // The parent is usable again: a child can be made and destroyed.
        let c = child(&inv, "c", "p");
        assert_eq!(
            std::fs::read(c.path.join("f")).expect("read"),
            b"parent",
            "{what}"
        );
        inv.destroy(&h("c")).expect("destroy");
        inv.destroy(&h("p")).expect("parent destroyable");
        drop(inv);
        unmount_all(tmp.path());
    }
}

#[test]
fn sigkill_at_every_step_of_create_and_destroy_is_recovered_naive() {
    if let Ok(role) = std::env::var(ROLE) {
        return child_role(&role);
    }
    crash_at_every_step(
        "sigkill_at_every_step_of_create_and_destroy_is_recovered_naive",
        "naive",
    );
}

#[test]
fn sigkill_at_every_step_of_create_and_destroy_is_recovered_overlay() {
    if let Ok(role) = std::env::var(ROLE) {
        return child_role(&role);
    }
    let probe = tempfile::tempdir().expect("tempdir");
    if !overlay_works_in(probe.path()) {
        return;
    }
    crash_at_every_step(
        "sigkill_at_every_step_of_create_and_destroy_is_recovered_overlay",
        "overlay",
    );
}

fn wait_ready(proc: &mut std::process::Child) {
    use std::io::BufRead;
    let out = proc.stdout.take().expect("piped stdout");
    for line in std::io::BufReader::new(out).lines() {
        if line.expect("child stdout").contains(READY) {
            return;
        }
    }
    panic!("busy child exited before it was ready");
}

#[test]
fn sigkill_at_random_moments_of_a_busy_process_is_recovered() {
    if let Ok(role) = std::env::var(ROLE) {
        return child_role(&role);
    }
    use rand::Rng;
    let tmp = tempfile::tempdir().expect("tempdir");
    let cfg = config(tmp.path(), DriverChoice::Naive);
    {
        let inv = open(&cfg);
        initialized_root(&inv, "p", &[("f", "parent")]);
    }
    let mut rng = rand::thread_rng();
    let rounds = 30;
    let mut seen_volumes = 0;
    for round in 0..rounds {
        let mut proc = run_child(
            "sigkill_at_random_moments_of_a_busy_process_is_recovered",
            tmp.path(),
            "naive",
            "busy",
            None,
        );
        wait_ready(&mut proc);
        std::thread::sleep(std::time::Duration::from_millis(rng.gen_range(5..200)));
        proc.kill().expect("SIGKILL");
        let status = proc.wait().expect("wait");
        assert_eq!(status.signal(), Some(libc::SIGKILL), "round {round}");
        let (inv, _) = check_after_crash(&cfg, &format!("random kill round {round}"));
        for c in inv.children(&h("p")).expect("children") {
            let rec = inv.get(&c).expect("get").expect("child record");
            assert_eq!(
                std::fs::read(rec.path.join("f")).expect("copy"),
                b"parent",
                "round {round}: {c} complete"
            );
        }
        seen_volumes += inv.list().expect("list").len() - 1;
    }
    println!("random kills: {rounds} rounds, {seen_volumes} volumes seen after recovery in total");
    assert!(
        seen_volumes > 0,
        "the busy child made volumes before it was killed"
    );
}
