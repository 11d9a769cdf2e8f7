//! Man pages and shell completions generated from the CLI definition, for the packages.
//!
//! The binary exposes these as hidden subcommands (`volume-agent generate manpages DIR`,
//! `volume-agent generate completions DIR`); `packaging/build.sh` runs them on the built
//! binary so the pages and completions always match the CLI that ships.

use std::fs;
use std::io;
use std::path::Path;

use clap_complete::Shell;

/// The shells [`write_completions`] writes a file for.
pub const SHELLS: [Shell; 3] = [Shell::Bash, Shell::Zsh, Shell::Fish];

/// Writes roff man pages (section 1) into `dir`, creating it if needed: `NAME.1` for the
/// command and `NAME-SUB.1` for every visible subcommand, nested ones included
/// (`NAME-SUB-SUBSUB.1`). Hidden subcommands and clap's `help` subcommand get no page.
pub fn write_manpages(cmd: clap::Command, dir: &Path) -> io::Result<()> {
    fs::create_dir_all(dir).map_err(|e| with_path(e, "create the man page directory", dir))?;
    clap_mangen::generate_to(cmd, dir).map_err(|e| with_path(e, "write man pages into", dir))
}

/// Writes completion scripts for bash (`BIN.bash`), zsh (`_BIN`) and fish (`BIN.fish`) into
/// `dir`, creating it if needed. `bin_name` is the name users type.
pub fn write_completions(mut cmd: clap::Command, bin_name: &str, dir: &Path) -> io::Result<()> {
    fs::create_dir_all(dir).map_err(|e| with_path(e, "create the completions directory", dir))?;
    for shell in SHELLS {
        clap_complete::generate_to(shell, &mut cmd, bin_name, dir)
            .map_err(|e| with_path(e, &format!("write {shell} completions into"), dir))?;
    }
    Ok(())
}

fn with_path(err: io::Error, what: &str, dir: &Path) -> io::Error {
    io::Error::new(
        err.kind(),
        format!("cannot {what} {}: {err}", dir.display()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{Arg, Command};

    fn sample() -> Command {
        Command::new("sample-tool")
            .version("1.2.3")
            .about("Does sample things")
            .subcommand(
                Command::new("volumes")
                    .about("Inspects volumes")
                    .subcommand(Command::new("list").about("Lists volumes"))
                    .subcommand(
                        Command::new("inspect")
                            .about("Shows one volume")
                            .arg(Arg::new("handle").required(true)),
                    ),
            )
            .subcommand(
                Command::new("run").about("Runs the daemon").arg(
                    Arg::new("config")
                        .long("config")
                        .value_name("FILE")
                        .help("Path of the configuration file"),
                ),
            )
            .subcommand(Command::new("generate").hide(true))
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .expect("read output dir")
            .map(|e| {
                e.expect("dir entry")
                    .file_name()
                    .into_string()
                    .expect("utf-8")
            })
            .collect();
        names.sort();
        names
    }

    #[test]
    fn writes_one_man_page_per_visible_command() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("man/man1");
        write_manpages(sample(), &dir).expect("write man pages");

        assert_eq!(
            names(&dir),
            [
                "sample-tool-run.1",
                "sample-tool-volumes-inspect.1",
                "sample-tool-volumes-list.1",
                "sample-tool-volumes.1",
                "sample-tool.1",
            ]
        );
        let top = fs::read_to_string(dir.join("sample-tool.1")).expect("read page");
        assert!(top.starts_with(".ie"), "roff page: {top}");
        assert!(top.contains(".TH sample-tool 1"), "{top}");
        assert!(top.contains("Does sample things"), "{top}");
        let run = fs::read_to_string(dir.join("sample-tool-run.1")).expect("read page");
        assert!(run.contains("config"), "{run}");
        assert!(run.contains("Path of the configuration file"), "{run}");
    }

    #[test]
    fn writes_bash_zsh_and_fish_completions() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("completions");
        write_completions(sample(), "sample-tool", &dir).expect("write completions");

        assert_eq!(
            names(&dir),
            ["_sample-tool", "sample-tool.bash", "sample-tool.fish"]
        );
        let bash = fs::read_to_string(dir.join("sample-tool.bash")).expect("bash");
        assert!(bash.contains("complete -F _sample__tool"), "{bash}");
        assert!(bash.contains("volumes"), "{bash}");
        let zsh = fs::read_to_string(dir.join("_sample-tool")).expect("zsh");
        assert!(zsh.starts_with("#compdef sample-tool"), "{zsh}");
        let fish = fs::read_to_string(dir.join("sample-tool.fish")).expect("fish");
        assert!(fish.contains("complete -c sample-tool"), "{fish}");
        assert!(fish.contains("-l config"), "{fish}");
    }

    #[test]
    fn unwritable_directory_is_reported_with_its_path() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let blocker = tmp.path().join("a-file");
        fs::write(&blocker, b"not a directory").expect("write file");
        let err = write_manpages(sample(), &blocker.join("man1")).expect_err("parent is a file");
        assert!(err.to_string().contains("a-file"), "{err}");
        let err = write_completions(sample(), "sample-tool", &blocker).expect_err("is a file");
        assert!(err.to_string().contains("a-file"), "{err}");
    }
}
