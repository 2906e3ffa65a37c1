//! Defects found outside testing (issue "Reliability"), each with the test that would have caught it.

use std::path::Path;

use crate::harness::{self, Scratch, code, pitr, stderr};

use crate::harness::block_on;

/// Make `url` a repository (its `pitr.json`) holding nothing else.
fn make_repository(url: &str) {
    let repo = pitr::storage::Repo::create(url).unwrap();
    let id = pitr::storage::identity::RepoIdentity {
        format_version: pitr::storage::identity::FORMAT_VERSION,
        system_identifier: pitr::pg::SystemId(7000000000000000001),
        pg_version: 15,
        wal_segment_size: pitr::pg::WalSegSize::DEFAULT,
        wal_page_size: 8192,
    };
    block_on(repo.ensure_identity(&id)).unwrap();
}

fn get(cwd: &Path, url: &str, env: &[(&str, &str)]) -> std::process::Output {
    std::fs::create_dir_all(cwd.join("pg_wal")).unwrap();
    pitr(
        cwd,
        &[
            "--repo",
            url,
            "archive-get",
            "000000010000000000000005",
            "pg_wal/RECOVERYXLOG",
        ],
        env,
    )
}

/// A1: a repository that is not there (missing directory, empty directory such as an unmounted
/// mount point, missing bucket, emptied store) must stop recovery (exit above 125), never answer
/// "not found" (1), which makes PostgreSQL promote and drop the rest of the history. On a standby it
/// may answer 1: a standby asks again.
#[test]
fn archive_get_never_says_not_found_for_a_missing_repository() {
    let scratch = Scratch::new();
    let cwd = scratch.subdir("pgdata");
    let missing = scratch.path().join("no-such-repo");
    let url = format!("file://{}", missing.display());
    let out = get(&cwd, &url, &[]);
    assert_eq!(code(&out), 200, "{}", stderr(&out));
    assert!(stderr(&out).contains("does not exist"), "{}", stderr(&out));
    assert!(
        !missing.exists(),
        "archive-get created the repository directory"
    );
    assert!(!cwd.join("pg_wal/RECOVERYXLOG").exists());

    let empty = scratch.subdir("unmounted");
    let url = format!("file://{}", empty.display());
    let out = get(&cwd, &url, &[]);
    assert_eq!(code(&out), 200, "{}", stderr(&out));
    assert!(
        stderr(&out).contains("no pitr repository") && stderr(&out).contains("is empty"),
        "{}",
        stderr(&out)
    );

    // A standby asks again, so there the answer may be 1.
    std::fs::write(cwd.join("standby.signal"), "").unwrap();
    assert_eq!(code(&get(&cwd, &url, &[])), 1);
    std::fs::remove_file(cwd.join("standby.signal")).unwrap();

    // A real repository that lacks the segment: "not found" is the truthful answer.
    make_repository(&url);
    let out = get(&cwd, &url, &[]);
    assert_eq!(code(&out), 1, "{}", stderr(&out));

    let Some(bucket) = harness::s3_bucket() else {
        return;
    };
    let out = get(
        &cwd,
        &format!("s3://pitr-no-such-bucket-{}/x", std::process::id()),
        &[],
    );
    assert_eq!(code(&out), 200, "{}", stderr(&out));
    // An emptied store (moto restarted, a wrong prefix): no pitr.json there.
    let fresh = format!("s3://{bucket}/never-written-{}", std::process::id());
    let out = get(&cwd, &fresh, &[]);
    assert_eq!(code(&out), 200, "{}", stderr(&out));
    assert!(stderr(&out).contains("no pitr.json"), "{}", stderr(&out));
    make_repository(&fresh);
    assert_eq!(code(&get(&cwd, &fresh, &[])), 1);
}

