//! The hidden helpers of `archive-get`: the background prefetcher (`archive-prefetch`) and the
//! `recovery_end_command` that removes its spool (`archive-spool-clean`).

use std::path::PathBuf;

use pitr::archive;
use pitr::exit;
use pitr::pg::WalFileName;
use pitr::storage::Repo;

#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// Fetch the segments after this one.
    after: String,
    /// Into this spool directory.
    spool: PathBuf,
    /// How many.
    count: usize,
    /// The WAL segment size in bytes.
    seg_size: u32,
}

/// `archive-spool-clean`'s arguments.
#[derive(Debug, clap::Args)]
pub(crate) struct CleanArgs {
    /// The spool directory.
    spool: PathBuf,
}

/// Run the prefetcher.
///
/// # Errors
/// Bad arguments (it is started by archive-get, never by hand) or a store failure.
pub(crate) async fn run(args: Args, repo: &Repo) -> anyhow::Result<u8> {
    let WalFileName::Segment(seg) = args.after.parse::<WalFileName>()? else {
        anyhow::bail!("{} is not a segment name", args.after);
    };
    let seg_size = pitr::pg::WalSegSize::new(args.seg_size)
        .ok_or_else(|| anyhow::anyhow!("bad segment size {}", args.seg_size))?;
    archive::prefetch::run(repo, seg, &args.spool, args.count, seg_size).await?;
    Ok(exit::SUCCESS)
}

/// Remove the spool: the one command that needs no repository.
pub(crate) fn clean(args: &CleanArgs) -> u8 {
    archive::prefetch::clean(&args.spool, std::time::Duration::from_secs(60));
    exit::SUCCESS
}
