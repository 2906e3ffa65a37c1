//! Which relation blocks a WAL record changes, as PostgreSQL's WAL summarizer counts them
//! (`SummarizeWAL()` in `walsummarizer.c`, with `blkreftable.c`'s limit blocks):
//!
//! * every block reference of every record marks that block modified, except the free space map's
//!   (`FSM_FORKNUM`: base backups copy it whole);
//! * `XLOG_SMGR_CREATE` sets the created fork's limit block to 0; `XLOG_SMGR_TRUNCATE` sets the
//!   main fork's limit to the new length and the visibility map's to 0 (PostgreSQL computes the
//!   map's true length from the block size; 0 is never shorter than the truth, so it is safe: the
//!   map is copied whole);
//! * a commit or abort (plain or prepared) that drops relations sets limit 0 on their main,
//!   visibility-map and init forks;
//! * `CREATE DATABASE` (either strategy) and `DROP DATABASE` set limit 0 on the pseudo-relation
//!   `{tablespace, database, 0}`: the whole database directory is to be copied whole.
//!
//! A limit block is the shortest length the fork had: blocks at or past it were rewritten or
//! removed, so an incremental backup copies them whole (see `index::BlockChanges`). The special
//! records come before the record's own block references, as in the summarizer.

use super::le::u32_at;
use super::version::PgMajor;
use super::waldecoder::{DecodeError, RM_XACT_ID, Record, XLR_INFO_MASK};
use super::xlogrecord::{headers, xact_dropped_relations};

/// `RM_SMGR_ID`.
pub const RM_SMGR_ID: u8 = 2;
/// `RM_DBASE_ID`.
pub const RM_DBASE_ID: u8 = 4;
/// `XLOG_SMGR_CREATE`.
pub const XLOG_SMGR_CREATE: u8 = 0x10;
/// `XLOG_SMGR_TRUNCATE`.
pub const XLOG_SMGR_TRUNCATE: u8 = 0x20;
/// `SMGR_TRUNCATE_HEAP`.
pub const SMGR_TRUNCATE_HEAP: u32 = 0x0001;
/// `SMGR_TRUNCATE_VM`.
pub const SMGR_TRUNCATE_VM: u32 = 0x0002;
/// `XLOG_DBASE_CREATE_FILE_COPY` (`XLOG_DBASE_CREATE` before 15).
pub const XLOG_DBASE_CREATE_FILE_COPY: u8 = 0x00;
/// `XLOG_DBASE_CREATE_WAL_LOG` (15+).
pub const XLOG_DBASE_CREATE_WAL_LOG: u8 = 0x10;
/// `XLOG_DBASE_DROP` from 15 on.
pub const XLOG_DBASE_DROP: u8 = 0x20;
/// `XLOG_DBASE_DROP` in 13 and 14.
pub const XLOG_DBASE_DROP_V13: u8 = 0x10;

/// `MAIN_FORKNUM`.
pub const MAIN_FORKNUM: u8 = 0;
/// `FSM_FORKNUM`.
pub const FSM_FORKNUM: u8 = 1;
/// `VISIBILITYMAP_FORKNUM`.
pub const VISIBILITYMAP_FORKNUM: u8 = 2;
/// `INIT_FORKNUM`.
pub const INIT_FORKNUM: u8 = 3;

/// A relation fork: `RelFileLocator` (tablespace, database, relfilenumber) and fork number. The
/// relfilenumber 0 names a whole database directory.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RelFork {
    /// `spcOid`.
    pub spc: u32,
    /// `dbOid`.
    pub db: u32,
    /// `relNumber`.
    pub rel: u32,
    /// The fork number.
    pub fork: u8,
}

impl RelFork {
    /// The locator at `off` in `b` (12 bytes), with `fork`.
    pub fn at(b: &[u8], off: usize, fork: u8) -> RelFork {
        RelFork {
            spc: u32_at(b, off),
            db: u32_at(b, off + 4),
            rel: u32_at(b, off + 8),
            fork,
        }
    }
}

/// One change a record makes, in the order the summarizer applies them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Change {
    /// The fork was created, truncated or dropped: its length fell to at most this many blocks.
    Limit(RelFork, u32),
    /// This block was modified.
    Modified(RelFork, u32),
}

