//! Incremental and differential backups against real PostgreSQL 15 and 18: a chain full → incr →
//! diff → incr taken across DDL (a new table, a truncation, a drop, a new database, a vacuum that
//! cuts a table short, a tablespace), each link restored and compared with `pg_dump` taken at the
//! backup, and checked with `pg_amcheck`. The blocks of tables changed before an incremental and
//! never again are only right if the chain is combined right: WAL replay does not touch them.

use std::process::{Command, Stdio};

use crate::backup::{assert_same_dump, dump};
use crate::harness::{self, Cluster, Scratch, as_postgres, code, pitr, run, stderr};

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

/// Restore `backup` with `args` (as the postgres user), promote, and return the cluster.
fn restore(
    s: &Scratch,
    url: &str,
    major: u32,
    bin: &std::path::Path,
    name: &str,
    args: &[&str],
) -> Cluster {
    let dir = s.path().join(name);
    let ts = s.path().join(format!("{name}_ts"));
    let map = format!("{}={}", TS_OID.with(|o| *o.borrow()), ts.display());
    let mut all = vec![
        "--repo",
        url,
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
    let out = run(as_postgres(&mut Command::new(s.pitr_copy()))
        .args(&all)
        .current_dir("/tmp"));
    assert_eq!(
        code(&out),
        0,
        "restore {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        stderr(&out)
    );
    let c = Cluster::existing(major, bin, dir, Scratch::new(), "archive_mode = off");
    c.wait_promoted();
    c
}

thread_local! {
    static TS_OID: std::cell::RefCell<u32> = const { std::cell::RefCell::new(0) };
}

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
}

