//! `pitr backup` against real PostgreSQL 15 and 18: a backup taken while pgbench writes, with a
//! tablespace, restored by hand (the library's file restore + recovery.signal + archive-get),
//! recovers to exactly the source's data and passes amcheck. A killed backup leaves nothing listed;
//! a backup whose WAL never arrives is never listed.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::harness::{self, Cluster, Scratch, code, pitr, poll, run_ok, stderr};

fn info(url: &str, cwd: &std::path::Path) -> serde_json::Value {
    let out = pitr(cwd, &["--repo", url, "info", "--json"], &[]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    serde_json::from_slice(&out.stdout).unwrap()
}

fn sock_conninfo(c: &Cluster) -> String {
    format!("host={} user=postgres dbname=postgres", c.sock.display())
}

/// pg_dump of the database, without the unlogged table's rows (recovery resets unlogged tables)
/// and without the random `\restrict` key pg_dump writes into every dump.
pub(crate) fn dump(c: &Cluster) -> String {
    let out = c.client(
        "pg_dump",
        &[
            "--no-tablespaces",
            "--exclude-table-data=scratchpad",
            "-d",
            "postgres",
        ],
    );
    assert!(out.status.success(), "pg_dump: {}", stderr(&out));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.starts_with("\\restrict") && !l.starts_with("\\unrestrict"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The pg_dump of `c` must be `want`; the first differing lines are shown when it is not.
pub(crate) fn assert_same_dump(what: &str, want: &str, c: &Cluster) {
    let got = dump(c);
    if got != want {
        let diff: Vec<String> = want
            .lines()
            .zip(got.lines())
            .filter(|(a, b)| a != b)
            .take(6)
            .map(|(a, b)| format!("-{a}\n+{b}"))
            .collect();
        panic!(
            "pg_dump of {what} differs from the source:\n{}",
            diff.join("\n")
        );
    }
}

fn backup_and_restore(major: u32) {
    let Some(bin) = harness::pg_bin(major) else {
        return;
    };
    let scratch = Scratch::new();
    let url = format!("file://{}", scratch.subdir("repo").display());
    let c = Cluster::start(
        major,
        &bin,
        &format!("{{pitr}} --repo {url} archive-push %p"),
        "autovacuum = off",
        &[],
    );
    let ts_dir = scratch.subdir("ts1");
    c.sql(&format!(
        "CREATE TABLESPACE ts1 LOCATION '{}'",
        ts_dir.display()
    ));
    let out = c.client("pgbench", &["-i", "-s", "4", "-q", "postgres"]);
    assert!(out.status.success(), "pgbench -i: {}", stderr(&out));
    c.sql("CREATE TABLE in_ts TABLESPACE ts1 AS SELECT g, md5(g::text) AS h FROM generate_series(1, 30000) g");
    c.sql("CREATE UNLOGGED TABLE scratchpad AS SELECT g FROM generate_series(1, 1000) g");

    // Writes during the whole backup: files change while they are copied.
    let mut load = Command::new(bin.join("pgbench"))
        .arg("-h")
        .arg(&c.sock)
        .args(["-U", "postgres", "-c", "2", "-T", "6", "-n", "postgres"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // PostgreSQL 15's backup stores its small files in bundles (the default); 18's stores every
    // piece as an object of its own, as earlier versions did: both layouts restore.
    let bundled = major == 15;
    let mut args = vec!["--jobs", "2", "--json"];
    if !bundled {
        args.push("--no-bundle");
    }
    let out = harness::pitr_backup(scratch.path(), &url, &c, &args);
    assert_eq!(code(&out), 0, "backup failed: {}", stderr(&out));
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        summary["size_bytes"].as_u64().unwrap() > 50 << 20,
        "{summary}"
    );
    assert!(
        load.wait().unwrap().success(),
        "pgbench during the backup failed"
    );

    // The source's final state, all of it archived.
    c.sql("INSERT INTO in_ts VALUES (-1, 'after the backup')");
    let want = dump(&c);
    let want_count = c.sql("SELECT count(*) FROM pgbench_history");
    let last = c.switch_wal();
    c.wait_archived(&last);

    let listed = info(&url, scratch.path());
    let b = &listed["backups"][0];
    assert_eq!(b["id"], summary["id"]);
    assert_eq!(b["restorable"], true, "{listed:#}");
    assert_eq!(listed["window"]["earliest"], b["stop_time"], "{listed:#}");
    assert_eq!(listed["incomplete_backups"], serde_json::json!([]));

    // Restore by hand: files, then recovery through archive-get to the end of the archive.
    let repo = pitr::storage::Repo::open(&url).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let catalog = rt.block_on(pitr::catalog::Catalog::load(&repo)).unwrap();
    // The catalog keeps manifests without their files, which it only counts.
    let lean = &catalog.backups[0];
    assert!(lean.files.is_empty() && lean.files_left_out());
    let manifest = rt
        .block_on(pitr::catalog::manifest_with_files(&repo, lean))
        .unwrap();
    assert_eq!(lean.file_count(), manifest.files.len());
    assert!(manifest.files.len() > 500);
    assert_eq!(manifest.tablespaces.len(), 1);
    let parts = || manifest.files.iter().flat_map(|f| &f.parts);
    let in_bundles = parts().filter(|p| p.bundle.is_some()).count();
    if bundled {
        assert_eq!(manifest.format_version, 3);
        // Every small piece, and only those, in a bundle.
        assert!(in_bundles > 500, "{in_bundles} pieces in bundles");
        assert!(parts().all(|p| p.bundle.is_some() == (p.size <= 1 << 20)));
        let bundles = std::fs::read_dir(
            scratch
                .path()
                .join("repo/backups")
                .join(&manifest.id)
                .join("bundle"),
        )
        .unwrap()
        .count();
        assert!(
            bundles >= 1 && bundles < in_bundles / 50,
            "{bundles} bundles"
        );
    } else {
        assert_eq!(manifest.format_version, 1);
        assert_eq!(in_bundles, 0);
    }
    assert!(
        manifest.files.iter().any(|f| f.path.ends_with("_init")),
        "unlogged init fork kept"
    );
    let target = scratch.path().join("restored");
    let new_ts = scratch.path().join("ts1_restored");
    let relocate = HashMap::from([(manifest.tablespaces[0].oid, new_ts.clone())]);
    let done = rt
        .block_on(pitr::restore::files::restore_files(
            &repo,
            lean,
            &[],
            &target,
            &relocate,
            2,
        ))
        .unwrap();
    assert_eq!(done.files, manifest.files.len());
    // A second restore into the now non-empty directory is refused, nothing touched.
    let again = rt.block_on(pitr::restore::files::restore_files(
        &repo,
        &manifest,
        &[],
        &target,
        &relocate,
        2,
    ));
    assert!(again.unwrap_err().to_string().contains("not empty"));
    harness::chown_tree(&new_ts);
    std::fs::write(target.join("recovery.signal"), b"").unwrap();
    let pitr_bin = scratch.pitr_copy();
    let auto = format!(
        "restore_command = '{} --repo {url} archive-get %f %p'\narchive_mode = off\n",
        pitr_bin.display()
    );
    let restored = Cluster::existing(major, &bin, target.clone(), Scratch::new(), &auto);
    restored.wait_promoted();
    assert_eq!(
        restored.sql("SELECT count(*) FROM pgbench_history"),
        want_count
    );
    assert_eq!(
        restored.sql("SELECT h FROM in_ts WHERE g = -1"),
        "after the backup"
    );
    // The unlogged table exists and is empty, as PostgreSQL's own recovery leaves it.
    assert_eq!(restored.sql("SELECT count(*) FROM scratchpad"), "0");
    assert_same_dump("the restored cluster", &want, &restored);
    assert_eq!(
        std::fs::read_link(
            target
                .join("pg_tblspc")
                .join(manifest.tablespaces[0].oid.to_string())
        )
        .unwrap(),
        new_ts
    );
    let out = restored.client(
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
        "PG {major}: backup {} of {} MiB ({} files) restored and recovered; pg_dump identical, pg_amcheck clean",
        summary["id"],
        summary["size_bytes"].as_u64().unwrap() >> 20,
        summary["files"]
    );
}

#[test]
fn pg15_backup_and_restore() {
    backup_and_restore(15);
}

#[test]
fn pg18_backup_and_restore() {
    backup_and_restore(18);
}

/// A backup killed half-way leaves no listed backup and no backup running on the server; the next
/// one works. A backup whose WAL never reaches the repository is not listed either.
#[test]
fn interrupted_backups_are_never_listed() {
    let Some(bin) = harness::pg_bin(15) else {
        return;
    };
    let scratch = Scratch::new();
    let url = format!("file://{}", scratch.subdir("repo").display());
    let c = Cluster::start(
        15,
        &bin,
        &format!("{{pitr}} --repo {url} archive-push %p"),
        "",
        &[],
    );
    let out = c.client("pgbench", &["-i", "-s", "10", "-q", "postgres"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let data = c.data.to_str().unwrap().to_string();

    let mut child = Command::new(harness::PITR)
        .args([
            "--repo",
            &url,
            "backup",
            "--pgdata",
            &data,
            "--dbname",
            &sock_conninfo(&c),
            "--jobs",
            "1",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let repo_dir = PathBuf::from(url.strip_prefix("file://").unwrap());
    poll(
        "the backup to store its first file",
        Duration::from_secs(60),
        || {
            let backups = std::fs::read_dir(repo_dir.join("backups")).ok()?;
            backups
                .filter_map(|e| e.ok())
                .any(|e| e.path().join("data").exists())
                .then_some(())
        },
    );
    child.kill().unwrap();
    let status = child.wait().unwrap();
    assert!(!status.success());
    let listed = info(&url, scratch.path());
    assert_eq!(listed["backups"], serde_json::json!([]), "{listed:#}");
    assert_eq!(listed["incomplete_backups"].as_array().unwrap().len(), 1);
    poll(
        "the server to drop the aborted backup session",
        Duration::from_secs(30),
        || {
            (c.sql("SELECT count(*) FROM pg_stat_activity WHERE application_name = 'pitr'") == "0")
                .then_some(())
        },
    );

    let out = harness::pitr_backup(scratch.path(), &url, &c, &["-q"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let listed = info(&url, scratch.path());
    assert_eq!(listed["backups"].as_array().unwrap().len(), 1);

    // Archiving breaks: the next backup cannot complete and is not listed.
    c.sql("ALTER SYSTEM SET archive_command = 'false'");
    c.sql("SELECT pg_reload_conf()");
    let out = harness::pitr_backup(scratch.path(), &url, &c, &["--archive-timeout", "3s"]);
    assert_eq!(code(&out), 1);
    assert!(
        stderr(&out).contains("did not reach the repository"),
        "{}",
        stderr(&out)
    );
    let listed = info(&url, scratch.path());
    assert_eq!(listed["backups"].as_array().unwrap().len(), 1, "{listed:#}");
    assert_eq!(listed["incomplete_backups"].as_array().unwrap().len(), 2);

    // Wrong data directory for the server: refused before anything is copied.
    let other = scratch.path().join("other");
    harness::initdb(&bin, &other);
    let out = pitr(
        scratch.path(),
        &[
            "--repo",
            &url,
            "backup",
            "--pgdata",
            other.to_str().unwrap(),
            "--dbname",
            &sock_conninfo(&c),
        ],
        &[],
    );
    assert_eq!(code(&out), 1);
    assert!(stderr(&out).contains("not on --pgdata"), "{}", stderr(&out));
    let _ = run_ok;
}

/// With data checksums, every relation page a backup copies is checked: a clean cluster passes
/// (thousands of real pages against PostgreSQL's algorithm), and a page damaged on disk is named
/// by file and block, recorded in the manifest, shown by `info` and `verify`, and makes the
/// backup exit 1 once it is complete.
#[test]
fn damaged_pages_are_reported() {
    let Some(bin) = harness::pg_bin(15) else {
        return;
    };
    let scratch = Scratch::new();
    let url = format!("file://{}", scratch.subdir("repo").display());
    let mut c = Cluster::start_initdb(
        15,
        &bin,
        &format!("{{pitr}} --repo {url} archive-push %p"),
        "autovacuum = off",
        &[],
        &["--data-checksums"],
    );
    let out = c.client("pgbench", &["-i", "-s", "2", "-q", "postgres"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = harness::pitr_backup(scratch.path(), &url, &c, &["-q", "--json"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let clean: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(clean["data_checksums"], true, "{clean:#}");
    assert_eq!(clean["checksum_failures"], 0, "{clean:#}");

    let rel = c.sql("SELECT pg_relation_filepath('pgbench_accounts')");
    c.sql("CHECKPOINT");
    c.stop();
    // One byte in the tuple data of block 1: its stored checksum no longer matches.
    let path = c.data.join(&rel);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[8192 + 6000] ^= 0x5A;
    std::fs::write(&path, &bytes).unwrap();
    c.pg_ctl_start(&[]);

    let out = harness::pitr_backup(scratch.path(), &url, &c, &["-q"]);
    let err = stderr(&out);
    assert_eq!(code(&out), 1, "{err}");
    assert!(
        err.contains("fail their checksum") && err.contains(&format!("{rel} block 1")),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    let listed = info(&url, scratch.path());
    let backups = listed["backups"].as_array().unwrap();
    assert_eq!(backups.len(), 2, "{listed:#}");
    assert_eq!(backups[1]["checksum_failures"], 1, "{listed:#}");
    let out = harness::pitr(scratch.path(), &["--repo", &url, "verify", "--json"], &[]);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        report["findings"]
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f["kind"] == "checksum" && f["object"].as_str().unwrap().contains(&rel)),
        "{report:#}"
    );
}
