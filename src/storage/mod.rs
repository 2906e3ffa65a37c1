//! The repository: one object-store prefix holding one cluster's WAL (and later its backups).
//!
//! Every object is written once with a conditional create and wrapped in an envelope carrying
//! checksums of its bytes (`envelope`); every read verifies them. Keys come from `layout`.
//!
//! Durability: the local store is opened with fsync of file and directory before a put returns; cloud
//! stores acknowledge a PUT only once the object is stored. Where a store cannot do conditional
//! creates (some S3-compatible servers), pitr checks for an existing object first and reads the new
//! one back to compare.

pub mod envelope;
pub mod identity;
pub mod layout;
pub mod retry;
pub mod staged;

#[cfg(test)]
mod faults;

use std::sync::Arc;
use std::time::Duration;

use object_store::aws::AmazonS3Builder;
use object_store::azure::MicrosoftAzureBuilder;
use object_store::gcp::GoogleCloudStorageBuilder;
use object_store::local::LocalFileSystem;
use object_store::prefix::PrefixStore;
use object_store::{
    BackoffConfig, ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload, RetryConfig,
};

use crate::compress::Compression;
use layout::ObjectKey;
use retry::{RetryPolicy, retry};

/// How many times a read that fails verification is retried before the object is called corrupt.
pub const READ_ATTEMPTS: u32 = 3;

/// Errors from the repository. Each names the object key it concerns.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RepoError {
    /// The repository URL cannot be used.
    #[error("repository {url:?}: {reason}")]
    BadUrl {
        /// The URL as given.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The store failed an operation (after its own retries).
    #[error("{op} {key} in {repo}: {source}")]
    Store {
        /// The operation, e.g. "read".
        op: &'static str,
        /// The object key.
        key: String,
        /// The repository location.
        repo: String,
        /// The store's error.
        #[source]
        source: Box<object_store::Error>,
    },
    /// The object exists but fails verification.
    #[error("stored object {key} in {repo} is corrupt: {detail}")]
    Corrupt {
        /// The object key.
        key: String,
        /// The repository location.
        repo: String,
        /// What check failed.
        detail: String,
    },
    /// A different object already exists under this key.
    #[error("{key} in {repo} already holds different content")]
    Conflict {
        /// The object key.
        key: String,
        /// The repository location.
        repo: String,
    },
    /// A setting from the environment cannot be used.
    #[error("{name}: {reason}")]
    BadSetting {
        /// The variable.
        name: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// There is no pitr repository at this location: a missing directory or bucket, an empty one
    /// (an unmounted mount point, a store restarted empty), or one without `pitr.json`. Nothing read
    /// from it can be trusted to mean "not archived".
    #[error("no pitr repository at {repo}: {reason}")]
    NoRepository {
        /// The repository location.
        repo: String,
        /// What was found there instead.
        reason: String,
    },
    /// The repository belongs to another cluster (or was written by an incompatible pitr).
    #[error("repository {repo} belongs to {repo_has}, but this is {found}")]
    IdentityMismatch {
        /// The repository location.
        repo: String,
        /// What the repository records.
        repo_has: String,
        /// What the caller has.
        found: String,
    },
}

impl RepoError {
    /// A suggestion for the operator, shown after the error.
    pub fn hint(&self) -> Option<&'static str> {
        Some(match self {
            RepoError::BadUrl { .. } => {
                "use file:///absolute/path, s3://bucket/prefix, gs://bucket/prefix or az://container/prefix"
            }
            RepoError::Store { source, .. } => {
                let text = retry::chain_text(source.as_ref());
                if text.contains("No space left") || text.contains("os error 28") {
                    "the repository's file system is full: free space there (pitr expire) and try again"
                } else if text.contains("Permission denied") || text.contains("os error 13") {
                    "the repository's files must be readable and writable by the user running pitr (PostgreSQL's archive_command runs as the server's user)"
                } else if retry::is_credentials_answer(&text) {
                    "the store refused the credentials or found none: set them in the environment pitr runs in (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, GOOGLE_SERVICE_ACCOUNT, AZURE_STORAGE_ACCOUNT_NAME/AZURE_STORAGE_ACCOUNT_KEY) and check they may use this bucket"
                } else if text.contains("status code: 404") || text.contains("NoSuchBucket") {
                    "the bucket or container does not exist: check --repo"
                } else {
                    "check that the store is reachable (PITR_RETRY_BUDGET sets how long pitr keeps retrying)"
                }
            }
            RepoError::Corrupt { .. } => {
                "the stored copy failed its checksum; keep it for inspection, then restore the file from another copy or remove the object so it can be archived again"
            }
            RepoError::Conflict { .. } => {
                "two clusters (or a split brain) are archiving into one repository; give each cluster its own --repo"
            }
            RepoError::IdentityMismatch { .. } => {
                "give each cluster its own repository (--repo / PITR_REPO)"
            }
            RepoError::BadSetting { .. } => {
                "PITR_RETRY_BUDGET takes a duration such as 30s or 2m, or 0 for no retries"
            }
            RepoError::NoRepository { .. } => {
                "check --repo and that the store is mounted or reachable; archive-push creates a repository with the first WAL segment it stores"
            }
        })
    }

    /// True for a store failure that may go away by itself (network, throttling, 5xx, a store that
    /// is not mounted or not there yet).
    pub fn is_store_failure(&self) -> bool {
        matches!(
            self,
            RepoError::Store { .. } | RepoError::NoRepository { .. }
        )
    }
}

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

