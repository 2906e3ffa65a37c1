//! Async archiving: `archive-push --parallel N` pushes the segment PostgreSQL asked for together with
//! up to 4N−1 of the next files waiting in `archive_status/*.ready`, N uploads at once (reading and
//! compressing the next file while earlier ones upload), and records each
//! extra file that is durably stored with a marker in `pg_wal/pitr_push/`. When PostgreSQL then asks
//! for one of those, the call finds its marker and answers at once.
//!
//! Nothing runs in the background and nothing is acknowledged early: a call exits 0 only for its own
//! file, and only after the store acknowledged it (now, or in an earlier call that left the marker). A
//! crash at any point leaves at worst a file without a marker, which is pushed again and found
//! identical. A marker names the repository and the file's size and modification time, so it is never
//! taken for another file or another repository.
//!
//! Reading and compressing is done one file at a time (each already uses every core), so memory stays
//! at one segment plus the compressed objects in flight; only the uploads overlap.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use futures::{FutureExt, StreamExt};

use super::push::{self, Known, PushReport};
use crate::compress::Compression;
use crate::pg::WalFileName;
use crate::storage::layout::ObjectKey;
use crate::storage::{PutOutcome, Repo};

/// The directory under `pg_wal` holding markers of files pushed ahead.
pub const MARKER_DIR: &str = "pitr_push";

/// Files one call takes on per upload slot: a batch of several rounds of uploads keeps the store busy
/// while the next files are compressed, and spreads the wait for a batch's slowest upload over more
/// files. Like pgBackRest's async queue, this is about how much a call takes on, not concurrency.
pub const FILES_PER_UPLOAD: usize = 4;

/// Push `wal_path`, and with it up to `FILES_PER_UPLOAD * parallel - 1` more `.ready` files, `parallel`
/// uploads at once (see the module docs).
///
/// # Errors
/// When `wal_path` itself could not be stored; failures of the extra files are only logged (PostgreSQL
/// will ask for them again).
pub async fn push_with_ahead(
    repo: &Repo,
    wal_path: &Path,
    compression: Compression,
    parallel: usize,
) -> anyhow::Result<PushReport> {
    if let Some(report) = answered_by_marker(repo.location(), wal_path) {
        return Ok(report);
    }
    let (own, ahead) = push_batch(repo, wal_path, compression, parallel).await;
    write_markers(repo.location(), wal_path, &ahead);
    own
}

/// Record each of `ahead` (files pushed ahead, stored in the repositories `location` names) with a
/// marker, so PostgreSQL's call for it answers at once.
fn write_markers(location: &str, wal_path: &Path, ahead: &[(WalFileName, PathBuf)]) {
    let markers = crate::durable::parent_dir(wal_path).join(MARKER_DIR);
    for (name, path) in ahead {
        if let Some(text) = marker_text(location, path) {
            let m = markers.join(name.to_string());
            if let Err(e) = std::fs::write(&m, text) {
                tracing::warn!("record {} as archived: {e}", m.display());
            }
        }
    }
}

