//! `pitr verify`: read back everything the repository holds and check it.
//!
//! * every object is downloaded and its checksums verified (in parallel, memory bounded by the number
//!   of streams × one object);
//! * every backup's pieces exist and match the manifest's sizes and CRC-32Cs, and its `backup_label`
//!   exists;
//! * WAL is contiguous on every timeline from the oldest backup's start to the end of the archive;
//! * unexpected deletions: a segment whose summary is still there (the summary is written after the
//!   segment, so the segment was deleted later), a backup piece the manifest lists, a history file a
//!   newer timeline's history names;
//! * segments whose WAL records could not be decoded, unreadable summaries;
//! * each history file repeats its parent's lines, as PostgreSQL writes them.
//!
//! Every finding names the object or segment. The result is also stored as `status/verify.json` for
//! `pitr metrics`.

use std::collections::{BTreeMap, BTreeSet};

use futures::StreamExt;
use serde::Serialize;

use crate::catalog::Catalog;
use crate::compress::Compression;
use crate::manifest::BackupManifest;
use crate::pg::PgTimestamp;
use crate::pg::{SegNo, TimelineId, WalFileName};
use crate::storage::layout::{ObjectKey, Prefix};
use crate::storage::{Entry, PutMode, Repo, RepoError, envelope};

/// `status/verify.json`: the last verify's outcome, read by `pitr metrics`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct VerifyStatus {
    /// Format version (objects written before it was recorded are format 1).
    #[serde(default = "first_format")]
    pub format_version: u32,
    /// When verify finished.
    pub finished_at: PgTimestamp,
    /// How many findings it reported.
    pub findings: usize,
    /// How many objects it read.
    pub objects_checked: u64,
}

/// The verify status format this pitr writes.
pub const VERIFY_STATUS_FORMAT: u32 = 1;

fn first_format() -> u32 {
    1
}

impl crate::format::Versioned for VerifyStatus {
    const WHAT: &'static str = "verify status";
    const SUPPORTED: u32 = VERIFY_STATUS_FORMAT;
    fn version(&self) -> u32 {
        self.format_version
    }
}

/// One problem.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Finding {
    /// `corrupt`, `missing`, `gap`, `index`, `history`, `branch`, `backup`, `checksum`.
    pub kind: &'static str,
    /// The object key or segment name.
    pub object: String,
    /// What is wrong.
    pub detail: String,
}

/// The verify report.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// The repository.
    pub repository: String,
    /// When verify finished.
    pub finished_at: PgTimestamp,
    /// Objects read and verified.
    pub objects_checked: u64,
    /// Bytes the objects hold once decoded (the original sizes).
    pub bytes_checked: u64,
    /// Bytes read from the store (compressed, with headers).
    pub stored_bytes_checked: u64,
    /// Backups checked.
    pub backups_checked: usize,
    /// Problems; empty means the repository is sound.
    pub findings: Vec<Finding>,
    /// Roll-ups of the WAL index written for complete chunks that had none.
    pub rollups_written: usize,
    /// Stale or unreadable roll-ups deleted.
    pub rollups_removed: usize,
}

