//! A large synthetic repository for the catalog benchmark (`scripts/bench --scenarios catalog`):
//! WAL segments of 1 MiB written by the unit tests' WAL builder (a commit in each, a restore point
//! every 1000), stored and indexed the way `archive-push` stores them, each complete chunk rolled
//! up by [`Rollup::build`] (unless `PITR_SYNTH_ROLLUPS=0`), and two backups (near the start and near the end) so the window spans
//! all of it. Run by the benchmark as an ignored test:
//!
//! ```text
//! PITR_SYNTH_REPO=s3://bucket/prefix PITR_SYNTH_SEGMENTS=100000 \
//!     cargo test --release --lib -- --ignored --exact testing::synth::synthetic_repository
//! ```

use std::sync::Arc;

use futures::StreamExt;

use crate::catalog::Catalog;
use crate::compress::Compression;
use crate::index::{self, SegmentSummary};
use crate::pg::walbuilder::WalBuilder;
use crate::pg::{PgMajor, SegNo, SegmentName, TimelineId, WalFileName, WalSegSize};
use crate::rollup::{CHUNK, Rollup};
use crate::storage::identity::RepoIdentity;
use crate::storage::layout::ObjectKey;
use crate::storage::{PutMode, Repo};
use crate::testing::distant::Distant;

const SEG: usize = 1 << 20;
/// 2026-01-01 00:00:00 UTC in PostgreSQL's microseconds since 2000-01-01.
const T0: i64 = 820_540_800_000_000;
/// A segment every 10 s.
const STEP: i64 = 10_000_000;

/// Segment `n`: its stored envelope and its summary.
fn segment(n: u64, seg_size: WalSegSize) -> anyhow::Result<(SegmentName, Vec<u8>, SegmentSummary)> {
    let name = SegmentName::new(TimelineId::ONE, SegNo(n), seg_size)
        .ok_or_else(|| anyhow::anyhow!("segment {n} has no name"))?;
    let mut b = WalBuilder::new(n * SEG as u64, SEG, PgMajor::V15);
    let time = T0 + n as i64 * STEP;
    b.commit(1000 + n as u32, time);
    if n % 1000 == 500 {
        b.restore_point(&format!("point-{n}"), time + 1);
    }
    b.commit(1_000_000 + n as u32, time + 2);
    let wal = b.finish();
    let summary = index::summarize(&wal, name, seg_size, 8192, PgMajor::V15);
    let stored = crate::storage::envelope::encode(&wal, Compression::Zstd)?;
    Ok((name, stored, summary))
}

/// A backup manifest (no files) starting in segment `n`.
fn manifest(n: u64, seg_size: WalSegSize) -> anyhow::Result<Vec<u8>> {
    let name = |k: u64| {
        SegmentName::new(TimelineId::ONE, SegNo(k), seg_size)
            .map(|s| s.to_string())
            .unwrap_or_default()
    };
    let time = serde_json::to_value(crate::pg::PgTimestamp(T0 + n as i64 * STEP + 5))?;
    let id = format!("synthetic-{n}");
    let lsn = |k: u64, off: u64| crate::pg::Lsn(k * SEG as u64 + off).to_string();
    Ok(serde_json::to_vec(&serde_json::json!({
        "format_version": 1, "program_version": "synthetic", "id": id, "label": id,
        "system_identifier": "42", "pg_version": 15, "timeline": 1,
        "start_lsn": lsn(n, 40), "checkpoint_lsn": lsn(n, 40), "stop_lsn": lsn(n + 1, 40),
        "start_time": time, "stop_time": time,
        "start_wal": name(n), "stop_wal": name(n + 1), "compression": "zstd",
        "files": [], "directories": [], "has_tablespace_map": false,
        "size_bytes": 0, "stored_bytes": 0
    }))?)
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "writes a large repository: run by scripts/bench --scenarios catalog"]
async fn synthetic_repository() -> anyhow::Result<()> {
    let url = std::env::var("PITR_SYNTH_REPO")?;
    let count: u64 = std::env::var("PITR_SYNTH_SEGMENTS")?.parse()?;
    let rollups = std::env::var("PITR_SYNTH_ROLLUPS").map_or(true, |v| v != "0");
    write(&Repo::create(&url)?, count, rollups).await
}

