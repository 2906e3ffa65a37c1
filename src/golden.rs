//! Format contracts under golden files (`testdata/formats/`): each stored format (`pitr.json`, the
//! backup manifest, the segment summary) and `info --json` is written from a fixed value and
//! compared with its file byte for byte, and the file is read back through the reader pitr uses.
//! An accidental change to a field's name, type or order fails here. After a deliberate change
//! (with its format version raised, and the old version still read), rewrite the files with
//! `PITR_BLESS=1 cargo test golden` and keep the old ones as `*-vN.json` read-back fixtures.

use std::path::PathBuf;

use crate::catalog::{Catalog, Loaded};
use crate::compress::Compression;
use crate::index::{Checkpoint, ParseStatus, RestorePoint, SegmentSummary, XactRef};
use crate::info::Info;
use crate::manifest::{BackupManifest, FileEntry, Part, Tablespace};
use crate::pg::xlogrecord::XactKind;
use crate::pg::{Lsn, PgTimestamp, SegNo, SegmentName, SystemId, TimelineId, WalSegSize};
use crate::storage::identity::RepoIdentity;

fn golden(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("testdata/formats")
        .join(name)
}

/// `written` must equal the golden file `name` (or replaces it under `PITR_BLESS=1`).
fn check(name: &str, written: &str) -> String {
    let path = golden(name);
    if std::env::var_os("PITR_BLESS").is_some() {
        std::fs::write(&path, format!("{written}\n")).unwrap();
    }
    let want = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (PITR_BLESS=1 writes it)", path.display()));
    assert_eq!(
        written,
        want.trim_end(),
        "{name} changed: a stored format or a JSON contract is not what it was"
    );
    want
}

fn seg(tli: u32, n: u64) -> SegmentName {
    SegmentName::new(tli_(tli), SegNo(n), WalSegSize::DEFAULT).unwrap()
}

fn tli_(n: u32) -> TimelineId {
    TimelineId::new(n).unwrap()
}

fn at(s: &str) -> PgTimestamp {
    PgTimestamp::parse_rfc3339(s).unwrap()
}

fn identity() -> RepoIdentity {
    RepoIdentity {
        format_version: 1,
        system_identifier: SystemId(7_310_565_526_380_193_117),
        pg_version: 15,
        wal_segment_size: WalSegSize::DEFAULT,
        wal_page_size: 8192,
    }
}

fn manifest() -> BackupManifest {
    BackupManifest {
        format_version: 1,
        program_version: "0.1.0".into(),
        id: "20261121T101304Z".into(),
        label: "pitr 20261121T101304Z".into(),
        system_identifier: SystemId(7_310_565_526_380_193_117),
        pg_version: 15,
        timeline: tli_(1),
        start_lsn: Lsn(0x0100_0028),
        checkpoint_lsn: Lsn(0x0100_0060),
        stop_lsn: Lsn(0x0100_0138),
        start_time: at("2026-11-21T10:13:04.919520Z"),
        stop_time: at("2026-11-21T10:13:06.000100Z"),
        start_wal: seg(1, 1),
        stop_wal: seg(1, 1),
        compression: Compression::Zstd,
        files: vec![FileEntry {
            path: "base/5/16384".into(),
            size: 16_785_408,
            mtime: 1_795_256_000,
            mode: 0o600,
            parts: vec![
                Part {
                    size: 16_777_216,
                    crc32c: 0x1234_5678,
                    stored: 1_204_311,
                    bundle: None,
                },
                Part {
                    size: 8192,
                    crc32c: 0x9abc_def0,
                    stored: 312,
                    bundle: None,
                },
            ],
            checksum_failures: vec![],
            changed: None,
        }],
        directories: vec!["base".into(), "base/5".into(), "pg_tblspc/16390".into()],
        tablespaces: vec![Tablespace {
            oid: 16390,
            location: "/srv/ts1".into(),
        }],
        has_tablespace_map: true,
        size_bytes: 16_785_408,
        stored_bytes: 1_204_623,
        data_checksums: false,
        backup_type: Default::default(),
        parent: None,
        fallback: None,
        tally: None,
    }
}

