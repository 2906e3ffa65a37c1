//! Several repositories against real PostgreSQL 15 and 18: PostgreSQL archives into a local
//! directory and the S3 server at once; `pitr copy` brings the backup over; with the local
//! repository deleted, a restore to a time from the other brings back exactly the right rows.
//! A repository that is not required and cannot be written does not hold up archiving, shows its
//! lag, and is caught up by `pitr copy`. archive-get answers "not found" only when every
//! repository said so.

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use crate::harness::{self, Cluster, Scratch, as_postgres, code, pitr, run, stderr};

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn ok(out: &Output) -> String {
    assert_eq!(code(out), 0, "{}{}", stdout(out), stderr(out));
    stdout(out)
}

fn json(out: &Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}{}", stdout(out), stderr(out)))
}

/// `pitr.toml` in the scratch directory (readable by the server), and its path.
fn write_config(scratch: &Scratch, text: &str) -> String {
    let path = scratch.path().join("pitr.toml");
    std::fs::write(&path, text).unwrap();
    harness::chown_postgres(&path);
    path.to_string_lossy().into_owned()
}

/// `pitr --config CFG ARGS…`.
fn with_config(scratch: &Scratch, cfg: &str, args: &[&str]) -> Output {
    let mut all = vec!["--config", cfg];
    all.extend_from_slice(args);
    pitr(scratch.path(), &all, &[])
}

fn commit_time(c: &Cluster, id: i32) -> String {
    c.sql(&format!(
        "SELECT to_char(pg_xact_commit_timestamp(xmin) AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS.US') FROM marks WHERE id = {id}"
    ))
}

fn rows(c: &Cluster) -> String {
    c.sql("SELECT coalesce(string_agg(id::text, ',' ORDER BY id), '') FROM marks")
}

/// Where the offsite repository of [`local_and_offsite`] lives.
enum Offsite {
    S3,
    Azure,
}

