//! The `pitr` binary: parse arguments, run the command, map the outcome to an exit code.

use std::path::Path;
use std::process::ExitCode;

use clap::{CommandFactory, Parser};

use pitr::exit::{self, Contract};
use pitr::{config, error};

mod cmd;
use cmd::cli::{Cli, Command};

fn main() -> ExitCode {
    pitr::cleanup::hold_stop_signals();
    // Segment-sized buffers (16 MiB and more) are read on several threads, one after another. glibc
    // raises its mmap threshold after the first such buffer is freed and from then on serves them
    // from per-thread heaps that keep the memory: fixing the threshold gives each back when freed.
    // And glibc gives each thread that allocates an arena of its own (up to 8 per core), each
    // keeping what was freed in it: a restore's 16 fsync threads and its jobs made peak RSS 108
    // MiB where the heap peaked at 60. Two arenas share that memory (pitr's hot paths allocate
    // little).
    // SAFETY: mallopt only changes allocator tuning; it is called before any other thread exists.
    #[cfg(target_env = "gnu")]
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20);
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
    // The config file's defaults join the command line before it is parsed, so a required flag
    // (backup's --pgdata) may come from the file.
    let argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let prepared = match cmd::defaults::prepare(argv.clone()) {
        Ok(p) => p,
        Err(e) => {
            let commands = Cli::command();
            let name = argv
                .iter()
                .skip(1)
                .filter_map(|a| a.to_str())
                .find(|a| commands.find_subcommand(a).is_some())
                .unwrap_or("")
                .to_string();
            let contract = contract_for(&name);
            let err = anyhow::Error::new(e);
            let name = if name.is_empty() {
                String::new()
            } else {
                format!(" {name}")
            };
            eprintln!("pitr{name}: error: {}", error::one_line(&err));
            return ExitCode::from(contract.for_error(&err));
        }
    };
    let config_file = prepared.file;
    let cli = match Cli::try_parse_from(prepared.argv) {
        Ok(cli) => cli,
        // --help and --version print as clap renders them; a usage error is one line (stderr may
        // be PostgreSQL's log), naming what is wrong and where the help is.
        Err(e) if !e.use_stderr() => {
            let _ = e.print();
            return ExitCode::from(exit::SUCCESS);
        }
        Err(e) => {
            // clap's first paragraph is the message (what is missing may follow on its own lines).
            let text = e.to_string();
            let message: Vec<&str> = text
                .lines()
                .map(str::trim)
                .skip_while(|l| l.is_empty())
                .take_while(|l| !l.is_empty() && !l.starts_with("Usage:"))
                .collect();
            let message = message.join(" ");
            let message = message.trim_start_matches("error: ");
            eprintln!(
                "pitr: error: {message} (hint: pitr --help lists the commands, pitr COMMAND --help what one takes)"
            );
            return ExitCode::from(exit::USAGE);
        }
    };
    let name = command_name(&cli.command);
    let logging = cmd::logging::Logging {
        verbose: cli.global.verbose,
        quiet: cli.global.quiet,
        level: cli.global.log_level,
        file: cli.global.log_file.as_deref(),
        format: cli.global.log_format.unwrap_or_default(),
        command: name,
    };
    if let Err(e) = logging.init() {
        eprintln!(
            "pitr {name}: error: {e} (hint: the log file's directory must exist and be writable by the user running pitr)"
        );
        // archive-get must not answer "no such file" for a failure of its own.
        return ExitCode::from(match &cli.command {
            Command::ArchiveGet(_) => exit::STOP_RECOVERY,
            _ => exit::FAILURE,
        });
    }
    // The store clients read the retry budget from the environment; the flag (or the config
    // file's key) sets it there, for this process and the prefetcher it may start.
    if let Some(budget) = &cli.global.retry_budget
        && std::env::var(pitr::storage::retry::BUDGET_ENV)
            .ok()
            .as_ref()
            != Some(budget)
    {
        // SAFETY: no other thread exists yet (the runtime is built later).
        unsafe { std::env::set_var(pitr::storage::retry::BUDGET_ENV, budget) };
    }
    cmd::output::set_quiet(cli.global.quiet);
    let call = call_subject(&cli.command);
    let started = std::time::Instant::now();
    let contract = contract_for(name);
    // A panic is a bug, but it must still answer on the safe side of PostgreSQL's contract.
    let outcome = std::panic::catch_unwind(|| run(cli, config_file.as_ref()));
    let (code, failure) = match outcome {
        Ok(Ok(code)) => (code, None),
        Ok(Err(err)) => {
            let line = error::one_line(&err);
            eprintln!("pitr {name}: error: {line}");
            (contract.for_error(&err), Some(line))
        }
        Err(_) => {
            let line = "internal error (a bug); please report it with the message above";
            eprintln!("pitr {name}: error: {line}");
            (contract.for_panic(), Some(line.to_string()))
        }
    };
    record_call(
        name,
        call.as_deref(),
        code,
        started.elapsed(),
        failure.as_deref(),
    );
    ExitCode::from(code)
}

/// PostgreSQL's exit-code contract for the command named `name` (`archive-get` on a standby may
/// answer "not found" for an unreachable store).
fn contract_for(name: &str) -> Contract {
    match name {
        "archive-push" => Contract::ArchivePush,
        "archive-get" => Contract::ArchiveGet {
            standby: Path::new("standby.signal").exists(),
        },
        _ => Contract::Other,
    }
}

