//! The WAL decoder checked against `pg_waldump` on real WAL from PostgreSQL 15 and 18: every record
//! LSN, every commit/abort (xid and timestamp, prepared ones included), every restore point, and
//! the records that span segment boundaries (joined from the two segments' fragments).

use std::collections::BTreeMap;
use std::process::Command;

use pitr::pg::segment::validate_segment;
use pitr::pg::waldecoder::{SegmentDecoder, Step, join_fragments};
use pitr::pg::xlogrecord::{Event, event};
use pitr::pg::{Lsn, WalFileName};

use crate::harness::{self, Cluster, run_ok};

/// (spc, db, rel, fork, block).
type BlockRef = (u32, u32, u32, u8, u32);

#[derive(Debug, Default)]
struct Expected {
    records: Vec<Lsn>,
    /// (lsn, xid, "YYYY-MM-DD HH:MM:SS.ffffff")
    xacts: Vec<(Lsn, u32, String)>,
    restore_points: Vec<(Lsn, String)>,
    /// Block references per record: (spc, db, rel, fork, block).
    blocks: BTreeMap<Lsn, Vec<BlockRef>>,
}

/// The block references `pg_waldump` prints on a record's line:
/// `blkref #0: rel 1663/5/16384 fork vm blk 7` (no `fork` for the main fork).
fn blkrefs(line: &str) -> Vec<BlockRef> {
    line.split("blkref #")
        .skip(1)
        .map(|part| {
            let rest = part.split_once(": rel ").expect("blkref has a rel").1;
            let mut words = rest.split_whitespace();
            let rel: Vec<u32> = words
                .next()
                .unwrap()
                .trim_end_matches(',')
                .split('/')
                .map(|n| n.parse().unwrap())
                .collect();
            let mut fork = 0;
            let mut word = words.next().unwrap();
            if word == "fork" {
                fork = match words.next().unwrap() {
                    "main" => 0,
                    "fsm" => 1,
                    "vm" => 2,
                    "init" => 3,
                    other => panic!("fork {other}"),
                };
                word = words.next().unwrap();
            }
            assert_eq!(word, "blk", "{line}");
            let blk = words.next().unwrap().trim_end_matches(',').parse().unwrap();
            (rel[0], rel[1], rel[2], fork, blk)
        })
        .collect()
}

fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let rest = &line[line.find(key)? + key.len()..];
    Some(rest.split(',').next().unwrap_or(rest).trim())
}