/// Push `wal_path` and the ready files after it into `repo`: the push of `wal_path`, and the files
/// pushed ahead that were stored.
async fn push_batch(
    repo: &Repo,
    wal_path: &Path,
    compression: Compression,
    parallel: usize,
) -> (anyhow::Result<PushReport>, Vec<(WalFileName, PathBuf)>) {
    let start = Instant::now();
    let name = match push::name_of(wal_path) {
        Ok(n) => n,
        Err(e) => return (Err(e), Vec::new()),
    };
    let pg_wal = crate::durable::parent_dir(wal_path).to_path_buf();
    let markers = pg_wal.join(MARKER_DIR);
    let ahead = if parallel > 1 {
        forget_stale_markers(&pg_wal, &markers);
        ready_files(&pg_wal, name, &markers, FILES_PER_UPLOAD * parallel - 1)
    } else {
        Vec::new()
    };
    if ahead.is_empty() {
        return (push::push(repo, wal_path, compression).await, Vec::new());
    }
    if let Err(e) = std::fs::create_dir_all(&markers) {
        return (
            Err(anyhow::Error::new(e).context(format!("create {}", markers.display()))),
            Vec::new(),
        );
    }
    tracing::debug!("pushing {name} with {} more ready files", ahead.len());
    // One file read and compressed at a time (in this order: ours first); uploads overlap.
    let cpu = Arc::new(tokio::sync::Semaphore::new(1));
    let files: Vec<PathBuf> = std::iter::once(wal_path.to_path_buf())
        .chain(ahead)
        .collect();
    // Each push wants to know whether its file is stored already; one listing answers for the batch,
    // and the first file is compressed while it runs.
    let listing = {
        let keys: Vec<ObjectKey> = files
            .iter()
            .filter_map(|p| listable(p))
            .map(ObjectKey::Wal)
            .collect();
        let repo = repo.clone();
        async move { repo.which_exist(&keys).await.map(Arc::new) }
            .boxed()
            .shared()
    };
    let known = |path: &Path| -> Known {
        let Some(key) = listable(path).map(|n| ObjectKey::Wal(n).key()) else {
            return Known::Ask;
        };
        let listing = listing.clone();
        Known::Pending(async move { Some(listing.await?.contains(&key)) }.boxed())
    };
    let mut results = futures::stream::iter(files.into_iter().enumerate())
        .map(|(i, path)| {
            let cpu = cpu.clone();
            async move {
                let prepared = {
                    let _permit = cpu.acquire().await;
                    push::prepare_known(repo, &path, compression, known(&path)).await
                };
                let result = match prepared {
                    Ok(p) => push::store(repo, p, compression, start).await,
                    Err(e) => Err(e),
                };
                (i, path, result)
            }
        })
        .buffer_unordered(parallel);
    let mut own = None;
    let mut pushed = Vec::new();
    let mut stored_ahead = Vec::new();
    while let Some((i, path, result)) = results.next().await {
        if let Ok(report) = &result {
            pushed.push(report.name);
        }
        if i == 0 {
            own = Some(result);
            continue;
        }
        match result {
            Ok(report) => stored_ahead.push((report.name, path)),
            Err(e) => tracing::warn!(
                "archiving {} ahead failed (it will be pushed when PostgreSQL asks): {e:#}",
                path.display()
            ),
        }
    }
    drop(results);
    crate::rollup::after_push(repo, &pushed).await;
    (
        own.unwrap_or_else(|| Err(anyhow::anyhow!("{name}: the push did not run"))),
        stored_ahead,
    )
}

/// How long archive-push waits for a repository that is not required once every required one has
/// the file; it then answers without it (a store that is down never holds up archiving).
pub const OPTIONAL_GRACE: std::time::Duration = std::time::Duration::from_secs(10);

/// The grace instead when every repository not required is known to be behind (it missed a file
/// already): a short try, so that an outage costs each push this much and not [`OPTIONAL_GRACE`].
pub const BEHIND_GRACE: std::time::Duration = std::time::Duration::from_secs(1);

async fn push_member(
    m: &crate::repos::Member,
    wal_path: &Path,
    parallel: usize,
    prepared: Option<anyhow::Result<push::Prepared>>,
) -> (anyhow::Result<PushReport>, Vec<(WalFileName, PathBuf)>) {
    match (&m.repo, prepared) {
        (Ok(repo), Some(p)) => {
            let start = Instant::now();
            let stored = match p {
                Ok(p) => push::store_prepared(repo, p, m.spec.compress, start).await,
                Err(e) => Err(e),
            };
            (stored, Vec::new())
        }
        (Ok(repo), None) => push_batch(repo, wal_path, m.spec.compress, parallel).await,
        (Err(e), _) => (
            Err(anyhow::anyhow!("{e}").context(format!("open repository {}", m.spec.name))),
            Vec::new(),
        ),
    }
}

/// What a marker names for a set of repositories: the one URL, or the required ones in order.
pub fn set_location(repos: &[crate::config::RepoSpec]) -> String {
    match repos {
        [one] => one.url.clone(),
        _ => repos
            .iter()
            .filter(|r| r.required)
            .map(|r| r.url.as_str())
            .collect::<Vec<_>>()
            .join(" + "),
    }
}

