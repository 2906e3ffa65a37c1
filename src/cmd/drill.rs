//! `pitr drill`: a restore exercised on a scratch server, and its report.

use super::{default_jobs, usage};
use pitr::config::Settings;
use pitr::exit;
use pitr::repos::RepoSet;
use pitr::restore::target::{Target, parse_time};
use std::path::PathBuf;

#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// Recover to this time [default: the end of the archive].
    #[arg(long, value_name = "TIME", conflicts_with = "random")]
    to: Option<String>,
    /// Recover to a random time inside the recoverable window.
    #[arg(long)]
    random: bool,
    /// SQL assertions, separated by ';': each must return true.
    #[arg(long, value_name = "FILE")]
    sql: Option<PathBuf>,
    /// Machine-readable JSON report.
    #[arg(long)]
    json: bool,
    /// Keep the scratch directory.
    #[arg(long)]
    keep: bool,
    /// Directory of the PostgreSQL programs [default: /usr/lib/postgresql/N/bin, pg_config, PATH].
    #[arg(long, value_name = "DIR")]
    pg_bin: Option<PathBuf>,
    /// Parallel download streams [default: number of CPUs].
    #[arg(long, value_name = "N")]
    jobs: Option<usize>,
    /// How long recovery may take.
    #[arg(long, value_name = "DURATION", default_value = "1h", value_parser = humantime::parse_duration)]
    timeout: std::time::Duration,
}

/// Run the command.
///
/// # Errors
/// Its failure, for `main` to report.
pub(crate) async fn run(args: Args, repos: &RepoSet, settings: &Settings) -> anyhow::Result<u8> {
    let Args {
        to,
        random,
        sql,
        json,
        keep,
        pg_bin,
        jobs,
        timeout,
    } = args;

    let asked = match &to {
        Some(t) => Target::Time(parse_time(t).map_err(|e| usage(format!("--to: {e}")))?),
        None => Target::Latest,
    };
    // The repository that can serve the drill (a random target: one that can restore at all).
    let source =
        super::source(repos, settings, &pitr::drill::request(asked.clone()), !json).await?;
    let target = if random {
        pitr::drill::random_target(&source.catalog)?
    } else {
        asked
    };
    let (repo, settings) = (&source.repo, &source.settings);
    let opts = pitr::drill::DrillOptions {
        target,
        sql,
        keep,
        pg_bin,
        jobs: default_jobs(jobs),
        timeout,
        global_args: settings.passed_on(),
    };
    let report = pitr::drill::run(repo, &opts).await?;
    if json {
        crate::outln!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        crate::outln!(
            "drill: backup {} restored to {}: restore {:.1} s + recovery {:.1} s = RTO {:.1} s",
            report.backup,
            report.target,
            report.restore_seconds,
            report.recovery_seconds,
            report.rto_seconds
        );
        for c in &report.checks {
            crate::outln!(
                "  {:<5} {}: {}",
                if c.ok { "ok" } else { "FAIL" },
                c.name,
                c.detail
            );
        }
        if let Some(s) = &report.scratch {
            crate::outln!("  kept  {s}");
        }
        crate::outln!("drill: {}", if report.ok { "PASSED" } else { "FAILED" });
    }
    Ok(if report.ok {
        exit::SUCCESS
    } else {
        exit::FAILURE
    })
}
