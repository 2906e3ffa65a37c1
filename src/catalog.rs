//! The manifest timeline: what a repository holds and what it can recover.
//!
//! Derived entirely from the objects (listing, `.history` files, segment summaries), so it can always
//! be rebuilt; nothing here downloads WAL. `Catalog::build` is pure and unit-tested; `load` does the
//! I/O: one listing, then history files and summaries fetched in parallel.
//!
//! Timelines follow PostgreSQL's rules: the history file of timeline N lists its ancestors and the
//! LSN where each one ended. The segment holding a switch point is read from the newer timeline (its
//! first pages are the parent's WAL up to the switch).

use std::collections::{BTreeMap, BTreeSet};

use anyhow::Context;
use futures::StreamExt;

use crate::index::{RestorePoint, SegmentSummary, XactRef};
use crate::manifest::BackupManifest;
use crate::pg::PgTimestamp;
use crate::pg::timeline::History;
use crate::pg::waldecoder::join_fragments;
use crate::pg::{Lsn, PgMajor, SegNo, SegmentName, TimelineId, WalFileName, WalSegSize};
use crate::storage::identity::RepoIdentity;
use crate::storage::layout::{Found, Listed, ObjectKey, Prefix};
use crate::storage::{Repo, envelope};

/// How many objects are fetched at once while loading.
pub const LOAD_CONCURRENCY: usize = 32;

/// Everything known about one timeline.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TimelineInfo {
    /// Parent timeline (from this timeline's history file).
    pub parent: Option<TimelineId>,
    /// Where this timeline branched off its parent.
    pub switch_lsn: Option<Lsn>,
    /// Archived segments.
    pub segments: BTreeSet<SegNo>,
    /// Archived `.partial` segments.
    pub partials: BTreeSet<SegNo>,
    /// Segments with no summary (archived by something else, or the summary is unreadable).
    pub unindexed: BTreeSet<SegNo>,
}

/// A restore point found in the index.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct FoundRestorePoint {
    /// Name.
    pub name: String,
    /// Time.
    pub time: PgTimestamp,
    /// LSN.
    pub lsn: Lsn,
    /// Timeline whose WAL holds it.
    pub timeline: TimelineId,
}

/// A segment whose records could not all be decoded.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct IndexProblem {
    /// The segment.
    pub segment: String,
    /// Where decoding stopped (absent when the summary itself was unreadable).
    pub lsn: Option<Lsn>,
    /// Why.
    pub reason: String,
}

/// The recoverable window along the newest timeline's history.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Window {
    /// Earliest restorable time: the end of the oldest restorable backup (`None` without backups).
    pub earliest: Option<PgTimestamp>,
    /// The latest commit/abort reachable through contiguous WAL.
    pub latest: Option<XactRef>,
    /// The timeline that WAL ends on.
    pub latest_timeline: TimelineId,
    /// The last segment of that contiguous WAL.
    pub last_segment: SegmentName,
}

/// Archived WAL that a walk along a timeline path cannot reach because of a gap.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Beyond {
    /// The first archived segment after the gap.
    pub next: SegmentName,
    /// The last archived segment on the path.
    pub last: SegmentName,
    /// How many archived segments lie beyond the gap.
    pub segments: u64,
}

impl Beyond {
    /// "3 segment(s) up to 000000020000000000000009 on timeline 2".
    pub fn describe(&self) -> String {
        format!(
            "{} archived segment(s) up to {} on timeline {}",
            self.segments, self.last, self.last.tli
        )
    }
}

/// A hole in the archived WAL of one timeline: segments missing between two archived runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Gap {
    /// The last archived segment before the hole.
    pub after: SegmentName,
    /// The first archived segment after it.
    pub before: SegmentName,
}

impl Gap {
    /// "segment … is missing" / "segments … to … are missing".
    pub fn describe(&self, seg_size: WalSegSize) -> String {
        let (Some(a), Some(b)) = (self.after.segno(seg_size), self.before.segno(seg_size)) else {
            return format!(
                "WAL after {} and before {} is missing",
                self.after, self.before
            );
        };
        let name = |n: u64| SegmentName::new(self.after.tli, SegNo(n), seg_size);
        match (name(a.0 + 1), name(b.0.saturating_sub(1))) {
            (Some(first), Some(last)) if first == last => format!("segment {first} is missing"),
            (Some(first), Some(last)) => format!("segments {first} to {last} are missing"),
            _ => format!(
                "WAL after {} and before {} is missing",
                self.after, self.before
            ),
        }
    }
}

/// The catalog of a repository.
#[derive(Clone, Debug, Default)]
pub struct Catalog {
    /// The cluster identity (`None` for an empty repository).
    pub identity: Option<RepoIdentity>,
    /// Timelines by id.
    pub timelines: BTreeMap<TimelineId, TimelineInfo>,
    /// Parsed history files.
    pub histories: BTreeMap<TimelineId, History>,
    /// Summaries by (timeline, segment), with segment-spanning records already joined in.
    pub summaries: BTreeMap<(TimelineId, SegNo), SegmentSummary>,
    /// Problems met while indexing.
    pub problems: Vec<IndexProblem>,
    /// Complete base backups (those with a manifest), oldest first.
    pub backups: Vec<BackupManifest>,
    /// Backup directories without a manifest (interrupted or still running).
    pub incomplete_backups: Vec<String>,
    /// Segments whose last record continues in the next segment and was joined from the two
    /// fragments (its changes are in the summary).
    pub joined_tails: BTreeSet<(TimelineId, SegNo)>,
    /// Segments whose summary came from a roll-up, without its changed blocks
    /// ([`Catalog::load_changes`] reads them).
    pub rolled: BTreeSet<(TimelineId, SegNo)>,
}

/// Why the WAL index cannot say which blocks changed over a range of WAL (an incremental backup
/// then copies what it cannot vouch for whole).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Hole {
    /// A segment on the timeline path is not archived.
    #[error("WAL segment {0} is not archived")]
    Missing(SegmentName),
    /// A segment's summary records no changed blocks.
    #[error("the summary of {segment} records no changed blocks ({why})")]
    Uncovered {
        /// The segment.
        segment: SegmentName,
        /// Why: an older summary format, a record that could not be decoded, no summary at all.
        why: String,
    },
    /// A record that continues into the next segment could not be joined, so its changes are
    /// unknown.
    #[error("the record at {lsn} continues past {segment} and could not be read whole")]
    Spanning {
        /// The segment it starts in.
        segment: SegmentName,
        /// Its start.
        lsn: Lsn,
    },
}

/// What `load` read, before any interpretation (the input of `build`).
#[derive(Debug, Default)]
pub struct Loaded {
    /// `pitr.json`.
    pub identity: Option<RepoIdentity>,
    /// WAL files listed.
    pub wal: Vec<WalFileName>,
    /// History files read.
    pub histories: Vec<(TimelineId, Vec<u8>)>,
    /// Summaries read (raw JSON).
    pub summaries: Vec<(SegmentName, Vec<u8>)>,
    /// Backup manifests read (without their files), and ids without one.
    pub backups: Vec<(String, ManifestRead)>,
    /// Roll-ups read (each covering its chunk's files and summaries).
    pub rollups: Vec<crate::rollup::Rollup>,
}

