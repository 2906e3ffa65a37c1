//! Fault injection (tests only): a store wrapper that fails, loses answers, or stalls, to prove that
//! retries recover from transient failures and never report a write that did not happen.

use std::fmt;
use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures::stream::BoxStream;
use object_store::memory::InMemory;
use object_store::path::Path;
use object_store::{
    CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore,
    PutMultipartOptions, PutOptions, PutPayload, PutResult, Result,
};

use super::Repo;
use super::retry::RetryPolicy;
use crate::compress::Compression;
use crate::pg::PgMajor;
use crate::storage::layout::ObjectKey;

/// What a faulty call does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fault {
    /// Fail before touching the inner store (a refused connection, a 503).
    Fail,
    /// Apply the call, then fail (the answer was lost on the way back).
    ApplyThenFail,
    /// Never answer.
    Stall,
}

#[derive(Debug)]
struct Faulty {
    inner: InMemory,
    fault: Fault,
    /// How many more calls (puts and gets) fail.
    remaining: AtomicU32,
    calls: AtomicU32,
}

impl fmt::Display for Faulty {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Faulty({:?})", self.fault)
    }
}

fn injected() -> object_store::Error {
    object_store::Error::Generic {
        store: "faulty",
        source: "injected fault: connection reset by peer".into(),
    }
}

impl Faulty {
    fn new(fault: Fault, failures: u32) -> Arc<Faulty> {
        Arc::new(Faulty {
            inner: InMemory::new(),
            fault,
            remaining: AtomicU32::new(failures),
            calls: AtomicU32::new(0),
        })
    }

    /// Whether this call is to misbehave (and count it).
    fn take_fault(&self) -> bool {
        self.calls.fetch_add(1, Ordering::SeqCst);
        self.remaining
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
    }

    async fn run<T>(&self, op: impl std::future::Future<Output = Result<T>>) -> Result<T> {
        if !self.take_fault() {
            return op.await;
        }
        match self.fault {
            Fault::Fail => Err(injected()),
            Fault::ApplyThenFail => {
                op.await?;
                Err(injected())
            }
            Fault::Stall => {
                std::future::pending::<()>().await;
                Err(injected())
            }
        }
    }
}

#[async_trait::async_trait]
impl ObjectStore for Faulty {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> Result<PutResult> {
        self.run(self.inner.put_opts(location, payload, opts)).await
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> Result<Box<dyn MultipartUpload>> {
        self.inner.put_multipart_opts(location, opts).await
    }

    async fn get_opts(&self, location: &Path, options: GetOptions) -> Result<GetResult> {
        self.run(self.inner.get_opts(location, options)).await
    }

    async fn get_ranges(&self, location: &Path, ranges: &[Range<u64>]) -> Result<Vec<Bytes>> {
        self.run(self.inner.get_ranges(location, ranges)).await
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, Result<Path>>,
    ) -> BoxStream<'static, Result<Path>> {
        self.inner.delete_stream(locations)
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, Result<ObjectMeta>> {
        self.inner.list(prefix)
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> Result<ListResult> {
        self.inner.list_with_delimiter(prefix).await
    }

    async fn copy_opts(&self, from: &Path, to: &Path, options: CopyOptions) -> Result<()> {
        self.inner.copy_opts(from, to, options).await
    }
}

fn quick() -> RetryPolicy {
    RetryPolicy {
        budget: Duration::from_secs(5),
        attempt_timeout: Duration::from_millis(300),
        first_backoff: Duration::from_millis(5),
        max_backoff: Duration::from_millis(50),
    }
}

/// A 1 MiB segment file with a valid long header, written where `archive-push` can read it.
fn segment_file(dir: &std::path::Path) -> (std::path::PathBuf, Vec<u8>) {
    let mut bytes =
        crate::pg::segment::tests::fake_segment(PgMajor::V15, 1, 3, 7_000_000_000, 1 << 20);
    for (i, b) in bytes.iter_mut().enumerate().skip(8192) {
        *b = (i % 251) as u8;
    }
    let path = dir.join("000000010000000000000003");
    std::fs::write(&path, &bytes).unwrap();
    (path, bytes)
}

fn wal_key() -> ObjectKey {
    ObjectKey::Wal("000000010000000000000003".parse().unwrap())
}

/// Read what the inner store holds, bypassing the faults.
async fn stored(store: &Faulty, key: &ObjectKey) -> Option<Vec<u8>> {
    let r = store
        .inner
        .get_opts(&key.path(), GetOptions::default())
        .await;
    match r {
        Ok(r) => Some(super::envelope::decode(&r.bytes().await.unwrap()).unwrap()),
        Err(_) => None,
    }
}

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
            let report = crate::archive::push::push(&repo, &path, Compression::Zstd)
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
        let err = crate::archive::push::push(&repo, &path, Compression::Zstd)
            .await
            .unwrap_err();
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
    assert!(
        crate::archive::push::push(&repo, &path, Compression::Zstd)
            .await
            .is_err()
    );
}

#[tokio::test]
async fn a_backup_piece_whose_answer_was_lost_is_not_a_conflict() {
    let store = Faulty::new(Fault::ApplyThenFail, 1);
    let repo = Repo::from_store(store.clone(), "faulty://").with_retry(quick());
    let key = ObjectKey::BackupLabel("20240501T100000Z".into());
    let stored_bytes =
        super::envelope::encode(b"START WAL LOCATION: 0/3000028", Compression::None).unwrap();
    assert!(
        repo.create_encoded(&key, stored_bytes.clone())
            .await
            .is_ok()
    );
    // Someone else's bytes under the same key still conflict.
    let other = super::envelope::encode(b"something else", Compression::None).unwrap();
    assert!(matches!(
        repo.create_encoded(&key, other).await,
        Err(super::RepoError::Conflict { .. })
    ));
}
