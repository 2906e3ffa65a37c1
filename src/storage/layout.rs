//! Every object key in a repository comes from here.
//!
//! ```text
//! pitr.json                                  repository identity (cluster, version, segment size)
//! wal/<TTTTTTTT>/<segment>.pitr              WAL segments (each carrying its WAL index summary
//!                                            after the payload, see `envelope::attach`),
//!                                            `.partial` and `.backup` files
//! wal/<TTTTTTTT>/<segment>.idx               a summary stored beside its segment (earlier
//!                                            versions; one too long to carry); preferred when there
//! wal/<TTTTTTTT>/<segment>.streamed/<offset>.pitr
//!                                            what `pitr receive` stored of the segment in progress,
//!                                            a chunk per flush (deleted once the segment is stored)
//! wal/history/<TTTTTTTT>.history.pitr        timeline history files
//! index/<TTTTTTTT>/<first>-<last>.roll.pitr  a roll-up of 256 segments' summaries (see `rollup`;
//!                                            derived, written once, ignored when stale)
//! backups/<id>/started.pitr                 claims the id, with a conditional create, before anything else
//! backups/<id>/data/<path>.<part>.pitr        base backup files, in pieces of at most 16 MiB
//! backups/<id>/bundle/<n>.pitr               small pieces stored together (manifest format 3): an
//!                                            uncompressed envelope whose payload is their envelopes,
//!                                            one after another, each read back by a range read
//! backups/<id>/backup_label.pitr             byte-exact from pg_backup_stop
//! backups/<id>/tablespace_map.pitr            byte-exact from pg_backup_stop (when there are tablespaces)
//! backups/<id>/manifest.pitr                 written LAST: a backup exists only once this does
//! status/verify.json                         the last `pitr verify` result (derived, replaced)
//! status/receive.json                        where `pitr receive` stands (replaced as it goes)
//! keys/<id>.json                             an encrypted repository's keys, each wrapped by the
//!                                            operator's secret (in the clear: see `keys`)
//! keys/active.json                           a copy of the entry of the key new objects use
//! ```
//! Every object, summaries and `pitr.json` included, is wrapped in the checksummed envelope.
//! WAL objects keep PostgreSQL's file names so a person can find a segment by eye; `.pitr` marks
//! pitr's envelope (checksums and compression, see `envelope`).

use object_store::path::Path;

use crate::pg::{SegmentName, TimelineId, WalFileName};

/// Something stored in a repository.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ObjectKey {
    /// The repository identity.
    Identity,
    /// A file PostgreSQL archived.
    Wal(WalFileName),
    /// The index summary of a segment.
    Summary(SegmentName),
    /// The bytes from `offset` of a segment `pitr receive` stored while receiving it, one object per
    /// flush (the chunks of a segment together are what was received of it), deleted once the
    /// whole segment is stored (never a `.partial` PostgreSQL archives: those are `Wal`).
    Streamed {
        /// The segment.
        seg: SegmentName,
        /// Where in it the bytes start.
        offset: u32,
    },
    /// A base backup's manifest.
    BackupManifest(String),
    /// The object that claims a backup id (a conditional create: two backups started in the same
    /// second cannot both get it).
    BackupClaim(String),
    /// A base backup's `backup_label`.
    BackupLabel(String),
    /// A base backup's `tablespace_map`.
    TablespaceMap(String),
    /// Piece `part` of file `path` of backup `id`.
    BackupPart {
        /// Backup id.
        id: String,
        /// File path relative to the data directory.
        path: String,
        /// Piece number, from 0.
        part: u32,
    },
    /// Bundle `bundle` of backup `id`: small pieces stored together.
    BackupBundle {
        /// Backup id.
        id: String,
        /// Bundle number, from 0.
        bundle: u32,
    },
    /// The last `pitr verify` result, for `pitr metrics` (derived: replaced by each run).
    VerifyStatus,
    /// Where `pitr receive` stands, for `pitr metrics` and `info` (replaced as it goes).
    ReceiveStatus,
    /// An encrypted repository's key `id` (hex), wrapped by the operator's secret.
    RepoKey(String),
    /// A copy of the entry of the key new objects are encrypted with.
    ActiveKey,
    /// The roll-up of the summaries of segments `first..=last` of one timeline (derived).
    Rollup {
        /// Its first segment.
        first: SegmentName,
        /// Its last segment (same timeline).
        last: SegmentName,
    },
}

