//! Reading, writing, listing and deleting objects: every call names an [`ObjectKey`], a
//! [`Prefix`], or an [`Entry`] a listing returned; none takes a raw key.
//!
//! One write entry point, [`Repo::put`], with the three ways pitr really writes ([`PutMode`]), and
//! one verified-read loop behind [`Repo::get`] and [`Repo::read_verified`].

use std::collections::HashSet;
use std::future::Future;

use futures::{StreamExt, TryStreamExt};
use object_store::{ObjectStoreExt, PutMode as StoreMode, PutOptions, PutPayload};

use super::layout::{ObjectKey, Prefix};
use super::retry::retry;
use super::{READ_ATTEMPTS, Repo, RepoError, envelope, staged};
use crate::compress::Compression;

/// How much of an object's end [`Repo::get_attached`] reads first: a TPC-B segment's summary is
/// about 5 KB; a longer one takes a second read.
pub(super) const ATTACHMENT_TAIL: u64 = 32 << 10;

/// What a conditional create did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PutOutcome {
    /// The object was stored now.
    Stored {
        /// Bytes written to the store (compressed, with header).
        stored_bytes: u64,
    },
    /// An identical object was already stored; nothing was written.
    AlreadyStored,
}

impl PutOutcome {
    /// The bytes this put wrote (none when the object was already there).
    pub fn stored_bytes(self) -> u64 {
        match self {
            PutOutcome::Stored { stored_bytes } => stored_bytes,
            PutOutcome::AlreadyStored => 0,
        }
    }
}

/// Where the original bytes of an object being stored can be read again, to compare with an object
/// found under the same key.
#[derive(Clone, Copy, Debug)]
pub enum Original<'a> {
    /// In memory.
    Bytes(&'a [u8]),
    /// In a local file that is not changing (a WAL file PostgreSQL handed over).
    File(&'a std::path::Path),
}

/// How [`Repo::put`] treats an object already stored under the key.
#[derive(Clone, Copy, Debug)]
pub enum PutMode<'a> {
    /// Objects whose content their name fixes (WAL, `pitr.json`): an existing object with the same
    /// decoded content is success ([`PutOutcome::AlreadyStored`]); a different one is `Conflict`
    /// and stays untouched. `found`: whether the caller has already looked (while compressing, say)
    /// and saw the key taken, which saves a round trip.
    CreateOrCompare {
        /// The bytes the object holds once decoded, to compare with an existing object.
        original: Original<'a>,
        /// What the caller already knows about the key.
        found: Option<bool>,
    },
    /// A key only this writer uses (a backup's claim, pieces, label, manifest): an existing object
    /// is `Conflict` unless it holds exactly these stored bytes (an earlier attempt of ours whose
    /// answer was lost), which counts as stored.
    CreateUnique,
    /// Derived data that can always be rebuilt (WAL summaries, the verify status): a plain write
    /// that replaces whatever is there, in one round trip.
    OverwriteDerived,
}

impl<'a> PutMode<'a> {
    /// [`PutMode::CreateOrCompare`] with bytes in memory, nothing looked up yet.
    pub fn compare_with(data: &'a [u8]) -> PutMode<'a> {
        PutMode::CreateOrCompare {
            original: Original::Bytes(data),
            found: None,
        }
    }
}

/// The stored bytes of an object to put.
#[derive(Debug)]
pub enum Payload {
    /// An envelope in memory.
    Memory(envelope::Encoded),
    /// An envelope already written to a staging file beside its place in a local repository (see
    /// [`staged`]), published by a link that never replaces an existing file.
    Staged {
        /// The staging file.
        file: staged::Staged,
        /// Its length.
        stored_bytes: u64,
    },
}

impl From<envelope::Encoded> for Payload {
    fn from(e: envelope::Encoded) -> Payload {
        Payload::Memory(e)
    }
}

impl From<Vec<u8>> for Payload {
    fn from(v: Vec<u8>) -> Payload {
        Payload::Memory(v.into())
    }
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for super::ObjectKey {}
    impl Sealed for super::Entry {}
}

/// Something whose key can be read or deleted: an [`ObjectKey`], or an [`Entry`] a listing found
/// (which may be an object pitr did not write). Sealed: nothing else can name a key.
pub trait Located: sealed::Sealed {
    /// The key relative to the repository root.
    fn key_text(&self) -> String;
}

impl Located for ObjectKey {
    fn key_text(&self) -> String {
        self.key()
    }
}

/// One object found by [`Repo::list`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    key: String,
    /// What it is, when pitr wrote it.
    pub object: Option<ObjectKey>,
    /// Its size in the store.
    pub size: u64,
    /// When the store last wrote it (Unix microseconds).
    pub modified_micros: i64,
}

