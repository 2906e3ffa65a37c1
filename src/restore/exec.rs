//! Carry out a plan: lay the backup down, then configure recovery.
//!
//! Recovery settings are appended to `postgresql.auto.conf` (later lines win). Every recovery target
//! pitr does not set is written as an empty string, so a target left over in the backup's own
//! configuration can never combine with ours into "multiple recovery targets specified".
//! `restore_command` calls this same `pitr` binary (absolute path) with the same repository settings.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};

use super::files::{RestoredFiles, restore_files};
use super::plan::Plan;
use super::target::{Target, postgres_time};
use crate::durable;
use crate::pg::{SegNo, SegmentName, WalFileName};
use crate::storage::Repo;
use crate::storage::layout::Listed;

/// `recovery_target_action`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Pause at the target, read-only (PostgreSQL's default): inspect, then `pg_wal_replay_resume()`.
    Pause,
    /// End recovery at the target and open read-write on a new timeline.
    Promote,
    /// Stop the server at the target.
    Shutdown,
}

impl Action {
    fn as_str(self) -> &'static str {
        match self {
            Action::Pause => "pause",
            Action::Promote => "promote",
            Action::Shutdown => "shutdown",
        }
    }
}

/// `--archive-mode`: what the restored cluster does with `archive_mode` once it is promoted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ArchiveMode {
    /// Keep the backup's settings: once promoted it archives as the original did (a restore that
    /// replaces the original).
    Preserve,
    /// `archive_mode = off`: a copy that must not archive into the original's repository (tests,
    /// clones, drills).
    Off,
}

/// Where a restored data directory will archive once promoted, read from the configuration files
/// inside it (settings from files outside, such as Debian's /etc/postgresql, are not visible).
pub fn archiving_summary(target_dir: &std::path::Path, mode: ArchiveMode) -> String {
    if mode == ArchiveMode::Off {
        return "it will not archive (--archive-mode off wrote archive_mode = off)".into();
    }
    let mut found: HashMap<String, String> = HashMap::new();
    for file in ["postgresql.conf", "postgresql.auto.conf"] {
        let Ok(text) = std::fs::read_to_string(target_dir.join(file)) else {
            continue;
        };
        for line in text.lines() {
            let line = line.trim();
            if line.starts_with('#') {
                continue;
            }
            let Some((key, value)) = line.split_once('=') else {
                continue;
            };
            let key = key.trim();
            if key == "archive_mode" || key == "archive_command" {
                // Later lines win, as in PostgreSQL; quotes and a trailing comment go.
                let value = value.trim();
                let value = match value.strip_prefix('\'') {
                    Some(q) => q.rsplit_once('\'').map_or(q, |(v, _)| v),
                    None => value.split('#').next().unwrap_or("").trim(),
                };
                found.insert(key.to_string(), value.to_string());
            }
        }
    }
    let cmd = found.get("archive_command").filter(|c| !c.is_empty());
    match (found.get("archive_mode").map(String::as_str), cmd) {
        (Some("off"), _) => "it will not archive (archive_mode = off in its configuration)".into(),
        (Some(_), Some(cmd)) => format!(
            "once promoted it archives with archive_command = '{cmd}' (restore with --archive-mode off to prevent that)"
        ),
        _ => "its archive settings are not all in the data directory (they may be in /etc/postgresql): check archive_mode and archive_command before promoting it, or restore with --archive-mode off".into(),
    }
}

/// The two commands a recovering server runs: `restore_command` (archive-get through a `pitr`
/// binary with this repository's settings) and `recovery_end_command` (the prefetch spool's
/// cleanup). Built here only, for restore, replica and drill.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecoveryCommand {
    /// `restore_command`.
    pub restore: String,
    /// `recovery_end_command`.
    pub recovery_end: String,
}

impl RecoveryCommand {
    /// The commands for the `pitr` binary at `exe`, reading the repositories `global` names
    /// (`Settings::passed_on`: the config file, or each `--repo` and the key file, paths
    /// absolute: the server runs them from its data directory).
    pub fn new(exe: &Path, global: &[String]) -> RecoveryCommand {
        let exe = shell_quote(&exe.to_string_lossy());
        let mut words = vec![exe.clone()];
        words.extend(global.iter().map(|w| shell_quote(w)));
        words.extend(["archive-get".into(), "%f".into(), "%p".into()]);
        RecoveryCommand {
            restore: words.join(" "),
            recovery_end: format!(
                "{exe} archive-spool-clean pg_wal/{}",
                crate::archive::prefetch::SPOOL_DIR
            ),
        }
    }

