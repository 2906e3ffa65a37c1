//! Prefetching for `archive-get`: while recovery replays segment N, one detached background `pitr`
//! keeps the next segments of the same timeline in a spool directory beside `%p`
//! (`pg_wal/pitr_spool`), each verified while it is written to a temp file and then renamed into
//! place. When recovery asks for N+1, `archive-get` hands the spooled file over with a rename instead
//! of a download, so replay is not paced by one object-store round trip per segment.
//!
//! One prefetcher runs per spool (an `flock` on `.lock`) for as long as recovery keeps asking: every
//! `archive-get` call records the segment it was asked for in `.request`, and the prefetcher keeps the
//! `count` segments after it (at most 256 MiB) spooled or on their way. It exits when the archive has
//! no next segment yet, when recovery moves to another timeline, when recovery stops asking for a
//! minute, or when the spool is cleaned; the next `archive-get` starts a new one if needed.
//!
//! Entries for older segments or other timelines are removed on every call, so a timeline switch never
//! serves a stale file; `pitr restore` also sets a `recovery_end_command` (`pitr archive-spool-clean`)
//! that stops the prefetcher and removes the spool when recovery ends. A request for a segment that
//! the prefetcher is downloading at that moment (`.<segment>.tmp` exists) waits for it (a few seconds
//! at most) instead of downloading it a second time.

use std::os::unix::fs::{DirBuilderExt, FileExt};
use std::os::unix::io::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};

use anyhow::Context;
use futures::StreamExt;

use crate::durable;
use crate::pg::{SegNo, SegmentName, WalFileName, WalSegSize};
use crate::storage::Repo;
use crate::storage::envelope;
use crate::storage::layout::ObjectKey;

/// The spool directory's name, inside the directory of `%p` (normally `pg_wal`).
pub const SPOOL_DIR: &str = "pitr_spool";
/// Most bytes prefetched ahead.
pub const MAX_AHEAD_BYTES: u64 = 256 << 20;

/// The spool directory for a destination path.
pub fn spool_dir(dest: &Path) -> PathBuf {
    crate::durable::parent_dir(dest).join(SPOOL_DIR)
}

/// Hand over a spooled copy of `seg` to `dest` by rename; `true` if there was one.
pub fn take(dest: &Path, seg: SegmentName) -> bool {
    let spooled = spool_dir(dest).join(seg.to_string());
    // No fsync: like archive-get's own writes, a copy recovery can fetch again.
    std::fs::rename(&spooled, dest).is_ok()
}

/// Remove spooled segments that recovery will not ask for any more: older than `seg`, or on another
/// timeline; and abandoned temp files.
pub fn prune(dest: &Path, seg: SegmentName, seg_size: WalSegSize) {
    let Ok(entries) = std::fs::read_dir(spool_dir(dest)) else {
        return;
    };
    let Some(now) = seg.segno(seg_size) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        // A spooled segment, or the temp file of one (`.<segment>.tmp`).
        let segment = name
            .strip_prefix('.')
            .and_then(|n| n.strip_suffix(".tmp"))
            .unwrap_or(&name);
        let stale = match segment.parse::<WalFileName>() {
            Ok(WalFileName::Segment(s)) => {
                s.tli != seg.tli || s.segno(seg_size).is_none_or(|n| n <= now)
            }
            _ => false,
        };
        if stale {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// How many segments to fetch ahead for `requested` (count and byte bounds).
pub fn ahead(count: usize, seg_size: WalSegSize) -> usize {
    let by_bytes = (MAX_AHEAD_BYTES / u64::from(seg_size.bytes())).max(1) as usize;
    count.min(by_bytes)
}

fn lock_file(spool: &Path) -> std::io::Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(spool.join(".lock"))
}

fn try_lock(f: &std::fs::File) -> bool {
    // SAFETY: flock on a descriptor we own.
    unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) == 0 }
}

/// Whether a prefetcher is running on this spool.
pub fn busy(dest: &Path) -> bool {
    let spool = spool_dir(dest);
    if !spool.join(".lock").exists() {
        return false;
    }
    match lock_file(&spool) {
        Ok(f) => !try_lock(&f), // dropping `f` releases a lock we just took
        Err(_) => false,
    }
}

