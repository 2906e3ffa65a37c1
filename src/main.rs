//! The `pitr` binary: parse arguments, run the command, map the outcome to an exit code.

use std::io::IsTerminal;
use std::path::Path;
use std::process::ExitCode;

use clap::Parser;

use pitr::archive::get::GetOutcome;
use pitr::cli::{Cli, Command};
use pitr::exit::{self, Contract};
use pitr::pg::WalFileName;
use pitr::storage::Repo;
use pitr::{archive, config, error};

fn main() -> ExitCode {
    pitr::cleanup::hold_stop_signals();
    // Segment-sized buffers (16 MiB and more) are read on several threads, one after another. glibc
    // raises its mmap threshold after the first such buffer is freed and from then on serves them
    // from per-thread heaps that keep the memory: fixing the threshold gives each back when freed.
    // SAFETY: mallopt only changes allocator tuning; it is called before any other thread exists.
    #[cfg(target_env = "gnu")]
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20);
    }
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() {
                exit::USAGE
            } else {
                exit::SUCCESS
            });
        }
    };
    init_logging(cli.global.verbose, cli.global.quiet);
    pitr::output::set_quiet(cli.global.quiet);
    let contract = match &cli.command {
        Command::ArchivePush { .. } => Contract::ArchivePush,
        Command::ArchiveGet { .. } => Contract::ArchiveGet {
            standby: Path::new("standby.signal").exists(),
        },
        _ => Contract::Other,
    };
    let name = command_name(&cli.command);
    // A panic is a bug, but it must still answer on the safe side of PostgreSQL's contract.
    let outcome = std::panic::catch_unwind(|| run(cli));
    let code = match outcome {
        Ok(Ok(code)) => code,
        Ok(Err(err)) => {
            eprintln!("pitr {name}: error: {}", error::one_line(&err));
            contract.for_error(&err)
        }
        Err(_) => {
            eprintln!(
                "pitr {name}: error: internal error (a bug); please report it with the message above"
            );
            contract.for_panic()
        }
    };
    ExitCode::from(code)
}

fn command_name(c: &Command) -> &'static str {
    match c {
        Command::ArchivePush { .. } => "archive-push",
        Command::ArchiveGet { .. } => "archive-get",
        Command::Info { .. } => "info",
        Command::Backup { .. } => "backup",
        Command::Restore { .. } => "restore",
        Command::Replica { .. } => "replica",
        Command::Verify { .. } => "verify",
        Command::Check { .. } => "check",
        Command::Metrics => "metrics",
        Command::Drill { .. } => "drill",
        Command::Expire { .. } => "expire",
        Command::ArchivePrefetch { .. } => "archive-prefetch",
        Command::ArchiveSpoolClean { .. } => "archive-spool-clean",
    }
}

fn init_logging(verbose: u8, quiet: bool) {
    let level = match (quiet, verbose) {
        (true, _) => "error",
        (false, 0) => "info",
        (false, 1) => "debug",
        (false, _) => "trace",
    };
    // Our own messages at `level`; libraries only when they warn, unless asked for more.
    let lib = if verbose >= 2 { "debug" } else { "warn" };
    let filter = tracing_subscriber::EnvFilter::new(format!("{lib},pitr={level}"));
    // stderr goes to PostgreSQL's server log under archive/restore_command: no colours there.
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        .without_time()
        .init();
}

fn run(cli: Cli) -> anyhow::Result<u8> {
    // The only command that needs no repository.
    if let Command::ArchiveSpoolClean { spool } = &cli.command {
        archive::prefetch::clean(spool, std::time::Duration::from_secs(60));
        return Ok(exit::SUCCESS);
    }
    let settings = config::resolve(&cli.global)?;
    let quiet = cli.global.quiet;
    // Async archiving: most calls find their file already stored by an earlier call. Answer those
    // before building a runtime and a store client (tens of milliseconds for a cloud store).
    if let Command::ArchivePush { wal_path, parallel } = &cli.command
        && *parallel > 1
        && archive::batch::answered_by_marker(&settings.repo, wal_path).is_some()
    {
        return Ok(exit::SUCCESS);
    }
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
            r = run_command(cli, &settings, quiet) => r,
        }
    });
    // Everything the command waits for has finished; idle worker threads need not be joined (that
    // costs milliseconds on every archive-push and archive-get).
    runtime.shutdown_background();
    result
}

async fn run_command(cli: Cli, settings: &config::Settings, quiet: bool) -> anyhow::Result<u8> {
    {
        // Only the commands that store a cluster's first objects may bring a repository into being.
        let repo = match &cli.command {
            Command::ArchivePush { .. } | Command::Backup { .. } | Command::Check { .. } => {
                Repo::create(&settings.repo)?
            }
            _ => Repo::open(&settings.repo)?,
        };
        match cli.command {
            Command::ArchivePush { wal_path, parallel } => {
                archive::batch::push_with_ahead(
                    &repo,
                    &wal_path,
                    settings.compress,
                    usize::from(parallel),
                )
                .await?;
                Ok(exit::SUCCESS)
            }
            Command::ArchiveGet {
                wal_name,
                dest_path,
                prefetch,
            } => {
                let mut global_args = vec!["--repo".to_string(), settings.repo.clone()];
                if let Some(c) = &settings.config_path {
                    global_args.push("--config".into());
                    global_args.push(
                        c.canonicalize()
                            .unwrap_or_else(|_| c.clone())
                            .to_string_lossy()
                            .into_owned(),
                    );
                }
                let prefetch = archive::get::Prefetch {
                    count: prefetch,
                    global_args,
                };
                match archive::get::get_with_prefetch(&repo, &wal_name, &dest_path, &prefetch)
                    .await?
                {
                    GetOutcome::Written { .. } => Ok(exit::SUCCESS),
                    GetOutcome::NotFound => Ok(exit::FAILURE),
                }
            }
            Command::ArchivePrefetch {
                after,
                spool,
                count,
                seg_size,
            } => {
                let WalFileName::Segment(seg) = after.parse::<WalFileName>()? else {
                    anyhow::bail!("{after} is not a segment name");
                };
                let seg_size = pitr::pg::WalSegSize::new(seg_size)
                    .ok_or_else(|| anyhow::anyhow!("bad segment size {seg_size}"))?;
                archive::prefetch::run(&repo, seg, &spool, count, seg_size).await?;
                Ok(exit::SUCCESS)
            }
            Command::ArchiveSpoolClean { .. } => Ok(exit::SUCCESS),
            other => pitr::commands::run(other, &repo, settings, quiet).await,
        }
    }
}
