//! Roll-ups of the WAL index, so the catalog of a repository holding 100 000 segments is a few
//! hundred reads instead of one per segment.
//!
//! A roll-up covers one complete chunk of [`CHUNK`] segments of a timeline (segment numbers
//! `k*256 ..= k*256+255`): the names of the WAL files stored in that range and each segment's
//! summary as the catalog uses it, with the records spanning two segments of the chunk already
//! joined and without the changed blocks (an incremental backup reads those from the segments'
//! own summaries, for its range only).
//!
//! Roll-ups are derived: rebuildable from the summaries, written only as new objects (two writers
//! of the same chunk write the same thing; the second finds the first's), and ignored when they
//! cannot be read or do not fit their key. `expire` deletes the roll-up of a chunk before any of
//! its segments, `verify` deletes a roll-up that names a segment no longer stored, and `restore`
//! lists the segments it replays before it writes a byte, so a segment removed by hand from a
//! rolled range is still found missing.

use std::collections::{BTreeMap, BTreeSet};

use anyhow::Context;
use futures::StreamExt;
use serde::{Deserialize, Serialize};

use crate::compress::Compression;
use crate::index::SegmentSummary;
use crate::pg::waldecoder::join_fragments;
use crate::pg::{PgMajor, SegNo, SegmentName, TimelineId, WalFileName, WalSegSize};
use crate::storage::layout::{Found, Listed, ObjectKey, Prefix};
use crate::storage::{PutMode, Repo, RepoError};

/// Roll-up format version.
pub const ROLLUP_FORMAT: u32 = 1;

/// Segments per roll-up.
pub const CHUNK: u64 = 256;

/// What a GET answered.
type Got = Result<Option<Vec<u8>>, RepoError>;

/// How many objects a roll-up writer or reader fetches at once.
const CONCURRENCY: usize = 32;

/// One chunk's roll-up.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rollup {
    /// Format version.
    pub format: u32,
    /// The timeline.
    pub timeline: TimelineId,
    /// The chunk's first segment number (a multiple of [`CHUNK`]).
    pub first: u64,
    /// The WAL files stored in the chunk's range when it was rolled up: every segment, and any
    /// `.partial` and `.backup` files.
    pub files: Vec<String>,
    /// The summaries of segments `first ..`, in order, one per segment, without changed blocks.
    /// Spanning records inside the chunk are joined in; the first segment keeps its head fragment
    /// and the last its tail, for the catalog to join with the neighbouring chunks.
    pub summaries: Vec<SegmentSummary>,
    /// Segments whose last record continued into the next segment and was joined.
    #[serde(default)]
    pub joined: Vec<u64>,
}

impl crate::format::Versioned for Rollup {
    const WHAT: &'static str = "WAL index roll-up";
    const SUPPORTED: u32 = ROLLUP_FORMAT;
    fn version(&self) -> u32 {
        self.format
    }
}

/// The first segment of the chunk holding `n`.
pub fn chunk_start(n: SegNo) -> SegNo {
    SegNo(n.0 - n.0 % CHUNK)
}

/// Whether `n` is the last segment of its chunk.
pub fn ends_chunk(n: SegNo) -> bool {
    n.0 % CHUNK == CHUNK - 1
}

/// The key of the roll-up of the chunk starting at `first` on `tli`; `None` past the last
/// segment a name can hold.
pub fn key(tli: TimelineId, first: SegNo, seg_size: WalSegSize) -> Option<ObjectKey> {
    Some(ObjectKey::Rollup {
        first: SegmentName::new(tli, first, seg_size)?,
        last: SegmentName::new(tli, SegNo(first.0 + CHUNK - 1), seg_size)?,
    })
}

