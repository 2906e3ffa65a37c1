//! What an incremental backup stores of each file, given the blocks the WAL changed since its
//! parent started: the file whole, or only its changed blocks and its length. The rules follow
//! PostgreSQL 17's incremental base backup (`GetFileBackupMethod()` in
//! `basebackup_incremental.c`), so a restore rebuilds exactly what `pg_combinebackup` would:
//!
//! * anything that is not a relation data file, a free space map (never WAL-logged block by
//!   block), a file whose size is not whole blocks or exceeds a segment, and a file the parent does
//!   not have: whole;
//! * a file of a database created or dropped since the parent, or whose fork's limit block (it was
//!   created, truncated or dropped) lies at or before the file's first block: whole;
//! * a file with more than 90 % of its blocks changed: whole (cheaper than a block list);
//! * otherwise its changed blocks (numbered from the file's start) and the length to restore: its
//!   size now, or more where a limit inside the file says blocks past today's end were cut and must
//!   read as before, capped at a segment.
//!
//! The parent is the newest restorable backup on the current timeline's history (`incr`), or the
//! newest full one (`diff`). The changes come from the WAL index: every segment from the parent's
//! start to the new backup's start must be archived with its changed blocks summarized. Where the
//! index cannot vouch for them (see [`Hole`](crate::catalog::Hole)), the backup is taken full and
//! says why.

use std::time::{Duration, Instant};

use crate::blocks::BlockChanges;
use crate::catalog::Catalog;
use crate::manifest::{BackupManifest, BackupType};
use crate::pg::blockref::{FSM_FORKNUM, MAIN_FORKNUM, RelFork};
use crate::pg::page::relation_file;
use crate::pg::{Lsn, SegmentName, SystemId, TimelineId};
use crate::storage::Repo;

/// What an incremental or differential backup builds on.
#[derive(Debug)]
pub struct Basis {
    /// The parent backup.
    pub parent: BackupManifest,
    /// The blocks changed from the parent's start to this backup's start.
    pub changes: BlockChanges,
}

/// Where the new backup starts, and on which cluster.
#[derive(Clone, Copy, Debug)]
pub struct Start {
    /// Its start (redo) LSN.
    pub lsn: Lsn,
    /// Its timeline.
    pub timeline: TimelineId,
    /// The segment holding the start LSN.
    pub segment: SegmentName,
    /// The cluster.
    pub system_identifier: SystemId,
    /// Its major version.
    pub pg_version: u32,
    /// Its block size.
    pub block_size: u32,
}

/// The backup an incremental (`Incr`: the newest of any type) or differential (`Diff`: the
/// newest full) backup starting at `start` builds on: restorable (its whole chain), of the same
/// cluster, major version and block size, on the history of the new backup's timeline, and
/// started before it. `Err` says why there is none.
pub fn choose_parent<'a>(
    catalog: &'a Catalog,
    wanted: BackupType,
    start: &Start,
) -> Result<&'a BackupManifest, String> {
    let all = catalog.restorable_backups();
    if !all.iter().any(|b| b.backup_type == BackupType::Full) {
        return Err("the repository has no restorable full backup".into());
    }
    all.into_iter()
        .filter(|b| wanted != BackupType::Diff || b.backup_type == BackupType::Full)
        .filter(|b| {
            b.system_identifier == start.system_identifier
                && b.pg_version == start.pg_version
                && b.start_lsn < start.lsn
                && b.parent
                    .as_ref()
                    .is_none_or(|p| p.block_size == start.block_size)
                && catalog.backup_on_path(b, start.timeline)
        })
        .max_by_key(|b| (b.start_lsn, b.stop_time))
        .ok_or_else(|| {
            format!(
                "no restorable {}backup of this cluster lies on the history of timeline {}",
                if wanted == BackupType::Diff {
                    "full "
                } else {
                    ""
                },
                start.timeline
            )
        })
}