impl Entry {
    /// Its key relative to the repository root.
    pub fn key(&self) -> &str {
        &self.key
    }
}

impl Located for Entry {
    fn key_text(&self) -> String {
        self.key.clone()
    }
}

/// The files of the flat directory `dir` (holding the keys under `prefix`) whose keys lie strictly
/// between `after` and `before`; a missing directory holds none.
fn local_range(
    dir: &std::path::Path,
    prefix: &str,
    after: Option<&str>,
    before: Option<&str>,
) -> Result<Vec<Entry>, (std::path::PathBuf, std::io::Error)> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err((dir.to_path_buf(), e)),
    };
    let mut out = Vec::new();
    for e in entries {
        let e = e.map_err(|err| (dir.to_path_buf(), err))?;
        let Some(name) = e.file_name().to_str().map(str::to_string) else {
            continue;
        };
        let key = format!("{prefix}/{name}");
        if after.is_some_and(|a| key.as_str() <= a) || before.is_some_and(|b| key.as_str() >= b) {
            continue;
        }
        let meta = match e.metadata() {
            Ok(m) if m.is_file() => m,
            Ok(_) => continue,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => continue,
            Err(err) => return Err((e.path(), err)),
        };
        let modified_micros = meta
            .modified()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_micros() as i64);
        out.push(Entry {
            object: ObjectKey::parse(&key),
            key,
            size: meta.len(),
            modified_micros,
        });
    }
    Ok(out)
}

/// What a listing found, as an [`Entry`].
fn entry(m: object_store::ObjectMeta) -> Entry {
    let key = m.location.to_string();
    Entry {
        object: ObjectKey::parse(&key),
        key,
        size: m.size,
        modified_micros: m.last_modified.timestamp_micros(),
    }
}

impl Repo {
    /// Wrap `data` in the envelope for `key` (see [`envelope::encode`]).
    ///
    /// # Errors
    /// `Corrupt` naming the key if the compressor fails.
    pub fn seal(
        &self,
        key: &ObjectKey,
        data: &[u8],
        compression: Compression,
    ) -> Result<envelope::Encoded, RepoError> {
        envelope::encode(data, compression)
            .map(envelope::Encoded::from)
            .map_err(|e| self.corrupt(&key.key(), format!("compress: {e}")))
    }

    /// [`Repo::seal`] as a stream: write the object's content into it, then `finish` it into
    /// the payload to store (for large documents, never held whole).
    pub fn sealing(&self, compression: Compression) -> envelope::FramedWriter {
        envelope::FramedWriter::new(compression)
    }

    /// Store `payload` under `key`, treating an existing object as `mode` says.
    ///
    /// # Errors
    /// `Conflict` (a different object holds the key), `Corrupt` (the existing object cannot be
    /// compared), `Local` (a staging file cannot be published), or `Store`.
    pub async fn put(
        &self,
        key: &ObjectKey,
        payload: impl Into<Payload>,
        mode: PutMode<'_>,
    ) -> Result<PutOutcome, RepoError> {
        let (stored, found) = match (payload.into(), mode) {
            (Payload::Staged { file, stored_bytes }, _) => {
                return self.publish_staged(key, file, stored_bytes, mode).await;
            }
            (Payload::Memory(stored), PutMode::OverwriteDerived) => {
                let stored_bytes = stored.len() as u64;
                self.overwrite(key, PutPayload::from_iter(stored.into_parts()))
                    .await?;
                return Ok(PutOutcome::Stored { stored_bytes });
            }
            (Payload::Memory(stored), PutMode::CreateOrCompare { found, .. }) => {
                let found = match found {
                    None if self.looks_first() => Some(self.exists(key).await?),
                    found => found,
                };
                (stored, found)
            }
            // A key of our own: no look first (one round trip per backup piece).
            (Payload::Memory(stored), PutMode::CreateUnique) => (stored, None),
        };
        let stored_bytes = stored.len() as u64;
        let payload = PutPayload::from_iter(stored.into_parts());
        if found == Some(true) {
            return self.existing(key, mode, &payload, stored_bytes).await;
        }
        let path = key.path();
        let opts = PutOptions {
            mode: StoreMode::Create,
            ..Default::default()
        };
        let created = retry(&self.retry, &|| format!("write {}", key.key()), || {
            self.store.put_opts(&path, payload.clone(), opts.clone())
        })
        .await;
        match created {
            Ok(_) => Ok(PutOutcome::Stored { stored_bytes }),
            Err(object_store::Error::AlreadyExists { .. }) => {
                self.existing(key, mode, &payload, stored_bytes).await
            }
            Err(object_store::Error::NotImplemented { .. }) => {
                // No conditional create on this store: look (unless done), write, then read back
                // and compare, so a concurrent writer of different bytes is caught rather than
                // acknowledged.
                tracing::debug!(key = %key.key(), "store lacks conditional create; writing and reading back");
                if found.is_none() && self.exists(key).await? {
                    return self.existing(key, mode, &payload, stored_bytes).await;
                }
                self.overwrite(key, payload.clone()).await?;
                match self.existing(key, mode, &payload, stored_bytes).await? {
                    PutOutcome::AlreadyStored => Ok(PutOutcome::Stored { stored_bytes }),
                    other => Ok(other),
                }
            }
            Err(e) => Err(self.store_err("write", &key.key(), e)),
        }
    }

