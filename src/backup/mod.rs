//! `pitr backup`: a consistent, verifiable base backup of a running cluster, taken on its host.
//!
//! 1. Connect (one session from start to stop) and check the server is the one whose data
//!    directory we copy, that it archives WAL, and that it is the repository's cluster.
//! 2. `pg_backup_start(label, fast)` (`pg_start_backup(label, fast, false)` before 15).
//! 3. Copy the data directory and tablespaces in parallel pieces of at most `CHUNK_SIZE` (memory stays
//!    at about jobs × chunk whatever the database size), skipping what PostgreSQL's own base backup
//!    skips; `global/pg_control` last. Files that vanish are skipped, files that shrink are copied as
//!    they are: WAL replay from the backup's start repairs both, as it does for PostgreSQL's backups.
//! 4. `pg_backup_stop(false)`; store `backup_label` and `tablespace_map` byte for byte.
//! 5. Wait (with a deadline) until every WAL segment from start to stop is in the repository.
//! 6. Write the manifest, last. If anything fails or the process dies before, there is no
//!    manifest, the server session ends (which aborts the backup on the server), and the backup is
//!    not listed anywhere.

pub mod bundle;
pub mod incremental;
pub mod stream;
pub mod tar;
pub mod walk;

use std::io::IsTerminal;
use std::os::unix::fs::FileExt;

use crate::bigbuf::BigBuf;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures::StreamExt;

use crate::compress::Compression;
use crate::manifest::{
    BackupManifest, BackupType, CHUNK_SIZE, ChangedBlocks, FileEntry, MANIFEST_FORMAT_BUNDLED,
    MANIFEST_FORMAT_FULL, MANIFEST_FORMAT_INCREMENTAL, Parent, Part,
};
use crate::pg::PgTimestamp;
use crate::pg::{Lsn, SegmentName, SystemId, TimelineId, WalFileName};
use crate::pgconn;
use crate::storage::layout::ObjectKey;
use crate::storage::{PutMode, Repo, envelope};
use walk::SourceFile;

/// What to back up and how.
#[derive(Clone, Debug)]
pub struct BackupOptions {
    /// The data directory.
    pub pgdata: PathBuf,
    /// Connection string (`None`: PG* variables and the data directory's socket).
    pub dbname: Option<String>,
    /// Label for `pg_backup_start`.
    pub label: Option<String>,
    /// Parallel copy streams.
    pub jobs: usize,
    /// Compression of the stored files.
    pub compression: Compression,
    /// How long to wait for the backup's WAL to be archived.
    pub archive_timeout: Duration,
    /// Show a progress bar (on a terminal).
    pub progress: bool,
    /// Full, or the changed blocks since a parent (incremental, differential).
    pub backup_type: BackupType,
    /// Store small pieces together in bundles (see [`bundle`]); off, every piece is an object of
    /// its own, as earlier versions stored them.
    pub bundle: bool,
}

/// The label file fields pitr needs (`read_backup_label()` in xlogrecovery.c reads the same).
#[derive(Debug, PartialEq, Eq)]
pub struct LabelInfo {
    /// START WAL LOCATION.
    pub start_lsn: Lsn,
    /// The segment named on that line.
    pub start_wal: SegmentName,
    /// CHECKPOINT LOCATION.
    pub checkpoint_lsn: Lsn,
    /// START TIMELINE.
    pub timeline: TimelineId,
}

/// Parse the `backup_label` content returned by `pg_backup_stop`.
///
/// # Errors
/// A missing or malformed line.
pub fn parse_label(text: &str) -> anyhow::Result<LabelInfo> {
    let field = |key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(key))
            .map(str::trim)
    };
    let start = field("START WAL LOCATION:").context("backup_label has no START WAL LOCATION")?;
    let (lsn, file) = start
        .split_once(" (file ")
        .context("malformed START WAL LOCATION")?;
    let start_lsn: Lsn = lsn.parse()?;
    let start_wal: SegmentName = file
        .trim_end_matches(')')
        .parse()
        .context("malformed START WAL LOCATION")?;
    let checkpoint_lsn: Lsn = field("CHECKPOINT LOCATION:")
        .context("backup_label has no CHECKPOINT LOCATION")?
        .parse()?;
    let tli: u32 = field("START TIMELINE:")
        .context("backup_label has no START TIMELINE")?
        .parse()?;
    let timeline = TimelineId::new(tli).context("START TIMELINE 0")?;
    Ok(LabelInfo {
        start_lsn,
        start_wal,
        checkpoint_lsn,
        timeline,
    })
}

/// `YYYYMMDDTHHMMSSZ` for a Unix time in microseconds.
pub fn backup_id(unix_micros: i64) -> String {
    PgTimestamp::from_unix_micros(unix_micros).compact_utc()
}

/// Claim an id for a backup starting at `unix_micros` under which nothing is stored yet, not even
/// pieces of an interrupted backup that started in the same second (`…Z`, then `…Z-2`, `…Z-3`, …).
/// The claim is a conditional create of `backups/<id>/started.pitr`, so two backups started at once
/// never share an id: the second finds the claim taken and moves on. A local repository keeps the
/// directory of a backup killed before its first piece was complete; that id is skipped too.
///
/// # Errors
/// The store cannot be listed or written.
pub async fn fresh_backup_id(repo: &Repo, unix_micros: i64) -> anyhow::Result<String> {
    let taken: std::collections::HashSet<String> = repo
        .list_dirs(&crate::storage::layout::Prefix::Backups)
        .await?
        .into_iter()
        .collect();
    let base = backup_id(unix_micros);
    // Unique to this attempt, so that a claim found stored is never mistaken for our own.
    let nonce = {
        use std::hash::{BuildHasher, Hasher};
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u128(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos()),
        );
        format!("{:016x}", h.finish())
    };
    let claim = serde_json::to_vec(&serde_json::json!({
        "nonce": nonce,
        "pid": std::process::id(),
        "started_at_unix_micros": unix_micros,
        "program_version": env!("CARGO_PKG_VERSION"),
    }))?;
    for n in 1..=1000u32 {
        let id = if n == 1 {
            base.clone()
        } else {
            format!("{base}-{n}")
        };
        if taken.contains(&id) {
            continue;
        }
        let stored = envelope::encode(&claim, Compression::None)?;
        match repo
            .put(
                &ObjectKey::BackupClaim(id.clone()),
                stored,
                PutMode::CreateUnique,
            )
            .await
        {
            Ok(_) => return Ok(id),
            Err(crate::storage::RepoError::Conflict { .. }) => continue, // another backup got it
            Err(e) => return Err(anyhow::Error::new(e).context(format!("claim backup id {id}"))),
        }
    }
    anyhow::bail!(
        "no free backup id after {base}-1000 (more than 1000 backups started in one second?)"
    )
}

