//! Planner time for 10,000 and 100,000 volumes (target: ≤ 50 ms for 100,000 on 2 cores),
//! and the agent's CPU per idle poll (a 304), measured on the real binary.
//!
//! `cargo bench -p volume-agent --bench planner`

use std::time::{Duration, Instant};

use chrono::{TimeZone, Utc};
use protocol::{Handle, VolumeState};
use rand::{Rng, SeedableRng};
use volume_agent::planner::{plan, Desired, LocalVolume, Policy};

fn forest(n: usize, seed: u64) -> (Vec<LocalVolume>, Desired) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let t0 = Utc
        .with_ymd_and_hms(2026, 1, 1, 0, 0, 0)
        .single()
        .expect("time");
    let mut local = Vec::with_capacity(n);
    let mut keep = Vec::new();
    let mut destroying = Vec::new();
    for i in 0..n {
        let handle = Handle::new(format!("vol-{i:07}")).expect("handle");
        // A realistic shape: most volumes are roots or shallow children, some chains deep.
        let parent = (i > 0 && rng.gen_bool(0.6)).then(|| {
            let p = i - 1 - rng.gen_range(0..i.min(50));
            local
                .get(p)
                .map(|v: &LocalVolume| v.handle.clone())
                .expect("earlier volume")
        });
        match rng.gen_range(0..100) {
            0..=89 => keep.push(handle.clone()),
            90..=94 => destroying.push(handle.clone()),
            _ => {}
        }
        local.push(LocalVolume {
            handle,
            parent,
            state: VolumeState::Initialized,
            created_at: t0,
            missing: false,
        });
    }
    let as_of = t0 + chrono::Duration::hours(1);
    (
        local,
        Desired::Native {
            keep,
            destroying,
            as_of,
        },
    )
}

fn time_plan(n: usize) {
    let (local, desired) = forest(n, 7);
    let now = Utc
        .with_ymd_and_hms(2026, 1, 1, 1, 0, 0)
        .single()
        .expect("time");
    let policy = Policy::default();
    let mut times = Vec::new();
    let mut destroys = 0;
    for _ in 0..11 {
        let t = Instant::now();
        let p = plan(&local, &desired, now, &policy);
        times.push(t.elapsed());
        destroys = p.destroy.len();
    }
    times.sort();
    println!(
        "planner  {n:>7} volumes: median {:>7.2} ms  max {:>7.2} ms  ({destroys} destroys planned){}",
        times[times.len() / 2].as_secs_f64() * 1e3,
        times[times.len() - 1].as_secs_f64() * 1e3,
        if n == 100_000 {
            format!(
                "  target ≤ 50 ms: {}",
                if times[times.len() / 2] <= Duration::from_millis(50) { "met" } else { "MISSED" }
            )
        } else {
            String::new()
        }
    );
}

/// utime + stime of `pid`, in clock ticks.
fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
}

fn idle_poll_cpu() {
    use wiremock::matchers::{method, path_regex};
    use wiremock::{Mock, MockServer, ResponseTemplate};
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let server = MockServer::start().await;
        Mock::given(method("GET"))
            .and(path_regex("/volumes/desired$"))
            .respond_with(ResponseTemplate::new(304))
            .mount(&server)
            .await;
        Mock::given(method("PUT"))
            .respond_with(ResponseTemplate::new(204))
            .mount(&server)
            .await;
        let dir = tempfile::tempdir().expect("tempdir");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("port");
        let config = format!(
            "worker_name = \"bench\"\n[central]\nurl = \"{}\"\npoll_interval = \"20ms\"\nreport_interval = \"1h\"\n\
             [volumes]\nroot = {:?}\ndriver = \"naive\"\n[state]\ndir = {:?}\n[api]\nlisten = \"127.0.0.1:{port}\"\n\
             [resource_types]\ndir = {:?}\nrescan_interval = \"1h\"\n",
            server.uri(),
            dir.path().join("v"),
            dir.path().join("s"),
            dir.path().join("t"),
        );
        let cfg = dir.path().join("c.toml");
        std::fs::write(&cfg, config).expect("config");
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_volume-agent"))
            .args(["run", "--config"])
            .arg(&cfg)
            .env("RUST_LOG", "warn")
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start agent");
        tokio::time::sleep(Duration::from_secs(2)).await;
        let polls = |reqs: &[wiremock::Request]| reqs.iter().filter(|r| r.url.path().ends_with("/desired")).count();
        let p0 = polls(&server.received_requests().await.unwrap_or_default());
        let c0 = cpu_ticks(child.id()).unwrap_or(0);
        tokio::time::sleep(Duration::from_secs(10)).await;
        let p1 = polls(&server.received_requests().await.unwrap_or_default());
        let c1 = cpu_ticks(child.id()).unwrap_or(0);
        let _ = child.kill();
        let _ = child.wait();
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
        let n = (p1 - p0).max(1) as f64;
        println!(
            "idle poll (304): {} polls in 10 s, agent CPU {:.1} ms total, {:.3} ms per poll",
            p1 - p0,
            (c1 - c0) as f64 / hz * 1e3,
            (c1 - c0) as f64 / hz * 1e3 / n
        );
    });
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    time_plan(10_000);
    time_plan(100_000);
    idle_poll_cpu();
}
