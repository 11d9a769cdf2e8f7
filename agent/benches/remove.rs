//! Removal speed: this engine against `rm -rf` and `rmz` (the fuc project's parallel remover)
//! on identical, freshly made trees shaped like a root filesystem, in the same run; and the
//! agent's whole destroy of a volume holding such a tree (`Inventory::destroy`: intent, fsync,
//! rename, removal, record deleted), from request to inodes freed.
//!
//! Run with `cargo bench -p volume-agent --bench remove`. Environment:
//! `REMOVE_BENCH_SMALL` / `REMOVE_BENCH_BIG` (entries, default 20000 / 1000000),
//! `REMOVE_BENCH_ROUNDS` (runs on the small tree, default 3; the big tree runs once),
//! `REMOVE_BENCH_THREADS` (threads for this engine, default 0 = one per core),
//! `REMOVE_BENCH_DIR` (where to build trees, default a directory under the target dir).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use volume_agent::inventory::{CreateSpec, DriverChoice, Handle, Inventory, InventoryConfig};
use volume_agent::remove::{remove_tree_with, RemoveOptions};

/// A small deterministic random generator, so every remover gets the same tree.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn between(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo + 1)
    }
}

const MAX_DEPTH: u32 = 7;

/// Makes a tree of exactly `entries` entries (counting `root`) under `root`: nested
/// directories up to several levels deep, most holding a few files, some dozens, a few
/// hundreds; one file in 40 holds 1 KiB, one in 20 is a symlink.
fn build_tree(root: &Path, entries: u64) {
    std::fs::create_dir(root).expect("mkdir root");
    fill_tree(root, entries);
}

/// Fills the existing directory `root` so that it and everything below are `entries` entries.
fn fill_tree(root: &Path, entries: u64) {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let mut budget = entries - 1;
    let mut top = 0;
    while budget > 0 {
        let d = root.join(format!("top{top}"));
        top += 1;
        std::fs::create_dir(&d).expect("mkdir");
        budget -= 1;
        fill(&d, 1, &mut rng, &mut budget);
    }
}

