//! Encryption at rest: a store that seals every object it writes and opens every object it reads,
//! so nothing above it (envelopes, the catalog, the commands) knows a repository is encrypted.
//!
//! Every object except the keyring (`keys/`) is stored as:
//!
//! ```text
//! 0..8    magic "PITRENC1"
//! 8..16   id of the repository key that wraps the data key
//! 16..28  nonce of the wrap
//! 28..76  the object's data key (32 bytes), wrapped with AES-256-GCM, and its tag
//! 76..83  nonce prefix of the chunks
//! 83      log2 of the chunk size (16: 64 KiB)
//! 84..88  zero
//! 88..92  CRC-32C of bytes 0..88
//! 92..    chunks: each 64 KiB of the plain object (the last one shorter, or empty for an
//!         empty object) encrypted with AES-256-GCM under the data key, followed by its tag
//! ```
//!
//! A chunk's nonce is the prefix, its number (u32, big-endian) and a last-chunk flag, so a chunk
//! cannot be moved, dropped, or followed by another without failing authentication (the STREAM
//! construction). Its associated data is the magic, the prefix, the chunk size and the object's key
//! in the repository, so an object cannot be passed off under another name. The data key is random
//! per object; only the header's key fields change when `pitr key retire` rewraps it.
//!
//! Sizes: a listing shows each object's plain size (derived from the stored size), and range reads
//! fetch only the chunks that hold the range, plus the header (cached per object).

#![deny(clippy::indexing_slicing)]

use std::collections::HashMap;
use std::ops::Range;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use futures::stream::BoxStream;
use object_store::path::Path;
use object_store::{
    CopyOptions, GetOptions, GetRange, GetResult, GetResultPayload, ListResult, MultipartUpload,
    ObjectMeta, ObjectStore, ObjectStoreExt, PutMultipartOptions, PutOptions, PutPayload,
    PutResult, Result,
};
use zeroize::Zeroizing;

use super::keys::{KEY_ID_LEN, KeyProblem, Keyring, RepoKey, WRAPPED_LEN};

/// Magic of a sealed object.
pub const MAGIC: &[u8; 8] = b"PITRENC1";
/// Header length.
pub const HEADER_LEN: usize = 92;
/// Chunk size, log2.
pub const CHUNK_LOG2: u8 = 16;
/// Plain bytes per chunk.
pub const CHUNK: usize = 1 << CHUNK_LOG2;
/// Tag length.
pub const TAG_LEN: usize = 16;
const STRIDE: u64 = (CHUNK + TAG_LEN) as u64;
const PREFIX_LEN: usize = 7;
/// Objects under this prefix are stored in the clear: the keyring.
pub const CLEAR_PREFIX: &str = "keys/";
/// How many objects' headers a store keeps for range reads.
const HEADER_CACHE: usize = 4096;

/// Why a sealed object cannot be opened (carried inside `object_store::Error::Generic`, and
/// turned into `RepoError::Corrupt` or `RepoError::Key` by the repository).
#[derive(Debug, thiserror::Error)]
pub enum SealError {
    /// The bytes fail a check: altered, damaged, or cut short.
    #[error("{0}")]
    Damaged(String),
    /// A key problem.
    #[error(transparent)]
    Key(#[from] KeyProblem),
}

/// A sealed object's header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// The repository key wrapping the data key.
    pub key_id: [u8; KEY_ID_LEN],
    wrap_nonce: [u8; NONCE_LEN],
    wrapped: [u8; WRAPPED_LEN],
    prefix: [u8; PREFIX_LEN],
}

fn field<const N: usize>(b: &[u8], at: usize) -> [u8; N] {
    let mut out = [0u8; N];
    if let Some(src) = b.get(at..at + N) {
        out.copy_from_slice(src);
    }
    out
}

