//! `pitr info`: what the repository holds and the recoverable window, as a table or JSON.

use pitr::catalog::Catalog;
use pitr::exit;
use pitr::info::Info;
use pitr::storage::Repo;

#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// Machine-readable JSON instead of the table.
    #[arg(long)]
    json: bool,
}

/// Run the command.
///
/// # Errors
/// Its failure, for `main` to report.
pub(crate) async fn run(args: Args, repo: &Repo) -> anyhow::Result<u8> {
    let Args { json } = args;

    let catalog = Catalog::load(repo).await?;
    let info = Info::new(repo.location(), &catalog);
    if json {
        crate::outln!("{}", serde_json::to_string_pretty(&info)?);
    } else {
        crate::out!("{}", info.render());
    }
    Ok(exit::SUCCESS)
}
