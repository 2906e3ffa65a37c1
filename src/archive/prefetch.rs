//! Prefetching for `archive-get`: while recovery asks for segment N, a detached background `pitr`
//! fetches the next segments of the same timeline into a spool directory beside `%p`
//! (`pg_wal/pitr_spool`), each verified, written to a temp file, fsynced and renamed. When
//! recovery then asks for N+1, `archive-get` hands the spooled file over with a rename instead of
//! a download, so replay is not paced by one object-store round trip per segment.
//!
//! Bounds: at most `count` segments and 256 MiB ahead. One prefetcher runs at a time (an `flock` on
//! the spool's lock file). Entries for older segments or other timelines are removed on every call, so
//! a timeline switch never serves a stale file; `pitr restore` also sets a `recovery_end_command`
//! (`pitr archive-spool-clean`) that waits for a running prefetcher and removes the spool when recovery
//! ends. A request for a segment that the running prefetcher is still downloading waits for it (a few
//! seconds at most) instead of downloading it a second time.

use std::os::unix::fs::DirBuilderExt;
use std::os::unix::io::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};

use anyhow::Context;
use futures::StreamExt;

use crate::durable;
use crate::pg::{SegNo, SegmentName, WalFileName, WalSegSize};
use crate::storage::Repo;
use crate::storage::layout::ObjectKey;

/// The spool directory's name, inside the directory of `%p` (normally `pg_wal`).
pub const SPOOL_DIR: &str = "pitr_spool";
/// Most bytes prefetched ahead.
pub const MAX_AHEAD_BYTES: u64 = 256 << 20;

/// The spool directory for a destination path.
pub fn spool_dir(dest: &Path) -> PathBuf {
    match dest.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.join(SPOOL_DIR),
        _ => PathBuf::from(SPOOL_DIR),
    }
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
        let stale = match name.parse::<WalFileName>() {
            Ok(WalFileName::Segment(s)) => {
                s.tli != seg.tli || s.segno(seg_size).is_none_or(|n| n <= now)
            }
            _ => name.starts_with('.') && name != ".lock",
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

/// Wait (at most `patience`) for a running prefetcher to deliver `seg`, then take it.
pub fn wait_and_take(dest: &Path, seg: SegmentName, patience: std::time::Duration) -> bool {
    let deadline = std::time::Instant::now() + patience;
    while std::time::Instant::now() < deadline {
        if take(dest, seg) {
            return true;
        }
        if !busy(dest) {
            return take(dest, seg);
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    false
}

/// Remove the spool, after waiting (at most `patience`) for a running prefetcher to finish.
pub fn clean(spool: &Path, patience: std::time::Duration) {
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
    let spool = spool_dir(dest);
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&spool)
        .with_context(|| format!("create {}", spool.display()))?;
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

/// The prefetcher: fetch the `count` segments after `after` into `spool`.
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
    let start = after.segno(seg_size).context("segment number")?;
    let n = ahead(count, seg_size);
    let names: Vec<SegmentName> = (1..=n as u64)
        .filter_map(|i| SegmentName::new(after.tli, SegNo(start.0 + i), seg_size))
        .collect();
    let mut fetches = futures::stream::iter(names)
        .map(|seg| async move {
            let dest = spool.join(seg.to_string());
            if dest.exists() {
                return Ok::<bool, anyhow::Error>(true);
            }
            let key = ObjectKey::Wal(WalFileName::Segment(seg));
            let Some(data) = repo.get_big(&key, 1).await? else {
                return Ok(false);
            };
            if !spool.is_dir() {
                return Ok(false); // recovery ended and the spool was cleaned
            }
            let tmp = spool.join(format!(".{seg}.tmp"));
            durable::replace_atomically(&tmp, &data)?;
            std::fs::rename(&tmp, &dest)?;
            Ok(true)
        })
        .buffer_unordered(n.max(1));
    while let Some(r) = fetches.next().await {
        r?; // a segment not (yet) archived is simply not spooled
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pg::TimelineId;

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
            ".000000010000000000000007.tmp",
            ".lock",
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
        assert_eq!(left, [".lock", "000000010000000000000006"]);
        let seg6 = SegmentName::new(TimelineId::ONE, SegNo(6), sz).unwrap();
        assert!(take(&dest, seg6));
        assert_eq!(std::fs::read(&dest).unwrap(), b"x");
        assert!(!take(&dest, seg6));
        assert_eq!(ahead(8, sz), 8);
        assert_eq!(ahead(8, WalSegSize::new(1 << 30).unwrap()), 1);
    }
}
