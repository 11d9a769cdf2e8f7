//! Inventory benchmark (`cargo bench -p volume-agent --bench inventory`), printing:
//! * open + recover with 100,000 volumes in the store (target ≤ 1 s), measured in a fresh
//!   process, and that process's resident memory (target ≤ 64 MiB);
//! * destroy throughput of the naive driver against `rm -rf` of identical trees, in
//!   entries per second and as a ratio (target ≥ 0.9×).
//!
//! Sizes: `INVENTORY_BENCH_VOLUMES` (default 100000), `INVENTORY_BENCH_TREES` (default 4
//! trees of 5,051 entries). `INVENTORY_BENCH_DIR` puts the work under another directory
//! (default: the system temp dir), e.g. a tmpfs to take a contended disk out of the figures.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use volume_agent::inventory::{
    CreateSpec, DriverChoice, Handle, Inventory, InventoryConfig, VolumeState,
};

const ROLE: &str = "INVENTORY_BENCH_ROLE";
const CACHE_BYTES: u64 = 32 << 20;
const FILES_PER_DIR: usize = 100;
const DIRS_PER_TREE: usize = 50;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn handle(s: String) -> Handle {
    Handle::new(s).expect("bench handles are valid")
}

fn config(dir: &Path) -> InventoryConfig {
    InventoryConfig {
        state_dir: dir.join("state"),
        volumes_root: dir.join("volumes"),
        driver: DriverChoice::Naive,
        cache_bytes: CACHE_BYTES,
    }
}

fn vm_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .expect("status")
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

/// CPU time (user + system) this process used so far, in ms: on a shared, loaded machine
/// wall time mostly measures waiting for a core.
fn cpu_ms() -> f64 {
    // SAFETY: rusage is plain old data, zeroed is valid; getrusage writes into it.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: a valid out-pointer.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let ms = |t: libc::timeval| t.tv_sec as f64 * 1000.0 + t.tv_usec as f64 / 1000.0;
    ms(ru.ru_utime) + ms(ru.ru_stime)
}

/// Child role: open the inventory once (which includes the first drift scan), then run
/// one more drift scan, and print `open_ms rss_kib volumes cpu_ms scan_ms`.
fn open_role(dir: &Path) {
    if std::env::var_os("INVENTORY_BENCH_TRACE").is_some() {
        tracing_subscriber::fmt()
            .with_writer(std::io::stderr)
            .with_env_filter("volume_agent=debug")
            .init();
    }
    let t = Instant::now();
    let (inv, report) = Inventory::open(&config(dir)).expect("open");
    let took = t.elapsed();
    let rss = vm_rss_kib();
    let cpu = cpu_ms();
    let n = inv.list().expect("list").len();
    assert!(!report.rebuilt_from_disk);
    let t = Instant::now();
    let scan = inv.scan_drift().expect("drift scan");
    let scan_ms = t.elapsed().as_secs_f64() * 1000.0;
    assert_eq!(scan.checked, n);
    println!(
        "{} {} {} {} {}",
        took.as_secs_f64() * 1000.0,
        rss,
        n,
        cpu,
        scan_ms
    );
}

/// Writes `n` volumes' directories straight onto disk (a tenth of them children), using
/// metadata files the inventory itself wrote as templates, then lets `open` rebuild the
/// store from them: the fastest honest way to get 100,000 volumes into a store.
fn make_store(dir: &Path, n: usize) -> Duration {
    let cfg = config(dir);
    let root = cfg.volumes_root.clone();
    let (root_meta, child_meta) = {
        let inv = Inventory::open(&cfg).expect("open").0;
        inv.create(CreateSpec {
            open_to_peers: false,
            initial_state: VolumeState::Initialized,
            ..CreateSpec::empty(handle("tmpl-root".into()))
        })
        .expect("create");
        inv.create(CreateSpec::child(
            handle("tmpl-child".into()),
            handle("tmpl-root".into()),
        ))
        .expect("create");
        let read = |h: &str| {
            std::fs::read_to_string(root.join("live").join(h).join("meta.json")).expect("meta")
        };
        (read("tmpl-root"), read("tmpl-child"))
    };
    std::fs::remove_dir_all(&cfg.state_dir).expect("drop the template store");
    for h in ["tmpl-root", "tmpl-child"] {
        std::fs::remove_dir_all(root.join("live").join(h)).expect("rm template");
    }
    let roots = n - n / 10;
    for i in 0..n {
        let (name, meta) = if i < roots {
            let name = format!("root-{i:06}");
            (name.clone(), root_meta.replace("tmpl-root", &name))
        } else {
            let name = format!("child-{i:06}");
            let parent = format!("root-{:06}", i % roots);
            (
                name.clone(),
                child_meta
                    .replace("tmpl-child", &name)
                    .replace("tmpl-root", &parent),
            )
        };
        let vdir = root.join("live").join(&name);
        std::fs::create_dir_all(vdir.join("volume")).expect("mkdir");
        std::fs::write(vdir.join("meta.json"), meta).expect("meta");
    }
    let t = Instant::now();
    let (inv, report) = Inventory::open(&cfg).expect("rebuild");
    let took = t.elapsed();
    assert!(report.rebuilt_from_disk);
    assert_eq!(inv.list().expect("list").len(), n);
    took
}

