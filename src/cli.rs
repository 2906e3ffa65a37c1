//! Command-line arguments (the contract in DESIGN.md). Global flags are accepted before or after the
//! subcommand and each has an environment variable, since `archive_command` strings are awkward to
//! extend.

use std::path::PathBuf;

use clap::{ArgAction, Args, Parser, Subcommand};

use crate::compress::Compression;

/// pitr: PostgreSQL WAL archiving and point-in-time recovery to object storage.
#[derive(Debug, Parser)]
#[command(name = "pitr", version, about, max_term_width = 100)]
pub struct Cli {
    /// Flags every command takes.
    #[command(flatten)]
    pub global: GlobalArgs,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Flags every command takes, listed apart from each command's own in `--help`.
#[derive(Clone, Debug, Args)]
#[command(next_help_heading = "Global options")]
pub struct GlobalArgs {
    /// Repository: file:///path, s3://bucket/prefix, gs://bucket/prefix, az://container/prefix.
    #[arg(long, global = true, env = "PITR_REPO", value_name = "URL")]
    pub repo: Option<String>,
    /// TOML config file (repo, compress); flags and environment override it.
    #[arg(long, global = true, env = "PITR_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Compression of what archive-push and backup store [default: zstd, level 3]; other commands
    /// ignore it.
    #[arg(
        long,
        global = true,
        env = "PITR_COMPRESS",
        value_enum,
        value_name = "ALGO"
    )]
    pub compress: Option<Compression>,
    /// More detail on stderr (-vv for even more).
    #[arg(short, long, global = true, action = ArgAction::Count)]
    pub verbose: u8,
    /// Only errors on stderr, and no plan or summary on stdout.
    #[arg(short, long, global = true)]
    pub quiet: bool,
}