/// A part of the repository to list: every listing names one of these, never a raw prefix.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Prefix {
    /// The whole repository.
    Everything,
    /// Every WAL-related object (segments, summaries, history files).
    Wal,
    /// The WAL objects of one timeline.
    WalTimeline(TimelineId),
    /// Timeline history files.
    WalHistory,
    /// Every roll-up of the WAL index.
    Index,
    /// Every backup.
    Backups,
    /// Everything of one backup.
    Backup(String),
    /// The chunks `pitr receive` stored of one segment in progress.
    Streamed(SegmentName),
}

impl Prefix {
    /// The prefix relative to the repository root (`""` for everything).
    pub fn key(&self) -> String {
        match self {
            Prefix::Everything => String::new(),
            Prefix::Wal => WAL_PREFIX.to_string(),
            Prefix::WalTimeline(tli) => format!("{WAL_PREFIX}/{}", tli_dir(*tli)),
            Prefix::WalHistory => format!("{WAL_PREFIX}/history"),
            Prefix::Index => INDEX_PREFIX.to_string(),
            Prefix::Backups => BACKUP_PREFIX.to_string(),
            Prefix::Backup(id) => format!("{BACKUP_PREFIX}/{id}"),
            Prefix::Streamed(seg) => {
                format!("{WAL_PREFIX}/{}/{seg}{STREAMED_DIR}", tli_dir(seg.tli))
            }
        }
    }

    /// `None` for the whole repository, else the object-store path.
    pub fn path(&self) -> Option<Path> {
        match self {
            Prefix::Everything => None,
            other => Some(Path::from(other.key())),
        }
    }
}

/// Prefix of every backup key.
pub const BACKUP_PREFIX: &str = "backups";

/// What a key under `wal/` names, as found by a listing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Listed {
    /// An archived WAL file.
    Wal(WalFileName),
    /// A segment's summary.
    Summary(SegmentName),
    /// The received part of a segment in progress.
    Streamed(SegmentName),
}

impl Listed {
    /// The segment it belongs to (`None` for a history file).
    pub fn segment(&self) -> Option<SegmentName> {
        match self {
            Listed::Wal(w) => w.segment(),
            Listed::Summary(s) | Listed::Streamed(s) => Some(*s),
        }
    }
}

/// A WAL object a listing found, with its size (a segment's summary is read from the end of its
/// object: see `storage::envelope::attach`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Found {
    /// What it is.
    pub what: Listed,
    /// Its size in the store.
    pub size: u64,
}

/// Prefix of the keyring.
pub const KEYS_PREFIX: &str = "keys";

/// Prefix of every WAL-related key.
pub const WAL_PREFIX: &str = "wal";

/// Prefix of the WAL index's roll-ups.
pub const INDEX_PREFIX: &str = "index";

/// Suffix of a roll-up (before the envelope's).
const ROLLUP_SUFFIX: &str = ".roll";

/// Parse a roll-up key: `index/<TLI>/<first>-<last>.roll.pitr`, both segments of the directory's
/// timeline, `first <= last`.
fn parse_rollup_key(key: &str) -> Option<ObjectKey> {
    let rest = key.strip_prefix(INDEX_PREFIX)?.strip_prefix('/')?;
    let (dir, file) = rest.split_once('/')?;
    let range = file.strip_suffix(SUFFIX)?.strip_suffix(ROLLUP_SUFFIX)?;
    let (a, b) = range.split_once('-')?;
    let (WalFileName::Segment(first), WalFileName::Segment(last)) =
        (a.parse().ok()?, b.parse().ok()?)
    else {
        return None;
    };
    (first.tli == last.tli && dir == tli_dir(first.tli) && a <= b)
        .then_some(ObjectKey::Rollup { first, last })
}

