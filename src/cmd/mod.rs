//! The commands: one file per subcommand, each turning its arguments into the library's options,
//! calling it, and printing the result (`output`). `main` parses the command line, picks the
//! repository, and maps the outcome to the exit contract (`pitr::exit`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use pitr::config::Settings;
use pitr::repos::RepoSet;
use pitr::storage::Repo;

pub(crate) mod archive_get;
pub(crate) mod archive_prefetch;
pub(crate) mod archive_push;
pub(crate) mod backup;
pub(crate) mod check;
pub(crate) mod cli;
pub(crate) mod copy;
pub(crate) mod defaults;
pub(crate) mod docs;
pub(crate) mod drill;
pub(crate) mod expire;
pub(crate) mod info;
pub(crate) mod key;
pub(crate) mod logging;
pub(crate) mod metrics;
pub(crate) mod output;
pub(crate) mod receive;
pub(crate) mod replica;
pub(crate) mod restore;
pub(crate) mod verify;

use cli::Command;

/// Run `command` against `repo`.
///
/// # Errors
/// The command's failure, for `main` to report.
pub(crate) async fn run(
    command: Command,
    repos: &RepoSet,
    settings: &Settings,
) -> anyhow::Result<u8> {
    // The commands that work on several repositories take them all.
    match command {
        Command::ArchivePush(a) => return archive_push::run(a, repos).await,
        Command::ArchiveGet(a) => return archive_get::run(a, repos, settings).await,
        Command::Info(a) => return info::run(a, repos).await,
        Command::Copy(a) => return copy::run(a, repos).await,
        Command::Restore(a) => return restore::run(a, repos, settings).await,
        Command::Replica(a) => return replica::run(a, repos, settings).await,
        Command::Drill(a) => return drill::run(a, repos, settings).await,
        Command::Verify(a) => return verify::run(a, repos).await,
        Command::Expire(a) => return expire::run(a, repos).await,
        Command::Metrics => return metrics::run(repos).await,
        other => run_one(other, repos.chosen()?, settings).await,
    }
}

/// The repository a restore of `request` reads (see [`RepoSet::source_for`]), said on stdout
/// when `say` (else logged: `--json` output).
pub(crate) async fn source(
    repos: &RepoSet,
    settings: &Settings,
    request: &pitr::restore::plan::Request,
    say: bool,
) -> anyhow::Result<pitr::repos::Source> {
    let source = repos.source_for(settings, request).await?;
    if say {
        say_source(repos, &source.name, &source.notes)?;
    } else if repos.is_several() {
        for n in &source.notes {
            tracing::warn!("{n}");
        }
        tracing::info!("reading repository {}", source.name);
    }
    Ok(source)
}

/// Say which repository a restore reads, when there are several, and why others were passed
/// over.
fn say_source(repos: &RepoSet, name: &str, notes: &[String]) -> anyhow::Result<()> {
    if !repos.is_several() {
        return Ok(());
    }
    for n in notes {
        tracing::warn!("{n}");
    }
    crate::sayln!("repository   {name} (the others back up every read)");
    Ok(())
}

/// The end of a summary line that lists findings: "no problems" or "N problem(s)".
pub(crate) fn problems(count: usize) -> String {
    if count == 0 {
        "no problems".to_string()
    } else {
        format!("{count} problem(s)")
    }
}

/// The exit code of a command that reports findings: 1 when there are any.
pub(crate) fn exit_for_findings(count: usize) -> u8 {
    if count == 0 {
        pitr::exit::SUCCESS
    } else {
        pitr::exit::FAILURE
    }
}

/// Run a command that works on one repository.
async fn run_one(command: Command, repo: &Repo, settings: &Settings) -> anyhow::Result<u8> {
    match command {
        Command::ArchivePush(_)
        | Command::ArchiveGet(_)
        | Command::Info(_)
        | Command::Copy(_)
        | Command::Restore(_)
        | Command::Replica(_)
        | Command::Drill(_)
        | Command::Verify(_)
        | Command::Expire(_)
        | Command::Metrics
        | Command::Completions(_)
        | Command::Man(_) => Err(anyhow::anyhow!(
            "internal: a command of several repositories, or of none, ran on one"
        )),
        Command::ArchivePrefetch(a) => archive_prefetch::run(a, repo).await,
        Command::ArchiveSpoolClean(a) => Ok(archive_prefetch::clean(&a)),
        Command::Backup(a) => backup::run(a, repo, settings).await,
        Command::Check(a) => check::run(a, repo, settings).await,
        Command::Key(a) => key::run(a, repo).await,
        Command::Receive(a) => receive::run(a, repo, settings).await,
    }
}

