//! `pitr info`: what the repository holds and what it can recover, for people and for machines.

use std::fmt::Write as _;

use serde::Serialize;

use crate::catalog::{Catalog, FoundRestorePoint, IndexProblem};
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
}

/// One timeline.
#[derive(Debug, Serialize)]
pub struct TimelineJson {
    /// Timeline id.
    pub timeline: u32,
    /// Parent timeline.
    pub parent: Option<u32>,
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
    pub first: String,
    /// Last segment.
    pub last: String,
}

/// A hole between two runs.
#[derive(Debug, Serialize)]
pub struct Gap {
    /// The last segment before the hole.
    pub after: String,
    /// The first segment after it.
    pub before: String,
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
    pub latest_timeline: u32,
    /// The transaction at `latest`.
    pub latest_xid: Option<u32>,
    /// The last segment of the contiguous WAL.
    pub wal_end_segment: String,
}

impl From<crate::catalog::Window> for WindowJson {
    fn from(w: crate::catalog::Window) -> WindowJson {
        WindowJson {
            earliest: w.earliest,
            latest: w.latest.map(|x| x.time),
            latest_timeline: w.latest_timeline.get(),
            latest_xid: w.latest.map(|x| x.xid),
            wal_end_segment: w.last_segment.to_string(),
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
                    timeline: tli.get(),
                    parent: t.parent.map(TimelineId::get),
                    switch_lsn: t.switch_lsn,
                    wal_ranges: ranges
                        .iter()
                        .map(|&(a, b)| Range {
                            first: c.name(tli, a).to_string(),
                            last: c.name(tli, b).to_string(),
                        })
                        .collect(),
                    gaps: ranges
                        .windows(2)
                        .map(|w| Gap {
                            after: c.name(tli, w[0].1).to_string(),
                            before: c.name(tli, w[1].0).to_string(),
                        })
                        .collect(),
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
                    files: b.files.len(),
                    size_bytes: b.size_bytes,
                    stored_bytes: b.stored_bytes,
                    restorable: c.is_restorable(b),
                })
                .collect(),
            incomplete_backups: c.incomplete_backups.clone(),
            restore_points: c.restore_points(),
            window,
            index_problems: c.problems.clone(),
        }
    }

    /// The human-readable report.
    pub fn render(&self) -> String {
        let mut o = String::new();
        let _ = writeln!(o, "repository   {}", self.repository);
        let (Some(id), Some(v), Some(sz)) = (
            &self.system_identifier,
            self.pg_version,
            self.wal_segment_size,
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
        let _ = writeln!(o, "\nWAL");
        let _ = writeln!(
            o,
            "  timeline parent  switch LSN   {:<51} latest commit",
            "archived segments"
        );
        for t in &self.timelines {
            let parent = t.parent.map_or("-".to_string(), |p| p.to_string());
            let switch = t.switch_lsn.map_or("-".to_string(), |l| l.to_string());
            let latest = t
                .latest_commit
                .as_ref()
                .map_or("-".to_string(), |x| x.time.rfc3339());
            let mut ranges = t
                .wal_ranges
                .iter()
                .map(|r| format!("{}-{}", r.first, &r.last[16..]));
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
        if self.backups.is_empty() {
            let _ = writeln!(o, "\nbackups      none yet");
        } else {
            let _ = writeln!(o, "\nbackups");
            let _ = writeln!(
                o,
                "  {:<18} {:<3} {:<28} {:<12} {:<12} {:>10} {:>10}",
                "id", "tli", "stop time", "start LSN", "stop LSN", "size MiB", "stored MiB"
            );
            for b in &self.backups {
                let mib = |x: u64| format!("{:.1}", x as f64 / 1048576.0);
                let flag = if b.restorable {
                    ""
                } else {
                    "  NOT RESTORABLE: WAL missing"
                };
                let _ = writeln!(
                    o,
                    "  {:<18} {:<3} {:<28} {:<12} {:<12} {:>10} {:>10}{flag}",
                    b.id,
                    b.timeline,
                    b.stop_time.rfc3339(),
                    b.start_lsn.to_string(),
                    b.stop_lsn.to_string(),
                    mib(b.size_bytes),
                    mib(b.stored_bytes)
                );
            }
        }
        for id in &self.incomplete_backups {
            let _ = writeln!(
                o,
                "  {id:<18} incomplete (no manifest: interrupted or still running), not restorable"
            );
        }
        if !self.restore_points.is_empty() {
            let _ = writeln!(o, "\nrestore points");
            for r in &self.restore_points {
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
        let _ = writeln!(o, "\nrecoverable window");
        match &self.window {
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
        // Diverging histories: each live branch has its own window, and a restore to a time after
        // the fork must say which one it means.
        let live: Vec<&TimelineJson> = self.timelines.iter().filter(|t| t.live).collect();
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
        if !self.index_problems.is_empty() {
            let _ = writeln!(
                o,
                "\nindex problems (the WAL is archived as PostgreSQL wrote it; `pitr verify` will check it)"
            );
            for p in &self.index_problems {
                let at = p.lsn.map_or(String::new(), |l| format!(" at {l}"));
                let _ = writeln!(o, "  {}{at}: {}", p.segment, p.reason);
            }
        }
        o
    }
}
