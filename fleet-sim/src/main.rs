//! `fleet-sim --scenario steady|replica-restart|pg-outage|mass-release|million-rows`:
//! see the README's "Scaling" section.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use fleet_sim::{Options, Scenario};

/// Simulates a fleet of volume-agent workers against volume-central replicas on one
/// PostgreSQL; prints figures, checks invariants, draws a PNG per scenario.
#[derive(Parser, Debug)]
#[command(version)]
struct Cli {
    /// steady, replica-restart, pg-outage, mass-release or million-rows.
    #[arg(long, default_value = "steady")]
    scenario: Scenario,
    /// Simulated workers (default 10,000).
    #[arg(long)]
    workers: Option<usize>,
    /// Volumes seeded on each worker, in chains of depth 5 (default 50; million-rows 100).
    #[arg(long)]
    volumes_per_worker: Option<usize>,
    /// The measured steady window, before the scenario's event.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "120s")]
    duration: Duration,
    /// The agents' poll interval (their report interval too).
    #[arg(long, value_parser = humantime::parse_duration, default_value = "30s")]
    poll_interval: Duration,
    /// The agents' longest backoff after errors.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "5m")]
    max_backoff: Duration,
    /// volume-central's GC interval.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "30s")]
    gc_interval: Duration,
    /// Scheduler churn: volumes created (and as many released) per second.
    #[arg(long, default_value_t = 100.0)]
    churn: f64,
    /// How long a build keeps its volumes.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "60s")]
    build_lifetime: Duration,
    /// How long a replica, every replica, or PostgreSQL stays down.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "60s")]
    down: Duration,
    /// Volumes released at once in mass-release.
    #[arg(long, default_value_t = 100_000)]
    release_volumes: usize,
    /// volume-central replicas, in this process, on one database.
    #[arg(long, default_value_t = 2)]
    replicas: usize,
    /// Database connections per replica.
    #[arg(long, default_value_t = 16)]
    pool_size: usize,
    /// HTTP worker threads per replica.
    #[arg(long, default_value_t = 1)]
    http_workers: usize,
    /// A PostgreSQL database to use (its schema is migrated) instead of a throwaway
    /// cluster; pg-outage needs the throwaway cluster.
    #[arg(long)]
    database_url: Option<String>,
    /// `shared_buffers` of the throwaway PostgreSQL cluster (size it for the volumes
    /// table and its indexes: about 400 MB per 1,000,000 rows).
    #[arg(long, default_value = "1GB")]
    pg_shared_buffers: String,
    /// Real volume-agent processes to run beside the simulated workers (each on its own
    /// temporary volumes root, with builds made on it and checked gone from disk).
    #[arg(long, default_value_t = 0)]
    real_agents: usize,
    /// The volume-agent binary for --real-agents (default: the one beside fleet-sim).
    #[arg(long)]
    agent_binary: Option<PathBuf>,
    /// Directory for the PNG, CSV and event marks.
    #[arg(long, default_value = "fleet-sim-out")]
    out: PathBuf,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let mut o = Options::new(cli.scenario);
    if let Some(w) = cli.workers {
        o.workers = w;
    }
    if let Some(v) = cli.volumes_per_worker {
        o.volumes_per_worker = v;
    }
    o.duration = cli.duration;
    o.poll_interval = cli.poll_interval;
    o.report_interval = cli.poll_interval;
    o.max_backoff = cli.max_backoff;
    o.gc_interval = cli.gc_interval;
    o.churn = cli.churn;
    o.build_lifetime = cli.build_lifetime;
    o.down = cli.down;
    o.release_volumes = cli.release_volumes;
    o.replicas = cli.replicas;
    o.pool_size = cli.pool_size;
    o.http_workers = cli.http_workers;
    o.database_url = cli.database_url;
    o.pg_shared_buffers = cli.pg_shared_buffers;
    o.out = Some(cli.out);
    o.real_agents = cli.real_agents;
    o.agent_binary = cli.agent_binary;
    match fleet_sim::run(o) {
        Ok(out) if out.violation_count == 0 => ExitCode::SUCCESS,
        Ok(out) => {
            eprintln!("{} invariant violations:", out.violation_count);
            for v in &out.violations {
                eprintln!("  {v}");
            }
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("fleet-sim: {e:#}");
            ExitCode::FAILURE
        }
    }
}