/// Verify the repository with `jobs` parallel reads.
///
/// # Errors
/// Only failures to list or read the store at all; everything about the content is a finding.
pub async fn run(repo: &Repo, jobs: usize) -> anyhow::Result<Report> {
    // The objects themselves, not the roll-ups: those are checked against them below.
    let catalog = Catalog::load_exhaustive(repo).await?;
    let mut findings = index_findings(&catalog);
    let listing = repo.list(&Prefix::Everything).await?;
    let present: BTreeSet<String> = listing.iter().map(|e| e.key().to_string()).collect();
    let objects = check_objects(repo, listing, jobs).await;
    findings.extend(objects.findings);
    // The catalog holds manifests without their files: each is read again, one at a time.
    let mut bundled_bytes = 0u64;
    for b in &catalog.backups {
        match crate::catalog::manifest_with_files(repo, b).await {
            Ok(full) => {
                findings.extend(check_backup(repo, &full, &present, jobs).await);
                bundled_bytes += full
                    .files
                    .iter()
                    .flat_map(|f| &f.parts)
                    .filter(|p| p.bundle.is_some())
                    .map(|p| p.size)
                    .sum::<u64>();
            }
            Err(e) => findings.push(unreadable_manifest(b, &e)),
        }
    }
    findings.extend(wal_findings(&catalog, &present));
    findings.extend(chain_findings(repo, &catalog).await);
    findings.extend(history_findings(&catalog));
    findings.extend(backup_findings(&catalog, &present));
    // Derived, so repaired rather than reported: a stale roll-up is deleted, and every complete
    // chunk gets one. What made one stale, a segment gone, is a finding (and a gap).
    let rollups = crate::rollup::repair(repo, &catalog, &present).await?;
    for (key, why) in &rollups.removed {
        tracing::warn!("removed the WAL index roll-up {key}: {why}");
    }
    findings.extend(rollups.missing.iter().map(|seg| Finding {
        kind: "missing",
        object: ObjectKey::Wal(WalFileName::Segment(*seg)).key(),
        detail: "archived (the WAL index's roll-up listed it) but deleted since".into(),
    }));
    findings.sort_by(|a, b| (a.kind, &a.object).cmp(&(b.kind, &b.object)));
    findings.dedup();
    let report = Report {
        repository: repo.location().to_string(),
        finished_at: PgTimestamp::now(),
        objects_checked: objects.checked,
        // Bundles count as their pieces' data.
        bytes_checked: objects.bytes + bundled_bytes,
        stored_bytes_checked: objects.stored_bytes,
        backups_checked: catalog.backups.len(),
        findings,
        rollups_written: rollups.written,
        rollups_removed: rollups.removed.len(),
    };
    // Record the result for `pitr metrics` (a status object may be replaced).
    let json = serde_json::to_vec(&VerifyStatus {
        format_version: VERIFY_STATUS_FORMAT,
        finished_at: report.finished_at,
        findings: report.findings.len(),
        objects_checked: report.objects_checked,
    })?;
    let key = ObjectKey::VerifyStatus;
    let stored = repo.seal(&key, &json, Compression::None)?;
    if let Err(e) = repo.put(&key, stored, PutMode::OverwriteDerived).await {
        tracing::warn!("record the verify result in {}: {e}", key.key());
    }
    Ok(report)
}

/// What the WAL index could not read.
fn index_findings(catalog: &Catalog) -> Vec<Finding> {
    catalog
        .problems
        .iter()
        .map(|p| Finding {
            kind: "index",
            object: p.segment.clone(),
            detail: match p.lsn {
                Some(lsn) => format!("WAL records could not be decoded past {lsn}: {}", p.reason),
                None => p.reason.clone(),
            },
        })
        .collect()
}

/// What reading every object back found.
struct ObjectsChecked {
    checked: u64,
    bytes: u64,
    stored_bytes: u64,
    findings: Vec<Finding>,
}

/// Every object's checksums (the verify status, which each run replaces, aside).
async fn check_objects(repo: &Repo, listing: Vec<Entry>, jobs: usize) -> ObjectsChecked {
    // (key, (decoded bytes, stored bytes) or what is wrong)
    type Checked = (String, Result<(u64, u64), String>);
    let checked: Vec<Checked> = futures::stream::iter(
        listing
            .into_iter()
            .filter(|e| e.object != Some(ObjectKey::VerifyStatus)),
    )
    .map(|entry| async move {
        let got = match repo.get_stored(&entry).await {
            Ok(Some(b)) => Ok(b),
            // pitr receive deletes a segment's chunks once it stores the whole segment.
            Ok(None) if matches!(entry.object, Some(ObjectKey::Streamed { .. })) => {
                return (entry.key().to_string(), Ok((0, 0)));
            }
            Ok(None) => Err("deleted while verify ran".to_string()),
            Err(e) => Err(e.to_string()),
        };
        let result = got.and_then(|b| {
            // A segment's summary, carried after its payload, is checked too.
            let decoded_len = envelope::check_stored(&b)?;
            // A bundle's payload is its members' envelopes: their data is counted with their
            // backup's pieces.
            let data = match entry.object {
                Some(ObjectKey::BackupBundle { .. }) => 0,
                _ => decoded_len as u64,
            };
            Ok((data, b.len() as u64))
        });
        (entry.key().to_string(), result)
    })
    .buffer_unordered(jobs.max(1))
    .collect()
    .await;
    let mut out = ObjectsChecked {
        checked: checked.len() as u64,
        bytes: 0,
        stored_bytes: 0,
        findings: Vec::new(),
    };
    for (key, r) in checked {
        match r {
            Ok((n, stored)) => {
                out.bytes += n;
                out.stored_bytes += stored;
            }
            Err(detail) => out.findings.push(Finding {
                kind: "corrupt",
                object: key,
                detail,
            }),
        }
    }
    out
}

