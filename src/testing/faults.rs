//! Fault injection (tests only): a store wrapper that fails, loses answers, or stalls, to prove that
//! retries recover from transient failures and never report a write that did not happen. Any test
//! can wrap a repository in it; it knows the store, nothing of the commands.

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

use crate::pg::PgMajor;
use crate::storage::layout::ObjectKey;
use crate::storage::retry::RetryPolicy;

/// What a faulty call does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Fault {
    /// Fail before touching the inner store (a refused connection, a 503).
    Fail,
    /// Apply the call, then fail (the answer was lost on the way back).
    ApplyThenFail,
    /// Never answer.
    Stall,
}

#[derive(Debug)]
pub(crate) struct Faulty {
    inner: InMemory,
    fault: Fault,
    /// How many more calls (puts and gets) fail.
    pub(crate) remaining: AtomicU32,
    /// Calls seen so far.
    pub(crate) calls: AtomicU32,
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
    /// A store whose next `failures` puts and gets misbehave as `fault` says.
    pub(crate) fn new(fault: Fault, failures: u32) -> Arc<Faulty> {
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

/// Retries quick enough for tests.
pub(crate) fn quick() -> RetryPolicy {
    RetryPolicy {
        budget: Duration::from_secs(5),
        attempt_timeout: Duration::from_millis(300),
        first_backoff: Duration::from_millis(5),
        max_backoff: Duration::from_millis(50),
    }
}

/// A 1 MiB segment file with a valid long header, written where `archive-push` can read it.
pub(crate) fn segment_file(dir: &std::path::Path) -> (std::path::PathBuf, Vec<u8>) {
    let mut bytes =
        crate::pg::segment::tests::fake_segment(PgMajor::V15, 1, 3, 7_000_000_000, 1 << 20);
    for (i, b) in bytes.iter_mut().enumerate().skip(8192) {
        *b = (i % 251) as u8;
    }
    let path = dir.join("000000010000000000000003");
    std::fs::write(&path, &bytes).unwrap();
    (path, bytes)
}

/// The key of the segment `segment_file` writes.
pub(crate) fn wal_key() -> ObjectKey {
    ObjectKey::Wal("000000010000000000000003".parse().unwrap())
}

/// Read what the inner store holds, bypassing the faults.
pub(crate) async fn stored(store: &Faulty, key: &ObjectKey) -> Option<Vec<u8>> {
    let r = store
        .inner
        .get_opts(&key.path(), GetOptions::default())
        .await;
    match r {
        Ok(r) => Some(crate::storage::envelope::decode(&r.bytes().await.unwrap()).unwrap()),
        Err(_) => None,
    }
}
