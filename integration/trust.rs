//! `pitr verify`, `pitr check` and `pitr metrics` on a real repository: a sound repository passes,
//! and each kind of damage (a flipped byte in a WAL object, a backup file, a manifest; a deleted
//! segment in the middle; a deleted backup file) is found, named, and fails verify.

use std::path::{Path, PathBuf};

use crate::harness::{self, Cluster, Scratch, code, flip_last_byte, pitr, stderr};

fn verify(url: &str, cwd: &Path) -> (i32, serde_json::Value) {
    let out = pitr(cwd, &["--repo", url, "verify", "--json"], &[]);
    (
        code(&out),
        serde_json::from_slice(&out.stdout).unwrap_or_else(|_| panic!("{}", stderr(&out))),
    )
}

fn named(report: &serde_json::Value, kind: &str, object: &str) -> bool {
    report["findings"]
        .as_array()
        .unwrap()
        .iter()
        .any(|f| f["kind"] == kind && f["object"].as_str().unwrap().contains(object))
}

#[test]
fn verify_check_and_metrics() {
    let Some(bin) = harness::pg_bin(15) else {
        return;
    };
    let (scratch, repo_dir, url, c) = harness::archiving_cluster(15, &bin, "");
    let conninfo = format!("host={} user=postgres", c.sock.display());

    // check: a configured cluster passes.
    let out = pitr(
        scratch.path(),
        &["--repo", &url, "check", "--dbname", &conninfo],
        &[],
    );
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("reached the repository"));

    // Large enough (3.5 MiB) to be stored in pieces of its own; the rest goes into bundles.
    c.sql("CREATE TABLE t AS SELECT g FROM generate_series(1, 100000) g");
    let t_path = c.sql("SELECT pg_relation_filepath('t')");
    for _ in 0..3 {
        let out = harness::pitr_backup(scratch.path(), &url, &c, &["-q"]);
        assert_eq!(code(&out), 0, "{}", stderr(&out));
    }
    for i in 0..4 {
        c.sql(&format!("INSERT INTO t VALUES ({i})"));
        c.switch_wal();
    }
    let last = c.switch_wal();
    c.wait_archived(&last);

    let (rc, clean) = verify(&url, scratch.path());
    assert_eq!(rc, 0, "{clean:#}");
    assert_eq!(clean["findings"], serde_json::json!([]));
    let metrics =
        String::from_utf8_lossy(&pitr(scratch.path(), &["--repo", &url, "metrics"], &[]).stdout)
            .into_owned();
    for want in [
        "pitr_backups 3",
        "pitr_rpo_exposure_seconds ",
        "pitr_verify_last_findings 0",
        "pitr_archived_segments{timeline=\"1\"}",
    ] {
        assert!(metrics.contains(want), "{want} missing from:\n{metrics}");
    }
    // Item 12: exposure is measured from what is archived (the newest segment's arrival, which is
    // after the last commit it holds), not from the last commit.
    let value = |name: &str| -> f64 {
        metrics
            .lines()
            .find(|l| l.starts_with(name) && !l.starts_with('#'))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{name} missing from:\n{metrics}"))
    };
    assert!(
        value("pitr_archive_last_segment_timestamp_seconds")
            >= value("pitr_last_commit_timestamp_seconds"),
        "{metrics}"
    );
    assert!(value("pitr_rpo_exposure_seconds") >= 0.0, "{metrics}");

    // check: archive_command pointing elsewhere fails with a hint.
    c.sql("ALTER SYSTEM SET archive_command = '/bin/true'");
    c.sql("SELECT pg_reload_conf()");
    let out = pitr(
        scratch.path(),
        &["--repo", &url, "check", "--dbname", &conninfo],
        &[],
    );
    assert_eq!(code(&out), 1);
    assert!(
        stderr(&out).contains("does not archive into") && stderr(&out).contains("archive-push %p"),
        "{}",
        stderr(&out)
    );

    // Damage.
    let rel = |p: &Path| {
        p.strip_prefix(&repo_dir)
            .unwrap()
            .to_string_lossy()
            .into_owned()
    };
    let ids: Vec<String> = {
        let mut v: Vec<String> = std::fs::read_dir(repo_dir.join("backups"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    };
    let mut segs: Vec<PathBuf> = std::fs::read_dir(repo_dir.join("wal/00000001"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "pitr"))
        .collect();
    segs.sort();
    let flipped_wal = segs[segs.len() - 2].clone();
    let deleted_wal = segs[segs.len() - 3].clone();
    flip_last_byte(&flipped_wal);
    std::fs::remove_file(&deleted_wal).unwrap();
    flip_last_byte(&repo_dir.join("backups").join(&ids[0]).join("manifest.pitr"));
    // The small files are in bundles. In the second backup, a byte of PG_VERSION's piece is
    // flipped inside its bundle and t's first piece (an object of its own) is deleted; in the
    // third, the bundle holding global/1262 is deleted.
    let second = repo_dir.join("backups").join(&ids[1]);
    harness::flip_piece(&second, "PG_VERSION");
    let (flipped_bundle, _) = harness::piece_location(&second, "PG_VERSION");
    assert!(
        rel(&flipped_bundle).contains("/bundle/"),
        "{}",
        flipped_bundle.display()
    );
    let (deleted_file, _) = harness::piece_location(&second, &t_path);
    assert!(
        rel(&deleted_file).contains("/data/"),
        "{}",
        deleted_file.display()
    );
    std::fs::remove_file(&deleted_file).unwrap();
    let (deleted_bundle, _) =
        harness::piece_location(&repo_dir.join("backups").join(&ids[2]), "global/1262");
    std::fs::remove_file(&deleted_bundle).unwrap();

    let (rc, report) = verify(&url, scratch.path());
    assert_eq!(rc, 1);
    assert!(
        named(&report, "corrupt", &rel(&flipped_wal)),
        "flipped WAL object not named: {report:#}"
    );
    // The newest segments are not rolled up yet, and a segment carries its own summary: one
    // deleted there is a gap that names it (in a rolled chunk it is "missing" too, see
    // `scale::pg15_rollups_in_a_real_repository`).
    let deleted_name = deleted_wal
        .file_stem()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    assert!(
        report["findings"]
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f["kind"] == "gap" && f["detail"].as_str().unwrap().contains(&deleted_name)),
        "deleted segment not named: {report:#}"
    );
    assert!(
        named(&report, "gap", "timeline 1"),
        "gap not reported: {report:#}"
    );
    assert!(
        named(
            &report,
            "corrupt",
            &format!("backups/{}/manifest.pitr", ids[0])
        ),
        "flipped manifest not named: {report:#}"
    );
    assert!(
        named(
            &report,
            "corrupt",
            &format!("{} (PG_VERSION", rel(&flipped_bundle))
        ),
        "flipped piece in a bundle not named: {report:#}"
    );
    assert!(
        named(&report, "missing", &rel(&deleted_file)),
        "deleted backup file not named: {report:#}"
    );
    assert!(
        named(&report, "missing", &rel(&deleted_bundle)),
        "deleted bundle not named: {report:#}"
    );
    let human = pitr(scratch.path(), &["--repo", &url, "verify"], &[]);
    assert_eq!(code(&human), 1);
    let text = String::from_utf8_lossy(&human.stdout);
    assert!(text.contains("problem(s)"), "{text}");
    eprintln!("{text}");
    let metrics =
        String::from_utf8_lossy(&pitr(scratch.path(), &["--repo", &url, "metrics"], &[]).stdout)
            .into_owned();
    assert!(
        !metrics.contains("pitr_verify_last_findings 0"),
        "{metrics}"
    );
    eprintln!(
        "verify findings on the damaged repository: {}",
        report["findings"].as_array().unwrap().len()
    );
}

