//! `pitr backup --stream` against real PostgreSQL 15 and 18: a full backup over the replication
//! protocol, from the primary while pgbench writes (with a tablespace) and from a standby, into
//! the same repository format as a local backup; restored to the latest WAL, the cluster's pg_dump
//! equals the source's and pg_amcheck is clean.

use std::process::{Command, Stdio};
use std::time::Duration;

use crate::backup::{assert_same_dump, dump};
use crate::harness::{self, Cluster, Scratch, code, pitr, poll, stderr};

fn streamed_backup(major: u32, from_standby: bool) {
    let Some(bin) = harness::pg_bin(major) else {
        return;
    };
    let scratch = Scratch::new();
    let url = format!("file://{}", scratch.subdir("repo").display());
    // archive_timeout: the primary closes a segment every second it writes, so the WAL a
    // standby's backup ends in reaches the repository without waiting for a full segment.
    let c = Cluster::start(
        major,
        &bin,
        &format!("{{pitr}} --repo {url} archive-push %p"),
        "autovacuum = off\narchive_timeout = 1",
        &[],
    );
    let ts_dir = scratch.subdir("ts1");
    c.sql(&format!(
        "CREATE TABLESPACE ts1 LOCATION '{}'",
        ts_dir.display()
    ));
    let out = c.client("pgbench", &["-i", "-s", "2", "-q", "postgres"]);
    assert!(out.status.success(), "pgbench -i: {}", stderr(&out));
    c.sql("CREATE TABLE in_ts TABLESPACE ts1 AS SELECT g, md5(g::text) AS h FROM generate_series(1, 20000) g");
    let standby = from_standby.then(|| {
        let dir = scratch.path().join("standby");
        let ts_standby = scratch.subdir("ts1-standby");
        harness::run_ok(
            harness::as_postgres(&mut Command::new(bin.join("pg_basebackup")))
                .args([
                    "-h",
                    c.sock.to_str().unwrap(),
                    "-U",
                    "postgres",
                    "-X",
                    "stream",
                    "-R",
                    "-c",
                    "fast",
                ])
                .arg(format!(
                    "--tablespace-mapping={}={}",
                    ts_dir.display(),
                    ts_standby.display()
                ))
                .arg("-D")
                .arg(&dir),
        );
        let s = Cluster::existing(
            major,
            &bin,
            dir,
            Scratch::new(),
            "archive_mode = off\nhot_standby = on",
        );
        poll("the standby to stream", Duration::from_secs(60), || {
            (c.sql("SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming'") == "1")
                .then_some(())
        });
        s
    });
    let source = standby.as_ref().unwrap_or(&c);
    // Writes during the whole backup.
    let mut load = Command::new(bin.join("pgbench"))
        .arg("-h")
        .arg(&c.sock)
        .args(["-U", "postgres", "-c", "2", "-T", "5", "-n", "postgres"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let conninfo = format!("host={} user=postgres", source.sock.display());
    let out = pitr(
        scratch.path(),
        &[
            "--repo", &url, "backup", "--stream", "--dbname", &conninfo, "--jobs", "2", "--json",
        ],
        &[],
    );
    assert_eq!(code(&out), 0, "backup --stream: {}", stderr(&out));
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        load.wait().unwrap().success(),
        "pgbench during the backup failed"
    );
    c.sql("CREATE TABLE after_backup AS SELECT 42 AS answer");
    let want = dump(&c);
    let last = c.switch_wal();
    c.wait_archived(&last);
    let out = pitr(scratch.path(), &["--repo", &url, "verify"], &[]);
    assert_eq!(
        code(&out),
        0,
        "verify: {}{}",
        String::from_utf8_lossy(&out.stdout),
        stderr(&out)
    );
    let oid = c.sql("SELECT oid FROM pg_tablespace WHERE spcname = 'ts1'");
    let target = scratch.path().join("restored");
    let new_ts = scratch.path().join("ts1-restored");
    let out = harness::run(
        harness::as_postgres(&mut Command::new(scratch.pitr_copy()))
            .args([
                "--repo",
                &url,
                "restore",
                "--target-dir",
                target.to_str().unwrap(),
                "--latest",
            ])
            .arg(format!("--tablespace-map={oid}={}", new_ts.display()))
            .current_dir("/tmp"),
    );
    assert_eq!(code(&out), 0, "restore: {}", stderr(&out));
    let r = Cluster::existing(major, &bin, target, Scratch::new(), "archive_mode = off");
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while r.sql("SELECT pg_is_in_recovery()") != "f" {
        assert!(
            std::time::Instant::now() < deadline,
            "the restored cluster did not finish recovery:\n{}",
            r.server_log_tail()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(r.sql("SELECT answer FROM after_backup"), "42");
    assert_same_dump("the cluster restored from a streamed backup", &want, &r);
    let out = r.client(
        "pg_amcheck",
        &["--install-missing", "--heapallindexed", "-d", "postgres"],
    );
    assert!(
        out.status.success(),
        "pg_amcheck: {}{}",
        String::from_utf8_lossy(&out.stdout),
        stderr(&out)
    );
    eprintln!(
        "PG {major}: backup --stream from the {}: {} files, {} MiB in {:.1} s ({:.1} MiB/s); restored to the latest WAL: pg_dump identical, pg_amcheck clean",
        if from_standby { "standby" } else { "primary" },
        summary["files"],
        summary["size_bytes"].as_u64().unwrap_or(0) >> 20,
        summary["duration_seconds"].as_f64().unwrap_or(0.0),
        summary["throughput_mib_per_second"].as_f64().unwrap_or(0.0),
    );
}

#[test]
fn pg15_streamed_backup_from_the_primary() {
    streamed_backup(15, false);
}

#[test]
fn pg18_streamed_backup_from_the_primary() {
    streamed_backup(18, false);
}

#[test]
fn pg18_streamed_backup_from_a_standby() {
    streamed_backup(18, true);
}

#[test]
fn pg15_streamed_backup_from_a_standby() {
    streamed_backup(15, true);
}
