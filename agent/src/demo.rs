//! `volume-agent demo`: the whole loop on one machine with nothing else running. A
//! built-in central API (native dialect, in memory) and the real agent on a temporary
//! volumes root: volumes are created through the local API, the central side marks a
//! chain for destruction, the agent destroys it child first and reports it.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use actix_web::{web, App, HttpRequest, HttpResponse, HttpServer};
use protocol::local::{CreateVolumeRequest, SetStateRequest, Strategy, VolumeJson};
use protocol::native::{DesiredSet, DesiredVolume, ResourceTypesReport, VolumeReport};
use protocol::{Handle, VolumeState};

use crate::config::{Config, DriverName};
use crate::daemon;

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("demo: {0}")]
    Failed(String),
    #[error(transparent)]
    Daemon(#[from] daemon::DaemonError),
    #[error("demo: {0}")]
    Io(#[from] std::io::Error),
}

fn failed(e: impl std::fmt::Display) -> DemoError {
    DemoError::Failed(e.to_string())
}

/// The built-in central API's memory.
#[derive(Default)]
struct Central {
    revision: u64,
    keep: Vec<DesiredVolume>,
    destroying: Vec<Handle>,
    reports: Vec<VolumeReport>,
    resource_types: Option<ResourceTypesReport>,
}

type Shared = Arc<Mutex<Central>>;

fn lock(s: &Shared) -> std::sync::MutexGuard<'_, Central> {
    s.lock().unwrap_or_else(|p| p.into_inner())
}

async fn desired(
    state: web::Data<Shared>,
    req: HttpRequest,
    path: web::Path<String>,
) -> HttpResponse {
    let c = lock(&state);
    let etag = format!("\"{}\"", c.revision);
    if req
        .headers()
        .get("if-none-match")
        .and_then(|v| v.to_str().ok())
        == Some(etag.as_str())
    {
        return HttpResponse::NotModified().finish();
    }
    HttpResponse::Ok()
        .insert_header(("ETag", etag))
        .json(DesiredSet {
            worker: path.into_inner(),
            revision: c.revision,
            as_of: chrono::Utc::now(),
            volumes: c.keep.clone(),
            destroying: c.destroying.clone(),
        })
}

async fn report(state: web::Data<Shared>, body: web::Json<VolumeReport>) -> HttpResponse {
    let report = body.into_inner();
    if !report.destroyed.is_empty() {
        let names: Vec<&str> = report.destroyed.iter().map(Handle::as_str).collect();
        println!(
            "  central: the agent reports destroyed: {}",
            names.join(", ")
        );
    }
    let mut c = lock(&state);
    c.destroying.retain(|h| !report.destroyed.contains(h));
    c.reports.push(report);
    HttpResponse::NoContent().finish()
}

async fn resource_types(
    state: web::Data<Shared>,
    body: web::Json<ResourceTypesReport>,
) -> HttpResponse {
    let r = body.into_inner();
    for t in &r.resource_types {
        println!(
            "  central: worker reports resource type {} {}",
            t.name, t.version
        );
    }
    lock(&state).resource_types = Some(r);
    HttpResponse::NoContent().finish()
}

fn h(s: &str) -> Result<Handle, DemoError> {
    Handle::new(s).map_err(failed)
}

/// Runs the demo; `keep` leaves the temporary directory behind.
pub fn run(keep: bool) -> Result<(), DemoError> {
    let tmp = tempfile::Builder::new()
        .prefix("volume-agent-demo-")
        .tempdir()?;
    let root = tmp.path().to_owned();
    let result = actix::System::new().block_on(demo(root.clone()));
    if keep {
        let kept = tmp.keep();
        println!("kept {}", kept.display());
    }
    result
}