/// Item 5 and A1: reading commands never create a repository and never call a missing one empty.
#[test]
fn reading_commands_need_a_repository() {
    let scratch = Scratch::new();
    let missing = scratch.path().join("no-such-dir");
    let url = format!("file://{}", missing.display());
    for args in [
        vec!["info"],
        vec!["info", "--json"],
        vec!["verify"],
        vec!["metrics"],
        vec!["expire", "--keep-full", "1", "--dry-run"],
    ] {
        let mut all = vec!["--repo", url.as_str()];
        all.extend(args.iter().copied());
        let out = pitr(scratch.path(), &all, &[]);
        assert_eq!(code(&out), 1, "{args:?}: {}", stderr(&out));
        assert!(
            stderr(&out).contains("does not exist"),
            "{args:?}: {}",
            stderr(&out)
        );
        assert!(!missing.exists(), "{args:?} created the directory");
    }
    // An empty directory, or a data directory, is not an empty repository.
    let empty = scratch.subdir("empty");
    let out = pitr(
        scratch.path(),
        &["--repo", &format!("file://{}", empty.display()), "info"],
        &[],
    );
    assert_eq!(code(&out), 1, "{}", stderr(&out));
    assert!(
        stderr(&out).contains("no pitr repository"),
        "{}",
        stderr(&out)
    );
    assert!(!String::from_utf8_lossy(&out.stdout).contains("empty"));
    std::fs::write(empty.join("PG_VERSION"), "15\n").unwrap();
    let out = pitr(
        scratch.path(),
        &["--repo", &format!("file://{}", empty.display()), "info"],
        &[],
    );
    assert!(
        stderr(&out).contains("PostgreSQL data directory"),
        "{}",
        stderr(&out)
    );
    // file:relative is not silently /relative.
    let out = pitr(
        scratch.path(),
        &["--repo", "file:relative-repo", "info"],
        &[],
    );
    assert_eq!(code(&out), 1, "{}", stderr(&out));
    assert!(
        stderr(&out).contains("file:///absolute/path"),
        "{}",
        stderr(&out)
    );
    assert!(!Path::new("/relative-repo").exists());
}

/// Item 8 and A11: a store without credentials fails at once, in one line, with a hint about
/// credentials (no retries: the answer will not change).
#[test]
fn missing_credentials_fail_at_once() {
    let Some(bucket) = harness::s3_bucket() else {
        return;
    };
    let scratch = Scratch::new();
    for url in [
        format!("s3://{bucket}/no-creds"),
        "gs://pitr-no-creds/x".to_string(),
    ] {
        let out = std::process::Command::new(harness::PITR)
            .args(["--repo", &url, "info"])
            .current_dir(scratch.path())
            .env_remove("AWS_ACCESS_KEY_ID")
            .env_remove("AWS_SECRET_ACCESS_KEY")
            .env_remove("GOOGLE_SERVICE_ACCOUNT")
            .env_remove("GOOGLE_APPLICATION_CREDENTIALS")
            .output()
            .unwrap();
        let err = stderr(&out);
        assert_eq!(code(&out), 1, "{url}: {err}");
        assert!(!err.contains("retrying"), "{url}: {err}");
        assert_eq!(err.trim_end().lines().count(), 1, "{url}: {err}");
        assert!(
            err.contains("hint: the store refused the credentials or found none"),
            "{url}: {err}"
        );
    }
}

/// Whether process `pid` has installed a handler for SIGTERM (bit 15 of SigCgt in /proc).
fn catches_sigterm(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("SigCgt:"))
                .and_then(|m| u64::from_str_radix(m.trim(), 16).ok())
        })
        .is_some_and(|mask| mask & (1 << (libc::SIGTERM - 1)) != 0)
}

