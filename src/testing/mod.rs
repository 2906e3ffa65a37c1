//! Test utilities any unit test can use: the fault-injecting store, and shorthand for storing
//! plain bytes through the one [`Repo::put`].

#[cfg(test)]
pub(crate) mod distant;
pub(crate) mod faults;
#[cfg(test)]
mod synth;

use crate::compress::Compression;
use crate::storage::layout::ObjectKey;
use crate::storage::{PutMode, PutOutcome, Repo, RepoError};

/// Shorthand for tests: wrap and store bytes.
pub(crate) trait PutBytes {
    /// `data` under `key` as WAL is stored: an identical object is `AlreadyStored`, a different
    /// one a `Conflict`.
    async fn put_new(
        &self,
        key: &ObjectKey,
        data: &[u8],
        compression: Compression,
    ) -> Result<PutOutcome, RepoError>;

    /// Already-enveloped bytes under a key of the caller's own (a backup's objects).
    async fn put_unique(&self, key: &ObjectKey, stored: Vec<u8>) -> Result<PutOutcome, RepoError>;
}

impl PutBytes for Repo {
    async fn put_new(
        &self,
        key: &ObjectKey,
        data: &[u8],
        compression: Compression,
    ) -> Result<PutOutcome, RepoError> {
        let sealed = self.seal(key, data, compression)?;
        self.put(key, sealed, PutMode::compare_with(data)).await
    }

    async fn put_unique(&self, key: &ObjectKey, stored: Vec<u8>) -> Result<PutOutcome, RepoError> {
        self.put(key, stored, PutMode::CreateUnique).await
    }
}
