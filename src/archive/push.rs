//! `archive-push`: validate a WAL file PostgreSQL hands over, then store it with a conditional create.
//!
//! Nothing is stored unless the file is what its name says: a segment (or `.partial`) whose long page
//! header has a supported magic, a valid segment and page size, the page address the name implies,
//! and the system identifier the repository recorded; a `.history` file that parses; a `.backup`
//! file that looks like one. An identical copy already stored is success (PostgreSQL re-archives
//! after a crash, and `archive_mode=always` standbys push the same files); different bytes under
//! the same name are refused and the stored object is left alone.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::bigbuf::BigBuf;
use crate::compress::Compression;
use crate::index::{self, ParseStatus, SegmentSummary};
use crate::pg::SegmentName;
use crate::pg::WalFileName;
use crate::pg::segment::{SIZE_OF_LONG_PHD, validate_segment_start};
use crate::pg::timeline::History;
use crate::storage::envelope;
use crate::storage::identity::RepoIdentity;
use crate::storage::layout::{ObjectKey, Prefix};
use crate::storage::staged::Staged;
use crate::storage::{Original, Payload, PutMode, PutOutcome, Repo, RepoError};

/// What a push did.
#[derive(Clone, Debug)]
pub struct PushReport {
    /// The file archived.
    pub name: WalFileName,
    /// Stored now, or found already stored.
    pub outcome: PutOutcome,
    /// Size of the file.
    pub original_bytes: u64,
    /// Wall time of the whole push.
    pub elapsed: Duration,
}

/// The WAL file name at the end of `path`.
///
/// # Errors
/// When the path does not end in a WAL file name.
pub fn name_of(path: &Path) -> anyhow::Result<WalFileName> {
    let file = path
        .file_name()
        .and_then(|f| f.to_str())
        .with_context(|| format!("{} does not name a file", path.display()))?;
    Ok(file.parse::<WalFileName>()?)
}

/// How many threads one push uses to read and compress a segment: the machine's cores, up to 4.
pub fn push_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get().min(4))
}

/// A WAL file validated, indexed and encoded, ready to be stored. The original bytes are not kept:
/// the file stays in place until PostgreSQL hears it is archived, and is read again only if an object
/// already stored under its name has to be compared.
pub struct Prepared {
    /// The file's name.
    pub name: WalFileName,
    path: PathBuf,
    stored: envelope::Encoded,
    /// The stored length (`stored` is emptied once a staging file holds the bytes).
    stored_len: u64,
    original_len: u64,
    /// The segment's summary, and whether `stored` carries it (else it is stored beside).
    summary: Option<(SegmentName, SegmentSummary, bool)>,
    /// The check of the segment's cluster against the repository, still running: `store` waits for
    /// it before writing anything.
    identity: Option<tokio::task::JoinHandle<Result<(), RepoError>>>,
    /// Whether the segment is already stored, asked while compressing.
    looked: Option<tokio::task::JoinHandle<Result<bool, RepoError>>>,
    /// In a local repository, the object already written to a staging file beside its name.
    staged: Option<Staged>,
}

/// Archive the file at `wal_path` into `repo`: [`prepare`], then [`store`].
///
/// # Errors
/// Any failure; nothing is acknowledged unless the object is durably stored.
pub async fn push(
    repo: &Repo,
    wal_path: &Path,
    compression: Compression,
) -> anyhow::Result<PushReport> {
    let start = Instant::now();
    let prepared = prepare(repo, wal_path, compression).await?;
    store_prepared(repo, prepared, compression, start).await
}

/// Validate, index and encode the file at `wal_path`.
///
/// A segment is mapped from the page cache (no buffer to fault in, zero and copy into: that was a
/// third of the work), then indexed on one thread while `push_threads()` threads compress 2 MiB
/// pieces of it; the repository identity check starts meanwhile (once per process), and [`store`]
/// waits for it.
///
/// # Errors
/// The file is not what its name says, belongs to another cluster, or cannot be read.
pub async fn prepare(
    repo: &Repo,
    wal_path: &Path,
    compression: Compression,
) -> anyhow::Result<Prepared> {
    prepare_known(repo, wal_path, compression, Known::Ask).await
}

