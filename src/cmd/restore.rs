//! `pitr restore`: plan a restore to a target, check it, write it, say what recovery will do.

use super::{default_jobs, give_to_owner, mib, owner_ids, relocations, usage};
use anyhow::bail;
use pitr::config::Settings;
use pitr::exit;
use pitr::pg::{Lsn, TimelineId};
use pitr::repos::{RepoSet, Source};
use pitr::restore::exec::{self, Signal};
use pitr::restore::files::require_empty;
use pitr::restore::plan::{self, Request, TimelineChoice};
use pitr::restore::target::{Target, parse_time};
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(Debug, clap::Args)]
#[command(group(clap::ArgGroup::new("target").required(true).args(["to", "lsn", "xid", "name", "immediate", "latest"])))]
pub(crate) struct Args {
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
    action: ActionArg,
    #[command(flatten)]
    placement: super::Placement,
    /// Print the plan and exit without writing anything.
    #[arg(long)]
    dry_run: bool,
    /// Machine-readable JSON (the plan, and what was restored) instead of the text.
    #[arg(long)]
    json: bool,
    /// Whether the restored cluster archives once promoted: preserve the backup's settings, or
    /// off (for copies that must not archive into this repository).
    #[arg(
        long,
        value_enum,
        default_value = "preserve",
        value_name = "off|preserve"
    )]
    archive_mode: ArchiveModeArg,
}

/// `--action`: the command line's names for [`exec::Action`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum ActionArg {
    /// Pause at the target, read-only (PostgreSQL's default): inspect, then `pg_wal_replay_resume()`.
    Pause,
    /// End recovery at the target and open read-write on a new timeline.
    Promote,
    /// Stop the server at the target.
    Shutdown,
}

impl From<ActionArg> for exec::Action {
    fn from(a: ActionArg) -> exec::Action {
        match a {
            ActionArg::Pause => exec::Action::Pause,
            ActionArg::Promote => exec::Action::Promote,
            ActionArg::Shutdown => exec::Action::Shutdown,
        }
    }
}

/// `--archive-mode`: the command line's names for [`exec::ArchiveMode`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum ArchiveModeArg {
    /// Keep the backup's settings: once promoted it archives as the original did.
    Preserve,
    /// `archive_mode = off`: a copy that must not archive into the original's repository.
    Off,
}

impl From<ArchiveModeArg> for exec::ArchiveMode {
    fn from(a: ArchiveModeArg) -> exec::ArchiveMode {
        match a {
            ArchiveModeArg::Preserve => exec::ArchiveMode::Preserve,
            ArchiveModeArg::Off => exec::ArchiveMode::Off,
        }
    }
}

