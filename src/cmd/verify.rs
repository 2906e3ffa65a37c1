//! `pitr verify`: read everything back and print the findings.

use super::{default_jobs, mib};
use pitr::storage::Repo;

#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// Machine-readable JSON.
    #[arg(long)]
    json: bool,
    /// Parallel reads [default: 4 per CPU].
    #[arg(long, value_name = "N")]
    jobs: Option<usize>,
}

/// Run the command.
///
/// # Errors
/// Its failure, for `main` to report.
pub(crate) async fn run(args: Args, repo: &Repo) -> anyhow::Result<u8> {
    let Args { json, jobs } = args;

    let jobs = jobs.unwrap_or_else(|| 4 * default_jobs(None));
    let report = pitr::verify::run(repo, jobs).await?;
    if json {
        crate::outln!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        for f in &report.findings {
            crate::outln!("{:<8} {}: {}", f.kind.to_uppercase(), f.object, f.detail);
        }
        crate::outln!(
            "verify: {} objects ({:.1} MiB of data, {:.1} MiB stored) and {} backup(s) checked: {}",
            report.objects_checked,
            mib(report.bytes_checked),
            mib(report.stored_bytes_checked),
            report.backups_checked,
            super::problems(report.findings.len())
        );
    }
    Ok(super::exit_for_findings(report.findings.len()))
}
