//! A throwaway PostgreSQL cluster for tests (feature `testing`).
//!
//! [`PgCluster::start`] finds the PostgreSQL server binaries (`$PG_BIN_DIR`, else the
//! newest `/usr/lib/postgresql/<version>/bin`, else `pg_config --bindir`), runs `initdb`
//! in a temp dir and starts `postgres` on a unix socket in that dir, with no TCP
//! listener. As root it runs both as `nobody` (PostgreSQL refuses to run as root), with
//! the temp dir chowned to it. [`Drop`] stops the server and removes the dir.
//!
//! [`PgCluster::shared`] is one cluster per test process: each test takes a fresh
//! database from it with [`PgCluster::create_database`]. The server runs under a small
//! shell watchdog that stops it (and removes the dir) when the test process exits, even
//! though a `static` is never dropped.
//!
//! ```no_run
//! # async fn demo() {
//! use volume_central::testing::PgCluster;
//! let url = PgCluster::shared().create_database().expect("database");
//! let mut config = volume_central::Config::with_database_url(url);
//! config.listen = "127.0.0.1:0".parse().unwrap();
//! volume_central::migrate(&config).await.expect("migrate");
//! // `start` refuses without a credential (or `config.auth = AuthMode::None`).
//! let db = volume_central::Db::connect(&config.resolve_database_url().unwrap(), 1).unwrap();
//! let scheduler = volume_central::auth::issue(&db, &volume_central::auth::Subject::Scheduler)
//!     .await
//!     .expect("issue");
//! let server = volume_central::start(&config).await.expect("start");
//! println!("volume-central at {}, token {}", server.url(), scheduler.token);
//! # }
//! ```

use std::io::Write as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The port number in the socket's name (`.s.PGSQL.<port>`); there is no TCP listener.
pub const PORT: u16 = 5432;

/// Why the cluster could not be started.
#[derive(Debug, thiserror::Error)]
pub enum HarnessError {
    #[error("PostgreSQL server binaries not found (looked in $PG_BIN_DIR, /usr/lib/postgresql/*/bin and `pg_config --bindir`); install Debian's `postgresql` package")]
    NoBinaries,
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("{what} failed ({status}); see {log}")]
    Failed {
        what: String,
        status: String,
        log: PathBuf,
    },
    #[error("postgres did not accept connections within {0:?}; see {1}")]
    NotReady(Duration, PathBuf),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> HarnessError {
    let what = what.into();
    move |source| HarnessError::Io { what, source }
}

/// A PostgreSQL cluster in a temp dir.
pub struct PgCluster {
    root: PathBuf,
    bin: PathBuf,
    owner: Option<(u32, u32)>,
    watchdog: Option<(Child, ChildStdin)>,
    remove_on_exit: bool,
    /// `name=value` server settings on top of the harness's own.
    settings: Vec<String>,
}

/// Finds the directory holding `initdb` and `postgres`.
pub fn find_bin_dir() -> Result<PathBuf, HarnessError> {
    let has = |d: &Path| d.join("initdb").is_file() && d.join("postgres").is_file();
    if let Some(dir) = std::env::var_os("PG_BIN_DIR").map(PathBuf::from) {
        if has(&dir) {
            return Ok(dir);
        }
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let v: u32 = e.file_name().to_str()?.split('.').next()?.parse().ok()?;
            Some((v, e.path().join("bin")))
        })
        .filter(|(_, d)| has(d))
        .collect();
    versions.sort();
    if let Some((_, dir)) = versions.pop() {
        return Ok(dir);
    }
    let out = Command::new("pg_config").arg("--bindir").output().ok();
    if let Some(out) = out.filter(|o| o.status.success()) {
        let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if has(&dir) {
            return Ok(dir);
        }
    }
    Err(HarnessError::NoBinaries)
}

impl PgCluster {
    /// Creates and starts a new cluster; dropping it stops the server and removes it.
    pub fn start() -> Result<Self, HarnessError> {
        Self::start_with(&[])
    }

    /// [`PgCluster::start`] with server settings (`-c name=value`) on top of the
    /// harness's own, e.g. `("shared_buffers", "1GB")` for a benchmark that should not
    /// measure PostgreSQL's 128 MB default evicting its own pages.
    pub fn start_with(settings: &[(&str, &str)]) -> Result<Self, HarnessError> {
        let bin = find_bin_dir()?;
        let root = tempfile::Builder::new()
            .prefix("vc-pg-")
            .tempdir()
            .map_err(io("create temp dir for PostgreSQL"))?
            .keep();
        // SAFETY: geteuid has no preconditions.
        let owner = if unsafe { libc::geteuid() } == 0 {
            Some((65534, 65534)) // nobody:nogroup
        } else {
            None
        };
        std::fs::create_dir(root.join("sock")).map_err(io("create socket dir"))?;
        if let Some((uid, gid)) = owner {
            for p in [root.clone(), root.join("sock")] {
                std::os::unix::fs::chown(&p, Some(uid), Some(gid))
                    .map_err(io(format!("chown {} to nobody", p.display())))?;
            }
        }
        let mut cluster = PgCluster {
            root,
            bin,
            owner,
            watchdog: None,
            remove_on_exit: false,
            settings: settings.iter().map(|(k, v)| format!("{k}={v}")).collect(),
        };
        cluster.initdb()?;
        cluster.start_server()?;
        Ok(cluster)
    }

