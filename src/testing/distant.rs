//! A store far away (tests and the catalog benchmark only): every request to an in-memory store
//! waits `delay` first, and a listing waits again for every page of 1000 keys, as S3's does. It
//! counts the requests. The server behind it answers at once, so a timing through it shows what
//! pitr's own requests cost at that distance.

use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use futures::stream::BoxStream;
use object_store::memory::InMemory;
use object_store::path::Path;
use object_store::{
    CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore,
    PutMultipartOptions, PutOptions, PutPayload, PutResult, Result,
};

/// Keys per listing page.
const PAGE: usize = 1000;

#[derive(Debug)]
pub(crate) struct Distant {
    inner: Arc<InMemory>,
    delay: Duration,
    /// Requests made (a listing counts one per page).
    pub(crate) requests: Arc<AtomicU64>,
}

impl std::fmt::Display for Distant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Distant({:?})", self.delay)
    }
}

impl Distant {
    pub(crate) fn new(inner: Arc<InMemory>, delay: Duration) -> Arc<Distant> {
        Arc::new(Distant {
            inner,
            delay,
            requests: Arc::new(AtomicU64::new(0)),
        })
    }

    async fn wait(&self) {
        self.requests.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(self.delay).await;
    }

    /// `listing`, one request per page.
    fn paged(
        &self,
        listing: BoxStream<'static, Result<ObjectMeta>>,
    ) -> BoxStream<'static, Result<ObjectMeta>> {
        let (delay, requests) = (self.delay, self.requests.clone());
        listing
            .enumerate()
            .then(move |(i, m)| {
                let requests = requests.clone();
                async move {
                    if i % PAGE == 0 {
                        requests.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(delay).await;
                    }
                    m
                }
            })
            .boxed()
    }
}

#[async_trait::async_trait]
impl ObjectStore for Distant {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> Result<PutResult> {
        self.wait().await;
        self.inner.put_opts(location, payload, opts).await
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> Result<Box<dyn MultipartUpload>> {
        self.wait().await;
        self.inner.put_multipart_opts(location, opts).await
    }

    async fn get_opts(&self, location: &Path, options: GetOptions) -> Result<GetResult> {
        self.wait().await;
        self.inner.get_opts(location, options).await
    }

    async fn get_ranges(&self, location: &Path, ranges: &[Range<u64>]) -> Result<Vec<Bytes>> {
        self.wait().await;
        self.inner.get_ranges(location, ranges).await
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, Result<Path>>,
    ) -> BoxStream<'static, Result<Path>> {
        self.inner.delete_stream(locations)
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, Result<ObjectMeta>> {
        self.paged(self.inner.list(prefix))
    }

    fn list_with_offset(
        &self,
        prefix: Option<&Path>,
        offset: &Path,
    ) -> BoxStream<'static, Result<ObjectMeta>> {
        self.paged(self.inner.list_with_offset(prefix, offset))
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> Result<ListResult> {
        self.wait().await;
        self.inner.list_with_delimiter(prefix).await
    }

    async fn copy_opts(&self, from: &Path, to: &Path, options: CopyOptions) -> Result<()> {
        self.wait().await;
        self.inner.copy_opts(from, to, options).await
    }
}
