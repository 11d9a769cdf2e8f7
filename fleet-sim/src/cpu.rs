//! CPU time, read from /proc: per thread of this process by the thread's name (the
//! central replicas run on threads named `central…` and actix's `actix-rt…`, the
//! simulated fleet on `sim…`), and of a local PostgreSQL (the postmaster, its live
//! children, and the children it already reaped).

use std::path::Path;

/// Clock ticks per second of /proc's utime and stime (USER_HZ, 100 on Linux).
const TICKS: f64 = 100.0;

/// (utime + stime, cutime + cstime) in seconds from a `/proc/.../stat` line.
fn stat_times(text: &str) -> Option<(String, i64, f64, f64)> {
    let open = text.find('(')?;
    let close = text.rfind(')')?;
    let comm = text[open + 1..close].to_string();
    let rest: Vec<&str> = text[close + 2..].split_whitespace().collect();
    // rest[0] is field 3 (state): ppid is field 4, utime..cstime fields 14..17.
    let num = |i: usize| rest.get(i - 3).and_then(|s| s.parse::<f64>().ok());
    let ppid = rest.get(1)?.parse().ok()?;
    let own = (num(14)? + num(15)?) / TICKS;
    let children = (num(16)? + num(17)?) / TICKS;
    Some((comm, ppid, own, children))
}

/// CPU seconds of this process's threads, (central, simulated fleet).
pub fn threads() -> (f64, f64) {
    let (mut central, mut sim) = (0.0, 0.0);
    let Ok(dir) = std::fs::read_dir("/proc/self/task") else {
        return (0.0, 0.0);
    };
    for entry in dir.flatten() {
        let Ok(text) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        let Some((comm, _, own, _)) = stat_times(&text) else {
            continue;
        };
        if comm.starts_with("central") || comm.starts_with("actix") {
            central += own;
        } else {
            sim += own;
        }
    }
    (central, sim)
}

/// CPU seconds of the PostgreSQL whose postmaster is `pid`: its own, its reaped
/// children's, and its live children's.
pub fn postgres(pid: i64) -> Option<f64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, _, own, reaped) = stat_times(&text)?;
    let mut total = own + reaped;
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if !name.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let Ok(text) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        if let Some((_, ppid, own, _)) = stat_times(&text) {
            if ppid == pid {
                total += own;
            }
        }
    }
    Some(total)
}

/// The postmaster's pid from `<data_directory>/postmaster.pid`.
pub fn postmaster_pid(data_directory: &Path) -> Option<i64> {
    let text = std::fs::read_to_string(data_directory.join("postmaster.pid")).ok()?;
    text.lines().next()?.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_stat_line() {
        let line = "42 (actix-rt|system) S 7 42 42 0 -1 4194560 100 0 0 0 150 50 10 20 20 0 1 0";
        let (comm, ppid, own, children) = stat_times(line).expect("parse");
        assert_eq!(comm, "actix-rt|system");
        assert_eq!(ppid, 7);
        assert!((own - 2.0).abs() < 1e-9);
        assert!((children - 0.3).abs() < 1e-9);
    }
}