    /// [`RecoveryCommand::new`] for this very binary.
    ///
    /// # Errors
    /// The binary's own path cannot be found.
    pub fn for_this_binary(global: &[String]) -> anyhow::Result<RecoveryCommand> {
        let exe = std::env::current_exe().context("find the path of this pitr binary")?;
        let exe = exe.canonicalize().unwrap_or(exe);
        Ok(RecoveryCommand::new(&exe, global))
    }
}

/// PostgreSQL's recovery target settings; at most one may be non-empty.
pub const RECOVERY_TARGETS: [&str; 5] = [
    "recovery_target",
    "recovery_target_lsn",
    "recovery_target_name",
    "recovery_target_time",
    "recovery_target_xid",
];

/// Quote one word for `/bin/sh`.
pub fn shell_quote(s: &str) -> String {
    if !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/._-:=@%+,".contains(&b))
    {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

/// Quote a value for postgresql.conf.
pub fn conf_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// The lines pitr appends to `postgresql.auto.conf` for a targeted recovery.
pub fn recovery_settings(
    plan: &Plan,
    commands: &RecoveryCommand,
    action: Action,
) -> Vec<(&'static str, String)> {
    let mut target: HashMap<&'static str, String> = HashMap::new();
    match &plan.target {
        Target::Time(t) => {
            target.insert("recovery_target_time", postgres_time(*t));
        }
        Target::Lsn(l) => {
            target.insert("recovery_target_lsn", l.to_string());
        }
        Target::Xid(x) => {
            target.insert("recovery_target_xid", x.to_string());
        }
        Target::Name(n) => {
            target.insert("recovery_target_name", n.clone());
        }
        Target::Immediate => {
            target.insert("recovery_target", "immediate".into());
        }
        Target::Latest => {}
    }
    let mut lines = vec![("restore_command", commands.restore.clone())];
    // Clear every other target first: PostgreSQL's assign hooks refuse any later recovery_target_*
    // line, even an empty one, once a different target is set.
    for key in RECOVERY_TARGETS {
        if !target.contains_key(key) {
            lines.push((key, String::new()));
        }
    }
    lines.extend(target);
    lines.push(("recovery_end_command", commands.recovery_end.clone()));
    lines.push((
        "recovery_target_inclusive",
        if plan.exclusive { "off" } else { "on" }.into(),
    ));
    lines.push(("recovery_target_timeline", plan.timeline_setting.clone()));
    lines.push(("recovery_target_action", action.as_str().into()));
    lines
}

/// The lines for a standby that catches up from the archive, then streams from its primary.
pub fn standby_settings(
    commands: &RecoveryCommand,
    primary_conninfo: &str,
    slot: Option<&str>,
) -> Vec<(&'static str, String)> {
    let mut lines = vec![
        ("restore_command", commands.restore.clone()),
        ("primary_conninfo", primary_conninfo.to_string()),
        ("primary_slot_name", slot.unwrap_or("").to_string()),
        ("recovery_target_timeline", "latest".to_string()),
        ("recovery_end_command", commands.recovery_end.clone()),
    ];
    for key in RECOVERY_TARGETS {
        lines.push((key, String::new()));
    }
    lines
}

/// Which signal file to create.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Signal {
    /// `recovery.signal`: targeted archive recovery.
    Recovery,
    /// `standby.signal`: a standby.
    Standby,
}

/// Every segment of the plan's replay that the catalog knew of only from a roll-up is stored (one
/// range listing per run): a segment removed by hand from a rolled range is found here, before a
/// byte is written, not by recovery.
///
/// # Errors
/// The first missing segment, named; store failures.
async fn require_rolled_wal(repo: &Repo, plan: &Plan) -> anyhow::Result<()> {
    if plan.rolled_wal.is_empty() {
        return Ok(());
    }
    let seg_size = repo.require_identity().await?.wal_segment_size;
    for &(tli, first, last) in &plan.rolled_wal {
        let listed = crate::rollup::list_segments(repo, tli, first, last, seg_size).await?;
        let stored: std::collections::BTreeSet<SegmentName> = listed
            .into_iter()
            .filter_map(|l| match l.what {
                Listed::Wal(WalFileName::Segment(s)) => Some(s),
                _ => None,
            })
            .collect();
        for n in first.0..=last.0 {
            let Some(name) = SegmentName::new(tli, SegNo(n), seg_size) else {
                continue;
            };
            if !stored.contains(&name) {
                bail!(
                    "WAL segment {name}, which this restore replays, is missing from {} although the WAL index's roll-up lists it (nothing was written; pitr verify removes the stale roll-up and reports the gap)",
                    repo.location()
                );
            }
        }
    }
    Ok(())
}

/// Restore `plan`'s backup into `target_dir` and configure recovery with `settings`.
///
/// # Errors
/// A non-empty target, a failed download or verification, a local write failure.
pub async fn execute(
    repo: &Repo,
    plan: &Plan,
    target_dir: &Path,
    relocate: &HashMap<u32, PathBuf>,
    jobs: usize,
    settings: &[(&'static str, String)],
    signal: Signal,
) -> anyhow::Result<RestoredFiles> {
    // Nothing is written into a directory that is not empty; once something is, a failure removes
    // it again, so the same command can simply be run again.
    super::files::preflight(&plan.backup, target_dir, relocate)?;
    require_rolled_wal(repo, plan).await?;
    let existed = super::files::existing_dirs(&plan.backup, target_dir, relocate);
    // A new data directory is claimed with a plain create: a second restore racing this one into
    // the same path fails here, before either could remove the other's work.
    if !target_dir.exists() {
        if let Some(parent) = target_dir.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("create {}", parent.display()))?;
        }
        std::fs::create_dir(target_dir)
            .with_context(|| format!("create target directory {}", target_dir.display()))?;
    }
    // Removes what was written on every way out but success: an error, and also a stop signal,
    // which drops this future (a half-restored directory must never be started).
    let mut guard = CleanupGuard {
        manifest: plan.backup.clone(),
        target: target_dir.to_path_buf(),
        relocate: relocate.clone(),
        existed,
        armed: true,
    };
    match write_all(repo, plan, target_dir, relocate, jobs, settings, signal).await {
        Ok(r) => {
            guard.armed = false;
            Ok(r)
        }
        Err(e) => Err(e.context(format!(
            "restore into {} (what pitr wrote there was removed: the same command can be run again)",
            target_dir.display()
        ))),
    }
}

/// See [`execute`].
struct CleanupGuard {
    manifest: crate::manifest::BackupManifest,
    target: PathBuf,
    relocate: HashMap<u32, PathBuf>,
    existed: Vec<(PathBuf, bool)>,
    armed: bool,
}

impl Drop for CleanupGuard {
    fn drop(&mut self) {
        if self.armed {
            super::files::remove_restored(
                &self.manifest,
                &self.target,
                &self.relocate,
                &self.existed,
            );
        }
    }
}

async fn write_all(
    repo: &Repo,
    plan: &Plan,
    target_dir: &Path,
    relocate: &HashMap<u32, PathBuf>,
    jobs: usize,
    settings: &[(&'static str, String)],
    signal: Signal,
) -> anyhow::Result<RestoredFiles> {
    let restored = restore_files(
        repo,
        &plan.backup,
        &plan.parents,
        target_dir,
        relocate,
        jobs,
    )
    .await?;
    let auto = target_dir.join("postgresql.auto.conf");
    let mut conf = std::fs::read(&auto).unwrap_or_default();
    if !conf.is_empty() && !conf.ends_with(b"\n") {
        conf.push(b'\n');
    }
    conf.extend_from_slice(
        format!(
            "# Added by pitr {} restoring backup {}: {}\n",
            env!("CARGO_PKG_VERSION"),
            plan.backup.id,
            plan.target
        )
        .as_bytes(),
    );
    for (k, v) in settings {
        conf.extend_from_slice(format!("{k} = {}\n", conf_quote(v)).as_bytes());
    }
    durable::write_atomically(&auto, &conf).with_context(|| format!("write {}", auto.display()))?;
    let (signal_name, other) = match signal {
        Signal::Recovery => ("recovery.signal", "standby.signal"),
        Signal::Standby => ("standby.signal", "recovery.signal"),
    };
    // A backup taken on a standby holds its standby.signal: left there, it would make a restore a
    // standby that never promotes (standby.signal wins over recovery.signal).
    match std::fs::remove_file(target_dir.join(other)) {
        Ok(()) => tracing::info!("removed the {other} the backup held (it was taken on a standby)"),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(anyhow::Error::new(e)
                .context(format!("remove {}", target_dir.join(other).display())));
        }
    }
    let signal_file = target_dir.join(signal_name);
    durable::write_atomically(&signal_file, b"")
        .with_context(|| format!("write {}", signal_file.display()))?;
    Ok(restored)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn where_a_restored_cluster_archives() {
        let dir = tempfile::tempdir().unwrap();
        assert!(archiving_summary(dir.path(), ArchiveMode::Off).contains("will not archive"));
        assert!(
            archiving_summary(dir.path(), ArchiveMode::Preserve)
                .contains("not all in the data directory")
        );
        std::fs::write(
            dir.path().join("postgresql.conf"),
            "archive_mode = on\narchive_command = 'pitr --repo file:///r archive-push %p' # here\n",
        )
        .unwrap();
        let s = archiving_summary(dir.path(), ArchiveMode::Preserve);
        assert!(
            s.contains("archive_command = 'pitr --repo file:///r archive-push %p'"),
            "{s}"
        );
        std::fs::write(
            dir.path().join("postgresql.auto.conf"),
            "archive_mode = 'off'\n",
        )
        .unwrap();
        assert!(archiving_summary(dir.path(), ArchiveMode::Preserve).contains("will not archive"));
    }

    #[test]
    fn the_target_comes_after_the_cleared_ones() {
        let plan_target = |t: Target| {
            super::super::plan::Plan {
            parents: vec![],
            backup: serde_json::from_value(serde_json::json!({
                "format_version": 1, "program_version": "t", "id": "b", "label": "b", "system_identifier": "1",
                "pg_version": 15, "timeline": 1, "start_lsn": "0/1", "checkpoint_lsn": "0/1", "stop_lsn": "0/2",
                "start_time": "2026-01-01T00:00:00.000000Z", "stop_time": "2026-01-01T00:00:00.000000Z",
                "start_wal": "000000010000000000000001", "stop_wal": "000000010000000000000001", "compression": "zstd", "files": [], "directories": [],
                "has_tablespace_map": false, "size_bytes": 0, "stored_bytes": 0
            }))
            .unwrap(),
            target: t,
            exclusive: true,
            timeline: crate::pg::TimelineId::ONE,
            timeline_setting: "1".into(),
            timeline_reason: String::new(),
            path: vec![],
            first_wal: crate::pg::SegmentName::new(crate::pg::TimelineId::ONE, crate::pg::SegNo(1), crate::pg::WalSegSize::DEFAULT).unwrap(),
            last_wal: crate::pg::SegmentName::new(crate::pg::TimelineId::ONE, crate::pg::SegNo(1), crate::pg::WalSegSize::DEFAULT).unwrap(),
            wal_segments: 1,
            stop: String::new(),
            rolled_wal: vec![],
        }
        };
        let commands = RecoveryCommand::new(
            Path::new("/usr/local/bin/pitr"),
            &["--repo".into(), "s3://b/p x".into()],
        );
        assert_eq!(
            commands.restore,
            "/usr/local/bin/pitr --repo 's3://b/p x' archive-get %f %p"
        );
        assert_eq!(
            commands.recovery_end,
            format!(
                "/usr/local/bin/pitr archive-spool-clean pg_wal/{}",
                crate::archive::prefetch::SPOOL_DIR
            )
        );
        let lines = recovery_settings(&plan_target(Target::Xid(735)), &commands, Action::Promote);
        let keys: Vec<&str> = lines.iter().map(|(k, _)| *k).collect();
        let xid = keys
            .iter()
            .position(|k| *k == "recovery_target_xid")
            .unwrap();
        for other in [
            "recovery_target",
            "recovery_target_lsn",
            "recovery_target_name",
            "recovery_target_time",
        ] {
            assert!(
                keys.iter().position(|k| *k == other).unwrap() < xid,
                "{other} must be cleared before the target"
            );
        }
        assert!(lines.contains(&("recovery_target_inclusive", "off".into())));
        assert!(lines.contains(&("recovery_target_action", "promote".into())));
        let latest = recovery_settings(&plan_target(Target::Latest), &commands, Action::Pause);
        let targets = RECOVERY_TARGETS;
        assert!(
            latest
                .iter()
                .filter(|(k, _)| targets.contains(k))
                .all(|(_, v)| v.is_empty())
        );
        assert_eq!(
            latest.iter().filter(|(k, _)| targets.contains(k)).count(),
            5
        );
    }

    #[test]
    fn quoting() {
        assert_eq!(shell_quote("/usr/local/bin/pitr"), "/usr/local/bin/pitr");
        assert_eq!(shell_quote("s3://bucket/prefix"), "s3://bucket/prefix");
        assert_eq!(shell_quote("/tmp/a b/it's"), "'/tmp/a b/it'\\''s'");
        assert_eq!(conf_quote("it's"), "'it''s'");
    }
}
