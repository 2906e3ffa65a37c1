//! `pitr expire`: the retention policy applied, and the window before and after.

use pitr::catalog::Catalog;
use pitr::config::Settings;
use pitr::exit;
use pitr::restore::plan;
use pitr::storage::Repo;

#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// The retention policy (flags override the config file's [expire] table).
    #[command(flatten)]
    policy: pitr::expire::Policy,
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

/// Run the command.
///
/// # Errors
/// Its failure, for `main` to report.
pub(crate) async fn run(args: Args, repo: &Repo, settings: &Settings) -> anyhow::Result<u8> {
    let Args {
        policy: flags,
        dry_run,
        max_delete,
        force,
    } = args;

    let policy = if flags.is_empty() {
        settings.expire.clone()
    } else {
        flags
    };
    let now = pitr::pg::xlogrecord::PgTimestamp::from_unix_micros(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_micros() as i64),
    );
    crate::sayln!("before: {}", plan::window_text(&Catalog::load(repo).await?));
    let (outcome, deletions) =
        pitr::expire::run(repo, &policy, now, dry_run, max_delete, force).await?;
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
        let mut sorted = deletions.clone();
        sorted.sort();
        for key in &sorted {
            crate::outln!("  {key}");
        }
        crate::sayln!("after:  {} (once expired)", outcome.window_after);
    } else {
        crate::sayln!("after:  {}", plan::window_text(&Catalog::load(repo).await?));
    }
    Ok(exit::SUCCESS)
}