/// What a caller knows about whether the repository already holds a file.
pub enum Known {
    /// Nothing: the push looks it up itself, while compressing.
    Ask,
    /// The answer (from one listing for a batch).
    Is(bool),
    /// The answer of a listing for a batch that is still running, awaited while compressing; `None`
    /// when the listing could not answer, and the push looks the file up itself.
    Pending(futures::future::BoxFuture<'static, Option<bool>>),
}

/// [`prepare`], where the caller may already know, or be finding out, whether the repository holds
/// the file (from one listing for a batch), so no lookup of its own is needed.
///
/// # Errors
/// As [`prepare`].
pub async fn prepare_known(
    repo: &Repo,
    wal_path: &Path,
    compression: Compression,
    known: Known,
) -> anyhow::Result<Prepared> {
    let name = name_of(wal_path)?;
    let Some(opened) = open_segment(wal_path, name)? else {
        return prepare_small(repo, wal_path, name, compression).await;
    };
    let identity = check_identity(repo, &opened);
    // A local repository gets the frames as they are done (see `staged`), unless the segment is
    // known to be stored already.
    let staged = match repo.local_wal_path(name) {
        Some(dest) if !matches!(known, Known::Is(true)) => Staged::begin(&dest).ok(),
        _ => None,
    };
    let stored_already = look_up(repo, name, known);
    let (stored, summary, staged) = encode_opened(opened, compression, staged).await?;
    Ok(Prepared::new(
        name,
        wal_path,
        (stored, len_of(wal_path)),
        summary,
        Some(identity),
        Some(stored_already),
        staged,
    ))
}

/// A segment file opened and its first page checked.
pub struct Opened {
    name: WalFileName,
    seg: SegmentName,
    file: std::fs::File,
    len: usize,
    header: crate::pg::segment::SegmentHeader,
    display: String,
}

/// Open the segment (or partial segment) at `wal_path` and check its first page; `None` for a
/// history or backup history file.
///
/// # Errors
/// The file cannot be read, or is not the segment its name says.
fn open_segment(wal_path: &Path, name: WalFileName) -> anyhow::Result<Option<Opened>> {
    let seg = match name {
        WalFileName::Segment(seg) | WalFileName::Partial(seg) => seg,
        WalFileName::History(_) | WalFileName::BackupHistory { .. } => return Ok(None),
    };
    let file =
        std::fs::File::open(wal_path).with_context(|| format!("open {}", wal_path.display()))?;
    let len = file
        .metadata()
        .with_context(|| format!("stat {}", wal_path.display()))?
        .len() as usize;
    let mut first = vec![0u8; len.min(SIZE_OF_LONG_PHD)];
    file.read_exact_at(&mut first, 0)
        .with_context(|| format!("read {}", wal_path.display()))?;
    let header =
        validate_segment_start(seg, &first, len).with_context(|| format!("refuse {name}"))?;
    Ok(Some(Opened {
        name,
        seg,
        file,
        len,
        header,
        display: wal_path.display().to_string(),
    }))
}

/// The size of the file at `path` (0 when it cannot be read again: only reported).
fn len_of(path: &Path) -> u64 {
    std::fs::metadata(path).map_or(0, |m| m.len())
}

/// The check of the segment's cluster against `repo`, started (it runs while the segment is
/// compressed; [`store`] waits for it).
fn check_identity(repo: &Repo, opened: &Opened) -> tokio::task::JoinHandle<Result<(), RepoError>> {
    let repo = repo.clone();
    let want = RepoIdentity::from_header(&opened.header);
    tokio::spawn(async move { repo.ensure_identity(&want).await })
}

/// Compress and index an opened segment (its frames also written to `staged`).
async fn encode_opened(
    opened: Opened,
    compression: Compression,
    staged: Option<Staged>,
) -> anyhow::Result<EncodedSegment> {
    let Opened {
        name,
        seg,
        file,
        len,
        header,
        display,
    } = opened;
    let index = matches!(name, WalFileName::Segment(_)).then_some((seg, header));
    tokio::task::spawn_blocking(move || {
        encode_segment(&file, len, compression, staged, index)
            .with_context(|| format!("read {display}"))
    })
    .await?
}

/// Prepare the segment at `wal_path` for each of `repos` (with its compression), compressing and
/// indexing it once per compression while the repositories' checks run: each [`Prepared`] holds
/// the same bytes, and [`store_prepared`] stores it. `None` for a history or backup history file
/// (pushed into each the ordinary way). One result per repository, in order.
pub async fn prepare_shared(
    repos: &[(&Repo, Compression)],
    wal_path: &Path,
) -> Option<Vec<anyhow::Result<Prepared>>> {
    let opened = match name_of(wal_path).and_then(|name| open_segment(wal_path, name)) {
        Ok(Some(o)) => o,
        Ok(None) => return None,
        Err(e) => {
            let msg = crate::error::one_line(&e);
            let mut out = vec![Err(e)];
            out.extend((1..repos.len()).map(|_| Err(anyhow::anyhow!("{msg}"))));
            return Some(out);
        }
    };
    let name = opened.name;
    let checks: Vec<_> = repos
        .iter()
        .map(|(r, _)| (check_identity(r, &opened), look_up(r, name, Known::Ask)))
        .collect();
    let mut encoded: Vec<(Compression, anyhow::Result<EncodedSegment>)> = Vec::new();
    let mut opened = Some(opened);
    for (_, c) in repos {
        if encoded.iter().any(|(e, _)| e == c) {
            continue;
        }
        // Opened again for a second compression (rare: repositories that differ).
        let this = match opened.take() {
            Some(o) => Ok(o),
            None => open_segment(wal_path, name)
                .and_then(|o| o.ok_or_else(|| anyhow::anyhow!("{name} is no segment"))),
        };
        let done = match this {
            Ok(o) => encode_opened(o, *c, None).await,
            Err(e) => Err(e),
        };
        encoded.push((*c, done));
    }
    let original_len = len_of(wal_path);
    Some(
        repos
            .iter()
            .zip(checks)
            .map(|((_, c), (identity, looked))| {
                match encoded.iter().find(|(e, _)| e == c).map(|(_, r)| r) {
                    Some(Ok((stored, summary, _))) => Ok(Prepared::new(
                        name,
                        wal_path,
                        (stored.clone(), original_len),
                        summary.clone(),
                        Some(identity),
                        Some(looked),
                        None,
                    )),
                    Some(Err(e)) => Err(anyhow::anyhow!("{}", crate::error::one_line(e))),
                    None => Err(anyhow::anyhow!("internal: {name} was not encoded")),
                }
            })
            .collect(),
    )
}

/// [`store`] a prepared file and bring the WAL index's roll-ups up to date, as [`push`] does.
///
/// # Errors
/// As [`store`].
pub async fn store_prepared(
    repo: &Repo,
    prepared: Prepared,
    compression: Compression,
    start: Instant,
) -> anyhow::Result<PushReport> {
    let report = store(repo, prepared, compression, start).await?;
    crate::rollup::after_push(repo, &[report.name]).await;
    Ok(report)
}

/// Whether the repository holds `name` already, found out while the segment is compressed.
fn look_up(
    repo: &Repo,
    name: WalFileName,
    known: Known,
) -> tokio::task::JoinHandle<Result<bool, RepoError>> {
    let repo = repo.clone();
    tokio::spawn(async move {
        let answer = match known {
            Known::Ask => None,
            Known::Is(found) => Some(found),
            Known::Pending(listing) => listing.await,
        };
        match answer {
            Some(found) => Ok(found),
            None => repo.exists(&ObjectKey::Wal(name)).await,
        }
    })
}

/// A segment's envelope, its summary (and whether the envelope carries it), and the staging file
/// holding the envelope.
type EncodedSegment = (
    envelope::Encoded,
    Option<(SegmentName, SegmentSummary, bool)>,
    Option<Staged>,
);

/// The envelope of a segment (its frames also written to `staged` as they are done), and its
/// summary when `index` names the segment and its header. The staging file is returned only when
/// it holds the whole envelope.
fn encode_segment(
    file: &std::fs::File,
    len: usize,
    compression: Compression,
    staged: Option<Staged>,
    index: Option<(SegmentName, crate::pg::segment::SegmentHeader)>,
) -> anyhow::Result<EncodedSegment> {
    use std::sync::atomic::Ordering::Relaxed;
    let streamed = std::sync::atomic::AtomicU64::new(0);
    let failed = std::sync::atomic::AtomicBool::new(false);
    let sink = |offset: u64, frame: &[u8]| {
        let Some(st) = &staged else { return };
        if failed.load(Relaxed) {
            return;
        }
        match st.write_at(offset, frame) {
            Ok(()) => {
                streamed.fetch_add(frame.len() as u64, Relaxed);
            }
            Err(e) => {
                tracing::debug!(
                    "staging {}: {e}; storing it the ordinary way",
                    st.dest().display()
                );
                failed.store(true, Relaxed);
            }
        }
    };
    let sink_ref: envelope::FrameSink<'_> = &sink;
    let summarizer = index.map(|(seg, header)| {
        index::Summarizer::new(seg, header.seg_size, header.page_size, header.major, len)
    });
    let (stored, summary) = read_and_encode(
        file,
        len,
        compression,
        staged.as_ref().map(|_| sink_ref),
        summarizer,
    )?;
    let summary = index.zip(summary).map(|((seg, _), s)| (seg, s));
    // The summary travels in the segment's object (one write, see `envelope::attach`); if it
    // cannot (longer than a header can state), it is stored beside it, as before.
    let attachment = summary.as_ref().and_then(|(seg, s)| {
        let attached = serde_json::to_vec(s)
            .map_err(|e| e.to_string())
            .and_then(|json| envelope::encode(&json, Compression::Zstd).map_err(|e| e.to_string()))
            .and_then(|sealed| envelope::attach(stored.clone(), &sealed));
        match attached {
            Ok(with) => Some(with),
            Err(e) => {
                tracing::debug!("{seg}: the summary is stored beside the segment: {e}");
                None
            }
        }
    });
    let attached = attachment.is_some();
    let stored = attachment.unwrap_or(stored);
    let staged = if failed.into_inner() {
        None
    } else {
        staged.and_then(|st| finish_staging(st, &stored, streamed.into_inner(), attached))
    };
    Ok((stored, summary.map(|(seg, s)| (seg, s, attached)), staged))
}

/// A history or backup history file: read whole, checked, encoded.
async fn prepare_small(
    repo: &Repo,
    wal_path: &Path,
    name: WalFileName,
    compression: Compression,
) -> anyhow::Result<Prepared> {
    let data = tokio::fs::read(wal_path)
        .await
        .with_context(|| format!("read {}", wal_path.display()))?;
    match name {
        WalFileName::History(tli) => {
            let history = History::parse(tli, &data).with_context(|| format!("refuse {name}"))?;
            check_history(repo, &history)
                .await
                .with_context(|| format!("refuse {name}"))?;
        }
        WalFileName::BackupHistory { segment, offset } => {
            check_backup_history(segment, offset, &data).map_err(|why| {
                anyhow::anyhow!("refuse {name}: not a backup history file of this name: {why}")
            })?;
        }
        WalFileName::Segment(_) | WalFileName::Partial(_) => {}
    }
    let stored = envelope::encode(&data, compression)?.into();
    Ok(Prepared::new(
        name,
        wal_path,
        (stored, data.len() as u64),
        None,
        None,
        None,
        None,
    ))
}

impl Prepared {
    fn new(
        name: WalFileName,
        path: &Path,
        (stored, original_len): (envelope::Encoded, u64),
        summary: Option<(SegmentName, SegmentSummary, bool)>,
        identity: Option<tokio::task::JoinHandle<Result<(), RepoError>>>,
        looked: Option<tokio::task::JoinHandle<Result<bool, RepoError>>>,
        staged: Option<Staged>,
    ) -> Prepared {
        // A staging file holds the bytes now; with `--parallel`, several prepared files wait for
        // their uploads, and each would otherwise keep its compressed copy in memory too.
        let stored_len = stored.len() as u64;
        let stored = if staged.is_some() {
            envelope::Encoded::empty()
        } else {
            stored
        };
        Prepared {
            name,
            path: path.to_path_buf(),
            stored,
            stored_len,
            original_len,
            summary,
            identity,
            looked,
            staged,
        }
    }
}

/// What can be checked of a timeline history file against the repository before it is stored (it
/// decides which WAL every later restore follows): its parent must be a timeline the repository
/// knows, its ancestor lines must be the parent's own history (PostgreSQL copies it and adds one
/// line), and it must branch after the parent itself began.
///
/// # Errors
/// Says which check failed.
pub async fn check_history(repo: &Repo, h: &History) -> anyhow::Result<()> {
    let Some(last) = h.entries.last() else {
        return Ok(());
    };
    let parent = last.parent;
    let parent_history = if parent.get() > 1 {
        repo.get(&ObjectKey::Wal(WalFileName::History(parent)))
            .await?
            .map(|b| History::parse(parent, &b))
            .transpose()
            .with_context(|| format!("read the stored history of parent timeline {parent}"))?
    } else {
        None
    };
    let holds_wal = repo.any_under(&Prefix::Wal).await?;
    let parent_known =
        parent_history.is_some() || repo.any_under(&Prefix::WalTimeline(parent)).await?;
    if holds_wal && !parent_known {
        // Not a contradiction (a cascaded failover can skip a timeline whose server never
        // archived), and refusing it would stall all archiving behind it: stored, and reported.
        tracing::warn!(
            "timeline {} branches from timeline {parent}, of which the repository holds neither WAL nor a history file; storing it (pitr verify reports the missing ancestor)",
            h.tli
        );
    }
    if let Some(ph) = &parent_history {
        let ours: Vec<_> = h.entries[..h.entries.len() - 1]
            .iter()
            .map(|e| (e.parent, e.switch_lsn))
            .collect();
        let theirs: Vec<_> = ph
            .entries
            .iter()
            .map(|e| (e.parent, e.switch_lsn))
            .collect();
        if ours != theirs {
            bail!(
                "its ancestor lines differ from the stored history of timeline {parent}, which PostgreSQL would have copied"
            );
        }
        if let Some(begin) = ph.entries.last().map(|e| e.switch_lsn)
            && last.switch_lsn < begin
        {
            bail!(
                "it branches from timeline {parent} at {}, before timeline {parent} itself began at {begin}",
                last.switch_lsn
            );
        }
    }
    Ok(())
}

/// A backup history file (`…​.00000028.backup`) as `do_pg_backup_stop()` writes it: its START WAL
/// LOCATION is the LSN its name gives, in the segment its name gives, and it has a STOP WAL
/// LOCATION and a CHECKPOINT LOCATION.
fn check_backup_history(segment: SegmentName, offset: u32, data: &[u8]) -> Result<(), String> {
    let text = std::str::from_utf8(data).map_err(|_| "it is not text".to_string())?;
    let field = |key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(key))
            .map(str::trim)
            .ok_or_else(|| format!("it has no {key} line"))
    };
    let start = field("START WAL LOCATION:")?;
    let (lsn, file) = start
        .split_once(" (file ")
        .ok_or_else(|| format!("START WAL LOCATION {start:?} does not name its file"))?;
    let lsn: crate::pg::Lsn = lsn
        .parse()
        .map_err(|e| format!("START WAL LOCATION: {e}"))?;
    let file = file.trim_end_matches(')');
    if file != segment.to_string() {
        return Err(format!("it starts in {file}, not in {segment}"));
    }
    // The name is the segment and offset of the start LSN, for the cluster's segment size (a power
    // of two from 1 MiB to 1 GiB).
    let matches = (20..=30)
        .filter_map(|b| crate::pg::WalSegSize::new(1 << b))
        .any(|sz| {
            SegmentName::new(segment.tli, lsn.segno(sz), sz) == Some(segment)
                && lsn.segment_offset(sz) == offset
        });
    if !matches {
        return Err(format!(
            "its start {lsn} is not at offset {offset:08X} of {segment}"
        ));
    }
    for key in ["STOP WAL LOCATION:", "CHECKPOINT LOCATION:"] {
        let v = field(key)?;
        let lsn_text = v.split_whitespace().next().unwrap_or("");
        lsn_text
            .parse::<crate::pg::Lsn>()
            .map_err(|e| format!("{key} {e}"))?;
    }
    Ok(())
}

