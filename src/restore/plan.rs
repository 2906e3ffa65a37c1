//! The restore planner: a pure function from the catalog and a target to a plan, or to a typed
//! refusal that says why and what the recoverable window is. Nothing is downloaded or written
//! before a plan exists.
//!
//! Timelines: candidate timelines are tried newest first, so `--latest` and targets on the current
//! history follow the newest timeline (as `recovery_target_timeline = 'latest'` would); a target that
//! exists only on an older timeline after a fork (a restore point made on timeline 1 after timeline 2
//! branched off, say) is found on that timeline without the user naming it. `--timeline` overrides.
//!
//! For each timeline the newest restorable backup on its history that can reach the target is used:
//! one that ends before the target (recovery cannot stop before it is consistent) and from which
//! contiguous WAL reaches the target. Time targets need a commit or abort after the target in that
//! WAL: PostgreSQL stops only there, and without one it replays everything and fails with "recovery
//! ended before configured recovery target was reached".

use std::fmt;

use super::target::Target;
use crate::catalog::{Beyond, Catalog, Gap, Window};
use crate::manifest::BackupManifest;
use crate::pg::PgTimestamp;
use crate::pg::{Lsn, SegNo, SegmentName, TimelineId};

/// `--timeline`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TimelineChoice {
    /// Follow the newest timeline.
    Latest,
    /// Stay on the backup's timeline.
    Current,
    /// This timeline.
    Id(TimelineId),
}

/// What the user asked for.
#[derive(Clone, Debug)]
pub struct Request {
    /// The target.
    pub target: Target,
    /// Stop just before the target instead of just after it.
    pub exclusive: bool,
    /// Timeline override.
    pub timeline: Option<TimelineChoice>,
    /// Use this backup (id or label).
    pub backup: Option<String>,
    /// For `--latest`: stop at the first gap in the archived WAL instead of refusing when archived
    /// WAL lies beyond it (`--stop-at-gap`; a standby never ends recovery at a gap, so `replica`
    /// sets it).
    pub stop_at_gap: bool,
}

/// A restore that will work.
#[derive(Clone, Debug)]
pub struct Plan {
    /// The backup to restore.
    pub backup: BackupManifest,
    /// The backups it builds on (an incremental's parent, its parent, … back to a full backup),
    /// newest first; empty for a full backup.
    pub parents: Vec<BackupManifest>,
    /// The target.
    pub target: Target,
    /// `recovery_target_inclusive = off`.
    pub exclusive: bool,
    /// The timeline recovery ends on.
    pub timeline: TimelineId,
    /// The value for `recovery_target_timeline`.
    pub timeline_setting: String,
    /// Why that timeline.
    pub timeline_reason: String,
    /// Timelines replayed, oldest first.
    pub path: Vec<TimelineId>,
    /// First WAL segment replayed.
    pub first_wal: SegmentName,
    /// Last WAL segment recovery needs to reach the target.
    pub last_wal: SegmentName,
    /// How many segments that is.
    pub wal_segments: u64,
    /// What recovery will do at the target, as far as the index knows.
    pub stop: String,
    /// Runs of replayed segments, (timeline, first, last), that the catalog knows of only from
    /// roll-ups of the WAL index: a restore lists them before it writes anything.
    pub rolled_wal: Vec<(TimelineId, SegNo, SegNo)>,
}

/// A timeline a target could mean, when it means different points on diverging timelines.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Branch {
    /// The timeline.
    pub timeline: TimelineId,
    /// Where it branched off its parent, if it did.
    pub branched: Option<(TimelineId, Lsn)>,
    /// The segment recovery would stop in (`None`: the live end of the branch, for `--latest`).
    pub stops_in: Option<SegmentName>,
    /// The end of its contiguous WAL (for `--latest`).
    pub wal_to: Option<SegmentName>,
    /// Its latest archived commit or abort.
    pub latest_commit: Option<PgTimestamp>,
}

/// Why a restore cannot reach the target. Each variant carries the values the refusal is about
/// (the window, the gap, the candidates); `Display` renders the one-line message.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PlanError {
    /// No backup whose WAL is complete.
    #[error(
        "the repository has no restorable base backup (run pitr backup; a backup counts once its WAL is archived)"
    )]
    NoBackup,
    /// No backup can be read: their manifests are damaged. (backup, what is wrong) pairs.
    #[error(
        "the repository has no restorable base backup: {} (pitr verify lists every damaged object)",
        unreadable(.0)
    )]
    UnreadableBackups(Vec<(String, String)>),
    /// `--backup` names nothing restorable.
    #[error("no restorable backup has the id or label {wanted:?} (restorable: {})", known.join(", "))]
    BackupNotFound {
        /// What was asked for.
        wanted: String,
        /// The ids of the restorable backups.
        known: Vec<String>,
    },
    /// `--timeline N` unknown.
    #[error("timeline {0} is not in the repository")]
    TimelineUnknown(TimelineId),
    /// Before the end of every usable backup.
    #[error("{target} is before the end of the oldest usable backup; {}", window_sentence(.window.as_ref()))]
    BeforeBackups {
        /// The target.
        target: Target,
        /// The recoverable window (`None`: no WAL).
        window: Option<Window>,
    },
    /// Beyond the archived WAL.
    #[error("{target} is beyond the archived WAL; {}", window_sentence(.window.as_ref()))]
    AfterLatest {
        /// The target.
        target: Target,
        /// The recoverable window (`None`: no WAL).
        window: Option<Window>,
    },
    /// The target lies on diverging timelines; `--timeline` must choose.
    #[error(
        "{target} lies on diverging timelines and means a different point on each: {}; choose one with --timeline N",
        branches(.candidates)
    )]
    Ambiguous {
        /// The target.
        target: Target,
        /// The timelines and where recovery would stop on each.
        candidates: Vec<Branch>,
    },
    /// A time target at or after the latest archived transaction end.
    #[error(
        "{target} is {} the latest archived commit or abort ({}): PostgreSQL stops only at a transaction end after the target time, and none is archived yet (use --latest, which recovers the same state, or wait until a later commit is archived); {}",
        if matches!(target, Target::Time(t) if t == latest) { "the time of" } else { "after" },
        latest.rfc3339(),
        window_sentence(.window.as_ref())
    )]
    NoTransactionAfter {
        /// The target.
        target: Target,
        /// The latest archived transaction end.
        latest: PgTimestamp,
        /// The recoverable window.
        window: Option<Window>,
    },
    /// `--latest` over a gap: recovery would end at the gap and promote, dropping what lies beyond.
    #[error(
        "the archived WAL has a gap after {} (next archived: {}); {} lie beyond it, which recovery would never replay: PostgreSQL would end recovery at the gap and promote, dropping them. Archive the missing segments (they may still be in the primary's pg_wal), or to recover only up to the gap say so with --latest --stop-at-gap (or --to a time before it)",
        gap.after, gap.before, beyond.describe()
    )]
    Gap {
        /// The gap: the last segment reachable without it, and the first archived one after it.
        gap: Gap,
        /// What lies beyond it.
        beyond: Beyond,
    },
    /// No such restore point.
    #[error(
        "restore point {name:?} is not in the archived WAL after any usable backup (restore points: {})",
        if known.is_empty() { "none".to_string() } else { known.join(", ") }
    )]
    NameNotFound {
        /// The name.
        name: String,
        /// Known names.
        known: Vec<String>,
    },
    /// No such transaction end.
    #[error(
        "no commit or abort of transaction {xid} is in the archived WAL after any usable backup; {}",
        window_sentence(.window.as_ref())
    )]
    XidNotFound {
        /// The xid.
        xid: u32,
        /// The recoverable window.
        window: Option<Window>,
    },
}