/// [`push_with_ahead`] into every repository of `set` at once: success once each required one
/// stored the file; the others get it too when they answer within [`OPTIONAL_GRACE`] after that
/// ([`BEHIND_GRACE`] once they are known to be behind). A failure of theirs is logged and recorded
/// ([`BEHIND_DIR`]), and the next push that reaches one catches it up from a required repository.
/// A file pushed ahead gets its marker once every required repository stored it.
///
/// # Errors
/// A required repository could not store `wal_path` (or could not be opened).
pub async fn push_to_set(
    set: &crate::repos::RepoSet,
    wal_path: &Path,
    parallel: usize,
) -> anyhow::Result<PushReport> {
    if !set.is_several() {
        let repo = set.chosen()?;
        let compression = set.chosen_spec().map(|s| s.compress).unwrap_or_default();
        return push_with_ahead(repo, wal_path, compression, parallel).await;
    }
    let specs: Vec<crate::config::RepoSpec> = set.members.iter().map(|m| m.spec.clone()).collect();
    let location = set_location(&specs);
    if let Some(report) = answered_by_marker(&location, wal_path) {
        return Ok(report);
    }
    // One file at a time: it is read, compressed and indexed once for every repository (once per
    // compression), then each stores the same bytes.
    let mut shared: Vec<Option<anyhow::Result<push::Prepared>>> =
        set.members.iter().map(|_| None).collect();
    if parallel <= 1 {
        let opened: Vec<(usize, (&Repo, Compression))> = set
            .members
            .iter()
            .enumerate()
            .filter_map(|(i, m)| m.repo.as_ref().ok().map(|r| (i, (r, m.spec.compress))))
            .collect();
        let targets: Vec<(&Repo, Compression)> = opened.iter().map(|(_, t)| *t).collect();
        if let Some(prepared) = push::prepare_shared(&targets, wal_path).await {
            for ((i, _), p) in opened.iter().zip(prepared) {
                if let Some(slot) = shared.get_mut(*i) {
                    *slot = Some(p);
                }
            }
        }
    }
    let mut required = Vec::new();
    let mut optional = Vec::new();
    for (m, p) in set.members.iter().zip(shared) {
        if m.spec.required {
            required.push((m, p));
        } else {
            optional.push((m, p));
        }
    }
    let required_runs = futures::future::join_all(
        required
            .iter_mut()
            .map(|(m, p)| push_member(m, wal_path, parallel, p.take())),
    );
    let optional_runs = futures::future::join_all(
        optional
            .iter_mut()
            .map(|(m, p)| push_member(m, wal_path, parallel, p.take())),
    );
    let required: Vec<&crate::repos::Member> = required.iter().map(|(m, _)| *m).collect();
    let optional: Vec<&crate::repos::Member> = optional.iter().map(|(m, _)| *m).collect();
    tokio::pin!(required_runs, optional_runs);
    let mut optional_done = None;
    let required_done = loop {
        tokio::select! {
            r = &mut required_runs => break r,
            o = &mut optional_runs, if optional_done.is_none() => optional_done = Some(o),
        }
    };
    let pg_wal = crate::durable::parent_dir(wal_path).to_path_buf();
    let grace = if optional.iter().all(|m| is_behind(&pg_wal, &m.spec)) {
        BEHIND_GRACE
    } else {
        OPTIONAL_GRACE
    };
    if optional_done.is_none() {
        optional_done = tokio::time::timeout(grace, &mut optional_runs).await.ok();
    }
    let name = push::name_of(wal_path)?;
    // The ones that stored this file and had missed earlier ones are caught up from a required
    // repository, once that one has stored it too.
    let mut to_catch_up = Vec::new();
    match optional_done {
        Some(done) => {
            for (m, (own, _)) in optional.iter().zip(done) {
                match own {
                    Err(e) => {
                        tracing::warn!(
                            "repository {} (not required) missed {name}: {e:#}; a later push or pitr copy catches it up",
                            m.spec.name
                        );
                        mark_behind(&pg_wal, &m.spec);
                    }
                    Ok(_) if is_behind(&pg_wal, &m.spec) => to_catch_up.push(*m),
                    Ok(_) => {}
                }
            }
        }
        None => {
            tracing::warn!(
                "repositories not required ({}) did not answer within {} ms: they may miss {name}; a later push or pitr copy catches them up",
                optional
                    .iter()
                    .map(|m| m.spec.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
                grace.as_millis()
            );
            for m in &optional {
                mark_behind(&pg_wal, &m.spec);
            }
        }
    }
    let mut report = None;
    let mut in_all: Option<Vec<(WalFileName, PathBuf)>> = None;
    for (m, (own, ahead)) in required.iter().zip(required_done) {
        match own {
            Ok(r) => {
                report.get_or_insert(r);
            }
            Err(e) => return Err(e.context(format!("repository {} ({})", m.spec.name, m.spec.url))),
        }
        in_all = Some(match in_all {
            None => ahead,
            Some(prev) => prev.into_iter().filter(|a| ahead.contains(a)).collect(),
        });
    }
    write_markers(&location, wal_path, &in_all.unwrap_or_default());
    let source = required.iter().find_map(|m| m.repo.as_ref().ok());
    if let Some(from) = source {
        for m in to_catch_up {
            catch_up(&pg_wal, from, m).await;
        }
    }
    report
        .ok_or_else(|| anyhow::anyhow!("{name}: no repository is required, so none was waited for"))
}

/// Where archive-push records that a repository not required missed a file: one file per
/// repository, named after it, holding its URL.
pub const BEHIND_DIR: &str = "pitr_behind";

/// How long one push spends catching a repository up (copying is resumable: the next push goes on).
const CATCH_UP_BUDGET: std::time::Duration = std::time::Duration::from_secs(30);

fn behind_marker(pg_wal: &Path, spec: &crate::config::RepoSpec) -> PathBuf {
    let safe: String = spec
        .name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    pg_wal.join(BEHIND_DIR).join(safe)
}

/// Record that `spec`'s repository missed a file.
fn mark_behind(pg_wal: &Path, spec: &crate::config::RepoSpec) {
    let marker = behind_marker(pg_wal, spec);
    let written = marker
        .parent()
        .map_or(Ok(()), std::fs::create_dir_all)
        .and_then(|()| std::fs::write(&marker, &spec.url));
    if let Err(e) = written {
        tracing::warn!(
            "record that repository {} is behind in {}: {e}",
            spec.name,
            marker.display()
        );
    }
}

fn is_behind(pg_wal: &Path, spec: &crate::config::RepoSpec) -> bool {
    behind_marker(pg_wal, spec).exists()
}

/// Copy into `m`'s repository the WAL it lacks from `from`, for at most [`CATCH_UP_BUDGET`]; the
/// record that it is behind goes once nothing is left to copy.
async fn catch_up(pg_wal: &Path, from: &Repo, m: &crate::repos::Member) {
    let Ok(to) = &m.repo else { return };
    let opts = crate::copy::CopyOptions {
        backup: None,
        jobs: 4,
        wal_only: true,
    };
    let copied = tokio::time::timeout(
        CATCH_UP_BUDGET,
        crate::copy::run(from, to, &opts, &|_, _| {}),
    )
    .await;
    match copied {
        Ok(Ok(report)) if report.findings.is_empty() => {
            tracing::info!(
                "repository {} caught up: {} WAL object(s) copied from {}",
                m.spec.name,
                report.objects_copied,
                from.location()
            );
            let _ = std::fs::remove_file(behind_marker(pg_wal, &m.spec));
        }
        Ok(Ok(report)) => {
            let first = report
                .findings
                .first()
                .map(|f| format!("{} {}", f.object, f.detail))
                .unwrap_or_default();
            tracing::warn!(
                "repository {}: catching up left {} problem(s) (first: {first}); pitr copy names them all",
                m.spec.name,
                report.findings.len(),
            );
        }
        Ok(Err(e)) => tracing::warn!("repository {}: catching up failed: {e:#}", m.spec.name),
        Err(_) => tracing::info!(
            "repository {}: still catching up after {} s; the next push goes on",
            m.spec.name,
            CATCH_UP_BUDGET.as_secs()
        ),
    }
}

/// The name of `path` if it is a segment (or partial segment), the files one listing can answer for.
fn listable(path: &Path) -> Option<WalFileName> {
    match push::name_of(path).ok()? {
        n @ (WalFileName::Segment(_) | WalFileName::Partial(_)) => Some(n),
        _ => None,
    }
}

/// If an earlier call already stored `wal_path` in the repository at `location` (its marker says so),
/// consume the marker and report the file as stored. Needs no connection to the store, so
/// `archive-push` checks this before it opens one.
pub fn answered_by_marker(location: &str, wal_path: &Path) -> Option<PushReport> {
    let start = Instant::now();
    let name = push::name_of(wal_path).ok()?;
    let pg_wal = crate::durable::parent_dir(wal_path);
    let marker = pg_wal.join(MARKER_DIR).join(name.to_string());
    let expected = marker_text(location, wal_path)?;
    if !std::fs::read_to_string(&marker).is_ok_and(|m| m == expected) {
        return None;
    }
    let _ = std::fs::remove_file(&marker);
    tracing::debug!("{name} was archived ahead by an earlier call");
    Some(PushReport {
        name,
        outcome: PutOutcome::AlreadyStored,
        original_bytes: std::fs::metadata(wal_path).map_or(0, |m| m.len()),
        elapsed: start.elapsed(),
    })
}

/// What a marker for `path` in the repository at `location` says: the repository, and the file's size and modification time.
fn marker_text(location: &str, path: &Path) -> Option<String> {
    let m = std::fs::metadata(path).ok()?;
    Some(format!(
        "repo {}\nsize {}\nmtime {}.{:09}\n",
        location,
        m.len(),
        m.mtime(),
        m.mtime_nsec()
    ))
}

/// Up to `n` files PostgreSQL has marked ready to archive, other than `own`, without a marker yet:
/// timeline history files first (as PostgreSQL orders them), then by name.
fn ready_files(pg_wal: &Path, own: WalFileName, markers: &Path, n: usize) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(pg_wal.join("archive_status")) else {
        return Vec::new();
    };
    let mut ready: Vec<(bool, String)> = entries
        .flatten()
        .filter_map(|e| {
            let f = e.file_name().to_string_lossy().into_owned();
            let base = f.strip_suffix(".ready")?.to_string();
            let name: WalFileName = base.parse().ok()?;
            (name != own && !markers.join(&base).exists())
                .then_some((!matches!(name, WalFileName::History(_)), base))
        })
        .collect();
    ready.sort();
    ready
        .into_iter()
        .map(|(_, base)| pg_wal.join(base))
        .filter(|p| p.is_file())
        .take(n)
        .collect()
}

