//! Repository keys: the secret an operator configures, the repository keys it opens, and the
//! keyring that holds them (`keys/` in the repository, stored in the clear: each entry's key is
//! wrapped by the operator's secret).
//!
//! Three levels, so that no rotation ever re-encrypts data:
//!
//! * the **secret**: a key file (at least 32 bytes, turned into a key with HKDF-SHA256) or a
//!   passphrase file (argon2id, its parameters and salt recorded in the entry). Read from a file
//!   only, never from the command line; never printed or logged.
//! * **repository keys** (`keys/<id>.json`): random 256-bit keys, each wrapped (AES-256-GCM) by
//!   the key the secret derives. The newest one that is not retired is *active* (`keys/active.json`
//!   is a copy of its entry, so a command finds it with one read); new objects use it.
//! * a **data key** per object: random, wrapped by a repository key in the object's header (see
//!   `sealed`), which names the repository key's id. `pitr key retire` rewraps the data keys that
//!   use the retired key (the header changes; the encrypted payload does not), then drops it.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use futures::StreamExt;
use object_store::{ObjectStore, ObjectStoreExt, PutMode as StoreMode, PutOptions};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use super::RepoError;
use super::layout::{KEYS_PREFIX, ObjectKey};
use crate::compress::Compression;

/// Shortest key file accepted.
pub const KEY_FILE_MIN: usize = 32;
/// Shortest passphrase accepted.
pub const PASSPHRASE_MIN: usize = 12;
/// The keyring entry format this pitr writes.
pub const KEY_FORMAT: u32 = 1;
/// argon2id parameters for a new passphrase (OWASP's minimum: 19 MiB, 2 passes, 1 lane): paid
/// once by every command that opens the repository, archive-push included.
pub const ARGON2_MEMORY_KIB: u32 = 19 * 1024;
/// See [`ARGON2_MEMORY_KIB`].
pub const ARGON2_ITERATIONS: u32 = 2;
/// See [`ARGON2_MEMORY_KIB`].
pub const ARGON2_PARALLELISM: u32 = 1;

/// Length of a repository key's id.
pub const KEY_ID_LEN: usize = 8;
/// Length of a wrapped key: 32 bytes and a 16-byte tag.
pub const WRAPPED_LEN: usize = 48;

/// Where the secret that opens a repository's keys comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeySource {
    /// A key file (`encryption_key_file`).
    File(PathBuf),
    /// A passphrase file (`encryption_passphrase_file`).
    Passphrase(PathBuf),
}

impl KeySource {
    /// The path of the file.
    pub fn path(&self) -> &std::path::Path {
        match self {
            KeySource::File(p) | KeySource::Passphrase(p) => p,
        }
    }

    /// The flag that names it, for `restore_command`s pitr writes.
    pub fn flag(&self) -> &'static str {
        match self {
            KeySource::File(_) => "--encryption-key-file",
            KeySource::Passphrase(_) => "--encryption-passphrase-file",
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            KeySource::File(_) => "key file",
            KeySource::Passphrase(_) => "passphrase file",
        }
    }
}

impl std::fmt::Display for KeySource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.kind(), self.path().display())
    }
}

/// What is wrong with a repository's encryption; rendered after "repository X: ".
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum KeyProblem {
    /// The configured secret cannot be read.
    #[error("cannot load the {from}: {detail}")]
    Unreadable {
        /// The file.
        from: KeySource,
        /// Why.
        detail: String,
    },
    /// The secret does not open a repository key.
    #[error("wrong key: the configured {from} does not open repository key {id}")]
    WrongKey {
        /// The file.
        from: KeySource,
        /// The repository key.
        id: String,
    },
    /// A key file is configured where a passphrase made the key, or the other way round.
    #[error("repository key {id} is opened with a {wanted}, but a {from} is configured")]
    KindMismatch {
        /// The repository key.
        id: String,
        /// What it needs.
        wanted: &'static str,
        /// What is configured.
        from: KeySource,
    },
    /// A key is configured for a repository written in the clear.
    #[error("it is not encrypted, but a {from} is configured")]
    NotEncrypted {
        /// The file.
        from: KeySource,
    },
    /// An encrypted repository and no key configured.
    #[error("it is encrypted, but no key is configured")]
    NoKey,
    /// Encrypted objects but no keyring.
    #[error("it is encrypted, but its keyring (keys/) is missing or has no live key")]
    NoKeyring,
    /// An object names a repository key the keyring does not hold.
    #[error("an object is encrypted with repository key {id}, which the keyring does not hold")]
    UnknownKey {
        /// The key id the object names.
        id: String,
    },
    /// A keyring entry cannot be used.
    #[error("keyring entry {key}: {detail}")]
    BadEntry {
        /// Its object key.
        key: String,
        /// What is wrong.
        detail: String,
    },
    /// Writing needs an active key and there is none.
    #[error("no active repository key to encrypt with")]
    NoActiveKey,
    /// An operation on keys cannot be done.
    #[error("{0}")]
    Refused(String),
}

