//! `pitr info`: what the repository holds and the recoverable window, as a table or JSON.

use std::fmt::Write as _;

use pitr::catalog::Catalog;
use pitr::exit;
use pitr::info::{Info, TimelineJson};
use pitr::repos::RepoSet;

#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// Machine-readable JSON instead of the table.
    #[arg(long)]
    json: bool,
    /// One line for every [cluster.NAME] of the config file: its repository, recoverable window,
    /// newest backup and RPO (seconds since its latest recoverable commit).
    #[arg(long)]
    pub(crate) all: bool,
}

/// Run the command.
///
/// # Errors
/// Its failure, for `main` to report.
pub(crate) async fn run(args: Args, repos: &RepoSet) -> anyhow::Result<u8> {
    let Args { json, all: _ } = args;

    // Every repository's catalog at once; the chosen one's failure is the command's.
    let loaded = repos.catalogs().await;
    let chosen = repos.chosen()?;
    let catalog = match loaded.get(repos.chosen) {
        Some(Ok(c)) => c,
        _ => &Catalog::load(chosen).await?,
    };
    let info = Info::new(chosen.location(), catalog);
    let lags = RepoSet::lags(&loaded);
    let entries: Vec<RepoEntry> = repos
        .members
        .iter()
        .zip(&loaded)
        .zip(lags)
        .map(|((m, l), lag)| RepoEntry {
            name: m.spec.name.clone(),
            url: m.spec.url.clone(),
            required: m.spec.required,
            encrypted: m.repo.as_ref().is_ok_and(|r| r.keyring().is_some()),
            error: l.as_ref().err().cloned(),
            lag,
            info: l.as_ref().ok().map(|c| Info::new(&m.spec.url, c)),
        })
        .collect();
    let receive = pitr::receive::status(chosen).await;
    if json {
        let mut v = serde_json::to_value(&info)?;
        if let Some(o) = v.as_object_mut() {
            o.insert("repositories".into(), serde_json::to_value(&entries)?);
            if let Some(r) = &receive {
                o.insert("receive".into(), serde_json::to_value(r)?);
            }
        }
        crate::outln!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        crate::out!("{}", render(&info));
        if let Some(r) = &receive {
            crate::out!("{}", render_receive(r));
        }
        if repos.is_several() {
            crate::out!("{}", render_repositories(&entries));
        }
    }
    Ok(exit::SUCCESS)
}

/// One cluster in `info --all`.
#[derive(serde::Serialize)]
struct ClusterEntry {
    name: String,
    /// Its repository (the one a restore reads first).
    repository: Option<String>,
    /// Why it could not be read (`null` when it was).
    error: Option<String>,
    system_identifier: Option<pitr::pg::SystemId>,
    pg_version: Option<u32>,
    window: Option<pitr::info::WindowJson>,
    newest_backup: Option<pitr::info::BackupJson>,
    /// Seconds from its latest recoverable commit to now: what a loss of the server now would
    /// cost at most, were nothing more archived.
    rpo_seconds: Option<f64>,
}

