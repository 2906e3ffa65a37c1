//! `pitr receive`: WAL streamed from the server over the replication protocol into the
//! repository, so that it holds WAL as it is written, not only once a segment is complete and
//! `archive_command` ran.
//!
//! Each completed segment is written to a spool file named after it and stored by the same code
//! as `archive-push` (checked, indexed, compressed, durably stored): a segment that both store
//! comes out identical, and the second store is a no-op. The server is told a position is
//! flushed only once the segment holding it is stored, so a replication slot keeps on the server
//! every byte the repository does not yet hold.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::compress::Compression;
use crate::pg::{Lsn, SegNo, SegmentName, TimelineId, WalSegSize};
use crate::replication::{Event, ReplConn, major_of};
use crate::storage::Repo;

/// How `pitr receive` runs.
#[derive(Debug, Clone)]
pub struct ReceiveOptions {
    /// The physical replication slot to stream from (the server keeps what it holds).
    pub slot: Option<String>,
    /// Create the slot when it does not exist.
    pub create_slot: bool,
    /// Compression of stored segments.
    pub compression: Compression,
    /// How often the server hears what is stored, at the least.
    pub status_interval: Duration,
    /// How often the part of the segment in progress received so far is stored (the repository
    /// then trails the server by about this much).
    pub flush_interval: Duration,
    /// Store what is received at once, every time (a synchronous standby: commits on the primary
    /// wait until their WAL is in the repository).
    pub synchronous: bool,
    /// Where completed segments wait, as files, until they are stored.
    pub spool: PathBuf,
    /// Stop once this many segments were stored (tests, and one-shot catch-ups); `None`: run until
    /// stopped.
    pub stop_after: Option<u64>,
}

/// `status/receive.json`: where `pitr receive` stands, replaced at every status update.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ReceiveStatus {
    /// Its format version.
    pub format_version: u32,
    /// When it was written.
    pub updated_at: crate::pg::PgTimestamp,
    /// The server streamed from (never a password).
    pub server: String,
    /// The timeline being streamed.
    pub timeline: u32,
    /// Everything before this position has been received.
    pub received_lsn: Lsn,
    /// Everything before this position is durably in the repository.
    pub stored_lsn: Lsn,
    /// The server's end of WAL, as it last said.
    pub server_lsn: Lsn,
    /// Since when the repository trails the server's end of WAL (`None`: it does not).
    pub behind_since: Option<crate::pg::PgTimestamp>,
}

/// The receive status format this pitr writes.
pub const RECEIVE_STATUS_FORMAT: u32 = 1;

impl crate::format::Versioned for ReceiveStatus {
    const WHAT: &'static str = "receive status";
    const SUPPORTED: u32 = RECEIVE_STATUS_FORMAT;
    fn version(&self) -> u32 {
        self.format_version
    }
}

/// Where `pitr receive` last said it stands in `repo` (`None`: it never ran there, or the status
/// cannot be read, which is logged).
pub async fn status(repo: &Repo) -> Option<ReceiveStatus> {
    let key = crate::storage::layout::ObjectKey::ReceiveStatus;
    match repo.get(&key).await {
        Ok(Some(json)) => match crate::format::decode::<ReceiveStatus>(&json) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!("{}: {e}", key.key());
                None
            }
        },
        Ok(None) => None,
        Err(e) => {
            tracing::warn!("{}: {e}", key.key());
            None
        }
    }
}

/// Record where receive stands (a failure is only logged: the stream matters more).
async fn record_status(repo: &Repo, status: &ReceiveStatus) {
    let key = crate::storage::layout::ObjectKey::ReceiveStatus;
    let written = match serde_json::to_vec(status) {
        Ok(json) => match repo.seal(&key, &json, Compression::None) {
            Ok(stored) => repo
                .put(&key, stored, crate::storage::PutMode::OverwriteDerived)
                .await
                .map(|_| ())
                .map_err(anyhow::Error::from),
            Err(e) => Err(e.into()),
        },
        Err(e) => Err(e.into()),
    };
    if let Err(e) = written {
        tracing::warn!("record the receive status in {}: {e:#}", key.key());
    }
}

/// What one run stored.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Received {
    /// Segments stored.
    pub segments: u64,
    /// The position the repository holds everything before.
    pub stored_to: Lsn,
}

