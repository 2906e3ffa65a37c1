//! `pitr backup --stream`: a full base backup taken over the replication protocol (`BASE_BACKUP`),
//! from a primary or a standby, with no access to its data directory. The tar streams the server
//! sends are read as they arrive and stored in the same repository format as a local backup
//! (pieces of at most 16 MiB, small ones bundled, `backup_label` and `tablespace_map` objects, the
//! manifest last), so restore, verify, drill and expire treat both alike. WAL is not in the
//! stream: as for a local backup, pitr waits until the backup's WAL is in the repository
//! (archived by `archive-push`, or streamed by `pitr receive`).

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context, bail};
use futures::StreamExt;
use futures::stream::FuturesUnordered;

use super::tar::{self, Item, Kind};
use super::{bundle, fresh_backup_id, parse_label};
use crate::compress::Compression;
use crate::manifest::{BackupManifest, BackupType, CHUNK_SIZE, FileEntry, Part, Tablespace};
use crate::pg::{PgTimestamp, SystemId, TimelineId};
use crate::replication::BackupEvent;
use crate::storage::layout::ObjectKey;
use crate::storage::{PutMode, Repo, envelope};

/// How `backup --stream` runs.
#[derive(Debug, Clone)]
pub struct StreamOptions {
    /// How to reach the server (a role with `REPLICATION`).
    pub dbname: String,
    /// Label of the backup.
    pub label: Option<String>,
    /// Pieces compressed and stored at once.
    pub jobs: usize,
    /// Compression of the stored files.
    pub compression: Compression,
    /// How long to wait for the backup's WAL to reach the repository.
    pub archive_timeout: Duration,
    /// Store small pieces together in bundles.
    pub bundle: bool,
}

/// A file being received: its entry, its pieces so far, and the bytes of the piece in progress.
struct Receiving {
    index: usize,
    buf: Vec<u8>,
    parts: usize,
}

/// What a stored piece comes back as: (file, piece number, its part).
type Stored = anyhow::Result<(usize, usize, Part)>;

