//! A full disk: the volumes root and the state directory share a 16 MiB tmpfs filled to
//! ENOSPC with volume data. The central side names the filling volumes `destroying`; the
//! agent must still destroy them, free the space, and stay alive. Needs root (mount);
//! skipped with the reason when the mount is refused.

use std::io::Write;
use std::path::{Path, PathBuf};

use e2e::faults::*;
use e2e::*;

/// Points the agent's volumes root and state directory at `disk`.
fn move_onto(agent: &Agent, disk: &Path) {
    let cfg = std::fs::read_to_string(&agent.config_path).expect("read config");
    let old_root = format!("root = {:?}", agent.dir.path().join("volumes"));
    let old_state = format!("dir = {:?}", agent.dir.path().join("state"));
    assert!(cfg.contains(&old_root) && cfg.contains(&old_state), "{cfg}");
    let cfg = cfg
        .replace(&old_root, &format!("root = {:?}", disk.join("volumes")))
        .replace(&old_state, &format!("dir = {:?}", disk.join("state")));
    std::fs::write(&agent.config_path, cfg).expect("write config");
}

/// Creates an initialized empty volume, or says why the agent refused.
async fn try_create_empty(local: &Local, handle: &str) -> Result<PathBuf, String> {
    let data = try_create(local, handle, None).await?;
    try_initialize(local, handle).await?;
    Ok(data)
}

/// Writes 1 MiB blocks into `dir/fill.bin` until `limit` bytes or ENOSPC; returns the
/// bytes written and whether the disk filled up.
fn fill(dir: &Path, limit: u64) -> (u64, bool) {
    let mut f = std::fs::File::create(dir.join("fill.bin")).expect("create fill file");
    let block = vec![0xa5u8; 1 << 20];
    let mut written = 0u64;
    while written < limit {
        match f.write(&block) {
            Ok(0) => return (written, true),
            Ok(n) => written += n as u64,
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => return (written, true),
            Err(e) => panic!("writing fill data: {e}"),
        }
    }
    match f.sync_all() {
        Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => (written, true),
        _ => (written, false),
    }
}

/// An agent whose volumes root and state directory live on a 16 MiB tmpfs, with a small
/// `keeper` volume (desired) and filling volumes written until ENOSPC.
struct FullDisk {
    script: DesiredScript,
    server: e2e::wiremock::MockServer,
    agent: Agent,
    local: Local,
    disk: PathBuf,
    root: PathBuf,
    fills: Vec<String>,
    written: u64,
    total: u64,
    free_full: u64,
    stopped_by: Option<String>,
    _tmpfs: Tmpfs,
}

impl FullDisk {
    async fn new(test: &str) -> Option<FullDisk> {
        let script = DesiredScript::new("w1");
        let server = mock_central(&script).await;
        let mut agent = Agent::start(&server.uri(), &AgentSettings::default());
        agent.kill();
        let disk = agent.dir.path().join("disk");
        let tmpfs = match Tmpfs::mount(&disk, "16m") {
            Ok(t) => t,
            Err(why) => {
                eprintln!("skipped {test}: {why}");
                return None;
            }
        };
        move_onto(&agent, &disk);
        agent.spawn();
        let local = Local::new(&agent);
        let root = disk.join("volumes");
        let keeper = try_create_empty(&local, "keeper")
            .await
            .expect("create keeper");
        std::fs::write(keeper.join("keep.txt"), b"precious").expect("keeper data");
        script.set(&[("keeper", None)], &[]);
        eventually("the keeper set is applied", || async {
            local.metric("volume_agent_desired_revision").await == Some(2.0)
        })
        .await;
        let mut fills: Vec<String> = Vec::new();
        let mut written = 0u64;
        let mut stopped_by = None;
        for i in 0..64 {
            let name = format!("fill{i}");
            match try_create_empty(&local, &name).await {
                Ok(data) => {
                    fills.push(name);
                    let (n, full) = fill(&data, 3 << 20);
                    written += n;
                    if full {
                        break;
                    }
                }
                Err(e) => {
                    stopped_by = Some(e);
                    break;
                }
            }
        }
        let (total, free_full) = statvfs(&disk);
        running_pid(&agent);
        assert!(healthy(&agent).await, "healthz on a full disk");
        assert!(
            free_full < 1 << 20,
            "the disk did not fill up: {free_full} bytes free of {total}"
        );
        Some(FullDisk {
            script,
            server,
            agent,
            local,
            disk,
            root,
            fills,
            written,
            total,
            free_full,
            stopped_by,
            _tmpfs: tmpfs,
        })
    }

