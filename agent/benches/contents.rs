//! Copy-on-write copies (the naive driver) against `cp -a --reflink=auto` in the same run,
//! on the bench directory's file system (ext4 on most workers) and on an xfs loop image
//! (reflinks); and the p99 of copy-on-write creates while another process writes to the
//! same file system, against the same copy made durable the old way (`syncfs`).
//!
//! Run with `cargo bench -p volume-agent --bench contents`. Environment:
//! `CONTENTS_BENCH_BYTES` (parent size, default 1 GiB), `CONTENTS_BENCH_FILES` (default
//! 10000), `CONTENTS_BENCH_CREATES` (creates measured under load, default 40),
//! `CONTENTS_BENCH_WRITER_BYTES` (what the other process writes, default 1 GiB),
//! `CONTENTS_BENCH_DIR` (default a directory under the target dir), `CONTENTS_BENCH_PARTS`
//! (a comma-separated subset of `plain`, `xfs`, `load`; default all). The xfs part needs
//! root and `mkfs.xfs` (xfsprogs); it is skipped with a message otherwise.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use protocol::local::{CreateVolumeRequest, Strategy};
use volume_agent::contents::copy::copy_tree;
use volume_agent::inventory::{DriverChoice, Handle, Inventory, InventoryConfig, VolumeState};
use volume_agent::remove::remove_tree;

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A parent of `files` files holding `bytes` in all, 100 files per directory.
fn build_parent(dir: &Path, bytes: u64, files: u64) {
    let per_file = usize::try_from(bytes / files.max(1)).unwrap_or(4096);
    let mut body = vec![0u8; per_file];
    for (i, b) in body.iter_mut().enumerate() {
        *b = (i * 31 % 251) as u8;
    }
    for f in 0..files {
        let d = dir.join(format!("d{}", f / 100));
        if f % 100 == 0 {
            std::fs::create_dir_all(&d).expect("mkdir");
        }
        body[0] = f as u8;
        std::fs::write(d.join(format!("f{f}")), &body).expect("write parent file");
    }
    sync();
}

fn sync() {
    let _ = Command::new("sync").status();
}

fn time(f: impl FnOnce()) -> Duration {
    let start = Instant::now();
    f();
    start.elapsed()
}

fn cp(args: &[&str], from: &Path, to: &Path) {
    let status = Command::new("cp")
        .args(args)
        .arg(from)
        .arg(to)
        .status()
        .expect("spawn cp");
    assert!(status.success(), "cp failed: {status}");
}

/// `syncfs` of the file system holding `path` (`sync -f`).
fn syncfs(path: &Path) {
    let status = Command::new("sync")
        .arg("-f")
        .arg(path)
        .status()
        .expect("spawn sync");
    assert!(status.success());
}

fn compare_on(base: &Path, label: &str, bytes: u64, files: u64) {
    let parent = base.join("parent");
    build_parent(&parent, bytes, files);
    let ours = time(|| {
        copy_tree(&parent, &base.join("ours")).expect("naive copy");
    });
    remove_tree(&base.join("ours")).expect("clean");
    sync();
    let cp_auto = time(|| cp(&["-a", "--reflink=auto"], &parent, &base.join("cp")));
    let cp_auto_synced = cp_auto + time(|| syncfs(base));
    remove_tree(&base.join("cp")).expect("clean");
    sync();
    let cp_full = time(|| {
        cp(&["-a", "--reflink=never"], &parent, &base.join("full"));
        syncfs(base);
    });
    remove_tree(&base.join("full")).expect("clean");
    remove_tree(&parent).expect("clean");
    let s = |d: Duration| d.as_secs_f64();
    println!(
        "\n== {label}: parent of {files} files, {} MiB ==",
        bytes >> 20
    );
    println!("  naive copy (fsynced)          {:>8.3} s", s(ours));
    println!("  cp -a --reflink=auto          {:>8.3} s", s(cp_auto));
    println!(
        "  cp -a --reflink=auto + syncfs {:>8.3} s",
        s(cp_auto_synced)
    );
    println!(
        "  cp -a --reflink=never + syncfs (a full copy) {:>8.3} s",
        s(cp_full)
    );
    println!(
        "  ratio naive copy vs cp -a --reflink=auto: {:.2}x (vs cp + syncfs: {:.2}x; target >= 1.0)",
        s(cp_auto) / s(ours),
        s(cp_auto_synced) / s(ours)
    );
    println!(
        "  ratio naive copy vs a full copy: {:.2}x (with reflinks, target >= 10)",
        s(cp_full) / s(ours)
    );
}

/// Makes an xfs loop image with reflinks under `base`, mounted at `base/mnt`.
fn xfs_mount(base: &Path, bytes: u64) -> Option<PathBuf> {
    let image = base.join("xfs.img");
    let mnt = base.join("mnt");
    std::fs::create_dir_all(&mnt).ok()?;
    let f = std::fs::File::create(&image).ok()?;
    f.set_len((bytes * 2).max(1 << 30) + (512 << 20)).ok()?;
    drop(f);
    let mkfs = Command::new("mkfs.xfs")
        .args(["-q", "-f", "-m", "reflink=1"])
        .arg(&image)
        .status();
    if !mkfs.is_ok_and(|s| s.success()) {
        println!("\n== xfs: SKIP (mkfs.xfs not found or failed; install xfsprogs) ==");
        return None;
    }
    let mount = Command::new("mount")
        .args(["-o", "loop"])
        .arg(&image)
        .arg(&mnt)
        .status();
    if !mount.is_ok_and(|s| s.success()) {
        println!("\n== xfs: SKIP (cannot mount a loop image: not root, or no loop devices) ==");
        return None;
    }
    Some(mnt)
}