fn summary() -> SegmentSummary {
    let commit = XactRef {
        lsn: Lsn(0x0200_0100),
        xid: 741,
        time: at("2026-11-21T10:14:00.500000Z"),
        kind: XactKind::Commit,
    };
    let abort = XactRef {
        lsn: Lsn(0x0200_2000),
        xid: 742,
        time: at("2026-11-21T10:14:01Z"),
        kind: XactKind::Abort,
    };
    SegmentSummary {
        format: 1,
        changes: None,
        status: ParseStatus::Ok,
        records: 120,
        first_lsn: Some(Lsn(0x0200_0028)),
        last_lsn: Some(Lsn(0x0200_3000)),
        xacts: 2,
        first_xact: Some(commit),
        last_xact: Some(abort),
        max_xact_time: Some(abort.time),
        min_xid: Some(741),
        max_xid: Some(742),
        restore_points: vec![RestorePoint {
            name: "before_migration".into(),
            time: at("2026-11-21T10:14:00.700000Z"),
            lsn: Lsn(0x0200_1000),
        }],
        checkpoints: vec![Checkpoint {
            lsn: Lsn(0x0200_2800),
            redo: Lsn(0x0200_2400),
            timeline: 1,
            prev_timeline: 1,
            shutdown: false,
            unix_secs: 1_795_256_041,
        }],
        end_of_recovery: vec![],
        backup_ends: vec![(Lsn(0x0200_0060), Lsn(0x0100_0028))],
        switch_lsn: Some(Lsn(0x0200_3100)),
        head: None,
        tail: None,
        wal_level_minimal: None,
    }
}

#[test]
fn repository_identity() {
    let written = serde_json::to_string_pretty(&identity()).unwrap();
    let file = check("pitr-v1.json", &written);
    assert_eq!(
        crate::format::decode::<RepoIdentity>(file.as_bytes()).unwrap(),
        identity()
    );
}

#[test]
fn backup_manifest() {
    let written = serde_json::to_string_pretty(&manifest()).unwrap();
    let file = check("manifest-v1.json", &written);
    assert_eq!(
        BackupManifest::from_json(file.as_bytes()).unwrap(),
        manifest()
    );
}

/// Format 2: format 1 plus the changed blocks.
fn summary_v2() -> SegmentSummary {
    use crate::pg::blockref::{Change, RelFork};
    let rel = |rel, fork| RelFork {
        spc: 1663,
        db: 5,
        rel,
        fork,
    };
    let mut changes = crate::blocks::BlockChanges::default();
    for c in [
        Change::Modified(rel(16384, 0), 7),
        Change::Modified(rel(16384, 0), 8),
        Change::Modified(rel(16384, 0), 9),
        Change::Modified(rel(16384, 0), 120),
        Change::Modified(rel(16384, 2), 0),
        Change::Limit(rel(16390, 0), 0),
        Change::Modified(rel(16390, 0), 0),
        Change::Limit(rel(0, 0), 0),
    ] {
        changes.apply(c);
    }
    changes.finish();
    SegmentSummary {
        format: 2,
        changes: Some(changes),
        ..summary()
    }
}

#[test]
fn backup_manifest_with_checksum_failures() {
    let mut m = manifest();
    m.data_checksums = true;
    m.files[0].checksum_failures = vec![3, 2048];
    let written = serde_json::to_string_pretty(&m).unwrap();
    let file = check("manifest-v1-checksums.json", &written);
    assert_eq!(BackupManifest::from_json(file.as_bytes()).unwrap(), m);
    assert_eq!(
        m.describe_checksum_failures(5),
        "base/5/16384 block 3, 2048"
    );
}