fn fill(dir: &Path, depth: u32, rng: &mut Rng, budget: &mut u64) {
    let files = match rng.below(100) {
        0..=49 => rng.between(0, 5),
        50..=84 => rng.between(5, 30),
        85..=97 => rng.between(30, 200),
        _ => rng.between(200, 1500),
    };
    let data = [b'x'; 1024];
    for f in 0..files {
        if *budget == 0 {
            return;
        }
        let path = dir.join(format!("file-{f}.so"));
        match rng.below(40) {
            0 | 1 => std::os::unix::fs::symlink("../lib/target", &path).expect("symlink"),
            2 => std::fs::write(&path, data).expect("write"),
            _ => drop(std::fs::File::create(&path).expect("create")),
        }
        *budget -= 1;
    }
    let subdirs = if depth < MAX_DEPTH {
        rng.between(0, 6)
    } else {
        0
    };
    for s in 0..subdirs {
        if *budget == 0 {
            return;
        }
        let d = dir.join(format!("dir-{s}"));
        std::fs::create_dir(&d).expect("mkdir");
        *budget -= 1;
        fill(&d, depth + 1, rng, budget);
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Remover {
    /// The removal engine alone.
    Ours,
    /// `Inventory::destroy` of a naive volume holding the tree: the agent's whole destroy
    /// (intent written and fsynced, rename to `dead/`, removal, record deleted), from the
    /// request to the inodes freed, without the HTTP hop.
    Agent,
    Rm,
    Rmz,
    /// A bare parallel `unlinkat` loop written for this bench: no symlink, mount or
    /// rescan checks, no error handling worth the name: the limit of this machine.
    Bare,
}

impl Remover {
    fn name(self) -> &'static str {
        match self {
            Remover::Ours => "engine",
            Remover::Agent => "agent destroy",
            Remover::Rm => "rm -rf",
            Remover::Rmz => "rmz",
            Remover::Bare => "bare unlinkat",
        }
    }
}

/// CPU time (user + system) of this process, or of its waited-for children.
fn cpu_time(who: libc::c_int) -> Duration {
    // SAFETY: all-zero is a valid rusage, which getrusage fills.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    unsafe { libc::getrusage(who, &mut ru) };
    let tv = |t: libc::timeval| {
        Duration::from_secs(t.tv_sec.unsigned_abs())
            + Duration::from_micros(t.tv_usec.unsigned_abs())
    };
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// What a remover removes: a plain tree, or a volume of the agent's inventory.
enum Target {
    Tree(PathBuf),
    Volume(Inventory, Handle, PathBuf),
}

impl Target {
    fn path(&self) -> &Path {
        match self {
            Target::Tree(p) | Target::Volume(_, _, p) => p,
        }
    }
}

/// Builds the tree `name` of `entries` entries for `remover` under `base`.
fn prepare(
    remover: Remover,
    base: &Path,
    name: &str,
    entries: u64,
    opts: &RemoveOptions,
) -> Target {
    if remover != Remover::Agent {
        let tree = base.join(name);
        build_tree(&tree, entries);
        return Target::Tree(tree);
    }
    let dir = base.join(format!("{name}-agent"));
    let (inv, _) = Inventory::open(&InventoryConfig {
        state_dir: dir.join("state"),
        volumes_root: dir.join("volumes"),
        driver: DriverChoice::Naive,
        cache_bytes: 16 << 20,
    })
    .expect("open the inventory");
    inv.set_remove_options(opts.clone());
    let handle = Handle::new(name.to_owned()).expect("handle");
    let record = inv
        .create(CreateSpec {
            open_to_peers: false,
            populate: Some(Box::new(move |data: &Path| {
                fill_tree(data, entries);
                Ok(())
            })),
            ..CreateSpec::empty(handle.clone())
        })
        .expect("create the volume");
    Target::Volume(inv, handle, record.path)
}

/// Removes `target` with `remover`; returns the wall time and the CPU time it took.
fn run(
    remover: Remover,
    target: &Target,
    entries: u64,
    rmz: Option<&Path>,
    opts: &RemoveOptions,
) -> (Duration, Duration) {
    let tree = target.path();
    let who = match remover {
        Remover::Ours | Remover::Agent | Remover::Bare => libc::RUSAGE_SELF,
        _ => libc::RUSAGE_CHILDREN,
    };
    let cpu_before = cpu_time(who);
    let start = Instant::now();
    match remover {
        Remover::Ours => {
            let stats = remove_tree_with(tree, opts).expect("volume-agent removes the tree");
            assert_eq!(stats.entries, entries, "tree size or removal count is off");
        }
        Remover::Agent => {
            let Target::Volume(inv, handle, _) = target else {
                unreachable!("the agent destroys volumes")
            };
            inv.destroy(handle).expect("the agent destroys the volume");
        }
        Remover::Bare => bare::remove(tree, bare_threads(opts)),
        Remover::Rm | Remover::Rmz => {
            let mut cmd = match (remover, rmz) {
                (Remover::Rmz, Some(rmz)) => Command::new(rmz),
                _ => {
                    let mut c = Command::new("rm");
                    c.arg("-rf");
                    c
                }
            };
            let status = cmd.arg(tree).status().expect("spawn remover");
            assert!(status.success(), "{} failed: {status}", remover.name());
        }
    }
    let took = start.elapsed();
    let cpu = cpu_time(who).saturating_sub(cpu_before);
    assert!(!tree.exists(), "{} left the tree behind", remover.name());
    (took, cpu)
}

/// Threads for the bare loop: the engine's default (two per core) unless set.
fn bare_threads(opts: &RemoveOptions) -> usize {
    match opts.threads {
        0 => 2 * std::thread::available_parallelism().map_or(1, usize::from),
        n => n,
    }
}

mod bare {
    //! Parallel `openat`/`getdents`/`unlinkat` with nothing else: files go while
    //! directories are listed on all threads; directories go afterwards, deepest first.
    use std::ffi::CString;
    use std::mem::MaybeUninit;
    use std::os::fd::OwnedFd;
    use std::path::Path;
    use std::sync::{Arc, Condvar, Mutex};

    use rustix::fs::{openat, unlinkat, AtFlags, FileType, Mode, OFlags, RawDir, CWD};

    type Task = (Arc<OwnedFd>, CString, usize);

    struct Shared {
        queue: Mutex<(Vec<Task>, usize)>,
        wake: Condvar,
        dirs: Mutex<Vec<Task>>,
    }

    pub fn remove(tree: &Path, threads: usize) {
        let parent = tree.parent().expect("parent");
        let top = Arc::new(
            openat(
                CWD,
                parent,
                OFlags::RDONLY | OFlags::DIRECTORY,
                Mode::empty(),
            )
            .expect("open"),
        );
        let name = CString::new(tree.file_name().expect("name").as_encoded_bytes()).expect("name");
        let shared = Shared {
            queue: Mutex::new((vec![(top, name, 0)], 0)),
            wake: Condvar::new(),
            dirs: Mutex::new(Vec::new()),
        };
        std::thread::scope(|s| {
            for _ in 0..threads.max(1) {
                s.spawn(|| scan(&shared));
            }
        });
        let mut dirs = shared.dirs.into_inner().expect("dirs");
        dirs.sort_by_key(|d| std::cmp::Reverse(d.2));
        let mut at = 0;
        while at < dirs.len() {
            let depth = dirs[at].2;
            let end = dirs[at..]
                .iter()
                .position(|d| d.2 != depth)
                .map_or(dirs.len(), |p| at + p);
            let level = &dirs[at..end];
            let chunk = level.len().div_ceil(threads.max(1));
            std::thread::scope(|s| {
                for part in level.chunks(chunk.max(1)) {
                    s.spawn(move || {
                        for (p, n, _) in part {
                            let _ = unlinkat(&**p, n.as_c_str(), AtFlags::REMOVEDIR);
                        }
                    });
                }
            });
            at = end;
        }
    }

    fn scan(sh: &Shared) {
        let mut buf = vec![MaybeUninit::<u8>::uninit(); 64 * 1024];
        loop {
            let task = {
                let mut q = sh.queue.lock().expect("queue");
                loop {
                    if let Some(t) = q.0.pop() {
                        q.1 += 1;
                        break Some(t);
                    }
                    if q.1 == 0 {
                        sh.wake.notify_all();
                        break None;
                    }
                    q = sh.wake.wait(q).expect("wait");
                }
            };
            let Some((parent, name, depth)) = task else {
                return;
            };
            let fd = Arc::new(
                openat(
                    &*parent,
                    name.as_c_str(),
                    OFlags::RDONLY | OFlags::DIRECTORY,
                    Mode::empty(),
                )
                .expect("open dir"),
            );
            let mut subdirs = Vec::new();
            let mut dir = RawDir::new(&*fd, &mut buf);
            while let Some(e) = dir.next() {
                let e = e.expect("getdents");
                let n = e.file_name();
                if matches!(n.to_bytes(), b"." | b"..") {
                    continue;
                }
                if e.file_type() == FileType::Directory {
                    subdirs.push((fd.clone(), n.to_owned(), depth + 1));
                } else {
                    let _ = unlinkat(&*fd, n, AtFlags::empty());
                }
            }
            sh.dirs.lock().expect("dirs").push((parent, name, depth));
            let mut q = sh.queue.lock().expect("queue");
            q.0.extend(subdirs);
            q.1 -= 1;
            sh.wake.notify_all();
        }
    }
}

fn find_rmz() -> Option<PathBuf> {
    let cargo_home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cargo")))?;
    let candidate = cargo_home.join("bin/rmz");
    if candidate.is_file() {
        return Some(candidate);
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join("rmz"))
            .find(|p| p.is_file())
    })
}