/// The catalog of `PITR_SYNTH_SEGMENTS` segments (default 100 000) through a store 50 ms away
/// whose server answers at once ([`Distant`]): with roll-ups, and (with `PITR_SYNTH_BASELINE=1`)
/// without. Prints the time and the requests; checks that both catalogs say the same.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "builds a large repository in memory: run by scripts/bench --scenarios catalog"]
async fn catalog_through_a_distant_store() -> anyhow::Result<()> {
    use std::sync::atomic::Ordering;
    let count: u64 = std::env::var("PITR_SYNTH_SEGMENTS").map_or(Ok(100_000), |v| v.parse())?;
    let memory = Arc::new(object_store::memory::InMemory::new());
    write(
        &Repo::from_store(memory.clone(), "memory://synth"),
        count,
        true,
    )
    .await?;
    let distant = Distant::new(memory.clone(), std::time::Duration::from_millis(50));
    let repo = Repo::from_store(distant.clone(), "distant://synth").with_ordered_listing();
    let started = std::time::Instant::now();
    let rolled = Catalog::load(&repo).await?;
    let window = crate::restore::plan::window_text(&rolled);
    eprintln!(
        "catalog of {count} segments through 50 ms, with roll-ups: {:.2} s, {} requests, {} rolled; window {window}",
        started.elapsed().as_secs_f64(),
        distant.requests.load(Ordering::SeqCst),
        rolled.rolled.len(),
    );
    assert!(rolled.window().is_some());
    if std::env::var("PITR_SYNTH_BASELINE").is_ok_and(|v| v == "1") {
        let plain = Repo::from_store(memory.clone(), "memory://synth");
        for e in plain.list(&crate::storage::layout::Prefix::Index).await? {
            plain.delete(&e).await?;
        }
        distant.requests.store(0, Ordering::SeqCst);
        let started = std::time::Instant::now();
        let exhaustive = Catalog::load(&repo).await?;
        eprintln!(
            "catalog of {count} segments through 50 ms, without roll-ups: {:.2} s, {} requests",
            started.elapsed().as_secs_f64(),
            distant.requests.load(Ordering::SeqCst),
        );
        assert_eq!(exhaustive.window(), rolled.window());
        assert_eq!(exhaustive.timelines, rolled.timelines);
    }
    Ok(())
}

/// Write the synthetic repository of `count` segments into `repo`, rolled up when `rollups`.
async fn write(repo: &Repo, count: u64, rollups: bool) -> anyhow::Result<()> {
    let seg_size = WalSegSize::new(SEG as u32).ok_or_else(|| anyhow::anyhow!("segment size"))?;
    repo.ensure_identity(&RepoIdentity {
        format_version: 1,
        system_identifier: crate::pg::SystemId(42),
        pg_version: 15,
        wal_segment_size: seg_size,
        wal_page_size: 8192,
    })
    .await?;
    let mut first = 0;
    while first < count {
        let last = (first + CHUNK).min(count);
        let done: Vec<anyhow::Result<SegmentSummary>> = futures::stream::iter(first..last)
            .map(|n| async move {
                let (name, stored, summary) =
                    tokio::task::spawn_blocking(move || segment(n, seg_size)).await??;
                // As archive-push stores it: the summary carried in the segment's object.
                let wal = ObjectKey::Wal(WalFileName::Segment(name));
                let json = serde_json::to_vec(&summary)?;
                let sealed = repo.seal(&wal, &json, Compression::Zstd)?.into_vec();
                let stored = crate::storage::envelope::attach(stored.into(), &sealed)
                    .map_err(|e| anyhow::anyhow!("{name}: {e}"))?;
                repo.put(&wal, stored, PutMode::CreateUnique).await?;
                Ok(summary)
            })
            .buffered(32)
            .collect()
            .await;
        let summaries = done.into_iter().collect::<anyhow::Result<Vec<_>>>()?;
        if rollups && last - first == CHUNK {
            let files = (first..last)
                .filter_map(|n| SegmentName::new(TimelineId::ONE, SegNo(n), seg_size))
                .map(|s| s.to_string())
                .collect();
            let r = Rollup::build(
                TimelineId::ONE,
                SegNo(first),
                files,
                summaries,
                PgMajor::V15,
            );
            let key = crate::rollup::key(TimelineId::ONE, SegNo(first), seg_size)
                .ok_or_else(|| anyhow::anyhow!("no roll-up key"))?;
            let json = serde_json::to_vec(&r)?;
            repo.put(
                &key,
                repo.seal(&key, &json, Compression::Zstd)?,
                PutMode::CreateUnique,
            )
            .await?;
        }
        first = last;
        if first % (CHUNK * 40) == 0 {
            eprintln!("synthetic repository: {first} of {count} segments");
        }
    }
    for n in [2, count.saturating_sub(1000)] {
        let id = format!("synthetic-{n}");
        let key = ObjectKey::BackupManifest(id);
        let json = manifest(n, seg_size)?;
        repo.put(
            &key,
            repo.seal(&key, &json, Compression::None)?,
            PutMode::CreateUnique,
        )
        .await?;
    }
    Ok(())
}