impl KeyProblem {
    /// What to do about it.
    pub fn hint(&self) -> &'static str {
        match self {
            KeyProblem::Unreadable { .. } => {
                "the file must exist and be readable by the user running pitr (under archive_command and restore_command: the server's user); a key file holds at least 32 bytes (pitr key generate --out FILE makes one), a passphrase at least 12 characters"
            }
            KeyProblem::WrongKey { .. } | KeyProblem::KindMismatch { .. } => {
                "configure the key file or passphrase file this repository was created with"
            }
            KeyProblem::NotEncrypted { .. } => {
                "encryption is chosen when a repository is created: remove the key setting to use this repository as it is, or give the key to a new repository"
            }
            KeyProblem::NoKey => {
                "set encryption_key_file or encryption_passphrase_file in the config file, or pass --encryption-key-file / --encryption-passphrase-file (PITR_ENCRYPTION_KEY_FILE / PITR_ENCRYPTION_PASSPHRASE_FILE)"
            }
            KeyProblem::NoKeyring | KeyProblem::UnknownKey { .. } | KeyProblem::BadEntry { .. } => {
                "copy keys/ back from another copy of the repository: without its keys nothing encrypted can be read"
            }
            KeyProblem::NoActiveKey => "add one with pitr key add",
            KeyProblem::Refused(_) => "see pitr key list",
        }
    }
}

/// The secret read from a key source. Its `Debug` names only the file.
pub struct Secret {
    source: KeySource,
    bytes: Zeroizing<Vec<u8>>,
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Secret(from the {})", self.source)
    }
}

impl Secret {
    /// Read the secret. A key file's bytes are used as they are (a trailing newline dropped); a
    /// passphrase is its file's first line.
    ///
    /// # Errors
    /// `Unreadable`: the file is missing, unreadable, or too short.
    pub fn load(source: &KeySource) -> Result<Secret, KeyProblem> {
        let unreadable = |detail: String| KeyProblem::Unreadable {
            from: source.clone(),
            detail,
        };
        let mut bytes =
            Zeroizing::new(std::fs::read(source.path()).map_err(|e| unreadable(e.to_string()))?);
        let (min, what) = match source {
            KeySource::File(_) => {
                while bytes.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
                    bytes.pop();
                }
                (KEY_FILE_MIN, "bytes")
            }
            KeySource::Passphrase(_) => {
                let end = bytes
                    .iter()
                    .position(|b| *b == b'\n' || *b == b'\r')
                    .unwrap_or(bytes.len());
                bytes.truncate(end);
                (PASSPHRASE_MIN, "characters")
            }
        };
        if bytes.len() < min {
            return Err(unreadable(format!(
                "it holds {} {what}, fewer than the {min} required",
                bytes.len()
            )));
        }
        Ok(Secret {
            source: source.clone(),
            bytes,
        })
    }

    /// Where it came from.
    pub fn source(&self) -> &KeySource {
        &self.source
    }

    fn fresh_kdf(&self) -> Result<Kdf, KeyProblem> {
        let salt = hex(&random::<16>()?);
        Ok(match self.source {
            KeySource::File(_) => Kdf::HkdfSha256 { salt },
            KeySource::Passphrase(_) => Kdf::Argon2id {
                memory_kib: ARGON2_MEMORY_KIB,
                iterations: ARGON2_ITERATIONS,
                parallelism: ARGON2_PARALLELISM,
                salt,
            },
        })
    }

    /// The key-encryption key for `kdf`.
    fn derive(&self, id: &str, kdf: &Kdf) -> Result<Zeroizing<[u8; 32]>, KeyProblem> {
        let mismatch = |wanted| KeyProblem::KindMismatch {
            id: id.to_string(),
            wanted,
            from: self.source.clone(),
        };
        let bad = |detail: String| KeyProblem::BadEntry {
            key: ObjectKey::RepoKey(id.to_string()).key(),
            detail,
        };
        let mut out = Zeroizing::new([0u8; 32]);
        match (kdf, &self.source) {
            (Kdf::HkdfSha256 { salt }, KeySource::File(_)) => {
                let salt = unhex(salt).ok_or_else(|| bad("its salt is not hex".into()))?;
                let prk = aws_lc_rs::hkdf::Salt::new(aws_lc_rs::hkdf::HKDF_SHA256, &salt)
                    .extract(&self.bytes);
                prk.expand(
                    &[b"pitr key-encryption key 1"],
                    aws_lc_rs::hkdf::HKDF_SHA256,
                )
                .and_then(|okm| okm.fill(out.as_mut_slice()))
                .map_err(|_| bad("HKDF failed".into()))?;
            }
            (
                Kdf::Argon2id {
                    memory_kib,
                    iterations,
                    parallelism,
                    salt,
                },
                KeySource::Passphrase(_),
            ) => {
                let salt = unhex(salt).ok_or_else(|| bad("its salt is not hex".into()))?;
                let params = argon2::Params::new(*memory_kib, *iterations, *parallelism, Some(32))
                    .map_err(|e| bad(format!("argon2id parameters: {e}")))?;
                argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params)
                    .hash_password_into(&self.bytes, &salt, out.as_mut_slice())
                    .map_err(|e| bad(format!("argon2id: {e}")))?;
            }
            (Kdf::HkdfSha256 { .. }, _) => return Err(mismatch("key file")),
            (Kdf::Argon2id { .. }, _) => return Err(mismatch("passphrase file")),
        }
        Ok(out)
    }
}