/// The server's `wal_segment_size` as `SHOW` prints it (`16MB`, `1GB`, `512kB`).
///
/// # Errors
/// Not a size PostgreSQL allows for WAL segments.
pub fn parse_segment_size(text: &str) -> anyhow::Result<WalSegSize> {
    let t = text.trim();
    let digits: String = t.chars().take_while(char::is_ascii_digit).collect();
    let n: u64 = digits
        .parse()
        .with_context(|| format!("wal_segment_size {t:?}"))?;
    let unit = match t[digits.len()..].trim() {
        "" | "B" => 1,
        "kB" => 1 << 10,
        "MB" => 1 << 20,
        "GB" => 1 << 30,
        other => bail!("wal_segment_size {t:?}: unknown unit {other:?}"),
    };
    u32::try_from(n * unit)
        .ok()
        .and_then(WalSegSize::new)
        .with_context(|| format!("wal_segment_size {t:?} is not a WAL segment size"))
}

/// The segment being received: where it starts and the bytes so far.
struct Current {
    tli: TimelineId,
    segno: SegNo,
    start: Lsn,
    data: Vec<u8>,
    /// How much of `data` is stored as chunks.
    chunked: usize,
}

/// A replication connection to the server `cfg` names, checked: a supported major (returned),
/// and the cluster `repo` holds (or nothing yet).
///
/// # Errors
/// The server cannot be reached, runs an unsupported version, or is another cluster.
pub async fn connect_to_cluster(
    repo: &Repo,
    cfg: &tokio_postgres::Config,
) -> anyhow::Result<(ReplConn, u32, crate::replication::SystemInfo)> {
    let mut conn = ReplConn::connect(cfg).await?;
    let major = major_of(&conn.server_version).unwrap_or(0);
    if !(13..=18).contains(&major) {
        bail!(
            "PostgreSQL {} ({}) is not supported (pitr supports 13–18)",
            conn.server_version,
            conn.describe
        );
    }
    let sys = conn.identify_system().await?;
    if let Some(id) = repo.identity().await?
        && id.system_identifier.0 != sys.system_identifier
    {
        bail!(crate::storage::RepoError::IdentityMismatch {
            repo: repo.location().to_string(),
            repo_has: format!("cluster {}", id.system_identifier),
            found: format!("cluster {} at {}", sys.system_identifier, conn.describe),
        });
    }
    Ok((conn, major, sys))
}

/// Stream WAL from the server `cfg` names into `repo` until stopped (or `stop_after`).
///
/// # Errors
/// The server cannot be reached or belongs to another cluster, the slot is missing (and not to be
/// created) or lost, the server no longer has the WAL the repository needs next, or a segment
/// cannot be stored.
pub async fn run(
    repo: &Repo,
    cfg: &tokio_postgres::Config,
    opts: &ReceiveOptions,
) -> anyhow::Result<Received> {
    let (mut conn, major, sys) = connect_to_cluster(repo, cfg).await?;
    let seg_size = parse_segment_size(&conn.show("wal_segment_size").await?)?;
    let (mut start, mut tli) = start_position(&mut conn, cfg, repo, opts, major, sys).await?;
    tracing::info!(
        "receiving WAL from {} (PostgreSQL {}, cluster {}) from {start} on timeline {}{}",
        conn.describe,
        conn.server_version,
        sys.system_identifier,
        tli.get(),
        opts.slot
            .as_deref()
            .map(|s| format!(" through slot {s}"))
            .unwrap_or_default()
    );
    std::fs::create_dir_all(&opts.spool)
        .with_context(|| format!("create the spool directory {}", opts.spool.display()))?;
    let mut done = Received {
        segments: 0,
        stored_to: start,
    };
    loop {
        if tli.get() > 1 {
            store_history(&mut conn, repo, opts, tli).await?;
        }
        conn.start_replication(opts.slot.as_deref(), start, tli)
            .await?;
        match stream(&mut conn, repo, opts, seg_size, (tli, start), &mut done).await? {
            Some((next, next_start)) => {
                tracing::info!(
                    "timeline {} ended; following timeline {} from {next_start}",
                    tli.get(),
                    next.get()
                );
                tli = next;
                start = segment_start(next_start, seg_size);
            }
            None => return Ok(done),
        }
    }
}