    /// The cluster shared by every test of this process. Stopped and removed when the
    /// process exits. Panics when it cannot start (tests cannot run without it).
    pub fn shared() -> &'static PgCluster {
        static SHARED: OnceLock<PgCluster> = OnceLock::new();
        SHARED.get_or_init(|| {
            let mut c =
                PgCluster::start().unwrap_or_else(|err| panic!("cannot start PostgreSQL: {err}"));
            // Restart the watchdog so it also removes the dir once the process is gone.
            c.stop_server();
            c.remove_on_exit = true;
            c.start_server()
                .unwrap_or_else(|err| panic!("cannot restart PostgreSQL: {err}"));
            c
        })
    }

    fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new(self.bin.join(program));
        if let Some((uid, gid)) = self.owner {
            cmd.uid(uid).gid(gid);
        }
        cmd.current_dir(&self.root);
        cmd
    }

    fn log(&self) -> PathBuf {
        self.root.join("postgres.log")
    }

    fn log_file(&self) -> Result<std::fs::File, HarnessError> {
        let f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log())
            .map_err(io("open postgres.log"))?;
        if let Some((uid, gid)) = self.owner {
            let _ = std::os::unix::fs::chown(self.log(), Some(uid), Some(gid));
        }
        Ok(f)
    }

    fn initdb(&self) -> Result<(), HarnessError> {
        let log = self.log_file()?;
        let status = self
            .command("initdb")
            .args(["-D", "data", "-U", "postgres", "--auth=trust", "-E", "UTF8"])
            .args(["--locale=C", "--no-sync"])
            .stdout(log.try_clone().map_err(io("dup log"))?)
            .stderr(log)
            .status()
            .map_err(io("run initdb"))?;
        if !status.success() {
            return Err(HarnessError::Failed {
                what: "initdb".into(),
                status: status.to_string(),
                log: self.log(),
            });
        }
        Ok(())
    }

    fn start_server(&mut self) -> Result<(), HarnessError> {
        let log = self.log_file()?;
        // The watchdog shell stops postgres (fast shutdown) when its stdin closes: on
        // drop, or when the test process exits without dropping a static.
        let script = r#"bin="$1"; shift
"$bin" "$@" &
pid=$!
read -r _
kill -INT "$pid" 2>/dev/null
wait "$pid"
if [ -n "$VC_PG_REMOVE" ]; then rm -rf "$VC_PG_REMOVE"; fi"#;
        let postgres = self.bin.join("postgres");
        let mut cmd = Command::new("sh");
        if let Some((uid, gid)) = self.owner {
            cmd.uid(uid).gid(gid);
        }
        cmd.current_dir(&self.root);
        cmd.arg("-c")
            .arg(script)
            .arg("pg-watchdog")
            .arg(&postgres)
            .args(["-D", "data", "-k"])
            .arg(self.root.join("sock"))
            .args(["-p", &PORT.to_string()])
            .args(["-c", "listen_addresses="])
            .args(["-c", "fsync=off", "-c", "synchronous_commit=off"])
            .args(["-c", "full_page_writes=off", "-c", "max_connections=300"])
            .args(self.settings.iter().flat_map(|s| ["-c", s.as_str()]))
            .stdin(Stdio::piped())
            .stdout(log.try_clone().map_err(io("dup log"))?)
            .stderr(log);
        if self.remove_on_exit {
            cmd.env("VC_PG_REMOVE", &self.root);
        }
        let mut child = cmd.spawn().map_err(io("start postgres"))?;
        let stdin = child
            .stdin
            .take()
            .ok_or_else(|| io("postgres stdin")(std::io::Error::other("no pipe")))?;
        self.watchdog = Some((child, stdin));
        self.wait_ready(Duration::from_secs(60))
    }

    fn wait_ready(&mut self, limit: Duration) -> Result<(), HarnessError> {
        let start = Instant::now();
        loop {
            let ok = Command::new(self.bin.join("pg_isready"))
                .arg("-h")
                .arg(self.socket_dir())
                .args(["-p", &PORT.to_string(), "-U", "postgres", "-q"])
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            if ok {
                return Ok(());
            }
            if let Some((child, _)) = &mut self.watchdog {
                if let Ok(Some(status)) = child.try_wait() {
                    return Err(HarnessError::Failed {
                        what: "postgres".into(),
                        status: status.to_string(),
                        log: self.log(),
                    });
                }
            }
            if start.elapsed() > limit {
                return Err(HarnessError::NotReady(limit, self.log()));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn stop_server(&mut self) {
        if let Some((mut child, mut stdin)) = self.watchdog.take() {
            let _ = stdin.write_all(b"stop\n");
            drop(stdin);
            let _ = child.wait();
        }
    }

    /// Stops the server (fast shutdown: connections are cut), keeping its data.
    pub fn stop(&mut self) {
        self.stop_server();
    }

    /// Starts the server again after [`PgCluster::stop`].
    pub fn restart(&mut self) -> Result<(), HarnessError> {
        if self.watchdog.is_none() {
            self.start_server()?;
        }
        Ok(())
    }

    /// The directory holding the server's unix socket.
    pub fn socket_dir(&self) -> PathBuf {
        self.root.join("sock")
    }

    /// A connection string for database `db` (key=value form, unix socket).
    pub fn url(&self, db: &str) -> String {
        format!(
            "host={} port={PORT} user=postgres dbname={db}",
            self.socket_dir().display()
        )
    }

    /// Creates a fresh, empty database and returns its connection string.
    pub fn create_database(&self) -> Result<String, HarnessError> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let name = format!(
            "t_{}_{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let out = Command::new(self.bin.join("createdb"))
            .arg("-h")
            .arg(self.socket_dir())
            .args(["-p", &PORT.to_string(), "-U", "postgres", &name])
            .output()
            .map_err(io("run createdb"))?;
        if !out.status.success() {
            return Err(HarnessError::Failed {
                what: format!(
                    "createdb {name}: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                ),
                status: out.status.to_string(),
                log: self.log(),
            });
        }
        Ok(self.url(&name))
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        self.stop_server();
        let _ = std::fs::remove_dir_all(&self.root);
    }
}