/// Take a full backup of the server `opts.dbname` names into `repo`.
///
/// # Errors
/// The server cannot be reached, belongs to another cluster or refuses the backup, a tar stream is
/// damaged, a piece cannot be stored, or the WAL does not reach the repository in time.
pub async fn run(repo: &Repo, opts: &StreamOptions) -> anyhow::Result<BackupManifest> {
    let started = std::time::Instant::now();
    let cfg = crate::pgconn::config(Some(&opts.dbname), None)?;
    let (mut conn, major, sys) = crate::receive::connect_to_cluster(repo, &cfg).await?;
    let seg_size = crate::receive::parse_segment_size(&conn.show("wal_segment_size").await?)?;
    let checksums = conn.show("data_checksums").await? == "on";
    let start_time = PgTimestamp::now();
    let id = fresh_backup_id(repo, start_time.unix_micros()).await?;
    let label_text = opts.label.clone().unwrap_or_else(|| format!("pitr {id}"));
    let start = conn.base_backup(&label_text, major).await?;
    tracing::info!(
        "backup {id} started at {} over the replication protocol ({}, PostgreSQL {})",
        start.lsn,
        conn.describe,
        conn.server_version
    );
    let bundler = opts.bundle.then(|| bundle::Bundler::new(&id, opts.jobs));
    let mut files: Vec<FileEntry> = Vec::new();
    let mut directories: Vec<String> = Vec::new();
    let mut label: Option<Vec<u8>> = None;
    let mut map: Option<Vec<u8>> = None;
    let mut special: Option<(bool, Vec<u8>)> = None;
    let mut current: Option<Receiving> = None;
    let mut prefix = String::new();
    let mut reader = tar::Reader::new();
    let mut storing: FuturesUnordered<futures::future::BoxFuture<'_, Stored>> =
        FuturesUnordered::new();
    let mut parts: BTreeMap<(usize, usize), Part> = BTreeMap::new();
    let jobs = opts.jobs.max(1);
    let ctx = PieceCtx {
        repo,
        id: &id,
        compression: opts.compression,
        bundler: bundler.as_ref(),
    };
    let end = loop {
        let items = match conn.backup_event().await? {
            BackupEvent::Archive(oid) => {
                if !reader.at_boundary() {
                    bail!("BASE_BACKUP: an archive ended inside an entry");
                }
                reader = tar::Reader::new();
                prefix = oid.map(|o| format!("pg_tblspc/{o}/")).unwrap_or_default();
                continue;
            }
            BackupEvent::Data(data) => {
                let mut items = Vec::new();
                reader
                    .feed(data, &mut items)
                    .map_err(|e| anyhow::anyhow!("BASE_BACKUP archive of backup {id}: {e}"))?;
                items
            }
            BackupEvent::End { lsn, tli } => break (lsn, tli),
        };
        for item in items {
            match item {
                Item::Entry(h) => {
                    let path = format!("{prefix}{}", h.name);
                    match h.kind {
                        Kind::File if prefix.is_empty() && h.name == "backup_label" => {
                            special = Some((true, Vec::new()));
                        }
                        Kind::File if prefix.is_empty() && h.name == "tablespace_map" => {
                            special = Some((false, Vec::new()));
                        }
                        Kind::File => {
                            files.push(FileEntry {
                                path,
                                size: h.size,
                                mtime: h.mtime,
                                mode: h.mode,
                                parts: Vec::new(),
                                checksum_failures: Vec::new(),
                                changed: None,
                            });
                            current = Some(Receiving {
                                index: files.len() - 1,
                                buf: Vec::with_capacity(h.size.min(CHUNK_SIZE) as usize),
                                parts: 0,
                            });
                        }
                        // A tablespace's link in the main archive, a directory anywhere.
                        Kind::Dir | Kind::Symlink => directories.push(path),
                        Kind::Other => {}
                    }
                }
                Item::Data(d) => {
                    if let Some((_, buf)) = &mut special {
                        buf.extend_from_slice(&d);
                    } else if let Some(cur) = &mut current {
                        let mut d = &d[..];
                        while !d.is_empty() {
                            let room = CHUNK_SIZE as usize - cur.buf.len();
                            let take = room.min(d.len());
                            cur.buf.extend_from_slice(&d[..take]);
                            d = &d[take..];
                            if cur.buf.len() == CHUNK_SIZE as usize {
                                let piece = std::mem::take(&mut cur.buf);
                                storing
                                    .push(Box::pin(ctx.store(cur.index, cur.parts, piece, &files)));
                                cur.parts += 1;
                                while storing.len() >= jobs {
                                    let (f, p, part) = next_stored(&mut storing).await?;
                                    parts.insert((f, p), part);
                                }
                            }
                        }
                    }
                }
                Item::EntryEnd => {
                    if let Some((is_label, buf)) = special.take() {
                        if is_label {
                            label = Some(buf);
                        } else {
                            map = Some(buf);
                        }
                    } else if let Some(cur) = current.take()
                        && (cur.parts == 0 || !cur.buf.is_empty())
                    {
                        storing.push(Box::pin(ctx.store(cur.index, cur.parts, cur.buf, &files)));
                        while storing.len() >= jobs {
                            let (f, p, part) = next_stored(&mut storing).await?;
                            parts.insert((f, p), part);
                        }
                    }
                }
            }
        }
    };
    while let Some(done) = storing.next().await {
        let (f, p, part) = done?;
        parts.insert((f, p), part);
    }
    drop(storing);
    if let Some(b) = &bundler {
        if let Some(last) = b.finish()? {
            b.store(repo, last).await?;
        }
        b.wait().await?;
    }
    for ((f, _), part) in parts {
        if let Some(file) = files.get_mut(f) {
            file.parts.push(part);
        }
    }
    for f in &mut files {
        f.size = f.parts.iter().map(|p| p.size).sum();
    }
    // Each tablespace's link (with a tablespace map the server sends none: the map describes
    // them), and parents before children (tablespace archives come before the main one).
    directories.extend(
        start
            .tablespaces
            .iter()
            .filter_map(|(oid, _)| oid.map(|o| format!("pg_tblspc/{o}"))),
    );
    directories.sort();
    directories.dedup();
    let stop_time = PgTimestamp::now();
    let label = label.context("the server sent no backup_label")?;
    let label_str = String::from_utf8_lossy(&label).into_owned();
    let info = parse_label(&label_str).context("read the backup_label the server sent")?;
    let map = map.filter(|m| !m.is_empty());
    super::store_label(repo, &id, &label, map.as_deref()).await?;
    let (stop_lsn, _stop_tli): (crate::pg::Lsn, TimelineId) = end;
    let needed = crate::catalog::needed_segments(info.timeline, info.start_lsn, stop_lsn, seg_size);
    tracing::info!(
        "backup {id} stopped at {stop_lsn}; waiting for WAL {} to {} to reach the repository",
        needed.first().map(ToString::to_string).unwrap_or_default(),
        needed.last().map(ToString::to_string).unwrap_or_default()
    );
    super::wait_for_wal(repo, &needed, opts.archive_timeout, &id).await?;
    let tablespaces: Vec<Tablespace> = start
        .tablespaces
        .iter()
        .filter_map(|(oid, loc)| {
            Some(Tablespace {
                oid: (*oid)?,
                location: loc.clone().unwrap_or_default(),
            })
        })
        .collect();
    let manifest = BackupManifest {
        format_version: super::manifest_format(&files, false),
        program_version: env!("CARGO_PKG_VERSION").to_string(),
        id: id.clone(),
        label: label_text,
        system_identifier: SystemId(sys.system_identifier),
        pg_version: major,
        timeline: info.timeline,
        start_lsn: info.start_lsn,
        checkpoint_lsn: info.checkpoint_lsn,
        stop_lsn,
        start_time,
        stop_time,
        start_wal: info.start_wal,
        stop_wal: needed.last().copied().unwrap_or(info.start_wal),
        compression: opts.compression,
        size_bytes: files.iter().map(|f| f.size).sum(),
        stored_bytes: files.iter().flat_map(|f| &f.parts).map(|p| p.stored).sum(),
        files,
        directories,
        tablespaces,
        has_tablespace_map: map.is_some(),
        data_checksums: checksums,
        backup_type: BackupType::Full,
        parent: None,
        fallback: None,
        tally: None,
    };
    super::store_manifest(repo, &manifest).await?;
    tracing::debug!(
        "backup {id} complete in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok(manifest)
}

async fn next_stored(
    storing: &mut FuturesUnordered<futures::future::BoxFuture<'_, Stored>>,
) -> anyhow::Result<(usize, usize, Part)> {
    match storing.next().await {
        Some(done) => done,
        None => bail!("internal: no piece being stored"),
    }
}

/// What storing a piece needs.
struct PieceCtx<'a> {
    repo: &'a Repo,
    id: &'a str,
    compression: Compression,
    bundler: Option<&'a bundle::Bundler>,
}

