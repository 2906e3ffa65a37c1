//! What an operator of several clusters runs: one config file with a `[cluster.NAME]` table per
//! cluster, `--cluster NAME` on every command (archive_command included), and `info --all`.

use std::process::{Command, Output};

use crate::harness::{self, Cluster, Scratch, as_postgres, code, pitr, run, stderr};

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `pitr ARGS` as the `postgres` user (a restore writes a data directory the server must own).
fn pitr_as_postgres(scratch: &Scratch, args: &[&str]) -> Output {
    let bin = scratch.pitr_copy();
    run(as_postgres(&mut Command::new(bin))
        .args(args)
        .current_dir("/tmp")
        .env_remove("PITR_REPO")
        .env_remove("PITR_CONFIG"))
}

#[test]
fn two_clusters_in_one_config_file() {
    let Some(bin15) = harness::pg_bin(15) else {
        return;
    };
    let bin18 = harness::pg_bin(18).unwrap_or_else(|| bin15.clone());
    let s = Scratch::new();
    let conf = s.path().join("pitr.toml");
    let conf_s = conf.to_string_lossy().into_owned();
    let repos = s.subdir("repos");
    let archive =
        |name: &str| format!("{{pitr}} --config {conf_s} --cluster {name} archive-push %p");
    let main = Cluster::start(15, &bin15, &archive("main"), "", &[]);
    let reports = Cluster::start(
        if bin18 == bin15 { 15 } else { 18 },
        &bin18,
        &archive("reports"),
        "",
        &[],
    );
    // One log for every call, appended by the server's user (archive_command) and root alike.
    let log = s.path().join("pitr.log");
    std::fs::write(&log, "").unwrap();
    harness::chown_postgres(&log);
    let conninfo = |c: &Cluster| format!("host={} user=postgres dbname=postgres", c.sock.display());
    // One repository URL at the top: each cluster stores under its own name in it, except the
    // one with a repository of its own.
    std::fs::write(
        &conf,
        format!(
            "# two clusters on one host\nrepo = \"file://{repos}\"\nlog_file = \"{log}\"\nlog_format = \"json\"\n[backup]\njobs = 2\narchive_timeout = \"40s\"\n\n\
             [cluster.main]\npgdata = \"{}\"\ndbname = \"{}\"\n\n\
             [cluster.reports]\nrepo = \"file://{repos}-reports\"\npgdata = \"{}\"\ndbname = \"{}\"\n\
             [cluster.reports.backup]\ncompress_level = 1\n",
            main.data.display(),
            conninfo(&main),
            reports.data.display(),
            conninfo(&reports),
            repos = repos.display(),
            log = log.display(),
        ),
    )
    .unwrap();
    let out = pitr(s.path(), &["--config", &conf_s, "info"], &[]);
    // A key no command takes is named with its line.
    assert_eq!(code(&out), 1, "{}", stdout(&out));
    let err = stderr(&out);
    assert!(
        err.contains(
            "`cluster.reports.backup.compress_level` is not a flag of pitr backup: line 18 of"
        ),
        "{err}"
    );
    let text = std::fs::read_to_string(&conf).unwrap();
    std::fs::write(&conf, text.replace("compress_level = 1", "type = \"full\"")).unwrap();
    for (name, c) in [("main", &main), ("reports", &reports)] {
        c.sql(&format!(
            "CREATE TABLE t AS SELECT '{name}' AS who, g FROM generate_series(1, 100) g"
        ));
        // pgdata, dbname and jobs come from the file; run as the server's user, as
        // archive_command is, so both may create the repository.
        let out = pitr_as_postgres(&s, &["--config", &conf_s, "--cluster", name, "backup"]);
        assert_eq!(
            code(&out),
            0,
            "{name}: {}{}\nserver log:\n{}",
            stdout(&out),
            stderr(&out),
            c.server_log_tail()
        );
        c.sql(&format!(
            "INSERT INTO t SELECT '{name} after', g FROM generate_series(1, 7) g"
        ));
        let last = c.switch_wal();
        c.wait_archived(&last);
    }

    let out = pitr(
        s.path(),
        &["--config", &conf_s, "info", "--all", "--json"],
        &[],
    );
    assert_eq!(code(&out), 0, "{}{}", stdout(&out), stderr(&out));
    let all: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let clusters = all["clusters"].as_array().unwrap();
    let names: Vec<&str> = clusters
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["main", "reports"], "{all:#}");
    assert_eq!(
        clusters[0]["repository"],
        format!("file://{}/main", repos.display()),
        "{all:#}"
    );
    assert_ne!(
        clusters[0]["system_identifier"],
        clusters[1]["system_identifier"]
    );
    for c in clusters {
        assert!(c["error"].is_null(), "{all:#}");
        assert_eq!(c["newest_backup"]["type"], "full", "{all:#}");
        assert!(c["window"]["latest"].is_string(), "{all:#}");
        assert!(c["rpo_seconds"].as_f64().unwrap() >= 0.0, "{all:#}");
    }
    let out = pitr(s.path(), &["--config", &conf_s, "info", "--all"], &[]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let table = stdout(&out);
    assert!(
        table.lines().any(|l| l.starts_with("main "))
            && table.lines().any(|l| l.starts_with("reports ")),
        "{table}"
    );
    println!("info --all:\n{table}");

    // The log holds a record of every call: each segment both servers archived, each backup.
    let records: Vec<serde_json::Value> = std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    for c in [&main, &reports] {
        for seg in c.archived_segments() {
            assert!(
                records.iter().any(|r| r["command"] == "archive-push"
                    && r["wal"] == seg.as_str()
                    && r["exit"] == 0),
                "no record of {seg} in the log"
            );
        }
    }
    let backups = records
        .iter()
        .filter(|r| r["command"] == "backup" && r["exit"] == 0 && r["message"] == "backup: done")
        .count();
    assert_eq!(backups, 2, "{records:#?}");
    assert!(
        records
            .iter()
            .any(|r| r["level"] == "info" && r["message"].as_str().unwrap().contains("started at"))
    );

    // Each restores from its own repository, and its restore_command names the cluster.
    for (name, c) in [("main", &main), ("reports", &reports)] {
        let dir = s.path().join(format!("restored-{name}"));
        let restore = |extra: &[&str]| {
            let mut args = vec![
                "--config",
                &conf_s,
                "--cluster",
                name,
                "restore",
                "--target-dir",
                dir.to_str().unwrap(),
                "--latest",
                "--action",
                "promote",
                "--json",
            ];
            args.extend_from_slice(extra);
            let out = pitr_as_postgres(&s, &args);
            assert_eq!(code(&out), 0, "{name}: {}{}", stdout(&out), stderr(&out));
            let v: serde_json::Value = serde_json::from_slice(&out.stdout)
                .unwrap_or_else(|e| panic!("{e}: {}", stdout(&out)));
            v
        };
        // The plan alone, as JSON: nothing written.
        let plan = restore(&["--dry-run"]);
        assert_eq!(plan["dry_run"], true, "{plan:#}");
        assert!(plan["restored"].is_null() && !dir.exists(), "{plan:#}");
        assert_eq!(plan["backup"]["type"], "full", "{plan:#}");
        assert_eq!(plan["chain"].as_array().unwrap().len(), 1, "{plan:#}");
        assert!(plan["wal"]["segments"].as_u64().unwrap() >= 1, "{plan:#}");
        let done = restore(&[]);
        assert_eq!(done["backup"]["id"], plan["backup"]["id"]);
        assert!(
            done["restored"]["files"].as_u64().unwrap() > 500,
            "{done:#}"
        );
        assert!(
            done["restored"]["bytes"].as_u64().unwrap() > 1 << 20,
            "{done:#}"
        );
        let auto = std::fs::read_to_string(dir.join("postgresql.auto.conf")).unwrap();
        assert!(auto.contains(&format!("--cluster {name}")), "{auto}");
        let r = Cluster::existing(c.major, &c.bin, dir, Scratch::new(), "archive_mode = off");
        r.wait_promoted();
        assert_eq!(
            r.sql("SELECT string_agg(DISTINCT who, ',' ORDER BY who) || ' ' || count(*) FROM t"),
            format!("{name},{name} after 107")
        );
    }
}
