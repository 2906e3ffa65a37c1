//! What pitr reads out of WAL records: transaction ends, restore points, checkpoints,
//! end-of-recovery, backup-end, switches.
//!
//! Layouts from `src/include/access/xlogrecord.h` (block headers, walked as `DecodeXLogRecord()` in
//! `xlogreader.c` does to find the main data), `src/include/access/xact.h` (parsing as
//! `ParseCommitRecord()` / `ParseAbortRecord()` in `xactdesc.c`) and `src/include/catalog/pg_control.h`.
//! Only called on records whose CRC already matched; reads are still bounds-checked.

use super::blockref::RelFork;
use super::lsn::Lsn;
use super::time::PgTimestamp;
use super::version::PgMajor;
use super::waldecoder::{DecodeError, RM_XACT_ID, RM_XLOG_ID, Record, XLOG_SWITCH, le_u32, le_u64};

/// How a transaction ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum XactKind {
    /// `XLOG_XACT_COMMIT`.
    Commit,
    /// `XLOG_XACT_ABORT`.
    Abort,
    /// `XLOG_XACT_COMMIT_PREPARED`.
    CommitPrepared,
    /// `XLOG_XACT_ABORT_PREPARED`.
    AbortPrepared,
}

/// Something in a record that matters for recovery targets and the catalog.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// A transaction ended (what `recovery_target_time` / `_xid` look at).
    Xact {
        /// Commit or abort, plain or prepared.
        kind: XactKind,
        /// The transaction id recovery compares (the prepared xid for two-phase records).
        xid: u32,
        /// `xact_time`.
        time: PgTimestamp,
    },
    /// `pg_create_restore_point(name)`.
    RestorePoint {
        /// The name.
        name: String,
        /// When it was created.
        time: PgTimestamp,
    },
    /// A checkpoint record.
    Checkpoint {
        /// Shutdown (or end-of-recovery) checkpoint rather than online.
        shutdown: bool,
        /// The redo pointer.
        redo: Lsn,
        /// `ThisTimeLineID`.
        tli: u32,
        /// `PrevTimeLineID`.
        prev_tli: u32,
        /// `time` (seconds since the Unix epoch).
        unix_secs: i64,
    },
    /// `XLOG_END_OF_RECOVERY` (promotion).
    EndOfRecovery {
        /// When.
        time: PgTimestamp,
        /// The new timeline.
        tli: u32,
        /// The previous timeline.
        prev_tli: u32,
    },
    /// `XLOG_BACKUP_END`: a base backup that started at `start` is consistent here.
    BackupEnd {
        /// The backup's start LSN.
        start: Lsn,
    },
    /// `XLOG_SWITCH`.
    Switch,
    /// `XLOG_PARAMETER_CHANGE`, written at startup when a setting recorded in `pg_control`
    /// changed: the `wal_level` from then on (0 minimal, 1 replica, 2 logical).
    WalLevel {
        /// The new `wal_level`.
        level: i32,
    },
}

const XLR_BLOCK_ID_DATA_SHORT: u8 = 255;
const XLR_BLOCK_ID_DATA_LONG: u8 = 254;
const XLR_BLOCK_ID_ORIGIN: u8 = 253;
const XLR_BLOCK_ID_TOPLEVEL_XID: u8 = 252;
const XLR_MAX_BLOCK_ID: u8 = 32;
const BKPBLOCK_HAS_IMAGE: u8 = 0x10;
const BKPBLOCK_SAME_REL: u8 = 0x80;
const BKPBLOCK_FORK_MASK: u8 = 0x0F;
/// `BKPIMAGE_HAS_HOLE`: a hole offset follows the image header.
const BKPIMAGE_HAS_HOLE: u8 = 0x01;
/// `BKPIMAGE_IS_COMPRESSED` before PostgreSQL 15.
const BKPIMAGE_IS_COMPRESSED_V14: u8 = 0x02;
/// `BKPIMAGE_COMPRESS_PGLZ | BKPIMAGE_COMPRESS_LZ4 | BKPIMAGE_COMPRESS_ZSTD` from 15 on.
const BKPIMAGE_COMPRESSED_V15: u8 = 0x04 | 0x08 | 0x10;

