//! The changed blocks pitr's WAL index records, checked against PostgreSQL's own WAL summarizer
//! (`summarize_wal = on`, `pg_wal_summary_contents()`) on PostgreSQL 18, over a workload with DDL:
//! every block PostgreSQL lists as modified is one pitr lists (or one at or past a limit block pitr
//! recorded for its fork), and every limit block PostgreSQL records pitr records as low or lower.

use std::time::Duration;

use pitr::blocks::BlockChanges;
use pitr::catalog::Catalog;
use pitr::pg::blockref::RelFork;
use pitr::pg::{Lsn, SegNo, TimelineId, WalSegSize};

use crate::harness::{self, Cluster, block_on, poll};

#[test]
fn pg18_changed_blocks_cover_the_wal_summarizer() {
    let Some(bin) = harness::pg_bin(18) else {
        return;
    };
    let scratch = harness::Scratch::new();
    let url = format!("file://{}", scratch.subdir("repo").display());
    let space = scratch.subdir("space");
    harness::chown_postgres(&space);
    let c = Cluster::start(
        18,
        &bin,
        &format!("{{pitr}} --repo {url} archive-push %p"),
        "summarize_wal = on\nmax_prepared_transactions = 5",
        &[],
    );
    let first = c.sql("SELECT pg_current_wal_lsn()");
    workload(&c, &space);
    let end: Lsn = c.sql("SELECT pg_current_wal_lsn()").parse().unwrap();
    // The summarizer ends a summary at a checkpoint's redo point.
    c.sql("CHECKPOINT");
    let last = c.switch_wal();
    c.wait_archived(&last);
    poll("the summarizer caught up", Duration::from_secs(90), || {
        let done: Lsn = c
            .sql("SELECT summarized_lsn FROM pg_get_wal_summarizer_state()")
            .parse()
            .ok()?;
        (done >= end).then_some(())
    });

    let repo = pitr::storage::Repo::open(&url).unwrap();
    let catalog = block_on(Catalog::load(&repo)).unwrap();
    let seg_size = WalSegSize::DEFAULT;
    let first: Lsn = first.parse().unwrap();
    // PostgreSQL's summaries that lie inside the archived range after the workload began.
    let archived_end = match last.parse::<pitr::pg::WalFileName>().unwrap() {
        pitr::pg::WalFileName::Segment(s) => SegNo(s.segno(seg_size).unwrap().0 + 1)
            .start_lsn(seg_size)
            .unwrap(),
        other => panic!("{other}"),
    };
    let summaries = c.sql(&format!(
        "SELECT start_lsn, end_lsn FROM pg_available_wal_summaries() WHERE tli = 1 AND start_lsn >= '{first}' AND end_lsn <= '{archived_end}' ORDER BY start_lsn"
    ));
    let mut oracle = Oracle::default();
    let mut pitr_blocks = 0;
    for row in summaries.lines() {
        let (start, stop) = row.split_once('|').unwrap();
        let (start, stop): (Lsn, Lsn) = (start.parse().unwrap(), stop.parse().unwrap());
        // pitr's changes over every segment the summary touches (a superset of its range).
        let segs = start.segno(seg_size).0..=Lsn(stop.0 - 1).segno(seg_size).0;
        let mut ours = BlockChanges::default();
        let mut covered = true;
        for n in segs {
            match catalog
                .summaries
                .get(&(TimelineId::ONE, SegNo(n)))
                .and_then(|s| s.changes.as_ref())
            {
                Some(ch) => ours.then(ch),
                None => covered = false,
            }
        }
        assert!(
            covered,
            "segments of summary {start}-{stop} have no changed blocks recorded"
        );
        pitr_blocks += ours.modified_blocks();
        oracle.check(&c, start, stop, &ours);
    }
    let Oracle {
        pg_blocks,
        pg_limits,
        missing,
    } = oracle;
    eprintln!(
        "PG 18: {} WAL summaries; PostgreSQL lists {pg_blocks} modified blocks and {pg_limits} limit blocks, pitr {pitr_blocks} modified blocks over the same segments; missing from pitr: {}",
        summaries.lines().count(),
        missing.len()
    );
    assert!(
        pg_blocks > 1000,
        "the workload changed too little: {pg_blocks} blocks"
    );
    assert!(
        pg_limits > 5,
        "the workload truncated, created or dropped too little: {pg_limits}"
    );
    assert!(
        missing.is_empty(),
        "{} missing, first: {:?}",
        missing.len(),
        &missing[..missing.len().min(10)]
    );
}