/// Parse a key found under `wal/`; `None` for anything pitr did not write.
pub fn parse_wal_key(key: &str) -> Option<Listed> {
    let rest = key.strip_prefix("wal/")?;
    let (dir, file) = rest.split_once('/')?;
    if let Some((seg, chunk)) = file.split_once('/') {
        let seg = seg.strip_suffix(STREAMED_DIR)?;
        streamed_offset(chunk)?;
        return match seg.parse().ok()? {
            WalFileName::Segment(s) if dir == tli_dir(s.tli) => Some(Listed::Streamed(s)),
            _ => None,
        };
    }
    if let Some(name) = file.strip_suffix(SUFFIX) {
        let name: WalFileName = name.parse().ok()?;
        let expected_dir = match name {
            WalFileName::History(_) => "history".to_string(),
            other => tli_dir(other.timeline()),
        };
        return (dir == expected_dir).then_some(Listed::Wal(name));
    }
    if let Some(seg) = file.strip_suffix(".idx") {
        return match seg.parse().ok()? {
            WalFileName::Segment(s) if dir == tli_dir(s.tli) => Some(Listed::Summary(s)),
            _ => None,
        };
    }
    None
}

/// The timeline a directory under `wal/` holds (`None` for `history` and anything else).
pub fn timeline_dir(name: &str) -> Option<TimelineId> {
    if name.len() != 8 || !name.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    u32::from_str_radix(name, 16).ok().and_then(TimelineId::new)
}

fn tli_dir(tli: TimelineId) -> String {
    format!("{:08X}", tli.get())
}

/// Suffix of every enveloped object.
pub const SUFFIX: &str = ".pitr";

/// Suffix of the directory of a segment's received chunks.
const STREAMED_DIR: &str = ".streamed";

/// The offset a received chunk's file name (`00A00000.pitr`) states.
fn streamed_offset(chunk: &str) -> Option<u32> {
    let hex = chunk.strip_suffix(SUFFIX)?;
    if hex.len() != 8 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    u32::from_str_radix(hex, 16).ok()
}

/// Key of the verify status (kept as it was first written, `.json` without the envelope suffix).
const VERIFY_STATUS: &str = "status/verify.json";

/// Key of the receive status.
const RECEIVE_STATUS: &str = "status/receive.json";

impl ObjectKey {
    /// The key relative to the repository prefix.
    pub fn key(&self) -> String {
        match self {
            ObjectKey::Identity => "pitr.json".to_string(),
            ObjectKey::Wal(name @ WalFileName::History(_)) => format!("wal/history/{name}{SUFFIX}"),
            ObjectKey::Wal(name) => format!("wal/{}/{name}{SUFFIX}", tli_dir(name.timeline())),
            ObjectKey::Summary(seg) => format!("wal/{}/{seg}.idx", tli_dir(seg.tli)),
            ObjectKey::Streamed { seg, offset } => format!(
                "wal/{}/{seg}{STREAMED_DIR}/{offset:08X}{SUFFIX}",
                tli_dir(seg.tli)
            ),
            ObjectKey::BackupManifest(id) => format!("{BACKUP_PREFIX}/{id}/manifest{SUFFIX}"),
            ObjectKey::BackupClaim(id) => format!("{BACKUP_PREFIX}/{id}/started{SUFFIX}"),
            ObjectKey::BackupLabel(id) => format!("{BACKUP_PREFIX}/{id}/backup_label{SUFFIX}"),
            ObjectKey::TablespaceMap(id) => format!("{BACKUP_PREFIX}/{id}/tablespace_map{SUFFIX}"),
            ObjectKey::BackupBundle { id, bundle } => {
                format!("{BACKUP_PREFIX}/{id}/bundle/{bundle}{SUFFIX}")
            }
            ObjectKey::BackupPart { id, path, part } => {
                format!("{BACKUP_PREFIX}/{id}/data/{path}.{part}{SUFFIX}")
            }
            ObjectKey::VerifyStatus => VERIFY_STATUS.to_string(),
            ObjectKey::ReceiveStatus => RECEIVE_STATUS.to_string(),
            ObjectKey::RepoKey(id) => format!("{KEYS_PREFIX}/{id}.json"),
            ObjectKey::ActiveKey => format!("{KEYS_PREFIX}/active.json"),
            ObjectKey::Rollup { first, last } => format!(
                "{INDEX_PREFIX}/{}/{first}-{last}{ROLLUP_SUFFIX}{SUFFIX}",
                tli_dir(first.tli)
            ),
        }
    }