impl Header {
    /// Parse the first [`HEADER_LEN`] bytes of a sealed object.
    ///
    /// # Errors
    /// `Damaged`: not sealed, or a header that fails its checksum.
    pub fn parse(b: &[u8]) -> std::result::Result<Header, SealError> {
        let Some(head) = b.get(..HEADER_LEN) else {
            return Err(SealError::Damaged(format!(
                "{} bytes, shorter than an encrypted object's header",
                b.len()
            )));
        };
        if head.get(..8) != Some(MAGIC.as_slice()) {
            return Err(SealError::Damaged(
                "it is not encrypted, though its repository is (written by something other than pitr, or by pitr without the key)".into(),
            ));
        }
        let crc = u32::from_le_bytes(field(head, 88));
        if crc32c::crc32c(head.get(..88).unwrap_or_default()) != crc {
            return Err(SealError::Damaged(
                "its encryption header fails its checksum".into(),
            ));
        }
        if head.get(83) != Some(&CHUNK_LOG2) {
            return Err(SealError::Damaged(format!(
                "its chunk size (2^{}) is not one this pitr reads",
                head.get(83).copied().unwrap_or(0)
            )));
        }
        Ok(Header {
            key_id: field(head, 8),
            wrap_nonce: field(head, 16),
            wrapped: field(head, 28),
            prefix: field(head, 76),
        })
    }

    /// The header's bytes.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut h = Vec::with_capacity(HEADER_LEN);
        h.extend_from_slice(MAGIC);
        h.extend_from_slice(&self.key_id);
        h.extend_from_slice(&self.wrap_nonce);
        h.extend_from_slice(&self.wrapped);
        h.extend_from_slice(&self.prefix);
        h.push(CHUNK_LOG2);
        h.extend_from_slice(&[0; 4]);
        let crc = crc32c::crc32c(&h);
        h.extend_from_slice(&crc.to_le_bytes());
        field(&h, 0)
    }

    /// The same header with the data key wrapped by `to` instead of `from` (what `pitr key retire`
    /// writes).
    ///
    /// # Errors
    /// The data key does not open with `from`.
    pub fn rewrapped(
        &self,
        from: &RepoKey,
        to: &RepoKey,
    ) -> std::result::Result<Header, SealError> {
        let data_key = from
            .unwrap(&self.wrap_nonce, &self.wrapped)
            .ok_or_else(|| {
                SealError::Damaged("its data key does not open with the key that wraps it".into())
            })?;
        let (wrap_nonce, wrapped) = to.wrap(&data_key)?;
        Ok(Header {
            key_id: to.id,
            wrap_nonce,
            wrapped,
            ..*self
        })
    }

    fn aad(&self, path: &str) -> Vec<u8> {
        let mut aad = Vec::with_capacity(16 + path.len());
        aad.extend_from_slice(MAGIC);
        aad.extend_from_slice(&self.prefix);
        aad.push(CHUNK_LOG2);
        aad.extend_from_slice(path.as_bytes());
        aad
    }
}

fn nonce(prefix: &[u8; PREFIX_LEN], chunk: u64, last: bool) -> Nonce {
    let mut n = [0u8; NONCE_LEN];
    n[..PREFIX_LEN].copy_from_slice(prefix);
    n[PREFIX_LEN..PREFIX_LEN + 4].copy_from_slice(&(chunk as u32).to_be_bytes());
    n[NONCE_LEN - 1] = u8::from(last);
    Nonce::assume_unique_for_key(n)
}

/// How many chunks an object of `plain` bytes is stored in.
fn chunks_for(plain: u64) -> u64 {
    plain.div_ceil(CHUNK as u64).max(1)
}

/// The stored size of an object of `plain` bytes.
pub fn sealed_len(plain: u64) -> u64 {
    HEADER_LEN as u64 + plain + TAG_LEN as u64 * chunks_for(plain)
}

/// The plain size of an object stored in `sealed` bytes; `None` for a size no sealed object has.
pub fn plain_len(sealed: u64) -> Option<u64> {
    let d = sealed.checked_sub(HEADER_LEN as u64)?;
    let n = d.div_ceil(STRIDE).max(1);
    let p = d.checked_sub(n * TAG_LEN as u64)?;
    (chunks_for(p) == n).then_some(p)
}

struct DataKey {
    key: LessSafeKey,
    aad: Vec<u8>,
    prefix: [u8; PREFIX_LEN],
}

impl DataKey {
    fn open(header: &Header, by: &RepoKey, path: &str) -> std::result::Result<DataKey, SealError> {
        let raw = by
            .unwrap(&header.wrap_nonce, &header.wrapped)
            .ok_or_else(|| {
                SealError::Damaged(format!(
                    "its data key does not open with repository key {} (the header was altered)",
                    by.id_text()
                ))
            })?;
        DataKey::new(&raw, header, path)
    }

