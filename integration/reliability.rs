//! Defects found outside testing (issue "Reliability"), each with the test that would have caught it.

use std::path::Path;

use crate::harness::{self, Scratch, code, pitr, stderr};

use crate::harness::block_on;

/// Make `url` a repository (its `pitr.json`) holding nothing else.
fn make_repository(url: &str) {
    let repo = pitr::storage::Repo::create(url).unwrap();
    let id = pitr::storage::identity::RepoIdentity {
        format_version: pitr::storage::identity::FORMAT_VERSION,
        system_identifier: "7000000000000000001".into(),
        pg_version: 15,
        wal_segment_size: 16 << 20,
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
