//! The `volume-central` binary: a thin shell over the library.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use volume_central::Config;

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
    /// Serve the API and run the GC loop.
    Run {
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Apply pending database migrations (idempotent) and exit.
    Migrate {
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
    },
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let cli = Cli::parse();
    let runtime = tokio::runtime::Runtime::new().context("cannot start the tokio runtime")?;
    match cli.command {
        Command::Run { config } => {
            let config = Config::load(&config)?;
            runtime.block_on(volume_central::run(config))?;
        }
        Command::Migrate { config } => {
            let config = Config::load(&config)?;
            let applied = runtime.block_on(volume_central::migrate(&config))?;
            if applied.is_empty() {
                println!(
                    "schema is current (migration {})",
                    volume_central::migrate::latest_version()
                );
            } else {
                println!("applied migrations {applied:?}");
            }
        }
    }
    Ok(())
}