fn request(handle: &str, strategy: Strategy) -> CreateVolumeRequest {
    serde_json::from_value(serde_json::json!({"handle": handle, "strategy": strategy}))
        .expect("request")
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i.min(v.len() - 1)]
}

/// Copy-on-write create latencies while `dd` writes `writer_bytes` to the same file
/// system, against the same copy followed by `syncfs` (what a create cost before).
fn creates_under_load(base: &Path, creates: u64, writer_bytes: u64) {
    let (inv, _) = Inventory::open(&InventoryConfig {
        state_dir: base.join("state"),
        volumes_root: base.join("volumes"),
        driver: DriverChoice::Naive,
        cache_bytes: 16 << 20,
    })
    .expect("inventory");
    let parent = inv
        .create_volume(request("parent", Strategy::Empty), VolumeState::Created)
        .expect("parent");
    build_parent(&parent.path.join("t"), 8 << 20, 200);
    inv.set_state(&Handle::new("parent").expect("h"), VolumeState::Initialized)
        .expect("init");
    let run = |with_syncfs: bool| -> Vec<f64> {
        let writer = Command::new("dd")
            .arg("if=/dev/zero")
            .arg(format!("of={}", base.join("writer").display()))
            .arg("bs=1M")
            .arg(format!("count={}", writer_bytes >> 20))
            .arg("status=none")
            .spawn()
            .expect("spawn dd");
        std::thread::sleep(Duration::from_millis(300));
        let mut lat = Vec::new();
        for i in 0..creates {
            let name = format!("c{}-{i}", u8::from(with_syncfs));
            let took = if with_syncfs {
                let to = base.join(&name);
                let t = time(|| {
                    copy_tree(&parent.path, &to).expect("copy");
                    syncfs(&to);
                });
                remove_tree(&to).expect("clean");
                t
            } else {
                let req = request(
                    &name,
                    Strategy::Cow {
                        volume: Handle::new("parent").expect("h"),
                    },
                );
                let t = time(|| {
                    inv.create_volume(req, VolumeState::Created)
                        .expect("create");
                });
                inv.destroy(&Handle::new(name).expect("h"))
                    .expect("destroy");
                t
            };
            lat.push(took.as_secs_f64() * 1000.0);
        }
        let mut writer = writer;
        let _ = writer.wait();
        let _ = std::fs::remove_file(base.join("writer"));
        sync();
        lat
    };
    let mut ours = run(false);
    let mut old = run(true);
    println!(
        "\n== copy-on-write create (naive, 200 files / 8 MiB parent) while dd writes {} MiB ==",
        writer_bytes >> 20
    );
    println!(
        "  agent create (fsync what was copied): p50 {:>8.1} ms  p99 {:>8.1} ms",
        percentile(&mut ours, 0.5),
        percentile(&mut ours, 0.99)
    );
    println!(
        "  same copy + syncfs (before):          p50 {:>8.1} ms  p99 {:>8.1} ms",
        percentile(&mut old, 0.5),
        percentile(&mut old, 0.99)
    );
    println!(
        "  ratio p99 syncfs / ours: {:.2}x",
        percentile(&mut old, 0.99) / percentile(&mut ours, 0.99)
    );
}

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    if !args.is_empty() && !args.iter().any(|a| "contents".contains(a.as_str())) {
        return;
    }
    let base = std::env::var_os("CONTENTS_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_TARGET_TMPDIR")).join("contents-bench"));
    let _ = remove_tree(&base);
    std::fs::create_dir_all(&base).expect("bench dir");
    let bytes = env_u64("CONTENTS_BENCH_BYTES", 1 << 30);
    let files = env_u64("CONTENTS_BENCH_FILES", 10_000);
    // `CONTENTS_BENCH_PARTS`: which parts run (`plain`, `xfs`, `load`; default all).
    let parts = std::env::var("CONTENTS_BENCH_PARTS").unwrap_or_default();
    let part = |p: &str| parts.is_empty() || parts.split(',').any(|x| x.trim() == p);
    if part("plain") {
        compare_on(
            &base.join("plain"),
            "bench directory's file system",
            bytes,
            files,
        );
    }
    if !part("xfs") {
    } else if let Some(mnt) = xfs_mount(&base, bytes) {
        compare_on(&mnt.join("t"), "xfs loop image (reflink=1)", bytes, files);
        let _ = Command::new("umount").arg(&mnt).status();
    }
    let _ = std::fs::remove_file(base.join("xfs.img"));
    if part("load") {
        creates_under_load(
            &base.join("load"),
            env_u64("CONTENTS_BENCH_CREATES", 40),
            env_u64("CONTENTS_BENCH_WRITER_BYTES", 1 << 30),
        );
    }
    let _ = remove_tree(&base);
}
