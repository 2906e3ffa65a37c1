//! Command-line arguments (the contract in DESIGN.md). Global flags are accepted before or after the
//! subcommand and each has an environment variable, since `archive_command` strings are awkward to
//! extend.

use std::path::PathBuf;

use clap::{ArgAction, Args, Parser, Subcommand};

use pitr::compress::Compression;

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
    /// Give it more than once for several (named repo1, repo2, … in that order, all required).
    #[arg(long, global = true, env = "PITR_REPO", value_name = "URL", action = ArgAction::Append)]
    pub repo: Vec<String>,
    /// Which repository a command that works on one uses (backup, restore, …) [default: the
    /// first]: a `[[repo]]` table's name, or repo1, repo2, … for --repo flags.
    #[arg(long, global = true, env = "PITR_REPO_NAME", value_name = "NAME")]
    pub repo_name: Option<String>,
    /// TOML config file [default: /etc/pitr/pitr.toml when it exists]: repositories, and any
    /// flag's default as a key (jobs = 4, [backup] type = "incr"); flags and environment override
    /// it.
    #[arg(long, global = true, env = "PITR_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// The config file's [cluster.NAME] to work on: its pgdata, repositories, retention, flags.
    #[arg(long, global = true, env = "PITR_CLUSTER", value_name = "NAME")]
    pub cluster: Option<String>,
    /// Compression of what archive-push and backup store [default: zstd, level 3]; other commands
    /// ignore it.
    #[arg(
        long,
        global = true,
        env = "PITR_COMPRESS",
        value_enum,
        value_name = "ALGO"
    )]
    pub compress: Option<CompressArg>,
    /// Encrypt the repository with the key in FILE (at least 32 bytes: `pitr key generate --out
    /// FILE` makes one). The key itself is never taken from the command line.
    #[arg(
        long,
        global = true,
        env = "PITR_ENCRYPTION_KEY_FILE",
        value_name = "FILE"
    )]
    pub encryption_key_file: Option<PathBuf>,
    /// Encrypt the repository with a key derived (argon2id) from the passphrase in FILE's first
    /// line.
    #[arg(
        long,
        global = true,
        env = "PITR_ENCRYPTION_PASSPHRASE_FILE",
        value_name = "FILE"
    )]
    pub encryption_passphrase_file: Option<PathBuf>,
    /// How long transient store failures (network errors, timeouts, 5xx answers) are retried:
    /// `30s`, `2m`, `0` for no retries [default: 60s for cloud stores, none for local
    /// directories]. Environment: PITR_RETRY_BUDGET (which the flag replaces).
    #[arg(long, global = true, value_name = "DURATION", value_parser = retry_budget)]
    pub retry_budget: Option<String>,
    /// Level of the messages on stderr and in --log-file [default: info; -v is debug, -q error].
    #[arg(
        long,
        global = true,
        env = "PITR_LOG_LEVEL",
        value_enum,
        value_name = "LEVEL"
    )]
    pub log_level: Option<super::logging::LogLevel>,
    /// Also append every message to FILE, one line each, and a record of every call (command,
    /// WAL name, exit code, duration, error): archive-push and archive-get get a history of
    /// their own.
    #[arg(long, global = true, env = "PITR_LOG_FILE", value_name = "FILE")]
    pub log_file: Option<PathBuf>,
    /// How lines are written: text, or json (one object per line with time, level, command,
    /// pid, message and the event's fields) [default: text].
    #[arg(
        long,
        global = true,
        env = "PITR_LOG_FORMAT",
        value_enum,
        value_name = "FORMAT"
    )]
    pub log_format: Option<super::logging::LogFormat>,
    /// More detail on stderr (-vv for even more).
    #[arg(short, long, global = true, action = ArgAction::Count)]
    pub verbose: u8,
    /// Only errors on stderr, and no plan or summary on stdout.
    #[arg(short, long, global = true)]
    pub quiet: bool,
}