fn unreadable(broken: &[(String, String)]) -> String {
    broken
        .iter()
        .map(|(b, why)| format!("the manifest of {b} cannot be used ({why})"))
        .collect::<Vec<_>>()
        .join("; ")
}

fn branches(candidates: &[Branch]) -> String {
    let when = |t: Option<PgTimestamp>| t.map_or("none".to_string(), PgTimestamp::rfc3339);
    candidates
        .iter()
        .map(|b| {
            let branched = b.branched.map_or(String::new(), |(parent, at)| {
                format!(", branched from timeline {parent} at {at}")
            });
            match b.stops_in {
                Some(seg) => format!(
                    "timeline {}{branched} (stops in {seg}, latest commit there {})",
                    b.timeline,
                    when(b.latest_commit)
                ),
                None => format!(
                    "timeline {} (latest commit {}, WAL to {})",
                    b.timeline,
                    when(b.latest_commit),
                    b.wal_to.map_or("-".to_string(), |s| s.to_string())
                ),
            }
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// The window sentence used in refusals and by `expire`.
pub fn window_sentence(window: Option<&Window>) -> String {
    match window {
        Some(w) => {
            let earliest = w
                .earliest
                .map_or("(no restorable backup)".to_string(), |t| t.rfc3339());
            let latest = w
                .latest
                .map_or("(no commit archived after it yet)".to_string(), |x| {
                    x.time.rfc3339()
                });
            format!(
                "the recoverable window is {earliest} to {latest} on timeline {} (WAL contiguous to {})",
                w.latest_timeline, w.last_segment
            )
        }
        None => "the repository holds no WAL".to_string(),
    }
}

/// The window sentence for the newest timeline.
pub fn window_text(c: &Catalog) -> String {
    window_sentence(c.window().as_ref())
}

/// What one (timeline, backup) attempt concluded.
enum Attempt {
    Hit {
        last: (TimelineId, SegNo),
        walked: u64,
        stop: String,
    },
    TooEarly,
    TooLate,
    NotFound,
}

fn backup_on_path(b: &BackupManifest, path: &[(TimelineId, Lsn, Option<Lsn>)]) -> bool {
    path.iter().any(|&(t, begin, end)| {
        t == b.timeline && b.start_lsn >= begin && end.is_none_or(|e| b.stop_lsn <= e)
    })
}

/// Where, along the WAL a backup reaches on one timeline, recovery stops for one target.
struct Walk<'a> {
    c: &'a Catalog,
    b: &'a BackupManifest,
    req: &'a Request,
    /// Every segment replayed from the backup's start, in order.
    walked: Vec<(TimelineId, SegNo)>,
    /// The segment holding the end of the backup.
    stop_seg: SegNo,
}

impl Walk<'_> {
    fn summary(&self, i: usize) -> Option<&crate::index::SegmentSummary> {
        self.walked.get(i).and_then(|k| self.c.summaries.get(k))
    }

    fn name(&self, i: usize) -> String {
        self.walked
            .get(i)
            .map_or_else(String::new, |&(t, n)| self.c.name(t, n).to_string())
    }

    fn hit(&self, i: usize, stop: String) -> Attempt {
        match self.walked.get(i) {
            Some(&last) => Attempt::Hit {
                last,
                walked: i as u64 + 1,
                stop,
            },
            None => Attempt::TooLate,
        }
    }

    fn position(&self, found: impl Fn(usize) -> bool) -> Option<usize> {
        (0..self.walked.len()).find(|&i| found(i))
    }

    fn time(&self, t: PgTimestamp) -> Attempt {
        if self.b.stop_time > t {
            return Attempt::TooEarly;
        }
        // The first segment holding a commit/abort after the target: recovery stops there.
        let after = |x: PgTimestamp| if self.req.exclusive { x >= t } else { x > t };
        match self.position(|i| {
            self.summary(i)
                .and_then(|s| s.max_xact_time)
                .is_some_and(after)
        }) {
            Some(i) => self.hit(
                i,
                format!(
                    "stops before the first commit/abort after {} (in {})",
                    t.rfc3339(),
                    self.name(i)
                ),
            ),
            None => Attempt::TooLate,
        }
    }

    fn restore_point(&self, name: &str) -> Attempt {
        let at = |i: usize| {
            self.summary(i).and_then(|s| {
                s.restore_points
                    .iter()
                    .find(|r| r.name == name && r.lsn >= self.b.stop_lsn)
            })
        };
        if let Some(i) = self.position(|i| at(i).is_some()) {
            let stop = at(i).map_or_else(String::new, |r| {
                format!(
                    "stops at restore point \"{name}\" ({}, LSN {})",
                    r.time.rfc3339(),
                    r.lsn
                )
            });
            return self.hit(i, stop);
        }
        let before = self
            .c
            .restore_points()
            .iter()
            .any(|r| r.name == name && r.lsn < self.b.stop_lsn);
        if before {
            Attempt::TooEarly
        } else {
            Attempt::NotFound
        }
    }

    fn xid(&self, x: u32) -> Attempt {
        let found = self.position(|i| {
            self.summary(i).is_some_and(|s| {
                s.min_xid.is_some_and(|lo| lo <= x) && s.max_xid.is_some_and(|hi| hi >= x)
            })
        });
        match found {
            Some(i) if self.walked.get(i).is_some_and(|&(_, n)| n >= self.stop_seg) => self.hit(
                i,
                format!(
                    "stops at the commit/abort of transaction {x} (in {})",
                    self.name(i)
                ),
            ),
            Some(_) => Attempt::TooEarly,
            None => Attempt::NotFound,
        }
    }

    fn lsn(&self, l: Lsn) -> Attempt {
        if l < self.b.stop_lsn {
            return Attempt::TooEarly;
        }
        let n = l.segno(self.c.seg_size());
        match self.position(|i| self.walked.get(i).is_some_and(|&(_, m)| m == n)) {
            Some(i) => self.hit(i, format!("stops at LSN {l}")),
            None => Attempt::TooLate,
        }
    }
}

fn try_backup(c: &Catalog, tli: TimelineId, b: &BackupManifest, req: &Request) -> Attempt {
    let seg_size = c.seg_size();
    let mut walked: Vec<(TimelineId, SegNo)> = Vec::new();
    let Some(_) = c.walk(tli, b.start_lsn.segno(seg_size), |t, n| walked.push((t, n))) else {
        return Attempt::TooLate;
    };
    let stop_seg = Lsn(b.stop_lsn.0.saturating_sub(1)).segno(seg_size);
    let Some(last) = walked.len().checked_sub(1) else {
        return Attempt::TooLate;
    };
    if walked.get(last).is_none_or(|&(_, n)| n < stop_seg) {
        return Attempt::TooLate; // the backup's own WAL is not reachable on this path
    }
    let w = Walk {
        c,
        b,
        req,
        walked,
        stop_seg,
    };
    match &req.target {
        Target::Latest => w.hit(
            last,
            format!(
                "replays all archived WAL (to the end of {}), then promotes: there is no target to pause at",
                w.name(last)
            ),
        ),
        Target::Immediate => {
            let i = w
                .position(|i| w.walked.get(i).is_some_and(|&(_, n)| n >= stop_seg))
                .unwrap_or(last);
            w.hit(
                i,
                format!("stops once consistent, at the backup's end ({})", b.stop_lsn),
            )
        }
        Target::Time(t) => w.time(*t),
        Target::Name(name) => w.restore_point(name),
        Target::Xid(x) => w.xid(*x),
        Target::Lsn(l) => w.lsn(*l),
    }
}

/// The runs of segments a replay from segment `start` to `last` along the path to `tli` reads
/// whose presence only a roll-up vouches for.
fn rolled_runs(
    c: &Catalog,
    tli: TimelineId,
    start: SegNo,
    last: (TimelineId, SegNo),
) -> Vec<(TimelineId, SegNo, SegNo)> {
    let mut runs: Vec<(TimelineId, SegNo, SegNo)> = Vec::new();
    if c.rolled.is_empty() {
        return runs;
    }
    c.walk(tli, start, |t, n| {
        if n > last.1 || !c.rolled.contains(&(t, n)) {
            return;
        }
        match runs.last_mut() {
            Some((rt, _, end)) if *rt == t && end.0 + 1 == n.0 => *end = n,
            _ => runs.push((t, n, n)),
        }
    });
    runs
}

/// Plan a restore.
///
/// # Errors
/// A `PlanError` saying why the target cannot be reached, with the window.
pub fn plan(c: &Catalog, req: &Request) -> Result<Plan, PlanError> {
    let backups = usable_backups(c, req)?;
    let candidates = candidate_timelines(c, req, &backups)?;
    refuse_latest_over_a_gap(c, req, &candidates, &backups)?;
    refuse_latest_on_two_branches(c, req)?;
    // The first hit on each candidate timeline (newest backup first).
    let mut hits: Vec<Plan> = Vec::new();
    let mut missed = Missed::default();
    'timelines: for &tli in &candidates {
        let path = c.path_lsns(tli);
        for b in backups.iter().filter(|b| backup_on_path(b, &path)) {
            match try_backup(c, tli, b, req) {
                Attempt::Hit { last, walked, stop } => {
                    let (setting, reason) = timeline_setting(c, req, tli, last.0);
                    hits.push(Plan {
                        backup: (*b).clone(),
                        parents: c
                            .chain(b)
                            .unwrap_or_default()
                            .into_iter()
                            .skip(1)
                            .cloned()
                            .collect(),
                        target: req.target.clone(),
                        exclusive: req.exclusive,
                        timeline: last.0,
                        timeline_setting: setting,
                        timeline_reason: reason,
                        path: path
                            .iter()
                            .map(|(t, _, _)| *t)
                            .filter(|t| *t >= b.timeline && *t <= last.0)
                            .collect(),
                        first_wal: c.name(b.timeline, b.start_lsn.segno(c.seg_size())),
                        last_wal: c.name(last.0, last.1),
                        wal_segments: walked,
                        stop,
                        rolled_wal: rolled_runs(c, tli, b.start_lsn.segno(c.seg_size()), last),
                    });
                    continue 'timelines;
                }
                Attempt::TooEarly => missed.too_early = true,
                Attempt::NotFound => missed.not_found = true,
                Attempt::TooLate => missed.too_late = true,
            }
        }
    }
    refuse_diverging_hits(c, req, &hits)?;
    match hits.into_iter().next() {
        Some(plan) => Ok(plan),
        None => Err(refusal(c, req, missed)),
    }
}

