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

/// The newest manifest format this pitr reads: 2 adds incremental and differential backups (a
/// backup type, its parent, and files stored as changed blocks); 3 adds pieces stored in bundles.
pub const MANIFEST_FORMAT: u32 = 3;

/// The format of a backup with pieces in bundles, which an older pitr would look for as objects
/// of their own.
pub const MANIFEST_FORMAT_BUNDLED: u32 = 3;

/// The format of an incremental or differential backup without bundles.
pub const MANIFEST_FORMAT_INCREMENTAL: u32 = 2;

/// The format a full backup is written in: unchanged, so an older pitr still restores it. Only an
/// incremental or differential backup, which an older pitr would restore wrong, is written as 2.
pub const MANIFEST_FORMAT_FULL: u32 = 1;

/// What a backup holds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackupType {
    /// Every file.
    #[default]
    Full,
    /// The blocks changed since the newest backup of any type (its parent).
    Incr,
    /// The blocks changed since the newest full backup.
    Diff,
}

impl std::fmt::Display for BackupType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            BackupType::Full => "full",
            BackupType::Incr => "incr",
            BackupType::Diff => "diff",
        })
    }
}

impl BackupType {
    /// A full backup (written without a `type`, as format 1 was).
    pub fn is_full(&self) -> bool {
        *self == BackupType::Full
    }
}

impl std::str::FromStr for BackupType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "full" => Ok(BackupType::Full),
            "incr" | "incremental" => Ok(BackupType::Incr),
            "diff" | "differential" => Ok(BackupType::Diff),
            _ => Err(format!("backup type {s:?}: use full, incr or diff")),
        }
    }
}

/// What an incremental or differential backup builds on.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Parent {
    /// The parent backup's id.
    pub id: String,
    /// Its start LSN: every block changed from here to this backup's start is stored in this
    /// backup (the parent copied each block at some moment between its start and its stop).
    pub start_lsn: Lsn,
    /// Its timeline.
    pub timeline: TimelineId,
    /// The cluster's block size (bytes).
    pub block_size: u32,
    /// The cluster's relation segment size (`RELSEG_SIZE`, in blocks).
    pub segment_blocks: u32,
}

/// A file an incremental backup stores as its changed blocks.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChangedBlocks {
    /// The file's length in blocks once restored (`truncation_block_length`): blocks past it do
    /// not exist; blocks below it that no backup of the chain holds read as zeros.
    pub length: u32,
    /// The blocks stored, in order (numbered from the file's start), as hex gap runs
    /// (`"0+3,d,16+1"`: 0-3, 17, 40-41). The parts hold these blocks one after another.
    #[serde(with = "block_runs")]
    pub blocks: Vec<u32>,
}

mod block_runs {
    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(blocks: &[u32], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&crate::blocks::ranges(blocks))
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u32>, D::Error> {
        let text = String::deserialize(d)?;
        crate::blocks::parse_ranges(&text).map_err(serde::de::Error::custom)
    }
}

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
    /// Where the piece is stored when it is in a bundle (absent: an object of its own).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bundle: Option<InBundle>,
}

/// A piece's place in a bundle: its envelope is `stored` bytes from `offset`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InBundle {
    /// The bundle's number in its backup.
    pub id: u32,
    /// The envelope's first byte in the bundle object.
    pub offset: u64,
}

/// Where a piece's envelope is read from: an object, and the byte range of it (`None`: all).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PartAt {
    /// The object.
    pub key: crate::storage::layout::ObjectKey,
    /// The envelope's bytes in it, when it shares the object.
    pub range: Option<std::ops::Range<u64>>,
}

impl Part {
    /// Where piece `index` of file `path` of backup `id` is stored.
    pub fn at(&self, id: &str, path: &str, index: usize) -> PartAt {
        use crate::storage::layout::ObjectKey;
        match self.bundle {
            Some(b) => PartAt {
                key: ObjectKey::BackupBundle {
                    id: id.to_string(),
                    bundle: b.id,
                },
                range: Some(b.offset..b.offset.saturating_add(self.stored)),
            },
            None => PartAt {
                key: ObjectKey::BackupPart {
                    id: id.to_string(),
                    path: path.to_string(),
                    part: index as u32,
                },
                range: None,
            },
        }
    }
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
    /// In an incremental backup, a file stored as its changed blocks (absent: stored whole).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub changed: Option<ChangedBlocks>,
}

