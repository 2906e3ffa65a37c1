//! The commands behind the CLI: each takes parsed arguments, does its work through the library, and
//! returns the exit code. Output for people goes to stdout; logs and errors to stderr.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, bail};

use crate::backup::{self, BackupOptions};
use crate::catalog::Catalog;
use crate::cli::Command;
use crate::config::Settings;
use crate::exit;
use crate::info::Info;
use crate::pg::{Lsn, TimelineId};
use crate::restore::exec::{self, Signal};
use crate::restore::files::require_empty;
use crate::restore::plan::{self, Request, TimelineChoice};
use crate::restore::target::{Target, parse_time};
use crate::storage::Repo;

fn mib(b: u64) -> f64 {
    b as f64 / 1048576.0
}

fn default_jobs(jobs: Option<usize>) -> usize {
    jobs.unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()))
        .max(1)
}

/// Run a repository command (everything but archive-push/get).
///
/// # Errors
/// The command's failure, for `main` to report.
pub async fn run(
    command: Command,
    repo: &Repo,
    settings: &Settings,
    quiet: bool,
) -> anyhow::Result<u8> {
    match command {
        Command::Info { json } => {
            let catalog = Catalog::load(repo).await?;
            let info = Info::new(repo.location(), &catalog);
            if json {
                crate::outln!("{}", serde_json::to_string_pretty(&info)?);
            } else {
                crate::out!("{}", info.render());
            }
            Ok(exit::SUCCESS)
        }
        Command::Backup {
            pgdata,
            dbname,
            label,
            jobs,
            archive_timeout,
            json,
        } => {
            let opts = BackupOptions {
                pgdata,
                dbname,
                label,
                jobs: default_jobs(jobs),
                compression: settings.compress,
                archive_timeout,
                progress: !quiet,
            };
            let started = Instant::now();
            let m = backup::run(repo, &opts).await?;
            let secs = started.elapsed().as_secs_f64();
            if json {
                let summary = serde_json::json!({
                    "id": m.id, "label": m.label, "timeline": m.timeline,
                    "start_lsn": m.start_lsn, "stop_lsn": m.stop_lsn,
                    "start_time": m.start_time, "stop_time": m.stop_time,
                    "start_wal": m.start_wal, "stop_wal": m.stop_wal,
                    "files": m.files.len(), "size_bytes": m.size_bytes, "stored_bytes": m.stored_bytes,
                    "compression": m.compression, "jobs": opts.jobs, "duration_seconds": secs,
                    "throughput_mib_per_second": mib(m.size_bytes) / secs.max(1e-9),
                });
                crate::outln!("{}", serde_json::to_string_pretty(&summary)?);
            } else {
                crate::sayln!(
                    "backup {} complete: {} files, {:.1} MiB copied, {:.1} MiB stored ({}), {:.1} s, {:.1} MiB/s; WAL {} to {}",
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
            }
            Ok(exit::SUCCESS)
        }
        Command::Restore {
            target_dir,
            to,
            lsn,
            xid,
            name,
            immediate,
            latest,
            stop_at_gap,
            exclusive,
            timeline,
            action,
            backup,
            tablespace_map,
            jobs,
            dry_run,
            archive_mode,
            owner,
        } => {
            let target = match (to, lsn, xid, name) {
                (Some(t), ..) => {
                    let t = parse_time(&t).map_err(|e| usage(format!("--to: {e}")))?;
                    crate::sayln!("target time  {} (UTC)", t.rfc3339());
                    Target::Time(t)
                }
                (_, Some(l), ..) => {
                    Target::Lsn(l.parse::<Lsn>().map_err(|e| usage(format!("--lsn: {e}")))?)
                }
                (_, _, Some(x), _) => Target::Xid(x),
                (_, _, _, Some(n)) => Target::Name(n),
                _ if immediate => Target::Immediate,
                _ if latest => Target::Latest,
                _ => bail!("name a target: --to, --lsn, --xid, --name, --immediate or --latest"),
            };
            let timeline = timeline.as_deref().map(parse_timeline).transpose()?;
            let request = Request {
                target,
                exclusive,
                timeline,
                backup,
                stop_at_gap,
            };
            restore(
                repo,
                settings,
                &request,
                &RestoreTo {
                    target_dir: &target_dir,
                    tablespace_map: &tablespace_map,
                    owner: owner.as_deref(),
                    archive_mode,
                },
                default_jobs(jobs),
                dry_run,
                action,
            )
            .await
        }
        Command::Replica {
            target_dir,
            primary_conninfo,
            slot,
            backup,
            tablespace_map,
            jobs,
            owner,
            create_slot,
        } => {
            require_empty(&target_dir)?;
            let owner_ids = owner_ids(owner.as_deref())?;
            // Checked before anything is written; created only once the standby exists, so a
            // failed restore leaves no slot holding WAL on the primary.
            let slot_to_create = match &slot {
                Some(slot) => check_slot(&primary_conninfo, slot, create_slot).await?,
                None => None,
            };
            let catalog = Catalog::load(repo).await?;
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
            let plan = plan::plan(&catalog, &request)?;
            let relocate = relocations(&plan.backup, &tablespace_map)?;
            crate::restore::files::preflight(&plan.backup, &target_dir, &relocate)?;
            crate::sayln!("{plan}");
            let cmd = exec::restore_command(repo.location(), settings.config_path.as_deref())?;
            let lines = exec::standby_settings(
                &cmd,
                &exec::spool_cleanup_command()?,
                &primary_conninfo,
                slot.as_deref(),
            );
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
                crate::pgconn::connect(&cfg)
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
        Command::Verify { json, jobs } => {
            let jobs = jobs.unwrap_or_else(|| 4 * default_jobs(None));
            let report = crate::verify::run(repo, jobs).await?;
            if json {
                crate::outln!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                for f in &report.findings {
                    crate::outln!("{:<8} {}: {}", f.kind.to_uppercase(), f.object, f.detail);
                }
                crate::outln!(
                    "verify: {} objects ({:.1} MiB of data, {:.1} MiB stored) and {} backup(s) checked: {}",
                    report.objects_checked,
                    mib(report.bytes_checked),
                    mib(report.stored_bytes_checked),
                    report.backups_checked,
                    if report.findings.is_empty() {
                        "no problems".to_string()
                    } else {
                        format!("{} problem(s)", report.findings.len())
                    }
                );
            }
            Ok(if report.findings.is_empty() {
                exit::SUCCESS
            } else {
                exit::FAILURE
            })
        }
        Command::Check {
            dbname,
            archive_timeout,
        } => {
            for line in
                crate::check::run(repo, settings, dbname.as_deref(), archive_timeout).await?
            {
                crate::outln!("{line}");
            }
            crate::outln!("check: archiving into {} works", repo.location());
            Ok(exit::SUCCESS)
        }
        Command::Drill {
            to,
            random,
            sql,
            json,
            keep,
            pg_bin,
            jobs,
            timeout,
        } => {
            let target = match (to, random) {
                (Some(t), _) => {
                    Target::Time(parse_time(&t).map_err(|e| usage(format!("--to: {e}")))?)
                }
                (None, true) => crate::drill::random_target(&Catalog::load(repo).await?)?,
                (None, false) => Target::Latest,
            };
            let opts = crate::drill::DrillOptions {
                target,
                sql,
                keep,
                pg_bin,
                jobs: default_jobs(jobs),
                timeout,
            };
            let report = crate::drill::run(repo, settings, &opts).await?;
            if json {
                crate::outln!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                crate::outln!(
                    "drill: backup {} restored to {}: restore {:.1} s + recovery {:.1} s = RTO {:.1} s",
                    report.backup,
                    report.target,
                    report.restore_seconds,
                    report.recovery_seconds,
                    report.rto_seconds
                );
                for c in &report.checks {
                    crate::outln!(
                        "  {:<5} {}: {}",
                        if c.ok { "ok" } else { "FAIL" },
                        c.name,
                        c.detail
                    );
                }
                if let Some(s) = &report.scratch {
                    crate::outln!("  kept  {s}");
                }
                crate::outln!("drill: {}", if report.ok { "PASSED" } else { "FAILED" });
            }
            Ok(if report.ok {
                exit::SUCCESS
            } else {
                exit::FAILURE
            })
        }
        Command::Expire {
            policy: flags,
            dry_run,
            max_delete,
            force,
        } => {
            let policy = if flags.is_empty() {
                settings.expire.clone()
            } else {
                flags
            };
            let now = crate::pg::xlogrecord::PgTimestamp::from_unix_micros(
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_micros() as i64),
            );
            crate::sayln!("before: {}", plan::window_text(&Catalog::load(repo).await?));
            let (outcome, deletions) =
                crate::expire::run(repo, &policy, now, dry_run, max_delete, force).await?;
            let verb = if dry_run { "would delete" } else { "deleted" };
            let mut expired = outcome.backups.clone();
            expired.sort();
            for b in &expired {
                crate::sayln!("{verb} backup {b}");
            }
            for b in &outcome.abandoned {
                crate::sayln!(
                    "{verb} interrupted backup {b} (no manifest, nothing written for a day)"
                );
            }
            crate::sayln!(
                "{verb} {} object(s): {} backup(s), {} WAL file(s) before {}; kept backups: {}",
                outcome.objects,
                outcome.backups.len(),
                outcome.wal_files,
                outcome
                    .wal_kept_from
                    .as_deref()
                    .unwrap_or("(no backup kept)"),
                outcome.kept.join(", ")
            );
            if !outcome.staging_files.is_empty() {
                crate::sayln!(
                    "{verb} {} staging file(s) left by interrupted pushes or puts:",
                    outcome.staging_files.len()
                );
                for path in &outcome.staging_files {
                    crate::sayln!("  {path}");
                }
            }
            if dry_run {
                let mut sorted = deletions.clone();
                sorted.sort();
                for key in &sorted {
                    crate::outln!("  {key}");
                }
                crate::sayln!("after:  {} (once expired)", outcome.window_after);
            } else {
                crate::sayln!("after:  {}", plan::window_text(&Catalog::load(repo).await?));
            }
            Ok(exit::SUCCESS)
        }
        Command::Metrics => {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64());
            crate::out!("{}", crate::metrics::render(repo, now).await?);
            Ok(exit::SUCCESS)
        }
        Command::ArchivePush { .. }
        | Command::ArchiveGet { .. }
        | Command::ArchivePrefetch { .. }
        | Command::ArchiveSpoolClean { .. } => {
            bail!("archive-push and archive-get are run by main")
        }
    }
}