/// The restorable backups the request allows, newest first.
fn usable_backups<'a>(c: &'a Catalog, req: &Request) -> Result<Vec<&'a BackupManifest>, PlanError> {
    let mut backups: Vec<&BackupManifest> = c.restorable_backups();
    if backups.is_empty() {
        let broken: Vec<(String, String)> = c
            .problems
            .iter()
            .filter(|p| p.segment.starts_with("backup "))
            .map(|p| (p.segment.clone(), p.reason.clone()))
            .collect();
        if !broken.is_empty() {
            return Err(PlanError::UnreadableBackups(broken));
        }
        return Err(PlanError::NoBackup);
    }
    if let Some(wanted) = &req.backup {
        let known = backups.iter().map(|b| b.id.clone()).collect();
        backups.retain(|b| &b.id == wanted || &b.label == wanted);
        if backups.is_empty() {
            return Err(PlanError::BackupNotFound {
                wanted: wanted.clone(),
                known,
            });
        }
    }
    backups.sort_by_key(|b| std::cmp::Reverse((b.stop_time, b.id.clone()))); // newest first
    Ok(backups)
}

/// The timelines to try, newest first.
fn candidate_timelines(
    c: &Catalog,
    req: &Request,
    backups: &[&BackupManifest],
) -> Result<Vec<TimelineId>, PlanError> {
    let newest = c.newest_timeline().unwrap_or(TimelineId::ONE);
    Ok(match req.timeline {
        Some(TimelineChoice::Id(t)) => {
            if !c.timelines.contains_key(&t) {
                return Err(PlanError::TimelineUnknown(t));
            }
            vec![t]
        }
        Some(TimelineChoice::Current) => {
            let mut v: Vec<TimelineId> = backups.iter().map(|b| b.timeline).collect();
            v.dedup();
            v
        }
        Some(TimelineChoice::Latest) => vec![newest],
        None if matches!(req.target, Target::Latest | Target::Immediate) => vec![newest],
        None => c.timelines.keys().rev().copied().collect(),
    })
}

