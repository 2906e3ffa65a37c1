//! Lay a base backup's files down in an empty directory, every piece verified before it is written.
//!
//! Directories are created 0700 and files with their recorded permissions (at most 0700), owned by
//! the invoking user. Tablespace links `pg_tblspc/<oid>` are recreated, pointing at the original
//! location or at a new one given by the caller, and `tablespace_map` is written to match.
//! `backup_label` is written byte for byte. Everything is fsynced before this returns.

use std::collections::HashMap;
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, bail};
use futures::StreamExt;

use crate::durable;
use crate::manifest::{BackupManifest, CHUNK_SIZE, FileEntry, InBundle, PartAt};
use crate::storage::Repo;
use crate::storage::envelope::{self, DecodeToError};
use crate::storage::layout::ObjectKey;

/// What was written.
#[derive(Clone, Copy, Debug, Default)]
pub struct RestoredFiles {
    /// Files written.
    pub files: usize,
    /// Bytes written.
    pub bytes: u64,
}

fn make_dir(p: &Path) -> anyhow::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(p)
        .with_context(|| format!("create directory {}", p.display()))
}

/// Refuse a target that exists and is not empty.
///
/// # Errors
/// The directory is not empty or cannot be read.
pub fn require_empty(dir: &Path) -> anyhow::Result<()> {
    match std::fs::read_dir(dir) {
        Ok(mut entries) => {
            if entries.next().is_some() {
                bail!(
                    "target directory {} is not empty; pitr restores only into an empty or new directory",
                    dir.display()
                );
            }
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => {
            Err(anyhow::Error::new(e).context(format!("read target directory {}", dir.display())))
        }
    }
}

/// Everything about the local side that restoring `manifest` into `target` needs, checked before
/// a byte is written (and by `--dry-run`, which must refuse what the restore would): the data
/// directory and every tablespace location empty or absent, and each tablespace given a location.
///
/// # Errors
/// Names the directory or tablespace that stands in the way.
pub fn preflight(
    manifest: &BackupManifest,
    target: &Path,
    relocate: &HashMap<u32, PathBuf>,
) -> anyhow::Result<()> {
    require_empty(target)?;
    for ts in &manifest.tablespaces {
        let loc = tablespace_target(manifest, ts.oid, relocate)
            .with_context(|| format!("tablespace {} has no location", ts.oid))?;
        require_empty(&loc).with_context(|| {
            format!(
                "tablespace {} (relocate it with --tablespace-map {}=NEW)",
                ts.oid, ts.oid
            )
        })?;
    }
    Ok(())
}

/// Remove what a failed restore wrote: the contents of `target` and of each tablespace location
/// (all of which [`preflight`] found empty or absent), and the directories themselves when they did
/// not exist before. A retry then starts from where the first attempt did.
pub fn remove_restored(
    manifest: &BackupManifest,
    target: &Path,
    relocate: &HashMap<u32, PathBuf>,
    existed: &[(PathBuf, bool)],
) {
    for dir in restored_dirs(manifest, target, relocate) {
        let keep_dir = existed.iter().any(|(d, e)| d == &dir && *e);
        let result = if keep_dir {
            std::fs::read_dir(&dir).and_then(|entries| {
                entries.into_iter().try_for_each(|e| {
                    let p = e?.path();
                    if std::fs::symlink_metadata(&p)?.is_dir() {
                        std::fs::remove_dir_all(&p)
                    } else {
                        std::fs::remove_file(&p)
                    }
                })
            })
        } else {
            std::fs::remove_dir_all(&dir)
        };
        match result {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => tracing::warn!(
                "could not remove {} after the failed restore: {e}",
                dir.display()
            ),
        }
    }
}

/// The data directory and every tablespace location a restore of `manifest` writes into.
pub fn restored_dirs(
    manifest: &BackupManifest,
    target: &Path,
    relocate: &HashMap<u32, PathBuf>,
) -> Vec<PathBuf> {
    std::iter::once(target.to_path_buf())
        .chain(
            manifest
                .tablespaces
                .iter()
                .filter_map(|t| tablespace_target(manifest, t.oid, relocate)),
        )
        .collect()
}

/// Which of the directories a restore writes into exist already (`remove_restored` keeps those).
pub fn existing_dirs(
    manifest: &BackupManifest,
    target: &Path,
    relocate: &HashMap<u32, PathBuf>,
) -> Vec<(PathBuf, bool)> {
    restored_dirs(manifest, target, relocate)
        .into_iter()
        .map(|d| {
            let e = d.is_dir();
            (d, e)
        })
        .collect()
}

/// The tablespace location to use for `oid`.
fn tablespace_target(
    manifest: &BackupManifest,
    oid: u32,
    relocate: &HashMap<u32, PathBuf>,
) -> Option<PathBuf> {
    relocate.get(&oid).cloned().or_else(|| {
        manifest
            .tablespaces
            .iter()
            .find(|t| t.oid == oid)
            .map(|t| PathBuf::from(&t.location))
    })
}

/// Download `manifest`'s files from `repo` into `target` (which must be empty or absent),
/// combined with the `parents` it builds on (newest first) when it is incremental.
/// `relocate` maps tablespace OIDs to new locations (which must be empty or absent too).
///
/// # Errors
/// A non-empty target, a missing or corrupt piece (named), or a local write failure.
pub async fn restore_files(
    repo: &Repo,
    manifest: &BackupManifest,
    parents: &[BackupManifest],
    target: &Path,
    relocate: &HashMap<u32, PathBuf>,
    jobs: usize,
) -> anyhow::Result<RestoredFiles> {
    preflight(manifest, target, relocate)?;
    // The label first: a missing or corrupt one is found before a byte is written.
    let label = repo
        .get(&ObjectKey::BackupLabel(manifest.id.clone()))
        .await
        .with_context(|| format!("read the backup_label of backup {}", manifest.id))?
        .with_context(|| {
            format!(
                "backup {} has no backup_label in {}",
                manifest.id,
                repo.location()
            )
        })?;
    // Every piece the chain needs is there before a byte is written. The catalog's manifests
    // leave the files out: the parents' are read again whole, and the restored backup's files
    // are planned as its manifest is parsed (a file is then its path, size and mode; the pieces
    // hold the rest).
    let mut older = Vec::with_capacity(parents.len());
    for p in parents {
        older.push(crate::catalog::manifest_with_files(repo, p).await?);
    }
    let ids: Vec<String> = std::iter::once(&manifest.id)
        .chain(older.iter().map(|m| &m.id))
        .cloned()
        .collect();
    let (manifest, files, pieces) = if manifest.files_left_out() {
        plan_from_stored(repo, manifest, older).await?
    } else {
        plan_listed(manifest, &older)?
    };
    tracing::debug!(
        "{} piece(s) from {} backup(s): {} bytes to decompress, {} to write",
        pieces.len(),
        ids.len(),
        pieces.iter().map(|p| p.size).sum::<u64>(),
        pieces.iter().map(Piece::bytes).sum::<u64>()
    );
    require_pieces(repo, (&ids, &files), &pieces).await?;
    make_directories(&manifest, &files, target, relocate)?;
    let files = Arc::new(files);
    let manifest = &manifest;
    let started = std::time::Instant::now();
    let bytes = download_pieces(repo, (&files, &ids), pieces, target, jobs).await?;
    let written = started.elapsed();

    // backup_label (fetched and verified before any file was written) and tablespace_map.
    durable::write_atomically(&target.join("backup_label"), &label)?;
    if manifest.has_tablespace_map {
        let map: String = manifest
            .tablespaces
            .iter()
            .filter_map(|t| {
                tablespace_target(manifest, t.oid, relocate)
                    .map(|loc| format!("{} {}\n", t.oid, escape_map_path(&loc)))
            })
            .collect();
        durable::write_atomically(&target.join("tablespace_map"), map.as_bytes())?;
    }
    sync_restored(target, (&files, &manifest.directories), jobs).await?;
    tracing::debug!(
        "restored {} files, {} bytes: written by {:.2} s, synced by {:.2} s ({jobs} jobs)",
        files.len(),
        bytes,
        written.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
    Ok(RestoredFiles {
        files: files.len(),
        bytes,
    })
}

/// The target directory, the manifest's directories in it, and each tablespace's directory with
/// its `pg_tblspc/<oid>` link.
fn make_directories(
    manifest: &BackupManifest,
    files: &[RestoredFile],
    target: &Path,
    relocate: &HashMap<u32, PathBuf>,
) -> anyhow::Result<()> {
    make_dir(target)?;
    std::fs::set_permissions(target, std::fs::Permissions::from_mode(0o700))?;
    for dir in &manifest.directories {
        if let Some(oid) = dir
            .strip_prefix("pg_tblspc/")
            .and_then(|o| o.parse::<u32>().ok())
        {
            let loc = tablespace_target(manifest, oid, relocate)
                .with_context(|| format!("tablespace {oid} has no location"))?;
            make_dir(&loc)?;
            std::os::unix::fs::symlink(&loc, target.join(dir))
                .with_context(|| format!("link {dir} to {}", loc.display()))?;
        } else {
            make_dir(&target.join(dir))?;
        }
    }
    for f in files {
        if let Some(parent) = target.join(&*f.path).parent() {
            make_dir(parent)?;
        }
    }
    Ok(())
}

/// (offset in a piece, offset in the file, length).
type Extent = (u64, u64, u64);

/// One stored piece to download, and where its bytes go (a restore holds one per piece of
/// every file: 121,000 files are as many pieces, so it is kept small).
#[derive(Debug)]
struct Piece {
    /// The file (its number in the restored backup's manifest).
    file: u32,
    /// The backup of the chain that holds it (0: the restored one, then its parents).
    backup: u16,
    /// Its number among the file's pieces in that backup.
    part: u32,
    /// Its place in a bundle of that backup (`None`: an object of its own).
    bundle: Option<InBundle>,
    /// The piece's original length and CRC-32C, as its manifest records them.
    size: u64,
    crc: u32,
    /// Its stored length, as its manifest records it (what fetching it holds in memory).
    stored: u64,
    /// (offset in the piece, offset in the file, length), sorted by offset in the piece: the
    /// bytes of the piece that end up in the restored file. A block a newer backup holds is not
    /// among them, so every block is written once.
    extents: Extents,
    /// Whether the piece holds a file's bytes in order (not scattered changed blocks), so
    /// writing its span back to disk right away makes large writes. A file's changed blocks come
    /// before the older piece whose span holds them, and go to disk with it.
    contiguous: bool,
}

/// A piece's extents: nearly always one (a piece written whole).
#[derive(Clone, Debug, PartialEq, Eq)]
enum Extents {
    One(Extent),
    Many(Vec<Extent>),
}

impl Extents {
    fn from_vec(mut v: Vec<Extent>) -> Extents {
        match v.len() {
            1 => Extents::One(v.remove(0)),
            _ => Extents::Many(v),
        }
    }

    fn as_slice(&self) -> &[Extent] {
        match self {
            Extents::One(e) => std::slice::from_ref(e),
            Extents::Many(v) => v,
        }
    }
}

impl Piece {
    fn bytes(&self) -> u64 {
        self.extents.as_slice().iter().map(|e| e.2).sum()
    }

    /// Where the piece is stored; `ids` are the chain's backup ids, `path` the file's.
    fn at(&self, ids: &[String], path: &str) -> PartAt {
        let id = ids.get(usize::from(self.backup)).map_or("", String::as_str);
        crate::manifest::Part {
            size: self.size,
            crc32c: self.crc,
            stored: self.stored,
            bundle: self.bundle,
        }
        .at(id, path, self.part as usize)
    }
}

/// Add `(src, dst, len)` to `extents`, merged with the last one when both ends continue it.
fn push_extent(extents: &mut Vec<Extent>, src: u64, dst: u64, len: u64) {
    if len == 0 {
        return;
    }
    if let Some(last) = extents.last_mut()
        && last.0 + last.2 == src
        && last.1 + last.2 == dst
    {
        last.2 += len;
        return;
    }
    extents.push((src, dst, len));
}

/// Whether `chain` (a backup, then its parents back to a full one) fits together: every file
/// stored as changed blocks has a parent with the file and block lists that match their pieces.
///
/// # Errors
/// The first misfit, naming the backup and file.
pub fn check_chain(chain: &[&BackupManifest]) -> anyhow::Result<()> {
    plan_pieces(chain).map(|_| ())
}

/// What a restore plans: the restored backup's manifest (without its files), its files, the
/// pieces to download.
type Planned = (BackupManifest, Vec<RestoredFile>, Vec<Piece>);

/// A file once its pieces are planned.
fn restored_file(f: FileEntry, block_size: u64) -> RestoredFile {
    RestoredFile {
        size: f.restored_size(block_size),
        mode: f.mode,
        path: f.path.into_boxed_str(),
    }
}

/// Plan the restore of `manifest`, which lists its files, on `older`.
fn plan_listed(manifest: &BackupManifest, older: &[BackupManifest]) -> anyhow::Result<Planned> {
    let parents: Vec<&BackupManifest> = older.iter().collect();
    let mut planner = Planner::new(manifest, &parents)?;
    for (n, f) in manifest.files.iter().enumerate() {
        planner.file(n, f)?;
    }
    let bs = manifest.block_size();
    let files = manifest
        .files
        .iter()
        .map(|f| restored_file(f.clone(), bs))
        .collect();
    let mut head = manifest.clone();
    head.files = Vec::new();
    Ok((head, files, planner.out))
}

/// Plan the restore of `lean` (a manifest the catalog read without its files) on `older` as its
/// stored manifest is read again and parsed: each file's pieces are planned as its entry is
/// parsed, and the entry dropped (a restored backup's manifest is never held whole).
///
/// # Errors
/// Store failures, a manifest that fails its checksums or is no longer the same backup, a chain
/// that does not fit together.
async fn plan_from_stored(
    repo: &Repo,
    lean: &BackupManifest,
    older: Vec<BackupManifest>,
) -> anyhow::Result<Planned> {
    let key = ObjectKey::BackupManifest(lean.id.clone());
    let (lean, older) = (Arc::new(lean.clone()), Arc::new(older));
    let planned = repo
        .read_verified(&key, |stored| {
            let (lean, older, name) = (lean.clone(), older.clone(), key.key());
            async move {
                let _slot = crate::cpu::slots().acquire().await?;
                tokio::task::spawn_blocking(move || -> anyhow::Result<Result<Planned, String>> {
                    let parents: Vec<&BackupManifest> = older.iter().collect();
                    let mut planner = Planner::new(&lean, &parents)?;
                    planner.out.reserve(lean.file_count());
                    let bs = lean.block_size();
                    let mut files = Vec::with_capacity(lean.file_count());
                    let mut failed = None;
                    let decoded = envelope::decode_streaming(&stored, |r| {
                        BackupManifest::each_file_from_reader(r, &mut |f| {
                            if failed.is_none()
                                && let Err(e) = planner.file(files.len(), &f)
                            {
                                failed = Some(e);
                            }
                            files.push(restored_file(f, bs));
                        })
                    });
                    let head = match decoded {
                        Ok(head) => head.with_context(|| {
                            format!("read the manifest of backup {} ({name})", lean.id)
                        })?,
                        Err(detail) => return Ok(Err(detail)),
                    };
                    if let Some(e) = failed {
                        return Err(e);
                    }
                    crate::catalog::require_same_backup(&lean, &head, files.len())?;
                    Ok(Ok((head, files, planner.out)))
                })
                .await?
            }
        })
        .await?;
    planned.with_context(|| crate::catalog::manifest_gone(repo, &lean.id))
}

/// Every piece a restore of `chain` (the backup first, then its parents back to a full one)
/// downloads; see [`Planner`].
///
/// # Errors
/// As [`Planner::file`].
fn plan_pieces(chain: &[&BackupManifest]) -> anyhow::Result<Vec<Piece>> {
    let Some((newest, parents)) = chain.split_first() else {
        return Ok(Vec::new());
    };
    let mut planner = Planner::new(newest, parents)?;
    planner
        .out
        .reserve(newest.files.iter().map(|f| f.parts.len()).sum());
    for (n, f) in newest.files.iter().enumerate() {
        planner.file(n, f)?;
    }
    Ok(planner.out)
}

/// The pieces of the restored backup's files, planned a file at a time against its parents (so
/// the restored backup's own file list is never held: restore hands it the entries as its
/// manifest is parsed). A file stored whole in the backup comes from its own pieces. A file
/// stored as changed blocks takes each block below its recorded length from the newest backup of
/// the chain holding it, walking back through parents that also stored changed blocks until one
/// stored the file whole; blocks no backup holds stay zeros.
struct Planner<'a> {
    /// The restored backup (its files need not be there: only its id and parent are used).
    newest: &'a BackupManifest,
    /// Its parents, newest first, each with its files by path.
    parents: Vec<(&'a BackupManifest, HashMap<&'a str, &'a FileEntry>)>,
    /// The pieces so far.
    out: Vec<Piece>,
}

impl<'a> Planner<'a> {
    /// # Errors
    /// A chain longer than a piece can number.
    fn new(newest: &'a BackupManifest, parents: &[&'a BackupManifest]) -> anyhow::Result<Self> {
        if parents.len() >= usize::from(u16::MAX) {
            bail!(
                "backup {} builds on a chain of {} backups: more than a restore handles",
                newest.id,
                parents.len()
            );
        }
        Ok(Planner {
            newest,
            parents: parents
                .iter()
                .map(|m| (*m, m.files.iter().map(|f| (f.path.as_str(), f)).collect()))
                .collect(),
            out: Vec::new(),
        })
    }

    /// Plan file number `n` of the restored backup, `f`.
    ///
    /// # Errors
    /// A chain that does not fit together (a parent without the file, block lists that do not
    /// match their pieces): the backups are damaged.
    fn file(&mut self, n: usize, f: &FileEntry) -> anyhow::Result<()> {
        let newest = self.newest;
        let Ok(n) = u32::try_from(n) else {
            bail!("backup {} has more files than a restore handles", newest.id);
        };
        let out = &mut self.out;
        let Some(changed) = &f.changed else {
            let mut offset = 0;
            for (i, p) in f.parts.iter().enumerate() {
                out.push(Piece {
                    file: n,
                    backup: 0,
                    part: i as u32,
                    bundle: p.bundle,
                    size: p.size,
                    crc: p.crc32c,
                    stored: p.stored,
                    extents: Extents::from_vec(
                        vec![(0, offset, p.size)]
                            .into_iter()
                            .filter(|e| e.2 > 0)
                            .collect(),
                    ),
                    contiguous: true,
                });
                offset += CHUNK_SIZE;
            }
            return Ok(());
        };
        let parent = newest.parent.as_ref().with_context(|| {
            format!(
                "backup {} stores changed blocks of {} but names no parent",
                newest.id, f.path
            )
        })?;
        let bs = u64::from(parent.block_size);
        if changed.length > parent.segment_blocks || bs == 0 {
            bail!(
                "backup {} records {} as {} blocks, more than a segment of {} holds",
                newest.id,
                f.path,
                changed.length,
                parent.segment_blocks
            );
        }
        let length = changed.length as usize;
        let mut claimed = vec![false; length];
        let mut reached_whole = false;
        for k in 0..=self.parents.len() {
            let (m, entry) = match k.checked_sub(1) {
                None => (newest, Some(f)),
                Some(p) => match self.parents.get(p) {
                    Some((m, by_path)) => (*m, by_path.get(f.path.as_str()).copied()),
                    None => break,
                },
            };
            let Some(entry) = entry else {
                bail!(
                    "backup {} stores only the changed blocks of {}, but backup {} it builds on does not have the file",
                    newest.id,
                    f.path,
                    m.id
                );
            };
            match &entry.changed {
                Some(c) => {
                    let per = (CHUNK_SIZE / bs).max(1) as usize;
                    let sizes: u64 = entry.parts.iter().map(|p| p.size).sum();
                    if sizes != c.blocks.len() as u64 * bs
                        || entry.parts.len() != c.blocks.len().div_ceil(per)
                    {
                        bail!(
                            "backup {} lists {} changed blocks of {} but its pieces hold {sizes} bytes",
                            m.id,
                            c.blocks.len(),
                            f.path
                        );
                    }
                    for (i, p) in entry.parts.iter().enumerate() {
                        let blocks = c.blocks.iter().skip(i * per).take(per);
                        let held = blocks
                            .enumerate()
                            .map(|(j, &b)| (u64::from(b), j as u64 * bs, u64::from(b) * bs, bs));
                        let piece = (n, (k as u16, i as u32), p, false);
                        claim(out, &mut claimed, held, piece);
                    }
                }
                None => {
                    let mut offset = 0u64;
                    for (i, p) in entry.parts.iter().enumerate() {
                        let end = offset + p.size;
                        let last = end.div_ceil(bs).min(length as u64);
                        let held = (offset / bs..last).map(|b| {
                            let from = (b * bs).max(offset);
                            let to = ((b + 1) * bs).min(end);
                            (b, from - offset, from, to - from)
                        });
                        let piece = (n, (k as u16, i as u32), p, true);
                        claim(out, &mut claimed, held, piece);
                        offset += CHUNK_SIZE;
                    }
                    reached_whole = true;
                    break;
                }
            }
        }
        if !reached_whole {
            bail!(
                "no backup of the chain of {} holds {} whole",
                newest.id,
                f.path
            );
        }
        Ok(())
    }
}

/// Queue the piece `(file, (backup, number), part)` for the blocks it holds, `(block, offset in the piece,
/// offset in the file, length)`, that no newer backup claimed (and claim them).
fn claim(
    out: &mut Vec<Piece>,
    claimed: &mut [bool],
    held: impl Iterator<Item = (u64, u64, u64, u64)>,
    (file, (backup, number), part, contiguous): (u32, (u16, u32), &crate::manifest::Part, bool),
) {
    let mut extents = Vec::new();
    for (block, src, dst, len) in held {
        if let Some(slot) = claimed.get_mut(block as usize).filter(|s| !**s) {
            *slot = true;
            push_extent(&mut extents, src, dst, len);
        }
    }
    if !extents.is_empty() {
        out.push(Piece {
            file,
            backup,
            part: number,
            bundle: part.bundle,
            size: part.size,
            crc: part.crc32c,
            stored: part.stored,
            extents: Extents::from_vec(extents),
            contiguous,
        });
    }
}

/// Every piece of `pieces` must be stored (one listing per backup of the chain).
///
/// # Errors
/// The first piece that is not, named; store failures.
async fn require_pieces(
    repo: &Repo,
    (ids, files): (&[String], &[RestoredFile]),
    pieces: &[Piece],
) -> anyhow::Result<()> {
    let listed = |r: &Repo| {
        let r = r.clone();
        async move {
            let mut stored = HashMap::new();
            for id in ids {
                let listed = r
                    .list(&crate::storage::layout::Prefix::Backup(id.clone()))
                    .await
                    .with_context(|| {
                        format!("list the pieces of backup {id} in {}", r.location())
                    })?;
                stored.extend(listed.iter().map(|e| (e.key().to_string(), e.size)));
            }
            anyhow::Ok(stored)
        }
    };
    let stored = listed(repo).await?;
    // The other repositories a read falls back to, listed only when this one lacks a piece.
    let mut elsewhere: Option<Vec<HashMap<String, u64>>> = None;
    for p in pieces {
        let path = files.get(p.file as usize).map_or("", |f| &*f.path);
        let at = p.at(ids, path);
        let key = at.key.key();
        let fits = |size: Option<&u64>| match (size, &at.range) {
            (None, _) => false,
            (Some(&size), Some(r)) => r.end <= size,
            (Some(_), None) => true,
        };
        if fits(stored.get(&key)) {
            continue;
        }
        if elsewhere.is_none() && !repo.fallbacks().is_empty() {
            let mut all = Vec::new();
            for (name, other) in repo.fallbacks() {
                match listed(other).await {
                    Ok(l) => all.push(l),
                    Err(e) => tracing::warn!("repository {name}: {e:#}"),
                }
            }
            elsewhere = Some(all);
        }
        if elsewhere
            .iter()
            .flatten()
            .any(|other| fits(other.get(&key)))
        {
            tracing::info!(
                "backup piece {key} is not usable in {}: it will be read from another repository",
                repo.location()
            );
            continue;
        }
        match (stored.get(&key), &at.range) {
            (Some(&size), Some(r)) => bail!(
                "bundle {key} in {} is {size} bytes, too short for the piece the manifest places at bytes {}..{} (nothing was written; pitr verify checks every bundle)",
                repo.location(),
                r.start,
                r.end
            ),
            _ => bail!(
                "backup piece {key} is missing from {} (nothing was written; pitr verify lists every missing object)",
                repo.location()
            ),
        }
    }
    Ok(())
}

/// How much of the stored pieces fetched and not yet written a restore holds at once (KiB), whatever
/// `--jobs` (a piece larger than this is fetched alone).
const FETCHED_BUDGET_KIB: u32 = 16 << 10;

/// Download every piece on `jobs` streams, each verified as it is written. Every file is created
/// at its final size (so writes never extend it) by a thread that runs ahead of the pieces, in
/// the same order; a piece that gets there first creates its file itself. Creating ~1000 files
/// costs up to a second on a busy journal, which the writes no longer wait for. Returns the
/// bytes written. `ids` are the chain's backup ids, the restored one first.
async fn download_pieces(
    repo: &Repo,
    (restored, ids): (&Arc<Vec<RestoredFile>>, &[String]),
    pieces: Vec<Piece>,
    target: &Path,
    jobs: usize,
) -> anyhow::Result<u64> {
    let files = Arc::new(FilesToCreate {
        files: restored.clone(),
        target: target.to_path_buf(),
        done: restored
            .iter()
            .map(|_| std::sync::OnceLock::new())
            .collect(),
    });
    let creator = {
        let files = files.clone();
        tokio::task::spawn_blocking(move || (0..files.done.len()).try_for_each(|i| files.ensure(i)))
    };
    let total: u64 = pieces.iter().map(Piece::bytes).sum();
    let bar = crate::backup::progress_bar(true, total);
    let budget = tokio::sync::Semaphore::new(FETCHED_BUDGET_KIB as usize);
    let requests = fetches(&pieces, ids, restored);
    let pieces = Arc::new(pieces);
    let mut stream = futures::stream::iter(requests)
        .map(|fetch| {
            let (files, pieces) = (files.clone(), pieces.clone());
            let budget = &budget;
            async move {
                // Fetched pieces wait for a CPU to decode them: what they hold is bounded.
                let want = u32::try_from(fetch.stored.div_ceil(1024))
                    .unwrap_or(u32::MAX)
                    .clamp(1, FETCHED_BUDGET_KIB);
                let _held = budget.acquire_many(want).await?;
                let Fetch {
                    key,
                    range,
                    members,
                    ..
                } = fetch;
                let (members, key) = (Arc::new(members), Arc::new(key));
                let span_start = range.as_ref().map(|r| r.start);
                let unwrap = |stored: bytes::Bytes| {
                    let (files, pieces, members, key) =
                        (files.clone(), pieces.clone(), members.clone(), key.clone());
                    async move {
                        let _slot = crate::cpu::slots().acquire().await?;
                        tokio::task::spawn_blocking(move || {
                            let mut written = 0;
                            for &m in members.iter() {
                                let piece = pieces
                                    .get(m as usize)
                                    .with_context(|| format!("no piece number {m}"))?;
                                let i = piece.file as usize;
                                files.ensure(i)?;
                                let dest = files.path(i)?;
                                // Its envelope's bytes in what was read.
                                let within = match (span_start, piece.bundle) {
                                    (Some(start), Some(b)) => b
                                        .offset
                                        .checked_sub(start)
                                        .map(|from| from as usize..(from + piece.stored) as usize),
                                    _ => Some(0..stored.len()),
                                };
                                let Some(bytes) = within.clone().and_then(|r| stored.get(r)) else {
                                    return Ok(Err("shorter than the manifest says".into()));
                                };
                                match write_piece(bytes, &dest, piece, &key)? {
                                    Ok(n) => written += n,
                                    Err(detail) if piece.bundle.is_some() => {
                                        let path = files.relative(i);
                                        return Ok(Err(format!(
                                            "the piece of {path} at bytes {}: {detail}",
                                            piece.bundle.map_or(0, |b| b.offset)
                                        )));
                                    }
                                    Err(detail) => return Ok(Err(detail)),
                                }
                            }
                            Ok(Ok(written))
                        })
                        .await?
                    }
                };
                let written = match range {
                    None => repo.read_verified(&key, unwrap).await?,
                    Some(r) => repo.read_verified_range(&key, r, unwrap).await?,
                };
                written.with_context(|| {
                    format!(
                        "backup piece {} is missing from {}",
                        key.key(),
                        repo.location()
                    )
                })
            }
        })
        .buffer_unordered(jobs.max(1));
    let mut bytes = 0;
    while let Some(done) = stream.next().await {
        let n = done?;
        bar.inc(n);
        bytes += n;
    }
    bar.finish_and_clear();
    creator.await??;
    Ok(bytes)
}

/// Pieces read with one request: a piece stored alone, or the pieces of one bundle.
struct Fetch {
    key: ObjectKey,
    /// The bytes of the object read (`None`: all of it).
    range: Option<std::ops::Range<u64>>,
    /// The pieces (their numbers in the restore's list).
    members: Vec<u32>,
    /// The bytes read.
    stored: u64,
}

/// The requests that read `pieces`: one per piece stored alone, one range read per bundle (from
/// the first piece of it needed to the end of the last), in the order the pieces come. `ids`
/// are the chain's backup ids, `files` the restored backup's files.
fn fetches(pieces: &[Piece], ids: &[String], files: &[RestoredFile]) -> Vec<Fetch> {
    let mut out: Vec<Fetch> = Vec::new();
    let mut bundles: HashMap<(u16, u32), usize> = HashMap::new();
    for (n, piece) in pieces.iter().enumerate() {
        let n = n as u32;
        let path = files.get(piece.file as usize).map_or("", |f| &*f.path);
        let Some(b) = piece.bundle else {
            out.push(Fetch {
                key: piece.at(ids, path).key,
                range: None,
                stored: piece.stored,
                members: vec![n],
            });
            continue;
        };
        let r = b.offset..b.offset.saturating_add(piece.stored);
        let slot = *bundles.entry((piece.backup, b.id)).or_insert_with(|| {
            out.push(Fetch {
                key: piece.at(ids, path).key,
                range: Some(r.clone()),
                stored: 0,
                members: Vec::new(),
            });
            out.len() - 1
        });
        if let Some(f) = out.get_mut(slot) {
            f.members.push(n);
            if let Some(span) = &mut f.range {
                span.start = span.start.min(r.start);
                span.end = span.end.max(r.end);
            }
        }
    }
    for f in &mut out {
        if let Some(span) = &f.range {
            f.stored = span.end - span.start;
        }
    }
    out
}

/// How many threads fsync the restored files at least: each mostly waits for the file system's
/// journal, and waits that overlap share its commits (121,000 small files: 2.4 s on 2 threads).
const SYNC_THREADS: usize = 16;

/// Durability: every file (on `SYNC_THREADS` threads or `jobs`: the disk has been writing since
/// each piece landed, so these waits overlap), then every directory, deepest first.
async fn sync_restored(
    target: &Path,
    (files, directories): (&Arc<Vec<RestoredFile>>, &[String]),
    jobs: usize,
) -> anyhow::Result<()> {
    let target_owned = target.to_path_buf();
    let (files, directories) = (files.clone(), directories.to_vec());
    tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
        let per = files.len().div_ceil(SYNC_THREADS.max(jobs)).max(1);
        std::thread::scope(|s| {
            let handles: Vec<_> = files
                .chunks(per)
                .map(|group| {
                    let target = &target_owned;
                    s.spawn(move || -> std::io::Result<()> {
                        for f in group {
                            std::fs::File::open(target.join(&*f.path))?.sync_all()?;
                        }
                        Ok(())
                    })
                })
                .collect();
            handles.into_iter().try_for_each(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(std::io::Error::other("sync thread panicked")))
            })
        })?;
        for d in directories.iter().rev() {
            durable::sync_dir(&target_owned.join(d))?;
        }
        durable::sync_dir(&target_owned)?;
        Ok(())
    })
    .await?
    .context("sync the restored files")
}

