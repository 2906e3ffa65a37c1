//! A new object in a local repository, written while it is still being produced.
//!
//! `archive-push` compresses a segment in pieces on several threads; with a local repository each
//! finished frame goes to a staging file beside the destination at once, and the disk starts
//! writing it back, so when the last frame is done only the tail and the commit remain. Publishing
//! is what a put with [`object_store::PutMode::Create`] does on a local file system: fsync the
//! staging file, hard-link it under the final name (which fails if the name is taken, so nothing
//! stored is ever replaced), fsync the directory, remove the staging name. The staging name is the
//! destination's with `#` and digits appended, which listings skip, as they skip `object_store`'s
//! own staging files.

use std::fs::File;
use std::io::{self, ErrorKind};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// A staging file for one new object.
#[derive(Debug)]
pub struct Staged {
    file: File,
    staging: PathBuf,
    dest: PathBuf,
    /// Set once the staging name is gone (published or removed).
    done: bool,
    /// Removed by `main` if the process is told to stop meanwhile.
    _registered: crate::cleanup::Registered,
}

/// What [`Staged::publish`] found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Published {
    /// The object is stored under its name, durably.
    Created,
    /// Something is already stored under the name; it was left alone.
    Exists,
}

impl Staged {
    /// Where it is published.
    pub fn dest(&self) -> &Path {
        &self.dest
    }

    /// A staging file beside `dest`, whose directory must exist (where it does not, the caller
    /// stores the object the ordinary way, which creates directories durably).
    ///
    /// # Errors
    /// The directory is missing or not writable.
    pub fn begin(dest: &Path) -> io::Result<Staged> {
        let mut n = u64::from(std::process::id()) * 1000;
        loop {
            let mut staging = dest.as_os_str().to_owned();
            staging.push(format!("#{n}"));
            let staging = PathBuf::from(staging);
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&staging)
            {
                Ok(file) => {
                    return Ok(Staged {
                        file,
                        _registered: crate::cleanup::register(staging.clone()),
                        staging,
                        dest: dest.to_path_buf(),
                        done: false,
                    });
                }
                Err(e) if e.kind() == ErrorKind::AlreadyExists => n += 1,
                Err(e) => return Err(e),
            }
        }
    }

    /// Write `bytes` at `offset` and start writing them back to disk (without waiting).
    ///
    /// # Errors
    /// The write failed (a full disk, say).
    pub fn write_at(&self, offset: u64, bytes: &[u8]) -> io::Result<()> {
        self.file.write_all_at(bytes, offset)?;
        crate::durable::start_writeback(&self.file, offset, bytes.len());
        Ok(())
    }

    /// Make the object durable under its name, unless the name is taken.
    ///
    /// # Errors
    /// An fsync, link or directory sync failed; nothing is then acknowledged.
    pub fn publish(mut self) -> io::Result<Published> {
        self.file.sync_all()?;
        let linked = std::fs::hard_link(&self.staging, &self.dest);
        let _ = std::fs::remove_file(&self.staging);
        self.done = true;
        match linked {
            Ok(()) => {
                if let Some(dir) = self.dest.parent() {
                    crate::durable::sync_dir(dir)?;
                }
                Ok(Published::Created)
            }
            Err(e) if e.kind() == ErrorKind::AlreadyExists => Ok(Published::Exists),
            Err(e) => Err(e),
        }
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        if !self.done {
            let _ = std::fs::remove_file(&self.staging);
        }
    }
}

/// Whether `name` is a staging file's: a name, `#`, digits (ours and `object_store`'s).
fn is_staging_name(name: &str) -> bool {
    name.rsplit_once('#').is_some_and(|(stem, n)| {
        !stem.is_empty() && !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit())
    })
}

/// Staging files under `root` last modified more than `age` ago: left by a process killed between
/// writing one and publishing it (a live push or put holds its staging file for well under a
/// second). Removing one can never lose an object: a publish whose staging file is gone fails, and
/// nothing is acknowledged.
///
/// # Errors
/// `root` cannot be read.
pub fn stale(root: &Path, age: std::time::Duration) -> io::Result<Vec<PathBuf>> {
    let mut found = Vec::new();
    let mut dirs = vec![root.to_path_buf()];
    let now = std::time::SystemTime::now();
    while let Some(dir) = dirs.pop() {
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if dir != root && e.kind() == ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        for entry in entries {
            let entry = entry?;
            let kind = entry.file_type()?;
            if kind.is_dir() {
                dirs.push(entry.path());
            } else if kind.is_file() && is_staging_name(&entry.file_name().to_string_lossy()) {
                let modified = entry.metadata()?.modified()?;
                if now.duration_since(modified).is_ok_and(|d| d > age) {
                    found.push(entry.path());
                }
            }
        }
    }
    found.sort();
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stale_staging_files_are_found_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let wal = dir.path().join("wal/00000001");
        std::fs::create_dir_all(&wal).unwrap();
        let old = std::time::SystemTime::now() - std::time::Duration::from_secs(7200);
        let mk = |name: &str, when: Option<std::time::SystemTime>| {
            let f = File::create(wal.join(name)).unwrap();
            if let Some(t) = when {
                f.set_modified(t).unwrap();
            }
        };
        mk("000000010000000000000003", Some(old));
        mk("000000010000000000000003#12345000", Some(old));
        mk("000000010000000000000004.partial#7", Some(old));
        mk("000000010000000000000005#12345001", None); // a push in progress
        mk("notes#draft", Some(old));
        mk("#123", Some(old));
        let found = stale(dir.path(), std::time::Duration::from_secs(3600)).unwrap();
        let names: Vec<_> = found
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            names,
            [
                "000000010000000000000003#12345000",
                "000000010000000000000004.partial#7"
            ]
        );
        // A repository root that does not exist is an error, not an empty answer.
        assert!(stale(&dir.path().join("missing"), std::time::Duration::ZERO).is_err());
    }

    #[test]
    fn published_once_never_replaced_and_never_left_behind() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("000000010000000000000003");
        let s = Staged::begin(&dest).unwrap();
        s.write_at(4, b"tail").unwrap();
        s.write_at(0, b"head").unwrap();
        // Not visible under its name before it is published.
        assert!(!dest.exists());
        assert_eq!(s.publish().unwrap(), Published::Created);
        assert_eq!(std::fs::read(&dest).unwrap(), b"headtail");
        // A second object under the same name is refused, the first untouched.
        let other = Staged::begin(&dest).unwrap();
        other.write_at(0, b"different").unwrap();
        assert_eq!(other.publish().unwrap(), Published::Exists);
        assert_eq!(std::fs::read(&dest).unwrap(), b"headtail");
        // An abandoned one leaves nothing.
        drop(Staged::begin(&dir.path().join("x")).unwrap());
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 1, "{names:?}");
        // Without its directory there is no staging file.
        assert!(Staged::begin(&dir.path().join("missing/x")).is_err());
    }
}