    fn new(raw: &[u8; 32], header: &Header, path: &str) -> std::result::Result<DataKey, SealError> {
        let key = UnboundKey::new(&AES_256_GCM, raw)
            .map(LessSafeKey::new)
            .map_err(|_| SealError::Damaged("AES-256-GCM key setup failed".into()))?;
        Ok(DataKey {
            key,
            aad: header.aad(path),
            prefix: header.prefix,
        })
    }

    /// Open chunk `index` in place; the plain bytes are the first `len - TAG_LEN`.
    fn open_chunk(
        &self,
        index: u64,
        last: bool,
        chunk: &mut [u8],
    ) -> std::result::Result<usize, SealError> {
        self.key
            .open_in_place(
                nonce(&self.prefix, index, last),
                Aad::from(self.aad.as_slice()),
                chunk,
            )
            .map(|p| p.len())
            .map_err(|_| {
                SealError::Damaged(format!(
                    "chunk {index} fails authentication (the object was altered, damaged or cut short)"
                ))
            })
    }
}

/// Seal `plain` (the pieces of a payload) for `path` with a new data key wrapped by `by`.
///
/// # Errors
/// The random source or the cipher fails.
pub fn seal(by: &RepoKey, path: &str, plain: &[Bytes]) -> std::result::Result<Vec<u8>, SealError> {
    let total: u64 = plain.iter().map(|b| b.len() as u64).sum();
    let data_key = Zeroizing::new(super::keys::random::<32>()?);
    let (wrap_nonce, wrapped) = by.wrap(&data_key)?;
    let header = Header {
        key_id: by.id,
        wrap_nonce,
        wrapped,
        prefix: super::keys::random::<PREFIX_LEN>()?,
    };
    let key = DataKey::new(&data_key, &header, path)?;
    let mut out = Vec::with_capacity(usize::try_from(sealed_len(total)).unwrap_or(0));
    out.extend_from_slice(&header.encode());
    let n = chunks_for(total);
    let mut pieces = plain.iter().flat_map(|b| b.chunks(CHUNK));
    let mut carry: &[u8] = &[];
    for index in 0..n {
        let start = out.len();
        // Fill one chunk from the payload's pieces.
        while out.len() - start < CHUNK {
            if carry.is_empty() {
                match pieces.next() {
                    Some(p) => carry = p,
                    None => break,
                }
            }
            let take = (CHUNK - (out.len() - start)).min(carry.len());
            let (now, later) = carry.split_at(take);
            out.extend_from_slice(now);
            carry = later;
        }
        let tag = key
            .key
            .seal_in_place_separate_tag(
                nonce(&key.prefix, index, index + 1 == n),
                Aad::from(key.aad.as_slice()),
                out.get_mut(start..).unwrap_or_default(),
            )
            .map_err(|_| SealError::Damaged("AES-256-GCM failed".into()))?;
        out.extend_from_slice(tag.as_ref());
    }
    Ok(out)
}

/// Open chunks `first..` of an object of `sealed_size` stored bytes, given as `stored` (the chunks'
/// bytes, from chunk `first`'s start), in place; returns the plain bytes.
fn open_chunks(
    key: &DataKey,
    sealed_size: u64,
    first: u64,
    mut stored: BytesMut,
) -> std::result::Result<Bytes, SealError> {
    let n = plain_len(sealed_size).map(chunks_for).ok_or_else(|| {
        SealError::Damaged(format!("{sealed_size} bytes is no encrypted object's size"))
    })?;
    let mut plain_end = 0usize;
    let mut at = 0usize;
    let mut index = first;
    while at < stored.len() {
        let len = (stored.len() - at).min(STRIDE as usize);
        let chunk = stored
            .get_mut(at..at + len)
            .ok_or_else(|| SealError::Damaged("chunk bounds".into()))?;
        let got = key.open_chunk(index, index + 1 == n, chunk)?;
        stored.copy_within(at..at + got, plain_end);
        plain_end += got;
        at += len;
        index += 1;
    }
    stored.truncate(plain_end);
    Ok(stored.freeze())
}

fn generic(e: SealError) -> object_store::Error {
    object_store::Error::Generic {
        store: "pitr-encryption",
        source: Box::new(e),
    }
}