/// A10: SIGTERM while archive-push or archive-get waits for a store ends with the contract's exit
/// code (push: 1; get: above 125), never death by the signal (143), and nothing left in pg_wal.
#[test]
fn a_stop_signal_gets_the_contracts_exit_code() {
    let scratch = Scratch::new();
    let dir = scratch.subdir("pgdata");
    std::fs::create_dir_all(dir.join("pg_wal")).unwrap();
    let hist = dir.join("pg_wal/00000002.history");
    std::fs::write(&hist, b"1\t0/3000000\tno recovery target specified\n").unwrap();
    // A store that never answers, and a long retry budget: the command is still retrying when the
    // signal comes.
    let unreachable = harness::unreachable_s3("10m");
    for (args, want) in [
        (
            vec![
                "--repo",
                "s3://nowhere/p",
                "archive-push",
                "pg_wal/00000002.history",
            ],
            1,
        ),
        (
            vec![
                "--repo",
                "s3://nowhere/p",
                "archive-get",
                "000000010000000000000003",
                "pg_wal/RECOVERYXLOG",
            ],
            200,
        ),
    ] {
        let child = std::process::Command::new(harness::PITR)
            .args(&args)
            .current_dir(&dir)
            .envs(unreachable)
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let pid = child.id();
        harness::poll(
            "pitr to install its signal handlers",
            std::time::Duration::from_secs(30),
            || catches_sigterm(pid).then_some(()),
        );
        // SAFETY: kill with a pid we spawned and have not reaped.
        unsafe { libc::kill(pid as i32, libc::SIGTERM) };
        let out = child.wait_with_output().unwrap();
        assert_eq!(code(&out), want, "{args:?}: {}", stderr(&out));
        assert!(stderr(&out).contains("SIGTERM"), "{}", stderr(&out));
        let left: Vec<String> = std::fs::read_dir(dir.join("pg_wal"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains("pitr-tmp") || n == "RECOVERYXLOG")
            .collect();
        assert!(left.is_empty(), "{left:?}");
    }
}

/// Item 4: a closed stdout (`pitr info | true`) ends the command quietly, not with a panic.
#[test]
fn a_closed_stdout_ends_quietly() {
    let scratch = Scratch::new();
    let url = format!("file://{}", scratch.subdir("repo").display());
    make_repository(&url);
    for args in [vec!["info"], vec!["info", "--json"], vec!["metrics"]] {
        let mut all = vec!["--repo", url.as_str()];
        all.extend(args.iter().copied());
        let mut child = std::process::Command::new(harness::PITR)
            .args(&all)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // The reader goes away before pitr writes a byte.
        drop(child.stdout.take());
        let out = child.wait_with_output().unwrap();
        assert_eq!(code(&out), 0, "{args:?}: {}", stderr(&out));
        assert!(stderr(&out).is_empty(), "{args:?}: {}", stderr(&out));
    }
    // The command still ends with its own answer: verify of a repository without a backup finds
    // that, whether or not anyone reads the report.
    let child = std::process::Command::new(harness::PITR)
        .args(["--repo", url.as_str(), "verify"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut child = child;
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    assert_eq!(code(&out), 1, "{}", stderr(&out));
}

/// Item 9: configuration and environment errors are one line naming the file and line or the
/// variable, with the right hint.
#[test]
fn configuration_errors_name_the_place() {
    let scratch = Scratch::new();
    let conf = scratch.path().join("pitr.toml");
    std::fs::write(&conf, "repo = file:///x\n").unwrap();
    let conf_s = conf.to_string_lossy().into_owned();
    let out = pitr(scratch.path(), &["--config", &conf_s, "info"], &[]);
    let err = stderr(&out);
    assert_eq!(code(&out), 1, "{err}");
    assert!(
        err.contains("line 1") && err.contains("strings are quoted"),
        "{err}"
    );
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");

    let missing = scratch.path().join("missing.toml");
    let out = pitr(
        scratch.path(),
        &["--config", &missing.to_string_lossy(), "info"],
        &[],
    );
    let err = stderr(&out);
    assert_eq!(code(&out), 1, "{err}");
    assert_eq!(err.matches("No such file or directory").count(), 1, "{err}");

    let out = pitr(
        scratch.path(),
        &["--repo", "s3://bucket/p", "info"],
        &[("PITR_RETRY_BUDGET", "banana")],
    );
    let err = stderr(&out);
    assert_eq!(code(&out), 1, "{err}");
    assert!(
        err.contains("PITR_RETRY_BUDGET") && err.contains("takes a duration"),
        "{err}"
    );
    assert!(!err.contains("s3://bucket/prefix"), "{err}");
}

/// Every subcommand's usage errors exit 2 with one line on stderr (which may be PostgreSQL's log),
/// before anything touches a repository.
#[test]
fn usage_errors_are_one_line_and_exit_2() {
    let scratch = Scratch::new();
    let cases: &[&[&str]] = &[
        &["archive-push"],
        &["archive-push", "--parallel", "0", "x"],
        &["archive-get", "000000010000000000000001"],
        &["backup", "--jobs", "many"],
        &["restore", "--target-dir", "/tmp/x"],
        &[
            "restore",
            "--target-dir",
            "/tmp/x",
            "--to",
            "a",
            "--lsn",
            "0/1",
        ],
        &["restore", "--target-dir", "/tmp/x", "--stop-at-gap"],
        &["replica", "--target-dir", "/tmp/x"],
        &[
            "replica",
            "--target-dir",
            "/tmp/x",
            "--primary-conninfo",
            "x",
            "--create-slot",
        ],
        &["verify", "--jobs", "-1"],
        &["check", "--archive-timeout", "soon"],
        &["drill", "--to", "x", "--random"],
        &["expire", "--keep-full", "x"],
        &["metrics", "--bogus"],
        &["info", "--bogus"],
        &["no-such-command"],
    ];
    for args in cases {
        let mut all = vec!["--repo", "file:///nonexistent-pitr-usage"];
        all.extend_from_slice(args);
        let out = pitr(scratch.path(), &all, &[]);
        let err = stderr(&out);
        assert_eq!(code(&out), 2, "{args:?}: {err}");
        assert_eq!(err.trim_end().lines().count(), 1, "{args:?}: {err}");
        assert!(err.starts_with("pitr: error: "), "{args:?}: {err}");
    }
    assert!(!Path::new("/nonexistent-pitr-usage").exists());
}
