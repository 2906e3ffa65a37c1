//! The backup manifest: a repository format that `backup` writes (last: a backup exists only once
//! its manifest does) and the catalog, the planner, restore, verify and expire read.
//!
//! Its values are typed as stored: timelines, segment names, LSNs and the system identifier parse
//! on read, so a manifest with a bad value is unreadable (a finding) rather than a silent default.

use serde::{Deserialize, Serialize};

use crate::compress::Compression;
use crate::format::{FormatError, Versioned};
use crate::pg::PgTimestamp;
use crate::pg::{Lsn, SegmentName, SystemId, TimelineId};

/// Manifest format written by this pitr (and the newest it reads).
pub const MANIFEST_FORMAT: u32 = 1;

/// Size of the pieces large files are stored in (bounds memory: jobs × one chunk).
pub const CHUNK_SIZE: u64 = 16 << 20;

/// One stored piece of a file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Part {
    /// Bytes of the original file in this piece.
    pub size: u64,
    /// CRC-32C of those bytes.
    pub crc32c: u32,
    /// Bytes stored (compressed, with header).
    pub stored: u64,
}

/// One copied file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    /// Path in the backup (relative to PGDATA; tablespaces under `pg_tblspc/<oid>/`).
    pub path: String,
    /// Bytes copied (the sum of the parts).
    pub size: u64,
    /// Modification time when listed (Unix seconds).
    pub mtime: i64,
    /// Permission bits.
    pub mode: u32,
    /// The pieces, in order (`CHUNK_SIZE` each but the last).
    pub parts: Vec<Part>,
    /// Relation blocks (counted from the relation's start) copied with a page checksum that does
    /// not match, though unchanged since the backup started: damage on the source.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub checksum_failures: Vec<u32>,
}

/// A tablespace found under `pg_tblspc/`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tablespace {
    /// Its OID (the symlink's name).
    pub oid: u32,
    /// Where the symlink pointed.
    pub location: String,
}

/// A completed base backup.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupManifest {
    /// Manifest format.
    pub format_version: u32,
    /// The pitr that wrote it.
    pub program_version: String,
    /// Key-safe identifier (`YYYYMMDDTHHMMSSZ`), the directory under `backups/`.
    pub id: String,
    /// The label given to `pg_backup_start`.
    pub label: String,
    /// The cluster's system identifier (stored as decimal text).
    pub system_identifier: SystemId,
    /// PostgreSQL major version.
    pub pg_version: u32,
    /// Timeline at the start.
    pub timeline: TimelineId,
    /// Redo LSN the recovery starts from (`START WAL LOCATION`).
    pub start_lsn: Lsn,
    /// Checkpoint LSN.
    pub checkpoint_lsn: Lsn,
    /// End of the `XLOG_BACKUP_END` record: recovery is consistent after it.
    pub stop_lsn: Lsn,
    /// When the backup started (server clock).
    pub start_time: PgTimestamp,
    /// When `pg_backup_stop` returned (server clock): the earliest time a restore can stop at.
    pub stop_time: PgTimestamp,
    /// Segment holding `start_lsn`.
    pub start_wal: SegmentName,
    /// Segment holding the end of `stop_lsn`.
    pub stop_wal: SegmentName,
    /// Compression of the data objects.
    pub compression: Compression,
    /// Files, in the order they were listed.
    pub files: Vec<FileEntry>,
    /// Directories to recreate.
    pub directories: Vec<String>,
    /// Tablespaces.
    #[serde(default)]
    pub tablespaces: Vec<Tablespace>,
    /// Whether `pg_backup_stop` returned a tablespace map (stored beside the label).
    pub has_tablespace_map: bool,
    /// Bytes of the data directory copied.
    pub size_bytes: u64,
    /// Bytes stored.
    pub stored_bytes: u64,
    /// Whether the cluster has data checksums, so every relation page copied was checked.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub data_checksums: bool,
}

impl Versioned for BackupManifest {
    const WHAT: &'static str = "backup manifest";
    const SUPPORTED: u32 = MANIFEST_FORMAT;
    fn version(&self) -> u32 {
        self.format_version
    }
}

impl BackupManifest {
    /// Parse a stored manifest, checking its format version.
    ///
    /// # Errors
    /// A newer format, or JSON that is not a valid manifest.
    pub fn from_json(bytes: &[u8]) -> Result<BackupManifest, FormatError> {
        crate::format::decode(bytes)
    }

    /// The files with pages that failed their checksum, and those pages.
    pub fn checksum_failures(&self) -> impl Iterator<Item = (&str, &[u32])> {
        self.files
            .iter()
            .filter(|f| !f.checksum_failures.is_empty())
            .map(|f| (f.path.as_str(), f.checksum_failures.as_slice()))
    }

    /// "base/5/16384 block 3, 7; global/1262 block 0", the first `n` files.
    pub fn describe_checksum_failures(&self, n: usize) -> String {
        let all: Vec<(&str, &[u32])> = self.checksum_failures().collect();
        let mut text: Vec<String> = all
            .iter()
            .take(n)
            .map(|(path, blocks)| {
                let list: Vec<String> = blocks.iter().take(8).map(u32::to_string).collect();
                let more = if blocks.len() > 8 { ", …" } else { "" };
                format!("{path} block {}{more}", list.join(", "))
            })
            .collect();
        if all.len() > n {
            text.push(format!("and {} more file(s)", all.len() - n));
        }
        text.join("; ")
    }
}