/// A file to restore, once its pieces are planned.
struct RestoredFile {
    /// Its path in the backup.
    path: Box<str>,
    /// Its size once restored.
    size: u64,
    /// Its permission bits as backed up.
    mode: u32,
}

/// The files of a restore, each created once, by whichever thread needs it first.
struct FilesToCreate {
    /// The files, as the restored backup's manifest lists them.
    files: Arc<Vec<RestoredFile>>,
    /// The data directory restored into.
    target: PathBuf,
    /// Set once the file exists: `None`, or what went wrong creating it.
    done: Vec<std::sync::OnceLock<Option<String>>>,
}

impl FilesToCreate {
    /// Where file `i` is restored.
    fn path(&self, i: usize) -> anyhow::Result<PathBuf> {
        self.files
            .get(i)
            .map(|f| self.target.join(&*f.path))
            .with_context(|| format!("no file number {i} in the manifest"))
    }

    /// File `i`'s path in the backup ("?" for a number the manifest does not have).
    fn relative(&self, i: usize) -> &str {
        self.files.get(i).map_or("?", |f| &*f.path)
    }

    /// Create file `i` at its final size unless that was done already.
    fn ensure(&self, i: usize) -> anyhow::Result<()> {
        let (Some(file), Some(done)) = (self.files.get(i), self.done.get(i)) else {
            bail!("no file number {i} in the manifest");
        };
        let failed = done.get_or_init(|| {
            let path = self.target.join(&*file.path);
            let size = file.size;
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(file.mode & 0o700 | 0o600)
                .open(&path)
                .and_then(|f| {
                    durable::preallocate(&f, size);
                    f.set_len(size)
                })
                .err()
                .map(|e| format!("create {}: {e}", path.display()))
        });
        match failed {
            None => Ok(()),
            Some(e) => bail!("{e}"),
        }
    }
}

