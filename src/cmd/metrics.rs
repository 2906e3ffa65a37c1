//! `pitr metrics`: Prometheus text on stdout.

use pitr::exit;
use pitr::storage::Repo;

/// Run the command.
///
/// # Errors
/// Its failure, for `main` to report.
pub(crate) async fn run(repo: &Repo) -> anyhow::Result<u8> {
    let now = pitr::pg::PgTimestamp::now().unix_secs_f64();
    crate::out!("{}", pitr::metrics::render(repo, now).await?);
    Ok(exit::SUCCESS)
}