/// A store that seals what it writes and opens what it reads.
#[derive(Debug)]
pub struct SealedStore {
    inner: Arc<dyn ObjectStore>,
    keys: Arc<Keyring>,
    headers: Mutex<HashMap<Path, Header>>,
}

impl std::fmt::Display for SealedStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Encrypted({})", self.inner)
    }
}

fn clear(path: &Path) -> bool {
    path.as_ref().starts_with(CLEAR_PREFIX)
}

fn plain_meta(mut m: ObjectMeta) -> ObjectMeta {
    if !clear(&m.location) {
        m.size = plain_len(m.size).unwrap_or(0);
    }
    m
}

impl SealedStore {
    /// Seal and open the objects of `inner` with the keys of `keys`.
    pub fn new(inner: Arc<dyn ObjectStore>, keys: Arc<Keyring>) -> SealedStore {
        SealedStore {
            inner,
            keys,
            headers: Mutex::default(),
        }
    }

    fn remember(&self, path: &Path, h: Header) {
        if let Ok(mut m) = self.headers.lock() {
            if m.len() >= HEADER_CACHE {
                m.clear();
            }
            m.insert(path.clone(), h);
        }
    }

    fn forget(&self, path: &Path) {
        if let Ok(mut m) = self.headers.lock() {
            m.remove(path);
        }
    }

    fn cached(&self, path: &Path) -> Option<Header> {
        self.headers.lock().ok()?.get(path).copied()
    }

    async fn data_key(&self, header: &Header, path: &Path) -> Result<DataKey> {
        let by = self
            .keys
            .key(header.key_id)
            .await
            .map_err(|p| generic(p.into()))?;
        DataKey::open(header, &by, path.as_ref()).map_err(generic)
    }

    async fn get_whole(&self, location: &Path, options: GetOptions) -> Result<GetResult> {
        let got = self.inner.get_opts(location, options).await?;
        let sealed_size = got.meta.size;
        let attributes = got.attributes.clone();
        let extensions = got.extensions.clone();
        let meta = plain_meta(got.meta.clone());
        let stored = got.bytes().await?;
        let header = Header::parse(&stored).map_err(generic)?;
        let key = self.data_key(&header, location).await?;
        self.remember(location, header);
        let body = BytesMut::from(stored.get(HEADER_LEN..).unwrap_or_default());
        let plain = open_chunks(&key, sealed_size, 0, body).map_err(generic)?;
        let range = 0..plain.len() as u64;
        Ok(GetResult {
            payload: GetResultPayload::Stream(futures::stream::once(async { Ok(plain) }).boxed()),
            meta,
            range,
            attributes,
            extensions,
        })
    }

    async fn get_part(
        &self,
        location: &Path,
        options: GetOptions,
        want: Range<u64>,
    ) -> Result<GetResult> {
        let first = want.start / CHUNK as u64;
        let end_chunk = want.end.div_ceil(CHUNK as u64).max(first + 1);
        let from = HEADER_LEN as u64 + first * STRIDE;
        let to = HEADER_LEN as u64 + end_chunk * STRIDE;
        let cached = self.cached(location);
        // Near the start, one read takes the header with the chunks.
        let with_header = cached.is_none() && from <= 256 << 10;
        let read = |range: Range<u64>| {
            let mut o = options.clone();
            o.range = Some(GetRange::Bounded(range));
            self.inner.get_opts(location, o)
        };
        let (header, got, skip) = if with_header {
            let got = read(0..to).await?;
            (None, got, from)
        } else if let Some(h) = cached {
            (Some(h), read(from..to).await?, 0)
        } else {
            let (h, got) = futures::join!(
                ObjectStoreExt::get_range(&self.inner, location, 0..HEADER_LEN as u64),
                read(from..to)
            );
            (Some(Header::parse(&h?).map_err(generic)?), got?, 0)
        };
        let sealed_size = got.meta.size;
        let attributes = got.attributes.clone();
        let extensions = got.extensions.clone();
        let meta = plain_meta(got.meta.clone());
        let stored = got.bytes().await?;
        let header = match header {
            Some(h) => h,
            None => Header::parse(&stored).map_err(generic)?,
        };
        let plain_size = meta.size;
        if want.start >= plain_size && !(want.start == 0 && plain_size == 0) {
            return Err(object_store::Error::Generic {
                store: "pitr-encryption",
                source: format!(
                    "range {}..{} starts beyond the object's {plain_size} bytes",
                    want.start, want.end
                )
                .into(),
            });
        }
        let key = self.data_key(&header, location).await?;
        let body = BytesMut::from(stored.get(skip as usize..).unwrap_or_default());
        let plain = match open_chunks(&key, sealed_size, first, body) {
            Ok(p) => p,
            Err(e) => {
                // A stale cached header (the object was rewritten since): read it again once.
                if cached.is_some() {
                    self.forget(location);
                    return Box::pin(self.get_part(location, options, want)).await;
                }
                return Err(generic(e));
            }
        };
        self.remember(location, header);
        let base = first * CHUNK as u64;
        let end = want.end.min(plain_size);
        let slice = plain.slice(
            ((want.start - base) as usize).min(plain.len())
                ..((end.saturating_sub(base)) as usize).min(plain.len()),
        );
        Ok(GetResult {
            payload: GetResultPayload::Stream(futures::stream::once(async { Ok(slice) }).boxed()),
            meta,
            range: want.start..end,
            attributes,
            extensions,
        })
    }
}

