//! `pitr expire`: retention that never breaks the recoverable window.
//!
//! The policy is a pure function (`keep`) over the complete backups and the current time:
//! `--keep-full N` keeps the N newest full backups and the incrementals and differentials built on
//! them; `--keep-within D` keeps every backup that ended within D plus
//! the newest one before that (so any moment of the last D stays restorable); `--keep-daily/weekly/
//! monthly/yearly N` keep the newest backup of each of the last N days/ISO weeks/months/years that
//! have one. The newest restorable backup is always kept, and every backup a kept incremental or
//! differential builds on. WAL is deleted only before the start of the
//! oldest kept backup; history files never. More than `--max-delete` objects are refused without
//! `--force` (a lifecycle rule deleting a year of backups is the incident this guards against).
//! A backup's manifest is deleted before its pieces, so a half-expired backup is never listed.

use std::collections::BTreeSet;

use anyhow::{Context, bail};
use serde::Deserialize;

use crate::catalog::Catalog;
use crate::manifest::{BackupManifest, BackupType};
use crate::pg::PgTimestamp;
use crate::pg::time::Calendar;
use crate::pg::{SegNo, TimelineId, WalFileName};
use crate::storage::layout::{ObjectKey, Prefix};
use crate::storage::{Entry, Repo};

/// A retention policy (flags, or `[expire]` in the config file).
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    /// Keep the N newest full backups (and the incremental and differential backups built on them).
    pub keep_full: Option<usize>,
    /// Keep everything needed to restore to any moment this long ago (e.g. 30d).
    #[serde(default, with = "opt_duration")]
    pub keep_within: Option<std::time::Duration>,
    /// Keep the newest backup of each of the last N days.
    pub keep_daily: Option<usize>,
    /// Keep the newest backup of each of the last N ISO weeks.
    pub keep_weekly: Option<usize>,
    /// Keep the newest backup of each of the last N months.
    pub keep_monthly: Option<usize>,
    /// Keep the newest backup of each of the last N years.
    pub keep_yearly: Option<usize>,
}

mod opt_duration {
    pub(super) fn deserialize<'de, D: serde::Deserializer<'de>>(
        d: D,
    ) -> Result<Option<std::time::Duration>, D::Error> {
        let s: Option<String> = serde::Deserialize::deserialize(d)?;
        s.map(|s| humantime::parse_duration(&s).map_err(serde::de::Error::custom))
            .transpose()
    }
}

impl Policy {
    /// Whether any rule is set.
    pub fn is_empty(&self) -> bool {
        *self == Policy::default()
    }
}

/// Which backups `policy` keeps at time `now`. `backups` are the complete, restorable backups.
pub fn keep(backups: &[BackupManifest], policy: &Policy, now: PgTimestamp) -> BTreeSet<String> {
    let mut sorted: Vec<&BackupManifest> = backups.iter().collect();
    sorted.sort_by_key(|b| std::cmp::Reverse((b.stop_time, b.id.clone()))); // newest first
    let mut keep = BTreeSet::new();
    if let Some(newest) = sorted.first() {
        keep.insert(newest.id.clone());
    }
    if let Some(n) = policy.keep_full {
        // The N newest full backups, and every incremental or differential built on one of them.
        let fulls: BTreeSet<&str> = sorted
            .iter()
            .filter(|b| b.backup_type == BackupType::Full)
            .take(n)
            .map(|b| b.id.as_str())
            .collect();
        keep.extend(
            sorted
                .iter()
                .filter(|b| fulls.contains(chain_root(backups, b)))
                .map(|b| b.id.clone()),
        );
    }
    if let Some(d) = policy.keep_within {
        let since = PgTimestamp(now.0 - d.as_micros() as i64);
        keep.extend(
            sorted
                .iter()
                .filter(|b| b.stop_time >= since)
                .map(|b| b.id.clone()),
        );
        // The newest backup that ended before the window start: restores into the window's start need it.
        if let Some(b) = sorted.iter().find(|b| b.stop_time < since) {
            keep.insert(b.id.clone());
        }
    }
    let mut gfs = |n: Option<usize>, bucket: &dyn Fn(Calendar) -> (i32, u32)| {
        let Some(n) = n else { return };
        let mut seen = Vec::new();
        for b in &sorted {
            let k = bucket(b.stop_time.calendar());
            if !seen.contains(&k) {
                if seen.len() == n {
                    break;
                }
                seen.push(k);
                keep.insert(b.id.clone());
            }
        }
    };
    gfs(policy.keep_daily, &|c| c.day);
    gfs(policy.keep_weekly, &|c| c.iso_week);
    gfs(policy.keep_monthly, &|c| c.month);
    gfs(policy.keep_yearly, &|c| (c.year, 0));
    // A kept incremental needs every backup it builds on.
    let wanted: Vec<String> = keep.iter().cloned().collect();
    for id in wanted {
        let mut at = backups.iter().find(|b| b.id == id);
        while let Some(parent) = at.and_then(|b| b.parent.as_ref()) {
            if !keep.insert(parent.id.clone()) {
                break;
            }
            at = backups.iter().find(|b| b.id == parent.id);
        }
    }
    keep
}

