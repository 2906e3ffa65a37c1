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
pub mod keys;
pub mod layout;
pub mod retry;
pub mod sealed;
pub mod staged;

mod objects;

pub use objects::{Entry, Located, Original, Payload, PutMode, PutOutcome};

use std::sync::Arc;
use std::time::Duration;

use object_store::aws::AmazonS3Builder;
use object_store::azure::MicrosoftAzureBuilder;
use object_store::gcp::GoogleCloudStorageBuilder;
use object_store::local::LocalFileSystem;
use object_store::prefix::PrefixStore;
use object_store::{BackoffConfig, ObjectStore, RetryConfig};

use layout::ObjectKey;
use retry::RetryPolicy;

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
    /// A stored JSON object cannot be read: a newer format than this pitr reads, or bad content.
    #[error("{key} in {repo}: {source}")]
    Format {
        /// The object key.
        key: String,
        /// The repository location.
        repo: String,
        /// What is wrong.
        #[source]
        source: crate::format::FormatError,
    },
    /// A local file operation failed (publishing a staging file, reading a WAL file again): not a
    /// store failure, so never retried or reported as one.
    #[error("{op} {}: {source}", path.display())]
    Local {
        /// The operation, e.g. "publish".
        op: &'static str,
        /// The local file.
        path: std::path::PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The repository's encryption: a key that cannot be loaded or does not fit, an encrypted
    /// repository without its key, a key for one in the clear.
    #[error("repository {repo}: {problem}")]
    Key {
        /// The repository location.
        repo: String,
        /// What is wrong.
        problem: keys::KeyProblem,
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
            RepoError::Format {
                source: crate::format::FormatError::Newer { .. },
                ..
            } => {
                "this repository was written by a newer pitr: use that version (or newer) to read it"
            }
            RepoError::Format { .. } => {
                "the object holds content this pitr cannot read; restore it from another copy of the repository"
            }
            RepoError::Local { source, .. } => match source.kind() {
                std::io::ErrorKind::StorageFull => {
                    "the repository's file system is full: free space there (pitr expire) and try again"
                }
                std::io::ErrorKind::PermissionDenied => {
                    "the repository's files must be readable and writable by the user running pitr (PostgreSQL's archive_command runs as the server's user)"
                }
                _ => "check the file and the file system it is on",
            },
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
            RepoError::Key { problem, .. } => problem.hint(),
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
    /// Whether listings come back in key order (the cloud stores' APIs promise it; a local
    /// directory does not), so a range listing may stop at its end instead of reading on.
    ordered_listing: bool,
    /// The keyring of an encrypted repository (`store` then seals and opens every object).
    keyring: Option<Arc<keys::Keyring>>,
    /// Other repositories holding the same cluster, by name, that a verified read falls back to
    /// when this one cannot give a good copy of an object (restore across repositories).
    fallbacks: Arc<Vec<(String, Repo)>>,
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
            ordered_listing: true,
            keyring: None,
            fallbacks: Arc::default(),
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
            ordered_listing: false,
            keyring: None,
            fallbacks: Arc::default(),
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
    pub fn local_dir_modified(&self, prefix: &layout::Prefix) -> Option<i64> {
        let m = std::fs::metadata(self.local_root.as_ref()?.join(prefix.key())).ok()?;
        Some(crate::pg::PgTimestamp::from_system_time(m.modified().ok()?).unix_micros())
    }

    /// Remove the directory `prefix` of a local repository and every directory under it that holds
    /// no file (deepest first); directories that still hold files stay. Nothing for object stores.
    ///
    /// # Errors
    /// A directory cannot be read or removed.
    pub fn remove_empty_local_dirs(&self, prefix: &layout::Prefix) -> std::io::Result<()> {
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
        match prune(&root.join(prefix.key())) {
            Ok(_) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Where a WAL file is stored, for a local repository in the clear (`None` for object stores
    /// and encrypted repositories, whose objects are written only through the store).
    pub fn local_wal_path(&self, name: crate::pg::WalFileName) -> Option<std::path::PathBuf> {
        if self.keyring.is_some() {
            return None;
        }
        Some(self.local_root.as_ref()?.join(ObjectKey::Wal(name).key()))
    }

    /// Open the repository's encryption with the secret `source` names: its keyring is read (and,
    /// when `create`, made in an empty location), and from then on every object is sealed as it is
    /// written and opened as it is read. Without a source, the repository is used in the clear,
    /// and an encrypted object read from it is refused (`KeyProblem::NoKey`).
    ///
    /// # Errors
    /// `Key`: the secret cannot be loaded or does not open the keyring, a repository in the clear,
    /// one whose keyring is missing; `Store`.
    pub async fn with_encryption(
        mut self,
        source: Option<&keys::KeySource>,
        create: bool,
    ) -> Result<Repo, RepoError> {
        let Some(source) = source else {
            return Ok(self);
        };
        let secret = keys::Secret::load(source).map_err(|problem| RepoError::Key {
            repo: self.location.clone(),
            problem,
        })?;
        let ring = Arc::new(
            keys::Keyring::open(self.store.clone(), &self.location, secret, create).await?,
        );
        self.store = Arc::new(sealed::SealedStore::new(self.store.clone(), ring.clone()));
        self.keyring = Some(ring);
        Ok(self)
    }

    /// The same repository, reading from `others` (name, repository; in order) an object it cannot
    /// give a good copy of: missing, unreadable, or failing verification. Only verified reads fall
    /// back, so what comes from another repository passes the same checks (a piece its manifest's
    /// CRC) as what comes from this one.
    #[must_use]
    pub fn with_fallbacks(mut self, others: Vec<(String, Repo)>) -> Repo {
        self.fallbacks = Arc::new(others);
        self
    }

    /// The repositories a verified read falls back to, by name.
    pub fn fallbacks(&self) -> &[(String, Repo)] {
        &self.fallbacks
    }

    /// The keyring of an encrypted repository.
    pub fn keyring(&self) -> Option<&Arc<keys::Keyring>> {
        self.keyring.as_ref()
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
            ordered_listing: false,
            keyring: None,
            fallbacks: Arc::default(),
        }
    }

    /// The same repository, trusting the store to list in key order (as the cloud stores and
    /// `object_store::memory::InMemory` do).
    #[must_use]
    pub fn with_ordered_listing(mut self) -> Repo {
        self.ordered_listing = true;
        self
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
            ordered_listing: false,
            keyring: None,
            fallbacks: Arc::default(),
        }
    }

    /// The identity this process has already checked against `pitr.json`, if it has.
    pub fn known_identity(&self) -> Option<identity::RepoIdentity> {
        self.checked_identity.lock().ok().and_then(|c| c.clone())
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

    /// The object store underneath, for tests that damage objects on purpose. pitr itself goes
    /// through the typed methods.
    #[doc(hidden)]
    pub fn store(&self) -> &Arc<dyn ObjectStore> {
        &self.store
    }

    /// The repository URL, for messages.
    pub fn location(&self) -> &str {
        &self.location
    }

    fn store_err(&self, op: &'static str, key: &str, source: object_store::Error) -> RepoError {
        if let object_store::Error::Generic { source: inner, .. } = &source
            && let Some(seal) = inner.downcast_ref::<sealed::SealError>()
        {
            return match seal {
                sealed::SealError::Damaged(detail) => self.corrupt(key, detail.clone()),
                sealed::SealError::Key(problem) => RepoError::Key {
                    repo: self.location.clone(),
                    problem: problem.clone(),
                },
            };
        }
        RepoError::Store {
            op,
            key: key.to_string(),
            repo: self.location.clone(),
            source: Box::new(source),
        }
    }

    fn corrupt(&self, key: &str, detail: String) -> RepoError {
        RepoError::Corrupt {
            key: key.to_string(),
            repo: self.location.clone(),
            detail,
        }
    }
}

fn bad_budget(reason: String) -> RepoError {
    RepoError::BadSetting {
        name: retry::BUDGET_ENV,
        reason,
    }
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
    use crate::compress::Compression;
    use crate::testing::PutBytes;
    use object_store::ObjectStoreExt;
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