/// The segments `[start, end)` of WAL a backup needs, on its timeline.
pub fn needed_segments(
    tli: TimelineId,
    start: Lsn,
    stop: Lsn,
    seg_size: WalSegSize,
) -> Vec<SegmentName> {
    let first = start.segno(seg_size).0;
    let last = Lsn(stop.0.saturating_sub(1)).segno(seg_size).0.max(first);
    (first..=last)
        .filter_map(|n| SegmentName::new(tli, SegNo(n), seg_size))
        .collect()
}

/// Every WAL object in `repo` outside the chunks `rollups` cover (whose files they name
/// instead): history files, then each timeline listed around its rolled chunks.
async fn list_wal(
    repo: &Repo,
    rollups: &BTreeSet<(TimelineId, SegNo)>,
    seg_size: WalSegSize,
) -> anyhow::Result<Vec<Found>> {
    let parse = |entries: Vec<crate::storage::Entry>| -> Vec<Found> {
        entries
            .iter()
            .filter_map(|e| {
                crate::storage::layout::parse_wal_key(e.key())
                    .map(|what| Found { what, size: e.size })
            })
            .collect()
    };
    if rollups.is_empty() {
        return Ok(parse(repo.list(&Prefix::Wal).await?));
    }
    let mut out = parse(repo.list(&Prefix::WalHistory).await?);
    let timelines: Vec<TimelineId> = repo.wal_timelines().await?;
    for tli in timelines {
        // Runs of consecutive rolled chunks, as (first segment, last segment).
        let mut runs: Vec<(SegNo, SegNo)> = Vec::new();
        for (_, first) in rollups.iter().filter(|(t, _)| *t == tli) {
            let last = SegNo(first.0 + crate::rollup::CHUNK - 1);
            match runs.last_mut() {
                Some((_, end)) if end.0 + 1 == first.0 => *end = last,
                _ => runs.push((*first, last)),
            }
        }
        let covered = |n: SegNo| runs.iter().any(|(a, b)| *a <= n && n <= *b);
        let mut after: Option<String> = None;
        let mut ranges: Vec<(Option<String>, Option<String>)> = Vec::new();
        for (a, b) in &runs {
            ranges.push((after.take(), crate::rollup::first_key_of(tli, *a, seg_size)));
            after = crate::rollup::last_key_of(tli, *b, seg_size);
        }
        ranges.push((after, None));
        for (after, before) in ranges {
            let listed =
                crate::rollup::listed_between(repo, tli, after.as_deref(), before.as_deref())
                    .await?;
            out.extend(listed.into_iter().filter(|l| {
                // A store that lists out of order returns the rolled ranges too: leave them out.
                !l.what
                    .segment()
                    .filter(|s| s.tli == tli)
                    .and_then(|s| s.segno(seg_size))
                    .is_some_and(covered)
            }));
        }
    }
    Ok(out)
}

/// Where the summary of each segment in `listed` is read from: a summary object stored beside it
/// (by an earlier version, or one too long to carry; read whole, and preferred), else the end of
/// the segment's own object, of the size listed. A summary without its segment (a crash between
/// the two writes of an earlier version, or between the two deletions of `expire`) describes
/// nothing stored and is left out.
pub(crate) fn summary_sources(listed: &[Found]) -> Vec<(SegmentName, ObjectKey, Option<u64>)> {
    let beside: std::collections::HashSet<SegmentName> = listed
        .iter()
        .filter_map(|f| match f.what {
            Listed::Summary(s) => Some(s),
            Listed::Wal(_) | Listed::Streamed(_) => None,
        })
        .collect();
    listed
        .iter()
        .filter_map(|f| match f.what {
            Listed::Wal(WalFileName::Segment(s)) if beside.contains(&s) => {
                Some((s, ObjectKey::Summary(s), None))
            }
            Listed::Wal(name @ WalFileName::Segment(s)) => {
                Some((s, ObjectKey::Wal(name), Some(f.size)))
            }
            _ => None,
        })
        .collect()
}

/// Read a summary from where [`summary_sources`] said: a whole object (`size` `None`), or the
/// attachment at the end of a segment's object of `size` bytes. `None`: gone, or (a segment of
/// an earlier version that lost its summary) not carried.
///
/// # Errors
/// `Store`, or `Corrupt` naming the key.
pub(crate) async fn read_summary(
    repo: &Repo,
    key: &ObjectKey,
    size: Option<u64>,
) -> Result<Option<Vec<u8>>, crate::storage::RepoError> {
    match size {
        None => repo.get(key).await,
        Some(size) => repo.get_attached(key, size).await,
    }
}

/// Whether segment `seg` is stored with a readable summary: carried in its object, or stored
/// beside it.
///
/// # Errors
/// Store failures.
pub(crate) async fn summary_stored(repo: &Repo, seg: SegmentName) -> anyhow::Result<bool> {
    let key = ObjectKey::Wal(WalFileName::Segment(seg));
    let Some(size) = repo.size_of(&key).await? else {
        return Ok(false);
    };
    if repo.get_attached(&key, size).await.ok().flatten().is_some() {
        return Ok(true);
    }
    Ok(repo.exists(&ObjectKey::Summary(seg)).await?)
}

/// What reading the WAL side found: WAL file names, history files, summaries (raw), problems.
type WalRead = (
    Vec<WalFileName>,
    Vec<(TimelineId, Vec<u8>)>,
    Vec<(SegmentName, Vec<u8>)>,
    Vec<IndexProblem>,
);

/// The WAL objects outside the `claimed` chunks: listed, then the history files and (when
/// `summaries_too`) the summaries of stored segments read.
async fn load_wal(
    repo: &Repo,
    claimed: &BTreeSet<(TimelineId, SegNo)>,
    seg_size: WalSegSize,
    summaries_too: bool,
) -> anyhow::Result<WalRead> {
    let listed = list_wal(repo, claimed, seg_size).await?;
    read_listed(repo, listed, summaries_too).await
}

/// Read what `listed` names: history files, and (when `summaries_too`) the summaries of the
/// segments it lists. A corrupt object is a problem; store failures are errors.
async fn read_listed(
    repo: &Repo,
    listed: Vec<Found>,
    summaries_too: bool,
) -> anyhow::Result<WalRead> {
    let mut wal = Vec::new();
    let mut fetch = Vec::new();
    for item in &listed {
        match item.what {
            Listed::Wal(name @ WalFileName::History(_)) => {
                wal.push(name);
                fetch.push((ObjectKey::Wal(name), None));
            }
            Listed::Wal(name) => wal.push(name),
            // Summaries are read below; a segment in progress (`pitr receive`) is not archived.
            Listed::Summary(_) | Listed::Streamed(_) => {}
        }
    }
    if summaries_too {
        fetch.extend(
            summary_sources(&listed)
                .into_iter()
                .map(|(_, key, size)| (key, size)),
        );
    }
    let fetched: Vec<(ObjectKey, anyhow::Result<Option<Vec<u8>>>)> = futures::stream::iter(fetch)
        .map(|(key, size)| async move {
            let got = read_summary(repo, &key, size)
                .await
                .map_err(anyhow::Error::from);
            (key, got)
        })
        .buffer_unordered(LOAD_CONCURRENCY)
        .collect()
        .await;
    let (mut histories, mut summaries, mut problems) = (Vec::new(), Vec::new(), Vec::new());
    for (key, got) in fetched {
        match (key, got) {
            (ObjectKey::Wal(WalFileName::History(tli)), Ok(Some(b))) => histories.push((tli, b)),
            (ObjectKey::Summary(seg), Ok(Some(b)))
            | (ObjectKey::Wal(WalFileName::Segment(seg)), Ok(Some(b))) => summaries.push((seg, b)),
            (_, Ok(None)) | (_, Ok(Some(_))) => {} // deleted between listing and reading / not fetched
            (key, Err(e)) => {
                // A corrupt object is a finding, not a reason to show nothing; store failures abort.
                if e.downcast_ref::<crate::storage::RepoError>()
                    .is_some_and(|r| r.is_store_failure())
                {
                    return Err(e.context(format!("read {}", key.key())));
                }
                problems.push(IndexProblem {
                    segment: key.key(),
                    lsn: None,
                    reason: format!("{e:#}"),
                });
            }
        }
    }
    Ok((wal, histories, summaries, problems))
}

