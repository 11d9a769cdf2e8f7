//! `volume-central run` under a stand-in for systemd: a datagram socket named by
//! `NOTIFY_SOCKET`, as systemd passes it to a `Type=notify` service, and `WATCHDOG_USEC`.

use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use volume_central::testing::PgCluster;
use volume_central::Db;

const BIN: &str = env!("CARGO_BIN_EXE_volume-central");

/// An upper bound for one message to arrive, only so that a broken build fails instead of
/// hanging; nothing here depends on how fast anything is.
const NO_MESSAGE_FOR: Duration = Duration::from_secs(120);

/// The stand-in for systemd's notification socket.
struct Systemd {
    socket: UnixDatagram,
    path: std::path::PathBuf,
    /// Every message received so far, in order.
    seen: Vec<String>,
}

impl Systemd {
    fn listen(dir: &Path) -> Self {
        let path = dir.join("notify.sock");
        let socket = UnixDatagram::bind(&path).expect("bind notify socket");
        socket
            .set_read_timeout(Some(NO_MESSAGE_FOR))
            .expect("read timeout");
        Systemd {
            socket,
            path,
            seen: Vec::new(),
        }
    }

    /// Receives messages until one has a line starting with `line`; returns the messages
    /// before it.
    fn wait_for(&mut self, line: &str) -> Vec<String> {
        let mut before = Vec::new();
        loop {
            let mut buf = [0u8; 4096];
            let n = self.socket.recv(&mut buf).unwrap_or_else(|err| {
                panic!(
                    "no {line} from volume-central (after {:?}): {err}",
                    self.seen
                )
            });
            let message = String::from_utf8_lossy(&buf[..n]).into_owned();
            self.seen.push(message.clone());
            if message.lines().any(|l| l.starts_with(line)) {
                return before;
            }
            before.push(message);
        }
    }

    /// `volume-central run --migrate --config CONFIG` with this socket and a watchdog.
    fn spawn_run(&self, config: &Path) -> Child {
        Command::new(BIN)
            .args(["run", "--migrate", "--config"])
            .arg(config)
            .env("NOTIFY_SOCKET", &self.path)
            .env("WATCHDOG_USEC", "1000000")
            .env_remove("WATCHDOG_PID")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn volume-central run")
    }
}

fn config_for(dir: &Path, url: &str) -> (std::path::PathBuf, u16) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let path = dir.join("central.toml");
    std::fs::write(
        &path,
        format!("listen = \"127.0.0.1:{port}\"\ndatabase_url = {url:?}\nauth = \"none\"\n"),
    )
    .expect("write config");
    (path, port)
}

fn schema_version(url: &str) -> i32 {
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async {
        let db = Db::connect(url, 1).expect("pool");
        volume_central::migrate::current_version(&db)
            .await
            .expect("read the migration table")
    })
}

fn sigterm(child: &Child) {
    // SAFETY: kill has no memory preconditions; the pid is our own child's.
    let rc = unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    assert_eq!(rc, 0, "kill -TERM {}", child.id());
}

#[test]
fn ready_is_sent_after_migrations_then_watchdog_and_stopping_on_sigterm() {
    let url = PgCluster::shared().create_database().expect("database");
    assert_eq!(schema_version(&url), 0, "a fresh database has no schema");
    let dir = tempfile::tempdir().expect("tempdir");
    let (config, port) = config_for(dir.path(), &url);
    let mut systemd = Systemd::listen(dir.path());
    let mut child = systemd.spawn_run(&config);

    systemd.wait_for("READY=1");
    // READY=1 came after the migrations and with the listener bound.
    assert_eq!(
        schema_version(&url),
        volume_central::migrate::latest_version()
    );
    std::net::TcpStream::connect(("127.0.0.1", port)).expect("listening once ready");

    systemd.wait_for("WATCHDOG=1");
    sigterm(&child);
    systemd.wait_for("STOPPING=1");
    let status = child.wait().expect("wait");
    assert!(status.success(), "exit after SIGTERM: {status:?}");
}

#[test]
fn ready_waits_for_the_database_and_the_watchdog_is_petted_meanwhile() {
    let mut cluster = PgCluster::start().expect("a private PostgreSQL cluster");
    let url = cluster.create_database().expect("database");
    cluster.stop();
    let dir = tempfile::tempdir().expect("tempdir");
    let (config, _) = config_for(dir.path(), &url);
    let mut systemd = Systemd::listen(dir.path());
    let mut child = systemd.spawn_run(&config);

    // It says it waits, and keeps petting the watchdog while it does, without READY.
    systemd.wait_for("STATUS=waiting for the database");
    systemd.wait_for("WATCHDOG=1");
    assert!(
        !systemd.seen.iter().any(|m| m.contains("READY=1")),
        "READY=1 while the database is down: {:?}",
        systemd.seen
    );

    cluster.restart().expect("start PostgreSQL again");
    systemd.wait_for("READY=1");
    assert_eq!(
        schema_version(&url),
        volume_central::migrate::latest_version()
    );
    sigterm(&child);
    systemd.wait_for("STOPPING=1");
    assert!(child.wait().expect("wait").success());
}

#[test]
fn sigterm_while_waiting_for_the_database_stops_cleanly() {
    let dir = tempfile::tempdir().expect("tempdir");
    // Nothing listens on the discard port: the database stays unreachable.
    let (config, _) = config_for(dir.path(), "host=127.0.0.1 port=9 user=nobody dbname=none");
    let mut systemd = Systemd::listen(dir.path());
    let mut child = systemd.spawn_run(&config);

    systemd.wait_for("STATUS=waiting for the database");
    sigterm(&child);
    systemd.wait_for("STOPPING=1");
    let status = child.wait().expect("wait");
    assert!(status.success(), "exit after SIGTERM: {status:?}");
    assert!(
        !systemd.seen.iter().any(|m| m.contains("READY=1")),
        "READY=1 without a database: {:?}",
        systemd.seen
    );
}
