//! Crash-safe local writes: temp file beside the destination, fsync, rename, fsync the directory.
//!
//! After `write_atomically` returns `Ok`, the destination holds the full content and survives a
//! crash; on any error the destination is untouched and the temp file removed.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

fn temp_path(dest: &Path) -> io::Result<PathBuf> {
    let name = dest.file_name().ok_or_else(|| {
        io::Error::new(io::ErrorKind::InvalidInput, "destination has no file name")
    })?;
    let mut tmp = std::ffi::OsString::from(".");
    tmp.push(name);
    tmp.push(format!(".pitr-tmp.{}", std::process::id()));
    Ok(dest.with_file_name(tmp))
}

/// Remove temp files beside `dest` that a killed process (one no longer running) left: with
/// SIGKILL nothing else would, and each can be a whole WAL segment in `pg_wal`. Returns how many.
pub fn remove_stale_temps(dest: &Path) -> usize {
    let Some(name) = dest.file_name().and_then(|n| n.to_str()) else {
        return 0;
    };
    let prefix = format!(".{name}.pitr-tmp.");
    let Ok(entries) = fs::read_dir(parent_dir(dest)) else {
        return 0;
    };
    let mut removed = 0;
    for e in entries.flatten() {
        let file = e.file_name();
        let Some(pid) = file
            .to_str()
            .and_then(|f| f.strip_prefix(&prefix))
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        let alive = pid == std::process::id() || Path::new(&format!("/proc/{pid}")).exists();
        if !alive && fs::remove_file(e.path()).is_ok() {
            removed += 1;
        }
    }
    removed
}

/// The directory holding `path` ("." for a bare file name).
pub fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// fsync a directory so a rename or create inside it is durable.
///
/// # Errors
/// The I/O error from opening or syncing it.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Write `data` to `dest` atomically and durably.
///
/// # Errors
/// The first I/O error; `dest` is then unchanged.
pub fn write_atomically(dest: &Path, data: &[u8]) -> io::Result<()> {
    write_via_temp(dest, data, true)
}

/// Write `data` to `dest` atomically (readers see the old file or the whole new one), without
/// waiting for the disk: for copies that can be fetched again after a crash.
///
/// # Errors
/// The first I/O error; `dest` is then unchanged.
pub fn replace_atomically(dest: &Path, data: &[u8]) -> io::Result<()> {
    write_via_temp(dest, data, false)
}

/// Fill a temp file beside `dest` with `fill`, then rename it over `dest` (atomic, not durable, like
/// [`replace_atomically`]). When `fill` fails, `dest` is untouched and the temp file removed.
///
/// # Errors
/// `fill`'s error, or the I/O error of creating or renaming the temp file.
pub fn replace_with<T, E: From<io::Error>>(
    dest: &Path,
    fill: impl FnOnce(&File) -> Result<T, E>,
) -> Result<T, E> {
    let tmp = temp_path(dest)?;
    let _registered = crate::cleanup::register(tmp.clone());
    let result = (|| {
        // Only the owner reads WAL and backup files, as PostgreSQL creates them.
        let f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        let out = fill(&f)?;
        drop(f);
        fs::rename(&tmp, dest)?;
        Ok(out)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

fn write_via_temp(dest: &Path, data: &[u8], durable: bool) -> io::Result<()> {
    if !durable {
        return replace_with(dest, |mut f| f.write_all(data));
    }
    let tmp = temp_path(dest)?;
    let _registered = crate::cleanup::register(tmp.clone());
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
        drop(f);
        fs::rename(&tmp, dest)?;
        sync_dir(parent_dir(dest))?;
        Ok(())
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Allocate `len` bytes of disk for a new file before it is written (best effort: a file system
/// without `fallocate` leaves the file as it is). Pieces and changed blocks then land in place in
/// any order, without the file system allocating and merging small extents as they come.
pub fn preallocate(f: &std::fs::File, len: u64) {
    use std::os::fd::AsRawFd;
    let Ok(n) = i64::try_from(len) else {
        return;
    };
    if n == 0 {
        return;
    }
    // SAFETY: a valid open descriptor and a range; a failure (EOPNOTSUPP, ENOSPC) is left to the
    // writes that follow, which report it with the file's name.
    unsafe {
        libc::fallocate(f.as_raw_fd(), 0, 0, n);
    }
}

/// Ask the kernel to start writing a just-written range to disk without waiting, so the fsync that
/// follows finds little left to do (the disk works while the next bytes are produced).
pub fn start_writeback(f: &std::fs::File, offset: u64, len: usize) {
    use std::os::fd::AsRawFd;
    let (Ok(off), Ok(n)) = (i64::try_from(offset), i64::try_from(len)) else {
        return;
    };
    // SAFETY: a valid open descriptor and a range; the call only schedules writeback (errors would
    // surface in the fsync that follows, so its result is not needed).
    unsafe {
        libc::sync_file_range(f.as_raw_fd(), off, n, libc::SYNC_FILE_RANGE_WRITE);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn written_files_are_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("RECOVERYXLOG");
        replace_with(&a, |mut f| f.write_all(b"wal")).unwrap();
        let b = dir.path().join("backup_label");
        write_atomically(&b, b"label").unwrap();
        for p in [a, b] {
            let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{}", p.display());
        }
    }

    #[test]
    fn temp_files_of_dead_processes_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("RECOVERYXLOG");
        // i32::MAX is beyond any pid_max: no such process.
        let dead = dir
            .path()
            .join(format!(".RECOVERYXLOG.pitr-tmp.{}", i32::MAX));
        let mine = dir
            .path()
            .join(format!(".RECOVERYXLOG.pitr-tmp.{}", std::process::id()));
        let other = dir.path().join(".other.pitr-tmp.1");
        for f in [&dead, &mine, &other] {
            std::fs::write(f, b"x").unwrap();
        }
        assert_eq!(remove_stale_temps(&dest), 1);
        assert!(!dead.exists() && mine.exists() && other.exists());
    }

    #[test]
    fn writes_and_replaces_without_leaving_temp_files() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("RECOVERYXLOG");
        write_atomically(&dest, b"first").unwrap();
        write_atomically(&dest, b"second").unwrap();
        assert_eq!(fs::read(&dest).unwrap(), b"second");
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("RECOVERYXLOG")]);
    }

    #[test]
    fn a_failed_fill_leaves_the_old_file_and_no_temp_file() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("RECOVERYXLOG");
        write_atomically(&dest, b"old").unwrap();
        let r: io::Result<()> = replace_with(&dest, |mut f| {
            f.write_all(b"half")?;
            Err(io::Error::other("corrupt"))
        });
        assert!(r.is_err());
        assert_eq!(fs::read(&dest).unwrap(), b"old");
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
        replace_with(&dest, |mut f| f.write_all(b"new")).unwrap();
        assert_eq!(fs::read(&dest).unwrap(), b"new");
    }

    #[test]
    fn failure_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("missing-dir").join("file");
        assert!(write_atomically(&dest, b"x").is_err());
        assert!(!dest.exists());
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}
