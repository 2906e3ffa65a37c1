//! `archive-get`: fetch a WAL file for recovery, verified before a byte reaches `%p`.
//!
//! The object's checksums are checked in memory; only then is `%p` written, through a temp file that
//! is renamed, so PostgreSQL never sees a partial or unverified file. It is not fsynced: recovery that
//! crashes asks for the file again, and where PostgreSQL keeps a restored file (a standby's `pg_wal`)
//! it fsyncs it itself before renaming it into place. See `exit` for how
//! outcomes map to exit codes.

use std::os::unix::fs::FileExt;
use std::path::Path;

use anyhow::Context;

use crate::durable;
use crate::pg::WalFileName;
use crate::storage::Repo;
use crate::storage::envelope::{self, DecodeToError};
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

/// Prefetching for one call: how many segments ahead, and the global arguments (repository, config)
/// the background prefetcher needs.
#[derive(Clone, Debug, Default)]
pub struct Prefetch {
    /// Segments ahead; 0 is off.
    pub count: usize,
    /// `--repo …` / `--config …` for the prefetcher.
    pub global_args: Vec<String>,
}

/// Fetch `wal_name` from `repo` into `dest`, handing over a prefetched copy when there is one and
/// starting a prefetcher for the segments after it.
///
/// # Errors
/// The object exists but cannot be read or verified, or the destination cannot be written.
pub async fn get_with_prefetch(
    repo: &Repo,
    wal_name: &str,
    dest: &Path,
    prefetch: &Prefetch,
) -> anyhow::Result<GetOutcome> {
    // Only recovery proper prefetches: PostgreSQL's startup process always asks for segments as
    // `pg_wal/RECOVERYXLOG`, and ends recovery with the recovery_end_command that cleans the spool.
    // Other callers (pg_rewind --restore-target-wal passes real file names) get plain fetches.
    let recovering = dest.file_name().is_some_and(|f| f == "RECOVERYXLOG");
    let seg = match wal_name.parse::<WalFileName>() {
        Ok(WalFileName::Segment(seg)) if prefetch.count > 0 && recovering => seg,
        _ => return get(repo, wal_name, dest).await,
    };
    if let Err(e) = super::prefetch::record_request(dest, seg) {
        tracing::warn!("prefetching is off: {e:#}");
        return get(repo, wal_name, dest).await;
    }
    // A spooled copy, or one the prefetcher is downloading right now.
    // Waiting for the prefetcher polls the file system: on the blocking pool, not a runtime worker.
    let waited = {
        let dest = dest.to_path_buf();
        tokio::task::spawn_blocking(move || {
            super::prefetch::take(&dest, seg)
                || (super::prefetch::in_flight(&dest, seg)
                    && super::prefetch::wait_and_take(
                        &dest,
                        seg,
                        std::time::Duration::from_secs(5),
                    ))
        })
        .await
        .unwrap_or(false)
    };
    let outcome = if waited {
        let bytes = std::fs::metadata(dest).map(|m| m.len()).unwrap_or(0);
        tracing::debug!("restored {seg} from the prefetch spool");
        GetOutcome::Written { bytes }
    } else {
        get(repo, wal_name, dest).await?
    };
    if let GetOutcome::Written { bytes } = outcome
        && let Some(seg_size) = u32::try_from(bytes)
            .ok()
            .and_then(crate::pg::WalSegSize::new)
    {
        super::prefetch::prune(dest, seg, seg_size);
        if !super::prefetch::busy(dest)
            && let Err(e) =
                super::prefetch::spawn(&prefetch.global_args, seg, dest, prefetch.count, seg_size)
        {
            tracing::warn!("prefetching after {seg} is off: {e:#}");
        }
    }
    Ok(outcome)
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
    let key = ObjectKey::Wal(name);
    let stale = durable::remove_stale_temps(dest);
    if stale > 0 {
        tracing::info!(
            "removed {stale} temp file(s) left beside {} by killed fetches",
            dest.display()
        );
    }
    let threads = crate::archive::push::push_threads();
    // Decompressed straight into a temp file beside %p, which is renamed into place only once every
    // check passed: PostgreSQL never sees a partial or unverified file.
    let written = repo
        .read_verified(&key, |stored| {
            let target = dest.to_path_buf();
            async move {
                let written = tokio::task::spawn_blocking(move || {
                    durable::replace_with(&target, |f| {
                        envelope::decode_to_parallel(&stored, threads, |at, bytes| {
                            f.write_all_at(bytes, at)
                        })
                    })
                })
                .await?;
                match written {
                    Ok(bytes) => Ok(Ok(bytes)),
                    Err(DecodeToError::Corrupt(detail)) => Ok(Err(detail)),
                    Err(DecodeToError::Sink(e)) => Err(anyhow::Error::new(e)
                        .context(format!("write {name} to {}", dest.display()))),
                }
            }
        })
        .await
        .with_context(|| format!("fetch {name}"))?;
    match written {
        Some(bytes) => {
            tracing::debug!("restored {name} ({bytes} bytes) to {}", dest.display());
            Ok(GetOutcome::Written { bytes })
        }
        None => {
            // "Not found" ends recovery: say it only for a repository that is really there. A
            // missing bucket, an unmounted or emptied directory answers every read with "not found"
            // too, and promoting on that would silently drop the rest of the history.
            let identity = repo
                .require_identity()
                .await
                .with_context(|| format!("fetch {name}"))?;
            if let WalFileName::Segment(seg) = name
                && let Some(bytes) =
                    get_streamed(repo, seg, identity.wal_segment_size.bytes(), dest).await?
            {
                return Ok(GetOutcome::Written { bytes });
            }
            tracing::debug!("{name} is not in {}", repo.location());
            Ok(GetOutcome::NotFound)
        }
    }
}

