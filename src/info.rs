//! `pitr info`: what the repository holds and what it can recover, for people and for machines.

use serde::Serialize;

use crate::catalog::{Catalog, FoundRestorePoint, Gap, IndexProblem};
use crate::index::XactRef;
use crate::pg::PgTimestamp;
use crate::pg::{Lsn, SegmentName, SystemId, TimelineId, WalSegSize};

/// `info --json`. Field names are a contract (DESIGN.md).
#[derive(Debug, Serialize)]
pub struct Info {
    /// The repository URL.
    pub repository: String,
    /// The cluster's system identifier (text: it exceeds JSON's exact integers).
    pub system_identifier: Option<SystemId>,
    /// PostgreSQL major version.
    pub pg_version: Option<u32>,
    /// WAL segment size in bytes.
    pub wal_segment_size: Option<WalSegSize>,
    /// Timelines, oldest first.
    pub timelines: Vec<TimelineJson>,
    /// Complete base backups, oldest first.
    pub backups: Vec<BackupJson>,
    /// Backups without a manifest (interrupted, or still running): not restorable.
    pub incomplete_backups: Vec<String>,
    /// Restore points in LSN order.
    pub restore_points: Vec<FoundRestorePoint>,
    /// The recoverable window; `null` for an empty repository.
    pub window: Option<WindowJson>,
    /// Segments whose WAL could not be fully indexed, and unreadable summaries or history files.
    pub index_problems: Vec<IndexProblem>,
}

/// One base backup.
#[derive(Debug, Serialize)]
pub struct BackupJson {
    /// Label given to `pg_backup_start`.
    pub label: String,
    /// Key-safe id (the directory under `backups/`).
    pub id: String,
    /// Timeline.
    pub timeline: TimelineId,
    /// Redo LSN where recovery starts.
    pub start_lsn: Lsn,
    /// End of the backup: recovery is consistent after it.
    pub stop_lsn: Lsn,
    /// Start time.
    pub start_time: PgTimestamp,
    /// Stop time: the earliest moment a restore from this backup can stop at.
    pub stop_time: PgTimestamp,
    /// First WAL segment needed.
    pub start_wal: SegmentName,
    /// Last WAL segment needed to be consistent.
    pub stop_wal: SegmentName,
    /// Files copied.
    pub files: usize,
    /// Bytes copied.
    pub size_bytes: u64,
    /// Bytes stored.
    pub stored_bytes: u64,
    /// Whether every WAL segment from start to stop is in the repository.
    pub restorable: bool,
    /// Whether the cluster had data checksums, so every relation page copied was checked.
    pub data_checksums: bool,
    /// Pages copied with a checksum that did not match (damage on the source).
    pub checksum_failures: usize,
    /// `full`, `incr` or `diff`.
    #[serde(rename = "type")]
    pub backup_type: crate::manifest::BackupType,
    /// The id of the backup an incremental or differential one builds on (`null` for a full one).
    pub parent: Option<String>,
    /// Why a full backup was taken where an incremental or differential one was asked for.
    pub fallback: Option<String>,
    /// Files stored as changed blocks only (0 for a full backup).
    pub files_as_changed_blocks: usize,
    /// What keeps it from being restored, if anything: WAL missing, or a broken chain.
    pub not_restorable_because: Option<String>,
    /// For an incremental or differential backup, the WAL whose changed blocks it holds: from its
    /// parent's start to its own start.
    pub lsn_range: Option<LsnRange>,
}

/// A range of WAL.
#[derive(Debug, Serialize)]
pub struct LsnRange {
    /// Start (the parent's start LSN).
    pub from: Lsn,
    /// End (this backup's start LSN).
    pub to: Lsn,
}

/// One timeline.
#[derive(Debug, Serialize)]
pub struct TimelineJson {
    /// Timeline id.
    pub timeline: TimelineId,
    /// Parent timeline.
    pub parent: Option<TimelineId>,
    /// Where it branched off its parent.
    pub switch_lsn: Option<Lsn>,
    /// Contiguous runs of archived segments.
    pub wal_ranges: Vec<Range>,
    /// Missing segments between those runs.
    pub gaps: Vec<Gap>,
    /// `.partial` segments archived at a promotion.
    pub partial_segments: Vec<String>,
    /// Segments archived without a summary.
    pub unindexed_segments: usize,
    /// The latest commit/abort on this timeline.
    pub latest_commit: Option<XactJson>,
    /// The recoverable window along this timeline's own history (`null` without WAL on it).
    pub window: Option<WindowJson>,
    /// Whether this timeline is a live branch: archived WAL that no later timeline supersedes.
    /// More than one live branch means diverging histories (a promoted copy, or a split brain).
    pub live: bool,
}

/// A contiguous run of segments.
#[derive(Debug, Serialize)]
pub struct Range {
    /// First segment.
    pub first: SegmentName,
    /// Last segment.
    pub last: SegmentName,
}

/// A transaction end.
#[derive(Debug, Serialize)]
pub struct XactJson {
    /// `xact_time`.
    pub time: PgTimestamp,
    /// Transaction id.
    pub xid: u32,
    /// Record LSN.
    pub lsn: Lsn,
}

impl From<XactRef> for XactJson {
    fn from(x: XactRef) -> Self {
        XactJson {
            time: x.time,
            xid: x.xid,
            lsn: x.lsn,
        }
    }
}