/// PostgreSQL's summaries compared with pitr's changed blocks: what PostgreSQL lists, and what of
/// it pitr does not.
#[derive(Default)]
pub(crate) struct Oracle {
    /// Modified blocks PostgreSQL lists.
    pub pg_blocks: usize,
    /// Limit blocks PostgreSQL lists.
    pub pg_limits: usize,
    /// What pitr does not cover.
    pub missing: Vec<String>,
}

impl Oracle {
    /// Check PostgreSQL's summary `start`-`stop` (`pg_wal_summary_contents`, timeline 1) against
    /// `ours`: every modified block is in `ours` (or at or past a limit of its fork there), every
    /// limit block is one `ours` records as low or lower.
    pub(crate) fn check(&mut self, c: &Cluster, start: Lsn, stop: Lsn, ours: &BlockChanges) {
        let rows = c.sql(&format!(
            "SELECT reltablespace, reldatabase, relfilenode, relforknumber, relblocknumber, is_limit_block FROM pg_wal_summary_contents(1, '{start}', '{stop}')"
        ));
        for line in rows.lines() {
            let f: Vec<&str> = line.split('|').collect();
            let rel = RelFork {
                spc: f[0].parse().unwrap(),
                db: f[1].parse().unwrap(),
                rel: f[2].parse().unwrap(),
                fork: f[3].parse().unwrap(),
            };
            let block: u32 = f[4].parse().unwrap();
            let mine = ours.fork(&rel);
            if f[5] == "t" {
                self.pg_limits += 1;
                if mine.and_then(|m| m.limit).is_none_or(|l| l > block) {
                    self.missing
                        .push(format!("limit {block} of {rel:?} in {start}-{stop}"));
                }
            } else {
                self.pg_blocks += 1;
                let has = mine.is_some_and(|m| {
                    m.blocks.binary_search(&block).is_ok() || m.limit.is_some_and(|l| l <= block)
                });
                if !has {
                    self.missing
                        .push(format!("block {block} of {rel:?} in {start}-{stop}"));
                }
            }
        }
    }
}

/// Inserts, updates, and every kind of DDL that changes files as a whole.
fn workload(c: &Cluster, space: &std::path::Path) {
    c.sql("CREATE TABLE a(id int primary key, pad text)");
    c.sql("INSERT INTO a SELECT g, repeat('a', 300) FROM generate_series(1, 20000) g");
    c.sql("CREATE TABLE b(id int, pad text)");
    c.sql("INSERT INTO b SELECT g, repeat('b', 300) FROM generate_series(1, 5000) g");
    c.sql("CHECKPOINT");
    c.sql("UPDATE a SET pad = repeat('u', 300) WHERE id % 7 = 0");
    c.sql("VACUUM a");
    // Extended, then truncated by VACUUM (empty pages at the end).
    c.sql("INSERT INTO b SELECT g, repeat('c', 300) FROM generate_series(1, 5000) g");
    c.sql("DELETE FROM b WHERE id > 2000");
    c.sql("VACUUM b");
    c.sql("VACUUM FULL a");
    c.sql("TRUNCATE b");
    c.sql("INSERT INTO b SELECT g, 'x' FROM generate_series(1, 100) g");
    c.sql("CREATE TABLE d(id int)");
    c.sql("INSERT INTO d SELECT generate_series(1, 1000)");
    c.sql("DROP TABLE d");
    c.sql("BEGIN; CREATE TABLE e(id int); INSERT INTO e SELECT generate_series(1, 1000); ROLLBACK");
    c.sql("BEGIN; CREATE TABLE p(id int); INSERT INTO p VALUES (1); PREPARE TRANSACTION 'p1'");
    c.sql("COMMIT PREPARED 'p1'");
    c.sql("BEGIN; DROP TABLE p; PREPARE TRANSACTION 'p2'");
    c.sql("COMMIT PREPARED 'p2'");
    c.sql("CREATE DATABASE copied STRATEGY file_copy");
    c.sql("CREATE DATABASE logged STRATEGY wal_log");
    c.sql("DROP DATABASE copied");
    c.sql(&format!(
        "CREATE TABLESPACE ts LOCATION '{}'",
        space.display()
    ));
    c.sql("ALTER TABLE b SET TABLESPACE ts");
    c.sql("INSERT INTO b SELECT g, 'y' FROM generate_series(1, 100) g");
    c.sql("CREATE UNLOGGED TABLE u(id int)");
    c.sql("INSERT INTO u SELECT generate_series(1, 1000)");
    c.sql("UPDATE a SET pad = 'z' WHERE id < 500");
    c.sql("CHECKPOINT");
}