fn drill(major: u32) {
    let Some(bin) = harness::pg_bin(major) else {
        return;
    };
    let (scratch, repo_dir, url, c) = harness::archiving_cluster(major, &bin, "");
    c.sql("CREATE TABLE t AS SELECT g FROM generate_series(1, 5000) g");
    // The backup carries a port of its own (in postgresql.auto.conf, for the next restart): the
    // drill must not look for its scratch server there.
    c.sql("ALTER SYSTEM SET port = 5499");
    let out = harness::pitr_backup(scratch.path(), &url, &c, &["-q"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    for i in 0..3 {
        c.sql(&format!("INSERT INTO t VALUES ({})", 10_000 + i));
        c.switch_wal();
    }
    let last = c.switch_wal();
    c.wait_archived(&last);
    let bin_s = bin.to_string_lossy().into_owned();
    let run = |sql: &str| -> (i32, serde_json::Value) {
        let f = scratch.path().join("assert.sql");
        std::fs::write(&f, sql).unwrap();
        let out = pitr(
            scratch.path(),
            &[
                "--repo",
                &url,
                "drill",
                "--sql",
                f.to_str().unwrap(),
                "--pg-bin",
                &bin_s,
                "--json",
                "--timeout",
                "5m",
            ],
            &[],
        );
        let report = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|_| serde_json::json!({"error": stderr(&out)}));
        (code(&out), report)
    };
    let (rc, report) = run("SELECT count(*) = 5003 FROM t;\nSELECT max(g) = 10002 FROM t;");
    assert_eq!(rc, 0, "{report:#}");
    assert_eq!(report["ok"], true);
    assert!(
        report["checks"]
            .as_array()
            .unwrap()
            .iter()
            .all(|c| c["ok"] == true),
        "{report:#}"
    );
    assert!(report["rto_seconds"].as_f64().unwrap() > 0.0);
    // Item 12: RFC 3339 like every other time, and seconds to the millisecond.
    let reached = report["reached"].as_str().unwrap_or_default();
    assert!(
        reached.contains('T')
            && reached.ends_with('Z')
            && pitr::restore::target::parse_time(reached).is_ok(),
        "{report:#}"
    );
    let rto = report["rto_seconds"].as_f64().unwrap();
    assert_eq!((rto * 1000.0).round() / 1000.0, rto);
    // An assertion file without a statement is refused before anything is restored.
    let (rc_empty, empty) = run("-- nothing here\n");
    assert_eq!(rc_empty, 1, "{empty:#}");
    assert!(
        empty["error"]
            .as_str()
            .unwrap_or_default()
            .contains("holds no statement"),
        "{empty:#}"
    );
    eprintln!(
        "PG {major} drill: RTO {:.1} s (restore {:.1} s + recovery {:.1} s), checks {}",
        report["rto_seconds"].as_f64().unwrap(),
        report["restore_seconds"].as_f64().unwrap(),
        report["recovery_seconds"].as_f64().unwrap(),
        report["checks"].as_array().unwrap().len()
    );

    // A10: however a drill ends (a restore that fails, SIGTERM while its server runs), it leaves
    // no server running and no scratch directory behind.
    let tmp = scratch.subdir("drill-tmp");
    let leftovers = || std::fs::read_dir(&tmp).unwrap().count();
    let drill_cmd = || {
        let mut cmd = std::process::Command::new(harness::PITR);
        cmd.args([
            "--repo",
            &url,
            "drill",
            "--pg-bin",
            &bin_s,
            "--timeout",
            "5m",
        ])
        .current_dir(scratch.path())
        .env("TMPDIR", &tmp);
        cmd
    };
    let backup_dir = harness::first_backup_dir(&repo_dir);
    harness::flip_piece(&backup_dir, "global/pg_control");
    let out = drill_cmd().output().unwrap();
    assert_eq!(code(&out), 1, "{}", stderr(&out));
    assert_eq!(
        leftovers(),
        0,
        "a drill whose restore failed left its scratch directory"
    );
    harness::flip_piece(&backup_dir, "global/pg_control");
    // An assertion that takes its time, so the signal finds the drill talking to its server.
    let slow = scratch.path().join("slow.sql");
    std::fs::write(&slow, "SELECT count(*) >= 0 FROM pg_sleep(600);").unwrap();
    harness::chown_postgres(&slow);
    let child = drill_cmd()
        .args(["--sql", slow.to_str().unwrap()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let pidfile = harness::poll(
        "the drill to run its slow assertion",
        std::time::Duration::from_secs(120),
        || {
            let dir = std::fs::read_dir(&tmp).ok()?.next()?.ok()?.path();
            let out = harness::as_postgres(&mut std::process::Command::new(bin.join("psql")))
                .args(["-X", "-A", "-t", "-U", "postgres", "-p", "5432", "-h"])
                .arg(dir.join("sock"))
                .args([
                    "-c",
                    "SELECT count(*) FROM pg_stat_activity WHERE query LIKE '%pg_sleep(600)%' AND pid <> pg_backend_pid()",
                ])
                .current_dir("/")
                .output()
                .ok()?;
            (String::from_utf8_lossy(&out.stdout).trim() == "1")
                .then(|| dir.join("data/postmaster.pid"))
        },
    );
    let postmaster: i32 = std::fs::read_to_string(&pidfile)
        .unwrap()
        .lines()
        .next()
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    // SAFETY: kill with a pid we spawned and have not reaped.
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    let out = child.wait_with_output().unwrap();
    assert_eq!(code(&out), 1, "{}", stderr(&out));
    assert_eq!(leftovers(), 0, "SIGTERM left the drill's scratch directory");
    // Gone, or a zombie nobody reaped yet (a container's init may not).
    let alive = std::fs::read_to_string(format!("/proc/{postmaster}/status")).is_ok_and(|st| {
        !st.lines()
            .any(|l| l.starts_with("State:") && l.contains('Z'))
    });
    assert!(
        !alive,
        "SIGTERM left the drill's scratch server (pid {postmaster}) running"
    );

    let (rc, report) = run("SELECT count(*) = 999 FROM t;");
    assert_eq!(rc, 1);
    let failed: Vec<&serde_json::Value> = report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["ok"] == false)
        .collect();
    assert_eq!(failed.len(), 1, "{report:#}");
    assert!(
        failed[0]["name"]
            .as_str()
            .unwrap()
            .contains("count(*) = 999")
    );

    // A segment missing after the backup: the drill fails and says which.
    let mut segs: Vec<PathBuf> = std::fs::read_dir(repo_dir.join("wal/00000001"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "pitr"))
        .collect();
    segs.sort();
    std::fs::remove_file(&segs[segs.len() - 2]).unwrap();
    let (rc, report) = run("SELECT true;");
    assert_eq!(rc, 1, "{report:#}");
    let gap = report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "WAL contiguous after the backup")
        .unwrap();
    assert_eq!(gap["ok"], false);
    assert!(
        gap["detail"].as_str().unwrap().contains("missing WAL"),
        "{gap}"
    );

    // A2: restore --latest over that gap would promote at it and drop the segment after it:
    // refused, naming the gap, nothing written; --stop-at-gap is the explicit way to accept it.
    let target = scratch.path().join("latest-over-gap");
    let target_s = target.to_string_lossy().into_owned();
    let out = pitr(
        scratch.path(),
        &[
            "--repo",
            &url,
            "restore",
            "--target-dir",
            &target_s,
            "--latest",
        ],
        &[],
    );
    assert_eq!(code(&out), 1, "{}", stderr(&out));
    let missing = segs[segs.len() - 2]
        .file_name()
        .unwrap()
        .to_string_lossy()
        .trim_end_matches(".pitr")
        .to_string();
    assert!(
        stderr(&out).contains("has a gap after") && stderr(&out).contains("--stop-at-gap"),
        "{}",
        stderr(&out)
    );
    assert!(!stderr(&out).contains(&format!("(next archived: {missing})")));
    assert!(!target.exists(), "a refused restore wrote {target_s}");
    let mut args = vec![
        "--repo",
        &url,
        "restore",
        "--target-dir",
        &target_s,
        "--latest",
        "--stop-at-gap",
        "--dry-run",
    ];
    let as_root = !harness::owner_args().is_empty();
    if as_root {
        // Item 11: as root, without --owner, the restore would leave a data directory PostgreSQL
        // refuses to start from: refused, even as a dry run.
        let out = pitr(scratch.path(), &args, &[]);
        assert_eq!(code(&out), 2, "{}", stderr(&out));
        assert!(
            stderr(&out).contains("--owner postgres"),
            "{}",
            stderr(&out)
        );
    }
    args.extend(harness::owner_args());
    let out = pitr(scratch.path(), &args, &[]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
}

#[test]
fn pg15_drill() {
    drill(15);
}

#[test]
fn pg18_drill() {
    drill(18);
}

/// Expire on a real repository: refuses too many deletions without --force, a dry run deletes
/// nothing, and afterwards info shows the promised window and a restore to its earliest point works.
#[test]
fn expire_keeps_the_window() {
    let Some(bin) = harness::pg_bin(15) else {
        return;
    };
    let (scratch, repo_dir, url, c) = harness::archiving_cluster(15, &bin, "");
    c.sql("CREATE TABLE t(id int)");
    for i in 1..=3 {
        c.sql(&format!("INSERT INTO t VALUES ({i})"));
        c.switch_wal();
        let out = harness::pitr_backup(scratch.path(), &url, &c, &["-q"]);
        assert_eq!(code(&out), 0, "{}", stderr(&out));
    }
    c.sql("INSERT INTO t VALUES (4)");
    let last = c.switch_wal();
    c.wait_archived(&last);
    let info = |cwd: &Path| -> serde_json::Value {
        serde_json::from_slice(&pitr(cwd, &["--repo", &url, "info", "--json"], &[]).stdout).unwrap()
    };
    let before = info(scratch.path());
    assert_eq!(before["backups"].as_array().unwrap().len(), 3);
    // A staging file left by a killed push two hours ago, and one of a push in progress.
    let wal_dir = repo_dir.join("wal/00000001");
    let stale = wal_dir.join("000000010000000000000001#4242000");
    let live = wal_dir.join("000000010000000000000001#4243000");
    std::fs::File::create(&stale)
        .unwrap()
        .set_modified(std::time::SystemTime::now() - std::time::Duration::from_secs(7200))
        .unwrap();
    std::fs::File::create(&live).unwrap();
    let objects = || walkdir_count(&repo_dir);
    let n_before = objects();

    let out = pitr(
        scratch.path(),
        &[
            "--repo",
            &url,
            "expire",
            "--keep-full",
            "1",
            "--max-delete",
            "5",
        ],
        &[],
    );
    assert_eq!(code(&out), 1);
    assert!(
        stderr(&out).contains("--max-delete 5") && stderr(&out).contains("--force"),
        "{}",
        stderr(&out)
    );
    assert_eq!(objects(), n_before, "a refused expire deleted something");
    let out = pitr(
        scratch.path(),
        &["--repo", &url, "expire", "--keep-full", "1", "--dry-run"],
        &[],
    );
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(said.contains("would delete backup"), "{said}");
    assert!(
        said.contains("would delete 1 staging file(s)") && said.contains("#4242000"),
        "{said}"
    );
    assert!(!said.contains("#4243000"), "{said}");
    assert_eq!(objects(), n_before, "a dry run deleted something");
    // Item 12: the segment WAL is kept from by name, objects in order, and the window after.
    let kept_from = before["backups"][2]["start_wal"].as_str().unwrap();
    assert!(said.contains(&format!("before {kept_from}")), "{said}");
    assert!(said.contains("after:  the recoverable window is"), "{said}");
    let listed: Vec<&str> = said
        .lines()
        .filter(|l| l.starts_with("  backups/") || l.starts_with("  wal/"))
        .collect();
    let mut sorted = listed.clone();
    sorted.sort();
    assert!(!listed.is_empty() && listed == sorted, "{said}");

    let out = pitr(
        scratch.path(),
        &["--repo", &url, "expire", "--keep-full", "1"],
        &[],
    );
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert!(!stale.exists(), "the stale staging file is still there");
    assert!(live.exists(), "a staging file in use was removed");
    std::fs::remove_file(&live).unwrap();
    let after = info(scratch.path());
    let kept = &after["backups"].as_array().unwrap();
    assert_eq!(kept.len(), 1, "{after:#}");
    assert_eq!(kept[0]["id"], before["backups"][2]["id"]);
    // A6: the expired backups leave no directories behind, so nothing is "incomplete".
    let dirs: Vec<String> = std::fs::read_dir(repo_dir.join("backups"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(dirs, [kept[0]["id"].as_str().unwrap()], "{dirs:?}");
    assert_eq!(
        after["incomplete_backups"],
        serde_json::json!([]),
        "{after:#}"
    );
    assert_eq!(after["window"]["earliest"], kept[0]["stop_time"]);
    assert_eq!(after["window"]["latest"], before["window"]["latest"]);
    assert!(objects() < n_before);
    // WAL before the kept backup is gone; from its start on, everything is there.
    let first = after["timelines"][0]["wal_ranges"][0]["first"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(first, kept[0]["start_wal"].as_str().unwrap());
    let (rc, report) = verify(&url, scratch.path());
    assert_eq!(rc, 0, "{report:#}");

    // The earliest point of the promised window restores.
    let dir = scratch.path().join("earliest");
    let mut args = vec![
        "--repo",
        &url,
        "restore",
        "--target-dir",
        dir.to_str().unwrap(),
        "--immediate",
        "--action",
        "promote",
    ];
    args.extend(harness::owner_args());
    let out = pitr(scratch.path(), &args, &[]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let r = Cluster::existing(15, &bin, dir, Scratch::new(), "archive_mode = off");
    r.wait_promoted();
    assert_eq!(
        r.sql("SELECT string_agg(id::text, ',' ORDER BY id) FROM t"),
        "1,2,3"
    );
}

fn walkdir_count(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let p = e.unwrap().path();
            if p.is_dir() { walkdir_count(&p) } else { 1 }
        })
        .sum()
}