/// The recoverable window.
#[derive(Debug, Serialize)]
pub struct WindowJson {
    /// End of the oldest restorable backup (`null` until a backup exists).
    pub earliest: Option<PgTimestamp>,
    /// The latest commit/abort reachable through contiguous WAL.
    pub latest: Option<PgTimestamp>,
    /// The timeline that WAL ends on.
    pub latest_timeline: TimelineId,
    /// The transaction at `latest`.
    pub latest_xid: Option<u32>,
    /// The last segment of the contiguous WAL.
    pub wal_end_segment: SegmentName,
}

impl From<crate::catalog::Window> for WindowJson {
    fn from(w: crate::catalog::Window) -> WindowJson {
        WindowJson {
            earliest: w.earliest,
            latest: w.latest.map(|x| x.time),
            latest_timeline: w.latest_timeline,
            latest_xid: w.latest.map(|x| x.xid),
            wal_end_segment: w.last_segment,
        }
    }
}

impl Info {
    /// Summarize a catalog.
    pub fn new(repository: &str, c: &Catalog) -> Info {
        let live = c.live_branches();
        let timelines = c
            .timelines
            .iter()
            .map(|(&tli, t)| {
                let ranges = c.ranges(tli);
                TimelineJson {
                    timeline: tli,
                    parent: t.parent,
                    switch_lsn: t.switch_lsn,
                    wal_ranges: ranges
                        .iter()
                        .map(|&(a, b)| Range {
                            first: c.name(tli, a),
                            last: c.name(tli, b),
                        })
                        .collect(),
                    gaps: c.gaps(tli),
                    partial_segments: t
                        .partials
                        .iter()
                        .map(|&n| format!("{}.partial", c.name(tli, n)))
                        .collect(),
                    unindexed_segments: t.unindexed.len(),
                    latest_commit: c.latest_xact_on(tli).map(XactJson::from),
                    window: (!t.segments.is_empty())
                        .then(|| c.window_on(tli))
                        .flatten()
                        .map(WindowJson::from),
                    live: live.contains(&tli),
                }
            })
            .collect();
        let window = c.window().map(WindowJson::from);
        Info {
            repository: repository.to_string(),
            system_identifier: c.identity.as_ref().map(|i| i.system_identifier),
            pg_version: c.identity.as_ref().map(|i| i.pg_version),
            wal_segment_size: c.identity.as_ref().map(|i| i.wal_segment_size),
            timelines,
            backups: c
                .backups
                .iter()
                .map(|b| BackupJson {
                    label: b.label.clone(),
                    id: b.id.clone(),
                    timeline: b.timeline,
                    start_lsn: b.start_lsn,
                    stop_lsn: b.stop_lsn,
                    start_time: b.start_time,
                    stop_time: b.stop_time,
                    start_wal: b.start_wal,
                    stop_wal: b.stop_wal,
                    files: b.file_count(),
                    size_bytes: b.size_bytes,
                    stored_bytes: b.stored_bytes,
                    restorable: c.is_restorable(b),
                    data_checksums: b.data_checksums,
                    checksum_failures: b.checksum_failures().map(|(_, p)| p.len()).sum(),
                    backup_type: b.backup_type,
                    parent: b.parent.as_ref().map(|p| p.id.clone()),
                    fallback: b.fallback.clone(),
                    files_as_changed_blocks: b.file_methods().0,
                    lsn_range: b.parent.as_ref().map(|p| LsnRange {
                        from: p.start_lsn,
                        to: b.start_lsn,
                    }),
                    not_restorable_because: if !c.wal_complete(b) {
                        Some(format!(
                            "WAL {} to {} is not all archived",
                            b.start_wal, b.stop_wal
                        ))
                    } else {
                        c.chain(b).err()
                    },
                })
                .collect(),
            incomplete_backups: c.incomplete_backups.clone(),
            restore_points: c.restore_points(),
            window,
            index_problems: c.problems.clone(),
        }
    }
}

/// How far one repository trails the most advanced of several.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct Lag {
    /// Segments of the most advanced repository's newest timeline that this one lacks.
    pub segments: u64,
    /// Seconds between the latest commit recoverable from the most advanced repository and from
    /// this one (0 when they reach the same moment).
    pub seconds: f64,
}

/// The lag of each catalog behind the most advanced of them (the one whose newest timeline is the
/// highest, holding the most segments on it; `None` entries are repositories that could not be
/// read, and have no lag).
pub fn lags(catalogs: &[Option<&Catalog>]) -> Vec<Option<Lag>> {
    let newest = |c: &Catalog| {
        c.newest_timeline()
            .map(|t| (t, c.timelines.get(&t).map_or(0, |i| i.segments.len())))
    };
    let best = catalogs.iter().flatten().max_by_key(|c| newest(c)).copied();
    let latest = |c: &Catalog| c.window().and_then(|w| w.latest).map(|x| x.time);
    catalogs
        .iter()
        .map(|c| {
            let (c, best) = ((*c)?, best?);
            let Some((tli, _)) = newest(best) else {
                return Some(Lag::default());
            };
            let empty = std::collections::BTreeSet::new();
            let have = c.timelines.get(&tli).map_or(&empty, |i| &i.segments);
            let segments = best
                .timelines
                .get(&tli)
                .map_or(0, |i| i.segments.difference(have).count() as u64);
            // A repository with no recoverable commit yet trails by everything the best one has.
            let seconds = match (latest(best), latest(c)) {
                (Some(b), Some(o)) => (b.unix_micros() - o.unix_micros()).max(0) / 1000,
                _ => 0,
            };
            Some(Lag {
                segments,
                seconds: seconds as f64 / 1000.0,
            })
        })
        .collect()
}