/// How an entry's key-encryption key is derived from the secret.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Hash)]
#[serde(tag = "algorithm", rename_all = "kebab-case")]
pub enum Kdf {
    /// A key file: HKDF-SHA256 of its bytes with this salt (hex).
    HkdfSha256 {
        /// Hex salt.
        salt: String,
    },
    /// A passphrase: argon2id (version 0x13) with these parameters.
    Argon2id {
        /// Memory in KiB.
        memory_kib: u32,
        /// Passes.
        iterations: u32,
        /// Lanes.
        parallelism: u32,
        /// Hex salt.
        salt: String,
    },
}

/// One keyring entry, `keys/<id>.json` (and `keys/active.json`, a copy of the active one's).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyEntry {
    /// Format version.
    pub format_version: u32,
    /// The key id (16 hex digits), as object headers name it.
    pub id: String,
    /// When it was added (RFC 3339, UTC).
    pub created: String,
    /// How the secret opens it.
    pub kdf: Kdf,
    /// The key, wrapped: hex of the 12-byte nonce, the 32 encrypted bytes and the 16-byte tag.
    /// Gone once retired.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wrapped: Option<String>,
    /// When it was retired.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retired: Option<String>,
}

impl crate::format::Versioned for KeyEntry {
    const WHAT: &'static str = "repository key (keys/<id>.json)";
    const SUPPORTED: u32 = KEY_FORMAT;
    fn version(&self) -> u32 {
        self.format_version
    }
}

/// A repository key, unwrapped.
pub struct RepoKey {
    /// Its id.
    pub id: [u8; KEY_ID_LEN],
    key: LessSafeKey,
}

impl std::fmt::Debug for RepoKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RepoKey({})", hex(&self.id))
    }
}

fn wrap_aad(id: &[u8; KEY_ID_LEN]) -> Vec<u8> {
    let mut aad = b"pitr data key ".to_vec();
    aad.extend_from_slice(id);
    aad
}

impl RepoKey {
    /// The id as the keyring spells it.
    pub fn id_text(&self) -> String {
        hex(&self.id)
    }

    /// Wrap a data key: the nonce, and the 48 wrapped bytes.
    ///
    /// # Errors
    /// The random source fails.
    pub fn wrap(
        &self,
        data_key: &[u8; 32],
    ) -> Result<([u8; NONCE_LEN], [u8; WRAPPED_LEN]), KeyProblem> {
        let nonce = random::<NONCE_LEN>()?;
        let mut out = [0u8; WRAPPED_LEN];
        let (body, tag_out) = out.split_at_mut(32);
        body.copy_from_slice(data_key);
        let tag = self
            .key
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(wrap_aad(&self.id)),
                body,
            )
            .map_err(|_| KeyProblem::Refused("AES-GCM failed to wrap a key".into()))?;
        tag_out.copy_from_slice(tag.as_ref());
        Ok((nonce, out))
    }

    /// Unwrap a data key; `None` when it does not authenticate under this key.
    pub fn unwrap(
        &self,
        nonce: &[u8; NONCE_LEN],
        wrapped: &[u8; WRAPPED_LEN],
    ) -> Option<Zeroizing<[u8; 32]>> {
        let mut buf = Zeroizing::new(*wrapped);
        let plain = self
            .key
            .open_in_place(
                Nonce::assume_unique_for_key(*nonce),
                Aad::from(wrap_aad(&self.id)),
                buf.as_mut_slice(),
            )
            .ok()?;
        let mut out = Zeroizing::new([0u8; 32]);
        out.copy_from_slice(plain.get(..32)?);
        Some(out)
    }
}

