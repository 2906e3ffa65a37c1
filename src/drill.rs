//! `pitr drill`: prove a backup restores, by restoring it.
//!
//! Restores into a scratch directory (tablespaces relocated into it too, so no production path is
//! touched), starts PostgreSQL there on a private Unix socket with archiving off (a drill must never
//! push a new timeline into the repository), as the `postgres` user when run as root, and waits until
//! recovery has reached the target and promoted. Then it checks: the target was reached (from the
//! server log), `pg_amcheck` on every database, data-checksum failures, WAL continuity after the backup,
//! and the user's SQL assertions (`--sql FILE`: each statement must return true). The RTO reported is
//! the restore time plus the recovery time. The scratch directory is removed unless `--keep`.

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde::Serialize;

use crate::catalog::Catalog;
use crate::pg::PgTimestamp;
use crate::restore::exec::{self, Action, Signal};
use crate::restore::plan::{self, Request};
use crate::restore::target::Target;
use crate::storage::Repo;

/// What to drill.
#[derive(Clone, Debug)]
pub struct DrillOptions {
    /// The target (`--to`, `--random`, or the end of the archive).
    pub target: Target,
    /// SQL assertions, one statement per `;`.
    pub sql: Option<PathBuf>,
    /// Keep the scratch directory.
    pub keep: bool,
    /// PostgreSQL binaries.
    pub pg_bin: Option<PathBuf>,
    /// Parallel download streams.
    pub jobs: usize,
    /// How long recovery may take.
    pub timeout: Duration,
    /// The global flags the restored server's `restore_command` passes to pitr to read the
    /// repositories (`Settings::passed_on`).
    pub global_args: Vec<String>,
}

/// One check's outcome.
#[derive(Clone, Debug, Serialize)]
pub struct Check {
    /// What was checked.
    pub name: String,
    /// Whether it passed.
    pub ok: bool,
    /// Details.
    pub detail: String,
}

/// The drill report.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// The backup restored.
    pub backup: String,
    /// The target asked for.
    pub target: String,
    /// When the last transaction recovery replayed ended (RFC 3339, UTC), asked of the server.
    pub reached: Option<String>,
    /// Seconds to restore the files.
    pub restore_seconds: f64,
    /// Seconds from starting PostgreSQL to the end of recovery.
    pub recovery_seconds: f64,
    /// Recovery time objective measured: restore + recovery.
    pub rto_seconds: f64,
    /// The checks.
    pub checks: Vec<Check>,
    /// All checks passed.
    pub ok: bool,
    /// The scratch directory (kept with `--keep`).
    pub scratch: Option<String>,
}

use crate::users::is_root;

/// uid and gid of the `postgres` user.
fn postgres_ids() -> anyhow::Result<(u32, u32)> {
    crate::users::lookup("postgres")?
        .context("running as root, but there is no postgres user to run the scratch server as")
}

/// The port the scratch server listens on, in its private socket directory (no TCP). Set
/// explicitly, so a port in the restored postgresql.conf never matters.
const SCRATCH_PORT: &str = "5432";

/// A scratch server that is stopped however the drill ends: an error, a panic, or a signal (which
/// drops the drill's future), unless it was stopped already.
struct ScratchServer {
    pg_ctl: PathBuf,
    data: PathBuf,
    running: bool,
}

impl ScratchServer {
    fn stop(&mut self, mode: &str) {
        if !self.running {
            return;
        }
        self.running = false;
        let _ = as_server_user(&mut Command::new(&self.pg_ctl)).map(|c| {
            c.args(["-D"])
                .arg(&self.data)
                .args(["-m", mode, "-w", "stop"])
                .current_dir("/")
                .output()
        });
    }
}

impl Drop for ScratchServer {
    fn drop(&mut self) {
        self.stop("immediate");
    }
}

fn as_server_user(cmd: &mut Command) -> anyhow::Result<&mut Command> {
    if is_root() {
        let (uid, gid) = postgres_ids()?;
        cmd.uid(uid).gid(gid);
    }
    Ok(cmd)
}

fn chown_tree(path: &Path) -> anyhow::Result<()> {
    if is_root() {
        let status = Command::new("chown")
            .arg("-R")
            .arg("postgres:")
            .arg(path)
            .status()?;
        if !status.success() {
            bail!("chown -R postgres {} failed", path.display());
        }
    }
    Ok(())
}

