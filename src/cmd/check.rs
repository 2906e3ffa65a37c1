//! `pitr check`: the server archives into this repository.

use pitr::config::Settings;
use pitr::exit;
use pitr::storage::Repo;

#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// libpq connection string or URI [default: PGHOST/PGPORT/PGUSER/PGDATABASE].
    #[arg(long, value_name = "CONNINFO")]
    dbname: Option<String>,
    /// How long to wait for the switched segment.
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = humantime::parse_duration)]
    archive_timeout: std::time::Duration,
}

/// Run the command.
///
/// # Errors
/// Its failure, for `main` to report.
pub(crate) async fn run(args: Args, repo: &Repo, settings: &Settings) -> anyhow::Result<u8> {
    let Args {
        dbname,
        archive_timeout,
    } = args;

    let opts = pitr::check::CheckOptions {
        repo_url: settings.repo.clone(),
        config_path: settings.config_path.clone(),
        dbname,
        timeout: archive_timeout,
    };
    for line in pitr::check::run(repo, &opts).await? {
        crate::outln!("{line}");
    }
    crate::outln!("check: archiving into {} works", repo.location());
    Ok(exit::SUCCESS)
}