/// `pitr info --all`: every cluster of the config file.
///
/// # Errors
/// No config file, or one without clusters. A cluster whose repository cannot be read is listed
/// with the reason and makes the exit code 1.
pub(crate) async fn run_all(
    args: &Args,
    overrides: &pitr::config::Overrides,
    file: Option<&pitr::config::ConfigFile>,
) -> anyhow::Result<u8> {
    use pitr::config::ConfigError;
    let names = file
        .map(pitr::config::ConfigFile::cluster_names)
        .unwrap_or_default();
    let Some(file) = file.filter(|_| !names.is_empty()) else {
        return Err(ConfigError::NoCluster(match file {
            Some(f) => format!(
                "info --all lists the [cluster.NAME] tables of {}, and it has none",
                f.path.display()
            ),
            None => {
                "info --all lists the [cluster.NAME] tables of the config file, and none was found"
                    .into()
            }
        })
        .into());
    };
    let now = pitr::pg::PgTimestamp::now();
    let mut entries = Vec::new();
    for name in names {
        let o = pitr::config::Overrides {
            cluster: Some(name.clone()),
            // Each cluster's own repositories, not the command line's.
            repo: Vec::new(),
            ..overrides.clone()
        };
        let mut e = ClusterEntry {
            name: name.clone(),
            repository: None,
            error: None,
            system_identifier: None,
            pg_version: None,
            window: None,
            newest_backup: None,
            rpo_seconds: None,
        };
        let loaded = async {
            let settings = pitr::config::resolve(&o, Some(file))?;
            e.repository = Some(settings.repo.clone());
            let repos = RepoSet::open(&settings, false, false).await;
            let repo = repos.chosen()?;
            anyhow::Ok((settings.repo.clone(), Catalog::load(repo).await))
        }
        .await;
        match loaded {
            Ok((url, catalog)) => match catalog {
                Ok(c) => {
                    let info = Info::new(&url, &c);
                    e.system_identifier = info.system_identifier;
                    e.pg_version = info.pg_version;
                    e.rpo_seconds = info
                        .window
                        .as_ref()
                        .and_then(|w| w.latest)
                        .map(|t| ((now.0 - t.0).max(0) / 1000) as f64 / 1000.0);
                    e.window = info.window;
                    e.newest_backup = info.backups.into_iter().rev().find(|b| b.restorable);
                }
                Err(err) => e.error = Some(pitr::error::one_line(&err)),
            },
            Err(err) => e.error = Some(pitr::error::one_line(&err)),
        }
        entries.push(e);
    }
    let failed = entries.iter().filter(|e| e.error.is_some()).count();
    if args.json {
        crate::outln!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({ "clusters": entries }))?
        );
    } else {
        crate::out!("{}", render_all(&entries));
    }
    Ok(super::exit_for_findings(failed))
}

fn render_all(entries: &[ClusterEntry]) -> String {
    let mut o = String::new();
    let _ = writeln!(
        o,
        "{:<12} {:<28} {:<28} {:<33} {:>7}  repository",
        "cluster", "window from", "window to", "newest backup", "RPO s"
    );
    for e in entries {
        let repo = e.repository.as_deref().unwrap_or("-");
        if let Some(err) = &e.error {
            let _ = writeln!(o, "{:<12} UNREADABLE: {err}  {repo}", e.name);
            continue;
        }
        let (from, to) = match &e.window {
            Some(w) => (
                w.earliest
                    .map_or("- (no backup)".to_string(), |t| t.rfc3339()),
                w.latest.map_or("-".to_string(), |t| t.rfc3339()),
            ),
            None => ("- (no WAL)".to_string(), "-".to_string()),
        };
        let newest = e.newest_backup.as_ref().map_or("-".to_string(), |b| {
            format!("{} {}", b.backup_type, b.stop_time.rfc3339())
        });
        let rpo = e.rpo_seconds.map_or("-".to_string(), |r| format!("{r:.0}"));
        let _ = writeln!(
            o,
            "{:<12} {from:<28} {to:<28} {newest:<33} {rpo:>7}  {repo}",
            e.name
        );
    }
    o
}

/// Where `pitr receive` stood when it last said.
fn render_receive(r: &pitr::receive::ReceiveStatus) -> String {
    let age = (pitr::pg::PgTimestamp::now().0 - r.updated_at.0) as f64 / 1e6;
    let behind = r.server_lsn.0.saturating_sub(r.stored_lsn.0);
    let state = if behind == 0 {
        "the repository holds all the server had".to_string()
    } else {
        format!("{behind} bytes behind the server")
    };
    format!(
        "\nreceive      from {} on timeline {}: stored up to {} ({state}), last update {} ({:.0} s ago)\n",
        r.server,
        r.timeline,
        r.stored_lsn,
        r.updated_at.rfc3339(),
        age.max(0.0)
    )
}