impl FileEntry {
    /// The file's size once restored: its length in blocks for a file stored as changed blocks.
    pub fn restored_size(&self, block_size: u64) -> u64 {
        self.changed
            .as_ref()
            .map_or(self.size, |c| u64::from(c.length) * block_size)
    }
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
    /// Files, in the order they were listed. Empty in a manifest read without its files (see
    /// [`BackupManifest::without_files_from_json`]): [`BackupManifest::tally`] says what they were.
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
    /// Full, incremental or differential (format 2; a format 1 manifest is a full backup).
    #[serde(rename = "type", default, skip_serializing_if = "BackupType::is_full")]
    pub backup_type: BackupType,
    /// The backup an incremental or differential one builds on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<Parent>,
    /// Why a full backup was taken where an incremental or differential one was asked for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fallback: Option<String>,
    /// What a manifest read without its files keeps of them (never stored).
    #[serde(skip)]
    pub tally: Option<FilesTally>,
}

/// What the catalog keeps of a backup's files: it holds every backup's manifest, and 100,000
/// files are some 25 MiB each; a command that needs the files reads that one manifest again.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FilesTally {
    /// Files.
    pub count: usize,
    /// Of them, stored as changed blocks.
    pub changed: usize,
    /// The files with pages that failed their checksum, and those pages.
    pub checksum_failures: Vec<(String, Vec<u32>)>,
}

impl FilesTally {
    /// Count a file: stored as changed blocks or not, and its pages that failed their checksum.
    fn note(&mut self, changed: bool, path: &str, failures: &[u32]) {
        self.count += 1;
        self.changed += usize::from(changed);
        if !failures.is_empty() {
            self.checksum_failures
                .push((path.to_string(), failures.to_vec()));
        }
    }
}

/// Reading a manifest's `files` an entry at a time: everything else is collected as JSON values
/// (a few hundred bytes), each file entry is handed to a function as it is parsed and dropped, and
/// the manifest is then read from the values with an empty `files`.
mod each {
    use serde::Deserialize;
    use serde::de::{DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
    use serde_json::{Map, Value};

    /// The manifest's fields but `files`, whose entries (read as `T`) go to the function.
    pub(super) struct Head<'a, T>(pub(super) &'a mut dyn FnMut(T));

    impl<'de, T: Deserialize<'de>> DeserializeSeed<'de> for Head<'_, T> {
        type Value = Map<String, Value>;
        fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
            d.deserialize_map(self)
        }
    }

    impl<'de, T: Deserialize<'de>> Visitor<'de> for Head<'_, T> {
        type Value = Map<String, Value>;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a backup manifest")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let mut out = Map::new();
            while let Some(key) = map.next_key::<String>()? {
                if key == "files" {
                    map.next_value_seed(Entries(&mut *self.0))?;
                    out.insert(key, Value::Array(Vec::new()));
                } else {
                    let value: Value = map.next_value()?;
                    out.insert(key, value);
                }
            }
            Ok(out)
        }
    }

    struct Entries<'a, T>(&'a mut dyn FnMut(T));

    impl<'de, T: Deserialize<'de>> DeserializeSeed<'de> for Entries<'_, T> {
        type Value = ();
        fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
            d.deserialize_seq(self)
        }
    }

    impl<'de, T: Deserialize<'de>> Visitor<'de> for Entries<'_, T> {
        type Value = ();
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a list of files")
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
            while let Some(entry) = seq.next_element::<T>()? {
                (self.0)(entry);
            }
            Ok(())
        }
    }
}

impl Versioned for BackupManifest {
    const WHAT: &'static str = "backup manifest";
    const SUPPORTED: u32 = MANIFEST_FORMAT;
    fn version(&self) -> u32 {
        self.format_version
    }
}

impl BackupManifest {
    /// The cluster's block size as an incremental backup records it (8192 for a full one, which
    /// never needs it).
    pub fn block_size(&self) -> u64 {
        self.parent
            .as_ref()
            .map_or(8192, |p| u64::from(p.block_size))
    }

    /// Files stored as changed blocks, and files stored whole.
    pub fn file_methods(&self) -> (usize, usize) {
        if let Some(t) = &self.tally {
            return (t.changed, t.count - t.changed);
        }
        let blocks = self.files.iter().filter(|f| f.changed.is_some()).count();
        (blocks, self.files.len() - blocks)
    }

    /// How many files the backup holds.
    pub fn file_count(&self) -> usize {
        self.tally.as_ref().map_or(self.files.len(), |t| t.count)
    }

    /// Whether this is a manifest read without its files ([`BackupManifest::tally`] has them).
    pub fn files_left_out(&self) -> bool {
        self.tally.is_some()
    }

    /// Parse a stored manifest, checking its format version.
    ///
    /// # Errors
    /// A newer format, or JSON that is not a valid manifest.
    pub fn from_json(bytes: &[u8]) -> Result<BackupManifest, FormatError> {
        let mut m: BackupManifest = crate::format::decode(bytes)?;
        // Read as a list that doubled as it grew: up to half of it would be unused.
        m.files.shrink_to_fit();
        Ok(m)
    }