    /// Whether this store wants an existence check before a conditional create (S3-compatible
    /// servers, whose conditional puts differ).
    pub fn looks_first(&self) -> bool {
        self.create_check == super::CreateCheck::LookFirst
    }

    /// A plain write that replaces what is there, with retries.
    async fn overwrite(&self, key: &ObjectKey, payload: PutPayload) -> Result<(), RepoError> {
        let path = key.path();
        retry(&self.retry, &|| format!("write {}", key.key()), || {
            self.store.put(&path, payload.clone())
        })
        .await
        .map(|_| ())
        .map_err(|e| self.store_err("write", &key.key(), e))
    }

    /// Replace the object under `key` durably: in a local repository in the clear, a file written
    /// beside it, fsynced and renamed over it (its directory fsynced); in an object store, a PUT,
    /// durable once answered. For objects that change (the received part of a segment): the old
    /// content or the whole new one, never a mix.
    ///
    /// # Errors
    /// The write fails; the old object is then unchanged.
    pub async fn replace_durably(
        &self,
        key: &ObjectKey,
        stored: envelope::Encoded,
    ) -> Result<u64, RepoError> {
        let stored_bytes = stored.len() as u64;
        match (&self.local_root, &self.keyring) {
            (Some(root), None) => {
                let dest = root.join(key.key());
                let bytes: Vec<u8> = stored.into_parts().concat();
                let path = dest.clone();
                tokio::task::spawn_blocking(move || {
                    if let Some(dir) = path.parent() {
                        std::fs::create_dir_all(dir)?;
                    }
                    crate::durable::write_atomically(&path, &bytes)
                })
                .await
                .map_err(std::io::Error::other)
                .and_then(|r| r)
                .map_err(|source| RepoError::Local {
                    op: "write",
                    path: dest,
                    source,
                })?;
            }
            _ => {
                self.overwrite(key, PutPayload::from_iter(stored.into_parts()))
                    .await?
            }
        }
        Ok(stored_bytes)
    }

    /// What an object found under `key` means for a put in `mode`.
    async fn existing(
        &self,
        key: &ObjectKey,
        mode: PutMode<'_>,
        payload: &PutPayload,
        stored_bytes: u64,
    ) -> Result<PutOutcome, RepoError> {
        match mode {
            PutMode::CreateOrCompare { original, .. } => self.compare_existing(key, original).await,
            PutMode::CreateUnique => {
                let ours: Vec<u8> = payload.iter().flat_map(|b| b.iter().copied()).collect();
                match self.get_stored(key).await? {
                    Some(existing) if existing.as_ref() == ours.as_slice() => {
                        Ok(PutOutcome::Stored { stored_bytes })
                    }
                    _ => Err(self.conflict(key)),
                }
            }
            PutMode::OverwriteDerived => Ok(PutOutcome::Stored { stored_bytes }),
        }
    }