/// The temp file a segment is downloaded into; it exists while the prefetcher works on that segment.
fn in_flight_path(spool: &Path, seg: SegmentName) -> PathBuf {
    spool.join(format!(".{seg}.tmp"))
}

/// Whether the running prefetcher is downloading `seg` right now.
pub fn in_flight(dest: &Path, seg: SegmentName) -> bool {
    in_flight_path(&spool_dir(dest), seg).exists() && busy(dest)
}

/// Wait (at most `patience`) for the prefetcher to finish downloading `seg`, then take it.
pub fn wait_and_take(dest: &Path, seg: SegmentName, patience: std::time::Duration) -> bool {
    let deadline = std::time::Instant::now() + patience;
    let tmp = in_flight_path(&spool_dir(dest), seg);
    while std::time::Instant::now() < deadline {
        if take(dest, seg) {
            return true;
        }
        if !tmp.exists() || !busy(dest) {
            return take(dest, seg);
        }
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    false
}

/// The file in which `archive-get` records the segment recovery asked for last.
const REQUEST_FILE: &str = ".request";
/// The file whose presence tells the prefetcher to stop (written by [`clean`]).
const STOP_FILE: &str = ".stop";
/// A prefetcher whose recovery has not asked for anything for this long exits.
const IDLE_EXIT: std::time::Duration = std::time::Duration::from_secs(60);

/// The spool directory for `dest`, created (0700) if missing.
fn create_spool(dest: &Path) -> anyhow::Result<PathBuf> {
    let spool = spool_dir(dest);
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&spool)
        .with_context(|| format!("create {}", spool.display()))?;
    Ok(spool)
}

/// Record that recovery asked for `seg` (for the prefetcher to keep ahead of it). Creates the spool.
///
/// # Errors
/// The spool cannot be created or written.
pub fn record_request(dest: &Path, seg: SegmentName) -> anyhow::Result<()> {
    let spool = create_spool(dest)?;
    durable::replace_atomically(&spool.join(REQUEST_FILE), seg.to_string().as_bytes())
        .with_context(|| format!("write {}", spool.join(REQUEST_FILE).display()))
}

fn read_request(spool: &Path) -> Option<SegmentName> {
    match std::fs::read_to_string(spool.join(REQUEST_FILE))
        .ok()?
        .parse()
    {
        Ok(WalFileName::Segment(s)) => Some(s),
        _ => None,
    }
}