/// Whether a store's conditional create can be trusted on its own.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum CreateCheck {
    /// The store implements `PutMode::Create` natively (local files, GCS, Azure, memory).
    Trust,
    /// S3-compatible servers differ: look before writing, and fall back to read-back-and-compare
    /// where conditional puts are not available.
    LookFirst,
}

/// A repository opened on an object store.
#[derive(Clone, Debug)]
pub struct Repo {
    store: Arc<dyn ObjectStore>,
    location: String,
    create_check: CreateCheck,
    retry: RetryPolicy,
    /// The identity this process has already checked against `pitr.json` (one read per process,
    /// not one per segment).
    checked_identity: Arc<std::sync::Mutex<Option<identity::RepoIdentity>>>,
    /// The directory of a local repository (`None` for object stores).
    local_root: Option<std::path::PathBuf>,
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

/// The cloud clients' own per-request retries; `retry` adds a budget above them.
fn retry_config() -> RetryConfig {
    RetryConfig {
        backoff: BackoffConfig::default(),
        max_retries: 3,
        retry_timeout: Duration::from_secs(20),
    }
}

impl Repo {
    /// Open the repository at `url`: `file:///path` (or an absolute path), `s3://bucket/prefix`,
    /// `gs://bucket/prefix`, `az://container/prefix`. Cloud credentials and endpoints come from each
    /// cloud's standard environment variables.
    ///
    /// A local directory must exist: reading commands never create one (see [`Repo::create`]).
    ///
    /// # Errors
    /// `RepoError::BadUrl` for an unusable URL, `NoRepository` for a local directory that does not
    /// exist.
    pub fn open(url: &str) -> Result<Repo, RepoError> {
        Repo::open_as(url, false)
    }

    /// [`Repo::open`] for the commands that write a repository into being (archive-push, backup,
    /// check): a missing local directory is created.
    ///
    /// # Errors
    /// `RepoError::BadUrl` for an unusable URL or a local directory that cannot be created.
    pub fn create(url: &str) -> Result<Repo, RepoError> {
        Repo::open_as(url, true)
    }

    fn open_as(url: &str, create: bool) -> Result<Repo, RepoError> {
        let bad = |reason: String| RepoError::BadUrl {
            url: url.to_string(),
            reason,
        };
        if url.starts_with('/') {
            return Repo::open_local(url, std::path::Path::new(url), create);
        }
        let parsed = url::Url::parse(url).map_err(|e| bad(format!("not a URL ({e})")))?;
        let prefix = parsed.path().trim_matches('/').to_string();
        let host = parsed.host_str().unwrap_or("").to_string();
        let store: Arc<dyn ObjectStore> = match parsed.scheme() {
            "file" => {
                if !url.starts_with("file://") {
                    return Err(bad(
                        "a file URL is file:///absolute/path (relative paths are not accepted)"
                            .into(),
                    ));
                }
                if !host.is_empty() && host != "localhost" {
                    return Err(bad(
                        "file URLs take no host: write file:///absolute/path".into()
                    ));
                }
                let path = parsed
                    .to_file_path()
                    .map_err(|()| bad("not a local path".into()))?;
                return Repo::open_local(url, &path, create);
            }
            "s3" | "s3a" => {
                let b = AmazonS3Builder::from_env()
                    .with_bucket_name(need_host(url, &host)?)
                    .with_retry(retry_config());
                Arc::new(b.build().map_err(|e| bad(e.to_string()))?)
            }
            "gs" => {
                let b = GoogleCloudStorageBuilder::from_env()
                    .with_bucket_name(need_host(url, &host)?)
                    .with_retry(retry_config());
                Arc::new(b.build().map_err(|e| bad(e.to_string()))?)
            }
            "az" | "azure" => {
                let b = MicrosoftAzureBuilder::from_env()
                    .with_container_name(need_host(url, &host)?)
                    .with_retry(retry_config());
                Arc::new(b.build().map_err(|e| bad(e.to_string()))?)
            }
            other => return Err(bad(format!("unsupported scheme {other:?}"))),
        };
        let create_check = if parsed.scheme().starts_with("s3") {
            CreateCheck::LookFirst
        } else {
            CreateCheck::Trust
        };
        let store: Arc<dyn ObjectStore> = if prefix.is_empty() {
            store
        } else {
            Arc::new(PrefixStore::new(store, prefix.as_str()))
        };
        Ok(Repo {
            store,
            location: url.to_string(),
            create_check,
            retry: RetryPolicy::from_env().map_err(bad_budget)?,
            checked_identity: Arc::default(),
            local_root: None,
        })
    }