/// A file to copy: whole, or (in an incremental backup) only its changed blocks.
#[derive(Clone, Debug)]
pub struct ToCopy {
    /// The file.
    pub src: SourceFile,
    /// The blocks to store and the restored length; `None`: the file whole.
    pub changed: Option<ChangedBlocks>,
}

impl ToCopy {
    /// The bytes this file's pieces hold.
    fn bytes(&self, block_size: u64) -> u64 {
        self.changed
            .as_ref()
            .map_or(self.src.size, |c| c.blocks.len() as u64 * block_size)
    }
}

/// One piece to copy: of file `file` of the backup's list, in the data directory `root`
/// (tablespaces through their `pg_tblspc` links: paths are not stored per file).
struct CopyJob {
    root: Arc<Path>,
    files: Arc<Vec<ToCopy>>,
    file: u32,
    part: u32,
    span: Span,
}

impl CopyJob {
    fn file(&self) -> std::io::Result<&ToCopy> {
        self.files
            .get(self.file as usize)
            .ok_or_else(|| std::io::Error::other(format!("no file number {}", self.file)))
    }
}

/// What one piece holds.
#[derive(Clone, Copy, Debug)]
enum Span {
    /// Up to `len` bytes of the file from `offset`.
    Bytes { offset: u64, len: u64 },
    /// Entries `from..to` of the file's changed-block list, one block each.
    Blocks {
        from: usize,
        to: usize,
        block_size: u64,
    },
}

enum PartOutcome {
    /// Stored; with the relation blocks that failed their page checksum.
    Stored(Part, Vec<u32>),
    Vanished,
}

/// The cluster's page geometry, and whether its pages carry checksums.
#[derive(Clone, Copy, Debug)]
pub struct Geometry {
    /// `data_checksums`.
    pub checksums: bool,
    /// `block_size`.
    pub block_size: usize,
    /// `segment_size` in blocks (`RELSEG_SIZE`).
    pub segment_blocks: u32,
    /// `wal_segment_size`: the server's, since a first backup may finish before the repository
    /// has recorded the cluster (its first segment is archived as the backup stops).
    pub wal_segment_size: crate::pg::WalSegSize,
}

/// How pages are checked while they are copied (clusters with data checksums).
#[derive(Clone, Copy, Debug)]
pub struct PageCheck {
    /// The backup's start LSN: pages changed since are rewritten by recovery and not judged.
    pub start: Lsn,
    /// `block_size`.
    pub block_size: usize,
    /// `segment_size` in blocks (`RELSEG_SIZE`).
    pub segment_blocks: u32,
}

impl PageCheck {
    /// The relation blocks of `buf`, read from the relation file `rel` (page `i` of `buf` from
    /// the file offset `offset_of(i)`), that fail their checksum twice (a page is read again, in
    /// case it was being written at the first read).
    fn failures(
        &self,
        file: &std::fs::File,
        rel: &str,
        buf: &[u8],
        offset_of: impl Fn(usize) -> u64,
    ) -> Vec<u32> {
        let Some(segno) = crate::pg::page::relation_file_segno(rel) else {
            return Vec::new();
        };
        let bs = self.block_size as u64;
        let seg_first = u64::from(segno) * u64::from(self.segment_blocks);
        let mut bad = Vec::new();
        for (i, page) in buf.chunks_exact(self.block_size).enumerate() {
            let at = offset_of(i);
            let blkno = (seg_first + at / bs) as u32;
            if crate::pg::page::verifies(page, blkno, self.start) {
                continue;
            }
            let mut again = vec![0u8; self.block_size];
            let reread = file.read_exact_at(&mut again, at).is_ok()
                && crate::pg::page::verifies(&again, blkno, self.start);
            if !reread {
                tracing::warn!(
                    "{rel}: block {blkno} fails its page checksum (stored {:04x}, computed {:04x})",
                    crate::pg::page::stored_checksum(page),
                    crate::pg::page::checksum(page, blkno)
                );
                bad.push(blkno);
            }
        }
        bad
    }
}

/// A piece read and wrapped.
struct ReadPiece {
    /// The envelope.
    stored: Vec<u8>,
    /// CRC-32C of the original bytes.
    crc: u32,
    /// Their length.
    size: u64,
    /// Relation blocks that failed their page checksum.
    bad: Vec<u32>,
}