/// Run the command.
///
/// # Errors
/// Its failure, for `main` to report.
pub(crate) async fn run(args: Args, repos: &RepoSet, settings: &Settings) -> anyhow::Result<u8> {
    let Args {
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
        dry_run,
        json,
        archive_mode,
        placement:
            super::Placement {
                backup,
                tablespace_map,
                jobs,
                owner,
            },
    } = args;
    let (action, archive_mode): (exec::Action, exec::ArchiveMode) =
        (action.into(), archive_mode.into());

    let target = match (to, lsn, xid, name) {
        (Some(t), ..) => {
            let t = parse_time(&t).map_err(|e| usage(format!("--to: {e}")))?;
            if !json {
                crate::sayln!("target time  {} (UTC)", t.rfc3339());
            }
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
        repos,
        settings,
        &request,
        &RestoreTo {
            target_dir: &target_dir,
            tablespace_map: &tablespace_map,
            owner: owner.as_deref(),
            archive_mode,
        },
        default_jobs(jobs),
        Say { dry_run, json },
        action,
    )
    .await
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

/// Whether a restore only plans, and how it says what it does.
struct Say {
    /// `--dry-run`.
    dry_run: bool,
    /// `--json`.
    json: bool,
}

/// Where and how a restore writes.
struct RestoreTo<'a> {
    target_dir: &'a Path,
    tablespace_map: &'a [String],
    owner: Option<&'a str>,
    archive_mode: exec::ArchiveMode,
}

async fn restore(
    repos: &RepoSet,
    settings: &Settings,
    request: &Request,
    to: &RestoreTo<'_>,
    jobs: usize,
    Say { dry_run, json }: Say,
    action: exec::Action,
) -> anyhow::Result<u8> {
    let target_dir = to.target_dir;
    require_empty(target_dir)?;
    let Source {
        repo,
        catalog,
        plan,
        settings,
        name: source_name,
        ..
    } = super::source(repos, settings, request, !json).await?;
    let repo = &repo;
    let relocate = relocations(&plan.backup, to.tablespace_map)?;
    pitr::restore::files::preflight(&plan.backup, target_dir, &relocate)?;
    let owner = owner_ids(to.owner)?;
    let mut report = json.then(|| plan_json(&plan, &catalog, &source_name, target_dir, dry_run));
    if !json {
        crate::sayln!("{plan}");
        crate::sayln!("window       {}", plan::window_text(&catalog));
    }
    if dry_run {
        match &report {
            Some(r) => crate::outln!("{}", serde_json::to_string_pretty(r)?),
            None => crate::sayln!("dry run: nothing written"),
        }
        return Ok(exit::SUCCESS);
    }
    let commands = exec::RecoveryCommand::for_this_binary(&settings.passed_on())?;
    let mut lines = exec::recovery_settings(&plan, &commands, action);
    if to.archive_mode == exec::ArchiveMode::Off {
        lines.push(("archive_mode", "off".into()));
    }
    // The plan holds what the restore needs: the catalog's memory is the files'.
    drop(catalog);
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
    if let Some(r) = report.as_mut() {
        r["restored"] = serde_json::json!({
            "files": done.files,
            "bytes": done.bytes,
            "seconds": (secs * 1000.0).round() / 1000.0,
            "archiving": exec::archiving_summary(target_dir, to.archive_mode),
        });
        crate::outln!("{}", serde_json::to_string_pretty(r)?);
        return Ok(exit::SUCCESS);
    }
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
    let combined = match plan.parents.len() {
        0 => String::new(),
        n => format!(
            " ({}, combined with the {n} backup(s) it builds on)",
            plan.backup.backup_type
        ),
    };
    crate::sayln!(
        "restored backup {}{combined} into {}: {} files, {:.1} MiB in {:.1} s ({:.1} MiB/s); recovery.signal and recovery settings written.\nStart it with: pg_ctl -D {} start   ({then})",
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

/// `restore --json`'s plan: what would be (or was) restored, from where, and what recovery does.
fn plan_json(
    plan: &plan::Plan,
    catalog: &pitr::catalog::Catalog,
    repository: &str,
    target_dir: &Path,
    dry_run: bool,
) -> serde_json::Value {
    let chain: Vec<&str> = std::iter::once(&plan.backup)
        .chain(&plan.parents)
        .map(|b| b.id.as_str())
        .collect();
    serde_json::json!({
        "dry_run": dry_run,
        "repository": repository,
        "target_dir": target_dir,
        "backup": {
            "id": plan.backup.id,
            "type": plan.backup.backup_type,
            "stop_time": plan.backup.stop_time,
        },
        "chain": chain,
        "target": plan.target.to_string(),
        "exclusive": plan.exclusive,
        "timeline": plan.timeline,
        "recovery_target_timeline": plan.timeline_setting,
        "timeline_path": plan.path,
        "wal": {
            "first": plan.first_wal,
            "last": plan.last_wal,
            "segments": plan.wal_segments,
        },
        "stop": plan.stop,
        "window": catalog.window().map(pitr::info::WindowJson::from),
        "restored": serde_json::Value::Null,
    })
}