/// The commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Archive one WAL file: archive_command = 'pitr archive-push %p'.
    ///
    /// Exits 0 only once the file is durably stored (or an identical copy already is); any failure
    /// exits 1 so PostgreSQL keeps the file and retries.
    ArchivePush {
        /// The file to archive (%p), relative to the working directory (the data directory).
        wal_path: PathBuf,
        /// Async archiving: push this file together with up to 4N-1 of the next files PostgreSQL has
        /// ready (`pg_wal/archive_status/*.ready`), N uploads at once; the calls for those then find
        /// them stored and return at once. Only stored files are ever acknowledged. 1 = one at a time.
        #[arg(long, env = "PITR_ARCHIVE_PARALLEL", default_value_t = 1, value_name = "N",
              value_parser = clap::value_parser!(u16).range(1..=64))]
        parallel: u16,
    },
    /// Fetch one WAL file: restore_command = 'pitr archive-get %f %p'.
    ///
    /// Exits 0 when written, 1 when the repository does not hold the file, 200 when the file exists
    /// but cannot be fetched intact (so recovery stops instead of ending early).
    ArchiveGet {
        /// The file PostgreSQL wants (%f).
        wal_name: String,
        /// Where to write it (%p), relative to the working directory.
        dest_path: PathBuf,
        /// Segments to fetch ahead in the background (0 turns prefetching off).
        #[arg(long, env = "PITR_PREFETCH", default_value_t = 8, value_name = "N")]
        prefetch: usize,
    },
    /// Internal: the background prefetcher started by archive-get.
    #[command(hide = true)]
    ArchivePrefetch {
        /// Fetch the segments after this one.
        after: String,
        /// Into this spool directory.
        spool: PathBuf,
        /// How many.
        count: usize,
        /// The WAL segment size in bytes.
        seg_size: u32,
    },
    /// Internal: remove archive-get's prefetch spool when recovery ends (recovery_end_command).
    #[command(hide = true)]
    ArchiveSpoolClean {
        /// The spool directory.
        spool: PathBuf,
    },
    /// Take a base backup of a running cluster (run on the database host).
    ///
    /// The backup is listed (and usable) only once its manifest is written, after every file is
    /// stored and the WAL from its start to its end is in the repository.
    Backup {
        /// The cluster's data directory.
        #[arg(long, env = "PGDATA", value_name = "DIR")]
        pgdata: PathBuf,
        /// libpq connection string or URI [default: PGHOST/PGPORT/PGUSER/PGDATABASE, then the socket
        /// of the server running on --pgdata].
        #[arg(long, value_name = "CONNINFO")]
        dbname: Option<String>,
        /// Label passed to pg_backup_start [default: "pitr <id>"].
        #[arg(long)]
        label: Option<String>,
        /// Parallel copy streams [default: number of CPUs].
        #[arg(long, value_name = "N")]
        jobs: Option<usize>,
        /// How long to wait for the backup's WAL to be archived.
        #[arg(long, value_name = "DURATION", default_value = "5m", value_parser = humantime::parse_duration)]
        archive_timeout: std::time::Duration,
        /// Print the summary as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Restore a base backup into an empty directory and configure PostgreSQL to recover to a target.
    ///
    /// The plan (backup, timeline, WAL) is checked against the repository's index before anything is
    /// written: a target outside the recoverable window is refused with the window.
    #[command(group(clap::ArgGroup::new("target").required(true).args(["to", "lsn", "xid", "name", "immediate", "latest"])))]
    Restore {
        /// The data directory to create (must be empty or absent).
        #[arg(long, value_name = "DIR")]
        target_dir: PathBuf,
        /// Recover to this time: 'YYYY-MM-DD HH:MM[:SS[.ffffff]][Z|+HH|+HH:MM|-HHMM]' (UTC without offset).
        #[arg(long, value_name = "TIME")]
        to: Option<String>,
        /// Recover to this WAL position (X/X).
        #[arg(long, value_name = "LSN")]
        lsn: Option<String>,
        /// Recover to the commit or abort of this transaction.
        #[arg(long, value_name = "XID")]
        xid: Option<u32>,
        /// Recover to this restore point (pg_create_restore_point).
        #[arg(long, value_name = "NAME")]
        name: Option<String>,
        /// Stop as soon as the backup is consistent.
        #[arg(long)]
        immediate: bool,
        /// Replay all archived WAL, following the newest timeline. Refused when the archive has a gap
        /// with WAL beyond it (recovery would promote at the gap); see --stop-at-gap.
        #[arg(long)]
        latest: bool,
        /// With --latest: recover only up to the first gap in the archived WAL, knowingly leaving
        /// what lies beyond it.
        #[arg(long, requires = "latest")]
        stop_at_gap: bool,
        /// Stop just before the target transaction instead of just after it.
        #[arg(long)]
        exclusive: bool,
        /// Timeline to recover along: latest, current or a number [default: the one holding the target].
        #[arg(long, value_name = "latest|current|N")]
        timeline: Option<String>,
        /// What PostgreSQL does at the target.
        #[arg(long, value_enum, default_value = "pause")]
        action: crate::restore::exec::Action,
        /// Restore this backup (id or label) instead of the newest one that reaches the target.
        #[arg(long, value_name = "LABEL")]
        backup: Option<String>,
        /// Put tablespace OLD (its OID or original path) at NEW; repeatable.
        #[arg(long, value_name = "OLD=NEW")]
        tablespace_map: Vec<String>,
        /// Parallel download streams [default: number of CPUs].
        #[arg(long, value_name = "N")]
        jobs: Option<usize>,
        /// Print the plan and exit without writing anything.
        #[arg(long)]
        dry_run: bool,
        /// Whether the restored cluster archives once promoted: preserve the backup's settings, or
        /// off (for copies that must not archive into this repository).
        #[arg(
            long,
            value_enum,
            default_value = "preserve",
            value_name = "off|preserve"
        )]
        archive_mode: crate::restore::exec::ArchiveMode,
        /// Give the restored files to this user (needed when run as root: PostgreSQL refuses a
        /// data directory it does not own).
        #[arg(long, value_name = "USER")]
        owner: Option<String>,
    },
    /// Create a standby from the newest backup: it catches up from the archive, then streams.
    Replica {
        /// The data directory to create (must be empty or absent).
        #[arg(long, value_name = "DIR")]
        target_dir: PathBuf,
        /// How the standby connects to its primary (libpq connection string).
        #[arg(long, value_name = "CONNINFO")]
        primary_conninfo: String,
        /// Replication slot on the primary (checked before anything is restored).
        #[arg(long, value_name = "NAME")]
        slot: Option<String>,
        /// Create the --slot on the primary (a physical slot that reserves WAL) if it does not exist.
        #[arg(long, requires = "slot")]
        create_slot: bool,
        /// Use this backup (id or label) instead of the newest.
        #[arg(long, value_name = "LABEL")]
        backup: Option<String>,
        /// Put tablespace OLD (its OID or original path) at NEW; repeatable.
        #[arg(long, value_name = "OLD=NEW")]
        tablespace_map: Vec<String>,
        /// Parallel download streams [default: number of CPUs].
        #[arg(long, value_name = "N")]
        jobs: Option<usize>,
        /// Give the restored files to this user (needed when run as root).
        #[arg(long, value_name = "USER")]
        owner: Option<String>,
    },
    /// Read back every object and check checksums, WAL continuity, backups against their manifests,
    /// and unexpected deletions. Exits 1 on any finding.
    Verify {
        /// Machine-readable JSON.
        #[arg(long)]
        json: bool,
        /// Parallel reads [default: 4 per CPU].
        #[arg(long, value_name = "N")]
        jobs: Option<usize>,
    },
    /// Check that the server archives into this repository: settings, identity, and a WAL switch
    /// that must reach the repository.
    Check {
        /// libpq connection string or URI [default: PGHOST/PGPORT/PGUSER/PGDATABASE].
        #[arg(long, value_name = "CONNINFO")]
        dbname: Option<String>,
        /// How long to wait for the switched segment.
        #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = humantime::parse_duration)]
        archive_timeout: std::time::Duration,
    },
    /// Restore into a scratch directory, start PostgreSQL there, and check it: target reached,
    /// pg_amcheck, data checksums, WAL continuity, your SQL assertions. Reports the measured RTO.
    Drill {
        /// Recover to this time [default: the end of the archive].
        #[arg(long, value_name = "TIME", conflicts_with = "random")]
        to: Option<String>,
        /// Recover to a random time inside the recoverable window.
        #[arg(long)]
        random: bool,
        /// SQL assertions, separated by ';': each must return true.
        #[arg(long, value_name = "FILE")]
        sql: Option<PathBuf>,
        /// Machine-readable JSON report.
        #[arg(long)]
        json: bool,
        /// Keep the scratch directory.
        #[arg(long)]
        keep: bool,
        /// Directory of the PostgreSQL programs [default: /usr/lib/postgresql/N/bin, pg_config, PATH].
        #[arg(long, value_name = "DIR")]
        pg_bin: Option<PathBuf>,
        /// Parallel download streams [default: number of CPUs].
        #[arg(long, value_name = "N")]
        jobs: Option<usize>,
        /// How long recovery may take.
        #[arg(long, value_name = "DURATION", default_value = "1h", value_parser = humantime::parse_duration)]
        timeout: std::time::Duration,
    },
    /// Delete backups and WAL that the retention policy no longer needs, never breaking the window.
    Expire {
        /// The retention policy (flags override the config file's [expire] table).
        #[command(flatten)]
        policy: crate::expire::Policy,
        /// List what would be deleted, delete nothing.
        #[arg(long)]
        dry_run: bool,
        /// Refuse to delete more objects than this without --force.
        #[arg(long, value_name = "N", default_value_t = 10_000)]
        max_delete: usize,
        /// Delete even more than --max-delete objects.
        #[arg(long)]
        force: bool,
    },
    /// Print Prometheus metrics: RPO exposure, newest segment, backups, window, last verify.
    Metrics,
    /// Show what the repository holds: timelines, WAL ranges and gaps, restore points, and the
    /// recoverable window.
    Info {
        /// Machine-readable JSON instead of the table.
        #[arg(long)]
        json: bool,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn help_lists_global_options_apart() {
        let help = Cli::try_parse_from(["pitr", "restore", "--help"])
            .unwrap_err()
            .to_string();
        let own = help.find("--target-dir").unwrap();
        let global = help
            .find("Global options:")
            .expect("a heading for global options");
        assert!(own < global, "{help}");
        assert!(!help[..global].contains("--repo <URL>"), "{help}");
        assert!(help[global..].contains("--repo <URL>"), "{help}");
        assert!(!help.to_lowercase().contains("pgbackrest"), "{help}");
    }
}