/// Append the changes record `r` makes to `out`: first what a special record does to whole forks,
/// then its block references (the summarizer's order). Called for every archived record, so the
/// block references go straight into `out`, with no buffer of their own.
///
/// # Errors
/// Malformed headers or main data of a record kind that changes files as a whole.
pub fn changes(r: &Record, major: PgMajor, out: &mut Vec<Change>) -> Result<(), DecodeError> {
    let at = out.len();
    let main = headers(
        r,
        major,
        Some(&mut |rel: RelFork, block| {
            if rel.fork != FSM_FORKNUM {
                out.push(Change::Modified(rel, block));
            }
        }),
    )?;
    if !matches!(r.rmid(), RM_SMGR_ID | RM_DBASE_ID | RM_XACT_ID) {
        return Ok(());
    }
    let mut special = Vec::new();
    whole_fork_changes(r, major, main, &mut special)?;
    out.splice(at..at, special);
    Ok(())
}

/// What a storage, database or transaction record does to whole forks.
fn whole_fork_changes(
    r: &Record,
    major: PgMajor,
    main: &[u8],
    out: &mut Vec<Change>,
) -> Result<(), DecodeError> {
    let info = r.info() & !XLR_INFO_MASK;
    let err = |what: &str| DecodeError {
        msg: format!("{what} main data is {} bytes, too short", main.len()),
        lsn: r.lsn,
    };
    match r.rmid() {
        RM_SMGR_ID if info == XLOG_SMGR_CREATE => {
            if main.len() < 16 {
                return Err(err("smgr create"));
            }
            let fork = u8::try_from(u32_at(main, 12)).unwrap_or(u8::MAX);
            if fork != FSM_FORKNUM {
                out.push(Change::Limit(RelFork::at(main, 0, fork), 0));
            }
        }
        RM_SMGR_ID if info == XLOG_SMGR_TRUNCATE => {
            if main.len() < 20 {
                return Err(err("smgr truncate"));
            }
            let (blkno, flags) = (u32_at(main, 0), u32_at(main, 16));
            if flags & SMGR_TRUNCATE_HEAP != 0 {
                out.push(Change::Limit(RelFork::at(main, 4, MAIN_FORKNUM), blkno));
            }
            if flags & SMGR_TRUNCATE_VM != 0 {
                out.push(Change::Limit(
                    RelFork::at(main, 4, VISIBILITYMAP_FORKNUM),
                    0,
                ));
            }
        }
        RM_DBASE_ID => dbase(main, info, major, out).map_err(|()| err("database"))?,
        RM_XACT_ID => {
            for rel in xact_dropped_relations(r, main)? {
                for fork in [MAIN_FORKNUM, VISIBILITYMAP_FORKNUM, INIT_FORKNUM] {
                    out.push(Change::Limit(RelFork { fork, ..rel }, 0));
                }
            }
        }
        _ => {}
    }
    Ok(())
}

/// The database records: limit 0 on `{tablespace, database, 0}` for each directory created or
/// dropped.
fn dbase(main: &[u8], info: u8, major: PgMajor, out: &mut Vec<Change>) -> Result<(), ()> {
    let whole = |spc: u32, db: u32| {
        Change::Limit(
            RelFork {
                spc,
                db,
                rel: 0,
                fork: MAIN_FORKNUM,
            },
            0,
        )
    };
    let drop = if major >= PgMajor::V15 {
        XLOG_DBASE_DROP
    } else {
        XLOG_DBASE_DROP_V13
    };
    let create = info == XLOG_DBASE_CREATE_FILE_COPY
        || (major >= PgMajor::V15 && info == XLOG_DBASE_CREATE_WAL_LOG);
    if create {
        // db_id, tablespace_id first in every create record.
        if main.len() < 8 {
            return Err(());
        }
        out.push(whole(u32_at(main, 4), u32_at(main, 0)));
    } else if info == drop {
        if main.len() < 8 {
            return Err(());
        }
        let db = u32_at(main, 0);
        let n = u32_at(main, 4) as usize;
        if main.len() < 8 + 4 * n {
            return Err(());
        }
        for i in 0..n {
            out.push(whole(u32_at(main, 8 + 4 * i), db));
        }
    }
    Ok(())
}