/// Find the parent and the blocks changed since it started, for a backup that started at
/// `start`: the WAL up to there must reach the repository first, so the current segment is
/// switched (`pg_switch_wal`, on a primary) and its summary awaited until `deadline`.
/// `Ok(Err(reason))`: take a full backup instead, for that reason.
///
/// # Errors
/// Store or server failures.
pub async fn prepare(
    repo: &Repo,
    client: &tokio_postgres::Client,
    wanted: BackupType,
    start: &Start,
    wait: Duration,
) -> anyhow::Result<Result<Basis, String>> {
    // Is there a parent at all, before switching segments and waiting? (No summaries needed.)
    let catalog = Catalog::load_backups(repo).await?;
    if let Err(why) = choose_parent(&catalog, wanted, start) {
        return Ok(Err(why));
    }
    let in_recovery: bool = client
        .query_one("SELECT pg_is_in_recovery()", &[])
        .await?
        .get(0);
    if in_recovery {
        return Ok(Err(
            "the server is a standby, which cannot switch to a new WAL segment to archive the WAL up to the backup's start".into(),
        ));
    }
    client
        .query_one("SELECT pg_switch_wal()::text", &[])
        .await
        .map_err(|e| anyhow::anyhow!("switch WAL segments (pg_switch_wal): {e}"))?;
    if !wait_indexed(repo, start.segment, Instant::now() + wait).await? {
        return Ok(Err(format!(
            "WAL segment {} (the backup's start) was not archived and indexed within {}",
            start.segment,
            humantime::format_duration(wait)
        )));
    }
    let mut catalog = Catalog::load(repo).await?;
    let parent = match choose_parent(&catalog, wanted, start) {
        Ok(p) => crate::catalog::manifest_with_files(repo, p).await?,
        Err(why) => return Ok(Err(why)),
    };
    catalog
        .load_changes(repo, start.timeline, parent.start_lsn, start.lsn)
        .await?;
    match catalog.changes_between(start.timeline, parent.start_lsn, start.lsn) {
        Ok(changes) => Ok(Ok(Basis { parent, changes })),
        Err(hole) => Ok(Err(format!(
            "the WAL index cannot say which blocks changed since backup {} started: {hole}",
            parent.id
        ))),
    }
}

