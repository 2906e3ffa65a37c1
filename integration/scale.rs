//! The catalog's roll-ups in a real repository: PostgreSQL 15 with 1 MiB segments archives more
//! than 512 of them through `pitr archive-push`, which rolls up each complete chunk of 256. The
//! catalog read through the roll-ups says what the one read from every summary says, an
//! incremental backup across the rolled range reads its changed blocks, a restore replays through
//! it, a segment deleted by hand from it is found before a restore writes a byte, and verify
//! repairs the roll-ups.

use std::path::Path;
use std::process::{Command, Output};

use crate::harness::{self, Cluster, Scratch, as_postgres, code, run, stderr};

fn pitr_as_postgres(scratch: &Scratch, args: &[&str]) -> Output {
    run(as_postgres(&mut Command::new(scratch.pitr_copy()))
        .args(args)
        .current_dir("/tmp"))
}

/// `pitr restore --backup ID --latest` into `target`, as the postgres user.
fn restore_from(scratch: &Scratch, url: &str, target: &str, id: &str) -> Output {
    pitr_as_postgres(
        scratch,
        &[
            "--repo",
            url,
            "restore",
            "--target-dir",
            target,
            "--backup",
            id,
            "--latest",
        ],
    )
}

fn rows(c: &Cluster) -> String {
    c.sql("SELECT coalesce(string_agg(id::text, ',' ORDER BY id), '') FROM marks")
}

fn info_json(scratch: &Scratch, url: &str) -> serde_json::Value {
    let out = harness::pitr(scratch.path(), &["--repo", url, "info", "--json"], &[]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    serde_json::from_slice(&out.stdout).unwrap()
}

fn rollups(repo: &Path) -> Vec<String> {
    let dir = repo.join("index/00000001");
    let mut v: Vec<String> = std::fs::read_dir(&dir)
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().into_string().ok())
                .filter(|n| !n.starts_with('.'))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

#[test]
fn pg15_rollups_in_a_real_repository() {
    let Some(bin) = harness::pg_bin(15) else {
        return;
    };
    let scratch = Scratch::new();
    let repo = scratch.subdir("repo");
    let url = format!("file://{}", repo.display());
    let c = Cluster::start_initdb(
        15,
        &bin,
        &format!("{{pitr}} --repo {url} archive-push %p"),
        "autovacuum = off",
        &[],
        &["--wal-segsize=1"],
    );
    c.sql("CREATE TABLE marks(id int primary key, pad text)");
    c.sql("INSERT INTO marks SELECT g, repeat('x', 200) FROM generate_series(1, 1000) g");
    let out = harness::pitr_backup(scratch.path(), &url, &c, &["-q"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    c.sql("UPDATE marks SET pad = 'changed' WHERE id <= 10");
    // Past segment 0x200 (512): chunk 256..511 complete, on timeline 1.
    c.sql(
        "SELECT count(*) FROM (SELECT pg_logical_emit_message(false, 'fill', 'x'), pg_switch_wal() FROM generate_series(1, 530)) s",
    );
    c.sql("INSERT INTO marks VALUES (1001, 'after the switches')");
    let last = c.switch_wal();
    c.wait_archived(&last);
    assert!(last.as_str() > "000000010000000000000200", "{last}");

    // archive-push rolled up chunk 1 when it stored its last segment (chunk 0 never completes:
    // a cluster's first segment is 1).
    assert_eq!(
        rollups(&repo),
        ["000000010000000000000100-0000000100000000000001FF.roll.pitr"]
    );
    let rolled = info_json(&scratch, &url);
    let roll_dir = repo.join("index");
    let moved = scratch.path().join("index-aside");
    std::fs::rename(&roll_dir, &moved).unwrap();
    let exhaustive = info_json(&scratch, &url);
    std::fs::rename(&moved, &roll_dir).unwrap();
    assert_eq!(rolled, exhaustive, "the roll-ups change what info says");
    assert!(rolled["window"]["latest"].is_string(), "{rolled}");

    // An incremental across the rolled range reads the changed blocks from the segments' own
    // summaries and is not a full backup.
    let out = harness::pitr_backup(
        scratch.path(),
        &url,
        &c,
        &["--type", "incr", "--json", "-q"],
    );
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let incr: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(incr["type"], "incr", "{incr}");
    c.sql("INSERT INTO marks VALUES (1002, 'after the incremental')");
    let last = c.switch_wal();
    c.wait_archived(&last);
    let want = rows(&c);

    // A restore from the full backup replays through the rolled chunk.
    let full = rolled["backups"][0]["id"].as_str().unwrap().to_string();
    let target = scratch.path().join("restored");
    let t = target.to_str().unwrap();
    let out = restore_from(&scratch, &url, t, &full);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let r = Cluster::existing(
        15,
        &bin,
        target.clone(),
        Scratch::new(),
        "archive_mode = off",
    );
    r.wait_promoted();
    assert_eq!(rows(&r), want);
    drop(r);

    // A segment deleted by hand from the rolled chunk: the restore lists what it replays and
    // refuses before writing anything.
    let gone = repo.join("wal/00000001/000000010000000000000150.pitr");
    let aside = scratch.path().join("segment-aside");
    std::fs::copy(&gone, &aside).unwrap();
    std::fs::remove_file(&gone).unwrap();
    let target2 = scratch.path().join("restored-2");
    let t2 = target2.to_str().unwrap();
    let out = restore_from(&scratch, &url, t2, &full);
    assert_ne!(code(&out), 0);
    assert!(
        stderr(&out).contains("000000010000000000000150"),
        "{}",
        stderr(&out)
    );
    assert!(
        !target2.exists(),
        "the refused restore wrote {}",
        target2.display()
    );

    // verify reports the gap, removes the stale roll-up and (the chunk no longer complete)
    // writes none; info then shows the gap.
    let out = harness::pitr(scratch.path(), &["--repo", &url, "verify", "--json"], &[]);
    assert_eq!(code(&out), 1, "{}", stderr(&out));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["rollups_removed"], 1, "{report}");
    assert_eq!(report["rollups_written"], 0, "{report}");
    let findings = report["findings"].as_array().unwrap();
    assert!(findings.iter().any(|f| f["kind"] == "gap"), "{report}");
    // The roll-up listed it: archived, then deleted.
    assert!(
        findings.iter().any(|f| f["kind"] == "missing"
            && f["object"] == "wal/00000001/000000010000000000000150.pitr"),
        "{report}"
    );
    assert!(rollups(&repo).is_empty());
    let after = info_json(&scratch, &url);
    assert_eq!(
        after["timelines"][0]["gaps"][0]["after"], "00000001000000000000014F",
        "{after}"
    );

    // The segment back (as a person would put it back): verify finds nothing and rolls the
    // chunk up again.
    std::fs::copy(&aside, &gone).unwrap();
    let out = harness::pitr(scratch.path(), &["--repo", &url, "verify", "--json"], &[]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["rollups_written"], 1, "{report}");
    assert_eq!(rollups(&repo).len(), 1);
    assert_eq!(
        info_json(&scratch, &url),
        exhaustive_now(&scratch, &url, &repo)
    );
}

/// `info --json` read with the roll-ups moved out of the way.
fn exhaustive_now(scratch: &Scratch, url: &str, repo: &Path) -> serde_json::Value {
    let moved = scratch.path().join("index-aside-2");
    std::fs::rename(repo.join("index"), &moved).unwrap();
    let v = info_json(scratch, url);
    std::fs::rename(&moved, repo.join("index")).unwrap();
    v
}