// `RM_XLOG_ID` record types (`pg_control.h`).
const XLOG_CHECKPOINT_SHUTDOWN: u8 = 0x00;
const XLOG_CHECKPOINT_ONLINE: u8 = 0x10;
const XLOG_BACKUP_END: u8 = 0x50;
const XLOG_PARAMETER_CHANGE: u8 = 0x60;
const XLOG_RESTORE_POINT: u8 = 0x70;
const XLOG_END_OF_RECOVERY: u8 = 0x90;

// `RM_XACT_ID` record types and `xinfo` flags (`access/xact.h`).
const XLOG_XACT_OPMASK: u8 = 0x70;
const XLOG_XACT_COMMIT: u8 = 0x00;
const XLOG_XACT_ABORT: u8 = 0x20;
const XLOG_XACT_COMMIT_PREPARED: u8 = 0x30;
const XLOG_XACT_ABORT_PREPARED: u8 = 0x40;
const XLOG_XACT_HAS_INFO: u8 = 0x80;
const XACT_XINFO_HAS_DBINFO: u32 = 1 << 0;
const XACT_XINFO_HAS_SUBXACTS: u32 = 1 << 1;
const XACT_XINFO_HAS_RELFILELOCATORS: u32 = 1 << 2;
const XACT_XINFO_HAS_INVALS: u32 = 1 << 3;
const XACT_XINFO_HAS_TWOPHASE: u32 = 1 << 4;
const XACT_XINFO_HAS_DROPPED_STATS: u32 = 1 << 8;

/// The record's main data, found by walking its block headers.
///
/// # Errors
/// A header walk that does not account for the record's length exactly.
pub fn main_data<'r>(r: &'r Record<'_>, major: PgMajor) -> Result<&'r [u8], DecodeError> {
    headers(r, major, None)
}

/// Walk the record's headers as `DecodeXLogRecord()` does: the main data, and, to `blocks` when
/// given, each block reference (relation fork and block number; `BKPBLOCK_SAME_REL` repeats the
/// previous block's relation).
///
/// # Errors
/// A header walk that does not account for the record's length exactly, or a `SAME_REL` block
/// with no relation before it.
pub fn headers<'r>(
    r: &'r Record<'_>,
    major: PgMajor,
    mut blocks: Option<&mut dyn FnMut(RelFork, u32)>,
) -> Result<&'r [u8], DecodeError> {
    let b = &r.bytes;
    let mut rel: Option<RelFork> = None;
    let err = |m: &str| DecodeError {
        msg: m.to_string(),
        lsn: r.lsn,
    };
    let byte = |p: usize| {
        b.get(p)
            .copied()
            .ok_or_else(|| err("record headers run past the record"))
    };
    let u16_at = |p: usize| -> Result<usize, DecodeError> {
        Ok(usize::from(byte(p)?) | usize::from(byte(p + 1)?) << 8)
    };
    let mut pos = super::waldecoder::SIZE_OF_XLOG_RECORD;
    let mut datatotal = 0usize;
    let mut main_len = 0usize;
    // As `DecodeXLogRecord()`: headers go on while more is left than the block data they announced
    // (a record without main data, such as a full-page image, ends right after its block headers).
    while pos + datatotal < b.len() {
        let id = byte(pos)?;
        pos += 1;
        match id {
            XLR_BLOCK_ID_DATA_SHORT => {
                main_len = usize::from(byte(pos)?);
                pos += 1;
                break;
            }
            XLR_BLOCK_ID_DATA_LONG => {
                main_len = (0..4).try_fold(0usize, |acc, i| {
                    Ok::<_, DecodeError>(acc | usize::from(byte(pos + i)?) << (8 * i))
                })?;
                pos += 4;
                break;
            }
            XLR_BLOCK_ID_ORIGIN => pos += 2,
            XLR_BLOCK_ID_TOPLEVEL_XID if major >= PgMajor::V14 => pos += 4,
            id if id <= XLR_MAX_BLOCK_ID => {
                let fork_flags = byte(pos)?;
                datatotal += u16_at(pos + 1)?;
                pos += 3;
                if fork_flags & BKPBLOCK_HAS_IMAGE != 0 {
                    let img_len = u16_at(pos)?;
                    let bimg_info = byte(pos + 4)?;
                    pos += 5;
                    datatotal += img_len;
                    let compressed = if major >= PgMajor::V15 {
                        bimg_info & BKPIMAGE_COMPRESSED_V15 != 0
                    } else {
                        bimg_info & BKPIMAGE_IS_COMPRESSED_V14 != 0
                    };
                    if compressed && bimg_info & BKPIMAGE_HAS_HOLE != 0 {
                        pos += 2;
                    }
                }
                let fork = fork_flags & BKPBLOCK_FORK_MASK;
                if fork_flags & BKPBLOCK_SAME_REL == 0 {
                    if pos + 12 > b.len() {
                        return Err(err("record headers run past the record"));
                    }
                    rel = Some(RelFork::at(b, pos, fork));
                    pos += 12;
                }
                if let Some(out) = blocks.as_deref_mut() {
                    let Some(locator) = rel else {
                        return Err(err("BKPBLOCK_SAME_REL set, but no previous relation"));
                    };
                    if pos + 4 > b.len() {
                        return Err(err("record headers run past the record"));
                    }
                    out(RelFork { fork, ..locator }, le_u32(b, pos));
                }
                pos += 4;
            }
            other => return Err(err(&format!("invalid block id {other}"))),
        }
    }
    if pos + datatotal + main_len != b.len() {
        return Err(err("block headers do not account for the record length"));
    }
    b.get(b.len() - main_len..)
        .ok_or_else(|| err("main data runs past the record"))
}