/// Where the PostgreSQL programs of major `major` are.
fn find_bin(pg_bin: Option<&Path>, major: u32) -> anyhow::Result<PathBuf> {
    let mut candidates: Vec<PathBuf> = pg_bin.map(Path::to_path_buf).into_iter().collect();
    candidates.push(PathBuf::from(format!("/usr/lib/postgresql/{major}/bin")));
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output()
        && out.status.success()
    {
        candidates.push(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()));
    }
    if let Some(path) = std::env::var_os("PATH") {
        candidates.extend(std::env::split_paths(&path));
    }
    for dir in candidates {
        let postgres = dir.join("postgres");
        let Ok(out) = Command::new(&postgres).arg("--version").output() else {
            continue;
        };
        let version = String::from_utf8_lossy(&out.stdout);
        let found = version
            .split_whitespace()
            .last()
            .and_then(|v| v.split('.').next())
            .and_then(|v| v.parse::<u32>().ok());
        if found == Some(major) {
            return Ok(dir);
        }
        if pg_bin.is_some_and(|p| p == dir) {
            bail!(
                "--pg-bin {} has {}, but the backup needs PostgreSQL {major}",
                dir.display(),
                version.trim()
            );
        }
    }
    bail!(
        "no PostgreSQL {major} binaries found; pass --pg-bin DIR (the directory holding postgres and pg_ctl)"
    )
}

/// Run `cmd` to completion without blocking the runtime, so a stop signal is handled at once; the
/// child is killed if the drill is dropped meanwhile.
async fn output(cmd: &mut Command) -> std::io::Result<std::process::Output> {
    let cmd = std::mem::replace(cmd, Command::new("true"));
    tokio::process::Command::from(cmd)
        .kill_on_drop(true)
        .output()
        .await
}

async fn psql(bin: &Path, sock: &Path, db: &str, sql: &str) -> anyhow::Result<String> {
    let mut cmd = Command::new(bin.join("psql"));
    as_server_user(&mut cmd)?
        .args([
            "-X",
            "-q",
            "-A",
            "-t",
            "-v",
            "ON_ERROR_STOP=1",
            "-U",
            "postgres",
            "-p",
            SCRATCH_PORT,
            "-d",
            db,
            "-h",
        ])
        .arg(sock)
        .args(["-c", sql])
        .current_dir("/");
    let out = output(&mut cmd).await?;
    if !out.status.success() {
        bail!("{}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// What a drill to `target` asks the planner for.
pub fn request(target: Target) -> Request {
    Request {
        target,
        exclusive: false,
        timeline: None,
        backup: None,
        // A drill restores what it can and reports a gap as a failed check, naming it.
        stop_at_gap: true,
    }
}

/// Run a drill.
///
/// # Errors
/// A plan refusal, a restore failure, or a server that does not start; failed checks are in the
/// report instead.
pub async fn run(repo: &Repo, opts: &DrillOptions) -> anyhow::Result<Report> {
    let catalog = Catalog::load(repo).await?;
    let plan = plan::plan(&catalog, &request(opts.target.clone()))?;
    // The assertions are read and checked before anything is restored.
    let statements = read_statements(opts.sql.as_deref())?;
    let bin = find_bin(opts.pg_bin.as_deref(), plan.backup.pg_version)?;
    let scratch = tempfile::Builder::new()
        .prefix("pitr-drill-")
        .tempdir_in(std::env::temp_dir())?;
    std::fs::set_permissions(scratch.path(), std::fs::Permissions::from_mode(0o755))?;
    let data = scratch.path().join("data");
    let sock = scratch.path().join("sock");
    std::fs::create_dir(&sock)?;
    // The server must be able to run restore_command: give it its own copy of this binary.
    let exe = scratch.path().join("pitr");
    std::fs::copy(std::env::current_exe()?, &exe)
        .context("copy the pitr binary into the scratch directory")?;
    std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755))?;
    let commands = exec::RecoveryCommand::new(&exe, &opts.global_args);
    let relocate: HashMap<u32, PathBuf> = plan
        .backup
        .tablespaces
        .iter()
        .map(|t| (t.oid, scratch.path().join(format!("tablespace-{}", t.oid))))
        .collect();
    let lines = scratch_settings(&plan, &commands, &sock);

    let started = Instant::now();
    exec::execute(
        repo,
        &plan,
        &data,
        &relocate,
        opts.jobs,
        &lines,
        Signal::Recovery,
    )
    .await?;
    let restore_seconds = started.elapsed().as_secs_f64();
    chown_tree(scratch.path())?;

    let recovery_start = Instant::now();
    let server = Server {
        bin: &bin,
        data: &data,
        sock: &sock,
        log: scratch.path().join("server.log"),
    };
    // From here on the server may be running: the guard stops it on every way out.
    let mut guard = server.start(scratch.path()).await?;
    server.wait_for_promotion(opts.timeout).await?;
    let recovery_seconds = recovery_start.elapsed().as_secs_f64();

    let (reached, mut checks) = target_check(&server, &catalog, &plan).await;
    checks.push(gap_check(&catalog, &plan));
    checks.push(server.amcheck().await);
    checks.push(server.checksum_failures().await);
    for stmt in &statements {
        checks.push(server.sql_check(stmt).await);
    }
    guard.stop("fast");
    let ok = checks.iter().all(|c| c.ok);
    let kept = if opts.keep {
        Some(scratch.keep().to_string_lossy().into_owned())
    } else {
        None
    };
    Ok(Report {
        backup: plan.backup.id.clone(),
        target: plan.target.to_string(),
        reached,
        restore_seconds: millis(restore_seconds),
        recovery_seconds: millis(recovery_seconds),
        rto_seconds: millis(restore_seconds + recovery_seconds),
        checks,
        ok,
        scratch: kept,
    })
}

/// The `--sql` assertions, one statement per `;` (comment-only pieces dropped).
fn read_statements(file: Option<&Path>) -> anyhow::Result<Vec<String>> {
    let Some(file) = file else {
        return Ok(Vec::new());
    };
    let sql =
        std::fs::read_to_string(file).with_context(|| format!("read --sql {}", file.display()))?;
    let stmts: Vec<String> = sql
        .split(';')
        .map(str::trim)
        .filter(|s| !s.is_empty() && !s.lines().all(|l| l.trim_start().starts_with("--")))
        .map(str::to_string)
        .collect();
    if stmts.is_empty() {
        bail!(
            "--sql {} holds no statement: write queries that return true, separated by ';'",
            file.display()
        );
    }
    Ok(stmts)
}

/// The recovery settings of the scratch server: the plan's, promoted at the target, reachable only
/// on its own socket, archiving nothing.
fn scratch_settings(
    plan: &plan::Plan,
    commands: &exec::RecoveryCommand,
    sock: &Path,
) -> Vec<(&'static str, String)> {
    let mut lines = exec::recovery_settings(plan, commands, Action::Promote);
    for (k, v) in [
        ("archive_mode", "off"),
        ("listen_addresses", ""),
        ("port", SCRATCH_PORT),
        ("unix_socket_directories", &*sock.to_string_lossy()),
        ("primary_conninfo", ""),
        ("shared_buffers", "128MB"),
        ("log_destination", "stderr"),
        ("logging_collector", "off"),
    ] {
        lines.push((k, v.to_string()));
    }
    lines
}

/// The restored scratch server.
struct Server<'a> {
    bin: &'a Path,
    data: &'a Path,
    sock: &'a Path,
    log: PathBuf,
}

