//! The command line. `run` starts the daemon; the other commands talk to the running
//! daemon's local API (sled allows one process), except `config check`.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::config::LogFormat;

/// Default config path (the packaged one).
pub const DEFAULT_CONFIG: &str = "/etc/volume-agent/config.toml";

#[derive(Debug, Parser)]
#[command(
    name = "volume-agent",
    version,
    about = "Keeps a CI worker's volumes in step with the central database: children before parents, crash safe.",
    propagate_version = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormatArg {
    Human,
    Json,
}

impl From<LogFormatArg> for LogFormat {
    fn from(f: LogFormatArg) -> Self {
        match f {
            LogFormatArg::Human => LogFormat::Human,
            LogFormatArg::Json => LogFormat::Json,
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon.
    Run {
        #[arg(long, short, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        /// Log format (overrides `log.format`).
        #[arg(long, value_enum)]
        log_format: Option<LogFormatArg>,
    },
    /// A local demo on embedded defaults: a temporary volumes root and a built-in central
    /// API; shows volumes created, a chain destroyed child first, and the metrics.
    Demo {
        /// Keep the temporary directory for inspection.
        #[arg(long)]
        keep: bool,
    },
    /// Inspect volumes through the running daemon.
    Volumes {
        #[command(subcommand)]
        command: VolumesCommand,
        #[command(flatten)]
        target: Target,
    },
    /// Garbage collection through the running daemon.
    Gc {
        #[command(subcommand)]
        command: GcCommand,
        #[command(flatten)]
        target: Target,
    },
    /// Configuration.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Generate man pages or shell completions (used by packaging).
    #[command(hide = true)]
    Generate {
        #[command(subcommand)]
        what: GenerateCommand,
    },
}

/// Which daemon to talk to.
#[derive(Debug, Args)]
pub struct Target {
    /// The daemon's local API, e.g. http://127.0.0.1:7788 or unix:/run/volume-agent/api.sock
    /// (default: `api.listen` of the config).
    #[arg(long, global = true)]
    pub api: Option<String>,
    /// Config file to read `api.listen` from.
    #[arg(long, short, global = true, default_value = DEFAULT_CONFIG)]
    pub config: PathBuf,
    /// Print JSON instead of a table.
    #[arg(long, global = true)]
    pub json: bool,
}

#[derive(Debug, Subcommand)]
pub enum VolumesCommand {
    /// List the volumes.
    List,
    /// Show one volume.
    Inspect { handle: String },
}

#[derive(Debug, Subcommand)]
pub enum GcCommand {
    /// What the next pass would destroy and why; destroys nothing.
    Plan,
    /// Forget the highest applied desired-set revision (after the central database was
    /// restored from a backup). Destroys nothing by itself.
    ResetRevision,
}

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Check a config file and print the effective configuration.
    Check {
        #[arg(long, short, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
pub enum GenerateCommand {
    /// Write man pages into DIR.
    Manpages { dir: PathBuf },
    /// Write bash, zsh and fish completions into DIR.
    Completions { dir: PathBuf },
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn parses_the_operator_commands() {
        for args in [
            vec!["volume-agent", "run", "--config", "/x.toml"],
            vec!["volume-agent", "volumes", "list"],
            vec![
                "volume-agent",
                "volumes",
                "inspect",
                "h1",
                "--api",
                "http://127.0.0.1:1",
            ],
            vec!["volume-agent", "gc", "plan"],
            vec!["volume-agent", "gc", "reset-revision"],
            vec!["volume-agent", "config", "check", "--config", "/x.toml"],
            vec!["volume-agent", "demo"],
        ] {
            Cli::try_parse_from(&args).unwrap_or_else(|e| panic!("{args:?}: {e}"));
        }
    }
}