/// Fill `N` random bytes.
///
/// # Errors
/// The system's random source fails.
pub fn random<const N: usize>() -> Result<[u8; N], KeyProblem> {
    let mut b = [0u8; N];
    aws_lc_rs::rand::fill(&mut b)
        .map_err(|_| KeyProblem::Refused("the system's random source failed".into()))?;
    Ok(b)
}

/// Lower-case hex.
pub fn hex(b: &[u8]) -> String {
    use std::fmt::Write;
    b.iter()
        .fold(String::with_capacity(b.len() * 2), |mut s, x| {
            let _ = write!(s, "{x:02x}");
            s
        })
}

/// Bytes of lower- or upper-case hex.
pub fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// A key id from its text.
pub fn parse_id(s: &str) -> Option<[u8; KEY_ID_LEN]> {
    unhex(s)?.try_into().ok()
}

fn aead_key(bytes: &[u8; 32]) -> Result<LessSafeKey, KeyProblem> {
    UnboundKey::new(&AES_256_GCM, bytes)
        .map(LessSafeKey::new)
        .map_err(|_| KeyProblem::Refused("AES-256-GCM key setup failed".into()))
}

/// The keyring of one repository, opened with the configured secret. Keys other than the active
/// one are read when an object names them.
pub struct Keyring {
    raw: Arc<dyn ObjectStore>,
    location: String,
    secret: Secret,
    keks: Mutex<HashMap<Kdf, Arc<Zeroizing<[u8; 32]>>>>,
    keys: Mutex<HashMap<[u8; KEY_ID_LEN], Arc<RepoKey>>>,
    active: Mutex<Option<Arc<RepoKey>>>,
    /// An empty location opened by a command that creates repositories: the first key is made
    /// with the first object written (so a command that fails before writing leaves nothing).
    create_first: tokio::sync::Mutex<bool>,
}

impl std::fmt::Debug for Keyring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Keyring({}, {:?})", self.location, self.secret)
    }
}

impl Keyring {
    fn problem(&self, problem: KeyProblem) -> RepoError {
        RepoError::Key {
            repo: self.location.clone(),
            problem,
        }
    }

    fn store_err(&self, op: &'static str, key: &str, e: object_store::Error) -> RepoError {
        RepoError::Store {
            op,
            key: key.to_string(),
            repo: self.location.clone(),
            source: Box::new(e),
        }
    }

    /// Open the keyring of the repository on `raw` (the store under the encryption) with `secret`.
    /// `create`: an empty location gets its first key (the commands that create repositories).
    ///
    /// # Errors
    /// `Key` (wrong key, a repository in the clear, a missing keyring), `Store`.
    pub async fn open(
        raw: Arc<dyn ObjectStore>,
        location: &str,
        secret: Secret,
        create: bool,
    ) -> Result<Keyring, RepoError> {
        let ring = Keyring {
            raw,
            location: location.to_string(),
            secret,
            keks: Mutex::default(),
            keys: Mutex::default(),
            active: Mutex::default(),
            create_first: tokio::sync::Mutex::new(false),
        };
        if let Some(entry) = ring.read_entry(&ObjectKey::ActiveKey).await?
            && entry.retired.is_none()
        {
            let key = ring.unwrap_entry(&entry)?;
            ring.set_active(key);
            return Ok(ring);
        }
        let entries = ring.entries().await?;
        if let Some(newest) = newest_live(&entries) {
            let key = ring.unwrap_entry(newest)?;
            ring.set_active(key);
            return Ok(ring);
        }
        if !entries.is_empty() {
            return Err(ring.problem(KeyProblem::NoKeyring));
        }
        // No keyring: a repository in the clear, an encrypted one that lost it, or nothing yet.
        let identity = ObjectKey::Identity.key();
        let ident_path = object_store::path::Path::from(identity.as_str());
        match ring.raw.get(&ident_path).await {
            Ok(got) => {
                let bytes = got
                    .bytes()
                    .await
                    .map_err(|e| ring.store_err("read", &identity, e))?;
                return Err(ring.problem(if bytes.starts_with(super::sealed::MAGIC) {
                    KeyProblem::NoKeyring
                } else {
                    KeyProblem::NotEncrypted {
                        from: ring.secret.source().clone(),
                    }
                }));
            }
            Err(object_store::Error::NotFound { .. }) => {}
            Err(e) => return Err(ring.store_err("read", &identity, e)),
        }
        if !create {
            return Ok(ring);
        }
        if let Some(first) = ring.raw.list(None).next().await {
            let found = first.map_err(|e| ring.store_err("list", "", e))?;
            return Err(ring.problem(KeyProblem::Refused(format!(
                "it holds objects ({} and perhaps more) but neither pitr.json nor a keyring: pitr will not add encrypted objects to it",
                found.location
            ))));
        }
        *ring.create_first.lock().await = true;
        Ok(ring)
    }

