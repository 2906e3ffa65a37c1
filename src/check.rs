//! `pitr check`: prove the archiving round trip works, as pgBackRest's `check` does.
//!
//! 1. `archive_mode` is on and `archive_command` calls `pitr … archive-push` for this repository;
//! 2. the repository is reachable and belongs to this cluster (system identifier);
//! 3. a restore point and `pg_switch_wal()` close a segment, and pitr waits (with a deadline) until
//!    that segment is in the repository.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::pg::WalFileName;
use crate::pgconn;
use crate::storage::layout::ObjectKey;
use crate::storage::{Repo, RepoError};

/// What `check` is asked to check.
#[derive(Clone, Debug)]
pub struct CheckOptions {
    /// The repository URL `archive_command` must archive into.
    pub repo_url: String,
    /// The config file in use (an `archive_command` naming it archives into its repository).
    pub config_path: Option<std::path::PathBuf>,
    /// Where to connect (libpq connection string or database name).
    pub dbname: Option<String>,
    /// How long to wait for the switched segment to arrive.
    pub timeout: Duration,
}

/// Run the check; returns the lines to print.
///
/// # Errors
/// The first thing that is wrong, with what to do about it.
pub async fn run(repo: &Repo, opts: &CheckOptions) -> anyhow::Result<Vec<String>> {
    let timeout = opts.timeout;
    let mut out = Vec::new();
    let cfg = pgconn::config(opts.dbname.as_deref(), None)?;
    let client = pgconn::connect(&cfg).await?;
    let row = client
        .query_one(
            "SELECT current_setting('archive_mode'), current_setting('archive_command'), current_setting('wal_level'), system_identifier::text, pg_is_in_recovery() FROM pg_control_system()",
            &[],
        )
        .await?;
    let (mode, command, level, sysid, in_recovery): (String, String, String, String, bool) =
        (row.get(0), row.get(1), row.get(2), row.get(3), row.get(4));
    let suggestion = format!(
        "archive_command = '/path/to/pitr --repo {} archive-push %p'",
        opts.repo_url
    );
    if in_recovery {
        bail!(
            "the server at {} is a standby; run pitr check against the primary",
            pgconn::describe(&cfg)
        );
    }
    if mode == "off" || level == "minimal" {
        bail!(
            "WAL archiving is off (archive_mode = {mode}, wal_level = {level}); set archive_mode = on, wal_level = replica and {suggestion}, then restart"
        );
    }
    out.push(format!("ok   archive_mode = {mode}, wal_level = {level}"));
    let points_here = command.contains("archive-push")
        && command.contains("pitr")
        && (command.contains(&opts.repo_url)
            || opts
                .config_path
                .as_ref()
                .is_some_and(|c| command.contains(&*c.to_string_lossy()))
            || !command.contains("--repo"));
    if !points_here {
        bail!(
            "archive_command is {command:?}, which does not archive into {} with pitr; set {suggestion}",
            opts.repo_url
        );
    }
    out.push(format!("ok   archive_command = {command}"));
    match repo.identity().await? {
        Some(id) if id.system_identifier.to_string() != sysid => {
            return Err(RepoError::IdentityMismatch {
                repo: repo.location().to_string(),
                repo_has: format!("cluster {}", id.system_identifier),
                found: format!("cluster {sysid}"),
            }
            .into());
        }
        Some(_) => out.push(format!(
            "ok   repository {} belongs to cluster {sysid}",
            repo.location()
        )),
        None => out.push(format!(
            "ok   repository {} is reachable (nothing archived yet)",
            repo.location()
        )),
    }

    client
        .query_one("SELECT pg_create_restore_point('pitr check')", &[])
        .await
        .context(
            "create a restore point (needs a superuser or EXECUTE on pg_create_restore_point)",
        )?;
    let seg: String = client
        .query_one("SELECT pg_walfile_name(pg_switch_wal())", &[])
        .await
        .context("switch WAL (needs a superuser or EXECUTE on pg_switch_wal)")?
        .get(0);
    let name: WalFileName = seg.parse()?;
    let start = Instant::now();
    loop {
        if repo.exists(&ObjectKey::Wal(name)).await? {
            break;
        }
        if start.elapsed() > timeout {
            bail!(
                "{seg} was not archived into {} within {}; look at pg_stat_archiver and the server log for archive_command failures",
                repo.location(),
                humantime::format_duration(timeout)
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    out.push(format!(
        "ok   {seg} reached the repository {:.1} s after pg_switch_wal()",
        start.elapsed().as_secs_f64()
    ));
    Ok(out)
}
