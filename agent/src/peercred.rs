//! Who is on the other end of a local API connection, as the kernel reports it.
//!
//! - Unix socket: `SO_PEERCRED`, the credentials the peer had when it connected.
//! - Loopback TCP: the kernel knows both ends of a loopback connection, so it can tell
//!   which uid owns the peer's socket. It says so through socket diagnostics
//!   (`NETLINK_SOCK_DIAG`, the interface `ss -e` uses): one `SOCK_DIAG_BY_FAMILY` request
//!   naming the exact 4-tuple of the peer's socket answers one `inet_diag_msg` whose
//!   `idiag_uid` is the uid that created that socket.
//!
//! A socket without an inode (closed by its process, or a `TIME_WAIT` remnant, which the
//! kernel reports with uid 0) proves nothing and is refused: a caller that sent its
//! request and closed its socket must not pass as root.
//!
//! The netlink exchange is a request to the kernel answered within the `send`/`recv` pair,
//! with no disk access and no other process involved, so it runs where the connection is
//! accepted.

use std::io;
use std::mem::size_of;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// How a peer reached the API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Unix,
    Tcp,
}

/// A connection's peer, as far as the kernel vouches for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerCred {
    /// The peer's uid, and its gid where the transport reports one (`SO_PEERCRED`).
    Known {
        uid: u32,
        gid: Option<u32>,
        transport: Transport,
    },
    /// The kernel would not say who the peer is; the reason is logged and the peer refused.
    Unknown { reason: String },
}

/// `SO_PEERCRED` of a connected unix socket.
pub fn unix_peer(stream: &impl AsRawFd) -> PeerCred {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: `cred` and `len` are valid for writes of a `ucred`; the fd is borrowed alive.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return PeerCred::Unknown {
            reason: format!("SO_PEERCRED: {}", io::Error::last_os_error()),
        };
    }
    PeerCred::Known {
        uid: cred.uid,
        gid: Some(cred.gid),
        transport: Transport::Unix,
    }
}

/// The owner of the peer's socket of a TCP connection between `local` (our end) and
/// `peer`. Only meaningful on loopback, where the peer's socket lives in this kernel.
pub fn tcp_peer(local: SocketAddr, peer: SocketAddr) -> PeerCred {
    match tcp_socket_owner(peer, local) {
        Ok(uid) => PeerCred::Known {
            uid,
            gid: None,
            transport: Transport::Tcp,
        },
        Err(e) => PeerCred::Unknown {
            reason: format!("sock_diag lookup of {peer} -> {local}: {e}"),
        },
    }
}

// Constants from <linux/netlink.h>, <linux/sock_diag.h>, <linux/inet_diag.h>.
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const NLMSG_ERROR: u16 = 2;
const NLM_F_REQUEST: u16 = 1;
/// `INET_DIAG_NOCOOKIE`: match the socket by address, whatever its cookie.
const NO_COOKIE: u32 = u32::MAX;
/// `struct nlmsghdr`.
const NLMSG_HDR_LEN: usize = 16;
/// `struct inet_diag_sockid`: sport, dport, src[4], dst[4], if, cookie[2].
const SOCKID_LEN: usize = 48;
/// `struct inet_diag_req_v2`: family, protocol, ext, pad, states, id.
const REQ_LEN: usize = 8 + SOCKID_LEN;
/// `struct inet_diag_msg`: family, state, timer, retrans, id, expires, rqueue, wqueue,
/// uid, inode.
const MSG_LEN: usize = 4 + SOCKID_LEN + 20;
const MSG_UID_AT: usize = 4 + SOCKID_LEN + 12;
const MSG_INODE_AT: usize = MSG_UID_AT + 4;

/// Why the kernel's answer did not name an owner.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DiagError {
    #[error("the kernel knows no such socket ({0})")]
    Kernel(String),
    #[error("the socket is no longer open in any process (closed or TIME_WAIT)")]
    NotOpen,
    #[error("malformed netlink answer: {0}")]
    Malformed(&'static str),
    #[error("{0}")]
    Io(String),
}

