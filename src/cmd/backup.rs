//! `pitr backup`: a base backup of the running cluster, and its one-line summary.

use super::{default_jobs, mib};
use pitr::backup::{self, BackupOptions};
use pitr::config::Settings;
use pitr::exit;
use pitr::manifest::BackupType;
use pitr::storage::Repo;
use std::path::PathBuf;
use std::time::Instant;

#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// The cluster's data directory.
    #[arg(
        long,
        env = "PGDATA",
        value_name = "DIR",
        required_unless_present = "stream"
    )]
    pgdata: Option<PathBuf>,
    /// Take the backup over the replication protocol (BASE_BACKUP) from the server --dbname names,
    /// a primary or a standby, on this host or another: no access to its data directory. Full
    /// backups only, for now.
    #[arg(long, requires = "dbname")]
    stream: bool,
    /// libpq connection string or URI [default: PGHOST/PGPORT/PGUSER/PGDATABASE, then the socket
    /// of the server running on --pgdata].
    #[arg(long, value_name = "CONNINFO")]
    dbname: Option<String>,
    /// full: every file. incr: the blocks changed since the newest backup (of any type). diff:
    /// the blocks changed since the newest full backup. Without a full backup to build on (or
    /// WAL that vouches for every change since), a full backup is taken and says why.
    #[arg(long = "type", value_name = "TYPE", default_value = "full")]
    backup_type: BackupType,
    /// Label passed to pg_backup_start [default: "pitr <id>"].
    #[arg(long)]
    label: Option<String>,
    /// Parallel copy streams [default: number of CPUs].
    #[arg(long, value_name = "N")]
    jobs: Option<usize>,
    /// How long to wait for the backup's WAL to be archived.
    #[arg(long, value_name = "DURATION", default_value = "5m", value_parser = humantime::parse_duration)]
    archive_timeout: std::time::Duration,
    /// Store every file as objects of its own, as earlier versions did [default: files of at
    /// most 1 MiB are stored together in bundles of about 4 MiB, read back by range: one request
    /// for hundreds of small files].
    #[arg(long)]
    no_bundle: bool,
    /// Print the summary as JSON.
    #[arg(long)]
    json: bool,
}

/// Run the command.
///
/// # Errors
/// Its failure, for `main` to report.
pub(crate) async fn run(args: Args, repo: &Repo, settings: &Settings) -> anyhow::Result<u8> {
    let Args {
        pgdata,
        stream,
        dbname,
        label,
        jobs,
        archive_timeout,
        json,
        backup_type,
        no_bundle,
    } = args;

    if stream {
        return run_streamed(
            repo,
            settings,
            (dbname.unwrap_or_default(), label),
            (default_jobs(jobs), archive_timeout, !no_bundle, json),
            backup_type,
        )
        .await;
    }
    let Some(pgdata) = pgdata else {
        return Err(super::usage(
            "name the data directory: --pgdata DIR (or PGDATA), or take the backup with --stream"
                .into(),
        ));
    };
    let opts = BackupOptions {
        pgdata,
        dbname,
        label,
        jobs: default_jobs(jobs),
        compression: settings.compress,
        archive_timeout,
        progress: !super::output::quiet(),
        backup_type,
        bundle: !no_bundle,
    };
    let started = Instant::now();
    let m = backup::run(repo, &opts).await?;
    let secs = started.elapsed().as_secs_f64();
    if json {
        let summary = serde_json::json!({
            "id": m.id, "label": m.label, "timeline": m.timeline,
            "type": m.backup_type, "parent": m.parent.as_ref().map(|p| &p.id),
            "fallback": m.fallback,
            "files_as_changed_blocks": m.file_methods().0,
            "start_lsn": m.start_lsn, "stop_lsn": m.stop_lsn,
            "start_time": m.start_time, "stop_time": m.stop_time,
            "start_wal": m.start_wal, "stop_wal": m.stop_wal,
            "files": m.files.len(), "size_bytes": m.size_bytes, "stored_bytes": m.stored_bytes,
            "compression": m.compression, "jobs": opts.jobs, "duration_seconds": secs,
            "data_checksums": m.data_checksums,
            "checksum_failures": m.checksum_failures().map(|(_, b)| b.len()).sum::<usize>(),
            "throughput_mib_per_second": mib(m.size_bytes) / secs.max(1e-9),
        });
        crate::outln!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        if let Some(why) = &m.fallback {
            crate::sayln!("took a full backup instead of {backup_type}: {why}");
        }
        let kind = match &m.parent {
            Some(p) => format!(
                " ({} on {}, {} files as changed blocks)",
                m.backup_type,
                p.id,
                m.file_methods().0
            ),
            None => String::new(),
        };
        say_done(&m, &kind, "copied", secs)?;
    }
    let bad: usize = m.checksum_failures().map(|(_, b)| b.len()).sum();
    if bad > 0 {
        anyhow::bail!(pitr::error::with_hint(
            format!(
                "backup {} copied {bad} page(s) that fail their checksum: {}",
                m.id,
                m.describe_checksum_failures(5)
            ),
            "the data directory holds damaged pages (disk, controller or memory); the backup is stored as read, `pitr info` and `pitr verify` list it: check the hardware, then restore those relations from an older backup or repair them"
        ));
    }
    Ok(exit::SUCCESS)
}

/// `backup --stream`: a full backup over the replication protocol.
async fn run_streamed(
    repo: &Repo,
    settings: &Settings,
    (dbname, label): (String, Option<String>),
    (jobs, archive_timeout, bundle, json): (usize, std::time::Duration, bool, bool),
    backup_type: BackupType,
) -> anyhow::Result<u8> {
    if backup_type != BackupType::Full {
        return Err(super::usage(format!(
            "backup --stream takes full backups only for now; a local pitr backup --type {backup_type} (on the database host, with --pgdata) takes incremental ones on every PostgreSQL version"
        )));
    }
    let opts = pitr::backup::stream::StreamOptions {
        dbname,
        label,
        jobs,
        compression: settings.compress,
        archive_timeout,
        bundle,
    };
    let started = Instant::now();
    let m = pitr::backup::stream::run(repo, &opts).await?;
    let secs = started.elapsed().as_secs_f64();
    if json {
        let summary = serde_json::json!({
            "id": m.id, "label": m.label, "timeline": m.timeline, "type": m.backup_type,
            "streamed": true,
            "start_lsn": m.start_lsn, "stop_lsn": m.stop_lsn,
            "start_time": m.start_time, "stop_time": m.stop_time,
            "start_wal": m.start_wal, "stop_wal": m.stop_wal,
            "files": m.files.len(), "size_bytes": m.size_bytes, "stored_bytes": m.stored_bytes,
            "compression": m.compression, "jobs": jobs, "duration_seconds": secs,
            "throughput_mib_per_second": mib(m.size_bytes) / secs.max(1e-9),
        });
        crate::outln!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        say_done(&m, " (streamed)", "received", secs)?;
    }
    Ok(exit::SUCCESS)
}

/// The one-line summary of a backup.
fn say_done(
    m: &pitr::manifest::BackupManifest,
    kind: &str,
    verb: &str,
    secs: f64,
) -> anyhow::Result<()> {
    crate::sayln!(
        "backup {}{kind} complete: {} files, {:.1} MiB {verb}, {:.1} MiB stored ({}), {:.1} s, {:.1} MiB/s; WAL {} to {}",
        m.id,
        m.files.len(),
        mib(m.size_bytes),
        mib(m.stored_bytes),
        m.compression,
        secs,
        mib(m.size_bytes) / secs.max(1e-9),
        m.start_wal,
        m.stop_wal
    );
    Ok(())
}