    /// Publish a staging file: linked into place, or, when the name is taken, judged by `mode`.
    async fn publish_staged(
        &self,
        key: &ObjectKey,
        file: staged::Staged,
        stored_bytes: u64,
        mode: PutMode<'_>,
    ) -> Result<PutOutcome, RepoError> {
        let dest = file.dest().to_path_buf();
        let published = tokio::task::spawn_blocking(move || file.publish())
            .await
            .map_err(std::io::Error::other)
            .and_then(|r| r);
        match (published, mode) {
            (Ok(staged::Published::Created), _) => Ok(PutOutcome::Stored { stored_bytes }),
            (Ok(staged::Published::Exists), PutMode::CreateOrCompare { original, .. }) => {
                self.compare_existing(key, original).await
            }
            (Ok(staged::Published::Exists), _) => Err(self.conflict(key)),
            (Err(source), _) => Err(RepoError::Local {
                op: "publish",
                path: dest,
                source,
            }),
        }
    }

    async fn compare_existing(
        &self,
        key: &ObjectKey,
        original: Original<'_>,
    ) -> Result<PutOutcome, RepoError> {
        let reread;
        let data = match original {
            Original::Bytes(b) => b,
            Original::File(path) => {
                // Up to a segment's worth of reading: on the blocking pool.
                let owned = path.to_path_buf();
                let read = tokio::task::spawn_blocking(move || std::fs::read(&owned))
                    .await
                    .unwrap_or_else(|e| Err(std::io::Error::other(e)));
                reread = read.map_err(|source| RepoError::Local {
                    op: "read again, to compare with the stored copy,",
                    path: path.to_path_buf(),
                    source,
                })?;
                &reread[..]
            }
        };
        // Compared as it decompresses: the stored copy is never held decoded beside `data`.
        let same = self
            .verified(key, |stored| {
                std::future::ready(Ok::<_, RepoError>(envelope::same_content(&stored, data)))
            })
            .await?;
        match same {
            Some(true) => Ok(PutOutcome::AlreadyStored),
            Some(false) => Err(self.conflict(key)),
            None => Err(self.store_err(
                "read back",
                &key.key(),
                object_store::Error::Generic {
                    store: "pitr",
                    source: "object vanished right after it was found".into(),
                },
            )),
        }
    }

    /// Read and verify an object. `Ok(None)` means the store positively answered that it does not
    /// hold it. A read that fails verification is retried (`READ_ATTEMPTS`) before it is reported
    /// as `Corrupt`, since a transfer can be damaged in flight.
    ///
    /// # Errors
    /// `Store` when the store cannot be read, `Corrupt` when the object fails verification.
    pub async fn get(&self, key: &ObjectKey) -> Result<Option<Vec<u8>>, RepoError> {
        self.verified(key, |stored| {
            std::future::ready(Ok::<_, RepoError>(envelope::decode(&stored)))
        })
        .await
    }

    /// Read `key` and hand its stored bytes to `unwrap`, which verifies and decodes them wherever
    /// they go (a file, say) and answers `Ok(Err(detail))` when they fail a check. Like [`Repo::get`],
    /// a read that fails verification is retried (`READ_ATTEMPTS`) before it is reported as
    /// `Corrupt`. `Ok(None)`: the store does not hold the object.
    ///
    /// # Errors
    /// `unwrap`'s own errors (a local write), `Store`, or `Corrupt` naming the key.
    pub async fn read_verified<T, Fut>(
        &self,
        key: &ObjectKey,
        unwrap: impl FnMut(bytes::Bytes) -> Fut,
    ) -> anyhow::Result<Option<T>>
    where
        Fut: Future<Output = anyhow::Result<Result<T, String>>>,
    {
        self.verified(key, unwrap).await
    }

    /// [`Repo::read_verified`] of the bytes `range` of `key` only (a piece in a bundle).
    ///
    /// # Errors
    /// As [`Repo::read_verified`].
    pub async fn read_verified_range<T, Fut>(
        &self,
        key: &ObjectKey,
        range: std::ops::Range<u64>,
        unwrap: impl FnMut(bytes::Bytes) -> Fut,
    ) -> anyhow::Result<Option<T>>
    where
        Fut: Future<Output = anyhow::Result<Result<T, String>>>,
    {
        self.verified_range(key, Some(range), unwrap).await
    }

    /// The one verified-read loop.
    async fn verified<T, E, Fut>(
        &self,
        key: &ObjectKey,
        check: impl FnMut(bytes::Bytes) -> Fut,
    ) -> Result<Option<T>, E>
    where
        Fut: Future<Output = Result<Result<T, String>, E>>,
        E: From<RepoError> + std::fmt::Display,
    {
        self.verified_range(key, None, check).await
    }

