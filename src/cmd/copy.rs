//! `pitr copy`: copy what one repository holds and another lacks, checking every object.

use std::io::IsTerminal;

use super::mib;
use pitr::repos::RepoSet;

#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// The repository to copy from (a `[[repo]]` name, or repo1, repo2, … for --repo flags).
    #[arg(long, value_name = "NAME")]
    from: String,
    /// The repository to copy into (created when it does not exist yet).
    #[arg(long, value_name = "NAME")]
    to: String,
    /// Only this backup (id or label) and those it builds on [default: every backup].
    #[arg(long, value_name = "ID")]
    backup: Option<String>,
    /// Objects copied at once.
    #[arg(long, value_name = "N", default_value_t = 8)]
    jobs: usize,
    /// Machine-readable JSON.
    #[arg(long)]
    json: bool,
}

/// Run the command.
///
/// # Errors
/// Its failure, for `main` to report.
pub(crate) async fn run(args: Args, repos: &RepoSet) -> anyhow::Result<u8> {
    let Args {
        from,
        to,
        backup,
        jobs,
        json,
    } = args;
    let names = || {
        repos
            .members
            .iter()
            .map(|m| m.spec.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let member = |name: &str| {
        repos.named(name).ok_or_else(|| {
            anyhow::Error::new(pitr::error::UsageError(format!(
                "no repository is named {name:?} (there are {})",
                names()
            )))
        })
    };
    let (source, target) = (member(&from)?, member(&to)?);
    if from == to {
        return Err(
            pitr::error::UsageError("--from and --to name the same repository".into()).into(),
        );
    }
    let source = match &source.repo {
        Ok(r) => r,
        Err(e) => anyhow::bail!("repository {from}: {e}"),
    };
    // The target may be new: opened as the writing commands open one.
    let target = pitr::repos::open_one(&target.spec, true).await?;
    let bar = if std::io::stderr().is_terminal() && !json {
        let bar = indicatif::ProgressBar::new(0);
        if let Ok(style) = indicatif::ProgressStyle::with_template(
            "{spinner} [{bar:30}] {pos}/{len} objects ETA {eta}",
        ) {
            bar.set_style(style.progress_chars("=> "));
        }
        bar
    } else {
        indicatif::ProgressBar::hidden()
    };
    let progress = |done: u64, total: u64| {
        bar.set_length(total);
        bar.set_position(done);
    };
    let report = pitr::copy::run(
        source,
        &target,
        &pitr::copy::CopyOptions {
            backup,
            jobs,
            wal_only: false,
        },
        &progress,
    )
    .await?;
    bar.finish_and_clear();
    if json {
        crate::outln!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        for f in &report.findings {
            crate::outln!("{:<10} {}: {}", f.kind.to_uppercase(), f.object, f.detail);
        }
        crate::outln!(
            "copy {from} -> {to}: {} object(s) copied ({:.1} MiB stored), {} already there, {} backup(s) now complete in {to}: {}",
            report.objects_copied,
            mib(report.bytes_copied),
            report.objects_present,
            report.backups_copied.len(),
            super::problems(report.findings.len())
        );
    }
    Ok(super::exit_for_findings(report.findings.len()))
}