fn local_and_offsite(major: u32, kind: Offsite) {
    let Some(bin) = harness::pg_bin(major) else {
        return;
    };
    let (scheme, Some(bucket)) = (match kind {
        Offsite::S3 => ("s3", harness::s3_bucket()),
        Offsite::Azure => ("az", harness::azure_container()),
    }) else {
        return;
    };
    let scratch = Scratch::new();
    let nas = scratch.subdir("nas");
    let offsite = format!(
        "{scheme}://{bucket}/repos-{major}-{}-{}",
        std::process::id(),
        scratch.path().file_name().unwrap().to_string_lossy()
    );
    let cfg_s = write_config(
        &scratch,
        &format!(
            "[[repo]]\nname = \"nas\"\nurl = \"file://{}\"\n[[repo]]\nname = \"offsite\"\nurl = \"{offsite}\"\n",
            nas.display()
        ),
    );
    let p = |args: &[&str]| with_config(&scratch, &cfg_s, args);
    let c = Cluster::start(
        major,
        &bin,
        &format!("{{pitr}} --config {cfg_s} archive-push %p"),
        "track_commit_timestamp = on\nautovacuum = off",
        &[],
    );
    c.sql("CREATE TABLE marks(id int primary key)");
    c.sql("INSERT INTO marks VALUES (1)");
    let conninfo = format!("host={} user=postgres dbname=postgres", c.sock.display());
    let data = c.data.to_string_lossy().into_owned();
    ok(&p(&[
        "backup", "--pgdata", &data, "--dbname", &conninfo, "-q",
    ]));
    c.sql("INSERT INTO marks VALUES (2)");
    let good = commit_time(&c, 2);
    c.sql("SELECT pg_sleep(1.1)");
    c.sql("INSERT INTO marks VALUES (3)");
    let last = c.switch_wal();
    c.wait_archived(&last);

    // Both repositories got every segment; only nas has the backup until it is copied.
    let info = json(&p(&["info", "--json"]));
    let repos = info["repositories"].as_array().unwrap();
    assert_eq!(repos.len(), 2, "{info:#}");
    for r in repos {
        assert_eq!(r["lag"]["segments"], 0, "{info:#}");
        assert!(r["error"].is_null(), "{info:#}");
    }
    assert_eq!(repos[0]["backups"].as_array().unwrap().len(), 1);
    assert_eq!(repos[1]["backups"].as_array().unwrap().len(), 0);
    let copied = json(&p(&["copy", "--from", "nas", "--to", "offsite", "--json"]));
    assert!(
        copied["objects_copied"].as_u64().unwrap() >= 3,
        "{copied:#}"
    );
    assert_eq!(
        copied["backups_copied"].as_array().unwrap().len(),
        1,
        "{copied:#}"
    );
    // Again: nothing left to copy.
    let again = json(&p(&["copy", "--from", "nas", "--to", "offsite", "--json"]));
    assert_eq!(again["objects_copied"], 0, "{again:#}");
    ok(&p(&["--repo-name", "offsite", "verify"]));

    // archive-get: "not found" only when every repository says so.
    let dest = scratch.path().join("got");
    let dest_s = dest.to_string_lossy().into_owned();
    let nas_url = format!("file://{}", nas.display());
    let missing_url = format!("file://{}", scratch.path().join("never-made").display());
    let get = |first: &str, name: &str| {
        pitr(
            scratch.path(),
            &[
                "--repo",
                first,
                "--repo",
                &offsite,
                "archive-get",
                name,
                &dest_s,
            ],
            &[],
        )
    };
    let out = get(&nas_url, "0000000100000000000000F0");
    assert_eq!(code(&out), 1, "{}", stderr(&out));
    let out = get(&missing_url, "0000000100000000000000F0");
    assert!(
        code(&out) > 125,
        "one repository could not be asked: {} {}",
        code(&out),
        stderr(&out)
    );
    assert!(stderr(&out).contains("repo1"), "{}", stderr(&out));
    let seg = c.archived_segments().into_iter().last().unwrap();
    let out = get(&missing_url, &seg);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert!(dest.exists());

    // A damaged backup piece in nas: the restore reads nas and takes that piece from offsite.
    let biggest = largest_file(&nas.join("backups"));
    let mut bytes = std::fs::read(&biggest).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x55;
    std::fs::write(&biggest, bytes).unwrap();
    let restore_to = |name: &str| {
        let target = scratch.path().join(name);
        let out = run(as_postgres(&mut Command::new(scratch.pitr_copy()))
            .args([
                "--config",
                &cfg_s,
                "restore",
                "--target-dir",
                target.to_str().unwrap(),
                "--to",
                &good,
                "--action",
                "promote",
            ])
            .current_dir("/tmp"));
        let said = ok(&out);
        let r = Cluster::existing(major, &bin, target, Scratch::new(), "archive_mode = off");
        r.wait_promoted();
        (said, stderr(&out), rows(&r))
    };
    let (said, log, got) = restore_to("restored-despite-damage");
    assert!(said.contains("repository   nas"), "{said}");
    assert!(
        log.contains("from repository offsite instead"),
        "the damaged piece came from offsite: {log}"
    );
    assert_eq!(got, "1,2");

    // The local repository is lost: the restore plans on the offsite one by itself.
    std::fs::remove_dir_all(&nas).unwrap();
    let (said, log, got) = restore_to("restored");
    assert!(said.contains("repository   offsite"), "{said}\n{log}");
    assert!(log.contains("nas could not be opened"), "{log}");
    assert_eq!(got, "1,2");
    eprintln!(
        "PG {major}: archived into nas and offsite ({scheme}://), copied {} objects ({} bytes); a damaged piece in nas read from offsite; restored from offsite after nas was deleted: rows {got}",
        copied["objects_copied"], copied["bytes_copied"],
    );
}

/// The largest file under `dir`.
fn largest_file(dir: &Path) -> std::path::PathBuf {
    let mut best: Option<(u64, std::path::PathBuf)> = None;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let meta = e.metadata().unwrap();
            if meta.is_dir() {
                stack.push(e.path());
            } else if best.as_ref().is_none_or(|(size, _)| meta.len() > *size) {
                best = Some((meta.len(), e.path()));
            }
        }
    }
    best.unwrap().1
}

#[test]
fn pg15_local_and_s3_repositories() {
    local_and_offsite(15, Offsite::S3);
}

#[test]
fn pg18_local_and_s3_repositories() {
    local_and_offsite(18, Offsite::S3);
}

/// The same round trip with the offsite repository in Azure Blob Storage (Azurite): `az://`
/// tested for real.
#[test]
fn pg15_local_and_azure_repositories() {
    local_and_offsite(15, Offsite::Azure);
}