#[async_trait]
impl ObjectStore for SealedStore {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> Result<PutResult> {
        if clear(location) {
            return self.inner.put_opts(location, payload, opts).await;
        }
        let by = self.keys.for_writing().await.map_err(|e| match e {
            super::RepoError::Key { problem, .. } => generic(problem.into()),
            other => object_store::Error::Generic {
                store: "pitr-encryption",
                source: Box::new(other),
            },
        })?;
        let pieces: Vec<Bytes> = payload.iter().cloned().collect();
        let sealed = seal(&by, location.as_ref(), &pieces).map_err(generic)?;
        drop(pieces);
        drop(payload);
        self.forget(location);
        self.inner.put_opts(location, sealed.into(), opts).await
    }

    async fn put_multipart_opts(
        &self,
        _location: &Path,
        _opts: PutMultipartOptions,
    ) -> Result<Box<dyn MultipartUpload>> {
        Err(object_store::Error::NotImplemented {
            operation: "put_multipart_opts".into(),
            implementer: "pitr's encrypted store".into(),
        })
    }

    async fn get_opts(&self, location: &Path, options: GetOptions) -> Result<GetResult> {
        if clear(location) {
            return self.inner.get_opts(location, options).await;
        }
        if options.head {
            let mut got = self.inner.get_opts(location, options).await?;
            got.meta = plain_meta(got.meta);
            got.range = 0..got.meta.size;
            return Ok(got);
        }
        match options.range.clone() {
            None => self.get_whole(location, options).await,
            Some(GetRange::Bounded(r)) => self.get_part(location, options, r).await,
            Some(_) => Err(object_store::Error::NotImplemented {
                operation: "get_opts with an open-ended range".into(),
                implementer: "pitr's encrypted store".into(),
            }),
        }
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, Result<Path>>,
    ) -> BoxStream<'static, Result<Path>> {
        self.inner.delete_stream(locations)
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, Result<ObjectMeta>> {
        self.inner.list(prefix).map(|m| m.map(plain_meta)).boxed()
    }

    fn list_with_offset(
        &self,
        prefix: Option<&Path>,
        offset: &Path,
    ) -> BoxStream<'static, Result<ObjectMeta>> {
        self.inner
            .list_with_offset(prefix, offset)
            .map(|m| m.map(plain_meta))
            .boxed()
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> Result<ListResult> {
        let mut listed = self.inner.list_with_delimiter(prefix).await?;
        listed.objects = listed.objects.into_iter().map(plain_meta).collect();
        Ok(listed)
    }

    async fn copy_opts(&self, _from: &Path, _to: &Path, _options: CopyOptions) -> Result<()> {
        // A sealed object is bound to its name: a copy under another name would not open.
        Err(object_store::Error::NotImplemented {
            operation: "copy_opts".into(),
            implementer: "pitr's encrypted store".into(),
        })
    }
}

/// What a rewrap pass over the repository did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Rewrapped {
    /// Objects whose header was read.
    pub checked: u64,
    /// Objects whose data key was rewrapped.
    pub rewrapped: u64,
}

