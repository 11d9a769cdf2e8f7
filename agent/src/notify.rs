//! A small `sd_notify(3)` client: tells systemd when the daemon is ready, alive and stopping.
//!
//! systemd passes the address of its notification socket in `NOTIFY_SOCKET` (a path, or an
//! abstract socket name written with a leading `@`). Every message is one datagram of
//! newline-separated `KEY=VALUE` assignments. When `NOTIFY_SOCKET` is unset — the daemon
//! runs outside systemd, or under a `Type=` that does not listen — every call here is a
//! no-op that returns `Ok(())`.
//!
//! The free functions read the environment on each call, so they stay correct if the
//! environment changes; each call opens one unbound datagram socket and sends one message.
//! They are plain blocking calls (a single `sendto` on a local socket, which does not wait
//! on the receiver); async callers may call them directly or from `spawn_blocking`.
//!
//! How the daemon uses them (see `systemd/volume-agent.service`):
//! - [`ready`] once recovery and start-up are done (`Type=notify`);
//! - [`watchdog`] from the actor system's own liveness tick, every [`watchdog_interval`]
//!   (`WatchdogSec=`): if the actors stop ticking, systemd restarts the service;
//! - [`stopping`] when SIGTERM/SIGINT starts the shutdown;
//! - [`status`] for a one-line human status shown by `systemctl status`.

use std::ffi::OsStr;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::Duration;

/// The environment variable systemd sets to the notification socket's address.
pub const NOTIFY_SOCKET_ENV: &str = "NOTIFY_SOCKET";
/// The environment variable systemd sets to the watchdog timeout in microseconds.
pub const WATCHDOG_USEC_ENV: &str = "WATCHDOG_USEC";
/// The environment variable naming the process the watchdog settings are meant for.
pub const WATCHDOG_PID_ENV: &str = "WATCHDOG_PID";

/// What can go wrong talking to systemd's notification socket.
#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    /// `NOTIFY_SOCKET` holds something that is neither a path nor an abstract name.
    #[error(
        "NOTIFY_SOCKET={value:?} is not a socket address: expected an absolute path (`/run/...`) \
         or an abstract name (`@...`); unset NOTIFY_SOCKET when not running under systemd"
    )]
    InvalidAddress { value: String },
    /// The address is well formed but the socket could not be opened or addressed.
    #[error("cannot address the systemd notification socket {address}: {source}")]
    Address {
        address: String,
        #[source]
        source: io::Error,
    },
    /// Sending the datagram failed (no listener at that address, permission denied, ...).
    #[error(
        "cannot send {message:?} to the systemd notification socket {address}: {source} \
         (is the service started with Type=notify and NotifyAccess=main?)"
    )]
    Send {
        address: String,
        message: String,
        #[source]
        source: io::Error,
    },
}

/// Where notifications go: a parsed `NOTIFY_SOCKET`, or nowhere.
#[derive(Debug, Clone)]
pub struct Notifier {
    target: Option<Target>,
}

#[derive(Debug, Clone)]
struct Target {
    addr: SocketAddr,
    /// The address as systemd wrote it, for error messages.
    display: String,
}

impl Notifier {
    /// A notifier that sends nothing (what [`Notifier::from_env`] gives outside systemd).
    pub fn disabled() -> Self {
        Notifier { target: None }
    }

    /// The notifier for this process's `NOTIFY_SOCKET`; disabled when the variable is unset.
    pub fn from_env() -> Result<Self, NotifyError> {
        Self::from_value(std::env::var_os(NOTIFY_SOCKET_ENV).as_deref())
    }

    /// The notifier for a `NOTIFY_SOCKET` value: `None` disables it, `/path` is a socket
    /// file, `@name` an abstract socket.
    pub fn from_value(value: Option<&OsStr>) -> Result<Self, NotifyError> {
        let Some(value) = value else {
            return Ok(Self::disabled());
        };
        let display = value.to_string_lossy().into_owned();
        let bytes = value.as_bytes();
        let addr = match bytes.first() {
            Some(b'/') => {
                SocketAddr::from_pathname(value).map_err(|source| NotifyError::Address {
                    address: display.clone(),
                    source,
                })?
            }
            Some(b'@') if bytes.len() > 1 => {
                abstract_addr(&bytes[1..]).map_err(|source| NotifyError::Address {
                    address: display.clone(),
                    source,
                })?
            }
            _ => return Err(NotifyError::InvalidAddress { value: display }),
        };
        Ok(Notifier {
            target: Some(Target { addr, display }),
        })
    }