/// Write what the sink did not get (all of it when the data was compressed in one piece), the
/// trailer holding the summary (the last part, when `attached`), and the header, which comes last
/// because it holds the payload's checksum. `None` if a write fails: the file is then stored the
/// ordinary way.
fn finish_staging(
    st: Staged,
    stored: &envelope::Encoded,
    streamed: u64,
    attached: bool,
) -> Option<Staged> {
    let parts = stored.parts();
    let (header, rest) = parts.split_first()?;
    let (payload, trailer) = match rest.split_last() {
        Some((trailer, payload)) if attached => (payload, Some(trailer)),
        _ => (rest, None),
    };
    let payload_len: u64 = payload.iter().map(|p| p.len() as u64).sum();
    let mut offset = header.len() as u64;
    if streamed != payload_len {
        for p in payload {
            st.write_at(offset, p).ok()?;
            offset += p.len() as u64;
        }
    }
    if let Some(trailer) = trailer {
        st.write_at(header.len() as u64 + payload_len, trailer)
            .ok()?;
    }
    st.write_at(0, header).ok()?;
    Some(st)
}

/// Store a prepared file (a conditional create), with its WAL summary in the same object (or,
/// when it could not be carried, stored after it). `start` is when the push began, for the report.
///
/// # Errors
/// Any failure; nothing is acknowledged unless the object is durably stored.
pub async fn store(
    repo: &Repo,
    prepared: Prepared,
    compression: Compression,
    start: Instant,
) -> anyhow::Result<PushReport> {
    let Prepared {
        name,
        path,
        stored,
        stored_len,
        original_len,
        summary,
        identity,
        looked,
        staged,
    } = prepared;
    if let Some(identity) = identity {
        identity.await?.with_context(|| format!("refuse {name}"))?;
    }
    let found = match looked {
        Some(l) => Some(l.await?.with_context(|| format!("archive {name}"))?),
        None => None,
    };
    // The segment first, its summary only once it is stored: a push that fails leaves no summary
    // that would claim the segment was archived, and one that finds the segment stored (identical
    // bytes, or a concurrent writer's different ones) never touches the summary of what is there.
    let outcome = put_file(repo, name, &path, (stored, stored_len), staged, found)
        .await
        .with_context(|| format!("archive {name}"))?;
    if let Some((seg, summary, attached)) = summary {
        warn_unindexed(seg, &summary);
        match outcome {
            PutOutcome::Stored { .. } if attached => {}
            PutOutcome::Stored { .. } => store_summary(repo, seg, &summary)
                .await
                .with_context(|| format!("index {name} (the segment itself is stored)"))?,
            // Already stored, perhaps by an earlier version that stored the summary beside the
            // segment, and a crash may have come between the two: write a missing one (same
            // bytes, same summary). Failing to is not a failure of the push: the segment is safe,
            // and the summary can be rebuilt from it.
            PutOutcome::AlreadyStored => match crate::catalog::summary_stored(repo, seg).await {
                Ok(true) => {}
                Ok(false) => {
                    if let Err(e) = store_summary(repo, seg, &summary).await {
                        tracing::warn!(
                            "{name} is archived, but its missing summary could not be written: {e:#}"
                        );
                    }
                }
                Err(e) => {
                    tracing::warn!("{name} is archived; its summary could not be looked up: {e:#}")
                }
            },
        }
    }
    let report = PushReport {
        name,
        outcome,
        original_bytes: original_len,
        elapsed: start.elapsed(),
    };
    match outcome {
        PutOutcome::Stored { stored_bytes } => tracing::debug!(
            "archived {name}: {} bytes stored as {stored_bytes} ({compression}) in {:.1} ms",
            report.original_bytes,
            report.elapsed.as_secs_f64() * 1e3
        ),
        PutOutcome::AlreadyStored => {
            tracing::info!("{name} was already archived with identical content")
        }
    }
    Ok(report)
}