impl Rollup {
    /// Roll up the chunk starting at `first` on `tli` from the decoded summaries of its
    /// segments (all [`CHUNK`] of them, in order) and the WAL files stored in its range. Pure.
    pub fn build(
        tli: TimelineId,
        first: SegNo,
        files: Vec<String>,
        mut summaries: Vec<SegmentSummary>,
        major: PgMajor,
    ) -> Rollup {
        let mut joined = Vec::new();
        let last = summaries.len().saturating_sub(1);
        for i in 0..last {
            let (Some(tail), Some(head)) = (
                summaries.get(i).and_then(|s| s.tail.clone()),
                summaries.get(i + 1).and_then(|s| s.head.clone()),
            ) else {
                continue;
            };
            if let (Some(record), Some(s)) = (join_fragments(&tail, &head), summaries.get_mut(i)) {
                s.add_joined(&record, major);
                s.tail = None;
                joined.push(first.0 + i as u64);
            }
        }
        for (i, s) in summaries.iter_mut().enumerate() {
            s.changes = None;
            if i > 0 {
                s.head = None;
            }
        }
        Rollup {
            format: ROLLUP_FORMAT,
            timeline: tli,
            first: first.0,
            files,
            summaries,
            joined,
        }
    }

    /// Whether this roll-up is the one its key names, for this cluster's segment size: the
    /// timeline and range match, every segment of the range is among its files, and there is one
    /// summary per segment.
    pub fn fits(&self, key: &ObjectKey, seg_size: WalSegSize) -> bool {
        let ObjectKey::Rollup { first, last } = key else {
            return false;
        };
        let (Some(a), Some(b)) = (first.segno(seg_size), last.segno(seg_size)) else {
            return false;
        };
        let names: BTreeSet<&str> = self.files.iter().map(String::as_str).collect();
        self.format <= ROLLUP_FORMAT
            && self.timeline == first.tli
            && a.0 == self.first
            && b.0 == self.first + CHUNK - 1
            && a.0 % CHUNK == 0
            && self.summaries.len() as u64 == CHUNK
            && self
                .summaries
                .iter()
                .all(|s| s.format <= crate::index::SUMMARY_FORMAT)
            && (a.0..=b.0).all(|n| {
                SegmentName::new(self.timeline, SegNo(n), seg_size)
                    .is_some_and(|s| names.contains(s.to_string().as_str()))
            })
    }

    /// The segment numbers it covers.
    pub fn range(&self) -> std::ops::RangeInclusive<u64> {
        self.first..=self.first + CHUNK - 1
    }
}

/// The keys of every roll-up in `repo`.
///
/// # Errors
/// The store cannot be listed.
pub async fn list_keys(repo: &Repo) -> Result<Vec<ObjectKey>, RepoError> {
    Ok(repo
        .list(&Prefix::Index)
        .await?
        .into_iter()
        .filter_map(|e| e.object)
        .filter(|k| matches!(k, ObjectKey::Rollup { .. }))
        .collect())
}

/// The roll-ups under `keys` that read back and fit their key, by (timeline, first segment).
/// One that does not is left out (its range is then read segment by segment), with a note in the
/// debug log; store failures are errors.
///
/// # Errors
/// The store cannot be listed or read.
pub async fn load(
    repo: &Repo,
    keys: &[ObjectKey],
    seg_size: WalSegSize,
) -> anyhow::Result<BTreeMap<(TimelineId, SegNo), Rollup>> {
    let keys = keys.to_vec();
    // Each decoded as it arrives, so the raw bytes of only a few are held at once.
    let mut stream = futures::stream::iter(keys)
        .map(|key| async move {
            let got = repo.get(&key).await;
            let read = match got {
                // Decoding 256 summaries is CPU work: on the blocking pool, beside the transfers.
                Ok(Some(bytes)) => {
                    // One decode per CPU at once: memory stays that of a few roll-ups.
                    let _slot = crate::cpu::slots().acquire().await;
                    match tokio::task::spawn_blocking(move || {
                        crate::format::decode::<Rollup>(&bytes)
                    })
                    .await
                    {
                        Ok(decoded) => Ok(Some(decoded)),
                        Err(e) => Ok(Some(Err(crate::format::FormatError::Invalid {
                            what: "WAL index roll-up",
                            detail: e.to_string(),
                        }))),
                    }
                }
                Ok(None) => Ok(None),
                Err(e) => Err(e),
            };
            (key, read)
        })
        .buffer_unordered(CONCURRENCY);
    let mut out = BTreeMap::new();
    while let Some((key, read)) = stream.next().await {
        match read {
            Ok(None) => {}
            Ok(Some(Ok(r))) if r.fits(&key, seg_size) => {
                out.insert((r.timeline, SegNo(r.first)), r);
            }
            Ok(Some(Ok(_))) => {
                tracing::debug!("ignoring roll-up {}: it does not fit its key", key.key())
            }
            Ok(Some(Err(e))) => tracing::debug!("ignoring roll-up {}: {e}", key.key()),
            Err(e) if e.is_store_failure() => {
                return Err(anyhow::Error::new(e).context(format!("read {}", key.key())));
            }
            Err(e) => tracing::debug!("ignoring roll-up {}: {e}", key.key()),
        }
    }
    Ok(out)
}