    /// The key to encrypt a new object with; in a new repository, the first key is made now.
    ///
    /// # Errors
    /// `NoActiveKey`, or the first key cannot be stored.
    pub async fn for_writing(&self) -> Result<Arc<RepoKey>, RepoError> {
        if let Ok(k) = self.active() {
            return Ok(k);
        }
        let mut first = self.create_first.lock().await;
        if let Ok(k) = self.active() {
            return Ok(k);
        }
        if !*first {
            return Err(self.problem(KeyProblem::NoActiveKey));
        }
        self.add().await?;
        *first = false;
        self.active().map_err(|p| self.problem(p))
    }

    fn set_active(&self, key: Arc<RepoKey>) {
        if let Ok(mut keys) = self.keys.lock() {
            keys.insert(key.id, key.clone());
        }
        if let Ok(mut a) = self.active.lock() {
            *a = Some(key);
        }
    }

    /// The key new objects are encrypted with.
    ///
    /// # Errors
    /// `NoActiveKey`.
    pub fn active(&self) -> Result<Arc<RepoKey>, KeyProblem> {
        self.active
            .lock()
            .ok()
            .and_then(|a| a.clone())
            .ok_or(KeyProblem::NoActiveKey)
    }

    /// The repository key `id`, read from the keyring the first time it is asked for.
    ///
    /// # Errors
    /// `UnknownKey`, `WrongKey`, a bad entry; a store failure as its text.
    pub async fn key(&self, id: [u8; KEY_ID_LEN]) -> Result<Arc<RepoKey>, KeyProblem> {
        if let Some(k) = self.keys.lock().ok().and_then(|m| m.get(&id).cloned()) {
            return Ok(k);
        }
        let text = hex(&id);
        let entry = match self.read_entry(&ObjectKey::RepoKey(text.clone())).await {
            Ok(Some(e)) => e,
            Ok(None) => return Err(KeyProblem::UnknownKey { id: text }),
            Err(RepoError::Key { problem, .. }) => return Err(problem),
            Err(e) => {
                return Err(KeyProblem::BadEntry {
                    key: ObjectKey::RepoKey(text).key(),
                    detail: e.to_string(),
                });
            }
        };
        if entry.wrapped.is_none() {
            return Err(KeyProblem::UnknownKey { id: text });
        }
        let key = self.unwrap_entry(&entry).map_err(|e| match e {
            RepoError::Key { problem, .. } => problem,
            other => KeyProblem::Refused(other.to_string()),
        })?;
        if let Ok(mut keys) = self.keys.lock() {
            keys.insert(key.id, key.clone());
        }
        Ok(key)
    }

    async fn read_entry(&self, key: &ObjectKey) -> Result<Option<KeyEntry>, RepoError> {
        let name = key.key();
        let bytes = match self.raw.get(&key.path()).await {
            Ok(got) => got
                .bytes()
                .await
                .map_err(|e| self.store_err("read", &name, e))?,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(self.store_err("read", &name, e)),
        };
        let bad = |detail: String| {
            self.problem(KeyProblem::BadEntry {
                key: name.clone(),
                detail,
            })
        };
        let json = super::envelope::decode(&bytes).map_err(bad)?;
        crate::format::decode::<KeyEntry>(&json)
            .map(Some)
            .map_err(|e| bad(e.to_string()))
    }

    fn kek(&self, id: &str, kdf: &Kdf) -> Result<Arc<Zeroizing<[u8; 32]>>, RepoError> {
        if let Some(k) = self.keks.lock().ok().and_then(|m| m.get(kdf).cloned()) {
            return Ok(k);
        }
        let k = Arc::new(self.secret.derive(id, kdf).map_err(|p| self.problem(p))?);
        if let Ok(mut m) = self.keks.lock() {
            m.insert(kdf.clone(), k.clone());
        }
        Ok(k)
    }