/// `--latest` whose walk ends at a gap with archived WAL beyond it would promote there and drop
/// what lies beyond: refused unless `--stop-at-gap` asks for exactly that.
fn refuse_latest_over_a_gap(
    c: &Catalog,
    req: &Request,
    candidates: &[TimelineId],
    backups: &[&BackupManifest],
) -> Result<(), PlanError> {
    if !matches!(req.target, Target::Latest) || req.stop_at_gap {
        return Ok(());
    }
    for &tli in candidates {
        let path = c.path_lsns(tli);
        // The newest backup on the path decides: older ones cross the same WAL.
        if let Some(b) = backups.iter().find(|b| backup_on_path(b, &path))
            && let Attempt::Hit { last, .. } = try_backup(c, tli, b, req)
            && let Some(beyond) = c.beyond(tli, last)
        {
            return Err(PlanError::Gap {
                gap: Gap {
                    after: c.name(last.0, last.1),
                    before: beyond.next,
                },
                beyond,
            });
        }
    }
    Ok(())
}

/// `--latest` with two live branches (a promoted copy archiving here, or a split brain): which
/// end is "latest" is the user's call.
fn refuse_latest_on_two_branches(c: &Catalog, req: &Request) -> Result<(), PlanError> {
    let live = c.live_branches();
    if !matches!(req.target, Target::Latest) || req.timeline.is_some() || live.len() <= 1 {
        return Ok(());
    }
    Err(PlanError::Ambiguous {
        target: req.target.clone(),
        candidates: live
            .iter()
            .map(|&t| Branch {
                timeline: t,
                branched: None,
                stops_in: None,
                wal_to: c.window_on(t).map(|w| w.last_segment),
                latest_commit: c.latest_xact_on(t).map(|x| x.time),
            })
            .collect(),
    })
}

/// The value for `recovery_target_timeline` and why, for a plan on `tli` ending on `last`.
fn timeline_setting(
    c: &Catalog,
    req: &Request,
    tli: TimelineId,
    last: TimelineId,
) -> (String, String) {
    let newest = c.newest_timeline().unwrap_or(TimelineId::ONE);
    let latest = matches!(req.target, Target::Latest)
        || matches!(req.timeline, Some(TimelineChoice::Latest));
    match req.timeline {
        // An explicit --timeline is what gets written, whatever the target.
        Some(TimelineChoice::Id(t)) => (t.get().to_string(), format!("timeline {t} as requested")),
        Some(TimelineChoice::Current) => (
            tli.get().to_string(),
            format!("the backup's timeline, {tli}"),
        ),
        // 'latest' makes PostgreSQL follow every history file it finds: write it only when the
        // plan's timeline is the highest one there is.
        _ if latest && c.highest_timeline() == Some(last) => {
            ("latest".to_string(), format!("the newest timeline, {last}"))
        }
        _ if latest => (
            last.get().to_string(),
            format!(
                "the live end of the archived history, {last} (written as a number: 'latest' would make PostgreSQL follow timeline {}, which has no WAL here or stopped while {last} went on)",
                c.highest_timeline().unwrap_or(last),
            ),
        ),
        _ if tli == newest => (
            tli.get().to_string(),
            format!("the target is on the newest timeline's history ({tli})"),
        ),
        _ => (
            tli.get().to_string(),
            format!(
                "the target exists only on timeline {tli}, which the newer timelines branched away from"
            ),
        ),
    }
}

/// A time or LSN that lies on diverging timelines (a split brain, or a promoted copy that
/// archived here while the primary went on) stops at different places on each: the user
/// chooses. Hits that stop at the same place (a target before a fork) are one answer.
fn refuse_diverging_hits(c: &Catalog, req: &Request, hits: &[Plan]) -> Result<(), PlanError> {
    let seg_size = c.seg_size();
    let mut places: Vec<(TimelineId, SegNo)> = hits
        .iter()
        .filter_map(|p| Some((p.timeline, p.last_wal.segno(seg_size)?)))
        .collect();
    places.sort();
    places.dedup();
    // The segment where a child branched off is held by both timelines; a stop in the parent's
    // copy before the switch point (the parent wrote no commit after it there) is the child's stop
    // too.
    let same_stop = |(pt, pn): (TimelineId, SegNo), (ct, cn): (TimelineId, SegNo)| {
        pn == cn
            && c.histories
                .get(&ct)
                .and_then(|h| h.entries.iter().find(|e| e.parent == pt))
                .is_some_and(|e| {
                    e.switch_lsn.segno(seg_size) == pn
                        && c.summaries
                            .get(&(pt, pn))
                            .is_some_and(|s| s.last_xact.is_none_or(|x| x.lsn < e.switch_lsn))
                })
    };
    let all = places.clone();
    places.retain(|&a| !all.iter().any(|&b| a != b && same_stop(a, b)));
    if places.len() <= 1 || req.timeline.is_some() {
        return Ok(());
    }
    Err(PlanError::Ambiguous {
        target: req.target.clone(),
        candidates: hits
            .iter()
            .map(|p| Branch {
                timeline: p.timeline,
                branched: c
                    .timelines
                    .get(&p.timeline)
                    .and_then(|t| t.parent.zip(t.switch_lsn)),
                stops_in: Some(p.last_wal),
                wal_to: None,
                latest_commit: c.latest_xact_on(p.timeline).map(|x| x.time),
            })
            .collect(),
    })
}

/// What the attempts that missed the target said.
#[derive(Default)]
struct Missed {
    too_early: bool,
    not_found: bool,
    too_late: bool,
}

/// Why nothing reached the target.
fn refusal(c: &Catalog, req: &Request, missed: Missed) -> PlanError {
    // Before every backup only if no backup ended before the target.
    let too_early = missed.too_early && !missed.too_late;
    let window = c.window();
    let target = req.target.clone();
    match &req.target {
        Target::Name(name) if !too_early || missed.not_found => {
            let mut known: Vec<String> = c.restore_points().into_iter().map(|r| r.name).collect();
            known.dedup();
            PlanError::NameNotFound {
                name: name.clone(),
                known,
            }
        }
        Target::Xid(x) if missed.not_found => PlanError::XidNotFound { xid: *x, window },
        _ if too_early => PlanError::BeforeBackups { target, window },
        // Nothing archived anywhere ends a transaction after the target (not even beyond a gap).
        Target::Time(t) => match window.as_ref().and_then(|w| w.latest) {
            Some(latest)
                if latest.time <= *t
                    && !c
                        .summaries
                        .values()
                        .any(|s| s.max_xact_time.is_some_and(|x| x > *t)) =>
            {
                PlanError::NoTransactionAfter {
                    target,
                    latest: latest.time,
                    window,
                }
            }
            _ => PlanError::AfterLatest { target, window },
        },
        _ => PlanError::AfterLatest { target, window },
    }
}