/// A backup's label, and every piece its manifest lists, with its size and CRC.
async fn check_backup(
    repo: &Repo,
    b: &BackupManifest,
    present: &BTreeSet<String>,
    jobs: usize,
) -> Vec<Finding> {
    let mut findings = Vec::new();
    for (path, blocks) in b.checksum_failures() {
        findings.push(Finding {
            kind: "checksum",
            object: format!("backup {}: {path}", b.id),
            detail: format!(
                "{} page(s) were copied with a checksum that does not match (damage on the source): block {}",
                blocks.len(),
                blocks.iter().map(u32::to_string).collect::<Vec<_>>().join(", ")
            ),
        });
    }
    let label = ObjectKey::BackupLabel(b.id.clone()).key();
    if !present.contains(&label) {
        findings.push(Finding {
            kind: "missing",
            object: label,
            detail: format!("backup {} has no backup_label", b.id),
        });
    }
    // Each piece stored alone is read by itself; a bundle is read once for all its pieces.
    let mut alone = Vec::new();
    let mut bundles: BTreeMap<String, (ObjectKey, Vec<Member>)> = BTreeMap::new();
    for f in &b.files {
        for (i, p) in f.parts.iter().enumerate() {
            let at = p.at(&b.id, &f.path, i);
            match at.range {
                None => alone.push((at.key, p.size, p.crc32c)),
                Some(range) => {
                    let name = at.key.key();
                    bundles
                        .entry(name)
                        .or_insert_with(|| (at.key, Vec::new()))
                        .1
                        .push(Member {
                            path: &f.path,
                            range,
                            size: p.size,
                            crc: p.crc32c,
                        });
                }
            }
        }
    }
    let missing = |name: String| Finding {
        kind: "missing",
        object: name,
        detail: format!("listed in the manifest of backup {}", b.id),
    };
    let results: Vec<Option<Finding>> = futures::stream::iter(alone)
        .map(|(key, size, crc)| async move {
            let name = key.key();
            if !present.contains(&name) {
                return Some(missing(name));
            }
            match repo.get(&key).await {
                Ok(Some(d)) => differs(&d, size, crc).map(|detail| Finding {
                    kind: "corrupt",
                    object: name,
                    detail,
                }),
                Ok(None) => Some(missing(name)),
                Err(RepoError::Corrupt { .. }) => None, // already reported with every object
                Err(e) => Some(Finding {
                    kind: "corrupt",
                    object: name,
                    detail: e.to_string(),
                }),
            }
        })
        .buffer_unordered(jobs.max(1))
        .collect()
        .await;
    findings.extend(results.into_iter().flatten());
    let results: Vec<Vec<Finding>> = futures::stream::iter(bundles.into_values())
        .map(|(key, members)| async move {
            let name = key.key();
            let gone = || Finding {
                kind: "missing",
                object: name.clone(),
                detail: format!(
                    "a bundle of {} piece(s) ({}{}) listed in the manifest of backup {}",
                    members.len(),
                    members
                        .iter()
                        .take(3)
                        .map(|m| m.path)
                        .collect::<Vec<_>>()
                        .join(", "),
                    if members.len() > 3 { ", …" } else { "" },
                    b.id
                ),
            };
            if !present.contains(&name) {
                return vec![gone()];
            }
            let whole = match repo.get_stored(&key).await {
                Ok(Some(w)) => w,
                Ok(None) => return vec![gone()],
                Err(e) => {
                    return vec![Finding {
                        kind: "corrupt",
                        object: name,
                        detail: e.to_string(),
                    }];
                }
            };
            members
                .iter()
                .filter_map(|m| {
                    let detail = match whole.get(m.range.start as usize..m.range.end as usize) {
                        None => Some(format!(
                            "the bundle is {} bytes, too short for bytes {}..{}",
                            whole.len(),
                            m.range.start,
                            m.range.end
                        )),
                        Some(env) => match envelope::decode(env) {
                            Ok(d) => differs(&d, m.size, m.crc),
                            Err(e) => Some(e),
                        },
                    }?;
                    Some(Finding {
                        kind: "corrupt",
                        object: format!(
                            "{name} ({}, bytes {}..{})",
                            m.path, m.range.start, m.range.end
                        ),
                        detail: format!("the piece of {} in backup {}: {detail}", m.path, b.id),
                    })
                })
                .collect()
        })
        .buffer_unordered(jobs.max(1))
        .collect()
        .await;
    findings.extend(results.into_iter().flatten());
    findings
}