/// The key just past every key of segment `n`'s objects: `<name>.pitr` is the greatest of
/// `<name>.<offset>.backup.pitr`, `<name>.idx`, `<name>.partial.pitr` and `<name>.pitr`.
pub fn last_key_of(tli: TimelineId, n: SegNo, seg_size: WalSegSize) -> Option<String> {
    SegmentName::new(tli, n, seg_size).map(|s| ObjectKey::Wal(WalFileName::Segment(s)).key())
}

/// A key below every key of segment `n`'s objects and above every key of the segments before it.
pub fn first_key_of(tli: TimelineId, n: SegNo, seg_size: WalSegSize) -> Option<String> {
    let s = SegmentName::new(tli, n, seg_size)?;
    Some(format!("{}/{s}", Prefix::WalTimeline(tli).key()))
}

/// The WAL objects of `tli` whose keys lie strictly between `after` and `before` (see
/// [`Repo::list_range`]).
///
/// # Errors
/// The store cannot be listed.
pub async fn listed_between(
    repo: &Repo,
    tli: TimelineId,
    after: Option<&str>,
    before: Option<&str>,
) -> Result<Vec<Found>, RepoError> {
    Ok(repo
        .list_range(&Prefix::WalTimeline(tli), after, before)
        .await?
        .iter()
        .filter_map(|e| {
            crate::storage::layout::parse_wal_key(e.key()).map(|what| Found { what, size: e.size })
        })
        .collect())
}

/// The objects stored for segments `from..=to` of `tli` (segments, summaries, `.partial` and
/// `.backup` files): one range listing.
///
/// # Errors
/// The store cannot be listed.
pub async fn list_segments(
    repo: &Repo,
    tli: TimelineId,
    from: SegNo,
    to: SegNo,
    seg_size: WalSegSize,
) -> anyhow::Result<Vec<Found>> {
    let after = match from.0.checked_sub(1) {
        Some(p) => last_key_of(tli, SegNo(p), seg_size),
        None => None,
    };
    let before = first_key_of(tli, SegNo(to.0 + 1), seg_size);
    Ok(
        listed_between(repo, tli, after.as_deref(), before.as_deref())
            .await?
            .into_iter()
            .filter(|l| {
                l.what
                    .segment()
                    .filter(|s| s.tli == tli)
                    .and_then(|s| s.segno(seg_size))
                    .is_some_and(|n| n >= from && n <= to)
            })
            .collect(),
    )
}

