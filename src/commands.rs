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
                println!("{}", serde_json::to_string_pretty(&info)?);
            } else {
                print!("{}", info.render());
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
                println!("{}", serde_json::to_string_pretty(&summary)?);
            } else {
                println!(
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
            exclusive,
            timeline,
            action,
            backup,
            tablespace_map,
            jobs,
            dry_run,
        } => {
            let target = match (to, lsn, xid, name) {
                (Some(t), ..) => {
                    let t = parse_time(&t)?;
                    println!("target time  {} (UTC)", t.rfc3339());
                    Target::Time(t)
                }
                (_, Some(l), ..) => Target::Lsn(l.parse::<Lsn>()?),
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
            };
            restore(
                repo,
                settings,
                &request,
                &target_dir,
                &tablespace_map,
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
        } => {
            require_empty(&target_dir)?;
            let catalog = Catalog::load(repo).await?;
            let request = Request {
                target: Target::Latest,
                exclusive: false,
                timeline: None,
                backup,
            };
            let plan = plan::plan(&catalog, &request)?;
            let relocate = relocations(&plan.backup, &tablespace_map)?;
            println!("{plan}");
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
            println!(
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
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                for f in &report.findings {
                    println!("{:<8} {}: {}", f.kind.to_uppercase(), f.object, f.detail);
                }
                println!(
                    "verify: {} objects ({:.1} MiB) and {} backup(s) checked: {}",
                    report.objects_checked,
                    mib(report.bytes_checked),
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
                println!("{line}");
            }
            println!("check: archiving into {} works", repo.location());
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
                (Some(t), _) => Target::Time(parse_time(&t)?),
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
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                println!(
                    "drill: backup {} restored to {}: restore {:.1} s + recovery {:.1} s = RTO {:.1} s",
                    report.backup,
                    report.target,
                    report.restore_seconds,
                    report.recovery_seconds,
                    report.rto_seconds
                );
                for c in &report.checks {
                    println!(
                        "  {:<5} {}: {}",
                        if c.ok { "ok" } else { "FAIL" },
                        c.name,
                        c.detail
                    );
                }
                if let Some(s) = &report.scratch {
                    println!("  kept  {s}");
                }
                println!("drill: {}", if report.ok { "PASSED" } else { "FAILED" });
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
            println!("before: {}", plan::window_text(&Catalog::load(repo).await?));
            let (outcome, deletions) =
                crate::expire::run(repo, &policy, now, dry_run, max_delete, force).await?;
            let verb = if dry_run { "would delete" } else { "deleted" };
            for b in &outcome.backups {
                println!("{verb} backup {b}");
            }
            println!(
                "{verb} {} object(s): {} backup(s), {} WAL file(s) before segment number {}; kept backups: {}",
                outcome.objects,
                outcome.backups.len(),
                outcome.wal_files,
                outcome.wal_before.unwrap_or(0),
                outcome.kept.join(", ")
            );
            if !outcome.staging_files.is_empty() {
                println!(
                    "{verb} {} staging file(s) left by interrupted pushes or puts:",
                    outcome.staging_files.len()
                );
                for path in &outcome.staging_files {
                    println!("  {path}");
                }
            }
            if dry_run {
                for key in &deletions {
                    println!("  {key}");
                }
            } else {
                println!("after:  {}", plan::window_text(&Catalog::load(repo).await?));
            }
            Ok(exit::SUCCESS)
        }
        Command::Metrics => {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64());
            print!("{}", crate::metrics::render(repo, now).await?);
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

fn parse_timeline(s: &str) -> anyhow::Result<TimelineChoice> {
    Ok(match s {
        "latest" => TimelineChoice::Latest,
        "current" => TimelineChoice::Current,
        n => {
            let n: u32 = n.parse().with_context(|| {
                format!("--timeline {n:?}: expected latest, current or a timeline number")
            })?;
            TimelineChoice::Id(TimelineId::new(n).context("timeline 0 does not exist")?)
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
            .with_context(|| format!("--tablespace-map {spec:?}: expected OLD=NEW"))?;
        let ts = b
            .tablespaces
            .iter()
            .find(|t| t.oid.to_string() == old || t.location == old)
            .with_context(|| {
                format!(
                    "--tablespace-map: backup {} has no tablespace {old:?}",
                    b.id
                )
            })?;
        let new = Path::new(new);
        if !new.is_absolute() {
            bail!(
                "--tablespace-map: {} must be an absolute path",
                new.display()
            );
        }
        out.insert(ts.oid, new.to_path_buf());
    }
    Ok(out)
}

#[allow(clippy::too_many_arguments)]
async fn restore(
    repo: &Repo,
    settings: &Settings,
    request: &Request,
    target_dir: &Path,
    tablespace_map: &[String],
    jobs: usize,
    dry_run: bool,
    action: exec::Action,
) -> anyhow::Result<u8> {
    if !dry_run {
        require_empty(target_dir)?;
    }
    let catalog = Catalog::load(repo).await?;
    let plan = plan::plan(&catalog, request)?;
    let relocate = relocations(&plan.backup, tablespace_map)?;
    println!("{plan}");
    println!("window       {}", plan::window_text(&catalog));
    if dry_run {
        println!("dry run: nothing written");
        return Ok(exit::SUCCESS);
    }
    let cmd = exec::restore_command(repo.location(), settings.config_path.as_deref())?;
    let lines = exec::recovery_settings(&plan, &cmd, &exec::spool_cleanup_command()?, action);
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
    let secs = started.elapsed().as_secs_f64();
    println!(
        "restored backup {} into {}: {} files, {:.1} MiB in {:.1} s ({:.1} MiB/s); recovery.signal and recovery settings written.\nStart it with: pg_ctl -D {} start   (recovery then stops at the target and {}s)",
        plan.backup.id,
        target_dir.display(),
        done.files,
        mib(done.bytes),
        secs,
        mib(done.bytes) / secs.max(1e-9),
        target_dir.display(),
        match action {
            exec::Action::Pause => "pause",
            exec::Action::Promote => "promote",
            exec::Action::Shutdown => "shut",
        }
    );
    Ok(exit::SUCCESS)
}