/// The id of the full backup `b`'s chain starts from (`b`'s own for a full backup, or for a
/// chain whose start is not among `backups`, the oldest backup found).
fn chain_root<'a>(backups: &'a [BackupManifest], b: &'a BackupManifest) -> &'a str {
    let mut at = b;
    for _ in 0..=backups.len() {
        let Some(next) = at
            .parent
            .as_ref()
            .and_then(|p| backups.iter().find(|c| c.id == p.id))
        else {
            break;
        };
        at = next;
    }
    at.id.as_str()
}

/// What expire will (or did) delete.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Outcome {
    /// Backups expired.
    pub backups: Vec<String>,
    /// Backups kept.
    pub kept: Vec<String>,
    /// WAL files expired (segments, partials, backup history files).
    pub wal_files: usize,
    /// Objects deleted (or to delete).
    pub objects: usize,
    /// WAL before this segment number goes.
    pub wal_before: Option<u64>,
    /// The segment WAL is kept from (the start of the oldest kept backup), by name.
    pub wal_kept_from: Option<String>,
    /// Interrupted backups (no manifest, nothing written for [`ABANDONED_BACKUP_AGE`]) removed.
    pub abandoned: Vec<String>,
    /// The recoverable window before the expiry.
    pub window_before: String,
    /// The recoverable window once the expiry is done.
    pub window_after: String,
    /// Staging files left in a local repository by killed processes (older than
    /// [`STALE_STAGING_AGE`]), removed too.
    pub staging_files: Vec<String>,
}

/// How old a staging file in a local repository must be before `expire` takes it for the leftover of
/// a killed process: a live push or put holds one for well under a second.
pub const STALE_STAGING_AGE: std::time::Duration = std::time::Duration::from_secs(3600);

/// How long an incomplete backup (no manifest) must have written nothing before `expire` takes it
/// for abandoned and removes its pieces: a running backup writes pieces continually, then waits at
/// most its archive timeout for the WAL before it writes the manifest.
pub const ABANDONED_BACKUP_AGE: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