/// Fill `dest` from `offset` of `f`, as far as the file goes; returns the bytes read.
fn read_into(f: &std::fs::File, dest: &mut [u8], offset: u64) -> std::io::Result<usize> {
    let mut filled = 0;
    while let Some(rest) = dest.get_mut(filled..).filter(|r| !r.is_empty()) {
        match f.read_at(rest, offset + filled as u64) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// Read one piece of a file and wrap it (blocking: runs on the blocking pool). The piece is read
/// and compressed [`envelope::PARALLEL_PIECE`] bytes at a time, each a zstd frame of its own, so
/// memory holds one such window and the compressed piece, not the whole piece (lz4 compresses a
/// piece as one block: it is read whole).
fn read_piece(
    job: &CopyJob,
    compression: Compression,
    check: Option<PageCheck>,
) -> std::io::Result<Option<ReadPiece>> {
    let file = job.file()?;
    let f = match std::fs::File::open(job.root.join(&file.src.rel)) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let rel = &file.src.rel;
    let blocks: &[u32] = match job.span {
        Span::Blocks { from, to, .. } => file
            .changed
            .as_ref()
            .and_then(|c| c.blocks.get(from..to))
            .unwrap_or_default(),
        Span::Bytes { .. } => &[],
    };
    let (total, block_size) = match job.span {
        Span::Bytes { len, .. } => (len, 1),
        Span::Blocks { block_size, .. } => (blocks.len() as u64 * block_size, block_size),
    };
    // The file offset of byte `at` of the piece.
    let file_offset = |at: u64| match job.span {
        Span::Bytes { offset, .. } => offset + at,
        Span::Blocks { block_size, .. } => blocks
            .get((at / block_size) as usize)
            .map_or(0, |&b| u64::from(b) * block_size),
    };
    let window = match compression {
        Compression::Lz4 => total.max(1),
        _ => envelope::PARALLEL_PIECE as u64,
    };
    let mut buf = BigBuf::zeroed(window.min(total) as usize);
    let (mut frames, mut crc, mut size, mut bad) = (Vec::new(), 0u32, 0u64, Vec::new());
    let mut at = 0u64;
    while at < total {
        let want = window.min(total - at) as usize;
        let Some(chunk) = buf.as_mut_slice().get_mut(..want) else {
            break;
        };
        let got = match job.span {
            // Up to `want` bytes: a relation may shrink while it is copied (WAL replay repairs that).
            Span::Bytes { .. } => read_into(&f, chunk, file_offset(at))?,
            // Every block in full: one cut off since the listing stays zeros (WAL replay
            // truncates the file again).
            Span::Blocks { .. } => {
                chunk.fill(0);
                let first = (at / block_size) as usize;
                let bs = block_size as usize;
                let mine = blocks.get(first..first + want / bs).unwrap_or_default();
                let mut i = 0;
                while let Some(&start) = mine.get(i) {
                    let mut n = 1;
                    while mine.get(i + n) == Some(&(start + n as u32)) {
                        n += 1;
                    }
                    if let Some(run) = chunk.get_mut(i * bs..(i + n) * bs) {
                        read_into(&f, run, u64::from(start) * block_size)?;
                    }
                    i += n;
                }
                want
            }
        };
        let data = chunk.get(..got).unwrap_or_default();
        if let Some(c) = check {
            bad.extend(c.failures(&f, rel, data, |i| {
                file_offset(at + (i * c.block_size) as u64)
            }));
        }
        crc = crc32c::crc32c_append(crc, data);
        frames.push(compression.compress(data)?);
        size += got as u64;
        if got < want {
            break;
        }
        at += want as u64;
    }
    if frames.is_empty() {
        frames.push(compression.compress(&[])?);
    }
    Ok(Some(ReadPiece {
        stored: envelope::encode_frames(compression, size, crc, &frames),
        crc,
        size,
        bad,
    }))
}

async fn copy_piece(
    repo: &Repo,
    id: &str,
    job: CopyJob,
    (compression, check): (Compression, Option<PageCheck>),
    bundler: Option<&bundle::Bundler>,
) -> anyhow::Result<(CopyJob, PartOutcome)> {
    let files = job.files.clone();
    let file = job.file()?;
    let rel = file.src.rel.clone();
    let abs = job.root.join(&rel);
    let slot = crate::cpu::slots().acquire().await?;
    let (job, read) = tokio::task::spawn_blocking(move || {
        let r = read_piece(&job, compression, check);
        (job, r)
    })
    .await?;
    drop(slot);
    let read = read.with_context(|| format!("read {}", abs.display()))?;
    drop(files);
    let Some(ReadPiece {
        stored,
        crc,
        size,
        bad,
    }) = read
    else {
        return Ok((job, PartOutcome::Vanished));
    };
    if let Some(bundler) = bundler.filter(|_| bundle::Bundler::takes(size)) {
        let stored_len = stored.len() as u64;
        let (place, closed) = bundler.add(stored)?;
        if let Some(closed) = closed {
            bundler.store(repo, closed).await?;
        }
        let part = Part {
            size,
            crc32c: crc,
            stored: stored_len,
            bundle: Some(place),
        };
        return Ok((job, PartOutcome::Stored(part, bad)));
    }
    let key = ObjectKey::BackupPart {
        id: id.to_string(),
        path: rel.clone(),
        part: job.part,
    };
    let stored_len = repo
        .put(&key, stored, PutMode::CreateUnique)
        .await
        .with_context(|| format!("store {rel}"))?
        .stored_bytes();
    Ok((
        job,
        PartOutcome::Stored(
            Part {
                size,
                crc32c: crc,
                stored: stored_len,
                bundle: None,
            },
            bad,
        ),
    ))
}

/// The pieces of one file: `CHUNK_SIZE` bytes each, or as many changed blocks. A file stored
/// whole has at least one piece (an empty one for an empty file); a file of changed blocks has
/// none when no block changed.
fn jobs_for(
    (root, files): (&Arc<Path>, &Arc<Vec<ToCopy>>),
    n: u32,
    block_size: u64,
) -> Vec<CopyJob> {
    let Some(file) = files.get(n as usize) else {
        return Vec::new();
    };
    match &file.changed {
        None => {
            let size = file.src.size;
            let pieces = size.div_ceil(CHUNK_SIZE).max(1);
            (0..pieces)
                .map(|i| CopyJob {
                    root: root.clone(),
                    files: files.clone(),
                    file: n,
                    part: i as u32,
                    span: Span::Bytes {
                        offset: i * CHUNK_SIZE,
                        len: CHUNK_SIZE.min(size - i * CHUNK_SIZE),
                    },
                })
                .collect()
        }
        Some(changed) => {
            let per = (CHUNK_SIZE / block_size.max(1)).max(1) as usize;
            let total = changed.blocks.len();
            (0..total.div_ceil(per))
                .map(|i| CopyJob {
                    root: root.clone(),
                    files: files.clone(),
                    file: n,
                    part: i as u32,
                    span: Span::Blocks {
                        from: i * per,
                        to: ((i + 1) * per).min(total),
                        block_size,
                    },
                })
                .collect()
        }
    }
}

/// Copy `files` in parallel, the small pieces into `bundler`'s bundles when there is one (the
/// caller stores the last, unfilled one); returns their manifest entries (vanished files left
/// out).
async fn copy_files(
    repo: &Repo,
    (id, bundler): (&str, Option<&bundle::Bundler>),
    (root, files): (&Path, Vec<ToCopy>),
    opts: &BackupOptions,
    (geometry, check): (Geometry, Option<PageCheck>),
    bar: &indicatif::ProgressBar,
) -> anyhow::Result<Vec<FileEntry>> {
    let block_size = geometry.block_size as u64;
    if u32::try_from(files.len()).is_err() {
        bail!("{} files to copy: more than a backup holds", files.len());
    }
    // Per file: where its pieces start in `parts` (one flat list: 121,000 files are 121,000
    // small lists otherwise).
    let mut first = Vec::with_capacity(files.len() + 1);
    let mut total = 0usize;
    for f in &files {
        first.push(total);
        total += piece_count(f, block_size);
    }
    first.push(total);
    let files = Arc::new(files);
    let mut parts: Vec<Option<Part>> = vec![None; total];
    let mut vanished = vec![false; files.len()];
    let mut bad: std::collections::HashMap<u32, Vec<u32>> = std::collections::HashMap::new();
    let jobs = {
        let (root, files): (Arc<Path>, _) = (Arc::from(root), files.clone());
        futures::stream::iter(0..files.len() as u32)
            .flat_map(move |n| futures::stream::iter(jobs_for((&root, &files), n, block_size)))
    };
    let mut stream = jobs
        .map(|job| copy_piece(repo, id, job, (opts.compression, check), bundler))
        .buffer_unordered(opts.jobs.max(1));
    while let Some(done) = stream.next().await {
        let (job, outcome) = done?;
        let i = job.file as usize;
        match outcome {
            PartOutcome::Stored(p, failed) => {
                bar.inc(p.size);
                let slot = first.get(i).map(|f| f + job.part as usize);
                if let Some(slot) = slot.and_then(|s| parts.get_mut(s)) {
                    *slot = Some(p);
                }
                if !failed.is_empty() {
                    bad.entry(job.file).or_default().extend(failed);
                }
            }
            PartOutcome::Vanished => {
                if let Ok(f) = job.file() {
                    tracing::debug!("{} vanished during the backup; skipped", f.src.rel);
                }
                if let Some(v) = vanished.get_mut(i) {
                    *v = true;
                }
            }
        }
    }
    drop(stream);
    let files =
        Arc::try_unwrap(files).map_err(|_| anyhow::anyhow!("a piece copy outlived the backup"))?;
    let mut out = Vec::with_capacity(files.len());
    let mut parts = parts.into_iter();
    for (i, f) in files.into_iter().enumerate() {
        let n = first.get(i + 1).zip(first.get(i)).map_or(0, |(b, a)| b - a);
        let mine: Vec<Option<Part>> = parts.by_ref().take(n).collect();
        if vanished.get(i).copied().unwrap_or(true) {
            continue;
        }
        let parts: Vec<Part> = mine
            .into_iter()
            .map(|p| p.context("a piece was never reported"))
            .collect::<anyhow::Result<_>>()?;
        let mut failures = bad.remove(&(i as u32)).unwrap_or_default();
        failures.sort_unstable();
        out.push(FileEntry {
            path: f.src.rel,
            size: parts.iter().map(|p| p.size).sum(),
            mtime: f.src.mtime,
            mode: f.src.mode,
            parts,
            checksum_failures: failures,
            changed: f.changed,
        });
    }
    Ok(out)
}

/// How many pieces [`jobs_for`] makes of `file`.
fn piece_count(file: &ToCopy, block_size: u64) -> usize {
    match &file.changed {
        None => file.src.size.div_ceil(CHUNK_SIZE).max(1) as usize,
        Some(c) => c
            .blocks
            .len()
            .div_ceil((CHUNK_SIZE / block_size.max(1)).max(1) as usize),
    }
}

pub use crate::catalog::needed_segments;

/// Take a base backup into `repo`.
///
/// # Errors
/// Anything that keeps the backup from being complete; no manifest is written then.
pub async fn run(repo: &Repo, opts: &BackupOptions) -> anyhow::Result<BackupManifest> {
    let started = Instant::now();
    let pgdata = opts
        .pgdata
        .canonicalize()
        .with_context(|| format!("open data directory {}", opts.pgdata.display()))?;
    if !pgdata.join("PG_VERSION").is_file() {
        bail!(
            "{} is not a PostgreSQL data directory (no PG_VERSION)",
            pgdata.display()
        );
    }
    let cfg = pgconn::config(opts.dbname.as_deref(), Some(&pgdata))?;
    let client = pgconn::connect(&cfg).await?;
    let major = pgconn::server_major(&client).await?;
    let sysid = check_server(repo, &client, &cfg, &pgdata).await?;

    // Start.
    let now_us: i64 = client
        .query_one(
            "SELECT (extract(epoch FROM clock_timestamp()) * 1000000)::int8",
            &[],
        )
        .await?
        .get(0);
    let id = fresh_backup_id(repo, now_us).await?;
    let label = opts.label.clone().unwrap_or_else(|| format!("pitr {id}"));
    let geometry = geometry(&client).await?;
    let (start_lsn, start_time) = start_backup(&client, major, &label).await?;
    let check = geometry.checksums.then_some(PageCheck {
        start: start_lsn,
        block_size: geometry.block_size,
        segment_blocks: geometry.segment_blocks,
    });
    tracing::info!("backup {id} started at {start_lsn} ({})", pgdata.display());

    // An incremental's parent and the blocks changed since it started, or why there are none.
    let (basis, fallback) = match opts.backup_type {
        BackupType::Full => (None, None),
        wanted => {
            let start = incremental_start(&client, start_lsn, sysid, major, geometry).await?;
            match incremental::prepare(repo, &client, wanted, &start, opts.archive_timeout).await? {
                Ok(basis) => (Some(basis), None),
                Err(why) => {
                    tracing::info!("taking a full backup instead of {wanted}: {why}");
                    (None, Some(why))
                }
            }
        }
    };

    // Copy.
    let listing = {
        let p = pgdata.clone();
        tokio::task::spawn_blocking(move || walk::list(&p))
            .await?
            .context("list the data directory")?
    };
    let block_size = geometry.block_size as u64;
    let mut files = to_copy(listing.files, basis.as_ref(), geometry);
    let total: u64 = files.iter().map(|f| f.bytes(block_size)).sum::<u64>()
        + listing.pg_control.as_ref().map_or(0, |f| f.size);
    let bar = progress_bar(opts.progress, total);
    // Big files first: the streams finish together.
    files.sort_by_key(|f| std::cmp::Reverse(f.bytes(block_size)));
    let bundler = opts.bundle.then(|| bundle::Bundler::new(&id, opts.jobs));
    let to = (id.as_str(), bundler.as_ref());
    let mut entries = copy_files(repo, to, (&pgdata, files), opts, (geometry, check), &bar).await?;
    if let Some(ctl) = listing.pg_control {
        let ctl = ToCopy {
            src: ctl,
            changed: None,
        };
        let ctl = (pgdata.as_path(), vec![ctl]);
        entries.extend(copy_files(repo, to, ctl, opts, (geometry, check), &bar).await?);
    }
    if let Some(b) = &bundler {
        if let Some(last) = b.finish()? {
            b.store(repo, last).await?;
        }
        b.wait().await?;
    }
    bar.finish_and_clear();

    let stopped = stop_backup(repo, &client, major, &id).await?;
    drop(client);

    // The WAL from start to stop must be archived before this is a backup.
    let info = &stopped.label;
    let needed = needed_segments(
        info.timeline,
        info.start_lsn,
        stopped.lsn,
        geometry.wal_segment_size,
    );
    tracing::info!(
        "backup {id} stopped at {}; waiting for WAL {} to {} to be archived",
        stopped.lsn,
        needed.first().map(ToString::to_string).unwrap_or_default(),
        needed.last().map(ToString::to_string).unwrap_or_default()
    );
    wait_for_wal(repo, &needed, opts.archive_timeout, &id).await?;

    let backup_type = if basis.is_some() {
        opts.backup_type
    } else {
        BackupType::Full
    };
    let manifest = BackupManifest {
        format_version: manifest_format(&entries, basis.is_some()),
        program_version: env!("CARGO_PKG_VERSION").to_string(),
        id: id.clone(),
        label,
        system_identifier: sysid,
        pg_version: major.number(),
        timeline: info.timeline,
        start_lsn: info.start_lsn,
        checkpoint_lsn: info.checkpoint_lsn,
        stop_lsn: stopped.lsn,
        start_time,
        stop_time: stopped.time,
        start_wal: info.start_wal,
        stop_wal: needed.last().copied().unwrap_or(info.start_wal),
        compression: opts.compression,
        size_bytes: entries.iter().map(|f| f.size).sum(),
        stored_bytes: entries
            .iter()
            .flat_map(|f| &f.parts)
            .map(|p| p.stored)
            .sum(),
        files: entries,
        directories: listing.directories,
        tablespaces: listing.tablespaces,
        has_tablespace_map: stopped.has_tablespace_map,
        data_checksums: check.is_some(),
        backup_type,
        parent: basis.map(|b| Parent {
            id: b.parent.id,
            start_lsn: b.parent.start_lsn,
            timeline: b.parent.timeline,
            block_size: geometry.block_size as u32,
            segment_blocks: geometry.segment_blocks,
        }),
        fallback,
        tally: None,
    };
    store_manifest(repo, &manifest).await?;
    tracing::debug!(
        "backup {id} complete in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok(manifest)
}

/// The server must be the one whose files we copy, it must archive its WAL, and the repository
/// must hold this cluster (or nothing yet). Returns its system identifier.
async fn check_server(
    repo: &Repo,
    client: &tokio_postgres::Client,
    cfg: &tokio_postgres::Config,
    pgdata: &Path,
) -> anyhow::Result<SystemId> {
    if let Ok(row) = client
        .query_one("SELECT current_setting('data_directory')", &[])
        .await
    {
        let dir: String = row.get(0);
        let theirs = Path::new(&dir)
            .canonicalize()
            .unwrap_or_else(|_| PathBuf::from(&dir));
        if theirs != pgdata {
            bail!(
                "the server at {} runs on {}, not on --pgdata {}",
                pgconn::describe(cfg),
                theirs.display(),
                pgdata.display()
            );
        }
    }
    let row = client.query_one("SELECT current_setting('archive_mode'), system_identifier::text FROM pg_control_system()", &[]).await?;
    let archive_mode: String = row.get(0);
    let sysid: SystemId = row
        .get::<_, String>(1)
        .parse()
        .context("the server's system identifier")?;
    // With archive_mode off, WAL can still reach the repository through `pitr receive` (a
    // walsender whose application_name is pitr); the wait for the backup's WAL checks it arrives.
    let streaming = archive_mode == "off"
        && client
            .query_one(
                "SELECT count(*) FROM pg_stat_replication WHERE application_name = 'pitr' AND state = 'streaming'",
                &[],
            )
            .await
            .map(|r| r.get::<_, i64>(0) > 0)
            .unwrap_or(false);
    if archive_mode == "off" && !streaming {
        bail!(
            "archive_mode is off on this server and no pitr receive streams from it: a backup without archived WAL can never be restored (set archive_mode = on and archive_command to pitr archive-push, then restart; or run pitr receive)"
        );
    }
    if let Some(identity) = repo.identity().await?
        && identity.system_identifier != sysid
    {
        bail!(crate::storage::RepoError::IdentityMismatch {
            repo: repo.location().to_string(),
            repo_has: format!("cluster {}", identity.system_identifier),
            found: format!("cluster {sysid} at {}", pgdata.display()),
        });
    }
    Ok(sysid)
}

/// The cluster's block size, relation segment size and whether it has data checksums.
async fn geometry(client: &tokio_postgres::Client) -> anyhow::Result<Geometry> {
    let row = client
        .query_one(
            "SELECT current_setting('data_checksums'), current_setting('block_size')::int4, (SELECT setting::int4 FROM pg_settings WHERE name = 'segment_size'), (SELECT setting::int8 FROM pg_settings WHERE name = 'wal_segment_size')",
            &[],
        )
        .await
        .context("read data_checksums, block_size, segment_size and wal_segment_size")?;
    let wal: i64 = row.get(3);
    let wal_segment_size = u32::try_from(wal)
        .ok()
        .and_then(crate::pg::WalSegSize::new)
        .with_context(|| format!("the server reports wal_segment_size {wal}"))?;
    let (bs, seg): (i32, i32) = (row.get(1), row.get(2));
    let block_size = usize::try_from(bs)
        .ok()
        .filter(|b| *b >= 1024 && b.is_power_of_two())
        .with_context(|| format!("the server reports block_size {bs}"))?;
    let segment_blocks = u32::try_from(seg)
        .ok()
        .filter(|s| *s > 0)
        .with_context(|| format!("the server reports segment_size {seg}"))?;
    Ok(Geometry {
        checksums: row.get::<_, String>(0) == "on",
        block_size,
        segment_blocks,
        wal_segment_size,
    })
}

/// Where an incremental backup that started at `lsn` starts: its timeline (from the checkpoint
/// `pg_backup_start` just wrote) and segment.
async fn incremental_start(
    client: &tokio_postgres::Client,
    lsn: Lsn,
    sysid: SystemId,
    major: crate::pg::PgMajor,
    geometry: Geometry,
) -> anyhow::Result<incremental::Start> {
    let tli: i32 = client
        .query_one("SELECT timeline_id FROM pg_control_checkpoint()", &[])
        .await
        .context("read the timeline (pg_control_checkpoint)")?
        .get(0);
    let timeline = u32::try_from(tli)
        .ok()
        .and_then(TimelineId::new)
        .with_context(|| format!("pg_control_checkpoint reports timeline {tli}"))?;
    let seg_size = geometry.wal_segment_size;
    let segment = SegmentName::new(timeline, lsn.segno(seg_size), seg_size)
        .with_context(|| format!("no WAL segment name for {lsn}"))?;
    Ok(incremental::Start {
        lsn,
        timeline,
        segment,
        system_identifier: sysid,
        pg_version: major.number(),
        block_size: geometry.block_size as u32,
    })
}

/// What to copy of each listed file: everything for a full backup; for an incremental, the
/// method [`incremental::method`] chooses against the parent.
fn to_copy(
    files: Vec<SourceFile>,
    basis: Option<&incremental::Basis>,
    geometry: Geometry,
) -> Vec<ToCopy> {
    let Some(basis) = basis else {
        return files
            .into_iter()
            .map(|src| ToCopy { src, changed: None })
            .collect();
    };
    let in_parent: std::collections::HashSet<&str> =
        basis.parent.files.iter().map(|f| f.path.as_str()).collect();
    let (mut whole, mut as_blocks) = (0usize, 0usize);
    let out: Vec<ToCopy> = files
        .into_iter()
        .map(|src| {
            let how = incremental::method(
                &src.rel,
                src.size,
                in_parent.contains(src.rel.as_str()),
                &basis.changes,
                geometry.block_size as u64,
                geometry.segment_blocks,
            );
            let changed = match how {
                incremental::Method::Whole(why) => {
                    tracing::trace!("{}: whole ({why})", src.rel);
                    whole += 1;
                    None
                }
                incremental::Method::Blocks { blocks, length } => {
                    as_blocks += 1;
                    Some(ChangedBlocks { length, blocks })
                }
            };
            ToCopy { src, changed }
        })
        .collect();
    tracing::info!(
        "incremental on backup {}: {as_blocks} files as changed blocks, {whole} whole",
        basis.parent.id
    );
    out
}

/// Start the backup (`pg_backup_start`, fast checkpoint); returns its start LSN and when it
/// started (server clock).
async fn start_backup(
    client: &tokio_postgres::Client,
    major: crate::pg::PgMajor,
    label: &str,
) -> anyhow::Result<(Lsn, PgTimestamp)> {
    let start_sql = if major >= crate::pg::PgMajor::V15 {
        "SELECT pg_backup_start($1, true)::text, (extract(epoch FROM clock_timestamp()) * 1000000)::int8"
    } else {
        "SELECT pg_start_backup($1, true, false)::text, (extract(epoch FROM clock_timestamp()) * 1000000)::int8"
    };
    let row = client
        .query_one(start_sql, &[&label])
        .await
        .context("start the backup (pg_backup_start)")?;
    let start_text: String = row.get(0);
    let lsn: Lsn = start_text
        .parse()
        .with_context(|| format!("pg_backup_start returned the LSN {start_text:?}"))?;
    Ok((lsn, PgTimestamp::from_unix_micros(row.get(1))))
}

/// What `pg_backup_stop` returned.
struct Stopped {
    /// The stop LSN.
    lsn: Lsn,
    /// When it returned (server clock).
    time: PgTimestamp,
    /// The fields of the `backup_label` it returned.
    label: LabelInfo,
    /// Whether it returned a tablespace map.
    has_tablespace_map: bool,
}

/// Stop the backup and store the `backup_label` (and `tablespace_map`) byte for byte.
async fn stop_backup(
    repo: &Repo,
    client: &tokio_postgres::Client,
    major: crate::pg::PgMajor,
    id: &str,
) -> anyhow::Result<Stopped> {
    let stop_sql = if major >= crate::pg::PgMajor::V15 {
        "SELECT lsn::text, labelfile, spcmapfile, (extract(epoch FROM clock_timestamp()) * 1000000)::int8 FROM pg_backup_stop(false)"
    } else {
        "SELECT lsn::text, labelfile, spcmapfile, (extract(epoch FROM clock_timestamp()) * 1000000)::int8 FROM pg_stop_backup(false, false)"
    };
    let row = client
        .query_one(stop_sql, &[])
        .await
        .context("stop the backup (pg_backup_stop)")?;
    let stop_text: String = row.get(0);
    let labelfile: String = row.get(1);
    let spcmap: Option<String> = row.get::<_, Option<String>>(2).filter(|s| !s.is_empty());
    let time = PgTimestamp::from_unix_micros(row.get(3));
    let lsn: Lsn = stop_text
        .parse()
        .with_context(|| format!("pg_backup_stop returned the LSN {stop_text:?}"))?;
    let label = parse_label(&labelfile).context("read the backup_label pg_backup_stop returned")?;
    store_label(
        repo,
        id,
        labelfile.as_bytes(),
        spcmap.as_deref().map(str::as_bytes),
    )
    .await?;
    Ok(Stopped {
        lsn,
        time,
        label,
        has_tablespace_map: spcmap.is_some(),
    })
}

/// The manifest format a backup of `files` needs: bundles need format 3, changed blocks 2.
pub(crate) fn manifest_format(files: &[FileEntry], incremental: bool) -> u32 {
    if files
        .iter()
        .flat_map(|f| &f.parts)
        .any(|p| p.bundle.is_some())
    {
        MANIFEST_FORMAT_BUNDLED
    } else if incremental {
        MANIFEST_FORMAT_INCREMENTAL
    } else {
        MANIFEST_FORMAT_FULL
    }
}

/// Store backup `id`'s `backup_label` and, when there is one, its `tablespace_map`, byte for byte.
///
/// # Errors
/// The store refuses.
pub(crate) async fn store_label(
    repo: &Repo,
    id: &str,
    label: &[u8],
    map: Option<&[u8]>,
) -> anyhow::Result<()> {
    let key = ObjectKey::BackupLabel(id.to_string());
    repo.put(
        &key,
        repo.seal(&key, label, Compression::None)?,
        PutMode::CreateUnique,
    )
    .await
    .context("store backup_label")?;
    if let Some(map) = map {
        let key = ObjectKey::TablespaceMap(id.to_string());
        repo.put(
            &key,
            repo.seal(&key, map, Compression::None)?,
            PutMode::CreateUnique,
        )
        .await
        .context("store tablespace_map")?;
    }
    Ok(())
}

/// Store a backup's manifest, last: the backup exists from then on. Written as a stream of
/// compressed windows: the JSON of 100,000 files (some 25 MiB) is never held whole.
///
/// # Errors
/// The store refuses.
pub(crate) async fn store_manifest(repo: &Repo, manifest: &BackupManifest) -> anyhow::Result<()> {
    let mut sealed = repo.sealing(Compression::Zstd);
    serde_json::to_writer(&mut sealed, manifest)?;
    let key = ObjectKey::BackupManifest(manifest.id.clone());
    repo.put(&key, sealed.finish()?, PutMode::CreateUnique)
        .await
        .context("store the backup manifest")?;
    Ok(())
}

pub(crate) async fn wait_for_wal(
    repo: &Repo,
    needed: &[SegmentName],
    timeout: Duration,
    id: &str,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    for seg in needed {
        let key = ObjectKey::Wal(WalFileName::Segment(*seg));
        if !wait_stored(repo, &key, deadline).await? {
            bail!(
                "WAL segment {seg} needed by backup {id} did not reach the repository within {}; the backup is incomplete and not listed (check archive_command and pg_stat_archiver)",
                humantime::format_duration(timeout)
            );
        }
    }
    Ok(())
}

/// Poll until `key` is stored (`true`) or `deadline` passes (`false`).
///
/// # Errors
/// The store cannot be asked.
pub(crate) async fn wait_stored(
    repo: &Repo,
    key: &ObjectKey,
    deadline: Instant,
) -> anyhow::Result<bool> {
    loop {
        if repo.exists(key).await? {
            return Ok(true);
        }
        if Instant::now() >= deadline {
            return Ok(false);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A byte progress bar on stderr when it is a terminal (never in PostgreSQL's log), else hidden.
pub(crate) fn progress_bar(enabled: bool, total: u64) -> indicatif::ProgressBar {
    if !enabled || !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(total);
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "{spinner} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta}",
    ) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_real_label() {
        let text = "START WAL LOCATION: 0/6000028 (file 000000010000000000000006)\nCHECKPOINT LOCATION: 0/6000060\nBACKUP METHOD: streamed\nBACKUP FROM: primary\nSTART TIME: 2026-11-21 10:13:00 UTC\nLABEL: lowlevel\nSTART TIMELINE: 1\n";
        let l = parse_label(text).unwrap();
        assert_eq!(l.start_lsn, Lsn(0x600_0028));
        assert_eq!(l.start_wal.to_string(), "000000010000000000000006");
        assert_eq!(l.checkpoint_lsn, Lsn(0x600_0060));
        assert_eq!(l.timeline, TimelineId::ONE);
        assert!(parse_label("LABEL: x\n").is_err());
    }

    #[tokio::test]
    async fn ids_never_reuse_an_interrupted_backup() {
        let repo = Repo::from_store(Arc::new(object_store::memory::InMemory::new()), "memory://");
        let t = 1_795_255_984_919_520;
        assert_eq!(fresh_backup_id(&repo, t).await.unwrap(), "20261121T101304Z");
        // An interrupted backup left a piece but no manifest.
        let piece = ObjectKey::BackupPart {
            id: "20261121T101304Z".into(),
            path: "base/1/1".into(),
            part: 0,
        };
        repo.put(
            &piece,
            envelope::encode(b"x", Compression::None).unwrap(),
            PutMode::CreateUnique,
        )
        .await
        .unwrap();
        assert_eq!(
            fresh_backup_id(&repo, t + 10).await.unwrap(),
            "20261121T101304Z-2"
        );
    }

    #[tokio::test]
    async fn backups_started_at_once_get_different_ids() {
        let repo = Repo::from_store(Arc::new(object_store::memory::InMemory::new()), "memory://");
        let t = 1_795_255_984_919_520;
        let (a, b) = tokio::join!(fresh_backup_id(&repo, t), fresh_backup_id(&repo, t));
        let (a, b) = (a.unwrap(), b.unwrap());
        assert_ne!(a, b);
        let mut both = [a, b];
        both.sort();
        assert_eq!(both, ["20261121T101304Z", "20261121T101304Z-2"]);
    }

    #[test]
    fn pieces_are_read_a_window_at_a_time_and_decode_to_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("16384");
        let data: Vec<u8> = (0..5 * envelope::PARALLEL_PIECE + 12345)
            .map(|i| (i * 7 % 251) as u8)
            .collect();
        std::fs::write(&path, &data).unwrap();
        let src = SourceFile {
            rel: "16384".into(),
            size: data.len() as u64,
            mtime: 0,
            mode: 0o600,
        };
        let job = |changed: Option<ChangedBlocks>, span: Span| CopyJob {
            root: Arc::from(dir.path()),
            files: Arc::new(vec![ToCopy {
                src: src.clone(),
                changed,
            }]),
            file: 0,
            part: 0,
            span,
        };
        for compression in [Compression::Zstd, Compression::Lz4, Compression::None] {
            // A whole piece, and one that asks for more than the file holds (it shrank).
            for (offset, len) in [(0, data.len() as u64), (8192, data.len() as u64)] {
                let piece = read_piece(&job(None, Span::Bytes { offset, len }), compression, None)
                    .unwrap()
                    .unwrap();
                let want = &data[offset as usize..];
                assert_eq!(piece.size, want.len() as u64);
                assert_eq!(piece.crc, crc32c::crc32c(want));
                assert_eq!(
                    envelope::decode(&piece.stored).unwrap(),
                    want,
                    "{compression}"
                );
            }
        }
        // Changed blocks: one past the end of the file reads as zeros.
        let past = (data.len() / 8192 + 3) as u32;
        let changed = ChangedBlocks {
            length: past + 1,
            blocks: vec![1, 2, 5, past],
        };
        let piece = read_piece(
            &job(
                Some(changed),
                Span::Blocks {
                    from: 0,
                    to: 4,
                    block_size: 8192,
                },
            ),
            Compression::Zstd,
            None,
        )
        .unwrap()
        .unwrap();
        let mut want = Vec::new();
        for b in [1usize, 2, 5] {
            want.extend_from_slice(&data[b * 8192..(b + 1) * 8192]);
        }
        want.extend_from_slice(&[0u8; 8192]);
        assert_eq!(envelope::decode(&piece.stored).unwrap(), want);
    }

    #[test]
    fn ids_of_any_time_never_panic() {
        assert_eq!(backup_id(0), "19700101T000000Z");
        assert_eq!(backup_id(951_782_400_000_000), "20000229T000000Z");
        for t in [i64::MIN, i64::MAX, -1, 253_402_300_800_000_000] {
            assert!(backup_id(t).ends_with('Z'));
        }
    }

    #[tokio::test]
    async fn ids_never_reuse_an_empty_backup_directory() {
        // Killed before its first piece was renamed into place: only directories remain.
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("backups/20261121T101304Z/data/base")).unwrap();
        let store = object_store::local::LocalFileSystem::new_with_prefix(dir.path()).unwrap();
        let repo = Repo::from_store(Arc::new(store), "file://");
        let t = 1_795_255_984_919_520;
        assert_eq!(
            fresh_backup_id(&repo, t).await.unwrap(),
            "20261121T101304Z-2"
        );
    }

    #[test]
    fn ids_and_needed_wal() {
        assert_eq!(backup_id(1_795_255_984_919_520), "20261121T101304Z");
        let sz = crate::pg::WalSegSize::DEFAULT;
        let names: Vec<String> =
            needed_segments(TimelineId::ONE, Lsn(0x600_0028), Lsn(0x800_0000), sz)
                .iter()
                .map(ToString::to_string)
                .collect();
        // The stop LSN is an end pointer: exactly at a boundary it belongs to the previous segment.
        assert_eq!(
            names,
            ["000000010000000000000006", "000000010000000000000007"]
        );
        assert_eq!(
            needed_segments(TimelineId::ONE, Lsn(0x600_0028), Lsn(0x600_0100), sz).len(),
            1
        );
    }
}
