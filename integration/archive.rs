//! archive-push / archive-get against real clusters: every archived segment round-trips byte for
//! byte, and every bad input is refused with exit 1 and nothing stored.

use std::path::{Path, PathBuf};
use std::time::Instant;

use object_store::ObjectStoreExt;

use crate::harness::{self, Cluster, Scratch, code, pitr, stderr};

/// A repository kind the tests run against.
#[derive(Clone, Debug)]
enum RepoKind {
    Local,
    S3 { bucket: String },
    Azure { container: String },
}

impl RepoKind {
    /// A fresh, empty repository URL.
    fn fresh_url(&self, scratch: &Scratch, name: &str) -> String {
        match self {
            RepoKind::Local => format!("file://{}", scratch.subdir(name).display()),
            RepoKind::S3 { bucket: b } | RepoKind::Azure { container: b } => {
                let unique = format!(
                    "{}-{}-{}",
                    name,
                    std::process::id(),
                    scratch.path().file_name().unwrap().to_string_lossy()
                );
                let scheme = if matches!(self, RepoKind::S3 { .. }) {
                    "s3"
                } else {
                    "az"
                };
                format!("{scheme}://{b}/{unique}")
            }
        }
    }
}

/// The S3 server started by `scripts/test`, if any (required under CI).
fn s3() -> Option<RepoKind> {
    harness::s3_bucket().map(|bucket| RepoKind::S3 { bucket })
}

use crate::harness::block_on;

/// Flip one byte of a stored object in place (bypassing pitr).
fn corrupt_object(url: &str, key: &str, at_from_end: usize) {
    let repo = pitr::storage::Repo::open(url).unwrap();
    block_on(async {
        let path = object_store::path::Path::from(key);
        let mut raw = repo
            .store()
            .get(&path)
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap()
            .to_vec();
        // From the end of the payload: a segment carries its summary after it (the trailer,
        // whose length is in header bytes 9..12).
        let trailer = if raw.starts_with(b"PITROBJ2") {
            u32::from_le_bytes([raw[9], raw[10], raw[11], 0]) as usize
        } else {
            0
        };
        let i = raw.len() - trailer - at_from_end;
        raw[i] ^= 0x40;
        repo.store().put(&path, raw.into()).await.unwrap();
    });
}

fn object_exists(url: &str, key: &str) -> bool {
    let repo = pitr::storage::Repo::open(url).unwrap();
    block_on(async {
        repo.store()
            .head(&object_store::path::Path::from(key))
            .await
            .is_ok()
    })
}

fn seg_key(name: &str) -> String {
    format!("wal/{}/{name}.pitr", &name[..8])
}

/// archive-get `name` from `url` into `dir`, returning (exit code, bytes if written).
fn get(url: &str, name: &str, dir: &Path) -> (i32, Option<Vec<u8>>, String) {
    let dest = dir.join("RECOVERYXLOG");
    let _ = std::fs::remove_file(&dest);
    let out = pitr(
        dir,
        &["--repo", url, "archive-get", name, "pg_wal_dest"],
        &[],
    );
    let _ = dest;
    let written = dir.join("pg_wal_dest");
    let bytes = std::fs::read(&written).ok();
    let _ = std::fs::remove_file(&written);
    (code(&out), bytes, stderr(&out))
}

fn push(url: &str, file: &Path, extra: &[&str]) -> (i32, String) {
    let mut args = vec!["--repo", url];
    args.extend_from_slice(extra);
    let f = file.to_str().unwrap();
    args.extend_from_slice(&["archive-push", f]);
    let out = pitr(file.parent().unwrap(), &args, &[]);
    (code(&out), stderr(&out))
}