/// Plan and (unless `dry_run`) carry out the expiry. Returns what goes and the objects deleted
/// (or, for a dry run, to delete), each backup's manifest before its other objects.
///
/// # Errors
/// More than `max_delete` objects without `force`, or store failures.
pub async fn run(
    repo: &Repo,
    policy: &Policy,
    now: PgTimestamp,
    dry_run: bool,
    max_delete: usize,
    force: bool,
) -> anyhow::Result<(Outcome, Vec<Entry>)> {
    if policy.is_empty() {
        bail!(
            "name a retention policy: --keep-full, --keep-within, --keep-daily/weekly/monthly/yearly (or [expire] in the config file)"
        );
    }
    let catalog = Catalog::load(repo).await?;
    let restorable: Vec<BackupManifest> =
        catalog.restorable_backups().into_iter().cloned().collect();
    if restorable.is_empty() {
        bail!("the repository has no restorable backup; expire deletes nothing until one exists");
    }
    let mut kept = keep(&restorable, policy, now);
    // Every backup a kept one builds on, restorable by itself or not (its own WAL may be gone).
    let chains: Vec<String> = catalog
        .backups
        .iter()
        .filter(|b| kept.contains(&b.id))
        .filter_map(|b| catalog.chain(b).ok())
        .flatten()
        .map(|b| b.id.clone())
        .collect();
    kept.extend(chains);
    let expired: Vec<&BackupManifest> = catalog
        .backups
        .iter()
        .filter(|b| !kept.contains(&b.id))
        .collect();
    let kept_backups = || catalog.backups.iter().filter(|b| kept.contains(&b.id));
    let seg_size = catalog.seg_size();
    let oldest_kept = kept_backups().min_by_key(|b| b.start_lsn);
    let oldest_kept_start: SegNo = oldest_kept.map_or(SegNo(0), |b| b.start_lsn.segno(seg_size));

    let mut deletions: Vec<Entry> = Vec::new();
    for b in &expired {
        deletions.extend(backup_objects(repo, &b.id).await?);
    }
    let abandoned = abandoned_backups(repo, &catalog, now, &mut deletions).await?;
    // A roll-up goes before any segment of its chunk, so it never names a deleted segment.
    deletions.extend(expired_rollups(repo, seg_size, oldest_kept_start).await?);
    let timelines: Vec<TimelineId> = repo.wal_timelines().await?;
    let wal_files = expired_wal(
        repo,
        &timelines,
        seg_size,
        oldest_kept_start,
        &mut deletions,
    )
    .await?;
    // A walk of a local repository's directories: on the blocking pool.
    let staging = {
        let repo = repo.clone();
        tokio::task::spawn_blocking(move || repo.stale_staging(STALE_STAGING_AGE)).await??
    };
    // The window afterwards: the same catalog without what goes.
    let mut after = catalog.clone();
    after.backups.retain(|b| kept.contains(&b.id));
    for t in after.timelines.values_mut() {
        t.segments.retain(|n| *n >= oldest_kept_start);
    }
    let outcome = Outcome {
        wal_kept_from: oldest_kept.map(|b| catalog.name(b.timeline, oldest_kept_start).to_string()),
        abandoned,
        window_before: crate::restore::plan::window_text(&catalog),
        window_after: crate::restore::plan::window_text(&after),
        staging_files: staging.iter().map(|p| p.display().to_string()).collect(),
        backups: expired.iter().map(|b| b.id.clone()).collect(),
        kept: kept.iter().cloned().collect(),
        wal_files,
        objects: deletions.len(),
        wal_before: Some(oldest_kept_start.0),
    };
    if dry_run {
        return Ok((outcome, deletions));
    }
    if deletions.len() > max_delete && !force {
        bail!(
            "expire would delete {} objects ({} backups, {} WAL files), more than --max-delete {max_delete}; check the policy, then rerun with --force (or a larger --max-delete)",
            deletions.len(),
            outcome.backups.len(),
            outcome.wal_files
        );
    }
    for entry in &deletions {
        repo.delete(entry).await?;
    }
    // A local repository keeps the directories the objects were in: without this every expired
    // backup would be listed as an incomplete one for ever.
    for id in outcome.backups.iter().chain(&outcome.abandoned) {
        repo.remove_empty_local_dirs(&Prefix::Backup(id.clone()))
            .with_context(|| format!("remove the directories of backup {id}"))?;
    }
    for path in &staging {
        match std::fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("remove {}", path.display())),
        }
    }
    Ok((outcome, deletions))
}

/// Every object of backup `id`, its manifest first (so a half-expired backup is never listed),
/// the rest in key order.
async fn backup_objects(repo: &Repo, id: &str) -> anyhow::Result<Vec<Entry>> {
    let manifest = ObjectKey::BackupManifest(id.to_string());
    let mut objects = repo.list(&Prefix::Backup(id.to_string())).await?;
    objects.sort_by_key(|e| (e.object.as_ref() != Some(&manifest), e.key().to_string()));
    Ok(objects)
}

