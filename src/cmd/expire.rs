//! `pitr expire`: the retention policy applied, and the window before and after.

use pitr::catalog::Catalog;
use pitr::exit;
use pitr::repos::RepoSet;
use pitr::restore::plan;
use pitr::storage::Repo;

#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// The retention policy (flags override the config file's [expire] table).
    #[command(flatten)]
    policy: PolicyArgs,
    /// List what would be deleted, delete nothing.
    #[arg(long)]
    dry_run: bool,
    /// Refuse to delete more objects than this without --force.
    #[arg(long, value_name = "N", default_value_t = 10_000)]
    max_delete: usize,
    /// Delete even more than --max-delete objects.
    #[arg(long)]
    force: bool,
}

/// The retention flags, which become a [`pitr::expire::Policy`].
#[derive(Debug, clap::Args)]
pub(crate) struct PolicyArgs {
    /// Keep the N newest full backups (and the incremental and differential backups built on them).
    #[arg(long, value_name = "N")]
    keep_full: Option<usize>,
    /// Keep everything needed to restore to any moment this long ago (e.g. 30d).
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    keep_within: Option<std::time::Duration>,
    /// Keep the newest backup of each of the last N days.
    #[arg(long, value_name = "N")]
    keep_daily: Option<usize>,
    /// Keep the newest backup of each of the last N ISO weeks.
    #[arg(long, value_name = "N")]
    keep_weekly: Option<usize>,
    /// Keep the newest backup of each of the last N months.
    #[arg(long, value_name = "N")]
    keep_monthly: Option<usize>,
    /// Keep the newest backup of each of the last N years.
    #[arg(long, value_name = "N")]
    keep_yearly: Option<usize>,
}

impl From<PolicyArgs> for pitr::expire::Policy {
    fn from(a: PolicyArgs) -> pitr::expire::Policy {
        pitr::expire::Policy {
            keep_full: a.keep_full,
            keep_within: a.keep_within,
            keep_daily: a.keep_daily,
            keep_weekly: a.keep_weekly,
            keep_monthly: a.keep_monthly,
            keep_yearly: a.keep_yearly,
        }
    }
}

/// Run the command.
///
/// # Errors
/// Its failure, for `main` to report.
pub(crate) async fn run(args: Args, repos: &RepoSet) -> anyhow::Result<u8> {
    let Args {
        policy: flags,
        dry_run,
        max_delete,
        force,
    } = args;
    let flags: pitr::expire::Policy = flags.into();
    let how = How {
        dry_run,
        max_delete,
        force,
    };
    let policy_of = |spec: &pitr::config::RepoSpec| {
        if flags.is_empty() {
            spec.expire.clone()
        } else {
            flags.clone()
        }
    };
    if !repos.is_several() {
        let spec = repos
            .chosen_spec()
            .ok_or_else(|| anyhow::anyhow!("no repository configured"))?;
        expire_one(repos.chosen()?, &policy_of(spec), &how).await?;
        return Ok(exit::SUCCESS);
    }
    // Several repositories: each under its own policy (or the flags'), one after another; one
    // that fails does not stop the others, and fails the command.
    let mut failed: Vec<String> = Vec::new();
    for m in &repos.members {
        crate::sayln!("repository {} ({})", m.spec.name, m.spec.url);
        let policy = policy_of(&m.spec);
        if policy.is_empty() {
            crate::sayln!("no retention policy for this repository: nothing expired");
            continue;
        }
        let done = match &m.repo {
            Ok(r) => expire_one(r, &policy, &how).await,
            Err(e) => Err(anyhow::anyhow!("{e}")),
        };
        if let Err(e) = done {
            tracing::error!("repository {}: {}", m.spec.name, pitr::error::one_line(&e));
            failed.push(m.spec.name.clone());
        }
    }
    if !failed.is_empty() {
        anyhow::bail!(
            "expire failed for repository {} (the others were expired as their policies say)",
            failed.join(", ")
        );
    }
    Ok(exit::SUCCESS)
}

/// How expire deletes: `--dry-run`, `--max-delete`, `--force`.
struct How {
    dry_run: bool,
    max_delete: usize,
    force: bool,
}

/// Expire one repository under `policy`, saying what went.
async fn expire_one(repo: &Repo, policy: &pitr::expire::Policy, how: &How) -> anyhow::Result<()> {
    let How {
        dry_run,
        max_delete,
        force,
    } = *how;
    let now = pitr::pg::PgTimestamp::now();
    let (outcome, deletions) =
        pitr::expire::run(repo, policy, now, dry_run, max_delete, force).await?;
    crate::sayln!("before: {}", outcome.window_before);
    let verb = if dry_run { "would delete" } else { "deleted" };
    let mut expired = outcome.backups.clone();
    expired.sort();
    for b in &expired {
        crate::sayln!("{verb} backup {b}");
    }
    for b in &outcome.abandoned {
        crate::sayln!("{verb} interrupted backup {b} (no manifest, nothing written for a day)");
    }
    crate::sayln!(
        "{verb} {} object(s): {} backup(s), {} WAL file(s) before {}; kept backups: {}",
        outcome.objects,
        outcome.backups.len(),
        outcome.wal_files,
        outcome
            .wal_kept_from
            .as_deref()
            .unwrap_or("(no backup kept)"),
        outcome.kept.join(", ")
    );
    if !outcome.staging_files.is_empty() {
        crate::sayln!(
            "{verb} {} staging file(s) left by interrupted pushes or puts:",
            outcome.staging_files.len()
        );
        for path in &outcome.staging_files {
            crate::sayln!("  {path}");
        }
    }
    if dry_run {
        let mut sorted: Vec<&str> = deletions.iter().map(|e| e.key()).collect();
        sorted.sort_unstable();
        for key in sorted {
            crate::outln!("  {key}");
        }
        crate::sayln!("after:  {} (once expired)", outcome.window_after);
    } else {
        crate::sayln!("after:  {}", plan::window_text(&Catalog::load(repo).await?));
    }
    Ok(())
}
