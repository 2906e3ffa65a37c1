//! `pitr copy`: what one repository holds and another lacks, copied and checked (the offsite copy,
//! or a repository seeded again after a loss).
//!
//! Each object is copied as its envelope (its compression and checksums as they are; an encrypted
//! target seals it under its own keys): the source's copy is checked (payload and attachment
//! checksums) before it is written, and the target's is read back and compared byte for byte after.
//! Objects the target already holds are left alone, so a copy that was stopped continues where it
//! was; one that holds different content is never replaced (that is a finding). Order: `pitr.json`,
//! timeline histories and WAL, the WAL index's roll-ups, then each backup with its manifest last, so
//! the target shows a backup only once all of it is there.

use std::collections::HashSet;

use futures::StreamExt;
use serde::Serialize;

use crate::catalog::Catalog;
use crate::storage::layout::{ObjectKey, Prefix};
use crate::storage::{Entry, PutMode, Repo, RepoError, envelope};

/// What to copy.
#[derive(Clone, Debug, Default)]
pub struct CopyOptions {
    /// Only this backup (and the backups it builds on); every backup when `None`.
    pub backup: Option<String>,
    /// Objects copied at once.
    pub jobs: usize,
    /// Only WAL, summaries and roll-ups (no backups): how archive-push catches up a repository
    /// that missed segments.
    pub wal_only: bool,
}

/// A problem found while copying.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct CopyFinding {
    /// `corrupt` (the source's copy fails its checks), `conflict` (the target holds different
    /// content), `failed` (a read or write failed), `incomplete` (a backup left without its
    /// manifest because one of its objects was not copied).
    pub kind: &'static str,
    /// The object key, or the backup.
    pub object: String,
    /// What happened.
    pub detail: String,
}

/// What a copy did.
#[derive(Clone, Debug, Default, Serialize)]
pub struct CopyReport {
    /// Objects copied now.
    pub objects_copied: u64,
    /// Their stored bytes.
    pub bytes_copied: u64,
    /// Objects the target already held.
    pub objects_present: u64,
    /// Backups the target now holds whole that it did not before.
    pub backups_copied: Vec<String>,
    /// Problems; none when the target now holds everything asked for.
    pub findings: Vec<CopyFinding>,
}

/// Progress: objects done of objects to copy.
pub type Progress<'a> = &'a (dyn Fn(u64, u64) + Sync);

/// Copy from `from` into `to` what `to` lacks.
///
/// # Errors
/// The repositories belong to different clusters, a listing fails, or the source's catalog cannot
/// be read; per-object problems are findings.
pub async fn run(
    from: &Repo,
    to: &Repo,
    opts: &CopyOptions,
    progress: Progress<'_>,
) -> anyhow::Result<CopyReport> {
    use anyhow::Context;
    let identity = from.require_identity().await?;
    to.ensure_identity(&identity)
        .await
        .with_context(|| format!("repository {}", to.location()))?;
    let catalog = Catalog::load(from).await?;
    let backups: Vec<String> = match &opts.backup {
        _ if opts.wal_only => Vec::new(),
        None => catalog.backups.iter().map(|b| b.id.clone()).collect(),
        Some(want) => {
            let b = catalog
                .backups
                .iter()
                .find(|b| &b.id == want || &b.label == want)
                .ok_or_else(|| {
                    anyhow::anyhow!(
                        "repository {} holds no complete backup {want} (pitr info lists them)",
                        from.location()
                    )
                })?;
            catalog
                .chain(b)
                .map_err(anyhow::Error::msg)?
                .iter()
                .map(|b| b.id.clone())
                .collect()
        }
    };
    drop(catalog);
    let source = from.list(&Prefix::Everything).await?;
    let present: HashSet<String> = to
        .list(&Prefix::Everything)
        .await?
        .into_iter()
        .map(|e| e.key().to_string())
        .collect();
    // What to copy, in phases: WAL and roll-ups, then each backup's objects, then its manifest.
    let mut wal = Vec::new();
    let mut backup_objects: std::collections::BTreeMap<String, (Vec<Entry>, Option<Entry>)> =
        backups
            .iter()
            .map(|id| (id.clone(), (Vec::new(), None)))
            .collect();
    let mut report = CopyReport::default();
    for e in source {
        match &e.object {
            Some(ObjectKey::Wal(_) | ObjectKey::Summary(_) | ObjectKey::Rollup { .. }) => {
                wal.push(e)
            }
            Some(
                ObjectKey::BackupManifest(id)
                | ObjectKey::BackupClaim(id)
                | ObjectKey::BackupLabel(id)
                | ObjectKey::TablespaceMap(id)
                | ObjectKey::BackupPart { id, .. }
                | ObjectKey::BackupBundle { id, .. },
            ) => {
                if let Some(slot) = backup_objects.get_mut(id) {
                    if matches!(e.object, Some(ObjectKey::BackupManifest(_))) {
                        slot.1 = Some(e);
                    } else {
                        slot.0.push(e);
                    }
                }
            }
            // pitr.json (done above), the keyring and the verify status belong to each repository.
            _ => {}
        }
    }
    let missing = |list: Vec<Entry>, report: &mut CopyReport| -> Vec<Entry> {
        let (have, lack): (Vec<Entry>, Vec<Entry>) =
            list.into_iter().partition(|e| present.contains(e.key()));
        report.objects_present += have.len() as u64;
        lack
    };
    let wal = missing(wal, &mut report);
    let mut plan: Vec<(String, Vec<Entry>, Option<Entry>)> = Vec::new();
    for (id, (objects, manifest)) in backup_objects {
        let Some(manifest) = manifest else { continue };
        if present.contains(manifest.key()) {
            report.objects_present += 1 + objects.len() as u64;
            continue;
        }
        plan.push((id, missing(objects, &mut report), Some(manifest)));
    }
    let total = wal.len() as u64
        + plan
            .iter()
            .map(|(_, o, m)| o.len() as u64 + u64::from(m.is_some()))
            .sum::<u64>();
    let done = std::sync::atomic::AtomicU64::new(0);
    let step = || {
        let n = done.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
        progress(n, total);
    };
    progress(0, total);
    let jobs = opts.jobs.max(1);
    let copy_all = |list: Vec<Entry>| {
        futures::stream::iter(list)
            .map(|e| async {
                let r = copy_one(from, to, &e).await;
                step();
                (e, r)
            })
            .buffer_unordered(jobs)
            .collect::<Vec<_>>()
    };
    let tally = |results: Vec<(Entry, Result<u64, CopyFinding>)>, report: &mut CopyReport| {
        let mut ok = true;
        for (_, r) in results {
            match r {
                Ok(bytes) => {
                    report.objects_copied += 1;
                    report.bytes_copied += bytes;
                }
                Err(f) => {
                    ok = false;
                    report.findings.push(f);
                }
            }
        }
        ok
    };
    let results = copy_all(wal).await;
    tally(results, &mut report);
    for (id, objects, manifest) in plan {
        let results = copy_all(objects).await;
        if !tally(results, &mut report) {
            report.findings.push(CopyFinding {
                kind: "incomplete",
                object: format!("backup {id}"),
                detail: "not all of its objects were copied, so its manifest was not: run pitr copy again once the findings above are dealt with".into(),
            });
            continue;
        }
        if let Some(m) = manifest {
            let results = copy_all(vec![m]).await;
            if tally(results, &mut report) {
                report.backups_copied.push(id);
            }
        }
    }
    Ok(report)
}

