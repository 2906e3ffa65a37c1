//! `pitr.json`: which cluster a repository belongs to.
//!
//! Written by the first `archive-push` of a WAL segment (from that segment's long page header) with a
//! conditional create; every later segment must match it. The content is deterministic (no
//! timestamps), so two first pushes racing each other write identical bytes.

use serde::{Deserialize, Serialize};

use super::layout::{ObjectKey, Prefix};
use super::{PutMode, Repo, RepoError};
use crate::compress::Compression;
use crate::pg::segment::SegmentHeader;
use crate::pg::{SystemId, WalSegSize};

/// The repository format this pitr writes.
pub const FORMAT_VERSION: u32 = 1;

/// The identity of the cluster a repository holds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RepoIdentity {
    /// Repository format version.
    pub format_version: u32,
    /// The cluster's system identifier, stored as text (it exceeds JSON's exact integer range).
    pub system_identifier: SystemId,
    /// PostgreSQL major version.
    pub pg_version: u32,
    /// WAL segment size (stored in bytes).
    pub wal_segment_size: WalSegSize,
    /// WAL page size in bytes.
    pub wal_page_size: u32,
}

impl crate::format::Versioned for RepoIdentity {
    const WHAT: &'static str = "repository identity (pitr.json)";
    const SUPPORTED: u32 = FORMAT_VERSION;
    fn version(&self) -> u32 {
        self.format_version
    }
}

impl RepoIdentity {
    /// The identity a segment header describes.
    pub fn from_header(h: &SegmentHeader) -> RepoIdentity {
        RepoIdentity {
            format_version: FORMAT_VERSION,
            system_identifier: SystemId(h.system_identifier),
            pg_version: h.major.number(),
            wal_segment_size: h.seg_size,
            wal_page_size: h.page_size,
        }
    }

    fn describe(&self) -> String {
        format!(
            "cluster {} (PostgreSQL {}, {} MiB WAL segments)",
            self.system_identifier,
            self.pg_version,
            self.wal_segment_size.bytes() >> 20
        )
    }
}

impl Repo {
    /// The recorded identity, if any.
    ///
    /// # Errors
    /// Store failures, or a corrupt / unreadable `pitr.json`.
    pub async fn identity(&self) -> Result<Option<RepoIdentity>, RepoError> {
        let key = ObjectKey::Identity;
        let Some(bytes) = self.get(&key).await? else {
            return Ok(None);
        };
        crate::format::decode::<RepoIdentity>(&bytes)
            .map(Some)
            .map_err(|e| RepoError::Format {
                key: key.key(),
                repo: self.location().to_string(),
                source: e,
            })
    }

    /// The recorded identity, which every reading command needs: without `pitr.json` there is no
    /// repository here (a missing bucket, an unmounted or emptied directory, a wrong URL), and
    /// nothing found missing in it may be taken as "not archived".
    ///
    /// # Errors
    /// `NoRepository` naming what is there instead; store failures; a corrupt `pitr.json`.
    pub async fn require_identity(&self) -> Result<RepoIdentity, RepoError> {
        if let Some(id) = self.identity().await? {
            return Ok(id);
        }
        Err(RepoError::NoRepository {
            repo: self.location().to_string(),
            reason: self.what_is_here().await,
        })
    }

    /// What a location without `pitr.json` holds, for the message that says it is no repository.
    async fn what_is_here(&self) -> String {
        if let Some(root) = self.local_root.as_deref() {
            if root.join("PG_VERSION").exists() {
                return format!(
                    "{} is a PostgreSQL data directory, not a pitr repository",
                    root.display()
                );
            }
            if std::fs::read_dir(root).is_ok_and(|mut d| d.next().is_none()) {
                return format!(
                    "directory {} is empty (an unmounted mount point, or nothing archived yet)",
                    root.display()
                );
            }
        }
        let top = self
            .list_dirs(&Prefix::Everything)
            .await
            .unwrap_or_default();
        let ours: Vec<&str> = top
            .iter()
            .map(String::as_str)
            .filter(|d| [super::layout::WAL_PREFIX, super::layout::BACKUP_PREFIX].contains(d))
            .collect();
        if ours.is_empty() {
            "it holds no pitr.json (a missing or emptied bucket, or a wrong URL or prefix)".into()
        } else {
            format!(
                "it holds {} but no pitr.json, which was deleted or lost: copy it back from another copy of the repository (it names the cluster, PostgreSQL version and segment size)",
                ours.iter()
                    .map(|d| format!("{d}/"))
                    .collect::<Vec<_>>()
                    .join(" and ")
            )
        }
    }

    /// Record `want` as this repository's identity if it has none, or check that it matches.
    ///
    /// # Errors
    /// `IdentityMismatch` when the repository belongs to another cluster or format.
    pub async fn ensure_identity(&self, want: &RepoIdentity) -> Result<(), RepoError> {
        if self.identity_checked(want) {
            return Ok(());
        }
        self.ensure_identity_uncached(want).await?;
        self.remember_identity(want);
        Ok(())
    }

    async fn ensure_identity_uncached(&self, want: &RepoIdentity) -> Result<(), RepoError> {
        let have = match self.identity().await? {
            Some(have) => have,
            None => {
                let json = serde_json::to_vec_pretty(want).expect("identity serializes");
                let key = ObjectKey::Identity;
                let sealed = self.seal(&key, &json, Compression::None)?;
                match self.put(&key, sealed, PutMode::compare_with(&json)).await {
                    Ok(_) => return Ok(()),
                    // Someone else created it meanwhile: compare with theirs.
                    Err(RepoError::Conflict { .. }) => {
                        self.identity().await?.unwrap_or_else(|| want.clone())
                    }
                    Err(e) => return Err(e),
                }
            }
        };
        if have.system_identifier != want.system_identifier
            || have.pg_version != want.pg_version
            || have.wal_segment_size != want.wal_segment_size
            || have.wal_page_size != want.wal_page_size
        {
            return Err(RepoError::IdentityMismatch {
                repo: self.location().to_string(),
                repo_has: have.describe(),
                found: want.describe(),
            });
        }
        Ok(())
    }
}