    /// The object a key found by a listing names: the inverse of [`ObjectKey::key`]; `None` for
    /// anything pitr did not write.
    pub fn parse(key: &str) -> Option<ObjectKey> {
        match key {
            "pitr.json" => return Some(ObjectKey::Identity),
            VERIFY_STATUS => return Some(ObjectKey::VerifyStatus),
            RECEIVE_STATUS => return Some(ObjectKey::ReceiveStatus),
            _ => {}
        }
        if key.starts_with(INDEX_PREFIX) {
            return parse_rollup_key(key);
        }
        if let Some(name) = key
            .strip_prefix(KEYS_PREFIX)
            .and_then(|k| k.strip_prefix('/'))
            .and_then(|k| k.strip_suffix(".json"))
        {
            return match name {
                "active" => Some(ObjectKey::ActiveKey),
                id if id.len() == 16 && id.bytes().all(|b| b.is_ascii_hexdigit()) => {
                    Some(ObjectKey::RepoKey(id.to_string()))
                }
                _ => None,
            };
        }
        if let Some(listed) = parse_wal_key(key) {
            return Some(match listed {
                Listed::Wal(name) => ObjectKey::Wal(name),
                Listed::Summary(seg) => ObjectKey::Summary(seg),
                Listed::Streamed(seg) => ObjectKey::Streamed {
                    seg,
                    offset: streamed_offset(key.rsplit('/').next()?)?,
                },
            });
        }
        let rest = key.strip_prefix(BACKUP_PREFIX)?.strip_prefix('/')?;
        let (id, file) = rest.split_once('/')?;
        if id.is_empty() {
            return None;
        }
        let id = id.to_string();
        if let Some(data) = file.strip_prefix("data/") {
            let (path, part) = data.strip_suffix(SUFFIX)?.rsplit_once('.')?;
            if path.is_empty() || part.is_empty() || !part.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            return Some(ObjectKey::BackupPart {
                id,
                path: path.to_string(),
                part: part.parse().ok()?,
            });
        }
        if let Some(n) = file.strip_prefix("bundle/") {
            let n = n.strip_suffix(SUFFIX)?;
            if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            return Some(ObjectKey::BackupBundle {
                id,
                bundle: n.parse().ok()?,
            });
        }
        Some(match file.strip_suffix(SUFFIX)? {
            "manifest" => ObjectKey::BackupManifest(id),
            "started" => ObjectKey::BackupClaim(id),
            "backup_label" => ObjectKey::BackupLabel(id),
            "tablespace_map" => ObjectKey::TablespaceMap(id),
            _ => return None,
        })
    }