/// A backup's manifest as the catalog read it: `None` when the backup has none (incomplete),
/// else the manifest without its files, or why it could not be parsed.
pub type ManifestRead = Option<Result<BackupManifest, crate::format::FormatError>>;

/// Backup manifests read, by id, and what could not be read.
type ManifestsRead = (Vec<(String, ManifestRead)>, Vec<IndexProblem>);

/// How many backup manifests are read at once: each waits for a CPU to parse it holding its
/// stored bytes (2 MiB for 121,000 files), so not every backup's at once.
const MANIFEST_CONCURRENCY: usize = 8;

/// Every backup's manifest, without its files ([`BackupManifest::without_files_from_json`]): the
/// stored objects are read at once, but each is decompressed and parsed on a CPU slot and its
/// text dropped then, so memory never holds every manifest's files (121,000 files are 25 MiB
/// parsed).
async fn load_manifests(repo: &Repo) -> anyhow::Result<ManifestsRead> {
    let ids: Vec<String> = repo.list_dirs(&Prefix::Backups).await?;
    let manifests: Vec<(String, anyhow::Result<ManifestRead>)> = futures::stream::iter(ids)
        .map(|id| async move {
            let got = read_manifest(repo, &id, true).await;
            (id, got)
        })
        .buffer_unordered(MANIFEST_CONCURRENCY)
        .collect()
        .await;
    let (mut backups, mut problems) = (Vec::new(), Vec::new());
    for (id, got) in manifests {
        match got {
            Ok(m) => backups.push((id, m)),
            Err(e) => {
                if e.downcast_ref::<crate::storage::RepoError>()
                    .is_some_and(|r| r.is_store_failure())
                {
                    return Err(e.context(format!("read the manifest of backup {id}")));
                }
                problems.push(IndexProblem {
                    segment: format!("backup {id}"),
                    lsn: None,
                    reason: format!("{e:#}"),
                });
            }
        }
    }
    Ok((backups, problems))
}

/// Backup `id`'s manifest, parsed as it is decompressed (a manifest of 100,000 files is some
/// 25 MiB of JSON, never held whole), on a CPU slot; `without_files`: into a tally
/// ([`BackupManifest::without_files_from_json`]). `None`: the backup has no manifest. A manifest
/// that does not parse is read again whole, for the error that says why (a newer format, say).
///
/// # Errors
/// Store failures; an object that fails its checksums on every read.
pub async fn read_manifest(
    repo: &Repo,
    id: &str,
    without_files: bool,
) -> anyhow::Result<ManifestRead> {
    let key = ObjectKey::BackupManifest(id.to_string());
    let got = repo
        .read_verified(&key, |stored| async move {
            let _slot = crate::cpu::slots().acquire().await?;
            tokio::task::spawn_blocking(move || {
                envelope::decode_streaming(&stored, |r| {
                    BackupManifest::from_reader(r, without_files)
                })
            })
            .await
            .map_err(anyhow::Error::from)
        })
        .await?;
    let Some(Err(_)) = &got else {
        return Ok(got);
    };
    let Some(json) = repo.get(&key).await? else {
        return Ok(None);
    };
    Ok(Some(if without_files {
        BackupManifest::without_files_from_json(&json)
    } else {
        BackupManifest::from_json(&json)
    }))
}

/// The manifest of backup `b` with its files, read again (the catalog holds manifests without
/// them).
///
/// # Errors
/// Store failures; a manifest that is gone, unreadable or no longer the same backup.
pub async fn manifest_with_files(
    repo: &Repo,
    b: &BackupManifest,
) -> anyhow::Result<BackupManifest> {
    if !b.files_left_out() {
        return Ok(b.clone());
    }
    let key = ObjectKey::BackupManifest(b.id.clone());
    let full = read_manifest(repo, &b.id, false)
        .await
        .with_context(|| format!("read the manifest of backup {}", b.id))?
        .with_context(|| manifest_gone(repo, &b.id))?
        .with_context(|| format!("read the manifest of backup {} ({})", b.id, key.key()))?;
    require_same_backup(b, &full, full.files.len())?;
    Ok(full)
}

/// Why a manifest the catalog read is not there when read again.
pub fn manifest_gone(repo: &Repo, id: &str) -> String {
    format!(
        "the manifest of backup {id} is no longer in {} (was the backup deleted meanwhile?)",
        repo.location()
    )
}

/// `read`, a manifest read again with its `files` files, must be the backup the catalog read
/// as `lean`.
///
/// # Errors
/// A different backup under the same id, named.
pub fn require_same_backup(
    lean: &BackupManifest,
    read: &BackupManifest,
    files: usize,
) -> anyhow::Result<()> {
    if read.id != lean.id || read.stop_lsn != lean.stop_lsn || files != lean.file_count() {
        anyhow::bail!(
            "the manifest of backup {} changed while it was read ({}): run the command again",
            lean.id,
            ObjectKey::BackupManifest(lean.id.clone()).key()
        );
    }
    Ok(())
}

impl Catalog {
    /// Read the repository's catalog.
    ///
    /// # Errors
    /// Store failures; corrupt history files and summaries are reported as problems instead.
    pub async fn load(repo: &Repo) -> anyhow::Result<Catalog> {
        Catalog::load_with(repo, true).await
    }

    /// [`Catalog::load`] without reading the segment summaries: the timelines, their WAL and the
    /// backups (which are restorable, which build on which), but no window, restore points or
    /// changed blocks. For a question that needs only those, it costs a listing and the
    /// manifests instead of a GET per segment.
    ///
    /// # Errors
    /// As [`Catalog::load`].
    pub async fn load_backups(repo: &Repo) -> anyhow::Result<Catalog> {
        Catalog::load_with(repo, false).await
    }

    /// [`Catalog::load`] from the objects themselves, every summary read and no roll-up trusted:
    /// what `verify` checks, and what the roll-ups must always agree with.
    ///
    /// # Errors
    /// As [`Catalog::load`].
    pub async fn load_exhaustive(repo: &Repo) -> anyhow::Result<Catalog> {
        Catalog::load_from(repo, true, false).await
    }

    async fn load_with(repo: &Repo, summaries_too: bool) -> anyhow::Result<Catalog> {
        Catalog::load_from(repo, summaries_too, true).await
    }