/// Remove markers whose file PostgreSQL no longer waits to archive (it was archived some other way,
/// or the cluster moved on), so none outlives its file.
fn forget_stale_markers(pg_wal: &Path, markers: &Path) {
    let Ok(entries) = std::fs::read_dir(markers) else {
        return;
    };
    for e in entries.flatten() {
        let f = e.file_name().to_string_lossy().into_owned();
        let ready = pg_wal.join("archive_status").join(format!("{f}.ready"));
        if !ready.exists() {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pg::PgMajor;
    use object_store::memory::InMemory;

    /// A pg_wal directory with `n` ready segments 3, 4, … of one cluster.
    fn pg_wal(n: u64) -> (tempfile::TempDir, Vec<PathBuf>) {
        let d = tempfile::tempdir().unwrap();
        let wal = d.path().join("pg_wal");
        std::fs::create_dir_all(wal.join("archive_status")).unwrap();
        let files = (3..3 + n)
            .map(|segno| {
                let mut b = crate::pg::segment::tests::fake_segment(
                    PgMajor::V15,
                    1,
                    segno,
                    7_000_000_000,
                    1 << 20,
                );
                b[9000] = segno as u8;
                let name = format!("0000000100000000{segno:08X}");
                std::fs::write(wal.join(&name), b).unwrap();
                std::fs::write(
                    wal.join("archive_status").join(format!("{name}.ready")),
                    b"",
                )
                .unwrap();
                wal.join(name)
            })
            .collect();
        (d, files)
    }

    /// What PostgreSQL's archiver does after a 0 exit.
    fn archived(f: &Path) {
        let status = f.parent().unwrap().join("archive_status");
        let name = f.file_name().unwrap().to_string_lossy().into_owned();
        std::fs::rename(
            status.join(format!("{name}.ready")),
            status.join(format!("{name}.done")),
        )
        .unwrap();
    }

    #[tokio::test]
    async fn later_calls_find_their_segment_already_stored() {
        let (_d, files) = pg_wal(10);
        let repo = Repo::from_store(Arc::new(InMemory::new()), "memory://ahead");
        // Two upload slots: the call takes on its own file and 2 * FILES_PER_UPLOAD - 1 = 7 more.
        let first = push_with_ahead(&repo, &files[0], Compression::Zstd, 2)
            .await
            .unwrap();
        assert!(matches!(first.outcome, PutOutcome::Stored { .. }));
        archived(&files[0]);
        let markers = files[0].parent().unwrap().join(MARKER_DIR);
        let marked: Vec<_> = std::fs::read_dir(&markers).unwrap().flatten().collect();
        assert_eq!(marked.len(), 7, "the next seven segments pushed ahead");
        // Every file pushed ahead is really stored, byte for byte.
        for f in &files[1..8] {
            let name = push::name_of(f).unwrap();
            let got = repo
                .get(&crate::storage::layout::ObjectKey::Wal(name))
                .await
                .unwrap()
                .unwrap();
            assert_eq!(got, std::fs::read(f).unwrap());
        }
        for f in &files[1..8] {
            let r = push_with_ahead(&repo, f, Compression::Zstd, 2)
                .await
                .unwrap();
            assert_eq!(r.outcome, PutOutcome::AlreadyStored);
            archived(f);
        }
        assert_eq!(std::fs::read_dir(&markers).unwrap().count(), 0);
        // The last two were not pushed ahead: the first one's call stores both.
        let r = push_with_ahead(&repo, &files[8], Compression::Zstd, 2)
            .await
            .unwrap();
        assert!(matches!(r.outcome, PutOutcome::Stored { .. }));
        assert_eq!(std::fs::read_dir(&markers).unwrap().count(), 1);
    }

    #[tokio::test]
    async fn a_marker_for_another_repository_or_a_changed_file_is_not_trusted() {
        let (_d, files) = pg_wal(2);
        let a = Repo::from_store(Arc::new(InMemory::new()), "memory://a");
        push_with_ahead(&a, &files[0], Compression::Zstd, 2)
            .await
            .unwrap();
        // Repository b has nothing: its push of segment 4 must really store it.
        let b_store = Arc::new(InMemory::new());
        let b = Repo::from_store(b_store, "memory://b");
        let r = push_with_ahead(&b, &files[1], Compression::Zstd, 2)
            .await
            .unwrap();
        assert!(matches!(r.outcome, PutOutcome::Stored { .. }));
        let name = push::name_of(&files[1]).unwrap();
        assert!(
            b.get(&crate::storage::layout::ObjectKey::Wal(name))
                .await
                .unwrap()
                .is_some()
        );
    }

    #[tokio::test]
    async fn a_failing_file_ahead_does_not_fail_the_call_nor_get_a_marker() {
        let (_d, files) = pg_wal(3);
        // Segment 4 is truncated: refused when pushed ahead, and again when asked for.
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&files[1])
            .unwrap();
        f.set_len(4096).unwrap();
        let repo = Repo::from_store(Arc::new(InMemory::new()), "memory://c");
        push_with_ahead(&repo, &files[0], Compression::Zstd, 3)
            .await
            .unwrap();
        let markers = files[0].parent().unwrap().join(MARKER_DIR);
        assert!(
            !markers
                .join(push::name_of(&files[1]).unwrap().to_string())
                .exists()
        );
        assert!(
            markers
                .join(push::name_of(&files[2]).unwrap().to_string())
                .exists()
        );
        assert!(
            push_with_ahead(&repo, &files[1], Compression::Zstd, 3)
                .await
                .is_err()
        );
    }

    /// Several repositories get the segment compressed once per compression: those with the same
    /// compression hold the very same bytes, one with another holds its own, and each reads back
    /// the segment.
    #[tokio::test]
    async fn a_segment_is_encoded_once_for_repositories_that_share_a_compression() {
        let (_d, files) = pg_wal(1);
        let spec = |name: &str, compress: Compression| crate::config::RepoSpec {
            name: name.into(),
            url: format!("memory://{name}"),
            required: true,
            compress,
            encryption: None,
            expire: crate::expire::Policy::default(),
        };
        let stores: Vec<Arc<InMemory>> = (0..3).map(|_| Arc::new(InMemory::new())).collect();
        let members = [
            ("a", Compression::Zstd),
            ("b", Compression::Zstd),
            ("c", Compression::None),
        ]
        .iter()
        .zip(&stores)
        .map(|((name, c), store)| crate::repos::Member {
            spec: spec(name, *c),
            repo: Ok(Repo::from_store(store.clone(), &format!("memory://{name}"))),
        })
        .collect();
        let set = crate::repos::RepoSet { members, chosen: 0 };
        let report = push_to_set(&set, &files[0], 1).await.unwrap();
        assert!(matches!(report.outcome, PutOutcome::Stored { .. }));
        let name = report.name;
        let mut stored = Vec::new();
        for m in &set.members {
            let key = ObjectKey::Wal(name);
            let repo = m.repo.as_ref().unwrap();
            stored.push(repo.get_stored(&key).await.unwrap().unwrap());
            let got = m.repo.as_ref().unwrap().get(&key).await.unwrap().unwrap();
            assert_eq!(got, std::fs::read(&files[0]).unwrap(), "{}", m.spec.name);
        }
        assert_eq!(stored[0], stored[1], "the same compression, the same bytes");
        assert!(stored[2].len() > stored[0].len(), "uncompressed in c");
    }
}
