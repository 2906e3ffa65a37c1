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
use crate::manifest::{BackupManifest, CHUNK_SIZE};
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

/// Download `manifest`'s files from `repo` into `target` (which must be empty or absent).
/// `relocate` maps tablespace OIDs to new locations (which must be empty or absent too).
///
/// # Errors
/// A non-empty target, a missing or corrupt piece (named), or a local write failure.
pub async fn restore_files(
    repo: &Repo,
    manifest: &BackupManifest,
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
    make_directories(manifest, target, relocate)?;
    let started = std::time::Instant::now();
    let bytes = download_pieces(repo, manifest, target, jobs).await?;
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
    sync_restored(target, manifest, jobs).await?;
    tracing::debug!(
        "restored {} files, {} bytes: written by {:.2} s, synced by {:.2} s ({jobs} jobs)",
        manifest.files.len(),
        bytes,
        written.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
    Ok(RestoredFiles {
        files: manifest.files.len(),
        bytes,
    })
}

/// The target directory, the manifest's directories in it, and each tablespace's directory with
/// its `pg_tblspc/<oid>` link.
fn make_directories(
    manifest: &BackupManifest,
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
    for f in &manifest.files {
        if let Some(parent) = target.join(&f.path).parent() {
            make_dir(parent)?;
        }
    }
    Ok(())
}

/// One piece to download: (file number, piece number, offset in the file, size, CRC-32C).
type Piece = (usize, u32, u64, u64, u32);

/// Download every piece on `jobs` streams, each verified as it is written at its offset. Every
/// file is created at its final size (so writes never extend it) by a thread that runs ahead of
/// the pieces, in the same order; a piece that gets there first creates its file itself.
/// Creating ~1000 files costs up to a second on a busy journal, which the writes no longer wait
/// for. Returns the bytes written.
async fn download_pieces(
    repo: &Repo,
    manifest: &BackupManifest,
    target: &Path,
    jobs: usize,
) -> anyhow::Result<u64> {
    let files = Arc::new(FilesToCreate {
        files: manifest
            .files
            .iter()
            .map(|f| (target.join(&f.path), f.size, f.mode & 0o700 | 0o600))
            .collect(),
        done: manifest
            .files
            .iter()
            .map(|_| std::sync::OnceLock::new())
            .collect(),
    });
    let creator = {
        let files = files.clone();
        tokio::task::spawn_blocking(move || {
            (0..files.files.len()).try_for_each(|i| files.ensure(i))
        })
    };
    let pieces: Vec<Piece> = manifest
        .files
        .iter()
        .enumerate()
        .flat_map(|(n, f)| {
            f.parts
                .iter()
                .enumerate()
                .map(move |(i, p)| (n, i as u32, i as u64 * CHUNK_SIZE, p.size, p.crc32c))
        })
        .collect();
    let bar = crate::backup::progress_bar(true, manifest.size_bytes);
    let mut stream = futures::stream::iter(pieces)
        .map(|(file, part, offset, size, crc)| {
            let files = files.clone();
            async move {
                let key = ObjectKey::BackupPart {
                    id: manifest.id.clone(),
                    path: manifest
                        .files
                        .get(file)
                        .map(|f| f.path.clone())
                        .unwrap_or_default(),
                    part,
                };
                let written = repo
                    .read_verified(&key, |stored| {
                        let (files, piece) = (files.clone(), key.key());
                        async move {
                            tokio::task::spawn_blocking(move || {
                                files.ensure(file)?;
                                let dest = files.path(file)?;
                                write_piece(&stored, dest, offset, size, crc, &piece)
                            })
                            .await?
                        }
                    })
                    .await?;
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

/// Durability: every file (on `jobs` threads: the disk has been writing since each piece landed,
/// so these waits overlap), then every directory, deepest first.
async fn sync_restored(
    target: &Path,
    manifest: &BackupManifest,
    jobs: usize,
) -> anyhow::Result<()> {
    let target_owned = target.to_path_buf();
    let manifest_files: Vec<String> = manifest.files.iter().map(|f| f.path.clone()).collect();
    let dirs: Vec<String> = manifest.directories.clone();
    tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
        let per = manifest_files.len().div_ceil(jobs.max(1)).max(1);
        std::thread::scope(|s| {
            let handles: Vec<_> = manifest_files
                .chunks(per)
                .map(|group| {
                    let target = &target_owned;
                    s.spawn(move || -> std::io::Result<()> {
                        for f in group {
                            std::fs::File::open(target.join(f))?.sync_all()?;
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
        for d in dirs.iter().rev() {
            durable::sync_dir(&target_owned.join(d))?;
        }
        durable::sync_dir(&target_owned)?;
        Ok(())
    })
    .await?
    .context("sync the restored files")
}

/// The files of a restore, each created once, by whichever thread needs it first.
struct FilesToCreate {
    /// Path, final size, mode.
    files: Vec<(PathBuf, u64, u32)>,
    /// Set once the file exists: `None`, or what went wrong creating it.
    done: Vec<std::sync::OnceLock<Option<String>>>,
}

impl FilesToCreate {
    /// The path of file `i`.
    fn path(&self, i: usize) -> anyhow::Result<&Path> {
        self.files
            .get(i)
            .map(|(p, _, _)| p.as_path())
            .with_context(|| format!("no file number {i} in the manifest"))
    }

    /// Create file `i` at its final size unless that was done already.
    fn ensure(&self, i: usize) -> anyhow::Result<()> {
        let (Some((path, size, mode)), Some(done)) = (self.files.get(i), self.done.get(i)) else {
            bail!("no file number {i} in the manifest");
        };
        let failed = done.get_or_init(|| {
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(*mode)
                .open(path)
                .and_then(|f| f.set_len(*size))
                .err()
                .map(|e| format!("create {}: {e}", path.display()))
        });
        match failed {
            None => Ok(()),
            Some(e) => bail!("{e}"),
        }
    }
}

/// Decompress one stored piece straight into `dest` at `offset`, a chunk at a time, checking it
/// against the manifest (`size`, `crc`). `Ok(Err(detail))` means the stored bytes failed a check (the
/// range written is then rewritten by a retry or the restore fails); `Err` is a local write failure.
fn write_piece(
    stored: &[u8],
    dest: &Path,
    offset: u64,
    size: u64,
    crc: u32,
    piece: &str,
) -> anyhow::Result<Result<u64, String>> {
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
    match envelope::decode_to(stored, |at, bytes| f.write_all_at(bytes, offset + at)) {
        Ok(n) => {
            durable::start_writeback(&f, offset, n as usize);
            Ok(Ok(n))
        }
        Err(DecodeToError::Corrupt(detail)) => Ok(Err(detail)),
        Err(DecodeToError::Sink(e)) => {
            Err(anyhow::Error::new(e).context(format!("write {} (from {piece})", dest.display())))
        }
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
