//! The `volume-central` binary: a thin shell over the library.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use volume_central::auth::{self, Subject};
use volume_central::{ctl, Config, ConfigError, Db, RunOptions, StartError};

#[derive(Parser)]
#[command(
    name = "volume-central",
    version,
    about = "The central volume service on PostgreSQL"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the API and run the GC loop (after the database answers with a current schema).
    Run {
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        /// Apply pending migrations first, as `migrate` would (what the systemd unit does).
        #[arg(long)]
        migrate: bool,
    },
    /// Apply pending database migrations (idempotent) and exit.
    Migrate {
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Each worker: volumes, bytes, free disk, pressure, last report, revision lag.
    Workers {
        #[command(flatten)]
        api: ApiArgs,
    },
    /// The volumes of one worker and what keeps each.
    Volumes {
        #[arg(long, value_name = "NAME")]
        worker: String,
        /// Each child indented under its parent.
        #[arg(long)]
        tree: bool,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Why a volume is kept (every owner), or why it is garbage and since when.
    Why {
        #[arg(value_name = "HANDLE")]
        handle: String,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Issue, list and revoke credentials (in the database of the config).
    Credentials {
        #[arg(long, value_name = "FILE", global = true)]
        config: Option<PathBuf>,
        #[command(subcommand)]
        command: Credentials,
    },
    /// Files for the packages, generated from this CLI.
    #[command(hide = true)]
    Generate {
        #[command(subcommand)]
        what: Generate,
    },
}

#[derive(Subcommand)]
enum Generate {
    /// Write the man pages (`volume-central.1` and one per subcommand) into DIR.
    Manpages {
        #[arg(value_name = "DIR")]
        dir: PathBuf,
    },
}

/// Where the operator's commands find a replica, and how they answer.
#[derive(Args)]
struct ApiArgs {
    /// A replica's base URL. (No environment variable: `VOLUME_CENTRAL_*` variables are
    /// the service's config overrides.)
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    url: String,
    /// File holding an operator (or scheduler) token, where credentials are on.
    #[arg(long, value_name = "FILE")]
    token_file: Option<PathBuf>,
    /// Print the API's JSON answer instead of a table.
    #[arg(long)]
    json: bool,
}

impl ApiArgs {
    fn ctl(&self) -> anyhow::Result<ctl::Ctl> {
        Ok(ctl::Ctl::new(&self.url, self.token_file.as_deref())?)
    }
}

fn print_json(v: &impl serde::Serialize) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

#[derive(Subcommand)]
enum Credentials {
    /// Issue a credential and print its token once (stdout); only its hash is stored.
    Issue(IssueFor),
    /// List every credential (id, kind, worker, created, last used, revoked); never tokens.
    List,
    /// Revoke a credential by id; every replica refuses it within `credential_cache`.
    Revoke {
        #[arg(value_name = "ID")]
        id: i64,
    },
}

#[derive(Args)]
#[group(required = true, multiple = false)]
struct IssueFor {
    /// For the agent of this worker (registers the worker when it is new).
    #[arg(long, value_name = "NAME")]
    worker: Option<String>,
    /// For the scheduler (the scheduler routes).
    #[arg(long)]
    scheduler: bool,
    /// For an operator (read-only views).
    #[arg(long)]
    operator: bool,
}

impl IssueFor {
    fn subject(self) -> Subject {
        match (self.worker, self.scheduler) {
            (Some(w), _) => Subject::Worker(w),
            (None, true) => Subject::Scheduler,
            (None, false) => Subject::Operator,
        }
    }
}

fn describe(c: &auth::Credential) -> String {
    match &c.worker {
        Some(w) => format!("credential {} (worker {w})", c.id),
        None => format!("credential {} ({})", c.id, c.kind.as_str()),
    }
}

async fn credentials(config: &Config, command: Credentials) -> anyhow::Result<()> {
    let db = Db::connect(&config.resolve_database_url()?, 2)?;
    volume_central::migrate::check_current(&db).await?;
    match command {
        Credentials::Issue(what) => {
            let issued = auth::issue(&db, &what.subject()).await?;
            eprintln!(
                "issued {}; the token below is shown only this once, store it now (mode 0600):",
                describe(&issued.credential)
            );
            println!("{}", issued.token);
        }
        Credentials::List => {
            let fmt_time = |t: Option<chrono::DateTime<chrono::Utc>>| {
                t.map(|t| t.format("%Y-%m-%dT%H:%M:%SZ").to_string())
                    .unwrap_or_else(|| "-".into())
            };
            println!(
                "{:>6}  {:<9}  {:<20}  {:<20}  {:<20}  REVOKED",
                "ID", "KIND", "WORKER", "CREATED", "LAST USED"
            );
            for c in auth::list(&db).await? {
                println!(
                    "{:>6}  {:<9}  {:<20}  {:<20}  {:<20}  {}",
                    c.id,
                    c.kind.as_str(),
                    c.worker.as_deref().unwrap_or("-"),
                    fmt_time(Some(c.created_at)),
                    fmt_time(c.last_used_at),
                    fmt_time(c.revoked_at)
                );
            }
        }
        Credentials::Revoke { id } => {
            let c = auth::revoke(&db, id).await?;
            println!(
                "revoked {}; every replica refuses its token within credential_cache ({})",
                describe(&c),
                humantime::format_duration(config.credential_cache)
            );
        }
    }
    Ok(())
}

fn main() {
    if let Err(err) = dispatch(Cli::parse()) {
        eprintln!("volume-central: error: {err:#}");
        // EX_CONFIG: the unit's RestartPreventExitStatus; restarting cannot fix the config.
        let config_error = err.downcast_ref::<ConfigError>().is_some()
            || err
                .downcast_ref::<StartError>()
                .is_some_and(StartError::is_config);
        std::process::exit(if config_error {
            volume_central::EX_CONFIG
        } else {
            1
        });
    }
}

fn dispatch(cli: Cli) -> anyhow::Result<()> {
    let runtime = || tokio::runtime::Runtime::new().context("cannot start the tokio runtime");
    if !matches!(cli.command, Command::Run { .. }) {
        // `run` logs as its config says; the other commands as the default does.
        volume_central::logging::init(&Default::default());
    }
    match cli.command {
        Command::Run { config, migrate } => {
            let config = Config::load(&config)?;
            volume_central::logging::init(&config.log);
            let grace = config.shutdown_timeout;
            let runtime = runtime()?;
            let result = runtime.block_on(volume_central::run(config, RunOptions { migrate }));
            // Work cut off at the stop (a report still decoding) gets one more second.
            runtime.shutdown_timeout(grace.min(std::time::Duration::from_secs(1)));
            result?;
        }
        Command::Migrate { config } => {
            let config = Config::load(&config)?;
            let applied = runtime()?.block_on(volume_central::migrate(&config))?;
            if applied.is_empty() {
                println!(
                    "schema is current (migration {})",
                    volume_central::migrate::latest_version()
                );
            } else {
                println!("applied migrations {applied:?}");
            }
        }
        Command::Workers { api } => {
            let workers = runtime()?.block_on(api.ctl()?.workers())?;
            if api.json {
                print_json(&workers)?;
            } else {
                print!("{}", ctl::workers_text(&workers, chrono::Utc::now()));
            }
        }
        Command::Volumes { worker, tree, api } => {
            let volumes = runtime()?.block_on(api.ctl()?.volumes(&worker))?;
            if api.json {
                print_json(&volumes)?;
            } else {
                print!("{}", ctl::volumes_text(&volumes, tree));
            }
        }
        Command::Why { handle, api } => {
            let why = runtime()?.block_on(api.ctl()?.why(&handle))?;
            if api.json {
                print_json(&why)?;
            } else {
                print!("{}", ctl::why_text(&why));
            }
        }
        Command::Credentials { config, command } => {
            let path = config.context(
                "credentials needs the service's config to find the database: pass --config FILE",
            )?;
            let config = Config::load(&path)?;
            runtime()?.block_on(credentials(&config, command))?;
        }
        Command::Generate {
            what: Generate::Manpages { dir },
        } => generate_manpages(&dir)?,
    }
    Ok(())
}

/// The man pages of this CLI, from its clap definition (hidden commands get none).
fn generate_manpages(dir: &std::path::Path) -> anyhow::Result<()> {
    use clap::CommandFactory as _;
    std::fs::create_dir_all(dir)
        .with_context(|| format!("cannot create the man page directory {}", dir.display()))?;
    clap_mangen::generate_to(Cli::command(), dir)
        .with_context(|| format!("cannot write man pages into {}", dir.display()))
}