/// A piece in a bundle, as its manifest records it.
struct Member<'a> {
    path: &'a str,
    range: std::ops::Range<u64>,
    size: u64,
    crc: u32,
}

/// What is wrong with piece bytes `d` that should be `size` bytes with CRC-32C `crc`.
fn differs(d: &[u8], size: u64, crc: u32) -> Option<String> {
    let got = crc32c::crc32c(d);
    (d.len() as u64 != size || got != crc).then(|| {
        format!(
            "{} bytes with CRC {got:08x}; the manifest says {size} bytes, CRC {crc:08x}",
            d.len()
        )
    })
}

/// WAL continuity from the oldest backup's start on every timeline, backups whose own WAL is
/// incomplete, and segments deleted after they were archived (their summary, written after the
/// segment, is still there).
fn wal_findings(catalog: &Catalog, present: &BTreeSet<String>) -> Vec<Finding> {
    let seg_size = catalog.seg_size();
    let mut findings = Vec::new();
    let oldest_start = catalog
        .backups
        .iter()
        .map(|b| b.start_lsn.segno(seg_size))
        .min();
    if oldest_start.is_some() {
        for g in catalog.gaps_after(oldest_start) {
            findings.push(Finding {
                kind: "gap",
                object: format!("timeline {}", g.after.tli),
                detail: g.describe(seg_size),
            });
        }
    }
    for b in catalog.backups.iter().filter(|b| !catalog.wal_complete(b)) {
        findings.push(Finding {
            kind: "missing",
            object: format!("backup {}", b.id),
            detail: format!(
                "WAL {} to {} it needs is not all in the repository",
                b.start_wal, b.stop_wal
            ),
        });
    }
    for key in present {
        if let Some(ObjectKey::Summary(seg)) = ObjectKey::parse(key) {
            let wal = ObjectKey::Wal(WalFileName::Segment(seg)).key();
            if !present.contains(&wal) {
                findings.push(Finding {
                    kind: "missing",
                    object: wal,
                    detail: "archived (its index summary exists) but deleted since".into(),
                });
            }
        }
    }
    findings
}

/// A backup whose manifest the catalog read but that could not be read again with its files.
fn unreadable_manifest(b: &BackupManifest, e: &anyhow::Error) -> Finding {
    Finding {
        kind: "corrupt",
        object: ObjectKey::BackupManifest(b.id.clone()).key(),
        detail: format!("{e:#}"),
    }
}

