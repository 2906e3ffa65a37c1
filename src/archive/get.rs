//! `archive-get`: fetch a WAL file for recovery, verified before a byte reaches `%p`.
//!
//! The object's checksums are checked in memory; only then is `%p` written, through a temp file that
//! is fsynced and renamed, so PostgreSQL never sees a partial or unverified file. See `exit` for how
//! outcomes map to exit codes.

use std::path::Path;

use anyhow::Context;

use crate::durable;
use crate::pg::WalFileName;
use crate::storage::Repo;
use crate::storage::layout::ObjectKey;

/// What a fetch did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GetOutcome {
    /// The file was written to the destination.
    Written {
        /// Its size.
        bytes: u64,
    },
    /// The repository does not hold it.
    NotFound,
}

/// Fetch `wal_name` from `repo` into `dest`.
///
/// # Errors
/// The object exists but cannot be read or verified, or the destination cannot be written.
pub async fn get(repo: &Repo, wal_name: &str, dest: &Path) -> anyhow::Result<GetOutcome> {
    let name: WalFileName = match wal_name.parse() {
        Ok(n) => n,
        Err(e) => {
            // pitr never stores such a name, so the repository positively does not hold it.
            tracing::warn!("{e}; answering not found");
            return Ok(GetOutcome::NotFound);
        }
    };
    let Some(data) = repo
        .get(&ObjectKey::Wal(name))
        .await
        .with_context(|| format!("fetch {name}"))?
    else {
        tracing::debug!("{name} is not in {}", repo.location());
        return Ok(GetOutcome::NotFound);
    };
    durable::write_atomically(dest, &data)
        .with_context(|| format!("write {name} to {}", dest.display()))?;
    tracing::debug!(
        "restored {name} ({} bytes) to {}",
        data.len(),
        dest.display()
    );
    Ok(GetOutcome::Written {
        bytes: data.len() as u64,
    })
}