/// What the catalog keeps of each stored manifest (read without its files) says what the whole
/// manifest says: file count, methods, checksum failures; everything else is the same.
#[test]
fn manifests_read_without_files_keep_their_tally() {
    let mut checked = manifest();
    checked.data_checksums = true;
    checked.files[0].checksum_failures = vec![3, 2048];
    for name in [
        "manifest-v1.json",
        "manifest-v1-checksums.json",
        "manifest-v2-incr.json",
        "manifest-v3-bundled.json",
    ] {
        let file = std::fs::read(golden(name)).unwrap();
        let whole = BackupManifest::from_json(&file).unwrap();
        let lean = BackupManifest::without_files_from_json(&file).unwrap();
        assert!(lean.files.is_empty() && lean.files_left_out(), "{name}");
        assert!(!whole.files_left_out(), "{name}");
        assert_eq!(lean.file_count(), whole.files.len(), "{name}");
        assert_eq!(lean.file_methods(), whole.file_methods(), "{name}");
        let mut same = lean.clone();
        same.files = whole.files.clone();
        same.tally = None;
        assert_eq!(same, whole, "{name}");
    }
    let json = serde_json::to_vec(&checked).unwrap();
    let lean = BackupManifest::without_files_from_json(&json).unwrap();
    assert_eq!(
        lean.describe_checksum_failures(5),
        checked.describe_checksum_failures(5)
    );
    assert_eq!(
        lean.describe_checksum_failures(5),
        "base/5/16384 block 3, 2048"
    );
    // The next read on the thread is whole again.
    assert_eq!(BackupManifest::from_json(&json).unwrap(), checked);
    // A manifest that does not parse leaves no tally behind either.
    assert!(BackupManifest::without_files_from_json(b"{\"files\": [1]}").is_err());
    assert_eq!(BackupManifest::from_json(&json).unwrap().files.len(), 1);
}

/// Format 2: an incremental backup, one file as changed blocks, one whole.
fn incremental_manifest() -> BackupManifest {
    let mut m = manifest();
    m.format_version = 2;
    m.id = "20261122T101304Z".into();
    m.backup_type = crate::manifest::BackupType::Incr;
    m.parent = Some(crate::manifest::Parent {
        id: "20261121T101304Z".into(),
        start_lsn: Lsn(0x100_0028),
        timeline: TimelineId::ONE,
        block_size: 8192,
        segment_blocks: 131_072,
    });
    let mut whole = m.files[0].clone();
    whole.path = "base/5/2619_fsm".into();
    m.files[0].changed = Some(crate::manifest::ChangedBlocks {
        length: 2050,
        blocks: vec![0, 1, 2, 3, 17, 40, 41],
    });
    m.files[0].parts = vec![Part {
        size: 7 * 8192,
        crc32c: 0x0bad_cafe,
        stored: 4100,
        bundle: None,
    }];
    m.files[0].size = 7 * 8192;
    m.files.push(whole);
    m
}

#[test]
fn incremental_backup_manifest() {
    let m = incremental_manifest();
    let written = serde_json::to_string_pretty(&m).unwrap();
    let file = check("manifest-v2-incr.json", &written);
    let read = BackupManifest::from_json(file.as_bytes()).unwrap();
    assert_eq!(read, m);
    assert_eq!(read.file_methods(), (1, 1));
    assert_eq!(read.files[0].restored_size(read.block_size()), 2050 * 8192);
    // A full backup is still written as format 1, without a type: an older pitr reads it.
    let full = std::fs::read_to_string(golden("manifest-v1.json")).unwrap();
    assert_eq!(
        BackupManifest::from_json(full.as_bytes())
            .unwrap()
            .backup_type,
        crate::manifest::BackupType::Full
    );
}