/// What restore and replica both take: which backup, where its tablespaces go, how many streams,
/// and whose the files become.
#[derive(Debug, clap::Args)]
pub(crate) struct Placement {
    /// Restore this backup (id or label) instead of the newest one that reaches the target.
    #[arg(long, value_name = "LABEL")]
    pub(crate) backup: Option<String>,
    /// Put tablespace OLD (its OID or original path) at NEW; repeatable.
    #[arg(long, value_name = "OLD=NEW")]
    pub(crate) tablespace_map: Vec<String>,
    /// Parallel download streams [default: number of CPUs].
    #[arg(long, value_name = "N")]
    pub(crate) jobs: Option<usize>,
    /// Give the restored files to this user (needed when run as root: PostgreSQL refuses a
    /// data directory it does not own).
    #[arg(long, value_name = "USER")]
    pub(crate) owner: Option<String>,
}

pub(crate) use pitr::units::mib;

/// `--jobs`, or the number of CPUs.
pub(crate) fn default_jobs(jobs: Option<usize>) -> usize {
    jobs.unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()))
        .max(1)
}

pub(crate) fn usage(msg: String) -> anyhow::Error {
    pitr::error::UsageError(msg).into()
}

/// `--tablespace-map OLD=NEW`, OLD being an OID or the original location.
pub(crate) fn relocations(
    b: &pitr::manifest::BackupManifest,
    specs: &[String],
) -> anyhow::Result<HashMap<u32, PathBuf>> {
    let mut out = HashMap::new();
    for spec in specs {
        let (old, new) = spec
            .split_once('=')
            .ok_or_else(|| usage(format!("--tablespace-map {spec:?}: expected OLD=NEW")))?;
        let ts = b
            .tablespaces
            .iter()
            .find(|t| t.oid.to_string() == old || t.location == old)
            .ok_or_else(|| {
                let known: Vec<String> = b
                    .tablespaces
                    .iter()
                    .map(|t| format!("{} ({})", t.oid, t.location))
                    .collect();
                usage(format!(
                    "--tablespace-map: backup {} has no tablespace {old:?} (it has: {})",
                    b.id,
                    if known.is_empty() {
                        "none".to_string()
                    } else {
                        known.join(", ")
                    }
                ))
            })?;
        let new = Path::new(new);
        if !new.is_absolute() {
            return Err(usage(format!(
                "--tablespace-map: {} must be an absolute path",
                new.display()
            )));
        }
        out.insert(ts.oid, new.to_path_buf());
    }
    Ok(out)
}

/// `--owner USER` as uid and gid. Run as root without it, a restore would leave a data directory
/// PostgreSQL refuses to start from: refused.
pub(crate) fn owner_ids(owner: Option<&str>) -> anyhow::Result<Option<(u32, u32)>> {
    match owner {
        Some(name) => Ok(Some(pitr::users::lookup(name)?.ok_or_else(|| {
            usage(format!("--owner {name}: there is no such user"))
        })?)),
        None if pitr::users::is_root() => Err(usage(
            "running as root, the restored files would belong to root and PostgreSQL would not start from them: run pitr as the user that runs PostgreSQL (sudo -u postgres pitr …), or pass --owner postgres".into(),
        )),
        None => Ok(None),
    }
}

/// Give the restored data directory and every tablespace location (relocated or not) to
/// `--owner`.
pub(crate) fn give_to_owner(
    owner: Option<(u32, u32)>,
    manifest: &pitr::manifest::BackupManifest,
    target_dir: &Path,
    relocate: &HashMap<u32, PathBuf>,
) -> anyhow::Result<()> {
    let Some((uid, gid)) = owner else {
        return Ok(());
    };
    for dir in pitr::restore::files::restored_dirs(manifest, target_dir, relocate) {
        pitr::users::chown_tree(&dir, uid, gid)?;
    }
    Ok(())
}
