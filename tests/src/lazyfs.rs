//! LazyFS for power-cut tests: a FUSE file system that keeps every write in its own cache
//! until that file is fsynced, and drops whatever is not synced on the command
//! `lazyfs::clear-cache` (a power cut). A SIGKILL alone cannot show a missing fsync (the
//! kernel's page cache outlives the process); SIGKILL, then clear-cache, can.
//!
//! What it models: file data (writes, appends, truncates) not fsynced is lost. What it does
//! not: directory entries (create, mkdir, rename, unlink go straight to the backing
//! directory and always survive, so a missing fsync of a directory is not caught), and
//! `syncfs(2)`/`sync(2)`, which never reach a FUSE file system (data made durable only by
//! syncfs is lost here although a real file system keeps it).
//!
//! LazyFS is a third-party tool, not part of this tree: `.ci/steps/power-cut.sh` builds and
//! installs it with the shared tools' `lazyfs/setup.sh` (offline, Debian build
//! dependencies), and tests find it through [`binary`]. Where it is absent the tests print
//! why and pass, unless `POWER_CUT_REQUIRE_LAZYFS=1` (set by CI) makes that a failure.

use std::io::Write;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The LazyFS binary, or why power-cut tests cannot run on this machine: `LAZYFS_BIN`, else
/// `lazyfs` on `PATH` (where the shared tools' `lazyfs/setup.sh` installs it). Also needs
/// root (to mount) and `/dev/fuse`.
pub fn binary() -> Result<PathBuf, String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err("not running as root (mounting LazyFS needs root)".into());
    }
    if !Path::new("/dev/fuse").exists() {
        return Err("/dev/fuse is missing (no FUSE here; try `modprobe fuse`)".into());
    }
    if let Some(p) = std::env::var_os("LAZYFS_BIN") {
        // Absolute: LazyFS is started in its own directory, where a relative path would
        // name nothing.
        let p = PathBuf::from(p);
        return match std::fs::canonicalize(&p) {
            Ok(abs) if abs.is_file() => Ok(abs),
            _ => Err(format!("LAZYFS_BIN={} is not a file", p.display())),
        };
    }
    let on_path = std::env::var_os("PATH")
        .map(|paths| {
            std::env::split_paths(&paths)
                .map(|d| d.join("lazyfs"))
                .find(|p| p.is_file())
        })
        .unwrap_or_default();
    on_path.ok_or_else(|| {
        "no LazyFS binary: set LAZYFS_BIN or put `lazyfs` on PATH (the shared tools' \
         lazyfs/setup.sh builds and installs it offline; .ci/steps/power-cut.sh runs it)"
            .into()
    })
}

/// Whether a missing LazyFS (or FUSE, or root) must fail a power-cut test instead of
/// skipping it: `POWER_CUT_REQUIRE_LAZYFS=1`, which CI sets.
pub fn required() -> bool {
    std::env::var_os("POWER_CUT_REQUIRE_LAZYFS").is_some_and(|v| v == "1")
}

/// A LazyFS mount on a fresh temporary directory; unmounted on drop.
pub struct LazyFs {
    bin: PathBuf,
    config: PathBuf,
    /// The mount point: put the agent's state and volumes here.
    pub mnt: PathBuf,
    /// The backing directory (what survives a power cut).
    pub backing: PathBuf,
    fifo: PathBuf,
    log: PathBuf,
    child: Option<Child>,
    crashes: usize,
    dir: Option<tempfile::TempDir>,
}

impl LazyFs {
    /// Mounts LazyFS (binary `bin`) with a cache of `cache_size` (e.g. `"256mb"`; LazyFS
    /// allocates it up front). Panics with LazyFS's log when the mount does not come up.
    pub fn mount(bin: &Path, cache_size: &str) -> LazyFs {
        // No '-' in the name: LazyFS takes a `--config-path` argument containing "-o" (any
        // case) for a missing one, and "lazyfs-O..." would be one.
        let dir = tempfile::Builder::new()
            .prefix("lazyfs_")
            .tempdir()
            .expect("tempdir");
        let backing = dir.path().join("backing");
        let mnt = dir.path().join("mnt");
        let fifo = dir.path().join("faults.fifo");
        let log = dir.path().join("lazyfs.log");
        let config = dir.path().join("lazyfs.toml");
        std::fs::create_dir_all(&backing).expect("backing dir");
        std::fs::create_dir_all(&mnt).expect("mount point");
        // No eviction: a full cache would write through to the backing directory, making
        // unsynced data durable silently (see `cache_usage`).
        std::fs::write(
            &config,
            format!(
                "[faults]\nfifo_path={fifo:?}\n[cache]\napply_eviction=false\n\
                 [cache.simple]\ncustom_size=\"{cache_size}\"\nblocks_per_page=1\n\
                 [filesystem]\nlog_all_operations=false\nlogfile={log:?}\n"
            ),
        )
        .expect("write lazyfs config");
        assert!(
            !config.to_string_lossy().to_lowercase().contains("-o"),
            "LazyFS would ignore the config path {} (it contains \"-o\"); set TMPDIR elsewhere",
            config.display()
        );
        let mut fs = LazyFs {
            bin: bin.to_owned(),
            config,
            mnt,
            backing,
            fifo,
            log,
            child: None,
            crashes: 0,
            dir: Some(dir),
        };
        fs.start();
        fs
    }