/// What `pitr receive` stored of segment `seg` while receiving it (its chunks, put together up to
/// the first hole), written to `dest` as the segment, zero-filled to its size: what PostgreSQL
/// makes of a `.partial` segment renamed into place (it replays to the end of the valid WAL in
/// it). `None` when there is none.
///
/// # Errors
/// A chunk is corrupt or cannot be read, or `dest` cannot be written.
async fn get_streamed(
    repo: &Repo,
    seg: crate::pg::SegmentName,
    seg_size: u32,
    dest: &Path,
) -> anyhow::Result<Option<u64>> {
    let listed = repo
        .list(&crate::storage::layout::Prefix::Streamed(seg))
        .await
        .with_context(|| format!("list what was received of {seg}"))?;
    let mut chunks: Vec<(u32, ObjectKey)> = listed
        .into_iter()
        .filter_map(|e| match e.object {
            Some(k @ ObjectKey::Streamed { offset, .. }) => Some((offset, k)),
            _ => None,
        })
        .collect();
    if chunks.is_empty() {
        return Ok(None);
    }
    chunks.sort_by_key(|(offset, _)| *offset);
    // Chunks of an earlier run of receive may overlap later ones: the WAL at one position is the
    // same in both, so each adds what lies beyond the bytes so far.
    let mut whole: Vec<u8> = Vec::new();
    for (offset, key) in chunks {
        let offset = offset as usize;
        if offset > whole.len() {
            break;
        }
        let Some(data) = repo
            .get(&key)
            .await
            .with_context(|| format!("fetch what was received of {seg}"))?
        else {
            break;
        };
        if let Some(beyond) = data.get(whole.len() - offset..) {
            whole.extend_from_slice(beyond);
        }
    }
    let received = whole.len();
    whole.resize((seg_size as usize).max(received), 0);
    let target = dest.to_path_buf();
    tokio::task::spawn_blocking(move || durable::replace_atomically(&target, &whole))
        .await?
        .with_context(|| format!("write {seg} to {}", dest.display()))?;
    tracing::info!(
        "{seg} is not archived whole: restored the {received} bytes pitr receive stored of it (the rest zeros)"
    );
    Ok(Some(u64::from(seg_size)))
}

/// [`get_with_prefetch`] across the repositories of `set`, in order: the first that holds the file
/// writes it (the first repository that can be asked also prefetches). "Not found" only when every
/// repository positively said so; when one could not be asked (down, unreadable, a key problem) and
/// none had the file, that is an error, never "not found": recovery would end early on it.
///
/// # Errors
/// A repository holds the file but it cannot be read or verified, or `dest` cannot be written; or
/// the file was found nowhere while some repository could not be asked.
pub async fn get_from_set(
    set: &crate::repos::RepoSet,
    wal_name: &str,
    dest: &Path,
    prefetch: &Prefetch,
) -> anyhow::Result<GetOutcome> {
    if !set.is_several() {
        return get_with_prefetch(set.chosen()?, wal_name, dest, prefetch).await;
    }
    let mut failures: Vec<(String, anyhow::Error)> = Vec::new();
    let mut prefetched = false;
    for m in &set.members {
        let repo = match &m.repo {
            Ok(r) => r,
            Err(e) => {
                let err = if e.is_store_failure() {
                    anyhow::Error::new(crate::storage::RepoError::NoRepository {
                        repo: m.spec.url.clone(),
                        reason: e.to_string(),
                    })
                } else {
                    anyhow::anyhow!("{e}")
                };
                failures.push((m.spec.name.clone(), err));
                continue;
            }
        };
        let got = if prefetched {
            get(repo, wal_name, dest).await
        } else {
            prefetched = true;
            get_with_prefetch(repo, wal_name, dest, prefetch).await
        };
        match got {
            Ok(GetOutcome::Written { bytes }) => {
                if !failures.is_empty() {
                    tracing::warn!(
                        "{wal_name} came from repository {} ({} could not be asked)",
                        m.spec.name,
                        failures
                            .iter()
                            .map(|(n, _)| n.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    );
                }
                return Ok(GetOutcome::Written { bytes });
            }
            Ok(GetOutcome::NotFound) => {
                tracing::debug!("{wal_name} is not in repository {}", m.spec.name)
            }
            // A file that exists but does not verify: the next repository may hold a good copy.
            Err(e) => {
                tracing::warn!("repository {}: {e:#}", m.spec.name);
                failures.push((m.spec.name.clone(), e));
            }
        }
    }
    let mut failures = failures.into_iter();
    match failures.next() {
        None => Ok(GetOutcome::NotFound),
        Some((first_name, first)) => {
            let others: Vec<String> = failures
                .map(|(n, e)| format!("repository {n}: {}", crate::error::one_line(&e)))
                .collect();
            let mut msg = format!(
                "{wal_name} could not be fetched from repository {first_name}, and no other repository had it"
            );
            if !others.is_empty() {
                msg.push_str(&format!(" (nor: {})", others.join("; ")));
            }
            Err(first.context(msg))
        }
    }
}