fn filesystem(path: &Path) -> String {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).expect("path");
    // SAFETY: all-zero is a valid statfs; the path is NUL-terminated.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return "unknown".into();
    }
    match st.f_type {
        0xEF53 => "ext4".into(),
        0x0102_1994 => "tmpfs".into(),
        0x5846_5342 => "xfs".into(),
        0x9123_683E => "btrfs".into(),
        0x794C_7630 => "overlayfs".into(),
        other => format!("magic {other:#x}"),
    }
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn bench_size(
    base: &Path,
    entries: u64,
    rounds: u64,
    removers: &[Remover],
    rmz: Option<&Path>,
    opts: &RemoveOptions,
) {
    println!("\n== tree of {entries} entries, {rounds} run(s) per remover ==");
    let mut rates: Vec<(Remover, Vec<f64>)> = removers.iter().map(|&r| (r, vec![])).collect();
    for round in 0..rounds {
        // Rotate who goes first, so no remover always follows the same neighbour.
        let n = rates.len();
        for i in 0..n {
            let (remover, list) = &mut rates[(i + round as usize) % n];
            let name = format!("tree-{entries}-{round}-{}", list.len());
            let built = Instant::now();
            let target = prepare(*remover, base, &name, entries, opts);
            // SAFETY: sync has no preconditions. Flush the new tree so no remover pays
            // for (or skips) writeback of the data just written.
            unsafe { libc::sync() };
            let build_time = built.elapsed();
            let (took, cpu) = run(*remover, &target, entries, rmz, opts);
            drop(target);
            let rate = entries as f64 / took.as_secs_f64();
            println!(
                "  {:<13} run {}: {:>8.3} s  {:>10.0} entries/s  cpu {:>7.3} s   (tree built+synced in {:.1} s)",
                remover.name(),
                round + 1,
                took.as_secs_f64(),
                rate,
                cpu.as_secs_f64(),
                build_time.as_secs_f64()
            );
            list.push(rate);
        }
    }
    let med = |r: Remover| {
        rates
            .iter()
            .find(|(x, _)| *x == r)
            .map(|(_, v)| median(v.clone()))
    };
    println!("  median entries/s:");
    for &r in removers {
        if let Some(m) = med(r) {
            println!("    {:<13} {:>10.0}", r.name(), m);
        }
    }
    for ours in [Remover::Ours, Remover::Agent] {
        let Some(rate) = med(ours) else { continue };
        if let Some(bare) = med(Remover::Bare) {
            println!(
                "  ratio {:<13}/ bare unlinkat loop = {:.2}  (aim >= 0.85)",
                ours.name(),
                rate / bare
            );
        }
        if let Some(rm) = med(Remover::Rm) {
            println!(
                "  ratio {:<13}/ rm -rf = {:.2}  (target >= 1.5)",
                ours.name(),
                rate / rm
            );
        }
        match med(Remover::Rmz) {
            Some(rmz) => println!(
                "  ratio {:<13}/ rmz    = {:.2}  (target >= 1.0)",
                ours.name(),
                rate / rmz
            ),
            None => println!("  ratio {:<13}/ rmz: skipped, rmz not found", ours.name()),
        }
    }
}