async fn demo(root: std::path::PathBuf) -> Result<(), DemoError> {
    let started = Instant::now();
    let shared: Shared = Arc::new(Mutex::new(Central {
        revision: 1,
        ..Central::default()
    }));
    let data = web::Data::new(shared.clone());
    let server = HttpServer::new(move || {
        App::new()
            .app_data(data.clone())
            .route(
                "/api/v1/workers/{w}/volumes/desired",
                web::get().to(desired),
            )
            .route("/api/v1/workers/{w}/volumes/report", web::put().to(report))
            .route(
                "/api/v1/workers/{w}/base-resource-types",
                web::put().to(resource_types),
            )
    })
    .workers(1)
    .disable_signals()
    .bind("127.0.0.1:0")?;
    let central_addr = server.addrs()[0];
    let server = server.run();
    let server_handle = server.handle();
    actix_rt::spawn(server);

    let types = root.join("resource-types/git");
    std::fs::create_dir_all(&types)?;
    std::fs::write(
        types.join("resource_metadata.json"),
        r#"{"type":"git","version":"1.17.0","privileged":false,"unique_version_history":false}"#,
    )?;
    std::fs::write(types.join("rootfs.tgz"), b"")?;

    let text = format!(
        "worker_name = \"demo-worker\"\n[central]\nurl = \"http://{central_addr}\"\npoll_interval = \"1s\"\nreport_interval = \"2s\"\n\
         [volumes]\nroot = {:?}\ndriver = \"naive\"\n[state]\ndir = {:?}\n[api]\nlisten = \"127.0.0.1:0\"\n\
         [resource_types]\ndir = {:?}\nrescan_interval = \"1s\"\n",
        root.join("volumes"),
        root.join("state"),
        root.join("resource-types"),
    );
    let config =
        Config::parse(&text, std::path::Path::new("demo.toml"), Vec::new()).map_err(failed)?;
    debug_assert_eq!(config.volumes.driver, DriverName::Naive);
    println!("== volume-agent demo in {}", root.display());
    println!("   built-in central API at http://{central_addr}");
    let agent = daemon::start(&config).await?;
    let api = agent.api.api_base();
    println!("   agent local API at {api}\n");

    let http = reqwest::Client::new();
    println!("== 1. a build creates volumes through the local API: base <- child <- grandchild, and cache");
    let mut chain: Vec<(&str, Option<&str>)> = vec![
        ("base", None),
        ("child", Some("base")),
        ("grandchild", Some("child")),
    ];
    chain.push(("cache", None));
    for (name, parent) in &chain {
        let strategy = match parent {
            None => Strategy::Empty,
            Some(p) => Strategy::Cow { volume: h(p)? },
        };
        let req = CreateVolumeRequest {
            handle: h(name)?,
            strategy,
            properties: [("demo".to_string(), "yes".to_string())].into(),
            privileged: false,
            ttl: None,
        };
        let resp = http
            .post(format!("{api}/volumes"))
            .json(&req)
            .send()
            .await
            .map_err(failed)?;
        if !resp.status().is_success() {
            return Err(failed(format!(
                "create {name}: {}",
                resp.text().await.unwrap_or_default()
            )));
        }
        let v: VolumeJson = resp.json().await.map_err(failed)?;
        std::fs::write(
            std::path::Path::new(&v.path).join(format!("{name}.txt")),
            name,
        )?;
        let resp = http
            .put(format!("{api}/volumes/{name}/state"))
            .json(&SetStateRequest {
                state: VolumeState::Initialized,
            })
            .send()
            .await
            .map_err(failed)?;
        if !resp.status().is_success() {
            return Err(failed(format!("initialize {name}: {}", resp.status())));
        }
        lock(&shared).keep.push(DesiredVolume {
            handle: h(name)?,
            parent: parent.map(h).transpose()?,
        });
    }
    {
        let mut c = lock(&shared);
        c.revision = 2;
    }
    let vols: Vec<VolumeJson> = http
        .get(format!("{api}/volumes"))
        .send()
        .await
        .map_err(failed)?
        .json()
        .await
        .map_err(failed)?;
    print!("{}", crate::ctl::volumes_table(&vols, &Default::default()));

    println!("\n== 2. the central side marks the whole chain destroying (revision 3)");
    {
        let mut c = lock(&shared);
        c.keep.retain(|v| v.handle.as_str() == "cache");
        c.destroying = vec![h("base")?, h("child")?, h("grandchild")?];
        c.revision = 3;
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let vols: Vec<VolumeJson> = http
            .get(format!("{api}/volumes"))
            .send()
            .await
            .map_err(failed)?
            .json()
            .await
            .map_err(failed)?;
        let reported = lock(&shared).destroying.is_empty();
        if vols.len() == 1 && reported {
            println!("\n   left on the worker:");
            print!("{}", crate::ctl::volumes_table(&vols, &Default::default()));
            break;
        }
        if Instant::now() > deadline {
            return Err(failed("the chain was not destroyed within 30 s"));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    println!("\n== 3. metrics (GET {api}/metrics, excerpt)");
    let text = http
        .get(format!("{api}/metrics"))
        .send()
        .await
        .map_err(failed)?
        .text()
        .await
        .map_err(failed)?;
    for line in text.lines().filter(|l| {
        !l.starts_with('#')
            && (l.starts_with("volume_agent_volumes")
                || l.starts_with("volume_agent_destroys_total")
                || l.starts_with("volume_agent_desired_revision")
                || l.starts_with("volume_agent_central_requests_total")
                || l.starts_with("volume_agent_resource_type_info"))
    }) {
        println!("   {line}");
    }
    agent.shutdown().await?;
    server_handle.stop(true).await;
    println!("\n== done in {:.1} s", started.elapsed().as_secs_f64());
    Ok(())
}