/// A repository that is not required, on an S3 server that goes down, does not hold up archiving;
/// `info` and `metrics` show how far it trails; once the server is back, the next push catches it
/// up, `pitr copy` brings the backup, and every repository verifies clean.
#[test]
fn a_repository_not_required_does_not_hold_up_archiving() {
    let Some(bin) = harness::pg_bin(15) else {
        return;
    };
    let Some(bucket) = harness::s3_bucket() else {
        return;
    };
    let scratch = Scratch::new();
    let main = scratch.subdir("main");
    let spare = format!(
        "s3://{bucket}/spare-{}-{}",
        std::process::id(),
        scratch.path().file_name().unwrap().to_string_lossy()
    );
    let cfg_s = write_config(
        &scratch,
        &format!(
            "[[repo]]\nname = \"main\"\nurl = \"file://{}\"\n[[repo]]\nname = \"spare\"\nurl = \"{spare}\"\nrequired = false\n",
            main.display(),
        ),
    );
    // The server reaches the S3 server through a proxy that this test stops and starts again;
    // pitr run by the test reaches it directly.
    let proxy = harness::LatencyProxy::start(0);
    let port: u16 = proxy.endpoint.rsplit(':').next().unwrap().parse().unwrap();
    let p = |args: &[&str]| with_config(&scratch, &cfg_s, args);
    let c = Cluster::start(
        15,
        &bin,
        &format!(
            "AWS_ENDPOINT_URL={} {{pitr}} --config {cfg_s} archive-push %p",
            proxy.endpoint
        ),
        "autovacuum = off",
        &[],
    );
    c.sql("CREATE TABLE t(i int)");
    let last = c.switch_wal();
    c.wait_archived(&last);
    assert_eq!(
        json(&p(&["info", "--json"]))["repositories"][1]["lag"]["segments"],
        0
    );
    // The spare repository's server goes down.
    drop(proxy);
    for i in 0..3 {
        c.sql(&format!("INSERT INTO t VALUES ({i})"));
        let last = c.switch_wal();
        c.wait_archived(&last);
    }
    let failed = c.sql("SELECT failed_count FROM pg_stat_archiver");
    assert_eq!(
        failed, "0",
        "archiving failed while only the spare repository was down"
    );
    let ready = std::fs::read_dir(c.data.join("pg_wal/archive_status"))
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .ends_with(".ready")
        })
        .count();
    assert_eq!(ready, 0, "segments wait in pg_wal");
    let info = json(&p(&["info", "--json"]));
    let spare_lag = &info["repositories"][1]["lag"];
    assert!(spare_lag["segments"].as_u64().unwrap() >= 3, "{info:#}");
    assert_eq!(info["repositories"][0]["lag"]["segments"], 0, "{info:#}");
    let text = ok(&p(&["info"]));
    assert!(
        text.contains("segment(s)") && text.contains("behind"),
        "{text}"
    );
    let metrics = ok(&p(&["metrics"]));
    assert!(
        !metrics.contains("pitr_repository_lag_segments{repository=\"spare\"} 0"),
        "{metrics}"
    );
    // Back: the next push notices what it missed and catches it up (WAL only).
    let _proxy = harness::LatencyProxy::start_on(0, port);
    c.sql("INSERT INTO t VALUES (100)");
    let last = c.switch_wal();
    c.wait_archived(&last);
    let caught_up = harness::poll(
        "the spare repository to catch up",
        Duration::from_secs(60),
        || {
            let info = json(&p(&["info", "--json"]));
            (info["repositories"][1]["lag"]["segments"] == 0).then_some(info)
        },
    );
    assert!(
        caught_up["repositories"][1]["error"].is_null(),
        "{caught_up:#}"
    );
    assert!(
        !c.data.join("pg_wal/pitr_behind/spare").exists(),
        "the record that spare was behind is gone"
    );
    let metrics = ok(&p(&["metrics"]));
    assert!(
        metrics.contains("pitr_repository_lag_segments{repository=\"spare\"} 0"),
        "{metrics}"
    );
    assert!(
        metrics.contains("pitr_repository_up{repository=\"main\"} 1"),
        "{metrics}"
    );
    // A backup is copied with pitr copy; then every repository verifies clean.
    let conninfo = format!("host={} user=postgres dbname=postgres", c.sock.display());
    let data = c.data.to_string_lossy().into_owned();
    ok(&p(&[
        "backup", "--pgdata", &data, "--dbname", &conninfo, "-q",
    ]));
    ok(&p(&["copy", "--from", "main", "--to", "spare"]));
    let verified = json(&p(&["verify", "--json"]));
    let per_repo = verified["repositories"].as_array().unwrap();
    assert_eq!(per_repo.len(), 2, "{verified:#}");
    for r in per_repo {
        assert_eq!(
            r["findings"].as_array().map(Vec::len),
            Some(0),
            "{verified:#}"
        );
        assert_eq!(r["lag"]["segments"], 0, "{verified:#}");
    }
    // expire goes through every repository, each under its own policy (here the flags').
    let expired = ok(&p(&["expire", "--keep-full", "1", "--dry-run"]));
    assert!(
        expired.contains("repository main") && expired.contains("repository spare"),
        "{expired}"
    );
    eprintln!(
        "spare repository: {} segment(s) behind while its server was down, 0 after the next push caught it up; verify of both clean",
        spare_lag["segments"]
    );
}