/// Copy one object; its stored size, or the finding.
async fn copy_one(from: &Repo, to: &Repo, e: &Entry) -> Result<u64, CopyFinding> {
    let finding = |kind: &'static str, detail: String| CopyFinding {
        kind,
        object: e.key().to_string(),
        detail,
    };
    let Some(key) = e.object.clone() else {
        return Err(finding("failed", "not an object pitr wrote".into()));
    };
    let stored = match from.get_stored(e).await {
        Ok(Some(b)) => b,
        Ok(None) => {
            return Err(finding(
                "failed",
                "deleted from the source while copying".into(),
            ));
        }
        Err(err) => {
            let kind = if matches!(err, RepoError::Corrupt { .. }) {
                "corrupt"
            } else {
                "failed"
            };
            return Err(finding(kind, err.to_string()));
        }
    };
    if let Err(detail) = envelope::check_stored(&stored) {
        return Err(finding(
            "corrupt",
            format!("the source's copy in {}: {detail}", from.location()),
        ));
    }
    let len = stored.len() as u64;
    let mode = match key {
        ObjectKey::Rollup { .. } | ObjectKey::Summary(_) => PutMode::OverwriteDerived,
        _ => PutMode::CreateUnique,
    };
    match to.put(&key, stored.to_vec(), mode).await {
        Ok(_) => {}
        Err(RepoError::Conflict { .. }) => {
            // The same content stored differently (another compression) is not a conflict.
            let same = match (to.get(&key).await, envelope::decode(&stored)) {
                (Ok(Some(theirs)), Ok(ours)) => theirs == ours,
                _ => false,
            };
            if same {
                return Ok(0);
            }
            return Err(finding(
                "conflict",
                format!(
                    "{} already holds different content under this key; it was left as it is",
                    to.location()
                ),
            ));
        }
        Err(err) => return Err(finding("failed", err.to_string())),
    }
    // Read back: the target must now hold exactly these bytes.
    match to.get_stored(&key).await {
        Ok(Some(back)) if back == stored => Ok(len),
        Ok(Some(_)) => Err(finding(
            "failed",
            format!(
                "read back from {}, it differs from what was written",
                to.location()
            ),
        )),
        Ok(None) => Err(finding(
            "failed",
            format!("not found in {} right after it was written", to.location()),
        )),
        Err(err) => Err(finding("failed", format!("read back: {err}"))),
    }
}