impl Server<'_> {
    /// The last `n` lines of the server's log, joined.
    fn log_tail(&self, n: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let mut tail: Vec<&str> = text.lines().rev().take(n).collect();
        tail.reverse();
        tail.join(" | ")
    }

    async fn start(&self, cwd: &Path) -> anyhow::Result<ScratchServer> {
        let guard = ScratchServer {
            pg_ctl: self.bin.join("pg_ctl"),
            data: self.data.to_path_buf(),
            running: true,
        };
        let mut start = Command::new(self.bin.join("pg_ctl"));
        as_server_user(&mut start)?
            .args(["-D"])
            .arg(self.data)
            .arg("-l")
            .arg(&self.log)
            .args(["-w", "-t", "3600", "start"])
            .current_dir(cwd);
        let status = output(&mut start).await?;
        if !status.status.success() {
            bail!("the restored cluster did not start: {}", self.log_tail(5));
        }
        Ok(guard)
    }

    /// Poll until recovery has ended, the server has stopped, or `timeout` has passed.
    async fn wait_for_promotion(&self, timeout: Duration) -> anyhow::Result<()> {
        let since = Instant::now();
        loop {
            if self
                .psql("SELECT pg_is_in_recovery()")
                .await
                .is_ok_and(|v| v == "f")
            {
                return Ok(());
            }
            if since.elapsed() > timeout {
                bail!(
                    "the restored cluster was still recovering (or not answering on its socket {}) after --timeout {}; its log ends: {}",
                    self.sock.display(),
                    humantime::format_duration(timeout),
                    self.log_tail(3)
                );
            }
            if !self.data.join("postmaster.pid").exists() {
                bail!(
                    "the restored cluster stopped during recovery: {}",
                    self.log_tail(4)
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn psql(&self, sql: &str) -> anyhow::Result<String> {
        psql(self.bin, self.sock, "postgres", sql).await
    }

    async fn amcheck(&self) -> Check {
        let mut amcheck = Command::new(self.bin.join("pg_amcheck"));
        let ran = match as_server_user(&mut amcheck) {
            Ok(cmd) => {
                cmd.args([
                    "--install-missing",
                    "--all",
                    "-U",
                    "postgres",
                    "-p",
                    SCRATCH_PORT,
                    "-h",
                ])
                .arg(self.sock)
                .current_dir("/");
                output(&mut amcheck).await.map_err(anyhow::Error::from)
            }
            Err(e) => Err(e),
        };
        match ran {
            Ok(o) => Check {
                name: "pg_amcheck".into(),
                ok: o.status.success(),
                detail: if o.status.success() {
                    "all databases: no corruption found".into()
                } else {
                    String::from_utf8_lossy(&o.stdout)
                        .lines()
                        .take(3)
                        .collect::<Vec<_>>()
                        .join(" | ")
                },
            },
            Err(e) => Check {
                name: "pg_amcheck".into(),
                ok: false,
                detail: format!("could not run pg_amcheck: {e}"),
            },
        }
    }

    async fn checksum_failures(&self) -> Check {
        let name = "data checksum failures".to_string();
        match self
            .psql("SELECT coalesce(sum(checksum_failures), 0) FROM pg_stat_database")
            .await
        {
            Ok(n) => Check {
                name,
                ok: n == "0",
                detail: n,
            },
            Err(e) => Check {
                name,
                ok: false,
                detail: e.to_string(),
            },
        }
    }

    async fn sql_check(&self, stmt: &str) -> Check {
        let name = format!("sql: {stmt}");
        match self.psql(stmt).await {
            Ok(v) if v == "t" => Check {
                name,
                ok: true,
                detail: "true".into(),
            },
            Ok(v) => Check {
                name,
                ok: false,
                detail: format!("returned {v:?}, not true"),
            },
            Err(e) => Check {
                name,
                ok: false,
                detail: e.to_string(),
            },
        }
    }
}

/// Whether recovery stopped where the index says it should: judged by asking the server, not by
/// reading its log (whose language lc_messages decides). It promoted, so recovery reached its
/// target (PostgreSQL stops with FATAL when recovery ends before a target it was given); the last
/// transaction it replayed is the point reached, at or before a time target, at the last archived
/// transaction for --latest. Returns that point (RFC 3339) and the check.
async fn target_check(
    server: &Server<'_>,
    catalog: &Catalog,
    plan: &plan::Plan,
) -> (Option<String>, Vec<Check>) {
    let reached_at = server
        .psql("SELECT coalesce((extract(epoch FROM pg_last_xact_replay_timestamp()) * 1000000)::int8::text, '')")
        .await
        .ok()
        .and_then(|us| us.parse::<i64>().ok())
        .map(PgTimestamp::from_unix_micros);
    let reached = reached_at.map(PgTimestamp::rfc3339);
    let target_ok = match &plan.target {
        Target::Time(t) => reached_at.is_none_or(|r| r <= *t),
        Target::Latest => match catalog.window().and_then(|w| w.latest) {
            Some(x) => reached_at == Some(x.time),
            None => true,
        },
        _ => true,
    };
    let check = Check {
        name: "target reached".into(),
        ok: target_ok,
        detail: format!(
            "recovered to {} and promoted; last transaction replayed at {}",
            plan.target,
            reached.clone().unwrap_or_else(|| "none".into())
        ),
    };
    (reached, vec![check])
}

/// WAL continuity after the backup: the catalog's gaps past the backup's start.
fn gap_check(catalog: &Catalog, plan: &plan::Plan) -> Check {
    let start = plan.backup.start_lsn.segno(catalog.seg_size());
    let gaps: Vec<String> = catalog
        .gaps_after(Some(start))
        .iter()
        .map(|g| format!("after {} and before {}", g.after, g.before))
        .collect();
    Check {
        name: "WAL contiguous after the backup".into(),
        ok: gaps.is_empty(),
        detail: if gaps.is_empty() {
            "no gaps".into()
        } else {
            format!("missing WAL {}", gaps.join("; "))
        },
    }
}

/// Seconds rounded to the millisecond, as reported.
fn millis(secs: f64) -> f64 {
    (secs * 1000.0).round() / 1000.0
}

/// A random time inside the window, for `--random`.
pub fn random_target(c: &Catalog) -> anyhow::Result<Target> {
    let w = c.window().context("the repository holds no WAL")?;
    let (Some(start), Some(end)) = (w.earliest, w.latest) else {
        bail!("the window has no commit after a backup yet; drill --latest instead");
    };
    let span = (end.time.0 - start.0).max(0) as u64;
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let pick = if span == 0 { 0 } else { seed % span };
    // Strictly before the last commit, so a later commit exists to stop at.
    Ok(Target::Time(PgTimestamp(
        start.0 + pick.min(span.saturating_sub(1)) as i64,
    )))
}