/// Store a file: publish its staging file where there is one, otherwise put it.
async fn put_file(
    repo: &Repo,
    name: WalFileName,
    path: &Path,
    (stored, stored_len): (envelope::Encoded, u64),
    staged: Option<Staged>,
    found: Option<bool>,
) -> Result<PutOutcome, RepoError> {
    let payload = match staged {
        Some(file) if found != Some(true) => Payload::Staged {
            file,
            stored_bytes: stored_len,
        },
        _ => Payload::Memory(stored),
    };
    let mode = PutMode::CreateOrCompare {
        original: Original::File(path),
        found,
    };
    repo.put(&ObjectKey::Wal(name), payload, mode).await
}

/// Read the `len` bytes of `file` and compress them on `push_threads()` threads, feeding them to
/// `summary` (the WAL index) in order as they are read. With zstd (the default) the file is read a
/// window at a time ([`envelope::encode_read_beside`]): memory holds a few windows, not the
/// segment. Returns the envelope and the summary.
///
/// # Errors
/// A read error, or a file shorter than `len` (it changed under us).
fn read_and_encode(
    file: &std::fs::File,
    len: usize,
    compression: Compression,
    sink: Option<envelope::FrameSink<'_>>,
    mut summary: Option<index::Summarizer>,
) -> std::io::Result<(envelope::Encoded, Option<SegmentSummary>)> {
    // Read, never mapped: a mapped file that someone truncates while it is read kills the process
    // with SIGBUS, and archive_command must never die of a signal. A read of a shortened file is
    // an error (exit 1, nothing stored).
    let threads = push_threads();
    let mut feed = |window: &[u8]| {
        if let Some(s) = &mut summary {
            s.feed(window);
        }
    };
    if compression == Compression::Zstd {
        let read = |offset: u64, buf: &mut [u8]| file.read_exact_at(buf, offset);
        let (stored, fed) = envelope::encode_read_beside(len, &read, threads, sink, &mut feed);
        fed.map_err(|_| std::io::Error::other("WAL index thread panicked"))?;
        return Ok((stored?, summary.map(index::Summarizer::finish)));
    }
    let mut data = BigBuf::zeroed(len);
    file.read_exact_at(data.as_mut_slice(), 0)?;
    let (stored, fed) =
        envelope::encode_parallel_beside(&data, compression, threads, None, sink, || {
            for window in data.chunks(envelope::PARALLEL_PIECE) {
                feed(window);
            }
        });
    fed.map_err(|_| std::io::Error::other("WAL index thread panicked"))?;
    Ok((stored?, summary.map(index::Summarizer::finish)))
}