fn chain(major: u32) {
    let Some(bin) = harness::pg_bin(major) else {
        return;
    };
    let (scratch, repo_dir, url, c) = harness::archiving_cluster(major, &bin, "autovacuum = off");
    let ts_dir = scratch.subdir("ts1");
    c.sql(&format!(
        "CREATE TABLESPACE ts1 LOCATION '{}'",
        ts_dir.display()
    ));
    let oid: u32 = c
        .sql("SELECT oid FROM pg_tablespace WHERE spcname = 'ts1'")
        .parse()
        .unwrap();
    TS_OID.with(|o| *o.borrow_mut() = oid);
    let out = c.client("pgbench", &["-i", "-s", "3", "-q", "postgres"]);
    assert!(out.status.success(), "pgbench -i: {}", stderr(&out));
    c.sql("CREATE TABLE static_a AS SELECT g, md5(g::text) AS h FROM generate_series(1, 50000) g");
    c.sql("CREATE TABLE static_b TABLESPACE ts1 AS SELECT g, md5(g::text) AS h FROM generate_series(1, 50000) g");
    c.sql("CREATE INDEX ON static_b (g)");
    c.sql("CREATE TABLE shrinks AS SELECT g, md5(g::text) AS h FROM generate_series(1, 40000) g");
    c.sql("CREATE TABLE truncated AS SELECT g FROM generate_series(1, 20000) g");
    c.sql("CREATE TABLE dropped AS SELECT g FROM generate_series(1, 20000) g");

    // No full backup yet: an incremental asked for is taken full, and says so.
    let full = backup(&scratch, &url, &c, "incr");
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
    pgbench(&c, "300");
    let want1 = dump(&c);
    let incr1 = backup(&scratch, &url, &c, "incr");
    assert_eq!(incr1["type"], "incr", "{incr1}");
    assert_eq!(incr1["parent"], full["id"], "{incr1}");
    assert!(incr1["fallback"].is_null(), "{incr1}");
    assert!(
        incr1["size_bytes"].as_u64().unwrap() * 3 < full["size_bytes"].as_u64().unwrap(),
        "an incremental copies less than a third of the full: {incr1} vs {full}"
    );

    // A differential builds on the full, taken while pgbench writes.
    c.sql("UPDATE static_b SET h = 'b' || h WHERE g % 5 = 0");
    let mut load = Command::new(bin.join("pgbench"))
        .arg("-h")
        .arg(&c.sock)
        .args(["-U", "postgres", "-c", "2", "-T", "4", "-n", "postgres"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let diff = backup(&scratch, &url, &c, "diff");
    assert!(load.wait().unwrap().success());
    assert_eq!(diff["type"], "diff", "{diff}");
    assert_eq!(diff["parent"], full["id"], "{diff}");

    // An incremental on the differential: a table cut short by vacuum.
    c.sql("DELETE FROM shrinks WHERE g > 10000");
    c.sql("VACUUM shrinks");
    c.sql("UPDATE static_a SET h = 'c' || h WHERE g % 11 = 0");
    pgbench(&c, "200");
    let want2 = dump(&c);
    let incr2 = backup(&scratch, &url, &c, "incr");
    assert_eq!(incr2["type"], "incr", "{incr2}");
    assert_eq!(incr2["parent"], diff["id"], "{incr2}");

    c.sql("INSERT INTO created VALUES (-1)");
    let want_latest = dump(&c);
    let last = c.switch_wal();
    c.wait_archived(&last);

    // info lists the chain.
    let out = pitr(scratch.path(), &["--repo", &url, "info", "--json"], &[]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let types: Vec<(&str, &str)> = info["backups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            (
                b["type"].as_str().unwrap(),
                b["parent"].as_str().unwrap_or("-"),
            )
        })
        .collect();
    let id = |v: &serde_json::Value| v["id"].as_str().unwrap().to_string();
    assert_eq!(
        types,
        [
            ("full", "-"),
            ("incr", id(&full).as_str()),
            ("diff", id(&full).as_str()),
            ("incr", id(&diff).as_str())
        ],
        "{info:#}"
    );
    assert!(
        info["backups"]
            .as_array()
            .unwrap()
            .iter()
            .all(|b| b["restorable"] == true)
    );

    // The dry run names the chain.
    let dry_dir = scratch.path().join("dry");
    let dry_map = format!("{oid}={}", scratch.path().join("dry_ts").display());
    let out = pitr(
        scratch.path(),
        &[
            "--repo",
            &url,
            "restore",
            "--target-dir",
            dry_dir.to_str().unwrap(),
            "--tablespace-map",
            &dry_map,
            "--latest",
            "--dry-run",
            "--owner",
            "postgres",
        ],
        &[],
    );
    let plan = String::from_utf8_lossy(&out.stdout).into_owned() + &stderr(&out);
    assert_eq!(code(&out), 0, "{plan}");
    assert!(
        plan.contains(&id(&diff)) && plan.contains(&id(&full)),
        "{plan}"
    );

    // Each link, restored to its own end, is the source as it was.
    for (name, b, want) in [("incr1", &incr1, &want1), ("incr2", &incr2, &want2)] {
        let r = restore(
            &scratch,
            &url,
            major,
            &bin,
            name,
            &["--immediate", "--backup", &id(b)],
        );
        same_dump(name, want, &r);
    }
    let r = restore(&scratch, &url, major, &bin, "latest", &["--latest"]);
    same_dump("latest", &want_latest, &r);
    assert_eq!(r.sql("SELECT count(*) FROM created WHERE g = -1"), "1");
    assert_eq!(r.sql("SELECT count(*) FROM truncated"), "100");
    assert_eq!(
        r.sql("SELECT count(*) FROM pg_database WHERE datname = 'db2'"),
        "1"
    );

    // verify reads every piece of the chain.
    let out = pitr(scratch.path(), &["--repo", &url, "verify"], &[]);
    assert_eq!(
        code(&out),
        0,
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        stderr(&out)
    );

    // A segment since the newest backup without its summary: nothing vouches for its changes,
    // so an incremental asked for is taken full and says why.
    let seg = incr2["stop_wal"].as_str().unwrap();
    let dir = repo_dir.join("wal").join(&seg[..8]);
    let mut removed = 0;
    for e in std::fs::read_dir(&dir).unwrap() {
        let p = e.unwrap().path();
        if p.file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with(&format!("{seg}.idx"))
        {
            std::fs::remove_file(p).unwrap();
            removed += 1;
        }
    }
    assert_eq!(removed, 1, "the summary of {seg} in {}", dir.display());
    let hole = backup(&scratch, &url, &c, "incr");
    assert_eq!(hole["type"], "full", "{hole}");
    let why = hole["fallback"].as_str().unwrap();
    assert!(
        why.contains(seg) && why.contains("no readable summary"),
        "{why}"
    );

    // A parent deleted by hand breaks the chain: info and verify name the link, restore refuses.
    std::fs::remove_file(
        repo_dir
            .join("backups")
            .join(id(&diff))
            .join("manifest.pitr"),
    )
    .unwrap();
    let out = pitr(scratch.path(), &["--repo", &url, "info", "--json"], &[]);
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let listed = info["backups"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["id"] == incr2["id"])
        .unwrap()
        .clone();
    assert_eq!(listed["restorable"], false, "{listed}");
    assert!(
        listed["not_restorable_because"]
            .as_str()
            .unwrap()
            .contains(&id(&diff)),
        "{listed}"
    );
    let out = pitr(scratch.path(), &["--repo", &url, "verify"], &[]);
    let report = String::from_utf8_lossy(&out.stdout).into_owned() + &stderr(&out);
    assert_eq!(code(&out), 1, "{report}");
    assert!(
        report.contains("CHAIN") || report.contains("chain"),
        "{report}"
    );
    let out = pitr(
        scratch.path(),
        &[
            "--repo",
            &url,
            "restore",
            "--target-dir",
            "/tmp/never",
            "--backup",
            &id(&incr2),
            "--latest",
            "--dry-run",
        ],
        &[],
    );
    assert_eq!(code(&out), 1, "{}", stderr(&out));

    eprintln!(
        "PG {major}: full {} MiB, incr {} MiB, diff {} MiB, incr {} MiB copied; each restored with pg_dump identical and pg_amcheck clean",
        full["size_bytes"].as_u64().unwrap() >> 20,
        incr1["size_bytes"].as_u64().unwrap() >> 20,
        diff["size_bytes"].as_u64().unwrap() >> 20,
        incr2["size_bytes"].as_u64().unwrap() >> 20,
    );
}

#[test]
fn pg15_incremental_chain() {
    chain(15);
}

#[test]
fn pg18_incremental_chain() {
    chain(18);
}
