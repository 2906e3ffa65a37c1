//! Small pieces stored together: a cluster of thousands of small tables is thousands of files
//! (each table's heap, indexes, TOAST, free space and visibility maps), and one object each costs
//! a round trip each way, which a distant store makes the whole cost of the backup and restore.
//!
//! A piece of at most [`BUNDLE_LIMIT`] bytes is compressed into its envelope as any piece is, and
//! that envelope is appended to the backup's open bundle instead of being stored alone. A bundle
//! that holds [`BUNDLE_SIZE`] bytes is closed and stored (`backups/<id>/bundle/<n>.pitr`: an
//! uncompressed envelope whose payload is its members, so `verify` checks it whole as any
//! object); the manifest gives each piece's bundle and offset, and restore reads members back
//! by range. Nothing is acknowledged before the manifest, which is written only once every bundle
//! is stored.

use std::sync::Mutex;

use anyhow::Context;

use crate::manifest::InBundle;
use crate::storage::layout::ObjectKey;
use crate::storage::{PutMode, Repo, envelope};

/// Pieces of at most this many bytes (before compression) go into bundles.
pub const BUNDLE_LIMIT: u64 = 1 << 20;

/// A bundle is closed and stored once its members hold this many bytes (stored).
pub const BUNDLE_SIZE: usize = 4 << 20;

/// How many closed bundles may wait for their upload at once (each holds up to about
/// [`BUNDLE_SIZE`] bytes of memory).
const UPLOADS: usize = 4;

/// The bundles of one backup.
pub struct Bundler {
    id: String,
    open: Mutex<Open>,
    uploads: std::sync::Arc<tokio::sync::Semaphore>,
    /// The uploads under way (aborted if the backup fails first).
    storing: Mutex<tokio::task::JoinSet<anyhow::Result<u64>>>,
}

/// The bundle being filled.
struct Open {
    /// Its number.
    number: u32,
    /// The envelopes in it, one after another: copied in, so a bundle holds its stored bytes
    /// and no more (a small file's compressed envelope is a few hundred bytes of a buffer sized
    /// for the worst case).
    members: Vec<u8>,
}

/// A bundle to store.
pub struct Closed {
    number: u32,
    members: Vec<u8>,
}

/// Room for a bundle's members: it closes at [`BUNDLE_SIZE`], after a last member of up to
/// about [`BUNDLE_LIMIT`] (pages not written are not memory).
fn bundle_buffer() -> Vec<u8> {
    Vec::with_capacity(BUNDLE_SIZE + 2 * BUNDLE_LIMIT as usize)
}

impl Bundler {
    /// The bundles of backup `id`, at most `jobs` (and never more than a few) stored at once.
    pub fn new(id: &str, jobs: usize) -> Bundler {
        Bundler {
            id: id.to_string(),
            open: Mutex::new(Open {
                number: 0,
                members: Vec::new(),
            }),
            uploads: std::sync::Arc::new(tokio::sync::Semaphore::new(jobs.clamp(1, UPLOADS))),
            storing: Mutex::new(tokio::task::JoinSet::new()),
        }
    }

    /// Whether a piece of `size` original bytes goes into a bundle.
    pub fn takes(size: u64) -> bool {
        size <= BUNDLE_LIMIT
    }

    /// Add the envelope `stored`; returns its place, and the bundle it filled, to store.
    ///
    /// # Errors
    /// Only if another thread panicked while adding.
    pub fn add(&self, stored: Vec<u8>) -> anyhow::Result<(InBundle, Option<Closed>)> {
        let mut open = self
            .open
            .lock()
            .map_err(|_| anyhow::anyhow!("a bundle was left half-written by a panic"))?;
        let place = InBundle {
            id: open.number,
            offset: (envelope::HEADER_LEN + open.members.len()) as u64,
        };
        if open.members.capacity() == 0 {
            open.members = bundle_buffer();
        }
        open.members.extend_from_slice(&stored);
        drop(stored);
        let closed = (open.members.len() >= BUNDLE_SIZE).then(|| take(&mut open));
        Ok((place, closed))
    }