/// The uid that owns the TCP socket whose own address is `src` and whose remote address
/// is `dst`.
pub fn tcp_socket_owner(src: SocketAddr, dst: SocketAddr) -> Result<u32, DiagError> {
    let request = encode_request(1, src, dst);
    let answer = exchange(&request).map_err(|e| DiagError::Io(e.to_string()))?;
    parse_answer(&answer, 1)
}

/// An IPv4-mapped IPv6 address (a dual-stack listener's view of a v4 peer) as IPv4: the
/// peer's socket is an `AF_INET` one.
fn unmap(a: SocketAddr) -> SocketAddr {
    match a.ip() {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), a.port()),
            None => a,
        },
        IpAddr::V4(_) => a,
    }
}

/// A `SOCK_DIAG_BY_FAMILY` request (netlink header + `inet_diag_req_v2`) for the one TCP
/// socket with local address `src` and remote address `dst`. Integers in host order
/// except ports and addresses, which the kernel takes in network order.
pub fn encode_request(seq: u32, src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
    let (src, dst) = (unmap(src), unmap(dst));
    let family = match src.ip() {
        IpAddr::V4(_) => libc::AF_INET,
        IpAddr::V6(_) => libc::AF_INET6,
    } as u8;
    let total = NLMSG_HDR_LEN + REQ_LEN;
    let mut b = Vec::with_capacity(total);
    // struct nlmsghdr
    b.extend_from_slice(&(total as u32).to_ne_bytes());
    b.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    b.extend_from_slice(&NLM_F_REQUEST.to_ne_bytes());
    b.extend_from_slice(&seq.to_ne_bytes());
    b.extend_from_slice(&0u32.to_ne_bytes()); // nlmsg_pid: the kernel fills in ours

    // struct inet_diag_req_v2
    b.push(family);
    b.push(libc::IPPROTO_TCP as u8);
    b.push(0); // idiag_ext: no extra attributes
    b.push(0); // pad
    b.extend_from_slice(&u32::MAX.to_ne_bytes()); // idiag_states: any state

    // struct inet_diag_sockid
    b.extend_from_slice(&src.port().to_be_bytes());
    b.extend_from_slice(&dst.port().to_be_bytes());
    b.extend_from_slice(&addr_bytes(src.ip()));
    b.extend_from_slice(&addr_bytes(dst.ip()));
    b.extend_from_slice(&0u32.to_ne_bytes()); // idiag_if: any interface
    b.extend_from_slice(&NO_COOKIE.to_ne_bytes());
    b.extend_from_slice(&NO_COOKIE.to_ne_bytes());
    debug_assert_eq!(b.len(), total);
    b
}

/// An address as `__be32[4]`: IPv4 in the first word, the rest zero.
fn addr_bytes(ip: IpAddr) -> [u8; 16] {
    let mut out = [0u8; 16];
    match ip {
        IpAddr::V4(v4) => out[..4].copy_from_slice(&v4.octets()),
        IpAddr::V6(v6) => out.copy_from_slice(&v6.octets()),
    }
    out
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    b.get(at..at + 4)
        .and_then(|s| s.try_into().ok())
        .map(u32::from_ne_bytes)
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    b.get(at..at + 2)
        .and_then(|s| s.try_into().ok())
        .map(u16::from_ne_bytes)
}

