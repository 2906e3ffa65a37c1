//! `pitr replica`: a standby from the newest backup, with its replication slot checked.

use super::{default_jobs, give_to_owner, mib, owner_ids, relocations, usage};
use anyhow::{Context, bail};
use pitr::config::Settings;
use pitr::exit;
use pitr::repos::{RepoSet, Source};
use pitr::restore::exec::{self, Signal};
use pitr::restore::files::require_empty;
use pitr::restore::plan::{Request, TimelineChoice};
use pitr::restore::target::Target;
use std::path::PathBuf;
use std::time::Instant;

#[derive(Debug, clap::Args)]
pub(crate) struct Args {
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
    #[command(flatten)]
    placement: super::Placement,
}

/// Run the command.
///
/// # Errors
/// Its failure, for `main` to report.
pub(crate) async fn run(args: Args, repos: &RepoSet, settings: &Settings) -> anyhow::Result<u8> {
    let Args {
        target_dir,
        primary_conninfo,
        slot,
        create_slot,
        placement:
            super::Placement {
                backup,
                tablespace_map,
                jobs,
                owner,
            },
    } = args;

    require_empty(&target_dir)?;
    let owner_ids = owner_ids(owner.as_deref())?;
    // Checked before anything is written; created only once the standby exists, so a
    // failed restore leaves no slot holding WAL on the primary.
    let slot_to_create = match &slot {
        Some(slot) => check_slot(&primary_conninfo, slot, create_slot).await?,
        None => None,
    };
    // A standby never ends recovery at a gap: it asks again and streams from its primary.
    let request = Request {
        target: Target::Latest,
        exclusive: false,
        // The standby follows its primary's timeline whatever it is; the plan only picks
        // the backup.
        timeline: Some(TimelineChoice::Latest),
        backup,
        stop_at_gap: true,
    };
    let Source {
        repo,
        catalog,
        plan,
        settings,
        ..
    } = super::source(repos, settings, &request, true).await?;
    let repo = &repo;
    let relocate = relocations(&plan.backup, &tablespace_map)?;
    pitr::restore::files::preflight(&plan.backup, &target_dir, &relocate)?;
    crate::sayln!("{plan}");
    let commands = exec::RecoveryCommand::for_this_binary(&settings.passed_on())?;
    let lines = exec::standby_settings(&commands, &primary_conninfo, slot.as_deref());
    drop(catalog);
    let started = Instant::now();
    let done = exec::execute(
        repo,
        &plan,
        &target_dir,
        &relocate,
        default_jobs(jobs),
        &lines,
        Signal::Standby,
    )
    .await?;
    give_to_owner(owner_ids, &plan.backup, &target_dir, &relocate)?;
    if let Some((cfg, slot)) = slot_to_create {
        // A new connection: a restore can outlast an idle one.
        pitr::pgconn::connect(&cfg)
            .await
            .context("connect to the primary to create the replication slot")?
            .query_one(
                "SELECT pg_create_physical_replication_slot($1, true)::text",
                &[&slot],
            )
            .await
            .with_context(|| format!("create replication slot {slot:?} on the primary"))?;
        crate::sayln!("created physical replication slot {slot:?} on the primary");
    }
    crate::sayln!(
        "standby created in {} from backup {}: {} files, {:.1} MiB in {:.1} s. It replays the archive, then streams from its primary.\nStart it with: pg_ctl -D {} start",
        target_dir.display(),
        plan.backup.id,
        done.files,
        mib(done.bytes),
        started.elapsed().as_secs_f64(),
        target_dir.display()
    );
    Ok(exit::SUCCESS)
}

/// The replication slot a standby will use must exist on its primary, or the standby fails later
/// with "replication slot does not exist": check it (and create it with `--create-slot`) through an
/// ordinary connection made from the standby's `primary_conninfo`. A primary that only accepts
/// replication connections from that user cannot be asked: then a warning, and the restore goes on.
///
/// Returns the connection settings and slot name to create once the standby is restored, when it is
/// missing and `create` was asked for.
///
/// # Errors
/// The slot does not exist (and `--create-slot` was not given), or is not a physical one.
async fn check_slot(
    conninfo: &str,
    slot: &str,
    create: bool,
) -> anyhow::Result<Option<(tokio_postgres::Config, String)>> {
    let cfg = pitr::pgconn::config(Some(conninfo), None)
        .map_err(|e| usage(format!("--primary-conninfo: {e:#}")))?;
    let client = match pitr::pgconn::connect(&cfg).await {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(
                "could not connect to the primary ({}) to check replication slot {slot:?}: {e:#}; make sure it exists",
                pitr::pgconn::describe(&cfg)
            );
            return Ok(None);
        }
    };
    let found = client
        .query_opt(
            "SELECT slot_type FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .context("look up the replication slot on the primary")?;
    match found {
        Some(row) => {
            let kind: String = row.get(0);
            if kind != "physical" {
                bail!(
                    "replication slot {slot:?} on the primary is a {kind} slot; a standby needs a physical one"
                );
            }
            Ok(None)
        }
        None if create => Ok(Some((cfg, slot.to_string()))),
        None => bail!(
            "replication slot {slot:?} does not exist on the primary ({}); create it with --create-slot, or SELECT pg_create_physical_replication_slot('{slot}', true) there",
            pitr::pgconn::describe(&cfg)
        ),
    }
}
