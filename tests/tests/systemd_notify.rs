//! The real `volume-agent run` speaks sd_notify the way `systemd/volume-agent.service`
//! (Type=notify, WatchdogSec=) expects: READY=1 after start-up, WATCHDOG=1 while alive,
//! STOPPING=1 on SIGTERM, then a clean exit. The test plays systemd's part: it owns the
//! notification socket and passes it in NOTIFY_SOCKET / WATCHDOG_USEC.

use std::os::unix::net::UnixDatagram;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use e2e::agent_binary;

/// Kills the daemon if the test ends early, so no process outlives a failed test.
struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// Waits for a datagram containing the assignment `wanted`, returning everything received.
/// The deadline only bounds a hang; nothing here measures speed.
fn wait_for(socket: &UnixDatagram, wanted: &str, seen: &mut Vec<String>) {
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline {
        match socket.recv(&mut buf) {
            Ok(n) => {
                let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
                let found = msg.lines().any(|l| l == wanted);
                seen.push(msg);
                if found {
                    return;
                }
            }
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(e) => panic!("receiving on the notify socket: {e}"),
        }
    }
    panic!("no {wanted} from volume-agent; received: {seen:?}");
}

#[test]
fn run_reports_ready_watchdog_and_stopping_to_systemd() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let socket_path = tmp.path().join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).expect("bind notify socket");
    socket
        .set_read_timeout(Some(Duration::from_secs(1)))
        .expect("read timeout");

    let config = tmp.path().join("config.toml");
    std::fs::create_dir_all(tmp.path().join("resource-types")).expect("resource types dir");
    std::fs::write(
        &config,
        format!(
            r#"worker_name = "notify-test"
[central]
# Nothing listens here: the agent must still start and keep retrying.
url = "http://127.0.0.1:9"
[volumes]
root = "{root}/volumes"
driver = "naive"
[state]
dir = "{root}/state"
[api]
listen = "127.0.0.1:0"
[resource_types]
dir = "{root}/resource-types"
"#,
            root = tmp.path().display()
        ),
    )
    .expect("write config");

    let child = Command::new(agent_binary())
        .arg("run")
        .arg("--config")
        .arg(&config)
        .env("NOTIFY_SOCKET", &socket_path)
        .env("WATCHDOG_USEC", "2000000")
        .env_remove("WATCHDOG_PID")
        .stdin(Stdio::null())
        .spawn()
        .expect("start volume-agent run");
    let mut daemon = Daemon(child);

    let mut seen = Vec::new();
    wait_for(&socket, "READY=1", &mut seen);
    wait_for(&socket, "WATCHDOG=1", &mut seen);

    let status = Command::new("kill")
        .arg("-TERM")
        .arg(daemon.0.id().to_string())
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -TERM failed");
    wait_for(&socket, "STOPPING=1", &mut seen);

    let exit = daemon.0.wait().expect("wait for volume-agent");
    assert!(
        exit.success(),
        "volume-agent exited with {exit} after SIGTERM"
    );
}