    /// Whether messages go anywhere.
    pub fn is_enabled(&self) -> bool {
        self.target.is_some()
    }

    /// Sends raw newline-separated `KEY=VALUE` assignments in one datagram.
    pub fn send(&self, message: &str) -> Result<(), NotifyError> {
        let Some(target) = &self.target else {
            return Ok(());
        };
        let socket = UnixDatagram::unbound().map_err(|source| NotifyError::Address {
            address: target.display.clone(),
            source,
        })?;
        match socket.send_to_addr(message.as_bytes(), &target.addr) {
            Ok(sent) if sent == message.len() => Ok(()),
            Ok(sent) => Err(NotifyError::Send {
                address: target.display.clone(),
                message: message.to_owned(),
                source: io::Error::new(
                    io::ErrorKind::WriteZero,
                    format!("only {sent} of {} bytes were sent", message.len()),
                ),
            }),
            Err(source) => Err(NotifyError::Send {
                address: target.display.clone(),
                message: message.to_owned(),
                source,
            }),
        }
    }

    /// `READY=1`: start-up (including crash recovery) is complete.
    pub fn ready(&self) -> Result<(), NotifyError> {
        self.send("READY=1")
    }

    /// `STOPPING=1`: the shutdown has begun.
    pub fn stopping(&self) -> Result<(), NotifyError> {
        self.send("STOPPING=1")
    }

    /// `WATCHDOG=1`: the daemon is alive; send at least every [`watchdog_interval`].
    pub fn watchdog(&self) -> Result<(), NotifyError> {
        self.send("WATCHDOG=1")
    }

    /// `STATUS=...`: a one-line status for `systemctl status`. Line breaks become spaces
    /// so the text cannot add assignments of its own.
    pub fn status(&self, text: &str) -> Result<(), NotifyError> {
        let one_line: String = text
            .chars()
            .map(|c| if c == '\n' || c == '\r' { ' ' } else { c })
            .collect();
        self.send(&format!("STATUS={one_line}"))
    }
}

#[cfg(any(target_os = "linux", target_os = "android"))]
fn abstract_addr(name: &[u8]) -> io::Result<SocketAddr> {
    #[cfg(target_os = "android")]
    use std::os::android::net::SocketAddrExt;
    #[cfg(target_os = "linux")]
    use std::os::linux::net::SocketAddrExt;
    SocketAddr::from_abstract_name(name)
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn abstract_addr(_name: &[u8]) -> io::Result<SocketAddr> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "abstract unix sockets exist only on Linux",
    ))
}

/// Sends `READY=1` to `NOTIFY_SOCKET`; a no-op outside systemd.
pub fn ready() -> Result<(), NotifyError> {
    Notifier::from_env()?.ready()
}

/// Sends `STOPPING=1` to `NOTIFY_SOCKET`; a no-op outside systemd.
pub fn stopping() -> Result<(), NotifyError> {
    Notifier::from_env()?.stopping()
}

/// Sends `STATUS=text` to `NOTIFY_SOCKET`; a no-op outside systemd.
pub fn status(text: &str) -> Result<(), NotifyError> {
    Notifier::from_env()?.status(text)
}

/// Sends `WATCHDOG=1` to `NOTIFY_SOCKET`; a no-op outside systemd.
pub fn watchdog() -> Result<(), NotifyError> {
    Notifier::from_env()?.watchdog()
}

/// How often to call [`watchdog`]: half of `WATCHDOG_USEC`, as `sd_watchdog_enabled(3)`
/// recommends. `None` when the watchdog is off: `WATCHDOG_USEC` unset, zero or not a
/// number, or `WATCHDOG_PID` naming another process (the settings were inherited).
pub fn watchdog_interval() -> Option<Duration> {
    let usec = std::env::var_os(WATCHDOG_USEC_ENV);
    let pid = std::env::var_os(WATCHDOG_PID_ENV);
    watchdog_interval_from(usec.as_deref(), pid.as_deref(), std::process::id())
}