#[test]
fn bundled_backup_manifest() {
    // Format 3: a small file's piece in a bundle, beside a large file's pieces of their own.
    let mut m = manifest();
    m.format_version = crate::manifest::MANIFEST_FORMAT_BUNDLED;
    let mut small = m.files[0].clone();
    small.path = "base/5/2619_vm".into();
    small.size = 8192;
    small.parts = vec![Part {
        size: 8192,
        crc32c: 0x0f0f_0f0f,
        stored: 120,
        bundle: Some(crate::manifest::InBundle {
            id: 3,
            offset: 4_194_432,
        }),
    }];
    m.files.push(small);
    let written = serde_json::to_string_pretty(&m).unwrap();
    let file = check("manifest-v3-bundled.json", &written);
    let read = BackupManifest::from_json(file.as_bytes()).unwrap();
    assert_eq!(read, m);
    let at = read.files[1].parts[0].at(&read.id, &read.files[1].path, 0);
    assert_eq!(at.key.key(), format!("backups/{}/bundle/3.pitr", read.id));
    assert_eq!(at.range, Some(4_194_432..4_194_552));
    // Pieces of their own, as every earlier format stored them.
    let at = read.files[0].parts[1].at(&read.id, &read.files[0].path, 1);
    assert_eq!(at.range, None);
    assert_eq!(
        at.key.key(),
        format!("backups/{}/data/base/5/16384.1.pitr", read.id)
    );
}

#[test]
fn segment_summary() {
    let written = serde_json::to_string_pretty(&summary_v2()).unwrap();
    let file = check("summary-v2.json", &written);
    assert_eq!(
        crate::format::decode::<SegmentSummary>(file.as_bytes()).unwrap(),
        summary_v2()
    );
    // Format 1, as the first version wrote it: read, with no changed blocks (not covered).
    let v1 = std::fs::read_to_string(golden("summary-v1.json")).unwrap();
    assert_eq!(
        crate::format::decode::<SegmentSummary>(v1.as_bytes()).unwrap(),
        summary()
    );
}