fn main() {
    // `cargo bench` passes `--bench`; a filter argument other than ours means "not me".
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    if !args.is_empty() && !args.iter().any(|a| "remove".contains(a.as_str())) {
        return;
    }
    let base = std::env::var_os("REMOVE_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_TARGET_TMPDIR")).join("remove-bench"));
    if base.exists() {
        remove_tree_with(&base, &RemoveOptions::default()).expect("clear old bench dir");
    }
    std::fs::create_dir_all(&base).expect("bench dir");
    let rmz = find_rmz();
    let mut removers = vec![Remover::Ours, Remover::Agent, Remover::Rm, Remover::Bare];
    match &rmz {
        Some(p) => {
            println!("rmz: {}", p.display());
            removers.push(Remover::Rmz);
        }
        None => {
            println!("rmz: skipped (not found in $CARGO_HOME/bin or PATH; `cargo install rmz`)")
        }
    }
    let opts = RemoveOptions {
        threads: usize::try_from(env_u64("REMOVE_BENCH_THREADS", 0)).unwrap_or(0),
        ..RemoveOptions::default()
    };
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "trees under {} ({}); {} cores; threads setting {}; load average {}",
        base.display(),
        filesystem(&base),
        cores,
        opts.threads,
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );
    let small = env_u64("REMOVE_BENCH_SMALL", 20_000);
    let big = env_u64("REMOVE_BENCH_BIG", 1_000_000);
    let rounds = env_u64("REMOVE_BENCH_ROUNDS", 3).max(1);
    bench_size(&base, small, rounds, &removers, rmz.as_deref(), &opts);
    if big > 0 {
        bench_size(&base, big, 1, &removers, rmz.as_deref(), &opts);
    }
    let _ = std::fs::remove_dir(&base);
}