/// One repository in `info --json`'s `repositories[]`: its settings, its lag behind the most
/// advanced one, and the same fields `info` shows for the chosen one.
#[derive(serde::Serialize)]
struct RepoEntry {
    name: String,
    url: String,
    required: bool,
    encrypted: bool,
    /// Why it could not be read (`null` when it was).
    error: Option<String>,
    /// Segments and seconds behind the most advanced repository (`null` when unreadable).
    lag: Option<pitr::info::Lag>,
    #[serde(flatten)]
    info: Option<Info>,
}

fn render_repositories(entries: &[RepoEntry]) -> String {
    let mut o = String::new();
    let _ = writeln!(o, "\nrepositories");
    for e in entries {
        let state = match (&e.error, &e.lag) {
            (Some(err), _) => format!("UNREADABLE: {err}"),
            (None, Some(l)) if l.segments == 0 && l.seconds == 0.0 => "up to date".to_string(),
            (None, Some(l)) => format!("{} segment(s), {} s behind", l.segments, l.seconds),
            (None, None) => "up to date".to_string(),
        };
        let window = e
            .info
            .as_ref()
            .and_then(|i| i.window.as_ref())
            .and_then(|w| w.latest)
            .map(|t| format!(", window to {}", t.rfc3339()))
            .unwrap_or_default();
        let _ = writeln!(
            o,
            "  {:<10} {}{}{}: {state}{window}",
            e.name,
            e.url,
            if e.required { "" } else { " (not required)" },
            if e.encrypted { " (encrypted)" } else { "" },
        );
    }
    o
}

/// The human-readable report.
fn render(info: &Info) -> String {
    let mut o = String::new();
    let _ = writeln!(o, "repository   {}", info.repository);
    let (Some(id), Some(v), Some(sz)) = (
        &info.system_identifier,
        info.pg_version,
        info.wal_segment_size,
    ) else {
        let _ = writeln!(
            o,
            "\nThe repository is empty: nothing has been archived into it yet."
        );
        return o;
    };
    let _ = writeln!(
        o,
        "cluster      {id} (PostgreSQL {v}, {} MiB WAL segments)",
        sz.bytes() >> 20
    );
    wal(&mut o, &info.timelines);
    backups(&mut o, info);
    window(&mut o, info);
    if !info.index_problems.is_empty() {
        let _ = writeln!(
            o,
            "\nindex problems (the WAL is archived as PostgreSQL wrote it; `pitr verify` will check it)"
        );
        for p in &info.index_problems {
            let at = p.lsn.map_or(String::new(), |l| format!(" at {l}"));
            let _ = writeln!(o, "  {}{at}: {}", p.segment, p.reason);
        }
    }
    o
}

/// The WAL table: a line per run of segments, then gaps, partials and unindexed segments.
fn wal(o: &mut String, timelines: &[TimelineJson]) {
    let _ = writeln!(o, "\nWAL");
    let _ = writeln!(
        o,
        "  timeline parent  switch LSN   {:<51} latest commit",
        "archived segments"
    );
    for t in timelines {
        let parent = t.parent.map_or("-".to_string(), |p| p.to_string());
        let switch = t.switch_lsn.map_or("-".to_string(), |l| l.to_string());
        let latest = t
            .latest_commit
            .as_ref()
            .map_or("-".to_string(), |x| x.time.rfc3339());
        // A run as its first name and the last name's final 8 digits.
        let mut ranges = t.wal_ranges.iter().map(|r| {
            let last = r.last.to_string();
            format!("{}-{}", r.first, last.get(16..).unwrap_or(&last))
        });
        let first = ranges
            .next()
            .unwrap_or_else(|| "(history file only)".to_string());
        let _ = writeln!(
            o,
            "  {:<8} {:<7} {:<12} {:<51} {}",
            t.timeline, parent, switch, first, latest
        );
        for r in ranges {
            let _ = writeln!(o, "  {:<8} {:<7} {:<12} {}", "", "", "", r);
        }
        for g in &t.gaps {
            let _ = writeln!(
                o,
                "  {:<29}GAP: missing after {} and before {}",
                "", g.after, g.before
            );
        }
        for p in &t.partial_segments {
            let _ = writeln!(o, "  {:<29}{p}", "");
        }
        if t.unindexed_segments > 0 {
            let _ = writeln!(
                o,
                "  {:<29}{} segment(s) without an index summary",
                "", t.unindexed_segments
            );
        }
    }
}