    fn unwrap_entry(&self, entry: &KeyEntry) -> Result<Arc<RepoKey>, RepoError> {
        let bad = |detail: &str| {
            self.problem(KeyProblem::BadEntry {
                key: ObjectKey::RepoKey(entry.id.clone()).key(),
                detail: detail.to_string(),
            })
        };
        let id = parse_id(&entry.id).ok_or_else(|| bad("its id is not 16 hex digits"))?;
        let wrapped = entry
            .wrapped
            .as_deref()
            .ok_or_else(|| bad("it is retired"))?;
        let raw = unhex(wrapped).ok_or_else(|| bad("its wrapped key is not hex"))?;
        if raw.len() != NONCE_LEN + 32 + 16 {
            return Err(bad("its wrapped key has the wrong length"));
        }
        let (nonce, sealed) = raw.split_at(NONCE_LEN);
        let nonce: [u8; NONCE_LEN] = nonce.try_into().map_err(|_| bad("nonce"))?;
        let kek = aead_key(&**self.kek(&entry.id, &entry.kdf)?).map_err(|p| self.problem(p))?;
        let mut buf = Zeroizing::new(sealed.to_vec());
        let plain = kek
            .open_in_place(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(entry_aad(&entry.id)),
                buf.as_mut_slice(),
            )
            .map_err(|_| {
                self.problem(KeyProblem::WrongKey {
                    from: self.secret.source().clone(),
                    id: entry.id.clone(),
                })
            })?;
        let bytes: [u8; 32] = plain
            .get(..32)
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| bad("short key"))?;
        let bytes = Zeroizing::new(bytes);
        Ok(Arc::new(RepoKey {
            id,
            key: aead_key(&bytes).map_err(|p| self.problem(p))?,
        }))
    }

    /// Every keyring entry (not `active.json`), oldest first.
    ///
    /// # Errors
    /// `Store`, or an entry that cannot be read.
    pub async fn entries(&self) -> Result<Vec<KeyEntry>, RepoError> {
        let prefix = object_store::path::Path::from(KEYS_PREFIX);
        let listed: Vec<object_store::ObjectMeta> = self
            .raw
            .list(Some(&prefix))
            .collect::<Vec<_>>()
            .await
            .into_iter()
            .collect::<Result<_, _>>()
            .map_err(|e| self.store_err("list", KEYS_PREFIX, e))?;
        let mut out = Vec::new();
        for m in listed {
            if let Some(key @ ObjectKey::RepoKey(_)) = ObjectKey::parse(m.location.as_ref())
                && let Some(e) = self.read_entry(&key).await?
            {
                out.push(e);
            }
        }
        out.sort_by(|a, b| (&a.created, &a.id).cmp(&(&b.created, &b.id)));
        Ok(out)
    }

    async fn write_entry(
        &self,
        key: &ObjectKey,
        entry: &KeyEntry,
        create: bool,
    ) -> Result<(), RepoError> {
        let json = serde_json::to_vec_pretty(entry)
            .map_err(|e| self.problem(KeyProblem::Refused(format!("serialize key entry: {e}"))))?;
        let stored = super::envelope::encode(&json, Compression::None)
            .map_err(|e| self.problem(KeyProblem::Refused(e.to_string())))?;
        let opts = PutOptions {
            mode: if create {
                StoreMode::Create
            } else {
                StoreMode::Overwrite
            },
            ..Default::default()
        };
        self.raw
            .put_opts(&key.path(), stored.into(), opts)
            .await
            .map(|_| ())
            .map_err(|e| self.store_err("write", &key.key(), e))
    }

    /// A new repository key, wrapped by the configured secret, made active.
    ///
    /// # Errors
    /// `Store`, or the random source.
    pub async fn add(&self) -> Result<KeyEntry, RepoError> {
        let id = random::<KEY_ID_LEN>().map_err(|p| self.problem(p))?;
        let secret_key = Zeroizing::new(random::<32>().map_err(|p| self.problem(p))?);
        // The same derivation as the active key's when the same kind of secret is configured (one
        // argon2id per command, not one per key).
        let kdf = match self.active() {
            Ok(active) => match self.entry_kdf(&active.id_text()).await? {
                Some(kdf) if kdf_fits(&kdf, self.secret.source()) => kdf,
                _ => self.secret.fresh_kdf().map_err(|p| self.problem(p))?,
            },
            Err(_) => self.secret.fresh_kdf().map_err(|p| self.problem(p))?,
        };
        let id_text = hex(&id);
        let kek = aead_key(&**self.kek(&id_text, &kdf)?).map_err(|p| self.problem(p))?;
        let nonce = random::<NONCE_LEN>().map_err(|p| self.problem(p))?;
        let mut body = Zeroizing::new(secret_key.to_vec());
        let tag = kek
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(entry_aad(&id_text)),
                body.as_mut_slice(),
            )
            .map_err(|_| self.problem(KeyProblem::Refused("AES-GCM failed".into())))?;
        let mut wrapped = nonce.to_vec();
        wrapped.extend_from_slice(&body);
        wrapped.extend_from_slice(tag.as_ref());
        let entry = KeyEntry {
            format_version: KEY_FORMAT,
            id: id_text.clone(),
            created: crate::pg::PgTimestamp::now().rfc3339(),
            kdf,
            wrapped: Some(hex(&wrapped)),
            retired: None,
        };
        self.write_entry(&ObjectKey::RepoKey(id_text), &entry, true)
            .await?;
        self.write_entry(&ObjectKey::ActiveKey, &entry, false)
            .await?;
        let key = Arc::new(RepoKey {
            id,
            key: aead_key(&secret_key).map_err(|p| self.problem(p))?,
        });
        self.set_active(key);
        tracing::info!("added repository key {}", entry.id);
        Ok(entry)
    }

    async fn entry_kdf(&self, id: &str) -> Result<Option<Kdf>, RepoError> {
        Ok(self
            .read_entry(&ObjectKey::RepoKey(id.to_string()))
            .await?
            .map(|e| e.kdf))
    }

    /// Mark key `id` retired: its wrapped copy is dropped, so the secret no longer opens it.
    ///
    /// # Errors
    /// `Store`, or no such key.
    pub async fn mark_retired(&self, id: &str) -> Result<KeyEntry, RepoError> {
        let key = ObjectKey::RepoKey(id.to_string());
        let mut entry = self
            .read_entry(&key)
            .await?
            .ok_or_else(|| self.problem(KeyProblem::Refused(format!("no repository key {id}"))))?;
        entry.wrapped = None;
        entry.retired = Some(crate::pg::PgTimestamp::now().rfc3339());
        self.write_entry(&key, &entry, false).await?;
        if let Ok(mut keys) = self.keys.lock()
            && let Some(raw) = parse_id(id)
        {
            keys.remove(&raw);
        }
        Ok(entry)
    }

    /// The store under the encryption.
    pub fn raw(&self) -> &Arc<dyn ObjectStore> {
        &self.raw
    }
}

