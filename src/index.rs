//! The WAL index: a small summary of each archived segment, written by `archive-push` from the bytes
//! it already holds, so the catalog knows commit times, restore points, checkpoints and timeline
//! switches without downloading WAL.
//!
//! A record that spans two segments is seen whole by neither: segment N keeps the start of it (a tail
//! fragment) and segment N+1 the rest (a head fragment); the catalog joins them, verifies the CRC,
//! and attributes the record to segment N, where it starts. So nothing is lost or counted twice.
//!
//! A segment that fails to decode is still archived: its summary records where and why, keeping what
//! was read before the damage.

use serde::{Deserialize, Serialize};

use crate::blocks::BlockChanges;
use crate::pg::PgTimestamp;
use crate::pg::blockref::Change;
use crate::pg::waldecoder::{DecodeError, End, HeadFragment, SegmentDecoder, Step, TailFragment};
use crate::pg::xlogrecord::{Event, XactKind, event};
use crate::pg::{Lsn, PgMajor, SegmentName, WalSegSize};

/// Summary format version: 2 adds the blocks each segment's records change (`changes`); a
/// format 1 summary has none, and its segment counts as not covered for incremental backups.
pub const SUMMARY_FORMAT: u32 = 2;

/// A transaction end seen in WAL.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct XactRef {
    /// Start LSN of the commit/abort record.
    pub lsn: Lsn,
    /// The xid recovery compares.
    pub xid: u32,
    /// `xact_time`.
    pub time: PgTimestamp,
    /// Commit or abort.
    pub kind: XactKind,
}

/// A named restore point.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestorePoint {
    /// The name given to `pg_create_restore_point`.
    pub name: String,
    /// When.
    pub time: PgTimestamp,
    /// The record's LSN.
    pub lsn: Lsn,
}

/// A checkpoint record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// The record's LSN.
    pub lsn: Lsn,
    /// Redo pointer.
    pub redo: Lsn,
    /// `ThisTimeLineID`.
    pub timeline: u32,
    /// `PrevTimeLineID`.
    pub prev_timeline: u32,
    /// Shutdown / end-of-recovery checkpoint.
    pub shutdown: bool,
    /// Checkpoint time, seconds since the Unix epoch.
    pub unix_secs: i64,
}

/// Whether the whole segment decoded.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "state")]
pub enum ParseStatus {
    /// Every record decoded and verified.
    #[default]
    Ok,
    /// Decoding stopped at `lsn`.
    Failed {
        /// Where.
        lsn: Lsn,
        /// Why.
        reason: String,
    },
}

/// What one segment holds.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SegmentSummary {
    /// Summary format.
    pub format: u32,
    /// Decode status.
    pub status: ParseStatus,
    /// Records that start in this segment (a spanning one joined later is not counted here).
    pub records: u64,
    /// First record starting in this segment.
    pub first_lsn: Option<Lsn>,
    /// Last complete record starting in this segment.
    pub last_lsn: Option<Lsn>,
    /// Transaction ends in this segment.
    pub xacts: u64,
    /// First transaction end in WAL order.
    pub first_xact: Option<XactRef>,
    /// Last transaction end in WAL order.
    pub last_xact: Option<XactRef>,
    /// Largest `xact_time` (commit times are not monotonic in WAL order).
    pub max_xact_time: Option<PgTimestamp>,
    /// Smallest xid of a transaction end.
    pub min_xid: Option<u32>,
    /// Largest xid of a transaction end.
    pub max_xid: Option<u32>,
    /// Restore points.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub restore_points: Vec<RestorePoint>,
    /// Checkpoints.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub checkpoints: Vec<Checkpoint>,
    /// `XLOG_END_OF_RECOVERY` records: (LSN, new timeline, previous timeline, time).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub end_of_recovery: Vec<(Lsn, u32, u32, PgTimestamp)>,
    /// `XLOG_BACKUP_END` records: (LSN, the backup's start LSN).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub backup_ends: Vec<(Lsn, Lsn)>,
    /// The `XLOG_SWITCH` record, if the segment was switched early.
    pub switch_lsn: Option<Lsn>,
    /// The end of a record that began in the previous segment.
    pub head: Option<HeadFragment>,
    /// The start of a record that continues in the next segment.
    pub tail: Option<TailFragment>,
    /// The blocks the records starting in this segment change (format 2; `None` in format 1
    /// summaries, and when decoding failed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub changes: Option<BlockChanges>,
    /// The first record in this segment that set `wal_level` to minimal: writes after it need not
    /// be WAL-logged (a table created and filled in one transaction), so no incremental backup
    /// can trust the changed blocks across it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wal_level_minimal: Option<Lsn>,
}