/// The backups, incomplete ones and restore points.
fn backups(o: &mut String, info: &Info) {
    if info.backups.is_empty() {
        let _ = writeln!(o, "\nbackups      none yet");
    } else {
        let _ = writeln!(o, "\nbackups");
        let _ = writeln!(
            o,
            "  {:<18} {:<4} {:<18} {:<3} {:<28} {:<12} {:<12} {:>10} {:>10}",
            "id",
            "type",
            "parent",
            "tli",
            "stop time",
            "start LSN",
            "stop LSN",
            "size MiB",
            "stored MiB"
        );
        for b in &info.backups {
            let mut flag = match (&b.not_restorable_because, b.restorable) {
                (_, true) => String::new(),
                (Some(why), false) => format!("  NOT RESTORABLE: {why}"),
                (None, false) => "  NOT RESTORABLE".to_string(),
            };
            if b.checksum_failures > 0 {
                flag.push_str(&format!(
                    "  CHECKSUM FAILURES: {} damaged page(s) copied (pitr verify lists them)",
                    b.checksum_failures
                ));
            }
            let _ = writeln!(
                o,
                "  {:<18} {:<4} {:<18} {:<3} {:<28} {:<12} {:<12} {:>10.1} {:>10.1}{flag}",
                b.id,
                b.backup_type.to_string(),
                b.parent.as_deref().unwrap_or("-"),
                b.timeline,
                b.stop_time.rfc3339(),
                b.start_lsn.to_string(),
                b.stop_lsn.to_string(),
                super::mib(b.size_bytes),
                super::mib(b.stored_bytes)
            );
        }
    }
    for id in &info.incomplete_backups {
        let _ = writeln!(
            o,
            "  {id:<18} incomplete (no manifest: interrupted or still running), not restorable"
        );
    }
    if !info.restore_points.is_empty() {
        let _ = writeln!(o, "\nrestore points");
        for r in &info.restore_points {
            let _ = writeln!(
                o,
                "  {:<24} {}  LSN {:<12} timeline {}",
                r.name,
                r.time.rfc3339(),
                r.lsn.to_string(),
                r.timeline
            );
        }
    }
}

/// The recoverable window, and each live branch's when histories diverge (a restore to a time
/// after the fork must say which one it means).
fn window(o: &mut String, info: &Info) {
    let _ = writeln!(o, "\nrecoverable window");
    match &info.window {
        Some(w) => {
            let earliest = w.earliest.map_or(
                "- (no base backup yet: nothing is restorable until one completes)".to_string(),
                |t| t.rfc3339(),
            );
            let latest = w.latest.map_or(
                if w.earliest.is_some() {
                    "- (no commit archived after the backup yet)".to_string()
                } else {
                    "- (no commit in the archived WAL)".to_string()
                },
                |t| t.rfc3339(),
            );
            let _ = writeln!(o, "  earliest   {earliest}");
            let _ = writeln!(
                o,
                "  latest     {latest}  (timeline {}, WAL contiguous to {})",
                w.latest_timeline, w.wal_end_segment
            );
        }
        None => {
            let _ = writeln!(o, "  - (no WAL archived)");
        }
    }
    let live: Vec<&TimelineJson> = info.timelines.iter().filter(|t| t.live).collect();
    if live.len() > 1 {
        let _ = writeln!(
            o,
            "\n{} live branches: more than one server archives into this repository (a promoted copy, or a split brain); restores to times after the fork need --timeline",
            live.len()
        );
        for t in live {
            let Some(w) = &t.window else { continue };
            let _ = writeln!(
                o,
                "  timeline {:<4} {} to {}  (WAL contiguous to {})",
                t.timeline,
                w.earliest.map_or("-".to_string(), |x| x.rfc3339()),
                w.latest.map_or("-".to_string(), |x| x.rfc3339()),
                w.wal_end_segment
            );
        }
    }
}