    /// Starts the LazyFS process on the mount point and waits until it serves.
    fn start(&mut self) {
        let dir = self
            .dir
            .as_ref()
            .expect("the directory is kept while mounted");
        std::fs::write(&self.log, "").expect("create lazyfs log");
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.path().join("lazyfs.stdout"))
            .expect("stdout file");
        let mut cmd = Command::new(&self.bin);
        // LazyFS aborts when it stops (after the unmount); no core file of its cache-sized
        // memory, and none in the test's directory.
        // SAFETY: setrlimit is async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                let zero = libc::rlimit {
                    rlim_cur: 0,
                    rlim_max: 0,
                };
                if libc::setrlimit(libc::RLIMIT_CORE, &zero) == 0 {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
            });
        }
        let child = cmd
            .arg(&self.mnt)
            .arg("--config-path")
            .arg(&self.config)
            .args(["-o", "allow_other", "-o", "modules=subdir", "-o"])
            .arg(format!("subdir={}", self.backing.display()))
            .arg("-f")
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("stdout fd"))
            .stderr(out)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", self.bin.display()));
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if is_mount_point(&self.mnt)
                && self.fifo.exists()
                && self.log_text().contains("waiting for fault commands")
            {
                return;
            }
            let exited = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten());
            if exited.is_some() || Instant::now() > deadline {
                panic!(
                    "LazyFS did not mount ({}):\n{}\n{}",
                    exited.map_or("timed out".into(), |s| s.to_string()),
                    self.log_text(),
                    self.stdout_text()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Whether the LazyFS process still runs. When it died (LazyFS itself crashes now and
    /// then under concurrent load), its cache died with it, exactly as in a power cut, and
    /// every file operation on the mount fails with ECONNABORTED or ENOTCONN.
    pub fn is_alive(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// How many times LazyFS died and was mounted again (see [`LazyFs::remount_after_crash`]).
    pub fn crashes(&self) -> usize {
        self.crashes
    }

    /// After LazyFS died: unmounts the dead mount and mounts LazyFS again on the same
    /// backing directory, which holds what was synced (and every directory entry). Kill
    /// every process using the mount first.
    pub fn remount_after_crash(&mut self) {
        assert!(!self.is_alive(), "LazyFS is alive: nothing to remount");
        let status = self.child.take().and_then(|mut c| c.wait().ok());
        let tail = |t: String| {
            let lines: Vec<&str> = t.lines().collect();
            lines[lines.len().saturating_sub(5)..].join("\n")
        };
        eprintln!(
            "LazyFS exited ({status:?}); mounting it again on the same backing directory (its \
             cache is gone, as in a power cut). Its last output:\n{}",
            tail(self.stdout_text())
        );
        self.crashes += 1;
        unmount(&self.mnt);
        assert!(
            !is_mount_point(&self.mnt),
            "the dead LazyFS mount {} is still mounted",
            self.mnt.display()
        );
        self.start();
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn stdout_text(&self) -> String {
        self.dir
            .as_ref()
            .and_then(|d| std::fs::read_to_string(d.path().join("lazyfs.stdout")).ok())
            .unwrap_or_default()
    }

    /// Sends one command to LazyFS and waits until its log holds one more line containing
    /// `ack`; returns that line.
    fn command(&self, cmd: &str, ack: &str) -> String {
        let before = self.log_text().matches(ack).count();
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(&self.fifo)
            .expect("open the LazyFS fifo");
        // One write below PIPE_BUF: LazyFS reads the fifo in 100-byte chunks and takes the
        // last byte (the newline) as the end of the command.
        f.write_all(format!("{cmd}\n").as_bytes())
            .expect("write a LazyFS command");
        drop(f);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let text = self.log_text();
            if text.matches(ack).count() > before {
                return text
                    .lines()
                    .rfind(|l| l.contains(ack))
                    .unwrap_or_default()
                    .to_owned();
            }
            assert!(
                Instant::now() < deadline,
                "LazyFS did not acknowledge {cmd:?}:\n{text}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The power cut: drops every write not fsynced. Kill the writers first (a live process
    /// would go on writing).
    pub fn power_cut(&self) {
        self.command("lazyfs::clear-cache", "cache is cleared");
    }

    /// How full LazyFS's cache is, in percent of its pages. At 100 % further writes go
    /// straight to the backing directory and survive a power cut unsynced, so a test must
    /// stay well below.
    pub fn cache_usage(&self) -> f64 {
        let line = self.command("lazyfs::display-cache-usage", "cache usage");
        line.rsplit(" is ")
            .next()
            .and_then(|v| v.trim().trim_end_matches('%').parse().ok())
            .unwrap_or_else(|| panic!("no percentage in LazyFS's line {line:?}"))
    }
}

impl Drop for LazyFs {
    fn drop(&mut self) {
        unmount(&self.mnt);
        if let Some(mut child) = self.child.take() {
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline && matches!(child.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        if is_mount_point(&self.mnt) {
            // Never delete through a mount: leave the directory behind.
            if let Some(d) = self.dir.take() {
                eprintln!(
                    "LazyFS mount {} still mounted; left {}",
                    self.mnt.display(),
                    d.keep().display()
                );
            }
        }
    }
}

/// `umount`, or a lazy one when that fails (a dead FUSE mount, or one still in use).
fn unmount(mnt: &Path) {
    let plain = Command::new("umount")
        .arg(mnt)
        .stderr(Stdio::null())
        .status();
    if !plain.is_ok_and(|s| s.success()) {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(mnt)
            .stderr(Stdio::null())
            .status();
    }
}

/// Whether `p` is a mount point (its device differs from its parent's).
fn is_mount_point(p: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(p), p.parent().map(std::fs::metadata)) {
        (Ok(a), Some(Ok(b))) => a.dev() != b.dev(),
        _ => false,
    }
}