/// Interrupted backups: pieces (or, in a local repository, empty directories) with no manifest
/// and nothing written for a day. Their objects are added to `deletions`; their ids returned.
async fn abandoned_backups(
    repo: &Repo,
    catalog: &Catalog,
    now: PgTimestamp,
    deletions: &mut Vec<Entry>,
) -> anyhow::Result<Vec<String>> {
    let mut abandoned = Vec::new();
    for id in &catalog.incomplete_backups {
        let mut objects = repo.list(&Prefix::Backup(id.clone())).await?;
        // Its backup_label is written when the backup stopped: a manifest lost after that is
        // damage for verify to report and a person to look at, not leftovers to sweep away.
        let label = ObjectKey::BackupLabel(id.clone());
        if objects.iter().any(|e| e.object.as_ref() == Some(&label)) {
            continue;
        }
        let newest = objects.iter().map(|e| e.modified_micros).max();
        let (idle_since, age_limit) = match newest {
            Some(t) => (Some(t), ABANDONED_BACKUP_AGE),
            None => (
                repo.local_dir_modified(&Prefix::Backup(id.clone())),
                STALE_STAGING_AGE,
            ),
        };
        if idle_since.is_some_and(|t| now.unix_micros() - t > age_limit.as_micros() as i64) {
            abandoned.push(id.clone());
            objects.sort_by(|a, b| a.key().cmp(b.key()));
            deletions.extend(objects);
        }
    }
    Ok(abandoned)
}

/// The WAL before segment `before` (history files always stay): added to `deletions`. Returns how
/// many WAL files (segments, partials, backup history files; summaries not counted) go.
async fn expired_wal(
    repo: &Repo,
    timelines: &[TimelineId],
    seg_size: crate::pg::WalSegSize,
    before: SegNo,
    deletions: &mut Vec<Entry>,
) -> anyhow::Result<usize> {
    let mut wal_files = 0;
    let mut listed = Vec::new();
    for &tli in timelines {
        let end = crate::rollup::first_key_of(tli, before, seg_size);
        listed.extend(
            repo.list_range(&Prefix::WalTimeline(tli), None, end.as_deref())
                .await?,
        );
    }
    for entry in listed {
        let (segment, is_wal) = match &entry.object {
            Some(ObjectKey::Wal(
                WalFileName::Segment(s)
                | WalFileName::Partial(s)
                | WalFileName::BackupHistory { segment: s, .. },
            )) => (*s, true),
            Some(ObjectKey::Summary(s) | ObjectKey::Streamed { seg: s, .. }) => (*s, false),
            _ => continue, // history files and anything unknown stay
        };
        if segment.segno(seg_size).is_some_and(|n| n < before) {
            wal_files += usize::from(is_wal);
            deletions.push(entry);
        }
    }
    Ok(wal_files)
}