    fn open_local(url: &str, path: &std::path::Path, create: bool) -> Result<Repo, RepoError> {
        let bad = |reason: String| RepoError::BadUrl {
            url: url.to_string(),
            reason,
        };
        if create {
            std::fs::create_dir_all(path)
                .map_err(|e| bad(format!("create directory {}: {e}", path.display())))?;
        } else {
            match std::fs::metadata(path) {
                Ok(m) if m.is_dir() => {}
                Ok(_) => {
                    return Err(RepoError::NoRepository {
                        repo: url.to_string(),
                        reason: format!("{} is not a directory", path.display()),
                    });
                }
                Err(e) => {
                    return Err(RepoError::NoRepository {
                        repo: url.to_string(),
                        reason: if e.kind() == std::io::ErrorKind::NotFound {
                            format!("directory {} does not exist", path.display())
                        } else {
                            format!("directory {}: {e}", path.display())
                        },
                    });
                }
            }
        }
        let fs = LocalFileSystem::new_with_prefix(path)
            .map_err(|e| bad(e.to_string()))?
            .with_fsync(true);
        // Local errors (a full disk, permissions) do not go away by waiting, unless asked to.
        let retry = if std::env::var_os(retry::BUDGET_ENV).is_some() {
            RetryPolicy::from_env().map_err(bad_budget)?
        } else {
            RetryPolicy::none()
        };
        Ok(Repo {
            store: Arc::new(fs),
            location: url.to_string(),
            create_check: CreateCheck::Trust,
            retry,
            checked_identity: Arc::default(),
            local_root: Some(path.to_path_buf()),
        })
    }

    /// Staging files left in a local repository by killed processes, older than `age` (see
    /// [`staged::stale`]); none for object stores, which never show unfinished objects.
    ///
    /// # Errors
    /// The repository's directory cannot be read.
    pub fn stale_staging(
        &self,
        age: std::time::Duration,
    ) -> anyhow::Result<Vec<std::path::PathBuf>> {
        use anyhow::Context;
        let Some(root) = &self.local_root else {
            return Ok(Vec::new());
        };
        staged::stale(root, age).with_context(|| {
            format!(
                "repository {}: look for leftover staging files under {}",
                self.location,
                root.display()
            )
        })
    }

    /// When the directory `prefix` of a local repository was last modified (Unix microseconds);
    /// `None` for object stores, which have no directories, or when it does not exist.
    pub fn local_dir_modified(&self, prefix: &str) -> Option<i64> {
        let m = std::fs::metadata(self.local_root.as_ref()?.join(prefix)).ok()?;
        let t = m
            .modified()
            .ok()?
            .duration_since(std::time::UNIX_EPOCH)
            .ok()?;
        i64::try_from(t.as_micros()).ok()
    }

