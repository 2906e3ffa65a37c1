//! `pitr restore` and `pitr replica` against real PostgreSQL 15 and 18: every kind of target brings
//! back exactly the right rows; targets outside the window are refused before anything is written;
//! timelines are followed (or not) as the planner says; a replica catches up and streams.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use crate::harness::{self, Cluster, Scratch, as_postgres, code, poll, run, stderr};

/// A committed marker row: its id, commit time (RFC 3339 UTC), xid and the WAL position after it.
struct Mark {
    time: String,
    xid: String,
    lsn_after: String,
}

fn mark(c: &Cluster, id: i32) -> Mark {
    c.sql(&format!("INSERT INTO marks VALUES ({id})"));
    let row = c.sql(&format!(
        "SELECT to_char(pg_xact_commit_timestamp(xmin) AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS.US'), xmin, pg_current_wal_lsn() FROM marks WHERE id = {id}"
    ));
    let f: Vec<&str> = row.split('|').collect();
    Mark {
        time: f[0].to_string(),
        xid: f[1].to_string(),
        lsn_after: f[2].to_string(),
    }
}

/// Run `pitr restore …` as the postgres user (as an operator would), with the server-executable copy.
fn pitr_as_postgres(scratch: &Scratch, args: &[&str]) -> Output {
    let bin = scratch.pitr_copy();
    run(as_postgres(&mut Command::new(bin))
        .args(args)
        .current_dir("/tmp"))
}

fn rows(c: &Cluster) -> String {
    c.sql("SELECT coalesce(string_agg(id::text, ',' ORDER BY id), '') FROM marks")
}

struct Setup {
    scratch: Scratch,
    url: String,
    source: Cluster,
    marks: Vec<Mark>,
    bin: PathBuf,
    major: u32,
}