/// Stop the prefetcher, wait (at most `patience`) for it to finish its current download, and remove
/// the spool.
pub fn clean(spool: &Path, patience: std::time::Duration) {
    if spool.is_dir() {
        let _ = std::fs::write(spool.join(STOP_FILE), b"");
    }
    if let Ok(f) = lock_file(spool) {
        let deadline = std::time::Instant::now() + patience;
        while !try_lock(&f) && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
    let _ = std::fs::remove_dir_all(spool);
}

/// Start a detached prefetcher for the segments after `seg` (it exits at once if one is running).
///
/// # Errors
/// The process cannot be started.
pub fn spawn(
    global_args: &[String],
    seg: SegmentName,
    dest: &Path,
    count: usize,
    seg_size: WalSegSize,
) -> anyhow::Result<()> {
    let exe = std::env::current_exe().context("find the pitr binary")?;
    let spool = create_spool(dest)?;
    let mut cmd = std::process::Command::new(exe);
    cmd.args(global_args)
        .arg("archive-prefetch")
        .arg(seg.to_string())
        .arg(&spool)
        .arg(count.to_string())
        .arg(seg_size.bytes().to_string())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    // SAFETY: setsid is async-signal-safe; it detaches the prefetcher from PostgreSQL's process group
    // so recovery never waits for it.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    cmd.spawn().context("start the prefetcher")?;
    Ok(())
}

/// The prefetcher: keep the `count` segments after the one recovery asked for last (`.request`,
/// starting with `after`) spooled, until there is nothing more to do (see the module notes).
///
/// # Errors
/// Store or local failures (the prefetcher only ever helps; `archive-get` fetches what is missing).
pub async fn run(
    repo: &Repo,
    after: SegmentName,
    spool: &Path,
    count: usize,
    seg_size: WalSegSize,
) -> anyhow::Result<()> {
    // The spool must already exist (archive-get creates it); once it is cleaned away, do nothing.
    let lock = lock_file(spool)?;
    if !try_lock(&lock) {
        return Ok(()); // another prefetcher is at work
    }
    let n = ahead(count, seg_size).max(1) as u64;
    let mut next = after.segno(seg_size).context("segment number")?.0 + 1;
    let mut position = after;
    let mut last_change = std::time::Instant::now();
    // Downloads overlap (a distant store's latency), but one segment is decompressed at a time: the
    // prefetcher must not take CPU from the startup process replaying the WAL it fetches.
    let decode = tokio::sync::Semaphore::new(1);
    let mut fetches = futures::stream::FuturesUnordered::new();
    loop {
        if !spool.is_dir() || spool.join(STOP_FILE).exists() {
            break;
        }
        match read_request(spool) {
            Some(r) if r != position => {
                position = r;
                last_change = std::time::Instant::now();
            }
            _ => {}
        }
        if position.tli != after.tli {
            break; // a new timeline: the next archive-get starts a prefetcher for it
        }
        let now = position.segno(seg_size).context("segment number")?.0;
        next = next.max(now + 1);
        while next <= now + n && fetches.len() < n as usize {
            if let Some(seg) = SegmentName::new(after.tli, SegNo(next), seg_size) {
                fetches.push(fetch_one(repo, spool, seg, &decode));
            }
            next += 1;
        }
        if fetches.is_empty() {
            if last_change.elapsed() > IDLE_EXIT {
                break;
            }
            // Window full: wait for recovery to take a segment (each take is one rename, so a
            // short poll costs nothing next to replaying 16 MiB of WAL).
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            continue;
        }
        if let Some(r) = fetches.next().await
            && !r?
        {
            // Not archived (yet): let the downloads in flight finish, then exit.
            while let Some(r) = fetches.next().await {
                r?;
            }
            break;
        }
    }
    Ok(())
}

/// Download `seg` into the spool unless it is there; `false` if the repository does not hold it.
async fn fetch_one(
    repo: &Repo,
    spool: &Path,
    seg: SegmentName,
    decode: &tokio::sync::Semaphore,
) -> anyhow::Result<bool> {
    let dest = spool.join(seg.to_string());
    if dest.exists() {
        return Ok(true);
    }
    let tmp = in_flight_path(spool, seg);
    // Announce the download before it starts, so archive-get waits for it instead of repeating it.
    if std::fs::write(&tmp, b"").is_err() {
        return Ok(true); // the spool was cleaned away
    }
    let key = ObjectKey::Wal(WalFileName::Segment(seg));
    let stored = match repo.get_stored(&key).await {
        Ok(Some(b)) => b,
        Ok(None) => {
            let _ = std::fs::remove_file(&tmp);
            return Ok(false);
        }
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            return Err(e.into());
        }
    };
    let _permit = decode.acquire().await?;
    tokio::task::spawn_blocking(move || -> std::io::Result<()> {
        let f = std::fs::OpenOptions::new().write(true).truncate(true).open(&tmp)?;
        match envelope::decode_to(&stored, |at, bytes| f.write_all_at(bytes, at)) {
            Ok(_) => std::fs::rename(&tmp, &dest),
            Err(e) => {
                // A damaged copy is left for archive-get to fetch (and report) itself.
                tracing::warn!(segment = %seg, "prefetch skipped a copy that failed verification: {e:?}");
                let _ = std::fs::remove_file(&tmp);
                Ok(())
            }
        }
    })
    .await??;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pg::TimelineId;
    use crate::testing::PutBytes;

    #[test]
    fn prune_keeps_only_what_recovery_will_ask_for() {
        let d = tempfile::tempdir().unwrap();
        let dest = d.path().join("RECOVERYXLOG");
        let spool = spool_dir(&dest);
        std::fs::create_dir_all(&spool).unwrap();
        for f in [
            "000000010000000000000003",
            "000000010000000000000005",
            "000000010000000000000006",
            "000000020000000000000006",
            ".000000010000000000000004.tmp",
            ".000000010000000000000007.tmp",
            ".lock",
            ".request",
        ] {
            std::fs::write(spool.join(f), b"x").unwrap();
        }
        let sz = WalSegSize::DEFAULT;
        let seg5 = SegmentName::new(TimelineId::ONE, SegNo(5), sz).unwrap();
        prune(&dest, seg5, sz);
        let mut left: Vec<String> = std::fs::read_dir(&spool)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(
            left,
            [
                ".000000010000000000000007.tmp",
                ".lock",
                ".request",
                "000000010000000000000006"
            ]
        );
        let seg6 = SegmentName::new(TimelineId::ONE, SegNo(6), sz).unwrap();
        assert!(take(&dest, seg6));
        assert_eq!(std::fs::read(&dest).unwrap(), b"x");
        assert!(!take(&dest, seg6));
        assert_eq!(ahead(8, sz), 8);
        assert_eq!(ahead(8, WalSegSize::new(1 << 30).unwrap()), 1);
    }

    /// Poll `cond` until it holds, for at most ten seconds.
    async fn eventually(what: &str, cond: impl Fn() -> bool) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !cond() {
            assert!(
                std::time::Instant::now() < deadline,
                "timed out waiting for {what}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn one_prefetcher_stays_ahead_of_recovery_and_stops_at_the_end() {
        use crate::compress::Compression;
        let sz = WalSegSize::new(1 << 20).unwrap();
        let seg = move |n| SegmentName::new(TimelineId::ONE, SegNo(n), sz).unwrap();
        let body = |n: u64| vec![n as u8; 1 << 20];
        let repo = Repo::from_store(
            std::sync::Arc::new(object_store::memory::InMemory::new()),
            "memory://prefetch",
        );
        for n in 1..=8 {
            let key = ObjectKey::Wal(WalFileName::Segment(seg(n)));
            repo.put_new(&key, &body(n), Compression::Zstd)
                .await
                .unwrap();
        }
        let d = tempfile::tempdir().unwrap();
        let dest = d.path().join("RECOVERYXLOG");
        let spool = spool_dir(&dest);
        record_request(&dest, seg(1)).unwrap();
        let worker = {
            let (repo, spool) = (repo.clone(), spool.clone());
            tokio::spawn(async move { run(&repo, seg(1), &spool, 3, sz).await })
        };
        // Three ahead of segment 1, and no more.
        eventually("segments 2-4 spooled", || {
            (2..=4).all(|n| spool.join(seg(n).to_string()).exists())
        })
        .await;
        assert!(!spool.join(seg(5).to_string()).exists());
        // Recovery takes 2 and 3: the window moves to 6, and the same prefetcher fills it.
        for n in [2, 3] {
            record_request(&dest, seg(n)).unwrap();
            assert!(take(&dest, seg(n)));
            assert_eq!(std::fs::read(&dest).unwrap(), body(n));
        }
        eventually("segment 6 spooled", || {
            spool.join(seg(6).to_string()).exists()
        })
        .await;
        assert!(!worker.is_finished());
        // Near the end of the archive: it fetches 8, finds no 9, and exits.
        record_request(&dest, seg(7)).unwrap();
        eventually("the prefetcher exits", || worker.is_finished()).await;
        worker.await.unwrap().unwrap();
        assert_eq!(
            std::fs::read(spool.join(seg(8).to_string())).unwrap(),
            body(8)
        );
        assert!(!busy(&dest));
        // A stop request ends a prefetcher whose window is full.
        record_request(&dest, seg(1)).unwrap();
        let worker = {
            let (repo, spool) = (repo.clone(), spool.clone());
            tokio::spawn(async move { run(&repo, seg(1), &spool, 2, sz).await })
        };
        eventually("segment 3 spooled", || {
            spool.join(seg(3).to_string()).exists()
        })
        .await;
        assert!(!worker.is_finished());
        std::fs::write(spool.join(STOP_FILE), b"").unwrap();
        eventually("the prefetcher stops", || worker.is_finished()).await;
        worker.await.unwrap().unwrap();
    }
}