impl<'a> PieceCtx<'a> {
    /// Compress piece `part` of file `index` (its bytes `data`) and store it: in a bundle when
    /// small, else as an object of its own.
    fn store(
        &self,
        index: usize,
        part: usize,
        data: Vec<u8>,
        files: &[FileEntry],
    ) -> impl std::future::Future<Output = Stored> + 'a {
        let path = files.get(index).map(|f| f.path.clone()).unwrap_or_default();
        let (repo, id, compression, bundler) = (self.repo, self.id, self.compression, self.bundler);
        async move {
            let size = data.len() as u64;
            let slot = crate::cpu::slots().acquire().await?;
            let (stored, crc) = tokio::task::spawn_blocking(move || -> std::io::Result<_> {
                let crc = crc32c::crc32c(&data);
                let window = match compression {
                    Compression::Lz4 => data.len().max(1),
                    _ => envelope::PARALLEL_PIECE,
                };
                let mut frames = Vec::new();
                for chunk in data.chunks(window) {
                    frames.push(compression.compress(chunk)?);
                }
                if frames.is_empty() {
                    frames.push(compression.compress(&[])?);
                }
                Ok((
                    envelope::encode_frames(compression, size, crc, &frames),
                    crc,
                ))
            })
            .await??;
            drop(slot);
            let (stored_len, bundle) = match bundler.filter(|_| bundle::Bundler::takes(size)) {
                Some(b) => {
                    let stored_len = stored.len() as u64;
                    let (place, closed) = b.add(stored)?;
                    if let Some(closed) = closed {
                        b.store(repo, closed).await?;
                    }
                    (stored_len, Some(place))
                }
                None => {
                    let key = ObjectKey::BackupPart {
                        id: id.to_string(),
                        path: path.clone(),
                        part: u32::try_from(part).context("more than 4 billion pieces")?,
                    };
                    let stored_len = repo
                        .put(&key, stored, PutMode::CreateUnique)
                        .await
                        .with_context(|| format!("store {path}"))?
                        .stored_bytes();
                    (stored_len, None)
                }
            };
            Ok((
                index,
                part,
                Part {
                    size,
                    crc32c: crc,
                    stored: stored_len,
                    bundle,
                },
            ))
        }
    }
}