/// Put `bytes` in a fresh directory under the file name `name`.
fn file_named(scratch: &Scratch, dir: &str, name: &str, bytes: &[u8]) -> PathBuf {
    let p = scratch.subdir(dir).join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

fn generate_wal(c: &Cluster) -> String {
    c.sql("CREATE TABLE t(id int primary key, pad text)");
    c.sql("INSERT INTO t SELECT g, repeat(md5(g::text), 4) FROM generate_series(1, 40000) g");
    c.switch_wal();
    c.sql("UPDATE t SET pad = upper(pad) WHERE id % 2 = 0");
    c.sql("CHECKPOINT");
    c.switch_wal();
    c.sql("INSERT INTO t SELECT g, 'x' FROM generate_series(40001, 60000) g");
    c.switch_wal();
    c.sql("SELECT pg_create_restore_point('rp1')");
    c.switch_wal()
}

fn archive_round_trip(major: u32, kind: RepoKind) {
    let Some(bin) = harness::pg_bin(major) else {
        return;
    };
    let scratch = Scratch::new();
    let url = kind.fresh_url(&scratch, "repo");
    let cmd = format!("{{pitr}} --repo {url} archive-push %p");
    let c = Cluster::start(major, &bin, &cmd, "", &[]);
    let last = generate_wal(&c);
    c.wait_archived(&last);

    // Every segment the server archived comes back byte for byte.
    let segments = c.archived_segments();
    assert!(
        segments.len() >= 4,
        "expected at least 4 archived segments, got {segments:?}"
    );
    let work = scratch.subdir("work");
    for seg in &segments {
        let original = std::fs::read(c.data.join("pg_wal").join(seg)).unwrap();
        let (rc, got, err) = get(&url, seg, &work);
        assert_eq!(rc, 0, "archive-get {seg}: {err}");
        assert!(
            got.as_deref() == Some(&original[..]),
            "{seg} differs after the round trip"
        );
    }

    // Push timing on these real segments into a fresh repository of the same kind.
    let timing_url = kind.fresh_url(&scratch, "timing");
    let start = Instant::now();
    for seg in &segments {
        let (rc, err) = push(&timing_url, &c.data.join("pg_wal").join(seg), &[]);
        assert_eq!(rc, 0, "{err}");
    }
    let per = start.elapsed().as_secs_f64() * 1e3 / segments.len() as f64;
    eprintln!(
        "PG {major} {kind:?}: {} segments round-tripped; archive-push {per:.1} ms per segment (debug build, whole process)",
        segments.len()
    );

    let first = &segments[0];
    let first_path = c.data.join("pg_wal").join(first);
    let original = std::fs::read(&first_path).unwrap();

    // Identical duplicate: success, nothing changes.
    let (rc, err) = push(&url, &first_path, &[]);
    assert_eq!(rc, 0, "identical re-push must succeed: {err}");
    assert!(err.contains("already archived"), "{err}");

    // Conflicting duplicate: exit 1, the stored object untouched.
    let mut changed = original.clone();
    changed[8192 * 3 + 123] ^= 0xFF;
    let p = file_named(&scratch, "conflict", first, &changed);
    let (rc, err) = push(&url, &p, &[]);
    assert_eq!(rc, 1, "conflicting push must fail with 1: {err}");
    assert!(
        err.contains(first) && err.contains("different content") && err.contains("hint:"),
        "{err}"
    );
    assert_eq!(
        get(&url, first, &work).1.as_deref(),
        Some(&original[..]),
        "stored object was modified"
    );

    // Random bytes, a truncated segment: exit 1, nothing stored.
    let junk: Vec<u8> = (0..16u32 << 20)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    let p = file_named(&scratch, "junk", "0000000100000000000000F0", &junk);
    let (rc, err) = push(&url, &p, &[]);
    assert_eq!(rc, 1, "{err}");
    assert!(
        err.contains("0000000100000000000000F0") && err.contains("magic"),
        "{err}"
    );
    assert!(!object_exists(&url, &seg_key("0000000100000000000000F0")));

    let last_seg = segments.last().unwrap();
    let truncated = &std::fs::read(c.data.join("pg_wal").join(last_seg)).unwrap()[..3 << 20];
    let fresh = kind.fresh_url(&scratch, "truncated");
    let p = file_named(&scratch, "trunc", last_seg, truncated);
    let (rc, err) = push(&fresh, &p, &[]);
    assert_eq!(rc, 1, "{err}");
    assert!(
        err.contains("truncated") && err.contains(last_seg.as_str()),
        "{err}"
    );
    assert!(!object_exists(&fresh, &seg_key(last_seg)));

    // A segment of another cluster (its own initdb): refused, ours untouched.
    let other = scratch.path().join("other");
    harness::initdb(&bin, &other);
    let theirs = other.join("pg_wal/000000010000000000000001");
    let (rc, err) = push(&url, &theirs, &[]);
    assert_eq!(rc, 1, "{err}");
    assert!(err.contains("belongs to cluster"), "{err}");
    // wal_keep_size (the harness sets 2 GB) keeps segment 1 in pg_wal to compare with.
    let ours = std::fs::read(c.data.join("pg_wal/000000010000000000000001"))
        .expect("segment 1 is still in pg_wal");
    assert_eq!(get(&url, "000000010000000000000001", &work).1, Some(ours));

    // Not a WAL file at all.
    let (rc, err) = push(&url, &c.data.join("postgresql.conf"), &[]);
    assert_eq!(rc, 1, "{err}");
    assert!(err.contains("not a WAL file name"), "{err}");

    // Missing segment and history files: exit 1, nothing written.
    for missing in [
        "0000000100000000000000FE",
        "00000002.history",
        "00000001.history",
    ] {
        let (rc, got, err) = get(&url, missing, &work);
        assert_eq!((rc, got.is_none()), (1, true), "{missing}: {err}");
    }

    // History files: stored, idempotent, never overwritten.
    let hist = b"1\t0/9000000\tno recovery target specified\n";
    let p = file_named(&scratch, "hist", "00000002.history", hist);
    assert_eq!(push(&url, &p, &[]).0, 0);
    assert_eq!(push(&url, &p, &[]).0, 0);
    let p2 = file_named(
        &scratch,
        "hist2",
        "00000002.history",
        b"1\t0/A000000\tother\n",
    );
    let (rc, err) = push(&url, &p2, &[]);
    assert_eq!(rc, 1, "{err}");
    assert_eq!(
        get(&url, "00000002.history", &work).1.as_deref(),
        Some(&hist[..])
    );
    let p3 = file_named(&scratch, "hist3", "00000003.history", b"\x00\x01garbage");
    assert_eq!(push(&url, &p3, &[]).0, 1);

    // A corrupt stored object: archive-get stops recovery (exit > 125) and writes nothing.
    corrupt_object(&url, &seg_key(first), 100);
    let (rc, got, err) = get(&url, first, &work);
    assert_eq!(rc, 200, "{err}");
    assert!(
        got.is_none() && err.contains("corrupt") && err.contains(first),
        "{err}"
    );
    assert_eq!(
        std::fs::read_dir(&work).unwrap().count(),
        0,
        "temp files left behind"
    );

    drop(c);
}

#[test]
fn pg15_local_round_trip() {
    archive_round_trip(15, RepoKind::Local);
}

#[test]
fn pg18_local_round_trip() {
    archive_round_trip(18, RepoKind::Local);
}

#[test]
fn pg15_s3_round_trip() {
    if let Some(kind) = s3() {
        archive_round_trip(15, kind);
    }
}

/// The same against Azurite: `az://` for real.
#[test]
fn pg15_azure_round_trip() {
    if let Some(container) = harness::azure_container() {
        archive_round_trip(15, RepoKind::Azure { container });
    }
}

#[test]
fn pg18_s3_round_trip() {
    if let Some(kind) = s3() {
        archive_round_trip(18, kind);
    }
}

/// Conditional creates on the S3 server, and pitr's fallback where they are switched off.
#[test]
fn s3_conditional_create() {
    let Some(kind) = s3() else { return };
    let Some(bin) = harness::pg_bin(15) else {
        return;
    };
    let scratch = Scratch::new();
    let url = kind.fresh_url(&scratch, "cond");

    // What the server does with If-None-Match: a second create of one key must be refused.
    let repo = pitr::storage::Repo::open(&url).unwrap();
    block_on(async {
        let path = object_store::path::Path::from("probe");
        let opts = || object_store::PutOptions {
            mode: object_store::PutMode::Create,
            ..Default::default()
        };
        repo.store()
            .put_opts(&path, b"a".to_vec().into(), opts())
            .await
            .unwrap();
        let second = repo
            .store()
            .put_opts(&path, b"b".to_vec().into(), opts())
            .await;
        assert!(
            matches!(second, Err(object_store::Error::AlreadyExists { .. })),
            "server overwrote: {second:?}"
        );
    });

    // With conditional puts disabled pitr looks first and reads back: same answers.
    let data = scratch.path().join("data");
    harness::initdb(&bin, &data);
    let seg = data.join("pg_wal/000000010000000000000001");
    let env = [("AWS_CONDITIONAL_PUT", "disabled")];
    let run = |file: &Path| {
        let out = pitr(
            file.parent().unwrap(),
            &["--repo", &url, "archive-push", file.to_str().unwrap()],
            &env,
        );
        (code(&out), stderr(&out))
    };
    assert_eq!(run(&seg), (0, String::new()));
    assert_eq!(run(&seg).0, 0);
    let mut changed = std::fs::read(&seg).unwrap();
    changed[9000] ^= 1;
    let p = file_named(&scratch, "x", "000000010000000000000001", &changed);
    let (rc, err) = run(&p);
    assert_eq!(rc, 1, "{err}");
    let (rc, got, _) = get(&url, "000000010000000000000001", &scratch.subdir("w"));
    assert_eq!((rc, got), (0, Some(std::fs::read(&seg).unwrap())));
}

/// restore_command exit codes: an unreachable store stops recovery, except on a standby, which asks
/// again; a corrupt object stops both.
#[test]
fn archive_get_exit_codes() {
    let scratch = Scratch::new();
    let dir = scratch.subdir("pgdata");
    // Retries within a short budget, then the contract's answer.
    let unreachable = harness::unreachable_s3("1s");
    let args = [
        "--repo",
        "s3://nowhere/p",
        "archive-get",
        "000000010000000000000003",
        "pg_wal/RECOVERYXLOG",
    ];
    std::fs::create_dir_all(dir.join("pg_wal")).unwrap();
    let out = pitr(&dir, &args, &unreachable);
    assert_eq!(code(&out), 200, "{}", stderr(&out));
    assert!(
        stderr(&out).contains("000000010000000000000003"),
        "{}",
        stderr(&out)
    );
    std::fs::write(dir.join("standby.signal"), b"").unwrap();
    let out = pitr(&dir, &args, &unreachable);
    assert_eq!(code(&out), 1, "{}", stderr(&out));
    assert!(!dir.join("pg_wal/RECOVERYXLOG").exists());

    // Corrupt object on a standby: still stops.
    let url = format!("file://{}", scratch.subdir("repo").display());
    let hist = file_named(
        &scratch,
        "h",
        "00000002.history",
        b"1\t0/3000000\tno recovery target specified\n",
    );
    assert_eq!(push(&url, &hist, &[]).0, 0);
    corrupt_object(&url, "wal/history/00000002.history.pitr", 3);
    let out = pitr(
        &dir,
        &[
            "--repo",
            &url,
            "archive-get",
            "00000002.history",
            "pg_wal/RECOVERYHISTORY",
        ],
        &[],
    );
    assert_eq!(code(&out), 200, "{}", stderr(&out));
    assert!(!dir.join("pg_wal/RECOVERYHISTORY").exists());

    // No repository configured: a clear usage failure naming what to set.
    let out = pitr(
        &dir,
        &["archive-push", "pg_wal/000000010000000000000001"],
        &[],
    );
    assert_eq!(code(&out), 1);
    assert!(stderr(&out).contains("PITR_REPO"), "{}", stderr(&out));
}

/// Global flags before or after the subcommand, and from a config file / environment.
#[test]
fn flags_env_and_config_file() {
    let Some(bin) = harness::pg_bin(15).or_else(|| harness::pg_bin(18)) else {
        return;
    };
    let scratch = Scratch::new();
    let data = scratch.path().join("data");
    harness::initdb(&bin, &data);
    let seg = data.join("pg_wal/000000010000000000000001");
    let seg_s = seg.to_str().unwrap();
    let work = scratch.subdir("w");
    let original = std::fs::read(&seg).unwrap();

    let url_a = format!("file://{}", scratch.subdir("a").display());
    let out = pitr(
        &work,
        &["archive-push", seg_s, "--repo", &url_a, "--compress", "lz4"],
        &[],
    );
    assert_eq!(code(&out), 0, "{}", stderr(&out));

    let url_b = format!("file://{}", scratch.subdir("b").display());
    let out = pitr(
        &work,
        &["archive-push", seg_s],
        &[("PITR_REPO", &url_b), ("PITR_COMPRESS", "none")],
    );
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    // Uncompressed: the object is the 32-byte header, the segment, and the trailer that
    // carries its summary (as long as header bytes 9..12 say).
    let stored = std::fs::read(
        scratch
            .path()
            .join("b")
            .join(seg_key("000000010000000000000001")),
    )
    .unwrap();
    let trailer = u32::from_le_bytes([stored[9], stored[10], stored[11], 0]) as usize;
    assert!(trailer > 16, "{trailer}");
    assert_eq!(stored.len(), original.len() + 32 + trailer);
    assert_eq!(&stored[32..32 + original.len()], &original[..]);

    let url_c = format!("file://{}", scratch.subdir("c").display());
    let conf = scratch.path().join("pitr.toml");
    std::fs::write(&conf, format!("repo = \"{url_c}\"\ncompress = \"zstd\"\n")).unwrap();
    let out = pitr(
        &work,
        &["--config", conf.to_str().unwrap(), "archive-push", seg_s],
        &[],
    );
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    for url in [&url_a, &url_b, &url_c] {
        assert_eq!(
            get(url, "000000010000000000000001", &work).1.as_deref(),
            Some(&original[..]),
            "{url}"
        );
    }
}

/// Async archiving against a store 50 ms away: `--parallel 8` archives the same burst of segments
/// as one at a time does, every segment is stored byte for byte, and no marker outlives its segment.
/// (The rates are printed; the speed-up is measured by `scripts/bench`, not asserted here.)
#[test]
fn async_archiving_through_a_slow_store() {
    let Some(bucket) = harness::s3_bucket() else {
        return;
    };
    let Some(bin) = harness::pg_bin(15) else {
        return;
    };
    let proxy = harness::LatencyProxy::start(50);
    let mut rates = vec![];
    for parallel in [1, 8] {
        let url = format!("s3://{bucket}/async-{parallel}-{}", std::process::id());
        // Archiving off while a backlog of 40 segments builds up, then on: how fast it drains.
        let c = Cluster::start_initdb(
            15,
            &bin,
            "",
            "autovacuum = off",
            &[("AWS_ENDPOINT_URL", proxy.endpoint.as_str())],
            &["--wal-segsize=1"],
        );
        c.sql("CREATE TABLE t(i int)");
        let mut last = String::new();
        for i in 0..40 {
            c.sql(&format!("INSERT INTO t VALUES ({i})"));
            last = c.switch_wal();
        }
        let pitr_bin = c.scratch.pitr_copy();
        let started = std::time::Instant::now();
        c.sql(&format!(
            "ALTER SYSTEM SET archive_command = '{} --repo {url} archive-push --parallel {parallel} %p'",
            pitr_bin.display()
        ));
        c.sql("SELECT pg_reload_conf()");
        c.wait_archived(&last);
        let secs = started.elapsed().as_secs_f64();
        let count = c.archived_segments().len();
        rates.push(count as f64 / secs);
        eprintln!(
            "--parallel {parallel}: a backlog of {count} segments archived through 50 ms/request in {secs:.1} s ({:.1} segments/s)",
            count as f64 / secs
        );

        // Every archived segment comes back byte for byte (read directly, without the delay).
        let scratch = Scratch::new();
        let archived = c.archived_segments();
        assert!(archived.len() >= 40, "{archived:?}");
        for seg in &archived {
            let dest = scratch.path().join(seg);
            let out = pitr(
                scratch.path(),
                &["--repo", &url, "archive-get", seg, dest.to_str().unwrap()],
                &[],
            );
            assert_eq!(code(&out), 0, "{seg}: {}", stderr(&out));
            assert_eq!(
                std::fs::read(&dest).unwrap(),
                std::fs::read(c.data.join("pg_wal").join(seg)).unwrap(),
                "{seg} differs"
            );
        }
        let markers = c.data.join("pg_wal/pitr_push");
        let left: Vec<String> = std::fs::read_dir(&markers)
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        assert!(left.is_empty(), "markers left behind: {left:?}");
    }
    // How much faster is a benchmark's question (scripts/bench measures it against pgBackRest on
    // the same machine); on a shared machine a timed assertion here would only be noise.
    eprintln!(
        "--parallel 8 archived {:.1} segments/s, one at a time {:.1}",
        rates[1], rates[0]
    );
}