/// Decompress one stored piece, a chunk at a time, writing its extents into `dest`, checking it
/// against the manifest (`size`, `crc`). `Ok(Err(detail))` means the stored bytes failed a check
/// (the ranges written are then rewritten by a retry or the restore fails); `Err` is a local
/// write failure. Returns the bytes written.
fn write_piece(
    stored: &[u8],
    dest: &Path,
    piece: &Piece,
    key: &ObjectKey,
) -> anyhow::Result<Result<u64, String>> {
    let (size, crc) = (piece.size, piece.crc);
    let header = match envelope::decode_header(stored) {
        Ok(h) => h,
        Err(detail) => return Ok(Err(detail)),
    };
    if header.original_len != size || header.original_crc != crc {
        return Ok(Err(format!(
            "it holds {} bytes with CRC-32C {:08x}; the manifest says {size} bytes with {crc:08x}",
            header.original_len, header.original_crc
        )));
    }
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(dest)
        .with_context(|| format!("open {}", dest.display()))?;
    let extents = piece.extents.as_slice();
    let sink = |at: u64, bytes: &[u8]| -> std::io::Result<()> {
        let end = at + bytes.len() as u64;
        let first = extents.partition_point(|e| e.0 + e.2 <= at);
        for &(src, dst, len) in extents.iter().skip(first) {
            if src >= end {
                break;
            }
            let from = src.max(at);
            let to = (src + len).min(end);
            if let Some(part) = bytes.get((from - at) as usize..(to - at) as usize) {
                f.write_all_at(part, dst + (from - src))?;
            }
        }
        Ok(())
    };
    match envelope::decode_to(stored, sink) {
        Ok(_) => {
            if piece.contiguous {
                // The whole span: changed blocks written into it before go out with it.
                let lo = extents.iter().map(|e| e.1).min().unwrap_or(0);
                let hi = extents.iter().map(|e| e.1 + e.2).max().unwrap_or(0);
                durable::start_writeback(&f, lo, hi.saturating_sub(lo) as usize);
            }
            Ok(Ok(piece.bytes()))
        }
        Err(DecodeToError::Corrupt(detail)) => Ok(Err(detail)),
        Err(DecodeToError::Sink(e)) => Err(anyhow::Error::new(e).context(format!(
            "write {} (from {})",
            dest.display(),
            key.key()
        ))),
    }
}