fn write_tree(dir: &Path) -> u64 {
    let mut entries = 0;
    for d in 0..DIRS_PER_TREE {
        let sub = dir.join(format!("d{d:03}"));
        std::fs::create_dir(&sub).expect("mkdir");
        entries += 1;
        for f in 0..FILES_PER_DIR {
            std::fs::write(sub.join(format!("f{f:03}")), b"sixteen bytes!!\n").expect("write");
            entries += 1;
        }
    }
    entries + 1
}

fn sync() {
    let _ = Command::new("sync").status();
}

fn destroy_throughput(dir: &Path, trees: usize) {
    let cfg = config(dir);
    let inv = Inventory::open(&cfg).expect("open").0;
    let mut entries = 0;
    let handles: Vec<Handle> = (0..trees).map(|i| handle(format!("tree-{i}"))).collect();
    for h in &handles {
        inv.create(CreateSpec {
            open_to_peers: false,
            populate: Some(Box::new(|d: &Path| {
                write_tree(d);
                Ok(())
            })),
            ..CreateSpec::empty(h.clone())
        })
        .expect("create");
        entries += 1 + DIRS_PER_TREE as u64 * (FILES_PER_DIR as u64 + 1);
    }
    let plain = dir.join("plain");
    std::fs::create_dir(&plain).expect("mkdir");
    let mut plain_entries = 0;
    let plain_trees: Vec<_> = (0..trees)
        .map(|i| {
            let p = plain.join(format!("tree-{i}"));
            std::fs::create_dir(&p).expect("mkdir");
            plain_entries += write_tree(&p);
            p
        })
        .collect();
    assert_eq!(entries, plain_entries, "identical trees");

    sync();
    let t = Instant::now();
    for h in &handles {
        inv.destroy(h).expect("destroy");
    }
    let inv_secs = t.elapsed().as_secs_f64();

    sync();
    let t = Instant::now();
    let status = Command::new("rm")
        .arg("-rf")
        .args(&plain_trees)
        .status()
        .expect("rm");
    let rm_secs = t.elapsed().as_secs_f64();
    assert!(status.success());

    let inv_rate = entries as f64 / inv_secs;
    let rm_rate = entries as f64 / rm_secs;
    println!(
        "destroy, naive driver: {trees} volumes, {entries} entries in {:.3} s = {:.0} entries/s",
        inv_secs, inv_rate
    );
    println!(
        "rm -rf, same trees:    {trees} trees,   {entries} entries in {:.3} s = {:.0} entries/s",
        rm_secs, rm_rate
    );
    println!(
        "destroy / rm -rf: {:.2}x (target >= 0.9x; includes per-volume intent + fsync + record delete)",
        inv_rate / rm_rate
    );
}

fn main() {
    // `cargo bench` passes `--bench`; a filter argument other than ours skips the run.
    if let Ok(role) = std::env::var(ROLE) {
        let dir = std::env::args().nth(1).expect("dir argument");
        match role.as_str() {
            "open" => open_role(Path::new(&dir)),
            other => panic!("unknown role {other}"),
        }
        return;
    }
    let volumes = env_usize("INVENTORY_BENCH_VOLUMES", 100_000);
    let trees = env_usize("INVENTORY_BENCH_TREES", 4);
    let base = std::env::var_os("INVENTORY_BENCH_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let tmp = tempfile::tempdir_in(&base).expect("tempdir");
    println!("working under {}", base.display());
    // INVENTORY_BENCH_STORE=DIR keeps (and reuses) the 100,000-volume store in DIR.
    let kept = std::env::var_os("INVENTORY_BENCH_STORE").map(std::path::PathBuf::from);
    let store_dir = kept.clone().unwrap_or_else(|| tmp.path().to_owned());

    println!(
        "inventory bench: {volumes} volumes, sled cache {} MiB",
        CACHE_BYTES >> 20
    );
    if kept.is_none() || !store_dir.join("state").exists() {
        let t = Instant::now();
        let rebuild = make_store(&store_dir, volumes);
        println!(
            "store made in {:.1} s; rebuilding it from {volumes} metadata files took {:.3} s",
            t.elapsed().as_secs_f64(),
            rebuild.as_secs_f64()
        );
    }
    let exe = std::env::current_exe().expect("bench binary");
    let mut best = f64::MAX;
    for run in 0..3 {
        let out = Command::new(&exe)
            .arg(&store_dir)
            .env(ROLE, "open")
            .output()
            .expect("open run");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let line = String::from_utf8_lossy(&out.stdout);
        let f: Vec<f64> = line
            .split_whitespace()
            .map(|x| x.parse().expect("number"))
            .collect();
        assert_eq!(f[2] as usize, volumes);
        best = best.min(f[0]);
        println!(
            "open + recover, {volumes} volumes, fresh process, run {run}: {:.0} ms wall, {:.0} ms CPU for the whole process (target <= 1000 ms); VmRSS after open {:.1} MiB (target <= 64 MiB); a drift scan after it {:.0} ms",
            f[0],
            f[3],
            f[1] / 1024.0,
            f[4]
        );
    }
    println!("open + recover best: {best:.0} ms");

    drop(tmp);
    if trees == 0 {
        return;
    }
    let dtmp = tempfile::tempdir_in(&base).expect("tempdir");
    destroy_throughput(dtmp.path(), trees);
}