    /// Remove the directory `prefix` of a local repository and every directory under it that holds
    /// no file (deepest first); directories that still hold files stay. Nothing for object stores.
    ///
    /// # Errors
    /// A directory cannot be read or removed.
    pub fn remove_empty_local_dirs(&self, prefix: &str) -> std::io::Result<()> {
        fn prune(dir: &std::path::Path) -> std::io::Result<bool> {
            let mut empty = true;
            for entry in std::fs::read_dir(dir)? {
                let entry = entry?;
                if entry.file_type()?.is_dir() {
                    empty &= prune(&entry.path())?;
                } else {
                    empty = false;
                }
            }
            if empty {
                match std::fs::remove_dir(dir) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(e),
                }
            }
            Ok(empty)
        }
        let Some(root) = &self.local_root else {
            return Ok(());
        };
        match prune(&root.join(prefix)) {
            Ok(_) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Where a WAL file is stored, for a local repository (`None` for object stores).
    pub fn local_wal_path(&self, name: crate::pg::WalFileName) -> Option<std::path::PathBuf> {
        Some(self.local_root.as_ref()?.join(ObjectKey::Wal(name).key()))
    }

    /// Publish a WAL file written to a staging file (see [`staged`]): created, or, when the name is
    /// taken, compared with what is stored, as [`Repo::put_new_encoded_looked`] does.
    ///
    /// # Errors
    /// `Conflict`, `Corrupt` (the existing object cannot be compared), or `Store`.
    pub async fn publish_staged(
        &self,
        name: crate::pg::WalFileName,
        data: Original<'_>,
        staged: staged::Staged,
        stored_bytes: u64,
    ) -> Result<PutOutcome, RepoError> {
        let key = ObjectKey::Wal(name);
        let published = tokio::task::spawn_blocking(move || staged.publish())
            .await
            .map_err(std::io::Error::other)
            .and_then(|r| r);
        match published {
            Ok(staged::Published::Created) => Ok(PutOutcome::Stored { stored_bytes }),
            Ok(staged::Published::Exists) => self.compare_existing(&key, data).await,
            Err(e) => Err(self.store_err(
                "write",
                &key,
                object_store::Error::Generic {
                    store: "LocalFileSystem",
                    source: Box::new(e),
                },
            )),
        }
    }

    /// A repository over any store (tests use `object_store::memory::InMemory`).
    pub fn from_store(store: Arc<dyn ObjectStore>, location: &str) -> Repo {
        Repo {
            store,
            location: location.to_string(),
            create_check: CreateCheck::Trust,
            retry: RetryPolicy::none(),
            checked_identity: Arc::default(),
            local_root: None,
        }
    }

    /// The same repository with another retry policy.
    #[must_use]
    pub fn with_retry(mut self, policy: RetryPolicy) -> Repo {
        self.retry = policy;
        self
    }

    /// Like `from_store`, but treating the store as an S3-compatible one without trusted
    /// conditional creates.
    pub fn from_store_look_first(store: Arc<dyn ObjectStore>, location: &str) -> Repo {
        Repo {
            store,
            location: location.to_string(),
            create_check: CreateCheck::LookFirst,
            retry: RetryPolicy::none(),
            checked_identity: Arc::default(),
            local_root: None,
        }
    }

    fn identity_checked(&self, want: &identity::RepoIdentity) -> bool {
        self.checked_identity
            .lock()
            .is_ok_and(|c| c.as_ref() == Some(want))
    }

    fn remember_identity(&self, want: &identity::RepoIdentity) {
        if let Ok(mut c) = self.checked_identity.lock() {
            *c = Some(want.clone());
        }
    }

    /// The repository URL, for messages.
    pub fn location(&self) -> &str {
        &self.location
    }

    fn store_err(
        &self,
        op: &'static str,
        key: &ObjectKey,
        source: object_store::Error,
    ) -> RepoError {
        self.store_err_at(op, &key.key(), source)
    }

    /// [`Repo::store_err`] for a raw key or prefix.
    fn store_err_at(&self, op: &'static str, key: &str, source: object_store::Error) -> RepoError {
        RepoError::Store {
            op,
            key: key.to_string(),
            repo: self.location.clone(),
            source: Box::new(source),
        }
    }

    fn corrupt(&self, key: &ObjectKey, detail: String) -> RepoError {
        RepoError::Corrupt {
            key: key.key(),
            repo: self.location.clone(),
            detail,
        }
    }

    /// Read and verify an object. `Ok(None)` means the store positively answered that it does not
    /// hold it. A read that fails verification is retried (`READ_ATTEMPTS`) before it is reported
    /// as `Corrupt`, since a transfer can be damaged in flight.
    ///
    /// # Errors
    /// `Store` when the store cannot be read, `Corrupt` when the object fails verification.
    pub async fn get(&self, key: &ObjectKey) -> Result<Option<Vec<u8>>, RepoError> {
        self.get_decoded(key, envelope::decode).await
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
        mut unwrap: impl FnMut(bytes::Bytes) -> Fut,
    ) -> anyhow::Result<Option<T>>
    where
        Fut: std::future::Future<Output = anyhow::Result<Result<T, String>>>,
    {
        let name = key.key();
        let mut attempt = 0;
        loop {
            attempt += 1;
            let Some(stored) = self.get_raw(&name).await? else {
                return Ok(None);
            };
            match unwrap(stored).await? {
                Ok(out) => return Ok(Some(out)),
                Err(detail) => {
                    tracing::warn!(key = %name, attempt, "stored object failed verification: {detail}");
                    if attempt >= READ_ATTEMPTS {
                        return Err(self.corrupt(key, detail).into());
                    }
                }
            }
        }
    }

    async fn get_decoded<T>(
        &self,
        key: &ObjectKey,
        decode: impl Fn(&[u8]) -> Result<T, String>,
    ) -> Result<Option<T>, RepoError> {
        let path = key.path();
        let mut last = String::new();
        for attempt in 1..=READ_ATTEMPTS {
            let stored = retry(&self.retry, &|| format!("read {}", key.key()), || async {
                self.store.get(&path).await?.bytes().await
            })
            .await;
            let stored = match stored {
                Ok(b) => b,
                Err(object_store::Error::NotFound { .. }) => return Ok(None),
                Err(e) => return Err(self.store_err("read", key, e)),
            };
            match decode(&stored) {
                Ok(data) => return Ok(Some(data)),
                Err(detail) => {
                    tracing::warn!(key = %key.key(), attempt, "stored object failed verification: {detail}");
                    last = detail;
                }
            }
        }
        Err(self.corrupt(key, last))
    }

    /// Store `data` under `key` unless something is already there. An identical existing object is
    /// success (`AlreadyStored`); a different one is `Conflict` and stays untouched.
    ///
    /// # Errors
    /// `Conflict`, `Corrupt` (the existing object cannot be compared), or `Store`.
    pub async fn put_new(
        &self,
        key: &ObjectKey,
        data: &[u8],
        compression: Compression,
    ) -> Result<PutOutcome, RepoError> {
        let stored = envelope::encode(data, compression)
            .map_err(|e| self.corrupt(key, format!("compress: {e}")))?;
        self.put_new_encoded(key, Original::Bytes(data), stored.into())
            .await
    }

    /// [`Repo::put_new`] for a caller that has already wrapped `data` into `stored` (with
    /// [`envelope::encode_parallel`], say).
    ///
    /// # Errors
    /// `Conflict`, `Corrupt` (the existing object cannot be compared), or `Store`.
    pub async fn put_new_encoded(
        &self,
        key: &ObjectKey,
        data: Original<'_>,
        stored: envelope::Encoded,
    ) -> Result<PutOutcome, RepoError> {
        self.put_new_encoded_looked(key, data, stored, None).await
    }

    /// Whether this store wants an existence check before a conditional create (see
    /// [`Repo::put_new_encoded_looked`]).
    pub fn looks_first(&self) -> bool {
        self.create_check == CreateCheck::LookFirst
    }

    /// [`Repo::put_new_encoded`] where the caller may already have looked whether the key exists
    /// (`found`), for instance while it was compressing, to save a round trip: a key found is
    /// compared at once, one not found is created (conditionally, so a writer since the look is
    /// still caught).
    ///
    /// # Errors
    /// `Conflict`, `Corrupt` (the existing object cannot be compared), or `Store`.
    pub async fn put_new_encoded_looked(
        &self,
        key: &ObjectKey,
        data: Original<'_>,
        stored: envelope::Encoded,
        found: Option<bool>,
    ) -> Result<PutOutcome, RepoError> {
        let path = key.path();
        let found = match found {
            None if self.looks_first() => Some(self.exists(key).await?),
            found => found,
        };
        if found == Some(true) {
            return self.compare_existing(key, data).await;
        }
        let stored_bytes = stored.len() as u64;
        let payload = PutPayload::from_iter(stored.into_parts());
        match self.put_create(&path, key, &payload).await {
            Ok(_) => Ok(PutOutcome::Stored { stored_bytes }),
            Err(object_store::Error::AlreadyExists { .. }) => {
                self.compare_existing(key, data).await
            }
            Err(object_store::Error::NotImplemented { .. }) => {
                // No conditional create here: we looked first; write, then read back and compare so
                // a concurrent writer of different bytes is caught rather than acknowledged.
                tracing::debug!(key = %key.key(), "store lacks conditional create; writing and reading back");
                retry(&self.retry, &|| format!("write {}", key.key()), || {
                    self.store.put(&path, payload.clone())
                })
                .await
                .map_err(|e| self.store_err("write", key, e))?;
                match self.compare_existing(key, data).await? {
                    PutOutcome::AlreadyStored => Ok(PutOutcome::Stored { stored_bytes }),
                    other => Ok(other),
                }
            }
            Err(e) => Err(self.store_err("write", key, e)),
        }
    }

    /// A conditional create (`PutMode::Create`) of `payload` at `path`, with retries.
    async fn put_create(
        &self,
        path: &object_store::path::Path,
        key: &ObjectKey,
        payload: &PutPayload,
    ) -> Result<object_store::PutResult, object_store::Error> {
        let opts = PutOptions {
            mode: PutMode::Create,
            ..Default::default()
        };
        retry(&self.retry, &|| format!("write {}", key.key()), || {
            self.store.put_opts(path, payload.clone(), opts.clone())
        })
        .await
    }

    /// Store an already-enveloped object under a key nothing else uses (backup pieces): a
    /// conditional create, where an existing object is a `Conflict`.
    ///
    /// # Errors
    /// `Conflict` or `Store`.
    pub async fn create_encoded(&self, key: &ObjectKey, stored: Vec<u8>) -> Result<u64, RepoError> {
        let path = key.path();
        let len = stored.len() as u64;
        let payload = PutPayload::from(stored);
        match self.put_create(&path, key, &payload).await {
            Ok(_) => Ok(len),
            Err(object_store::Error::AlreadyExists { .. }) => {
                // Ours, if an earlier attempt was applied but its answer lost; anything else conflicts.
                match self.get_raw(&key.key()).await? {
                    Some(existing) if existing.as_ref() == payload_bytes(&payload).as_slice() => {
                        Ok(len)
                    }
                    _ => Err(RepoError::Conflict {
                        key: key.key(),
                        repo: self.location.clone(),
                    }),
                }
            }
            Err(object_store::Error::NotImplemented { .. }) => {
                if self.exists(key).await? {
                    return Err(RepoError::Conflict {
                        key: key.key(),
                        repo: self.location.clone(),
                    });
                }
                retry(&self.retry, &|| format!("write {}", key.key()), || {
                    self.store.put(&path, payload.clone())
                })
                .await
                .map_err(|e| self.store_err("write", key, e))?;
                // Without a conditional create, a writer racing us may have won: read back, and
                // only what we wrote counts as ours (claims carry a nonce, so two differ).
                match self.get_raw(&key.key()).await? {
                    Some(stored) if stored.as_ref() == payload_bytes(&payload).as_slice() => {
                        Ok(len)
                    }
                    _ => Err(RepoError::Conflict {
                        key: key.key(),
                        repo: self.location.clone(),
                    }),
                }
            }
            Err(e) => Err(self.store_err("write", key, e)),
        }
    }

    /// Which of `keys` exist, found with one listing that starts just before the smallest (S3 lists in
    /// key order, so it stops after the largest) instead of one lookup each. Only keys in one
    /// directory are answered; `None` when they are not, or when the listing fails (callers then look
    /// each key up).
    pub async fn which_exist(
        &self,
        keys: &[ObjectKey],
    ) -> Option<std::collections::HashSet<String>> {
        use futures::StreamExt;
        let names: Vec<String> = keys.iter().map(ObjectKey::key).collect();
        let dir = |k: &str| k.rsplit_once('/').map(|(d, _)| d.to_string());
        let first_dir = dir(names.first()?)?;
        if names.iter().any(|k| dir(k).as_deref() != Some(&first_dir)) {
            return None;
        }
        let (min, max) = (names.iter().min()?, names.iter().max()?);
        // Everything after `min` minus its last character: `min` itself and all that follow.
        let offset = object_store::path::Path::from(&min[..min.len() - 1]);
        let prefix = object_store::path::Path::from(first_dir.as_str());
        let wanted: std::collections::HashSet<&str> = names.iter().map(String::as_str).collect();
        let mut found = std::collections::HashSet::new();
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
    pub async fn any_under(&self, prefix: &str) -> Result<bool, RepoError> {
        use futures::StreamExt;
        let path = object_store::path::Path::from(prefix);
        retry(&self.retry, &|| format!("list {prefix}"), || async {
            match self.store.list(Some(&path)).next().await {
                None => Ok(false),
                Some(Ok(_)) => Ok(true),
                Some(Err(e)) => Err(e),
            }
        })
        .await
        .map_err(|e| self.store_err_at("list", prefix, e))
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
            Err(e) => Err(self.store_err("look up", key, e)),
        }
    }

    async fn compare_existing(
        &self,
        key: &ObjectKey,
        original: Original<'_>,
    ) -> Result<PutOutcome, RepoError> {
        let existing = self.get(key).await?;
        let reread;
        let data = match original {
            Original::Bytes(b) => b,
            Original::File(path) => {
                // Up to a segment's worth of reading: on the blocking pool.
                let owned = path.to_path_buf();
                let read = tokio::task::spawn_blocking(move || std::fs::read(&owned))
                    .await
                    .unwrap_or_else(|e| Err(std::io::Error::other(e)));
                reread = read.map_err(|e| {
                    self.store_err(
                        "compare",
                        key,
                        object_store::Error::Generic {
                            store: "pitr",
                            source: format!("read {} again: {e}", path.display()).into(),
                        },
                    )
                })?;
                &reread[..]
            }
        };
        match existing {
            Some(existing) if existing == data => Ok(PutOutcome::AlreadyStored),
            Some(_) => Err(RepoError::Conflict {
                key: key.key(),
                repo: self.location.clone(),
            }),
            None => Err(self.store_err(
                "read back",
                key,
                object_store::Error::Generic {
                    store: "pitr",
                    source: "object vanished right after it was found".into(),
                },
            )),
        }
    }

    /// Every object under `prefix` (all objects for `None`), with retries.
    ///
    /// # Errors
    /// `Store` when the store cannot be listed.
    pub async fn list(
        &self,
        prefix: Option<&str>,
    ) -> Result<Vec<object_store::ObjectMeta>, RepoError> {
        use futures::TryStreamExt;
        let path = prefix.map(object_store::path::Path::from);
        let what = prefix.unwrap_or("(all)");
        retry(&self.retry, &|| format!("list {what}"), || {
            self.store.list(path.as_ref()).try_collect::<Vec<_>>()
        })
        .await
        .map_err(|e| self.store_err_at("list", what, e))
    }

    /// The names of the "directories" directly under `prefix`, with retries.
    ///
    /// # Errors
    /// `Store` when the store cannot be listed.
    pub async fn list_dirs(&self, prefix: &str) -> Result<Vec<String>, RepoError> {
        let path = object_store::path::Path::from(prefix);
        let listed = retry(&self.retry, &|| format!("list {prefix}"), || {
            self.store.list_with_delimiter(Some(&path))
        })
        .await
        .map_err(|e| self.store_err_at("list", prefix, e))?;
        Ok(listed
            .common_prefixes
            .iter()
            .filter_map(|p| p.filename().map(str::to_string))
            .collect())
    }

    /// The stored bytes under `key` exactly as stored (not verified), with retries; `None` when absent.
    ///
    /// # Errors
    /// `Store` when the store cannot be read.
    pub async fn get_raw(&self, key: &str) -> Result<Option<bytes::Bytes>, RepoError> {
        let path = object_store::path::Path::from(key);
        match retry(&self.retry, &|| format!("read {key}"), || async {
            self.store.get(&path).await?.bytes().await
        })
        .await
        {
            Ok(b) => Ok(Some(b)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.store_err_at("read", key, e)),
        }
    }

    /// Delete the object under `key`, with retries; an absent object is success.
    ///
    /// # Errors
    /// `Store` when the store refuses.
    pub async fn delete(&self, key: &str) -> Result<(), RepoError> {
        let path = object_store::path::Path::from(key);
        match retry(&self.retry, &|| format!("delete {key}"), || {
            self.store.delete(&path)
        })
        .await
        {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.store_err_at("delete", key, e)),
        }
    }