/// Wait until `seg` is archived with its summary, or `deadline` passes (`false`).
async fn wait_indexed(repo: &Repo, seg: SegmentName, deadline: Instant) -> anyhow::Result<bool> {
    loop {
        if crate::catalog::summary_stored(repo, seg).await? {
            return Ok(true);
        }
        if Instant::now() >= deadline {
            return Ok(false);
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

/// How one file goes into an incremental backup.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Method {
    /// Copied whole, and why.
    Whole(&'static str),
    /// Only these blocks (from the file's start), and the file's length in blocks once restored.
    Blocks {
        /// Changed blocks, sorted.
        blocks: Vec<u32>,
        /// `truncation_block_length`: blocks past it do not exist in the restored file.
        length: u32,
    },
}

/// The method for the file at `path` (relative to the data directory) of `size` bytes, where
/// `in_parent` says whether the parent backup has it and `changes` are the blocks changed since
/// the parent's start. `block_size` and `segment_blocks` are the cluster's.
pub fn method(
    path: &str,
    size: u64,
    in_parent: bool,
    changes: &BlockChanges,
    block_size: u64,
    segment_blocks: u32,
) -> Method {
    let Some(file) = relation_file(path) else {
        return Method::Whole("not a relation data file");
    };
    if file.rel.fork == FSM_FORKNUM {
        return Method::Whole("a free space map");
    }
    if block_size == 0
        || !size.is_multiple_of(block_size)
        || size / block_size > u64::from(segment_blocks)
    {
        return Method::Whole("its size is not whole blocks of one segment");
    }
    if !in_parent {
        return Method::Whole("new since the parent backup");
    }
    let database = RelFork {
        rel: 0,
        fork: MAIN_FORKNUM,
        ..file.rel
    };
    if changes.fork(&database).is_some() {
        return Method::Whole("its database was created or dropped since the parent backup");
    }
    let nblocks = (size / block_size) as u32;
    let start = u64::from(file.segno) * u64::from(segment_blocks);
    let end = start + u64::from(nblocks);
    let Some(fork) = changes.fork(&file.rel) else {
        // Unchanged: nothing but its length.
        return if nblocks == 0 {
            Method::Whole("empty")
        } else {
            Method::Blocks {
                blocks: Vec::new(),
                length: nblocks,
            }
        };
    };
    if fork.limit.is_some_and(|l| u64::from(l) <= start) {
        return Method::Whole("created, truncated or dropped before this file's first block");
    }
    let blocks: Vec<u32> = fork
        .blocks
        .iter()
        .map(|&b| u64::from(b))
        .filter(|&b| b >= start && b < end)
        .map(|b| (b - start) as u32)
        .collect();
    if u64::from(nblocks) * 9 < blocks.len() as u64 * 10 {
        return Method::Whole("more than 90 % of its blocks changed");
    }
    let mut length = nblocks;
    if let Some(limit) = fork.limit {
        let from_limit = (u64::from(limit) - start).min(u64::from(segment_blocks)) as u32;
        length = length.max(from_limit);
    }
    Method::Blocks { blocks, length }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pg::blockref::Change;

    const BS: u64 = 8192;
    const SEG: u32 = 131_072;

    fn rel(node: u32) -> RelFork {
        RelFork {
            spc: 1663,
            db: 5,
            rel: node,
            fork: 0,
        }
    }

    fn changes(list: &[Change]) -> BlockChanges {
        let mut c = BlockChanges::default();
        for &ch in list {
            c.apply(ch);
        }
        c.finish();
        c
    }

    #[test]
    fn files_go_whole_or_as_changed_blocks() {
        let none = BlockChanges::default();
        let m = |path: &str, blocks: u64, parent: bool, c: &BlockChanges| {
            method(path, blocks * BS, parent, c, BS, SEG)
        };
        assert!(matches!(
            m("pg_xact/0000", 1, true, &none),
            Method::Whole(_)
        ));
        assert!(matches!(
            m("base/5/16384_fsm", 3, true, &none),
            Method::Whole(_)
        ));
        assert!(matches!(
            m("base/5/16384", 3, false, &none),
            Method::Whole(_)
        ));
        assert!(matches!(
            method("base/5/16384", 100, true, &none, BS, SEG),
            Method::Whole(_)
        ));
        assert_eq!(
            m("base/5/16384", 10, true, &none),
            Method::Blocks {
                blocks: vec![],
                length: 10
            }
        );
        // Changed blocks of the second segment file, numbered from its start.
        let c = changes(&[
            Change::Modified(rel(16384), 2),
            Change::Modified(rel(16384), SEG + 4),
            Change::Modified(rel(16384), SEG + 7),
        ]);
        assert_eq!(
            m("base/5/16384.1", 10, true, &c),
            Method::Blocks {
                blocks: vec![4, 7],
                length: 10
            }
        );
        // Nearly every block changed: whole.
        let most = changes(
            &(0..10)
                .map(|b| Change::Modified(rel(1), b))
                .collect::<Vec<_>>(),
        );
        assert!(matches!(m("base/5/1", 10, true, &most), Method::Whole(_)));
        // Truncated to 4 blocks, then grown to 6: blocks 4 and 5 are new, and a file now shorter
        // than the limit keeps its length to the limit.
        let cut = changes(&[
            Change::Limit(rel(2), 4),
            Change::Modified(rel(2), 4),
            Change::Modified(rel(2), 5),
        ]);
        assert_eq!(
            m("base/5/2", 20, true, &cut),
            Method::Blocks {
                blocks: vec![4, 5],
                length: 20
            }
        );
        let cut_short = changes(&[Change::Limit(rel(3), 8)]);
        assert_eq!(
            m("base/5/3", 5, true, &cut_short),
            Method::Blocks {
                blocks: vec![],
                length: 8
            }
        );
        // Dropped and recreated, or limit before the file: whole.
        let gone = changes(&[Change::Limit(rel(4), 0)]);
        assert!(matches!(m("base/5/4", 5, true, &gone), Method::Whole(_)));
        let db = changes(&[Change::Limit(rel(0), 0)]);
        assert!(matches!(m("base/5/16384", 5, true, &db), Method::Whole(_)));
    }
}