/// The roll-ups of every chunk holding a segment before `before`.
async fn expired_rollups(
    repo: &Repo,
    seg_size: crate::pg::WalSegSize,
    before: SegNo,
) -> anyhow::Result<Vec<Entry>> {
    let mut out: Vec<Entry> = repo
        .list(&Prefix::Index)
        .await?
        .into_iter()
        .filter(|e| match &e.object {
            Some(ObjectKey::Rollup { first, .. }) => {
                first.segno(seg_size).is_some_and(|n| n < before)
            }
            _ => false,
        })
        .collect();
    out.sort_by(|a, b| a.key().cmp(b.key()));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compress::Compression;
    use crate::pg::Lsn;

    const DAY: i64 = 86_400_000_000;

    fn backup(id: &str, day: i64, hour: i64) -> BackupManifest {
        BackupManifest {
            format_version: 1,
            program_version: "t".into(),
            id: id.into(),
            label: id.into(),
            system_identifier: crate::pg::SystemId(1),
            pg_version: 15,
            timeline: crate::pg::TimelineId::ONE,
            start_lsn: Lsn(0),
            checkpoint_lsn: Lsn(0),
            stop_lsn: Lsn(0),
            start_time: PgTimestamp(day * DAY + hour * 3_600_000_000),
            stop_time: PgTimestamp(day * DAY + hour * 3_600_000_000),
            start_wal: "000000010000000000000001".parse().unwrap(),
            stop_wal: "000000010000000000000001".parse().unwrap(),
            compression: Compression::Zstd,
            files: vec![],
            directories: vec![],
            tablespaces: vec![],
            has_tablespace_map: false,
            size_bytes: 0,
            stored_bytes: 0,
            data_checksums: false,
            backup_type: Default::default(),
            parent: None,
            fallback: None,
            tally: None,
        }
    }

    fn ids(s: &BTreeSet<String>) -> Vec<&str> {
        s.iter().map(String::as_str).collect()
    }

    #[test]
    fn gfs_over_faked_times() {
        // Two backups a day for 60 days (day 0 = 2000-01-01, a Saturday).
        let backups: Vec<BackupManifest> = (0..60)
            .flat_map(|d| {
                [
                    backup(&format!("d{d:02}a"), d, 1),
                    backup(&format!("d{d:02}b"), d, 13),
                ]
            })
            .collect();
        let now = PgTimestamp(60 * DAY);
        let p = |f: fn(&mut Policy)| {
            let mut p = Policy::default();
            f(&mut p);
            keep(&backups, &p, now)
        };
        assert_eq!(ids(&p(|p| p.keep_full = Some(3))), ["d58b", "d59a", "d59b"]);
        assert_eq!(
            ids(&p(|p| p.keep_daily = Some(3))),
            ["d57b", "d58b", "d59b"]
        );
        // ISO weeks start on Monday: day 58 (2000-02-28) opens the last week, days 51-57 the one before.
        assert_eq!(ids(&p(|p| p.keep_weekly = Some(2))), ["d57b", "d59b"]);
        // Months: January (days 0-30) and February (31-59).
        assert_eq!(ids(&p(|p| p.keep_monthly = Some(5))), ["d30b", "d59b"]);
        assert_eq!(ids(&p(|p| p.keep_yearly = Some(1))), ["d59b"]);
        // Within 2 days: everything that ended since day 58 00:00, plus the newest before (d57b).
        assert_eq!(
            ids(&p(
                |p| p.keep_within = Some(std::time::Duration::from_secs(2 * 86_400))
            )),
            ["d57b", "d58a", "d58b", "d59a", "d59b"]
        );
        // The newest backup is kept whatever the policy says.
        assert_eq!(ids(&p(|p| p.keep_full = Some(0))), ["d59b"]);
        // Rules combine.
        let mut both = Policy {
            keep_full: Some(1),
            keep_monthly: Some(2),
            ..Default::default()
        };
        assert_eq!(ids(&keep(&backups, &both, now)), ["d30b", "d59b"]);
        both.keep_yearly = Some(3);
        assert_eq!(keep(&backups, &both, now).len(), 2);
        assert!(Policy::default().is_empty());
    }

    fn incr(id: &str, day: i64, parent: &str) -> BackupManifest {
        BackupManifest {
            backup_type: crate::manifest::BackupType::Incr,
            parent: Some(crate::manifest::Parent {
                id: parent.into(),
                start_lsn: Lsn(0),
                timeline: crate::pg::TimelineId::ONE,
                block_size: 8192,
                segment_blocks: 131_072,
            }),
            ..backup(id, day, 0)
        }
    }

    #[test]
    fn chains_are_kept_or_expired_whole() {
        // Full A (day 0) with incrementals B, C; full E (day 10) with incremental F.
        let backups = vec![
            backup("A", 0, 0),
            incr("B", 1, "A"),
            incr("C", 2, "B"),
            backup("E", 10, 0),
            incr("F", 11, "E"),
        ];
        let now = PgTimestamp(12 * DAY);
        let keep_full = |n| Policy {
            keep_full: Some(n),
            ..Policy::default()
        };
        // --keep-full counts full backups and keeps what builds on them.
        assert_eq!(ids(&keep(&backups, &keep_full(1), now)), ["E", "F"]);
        assert_eq!(
            ids(&keep(&backups, &keep_full(2), now)),
            ["A", "B", "C", "E", "F"]
        );
        // A rule that keeps an incremental keeps every backup it builds on.
        let daily = Policy {
            keep_daily: Some(1),
            ..Policy::default()
        };
        assert_eq!(ids(&keep(&backups, &daily, now)), ["E", "F"]);
        let within = Policy {
            keep_within: Some(std::time::Duration::from_secs(11 * 86_400)),
            ..Policy::default()
        };
        // Day 1 onwards, and the newest before (A); C needs B needs A.
        assert_eq!(
            ids(&keep(&backups, &within, now)),
            ["A", "B", "C", "E", "F"]
        );
        let just_c = Policy {
            keep_within: Some(std::time::Duration::from_secs(3 * 86_400)),
            ..Policy::default()
        };
        // Days 9 to 12 (E, F) and the newest before: C, which needs B and A.
        assert_eq!(
            ids(&keep(&backups, &just_c, now)),
            ["A", "B", "C", "E", "F"]
        );
        assert_eq!(chain_root(&backups, &backups[2]), "A");
    }
}