    /// The key as an object-store path.
    pub fn path(&self) -> Path {
        Path::from(self.key())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn received_chunks_have_keys_of_their_own() {
        let seg: SegmentName = match "000000020000000000000003".parse().unwrap() {
            WalFileName::Segment(s) => s,
            other => panic!("{other:?}"),
        };
        let chunk = ObjectKey::Streamed {
            seg,
            offset: 0x0A_0000,
        };
        let key = chunk.key();
        assert_eq!(
            key,
            "wal/00000002/000000020000000000000003.streamed/000A0000.pitr"
        );
        assert_eq!(ObjectKey::parse(&key), Some(chunk));
        assert_eq!(
            Prefix::Streamed(seg).key(),
            "wal/00000002/000000020000000000000003.streamed"
        );
        // Not a chunk: a bad offset, another timeline's directory, a nested path.
        for bad in [
            "wal/00000002/000000020000000000000003.streamed/A0000.pitr",
            "wal/00000001/000000020000000000000003.streamed/000A0000.pitr",
            "wal/00000002/000000020000000000000003.streamed/x/000A0000.pitr",
            "wal/00000002/000000020000000000000003/000A0000.pitr",
        ] {
            assert_eq!(ObjectKey::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn keys() {
        let k = |s: &str| ObjectKey::Wal(s.parse().unwrap()).key();
        assert_eq!(ObjectKey::Identity.key(), "pitr.json");
        assert_eq!(
            k("000000010000000000000003"),
            "wal/00000001/000000010000000000000003.pitr"
        );
        assert_eq!(
            k("0000000A0000000000000003.partial"),
            "wal/0000000A/0000000A0000000000000003.partial.pitr"
        );
        assert_eq!(k("00000002.history"), "wal/history/00000002.history.pitr");
        assert_eq!(
            k("000000010000000000000003.00000028.backup"),
            "wal/00000001/000000010000000000000003.00000028.backup.pitr"
        );
        // Listing parses back exactly what `key` writes, and nothing else.
        for name in [
            "000000010000000000000003",
            "00000002.history",
            "000000010000000000000007.partial",
        ] {
            let n: WalFileName = name.parse().unwrap();
            assert_eq!(
                parse_wal_key(&ObjectKey::Wal(n).key()),
                Some(Listed::Wal(n))
            );
        }
        let WalFileName::Segment(seg) = "000000020000000000000003".parse().unwrap() else {
            panic!()
        };
        assert_eq!(
            ObjectKey::Summary(seg).key(),
            "wal/00000002/000000020000000000000003.idx"
        );
        assert_eq!(
            parse_wal_key(&ObjectKey::Summary(seg).key()),
            Some(Listed::Summary(seg))
        );
        for junk in [
            "wal/00000002/000000010000000000000003.pitr",
            "wal/x",
            "wal/history/00000002.history",
            "backups/x/y",
            "wal/00000001/foo.idx",
        ] {
            assert_eq!(parse_wal_key(junk), None, "{junk}");
        }
        assert_eq!(
            ObjectKey::BackupPart {
                id: "20261121T101304Z".into(),
                path: "base/5/16384".into(),
                part: 2
            }
            .key(),
            "backups/20261121T101304Z/data/base/5/16384.2.pitr"
        );
        assert_eq!(
            ObjectKey::BackupManifest("x".into()).key(),
            "backups/x/manifest.pitr"
        );
        // The object-store path is the same text (no escaping needed for these names).
        assert_eq!(ObjectKey::Identity.path().as_ref(), "pitr.json");
    }

    #[test]
    fn every_key_parses_back_to_its_object() {
        let WalFileName::Segment(seg) = "000000020000000000000003".parse().unwrap() else {
            panic!()
        };
        let id = "20261121T101304Z".to_string();
        let all = [
            ObjectKey::Identity,
            ObjectKey::VerifyStatus,
            ObjectKey::RepoKey("00112233aabbccdd".into()),
            ObjectKey::ActiveKey,
            ObjectKey::Wal("000000010000000000000003".parse().unwrap()),
            ObjectKey::Wal("00000002.history".parse().unwrap()),
            ObjectKey::Wal("000000010000000000000003.00000028.backup".parse().unwrap()),
            ObjectKey::Summary(seg),
            ObjectKey::Rollup {
                first: "000000020000000000000000".parse::<SegmentName>().unwrap(),
                last: "0000000200000000000000FF".parse::<SegmentName>().unwrap(),
            },
            ObjectKey::BackupManifest(id.clone()),
            ObjectKey::BackupClaim(id.clone()),
            ObjectKey::BackupLabel(id.clone()),
            ObjectKey::TablespaceMap(id.clone()),
            ObjectKey::BackupPart {
                id: id.clone(),
                path: "base/5/16384.1".into(),
                part: 12,
            },
            ObjectKey::BackupPart {
                id: id.clone(),
                path: "pg_tblspc/16390/PG_18_202406281/5/16391".into(),
                part: 0,
            },
            ObjectKey::BackupBundle { id, bundle: 7 },
        ];
        for k in all {
            assert_eq!(ObjectKey::parse(&k.key()), Some(k.clone()), "{}", k.key());
        }
        for junk in [
            "",
            "pitr.json.bak",
            "keys/short.json",
            "keys/00112233aabbccdd.txt",
            "backups/x",
            "backups//manifest.pitr",
            "backups/x/manifest",
            "backups/x/other.pitr",
            "backups/x/data/base/1.pitr",
            "backups/x/data/.0.pitr",
            "backups/x/data/base/1.-1.pitr",
            "backups/x/bundle/.pitr",
            "backups/x/bundle/1a.pitr",
            "backups/x/bundle/1",
            "status/other.json",
            "index/00000002/000000010000000000000000-0000000100000000000000FF.roll.pitr",
            "index/00000001/0000000100000000000000FF-000000010000000000000000.roll.pitr",
            "index/00000001/000000010000000000000000-0000000200000000000000FF.roll.pitr",
            "index/00000001/000000010000000000000000.roll.pitr",
        ] {
            assert_eq!(ObjectKey::parse(junk), None, "{junk}");
        }
        assert_eq!(Prefix::Everything.key(), "");
        assert_eq!(Prefix::Everything.path(), None);
        assert_eq!(
            Prefix::WalTimeline(TimelineId::new(10).unwrap()).key(),
            "wal/0000000A"
        );
        assert_eq!(Prefix::Backup("b".into()).key(), "backups/b");
    }
}