/// `WAL_LEVEL_REPLICA`: below it (minimal), not every write is WAL-logged.
const WAL_LEVEL_REPLICA: i32 = 1;

impl SegmentSummary {
    /// Fold a record that began in this segment and ended in the next (joined from the two
    /// fragments) into the summary: its event and its changed blocks. A summary without changes
    /// stays without.
    pub fn add_joined(&mut self, record: &crate::pg::waldecoder::Record, major: PgMajor) {
        if let Ok(Some(ev)) = event(record, major) {
            self.add_event(record.lsn, ev);
        }
        let mut found = Vec::new();
        match crate::pg::blockref::changes(record, major, &mut found) {
            Ok(()) => {
                if let Some(c) = &mut self.changes {
                    let mut more = BlockChanges::default();
                    for ch in found {
                        more.apply(ch);
                    }
                    more.finish();
                    c.then(&more);
                }
            }
            Err(_) => self.changes = None,
        }
    }

    /// Fold one event at `lsn` into the summary.
    pub fn add_event(&mut self, lsn: Lsn, ev: Event) {
        match ev {
            Event::Xact { kind, xid, time } => {
                let x = XactRef {
                    lsn,
                    xid,
                    time,
                    kind,
                };
                self.xacts += 1;
                self.first_xact.get_or_insert(x);
                self.last_xact = Some(x);
                self.max_xact_time = Some(self.max_xact_time.map_or(time, |m| m.max(time)));
                // xid 0 appears on COMMIT PREPARED run outside a transaction; it is not a target.
                if xid != 0 {
                    self.min_xid = Some(self.min_xid.map_or(xid, |m| m.min(xid)));
                    self.max_xid = Some(self.max_xid.map_or(xid, |m| m.max(xid)));
                }
            }
            Event::RestorePoint { name, time } => {
                self.restore_points.push(RestorePoint { name, time, lsn })
            }
            Event::Checkpoint {
                shutdown,
                redo,
                tli,
                prev_tli,
                unix_secs,
            } => self.checkpoints.push(Checkpoint {
                lsn,
                redo,
                timeline: tli,
                prev_timeline: prev_tli,
                shutdown,
                unix_secs,
            }),
            Event::EndOfRecovery {
                time,
                tli,
                prev_tli,
            } => self.end_of_recovery.push((lsn, tli, prev_tli, time)),
            Event::BackupEnd { start } => self.backup_ends.push((lsn, start)),
            Event::Switch => self.switch_lsn = Some(lsn),
            Event::WalLevel { level } => {
                if level < WAL_LEVEL_REPLICA {
                    self.wal_level_minimal.get_or_insert(lsn);
                }
            }
        }
    }
}

impl crate::format::Versioned for SegmentSummary {
    const WHAT: &'static str = "segment summary";
    const SUPPORTED: u32 = SUMMARY_FORMAT;
    fn version(&self) -> u32 {
        self.format
    }
}

/// Decode `bytes`, the segment `name`, into its summary. Never fails: damage is recorded in `status`.
pub fn summarize(
    bytes: &[u8],
    name: SegmentName,
    seg_size: WalSegSize,
    page_size: u32,
    major: PgMajor,
) -> SegmentSummary {
    let mut s = Summarizer::new(name, seg_size, page_size, major, bytes.len());
    s.feed(bytes);
    s.finish()
}

/// A segment's summary made as its bytes arrive, a window at a time: [`summarize`] without the
/// whole segment in memory.
pub struct Summarizer {
    s: SegmentSummary,
    major: PgMajor,
    /// `None` once decoding has stopped.
    dec: Option<SegmentDecoder>,
    changes: BlockChanges,
    scratch: Vec<Change>,
    /// Whether the decoder reached the segment's end (else it waits for more bytes).
    done: bool,
}

