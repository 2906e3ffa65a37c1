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
    /// roff (manual pages) or markdown (one `COMMAND.md` per command and a `README.md` index,
    /// the text of `--help`; needs --dir).
    #[arg(long, value_enum, default_value = "roff", requires = "dir")]
    pub format: PageFormat,
}

/// `pitr man --format`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum PageFormat {
    /// Manual pages.
    Roff,
    /// Markdown pages.
    Markdown,
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
            if args.format == PageFormat::Markdown {
                write_markdown(cmd, dir)?;
            } else {
                write_pages(&cmd, "pitr", dir)?;
            }
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

/// Write one markdown page per command (its `--help`, as `pitr COMMAND --help` prints it) and an
/// index, `README.md`.
fn write_markdown(mut cmd: clap::Command, dir: &Path) -> anyhow::Result<()> {
    cmd.build();
    let mut index = String::from(
        "# pitr commands\n\nGenerated from the command line itself (`pitr man --format markdown --dir docs/commands`): each page is the command's `--help`. The same text is in the manual pages (`man pitr-COMMAND`).\n\n",
    );
    let mut pages = Vec::new();
    collect_markdown(&cmd, "pitr", &mut pages);
    for (name, about, text) in &pages {
        let file = format!("{}.md", name.trim_start_matches("pitr ").replace(' ', "-"));
        let path = dir.join(&file);
        let page = format!("# {name}\n\n```text\n{}\n```\n", text.trim_end());
        pitr::durable::write_atomically(&path, page.as_bytes())
            .with_context(|| format!("write {}", path.display()))?;
        index.push_str(&format!("- [`{name}`]({file}): {about}\n"));
    }
    let path = dir.join("README.md");
    pitr::durable::write_atomically(&path, index.as_bytes())
        .with_context(|| format!("write {}", path.display()))
}

/// (name, one-line about, long help) of each visible subcommand of `cmd`, recursively.
fn collect_markdown(cmd: &clap::Command, name: &str, out: &mut Vec<(String, String, String)>) {
    for sub in cmd
        .get_subcommands()
        .filter(|s| s.get_name() != "help" && !s.is_hide_set())
    {
        let full = format!("{name} {}", sub.get_name());
        let about = sub.get_about().map(ToString::to_string).unwrap_or_default();
        // The environment's values would make the pages differ from machine to machine.
        let text = sub
            .clone()
            .mut_args(|a| a.hide_env_values(true))
            .render_long_help()
            .to_string();
        out.push((full.clone(), about, text));
        collect_markdown(sub, &full, out);
    }
}