/// Rewrap, in every sealed object of `raw` whose data key `from` wraps, the data key with `to`
/// (the header changes; the encrypted chunks stay as they are), `jobs` objects at a time. Each
/// object is replaced whole, in one write.
///
/// # Errors
/// A store failure, or an object whose data key does not open (named).
pub async fn rewrap_all(
    raw: &Arc<dyn ObjectStore>,
    from: &RepoKey,
    to: &RepoKey,
    jobs: usize,
) -> std::result::Result<Rewrapped, (String, object_store::Error)> {
    let listed: Vec<ObjectMeta> = raw
        .list(None)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<_>>()
        .map_err(|e| (String::new(), e))?;
    let work = listed
        .into_iter()
        .filter(|m| !clear(&m.location) && m.size >= HEADER_LEN as u64)
        .map(|m| async move {
            let path = m.location;
            let name = path.to_string();
            let head = raw
                .get_range(&path, 0..HEADER_LEN as u64)
                .await
                .map_err(|e| (name.clone(), e))?;
            let Ok(header) = Header::parse(&head) else {
                return Ok((1, 0));
            };
            if header.key_id != from.id {
                return Ok((1, 0));
            }
            let stored = raw
                .get(&path)
                .await
                .map_err(|e| (name.clone(), e))?
                .bytes()
                .await
                .map_err(|e| (name.clone(), e))?;
            // Read again whole: the header of what is rewritten, not of what was there before.
            let header = Header::parse(&stored).map_err(|e| (name.clone(), generic(e)))?;
            if header.key_id != from.id {
                return Ok((1, 0));
            }
            let new = header
                .rewrapped(from, to)
                .map_err(|e| (name.clone(), generic(e)))?;
            let mut out = BytesMut::from(stored.as_ref());
            if let Some(h) = out.get_mut(..HEADER_LEN) {
                h.copy_from_slice(&new.encode());
            }
            raw.put(&path, out.freeze().into())
                .await
                .map_err(|e| (name.clone(), e))?;
            Ok::<_, (String, object_store::Error)>((1, 1))
        });
    let mut done = futures::stream::iter(work).buffer_unordered(jobs.max(1));
    let mut total = Rewrapped::default();
    while let Some(r) = done.next().await {
        let (c, w) = r?;
        total.checked += c;
        total.rewrapped += w;
    }
    Ok(total)
}

#[cfg(test)]
#[allow(clippy::indexing_slicing)]
mod tests {
    use super::*;
    use object_store::memory::InMemory;

    async fn store() -> (Arc<InMemory>, SealedStore, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("repo.key");
        super::super::keys::generate_key_file(&key).unwrap();
        let mem = Arc::new(InMemory::new());
        let secret =
            super::super::keys::Secret::load(&super::super::keys::KeySource::File(key)).unwrap();
        let ring = Keyring::open(mem.clone(), "memory://sealed", secret, true)
            .await
            .unwrap();
        (mem.clone(), SealedStore::new(mem, Arc::new(ring)), dir)
    }

    async fn read(store: &dyn ObjectStore, path: &Path) -> Vec<u8> {
        store
            .get(path)
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap()
            .to_vec()
    }

