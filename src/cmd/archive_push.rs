//! `pitr archive-push`: `archive_command`. Exits 0 only once the file is durably stored.

use std::path::PathBuf;

use pitr::archive;
use pitr::config::Settings;
use pitr::exit;
use pitr::repos::RepoSet;

#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// The file to archive (%p), relative to the working directory (the data directory).
    pub(crate) wal_path: PathBuf,
    /// Async archiving: push this file together with up to 4N-1 of the next files PostgreSQL has
    /// ready (`pg_wal/archive_status/*.ready`), N uploads at once; the calls for those then find
    /// them stored and return at once. Only stored files are ever acknowledged. 1 = one at a time.
    #[arg(long, env = "PITR_ARCHIVE_PARALLEL", default_value_t = 1, value_name = "N",
          value_parser = clap::value_parser!(u16).range(1..=64))]
    pub(crate) parallel: u16,
}

impl Args {
    /// The name of the file pushed (for the log file's record of the call).
    pub(crate) fn wal_name(&self) -> String {
        self.wal_path.file_name().map_or_else(
            || self.wal_path.display().to_string(),
            |n| n.to_string_lossy().into_owned(),
        )
    }
}

/// Async archiving: most calls find their file already stored by an earlier call. Those are
/// answered before a runtime and a store client exist (tens of milliseconds for a cloud store).
pub(crate) fn answered_by_marker(args: &Args, settings: &Settings) -> bool {
    args.parallel > 1
        && archive::batch::answered_by_marker(
            &if settings.named {
                settings.repo.clone()
            } else {
                archive::batch::set_location(&settings.repos)
            },
            &args.wal_path,
        )
        .is_some()
}

/// Run the command.
///
/// # Errors
/// Any failure: nothing is acknowledged unless the file is stored.
pub(crate) async fn run(args: Args, repos: &RepoSet) -> anyhow::Result<u8> {
    archive::batch::push_to_set(repos, &args.wal_path, usize::from(args.parallel)).await?;
    Ok(exit::SUCCESS)
}
