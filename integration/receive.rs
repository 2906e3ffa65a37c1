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
    start_receive_with(scratch, url, conninfo, log, &[])
}

fn start_receive_with(
    scratch: &Scratch,
    url: &str,
    conninfo: &str,
    log: &Path,
    extra: &[&str],
) -> Child {
    let log = std::fs::File::create(log).unwrap();
    // As the server's user, as a service would run it (and as restore_command reads it back).
    harness::as_postgres(&mut Command::new(scratch.pitr_copy()))
        .current_dir("/tmp")
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
        .args(extra)
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

    // Killed under load (pgbench), a segment and more written meanwhile, started again while the
    // load goes on: it resumes from the slot.
    let init = c.client("pgbench", &["-i", "-s", "1", "postgres"]);
    assert!(init.status.success(), "{}", stderr(&init));
    let mut load = Command::new(bin.join("pgbench"))
        .args([
            "-h",
            c.sock.to_str().unwrap(),
            "-U",
            "postgres",
            "-n",
            "-c",
            "2",
            "-T",
            "8",
            "postgres",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let wal_file = || c.sql("SELECT pg_walfile_name(pg_current_wal_insert_lsn())");
    let at_kill = wal_file();
    rx.kill().unwrap();
    rx.wait().unwrap();
    poll(
        "a segment written while receive is down",
        Duration::from_secs(60),
        || (wal_file() > at_kill || load.try_wait().unwrap().is_some()).then_some(()),
    );
    let log2 = scratch.path().join("receive-again.log");
    let mut rx = start_receive(&scratch, &url, &conninfo, &log2);
    let loaded = poll("pgbench to end", Duration::from_secs(60), || {
        load.try_wait().unwrap()
    });
    assert!(loaded.success());
    let last = write(3..6);
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
        || slot_reached(&c, &last_end).then_some(()),
    );
    rx.kill().unwrap();
    rx.wait().unwrap();
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(
        logged.contains("created physical replication slot"),
        "{logged}"
    );
    eprintln!(
        "PG {major}: receive stored {} segment(s) ({} before it was killed under pgbench load), {}..{}, each identical to pg_wal; slot at or past {last_end}",
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

/// Restore `url` to its latest WAL into a new directory as the postgres user, start it, and
/// return the rows of `marks`.
fn restore_latest_rows(scratch: &Scratch, url: &str, major: u32, bin: &Path, name: &str) -> String {
    let target = scratch.path().join(name);
    let out = harness::run(
        harness::as_postgres(&mut Command::new(scratch.pitr_copy()))
            .args([
                "--repo",
                url,
                "restore",
                "--target-dir",
                target.to_str().unwrap(),
                "--latest",
            ])
            .current_dir("/tmp"),
    );
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let r = Cluster::existing(major, bin, target, Scratch::new(), "archive_mode = off");
    r.wait_promoted();
    r.sql("SELECT coalesce(string_agg(id::text, ',' ORDER BY id), '') FROM marks")
}

/// Whether the slot's position (which `receive` moves only to what is stored) reached `lsn`.
fn slot_reached(c: &Cluster, lsn: &str) -> bool {
    c.sql(&format!(
        "SELECT restart_lsn >= '{lsn}' FROM pg_replication_slots WHERE slot_name = 'pitr_receive'"
    )) == "t"
}

/// A commit in the middle of a segment, the server crashed before the segment ends: the
/// repository holds it, because receive stores the part of the segment in progress.
fn a_commit_before_its_segment_ends_is_in_the_repository(major: u32) {
    let Some(bin) = harness::pg_bin(major) else {
        return;
    };
    let scratch = Scratch::new();
    let url = format!("file://{}", scratch.subdir("repo").display());
    let mut c = Cluster::start(major, &bin, "false", "archive_mode = off", &[]);
    let conninfo = format!("host={} user=postgres", c.sock.display());
    let log = scratch.path().join("receive.log");
    let mut rx = start_receive_with(
        &scratch,
        &url,
        &conninfo,
        &log,
        &["--flush-interval", "200ms"],
    );
    c.sql("CREATE TABLE marks(id int primary key)");
    c.sql("INSERT INTO marks VALUES (1)");
    poll("receive to stream", Duration::from_secs(30), || {
        (c.sql("SELECT count(*) FROM pg_stat_replication WHERE application_name = 'pitr' AND state = 'streaming'") == "1").then_some(())
    });
    let out = harness::pitr_backup(scratch.path(), &url, &c, &["-q"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    c.sql("INSERT INTO marks VALUES (2)");
    let commit = c.sql("SELECT pg_current_wal_flush_lsn()");
    let started = std::time::Instant::now();
    poll(
        "receive to store the commit",
        Duration::from_secs(30),
        || slot_reached(&c, &commit).then_some(()),
    );
    let lag = started.elapsed();
    // `pitr metrics` shows where receive stands.
    let (hi, lo) = commit.split_once('/').unwrap();
    let commit_bytes =
        (u64::from_str_radix(hi, 16).unwrap() << 32) | u64::from_str_radix(lo, 16).unwrap();
    let metrics = poll(
        "metrics to show the commit stored",
        Duration::from_secs(30),
        || {
            let out = pitr(scratch.path(), &["--repo", &url, "metrics"], &[]);
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            let stored = text
                .lines()
                .find_map(|l| l.strip_prefix("pitr_receive_stored_lsn_bytes "))
                .and_then(|v| v.parse::<f64>().ok())?;
            (stored >= commit_bytes as f64).then_some(text)
        },
    );
    assert!(metrics.contains("pitr_receive_lag_bytes "), "{metrics}");
    let out = pitr(scratch.path(), &["--repo", &url, "info", "--json"], &[]);
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(info["receive"]["stored_lsn"].is_string(), "{info:#}");
    let text =
        String::from_utf8_lossy(&pitr(scratch.path(), &["--repo", &url, "info"], &[]).stdout)
            .into_owned();
    assert!(text.contains("receive      from"), "{text}");
    c.crash();
    rx.kill().unwrap();
    rx.wait().unwrap();
    assert_eq!(
        restore_latest_rows(&scratch, &url, major, &bin, "restored"),
        "1,2"
    );
    eprintln!(
        "PG {major}: a commit at {commit}, in the middle of its segment, was in the repository within {:.0} ms (flush interval 200 ms); restored after a crash: rows 1,2",
        lag.as_secs_f64() * 1e3
    );
}

#[test]
fn pg15_a_commit_before_its_segment_ends_is_in_the_repository() {
    a_commit_before_its_segment_ends_is_in_the_repository(15);
}

#[test]
fn pg18_a_commit_before_its_segment_ends_is_in_the_repository() {
    a_commit_before_its_segment_ends_is_in_the_repository(18);
}

/// `--synchronous` with `synchronous_standby_names = 'pitr'`: a commit waits while receive is
/// stopped and returns once it runs; a commit that returned is in the repository even when the
/// server crashes right after it.
fn synchronous_receive_holds_every_commit_that_returned(major: u32) {
    let Some(bin) = harness::pg_bin(major) else {
        return;
    };
    let scratch = Scratch::new();
    let url = format!("file://{}", scratch.subdir("repo").display());
    let mut c = Cluster::start(
        major,
        &bin,
        "false",
        "archive_mode = off\nsynchronous_standby_names = 'pitr'",
        &[],
    );
    let conninfo = format!("host={} user=postgres", c.sock.display());
    let sync = ["--synchronous", "--flush-interval", "10s"];
    let mut rx = start_receive_with(
        &scratch,
        &url,
        &conninfo,
        &scratch.path().join("rx1.log"),
        &sync,
    );
    c.sql("CREATE TABLE marks(id int primary key)");
    c.sql("INSERT INTO marks VALUES (1)");
    poll(
        "receive to be the synchronous standby",
        Duration::from_secs(30),
        || {
            (c.sql("SELECT count(*) FROM pg_stat_replication WHERE application_name = 'pitr' AND sync_state = 'sync'") == "1").then_some(())
        },
    );
    let out = harness::pitr_backup(scratch.path(), &url, &c, &["-q"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));

    // Stopped: a commit waits for it.
    rx.kill().unwrap();
    rx.wait().unwrap();
    let mut waiting = Command::new(bin.join("psql"))
        .args([
            "-h",
            c.sock.to_str().unwrap(),
            "-U",
            "postgres",
            "-d",
            "postgres",
            "-Atc",
            "INSERT INTO marks VALUES (2)",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    poll(
        "the commit to wait for the synchronous standby",
        Duration::from_secs(30),
        || {
            (c.sql("SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'SyncRep'") == "1")
                .then_some(())
        },
    );
    assert!(
        waiting.try_wait().unwrap().is_none(),
        "the commit returned without pitr"
    );
    let mut rx = start_receive_with(
        &scratch,
        &url,
        &conninfo,
        &scratch.path().join("rx2.log"),
        &sync,
    );
    let status = poll(
        "the waiting commit to return",
        Duration::from_secs(30),
        || waiting.try_wait().unwrap(),
    );
    assert!(status.success());

    // A commit that returned, then a crash at once: it is in the repository.
    c.sql("INSERT INTO marks VALUES (3)");
    c.crash();
    rx.kill().unwrap();
    rx.wait().unwrap();
    assert_eq!(
        restore_latest_rows(&scratch, &url, major, &bin, "restored"),
        "1,2,3"
    );
    eprintln!(
        "PG {major}: --synchronous: a commit waited while receive was stopped and returned once it ran; the commit made right before a crash was restored"
    );
}

#[test]
fn pg15_synchronous_receive_holds_every_commit_that_returned() {
    synchronous_receive_holds_every_commit_that_returned(15);
}

#[test]
fn pg18_synchronous_receive_holds_every_commit_that_returned() {
    synchronous_receive_holds_every_commit_that_returned(18);
}

/// SCRAM-SHA-256: the password from PGPASSWORD or from a password file; a wrong one is a one-line
/// error naming the failure, exit 1.
#[test]
fn receive_authenticates_with_scram() {
    let Some(bin) = harness::pg_bin(18) else {
        return;
    };
    let scratch = Scratch::new();
    let url = format!("file://{}", scratch.subdir("repo").display());
    let c = Cluster::start(
        18,
        &bin,
        "false",
        "archive_mode = off\npassword_encryption = 'scram-sha-256'",
        &[],
    );
    c.sql("CREATE ROLE rep WITH LOGIN REPLICATION PASSWORD 'right-secret'");
    let hba = c.data.join("pg_hba.conf");
    let old = std::fs::read_to_string(&hba).unwrap();
    std::fs::write(&hba, format!("local replication rep scram-sha-256\n{old}")).unwrap();
    c.sql("SELECT pg_reload_conf()");
    let conninfo = format!("host={} user=rep", c.sock.display());
    let pgpass = scratch.path().join("pgpass");
    std::fs::write(&pgpass, "localhost:*:replication:rep:right-secret\n").unwrap();
    std::fs::set_permissions(&pgpass, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let pgpass_s = pgpass.to_string_lossy().into_owned();
    for (how, env) in [
        ("PGPASSWORD", ("PGPASSWORD", "right-secret")),
        ("a password file", ("PGPASSFILE", pgpass_s.as_str())),
    ] {
        eprintln!("password from {how}");
        one_segment(
            &url,
            &conninfo,
            &[env],
            || {
                c.sql("SELECT count(*) FROM pg_stat_replication WHERE usename = 'rep' AND state = 'streaming'") == "1"
            },
            || {
                c.sql("SELECT count(pg_logical_emit_message(false, 'x', 'y'))");
                c.switch_wal();
            },
        );
    }
    let out = pitr(
        scratch.path(),
        &["--repo", &url, "receive", "--dbname", &conninfo],
        &[("PGPASSWORD", "wrong"), ("PGPASSFILE", "/nonexistent")],
    );
    assert_eq!(code(&out), 1, "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("password authentication failed") && err.trim().lines().count() == 1,
        "{err}"
    );
    assert!(!err.contains("wrong"), "the password is not printed: {err}");
}

/// Streaming from a standby that is promoted: receive follows it onto the new timeline, stores
/// the history file and the new timeline's segments, and `info` shows both timelines.
fn receive_follows_a_promotion(major: u32) {
    let Some(bin) = harness::pg_bin(major) else {
        return;
    };
    let scratch = Scratch::new();
    let url = format!("file://{}", scratch.subdir("repo").display());
    let primary = Cluster::start(major, &bin, "false", "archive_mode = off", &[]);
    let standby_dir = scratch.path().join("standby");
    harness::run_ok(
        harness::as_postgres(&mut Command::new(bin.join("pg_basebackup")))
            .args([
                "-h",
                primary.sock.to_str().unwrap(),
                "-U",
                "postgres",
                "-X",
                "stream",
                "-R",
                "-c",
                "fast",
                "-D",
            ])
            .arg(&standby_dir),
    );
    let standby = Cluster::existing(
        major,
        &bin,
        standby_dir,
        Scratch::new(),
        "archive_mode = off\nhot_standby = on",
    );
    poll("the standby to stream", Duration::from_secs(60), || {
        (primary.sql("SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming'") == "1")
            .then_some(())
    });
    let conninfo = format!("host={} user=postgres", standby.sock.display());
    let mut rx = start_receive_with(
        &scratch,
        &url,
        &conninfo,
        &scratch.path().join("rx.log"),
        &["-v"],
    );
    primary.sql("CREATE TABLE t(i int)");
    let before = primary.switch_wal();
    let repo = Path::new(url.trim_start_matches("file://"));
    poll(
        &format!("{before} from the standby"),
        Duration::from_secs(60),
        || {
            stored_segments(repo)
                .iter()
                .any(|s| s.as_str() >= before.as_str())
                .then_some(())
        },
    );
    standby.sql("SELECT pg_promote()");
    standby.wait_promoted();
    standby.sql("INSERT INTO t VALUES (1)");
    let after = standby.switch_wal();
    assert!(after.starts_with("00000002"), "{after}");
    let rx_log = scratch.path().join("rx.log");
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !stored_segments(repo)
        .iter()
        .any(|s| s.as_str() >= after.as_str())
    {
        let ended = rx.try_wait().unwrap();
        if ended.is_some() || std::time::Instant::now() > deadline {
            panic!(
                "{after} never reached the repository (receive: {ended:?}); stored {:?}\nreceive's log:\n{}\nthe standby's log:\n{}",
                stored_segments(repo),
                std::fs::read_to_string(&rx_log).unwrap_or_default(),
                standby.server_log_tail()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    rx.kill().unwrap();
    rx.wait().unwrap();
    assert!(repo.join("wal/history/00000002.history.pitr").exists());
    let out = pitr(scratch.path(), &["--repo", &url, "info", "--json"], &[]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let timelines: Vec<u64> = info["timelines"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|t| t["timeline"].as_u64())
        .collect();
    assert!(timelines.contains(&1) && timelines.contains(&2), "{info:#}");
    eprintln!(
        "PG {major}: receive followed the standby's promotion: {before} on timeline 1, {after} on timeline 2, history stored"
    );
}

#[test]
fn pg15_receive_follows_a_promotion() {
    receive_follows_a_promotion(15);
}

#[test]
fn pg18_receive_follows_a_promotion() {
    receive_follows_a_promotion(18);
}

/// TLS over TCP (`sslmode=require`) to a server whose `pg_hba.conf` takes replication over TCP only
/// with TLS; a server without TLS is refused under `require`.
#[test]
fn receive_speaks_tls() {
    let Some(bin) = harness::pg_bin(15) else {
        return;
    };
    let scratch = Scratch::new();
    let url = format!("file://{}", scratch.subdir("repo").display());
    let certs = scratch.subdir("certs");
    let (cert, key) = (certs.join("server.crt"), certs.join("server.key"));
    harness::run_ok(
        Command::new("openssl")
            .args([
                "req",
                "-new",
                "-x509",
                "-days",
                "2",
                "-nodes",
                "-subj",
                "/CN=localhost",
            ])
            .args(["-newkey", "rsa:2048", "-keyout"])
            .arg(&key)
            .arg("-out")
            .arg(&cert),
    );
    harness::run_ok(Command::new("chown").args(["-R", "postgres"]).arg(&certs));
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let c = Cluster::start(
        15,
        &bin,
        "false",
        &format!(
            "archive_mode = off\nssl = on\nssl_cert_file = '{}'\nssl_key_file = '{}'\nlisten_addresses = '127.0.0.1'\nport = {port}",
            cert.display(),
            key.display()
        ),
        &[],
    );
    let hba = c.data.join("pg_hba.conf");
    let old = std::fs::read_to_string(&hba).unwrap();
    std::fs::write(
        &hba,
        format!("hostssl replication all 127.0.0.1/32 trust\nhostnossl replication all 127.0.0.1/32 reject\n{old}"),
    )
    .unwrap();
    let psql = |sql: &str| {
        let out = harness::run_ok(
            Command::new(bin.join("psql"))
                .args(["-X", "-A", "-t", "-U", "postgres", "-d", "postgres", "-h"])
                .arg(&c.sock)
                .args(["-p", &port.to_string(), "-c", sql]),
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    psql("SELECT pg_reload_conf()");
    let conninfo = format!("host=127.0.0.1 port={port} user=postgres sslmode=require");
    one_segment(
        &url,
        &conninfo,
        &[],
        || {
            psql(
                "SELECT count(*) FROM pg_stat_replication r JOIN pg_stat_ssl s USING (pid) WHERE s.ssl AND r.state = 'streaming'",
            ) == "1"
        },
        || {
            psql("SELECT pg_switch_wal()");
        },
    );
    // Without TLS on the server, require refuses; disable then meets pg_hba's reject.
    psql("ALTER SYSTEM SET ssl = off");
    psql("SELECT pg_reload_conf()");
    poll("TLS to be off", Duration::from_secs(30), || {
        (psql("SHOW ssl") == "off").then_some(())
    });
    let out = pitr(
        scratch.path(),
        &["--repo", &url, "receive", "--dbname", &conninfo],
        &[],
    );
    assert_eq!(code(&out), 1, "{}", stderr(&out));
    assert!(
        stderr(&out).contains("does not accept TLS"),
        "{}",
        stderr(&out)
    );
}

/// `pitr receive --segments 1` from `conninfo` into `url`, with `env`: waits until `streaming()`
/// says it streams (failing with its stderr if it ends first), runs `switch()` to complete a
/// segment, and asserts it stored one and exited 0.
fn one_segment(
    url: &str,
    conninfo: &str,
    env: &[(&str, &str)],
    streaming: impl Fn() -> bool,
    switch: impl Fn(),
) {
    let mut cmd = Command::new(harness::PITR);
    cmd.args([
        "--repo",
        url,
        "receive",
        "--dbname",
        conninfo,
        "--segments",
        "1",
    ])
    .env_remove("PGPASSWORD")
    .env_remove("PGPASSFILE")
    .stdout(Stdio::null())
    .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut rx = cmd.spawn().unwrap();
    let stderr_of = |rx: &mut Child| {
        let mut err = String::new();
        std::io::Read::read_to_string(rx.stderr.as_mut().unwrap(), &mut err).unwrap();
        err
    };
    poll("receive to stream", Duration::from_secs(30), || {
        if let Some(status) = rx.try_wait().unwrap() {
            panic!("receive ended ({status}): {}", stderr_of(&mut rx));
        }
        streaming().then_some(())
    });
    switch();
    let status = poll(
        "receive to store a segment and stop",
        Duration::from_secs(30),
        || rx.try_wait().unwrap(),
    );
    assert!(status.success(), "{}", stderr_of(&mut rx));
}