impl fmt::Display for Plan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mib = crate::units::mib;
        writeln!(
            f,
            "backup       {} ({}), ended {} at {}",
            self.backup.id,
            self.backup.label,
            self.backup.stop_time.rfc3339(),
            self.backup.stop_lsn
        )?;
        writeln!(
            f,
            "             {}, {} files, {:.1} MiB ({:.1} MiB stored)",
            self.backup.backup_type,
            self.backup.file_count(),
            mib(self.backup.size_bytes),
            mib(self.backup.stored_bytes)
        )?;
        for p in &self.parents {
            writeln!(
                f,
                "             on {} ({}), {:.1} MiB ({:.1} MiB stored)",
                p.id,
                p.backup_type,
                mib(p.size_bytes),
                mib(p.stored_bytes)
            )?;
        }
        writeln!(
            f,
            "target       {}{}",
            self.target,
            if self.exclusive { " (exclusive)" } else { "" }
        )?;
        writeln!(f, "             {}", self.stop)?;
        let path: Vec<String> = self.path.iter().map(ToString::to_string).collect();
        writeln!(
            f,
            "timeline     {} (recovery_target_timeline = '{}'): {}",
            self.timeline, self.timeline_setting, self.timeline_reason
        )?;
        writeln!(f, "             path {}", path.join(" -> "))?;
        write!(
            f,
            "WAL          {} to {}: {} segment(s) to replay",
            self.first_wal, self.last_wal, self.wal_segments
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::Loaded;
    use crate::compress::Compression;
    use crate::index::{RestorePoint, SegmentSummary, XactRef};
    use crate::pg::xlogrecord::XactKind;
    use crate::pg::{WalFileName, WalSegSize};
    use crate::storage::identity::RepoIdentity;

    const SEG: u64 = 16 << 20;

    /// (timeline, segment number, restore points as (name, seconds into the segment)).
    type SegSpec<'a> = (u32, u64, &'a [(&'a str, u64)]);

    fn tli(n: u32) -> TimelineId {
        TimelineId::new(n).unwrap()
    }

    fn seg(t: u32, n: u64) -> SegmentName {
        SegmentName::new(tli(t), SegNo(n), WalSegSize::DEFAULT).unwrap()
    }

    /// A segment whose commits happen at times `n*100 .. n*100+50` (seconds), xids n*10..n*10+5.
    fn summary(n: u64, rps: &[(&str, u64)]) -> Vec<u8> {
        let x = |off: u64| XactRef {
            lsn: Lsn(n * SEG + 100 + off),
            xid: (n * 10 + off / 10) as u32,
            time: PgTimestamp((n * 100 + off) as i64 * 1_000_000),
            kind: XactKind::Commit,
        };
        serde_json::to_vec(&SegmentSummary {
            format: 1,
            xacts: 2,
            first_xact: Some(x(0)),
            last_xact: Some(x(50)),
            max_xact_time: Some(x(50).time),
            min_xid: Some(x(0).xid),
            max_xid: Some(x(50).xid),
            restore_points: rps
                .iter()
                .map(|(name, off)| RestorePoint {
                    name: name.to_string(),
                    time: PgTimestamp((n * 100 + off) as i64 * 1_000_000),
                    lsn: Lsn(n * SEG + 200 + off),
                })
                .collect(),
            ..Default::default()
        })
        .unwrap()
    }

    fn backup(id: &str, t: u32, start_seg: u64, stop_seg: u64) -> Vec<u8> {
        serde_json::to_vec(&BackupManifest {
            format_version: 1,
            program_version: "test".into(),
            id: id.into(),
            label: format!("label {id}"),
            system_identifier: crate::pg::SystemId(1),
            pg_version: 15,
            timeline: tli(t),
            start_lsn: Lsn(start_seg * SEG + 40),
            checkpoint_lsn: Lsn(start_seg * SEG + 100),
            stop_lsn: Lsn(stop_seg * SEG + 300),
            start_time: PgTimestamp(start_seg as i64 * 100_000_000),
            stop_time: PgTimestamp((stop_seg * 100 + 3) as i64 * 1_000_000),
            start_wal: seg(t, start_seg),
            stop_wal: seg(t, stop_seg),
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
        })
        .unwrap()
    }

    fn catalog(
        segs: &[SegSpec<'_>],
        histories: &[(u32, &str)],
        backups: &[(&str, u32, u64, u64)],
    ) -> Catalog {
        Catalog::build(Loaded {
            rollups: Vec::new(),
            identity: Some(RepoIdentity {
                format_version: 1,
                system_identifier: crate::pg::SystemId(1),
                pg_version: 15,
                wal_segment_size: crate::pg::WalSegSize::new(SEG as u32).unwrap(),
                wal_page_size: 8192,
            }),
            wal: segs
                .iter()
                .map(|&(t, n, _)| WalFileName::Segment(seg(t, n)))
                .chain(histories.iter().map(|(t, _)| WalFileName::History(tli(*t))))
                .collect(),
            histories: histories
                .iter()
                .map(|(t, h)| (tli(*t), h.as_bytes().to_vec()))
                .collect(),
            summaries: segs
                .iter()
                .map(|&(t, n, rps)| (seg(t, n), summary(n, rps)))
                .collect(),
            backups: backups
                .iter()
                .map(|&(id, t, a, b)| {
                    let m = BackupManifest::without_files_from_json(&backup(id, t, a, b));
                    (id.to_string(), Some(m))
                })
                .collect(),
        })
    }

    fn req(target: Target) -> Request {
        Request {
            target,
            exclusive: false,
            timeline: None,
            backup: None,
            stop_at_gap: false,
        }
    }

    fn secs(s: i64) -> Target {
        Target::Time(PgTimestamp(s * 1_000_000))
    }

    #[test]
    fn time_targets_inside_and_outside_the_window() {
        // Segments 1..=6 on timeline 1; backup A covers 2, backup B covers 4.
        let none: &[(&str, u64)] = &[];
        let c = catalog(
            &[
                (1, 1, none),
                (1, 2, none),
                (1, 3, none),
                (1, 4, none),
                (1, 5, none),
                (1, 6, none),
            ],
            &[],
            &[("A", 1, 2, 2), ("B", 1, 4, 4)],
        );
        // 310 s: after A ended (203), before B ended (403): A, stopping in segment 3 (commit at 350).
        let p = plan(&c, &req(secs(310))).unwrap();
        assert_eq!((p.backup.id.as_str(), p.last_wal), ("A", seg(1, 3)));
        assert_eq!(p.timeline_setting, "1");
        // 520 s: B is newer and ends before it.
        assert_eq!(plan(&c, &req(secs(520))).unwrap().backup.id, "B");
        // Before every backup's end; after the last commit (650).
        assert!(matches!(
            plan(&c, &req(secs(150))),
            Err(PlanError::BeforeBackups { .. })
        ));
        let late = plan(&c, &req(secs(650))).unwrap_err();
        assert!(
            matches!(late, PlanError::NoTransactionAfter { .. }),
            "{late}"
        );
        assert!(
            late.to_string()
                .contains("to 2000-01-01T00:10:50.000000Z on timeline 1"),
            "{late}"
        );
        // Exclusive: a commit exactly at the target counts as the stop.
        let mut r = req(secs(650));
        r.exclusive = true;
        assert!(plan(&c, &r).is_ok());
        // --backup narrows the choice.
        let mut r = req(secs(520));
        r.backup = Some("label A".into());
        assert_eq!(plan(&c, &r).unwrap().backup.id, "A");
        r.backup = Some("C".into());
        assert!(matches!(
            plan(&c, &r),
            Err(PlanError::BackupNotFound { .. })
        ));
        // Latest and immediate.
        let p = plan(&c, &req(Target::Latest)).unwrap();
        assert_eq!(
            (
                p.backup.id.as_str(),
                p.last_wal,
                p.timeline_setting.as_str()
            ),
            ("B", seg(1, 6), "latest")
        );
        assert_eq!(
            plan(&c, &req(Target::Immediate)).unwrap().last_wal,
            seg(1, 4)
        );
    }

    #[test]
    fn gaps_end_the_window() {
        let none: &[(&str, u64)] = &[];
        let c = catalog(
            &[(1, 1, none), (1, 2, none), (1, 3, none), (1, 5, none)],
            &[],
            &[("A", 1, 1, 1)],
        );
        assert!(plan(&c, &req(secs(250))).is_ok());
        assert!(matches!(
            plan(&c, &req(secs(450))),
            Err(PlanError::AfterLatest { .. })
        ));
        assert!(matches!(
            plan(&c, &req(Target::Lsn(Lsn(5 * SEG + 10)))),
            Err(PlanError::AfterLatest { .. })
        ));
        assert_eq!(
            plan(&c, &req(Target::Lsn(Lsn(3 * SEG + 10))))
                .unwrap()
                .last_wal,
            seg(1, 3)
        );
        assert!(matches!(
            plan(&c, &req(Target::Lsn(Lsn(SEG + 10)))),
            Err(PlanError::BeforeBackups { .. })
        ));
    }

    #[test]
    fn latest_over_a_gap_is_refused_unless_asked_for() {
        let none: &[(&str, u64)] = &[];
        // Timeline 1: 1..=3, gap at 4, then 5 and 6.
        let c = catalog(
            &[
                (1, 1, none),
                (1, 2, none),
                (1, 3, none),
                (1, 5, none),
                (1, 6, none),
            ],
            &[],
            &[("A", 1, 1, 1)],
        );
        let err = plan(&c, &req(Target::Latest)).unwrap_err();
        match &err {
            PlanError::Gap { gap, beyond } => {
                assert_eq!(gap.after, seg(1, 3));
                assert_eq!(gap.before, seg(1, 5));
                assert!(
                    beyond.describe().starts_with("2 archived segment(s) up to"),
                    "{beyond:?}"
                );
            }
            e => panic!("{e}"),
        }
        assert!(err.to_string().contains("--stop-at-gap"), "{err}");
        let mut r = req(Target::Latest);
        r.stop_at_gap = true;
        assert_eq!(plan(&c, &r).unwrap().last_wal, seg(1, 3));
        // A time before the gap is an explicit choice.
        assert!(plan(&c, &req(secs(250))).is_ok());
        // A gap on the old timeline keeps the new one out of reach: also refused.
        let c = catalog(
            &[(1, 1, none), (1, 2, none), (2, 4, none), (2, 5, none)],
            &[(2, "1\t0/3000100\tno recovery target specified\n")],
            &[("A", 1, 1, 1)],
        );
        match plan(&c, &req(Target::Latest)).unwrap_err() {
            PlanError::Gap { gap, beyond } => {
                assert_eq!(gap.after, seg(1, 2));
                assert!(beyond.describe().ends_with("on timeline 2"), "{beyond:?}");
            }
            e => panic!("{e}"),
        }
        // No gap: planned, and what is written is what the plan says.
        let c = catalog(&[(1, 1, none), (1, 2, none)], &[], &[("A", 1, 1, 1)]);
        let p = plan(&c, &req(Target::Latest)).unwrap();
        assert!(p.stop.contains("then promotes"), "{}", p.stop);
    }

    #[test]
    fn latest_on_a_named_timeline_writes_that_timeline() {
        let c = catalog(
            &[
                (1, 1, &[]),
                (1, 2, &[]),
                (1, 3, &[]),
                (2, 3, &[]),
                (2, 4, &[]),
            ],
            &[(2, "1\t0/3000100\tno recovery target specified\n")],
            &[("A", 1, 1, 1)],
        );
        let mut r = req(Target::Latest);
        r.timeline = Some(TimelineChoice::Id(tli(1)));
        let p = plan(&c, &r).unwrap();
        assert_eq!((p.timeline_setting.as_str(), p.last_wal), ("1", seg(1, 3)));
        r.timeline = Some(TimelineChoice::Current);
        let p = plan(&c, &r).unwrap();
        assert_eq!(p.timeline_setting, "1");
        assert!(
            p.to_string().contains("recovery_target_timeline = '1'"),
            "{p}"
        );
    }

    #[test]
    fn a_history_without_wal_does_not_take_latest() {
        let none: &[(&str, u64)] = &[];
        let c = catalog(
            &[(1, 1, none), (1, 2, none), (1, 3, none), (1, 4, none)],
            &[(2, "1\t0/2000000\tno recovery target specified\n")],
            &[("A", 1, 1, 1)],
        );
        let p = plan(&c, &req(Target::Latest)).unwrap();
        assert_eq!((p.timeline, p.last_wal), (tli(1), seg(1, 4)));
        assert_eq!(p.timeline_setting, "1");
        assert_eq!(c.window().unwrap().latest_timeline, tli(1));
    }

    #[test]
    fn a_clean_failover_has_one_live_branch_and_a_shared_switch_segment() {
        // The old primary archived segments 1-3 (3 holds the switch point, with no commit after
        // it) and stopped; timeline 2 goes on from segment 3.
        let none: &[(&str, u64)] = &[];
        let mut c = catalog(
            &[
                (1, 1, none),
                (1, 2, none),
                (1, 3, none),
                (2, 3, none),
                (2, 4, none),
            ],
            &[(2, "1\t0/3000100\tno recovery target specified\n")],
            &[("A", 1, 1, 1)],
        );
        assert_eq!(c.live_branches(), vec![tli(2)]);
        let p = plan(&c, &req(Target::Latest)).unwrap();
        assert_eq!(
            (p.last_wal, p.timeline_setting.as_str()),
            (seg(2, 4), "latest")
        );
        // A time whose stop lies in segment 3 before the switch: one answer, not two.
        for k in [(1, SegNo(3)), (2, SegNo(3))] {
            if let Some(s) = c.summaries.get_mut(&(tli(k.0), k.1)) {
                s.last_xact = s.last_xact.map(|x| XactRef {
                    lsn: Lsn(3 * SEG + 0x50),
                    ..x
                });
            }
        }
        assert_eq!(plan(&c, &req(secs(320))).unwrap().timeline, tli(2));
    }

    #[test]
    fn a_promoted_copy_does_not_take_over_from_the_primary() {
        // Timeline 2 is a promoted test restore that archived segments 3-4, then stopped; the
        // primary went on on timeline 1 to segment 6.
        let none: &[(&str, u64)] = &[];
        let c = catalog(
            &[
                (1, 1, none),
                (1, 2, none),
                (1, 3, none),
                (1, 4, none),
                (1, 5, none),
                (1, 6, none),
                (2, 3, none),
                (2, 4, none),
            ],
            &[(2, "1\t0/3000100\tno recovery target specified\n")],
            &[("A", 1, 1, 1)],
        );
        assert_eq!(c.live_branches(), vec![tli(1), tli(2)]);
        assert_eq!(c.newest_timeline(), Some(tli(1)));
        let w = c.window().unwrap();
        assert_eq!((w.latest_timeline, w.last_segment), (tli(1), seg(1, 6)));
        // --latest: which end is meant is the user's call; --timeline 1 follows the primary and
        // says so in what it writes.
        assert!(matches!(
            plan(&c, &req(Target::Latest)),
            Err(PlanError::Ambiguous { .. })
        ));
        let mut r = req(Target::Latest);
        r.timeline = Some(TimelineChoice::Id(tli(1)));
        let p = plan(&c, &r).unwrap();
        assert_eq!((p.last_wal, p.timeline_setting.as_str()), (seg(1, 6), "1"));
        // A time only the primary reached: timeline 1, no refusal.
        assert_eq!(plan(&c, &req(secs(520))).unwrap().last_wal, seg(1, 5));
        // A time on both branches after the fork: the user chooses.
        assert!(matches!(
            plan(&c, &req(secs(420))),
            Err(PlanError::Ambiguous { .. })
        ));
    }

    #[test]
    fn a_time_at_the_latest_commit_is_explained() {
        let none: &[(&str, u64)] = &[];
        let c = catalog(&[(1, 1, none), (1, 2, none)], &[], &[("A", 1, 1, 1)]);
        // The last commit is at 250 s.
        let err = plan(&c, &req(secs(250))).unwrap_err();
        assert!(
            matches!(err, PlanError::NoTransactionAfter { latest, .. } if latest == PgTimestamp(250_000_000))
                && err.to_string().contains("is the time of the latest"),
            "{err}"
        );
        assert!(err.to_string().contains("use --latest"), "{err}");
        let err = plan(&c, &req(secs(900))).unwrap_err();
        assert!(
            matches!(err, PlanError::NoTransactionAfter { .. })
                && err.to_string().contains("is after the latest"),
            "{err}"
        );
    }

    #[test]
    fn names_and_xids() {
        let c = catalog(
            &[
                (1, 1, &[("early", 1)]),
                (1, 2, &[]),
                (1, 3, &[("before_migration", 20)]),
                (1, 4, &[]),
            ],
            &[],
            &[("A", 1, 2, 2)],
        );
        let p = plan(&c, &req(Target::Name("before_migration".into()))).unwrap();
        assert_eq!(p.last_wal, seg(1, 3));
        assert!(p.stop.contains("before_migration"));
        match plan(&c, &req(Target::Name("nope".into()))).unwrap_err() {
            PlanError::NameNotFound { known, .. } => {
                assert_eq!(known, ["early", "before_migration"])
            }
            e => panic!("{e}"),
        }
        assert!(matches!(
            plan(&c, &req(Target::Name("early".into()))),
            Err(PlanError::BeforeBackups { .. })
        ));
        assert_eq!(plan(&c, &req(Target::Xid(32))).unwrap().last_wal, seg(1, 3));
        assert!(matches!(
            plan(&c, &req(Target::Xid(999))),
            Err(PlanError::XidNotFound { .. })
        ));
    }

    #[test]
    fn timelines() {
        // Timeline 2 branched from 1 in segment 3; timeline 1 went on to 5 and has a restore point in 5.
        let c = catalog(
            &[
                (1, 1, &[]),
                (1, 2, &[]),
                (1, 3, &[]),
                (1, 4, &[]),
                (1, 5, &[("on_old_branch", 10)]),
                (2, 3, &[]),
                (2, 4, &[("on_new", 10)]),
                (2, 5, &[]),
            ],
            &[(2, "1\t0/3000100\tbefore 1970-01-01 00:05:00+00\n\n")],
            &[("A", 1, 1, 1)],
        );
        // Both branches go on: --latest must be told which.
        assert!(matches!(
            plan(&c, &req(Target::Latest)),
            Err(PlanError::Ambiguous { .. })
        ));
        let mut r = req(Target::Latest);
        r.timeline = Some(TimelineChoice::Id(tli(2)));
        let p = plan(&c, &r).unwrap();
        assert_eq!((p.timeline, p.last_wal), (tli(2), seg(2, 5)));
        assert_eq!(p.path, vec![tli(1), tli(2)]);
        let p = plan(&c, &req(Target::Name("on_new".into()))).unwrap();
        assert_eq!((p.timeline_setting.as_str(), p.last_wal), ("2", seg(2, 4)));
        // Only on the old branch: timeline 1, found without being asked.
        let p = plan(&c, &req(Target::Name("on_old_branch".into()))).unwrap();
        assert_eq!((p.timeline_setting.as_str(), p.last_wal), ("1", seg(1, 5)));
        assert!(
            p.timeline_reason.contains("only on timeline 1"),
            "{}",
            p.timeline_reason
        );
        // Timeline 1 went on after timeline 2 branched off: a time after the fork means a
        // different point on each, so it is refused with both candidates until --timeline chooses.
        match plan(&c, &req(secs(420))).unwrap_err() {
            e @ PlanError::Ambiguous { .. } => {
                let candidates = e.to_string();
                assert!(
                    candidates.contains("timeline 2, branched from timeline 1 at 0/3000100")
                        && candidates.contains("timeline 1 (stops in 000000010000000000000004"),
                    "{candidates}"
                );
            }
            e => panic!("{e}"),
        }
        // A time before the fork is the same point on both: no question.
        assert_eq!(plan(&c, &req(secs(220))).unwrap().last_wal, seg(1, 2));
        let mut r = req(secs(420));
        r.timeline = Some(TimelineChoice::Id(tli(2)));
        assert_eq!(plan(&c, &r).unwrap().last_wal, seg(2, 4));
        // --timeline forces it.
        r.timeline = Some(TimelineChoice::Id(tli(1)));
        assert_eq!(plan(&c, &r).unwrap().last_wal, seg(1, 4));
        r.timeline = Some(TimelineChoice::Id(tli(7)));
        assert!(matches!(plan(&c, &r), Err(PlanError::TimelineUnknown(t)) if t == tli(7)));
    }

    #[test]
    fn a_damaged_manifest_is_named() {
        let mut c = catalog(&[(1, 1, &[])], &[], &[]);
        c.problems.push(crate::catalog::IndexProblem {
            segment: "backup 20261121T101304Z".into(),
            lsn: None,
            reason: "stored object backups/20261121T101304Z/manifest.pitr is corrupt".into(),
        });
        let err = plan(&c, &req(Target::Latest)).unwrap_err();
        assert!(matches!(err, PlanError::UnreadableBackups(_)), "{err}");
        assert!(
            err.to_string().contains("manifest.pitr is corrupt"),
            "{err}"
        );
    }

    #[test]
    fn no_backup_no_plan() {
        let c = catalog(&[(1, 1, &[])], &[], &[]);
        assert_eq!(
            plan(&c, &req(Target::Latest)).unwrap_err(),
            PlanError::NoBackup
        );
        // A backup whose WAL is missing is not restorable.
        let c = catalog(&[(1, 1, &[])], &[], &[("A", 1, 2, 3)]);
        assert_eq!(
            plan(&c, &req(Target::Latest)).unwrap_err(),
            PlanError::NoBackup
        );
    }

    /// A catalog of segments 1..=8 and backups: full A (2), incremental B on A (4), incremental
    /// C on a backup that is gone (5), and D on A but recording another start LSN for it (6).
    fn chained() -> Catalog {
        let none: &[(&str, u64)] = &[];
        let segs: Vec<SegSpec<'_>> = (1..=8).map(|n| (1, n, none)).collect();
        let mut c = catalog(&segs, &[], &[]);
        let on = |id: &str, start: u64, parent: &str, parent_start: u64| {
            let mut m: BackupManifest =
                serde_json::from_slice(&backup(id, 1, start, start)).unwrap();
            m.format_version = 2;
            m.backup_type = crate::manifest::BackupType::Incr;
            m.parent = Some(crate::manifest::Parent {
                id: parent.into(),
                start_lsn: Lsn(parent_start * SEG + 40),
                timeline: tli(1),
                block_size: 8192,
                segment_blocks: 131_072,
            });
            m
        };
        c.backups = vec![
            serde_json::from_slice(&backup("A", 1, 2, 2)).unwrap(),
            on("B", 4, "A", 2),
            on("C", 5, "gone", 3),
            on("D", 6, "A", 1),
        ];
        c
    }

    #[test]
    fn incremental_chains_restore_only_when_whole() {
        let c = chained();
        let by = |id: &str| c.backups.iter().find(|b| b.id == id).unwrap();
        let chain: Vec<&str> = c
            .chain(by("B"))
            .unwrap()
            .iter()
            .map(|b| b.id.as_str())
            .collect();
        assert_eq!(chain, ["B", "A"]);
        assert!(
            c.chain(by("C"))
                .unwrap_err()
                .contains("no readable manifest")
        );
        assert!(c.chain(by("D")).unwrap_err().contains("started at"));
        let restorable: Vec<&str> = c
            .restorable_backups()
            .iter()
            .map(|b| b.id.as_str())
            .collect();
        assert_eq!(restorable, ["A", "B"]);
        // The newest whole chain is planned, with its parents.
        let p = plan(&c, &req(Target::Latest)).unwrap();
        assert_eq!(p.backup.id, "B");
        let parents: Vec<&str> = p.parents.iter().map(|b| b.id.as_str()).collect();
        assert_eq!(parents, ["A"]);
        assert!(p.to_string().contains("  on A (full)"), "{p}");
        let mut r = req(Target::Latest);
        r.backup = Some("A".into());
        assert!(plan(&c, &r).unwrap().parents.is_empty());
        r.backup = Some("C".into());
        assert!(
            matches!(plan(&c, &r), Err(PlanError::BackupNotFound { .. })),
            "{:?}",
            plan(&c, &r)
        );
        // The parent of an incremental or differential backup.
        use crate::backup::incremental::{Start, choose_parent};
        use crate::manifest::BackupType;
        let start = |n: u64| Start {
            lsn: Lsn(n * SEG + 40),
            timeline: tli(1),
            segment: seg(1, n),
            system_identifier: crate::pg::SystemId(1),
            pg_version: 15,
            block_size: 8192,
        };
        assert_eq!(
            choose_parent(&c, BackupType::Incr, &start(7)).unwrap().id,
            "B"
        );
        assert_eq!(
            choose_parent(&c, BackupType::Diff, &start(7)).unwrap().id,
            "A"
        );
        assert_eq!(
            choose_parent(&c, BackupType::Incr, &start(3)).unwrap().id,
            "A"
        );
        assert!(choose_parent(&c, BackupType::Incr, &start(2)).is_err());
        let other_major = Start {
            pg_version: 16,
            ..start(7)
        };
        assert!(choose_parent(&c, BackupType::Incr, &other_major).is_err());
        let mut no_full = chained();
        no_full.backups.remove(0);
        assert!(
            choose_parent(&no_full, BackupType::Incr, &start(7))
                .unwrap_err()
                .contains("no restorable full backup")
        );
    }
}