    fn text(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 % 251) as u8).collect()
    }

    #[test]
    fn sizes_map_both_ways() {
        for p in [
            0u64,
            1,
            100,
            CHUNK as u64 - 1,
            CHUNK as u64,
            CHUNK as u64 + 1,
            5 << 20,
            (5 << 20) + 17,
        ] {
            assert_eq!(plain_len(sealed_len(p)), Some(p), "{p}");
        }
        assert_eq!(plain_len(10), None);
        assert_eq!(sealed_len(0), (HEADER_LEN + TAG_LEN) as u64);
    }

    #[tokio::test]
    async fn objects_round_trip_whole_and_by_range_and_hide_their_content() {
        let (mem, store, _dir) = store().await;
        for len in [0usize, 5, CHUNK, CHUNK + 3, 3 * CHUNK + 100] {
            let path = Path::from(format!("wal/00000001/{len}.pitr"));
            let data = text(len);
            store.put(&path, data.clone().into()).await.unwrap();
            let raw = mem.get(&path).await.unwrap().bytes().await.unwrap();
            assert_eq!(raw.len() as u64, sealed_len(len as u64));
            assert!(raw.starts_with(MAGIC));
            if len >= 64 {
                let probe = &data[10..42];
                assert!(
                    !raw.windows(probe.len()).any(|w| w == probe),
                    "plain bytes stored"
                );
            }
            let back = store.get(&path).await.unwrap();
            assert_eq!(back.meta.size, len as u64);
            assert_eq!(back.bytes().await.unwrap().as_ref(), data.as_slice());
            let head = store.head(&path).await.unwrap();
            assert_eq!(head.size, len as u64);
            let listed: Vec<_> = store
                .list(Some(&Path::from("wal/00000001")))
                .collect()
                .await;
            let found = listed
                .iter()
                .flatten()
                .find(|m| m.location == path)
                .unwrap();
            assert_eq!(found.size, len as u64);
            // Ranges anywhere, across chunk ends, to the end and past it (clamped as stores do).
            if len > 0 {
                for r in [
                    0..len.min(3),
                    len / 2..len,
                    len.saturating_sub(2)..len,
                    1.min(len - 1)..len + 100,
                ] {
                    let r = r.start as u64..r.end as u64;
                    let got = store.get_range(&path, r.clone()).await.unwrap();
                    let end = (r.end as usize).min(len);
                    assert_eq!(got.as_ref(), &data[r.start as usize..end], "{len} {r:?}");
                }
            }
        }
    }

    #[tokio::test]
    async fn altered_moved_or_cut_objects_do_not_open() {
        let (mem, store, _dir) = store().await;
        let path = Path::from("backups/x/data/base/1.0.pitr");
        let data = text(3 * CHUNK + 10);
        store.put(&path, data.clone().into()).await.unwrap();
        let raw = read(&*mem, &path).await;
        let damaged = |bytes: Vec<u8>, at: &Path| {
            let mem = mem.clone();
            let at = at.clone();
            async move {
                mem.put(&at, bytes.into()).await.unwrap();
            }
        };
        let expect_damage = |e: object_store::Error| {
            let object_store::Error::Generic { source, .. } = e else {
                panic!("{e}");
            };
            assert!(
                matches!(
                    source.downcast_ref::<SealError>(),
                    Some(SealError::Damaged(_))
                ),
                "{source}"
            );
        };
        // A flipped payload bit.
        let mut flipped = raw.clone();
        flipped[HEADER_LEN + CHUNK + 40] ^= 1;
        damaged(flipped, &path).await;
        expect_damage(store.get(&path).await.unwrap_err());
        // Cut at a chunk boundary: the new last chunk was not sealed as last.
        damaged(raw[..HEADER_LEN + 2 * STRIDE as usize].to_vec(), &path).await;
        expect_damage(store.get(&path).await.unwrap_err());
        // The same bytes under another name.
        let other = Path::from("backups/x/data/base/2.0.pitr");
        damaged(raw.clone(), &other).await;
        expect_damage(store.get(&other).await.unwrap_err());
        // A damaged header.
        let mut head = raw.clone();
        head[30] ^= 1;
        damaged(head, &path).await;
        expect_damage(store.get(&path).await.unwrap_err());
        // Intact again: opens.
        damaged(raw, &path).await;
        assert_eq!(read(&store, &path).await.as_slice(), data.as_slice());
    }

    #[tokio::test]
    async fn the_keyring_stays_in_the_clear_and_rewrap_keeps_objects_readable() {
        let (mem, store, _dir) = store().await;
        let keyring = || async {
            mem.list(Some(&Path::from("keys")))
                .collect::<Vec<_>>()
                .await
                .len()
        };
        assert_eq!(keyring().await, 0, "no key before the first object");
        let path = Path::from("pitr.json");
        store
            .put(&path, b"{\"format_version\":1}".to_vec().into())
            .await
            .unwrap();
        assert_eq!(keyring().await, 2, "one key and active.json");
        let old = store.keys.active().unwrap();
        store.keys.add().await.unwrap();
        let new = store.keys.active().unwrap();
        assert_ne!(old.id, new.id);
        let raw = read(&*mem, &path).await;
        let h = Header::parse(&raw).unwrap();
        assert_eq!(h.key_id, old.id);
        let mut rewritten = raw.clone();
        rewritten[..HEADER_LEN].copy_from_slice(&h.rewrapped(&old, &new).unwrap().encode());
        mem.put(&path, rewritten.into()).await.unwrap();
        store.forget(&path);
        assert_eq!(
            read(&store, &path).await.as_slice(),
            b"{\"format_version\":1}"
        );
    }
}
