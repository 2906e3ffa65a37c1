//! `pitr key`: an encrypted repository's keys (generate a key file, add, list, retire).

use std::path::PathBuf;

use pitr::exit;
use pitr::storage::Repo;

#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    #[command(subcommand)]
    action: Action,
}

#[derive(Debug, clap::Subcommand)]
enum Action {
    /// Write a new key file (32 random bytes as hex, mode 0600; an existing file is never
    /// replaced). Needs no repository.
    Generate {
        /// The file to create.
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
    },
    /// Add a repository key, wrapped by the configured key file or passphrase; new objects use it.
    Add {
        /// Machine-readable JSON.
        #[arg(long)]
        json: bool,
    },
    /// List the repository's keys: id, when added, and whether active, live or retired.
    List {
        /// Machine-readable JSON.
        #[arg(long)]
        json: bool,
    },
    /// Retire a key: what it wraps is rewrapped by the active key (the data is not re-encrypted),
    /// then the key is dropped.
    Retire {
        /// The key id, as `pitr key list` shows it.
        id: String,
        /// Objects rewrapped at once.
        #[arg(long, value_name = "N", default_value_t = 16)]
        jobs: usize,
        /// Machine-readable JSON.
        #[arg(long)]
        json: bool,
    },
}

/// `pitr key generate`, which runs without a repository; `None` for the other actions.
pub(crate) fn without_repository(args: &Args) -> Option<anyhow::Result<u8>> {
    match &args.action {
        Action::Generate { out } => Some((|| {
            pitr::storage::keys::generate_key_file(out)?;
            crate::outln!(
                "wrote a new key file {} (keep a copy away from the repository: without it nothing encrypted with it can be read)",
                out.display()
            );
            Ok(exit::SUCCESS)
        })()),
        _ => None,
    }
}

/// Run the command.
///
/// # Errors
/// Its failure, for `main` to report.
pub(crate) async fn run(args: Args, repo: &Repo) -> anyhow::Result<u8> {
    match args.action {
        Action::Generate { .. } => without_repository(&args).unwrap_or(Ok(exit::FAILURE)),
        Action::Add { json } => {
            let entry = repo.key_add().await?;
            if json {
                crate::outln!(
                    "{}",
                    serde_json::to_string_pretty(&serde_json::json!({
                        "id": entry.id,
                        "created": entry.created,
                    }))?
                );
            } else {
                crate::outln!(
                    "added repository key {} ({}); new objects use it",
                    entry.id,
                    entry.created
                );
            }
            Ok(exit::SUCCESS)
        }
        Action::List { json } => {
            let (entries, active) = repo.key_entries().await?;
            let state = |e: &pitr::storage::keys::KeyEntry| {
                if active.as_deref() == Some(e.id.as_str()) {
                    "active"
                } else if e.retired.is_some() {
                    "retired"
                } else {
                    "live"
                }
            };
            if json {
                let keys: Vec<serde_json::Value> = entries
                    .iter()
                    .map(|e| {
                        serde_json::json!({
                            "id": e.id,
                            "created": e.created,
                            "state": state(e),
                            "retired": e.retired,
                            "kdf": match e.kdf {
                                pitr::storage::keys::Kdf::HkdfSha256 { .. } => "key file (HKDF-SHA256)",
                                pitr::storage::keys::Kdf::Argon2id { .. } => "passphrase (argon2id)",
                            },
                        })
                    })
                    .collect();
                crate::outln!(
                    "{}",
                    serde_json::to_string_pretty(&serde_json::json!({ "keys": keys }))?
                );
            } else {
                crate::outln!("{:<18} {:<8} {:<29} retired", "id", "state", "added");
                for e in &entries {
                    crate::outln!(
                        "{:<18} {:<8} {:<29} {}",
                        e.id,
                        state(e),
                        e.created,
                        e.retired.as_deref().unwrap_or("-")
                    );
                }
            }
            Ok(exit::SUCCESS)
        }
        Action::Retire { id, jobs, json } => {
            let r = repo.key_retire(&id, jobs).await?;
            if json {
                crate::outln!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                crate::outln!(
                    "retired key {}: {} of {} objects rewrapped to key {} in {} pass(es)",
                    r.id,
                    r.objects_rewrapped,
                    r.objects_checked,
                    r.rewrapped_to,
                    r.passes
                );
            }
            Ok(exit::SUCCESS)
        }
    }
}
