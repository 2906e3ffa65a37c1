//! `pitr receive`: stream WAL from the server over the replication protocol into the repository,
//! in the foreground, until stopped.

use std::path::PathBuf;

use pitr::config::Settings;
use pitr::exit;
use pitr::receive::ReceiveOptions;
use pitr::storage::Repo;

#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// How to reach the server (libpq connection string or URI; PGHOST, PGPORT, PGUSER and
    /// PGPASSWORD fill in what it leaves out). The role needs the REPLICATION attribute.
    #[arg(long, value_name = "CONNINFO")]
    dbname: String,
    /// Stream through this physical replication slot (the server then keeps every byte the
    /// repository does not hold yet; without one, a server that recycles WAL first breaks the
    /// stream).
    #[arg(long, value_name = "NAME")]
    slot: Option<String>,
    /// Create the --slot when it does not exist.
    #[arg(long, requires = "slot")]
    create_slot: bool,
    /// Tell the server what is stored at least this often.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = humantime::parse_duration)]
    status_interval: std::time::Duration,
    /// Store the part of the segment in progress received so far this often (the repository then
    /// trails the server by about this much; 0 stores only whole segments).
    #[arg(long, value_name = "DURATION", default_value = "1s", value_parser = humantime::parse_duration)]
    flush_interval: std::time::Duration,
    /// Be a synchronous standby: store what arrives at once and only then report it flushed, so
    /// that with `synchronous_standby_names = 'pitr'` a commit returns once its WAL is in the
    /// repository (RPO 0).
    #[arg(long)]
    synchronous: bool,
    /// Where completed segments wait until they are stored [default: a directory under $TMPDIR].
    #[arg(long, value_name = "DIR")]
    spool_dir: Option<PathBuf>,
    /// Stop after storing this many segments [default: run until stopped].
    #[arg(long, value_name = "N")]
    segments: Option<u64>,
}

/// Run the command.
///
/// # Errors
/// Its failure, for `main` to report.
pub(crate) async fn run(args: Args, repo: &Repo, settings: &Settings) -> anyhow::Result<u8> {
    let Args {
        dbname,
        slot,
        create_slot,
        status_interval,
        flush_interval,
        synchronous,
        spool_dir,
        segments,
    } = args;
    let cfg = pitr::pgconn::config(Some(&dbname), None)?;
    let (spool, _owned) = match spool_dir {
        Some(d) => (d, None),
        None => {
            let t = tempfile::Builder::new().prefix("pitr-receive-").tempdir()?;
            (t.path().to_path_buf(), Some(t))
        }
    };
    let opts = ReceiveOptions {
        slot,
        create_slot,
        compression: settings.compress,
        status_interval: status_interval.max(std::time::Duration::from_millis(100)),
        // 0: whole segments only (a tick so rare it never comes).
        flush_interval: if flush_interval.is_zero() {
            std::time::Duration::from_secs(365 * 86400)
        } else {
            flush_interval.max(std::time::Duration::from_millis(10))
        },
        synchronous,
        spool,
        stop_after: segments,
    };
    let done = pitr::receive::run(repo, &cfg, &opts).await?;
    crate::sayln!(
        "receive: {} segment(s) stored; the repository holds the WAL before {}",
        done.segments,
        done.stored_to
    );
    Ok(exit::SUCCESS)
}
