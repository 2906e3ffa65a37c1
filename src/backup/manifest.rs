//! The backup manifest: versioned JSON, stored last. A backup exists only once its manifest does.

use serde::{Deserialize, Serialize};

use super::walk::Tablespace;
use crate::compress::Compression;
use crate::pg::Lsn;
use crate::pg::xlogrecord::PgTimestamp;

/// Manifest format written by this pitr.
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
    /// The cluster's system identifier.
    pub system_identifier: String,
    /// PostgreSQL major version.
    pub pg_version: u32,
    /// Timeline at the start.
    pub timeline: u32,
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
    pub start_wal: String,
    /// Segment holding the end of `stop_lsn`.
    pub stop_wal: String,
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
}