fn need(data: &[u8], len: usize, r: &Record, what: &str) -> Result<(), DecodeError> {
    if data.len() < len {
        return Err(DecodeError {
            msg: format!("{what} main data is {} bytes, expected {len}", data.len()),
            lsn: r.lsn,
        });
    }
    Ok(())
}

/// The event in `r`, if it is one pitr indexes.
///
/// # Errors
/// A record of an indexed kind whose main data is malformed.
pub fn event(r: &Record, major: PgMajor) -> Result<Option<Event>, DecodeError> {
    let info = r.info() & !super::waldecoder::XLR_INFO_MASK;
    match r.rmid() {
        RM_XLOG_ID => match info {
            XLOG_CHECKPOINT_SHUTDOWN | XLOG_CHECKPOINT_ONLINE => {
                let d = main_data(r, major)?;
                need(d, 72, r, "checkpoint")?;
                Ok(Some(Event::Checkpoint {
                    shutdown: info == XLOG_CHECKPOINT_SHUTDOWN,
                    redo: Lsn(le_u64(d, 0)),
                    tli: le_u32(d, 8),
                    prev_tli: le_u32(d, 12),
                    unix_secs: le_u64(d, 64) as i64,
                }))
            }
            XLOG_SWITCH => Ok(Some(Event::Switch)),
            XLOG_PARAMETER_CHANGE => {
                // xl_parameter_change: five ints, then wal_level (the same in 13 to 18).
                let d = main_data(r, major)?;
                need(d, 24, r, "parameter change")?;
                Ok(Some(Event::WalLevel {
                    level: le_u32(d, 20) as i32,
                }))
            }
            XLOG_BACKUP_END => {
                let d = main_data(r, major)?;
                need(d, 8, r, "backup end")?;
                Ok(Some(Event::BackupEnd {
                    start: Lsn(le_u64(d, 0)),
                }))
            }
            XLOG_RESTORE_POINT => {
                let d = main_data(r, major)?;
                need(d, 8 + 64, r, "restore point")?;
                let raw = d.get(8..8 + 64).unwrap_or_default();
                let name = raw.split(|&c| c == 0).next().unwrap_or_default();
                Ok(Some(Event::RestorePoint {
                    name: String::from_utf8_lossy(name).into_owned(),
                    time: PgTimestamp(le_u64(d, 0) as i64),
                }))
            }
            XLOG_END_OF_RECOVERY => {
                let d = main_data(r, major)?;
                need(d, 16, r, "end of recovery")?;
                Ok(Some(Event::EndOfRecovery {
                    time: PgTimestamp(le_u64(d, 0) as i64),
                    tli: le_u32(d, 8),
                    prev_tli: le_u32(d, 12),
                }))
            }
            _ => Ok(None),
        },
        RM_XACT_ID => {
            let kind = match r.info() & XLOG_XACT_OPMASK {
                XLOG_XACT_COMMIT => XactKind::Commit,
                XLOG_XACT_ABORT => XactKind::Abort,
                XLOG_XACT_COMMIT_PREPARED => XactKind::CommitPrepared,
                XLOG_XACT_ABORT_PREPARED => XactKind::AbortPrepared,
                _ => return Ok(None),
            };
            let d = main_data(r, major)?;
            need(d, 8, r, "transaction end")?;
            let time = PgTimestamp(le_u64(d, 0) as i64);
            let xid = match kind {
                XactKind::Commit | XactKind::Abort => r.xid(),
                XactKind::CommitPrepared | XactKind::AbortPrepared => {
                    twophase_xid(r, d, major, kind)?
                }
            };
            Ok(Some(Event::Xact { kind, xid, time }))
        }
        _ => Ok(None),
    }
}