/// The start of the segment holding `lsn`.
fn segment_start(lsn: Lsn, seg_size: WalSegSize) -> Lsn {
    Lsn(lsn.0 - u64::from(lsn.segment_offset(seg_size)))
}

/// Where to start: the slot's restart position, else the end of what the repository holds on the
/// server's timeline, else the server's current position; always the start of a segment, so every
/// stored segment is whole.
async fn start_position(
    conn: &mut ReplConn,
    cfg: &tokio_postgres::Config,
    repo: &Repo,
    opts: &ReceiveOptions,
    major: u32,
    sys: crate::replication::SystemInfo,
) -> anyhow::Result<(Lsn, TimelineId)> {
    let seg_size = parse_segment_size(&conn.show("wal_segment_size").await?)?;
    if let Some(slot) = &opts.slot {
        let mut found = slot_position(conn, cfg, slot, major).await?;
        if found.is_none() {
            if !opts.create_slot {
                bail!(
                    "replication slot {slot:?} does not exist on {} (--create-slot creates it)",
                    conn.describe
                );
            }
            conn.create_slot(slot, major).await?;
            tracing::info!("created physical replication slot {slot:?}");
            found = slot_position(conn, cfg, slot, major).await?;
        }
        let (lsn, tli) = found.unwrap_or((sys.xlogpos, sys.timeline));
        return Ok((segment_start(lsn, seg_size), tli));
    }
    // A repository with nothing in it yet (pitr.json comes with the first segment) holds nothing.
    let held = match repo.identity().await? {
        None => None,
        Some(_) => crate::catalog::Catalog::load(repo)
            .await?
            .timelines
            .get(&sys.timeline)
            .and_then(|t| t.segments.last().copied()),
    };
    let here = segment_start(sys.xlogpos, seg_size);
    let start = match held {
        Some(SegNo(n)) => {
            let after = Lsn((n + 1) * u64::from(seg_size.bytes()));
            if after <= here { after } else { here }
        }
        None => here,
    };
    Ok((start, sys.timeline))
}

/// The slot's restart position and timeline, `None` when there is no such slot (or it has never
/// reserved WAL).
async fn slot_position(
    conn: &mut ReplConn,
    cfg: &tokio_postgres::Config,
    slot: &str,
    major: u32,
) -> anyhow::Result<Option<(Lsn, TimelineId)>> {
    if major >= 15 {
        return conn.read_slot(slot).await;
    }
    // Before 15 a physical replication connection has no READ_REPLICATION_SLOT: ask in SQL.
    let client = crate::pgconn::connect(cfg).await?;
    let row = client
        .query_opt(
            "SELECT restart_lsn::text FROM pg_replication_slots WHERE slot_name = $1 AND slot_type = 'physical'",
            &[&slot],
        )
        .await
        .context("read the replication slot")?;
    let Some(row) = row else { return Ok(None) };
    let lsn: Option<String> = row.get(0);
    let Some(lsn) = lsn else { return Ok(None) };
    let lsn = lsn
        .parse::<Lsn>()
        .map_err(|e| anyhow::anyhow!("slot {slot}: {e}"))?;
    let tli: i32 = client
        .query_one("SELECT timeline_id FROM pg_control_checkpoint()", &[])
        .await?
        .get(0);
    let tli = u32::try_from(tli)
        .ok()
        .and_then(TimelineId::new)
        .context("pg_control_checkpoint: no timeline")?;
    Ok(Some((lsn, tli)))
}

/// Store timeline `tli`'s history file as archive-push would.
async fn store_history(
    conn: &mut ReplConn,
    repo: &Repo,
    opts: &ReceiveOptions,
    tli: TimelineId,
) -> anyhow::Result<()> {
    let (name, content) = conn.timeline_history(tli).await?;
    if name.contains('/') || name.is_empty() {
        bail!("TIMELINE_HISTORY named its file {name:?}");
    }
    let path = opts.spool.join(&name);
    std::fs::write(&path, &content).with_context(|| format!("write {}", path.display()))?;
    let pushed = crate::archive::push::push(repo, &path, opts.compression).await;
    let _ = std::fs::remove_file(&path);
    pushed.with_context(|| format!("store {name}"))?;
    Ok(())
}