/// `pitr copy` killed half-way (SIGKILL, through a slow store) and run again: the target ends
/// complete, the backup appears only once its manifest is there, and it verifies clean.
#[test]
fn a_copy_killed_half_way_completes_when_run_again() {
    let Some(bin) = harness::pg_bin(15) else {
        return;
    };
    let Some(bucket) = harness::s3_bucket() else {
        return;
    };
    let (scratch, _dir, local, c) = harness::archiving_cluster(15, &bin, "autovacuum = off");
    c.sql("CREATE TABLE t AS SELECT g FROM generate_series(1, 50000) g");
    let out = harness::pitr_backup(scratch.path(), &local, &c, &["-q"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    for _ in 0..3 {
        c.sql("INSERT INTO t SELECT g FROM generate_series(1, 1000) g");
        let last = c.switch_wal();
        c.wait_archived(&last);
    }
    let remote = format!(
        "s3://{bucket}/copy-kill-{}-{}",
        std::process::id(),
        scratch.path().file_name().unwrap().to_string_lossy()
    );
    let args = [
        "--repo", &local, "--repo", &remote, "copy", "--from", "repo1", "--to", "repo2", "--jobs",
        "1",
    ];
    // Through 50 ms per request, one object at a time: killed once the first WAL objects are in.
    let proxy = harness::LatencyProxy::start(50);
    let mut child = Command::new(scratch.pitr_copy())
        .args(args)
        .env("AWS_ENDPOINT_URL", &proxy.endpoint)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let target = pitr::storage::Repo::open(&remote).unwrap();
    let listed = || {
        harness::block_on(target.list(&pitr::storage::layout::Prefix::Everything))
            .map(|l| {
                l.iter()
                    .map(|e| e.key().to_string())
                    .collect::<Vec<String>>()
            })
            .unwrap_or_default()
    };
    harness::poll(
        "the copy to store its first WAL objects",
        Duration::from_secs(60),
        || {
            let keys = listed();
            (keys.iter().filter(|k| k.starts_with("wal/")).count() >= 2).then_some(())
        },
    );
    child.kill().unwrap();
    child.wait().unwrap();
    drop(proxy);
    let half = listed();
    assert!(
        !half.iter().any(|k| k.contains("/manifest.")),
        "killed before the manifest: {half:?}"
    );
    let backups_listed = || {
        let info = json(&pitr(
            scratch.path(),
            &["--repo", &remote, "info", "--json"],
            &[],
        ));
        info["backups"].as_array().map_or(0, Vec::len)
    };
    assert_eq!(backups_listed(), 0, "a half-copied backup is not listed");
    // Again, at full speed: what is there is left alone, the rest copied, and it verifies clean.
    let again = json(&pitr(
        scratch.path(),
        &[&args[..], &["--json"]].concat(),
        &[],
    ));
    assert!(again["objects_present"].as_u64().unwrap() >= 2, "{again:#}");
    assert_eq!(
        again["findings"].as_array().map(Vec::len),
        Some(0),
        "{again:#}"
    );
    assert_eq!(
        again["backups_copied"].as_array().map(Vec::len),
        Some(1),
        "{again:#}"
    );
    let out = pitr(scratch.path(), &["--repo", &remote, "verify"], &[]);
    assert_eq!(code(&out), 0, "{}{}", stdout(&out), stderr(&out));
    assert_eq!(backups_listed(), 1);
    eprintln!(
        "copy killed with {} object(s) in the target; run again: {} copied, {} already there; verify clean",
        half.len(),
        again["objects_copied"],
        again["objects_present"]
    );
}
