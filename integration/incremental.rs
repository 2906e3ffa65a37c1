//! Incremental and differential backups against real PostgreSQL 15 and 18: a chain full → incr →
//! diff → incr taken across DDL (tables created, truncated, dropped, rewritten by `VACUUM FULL`,
//! moved to another tablespace, extended then cut short; databases created by both strategies and
//! dropped), each link restored and compared with `pg_dump` taken at that moment (also a time
//! between two backups), then checked with `pg_amcheck` and for checksum failures. The blocks of
//! tables changed before an incremental and never again are only right if the chain is combined
//! right: WAL replay does not touch them. On PostgreSQL 18 every block its WAL summarizer lists
//! for each incremental's range is one pitr stored. Then the chain is damaged on purpose.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use pitr::pg::{Lsn, TimelineId};

use crate::backup::{assert_same_dump, dump};
use crate::blocks::Oracle;
use crate::harness::{
    self, Cluster, Scratch, as_postgres, block_on, code, pitr, poll, run, stderr,
};

fn backup(scratch: &Scratch, url: &str, c: &Cluster, kind: &str) -> serde_json::Value {
    let out = harness::pitr_backup(scratch.path(), url, c, &["--type", kind, "--json"]);
    assert_eq!(code(&out), 0, "backup --type {kind}: {}", stderr(&out));
    serde_json::from_slice(&out.stdout).unwrap()
}

fn pgbench(c: &Cluster, transactions: &str) {
    let out = c.client(
        "pgbench",
        &["-n", "-c", "2", "-t", transactions, "postgres"],
    );
    assert!(out.status.success(), "pgbench: {}", stderr(&out));
}

fn id(v: &serde_json::Value) -> String {
    v["id"].as_str().unwrap().to_string()
}

