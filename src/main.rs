//! The `pitr` binary: parse arguments, run the command, map the outcome to an exit code.

use std::io::IsTerminal;
use std::path::Path;
use std::process::ExitCode;

use clap::Parser;

use pitr::archive::get::GetOutcome;
use pitr::cli::{Cli, Command};
use pitr::exit::{self, Contract};
use pitr::storage::Repo;
use pitr::{archive, config, error};

fn main() -> ExitCode {
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
    let contract = match &cli.command {
        Command::ArchivePush { .. } => Contract::ArchivePush,
        Command::ArchiveGet { .. } => Contract::ArchiveGet {
            standby: Path::new("standby.signal").exists(),
        },
        Command::Info { .. } | Command::Backup { .. } => Contract::Other,
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
    let settings = config::resolve(&cli.global)?;
    let quiet = cli.global.quiet;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let repo = Repo::open(&settings.repo)?;
        match cli.command {
            Command::ArchivePush { wal_path } => {
                archive::push::push(&repo, &wal_path, settings.compress).await?;
                Ok(exit::SUCCESS)
            }
            Command::ArchiveGet {
                wal_name,
                dest_path,
            } => match archive::get::get(&repo, &wal_name, &dest_path).await? {
                GetOutcome::Written { .. } => Ok(exit::SUCCESS),
                GetOutcome::NotFound => Ok(exit::FAILURE),
            },
            Command::Backup { pgdata, dbname, label, jobs, archive_timeout, json } => {
                let opts = pitr::backup::BackupOptions {
                    pgdata,
                    dbname,
                    label,
                    jobs: jobs.unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get())),
                    compression: settings.compress,
                    archive_timeout,
                    progress: !quiet,
                };
                let started = std::time::Instant::now();
                let m = pitr::backup::run(&repo, &opts).await?;
                let secs = started.elapsed().as_secs_f64();
                let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
                if json {
                    let summary = serde_json::json!({
                        "id": m.id, "label": m.label, "timeline": m.timeline,
                        "start_lsn": m.start_lsn, "stop_lsn": m.stop_lsn,
                        "start_time": m.start_time, "stop_time": m.stop_time,
                        "start_wal": m.start_wal, "stop_wal": m.stop_wal,
                        "files": m.files.len(), "size_bytes": m.size_bytes, "stored_bytes": m.stored_bytes,
                        "compression": m.compression, "jobs": opts.jobs, "duration_seconds": secs,
                        "throughput_mib_per_second": mib(m.size_bytes) / secs.max(1e-9),
                    });
                    println!("{}", serde_json::to_string_pretty(&summary)?);
                } else {
                    println!(
                        "backup {} complete: {} files, {:.1} MiB copied, {:.1} MiB stored ({}), {:.1} s, {:.1} MiB/s; WAL {} to {}",
                        m.id,
                        m.files.len(),
                        mib(m.size_bytes),
                        mib(m.stored_bytes),
                        m.compression,
                        secs,
                        mib(m.size_bytes) / secs.max(1e-9),
                        m.start_wal,
                        m.stop_wal
                    );
                }
                Ok(exit::SUCCESS)
            }
            Command::Info { json } => {
                let catalog = pitr::catalog::Catalog::load(&repo).await?;
                let info = pitr::info::Info::new(repo.location(), &catalog);
                if json {
                    println!("{}", serde_json::to_string_pretty(&info)?);
                } else {
                    print!("{}", info.render());
                }
                Ok(exit::SUCCESS)
            }
        }
    })
}