/// Receive one timeline from `start`, storing each segment it completes and, every
/// `flush_interval` (at once when `synchronous`), the part of the one in progress: `Some(next
/// timeline, its start)` when the timeline ends, `None` once `stop_after` segments are stored.
async fn stream(
    conn: &mut ReplConn,
    repo: &Repo,
    opts: &ReceiveOptions,
    seg_size: WalSegSize,
    (tli, start): (TimelineId, Lsn),
    done: &mut Received,
) -> anyhow::Result<Option<(TimelineId, Lsn)>> {
    let size = seg_size.bytes() as usize;
    let mut cur = Current {
        tli,
        segno: start.segno(seg_size),
        start,
        data: Vec::with_capacity(size),
        chunked: 0,
    };
    let mut received = start;
    // Everything before it is durably in the repository.
    let mut flushed = start;
    let mut server_lsn = start;
    let mut behind_since: Option<crate::pg::PgTimestamp> = None;
    let mut status_recorded: Option<Instant> = None;
    let mut last_status = Instant::now();
    let mut status = tokio::time::interval(opts.status_interval);
    status.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut flush = tokio::time::interval(opts.flush_interval);
    flush.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let event = tokio::select! {
            e = conn.next_event() => e?,
            _ = flush.tick() => {
                if received > flushed {
                    store_streamed(repo, opts, seg_size, &mut cur).await?;
                    flushed = received;
                    conn.send_status(received, flushed, Lsn::INVALID, false).await?;
                    last_status = Instant::now();
                }
                continue;
            }
            _ = status.tick() => {
                if last_status.elapsed() >= opts.status_interval {
                    conn.send_status(received, flushed, Lsn::INVALID, false).await?;
                    last_status = Instant::now();
                }
                if status_recorded.is_none_or(|t| t.elapsed() >= opts.status_interval) {
                    if flushed >= server_lsn {
                        behind_since = None;
                    } else if behind_since.is_none() {
                        behind_since = Some(crate::pg::PgTimestamp::now());
                    }
                    record_status(repo, &ReceiveStatus {
                        format_version: RECEIVE_STATUS_FORMAT,
                        updated_at: crate::pg::PgTimestamp::now(),
                        server: conn.describe.clone(),
                        timeline: tli.get(),
                        received_lsn: received,
                        stored_lsn: flushed,
                        server_lsn,
                        behind_since,
                    }).await;
                    status_recorded = Some(Instant::now());
                }
                continue;
            }
        };
        match event {
            Event::Wal {
                start,
                data,
                server_end,
            } => {
                server_lsn = server_lsn.max(server_end);
                let mut data = &data[..];
                let mut at = start;
                // After a restart the server may resend what is here already.
                if at < received {
                    let skip = usize::try_from(received.0 - at.0).unwrap_or(usize::MAX);
                    if skip >= data.len() {
                        continue;
                    }
                    data = &data[skip..];
                    at = received;
                }
                if at != received {
                    bail!(
                        "the server sent WAL from {at} where {received} was expected: a gap in the stream"
                    );
                }
                while !data.is_empty() {
                    let room = size - cur.data.len();
                    let take = room.min(data.len());
                    cur.data.extend_from_slice(&data[..take]);
                    data = &data[take..];
                    received = Lsn(received.0 + take as u64);
                    if cur.data.len() == size {
                        store_segment(repo, opts, seg_size, &cur).await?;
                        forget_streamed(repo, seg_size, &cur).await;
                        done.segments += 1;
                        done.stored_to = received;
                        flushed = received;
                        conn.send_status(received, flushed, Lsn::INVALID, false)
                            .await?;
                        last_status = Instant::now();
                        if opts.stop_after.is_some_and(|n| done.segments >= n) {
                            return Ok(None);
                        }
                        cur = Current {
                            tli,
                            segno: SegNo(cur.segno.0 + 1),
                            start: received,
                            data: Vec::with_capacity(size),
                            chunked: 0,
                        };
                    }
                }
                // A synchronous standby stores what it has as soon as no more is waiting.
                if opts.synchronous && received > flushed && !conn.has_message() {
                    store_streamed(repo, opts, seg_size, &mut cur).await?;
                    flushed = received;
                    conn.send_status(received, flushed, Lsn::INVALID, false)
                        .await?;
                    last_status = Instant::now();
                }
            }
            Event::Keepalive { reply, server_end } => {
                server_lsn = server_lsn.max(server_end);
                if reply {
                    conn.send_status(received, flushed, Lsn::INVALID, false)
                        .await?;
                    last_status = Instant::now();
                }
            }
            Event::StreamEnded => {
                let (next, start) = conn.end_of_timeline().await?;
                // The old timeline's last segment stays as its received part: the new timeline's
                // first segment begins with the same WAL, and PostgreSQL archives its own
                // `.partial` of it.
                if received > flushed {
                    store_streamed(repo, opts, seg_size, &mut cur).await?;
                }
                return Ok(Some((next, start)));
            }
        }
    }
}