fn usage(msg: String) -> anyhow::Error {
    crate::error::UsageError(msg).into()
}

fn parse_timeline(s: &str) -> anyhow::Result<TimelineChoice> {
    Ok(match s {
        "latest" => TimelineChoice::Latest,
        "current" => TimelineChoice::Current,
        n => {
            let bad = || {
                usage(format!(
                    "--timeline {n:?}: expected latest, current or a timeline number (1 or more)"
                ))
            };
            let n: u32 = n.parse().map_err(|_| bad())?;
            TimelineChoice::Id(TimelineId::new(n).ok_or_else(bad)?)
        }
    })
}

/// `--tablespace-map OLD=NEW`, OLD being an OID or the original location.
fn relocations(
    b: &crate::backup::manifest::BackupManifest,
    specs: &[String],
) -> anyhow::Result<HashMap<u32, PathBuf>> {
    let mut out = HashMap::new();
    for spec in specs {
        let (old, new) = spec
            .split_once('=')
            .ok_or_else(|| usage(format!("--tablespace-map {spec:?}: expected OLD=NEW")))?;
        let ts = b
            .tablespaces
            .iter()
            .find(|t| t.oid.to_string() == old || t.location == old)
            .ok_or_else(|| {
                let known: Vec<String> = b
                    .tablespaces
                    .iter()
                    .map(|t| format!("{} ({})", t.oid, t.location))
                    .collect();
                usage(format!(
                    "--tablespace-map: backup {} has no tablespace {old:?} (it has: {})",
                    b.id,
                    if known.is_empty() {
                        "none".to_string()
                    } else {
                        known.join(", ")
                    }
                ))
            })?;
        let new = Path::new(new);
        if !new.is_absolute() {
            return Err(usage(format!(
                "--tablespace-map: {} must be an absolute path",
                new.display()
            )));
        }
        out.insert(ts.oid, new.to_path_buf());
    }
    Ok(out)
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
    let cfg = crate::pgconn::config(Some(conninfo), None)
        .map_err(|e| usage(format!("--primary-conninfo: {e:#}")))?;
    let client = match crate::pgconn::connect(&cfg).await {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(
                "could not connect to the primary ({}) to check replication slot {slot:?}: {e:#}; make sure it exists",
                crate::pgconn::describe(&cfg)
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
            crate::pgconn::describe(&cfg)
        ),
    }
}