fn info(scratch: &Scratch, url: &str) -> serde_json::Value {
    let out = pitr(scratch.path(), &["--repo", url, "info", "--json"], &[]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The source as a test knows it: where it archives, its tablespace, and how to restore it.
struct Source {
    scratch: Scratch,
    repo_dir: std::path::PathBuf,
    url: String,
    c: Cluster,
    bin: std::path::PathBuf,
    major: u32,
    ts_oid: u32,
}

impl Source {
    /// `pitr restore` as the postgres user with `args`, the tablespace relocated; the exit code
    /// and output.
    fn restore_cmd(&self, name: &str, args: &[&str]) -> (i32, String) {
        let dir = self.scratch.path().join(name);
        let map = format!(
            "{}={}",
            self.ts_oid,
            self.scratch.path().join(format!("{name}_ts")).display()
        );
        let mut all = vec![
            "--repo",
            self.url.as_str(),
            "restore",
            "--target-dir",
            dir.to_str().unwrap(),
            "--tablespace-map",
            &map,
            "--action",
            "promote",
            "--archive-mode",
            "off",
        ];
        all.extend_from_slice(args);
        let out = run(as_postgres(&mut Command::new(self.scratch.pitr_copy()))
            .args(&all)
            .current_dir("/tmp"));
        let text = String::from_utf8_lossy(&out.stdout).into_owned() + &stderr(&out);
        (code(&out), text)
    }

    /// Restore with `args`, promote, and return the running cluster.
    fn restore(&self, name: &str, args: &[&str]) -> Cluster {
        let (code, text) = self.restore_cmd(name, args);
        assert_eq!(code, 0, "restore {args:?}: {text}");
        let dir = self.scratch.path().join(name);
        let c = Cluster::existing(
            self.major,
            &self.bin,
            dir,
            Scratch::new(),
            "archive_mode = off",
        );
        c.wait_promoted();
        c
    }
}

/// `c` holds what `want` dumped, passes pg_amcheck, and its server saw no checksum failure.
fn same_dump(what: &str, want: &str, c: &Cluster) {
    assert_same_dump(what, want, c);
    let out = c.client(
        "pg_amcheck",
        &["--install-missing", "--heapallindexed", "--all"],
    );
    assert!(
        out.status.success(),
        "{what}: pg_amcheck: {}{}",
        String::from_utf8_lossy(&out.stdout),
        stderr(&out)
    );
    assert_eq!(
        c.sql("SELECT coalesce(sum(checksum_failures), 0) FROM pg_stat_database"),
        "0",
        "{what}: checksum failures"
    );
}

/// The tables and databases the DDL below works on.
fn create_objects(c: &Cluster) {
    c.sql("CREATE TABLE marks(id int)");
    c.sql("CREATE TABLE static_a AS SELECT g, md5(g::text) AS h FROM generate_series(1, 50000) g");
    c.sql("CREATE TABLE static_b TABLESPACE ts1 AS SELECT g, md5(g::text) AS h FROM generate_series(1, 50000) g");
    c.sql("CREATE INDEX ON static_b (g)");
    for t in ["shrinks", "rewritten", "moved"] {
        c.sql(&format!(
            "CREATE TABLE {t} AS SELECT g, md5(g::text) AS h FROM generate_series(1, 40000) g"
        ));
    }
    c.sql("CREATE TABLE extended AS SELECT g FROM generate_series(1, 100) g");
    c.sql("CREATE TABLE untouched AS SELECT g FROM generate_series(1, 30000) g");
    c.sql("CREATE TABLE truncated AS SELECT g FROM generate_series(1, 20000) g");
    c.sql("CREATE TABLE dropped AS SELECT g FROM generate_series(1, 20000) g");
    c.sql("CREATE DATABASE doomed");
}

fn chain(major: u32) {
    let Some(bin) = harness::pg_bin(major) else {
        return;
    };
    let conf = if major >= 17 {
        "autovacuum = off\nsummarize_wal = on"
    } else {
        "autovacuum = off"
    };
    let (scratch, repo_dir, url, c) = harness::archiving_cluster(major, &bin, conf);
    let ts_dir = scratch.subdir("ts1");
    c.sql(&format!(
        "CREATE TABLESPACE ts1 LOCATION '{}'",
        ts_dir.display()
    ));
    let ts_oid: u32 = c
        .sql("SELECT oid FROM pg_tablespace WHERE spcname = 'ts1'")
        .parse()
        .unwrap();
    let out = c.client("pgbench", &["-i", "-s", "3", "-q", "postgres"]);
    assert!(out.status.success(), "pgbench -i: {}", stderr(&out));
    create_objects(&c);
    let s = Source {
        scratch,
        repo_dir,
        url,
        c,
        bin,
        major,
        ts_oid,
    };
    let (scratch, url, c) = (&s.scratch, s.url.as_str(), &s.c);

    // No full backup yet: an incremental asked for is taken full, and says so.
    let full = backup(scratch, url, c, "incr");
    assert_eq!(full["type"], "full", "{full}");
    assert!(
        full["fallback"]
            .as_str()
            .unwrap()
            .contains("no restorable full backup"),
        "{full}"
    );

    // Changes the incremental must carry; static_a's are never touched again.
    c.sql("UPDATE static_a SET h = 'a' || h WHERE g % 7 = 0");
    c.sql("TRUNCATE truncated");
    c.sql("INSERT INTO truncated SELECT g FROM generate_series(1, 100) g");
    c.sql("DROP TABLE dropped");
    c.sql("CREATE TABLE created AS SELECT g FROM generate_series(1, 5000) g");
    c.sql("CREATE DATABASE db2");
    pgbench(c, "300");
    let want1 = dump(c);
    let incr1 = backup(scratch, url, c, "incr");
    assert_eq!(incr1["type"], "incr", "{incr1}");
    assert_eq!(incr1["parent"], full["id"], "{incr1}");
    assert!(incr1["fallback"].is_null(), "{incr1}");
    assert!(
        incr1["size_bytes"].as_u64().unwrap() * 2 < full["size_bytes"].as_u64().unwrap(),
        "an incremental copies less than half the full: {incr1} vs {full}"
    );

    // A differential on the full, taken while pgbench writes, after the DDL that replaces,
    // moves, extends and cuts files.
    c.sql("UPDATE static_b SET h = 'b' || h WHERE g % 5 = 0");
    c.sql("VACUUM FULL rewritten");
    c.sql("ALTER TABLE moved SET TABLESPACE ts1");
    c.sql("INSERT INTO extended SELECT g FROM generate_series(101, 60000) g");
    c.sql("DELETE FROM extended WHERE g > 200");
    c.sql("VACUUM extended");
    c.sql("DROP DATABASE doomed");
    if major >= 15 {
        c.sql("CREATE DATABASE copied STRATEGY = FILE_COPY");
    }
    let mut load = Command::new(s.bin.join("pgbench"))
        .arg("-h")
        .arg(&c.sock)
        .args(["-U", "postgres", "-c", "2", "-T", "4", "-n", "postgres"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let diff = backup(scratch, url, c, "diff");
    assert!(load.wait().unwrap().success());
    assert_eq!(diff["type"], "diff", "{diff}");
    assert_eq!(diff["parent"], full["id"], "{diff}");

    // A moment between the differential and the next incremental.
    c.sql("INSERT INTO marks VALUES (1)");
    let want_between = dump(c);
    let between =
        c.sql("SELECT to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS.US')");

    // An incremental on the differential: a table cut short by vacuum.
    c.sql("DELETE FROM shrinks WHERE g > 10000");
    c.sql("VACUUM shrinks");
    c.sql("UPDATE static_a SET h = 'c' || h WHERE g % 11 = 0");
    pgbench(c, "200");
    let want2 = dump(c);
    let incr2 = backup(scratch, url, c, "incr");
    assert_eq!(incr2["type"], "incr", "{incr2}");
    assert_eq!(incr2["parent"], diff["id"], "{incr2}");

    c.sql("INSERT INTO created VALUES (-1)");
    let want_latest = dump(c);
    let last = c.switch_wal();
    c.wait_archived(&last);

    // info lists the chain and the WAL each link covers.
    let listed = info(scratch, url);
    let backups = listed["backups"].as_array().unwrap();
    let types: Vec<(&str, &str)> = backups
        .iter()
        .map(|b| {
            (
                b["type"].as_str().unwrap(),
                b["parent"].as_str().unwrap_or("-"),
            )
        })
        .collect();
    assert_eq!(
        types,
        [
            ("full", "-"),
            ("incr", id(&full).as_str()),
            ("diff", id(&full).as_str()),
            ("incr", id(&diff).as_str())
        ],
        "{listed:#}"
    );
    assert!(backups.iter().all(|b| b["restorable"] == true));
    assert!(backups[0]["lsn_range"].is_null());
    assert_eq!(backups[3]["lsn_range"]["from"], backups[2]["start_lsn"]);
    assert_eq!(backups[3]["lsn_range"]["to"], backups[3]["start_lsn"]);
    if major >= 17 {
        summarizer_oracle(&s, &backups[1..]);
    }

    // The dry run names the chain.
    let (code_dry, plan) = s.restore_cmd("dry", &["--latest", "--dry-run"]);
    assert_eq!(code_dry, 0, "{plan}");
    assert!(
        plan.contains(&id(&diff)) && plan.contains(&id(&full)),
        "{plan}"
    );

    // Each link, restored to its own end, is the source as it was; so is a time between two.
    for (name, b, want) in [("incr1", &incr1, &want1), ("incr2", &incr2, &want2)] {
        let r = s.restore(name, &["--immediate", "--backup", &id(b)]);
        same_dump(name, want, &r);
    }
    let r = s.restore("between", &["--to", &between]);
    same_dump("a time between the diff and incr2", &want_between, &r);
    drop(r);
    let r = s.restore("latest", &["--latest"]);
    same_dump("latest", &want_latest, &r);
    assert_eq!(r.sql("SELECT count(*) FROM created WHERE g = -1"), "1");
    assert_eq!(r.sql("SELECT count(*) FROM truncated"), "100");
    assert_eq!(r.sql("SELECT count(*) FROM extended"), "200");
    assert_eq!(
        r.sql("SELECT string_agg(datname, ',' ORDER BY datname) FROM pg_database WHERE datname IN ('db2', 'doomed', 'copied')"),
        if major >= 15 { "copied,db2" } else { "db2" }
    );
    drop(r);

    // drill restores the newest chain by default, and checks it.
    let sql = scratch.path().join("drill.sql");
    std::fs::write(&sql, "SELECT count(*) = 1 FROM created WHERE g = -1;\n").unwrap();
    let bin_s = s.bin.to_string_lossy().into_owned();
    let out = pitr(
        scratch.path(),
        &[
            "--repo",
            url,
            "drill",
            "--sql",
            sql.to_str().unwrap(),
            "--pg-bin",
            &bin_s,
            "--json",
            "--timeout",
            "5m",
        ],
        &[],
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|_| serde_json::json!({"error": stderr(&out)}));
    assert_eq!(code(&out), 0, "{report:#}");
    assert_eq!(report["backup"], incr2["id"], "{report:#}");

    // verify reads every piece of the chain.
    let out = pitr(scratch.path(), &["--repo", url, "verify"], &[]);
    assert_eq!(
        code(&out),
        0,
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        stderr(&out)
    );

    damaged_chains(&s, &full, &incr1, &diff, &incr2);
    eprintln!(
        "PG {major}: full {} MiB, incr {} MiB, diff {} MiB, incr {} MiB copied; each restored (and a time between) with pg_dump identical, pg_amcheck clean, no checksum failures",
        full["size_bytes"].as_u64().unwrap() >> 20,
        incr1["size_bytes"].as_u64().unwrap() >> 20,
        diff["size_bytes"].as_u64().unwrap() >> 20,
        incr2["size_bytes"].as_u64().unwrap() >> 20,
    );
}

/// For each incremental or differential backup in `backups` (from `info --json`), every block
/// PostgreSQL's WAL summarizer lists inside its LSN range is among the blocks pitr's index gives
/// for that range, which is what the backup stored.
fn summarizer_oracle(s: &Source, backups: &[serde_json::Value]) {
    let c = &s.c;
    let repo = pitr::storage::Repo::open(&s.url).unwrap();
    let catalog = block_on(pitr::catalog::Catalog::load(&repo)).unwrap();
    for b in backups {
        let range = &b["lsn_range"];
        let from: Lsn = range["from"].as_str().unwrap().parse().unwrap();
        let to: Lsn = range["to"].as_str().unwrap().parse().unwrap();
        poll("the summarizer caught up", Duration::from_secs(90), || {
            let done: Lsn = c
                .sql("SELECT summarized_lsn FROM pg_get_wal_summarizer_state()")
                .parse()
                .ok()?;
            (done >= to).then_some(())
        });
        let ours = catalog
            .changes_between(TimelineId::ONE, from, to)
            .unwrap_or_else(|hole| panic!("backup {}: {hole}", b["id"]));
        let summaries = c.sql(&format!(
            "SELECT start_lsn, end_lsn FROM pg_available_wal_summaries() WHERE tli = 1 AND start_lsn >= '{from}' AND end_lsn <= '{to}' ORDER BY start_lsn"
        ));
        let mut oracle = Oracle::default();
        for row in summaries.lines() {
            let (start, stop) = row.split_once('|').unwrap();
            oracle.check(c, start.parse().unwrap(), stop.parse().unwrap(), &ours);
        }
        eprintln!(
            "PG {}: backup {} ({}, {from} to {to}): PostgreSQL's {} summaries list {} modified and {} limit blocks, pitr {} modified blocks; missing from pitr: {}",
            s.major,
            b["id"],
            b["type"],
            summaries.lines().count(),
            oracle.pg_blocks,
            oracle.pg_limits,
            ours.modified_blocks(),
            oracle.missing.len()
        );
        assert!(oracle.pg_blocks > 0, "no summary inside {from}-{to}");
        assert!(
            oracle.missing.is_empty(),
            "{} missing, first: {:?}",
            oracle.missing.len(),
            &oracle.missing[..oracle.missing.len().min(10)]
        );
    }
}

/// Expire keeps a kept backup's chain; a missing piece, a missing parent and a WAL gap are each
/// found and refused or worked around.
fn damaged_chains(
    s: &Source,
    full: &serde_json::Value,
    incr1: &serde_json::Value,
    diff: &serde_json::Value,
    incr2: &serde_json::Value,
) {
    let (scratch, url, c, repo_dir) = (&s.scratch, s.url.as_str(), &s.c, &s.repo_dir);

    // Keeping the newest backup keeps what it builds on; incr1 is not needed by it.
    let out = pitr(
        scratch.path(),
        &["--repo", url, "expire", "--keep-daily", "1"],
        &[],
    );
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let left: Vec<String> = info(scratch, url)["backups"]
        .as_array()
        .unwrap()
        .iter()
        .map(id)
        .collect();
    assert_eq!(left, [id(full), id(diff), id(incr2)], "after expire");
    assert!(!repo_dir.join("backups").join(id(incr1)).exists());

    // A piece of the full backup the chain needs (a table never changed since) is missing:
    // verify names it, restore refuses before writing anything.
    let rel = c.sql("SELECT pg_relation_filepath('untouched')");
    let piece = repo_dir
        .join("backups")
        .join(id(full))
        .join("data")
        .join(format!("{rel}.0.pitr"));
    let aside = scratch.path().join("piece-aside");
    std::fs::rename(&piece, &aside).unwrap();
    let out = pitr(scratch.path(), &["--repo", url, "verify"], &[]);
    let report = String::from_utf8_lossy(&out.stdout).into_owned() + &stderr(&out);
    assert_eq!(code(&out), 1, "{report}");
    assert!(report.contains(&format!("{rel}.0")), "{report}");
    let (code_missing, text) = s.restore_cmd("missing-piece", &["--latest"]);
    assert_eq!(code_missing, 1, "{text}");
    assert!(text.contains("is missing") && text.contains(&rel), "{text}");
    let target = scratch.path().join("missing-piece");
    assert!(
        !target.exists() || std::fs::read_dir(&target).unwrap().next().is_none(),
        "a refused restore wrote into {}",
        target.display()
    );
    std::fs::rename(&aside, &piece).unwrap();

    // A parent deleted by hand breaks the chain: info and verify name the link, restore refuses.
    std::fs::remove_file(
        repo_dir
            .join("backups")
            .join(id(diff))
            .join("manifest.pitr"),
    )
    .unwrap();
    let listed = info(scratch, url);
    let broken = listed["backups"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["id"] == incr2["id"])
        .unwrap()
        .clone();
    assert_eq!(broken["restorable"], false, "{broken}");
    assert!(
        broken["not_restorable_because"]
            .as_str()
            .unwrap()
            .contains(&id(diff)),
        "{broken}"
    );
    let out = pitr(scratch.path(), &["--repo", url, "verify"], &[]);
    let report = String::from_utf8_lossy(&out.stdout).into_owned() + &stderr(&out);
    assert_eq!(code(&out), 1, "{report}");
    assert!(
        report.to_lowercase().contains("chain") && report.contains(&id(diff)),
        "{report}"
    );
    let (code_broken, text) =
        s.restore_cmd("broken", &["--backup", &id(incr2), "--latest", "--dry-run"]);
    assert_eq!(code_broken, 1, "restore --backup {}: {text}", id(incr2));

    // A WAL gap since the newest restorable backup: an incremental asked for is taken full, and
    // the reason names the missing segment.
    let seg = incr2["stop_wal"].as_str().unwrap();
    remove_segment(repo_dir, seg);
    let hole = backup(scratch, url, c, "incr");
    assert_eq!(hole["type"], "full", "{hole}");
    let why = hole["fallback"].as_str().unwrap();
    assert!(why.contains(seg) && why.contains("not archived"), "{why}");
}

/// Delete the archived segment `seg` (not its summary) from a local repository.
fn remove_segment(repo_dir: &Path, seg: &str) {
    let dir = repo_dir.join("wal").join(&seg[..8]);
    let mut removed = 0;
    for e in std::fs::read_dir(&dir).unwrap() {
        let p = e.unwrap().path();
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        if name.starts_with(seg) && !name.contains(".idx") {
            std::fs::remove_file(p).unwrap();
            removed += 1;
        }
    }
    assert_eq!(removed, 1, "segment {seg} in {}", dir.display());
}

#[test]
fn pg15_incremental_chain() {
    chain(15);
}

#[test]
fn pg18_incremental_chain() {
    chain(18);
}

/// The same through the S3 server: an incremental on a full backup in a bucket, restored with
/// its chain to the end of the WAL.
#[test]
fn s3_incremental_round_trip() {
    let Some(bucket) = harness::s3_bucket() else {
        return;
    };
    let Some(bin) = harness::pg_bin(15) else {
        return;
    };
    let scratch = Scratch::new();
    let url = format!("s3://{bucket}/incremental-{}", std::process::id());
    let c = Cluster::start(
        15,
        &bin,
        &format!("{{pitr}} --repo {url} archive-push %p"),
        "autovacuum = off",
        &[],
    );
    let out = c.client("pgbench", &["-i", "-s", "2", "-q", "postgres"]);
    assert!(out.status.success(), "pgbench -i: {}", stderr(&out));
    c.sql("CREATE TABLE untouched AS SELECT g FROM generate_series(1, 30000) g");
    let full = backup(&scratch, &url, &c, "full");
    pgbench(&c, "200");
    c.sql("CREATE TABLE later AS SELECT g FROM generate_series(1, 1000) g");
    let incr = backup(&scratch, &url, &c, "incr");
    assert_eq!(incr["type"], "incr", "{incr}");
    assert_eq!(incr["parent"], full["id"], "{incr}");
    c.sql("INSERT INTO later VALUES (-1)");
    let want = dump(&c);
    let last = c.switch_wal();
    c.wait_archived(&last);
    let dir = scratch.path().join("restored");
    let out = run(as_postgres(&mut Command::new(scratch.pitr_copy()))
        .args([
            "--repo",
            url.as_str(),
            "restore",
            "--target-dir",
            dir.to_str().unwrap(),
            "--latest",
            "--archive-mode",
            "off",
        ])
        .current_dir("/tmp"));
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &stderr(&out);
    assert_eq!(code(&out), 0, "{text}");
    assert!(text.contains("combined with the 1 backup(s)"), "{text}");
    let r = Cluster::existing(15, &bin, dir, Scratch::new(), "archive_mode = off");
    r.wait_promoted();
    same_dump("s3 chain", &want, &r);
}