/// Store what was received of the segment in progress since the last chunk, as one more chunk.
async fn store_streamed(
    repo: &Repo,
    opts: &ReceiveOptions,
    seg_size: WalSegSize,
    cur: &mut Current,
) -> anyhow::Result<()> {
    let name = SegmentName::new(cur.tli, cur.segno, seg_size)
        .with_context(|| format!("no segment name for {}", cur.start))?;
    let Some(new) = cur.data.get(cur.chunked..).filter(|n| !n.is_empty()) else {
        return Ok(());
    };
    let stored = crate::storage::envelope::encode(new, opts.compression)
        .with_context(|| format!("encode what was received of {name}"))?;
    let offset = u32::try_from(cur.chunked).context("a chunk beyond 4 GiB")?;
    let key = crate::storage::layout::ObjectKey::Streamed { seg: name, offset };
    repo.replace_durably(&key, stored.into())
        .await
        .with_context(|| format!("store what was received of {name}"))?;
    cur.chunked = cur.data.len();
    tracing::debug!(
        "stored {name} up to {} (a chunk from offset {offset})",
        Lsn(cur.start.0 + cur.data.len() as u64)
    );
    Ok(())
}

/// Delete the chunks of a segment now stored whole (a leftover is harmless: archive-get prefers
/// the whole segment).
async fn forget_streamed(repo: &Repo, seg_size: WalSegSize, cur: &Current) {
    let Some(name) = SegmentName::new(cur.tli, cur.segno, seg_size) else {
        return;
    };
    let prefix = crate::storage::layout::Prefix::Streamed(name);
    let listed = match repo.list(&prefix).await {
        Ok(l) => l,
        Err(e) => {
            tracing::debug!("list what was received of {name}: {e}");
            return;
        }
    };
    for e in listed {
        if let Err(err) = repo.delete(&e).await {
            tracing::debug!("delete {}: {err}", e.key());
        }
    }
    let _ = repo.remove_empty_local_dirs(&prefix);
}

/// Write `cur` (a whole segment) to the spool and store it as archive-push does.
async fn store_segment(
    repo: &Repo,
    opts: &ReceiveOptions,
    seg_size: WalSegSize,
    cur: &Current,
) -> anyhow::Result<()> {
    let name = SegmentName::new(cur.tli, cur.segno, seg_size)
        .with_context(|| format!("no segment name for {}", cur.start))?;
    let path = opts.spool.join(name.to_string());
    store_file(repo, opts, &path, &cur.data).await?;
    tracing::info!(
        "stored {name} (received up to {})",
        Lsn(cur.start.0 + cur.data.len() as u64)
    );
    Ok(())
}

async fn store_file(
    repo: &Repo,
    opts: &ReceiveOptions,
    path: &Path,
    data: &[u8],
) -> anyhow::Result<()> {
    std::fs::write(path, data).with_context(|| format!("write {}", path.display()))?;
    let pushed = crate::archive::push::push(repo, path, opts.compression).await;
    let _ = std::fs::remove_file(path);
    pushed
        .map(|_| ())
        .with_context(|| format!("store {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segment_sizes_as_show_prints_them() {
        assert_eq!(parse_segment_size("16MB").unwrap().bytes(), 16 << 20);
        assert_eq!(parse_segment_size("1GB").unwrap().bytes(), 1 << 30);
        assert_eq!(parse_segment_size("1MB").unwrap().bytes(), 1 << 20);
        assert!(parse_segment_size("3MB").is_err());
        assert!(parse_segment_size("16XB").is_err());
        assert!(parse_segment_size("").is_err());
        assert_eq!(
            segment_start(Lsn(0x0300_0148), WalSegSize::DEFAULT),
            Lsn(0x0300_0000)
        );
    }
}
