//! `archive-push`: validate a WAL file PostgreSQL hands over, then store it with a conditional create.
//!
//! Nothing is stored unless the file is what its name says: a segment (or `.partial`) whose long page
//! header has a supported magic, a valid segment and page size, the page address the name implies,
//! and the system identifier the repository recorded; a `.history` file that parses; a `.backup`
//! file that looks like one. An identical copy already stored is success (PostgreSQL re-archives
//! after a crash, and `archive_mode=always` standbys push the same files); different bytes under
//! the same name are refused and the stored object is left alone.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::compress::Compression;
use crate::index::{self, ParseStatus, SegmentSummary};
use crate::pg::SegmentName;
use crate::pg::WalFileName;
use crate::pg::segment::validate_segment;
use crate::pg::timeline::History;
use crate::storage::RepoError;
use crate::storage::identity::RepoIdentity;
use crate::storage::layout::ObjectKey;
use crate::storage::{PutOutcome, Repo};

/// What a push did.
#[derive(Clone, Debug)]
pub struct PushReport {
    /// The file archived.
    pub name: WalFileName,
    /// Stored now, or found already stored.
    pub outcome: PutOutcome,
    /// Size of the file.
    pub original_bytes: u64,
    /// Wall time of the whole push.
    pub elapsed: Duration,
}

/// The WAL file name at the end of `path`.
///
/// # Errors
/// When the path does not end in a WAL file name.
pub fn name_of(path: &Path) -> anyhow::Result<WalFileName> {
    let file = path
        .file_name()
        .and_then(|f| f.to_str())
        .with_context(|| format!("{} does not name a file", path.display()))?;
    Ok(file.parse::<WalFileName>()?)
}

/// Archive the file at `wal_path` into `repo`.
///
/// # Errors
/// Any failure; nothing is acknowledged unless the object is durably stored.
pub async fn push(
    repo: &Repo,
    wal_path: &Path,
    compression: Compression,
) -> anyhow::Result<PushReport> {
    let start = Instant::now();
    let name = name_of(wal_path)?;
    let data = tokio::fs::read(wal_path)
        .await
        .with_context(|| format!("read {}", wal_path.display()))?;
    let mut summary = None;
    match name {
        WalFileName::Segment(seg) | WalFileName::Partial(seg) => {
            let header = validate_segment(seg, &data).with_context(|| format!("refuse {name}"))?;
            repo.ensure_identity(&RepoIdentity::from_header(&header))
                .await
                .with_context(|| format!("refuse {name}"))?;
            if matches!(name, WalFileName::Segment(_)) {
                summary = Some((
                    seg,
                    index::summarize(&data, seg, header.seg_size, header.page_size, header.major),
                ));
            }
        }
        WalFileName::History(tli) => {
            History::parse(tli, &data).with_context(|| format!("refuse {name}"))?;
        }
        WalFileName::BackupHistory { .. } => {
            let text = std::str::from_utf8(&data).ok();
            if !text.is_some_and(|t| t.starts_with("START WAL LOCATION:")) {
                bail!(
                    "refuse {name}: not a backup history file (it must start with \"START WAL LOCATION:\")"
                );
            }
        }
    }
    let outcome = repo
        .put_new(&ObjectKey::Wal(name), &data, compression)
        .await
        .with_context(|| format!("archive {name}"))?;
    if let Some((seg, summary)) = summary {
        store_summary(repo, seg, &summary)
            .await
            .with_context(|| format!("index {name}"))?;
    }
    let report = PushReport {
        name,
        outcome,
        original_bytes: data.len() as u64,
        elapsed: start.elapsed(),
    };
    match outcome {
        PutOutcome::Stored { stored_bytes } => tracing::debug!(
            "archived {name}: {} bytes stored as {stored_bytes} ({compression}) in {:.1} ms",
            report.original_bytes,
            report.elapsed.as_secs_f64() * 1e3
        ),
        PutOutcome::AlreadyStored => {
            tracing::info!("{name} was already archived with identical content")
        }
    }
    Ok(report)
}

/// Store a segment's summary after the segment itself. The summary is derived data: if one is already
/// stored (an earlier push, or an older pitr), it is kept, and a differing one is not an error.
async fn store_summary(
    repo: &Repo,
    seg: SegmentName,
    summary: &SegmentSummary,
) -> anyhow::Result<()> {
    if let ParseStatus::Failed { lsn, reason } = &summary.status {
        tracing::warn!(
            "{seg}: WAL records could not be indexed past {lsn}: {reason}; the segment is archived as is"
        );
    }
    let json = serde_json::to_vec(summary)?;
    match repo
        .put_new(&ObjectKey::Summary(seg), &json, Compression::Zstd)
        .await
    {
        Ok(_) => Ok(()),
        Err(RepoError::Conflict { .. }) => {
            tracing::debug!("{seg}: a different summary is already stored; keeping it");
            Ok(())
        }
        Err(e) => Err(e.into()),
    }
}
