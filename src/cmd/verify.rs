//! `pitr verify`: read everything back and print the findings.

use super::{default_jobs, mib};
use pitr::repos::RepoSet;

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
pub(crate) async fn run(args: Args, repos: &RepoSet) -> anyhow::Result<u8> {
    let Args { json, jobs } = args;

    let jobs = jobs.unwrap_or_else(|| 4 * default_jobs(None));
    if !repos.is_several() {
        let report = pitr::verify::run(repos.chosen()?, jobs).await?;
        if json {
            crate::outln!("{}", serde_json::to_string_pretty(&report)?);
        } else {
            say_report(&report)?;
        }
        return Ok(super::exit_for_findings(report.findings.len()));
    }
    // Several repositories: each is verified in turn (every copy must be known good), and each
    // one's lag is shown. A repository that cannot be read is a problem of its own.
    let loaded = repos.catalogs().await;
    let lags = RepoSet::lags(&loaded);
    let mut entries = Vec::new();
    let mut problems = 0;
    for (m, lag) in repos.members.iter().zip(lags) {
        let report = match &m.repo {
            Ok(r) => pitr::verify::run(r, jobs)
                .await
                .map_err(|e| pitr::error::one_line(&e)),
            Err(e) => Err(e.to_string()),
        };
        problems += report.as_ref().map_or(1, |r| r.findings.len());
        if !json {
            crate::outln!("repository {} ({})", m.spec.name, m.spec.url);
            match &report {
                Ok(r) => say_report(r)?,
                Err(e) => crate::outln!("UNREADABLE {}: {e}", m.spec.url),
            }
            if let Some(l) = lag.filter(|l| l.segments > 0 || l.seconds > 0.0) {
                crate::outln!(
                    "lag: {} segment(s), {} s behind the most advanced repository",
                    l.segments,
                    l.seconds
                );
            }
        }
        entries.push(Entry {
            name: m.spec.name.clone(),
            url: m.spec.url.clone(),
            required: m.spec.required,
            error: report.as_ref().err().cloned(),
            lag,
            report: report.ok(),
        });
    }
    if json {
        // The chosen repository's report at the top (as with one repository), and each one's.
        let chosen = entries.get(repos.chosen).and_then(|e| e.report.as_ref());
        let mut v = match chosen {
            Some(r) => serde_json::to_value(r)?,
            None => serde_json::json!({}),
        };
        if let Some(o) = v.as_object_mut() {
            o.insert("repositories".into(), serde_json::to_value(&entries)?);
        }
        crate::outln!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        crate::outln!(
            "verify: {} repositories checked: {}",
            entries.len(),
            super::problems(problems)
        );
    }
    Ok(super::exit_for_findings(problems))
}

/// One repository in `verify --json`'s `repositories[]`.
#[derive(serde::Serialize)]
struct Entry {
    name: String,
    url: String,
    required: bool,
    /// Why it could not be verified (`null` when it was).
    error: Option<String>,
    /// Segments and seconds behind the most advanced repository (`null` when unreadable).
    lag: Option<pitr::info::Lag>,
    #[serde(flatten)]
    report: Option<pitr::verify::Report>,
}

/// A report's findings and summary line.
fn say_report(report: &pitr::verify::Report) -> anyhow::Result<()> {
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
    Ok(())
}
