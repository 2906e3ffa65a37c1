//! `pitr receive` against real PostgreSQL 15 and 18 with `archive_mode = off`: WAL streamed over
//! the replication protocol through a slot it creates lands in the repository segment by
//! segment, identical to the server's own `pg_wal` files; killed and started again it resumes
//! from the slot with no gap; the slot's position follows what is stored.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::harness::{self, Cluster, Scratch, code, pitr, poll, stderr};

/// The segment files a local repository holds (no `.partial`, no history), sorted.
fn stored_segments(repo: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let Ok(tlis) = std::fs::read_dir(repo.join("wal")) else {
        return out;
    };
    for tli in tlis.flatten() {
        let Ok(files) = std::fs::read_dir(tli.path()) else {
            continue;
        };
        for f in files.flatten() {
            let name = f.file_name().to_string_lossy().into_owned();
            if let Some(seg) = name.strip_suffix(".pitr")
                && seg.len() == 24
                && seg.bytes().all(|b| b.is_ascii_hexdigit())
            {
                out.push(seg.to_string());
            }
        }
    }
    out.sort();
    out
}

fn start_receive(scratch: &Scratch, url: &str, conninfo: &str, log: &Path) -> Child {
    let log = std::fs::File::create(log).unwrap();
    Command::new(scratch.pitr_copy())
        .args([
            "--repo",
            url,
            "receive",
            "--dbname",
            conninfo,
            "--slot",
            "pitr_receive",
            "--create-slot",
            "--status-interval",
            "200ms",
        ])
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap()
}

fn receive_streams_into_the_repository(major: u32) {
    let Some(bin) = harness::pg_bin(major) else {
        return;
    };
    let scratch = Scratch::new();
    let repo = scratch.subdir("repo");
    let url = format!("file://{}", repo.display());
    let c = Cluster::start(major, &bin, "false", "archive_mode = off", &[]);
    let conninfo = format!("host={} user=postgres", c.sock.display());
    let log = scratch.path().join("receive.log");
    let mut rx = start_receive(&scratch, &url, &conninfo, &log);
    let wait_stored = |seg: &str| {
        poll(
            &format!("{seg} in the repository"),
            Duration::from_secs(60),
            || {
                stored_segments(&repo)
                    .iter()
                    .any(|s| s.as_str() >= seg)
                    .then_some(())
            },
        )
    };
    c.sql("CREATE TABLE t(i int, pad text)");
    // Rows in `rounds`, each round ending its segment; the last segment closed.
    let write = |rounds: std::ops::Range<i32>| {
        let mut last = String::new();
        for round in rounds {
            c.sql(&format!(
                "INSERT INTO t SELECT g, repeat('x', 200) FROM generate_series({}, {}) g",
                round * 1000,
                round * 1000 + 999
            ));
            last = c.switch_wal();
        }
        last
    };
    let last = write(0..3);
    wait_stored(&last);
    let first_run = stored_segments(&repo);

    // Killed, more WAL meanwhile, started again: it resumes from the slot.
    rx.kill().unwrap();
    rx.wait().unwrap();
    let last = write(3..6);
    let log2 = scratch.path().join("receive-again.log");
    let mut rx = start_receive(&scratch, &url, &conninfo, &log2);
    wait_stored(&last);

    // Every stored segment is the server's own, byte for byte, with no gap between them.
    let stored = stored_segments(&repo);
    let numbers: Vec<u64> = stored
        .iter()
        .map(|s| u64::from_str_radix(&s[16..], 16).unwrap())
        .collect();
    for w in numbers.windows(2) {
        assert_eq!(w[1], w[0] + 1, "a gap in the stored segments: {stored:?}");
    }
    let work = scratch.subdir("got");
    for seg in &stored {
        let dest = work.join(seg);
        let out = pitr(
            scratch.path(),
            &["--repo", &url, "archive-get", seg, dest.to_str().unwrap()],
            &[],
        );
        assert_eq!(code(&out), 0, "{seg}: {}", stderr(&out));
        let theirs = std::fs::read(c.data.join("pg_wal").join(seg)).unwrap();
        assert!(
            std::fs::read(&dest).unwrap() == theirs,
            "{seg} differs from the server's pg_wal copy"
        );
    }
    // The slot follows what is stored.
    let log_id = u64::from_str_radix(&last[8..16], 16).unwrap();
    let seg_id = u64::from_str_radix(&last[16..], 16).unwrap();
    let end = ((log_id << 8) + seg_id + 1) << 24; // 16 MiB segments
    let last_end = format!("{:X}/{:X}", end >> 32, end & 0xFFFF_FFFF);
    poll(
        "the slot to reach what is stored",
        Duration::from_secs(30),
        || {
            (c.sql(&format!(
            "SELECT restart_lsn >= '{last_end}' FROM pg_replication_slots WHERE slot_name = 'pitr_receive'"
        )) == "t")
            .then_some(())
        },
    );
    rx.kill().unwrap();
    rx.wait().unwrap();
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(
        logged.contains("created physical replication slot"),
        "{logged}"
    );
    eprintln!(
        "PG {major}: receive stored {} segment(s) ({} before the kill), {}..{}, each identical to pg_wal; slot at or past {last_end}",
        stored.len(),
        first_run.len(),
        stored.first().unwrap(),
        stored.last().unwrap()
    );
}

#[test]
fn pg15_receive_streams_into_the_repository() {
    receive_streams_into_the_repository(15);
}

#[test]
fn pg18_receive_streams_into_the_repository() {
    receive_streams_into_the_repository(18);
}

/// A slot that does not exist, without --create-slot: a one-line error naming it, exit 1.
#[test]
fn receive_refuses_a_missing_slot() {
    let Some(bin) = harness::pg_bin(15) else {
        return;
    };
    let scratch = Scratch::new();
    let url = format!("file://{}", scratch.subdir("repo").display());
    let c = Cluster::start(15, &bin, "false", "archive_mode = off", &[]);
    let conninfo = format!("host={} user=postgres", c.sock.display());
    let out = pitr(
        scratch.path(),
        &[
            "--repo", &url, "receive", "--dbname", &conninfo, "--slot", "nope",
        ],
        &[],
    );
    assert_eq!(code(&out), 1, "{}", stderr(&out));
    assert!(
        stderr(&out).contains("\"nope\" does not exist") && stderr(&out).contains("--create-slot"),
        "{}",
        stderr(&out)
    );
}