/// Reads the kernel's answer to request `seq`: the owner's uid of the socket it found.
pub fn parse_answer(b: &[u8], seq: u32) -> Result<u32, DiagError> {
    let len = u32_at(b, 0).ok_or(DiagError::Malformed("short header"))? as usize;
    let kind = u16_at(b, 4).ok_or(DiagError::Malformed("short header"))?;
    let got_seq = u32_at(b, 8).ok_or(DiagError::Malformed("short header"))?;
    if len < NLMSG_HDR_LEN || len > b.len() {
        return Err(DiagError::Malformed("length out of bounds"));
    }
    if got_seq != seq {
        return Err(DiagError::Malformed("answer to another request"));
    }
    let body = &b[NLMSG_HDR_LEN..len];
    match kind {
        NLMSG_ERROR => {
            // struct nlmsgerr: a negative errno, then the request's header.
            let errno = u32_at(body, 0).ok_or(DiagError::Malformed("short error"))? as i32;
            Err(DiagError::Kernel(
                io::Error::from_raw_os_error(errno.saturating_neg()).to_string(),
            ))
        }
        SOCK_DIAG_BY_FAMILY if body.len() >= MSG_LEN => {
            let uid = u32_at(body, MSG_UID_AT).ok_or(DiagError::Malformed("short message"))?;
            let inode = u32_at(body, MSG_INODE_AT).ok_or(DiagError::Malformed("short message"))?;
            if inode == 0 {
                return Err(DiagError::NotOpen);
            }
            Ok(uid)
        }
        SOCK_DIAG_BY_FAMILY => Err(DiagError::Malformed("short inet_diag_msg")),
        _ => Err(DiagError::Malformed("unexpected message type")),
    }
}