/// Parse `pg_waldump` output into records keyed by start LSN.
fn waldump(c: &Cluster, from: Lsn, to: Lsn) -> Expected {
    let out = run_ok(
        Command::new(c.bin.join("pg_waldump"))
            .env("TZ", "UTC")
            .arg("-p")
            .arg(c.data.join("pg_wal"))
            .args(["-s", &from.to_string(), "-e", &to.to_string()]),
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let mut e = Expected::default();
    for line in text.lines().filter(|l| l.starts_with("rmgr:")) {
        let lsn: Lsn = field(line, "lsn: ").unwrap().parse().unwrap();
        e.records.push(lsn);
        let refs = blkrefs(line);
        if !refs.is_empty() {
            e.blocks.insert(lsn, refs);
        }
        let desc = &line[line.find("desc: ").unwrap() + 6..];
        let mut words = desc.split_whitespace();
        let kind = words.next().unwrap_or("");
        if line.starts_with("rmgr: Transaction")
            && ["COMMIT", "ABORT", "COMMIT_PREPARED", "ABORT_PREPARED"].contains(&kind)
        {
            let (xid, rest) = if kind.ends_with("_PREPARED") {
                let after = &desc[kind.len()..].trim_start();
                let (x, r) = after.split_once(": ").unwrap();
                (x.parse::<u32>().unwrap(), r)
            } else {
                (
                    field(line, "tx: ").unwrap().parse::<u32>().unwrap(),
                    desc[kind.len()..].trim_start(),
                )
            };
            e.xacts.push((lsn, xid, rest[..26].to_string()));
        }
        if kind == "RESTORE_POINT" {
            e.restore_points
                .push((lsn, desc["RESTORE_POINT".len()..].trim().to_string()));
        }
    }
    e
}

fn decoder_matches_waldump(major: u32) {
    let Some(bin) = harness::pg_bin(major) else {
        return;
    };
    let repo = harness::Scratch::new();
    let url = format!("file://{}", repo.subdir("repo").display());
    let c = Cluster::start(
        major,
        &bin,
        &format!("{{pitr}} --repo {url} archive-push %p"),
        "max_prepared_transactions = 5",
        &[],
    );
    c.sql("CREATE TABLE t(id int, pad text)");
    for i in 0..30 {
        c.sql("INSERT INTO t SELECT g, repeat('v', 200) FROM generate_series(1, 2000) g");
        // Large records that cross pages and, sooner or later, segment boundaries.
        c.sql("SELECT count(pg_logical_emit_message(false, 'pitr', repeat(md5(g::text), 400))) FROM generate_series(1, 60) g");
        if i % 7 == 0 {
            c.sql(&format!("SELECT pg_create_restore_point('rp_{i}')"));
            c.sql("BEGIN; INSERT INTO t VALUES (-1, 'x'); ROLLBACK");
            c.sql(&format!(
                "BEGIN; INSERT INTO t VALUES (-2, 'p'); PREPARE TRANSACTION 'p{i}'"
            ));
            c.sql(&format!("COMMIT PREPARED 'p{i}'"));
            c.sql(&format!(
                "BEGIN; INSERT INTO t VALUES (-3, 'p'); PREPARE TRANSACTION 'a{i}'"
            ));
            c.sql(&format!("ROLLBACK PREPARED 'a{i}'"));
        }
        if i == 15 {
            c.sql("CHECKPOINT");
            c.switch_wal();
        }
    }
    let last = c.switch_wal();
    c.wait_archived(&last);

    let segments = c.archived_segments();
    let seg_size = pitr::pg::WalSegSize::DEFAULT;
    let name_of = |s: &str| match s.parse::<WalFileName>().unwrap() {
        WalFileName::Segment(n) => n,
        _ => unreachable!(),
    };
    let start = name_of(&segments[0])
        .segno(seg_size)
        .unwrap()
        .start_lsn(seg_size)
        .unwrap();
    let end = name_of(segments.last().unwrap())
        .segno(seg_size)
        .unwrap()
        .start_lsn(seg_size)
        .unwrap()
        .checked_add(u64::from(seg_size.bytes()))
        .unwrap();
    let want = waldump(&c, start, end);
    let want_xacts: BTreeMap<Lsn, (u32, String)> = want
        .xacts
        .iter()
        .map(|(l, x, t)| (*l, (*x, t.clone())))
        .collect();

    let mut got_records = Vec::new();
    let mut got_xacts = BTreeMap::new();
    let mut got_rps = Vec::new();
    let mut got_blocks = BTreeMap::new();
    let mut spanning = 0;
    let mut prev_tail = None;
    for seg in &segments {
        let bytes = std::fs::read(c.data.join("pg_wal").join(seg)).unwrap();
        let h = validate_segment(name_of(seg), &bytes).unwrap();
        // Fed a window at a time, as archive-push feeds it.
        let mut d =
            SegmentDecoder::streaming(bytes.len(), h.pageaddr, h.page_size, h.major).unwrap();
        let mut windows = bytes.chunks(pitr::storage::envelope::PARALLEL_PIECE);
        let mut records = Vec::new();
        loop {
            match d.step().unwrap_or_else(|e| panic!("{seg}: {e}")) {
                Step::Record(r) => records.push(r.into_owned()),
                Step::More => d.feed(windows.next().expect("no more than the segment")),
                Step::Done => break,
            }
        }
        // A record that began in the previous segment: join the two fragments.
        if let (Some(tail), Some(head)) = (prev_tail.take(), d.head.clone()) {
            let joined = join_fragments(&tail, &head).expect("fragments join into a valid record");
            spanning += 1;
            records.insert(0, joined);
        }
        prev_tail = d.tail.clone();
        for r in records {
            got_records.push(r.lsn);
            let mut refs = Vec::new();
            pitr::pg::xlogrecord::headers(
                &r,
                h.major,
                Some(&mut |f: pitr::pg::blockref::RelFork, b| refs.push((f, b))),
            )
            .unwrap();
            if !refs.is_empty() {
                got_blocks.insert(
                    r.lsn,
                    refs.iter()
                        .map(|(f, b)| (f.spc, f.db, f.rel, f.fork, *b))
                        .collect::<Vec<_>>(),
                );
            }
            match event(&r, h.major).unwrap() {
                Some(Event::Xact { xid, time, .. }) => {
                    got_xacts.insert(
                        r.lsn,
                        (xid, time.rfc3339().replace('T', " ")[..26].to_string()),
                    );
                }
                Some(Event::RestorePoint { name, .. }) => got_rps.push((r.lsn, name)),
                _ => {}
            }
        }
    }
    got_records.sort();
    // The very first segment may begin inside a record pg_waldump skips as we do; the last record
    // we cannot see whole (a tail with no next segment) is absent from both.
    assert_eq!(
        got_records.len(),
        want.records.len(),
        "record count differs from pg_waldump"
    );
    assert_eq!(got_records, want.records);
    assert_eq!(
        got_xacts, want_xacts,
        "transaction ends differ from pg_waldump"
    );
    assert_eq!(got_rps, want.restore_points);
    let mismatched: Vec<_> = want
        .blocks
        .iter()
        .filter(|(lsn, refs)| got_blocks.get(*lsn) != Some(*refs))
        .take(5)
        .collect();
    assert!(
        mismatched.is_empty() && got_blocks.len() == want.blocks.len(),
        "block references differ from pg_waldump ({} vs {} records), first: {mismatched:?}",
        got_blocks.len(),
        want.blocks.len()
    );
    assert!(
        want.xacts.len() > 100 && want.restore_points.len() == 5,
        "{} xacts, {:?}",
        want.xacts.len(),
        want.restore_points
    );
    assert!(
        spanning >= 1,
        "no record spanned a segment boundary; the test needs more WAL"
    );
    eprintln!(
        "PG {major}: {} segments, {} records, {} with block references ({} references), {} transaction ends, {} restore points, {spanning} records spanning segments: all equal to pg_waldump",
        segments.len(),
        got_records.len(),
        got_blocks.len(),
        got_blocks.values().map(Vec::len).sum::<usize>(),
        got_xacts.len(),
        got_rps.len()
    );
}

#[test]
fn pg15_decoder_matches_pg_waldump() {
    decoder_matches_waldump(15);
}

#[test]
fn pg18_decoder_matches_pg_waldump() {
    decoder_matches_waldump(18);
}

/// `pitr info --json` on a real archive: the window's latest time is the last commit's timestamp as
/// PostgreSQL reports it, and the restore points are listed.
fn info_shows_the_window(major: u32) {
    let Some(bin) = harness::pg_bin(major) else {
        return;
    };
    let scratch = harness::Scratch::new();
    let url = format!("file://{}", scratch.subdir("repo").display());
    let c = Cluster::start(
        major,
        &bin,
        &format!("{{pitr}} --repo {url} archive-push %p"),
        "track_commit_timestamp = on\nautovacuum = off",
        &[],
    );
    c.sql("CREATE TABLE marks(id int primary key, at timestamptz default clock_timestamp())");
    for i in 1..=5 {
        c.sql(&format!("INSERT INTO marks(id) VALUES ({i})"));
        if i == 2 || i == 4 {
            c.sql(&format!("SELECT pg_create_restore_point('after_{i}')"));
        }
    }
    c.sql("SELECT count(pg_logical_emit_message(false, 'fill', repeat('x', 8000))) FROM generate_series(1, 2500)");
    c.sql("INSERT INTO marks(id) VALUES (6)");
    let last_commit = c.sql(
        "SELECT to_char(pg_xact_commit_timestamp(xmin) AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"') FROM marks WHERE id = 6",
    );
    let last = c.switch_wal();
    c.wait_archived(&last);

    let out = harness::pitr(scratch.path(), &["--repo", &url, "info", "--json"], &[]);
    assert_eq!(harness::code(&out), 0, "{}", harness::stderr(&out));
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        info["window"]["latest"],
        serde_json::json!(last_commit),
        "{info:#}"
    );
    assert_eq!(info["window"]["latest_timeline"], 1);
    assert_eq!(info["window"]["wal_end_segment"], serde_json::json!(last));
    assert_eq!(info["pg_version"], major);
    let sysid = c.sql("SELECT system_identifier FROM pg_control_system()");
    assert_eq!(info["system_identifier"], serde_json::json!(sysid));
    let names: Vec<&str> = info["restore_points"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["after_2", "after_4"]);
    assert!(
        info["timelines"][0]["wal_ranges"][0]["first"]
            .as_str()
            .unwrap()
            .starts_with("00000001")
    );
    assert_eq!(info["timelines"][0]["gaps"], serde_json::json!([]));
    assert_eq!(info["index_problems"], serde_json::json!([]));

    let out = harness::pitr(scratch.path(), &["--repo", &url, "info"], &[]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&last_commit) && text.contains("after_4"),
        "{text}"
    );
    eprintln!("PG {major}: info window latest {last_commit} on {last}");
}