    /// The filling volumes are gone, the space is back, the keeper is intact, the agent lives.
    async fn check_freed(&self, gone: &[&str]) -> u64 {
        let (_, free_after) = statvfs(&self.disk);
        running_pid(&self.agent);
        assert!(healthy(&self.agent).await);
        assert_eq!(self.local.handles().await, ["keeper"]);
        assert_eq!(
            std::fs::read(self.root.join("live/keeper/volume/keep.txt")).expect("keeper file"),
            b"precious"
        );
        for g in gone {
            assert!(
                !self.root.join("live").join(g).exists(),
                "{g} still in live/"
            );
        }
        assert!(entries(&self.root.join("dead")).is_empty());
        assert!(
            free_after >= self.free_full + self.written * 9 / 10,
            "space not freed: {} -> {free_after} bytes free after removing {} bytes",
            self.free_full,
            self.written
        );
        free_after
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_disk_still_destroys_volumes_the_central_side_names() {
    let Some(fd) = FullDisk::new("full_disk_still_destroys_volumes_the_central_side_names").await
    else {
        return;
    };
    let doomed: Vec<&str> = fd.fills.iter().map(String::as_str).collect();
    fd.script.set(&[("keeper", None)], &doomed);
    eventually("the named filling volumes are destroyed", || async {
        let have = fd.local.handles().await;
        doomed.iter().all(|d| !have.iter().any(|x| x == d))
    })
    .await;
    eventually("the destroys are reported", || async {
        let reported = destroyed(&fd.server).await;
        doomed.iter().all(|d| reported.iter().any(|x| x == d))
    })
    .await;
    let free_after = fd.check_freed(&doomed).await;
    eprintln!(
        "full disk (central names them) figures: tmpfs {} bytes, {} volumes filled with {} bytes, \
         free at ENOSPC={} bytes, free after destroys={free_after} bytes, filling stopped by create error: {:?}",
        fd.total,
        fd.fills.len(),
        fd.written,
        fd.free_full,
        fd.stopped_by
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_disk_local_api_destroys_free_space_and_the_agent_lives() {
    let Some(fd) =
        FullDisk::new("full_disk_local_api_destroys_free_space_and_the_agent_lives").await
    else {
        return;
    };
    // One more create on the full disk: refused or not, the agent must live on.
    let extra = try_create_empty(&fd.local, "one-more").await;
    running_pid(&fd.agent);
    assert!(
        healthy(&fd.agent).await,
        "healthz after a create on a full disk"
    );
    let mut doomed: Vec<&str> = fd.fills.iter().map(String::as_str).collect();
    if extra.is_ok() {
        doomed.push("one-more");
    }
    let mut statuses = Vec::new();
    for d in &doomed {
        let resp = fd
            .local
            .http
            .delete(format!("{}/volumes/{d}", fd.local.base))
            .send()
            .await
            .expect("delete request");
        statuses.push(resp.status().as_u16());
        assert_eq!(
            resp.status(),
            204,
            "DELETE {d} on a full disk: {}",
            resp.text().await.unwrap_or_default()
        );
    }
    let free_after = fd.check_freed(&doomed).await;
    eprintln!(
        "full disk (local API) figures: tmpfs {} bytes, {} volumes filled with {} bytes, \
         free at ENOSPC={} bytes, free after destroys={free_after} bytes, create on the full disk: {}, \
         filling stopped by create error: {:?}",
        fd.total,
        fd.fills.len(),
        fd.written,
        fd.free_full,
        match &extra {
            Ok(_) => "accepted".to_string(),
            Err(e) => format!("refused ({e})"),
        },
        fd.stopped_by
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answer_refused_on_a_full_disk_is_applied_once_space_is_back() {
    let Some(fd) =
        FullDisk::new("answer_refused_on_a_full_disk_is_applied_once_space_is_back").await
    else {
        return;
    };
    let (last, named) = fd.fills.split_last().expect("at least one filling volume");
    let named: Vec<&str> = named.iter().map(String::as_str).collect();
    fd.script.set(&[("keeper", None)], &named);
    let revision = fd.script.with(|s| s.revision);
    // Let it see the answer on the full disk, then free space another way.
    eventually("the answer is fetched", || async {
        requests_to(&fd.server, "/volumes/desired")
            .await
            .iter()
            .any(|r| {
                r.headers.get("if-none-match").and_then(|v| v.to_str().ok())
                    == Some(&format!("\"{revision}\""))
            })
    })
    .await;
    let resp = fd
        .local
        .http
        .delete(format!("{}/volumes/{last}", fd.local.base))
        .send()
        .await
        .expect("delete request");
    assert_eq!(resp.status(), 204);
    // The same answer (same revision, 304s from now on) must still be acted on.
    eventually(
        "the named volumes are destroyed without a new revision",
        || async {
            let have = fd.local.handles().await;
            named.iter().all(|d| !have.iter().any(|x| x == d))
        },
    )
    .await;
    let mut gone = named.clone();
    gone.push(last);
    fd.check_freed(&gone).await;
}