    async fn load_from(
        repo: &Repo,
        summaries_too: bool,
        use_rollups: bool,
    ) -> anyhow::Result<Catalog> {
        let identity = repo.require_identity().await?;
        let seg_size = identity.wal_segment_size;
        let keys = if use_rollups {
            crate::rollup::list_keys(repo).await?
        } else {
            Vec::new()
        };
        // The chunks the roll-up keys claim: the WAL listing goes around them while the roll-ups
        // themselves are read; a claimed chunk whose roll-up turns out unusable is listed after.
        let claimed: BTreeSet<(TimelineId, SegNo)> = keys
            .iter()
            .filter_map(|k| match k {
                ObjectKey::Rollup { first, .. } => first.segno(seg_size).map(|n| (first.tli, n)),
                _ => None,
            })
            .collect();
        let (rollups, wal, manifests) = futures::join!(
            crate::rollup::load(repo, &keys, seg_size),
            load_wal(repo, &claimed, seg_size, summaries_too),
            load_manifests(repo),
        );
        let mut rollups = rollups?;
        let (mut wal, histories, mut summaries, mut problems) = wal?;
        let unusable: Vec<(TimelineId, SegNo)> = claimed
            .iter()
            .filter(|c| !rollups.contains_key(c))
            .copied()
            .collect();
        for (tli, first) in unusable {
            let last = SegNo(first.0 + crate::rollup::CHUNK - 1);
            let listed = crate::rollup::list_segments(repo, tli, first, last, seg_size).await?;
            let (more_wal, _, more, more_problems) =
                read_listed(repo, listed, summaries_too).await?;
            wal.extend(more_wal);
            summaries.extend(more);
            problems.extend(more_problems);
        }
        if !summaries_too {
            for r in rollups.values_mut() {
                r.summaries.clear();
            }
        }
        let (backups, manifest_problems) = manifests?;
        problems.extend(manifest_problems);
        let loaded = Loaded {
            identity: Some(identity),
            wal,
            histories,
            summaries,
            backups,
            rollups: rollups.into_values().collect(),
        };
        let mut catalog = Catalog::build(loaded);
        catalog.problems.extend(problems);
        Ok(catalog)
    }

    /// Interpret what `load` read. Pure.
    pub fn build(loaded: Loaded) -> Catalog {
        let mut c = Catalog {
            identity: loaded.identity,
            ..Default::default()
        };
        let Some(identity) = c.identity.clone() else {
            return c;
        };
        let seg_size = identity.wal_segment_size;
        let major = PgMajor::from_number(identity.pg_version);
        let mut wal = loaded.wal;
        let mut rolled_summaries = Vec::new();
        for r in loaded.rollups {
            wal.extend(r.files.iter().filter_map(|f| f.parse::<WalFileName>().ok()));
            for (i, s) in r.summaries.into_iter().enumerate() {
                rolled_summaries.push(((r.timeline, SegNo(r.first + i as u64)), s));
            }
            c.joined_tails
                .extend(r.joined.iter().map(|&n| (r.timeline, SegNo(n))));
        }
        for name in wal {
            match name {
                WalFileName::Segment(s) => {
                    if let Some(n) = s.segno(seg_size) {
                        c.timelines.entry(s.tli).or_default().segments.insert(n);
                    }
                }
                WalFileName::Partial(s) => {
                    if let Some(n) = s.segno(seg_size) {
                        c.timelines.entry(s.tli).or_default().partials.insert(n);
                    }
                }
                WalFileName::History(tli) => {
                    c.timelines.entry(tli).or_default();
                }
                WalFileName::BackupHistory { .. } => {}
            }
        }
        for (tli, bytes) in loaded.histories {
            match History::parse(tli, &bytes) {
                Ok(h) => {
                    if let Some(last) = h.entries.last() {
                        let t = c.timelines.entry(tli).or_default();
                        t.parent = Some(last.parent);
                        t.switch_lsn = Some(last.switch_lsn);
                    }
                    c.histories.insert(tli, h);
                }
                Err(e) => c.problems.push(IndexProblem {
                    segment: format!("{:08X}.history", tli.get()),
                    lsn: None,
                    reason: e.to_string(),
                }),
            }
        }
        for ((tli, n), s) in rolled_summaries {
            if !c
                .timelines
                .get(&tli)
                .is_some_and(|t| t.segments.contains(&n))
            {
                continue;
            }
            if let crate::index::ParseStatus::Failed { lsn, reason } = &s.status {
                c.problems.push(IndexProblem {
                    segment: c.name(tli, n).to_string(),
                    lsn: Some(*lsn),
                    reason: reason.clone(),
                });
            }
            c.rolled.insert((tli, n));
            c.summaries.insert((tli, n), s);
        }
        for (seg, bytes) in loaded.summaries {
            let Some(n) = seg.segno(seg_size) else {
                continue;
            };
            // Only a stored segment's summary is trusted.
            if !c
                .timelines
                .get(&seg.tli)
                .is_some_and(|t| t.segments.contains(&n))
            {
                continue;
            }
            match crate::format::decode::<SegmentSummary>(&bytes) {
                Ok(s) => {
                    if let crate::index::ParseStatus::Failed { lsn, reason } = &s.status {
                        c.problems.push(IndexProblem {
                            segment: seg.to_string(),
                            lsn: Some(*lsn),
                            reason: reason.clone(),
                        });
                    }
                    c.summaries.insert((seg.tli, n), s);
                }
                Err(e) => c.problems.push(IndexProblem {
                    segment: seg.to_string(),
                    lsn: None,
                    reason: e.to_string(),
                }),
            }
        }
        for (tli, t) in c.timelines.iter_mut() {
            t.unindexed = t
                .segments
                .iter()
                .copied()
                .filter(|n| !c.summaries.contains_key(&(*tli, *n)))
                .collect();
        }
        if let Some(major) = major {
            c.join_spanning_records(major);
        }
        for (id, manifest) in loaded.backups {
            match manifest {
                Some(Ok(m)) => c.backups.push(m),
                Some(Err(e)) => c.problems.push(IndexProblem {
                    segment: format!("backup {id}"),
                    lsn: None,
                    reason: e.to_string(),
                }),
                None => c.incomplete_backups.push(id),
            }
        }
        c.backups
            .sort_by(|a, b| (a.stop_time, &a.id).cmp(&(b.stop_time, &b.id)));
        c.incomplete_backups.sort();
        c
    }

    /// Whether every WAL segment from `b`'s start to its stop is archived and, for an incremental
    /// or differential backup, every backup it builds on is in the repository.
    pub fn is_restorable(&self, b: &BackupManifest) -> bool {
        self.wal_complete(b) && self.chain(b).is_ok()
    }

    /// The backups a restore of `b` reads, `b` first, then its parent, and so on back to a full
    /// backup. `Err` names the link that is missing.
    ///
    /// # Errors
    /// A parent without a readable manifest, one that does not match what the child recorded
    /// (another start LSN), or a chain that never reaches a full backup.
    pub fn chain<'a>(&'a self, b: &'a BackupManifest) -> Result<Vec<&'a BackupManifest>, String> {
        let mut out = vec![b];
        let mut at = b;
        while let Some(p) = &at.parent {
            let parent = self.backups.iter().find(|c| c.id == p.id).ok_or_else(|| {
                format!(
                    "backup {} builds on backup {}, which has no readable manifest",
                    at.id, p.id
                )
            })?;
            if parent.start_lsn != p.start_lsn || parent.start_lsn >= at.start_lsn {
                return Err(format!(
                    "backup {} builds on a backup {} that started at {}, but the one stored started at {}",
                    at.id, p.id, p.start_lsn, parent.start_lsn
                ));
            }
            if out.len() > self.backups.len() {
                return Err(format!("the parents of backup {} form a loop", b.id));
            }
            out.push(parent);
            at = parent;
        }
        if at.backup_type != crate::manifest::BackupType::Full {
            return Err(format!(
                "backup {} is {} but names no parent",
                at.id, at.backup_type
            ));
        }
        Ok(out)
    }