#[test]
fn pg15_info_shows_the_window() {
    info_shows_the_window(15);
}

#[test]
fn pg18_info_shows_the_window() {
    info_shows_the_window(18);
}

/// Loading the catalog of a repository with 10 000 segments reads only summaries, and stays quick.
#[test]
fn catalog_of_10k_segments() {
    use pitr::compress::Compression;
    use pitr::index::{SegmentSummary, XactRef};
    use pitr::pg::PgTimestamp;
    use pitr::pg::xlogrecord::XactKind;
    use pitr::pg::{SegNo, SegmentName, TimelineId, WalSegSize};
    use pitr::storage::envelope;
    use pitr::storage::layout::ObjectKey;

    let scratch = harness::Scratch::new();
    let root = scratch.subdir("repo");
    let write = |key: &ObjectKey, data: &[u8]| {
        let p = root.join(key.key());
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, envelope::encode(data, Compression::Zstd).unwrap()).unwrap();
    };
    let ident = pitr::storage::identity::RepoIdentity {
        format_version: 1,
        system_identifier: pitr::pg::SystemId(7),
        pg_version: 15,
        wal_segment_size: pitr::pg::WalSegSize::DEFAULT,
        wal_page_size: 8192,
    };
    write(&ObjectKey::Identity, &serde_json::to_vec(&ident).unwrap());
    let n = 10_000u64;
    for i in 1..=n {
        if i == 5000 {
            continue; // one gap
        }
        let seg = SegmentName::new(TimelineId::ONE, SegNo(i), WalSegSize::DEFAULT).unwrap();
        let x = XactRef {
            lsn: Lsn(i << 24),
            xid: i as u32,
            time: PgTimestamp(i as i64 * 1_000_000),
            kind: XactKind::Commit,
        };
        let s = SegmentSummary {
            format: 1,
            records: 1000,
            xacts: 10,
            first_xact: Some(x),
            last_xact: Some(x),
            max_xact_time: Some(x.time),
            ..Default::default()
        };
        write(
            &ObjectKey::Wal(WalFileName::Segment(seg)),
            b"stand-in for a segment",
        );
        write(&ObjectKey::Summary(seg), &serde_json::to_vec(&s).unwrap());
    }
    let url = format!("file://{}", root.display());
    let repo = pitr::storage::Repo::open(&url).unwrap();
    let start = std::time::Instant::now();
    let catalog = tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(pitr::catalog::Catalog::load(&repo))
        .unwrap();
    let elapsed = start.elapsed();
    assert_eq!(catalog.summaries.len(), n as usize - 1);
    assert_eq!(
        catalog.ranges(TimelineId::ONE),
        vec![(SegNo(1), SegNo(4999)), (SegNo(5001), SegNo(n))]
    );
    // The window stops at the gap.
    assert_eq!(catalog.window().unwrap().latest.unwrap().xid, 4999);
    eprintln!(
        "catalog of {} segments + summaries loaded from the local store in {:.0} ms",
        n - 1,
        elapsed.as_secs_f64() * 1e3
    );
}