    /// Store derived data (a WAL summary), which can always be rebuilt from the objects it describes:
    /// a plain write that replaces whatever is there, so one round trip.
    ///
    /// # Errors
    /// `Store` when the store refuses.
    pub async fn put_derived(
        &self,
        key: &ObjectKey,
        data: &[u8],
        compression: Compression,
    ) -> Result<(), RepoError> {
        let stored = envelope::encode(data, compression)
            .map_err(|e| self.corrupt(key, format!("compress: {e}")))?;
        self.put_overwrite(&key.key(), stored).await
    }

    /// Overwrite `key` with already-enveloped bytes (only for derived status objects), with retries.
    ///
    /// # Errors
    /// `Store` when the store refuses.
    pub async fn put_overwrite(&self, key: &str, stored: Vec<u8>) -> Result<(), RepoError> {
        let path = object_store::path::Path::from(key);
        let payload = PutPayload::from(stored);
        retry(&self.retry, &|| format!("write {key}"), || {
            self.store.put(&path, payload.clone())
        })
        .await
        .map(|_| ())
        .map_err(|e| self.store_err_at("write", key, e))
    }

    /// The underlying store (for listing and tests).
    pub fn store(&self) -> &Arc<dyn ObjectStore> {
        &self.store
    }
}

fn bad_budget(reason: String) -> RepoError {
    RepoError::BadSetting {
        name: retry::BUDGET_ENV,
        reason,
    }
}

fn payload_bytes(p: &PutPayload) -> Vec<u8> {
    p.iter().flat_map(|b| b.iter().copied()).collect()
}

fn need_host(url: &str, host: &str) -> Result<String, RepoError> {
    if host.is_empty() {
        return Err(RepoError::BadUrl {
            url: url.to_string(),
            reason: "the URL names no bucket or container".into(),
        });
    }
    Ok(host.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use object_store::memory::InMemory;

    fn key(name: &str) -> ObjectKey {
        ObjectKey::Wal(name.parse().unwrap())
    }

    #[tokio::test]
    async fn put_is_idempotent_and_refuses_conflicts() {
        for repo in [
            Repo::from_store(Arc::new(InMemory::new()), "memory://a"),
            Repo::from_store_look_first(Arc::new(InMemory::new()), "memory://b"),
        ] {
            let k = key("000000010000000000000003");
            let data = vec![7u8; 10_000];
            assert!(matches!(
                repo.put_new(&k, &data, Compression::Zstd).await.unwrap(),
                PutOutcome::Stored { .. }
            ));
            // Identical content, even compressed differently, is success.
            assert_eq!(
                repo.put_new(&k, &data, Compression::Lz4).await.unwrap(),
                PutOutcome::AlreadyStored
            );
            // Different content is refused and the original stays.
            let mut other = data.clone();
            other[5000] = 8;
            let err = repo
                .put_new(&k, &other, Compression::Zstd)
                .await
                .unwrap_err();
            assert!(matches!(err, RepoError::Conflict { .. }), "{err}");
            assert!(
                err.to_string()
                    .contains("wal/00000001/000000010000000000000003.pitr")
            );
            assert_eq!(repo.get(&k).await.unwrap().unwrap(), data);
            assert_eq!(
                repo.get(&key("000000010000000000000004")).await.unwrap(),
                None
            );
        }
    }

    #[tokio::test]
    async fn a_read_that_fails_verification_is_retried_then_reported() {
        let repo = Repo::from_store(Arc::new(InMemory::new()), "memory://verify");
        let k = key("000000010000000000000007");
        repo.put_new(&k, b"segment", Compression::Zstd)
            .await
            .unwrap();
        // Bad twice, then good: the third read is used.
        let mut calls = 0;
        let got = repo
            .read_verified(&k, |stored| {
                calls += 1;
                let ok = calls == READ_ATTEMPTS;
                async move {
                    Ok(if ok {
                        Ok(stored.len())
                    } else {
                        Err("damaged in flight".to_string())
                    })
                }
            })
            .await
            .unwrap();
        assert!(got.is_some_and(|n| n > 0));
        // Bad every time: Corrupt, naming the key, never a success.
        let err = repo
            .read_verified(&k, |_| async { Ok(Err::<(), _>("always bad".to_string())) })
            .await
            .unwrap_err();
        assert!(matches!(
            err.downcast_ref::<RepoError>(),
            Some(RepoError::Corrupt { key, .. }) if key == &k.key()
        ));
        // Absent: None, and the check never runs.
        let absent = repo
            .read_verified(&key("000000010000000000000008"), |_| async {
                panic!("nothing to verify");
                #[allow(unreachable_code)]
                Ok(Ok(()))
            })
            .await
            .unwrap();
        assert!(absent.is_none());
    }

    #[tokio::test]
    async fn one_listing_says_which_segments_exist() {
        let mem = Arc::new(InMemory::new());
        let repo = Repo::from_store_look_first(mem, "memory://list");
        for n in [
            "000000010000000000000003",
            "000000010000000000000005",
            "000000010000000000000009",
        ] {
            repo.put_new(&key(n), b"x", Compression::None)
                .await
                .unwrap();
        }
        let ask: Vec<ObjectKey> = (3..=6)
            .map(|i| key(&format!("0000000100000000000000{i:02}")))
            .collect();
        let found = repo.which_exist(&ask).await.unwrap();
        let mut found: Vec<String> = found.into_iter().collect();
        found.sort();
        assert_eq!(
            found,
            [
                key("000000010000000000000003").key(),
                key("000000010000000000000005").key()
            ]
        );
        // Keys in two directories (two timelines) are not answered by one listing.
        let mixed = [
            key("000000010000000000000003"),
            key("000000020000000000000003"),
        ];
        assert!(repo.which_exist(&mixed).await.is_none());
    }

    #[tokio::test]
    async fn corrupt_objects_are_reported_not_hidden() {
        let mem = Arc::new(InMemory::new());
        let repo = Repo::from_store(mem.clone(), "memory://c");
        let k = key("00000002.history");
        repo.put_new(
            &k,
            b"1\t0/3000000\tno recovery target specified\n",
            Compression::None,
        )
        .await
        .unwrap();
        let mut raw = mem
            .get(&k.path())
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap()
            .to_vec();
        let last = raw.len() - 1;
        raw[last] ^= 0x20;
        mem.put(&k.path(), raw.into()).await.unwrap();
        let err = repo.get(&k).await.unwrap_err();
        assert!(matches!(err, RepoError::Corrupt { .. }), "{err}");
        // A push of the same name cannot tell whether it is identical: it fails, nothing overwritten.
        assert!(matches!(
            repo.put_new(&k, b"x", Compression::None).await.unwrap_err(),
            RepoError::Corrupt { .. }
        ));
    }

    #[test]
    fn urls() {
        assert!(matches!(
            Repo::open("ftp://x/y").unwrap_err(),
            RepoError::BadUrl { .. }
        ));
        assert!(matches!(
            Repo::open("relative/path").unwrap_err(),
            RepoError::BadUrl { .. }
        ));
        assert!(matches!(
            Repo::open("file://host/x").unwrap_err(),
            RepoError::BadUrl { .. }
        ));
        assert!(matches!(
            Repo::open("s3:///prefix").unwrap_err(),
            RepoError::BadUrl { .. }
        ));
        assert!(matches!(
            Repo::open("file:relative").unwrap_err(),
            RepoError::BadUrl { .. }
        ));
        let dir = tempfile::tempdir().unwrap();
        let url = format!("file://{}/repo", dir.path().display());
        // Reading never brings a directory into being; only the writing commands do.
        let err = Repo::open(&url).unwrap_err();
        assert!(matches!(err, RepoError::NoRepository { .. }), "{err}");
        assert!(err.to_string().contains("does not exist"), "{err}");
        assert!(!dir.path().join("repo").exists());
        assert_eq!(Repo::create(&url).unwrap().location(), url);
        assert!(dir.path().join("repo").is_dir());
        assert_eq!(Repo::open(&url).unwrap().location(), url);
    }

    #[test]
    fn store_hints_fit_the_cause() {
        let store = |text: &str| RepoError::Store {
            op: "write",
            key: "wal/00000001/000000010000000000000003.pitr".into(),
            repo: "file:///r".into(),
            source: Box::new(object_store::Error::Generic {
                store: "LocalFileSystem",
                source: text.to_string().into(),
            }),
        };
        let hint = |text: &str| store(text).hint().unwrap_or_default();
        assert!(hint("No space left on device (os error 28)").contains("full"));
        assert!(!hint("No space left on device (os error 28)").contains("AWS"));
        assert!(hint("Permission denied (os error 13)").contains("readable and writable"));
        assert!(hint("status code: 403 Forbidden").contains("credentials"));
        assert!(hint("connection reset by peer").contains("reachable"));
    }

    #[tokio::test]
    async fn a_location_without_pitr_json_is_no_repository() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("file://{}", dir.path().display());
        let repo = Repo::open(&url).unwrap();
        let err = repo.require_identity().await.unwrap_err();
        assert!(err.is_store_failure());
        assert!(err.to_string().contains("is empty"), "{err}");
        std::fs::write(dir.path().join("PG_VERSION"), "15\n").unwrap();
        let err = repo.require_identity().await.unwrap_err();
        assert!(
            err.to_string().contains("PostgreSQL data directory"),
            "{err}"
        );
        std::fs::remove_file(dir.path().join("PG_VERSION")).unwrap();
        repo.put_new(&key("000000010000000000000003"), b"x", Compression::None)
            .await
            .unwrap();
        let err = repo.require_identity().await.unwrap_err();
        assert!(err.to_string().contains("wal/ but no pitr.json"), "{err}");
    }
}