    /// Whether every WAL segment from `b`'s start to its stop is archived.
    pub fn wal_complete(&self, b: &BackupManifest) -> bool {
        let tli = b.timeline;
        let Some(t) = self.timelines.get(&tli) else {
            return false;
        };
        needed_segments(tli, b.start_lsn, b.stop_lsn, self.seg_size())
            .iter()
            .all(|s| {
                s.segno(self.seg_size())
                    .is_some_and(|n| t.segments.contains(&n))
            })
    }

    /// Attribute each record that spans two segments to the segment where it starts.
    fn join_spanning_records(&mut self, major: PgMajor) {
        let keys: Vec<(TimelineId, SegNo)> = self.summaries.keys().copied().collect();
        for (tli, n) in keys {
            let Some(tail) = self.summaries.get(&(tli, n)).and_then(|s| s.tail.clone()) else {
                continue;
            };
            // The continuation is on the same timeline, or on a newer one whose first pages copy it.
            let next = SegNo(n.0 + 1);
            let head = self
                .summaries
                .range((tli, next)..)
                .find(|((_, m), s)| *m == next && s.head.is_some())
                .and_then(|(_, s)| s.head.clone());
            let Some(head) = head else { continue };
            let Some(record) = join_fragments(&tail, &head) else {
                continue;
            };
            if let Some(s) = self.summaries.get_mut(&(tli, n)) {
                s.add_joined(&record, major);
                self.joined_tails.insert((tli, n));
            }
        }
    }

    /// The backups a restore can start from (every WAL segment from start to stop archived),
    /// oldest first: the one answer `restore`, `expire`, `metrics`, `info` and `verify` use.
    pub fn restorable_backups(&self) -> Vec<&BackupManifest> {
        self.backups
            .iter()
            .filter(|b| self.is_restorable(b))
            .collect()
    }

    /// The segment size of the cluster, from `pitr.json`. A catalog without an identity holds no
    /// WAL (`load` refuses a repository without one), so the size it reports there names nothing.
    pub fn seg_size(&self) -> WalSegSize {
        self.identity
            .as_ref()
            .map_or(WalSegSize::DEFAULT, |i| i.wal_segment_size)
    }

    /// Contiguous runs of segments on `tli`, as (first, last).
    pub fn ranges(&self, tli: TimelineId) -> Vec<(SegNo, SegNo)> {
        let mut out: Vec<(SegNo, SegNo)> = Vec::new();
        for &n in self
            .timelines
            .get(&tli)
            .map(|t| &t.segments)
            .into_iter()
            .flatten()
        {
            match out.last_mut() {
                Some((_, last)) if last.0 + 1 == n.0 => *last = n,
                _ => out.push((n, n)),
            }
        }
        out
    }

    /// The blocks changed by the WAL from `from` to `to`, read along the timeline path to `tli`,
    /// whole segments at a time (so a little more than the range: never less).
    ///
    /// # Errors
    /// The first [`Hole`] on the way.
    pub fn changes_between(
        &self,
        tli: TimelineId,
        from: Lsn,
        to: Lsn,
    ) -> Result<crate::blocks::BlockChanges, Hole> {
        let seg_size = self.seg_size();
        let path = self.path_to(tli);
        let (first, last) = (from.segno(seg_size), to.segno(seg_size));
        let mut out = crate::blocks::BlockChanges::default();
        for n in first.0..=last.0.max(first.0) {
            let n = SegNo(n);
            let on = path
                .iter()
                .rev()
                .find(|(_, begin)| *begin <= n)
                .map_or(tli, |(t, _)| *t);
            let name = self.name(on, n);
            if !self
                .timelines
                .get(&on)
                .is_some_and(|t| t.segments.contains(&n))
            {
                return Err(Hole::Missing(name));
            }
            let uncovered = |why: &str| Hole::Uncovered {
                segment: name,
                why: why.to_string(),
            };
            if self.rolled.contains(&(on, n)) {
                return Err(uncovered(
                    "its changed blocks were not read (they are in its own summary, not the roll-up)",
                ));
            }
            let summary = self
                .summaries
                .get(&(on, n))
                .ok_or_else(|| uncovered("no readable summary"))?;
            let changes = summary.changes.as_ref().ok_or_else(|| {
                uncovered(match &summary.status {
                    crate::index::ParseStatus::Failed { .. } => {
                        "its records could not all be decoded"
                    }
                    crate::index::ParseStatus::Ok => "written by an older pitr",
                })
            })?;
            if let Some(lsn) = summary.wal_level_minimal {
                return Err(uncovered(&format!(
                    "wal_level was set to minimal at {lsn}: writes after that need not be in the WAL"
                )));
            }
            out.then(changes);
            if let Some(tail) = &summary.tail
                && n < last
                && !self.joined_tails.contains(&(on, n))
            {
                return Err(Hole::Spanning {
                    segment: name,
                    lsn: tail.lsn,
                });
            }
        }
        Ok(out)
    }

    /// Read the changed blocks [`Catalog::changes_between`] needs for `from..to` along the path to
    /// `tli` where the catalog holds them only as roll-ups: the segments' own summaries replace the
    /// rolled ones, and records spanning two segments are joined again. A summary that cannot be
    /// read leaves its segment rolled, which `changes_between` then reports as a hole.
    ///
    /// # Errors
    /// Store failures.
    pub async fn load_changes(
        &mut self,
        repo: &Repo,
        tli: TimelineId,
        from: Lsn,
        to: Lsn,
    ) -> anyhow::Result<()> {
        let seg_size = self.seg_size();
        let path = self.path_to(tli);
        let on = |n: SegNo| {
            path.iter()
                .rev()
                .find(|(_, begin)| *begin <= n)
                .map_or(tli, |(t, _)| *t)
        };
        let (first, last) = (from.segno(seg_size), to.segno(seg_size));
        let last = SegNo(last.0.max(first.0));
        // The segments of the range, and the one after it for the head fragment its last joins.
        let want: Vec<((TimelineId, SegNo), bool)> = (first.0..=last.0 + 1)
            .map(|n| ((on(SegNo(n)), SegNo(n)), n <= last.0))
            .filter(|(k, _)| self.rolled.contains(k))
            .collect();
        if want.is_empty() {
            return Ok(());
        }
        // Where each summary is: one range listing per timeline of the range.
        let mut sources: BTreeMap<(TimelineId, SegNo), (ObjectKey, Option<u64>)> = BTreeMap::new();
        let mut spans: BTreeMap<TimelineId, (SegNo, SegNo)> = BTreeMap::new();
        for ((t, n), _) in &want {
            let span = spans.entry(*t).or_insert((*n, *n));
            span.0 = span.0.min(*n);
            span.1 = span.1.max(*n);
        }
        for (t, (a, b)) in spans {
            let listed = crate::rollup::list_segments(repo, t, a, b, seg_size).await?;
            for (seg, key, size) in summary_sources(&listed) {
                if let Some(n) = seg.segno(seg_size) {
                    sources.insert((seg.tli, n), (key, size));
                }
            }
        }
        type ToRead = ((TimelineId, SegNo), bool, ObjectKey, Option<u64>);
        let keys: Vec<ToRead> = want
            .into_iter()
            .filter_map(|(k, in_range)| {
                let (key, size) = sources.remove(&k)?;
                Some((k, in_range, key, size))
            })
            .collect();
        let got: Vec<_> = futures::stream::iter(keys)
            .map(|(k, in_range, key, size)| async move {
                let got = read_summary(repo, &key, size).await;
                (k, in_range, key, got)
            })
            .buffer_unordered(LOAD_CONCURRENCY)
            .collect()
            .await;
        let mut heads = BTreeMap::new();
        let mut replaced = Vec::new();
        for (k, in_range, key, got) in got {
            let bytes = match got {
                Ok(Some(b)) => b,
                Ok(None) => continue,
                Err(e) if e.is_store_failure() => {
                    return Err(anyhow::Error::new(e).context(format!("read {}", key.key())));
                }
                Err(_) => continue,
            };
            let Ok(summary) = crate::format::decode::<SegmentSummary>(&bytes) else {
                continue;
            };
            if in_range {
                self.summaries.insert(k, summary);
                self.rolled.remove(&k);
                self.joined_tails.remove(&k);
                replaced.push(k);
            } else if let Some(h) = summary.head {
                heads.insert(k, h);
            }
        }
        let Some(major) = self
            .identity
            .as_ref()
            .and_then(|i| PgMajor::from_number(i.pg_version))
        else {
            return Ok(());
        };
        for (t, n) in replaced {
            let Some(tail) = self.summaries.get(&(t, n)).and_then(|s| s.tail.clone()) else {
                continue;
            };
            let next = SegNo(n.0 + 1);
            let head = heads
                .range((t, next)..)
                .find(|((_, m), _)| *m == next)
                .map(|(_, h)| h.clone())
                .or_else(|| {
                    self.summaries
                        .range((t, next)..)
                        .find(|((_, m), s)| *m == next && s.head.is_some())
                        .and_then(|(_, s)| s.head.clone())
                });
            let Some(record) = head.and_then(|h| join_fragments(&tail, &h)) else {
                continue;
            };
            if let Some(s) = self.summaries.get_mut(&(t, n)) {
                s.add_joined(&record, major);
                self.joined_tails.insert((t, n));
            }
        }
        Ok(())
    }

