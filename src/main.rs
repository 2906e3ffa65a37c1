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
            other => pitr::commands::run(other, &repo, &settings, quiet).await,
        }
    })
}