/// `written` must equal the binary golden file `name` (or replaces it under `PITR_BLESS=1`).
fn check_bytes(name: &str, written: &[u8]) -> Vec<u8> {
    let path = golden(name);
    if std::env::var_os("PITR_BLESS").is_some() {
        std::fs::write(&path, written).unwrap();
    }
    let want = std::fs::read(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (PITR_BLESS=1 writes it)", path.display()));
    assert_eq!(
        written, want,
        "{name} changed: the envelope is not what it was"
    );
    want
}

#[test]
fn object_envelope() {
    use crate::storage::envelope;
    // Uncompressed, so the bytes depend on the envelope alone, not on a codec's version.
    let data = b"a segment's bytes".repeat(4);
    let summary = serde_json::to_vec(&summary_v2()).unwrap();
    // Format 1: every object an earlier version wrote, and every object but a segment now.
    let v1 = envelope::encode(&data, Compression::None).unwrap();
    let file = check_bytes("envelope-v1.bin", &v1);
    assert_eq!(envelope::decode(&file).unwrap(), data);
    assert_eq!(envelope::attachment(&file), Ok(None));
    // Format 2: a segment with its summary attached.
    let sealed = envelope::encode(&summary, Compression::None).unwrap();
    let v2 = envelope::attach(v1.into(), &sealed).unwrap().into_vec();
    let file = check_bytes("envelope-v2-attached.bin", &v2);
    assert_eq!(envelope::decode(&file).unwrap(), data);
    let attached = envelope::attachment(&file).unwrap().unwrap();
    assert_eq!(
        crate::format::decode::<SegmentSummary>(&envelope::decode(attached).unwrap()).unwrap(),
        summary_v2()
    );
}

#[test]
fn wal_index_rollup() {
    // Two summaries instead of a chunk's 256: the file pins the format, not a chunk.
    let mut first = summary_v2();
    first.changes = None;
    let rollup = crate::rollup::Rollup {
        format: crate::rollup::ROLLUP_FORMAT,
        timeline: tli_(1),
        first: 256,
        files: vec![
            seg(1, 256).to_string(),
            format!("{}.00000028.backup", seg(1, 256)),
            seg(1, 257).to_string(),
        ],
        summaries: vec![first, summary()],
        joined: vec![256],
    };
    let written = serde_json::to_string_pretty(&rollup).unwrap();
    let file = check("rollup-v1.json", &written);
    assert_eq!(
        crate::format::decode::<crate::rollup::Rollup>(file.as_bytes()).unwrap(),
        rollup
    );
}

#[test]
fn info_json() {
    // Timeline 1: segments 1, 2 and 4 (3 is missing); the backup ends in segment 1, the commit
    // and the restore point are in segment 2.
    let loaded = Loaded {
        rollups: Vec::new(),
        identity: Some(identity()),
        wal: [1, 2, 4]
            .iter()
            .map(|&n| crate::pg::WalFileName::Segment(seg(1, n)))
            .collect(),
        histories: vec![],
        summaries: vec![(seg(1, 2), serde_json::to_vec(&summary()).unwrap())],
        backups: vec![
            (
                manifest().id,
                Some(BackupManifest::without_files_from_json(
                    &serde_json::to_vec(&manifest()).unwrap(),
                )),
            ),
            ("20261122T000000Z".into(), None),
        ],
    };
    let info = Info::new("file:///srv/pitr", &Catalog::build(loaded));
    check("info.json", &serde_json::to_string_pretty(&info).unwrap());
}

#[test]
fn verify_status() {
    let status = crate::verify::VerifyStatus {
        format_version: 1,
        finished_at: at("2026-11-21T11:00:00.250000Z"),
        findings: 2,
        objects_checked: 4711,
    };
    let written = serde_json::to_string_pretty(&status).unwrap();
    let file = check("verify-status-v1.json", &written);
    let read = crate::format::decode::<crate::verify::VerifyStatus>(file.as_bytes()).unwrap();
    assert_eq!(read, status);
    // As the first version wrote it, without a format version.
    let first =
        br#"{"findings":2,"finished_at":"2026-11-21T11:00:00.250000Z","objects_checked":4711}"#;
    assert_eq!(
        crate::format::decode::<crate::verify::VerifyStatus>(first).unwrap(),
        status
    );
}

#[test]
fn receive_status() {
    let status = crate::receive::ReceiveStatus {
        format_version: 1,
        updated_at: at("2026-12-03T19:00:00.500000Z"),
        server: "host=db1 port=5432 user=replicator dbname=postgres".into(),
        timeline: 2,
        received_lsn: "0/5000148".parse().unwrap(),
        stored_lsn: "0/5000000".parse().unwrap(),
        server_lsn: "0/5000148".parse().unwrap(),
        behind_since: Some(at("2026-12-03T18:59:59.900000Z")),
    };
    let written = serde_json::to_string_pretty(&status).unwrap();
    let file = check("receive-status-v1.json", &written);
    let read = crate::format::decode::<crate::receive::ReceiveStatus>(file.as_bytes()).unwrap();
    assert_eq!(read, status);
}

/// A format newer than this pitr reads is refused by name, never read as an older one.
#[tokio::test]
async fn newer_formats_are_refused_by_name() {
    // A backup manifest: the backup is not restorable and the catalog says why.
    let mut newer = serde_json::to_value(manifest()).unwrap();
    newer["format_version"] = 4.into();
    let loaded = Loaded {
        identity: Some(identity()),
        wal: vec![crate::pg::WalFileName::Segment(seg(1, 1))],
        backups: vec![(
            manifest().id,
            Some(BackupManifest::without_files_from_json(
                &serde_json::to_vec(&newer).unwrap(),
            )),
        )],
        ..Default::default()
    };
    let c = Catalog::build(loaded);
    assert!(c.backups.is_empty());
    assert!(
        c.problems
            .iter()
            .any(|p| p.segment == "backup 20261121T101304Z"
                && p.reason
                    .contains("backup manifest is format 4, newer than this pitr")),
        "{:?}",
        c.problems
    );
    // pitr.json: every command refuses the repository, naming the object.
    let repo = crate::storage::Repo::from_store(
        std::sync::Arc::new(object_store::memory::InMemory::new()),
        "memory://newer",
    );
    let mut id = serde_json::to_value(identity()).unwrap();
    id["format_version"] = 2.into();
    let json = serde_json::to_vec(&id).unwrap();
    let key = crate::storage::layout::ObjectKey::Identity;
    let sealed = repo.seal(&key, &json, Compression::None).unwrap();
    repo.put(&key, sealed, crate::storage::PutMode::compare_with(&json))
        .await
        .unwrap();
    let err = repo.require_identity().await.unwrap_err();
    assert!(
        matches!(err, crate::storage::RepoError::Format { ref key, .. } if key == "pitr.json"),
        "{err}"
    );
    assert!(err.to_string().contains("newer than this pitr"), "{err}");
    assert!(err.hint().unwrap().contains("newer pitr"));
}

/// An encrypted repository written by this version (keyring format 1, sealed objects "PITRENC1"):
/// kept as a fixture and read back, with a key file and with a passphrase. Under `PITR_BLESS=1` a
/// missing fixture is written (its keys and nonces are random, so an existing one is never
/// replaced: it is what an earlier pitr wrote).
#[tokio::test]
async fn encrypted_repositories_of_format_1_read_back() {
    use crate::storage::keys::KeySource;
    use crate::storage::layout::ObjectKey;
    for (dir, source) in [
        (
            "encrypted-keyfile-v1",
            KeySource::File(golden("encrypted-keyfile-v1/repo.key")),
        ),
        (
            "encrypted-passphrase-v1",
            KeySource::Passphrase(golden("encrypted-passphrase-v1/passphrase")),
        ),
    ] {
        let root = golden(dir);
        let repo_dir = root.join("repo");
        let url = format!("file://{}", repo_dir.display());
        if std::env::var_os("PITR_BLESS").is_some() && !repo_dir.exists() {
            std::fs::create_dir_all(&root).unwrap();
            match &source {
                KeySource::File(p) => crate::storage::keys::generate_key_file(p).unwrap(),
                KeySource::Passphrase(p) => {
                    std::fs::write(p, "a passphrase for the golden files\n").unwrap()
                }
            }
            let repo = crate::storage::Repo::create(&url)
                .unwrap()
                .with_encryption(Some(&source), true)
                .await
                .unwrap();
            repo.ensure_identity(&identity()).await.unwrap();
            let seg = ObjectKey::Wal(crate::pg::WalFileName::Segment(seg(1, 3)));
            let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
            let sealed = repo.seal(&seg, &data, Compression::Zstd).unwrap();
            repo.put(&seg, sealed, crate::storage::PutMode::compare_with(&data))
                .await
                .unwrap();
        }
        let repo = crate::storage::Repo::open(&url)
            .unwrap()
            .with_encryption(Some(&source), false)
            .await
            .unwrap_or_else(|e| panic!("{dir}: {e}"));
        assert_eq!(repo.require_identity().await.unwrap(), identity(), "{dir}");
        let seg = ObjectKey::Wal(crate::pg::WalFileName::Segment(seg(1, 3)));
        let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        assert_eq!(repo.get(&seg).await.unwrap().unwrap(), data, "{dir}");
        // The stored bytes are sealed, and without the key they are refused as encrypted.
        let raw = std::fs::read(repo_dir.join(seg.key())).unwrap();
        assert!(raw.starts_with(crate::storage::sealed::MAGIC));
        let clear = crate::storage::Repo::open(&url).unwrap();
        let err = clear.require_identity().await.unwrap_err();
        assert!(err.to_string().contains("no key is configured"), "{err}");
    }
}