    /// The holes in the archived WAL of `tli`, oldest first.
    pub fn gaps(&self, tli: TimelineId) -> Vec<Gap> {
        self.ranges(tli)
            .windows(2)
            .filter_map(|w| match w {
                [(_, last), (next, _)] => Some(Gap {
                    after: self.name(tli, *last),
                    before: self.name(tli, *next),
                }),
                _ => None,
            })
            .collect()
    }

    /// The holes on every timeline whose archived WAL resumes after segment `from` (all of them
    /// for `None`): the WAL a restore from a backup starting at `from` could need.
    pub fn gaps_after(&self, from: Option<SegNo>) -> Vec<Gap> {
        let seg_size = self.seg_size();
        self.timelines
            .keys()
            .flat_map(|&t| self.gaps(t))
            .filter(|g| from.is_none_or(|f| g.before.segno(seg_size).is_some_and(|n| n > f)))
            .collect()
    }

    /// The segment name of `n` on `tli`.
    pub fn name(&self, tli: TimelineId, n: SegNo) -> SegmentName {
        SegmentName::new(tli, n, self.seg_size()).expect("segment numbers come from valid names")
    }

    /// The timeline whose WAL is the live end of the history: among the [live
    /// branches](Catalog::live_branches), the one with the latest archived commit (the highest on a
    /// tie). A history file alone (a promotion whose WAL has not arrived yet, or a stray file) does
    /// not move the window or `--latest` to a timeline nothing can be replayed on; and a promoted
    /// copy that archived into this repository does not take over from the primary that goes on.
    pub fn newest_timeline(&self) -> Option<TimelineId> {
        let live = self.live_branches();
        live.iter()
            .copied()
            .max_by_key(|t| (self.latest_xact_on(*t).map(|x| x.time), *t))
            .or_else(|| self.timelines.keys().next_back().copied())
    }

    /// Timelines with archived WAL that nothing supersedes: those that are no other such
    /// timeline's ancestor, and ancestors whose WAL goes on past the point where a child branched
    /// off (two servers archiving diverging histories: a split brain, or a promoted copy).
    pub fn live_branches(&self) -> Vec<TimelineId> {
        let seg_size = self.seg_size();
        let with_wal: Vec<TimelineId> = self
            .timelines
            .iter()
            .filter(|(_, t)| !t.segments.is_empty())
            .map(|(tli, _)| *tli)
            .collect();
        with_wal
            .iter()
            .copied()
            .filter(|&tli| {
                // Every child (with WAL) that branched from `tli`, at its switch point.
                let switches: Vec<SegNo> = with_wal
                    .iter()
                    .filter(|&&c| c != tli)
                    .filter_map(|c| {
                        let h = self.histories.get(c)?;
                        h.entries
                            .iter()
                            .find(|e| e.parent == tli)
                            .map(|e| e.switch_lsn.segno(seg_size))
                    })
                    .collect();
                let Some(earliest_switch) = switches.iter().min() else {
                    return true; // nobody branched from it
                };
                // Goes on past the switch segment (which both may hold).
                self.timelines.get(&tli).is_some_and(|t| {
                    t.segments
                        .range(SegNo(earliest_switch.0 + 1)..)
                        .next()
                        .is_some()
                })
            })
            .collect()
    }

    /// Whether backup `b` lies on the timeline path to `tli`.
    pub fn backup_on_path(&self, b: &BackupManifest, tli: TimelineId) -> bool {
        self.path_lsns(tli).iter().any(|&(t, begin, end)| {
            t == b.timeline && b.start_lsn >= begin && end.is_none_or(|e| b.stop_lsn <= e)
        })
    }

    /// The highest timeline any object names (history files included).
    pub fn highest_timeline(&self) -> Option<TimelineId> {
        self.timelines.keys().next_back().copied()
    }

    /// The timeline path to `tli`: (timeline, first segment read from it), oldest first.
    pub fn path_to(&self, tli: TimelineId) -> Vec<(TimelineId, SegNo)> {
        let seg_size = self.seg_size();
        let mut path = Vec::new();
        let mut begin = SegNo(0);
        if let Some(h) = self.histories.get(&tli) {
            for e in &h.entries {
                path.push((e.parent, begin));
                begin = e.switch_lsn.segno(seg_size);
            }
        }
        path.push((tli, begin));
        path
    }

    /// The timeline path to `tli` as LSN ranges: (timeline, begin, end), oldest first; the last one
    /// is open-ended.
    pub fn path_lsns(&self, tli: TimelineId) -> Vec<(TimelineId, Lsn, Option<Lsn>)> {
        let mut path = Vec::new();
        let mut begin = Lsn(0);
        if let Some(h) = self.histories.get(&tli) {
            for e in &h.entries {
                path.push((e.parent, begin, Some(e.switch_lsn)));
                begin = e.switch_lsn;
            }
        }
        path.push((tli, begin, None));
        path
    }