    /// The one verified-read loop, of all of `key` or of `range` of it: here, then in each
    /// fallback repository (see [`Repo::with_fallbacks`]) until one gives a copy that passes
    /// `check`. This repository's answer stands when none does.
    async fn verified_range<T, E, Fut>(
        &self,
        key: &ObjectKey,
        range: Option<std::ops::Range<u64>>,
        mut check: impl FnMut(bytes::Bytes) -> Fut,
    ) -> Result<Option<T>, E>
    where
        Fut: Future<Output = Result<Result<T, String>, E>>,
        E: From<RepoError> + std::fmt::Display,
    {
        let here = self.verified_here(key, range.clone(), &mut check).await;
        if matches!(here, Ok(Some(_))) || self.fallbacks.is_empty() {
            return here;
        }
        let why = match &here {
            Ok(_) => "it is missing".to_string(),
            Err(e) => e.to_string(),
        };
        for (name, other) in self.fallbacks.iter() {
            match other.verified_here(key, range.clone(), &mut check).await {
                Ok(Some(v)) => {
                    tracing::warn!(
                        key = %key.key(),
                        "read {} from repository {name} instead of {} ({why})",
                        key.key(),
                        self.location
                    );
                    return Ok(Some(v));
                }
                Ok(None) => tracing::debug!(key = %key.key(), "not in repository {name} either"),
                Err(e) => tracing::warn!(key = %key.key(), "repository {name}: {e}"),
            }
        }
        here
    }

    /// The verified-read loop of this repository alone.
    async fn verified_here<T, E, Fut>(
        &self,
        key: &ObjectKey,
        range: Option<std::ops::Range<u64>>,
        check: &mut impl FnMut(bytes::Bytes) -> Fut,
    ) -> Result<Option<T>, E>
    where
        Fut: Future<Output = Result<Result<T, String>, E>>,
        E: From<RepoError>,
    {
        let mut last = String::new();
        for attempt in 1..=READ_ATTEMPTS {
            let got = match &range {
                None => self.get_stored(key).await?,
                Some(r) => self.get_stored_range(key, r.clone()).await?,
            };
            let Some(stored) = got else {
                return Ok(None);
            };
            match check(stored).await? {
                Ok(out) => return Ok(Some(out)),
                Err(detail) => {
                    tracing::warn!(key = %key.key(), attempt, "stored object failed verification: {detail}");
                    last = detail;
                }
            }
        }
        Err(self.corrupt(&key.key(), last).into())
    }

    /// The bytes stored under a key exactly as stored (not verified: for `verify`, which checks
    /// them itself, and for readers that decode as they write), with retries; `None` when absent.
    ///
    /// # Errors
    /// `Store` when the store cannot be read.
    pub async fn get_stored(&self, what: &impl Located) -> Result<Option<bytes::Bytes>, RepoError> {
        let key = what.key_text();
        let path = object_store::path::Path::from(key.as_str());
        match retry(&self.retry, &|| format!("read {key}"), || async {
            self.store.get(&path).await?.bytes().await
        })
        .await
        {
            Ok(b) if self.keyring.is_none() && b.starts_with(super::sealed::MAGIC) => {
                Err(RepoError::Key {
                    repo: self.location.clone(),
                    problem: super::keys::KeyProblem::NoKey,
                })
            }
            Ok(b) => Ok(Some(b)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.store_err("read", &key, e)),
        }
    }