/// `tablespace_map` escapes `\n`, `\r` and `\` with a backslash (`do_pg_backup_start`).
fn escape_map_path(p: &Path) -> String {
    let s = p.to_string_lossy();
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '\n' | '\r' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::{BackupType, ChangedBlocks, Parent, Part};

    const BS: u64 = 8192;

    fn manifest(id: &str, parent: Option<&str>, file: FileEntry) -> BackupManifest {
        let mut m: BackupManifest = serde_json::from_value(serde_json::json!({
            "format_version": 2, "program_version": "t", "id": id, "label": id, "system_identifier": "1",
            "pg_version": 15, "timeline": 1, "start_lsn": "0/1", "checkpoint_lsn": "0/1", "stop_lsn": "0/2",
            "start_time": "2026-01-01T00:00:00.000000Z", "stop_time": "2026-01-01T00:00:00.000000Z",
            "start_wal": "000000010000000000000001", "stop_wal": "000000010000000000000001",
            "compression": "zstd", "files": [], "directories": [],
            "has_tablespace_map": false, "size_bytes": 0, "stored_bytes": 0
        }))
        .unwrap();
        m.files = vec![file];
        if let Some(p) = parent {
            m.backup_type = BackupType::Incr;
            m.parent = Some(Parent {
                id: p.into(),
                start_lsn: crate::pg::Lsn(1),
                timeline: crate::pg::TimelineId::ONE,
                block_size: BS as u32,
                segment_blocks: 131_072,
            });
        }
        m
    }

    fn file(blocks: u64, changed: Option<(u32, Vec<u32>)>) -> FileEntry {
        let stored_blocks = changed.as_ref().map_or(blocks, |c| c.1.len() as u64);
        FileEntry {
            path: "base/5/16384".into(),
            size: stored_blocks * BS,
            mtime: 0,
            mode: 0o600,
            parts: vec![Part {
                size: stored_blocks * BS,
                crc32c: 0,
                stored: 0,
                bundle: None,
            }],
            checksum_failures: vec![],
            changed: changed.map(|(length, blocks)| ChangedBlocks { length, blocks }),
        }
    }

    /// Each piece of the restore of `chain`: the backup it comes from, and its extents.
    fn extents(chain: &[&BackupManifest]) -> Vec<(String, Vec<Extent>)> {
        let ids: Vec<String> = chain.iter().map(|m| m.id.clone()).collect();
        plan_pieces(chain)
            .unwrap()
            .iter()
            .map(|p| {
                let key = p.at(&ids, &chain[0].files[p.file as usize].path).key;
                let ObjectKey::BackupPart { id, .. } = &key else {
                    panic!("{key:?}")
                };
                (id.clone(), p.extents.as_slice().to_vec())
            })
            .collect()
    }

    #[test]
    fn every_block_comes_once_from_the_newest_backup_holding_it() {
        // The full backup has 4 blocks; the first incremental changed blocks 1 and 4 (6 blocks
        // long); the second changed block 1 again and the file was cut to 3 blocks.
        let full = manifest("F", None, file(4, None));
        let i1 = manifest("I1", Some("F"), file(0, Some((6, vec![1, 4]))));
        let i2 = manifest("I2", Some("I1"), file(0, Some((3, vec![1]))));
        let got = extents(&[&i1, &full]);
        assert_eq!(
            got,
            [
                ("I1".to_string(), vec![(0, BS, BS), (BS, 4 * BS, BS)]),
                // Blocks 0, 2 and 3 (2 and 3 merged); block 5 is in no backup: zeros.
                ("F".to_string(), vec![(0, 0, BS), (2 * BS, 2 * BS, 2 * BS)]),
            ]
        );
        // Block 4 of I1 lies past the new length and block 1 is I2's: nothing read from I1.
        let got = extents(&[&i2, &i1, &full]);
        assert_eq!(
            got,
            [
                ("I2".to_string(), vec![(0, BS, BS)]),
                ("F".to_string(), vec![(0, 0, BS), (2 * BS, 2 * BS, BS)]),
            ]
        );
        // A full backup restores every piece as it is.
        let got = extents(&[&full]);
        assert_eq!(got, [("F".to_string(), vec![(0, 0, 4 * BS)])]);
        // A chain without the file whole, or with a block list its pieces do not match, is refused.
        assert!(plan_pieces(&[&i2, &i1]).is_err());
        let mut bad = i1.clone();
        bad.files[0].parts[0].size = BS;
        assert!(plan_pieces(&[&bad, &full]).is_err());
        let mut long = i1.clone();
        long.files[0].changed.as_mut().unwrap().length = u32::MAX;
        assert!(plan_pieces(&[&long, &full]).is_err());
    }

    #[test]
    fn extents_are_written_where_they_belong() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("f");
        std::fs::write(&dest, vec![0u8; 32]).unwrap();
        let data: Vec<u8> = (1..=16).collect();
        let stored = envelope::encode(&data, crate::compress::Compression::Zstd).unwrap();
        let key = ObjectKey::BackupPart {
            id: "x".into(),
            path: "f".into(),
            part: 0,
        };
        let piece = Piece {
            file: 0,
            backup: 0,
            part: 0,
            bundle: None,
            size: 16,
            crc: crc32c::crc32c(&data),
            extents: Extents::Many(vec![(0, 8, 4), (10, 28, 4)]),
            contiguous: false,
            stored: 0,
        };
        assert_eq!(write_piece(&stored, &dest, &piece, &key).unwrap(), Ok(8));
        let got = std::fs::read(&dest).unwrap();
        let mut want = vec![0u8; 32];
        want[8..12].copy_from_slice(&[1, 2, 3, 4]);
        want[28..32].copy_from_slice(&[11, 12, 13, 14]);
        assert_eq!(got, want);
        // A piece that is not what the manifest says is refused before a byte is written.
        let wrong = Piece { crc: 1, ..piece };
        assert!(write_piece(&stored, &dest, &wrong, &key).unwrap().is_err());
    }
}