/// `--retry-budget`: `0` or a duration.
fn retry_budget(v: &str) -> Result<String, String> {
    if v.trim() == "0" {
        return Ok("0".into());
    }
    humantime::parse_duration(v.trim())
        .map(|_| v.trim().to_string())
        .map_err(|e| format!("not a duration such as 30s or 2m ({e})"))
}

/// `--compress`: the command line's names for [`Compression`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum CompressArg {
    /// Zstandard at level 3: a good ratio at the speed archiving needs.
    Zstd,
    /// LZ4 block compression: faster, larger.
    Lz4,
    /// Stored as is.
    None,
}

impl From<CompressArg> for Compression {
    fn from(c: CompressArg) -> Compression {
        match c {
            CompressArg::Zstd => Compression::Zstd,
            CompressArg::Lz4 => Compression::Lz4,
            CompressArg::None => Compression::None,
        }
    }
}

/// The commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Archive one WAL file: archive_command = 'pitr archive-push %p'.
    ///
    /// Exits 0 only once the file is durably stored (or an identical copy already is); any failure
    /// exits 1 so PostgreSQL keeps the file and retries.
    ArchivePush(super::archive_push::Args),
    /// Fetch one WAL file: restore_command = 'pitr archive-get %f %p'.
    ///
    /// Exits 0 when written, 1 when the repository does not hold the file, 200 when the file exists
    /// but cannot be fetched intact (so recovery stops instead of ending early).
    ArchiveGet(super::archive_get::Args),
    /// Internal: the background prefetcher started by archive-get.
    #[command(hide = true)]
    ArchivePrefetch(super::archive_prefetch::Args),
    /// Internal: remove archive-get's prefetch spool when recovery ends (recovery_end_command).
    #[command(hide = true)]
    ArchiveSpoolClean(super::archive_prefetch::CleanArgs),
    /// Take a base backup of a running cluster (run on the database host).
    ///
    /// The backup is listed (and usable) only once its manifest is written, after every file is
    /// stored and the WAL from its start to its end is in the repository.
    Backup(super::backup::Args),
    /// Restore a base backup into an empty directory and configure PostgreSQL to recover to a target.
    ///
    /// The plan (backup, timeline, WAL) is checked against the repository's index before anything is
    /// written: a target outside the recoverable window is refused with the window.
    Restore(super::restore::Args),
    /// Create a standby from the newest backup: it catches up from the archive, then streams.
    Replica(super::replica::Args),
    /// Read back every object and check checksums, WAL continuity, backups against their manifests,
    /// and unexpected deletions. Exits 1 on any finding.
    Verify(super::verify::Args),
    /// Check that the server archives into this repository: settings, identity, and a WAL switch
    /// that must reach the repository.
    Check(super::check::Args),
    /// Restore into a scratch directory, start PostgreSQL there, and check it: target reached,
    /// pg_amcheck, data checksums, WAL continuity, your SQL assertions. Reports the measured RTO.
    Drill(super::drill::Args),
    /// Delete backups and WAL that the retention policy no longer needs, never breaking the window.
    Expire(super::expire::Args),
    /// Print Prometheus metrics: RPO exposure, newest segment, backups, window, last verify.
    Metrics,
    /// Copy the WAL and backups one repository holds and another lacks (--from NAME --to NAME),
    /// checking every object on read and after write; resumable, never overwriting.
    Copy(super::copy::Args),
    /// Stream WAL from the server over the replication protocol into the repository (runs in the
    /// foreground until stopped; each completed segment is stored as archive-push stores it).
    Receive(super::receive::Args),
    /// An encrypted repository's keys: generate a key file, add a key, list them, retire one
    /// (its objects are rewrapped by the active key, never re-encrypted).
    Key(super::key::Args),
    /// Show what the repository holds: timelines, WAL ranges and gaps, restore points, and the
    /// recoverable window.
    Info(super::info::Args),
    /// Print the completion script for a shell (bash, zsh, fish, elvish, powershell), e.g.
    /// `pitr completions bash > /etc/bash_completion.d/pitr`.
    Completions(super::docs::CompletionsArgs),
    /// Print the manual page `pitr.1`, or write it and one page per command with --dir DIR.
    Man(super::docs::ManArgs),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }

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
