//! Which files of a data directory a base backup copies.
//!
//! The exclusion rules of PostgreSQL's own base backup (`sendDir()` and the `excludeDirContents` /
//! `excludeFiles` tables in `src/backend/backup/basebackup.c`, PostgreSQL 15+; the same in 13/14):
//! contents of `pg_wal`, `pg_replslot`, `pg_stat_tmp`, `pg_dynshmem`, `pg_notify`, `pg_serial`,
//! `pg_snapshots`, `pg_subtrans` dropped (the directories kept, empty); `postmaster.pid`,
//! `postmaster.opts`, `backup_label`, `tablespace_map`, `backup_manifest`, `pg_internal.init*`,
//! `*.tmp` leftovers, `pgsql_tmp*`, temporary relations (`t<backend>_<relfilenode>`) and every fork
//! of an unlogged relation but its `_init` fork skipped. Tablespaces are followed through the
//! `pg_tblspc/<oid>` symlinks; other symlinks and special files are skipped. `global/pg_control` is
//! returned separately, to be copied last.

use std::collections::HashSet;
use std::fs;
use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

pub use crate::manifest::Tablespace;

/// Directories whose contents are not copied.
pub const EXCLUDE_DIR_CONTENTS: &[&str] = &[
    "pg_wal",
    "pg_stat_tmp",
    "pg_replslot",
    "pg_dynshmem",
    "pg_notify",
    "pg_serial",
    "pg_snapshots",
    "pg_subtrans",
];

/// Files never copied, wherever they are.
pub const EXCLUDE_FILES: &[&str] = &[
    "postgresql.auto.conf.tmp",
    "current_logfiles.tmp",
    "backup_label",
    "tablespace_map",
    "backup_manifest",
    "postmaster.pid",
    "postmaster.opts",
];

/// A file to copy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SourceFile {
    /// Its path in the backup (relative to PGDATA; tablespaces under `pg_tblspc/<oid>/`).
    pub rel: String,
    /// Size when listed.
    pub size: u64,
    /// Modification time (Unix seconds).
    pub mtime: i64,
    /// Permission bits.
    pub mode: u32,
}

/// What to copy.
#[derive(Debug, Default)]
pub struct Listing {
    /// Regular files, `global/pg_control` excluded.
    pub files: Vec<SourceFile>,
    /// `global/pg_control`, copied last.
    pub pg_control: Option<SourceFile>,
    /// Directories to recreate (relative), parents before children.
    pub directories: Vec<String>,
    /// Tablespaces.
    pub tablespaces: Vec<Tablespace>,
}

fn is_temp_rel(name: &str) -> bool {
    // t<digits>_<digits>[_fork][.segment]
    let Some(rest) = name.strip_prefix('t') else {
        return false;
    };
    let Some((backend, rel)) = rest.split_once('_') else {
        return false;
    };
    !backend.is_empty()
        && backend.bytes().all(|b| b.is_ascii_digit())
        && rel.bytes().next().is_some_and(|b| b.is_ascii_digit())
}

fn excluded_file(name: &str) -> bool {
    EXCLUDE_FILES.contains(&name)
        || name.starts_with("pg_internal.init")
        || name.starts_with("pgsql_tmp")
        || name == ".DS_Store"
        || is_temp_rel(name)
}

/// The relfilenode a relation file name belongs to (`16384`, `16384_fsm`, `16384.1` → `16384`).
fn relfilenode(name: &str) -> Option<&str> {
    let end = name
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(name.len());
    (end > 0).then(|| &name[..end])
}

/// List the data directory `pgdata`.
///
/// # Errors
/// A directory that cannot be read (a file vanishing while listed is skipped, as PostgreSQL does).
pub fn list(pgdata: &Path) -> io::Result<Listing> {
    let mut l = Listing::default();
    walk_dir(pgdata, "", true, &mut l)?;
    let tblspc = pgdata.join("pg_tblspc");
    if let Ok(entries) = fs::read_dir(&tblspc) {
        for e in entries {
            let e = e?;
            let name = e.file_name().to_string_lossy().into_owned();
            let Ok(oid) = name.parse::<u32>() else {
                continue;
            };
            let link = e.path();
            let Ok(target) = fs::read_link(&link) else {
                continue;
            };
            let target = if target.is_absolute() {
                target
            } else {
                tblspc.join(target)
            };
            l.tablespaces.push(Tablespace {
                oid,
                location: target.to_string_lossy().into_owned(),
            });
            let rel = format!("pg_tblspc/{oid}");
            l.directories.push(rel.clone());
            walk_dir(&target, &rel, false, &mut l)?;
        }
    }
    l.tablespaces.sort_by_key(|t| t.oid);
    Ok(l)
}