fn command_name(c: &Command) -> &'static str {
    match c {
        Command::ArchivePush(_) => "archive-push",
        Command::ArchiveGet(_) => "archive-get",
        Command::Info(_) => "info",
        Command::Backup(_) => "backup",
        Command::Restore(_) => "restore",
        Command::Replica(_) => "replica",
        Command::Verify(_) => "verify",
        Command::Check(_) => "check",
        Command::Metrics => "metrics",
        Command::Drill(_) => "drill",
        Command::Expire(_) => "expire",
        Command::ArchivePrefetch(_) => "archive-prefetch",
        Command::ArchiveSpoolClean(_) => "archive-spool-clean",
        Command::Key(_) => "key",
        Command::Copy(_) => "copy",
        Command::Receive(_) => "receive",
        Command::Completions(_) => "completions",
        Command::Man(_) => "man",
    }
}

/// The WAL file a call is about (archive-push's `%p` as a name, archive-get's `%f`).
fn call_subject(c: &Command) -> Option<String> {
    match c {
        Command::ArchivePush(a) => Some(a.wal_name()),
        Command::ArchiveGet(a) => Some(a.wal_name().to_string()),
        _ => None,
    }
}

/// The record of a call, for `--log-file` only (never on stderr).
fn record_call(
    name: &str,
    wal: Option<&str>,
    code: u8,
    took: std::time::Duration,
    failure: Option<&str>,
) {
    let ms = u64::try_from(took.as_millis()).unwrap_or(u64::MAX);
    let subject = wal.map(|w| format!(" {w}")).unwrap_or_default();
    match failure {
        None => {
            tracing::info!(target: cmd::logging::CALL, wal, exit = code, ms, "{name}{subject}: done")
        }
        Some(error) => {
            tracing::error!(target: cmd::logging::CALL, wal, exit = code, ms, error, "{name}{subject}: failed")
        }
    }
}

fn run(cli: Cli, config_file: Option<&config::ConfigFile>) -> anyhow::Result<u8> {
    // The commands that need no repository.
    match &cli.command {
        Command::ArchiveSpoolClean(a) => return Ok(cmd::archive_prefetch::clean(a)),
        Command::Completions(a) => return cmd::docs::completions(a),
        Command::Man(a) => return cmd::docs::man(a),
        _ => {}
    }
    if let Command::Key(a) = &cli.command
        && let Some(done) = cmd::key::without_repository(a)
    {
        return done;
    }
    let g = &cli.global;
    let overrides = config::Overrides {
        repo: g.repo.clone(),
        repo_name: g.repo_name.clone(),
        cluster: g.cluster.clone(),
        compress: g.compress.map(Into::into),
        encryption_key_file: g.encryption_key_file.clone(),
        encryption_passphrase_file: g.encryption_passphrase_file.clone(),
    };
    if let Command::Info(a) = &cli.command
        && a.all
    {
        return block_on(cmd::info::run_all(a, &overrides, config_file));
    }
    let settings = config::resolve(&overrides, config_file)?;
    if let Command::ArchivePush(a) = &cli.command
        && cmd::archive_push::answered_by_marker(a, &settings)
    {
        return Ok(exit::SUCCESS);
    }
    block_on(run_command(cli.command, &settings))
}

/// Run `command` on a runtime of its own until it finishes or a stop signal ends it.
fn block_on(command: impl std::future::Future<Output = anyhow::Result<u8>>) -> anyhow::Result<u8> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let result = runtime.block_on(async {
        // A stop signal ends the command at once: what it was writing is removed (temp files beside
        // %p, staging files), and the exit code is that of any failure (archive-push: 1, never
        // death by the signal, which PostgreSQL would not count as a failure).
        // Polled first, so the handlers are in place before the command starts.
        tokio::select! {
            biased;
            stopped = pitr::cleanup::stop_signal() => {
                pitr::cleanup::remove_all();
                Err(stopped.into())
            }
            r = command => r,
        }
    });
    // Everything the command waits for has finished; idle worker threads need not be joined (that
    // costs milliseconds on every archive-push and archive-get).
    runtime.shutdown_background();
    result
}

async fn run_command(command: Command, settings: &config::Settings) -> anyhow::Result<u8> {
    // Only the commands that store a cluster's first objects may bring a repository into being.
    let creates = matches!(
        &command,
        Command::ArchivePush(_) | Command::Backup(_) | Command::Check(_) | Command::Receive(_)
    );
    // The commands that work on several repositories open them all (archive-push and archive-get
    // only theirs when --repo-name names one); the others only theirs.
    let all = match &command {
        Command::ArchivePush(_)
        | Command::ArchiveGet(_)
        | Command::Verify(_)
        | Command::Expire(_)
        | Command::Metrics => !settings.named,
        Command::Info(_)
        | Command::Copy(_)
        | Command::Restore(_)
        | Command::Replica(_)
        | Command::Drill(_) => true,
        _ => false,
    };
    let mut repos = pitr::repos::RepoSet::open(settings, creates, all).await;
    if !all || !repos.is_several() {
        repos.take_chosen_error()?;
    }
    cmd::run(command, &repos, settings).await
}
