//! `pitr archive-get`: `restore_command`. 0 written, 1 not in the repository, 200 cannot be
//! fetched intact (see `pitr::exit`).

use std::path::PathBuf;

use pitr::archive;
use pitr::archive::get::GetOutcome;
use pitr::config::Settings;
use pitr::exit;
use pitr::repos::RepoSet;

#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// The file PostgreSQL wants (%f).
    wal_name: String,
    /// Where to write it (%p), relative to the working directory.
    dest_path: PathBuf,
    /// Segments to fetch ahead in the background (0 turns prefetching off).
    #[arg(long, env = "PITR_PREFETCH", default_value_t = 8, value_name = "N")]
    prefetch: usize,
}

impl Args {
    /// The file asked for (for the log file's record of the call).
    pub(crate) fn wal_name(&self) -> &str {
        &self.wal_name
    }
}

/// Run the command.
///
/// # Errors
/// The file exists but cannot be fetched or verified, or `%p` cannot be written.
pub(crate) async fn run(args: Args, repos: &RepoSet, settings: &Settings) -> anyhow::Result<u8> {
    // The prefetcher runs as `pitr archive-prefetch` with the same repository settings.
    let global_args = settings.passed_on();
    let prefetch = archive::get::Prefetch {
        count: args.prefetch,
        global_args,
    };
    match archive::get::get_from_set(repos, &args.wal_name, &args.dest_path, &prefetch).await? {
        GetOutcome::Written { .. } => Ok(exit::SUCCESS),
        GetOutcome::NotFound => Ok(exit::FAILURE),
    }
}
