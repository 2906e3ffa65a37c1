//! `pitr completions SHELL` and `pitr man`: shell completion scripts and manual pages, both
//! generated from the command-line definition itself (so they never drift from `--help`). Neither
//! needs a repository.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::CommandFactory;

use super::cli::Cli;

/// `pitr completions`.
#[derive(Debug, clap::Args)]
pub struct CompletionsArgs {
    /// The shell: bash, zsh, fish, elvish or powershell.
    #[arg(value_enum)]
    pub shell: clap_complete::Shell,
}

/// `pitr man`.
#[derive(Debug, clap::Args)]
pub struct ManArgs {
    /// Write `pitr.1` and one page per command (`pitr-backup.1`, …) into DIR (created if missing)
    /// instead of printing `pitr.1` on stdout.
    #[arg(long, value_name = "DIR")]
    pub dir: Option<PathBuf>,
}

/// Print the completion script for `args.shell` on stdout.
///
/// # Errors
/// stdout cannot be written.
pub fn completions(args: &CompletionsArgs) -> anyhow::Result<u8> {
    let mut cmd = Cli::command();
    let mut out = Vec::new();
    clap_complete::generate(args.shell, &mut cmd, "pitr", &mut out);
    std::io::stdout()
        .write_all(&out)
        .context("write the completion script to stdout")?;
    Ok(pitr::exit::SUCCESS)
}

/// Print `pitr.1`, or write every page into `args.dir`.
///
/// # Errors
/// The directory or a page cannot be written (named).
pub fn man(args: &ManArgs) -> anyhow::Result<u8> {
    let cmd = Cli::command();
    match &args.dir {
        None => {
            let mut out = Vec::new();
            clap_mangen::Man::new(cmd)
                .render(&mut out)
                .context("render the manual page")?;
            std::io::stdout()
                .write_all(&out)
                .context("write the manual page to stdout")?;
        }
        Some(dir) => {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("create the directory {}", dir.display()))?;
            write_pages(&cmd, "pitr", dir)?;
        }
    }
    Ok(pitr::exit::SUCCESS)
}

/// Write the page of `cmd` (named `name`: `pitr`, `pitr-key`, …) and of each of its
/// subcommands, recursively.
fn write_pages(cmd: &clap::Command, name: &str, dir: &Path) -> anyhow::Result<()> {
    let page = cmd.clone().name(name.to_string());
    let path = dir.join(format!("{name}.1"));
    let mut out = Vec::new();
    clap_mangen::Man::new(page)
        .render(&mut out)
        .with_context(|| format!("render {}", path.display()))?;
    pitr::durable::write_atomically(&path, &out)
        .with_context(|| format!("write {}", path.display()))?;
    for sub in cmd.get_subcommands().filter(|s| s.get_name() != "help") {
        write_pages(sub, &format!("{name}-{}", sub.get_name()), dir)?;
    }
    Ok(())
}
