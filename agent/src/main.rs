// The `volume-agent` binary: parses the command line and hands over to the library.
// Errors print one line and exit non-zero.

use anyhow::Context as _;
use clap::Parser;
use volume_agent::cli::{Cli, Command, ConfigCommand, GcCommand, GenerateCommand, VolumesCommand};
use volume_agent::config::Config;
use volume_agent::ctl::{self, Ctl};
use volume_agent::{daemon, demo, logging};

fn main() {
    let cli = Cli::parse();
    if let Err(e) = dispatch(cli) {
        eprintln!("volume-agent: error: {e:#}");
        // 78 (EX_CONFIG): the unit's RestartPreventExitStatus, so a bad config is not
        // restarted in a loop.
        let config_error = e
            .downcast_ref::<volume_agent::config::ConfigError>()
            .is_some();
        std::process::exit(if config_error { 78 } else { 1 });
    }
}

fn dispatch(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Run { config, log_format } => {
            let cfg = Config::load(&config, std::env::vars())?;
            let format = log_format.map(Into::into).unwrap_or(cfg.log.format);
            logging::init(&cfg.log.level, format);
            daemon::run(cfg)?;
            Ok(())
        }
        Command::Demo { keep } => {
            logging::init(
                "info,actix_server=warn",
                volume_agent::config::LogFormat::Human,
            );
            demo::run(keep)?;
            Ok(())
        }
        Command::Config {
            command: ConfigCommand::Check { config },
        } => {
            let cfg = Config::load(&config, std::env::vars())?;
            if let Some(path) = &cfg.central.token_file {
                std::fs::metadata(path)
                    .with_context(|| format!("central.token_file {}", path.display()))?;
            }
            println!("{}: ok", config.display());
            print!("{}", toml::to_string_pretty(&cfg)?);
            Ok(())
        }
        Command::Volumes { command, target } => {
            let ctl = Ctl::new(ctl::api_base(target.api.as_deref(), &target.config))?;
            let rt = tokio::runtime::Runtime::new()?;
            match command {
                VolumesCommand::List => {
                    let vols = rt.block_on(ctl.list())?;
                    if target.json {
                        println!("{}", serde_json::to_string_pretty(&vols)?);
                    } else {
                        let usage = rt.block_on(ctl.usage()).unwrap_or_default();
                        print!("{}", ctl::volumes_table(&vols, &usage));
                    }
                }
                VolumesCommand::Inspect { handle } => {
                    protocol::Handle::new(handle.as_str())?;
                    let v = rt.block_on(ctl.inspect(&handle))?;
                    println!("{}", serde_json::to_string_pretty(&v)?);
                }
            }
            Ok(())
        }
        Command::Gc { command, target } => {
            let ctl = Ctl::new(ctl::api_base(target.api.as_deref(), &target.config))?;
            let rt = tokio::runtime::Runtime::new()?;
            match command {
                GcCommand::Plan => {
                    let plan = rt.block_on(ctl.plan())?;
                    if target.json {
                        println!("{}", serde_json::to_string_pretty(&plan)?);
                    } else {
                        print!("{}", ctl::plan_table(&plan));
                    }
                }
                GcCommand::ResetRevision => {
                    rt.block_on(ctl.reset_revision())?;
                    println!("forgot the highest applied revision; the next answer is accepted whatever its revision");
                }
            }
            Ok(())
        }
        Command::Generate { what } => generate(what),
    }
}

fn generate(what: GenerateCommand) -> anyhow::Result<()> {
    use clap::CommandFactory;
    let cmd = Cli::command();
    match what {
        GenerateCommand::Manpages { dir } => volume_agent::generate::write_manpages(cmd, &dir)
            .with_context(|| format!("writing man pages to {}", dir.display())),
        GenerateCommand::Completions { dir } => {
            volume_agent::generate::write_completions(cmd, "volume-agent", &dir)
                .with_context(|| format!("writing completions to {}", dir.display()))
        }
    }
}