fn kdf_fits(kdf: &Kdf, source: &KeySource) -> bool {
    matches!(
        (kdf, source),
        (Kdf::HkdfSha256 { .. }, KeySource::File(_))
            | (Kdf::Argon2id { .. }, KeySource::Passphrase(_))
    )
}

fn entry_aad(id: &str) -> Vec<u8> {
    format!("pitr repository key {id}").into_bytes()
}

/// The newest entry that is not retired.
pub fn newest_live(entries: &[KeyEntry]) -> Option<&KeyEntry> {
    entries
        .iter()
        .filter(|e| e.retired.is_none() && e.wrapped.is_some())
        .max_by(|a, b| (&a.created, &a.id).cmp(&(&b.created, &b.id)))
}

/// Write a new key file at `path` (mode 0600, never replacing a file): 32 random bytes as 64 hex
/// digits and a newline.
///
/// # Errors
/// The file exists or cannot be written.
pub fn generate_key_file(path: &std::path::Path) -> anyhow::Result<()> {
    use anyhow::Context;
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let bytes = Zeroizing::new(random::<32>().map_err(anyhow::Error::msg)?);
    let text = Zeroizing::new(format!("{}\n", hex(bytes.as_slice())));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("create key file {}", path.display()))?;
    f.write_all(text.as_bytes())
        .and_then(|()| f.sync_all())
        .with_context(|| format!("write key file {}", path.display()))?;
    crate::durable::sync_dir(crate::durable::parent_dir(path))
        .with_context(|| format!("sync the directory of {}", path.display()))?;
    Ok(())
}

/// What `pitr key retire` did.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Retired {
    /// The retired key.
    pub id: String,
    /// The key that now wraps what it wrapped.
    pub rewrapped_to: String,
    /// Objects looked at, over all passes.
    pub objects_checked: u64,
    /// Objects whose data key was rewrapped.
    pub objects_rewrapped: u64,
    /// Passes over the repository (the last one found nothing left).
    pub passes: u32,
}

impl super::Repo {
    fn require_keyring(&self) -> Result<&Arc<Keyring>, RepoError> {
        self.keyring().ok_or_else(|| RepoError::Key {
            repo: self.location().to_string(),
            problem: KeyProblem::Refused(
                "it is not encrypted, or no key is configured: keys exist only in encrypted repositories".into(),
            ),
        })
    }

    /// The keyring's entries, oldest first, and the active key's id.
    ///
    /// # Errors
    /// Not encrypted, `Store`.
    pub async fn key_entries(&self) -> Result<(Vec<KeyEntry>, Option<String>), RepoError> {
        let ring = self.require_keyring()?;
        let active = ring.active().ok().map(|k| k.id_text());
        Ok((ring.entries().await?, active))
    }

    /// Add a repository key, wrapped by the configured secret; new objects use it.
    ///
    /// # Errors
    /// Not encrypted, `Store`.
    pub async fn key_add(&self) -> Result<KeyEntry, RepoError> {
        self.require_keyring()?.add().await
    }