/// [`watchdog_interval`] over explicit values: `usec` and `pid` as found in the environment,
/// `own_pid` the calling process.
pub fn watchdog_interval_from(
    usec: Option<&OsStr>,
    pid: Option<&OsStr>,
    own_pid: u32,
) -> Option<Duration> {
    if let Some(pid) = pid {
        let pid: u32 = pid.to_str()?.trim().parse().ok()?;
        if pid != own_pid {
            return None;
        }
    }
    let usec: u64 = usec?.to_str()?.trim().parse().ok()?;
    if usec == 0 {
        return None;
    }
    Some(Duration::from_micros(usec) / 2)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsString;
    use std::path::Path;

    fn os(value: &str) -> OsString {
        OsString::from(value)
    }

    fn receive(socket: &UnixDatagram) -> String {
        socket
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("set read timeout");
        let mut buf = [0u8; 4096];
        let n = socket.recv(&mut buf).expect("a datagram arrives");
        String::from_utf8(buf[..n].to_vec()).expect("utf-8 message")
    }

    /// The three messages the daemon sends over its life arrive, in order and verbatim.
    fn assert_lifecycle_arrives(listener: &UnixDatagram, notifier: &Notifier) {
        notifier.ready().expect("send ready");
        assert_eq!(receive(listener), "READY=1");
        notifier.watchdog().expect("send watchdog");
        assert_eq!(receive(listener), "WATCHDOG=1");
        notifier.stopping().expect("send stopping");
        assert_eq!(receive(listener), "STOPPING=1");
    }

    fn path_pair(dir: &Path) -> (UnixDatagram, Notifier) {
        let path = dir.join("notify.sock");
        let listener = UnixDatagram::bind(&path).expect("bind test socket");
        let notifier = Notifier::from_value(Some(path.as_os_str())).expect("valid path");
        (listener, notifier)
    }

    #[test]
    fn ready_watchdog_and_stopping_arrive_on_a_path_socket() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (listener, notifier) = path_pair(dir.path());
        assert!(notifier.is_enabled());

        assert_lifecycle_arrives(&listener, &notifier);
    }

    #[test]
    fn status_is_sent_on_one_line() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (listener, notifier) = path_pair(dir.path());
        notifier
            .status("reconciling\nREADY=1")
            .expect("send status");
        assert_eq!(receive(&listener), "STATUS=reconciling READY=1");
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn messages_arrive_on_an_abstract_socket() {
        use std::os::linux::net::SocketAddrExt;
        let name = format!(
            "volume-agent-notify-test-{}-{}",
            std::process::id(),
            line!()
        );
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).expect("abstract address");
        let listener = UnixDatagram::bind_addr(&addr).expect("bind abstract socket");
        let notifier =
            Notifier::from_value(Some(&os(&format!("@{name}")))).expect("valid abstract name");

        assert_lifecycle_arrives(&listener, &notifier);
    }

    #[test]
    fn unset_socket_makes_every_call_a_no_op() {
        let notifier = Notifier::from_value(None).expect("unset is fine");
        assert!(!notifier.is_enabled());
        notifier.ready().expect("no-op ready");
        notifier.watchdog().expect("no-op watchdog");
        notifier.stopping().expect("no-op stopping");
        notifier.status("idle").expect("no-op status");
    }

    #[test]
    fn malformed_socket_addresses_are_rejected_with_the_value() {
        for bad in ["", "relative/path.sock", "@", "vsock:2:1234"] {
            let err = Notifier::from_value(Some(&os(bad))).expect_err(bad);
            assert!(
                matches!(&err, NotifyError::InvalidAddress { value } if value == bad),
                "{bad:?} gave {err}"
            );
            assert!(err.to_string().contains("NOTIFY_SOCKET"), "{err}");
        }
    }

    #[test]
    fn sending_to_a_missing_socket_names_the_address() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("nobody-listens.sock");
        let notifier = Notifier::from_value(Some(path.as_os_str())).expect("valid path");
        let err = notifier.ready().expect_err("no listener");
        assert!(matches!(err, NotifyError::Send { .. }), "{err}");
        assert!(err.to_string().contains("nobody-listens.sock"), "{err}");
    }

    #[test]
    fn watchdog_interval_is_half_the_timeout() {
        assert_eq!(
            watchdog_interval_from(Some(&os("30000000")), None, 42),
            Some(Duration::from_secs(15))
        );
    }

    #[test]
    fn watchdog_interval_respects_watchdog_pid() {
        assert_eq!(
            watchdog_interval_from(Some(&os("20000000")), Some(&os("42")), 42),
            Some(Duration::from_secs(10))
        );
        assert_eq!(
            watchdog_interval_from(Some(&os("20000000")), Some(&os("43")), 42),
            None
        );
        assert_eq!(
            watchdog_interval_from(Some(&os("20000000")), Some(&os("not-a-pid")), 42),
            None
        );
    }

    #[test]
    fn watchdog_is_off_when_the_timeout_is_missing_zero_or_garbage() {
        assert_eq!(watchdog_interval_from(None, None, 42), None);
        assert_eq!(watchdog_interval_from(Some(&os("0")), None, 42), None);
        assert_eq!(watchdog_interval_from(Some(&os("soon")), None, 42), None);
    }
}