/// Where and how a restore writes.
struct RestoreTo<'a> {
    target_dir: &'a Path,
    tablespace_map: &'a [String],
    owner: Option<&'a str>,
    archive_mode: exec::ArchiveMode,
}

/// `--owner USER` as uid and gid. Run as root without it, a restore would leave a data directory
/// PostgreSQL refuses to start from: refused.
fn owner_ids(owner: Option<&str>) -> anyhow::Result<Option<(u32, u32)>> {
    match owner {
        Some(name) => Ok(Some(crate::users::lookup(name)?.ok_or_else(|| {
            usage(format!("--owner {name}: there is no such user"))
        })?)),
        None if crate::users::is_root() => Err(usage(
            "running as root, the restored files would belong to root and PostgreSQL would not start from them: run pitr as the user that runs PostgreSQL (sudo -u postgres pitr …), or pass --owner postgres".into(),
        )),
        None => Ok(None),
    }
}

/// Give the restored data directory and every tablespace location (relocated or not) to
/// `--owner`.
fn give_to_owner(
    owner: Option<(u32, u32)>,
    manifest: &crate::backup::manifest::BackupManifest,
    target_dir: &Path,
    relocate: &HashMap<u32, PathBuf>,
) -> anyhow::Result<()> {
    let Some((uid, gid)) = owner else {
        return Ok(());
    };
    for dir in crate::restore::files::restored_dirs(manifest, target_dir, relocate) {
        crate::users::chown_tree(&dir, uid, gid)?;
    }
    Ok(())
}