    /// [`BackupManifest::from_json`] from a reader, or (`without_files`)
    /// [`BackupManifest::without_files_from_json`].
    ///
    /// # Errors
    /// As [`crate::format::decode_reader`].
    pub fn from_reader(
        read: &mut dyn std::io::Read,
        without_files: bool,
    ) -> Result<BackupManifest, FormatError> {
        if !without_files {
            let mut m: BackupManifest = crate::format::decode_reader(read)?;
            m.files.shrink_to_fit();
            return Ok(m);
        }
        BackupManifest::tallied(&mut serde_json::Deserializer::from_reader(read))
    }

    /// Parse a stored manifest without holding its files: each is read and counted into
    /// [`BackupManifest::tally`], and `files` stays empty. What the catalog keeps.
    ///
    /// # Errors
    /// As [`BackupManifest::from_json`].
    pub fn without_files_from_json(bytes: &[u8]) -> Result<BackupManifest, FormatError> {
        BackupManifest::tallied(&mut serde_json::Deserializer::from_slice(bytes))
    }

    /// A manifest without its files, read from `de`, each file only counted (its pieces and
    /// blocks are skipped, not parsed).
    fn tallied<'de, R: serde_json::de::Read<'de>>(
        de: &mut serde_json::Deserializer<R>,
    ) -> Result<BackupManifest, FormatError> {
        /// What a tally needs of a file entry.
        #[derive(serde::Deserialize)]
        struct Counted {
            path: String,
            #[serde(default)]
            changed: Option<serde::de::IgnoredAny>,
            #[serde(default)]
            checksum_failures: Vec<u32>,
        }
        let mut tally = FilesTally::default();
        let mut m = BackupManifest::head_from(
            de,
            each::Head(&mut |f: Counted| {
                tally.note(f.changed.is_some(), &f.path, &f.checksum_failures);
            }),
        )?;
        m.tally = Some(tally);
        Ok(m)
    }

    /// Read a manifest from `read`, handing each file to `each` as it is parsed instead of
    /// keeping it: the manifest comes back without its files, with their [`FilesTally`].
    ///
    /// # Errors
    /// As [`crate::format::decode_reader`].
    pub fn each_file_from_reader(
        read: &mut dyn std::io::Read,
        each: &mut dyn FnMut(FileEntry),
    ) -> Result<BackupManifest, FormatError> {
        BackupManifest::each_file(&mut serde_json::Deserializer::from_reader(read), each)
    }

    fn each_file<'de, R: serde_json::de::Read<'de>>(
        de: &mut serde_json::Deserializer<R>,
        each: &mut dyn FnMut(FileEntry),
    ) -> Result<BackupManifest, FormatError> {
        let mut tally = FilesTally::default();
        let mut m = BackupManifest::head_from(
            de,
            each::Head(&mut |f: FileEntry| {
                tally.note(f.changed.is_some(), &f.path, &f.checksum_failures);
                each(f);
            }),
        )?;
        m.tally = Some(tally);
        Ok(m)
    }

    /// The manifest read from `de` through `head` (its files go to `head`'s function).
    fn head_from<'de, R: serde_json::de::Read<'de>, T: serde::Deserialize<'de>>(
        de: &mut serde_json::Deserializer<R>,
        head: each::Head<'_, T>,
    ) -> Result<BackupManifest, FormatError> {
        use serde::de::DeserializeSeed;
        let invalid = |e: serde_json::Error| FormatError::Invalid {
            what: <BackupManifest as Versioned>::WHAT,
            detail: e.to_string(),
        };
        let head = head.deserialize(&mut *de).map_err(invalid)?;
        de.end().map_err(invalid)?;
        // A newer format is refused by its version before its fields are judged.
        let found = head
            .get("format_version")
            .and_then(serde_json::Value::as_u64);
        if let Some(v) = found.filter(|&v| v > u64::from(MANIFEST_FORMAT)) {
            return Err(FormatError::Newer {
                what: <BackupManifest as Versioned>::WHAT,
                found: u32::try_from(v).unwrap_or(u32::MAX),
                supported: MANIFEST_FORMAT,
            });
        }
        serde_json::from_value(serde_json::Value::Object(head)).map_err(invalid)
    }

    /// The files with pages that failed their checksum, and those pages.
    pub fn checksum_failures(&self) -> impl Iterator<Item = (&str, &[u32])> {
        let tallied = self
            .tally
            .iter()
            .flat_map(|t| &t.checksum_failures)
            .map(|(p, b)| (p.as_str(), b.as_slice()));
        let listed = self
            .files
            .iter()
            .filter(|f| !f.checksum_failures.is_empty())
            .map(|f| (f.path.as_str(), f.checksum_failures.as_slice()));
        tallied.chain(listed)
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