    /// Retire key `id`: every object whose data key it wraps gets that data key wrapped by the
    /// active key instead (passes over the repository until one finds none left, at most three),
    /// then its entry loses its wrapped key. The active key cannot be retired.
    ///
    /// # Errors
    /// Not encrypted, no such key, the active key, `Store`, an object that does not open.
    pub async fn key_retire(&self, id: &str, jobs: usize) -> Result<Retired, RepoError> {
        let ring = self.require_keyring()?;
        let refuse = |why: String| RepoError::Key {
            repo: self.location().to_string(),
            problem: KeyProblem::Refused(why),
        };
        let raw_id = parse_id(id).ok_or_else(|| {
            refuse(format!(
                "{id:?} is not a key id (16 hex digits, as pitr key list shows)"
            ))
        })?;
        let entries = ring.entries().await?;
        let entry = entries
            .iter()
            .find(|e| e.id.eq_ignore_ascii_case(id))
            .ok_or_else(|| refuse(format!("it has no key {id}")))?;
        if entry.retired.is_some() {
            return Err(refuse(format!("key {id} is already retired")));
        }
        let active = ring.active().map_err(|p| RepoError::Key {
            repo: self.location().to_string(),
            problem: p,
        })?;
        if active.id == raw_id {
            return Err(refuse(format!(
                "key {id} is the active key: add a new one first (pitr key add), then retire this one"
            )));
        }
        let old = ring.key(raw_id).await.map_err(|p| RepoError::Key {
            repo: self.location().to_string(),
            problem: p,
        })?;
        let mut report = Retired {
            id: entry.id.clone(),
            rewrapped_to: active.id_text(),
            objects_checked: 0,
            objects_rewrapped: 0,
            passes: 0,
        };
        loop {
            report.passes += 1;
            let pass = super::sealed::rewrap_all(ring.raw(), &old, &active, jobs)
                .await
                .map_err(|(key, e)| self.store_err("rewrap", &key, e))?;
            tracing::info!(
                "pass {}: {} objects checked, {} rewrapped from key {id} to {}",
                report.passes,
                pass.checked,
                pass.rewrapped,
                report.rewrapped_to
            );
            report.objects_checked += pass.checked;
            report.objects_rewrapped += pass.rewrapped;
            // A pass that finds nothing left proves no object still needs the old key; a pass that
            // rewrapped something may have missed an object written during it.
            if pass.rewrapped == 0 {
                break;
            }
            if report.passes >= 3 {
                return Err(refuse(format!(
                    "objects using key {id} kept appearing over {} passes (a process still writing with it?): run pitr key retire {id} again once no pitr started before the key add is running",
                    report.passes
                )));
            }
        }
        ring.mark_retired(&entry.id).await?;
        Ok(report)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trips() {
        let b = [0u8, 1, 0xab, 0xff];
        assert_eq!(hex(&b), "0001abff");
        assert_eq!(unhex("0001ABff").unwrap(), b);
        assert!(unhex("0").is_none() && unhex("zz").is_none());
        assert!(parse_id("0011223344556677").is_some() && parse_id("00").is_none());
    }

    #[test]
    fn secrets_are_checked_and_never_shown() {
        let dir = tempfile::tempdir().unwrap();
        let short = dir.path().join("short.key");
        std::fs::write(&short, "abc\n").unwrap();
        let err = Secret::load(&KeySource::File(short)).unwrap_err();
        assert!(err.to_string().contains("fewer than the 32"), "{err}");
        let missing = Secret::load(&KeySource::File(dir.path().join("none"))).unwrap_err();
        assert!(matches!(missing, KeyProblem::Unreadable { .. }));
        let pass = dir.path().join("pass");
        std::fs::write(&pass, "correct horse battery staple\nignored").unwrap();
        let s = Secret::load(&KeySource::Passphrase(pass)).unwrap();
        assert_eq!(s.bytes.as_slice(), b"correct horse battery staple");
        assert!(!format!("{s:?}").contains("horse"));
        // Derivations: deterministic, kind-checked, different per salt.
        let kdf = |salt: &str| Kdf::Argon2id {
            memory_kib: 64,
            iterations: 1,
            parallelism: 1,
            salt: salt.into(),
        };
        let a = s
            .derive("k", &kdf("00112233445566778899aabbccddeeff"))
            .unwrap();
        let b = s
            .derive("k", &kdf("00112233445566778899aabbccddeeff"))
            .unwrap();
        let c = s
            .derive("k", &kdf("ff112233445566778899aabbccddeeff"))
            .unwrap();
        assert_eq!(*a, *b);
        assert_ne!(*a, *c);
        assert!(matches!(
            s.derive("k", &Kdf::HkdfSha256 { salt: "00".into() }),
            Err(KeyProblem::KindMismatch { .. })
        ));
    }

    #[test]
    fn a_generated_key_file_loads_and_is_never_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("repo.key");
        generate_key_file(&path).unwrap();
        let s = Secret::load(&KeySource::File(path.clone())).unwrap();
        assert_eq!(s.bytes.len(), 64);
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert!(generate_key_file(&path).is_err());
    }
}