impl Summarizer {
    /// A summarizer for the segment `name` of `len` bytes.
    pub fn new(
        name: SegmentName,
        seg_size: WalSegSize,
        page_size: u32,
        major: PgMajor,
        len: usize,
    ) -> Summarizer {
        let mut s = SegmentSummary {
            format: SUMMARY_FORMAT,
            ..Default::default()
        };
        let start = name
            .segno(seg_size)
            .and_then(|n| n.start_lsn(seg_size))
            .unwrap_or_default();
        let dec = match SegmentDecoder::streaming(len, start, page_size, major) {
            Ok(d) => Some(d),
            Err(e) => {
                s.status = failed(e);
                None
            }
        };
        Summarizer {
            s,
            major,
            dec,
            changes: BlockChanges::default(),
            scratch: Vec::new(),
            done: false,
        }
    }

    /// The next bytes of the segment, in order.
    pub fn feed(&mut self, bytes: &[u8]) {
        let Some(dec) = &mut self.dec else { return };
        if self.done {
            return;
        }
        dec.feed(bytes);
        loop {
            match dec.step() {
                Ok(Step::Record(rec)) => {
                    let s = &mut self.s;
                    s.records += 1;
                    s.first_lsn.get_or_insert(rec.lsn);
                    s.last_lsn = Some(rec.lsn);
                    let changed = crate::pg::blockref::changes(&rec, self.major, &mut self.scratch);
                    for c in self.scratch.drain(..) {
                        self.changes.apply(c);
                    }
                    match changed.and_then(|()| event(&rec, self.major)) {
                        Ok(Some(ev)) => s.add_event(rec.lsn, ev),
                        Ok(None) => {}
                        Err(e) => {
                            s.status = failed(e);
                            self.done = true;
                            return;
                        }
                    }
                }
                Ok(Step::More) => return,
                Ok(Step::Done) => {
                    self.done = true;
                    return;
                }
                Err(e) => {
                    self.s.status = failed(e);
                    self.done = true;
                    return;
                }
            }
        }
    }

    /// The summary of what was fed.
    pub fn finish(mut self) -> SegmentSummary {
        let mut s = self.s;
        let Some(mut dec) = self.dec.take() else {
            return s;
        };
        if !self.done && s.status == ParseStatus::Ok {
            s.status = ParseStatus::Failed {
                lsn: Lsn(dec.start().0 + dec.fed() as u64),
                reason: "the segment ends early".to_string(),
            };
        }
        // Changes are only as good as the decode: a failure leaves the segment uncovered.
        if s.status == ParseStatus::Ok {
            self.changes.finish();
            s.changes = Some(self.changes);
        }
        s.head = dec.head.take();
        s.tail = dec.tail.take();
        if let Some(End::Switch(lsn)) = dec.end {
            s.switch_lsn = Some(lsn);
        }
        s
    }
}

fn failed(e: DecodeError) -> ParseStatus {
    ParseStatus::Failed {
        lsn: e.lsn,
        reason: e.msg,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pg::walbuilder::WalBuilder;

    #[test]
    fn a_switch_to_wal_level_minimal_is_recorded() {
        const MIB: usize = 1 << 20;
        let mut b = WalBuilder::new(0, MIB, PgMajor::V15);
        b.commit(700, 1_000_000);
        // xl_parameter_change: MaxConnections, max_worker_processes, max_wal_senders,
        // max_prepared_xacts, max_locks_per_xact, wal_level, wal_log_hints, track_commit_timestamp.
        let change = |level: i32| {
            let mut d = Vec::new();
            for v in [100i32, 8, 10, 0, 64, level] {
                d.extend_from_slice(&v.to_le_bytes());
            }
            d.extend_from_slice(&[0, 0, 0, 0]);
            WalBuilder::main_data(&d)
        };
        b.record(0, 0x60, 0, &change(1));
        let minimal = b.record(0, 0x60, 0, &change(0));
        b.record(0, 0x60, 0, &change(1));
        b.commit(701, 2_000_000);
        let wal = b.finish();
        let seg_size = WalSegSize::new(MIB as u32).unwrap();
        let name =
            SegmentName::new(crate::pg::TimelineId::ONE, crate::pg::SegNo(0), seg_size).unwrap();
        let s = summarize(&wal, name, seg_size, 8192, PgMajor::V15);
        assert_eq!(s.status, ParseStatus::Ok);
        assert_eq!(s.xacts, 2);
        assert_eq!(s.wal_level_minimal, Some(Lsn(minimal)));
    }
}