/// Every backup's chain fits together: each link is in the repository, and the files stored as
/// changed blocks find every block in a backup of the chain (the manifests of each chain are read
/// again with their files, one chain at a time).
async fn chain_findings(repo: &Repo, catalog: &Catalog) -> Vec<Finding> {
    let mut findings = Vec::new();
    for b in &catalog.backups {
        let broken = match catalog.chain(b) {
            Err(broken) => Some(broken),
            // A full backup with every file whole fits by itself.
            Ok(chain) if chain.len() == 1 && b.file_methods().0 == 0 => None,
            Ok(chain) => {
                let mut full = Vec::with_capacity(chain.len());
                for m in chain {
                    match crate::catalog::manifest_with_files(repo, m).await {
                        Ok(f) => full.push(f),
                        Err(e) => {
                            findings.push(unreadable_manifest(m, &e));
                            break;
                        }
                    }
                }
                let links: Vec<&BackupManifest> = full.iter().collect();
                crate::restore::files::check_chain(&links)
                    .err()
                    .map(|e| format!("{e:#}"))
            }
        };
        if let Some(broken) = broken {
            findings.push(Finding {
                kind: "chain",
                object: format!("backup {}", b.id),
                detail: format!("{broken}: it cannot be restored"),
            });
        }
    }
    findings
}

/// History files: each repeats its parent's lines, every ancestor's history file exists, every
/// timeline with WAL has one, none contradicts the WAL, and one live branch only.
fn history_findings(catalog: &Catalog) -> Vec<Finding> {
    let mut findings = Vec::new();
    let history_key = |tli: TimelineId| ObjectKey::Wal(WalFileName::History(tli)).key();
    for (tli, h) in &catalog.histories {
        for (i, e) in h.entries.iter().enumerate() {
            if e.parent == TimelineId::ONE {
                continue;
            }
            match catalog.histories.get(&e.parent) {
                None => findings.push(Finding {
                    kind: "missing",
                    object: history_key(e.parent),
                    detail: format!(
                        "timeline {tli}'s history names timeline {} as an ancestor",
                        e.parent
                    ),
                }),
                Some(parent)
                    if parent.entries.len() != i
                        || parent
                            .entries
                            .iter()
                            .zip(&h.entries)
                            .any(|(a, b)| a.parent != b.parent || a.switch_lsn != b.switch_lsn) =>
                {
                    findings.push(Finding {
                        kind: "history",
                        object: history_key(*tli),
                        detail: format!(
                            "does not repeat the lines of timeline {}'s history",
                            e.parent
                        ),
                    })
                }
                Some(_) => {}
            }
        }
    }
    // A timeline with WAL needs its history file (or restores cannot follow it).
    for (tli, t) in &catalog.timelines {
        if *tli != TimelineId::ONE && !t.segments.is_empty() && !catalog.histories.contains_key(tli)
        {
            findings.push(Finding {
                kind: "missing",
                object: history_key(*tli),
                detail: format!(
                    "timeline {tli} has {} archived segment(s) but no history file: restores cannot follow it",
                    t.segments.len()
                ),
            });
        }
    }
    findings.extend(stray_histories(catalog));
    // A second live branch: two servers archive diverging histories into one repository.
    let live = catalog.live_branches();
    if live.len() > 1 {
        let names: Vec<String> = live
            .iter()
            .map(|t| {
                format!(
                    "timeline {t} (latest commit {})",
                    catalog
                        .latest_xact_on(*t)
                        .map_or("none".to_string(), |x| x.time.rfc3339())
                )
            })
            .collect();
        findings.push(Finding {
            kind: "branch",
            object: "wal/".into(),
            detail: format!(
                "{} live branches keep growing: {}; a promoted copy (restore it with --archive-mode off) or a split brain archives into this repository",
                live.len(),
                names.join(", ")
            ),
        });
    }
    findings
}

/// A history file inconsistent with the WAL: its timeline has none, while its parent's WAL goes
/// on past the switch point (a made-up or stray history file, or a second live branch: a
/// promoted clone archiving nothing yet while the primary keeps going).
fn stray_histories(catalog: &Catalog) -> Vec<Finding> {
    let seg_size = catalog.seg_size();
    let mut findings = Vec::new();
    for (tli, h) in &catalog.histories {
        let (Some(last), Some(t)) = (h.entries.last(), catalog.timelines.get(tli)) else {
            continue;
        };
        if !t.segments.is_empty() {
            continue;
        }
        let switch_seg = last.switch_lsn.segno(seg_size);
        let parent_after = catalog
            .timelines
            .get(&last.parent)
            .map_or(0, |p| p.segments.range(SegNo(switch_seg.0 + 1)..).count());
        if parent_after > 0 {
            findings.push(Finding {
                kind: "history",
                object: ObjectKey::Wal(WalFileName::History(*tli)).key(),
                detail: format!(
                    "timeline {tli} branches from timeline {} at {}, but none of its WAL is archived while {parent_after} segment(s) of timeline {} follow the switch point",
                    last.parent, last.switch_lsn, last.parent
                ),
            });
        }
    }
    findings
}