/// Write the roll-up of the chunk starting at `first` on `tli` unless it exists, when every
/// segment of the chunk and its summary are stored and readable. Returns whether a roll-up of
/// the chunk is now stored.
///
/// # Errors
/// Store failures. A chunk that is not complete is `Ok(false)`, not an error.
pub async fn write_chunk(
    repo: &Repo,
    tli: TimelineId,
    first: SegNo,
    seg_size: WalSegSize,
    major: PgMajor,
) -> anyhow::Result<bool> {
    let first = chunk_start(first);
    let Some(key) = key(tli, first, seg_size) else {
        return Ok(false);
    };
    if repo.exists(&key).await? {
        return Ok(true);
    }
    let last = SegNo(first.0 + CHUNK - 1);
    let listed = list_segments(repo, tli, first, last, seg_size).await?;
    let mut files: Vec<String> = listed
        .iter()
        .filter_map(|f| match f.what {
            Listed::Wal(w) => Some(w.to_string()),
            Listed::Summary(_) | Listed::Streamed(_) => None,
        })
        .collect();
    // Each segment's summary, in segment order (carried in the segment's object, or beside it).
    let sources: BTreeMap<SegNo, (ObjectKey, Option<u64>)> =
        crate::catalog::summary_sources(&listed)
            .into_iter()
            .filter_map(|(s, key, size)| s.segno(seg_size).map(|n| (n, (key, size))))
            .collect();
    if !(first.0..=last.0).all(|n| sources.contains_key(&SegNo(n))) {
        return Ok(false);
    }
    files.sort();
    let got: Vec<(usize, Got)> =
        futures::stream::iter(sources.into_values().enumerate())
            .map(|(i, (key, size))| async move {
                (i, crate::catalog::read_summary(repo, &key, size).await)
            })
            .buffer_unordered(CONCURRENCY)
            .collect()
            .await;
    let mut summaries: Vec<Option<SegmentSummary>> = vec![None; CHUNK as usize];
    for (i, got) in got {
        let bytes = match got {
            Ok(Some(b)) => b,
            // Deleted meanwhile, or unreadable: leave the chunk to be read segment by segment.
            Ok(None) => return Ok(false),
            Err(e) if e.is_store_failure() => return Err(e.into()),
            Err(_) => return Ok(false),
        };
        let Ok(s) = crate::format::decode::<SegmentSummary>(&bytes) else {
            return Ok(false);
        };
        if let Some(slot) = summaries.get_mut(i) {
            *slot = Some(s);
        }
    }
    let Some(summaries) = summaries.into_iter().collect::<Option<Vec<_>>>() else {
        return Ok(false);
    };
    let rollup = Rollup::build(tli, first, files, summaries, major);
    let json = serde_json::to_vec(&rollup).context("encode a roll-up")?;
    let stored = repo.seal(&key, &json, Compression::Zstd)?;
    match repo.put(&key, stored, PutMode::CreateUnique).await {
        Ok(_) | Err(RepoError::Conflict { .. }) => Ok(true),
        Err(e) => Err(anyhow::Error::new(e).context(format!("write {}", key.key()))),
    }
}

/// After `archive-push` stored `pushed`: roll up every chunk whose last segment is among them
/// (the segments before it were archived first, PostgreSQL archiving in order). A roll-up that
/// cannot be written is only a warning: the catalog reads that chunk segment by segment, and
/// `verify` writes the roll-up later.
pub async fn after_push(repo: &Repo, pushed: &[WalFileName]) {
    let ends: Vec<SegmentName> = pushed
        .iter()
        .filter_map(|w| match w {
            WalFileName::Segment(s) => Some(*s),
            _ => None,
        })
        .collect();
    if ends.is_empty() {
        return;
    }
    let identity = match repo.known_identity() {
        Some(i) => i,
        None => match repo.require_identity().await {
            Ok(i) => i,
            Err(e) => {
                tracing::warn!("roll up the WAL index: {e}");
                return;
            }
        },
    };
    let seg_size = identity.wal_segment_size;
    let Some(major) = PgMajor::from_number(identity.pg_version) else {
        return;
    };
    for s in ends {
        let Some(n) = s.segno(seg_size).filter(|n| ends_chunk(*n)) else {
            continue;
        };
        match write_chunk(repo, s.tli, n, seg_size, major).await {
            Ok(true) => tracing::debug!("rolled up the WAL index through {s}"),
            Ok(false) => tracing::debug!("the chunk ending at {s} is not complete: not rolled up"),
            Err(e) => tracing::warn!(
                "{s} is archived, but the roll-up of its chunk of the WAL index could not be written: {e:#}"
            ),
        }
    }
}

/// What [`repair`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Repaired {
    /// Roll-ups deleted, and why.
    pub removed: Vec<(String, String)>,
    /// Roll-ups written for complete chunks that had none.
    pub written: usize,
    /// Segments a roll-up listed that are no longer stored (archived, then deleted by something
    /// other than `expire`, which deletes the roll-up first).
    pub missing: Vec<SegmentName>,
}