/// Sends `request` to the kernel's sock_diag netlink service and returns its answer.
fn exchange(request: &[u8]) -> io::Result<Vec<u8>> {
    // SAFETY: plain socket(2); the result is checked and owned right away.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
            libc::NETLINK_SOCK_DIAG,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just created and nothing else owns it.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: an all-zero sockaddr_nl addresses the kernel (pid 0, no groups).
    let mut kernel: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    kernel.nl_family = libc::AF_NETLINK as libc::sa_family_t;
    // SAFETY: `request` and `kernel` are valid for the lengths given.
    let sent = unsafe {
        libc::sendto(
            fd.as_raw_fd(),
            request.as_ptr().cast(),
            request.len(),
            0,
            (&kernel as *const libc::sockaddr_nl).cast(),
            size_of::<libc::sockaddr_nl>() as libc::socklen_t,
        )
    };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut buf = vec![0u8; 8192];
    loop {
        // SAFETY: `buf` is valid for writes of its length.
        let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        buf.truncate(n as usize);
        return Ok(buf);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{TcpListener, TcpStream};

    #[test]
    fn request_carries_the_exact_four_tuple_in_network_order() {
        let src: SocketAddr = "127.0.0.1:40000".parse().expect("addr");
        let dst: SocketAddr = "127.0.0.2:7788".parse().expect("addr");
        let b = encode_request(7, src, dst);
        assert_eq!(b.len(), 72);
        assert_eq!(u32_at(&b, 0), Some(72));
        assert_eq!(u16_at(&b, 4), Some(SOCK_DIAG_BY_FAMILY));
        assert_eq!(u32_at(&b, 8), Some(7));
        assert_eq!(b[16], libc::AF_INET as u8);
        assert_eq!(b[17], libc::IPPROTO_TCP as u8);
        let id = &b[24..];
        assert_eq!(&id[0..2], &40000u16.to_be_bytes());
        assert_eq!(&id[2..4], &7788u16.to_be_bytes());
        assert_eq!(&id[4..8], &[127, 0, 0, 1]);
        assert_eq!(&id[20..24], &[127, 0, 0, 2]);
        assert_eq!(&id[40..48], &[0xff; 8], "no cookie");
    }

    #[test]
    fn a_v4_mapped_peer_is_looked_up_as_ipv4() {
        let src: SocketAddr = "[::ffff:127.0.0.1]:40000".parse().expect("addr");
        let dst: SocketAddr = "[::ffff:127.0.0.1]:7788".parse().expect("addr");
        let b = encode_request(1, src, dst);
        assert_eq!(b[16], libc::AF_INET as u8);
        assert_eq!(&b[28..32], &[127, 0, 0, 1]);
        let v6 = encode_request(
            1,
            "[::1]:1".parse().expect("a"),
            "[::1]:2".parse().expect("a"),
        );
        assert_eq!(v6[16], libc::AF_INET6 as u8);
        assert_eq!(v6[28 + 15], 1);
    }

    fn answer(kind: u16, seq: u32, body: &[u8]) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(&((NLMSG_HDR_LEN + body.len()) as u32).to_ne_bytes());
        b.extend_from_slice(&kind.to_ne_bytes());
        b.extend_from_slice(&0u16.to_ne_bytes());
        b.extend_from_slice(&seq.to_ne_bytes());
        b.extend_from_slice(&0u32.to_ne_bytes());
        b.extend_from_slice(body);
        b
    }

    fn diag_msg(uid: u32, inode: u32) -> Vec<u8> {
        let mut m = vec![0u8; MSG_LEN];
        m[MSG_UID_AT..MSG_UID_AT + 4].copy_from_slice(&uid.to_ne_bytes());
        m[MSG_INODE_AT..MSG_INODE_AT + 4].copy_from_slice(&inode.to_ne_bytes());
        m
    }

    #[test]
    fn parses_the_owner_and_refuses_sockets_no_process_holds() {
        let ok = answer(SOCK_DIAG_BY_FAMILY, 3, &diag_msg(65534, 99));
        assert_eq!(parse_answer(&ok, 3), Ok(65534));
        let tw = answer(SOCK_DIAG_BY_FAMILY, 3, &diag_msg(0, 0));
        assert_eq!(parse_answer(&tw, 3), Err(DiagError::NotOpen));
        let other = answer(SOCK_DIAG_BY_FAMILY, 4, &diag_msg(0, 99));
        assert!(matches!(
            parse_answer(&other, 3),
            Err(DiagError::Malformed(_))
        ));
        let mut err = (-libc::ENOENT).to_ne_bytes().to_vec();
        err.extend_from_slice(&[0u8; 16]);
        let e = parse_answer(&answer(NLMSG_ERROR, 3, &err), 3).expect_err("enoent");
        assert!(matches!(e, DiagError::Kernel(_)), "{e}");
        assert!(matches!(
            parse_answer(&[1, 2], 3),
            Err(DiagError::Malformed(_))
        ));
        let short = answer(SOCK_DIAG_BY_FAMILY, 3, &[0u8; 10]);
        assert!(matches!(
            parse_answer(&short, 3),
            Err(DiagError::Malformed(_))
        ));
    }

    /// Creates a socket in a thread whose credentials alone are switched to `uid` (the raw
    /// syscall changes one thread, unlike libc's `setresuid`), connects it to `to`, and
    /// hands it back: the socket keeps the uid it was created with.
    fn connect_as(uid: u32, to: SocketAddr) -> TcpStream {
        std::thread::spawn(move || {
            // SAFETY: setresuid on this thread only; the thread ends right after.
            let rc = unsafe { libc::syscall(libc::SYS_setresuid, uid, uid, uid) };
            assert_eq!(rc, 0, "setresuid: {}", io::Error::last_os_error());
            TcpStream::connect(to).expect("connect")
        })
        .join()
        .expect("connecting thread")
    }

    #[test]
    fn reports_the_uid_that_owns_the_peer_socket_on_loopback() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: needs root to create a socket as another uid");
            return;
        }
        for bind in ["127.0.0.1:0", "[::1]:0"] {
            let Ok(listener) = TcpListener::bind(bind) else {
                eprintln!("skipped {bind}: cannot bind");
                continue;
            };
            let addr = listener.local_addr().expect("addr");
            for uid in [0, 65534] {
                let client = connect_as(uid, addr);
                let (server_side, peer) = listener.accept().expect("accept");
                let local = server_side.local_addr().expect("local");
                assert_eq!(
                    tcp_peer(local, peer),
                    PeerCred::Known {
                        uid,
                        gid: None,
                        transport: Transport::Tcp
                    },
                    "{bind}"
                );
                drop(client);
                // Closed by its process: no longer vouched for, whatever the kernel keeps.
                assert!(
                    matches!(tcp_peer(local, peer), PeerCred::Unknown { .. }),
                    "{bind}"
                );
            }
        }
    }

    #[test]
    fn reports_so_peercred_on_a_unix_socket() {
        let (a, _b) = std::os::unix::net::UnixStream::pair().expect("pair");
        // SAFETY: getuid/getgid have no preconditions.
        let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
        assert_eq!(
            unix_peer(&a),
            PeerCred::Known {
                uid,
                gid: Some(gid),
                transport: Transport::Unix
            }
        );
    }
}