    /// Walk contiguous WAL from segment `start` along the path to `tli`, calling `f` for each
    /// segment read; returns the last (timeline, segment) reached.
    pub fn walk(
        &self,
        tli: TimelineId,
        start: SegNo,
        mut f: impl FnMut(TimelineId, SegNo),
    ) -> Option<(TimelineId, SegNo)> {
        let path = self.path_to(tli);
        let mut n = start;
        let mut last = None;
        loop {
            let on = path
                .iter()
                .rev()
                .find(|(_, begin)| *begin <= n)
                .map(|(t, _)| *t)?;
            if !self
                .timelines
                .get(&on)
                .is_some_and(|t| t.segments.contains(&n))
            {
                return last;
            }
            f(on, n);
            last = Some((on, n));
            n = SegNo(n.0 + 1);
        }
    }

    /// The archived segments on the path to `tli` that lie after `reached` (where a walk from a
    /// backup stopped at a gap); `None` when the walk reached the end of what is archived.
    pub fn beyond(&self, tli: TimelineId, reached: (TimelineId, SegNo)) -> Option<Beyond> {
        let path = self.path_to(tli);
        let mut found: Vec<(TimelineId, SegNo)> = Vec::new();
        for (i, &(t, begin)) in path.iter().enumerate() {
            let end = path.get(i + 1).map(|&(_, b)| b);
            let Some(info) = self.timelines.get(&t) else {
                continue;
            };
            found.extend(
                info.segments
                    .iter()
                    .filter(|&&n| n >= begin && end.is_none_or(|e| n < e) && n > reached.1)
                    .map(|&n| (t, n)),
            );
        }
        let (&(t0, n0), &(t1, n1)) = (found.first()?, found.last()?);
        Some(Beyond {
            next: self.name(t0, n0),
            last: self.name(t1, n1),
            segments: found.len() as u64,
        })
    }

    /// All restore points, in LSN order.
    pub fn restore_points(&self) -> Vec<FoundRestorePoint> {
        let mut v: Vec<FoundRestorePoint> = self
            .summaries
            .iter()
            .flat_map(|((tli, _), s)| {
                s.restore_points
                    .iter()
                    .map(move |RestorePoint { name, time, lsn }| FoundRestorePoint {
                        name: name.clone(),
                        time: *time,
                        lsn: *lsn,
                        timeline: *tli,
                    })
            })
            .collect();
        v.sort_by_key(|r| (r.lsn, r.timeline));
        v
    }

    /// The latest transaction end (by time) in the segments `f` selects.
    fn latest_xact_in(
        &self,
        segs: impl IntoIterator<Item = (TimelineId, SegNo)>,
    ) -> Option<XactRef> {
        segs.into_iter()
            .filter_map(|k| self.summaries.get(&k))
            .filter_map(|s| {
                s.last_xact
                    .map(|last| (s.max_xact_time.unwrap_or(last.time), last))
            })
            .max_by_key(|(t, x)| (*t, x.lsn))
            .map(|(t, x)| XactRef { time: t, ..x })
    }

    /// The latest commit/abort on timeline `tli` (any of its segments).
    pub fn latest_xact_on(&self, tli: TimelineId) -> Option<XactRef> {
        let segs = self
            .timelines
            .get(&tli)
            .map(|t| t.segments.iter().map(|n| (tli, *n)).collect::<Vec<_>>());
        self.latest_xact_in(segs.into_iter().flatten())
    }

    /// The recoverable window along the newest timeline (see [`Catalog::window_on`]).
    pub fn window(&self) -> Option<Window> {
        self.window_on(self.newest_timeline()?)
    }