    /// The bundle still open, if it holds anything, to store last.
    ///
    /// # Errors
    /// Only if another thread panicked while adding.
    pub fn finish(&self) -> anyhow::Result<Option<Closed>> {
        let mut open = self
            .open
            .lock()
            .map_err(|_| anyhow::anyhow!("a bundle was left half-written by a panic"))?;
        Ok((!open.members.is_empty()).then(|| take(&mut open)))
    }

    /// Start storing a closed bundle (a key only this backup writes) once fewer than a few are
    /// being stored, and return: the piece that filled it does not wait for the upload, so the
    /// other pieces keep coming. [`wait`](Self::wait) says how the uploads ended.
    ///
    /// # Errors
    /// Only if the uploads were shut down.
    pub async fn store(&self, repo: &Repo, closed: Closed) -> anyhow::Result<()> {
        let permit = self.uploads.clone().acquire_owned().await?;
        let key = ObjectKey::BackupBundle {
            id: self.id.clone(),
            bundle: closed.number,
        };
        let repo = repo.clone();
        let upload = async move {
            let stored = repo
                .put(
                    &key,
                    envelope::wrap_parts(vec![bytes::Bytes::from(closed.members)]),
                    PutMode::CreateUnique,
                )
                .await
                .with_context(|| format!("store {}", key.key()))?;
            drop(permit);
            Ok(stored.stored_bytes())
        };
        self.storing
            .lock()
            .map_err(|_| anyhow::anyhow!("a bundle upload was left by a panic"))?
            .spawn(upload);
        Ok(())
    }

    /// Wait for every bundle stored so far; returns their stored bytes.
    ///
    /// # Errors
    /// The first upload that failed.
    pub async fn wait(&self) -> anyhow::Result<u64> {
        let mut storing = std::mem::take(
            &mut *self
                .storing
                .lock()
                .map_err(|_| anyhow::anyhow!("a bundle upload was left by a panic"))?,
        );
        let mut bytes = 0;
        while let Some(done) = storing.join_next().await {
            bytes += done.context("a bundle upload panicked")??;
        }
        Ok(bytes)
    }
}

/// Close the open bundle and start the next.
fn take(open: &mut Open) -> Closed {
    let closed = Closed {
        number: open.number,
        members: std::mem::take(&mut open.members),
    };
    open.number += 1;
    closed
}

#[cfg(test)]
#[allow(clippy::indexing_slicing)] // tests index fixtures they built
mod tests {
    use super::*;
    use crate::compress::Compression;
    use object_store::memory::InMemory;
    use std::sync::Arc;

    #[tokio::test]
    async fn members_are_found_where_their_places_say() {
        let repo = Repo::from_store(Arc::new(InMemory::new()), "memory://bundle");
        let bundler = Bundler::new("b", 2);
        // 300 KiB pieces that do not compress: a bundle closes after 14 of them.
        let piece = |i: u32| -> Vec<u8> {
            let mut x = u64::from(i).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
            (0..300u32 << 10)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect()
        };
        let mut placed = Vec::new();
        let mut stored = 0;
        for i in 0..40 {
            let data = piece(i);
            let env = envelope::encode(&data, Compression::Zstd).unwrap();
            let len = env.len() as u64;
            let (place, closed) = bundler.add(env).unwrap();
            if let Some(c) = closed {
                stored += 1;
                bundler.store(&repo, c).await.unwrap();
            }
            placed.push((place, len, data));
        }
        if let Some(c) = bundler.finish().unwrap() {
            stored += 1;
            bundler.store(&repo, c).await.unwrap();
        }
        assert!(bundler.wait().await.unwrap() > 0);
        assert!(bundler.finish().unwrap().is_none());
        assert_eq!(stored, 3);
        assert_eq!(placed.last().unwrap().0.id, 2);
        for (place, len, data) in placed {
            let key = ObjectKey::BackupBundle {
                id: "b".into(),
                bundle: place.id,
            };
            // The bundle is an envelope of its own (verify reads it as any object) ...
            let whole = repo.get_stored(&key).await.unwrap().unwrap();
            assert!(envelope::decode(&whole).is_ok());
            // ... and each member is one where its place says.
            let at = place.offset as usize;
            let member = &whole[at..at + len as usize];
            assert_eq!(envelope::decode(member).unwrap(), data);
        }
    }
}