/// A cluster with row 1 before a backup and rows 2..=6 after it (restore point after row 4).
fn setup(major: u32) -> Option<Setup> {
    let bin = harness::pg_bin(major)?;
    let scratch = Scratch::new();
    let url = format!("file://{}", scratch.subdir("repo").display());
    let source = Cluster::start(
        major,
        &bin,
        &format!("{{pitr}} --repo {url} archive-push %p"),
        "track_commit_timestamp = on\nautovacuum = off",
        &[],
    );
    source.sql("CREATE TABLE marks(id int primary key)");
    mark(&source, 1);
    let out = harness::pitr_backup(scratch.path(), &url, &source, &["-q"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let mut marks = vec![];
    for id in 2..=6 {
        marks.push(mark(&source, id));
        if id == 4 {
            source.sql("SELECT pg_create_restore_point('after_4')");
        }
    }
    let last = source.switch_wal();
    source.wait_archived(&last);
    Some(Setup {
        scratch,
        url,
        source,
        marks,
        bin,
        major,
    })
}

impl Setup {
    fn mark(&self, id: usize) -> &Mark {
        &self.marks[id - 2]
    }

    /// Restore with `args`, start with promotion at the target, return the rows.
    fn restore_rows(&self, name: &str, args: &[&str]) -> String {
        let dir = self.scratch.path().join(name);
        let mut all = vec![
            "--repo",
            self.url.as_str(),
            "restore",
            "--target-dir",
            dir.to_str().unwrap(),
            "--action",
            "promote",
        ];
        all.extend_from_slice(args);
        let out = pitr_as_postgres(&self.scratch, &all);
        assert_eq!(
            code(&out),
            0,
            "restore {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            stderr(&out)
        );
        let c = Cluster::existing(
            self.major,
            &self.bin,
            dir,
            Scratch::new(),
            "archive_mode = off",
        );
        c.wait_promoted();
        rows(&c)
    }

    fn refused(&self, name: &str, args: &[&str]) -> String {
        self.refused_with(name, args, 1)
    }

    /// Refused with exit code `want` (1: cannot be done; 2: bad usage), nothing written.
    fn refused_with(&self, name: &str, args: &[&str], want: i32) -> String {
        let dir = self.scratch.path().join(name);
        let mut all = vec![
            "--repo",
            self.url.as_str(),
            "restore",
            "--target-dir",
            dir.to_str().unwrap(),
        ];
        all.extend_from_slice(args);
        let out = pitr_as_postgres(&self.scratch, &all);
        assert_eq!(
            code(&out),
            want,
            "{args:?} must be refused: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        assert!(!dir.exists(), "{args:?}: the target directory was created");
        stderr(&out)
    }
}

fn restore_targets(major: u32) {
    let Some(s) = setup(major) else { return };
    let t3 = s.mark(3).time.clone();
    assert_eq!(s.restore_rows("time", &["--to", &t3]), "1,2,3");
    assert_eq!(
        s.restore_rows("time_excl", &["--to", &t3, "--exclusive"]),
        "1,2"
    );
    assert_eq!(s.restore_rows("name", &["--name", "after_4"]), "1,2,3,4");
    assert_eq!(
        s.restore_rows("xid", &["--xid", &s.mark(5).xid]),
        "1,2,3,4,5"
    );
    assert_eq!(
        s.restore_rows("xid_excl", &["--xid", &s.mark(5).xid, "--exclusive"]),
        "1,2,3,4"
    );
    assert_eq!(
        s.restore_rows("lsn", &["--lsn", &s.mark(2).lsn_after]),
        "1,2"
    );
    assert_eq!(s.restore_rows("immediate", &["--immediate"]), "1");
    assert_eq!(s.restore_rows("latest", &["--latest"]), "1,2,3,4,5,6");
    // An offset in --to is honoured: the same instant written in +02:00.
    let utc = pitr::restore::target::parse_time(&t3).unwrap();
    let two_hours = 2 * 3600 * 1_000_000;
    let shifted = pitr::pg::PgTimestamp(utc.0 + two_hours)
        .rfc3339()
        .replace('Z', "+02:00");
    assert_eq!(s.restore_rows("time_offset", &["--to", &shifted]), "1,2,3");

    // Refusals: one line with the window, nothing written.
    let err = s.refused("early", &["--to", "2000-01-01 00:00"]);
    assert!(
        err.contains("before the end of the oldest usable backup")
            && err.contains("recoverable window"),
        "{err}"
    );
    let err = s.refused("late", &["--to", "2999-01-01 00:00"]);
    assert!(
        err.contains("after the latest archived commit")
            && err.contains("use --latest")
            && err.contains("recoverable window"),
        "{err}"
    );
    let err = s.refused("noname", &["--name", "no_such_point"]);
    assert!(
        err.contains("no_such_point") && err.contains("after_4"),
        "{err}"
    );
    // Bad values are bad usage (exit 2), in one line, never a panic.
    let err = s.refused_with("badtime", &["--to", "next tuesday"], 2);
    assert!(err.contains("not a time"), "{err}");
    let err = s.refused_with("nonascii", &["--to", "2024-05-0é 10:00"], 2);
    assert!(err.contains("not a time"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    // A non-empty target directory is refused and left as it was.
    let busy = s.scratch.subdir("busy");
    std::fs::write(busy.join("keep.txt"), b"precious").unwrap();
    let out = pitr_as_postgres(
        &s.scratch,
        &[
            "--repo",
            &s.url,
            "restore",
            "--target-dir",
            busy.to_str().unwrap(),
            "--latest",
        ],
    );
    assert_eq!(code(&out), 1);
    assert!(stderr(&out).contains("not empty"), "{}", stderr(&out));
    assert_eq!(std::fs::read_dir(&busy).unwrap().count(), 1);
    assert_eq!(std::fs::read(busy.join("keep.txt")).unwrap(), b"precious");
    // Item 7: a dry run refuses what the restore refuses.
    let out = pitr_as_postgres(
        &s.scratch,
        &[
            "--repo",
            &s.url,
            "restore",
            "--target-dir",
            busy.to_str().unwrap(),
            "--latest",
            "--dry-run",
        ],
    );
    assert_eq!(code(&out), 1, "{}", stderr(&out));
    assert!(stderr(&out).contains("not empty"), "{}", stderr(&out));
    // --dry-run prints the plan and writes nothing.
    let dry = s.scratch.path().join("dry");
    let out = pitr_as_postgres(
        &s.scratch,
        &[
            "--repo",
            &s.url,
            "restore",
            "--target-dir",
            dry.to_str().unwrap(),
            "--to",
            &t3,
            "--dry-run",
        ],
    );
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let plan = String::from_utf8_lossy(&out.stdout);
    assert!(
        plan.contains("backup")
            && plan.contains("timeline     1")
            && plan.contains("segment(s) to replay"),
        "{plan}"
    );
    assert!(!dry.exists());

    // A11: a restore that fails half-way removes what it wrote, so the same command works again;
    // a corrupt backup_label is found before any file is written.
    let repo_dir = PathBuf::from(s.url.trim_start_matches("file://"));
    let backup_dir = harness::first_backup_dir(&repo_dir);
    // The control file's piece (in a bundle, with the other small files), then the label.
    harness::flip_piece(&backup_dir, "global/pg_control");
    let err = s.refused("half", &["--latest"]);
    assert!(
        err.contains("corrupt") && err.contains("global/pg_control"),
        "{err}"
    );
    harness::flip_piece(&backup_dir, "global/pg_control");
    let label = backup_dir.join("backup_label.pitr");
    harness::flip_last_byte(&label);
    let err = s.refused("half", &["--latest"]);
    assert!(err.contains("corrupt"), "{err}");
    harness::flip_last_byte(&label);
    assert_eq!(s.restore_rows("again", &["--latest"]), "1,2,3,4,5,6");
    eprintln!(
        "PG {major}: --to, --to --exclusive, --name, --xid, --xid --exclusive, --lsn, --immediate, --latest, offsets: exact rows; refusals clean"
    );
}

#[test]
fn pg15_restore_targets() {
    restore_targets(15);
}

#[test]
fn pg18_restore_targets() {
    restore_targets(18);
}

/// Promote a restore into the same repository (timeline 2) while the old primary goes on (timeline
/// 1): --latest follows timeline 2, a time on timeline 2 is reached, and a restore point made on
/// timeline 1 after the fork is reached on timeline 1 without naming it.
#[test]
fn timelines_are_followed() {
    let Some(s) = setup(15) else { return };
    // Fork: restore to row 3 and promote, archiving into the same repository.
    let dir = s.scratch.path().join("tl2");
    let out = pitr_as_postgres(
        &s.scratch,
        &[
            "--repo",
            &s.url,
            "restore",
            "--target-dir",
            dir.to_str().unwrap(),
            "--to",
            &s.mark(3).time,
            "--action",
            "promote",
        ],
    );
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let tl2 = Cluster::existing(15, &s.bin, dir, Scratch::new(), "");
    tl2.wait_promoted();
    assert_eq!(
        tl2.sql("SELECT timeline_id FROM pg_control_checkpoint()"),
        "2"
    );
    tl2.sql("INSERT INTO marks VALUES (20)");
    let t20 = tl2.sql("SELECT to_char(pg_xact_commit_timestamp(xmin) AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS.US') FROM marks WHERE id = 20");
    tl2.sql("INSERT INTO marks VALUES (21)");
    let last2 = tl2.switch_wal();
    tl2.wait_archived(&last2);
    // The old primary goes on on timeline 1.
    s.source.sql("INSERT INTO marks VALUES (7)");
    s.source
        .sql("SELECT pg_create_restore_point('tl1_after_fork')");
    s.source.sql("INSERT INTO marks VALUES (8)");
    let last1 = s.source.switch_wal();
    s.source.wait_archived(&last1);

    let info: serde_json::Value = serde_json::from_slice(
        &harness::pitr(s.scratch.path(), &["--repo", &s.url, "info", "--json"], &[]).stdout,
    )
    .unwrap();
    // Item 2: the copy promoted on timeline 2 stopped archiving while the old primary went on on
    // timeline 1: two live branches, and the one that went on later is the live end.
    assert_eq!(info["window"]["latest_timeline"], 1, "{info:#}");
    assert_eq!(info["timelines"][1]["parent"], 1);
    assert_eq!(
        (&info["timelines"][0]["live"], &info["timelines"][1]["live"]),
        (&serde_json::json!(true), &serde_json::json!(true)),
        "{info:#}"
    );
    assert_eq!(
        info["timelines"][1]["window"]["latest_timeline"], 2,
        "{info:#}"
    );
    let (rc, report) = {
        let out = harness::pitr(
            s.scratch.path(),
            &["--repo", &s.url, "verify", "--json"],
            &[],
        );
        (
            code(&out),
            serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap(),
        )
    };
    assert_eq!(rc, 1, "{report:#}");
    assert!(
        report["findings"]
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f["kind"] == "branch"),
        "{report:#}"
    );

    // Which end is "latest" is the user's call: refused with both, --timeline chooses.
    let err = s.refused("latest", &["--latest"]);
    assert!(
        err.contains("diverging timelines") && err.contains("timeline 1 (latest commit"),
        "{err}"
    );
    assert_eq!(
        s.restore_rows("latest_tl1", &["--latest", "--timeline", "1"]),
        "1,2,3,4,5,6,7,8"
    );
    assert_eq!(
        s.restore_rows("latest_tl2", &["--latest", "--timeline", "2"]),
        "1,2,3,20,21"
    );
    // A time after the fork lies on both branches: refused with both, until --timeline chooses.
    let err = s.refused("ambiguous", &["--to", &t20]);
    assert!(
        err.contains("diverging timelines") && err.contains("--timeline"),
        "{err}"
    );
    assert_eq!(
        s.restore_rows("on_tl2", &["--to", &t20, "--timeline", "2"]),
        "1,2,3,20"
    );
    let plan = pitr_as_postgres(
        &s.scratch,
        &[
            "--repo",
            &s.url,
            "restore",
            "--target-dir",
            "/tmp/never",
            "--name",
            "tl1_after_fork",
            "--dry-run",
        ],
    );
    let plan_text = String::from_utf8_lossy(&plan.stdout);
    assert!(
        plan_text.contains("recovery_target_timeline = '1'"),
        "{plan_text}"
    );
    assert_eq!(
        s.restore_rows("on_tl1", &["--name", "tl1_after_fork"]),
        "1,2,3,4,5,6,7"
    );
}

/// A replica bootstrapped from the archive catches up, then streams from its primary.
#[test]
fn replica_streams_from_its_primary() {
    let Some(s) = setup(15) else { return };
    let dir = s.scratch.path().join("standby");
    let conninfo = format!(
        "host={} user=postgres application_name=pitr_standby",
        s.source.sock.display()
    );
    // A slot the primary does not have is refused before anything is written; --create-slot
    // creates it.
    let replica = |extra: &[&str]| {
        let mut args = vec![
            "--repo",
            &s.url,
            "replica",
            "--target-dir",
            dir.to_str().unwrap(),
            "--primary-conninfo",
            &conninfo,
        ];
        args.extend_from_slice(extra);
        pitr_as_postgres(&s.scratch, &args)
    };
    let out = replica(&["--slot", "pitr_standby"]);
    assert_eq!(code(&out), 1, "{}", stderr(&out));
    assert!(stderr(&out).contains("--create-slot"), "{}", stderr(&out));
    assert!(!dir.exists());
    let out = replica(&["--slot", "pitr_standby", "--create-slot"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(
        s.source
            .sql("SELECT slot_type FROM pg_replication_slots WHERE slot_name = 'pitr_standby'"),
        "physical"
    );
    assert!(dir.join("standby.signal").exists());
    let standby = Cluster::existing(15, &s.bin, dir, Scratch::new(), "");
    poll("the standby to stream", Duration::from_secs(60), || {
        (s.source
            .sql("SELECT state FROM pg_stat_replication WHERE application_name = 'pitr_standby'")
            == "streaming")
            .then_some(())
    });
    s.source.sql("INSERT INTO marks VALUES (100)");
    poll("row 100 on the standby", Duration::from_secs(30), || {
        (rows(&standby).ends_with("6,100")).then_some(())
    });
    assert_eq!(standby.sql("SELECT pg_is_in_recovery()"), "t");
    assert_eq!(
        s.source
            .sql("SELECT active FROM pg_replication_slots WHERE slot_name = 'pitr_standby'"),
        "t"
    );
    let _ = Path::new("");
}

/// Replay of more than 64 segments from an S3 server behind 50 ms of latency per request, with and
/// without archive-get's prefetch. Both must reach the same rows; the times are reported.
#[test]
fn prefetch_replay_through_a_slow_store() {
    let Some(bucket) = harness::s3_bucket() else {
        return;
    };
    let Some(bin) = harness::pg_bin(15) else {
        return;
    };
    let scratch = Scratch::new();
    let url = format!("s3://{bucket}/prefetch-{}", std::process::id());
    let c = Cluster::start_initdb(
        15,
        &bin,
        &format!("{{pitr}} --repo {url} archive-push %p"),
        "autovacuum = off",
        &[],
        &["--wal-segsize=1"],
    );
    c.sql("CREATE TABLE marks(id int primary key)");
    let out = harness::pitr_backup(scratch.path(), &url, &c, &["-q"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    for i in 0..8 {
        c.sql("SELECT count(pg_logical_emit_message(false, 'fill', repeat(md5(g::text), 3000))) FROM generate_series(1, 100) g");
        c.sql(&format!("INSERT INTO marks VALUES ({i})"));
    }
    let last = c.switch_wal();
    c.wait_archived(&last);
    let segments = u64::from_str_radix(&last[16..], 16).unwrap() - 1;
    assert!(segments >= 64, "only {segments} segments of WAL");

    // The proxy in front of the S3 server.
    let proxy = harness::LatencyProxy::start(50);
    let slow = proxy.endpoint.clone();

    let mut times = vec![];
    for (name, prefetch) in [("without", "0"), ("with", "8")] {
        let dir = scratch.path().join(format!("replay-{name}"));
        let out = pitr_as_postgres(
            &scratch,
            &[
                "--repo",
                &url,
                "restore",
                "--target-dir",
                dir.to_str().unwrap(),
                "--latest",
            ],
        );
        assert_eq!(code(&out), 0, "{}", stderr(&out));
        let started = std::time::Instant::now();
        let r = Cluster::existing_env(
            15,
            &bin,
            dir,
            Scratch::new(),
            "archive_mode = off",
            &[
                ("AWS_ENDPOINT_URL", slow.as_str()),
                ("PITR_PREFETCH", prefetch),
            ],
        );
        r.wait_promoted();
        times.push(started.elapsed().as_secs_f64());
        assert_eq!(rows(&r), "0,1,2,3,4,5,6,7");
        let spool = r.data.join("pg_wal/pitr_spool");
        if spool.exists() {
            let left: Vec<String> = std::fs::read_dir(&spool)
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            panic!(
                "{name}: the spool must be gone after promotion, holds {left:?}; log:\n{}",
                r.server_log_tail()
            );
        }
    }
    drop(proxy);
    eprintln!(
        "replay of {segments} segments (1 MiB) through 50 ms/request: {:.1} s without prefetch, {:.1} s with prefetch (8 ahead)",
        times[0], times[1]
    );
}