/// `verify`'s care of the roll-ups, given the catalog read from the objects themselves and every
/// key stored: delete each roll-up that cannot be read, does not fit its key, or names a segment
/// no longer stored; then roll up every complete chunk without one.
///
/// # Errors
/// Store failures.
pub async fn repair(
    repo: &Repo,
    catalog: &crate::catalog::Catalog,
    present: &BTreeSet<String>,
) -> anyhow::Result<Repaired> {
    let mut out = Repaired::default();
    let Some(identity) = catalog.identity.as_ref() else {
        return Ok(out);
    };
    let seg_size = identity.wal_segment_size;
    let keys: Vec<ObjectKey> = present
        .iter()
        .filter_map(|k| ObjectKey::parse(k))
        .filter(|k| matches!(k, ObjectKey::Rollup { .. }))
        .collect();
    let mut rolled = BTreeSet::new();
    for key in keys {
        let why = match repo.get(&key).await {
            Ok(None) => continue,
            Err(e) if e.is_store_failure() => return Err(e.into()),
            Err(e) => Some(e.to_string()),
            Ok(Some(bytes)) => match crate::format::decode::<Rollup>(&bytes) {
                Err(e) => Some(e.to_string()),
                Ok(r) if !r.fits(&key, seg_size) => Some("it does not fit its key".into()),
                Ok(r) => {
                    let gone: Vec<SegmentName> = r
                        .range()
                        .filter_map(|n| SegmentName::new(r.timeline, SegNo(n), seg_size))
                        .filter(|s| {
                            !present.contains(&ObjectKey::Wal(WalFileName::Segment(*s)).key())
                        })
                        .collect();
                    match gone.first() {
                        Some(s) => {
                            let why = format!("it lists {s}, which is no longer stored");
                            out.missing.extend(gone);
                            Some(why)
                        }
                        None => {
                            rolled.insert((r.timeline, SegNo(r.first)));
                            None
                        }
                    }
                }
            },
        };
        if let Some(why) = why {
            repo.delete(&key).await?;
            out.removed.push((key.key(), why));
        }
    }
    let Some(major) = PgMajor::from_number(identity.pg_version) else {
        return Ok(out);
    };
    for (tli, t) in &catalog.timelines {
        let chunks: BTreeSet<SegNo> = t.segments.iter().map(|n| chunk_start(*n)).collect();
        for first in chunks {
            let complete = (first.0..first.0 + CHUNK)
                .all(|n| t.segments.contains(&SegNo(n)) && !t.unindexed.contains(&SegNo(n)));
            if complete
                && !rolled.contains(&(*tli, first))
                && write_chunk(repo, *tli, first, seg_size, major).await?
            {
                out.written += 1;
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
#[allow(clippy::indexing_slicing)] // tests index fixtures they built
mod tests {
    use std::sync::Arc;

    use object_store::ObjectStoreExt;
    use object_store::memory::InMemory;

    use super::*;
    use crate::blocks::BlockChanges;
    use crate::catalog::Catalog;
    use crate::index::{RestorePoint, SUMMARY_FORMAT, XactRef};
    use crate::pg::blockref::{Change, RelFork};
    use crate::pg::walbuilder::WalBuilder;
    use crate::pg::waldecoder::{HeadFragment, TailFragment};
    use crate::pg::xlogrecord::XactKind;
    use crate::pg::{Lsn, PgTimestamp};
    use crate::storage::identity::RepoIdentity;
    use crate::testing::PutBytes;

    const SEG: u64 = 16 << 20;
    const SEGMENTS: u64 = 600;
    /// The segment whose spanning record cannot be joined (its continuation is damaged).
    const BROKEN: u64 = 100;

    fn tli() -> TimelineId {
        TimelineId::ONE
    }

    fn name(n: u64) -> SegmentName {
        SegmentName::new(tli(), SegNo(n), WalSegSize::DEFAULT).unwrap()
    }

    /// A whole commit record, as the WAL builder writes it after a segment's long page header.
    fn commit_record(xid: u32, time: i64) -> Vec<u8> {
        let mut b = WalBuilder::new(0, 1 << 20, PgMajor::V15);
        b.commit(xid, time);
        let tot = u32::from_le_bytes(b.buf[40..44].try_into().unwrap()) as usize;
        b.buf[40..40 + tot].to_vec()
    }

    /// Segment `n`'s summary: a commit, a changed block, a restore point on segment 300, and a
    /// commit record that begins at its end and ends in segment `n + 1`.
    fn summary(n: u64) -> SegmentSummary {
        let x = XactRef {
            lsn: Lsn(n * SEG + 100),
            xid: 1000 + n as u32,
            time: PgTimestamp(1_000_000 * n as i64),
            kind: XactKind::Commit,
        };
        let mut changes = BlockChanges::default();
        let rel = RelFork {
            spc: 1663,
            db: 5,
            rel: 16384,
            fork: 0,
        };
        changes.apply(Change::Modified(rel, n as u32));
        changes.finish();
        let spanning = commit_record(5000 + n as u32, 1_000_000 * n as i64 + 500_000);
        let mut head = n
            .checked_sub(1)
            .map(|p| commit_record(5000 + p as u32, 1_000_000 * p as i64 + 500_000));
        if n == BROKEN + 1
            && let Some(h) = &mut head
        {
            let last = h.len() - 1;
            h[last] ^= 0xFF;
        }
        SegmentSummary {
            format: SUMMARY_FORMAT,
            records: 3,
            first_lsn: Some(x.lsn),
            last_lsn: Some(x.lsn),
            xacts: 1,
            first_xact: Some(x),
            last_xact: Some(x),
            max_xact_time: Some(x.time),
            min_xid: Some(x.xid),
            max_xid: Some(x.xid),
            restore_points: if n == 300 {
                vec![RestorePoint {
                    name: "before".into(),
                    time: PgTimestamp(1_000_000 * 300 + 1),
                    lsn: Lsn(300 * SEG + 200),
                }]
            } else {
                Vec::new()
            },
            head: head.map(|h| HeadFragment {
                rem_len: (h.len() - 10) as u32,
                bytes: h[10..].to_vec(),
            }),
            tail: Some(TailFragment {
                lsn: Lsn((n + 1) * SEG - 10),
                tot_len: spanning.len() as u32,
                bytes: spanning[..10].to_vec(),
            }),
            changes: Some(changes),
            ..Default::default()
        }
    }

    /// Where a test repository keeps each segment's summary.
    #[derive(Clone, Copy, Debug)]
    enum Layout {
        /// At the end of the segment's object, as archive-push stores it.
        Attached,
        /// In an object of its own beside the segment, as earlier versions did.
        Beside,
        /// Every third segment's beside it, the rest attached (a repository an earlier version
        /// began and this one continued).
        Mixed,
    }

    /// A repository of `SEGMENTS` segments of timeline 1 with their summaries (chunks 0 and 1
    /// complete, chunk 2 not).
    async fn repository(layout: Layout) -> Repo {
        let repo =
            Repo::from_store(Arc::new(InMemory::new()), "memory://rollup").with_ordered_listing();
        repo.ensure_identity(&RepoIdentity {
            format_version: 1,
            system_identifier: crate::pg::SystemId(7),
            pg_version: 15,
            wal_segment_size: WalSegSize::DEFAULT,
            wal_page_size: 8192,
        })
        .await
        .unwrap();
        for n in 0..SEGMENTS {
            let seg = name(n);
            let wal = ObjectKey::Wal(WalFileName::Segment(seg));
            let json = serde_json::to_vec(&summary(n)).unwrap();
            let beside = match layout {
                Layout::Attached => false,
                Layout::Beside => true,
                Layout::Mixed => n % 3 == 0,
            };
            if beside {
                repo.put_new(&wal, b"wal", Compression::None).await.unwrap();
                repo.put_new(&ObjectKey::Summary(seg), &json, Compression::None)
                    .await
                    .unwrap();
            } else {
                let sealed = crate::storage::envelope::encode(&json, Compression::Zstd).unwrap();
                let stored = crate::storage::envelope::encode(b"wal", Compression::None).unwrap();
                let stored = crate::storage::envelope::attach(stored.into(), &sealed).unwrap();
                repo.put(&wal, stored, PutMode::CreateUnique).await.unwrap();
            }
        }
        repo
    }

    /// What the catalog says, with what a roll-up leaves out (changed blocks, fragments already
    /// joined) left out on both sides.
    fn view(c: &Catalog) -> String {
        let summaries: Vec<_> = c
            .summaries
            .iter()
            .map(|(k, s)| {
                let mut s = s.clone();
                s.changes = None;
                s.head = None;
                if c.joined_tails.contains(k) {
                    s.tail = None;
                }
                (k.1.0, s)
            })
            .collect();
        format!(
            "{:?}\n{:?}\n{:?}\n{:?}\n{:?}\n{:?}\n{:?}",
            c.timelines,
            summaries,
            c.joined_tails,
            c.window(),
            c.restore_points(),
            c.gaps(tli()),
            c.latest_xact_on(tli()),
        )
    }

    async fn roll_all(repo: &Repo) -> Vec<bool> {
        let mut out = Vec::new();
        for chunk in 0..3 {
            out.push(
                write_chunk(
                    repo,
                    tli(),
                    SegNo(chunk * CHUNK),
                    WalSegSize::DEFAULT,
                    PgMajor::V15,
                )
                .await
                .unwrap(),
            );
        }
        out
    }

    #[tokio::test]
    async fn the_rolled_up_catalog_agrees_with_the_summaries() {
        // A repository of an earlier version (summaries beside their segments) reads as one of
        // this version does.
        let mut views = Vec::new();
        for layout in [Layout::Attached, Layout::Beside, Layout::Mixed] {
            let repo = repository(layout).await;
            let exhaustive = Catalog::load_exhaustive(&repo).await.unwrap();
            views.push(view(&exhaustive));
            rolled_up_agrees(&repo, exhaustive).await;
        }
        assert_eq!(views[0], views[1]);
        assert_eq!(views[0], views[2]);
    }

    async fn rolled_up_agrees(repo: &Repo, exhaustive: Catalog) {
        let repo = repo.clone();
        assert_eq!(exhaustive.rolled.len(), 0);
        assert!(exhaustive.joined_tails.contains(&(tli(), SegNo(255))));
        assert!(!exhaustive.joined_tails.contains(&(tli(), SegNo(BROKEN))));
        // Only complete chunks are rolled up; a second writer finds the first one's.
        assert_eq!(roll_all(&repo).await, [true, true, false]);
        assert_eq!(roll_all(&repo).await, [true, true, false]);
        let fast = Catalog::load(&repo).await.unwrap();
        assert_eq!(fast.rolled.len(), 2 * CHUNK as usize);
        assert_eq!(view(&fast), view(&exhaustive));
        // The window, restore points and joined records are all there.
        assert_eq!(fast.restore_points().len(), 1);
        assert!(fast.window().is_some());

        // Changed blocks come from the segments' own summaries, on demand.
        let (from, to) = (Lsn(10 * SEG + 5), Lsn(40 * SEG + 5));
        assert!(matches!(
            fast.changes_between(tli(), from, to),
            Err(crate::catalog::Hole::Uncovered { .. })
        ));
        let mut fast = fast;
        fast.load_changes(&repo, tli(), from, to).await.unwrap();
        assert_eq!(
            fast.changes_between(tli(), from, to).unwrap(),
            exhaustive.changes_between(tli(), from, to).unwrap()
        );
        assert_eq!(view(&fast), view(&exhaustive));
        // Across the record that could not be joined, both refuse the same way.
        let (from, to) = (Lsn(90 * SEG), Lsn(110 * SEG));
        fast.load_changes(&repo, tli(), from, to).await.unwrap();
        let hole = exhaustive.changes_between(tli(), from, to).unwrap_err();
        assert!(matches!(hole, crate::catalog::Hole::Spanning { .. }));
        assert_eq!(fast.changes_between(tli(), from, to).unwrap_err(), hole);
        // Across a chunk boundary (segment 255's record joined with 256's head).
        let (from, to) = (Lsn(250 * SEG), Lsn(260 * SEG));
        fast.load_changes(&repo, tli(), from, to).await.unwrap();
        assert_eq!(
            fast.changes_between(tli(), from, to).unwrap(),
            exhaustive.changes_between(tli(), from, to).unwrap()
        );
    }

    #[tokio::test]
    async fn a_corrupt_newer_or_stale_rollup_is_ignored_and_verify_replaces_it() {
        let repo = repository(Layout::Beside).await;
        roll_all(&repo).await;
        let exhaustive = Catalog::load_exhaustive(&repo).await.unwrap();
        let chunk1 = key(tli(), SegNo(CHUNK), WalSegSize::DEFAULT).unwrap();
        // Damaged bytes: ignored, the chunk is read segment by segment.
        repo.store()
            .put(&chunk1.path(), b"not an envelope".to_vec().into())
            .await
            .unwrap();
        let c = Catalog::load(&repo).await.unwrap();
        assert_eq!(c.rolled.len(), CHUNK as usize);
        assert_eq!(view(&c), view(&exhaustive));
        // A newer format: ignored too.
        let mut newer = Rollup::build(
            tli(),
            SegNo(CHUNK),
            (CHUNK..2 * CHUNK).map(|n| name(n).to_string()).collect(),
            (CHUNK..2 * CHUNK).map(summary).collect(),
            PgMajor::V15,
        );
        newer.format = ROLLUP_FORMAT + 1;
        let sealed = repo
            .seal(
                &chunk1,
                &serde_json::to_vec(&newer).unwrap(),
                Compression::None,
            )
            .unwrap();
        repo.put(&chunk1, sealed, PutMode::OverwriteDerived)
            .await
            .unwrap();
        let c = Catalog::load(&repo).await.unwrap();
        assert_eq!(c.rolled.len(), CHUNK as usize);
        assert_eq!(view(&c), view(&exhaustive));

        // A segment removed by hand from a rolled chunk: the fast catalog does not see it (a
        // restore lists what it replays), verify removes the stale roll-up and rewrites the
        // unreadable one.
        repo.delete(&ObjectKey::Wal(WalFileName::Segment(name(5))))
            .await
            .unwrap();
        let c = Catalog::load(&repo).await.unwrap();
        assert!(c.timelines[&tli()].segments.contains(&SegNo(5)));
        let listed = list_segments(&repo, tli(), SegNo(0), SegNo(10), WalSegSize::DEFAULT)
            .await
            .unwrap();
        let listed: Vec<Listed> = listed.iter().map(|f| f.what).collect();
        assert!(!listed.contains(&Listed::Wal(WalFileName::Segment(name(5)))));
        assert!(listed.contains(&Listed::Wal(WalFileName::Segment(name(6)))));
        assert!(listed.contains(&Listed::Summary(name(5))));
        let exhaustive = Catalog::load_exhaustive(&repo).await.unwrap();
        let present: BTreeSet<String> = repo
            .list(&Prefix::Everything)
            .await
            .unwrap()
            .iter()
            .map(|e| e.key().to_string())
            .collect();
        let repaired = repair(&repo, &exhaustive, &present).await.unwrap();
        let removed: Vec<&str> = repaired.removed.iter().map(|(k, _)| k.as_str()).collect();
        let chunk0 = key(tli(), SegNo(0), WalSegSize::DEFAULT).unwrap().key();
        assert!(removed.contains(&chunk0.as_str()), "{removed:?}");
        assert!(removed.contains(&chunk1.key().as_str()), "{removed:?}");
        assert_eq!(repaired.written, 1); // chunk 1 again; chunk 0 is no longer complete
        let c = Catalog::load(&repo).await.unwrap();
        assert_eq!(c.rolled.len(), CHUNK as usize);
        assert!(!c.timelines[&tli()].segments.contains(&SegNo(5)));
        assert_eq!(view(&c), view(&exhaustive));
    }

    #[test]
    fn keys_and_chunks() {
        assert_eq!(
            key(tli(), SegNo(256), WalSegSize::DEFAULT).unwrap().key(),
            "index/00000001/000000010000000100000000-0000000100000001000000FF.roll.pitr"
        );
        assert_eq!(chunk_start(SegNo(511)), SegNo(256));
        assert!(ends_chunk(SegNo(511)) && !ends_chunk(SegNo(510)));
        // Every key of a segment sorts between these two bounds, and after the previous one's.
        let lo = first_key_of(tli(), SegNo(3), WalSegSize::DEFAULT).unwrap();
        let hi = last_key_of(tli(), SegNo(3), WalSegSize::DEFAULT).unwrap();
        let prev = last_key_of(tli(), SegNo(2), WalSegSize::DEFAULT).unwrap();
        for k in [
            ObjectKey::Wal(WalFileName::Segment(name(3))).key(),
            ObjectKey::Wal(WalFileName::Partial(name(3))).key(),
            ObjectKey::Wal(WalFileName::BackupHistory {
                segment: name(3),
                offset: 0x28,
            })
            .key(),
            ObjectKey::Summary(name(3)).key(),
        ] {
            assert!(lo.as_str() < k.as_str() && k <= hi && prev < lo, "{k}");
        }
    }
}