/// No restorable backup is the worst finding of all; a backup with its label but no manifest lost
/// the manifest (the label is written at the very end).
fn backup_findings(catalog: &Catalog, present: &BTreeSet<String>) -> Vec<Finding> {
    let mut findings = Vec::new();
    if catalog.restorable_backups().is_empty() {
        findings.push(Finding {
            kind: "backup",
            object: "backups/".into(),
            detail: if catalog.backups.is_empty() {
                "the repository has no complete backup: nothing can be restored (run pitr backup)"
                    .into()
            } else {
                "no backup is restorable: each lacks WAL it needs".into()
            },
        });
    }
    for id in &catalog.incomplete_backups {
        let label = ObjectKey::BackupLabel(id.clone()).key();
        if present.contains(&label) {
            findings.push(Finding {
                kind: "missing",
                object: ObjectKey::BackupManifest(id.clone()).key(),
                detail: format!(
                    "backup {id} has its backup_label (written when the backup stopped) but no manifest: it was deleted, or the backup died at its very end; it cannot be restored"
                ),
            });
        }
    }
    findings
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::identity::RepoIdentity;
    use crate::testing::PutBytes;
    use std::sync::Arc;

    fn wal(name: &str) -> ObjectKey {
        ObjectKey::Wal(name.parse().unwrap())
    }

    /// A3 and A4: what makes a repository unrestorable is a finding, never "no problems".
    #[tokio::test]
    async fn unrestorable_repositories_are_findings() {
        let repo = Repo::from_store(
            Arc::new(object_store::memory::InMemory::new()),
            "memory://v",
        );
        repo.ensure_identity(&RepoIdentity {
            format_version: crate::storage::identity::FORMAT_VERSION,
            system_identifier: crate::pg::SystemId(1),
            pg_version: 15,
            wal_segment_size: crate::pg::WalSegSize::DEFAULT,
            wal_page_size: 8192,
        })
        .await
        .unwrap();
        for n in [
            "000000010000000000000001",
            "000000010000000000000002",
            "000000010000000000000003",
            // Timeline 2 has WAL but its history file is gone.
            "000000020000000000000003",
        ] {
            repo.put_new(&wal(n), b"segment", Compression::None)
                .await
                .unwrap();
        }
        // Timeline 3 branched at segment 1, none of its WAL archived, while timeline 1 goes on.
        repo.put_new(
            &wal("00000003.history"),
            b"1\t0/1000100\tno recovery target specified\n",
            Compression::None,
        )
        .await
        .unwrap();
        // A backup whose manifest was deleted: pieces and label still there.
        repo.put_unique(
            &ObjectKey::BackupLabel("20261121T101304Z".into()),
            crate::storage::envelope::encode(b"START WAL LOCATION: 0/1000028\n", Compression::None)
                .unwrap(),
        )
        .await
        .unwrap();
        let report = run(&repo, 4).await.unwrap();
        let has = |kind: &str, object: &str| {
            report
                .findings
                .iter()
                .any(|f| f.kind == kind && f.object.contains(object))
        };
        assert!(has("missing", "00000002.history"), "{:#?}", report.findings);
        assert!(has("history", "00000003.history"), "{:#?}", report.findings);
        assert!(
            has("missing", "20261121T101304Z/manifest"),
            "{:#?}",
            report.findings
        );
        assert!(has("backup", "backups/"), "{:#?}", report.findings);
        assert!(report.stored_bytes_checked > 0);
    }
}