/// The relations a commit or abort (plain or prepared) drops (`xl_xact_relfilelocators`, after
/// `xl_xact_xinfo`, `xl_xact_dbinfo` and `xl_xact_subxacts` when present), with fork 0; none for
/// other transaction records.
///
/// # Errors
/// Counts that run past the main data.
pub fn xact_dropped_relations(r: &Record, main: &[u8]) -> Result<Vec<RelFork>, DecodeError> {
    let ends = [
        XLOG_XACT_COMMIT,
        XLOG_XACT_ABORT,
        XLOG_XACT_COMMIT_PREPARED,
        XLOG_XACT_ABORT_PREPARED,
    ];
    if !ends.contains(&(r.info() & XLOG_XACT_OPMASK)) || r.info() & XLOG_XACT_HAS_INFO == 0 {
        return Ok(Vec::new());
    }
    let err = || DecodeError {
        msg: "transaction end record: dropped relations run past the main data".into(),
        lsn: r.lsn,
    };
    let at = |p: usize| main.get(p..p + 4).map(|_| le_u32(main, p)).ok_or_else(err);
    let xinfo = at(8)?;
    let mut p = 12usize;
    if xinfo & XACT_XINFO_HAS_DBINFO != 0 {
        p += 8;
    }
    if xinfo & XACT_XINFO_HAS_SUBXACTS != 0 {
        p += 4 + 4 * at(p)? as usize;
    }
    if xinfo & XACT_XINFO_HAS_RELFILELOCATORS == 0 {
        return Ok(Vec::new());
    }
    let n = at(p)? as usize;
    p += 4;
    if main.len() < p + 12 * n {
        return Err(err());
    }
    Ok((0..n).map(|i| RelFork::at(main, p + 12 * i, 0)).collect())
}

/// The prepared transaction's xid from `xl_xact_twophase` (walking the optional pieces in order).
fn twophase_xid(r: &Record, d: &[u8], major: PgMajor, kind: XactKind) -> Result<u32, DecodeError> {
    let err = |m: &str| DecodeError {
        msg: format!("two-phase transaction record: {m}"),
        lsn: r.lsn,
    };
    if r.info() & XLOG_XACT_HAS_INFO == 0 {
        return Err(err("no xinfo"));
    }
    let at = |p: usize| -> Result<u32, DecodeError> {
        d.get(p..p + 4)
            .map(|_| le_u32(d, p))
            .ok_or_else(|| err("runs past the main data"))
    };
    let xinfo = at(8)?;
    let mut p = 12usize;
    let count = |p: usize, item: usize| -> Result<usize, DecodeError> {
        let n = at(p)? as i32;
        usize::try_from(n)
            .map(|n| 4 + n * item)
            .map_err(|_| err("negative count"))
    };
    if xinfo & XACT_XINFO_HAS_DBINFO != 0 {
        p += 8; // dbinfo
    }
    if xinfo & XACT_XINFO_HAS_SUBXACTS != 0 {
        p += count(p, 4)?; // subxacts
    }
    if xinfo & XACT_XINFO_HAS_RELFILELOCATORS != 0 {
        p += count(p, 12)?; // relfilelocators
    }
    if xinfo & XACT_XINFO_HAS_DROPPED_STATS != 0 {
        p += count(p, if major >= PgMajor::V18 { 16 } else { 12 })?; // dropped stats
    }
    if kind == XactKind::CommitPrepared && xinfo & XACT_XINFO_HAS_INVALS != 0 {
        p += count(p, 16)?; // invalidations
    }
    if xinfo & XACT_XINFO_HAS_TWOPHASE == 0 {
        return Err(err("no two-phase xid"));
    }
    at(p)
}