/// Say so when the WAL index could not read all of a segment.
fn warn_unindexed(seg: SegmentName, summary: &SegmentSummary) {
    if let ParseStatus::Failed { lsn, reason } = &summary.status {
        tracing::warn!(
            "{seg}: WAL records could not be indexed past {lsn}: {reason}; the segment is archived as is"
        );
    }
}

/// Store a segment's summary beside it (a repository of an earlier version, or a summary too long
/// to carry). The summary is derived data, rebuilt the same way from the same segment, so it is
/// simply written (one round trip), replacing any earlier copy.
async fn store_summary(
    repo: &Repo,
    seg: SegmentName,
    summary: &SegmentSummary,
) -> anyhow::Result<()> {
    let json = serde_json::to_vec(summary)?;
    let key = ObjectKey::Summary(seg);
    repo.put(
        &key,
        repo.seal(&key, &json, Compression::Zstd)?,
        PutMode::OverwriteDerived,
    )
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pg::PgMajor;
    use crate::testing::PutBytes;
    use object_store::memory::InMemory;
    use std::sync::Arc;

    /// Storing `prepared` is refused: other bytes are stored under its name.
    async fn assert_conflict(repo: &Repo, prepared: Prepared) {
        let err = store(repo, prepared, Compression::Zstd, Instant::now())
            .await
            .unwrap_err();
        assert!(
            err.downcast_ref::<RepoError>()
                .is_some_and(|e| matches!(e, RepoError::Conflict { .. })),
            "{err:#}"
        );
    }

    fn segment_file(dir: &Path, marker: u8) -> PathBuf {
        let mut b =
            crate::pg::segment::tests::fake_segment(PgMajor::V15, 1, 3, 7_000_000_000, 1 << 20);
        b[9000] = marker;
        let path = dir.join("000000010000000000000003");
        std::fs::write(&path, b).unwrap();
        path
    }

    /// The summary stored for `seg` (raw JSON), from wherever it is: the segment's own object, or
    /// beside it.
    async fn stored_summary(repo: &Repo, seg: SegmentName) -> Option<Vec<u8>> {
        let key = ObjectKey::Wal(WalFileName::Segment(seg));
        if let Some(size) = repo.size_of(&key).await.unwrap()
            && let Some(s) = repo.get_attached(&key, size).await.unwrap()
        {
            return Some(s);
        }
        repo.get(&ObjectKey::Summary(seg)).await.unwrap()
    }

    #[tokio::test]
    async fn the_summary_travels_in_the_segment_and_is_never_touched_by_a_refused_push() {
        let dir = tempfile::tempdir().unwrap();
        let repo = Repo::from_store(Arc::new(InMemory::new()), "memory://push");
        let path = segment_file(dir.path(), 1);
        let seg = match name_of(&path).unwrap() {
            WalFileName::Segment(s) => s,
            other => panic!("{other}"),
        };
        let key = ObjectKey::Wal(WalFileName::Segment(seg));
        // Not stored yet: one object, the summary carried at its end, none beside it.
        let r = push(&repo, &path, Compression::Zstd).await.unwrap();
        assert!(matches!(r.outcome, PutOutcome::Stored { .. }));
        let listed: Vec<String> = repo
            .list(&crate::storage::layout::Prefix::Wal)
            .await
            .unwrap()
            .iter()
            .map(|e| e.key().to_string())
            .collect();
        assert_eq!(listed, vec![key.key()]);
        let summary: SegmentSummary =
            crate::format::decode(&stored_summary(&repo, seg).await.unwrap()).unwrap();
        let data = std::fs::read(&path).unwrap();
        let header = crate::pg::segment::parse_long_header(&data).unwrap();
        assert_eq!(
            summary,
            index::summarize(&data, seg, header.seg_size, header.page_size, header.major)
        );
        assert_eq!(repo.get(&key).await.unwrap().unwrap(), data);
        let before = repo.get_stored(&key).await.unwrap();
        // The same bytes again, in any compression: already stored, nothing written.
        for c in [Compression::Zstd, Compression::Lz4] {
            let r = push(&repo, &path, c).await.unwrap();
            assert_eq!(r.outcome, PutOutcome::AlreadyStored);
        }
        assert_eq!(repo.get_stored(&key).await.unwrap(), before);
        assert!(!repo.exists(&ObjectKey::Summary(seg)).await.unwrap());
        // Other bytes under the name, looked up as absent (another writer got in after the look):
        // refused, the stored segment and its summary untouched.
        let other = segment_file(dir.path(), 2);
        let prepared = prepare_known(&repo, &other, Compression::Zstd, Known::Is(false))
            .await
            .unwrap();
        assert_conflict(&repo, prepared).await;
        assert_eq!(repo.get(&key).await.unwrap().unwrap()[9000], 1);
        assert_eq!(repo.get_stored(&key).await.unwrap(), before);
    }

    #[tokio::test]
    async fn a_segment_of_an_earlier_version_gets_its_lost_summary_back() {
        // An earlier version stored the segment (format 1) and its summary as two objects; a
        // crash between the two left the segment without one. The next push of the same bytes
        // writes it beside the segment, as that version would have.
        let dir = tempfile::tempdir().unwrap();
        let repo = Repo::from_store(Arc::new(InMemory::new()), "memory://old");
        let path = segment_file(dir.path(), 1);
        let name = name_of(&path).unwrap();
        let WalFileName::Segment(seg) = name else {
            panic!("{name}")
        };
        let data = std::fs::read(&path).unwrap();
        repo.put_new(&ObjectKey::Wal(name), &data, Compression::Zstd)
            .await
            .unwrap();
        assert_eq!(stored_summary(&repo, seg).await, None);
        assert!(!crate::catalog::summary_stored(&repo, seg).await.unwrap());
        let r = push(&repo, &path, Compression::Zstd).await.unwrap();
        assert_eq!(r.outcome, PutOutcome::AlreadyStored);
        assert!(repo.exists(&ObjectKey::Summary(seg)).await.unwrap());
        assert!(crate::catalog::summary_stored(&repo, seg).await.unwrap());
        let fresh = Repo::from_store(Arc::new(InMemory::new()), "memory://fresh");
        push(&fresh, &path, Compression::Zstd).await.unwrap();
        assert_eq!(
            stored_summary(&repo, seg).await,
            stored_summary(&fresh, seg).await
        );
    }

    #[test]
    fn backup_history_files_must_match_their_name() {
        let WalFileName::BackupHistory { segment, offset } =
            "000000010000000000000002.00000028.backup".parse().unwrap()
        else {
            panic!()
        };
        let good = "START WAL LOCATION: 0/2000028 (file 000000010000000000000002)\nSTOP WAL LOCATION: 0/2000100 (file 000000010000000000000002)\nCHECKPOINT LOCATION: 0/2000060\nBACKUP METHOD: streamed\nLABEL: x\n";
        assert_eq!(
            check_backup_history(segment, offset, good.as_bytes()),
            Ok(())
        );
        for bad in [
            "START WAL LOCATION: anything",
            "START WAL LOCATION: 0/2000028 (file 000000010000000000000002)\n",
            &good.replace("0/2000028", "0/2000030"),
            &good.replace(
                "(file 000000010000000000000002)\nSTOP",
                "(file 000000010000000000000003)\nSTOP",
            ),
            &good.replace("CHECKPOINT LOCATION: 0/2000060", "CHECKPOINT LOCATION: x"),
        ] {
            assert!(
                check_backup_history(segment, offset, bad.as_bytes()).is_err(),
                "{bad}"
            );
        }
    }

    #[tokio::test]
    async fn a_history_file_must_fit_the_repository() {
        let repo = Repo::from_store(Arc::new(InMemory::new()), "memory://hist");
        let tli = |n| crate::pg::TimelineId::new(n).unwrap();
        let h = |n: u32, text: &str| History::parse(tli(n), text.as_bytes()).unwrap();
        // An empty repository has nothing to contradict.
        check_history(&repo, &h(2, "1\t0/3000000\tx\n"))
            .await
            .unwrap();
        // With timeline 1's WAL stored: a child of 1 fits. A child of an unknown 5 is no
        // contradiction (a cascaded failover can skip a timeline that never archived), and
        // refusing it would stall archiving: stored, and verify reports the missing ancestor.
        let dir = tempfile::tempdir().unwrap();
        push(&repo, &segment_file(dir.path(), 1), Compression::Zstd)
            .await
            .unwrap();
        check_history(&repo, &h(2, "1\t0/3000000\tx\n"))
            .await
            .unwrap();
        check_history(&repo, &h(6, "5\t0/3000000\tx\n"))
            .await
            .unwrap();
        // Timeline 2's history stored: timeline 3 must repeat it and branch after it began.
        repo.put_new(
            &ObjectKey::Wal(WalFileName::History(tli(2))),
            b"1\t0/3000000\tx\n",
            Compression::None,
        )
        .await
        .unwrap();
        check_history(&repo, &h(3, "1\t0/3000000\tx\n2\t0/4000000\ty\n"))
            .await
            .unwrap();
        assert!(
            check_history(&repo, &h(3, "1\t0/3500000\tx\n2\t0/4000000\ty\n"))
                .await
                .is_err()
        );
        assert!(
            check_history(&repo, &h(3, "1\t0/3000000\tx\n2\t0/2000000\ty\n"))
                .await
                .is_err()
        );
    }

    #[test]
    fn a_segment_truncated_while_it_is_read_is_an_error_not_a_signal() {
        let dir = tempfile::tempdir().unwrap();
        let path = segment_file(dir.path(), 1);
        let f = std::fs::File::open(&path).unwrap();
        let len = f.metadata().unwrap().len() as usize;
        // PostgreSQL (or an operator) cuts the file short after pitr looked at its size.
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(len as u64 / 2)
            .unwrap();
        let err = read_and_encode(&f, len, Compression::Zstd, None, None).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::UnexpectedEof, "{err}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_loser_of_two_conflicting_pushes_leaves_the_winners_summary() {
        let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (a, b) = (segment_file(da.path(), 1), segment_file(db.path(), 2));
        let seg = match name_of(&a).unwrap() {
            WalFileName::Segment(s) => s,
            other => panic!("{other}"),
        };
        for round in 0..20 {
            let repo = Repo::from_store(Arc::new(InMemory::new()), "memory://race");
            let (ra, rb) = tokio::join!(
                push(&repo, &a, Compression::Zstd),
                push(&repo, &b, Compression::Zstd)
            );
            assert!(ra.is_ok() != rb.is_ok(), "round {round}: exactly one wins");
            let winner = if ra.is_ok() { &a } else { &b };
            let fresh = Repo::from_store(Arc::new(InMemory::new()), "memory://fresh");
            push(&fresh, winner, Compression::Zstd).await.unwrap();
            assert_eq!(
                stored_summary(&repo, seg).await,
                stored_summary(&fresh, seg).await,
                "round {round}: the summary is the winner's"
            );
        }
    }

    #[tokio::test]
    async fn a_push_that_fails_leaves_no_summary() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("repo");
        let repo = Repo::create(root.to_str().unwrap()).unwrap();
        let path = segment_file(dir.path(), 1);
        let name = name_of(&path).unwrap();
        let WalFileName::Segment(seg) = name else {
            panic!("{name}")
        };
        // Something that is not a stored segment occupies the segment's key (as a full disk or a
        // broken store would, the write cannot succeed).
        let obstacle = repo.local_wal_path(name).unwrap();
        std::fs::create_dir_all(obstacle.join("in-the-way")).unwrap();
        let err = push(&repo, &path, Compression::Zstd).await.unwrap_err();
        assert!(format!("{err:#}").contains("archive"), "{err:#}");
        assert!(!repo.exists(&ObjectKey::Summary(seg)).await.unwrap());
        assert!(!crate::catalog::summary_stored(&repo, seg).await.unwrap());
    }

    #[tokio::test]
    async fn a_local_repository_gets_the_segment_through_a_staging_file() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("repo");
        let repo = Repo::create(root.to_str().unwrap()).unwrap();
        // Segment 3 creates the WAL directory the ordinary way; segment 4 is staged beside its name.
        let wal = dir.path().join("pg_wal");
        std::fs::create_dir(&wal).unwrap();
        // 16 MiB segments: compressed in pieces, so frames reach the staging file as they are done.
        let fake = |segno| {
            crate::pg::segment::tests::fake_segment(PgMajor::V15, 1, segno, 7_000_000_000, 16 << 20)
        };
        let three = wal.join("000000010000000000000003");
        std::fs::write(&three, fake(3)).unwrap();
        push(&repo, &three, Compression::Zstd).await.unwrap();
        let mut b = fake(4);
        b[9000] = 1;
        let four = wal.join("000000010000000000000004");
        std::fs::write(&four, &b).unwrap();
        let r = push(&repo, &four, Compression::Zstd).await.unwrap();
        assert!(matches!(r.outcome, PutOutcome::Stored { .. }));
        let name = name_of(&four).unwrap();
        assert_eq!(repo.get(&ObjectKey::Wal(name)).await.unwrap().unwrap(), b);
        // The staging file got the summary's trailer too.
        let WalFileName::Segment(seg) = name else {
            panic!("{name}")
        };
        let summary: SegmentSummary =
            crate::format::decode(&stored_summary(&repo, seg).await.unwrap()).unwrap();
        let header = crate::pg::segment::parse_long_header(&b).unwrap();
        assert_eq!(
            summary,
            index::summarize(&b, seg, header.seg_size, header.page_size, header.major)
        );
        // Identical again: already stored. Different bytes: refused, the stored object untouched.
        let r = push(&repo, &four, Compression::Zstd).await.unwrap();
        assert_eq!(r.outcome, PutOutcome::AlreadyStored);
        b[9000] = 2;
        std::fs::write(&four, &b).unwrap();
        let prepared = prepare_known(&repo, &four, Compression::Zstd, Known::Is(false))
            .await
            .unwrap();
        assert!(
            prepared.staged.is_some(),
            "a local repository stages the file"
        );
        assert_conflict(&repo, prepared).await;
        assert_eq!(
            repo.get(&ObjectKey::Wal(name)).await.unwrap().unwrap()[9000],
            1
        );
        // No staging file is left beside the objects.
        let dir = repo.local_wal_path(name).unwrap();
        let left: Vec<String> = std::fs::read_dir(dir.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains('#'))
            .collect();
        assert!(left.is_empty(), "{left:?}");
    }

    mod faults {
        use super::super::push;
        use crate::compress::Compression;
        use crate::storage::Repo;
        use crate::storage::retry::RetryPolicy;
        use crate::testing::faults::{Fault, Faulty, quick, segment_file, stored, wal_key};
        use std::sync::atomic::Ordering;
        use std::time::Duration;

        #[tokio::test]
        async fn push_recovers_from_transient_failures() {
            let dir = tempfile::tempdir().unwrap();
            let (path, bytes) = segment_file(dir.path());
            for (fault, failures) in [
                (Fault::Fail, 3),
                (Fault::ApplyThenFail, 1),
                (Fault::ApplyThenFail, 2),
                (Fault::Stall, 1),
            ] {
                for look_first in [false, true] {
                    let store = Faulty::new(fault, failures);
                    let repo = if look_first {
                        Repo::from_store_look_first(store.clone(), "faulty://")
                    } else {
                        Repo::from_store(store.clone(), "faulty://")
                    }
                    .with_retry(quick());
                    let report = push(&repo, &path, Compression::Zstd)
                        .await
                        .unwrap_or_else(|e| panic!("{fault:?} x{failures}: {e:#}"));
                    assert_eq!(report.original_bytes, bytes.len() as u64);
                    assert_eq!(
                        stored(&store, &wal_key()).await.as_deref(),
                        Some(bytes.as_slice()),
                        "{fault:?} x{failures}"
                    );
                    assert!(store.calls.load(Ordering::SeqCst) > failures);
                    // And it reads back through the same faults.
                    store.remaining.store(failures, Ordering::SeqCst);
                    assert_eq!(repo.get(&wal_key()).await.unwrap().unwrap(), bytes);
                }
            }
        }

        #[tokio::test(start_paused = true)]
        async fn a_store_that_stays_down_is_a_failure_not_a_success() {
            let dir = tempfile::tempdir().unwrap();
            let (path, _) = segment_file(dir.path());
            for fault in [Fault::Fail, Fault::Stall] {
                let store = Faulty::new(fault, u32::MAX);
                let policy = RetryPolicy {
                    budget: Duration::from_millis(800),
                    ..quick()
                };
                let repo = Repo::from_store(store.clone(), "faulty://").with_retry(policy);
                let start = tokio::time::Instant::now();
                let err = push(&repo, &path, Compression::Zstd).await.unwrap_err();
                // Tokio's clock (paused, so it is exact): retries stop once the budget is spent.
                assert!(
                    start.elapsed() <= policy.budget + policy.max_backoff + policy.attempt_timeout,
                    "{fault:?}: {:?}",
                    start.elapsed()
                );
                assert!(
                    format!("{err:#}").contains("injected fault")
                        || format!("{err:#}").contains("no answer"),
                    "{err:#}"
                );
                assert_eq!(stored(&store, &wal_key()).await, None, "{fault:?}");
                assert!(
                    store.calls.load(Ordering::SeqCst) >= 2,
                    "{fault:?} was not retried"
                );
            }
            // Answers lost every time: the object may be there, but push still fails rather than guess.
            let store = Faulty::new(Fault::ApplyThenFail, u32::MAX);
            let repo = Repo::from_store(store.clone(), "faulty://").with_retry(RetryPolicy {
                budget: Duration::from_millis(500),
                ..quick()
            });
            assert!(push(&repo, &path, Compression::Zstd).await.is_err());
        }
    }
}