async fn restore(
    repo: &Repo,
    settings: &Settings,
    request: &Request,
    to: &RestoreTo<'_>,
    jobs: usize,
    dry_run: bool,
    action: exec::Action,
) -> anyhow::Result<u8> {
    let target_dir = to.target_dir;
    require_empty(target_dir)?;
    let catalog = Catalog::load(repo).await?;
    let plan = plan::plan(&catalog, request)?;
    let relocate = relocations(&plan.backup, to.tablespace_map)?;
    crate::restore::files::preflight(&plan.backup, target_dir, &relocate)?;
    let owner = owner_ids(to.owner)?;
    crate::sayln!("{plan}");
    crate::sayln!("window       {}", plan::window_text(&catalog));
    if dry_run {
        crate::sayln!("dry run: nothing written");
        return Ok(exit::SUCCESS);
    }
    let cmd = exec::restore_command(repo.location(), settings.config_path.as_deref())?;
    let mut lines = exec::recovery_settings(&plan, &cmd, &exec::spool_cleanup_command()?, action);
    if to.archive_mode == exec::ArchiveMode::Off {
        lines.push(("archive_mode", "off".into()));
    }
    let started = Instant::now();
    let done = exec::execute(
        repo,
        &plan,
        target_dir,
        &relocate,
        jobs,
        &lines,
        Signal::Recovery,
    )
    .await?;
    give_to_owner(owner, &plan.backup, target_dir, &relocate)?;
    let secs = started.elapsed().as_secs_f64();
    let then = match (&plan.target, action) {
        // Without a target PostgreSQL ignores recovery_target_action and promotes at the end of WAL.
        (Target::Latest, _) => format!(
            "recovery then replays the archived WAL to the end of {} and promotes to a new timeline",
            plan.last_wal
        ),
        (_, exec::Action::Pause) => {
            "recovery then stops at the target and pauses: check the data, then SELECT pg_wal_replay_resume() to promote".into()
        }
        (_, exec::Action::Promote) => "recovery then stops at the target and promotes".into(),
        (_, exec::Action::Shutdown) => "recovery then stops at the target and shuts down".into(),
    };
    crate::sayln!(
        "restored backup {} into {}: {} files, {:.1} MiB in {:.1} s ({:.1} MiB/s); recovery.signal and recovery settings written.\nStart it with: pg_ctl -D {} start   ({then})",
        plan.backup.id,
        target_dir.display(),
        done.files,
        mib(done.bytes),
        secs,
        mib(done.bytes) / secs.max(1e-9),
        target_dir.display(),
    );
    crate::sayln!(
        "archiving    {}",
        exec::archiving_summary(target_dir, to.archive_mode)
    );
    Ok(exit::SUCCESS)
}
