//! Encrypted repositories against real PostgreSQL 15 and 18: PostgreSQL archives into one with
//! `compress = none` and no stored byte shows a row's text; restore to a time and a drill work
//! through the key; a wrong key, a missing key, a key file that cannot be read, a tampered object
//! and a key for a repository in the clear each fail as the contract says; rotation (`key add`, a
//! new backup, `key retire`) keeps the old backup restorable; the key never appears in any output.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use crate::harness::{self, Cluster, Scratch, as_postgres, code, pitr, run, stderr};

const MARKER: &str = "pitr-encryption-marker-7c1e";

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Every file under `dir`, recursively.
fn files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(files(&p));
        } else {
            out.push(p);
        }
    }
    out
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

fn pitr_as_postgres(scratch: &Scratch, args: &[&str]) -> Output {
    let bin = scratch.pitr_copy();
    run(as_postgres(&mut Command::new(bin))
        .args(args)
        .current_dir("/tmp"))
}

fn encrypted_round_trip(major: u32) {
    let Some(bin) = harness::pg_bin(major) else {
        return;
    };
    let scratch = Scratch::new();
    let repo_dir = scratch.subdir("repo");
    let url = format!("file://{}", repo_dir.display());
    let keys = scratch.subdir("keys");
    let key = keys.join("repo.key");
    let key_s = key.to_string_lossy().into_owned();
    let out = pitr(scratch.path(), &["key", "generate", "--out", &key_s], &[]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    harness::chown_postgres(&key);
    let secret = std::fs::read_to_string(&key).unwrap().trim().to_string();
    assert_eq!(secret.len(), 64);
    // With a key flag: (repo, key) before every command.
    let with_key = |args: &[&str]| -> Vec<String> {
        let mut v = vec![
            "--repo".to_string(),
            url.clone(),
            "--encryption-key-file".into(),
            key_s.clone(),
        ];
        v.extend(args.iter().map(|s| s.to_string()));
        v
    };
    let run_key = |args: &[&str]| {
        let all = with_key(args);
        let all: Vec<&str> = all.iter().map(String::as_str).collect();
        pitr(scratch.path(), &all, &[])
    };

    let c = Cluster::start(
        major,
        &bin,
        &format!(
            "{{pitr}} --repo {url} --encryption-key-file {key_s} --compress none archive-push %p"
        ),
        "track_commit_timestamp = on\nautovacuum = off",
        &[],
    );
    c.sql("CREATE TABLE secret(id int primary key, t text)");
    c.sql(&format!(
        "INSERT INTO secret SELECT g, '{MARKER}' || g FROM generate_series(1, 2000) g"
    ));
    let conninfo = format!("host={} user=postgres dbname=postgres", c.sock.display());
    let data = c.data.to_string_lossy().into_owned();
    let backup = |extra: &[&str]| {
        let mut args = vec![
            "--compress",
            "none",
            "backup",
            "--pgdata",
            &data,
            "--dbname",
            &conninfo,
            "-q",
        ];
        args.extend_from_slice(extra);
        let out = run_key(&args);
        assert_eq!(code(&out), 0, "{}", stderr(&out));
    };
    backup(&[]);
    c.sql(&format!(
        "INSERT INTO secret VALUES (5001, '{MARKER} after the backup')"
    ));
    let good = c.sql(
        "SELECT to_char(pg_xact_commit_timestamp(xmin) AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS.US') FROM secret WHERE id = 5001",
    );
    c.sql("SELECT pg_sleep(1.1)");
    c.sql("DELETE FROM secret WHERE id > 1000");
    let last = c.switch_wal();
    c.wait_archived(&last);

    // Nothing stored shows the text: not the WAL, not the backup, not the manifests.
    let stored = files(&repo_dir);
    assert!(stored.len() > 10, "{stored:?}");
    for f in &stored {
        let bytes = std::fs::read(f).unwrap();
        assert!(
            !contains(&bytes, MARKER.as_bytes()),
            "{} holds the marker",
            f.display()
        );
        assert!(
            !contains(&bytes, secret.as_bytes()),
            "{} holds the key",
            f.display()
        );
    }
    let keyring: Vec<_> = stored
        .iter()
        .filter(|f| f.starts_with(repo_dir.join("keys")))
        .collect();
    assert_eq!(keyring.len(), 2, "one key and active.json: {keyring:?}");
    let first_key = {
        let out = run_key(&["key", "list", "--json"]);
        assert_eq!(code(&out), 0, "{}", stderr(&out));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v["keys"].as_array().unwrap().len(), 1, "{v:#}");
        v["keys"][0]["id"].as_str().unwrap().to_string()
    };

    // Restore to a time before the mistake, through the key, as an operator would.
    let restore = |name: &str, to: &str| -> Cluster {
        let dir = scratch.path().join(name);
        let args = with_key(&[
            "restore",
            "--target-dir",
            dir.to_str().unwrap(),
            "--to",
            to,
            "--action",
            "promote",
        ]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = pitr_as_postgres(&scratch, &args);
        assert_eq!(code(&out), 0, "{}{}", stdout(&out), stderr(&out));
        assert!(!stdout(&out).contains(&secret) && !stderr(&out).contains(&secret));
        let auto = std::fs::read_to_string(dir.join("postgresql.auto.conf")).unwrap();
        assert!(auto.contains("--encryption-key-file"), "{auto}");
        assert!(!auto.contains(&secret));
        let r = Cluster::existing(major, &bin, dir, Scratch::new(), "archive_mode = off");
        r.wait_promoted();
        r
    };
    let r = restore("restored", &good);
    assert_eq!(r.sql("SELECT count(*) FROM secret"), "2001");
    assert!(!r.server_log_tail().contains(&secret));
    drop(r);

    // A drill through the key.
    let bin_s = bin.to_string_lossy().into_owned();
    let out = run_key(&["drill", "--pg-bin", &bin_s, "--timeout", "5m", "--json"]);
    assert_eq!(code(&out), 0, "{}{}", stdout(&out), stderr(&out));

    // -vv shows no key.
    let out = run_key(&["-vv", "info"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert!(!stdout(&out).contains(&secret) && !stderr(&out).contains(&secret));

    // Without the key: refused, naming the repository.
    let out = pitr(scratch.path(), &["--repo", &url, "info"], &[]);
    assert_eq!(code(&out), 1, "{}", stdout(&out));
    assert!(
        stderr(&out).contains("is encrypted, but no key is configured"),
        "{}",
        stderr(&out)
    );
    let seg = c.archived_segments().into_iter().next().unwrap();
    let dest = scratch.path().join("fetched");
    let dest_s = dest.to_string_lossy().into_owned();
    let out = pitr(
        scratch.path(),
        &["--repo", &url, "archive-get", &seg, &dest_s],
        &[],
    );
    assert!(
        code(&out) > 125,
        "archive-get without the key: {} {}",
        code(&out),
        stderr(&out)
    );
    assert!(!dest.exists());

    // A wrong key: "wrong key", not "corrupt".
    let other = keys.join("other.key");
    let other_s = other.to_string_lossy().into_owned();
    assert_eq!(
        code(&pitr(
            scratch.path(),
            &["key", "generate", "--out", &other_s],
            &[]
        )),
        0
    );
    let out = pitr(
        scratch.path(),
        &["--repo", &url, "--encryption-key-file", &other_s, "info"],
        &[],
    );
    assert_eq!(code(&out), 1);
    assert!(stderr(&out).contains("wrong key"), "{}", stderr(&out));
    assert!(!stderr(&out).contains("corrupt"), "{}", stderr(&out));
    let out = pitr(
        scratch.path(),
        &[
            "--repo",
            &url,
            "--encryption-key-file",
            &other_s,
            "archive-get",
            &seg,
            &dest_s,
        ],
        &[],
    );
    assert!(code(&out) > 125, "{}", stderr(&out));

    // A key file that cannot be read, or none at all: archive-push fails and writes nothing.
    let before = files(&repo_dir).len();
    let wal = c.data.join("pg_wal").join(&seg);
    let wal_copy = scratch.path().join(&seg);
    if wal.exists() {
        std::fs::copy(&wal, &wal_copy).unwrap();
    } else {
        std::fs::write(&wal_copy, b"not a segment").unwrap();
    }
    let missing = keys.join("typo.key").to_string_lossy().into_owned();
    let out = pitr(
        scratch.path(),
        &[
            "--repo",
            &url,
            "--encryption-key-file",
            &missing,
            "archive-push",
            wal_copy.to_str().unwrap(),
        ],
        &[],
    );
    assert_eq!(code(&out), 1);
    assert!(
        stderr(&out).contains("cannot load the key file"),
        "{}",
        stderr(&out)
    );
    assert_eq!(
        files(&repo_dir).len(),
        before,
        "a failed push wrote something"
    );
    let out = pitr(
        scratch.path(),
        &["--repo", &url, "archive-push", wal_copy.to_str().unwrap()],
        &[],
    );
    assert_eq!(code(&out), 1);
    assert!(
        stderr(&out).contains("no key is configured"),
        "{}",
        stderr(&out)
    );
    assert_eq!(
        files(&repo_dir).len(),
        before,
        "a push without the key wrote something"
    );

    // A tampered object: archive-get stops recovery, verify names it.
    let seg_file = files(&repo_dir.join("wal"))
        .into_iter()
        .find(|f| f.to_string_lossy().contains(&seg))
        .unwrap();
    let original = std::fs::read(&seg_file).unwrap();
    let mut bad = original.clone();
    let mid = bad.len() / 2;
    bad[mid] ^= 0x01;
    std::fs::write(&seg_file, &bad).unwrap();
    let out = run_key(&["archive-get", &seg, &dest_s]);
    assert!(code(&out) > 125, "{}", stderr(&out));
    assert!(stderr(&out).contains(&seg), "{}", stderr(&out));
    let out = run_key(&["verify", "--json"]);
    assert_eq!(code(&out), 1, "{}", stderr(&out));
    assert!(stdout(&out).contains(&seg), "{}", stdout(&out));
    std::fs::write(&seg_file, &original).unwrap();
    let out = run_key(&["verify"]);
    assert_eq!(code(&out), 0, "{}{}", stdout(&out), stderr(&out));

    // A key for a repository in the clear: refused, never a mix.
    let clear_dir = scratch.subdir("clear");
    let clear_url = format!("file://{}", clear_dir.display());
    let out = pitr(
        scratch.path(),
        &[
            "--repo",
            &clear_url,
            "archive-push",
            wal_copy.to_str().unwrap(),
        ],
        &[],
    );
    if code(&out) == 0 {
        let out = pitr(
            scratch.path(),
            &[
                "--repo",
                &clear_url,
                "--encryption-key-file",
                &key_s,
                "info",
            ],
            &[],
        );
        assert_eq!(code(&out), 1);
        assert!(
            stderr(&out).contains("is not encrypted, but a key file"),
            "{}",
            stderr(&out)
        );
    }

    // Rotation: a new key, a new backup with it, the old key retired; the old backup restores.
    let out = run_key(&["key", "add"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    c.sql("INSERT INTO secret VALUES (7001, 'after the key add')");
    backup(&[]);
    let last = c.switch_wal();
    c.wait_archived(&last);
    let out = run_key(&["key", "retire", &first_key, "--json"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let retired: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        retired["objects_rewrapped"].as_u64().unwrap() > 10,
        "{retired:#}"
    );
    let out = run_key(&["key", "list", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let states: Vec<&str> = v["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["state"].as_str().unwrap())
        .collect();
    assert_eq!(states, ["retired", "active"], "{v:#}");
    let out = run_key(&["verify"]);
    assert_eq!(code(&out), 0, "{}{}", stdout(&out), stderr(&out));
    let r = restore("after-retire", &good);
    assert_eq!(r.sql("SELECT count(*) FROM secret"), "2001");
    eprintln!(
        "PG {major} encrypted repository: {} objects, {} rewrapped from key {first_key} in {} pass(es)",
        stored.len(),
        retired["objects_rewrapped"],
        retired["passes"]
    );
}

#[test]
fn pg15_encrypted_repository() {
    encrypted_round_trip(15);
}

#[test]
fn pg18_encrypted_repository() {
    encrypted_round_trip(18);
}