    /// The recoverable window along the path to timeline `newest`: from the end of the oldest
    /// restorable backup on that path to the latest commit reachable through contiguous WAL from
    /// one. Without a restorable backup it is measured from the oldest archived segment, and
    /// `earliest` is `None`.
    pub fn window_on(&self, newest: TimelineId) -> Option<Window> {
        let restorable: Vec<&BackupManifest> = self
            .backups
            .iter()
            .filter(|b| self.is_restorable(b) && self.backup_on_path(b, newest))
            .collect();
        if !restorable.is_empty() {
            let mut best: Option<Window> = None;
            for b in &restorable {
                let start = b.start_lsn.segno(self.seg_size());
                let mut walked = Vec::new();
                let Some((t, n)) = self.walk(newest, start, |t, n| walked.push((t, n))) else {
                    continue;
                };
                let w = Window {
                    earliest: None,
                    latest: self.latest_xact_in(walked),
                    latest_timeline: t,
                    last_segment: self.name(t, n),
                };
                let better = match &best {
                    None => true,
                    Some(cur) => {
                        (
                            w.last_segment.segno(self.seg_size()),
                            w.latest.map(|x| x.time),
                        ) > (
                            cur.last_segment.segno(self.seg_size()),
                            cur.latest.map(|x| x.time),
                        )
                    }
                };
                if better {
                    best = Some(w);
                }
            }
            if let Some(mut w) = best {
                w.earliest = restorable.iter().map(|b| b.stop_time).min();
                // A commit before the end of every backup cannot be recovered to.
                if w.latest.zip(w.earliest).is_some_and(|(x, e)| x.time < e) {
                    w.latest = None;
                }
                return Some(w);
            }
        }
        let (first_tli, _) = *self.path_to(newest).first()?;
        let start = self
            .path_to(newest)
            .iter()
            .find_map(|(t, _)| {
                self.timelines
                    .get(t)
                    .and_then(|i| i.segments.first().copied())
            })
            .or_else(|| {
                self.timelines
                    .get(&first_tli)
                    .and_then(|t| t.segments.first().copied())
            })?;
        let mut walked = Vec::new();
        let (last_tli, last_n) = self.walk(newest, start, |t, n| walked.push((t, n)))?;
        Some(Window {
            earliest: None,
            latest: self.latest_xact_in(walked),
            latest_timeline: last_tli,
            last_segment: self.name(last_tli, last_n),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::XactRef;
    use crate::pg::xlogrecord::XactKind;

    fn ident() -> RepoIdentity {
        RepoIdentity {
            format_version: 1,
            system_identifier: crate::pg::SystemId(1),
            pg_version: 15,
            wal_segment_size: crate::pg::WalSegSize::DEFAULT,
            wal_page_size: 8192,
        }
    }

    fn seg(tli: u32, n: u64) -> SegmentName {
        SegmentName::new(TimelineId::new(tli).unwrap(), SegNo(n), WalSegSize::DEFAULT).unwrap()
    }

    fn summary(time: i64) -> Vec<u8> {
        let x = XactRef {
            lsn: Lsn(time as u64),
            xid: 1,
            time: PgTimestamp(time),
            kind: XactKind::Commit,
        };
        serde_json::to_vec(&SegmentSummary {
            format: 1,
            xacts: 1,
            first_xact: Some(x),
            last_xact: Some(x),
            max_xact_time: Some(PgTimestamp(time)),
            ..Default::default()
        })
        .unwrap()
    }

    fn loaded(segs: &[(u32, u64)], histories: &[(u32, &str)]) -> Loaded {
        Loaded {
            rollups: Vec::new(),
            identity: Some(ident()),
            wal: segs
                .iter()
                .map(|&(t, n)| WalFileName::Segment(seg(t, n)))
                .chain(
                    histories
                        .iter()
                        .map(|(t, _)| WalFileName::History(TimelineId::new(*t).unwrap())),
                )
                .collect(),
            histories: histories
                .iter()
                .map(|(t, h)| (TimelineId::new(*t).unwrap(), h.as_bytes().to_vec()))
                .collect(),
            summaries: segs
                .iter()
                .map(|&(t, n)| (seg(t, n), summary((t as i64) * 1000 + n as i64)))
                .collect(),
            backups: Vec::new(),
        }
    }

    /// A summary of segment `n` on `tli` whose records modified block `n` of relation 16384 (and,
    /// on segment 3, truncated it to 2 blocks first).
    fn summary_with_changes(tli: u32, n: u64, tail: bool) -> Vec<u8> {
        use crate::pg::blockref::{Change, RelFork};
        let rel = RelFork {
            spc: 1663,
            db: 5,
            rel: 16384,
            fork: 0,
        };
        let mut ch = crate::blocks::BlockChanges::default();
        if n == 3 {
            ch.apply(Change::Limit(rel, 2));
        }
        ch.apply(Change::Modified(rel, n as u32 * 10));
        ch.finish();
        let mut s: SegmentSummary =
            serde_json::from_slice(&summary(tli as i64 * 1000 + n as i64)).unwrap();
        s.format = crate::index::SUMMARY_FORMAT;
        s.changes = Some(ch);
        if tail {
            s.tail = Some(crate::pg::waldecoder::TailFragment {
                lsn: Lsn(n * (16 << 20) + 100),
                tot_len: 200_000,
                bytes: Vec::new(),
            });
        }
        serde_json::to_vec(&s).unwrap()
    }

    #[test]
    fn a_wal_level_of_minimal_is_a_hole() {
        let mut l = loaded(&[(1, 1), (1, 2), (1, 3)], &[]);
        let mut minimal: SegmentSummary =
            serde_json::from_slice(&summary_with_changes(1, 2, false)).unwrap();
        minimal.wal_level_minimal = Some(Lsn(2 * (16 << 20) + 500));
        l.summaries = vec![
            (seg(1, 1), summary_with_changes(1, 1, false)),
            (seg(1, 2), serde_json::to_vec(&minimal).unwrap()),
            (seg(1, 3), summary_with_changes(1, 3, false)),
        ];
        let c = Catalog::build(l);
        let at = |n: u64| Lsn(n * (16 << 20) + 40);
        assert!(c.changes_between(TimelineId::ONE, at(1), at(1)).is_ok());
        assert!(c.changes_between(TimelineId::ONE, at(3), at(3)).is_ok());
        let hole = c
            .changes_between(TimelineId::ONE, at(1), at(3))
            .unwrap_err();
        assert!(
            matches!(&hole, Hole::Uncovered { segment, why } if *segment == seg(1, 2) && why.contains("minimal")),
            "{hole}"
        );
    }

    #[test]
    fn changes_between_two_lsns_fold_or_name_the_hole() {
        let mut l = loaded(&[(1, 1), (1, 2), (1, 3), (1, 4), (1, 6)], &[]);
        l.summaries = vec![
            (seg(1, 1), summary_with_changes(1, 1, false)),
            (seg(1, 2), summary_with_changes(1, 2, false)),
            (seg(1, 3), summary_with_changes(1, 3, true)),
            (seg(1, 4), summary(1004)), // format 1: no changes
            (seg(1, 6), summary_with_changes(1, 6, false)),
        ];
        let c = Catalog::build(l);
        let one = TimelineId::ONE;
        let at = |n: u64| Lsn(n * (16 << 20) + 40);
        let rel = crate::pg::blockref::RelFork {
            spc: 1663,
            db: 5,
            rel: 16384,
            fork: 0,
        };
        let ch = c.changes_between(one, at(1), at(2)).unwrap();
        assert_eq!(ch.fork(&rel).unwrap().blocks, [10, 20]);
        // Segment 3 truncated the relation to 2 blocks: 10 and 20 are forgotten, 30 counts.
        let ch = c.changes_between(one, at(1), at(3)).unwrap();
        let f = ch.fork(&rel).unwrap();
        assert_eq!((f.limit, f.blocks.as_slice()), (Some(2), &[30][..]));
        // Segment 3's last record continues into 4 and was never joined.
        assert!(matches!(
            c.changes_between(one, at(3), at(4)),
            Err(Hole::Spanning { segment, .. }) if segment == seg(1, 3)
        ));
        assert!(matches!(
            c.changes_between(one, at(4), at(4)),
            Err(Hole::Uncovered { segment, .. }) if segment == seg(1, 4)
        ));
        assert_eq!(
            c.changes_between(one, at(6), at(7)),
            Err(Hole::Missing(seg(1, 7)))
        );
        assert!(c.changes_between(one, at(6), at(6)).is_ok());
    }

    #[test]
    fn ranges_and_gaps() {
        let c = Catalog::build(loaded(
            &[(1, 1), (1, 2), (1, 3), (1, 5), (1, 6), (1, 9)],
            &[],
        ));
        let one = TimelineId::ONE;
        assert_eq!(
            c.ranges(one),
            vec![
                (SegNo(1), SegNo(3)),
                (SegNo(5), SegNo(6)),
                (SegNo(9), SegNo(9))
            ]
        );
        // The window stops at the first gap.
        let w = c.window().unwrap();
        assert_eq!(w.last_segment, seg(1, 3));
        assert_eq!(w.latest.unwrap().time, PgTimestamp(1003));
        assert_eq!(w.earliest, None);
    }

    #[test]
    fn window_follows_the_newest_timeline() {
        // Timeline 2 branched from 1 inside segment 3; timeline 1 went on to segment 5 (abandoned).
        let c = Catalog::build(loaded(
            &[(1, 1), (1, 2), (1, 3), (1, 4), (1, 5), (2, 3), (2, 4)],
            &[(2, "1\t0/3001000\tbefore 2026-01-01 00:00:00+00\n\n")],
        ));
        let two = TimelineId::new(2).unwrap();
        assert_eq!(
            c.path_to(two),
            vec![(TimelineId::ONE, SegNo(0)), (two, SegNo(3))]
        );
        assert_eq!(c.timelines[&two].parent, Some(TimelineId::ONE));
        let w = c.window().unwrap();
        assert_eq!((w.latest_timeline, w.last_segment), (two, seg(2, 4)));
        // Segment 5 of timeline 1 (time 1005) is not on the path; 2/4 (2004) is the latest.
        assert_eq!(w.latest.unwrap().time, PgTimestamp(2004));
        let mut walked = Vec::new();
        c.walk(two, SegNo(1), |t, n| walked.push((t.get(), n.0)));
        assert_eq!(walked, vec![(1, 1), (1, 2), (2, 3), (2, 4)]);
    }

    #[test]
    fn a_summary_without_its_segment_is_ignored() {
        // Segment 4's summary was stored, the segment itself not (a crash between the two).
        let mut l = loaded(&[(1, 1), (1, 2), (1, 3)], &[]);
        l.summaries.push((seg(1, 4), summary(1004)));
        let c = Catalog::build(l);
        assert!(!c.summaries.contains_key(&(TimelineId::ONE, SegNo(4))));
        let w = c.window().unwrap();
        assert_eq!(w.last_segment, seg(1, 3));
        assert_eq!(w.latest.unwrap().time, PgTimestamp(1003));
    }

    #[test]
    fn problems_are_reported_not_fatal() {
        let mut l = loaded(&[(1, 1), (1, 2)], &[(2, "garbage")]);
        l.summaries[1].1 = b"{not json".to_vec();
        let c = Catalog::build(l);
        assert_eq!(c.problems.len(), 2, "{:?}", c.problems);
        assert!(c.timelines[&TimelineId::ONE].unindexed.contains(&SegNo(2)));
        assert_eq!(Catalog::build(Loaded::default()).window(), None);
    }
}