fn walk_dir(dir: &Path, rel: &str, top: bool, l: &mut Listing) -> io::Result<()> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound && !top => return Ok(()),
        Err(e) => {
            return Err(io::Error::new(
                e.kind(),
                format!("read directory {}: {e}", dir.display()),
            ));
        }
    };
    let mut names: Vec<(String, fs::DirEntry)> = entries
        .filter_map(|e| e.ok())
        .map(|e| (e.file_name().to_string_lossy().into_owned(), e))
        .collect();
    names.sort_by(|a, b| a.0.cmp(&b.0));
    // Unlogged relations: every relfilenode with an `_init` fork keeps only that fork.
    let unlogged: HashSet<String> = names
        .iter()
        .filter_map(|(n, _)| {
            n.strip_suffix("_init")
                .filter(|r| r.bytes().all(|b| b.is_ascii_digit()))
                .map(str::to_string)
        })
        .collect();
    for (name, entry) in names {
        let child_rel = if rel.is_empty() {
            name.clone()
        } else {
            format!("{rel}/{name}")
        };
        let meta = match fs::symlink_metadata(entry.path()) {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue, // vanished
            Err(e) => return Err(e),
        };
        let ft = meta.file_type();
        if top && name == "pg_tblspc" {
            l.directories.push(child_rel);
            continue; // tablespaces are walked through their links by `list`
        }
        if top && EXCLUDE_DIR_CONTENTS.contains(&name.as_str()) {
            // Kept as an empty directory (even when pg_wal is a symlink elsewhere).
            l.directories.push(child_rel.clone());
            if name == "pg_wal" {
                l.directories.push(format!("{child_rel}/archive_status"));
            }
            continue;
        }
        if ft.is_dir() {
            if name.starts_with("pgsql_tmp") {
                continue;
            }
            l.directories.push(child_rel.clone());
            walk_dir(&entry.path(), &child_rel, false, l)?;
        } else if ft.is_file() {
            if excluded_file(&name) {
                continue;
            }
            if let Some(node) = relfilenode(&name)
                && unlogged.contains(node)
                && !name.ends_with("_init")
            {
                continue;
            }
            let f = SourceFile {
                rel: child_rel.clone(),
                size: meta.len(),
                mtime: meta.mtime(),
                mode: meta.permissions().mode() & 0o7777,
            };
            if child_rel == "global/pg_control" {
                l.pg_control = Some(f);
            } else {
                l.files.push(f);
            }
        }
        // Other symlinks and special files are skipped, as PostgreSQL's base backup does.
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn applies_postgres_exclusions() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path();
        let mk = |rel: &str| {
            let f = p.join(rel);
            fs::create_dir_all(f.parent().unwrap()).unwrap();
            fs::write(f, b"x").unwrap();
        };
        for f in [
            "PG_VERSION",
            "postgresql.conf",
            "postmaster.pid",
            "postmaster.opts",
            "backup_label",
            "global/pg_control",
            "global/1262",
            "global/pg_internal.init",
            "base/5/16384",
            "base/5/16384_fsm",
            "base/5/16384.1",
            "base/5/16390",      // unlogged: main fork dropped
            "base/5/16390_init", // ... its init fork kept
            "base/5/16390_fsm",
            "base/5/t3_16400", // temp relation
            "base/5/pgsql_tmp/pgsql_tmp123.0",
            "pg_wal/000000010000000000000001",
            "pg_wal/archive_status/000000010000000000000001.done",
            "pg_replslot/slot/state",
            "pg_stat_tmp/db_0.stat",
            "pg_subtrans/0000",
            "pg_xact/0000",
        ] {
            mk(f);
        }
        let outside = tempfile::tempdir().unwrap();
        fs::create_dir_all(outside.path().join("PG_15_202209061/5")).unwrap();
        fs::write(outside.path().join("PG_15_202209061/5/17000"), b"ts").unwrap();
        fs::create_dir_all(p.join("pg_tblspc")).unwrap();
        std::os::unix::fs::symlink(outside.path(), p.join("pg_tblspc/16500")).unwrap();
        std::os::unix::fs::symlink("/etc", p.join("stray_link")).unwrap();

        let l = list(p).unwrap();
        let files: Vec<&str> = l.files.iter().map(|f| f.rel.as_str()).collect();
        let mut sorted = files.clone();
        sorted.sort();
        assert_eq!(
            sorted,
            [
                "PG_VERSION",
                "base/5/16384",
                "base/5/16384.1",
                "base/5/16384_fsm",
                "base/5/16390_init",
                "global/1262",
                "pg_tblspc/16500/PG_15_202209061/5/17000",
                "pg_xact/0000",
                "postgresql.conf",
            ]
        );
        assert_eq!(l.pg_control.unwrap().rel, "global/pg_control");
        for dir in [
            "pg_wal",
            "pg_wal/archive_status",
            "pg_replslot",
            "pg_stat_tmp",
            "pg_subtrans",
            "pg_tblspc",
            "pg_tblspc/16500",
            "base/5",
        ] {
            assert!(
                l.directories.iter().any(|d| d == dir),
                "{dir} missing from {:?}",
                l.directories
            );
        }
        assert!(
            !l.directories
                .iter()
                .any(|d| d.starts_with("pg_wal/0") || d.contains("pgsql_tmp"))
        );
        assert_eq!(
            l.tablespaces,
            vec![Tablespace {
                oid: 16500,
                location: outside.path().to_string_lossy().into_owned()
            }]
        );
    }
}