    /// The bytes `range` of `key` exactly as stored (a range read), with retries; `None` when
    /// absent.
    ///
    /// # Errors
    /// `Store` when the store cannot be read (also when the object is shorter than the range).
    pub async fn get_stored_range(
        &self,
        key: &ObjectKey,
        range: std::ops::Range<u64>,
    ) -> Result<Option<bytes::Bytes>, RepoError> {
        let key = key.key();
        let path = object_store::path::Path::from(key.as_str());
        match retry(&self.retry, &|| format!("read {key}"), || {
            self.store.get_range(&path, range.clone())
        })
        .await
        {
            Ok(b) if b.len() as u64 == range.end - range.start => Ok(Some(b)),
            Ok(b) => Err(self.corrupt(
                &key,
                format!(
                    "bytes {}..{} asked, {} returned (the object is shorter than expected)",
                    range.start,
                    range.end,
                    b.len()
                ),
            )),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.store_err("read", &key, e)),
        }
    }

    /// The attachment an object of `size` bytes (as a listing gave it) carries after its payload
    /// (see [`envelope::attach`]), decoded: a segment's index summary. One range read of its last
    /// [`ATTACHMENT_TAIL`] bytes, a second when the attachment is longer. `None` when the object
    /// is absent or has no attachment (written in format 1). An attachment that fails a check is
    /// read again (`READ_ATTEMPTS`) before it is reported.
    ///
    /// # Errors
    /// `Store`, or `Corrupt` naming the key.
    pub async fn get_attached(
        &self,
        key: &ObjectKey,
        size: u64,
    ) -> Result<Option<Vec<u8>>, RepoError> {
        let mut last = String::new();
        for attempt in 1..=READ_ATTEMPTS {
            let mut want = ATTACHMENT_TAIL.min(size);
            let found = loop {
                let Some(tail) = self
                    .get_stored_range(key, size.saturating_sub(want)..size)
                    .await?
                else {
                    return Ok(None);
                };
                match envelope::attachment_in_tail(&tail) {
                    Ok(envelope::Tail::None) => return Ok(None),
                    Ok(envelope::Tail::Need(n)) if (n as u64) > want && (n as u64) <= size => {
                        want = n as u64;
                    }
                    Ok(envelope::Tail::Need(n)) => {
                        break Err(format!(
                            "its footer states a {n}-byte trailer in a {size}-byte object"
                        ));
                    }
                    Ok(envelope::Tail::Found(a)) => break envelope::decode(a),
                    Err(e) => break Err(e),
                }
            };
            match found {
                Ok(v) => return Ok(Some(v)),
                Err(detail) => {
                    tracing::warn!(key = %key.key(), attempt, "stored attachment failed verification: {detail}");
                    last = format!("attachment: {detail}");
                }
            }
        }
        Err(self.corrupt(&key.key(), last))
    }

    /// The size of an object, `None` when absent.
    ///
    /// # Errors
    /// `Store` when the store cannot answer.
    pub async fn size_of(&self, key: &ObjectKey) -> Result<Option<u64>, RepoError> {
        let path = key.path();
        let head = retry(&self.retry, &|| format!("look up {}", key.key()), || {
            self.store.head(&path)
        })
        .await;
        match head {
            Ok(meta) => Ok(Some(meta.size)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.store_err("look up", &key.key(), e)),
        }
    }

    /// Delete an object, with retries; an absent object is success.
    ///
    /// # Errors
    /// `Store` when the store refuses.
    pub async fn delete(&self, what: &impl Located) -> Result<(), RepoError> {
        let key = what.key_text();
        let path = object_store::path::Path::from(key.as_str());
        match retry(&self.retry, &|| format!("delete {key}"), || {
            self.store.delete(&path)
        })
        .await
        {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.store_err("delete", &key, e)),
        }
    }

    /// Whether an object exists.
    ///
    /// # Errors
    /// `Store` when the store cannot answer.
    pub async fn exists(&self, key: &ObjectKey) -> Result<bool, RepoError> {
        let path = key.path();
        let head = retry(&self.retry, &|| format!("look up {}", key.key()), || {
            self.store.head(&path)
        })
        .await;
        match head {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(self.store_err("look up", &key.key(), e)),
        }
    }

    /// Which of `keys` exist, found with one listing that starts just before the smallest (S3 lists in
    /// key order, so it stops after the largest) instead of one lookup each. Only keys in one
    /// directory are answered; `None` when they are not, or when the listing fails (callers then look
    /// each key up).
    pub async fn which_exist(&self, keys: &[ObjectKey]) -> Option<HashSet<String>> {
        let names: Vec<String> = keys.iter().map(ObjectKey::key).collect();
        let dir = |k: &str| k.rsplit_once('/').map(|(d, _)| d.to_string());
        let first_dir = dir(names.first()?)?;
        if names.iter().any(|k| dir(k).as_deref() != Some(&first_dir)) {
            return None;
        }
        let (min, max) = (names.iter().min()?, names.iter().max()?);
        // Everything after `min` minus its last character: `min` itself and all that follow.
        let before_min = min.get(..min.len().saturating_sub(1))?;
        let offset = object_store::path::Path::from(before_min);
        let prefix = object_store::path::Path::from(first_dir.as_str());
        let wanted: HashSet<&str> = names.iter().map(String::as_str).collect();
        let mut found = HashSet::new();
        let mut listing = self.store.list_with_offset(Some(&prefix), &offset);
        while let Some(item) = listing.next().await {
            let meta = match item {
                Ok(m) => m,
                Err(e) => {
                    tracing::debug!("listing {prefix} failed, looking keys up one by one: {e}");
                    return None;
                }
            };
            let key = meta.location.to_string();
            if key.as_str() > max.as_str() {
                break;
            }
            if wanted.contains(key.as_str()) {
                found.insert(key);
            }
        }
        Some(found)
    }

    /// Whether anything is stored under `prefix` (one listing request, first page only).
    ///
    /// # Errors
    /// `Store` when the store cannot be listed.
    pub async fn any_under(&self, prefix: &Prefix) -> Result<bool, RepoError> {
        let path = prefix.path();
        retry(
            &self.retry,
            &|| format!("list {}", prefix.key()),
            || async {
                match self.store.list(path.as_ref()).next().await {
                    None => Ok(false),
                    Some(Ok(_)) => Ok(true),
                    Some(Err(e)) => Err(e),
                }
            },
        )
        .await
        .map_err(|e| self.store_err("list", &prefix.key(), e))
    }

    /// Every object under `prefix`, with retries.
    ///
    /// # Errors
    /// `Store` when the store cannot be listed.
    pub async fn list(&self, prefix: &Prefix) -> Result<Vec<Entry>, RepoError> {
        let path = prefix.path();
        let listed = retry(&self.retry, &|| format!("list {}", prefix.key()), || {
            self.store.list(path.as_ref()).try_collect::<Vec<_>>()
        })
        .await
        .map_err(|e| self.store_err("list", &prefix.key(), e))?;
        Ok(listed.into_iter().map(entry).collect())
    }

    /// The objects under `prefix` whose keys (relative to the repository root) lie strictly
    /// between `after` and `before` (either end open when `None`), with retries. Starts at `after`
    /// in the store's listing; stops at `before` when the store lists in key order, else reads the
    /// listing on and leaves out what lies beyond.
    ///
    /// # Errors
    /// `Store` when the store cannot be listed.
    pub async fn list_range(
        &self,
        prefix: &Prefix,
        after: Option<&str>,
        before: Option<&str>,
    ) -> Result<Vec<Entry>, RepoError> {
        if let (Some(root), Prefix::WalTimeline(_)) = (&self.local_root, prefix) {
            // A local timeline directory is flat: read its names and look only at those in the
            // range (the generic walk looks at every file).
            let dir = root.join(prefix.key());
            let key = prefix.key();
            let (after, before) = (after.map(str::to_string), before.map(str::to_string));
            let listed = tokio::task::spawn_blocking(move || {
                local_range(&dir, &key, after.as_deref(), before.as_deref())
            })
            .await
            .map_err(|e| RepoError::Local {
                op: "list",
                path: root.clone(),
                source: std::io::Error::other(e),
            })?;
            let mut listed = listed.map_err(|(path, source)| RepoError::Local {
                op: "list",
                path,
                source,
            })?;
            if self.keyring.is_some() {
                // The files' sizes are the sealed ones; callers see plain sizes, as the store
                // lists them.
                for e in &mut listed {
                    e.size = super::sealed::plain_len(e.size).unwrap_or(0);
                }
            }
            return Ok(listed);
        }
        let path = prefix.path();
        let listed = retry(
            &self.retry,
            &|| format!("list {}", prefix.key()),
            || async {
                let mut stream = match after {
                    Some(a) => self
                        .store
                        .list_with_offset(path.as_ref(), &object_store::path::Path::from(a)),
                    None => self.store.list(path.as_ref()),
                };
                let mut out = Vec::new();
                while let Some(m) = stream.next().await {
                    let m = m?;
                    let key = m.location.as_ref();
                    if after.is_some_and(|a| key <= a) {
                        continue;
                    }
                    if before.is_some_and(|b| key >= b) {
                        if self.ordered_listing {
                            break;
                        }
                        continue;
                    }
                    out.push(m);
                }
                Ok::<_, object_store::Error>(out)
            },
        )
        .await
        .map_err(|e| self.store_err("list", &prefix.key(), e))?;
        Ok(listed.into_iter().map(entry).collect())
    }

    /// The timelines with a directory under `wal/`.
    ///
    /// # Errors
    /// `Store` when the store cannot be listed.
    pub async fn wal_timelines(&self) -> Result<Vec<crate::pg::TimelineId>, RepoError> {
        Ok(self
            .list_dirs(&Prefix::Wal)
            .await?
            .iter()
            .filter_map(|d| super::layout::timeline_dir(d))
            .collect())
    }

    /// The names of the "directories" directly under `prefix`, with retries.
    ///
    /// # Errors
    /// `Store` when the store cannot be listed.
    pub async fn list_dirs(&self, prefix: &Prefix) -> Result<Vec<String>, RepoError> {
        let path = prefix.path();
        let listed = retry(&self.retry, &|| format!("list {}", prefix.key()), || {
            self.store.list_with_delimiter(path.as_ref())
        })
        .await
        .map_err(|e| self.store_err("list", &prefix.key(), e))?;
        Ok(listed
            .common_prefixes
            .iter()
            .filter_map(|p| p.filename().map(str::to_string))
            .collect())
    }

    fn conflict(&self, key: &ObjectKey) -> RepoError {
        RepoError::Conflict {
            key: key.key(),
            repo: self.location.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::faults::{Fault, Faulty, quick};

    #[tokio::test]
    async fn a_backup_piece_whose_answer_was_lost_is_not_a_conflict() {
        let store = Faulty::new(Fault::ApplyThenFail, 1);
        let repo = Repo::from_store(store.clone(), "faulty://").with_retry(quick());
        let key = ObjectKey::BackupLabel("20240501T100000Z".into());
        let stored_bytes =
            crate::storage::envelope::encode(b"START WAL LOCATION: 0/3000028", Compression::None)
                .unwrap();
        assert!(
            repo.put(&key, stored_bytes.clone(), PutMode::CreateUnique)
                .await
                .is_ok()
        );
        // Someone else's bytes under the same key still conflict.
        let other = crate::storage::envelope::encode(b"something else", Compression::None).unwrap();
        assert!(matches!(
            repo.put(&key, other, PutMode::CreateUnique).await,
            Err(RepoError::Conflict { .. })
        ));
    }

    /// A read that cannot get a good copy here (corrupt, missing) gets it from a fallback; with
    /// none holding a good copy, this repository's answer stands.
    #[tokio::test]
    async fn a_verified_read_falls_back_to_the_next_repository() {
        use object_store::ObjectStore;
        use object_store::memory::InMemory;
        use std::sync::Arc;
        let mem = || -> Arc<dyn ObjectStore> { Arc::new(InMemory::new()) };
        let (a, b, c) = (mem(), mem(), mem());
        let ra = Repo::from_store(a.clone(), "mem://a");
        let rb = Repo::from_store(b.clone(), "mem://b");
        let rc = Repo::from_store(c.clone(), "mem://c");
        let key = ObjectKey::BackupLabel("20240501T100000Z".into());
        let good =
            crate::storage::envelope::encode(b"START WAL LOCATION: 0/3000028", Compression::None)
                .unwrap();
        for r in [&ra, &rb] {
            r.put(&key, good.clone(), PutMode::CreateUnique)
                .await
                .unwrap();
        }
        // a's copy is damaged.
        let mut bad = good.to_vec();
        let last = bad.len() - 1;
        bad[last] ^= 0x40;
        a.put(&key.path(), bad.into()).await.unwrap();
        assert!(matches!(ra.get(&key).await, Err(RepoError::Corrupt { .. })));
        let with = ra
            .clone()
            .with_fallbacks(vec![("c".into(), rc.clone()), ("b".into(), rb.clone())]);
        assert_eq!(
            with.get(&key).await.unwrap().as_deref(),
            Some(&b"START WAL LOCATION: 0/3000028"[..])
        );
        // Missing here, present in a fallback.
        let only_b = rc.clone().with_fallbacks(vec![("b".into(), rb.clone())]);
        assert!(only_b.get(&key).await.unwrap().is_some());
        // No good copy anywhere: this repository's own answer.
        let none = ra.clone().with_fallbacks(vec![("c".into(), rc.clone())]);
        assert!(matches!(
            none.get(&key).await,
            Err(RepoError::Corrupt { .. })
        ));
        let absent = rc
            .clone()
            .with_fallbacks(vec![("c2".into(), Repo::from_store(mem(), "mem://d"))]);
        assert!(absent.get(&key).await.unwrap().is_none());
    }
}
