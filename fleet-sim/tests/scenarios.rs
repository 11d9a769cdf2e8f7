//! A short version of every scenario (50 workers, seconds-long; steady with a real
//! `volume-agent` process beside them), asserting the
//! invariants: no volume still in use destroyed, never a parent before its child, every
//! released volume gone from its worker and from the database by the end. Timings are
//! printed, never asserted. The scenarios run one at a time (each starts its own
//! PostgreSQL and two volume-central replicas).

use std::sync::Mutex;
use std::time::Duration;

use fleet_sim::{Options, Outcome, Scenario};

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn short(scenario: Scenario) -> Options {
    let mut o = Options::new(scenario);
    o.workers = 50;
    o.volumes_per_worker = 10;
    o.duration = Duration::from_secs(4);
    o.poll_interval = Duration::from_secs(1);
    o.report_interval = Duration::from_secs(1);
    o.gc_interval = Duration::from_secs(1);
    o.churn = 20.0;
    o.build_lifetime = Duration::from_secs(2);
    o.down = Duration::from_secs(3);
    o.release_volumes = 1_000;
    o.pool_size = 4;
    o
}

fn run(o: Options) -> Outcome {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let out_dir = tempfile_dir();
    let mut o = o;
    o.out = Some(out_dir.clone());
    let out = fleet_sim::run(o).unwrap_or_else(|e| panic!("scenario failed to run: {e:#}"));
    assert!(
        out.violation_count == 0,
        "{} invariant violations: {:#?}",
        out.violation_count,
        out.violations
    );
    assert_eq!(
        out.released_left_on_workers, 0,
        "released volumes left on workers"
    );
    assert_eq!(
        out.released_rows_left, 0,
        "released volumes left in the database"
    );
    assert!(out.builds > 0, "the scheduler created no build");
    assert!(out.destroyed > 0, "no volume was destroyed");
    let png = out.png.clone().expect("a picture");
    let bytes = std::fs::read(&png).expect("read the PNG");
    assert!(
        bytes.starts_with(b"\x89PNG"),
        "{} is not a PNG",
        png.display()
    );
    let _ = std::fs::remove_dir_all(out_dir);
    out
}

fn tempfile_dir() -> std::path::PathBuf {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    std::env::temp_dir().join(format!(
        "fleet-sim-test-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ))
}

#[test]
fn steady_keeps_the_invariants_with_a_real_agent_beside_the_simulated_ones() {
    let mut o = short(Scenario::Steady);
    o.real_agents = 1;
    o.agent_binary = Some(env!("CARGO_BIN_EXE_fleet-sim-agent").into());
    let out = run(o);
    // Its builds' volume directories went from its disk once released (a directory gone
    // while its build held it, or a parent before its child, is a violation above).
    assert!(out.real_builds > 0, "no build was made on the real agent");
    assert!(
        out.real_gone >= 2 * out.real_builds,
        "{} of the real agent's {} builds' volumes gone from disk",
        out.real_gone,
        out.real_builds
    );
}

#[test]
fn replica_restarts_keep_the_invariants() {
    let out = run(short(Scenario::ReplicaRestart));
    assert!(out.released > 0);
}

#[test]
fn postgres_outage_answers_503_and_destroys_nothing_in_use() {
    let out = run(short(Scenario::PgOutage));
    assert!(
        !out.outage_statuses.iter().any(|(code, _)| *code == 500),
        "agents got 500 while PostgreSQL was down: {:?}",
        out.outage_statuses
    );
}

#[test]
fn mass_release_is_gone_from_workers_and_database() {
    let o = short(Scenario::MassRelease);
    let released = o.release_volumes;
    let out = run(o);
    assert!(out.released >= released, "{} released", out.released);
}

#[test]
fn million_rows_scenario_destroys_only_garbage() {
    let mut o = short(Scenario::MillionRows);
    o.volumes_per_worker = 20;
    let out = run(o);
    // A tenth of the chains (here chain 0 of 4 on each worker) is seeded garbage.
    assert!(out.destroyed >= 50 * 5, "{} destroyed", out.destroyed);
}
