//! The exit-code contract with PostgreSQL and with scripts.
//!
//! * `archive-push` (archive_command): 0 only once the file is durably stored (or an identical copy
//!   already was); **every** failure is 1. A code above 125 or death by a signal would make the
//!   archiver process exit FATAL and restart without counting the failure in `pg_stat_archiver`,
//!   so even a panic is mapped to 1.
//! * `archive-get` (restore_command): 0 = written to `%p`; 1 = the repository positively does not
//!   hold the file (that is how recovery finds the end of the archive, and how it probes for future
//!   `.history` files). A file that exists but cannot be fetched or fails verification returns
//!   `STOP_RECOVERY` (above 125): PostgreSQL then aborts recovery with FATAL. Answering 1 there would
//!   let recovery believe WAL ended, promote early and silently lose transactions. On a standby
//!   (`standby.signal` in the working directory, which is the data directory) a missing answer never
//!   ends recovery, so an unreachable store answers 1 there and the standby simply asks again; a
//!   corrupt object still stops it.
//! * Other commands: 0 success, 1 failure the operator must act on, 2 bad usage.

use crate::storage::RepoError;

/// Success.
pub const SUCCESS: u8 = 0;
/// A failure (for `archive-get`: not in the repository).
pub const FAILURE: u8 = 1;
/// Bad usage.
pub const USAGE: u8 = 2;
/// `archive-get` could not deliver a file that exists: recovery must stop, not end.
pub const STOP_RECOVERY: u8 = 200;

/// Which contract a command is under.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Contract {
    /// `archive_command`.
    ArchivePush,
    /// `restore_command`; `standby` when the data directory holds `standby.signal`.
    ArchiveGet {
        /// Running for a standby.
        standby: bool,
    },
    /// Any other command.
    Other,
}

impl Contract {
    /// The exit code for a command that failed with `err`.
    pub fn for_error(self, err: &anyhow::Error) -> u8 {
        match self {
            Contract::Other if crate::error::is_usage(err) => USAGE,
            Contract::ArchivePush | Contract::Other => FAILURE,
            Contract::ArchiveGet { standby } => {
                let store_failure = err
                    .chain()
                    .find_map(|e| e.downcast_ref::<RepoError>())
                    .is_some_and(RepoError::is_store_failure);
                if standby && store_failure {
                    FAILURE
                } else {
                    STOP_RECOVERY
                }
            }
        }
    }

    /// The exit code after a panic (a bug): the safe side of each contract.
    pub fn for_panic(self) -> u8 {
        match self {
            Contract::ArchivePush | Contract::Other => FAILURE,
            Contract::ArchiveGet { .. } => STOP_RECOVERY,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store_err() -> anyhow::Error {
        anyhow::Error::new(RepoError::Store {
            op: "read",
            key: "wal/00000001/000000010000000000000003.pitr".into(),
            repo: "s3://b".into(),
            source: Box::new(object_store::Error::Generic {
                store: "S3",
                source: "connection refused".into(),
            }),
        })
        .context("fetch 000000010000000000000003")
    }

    fn corrupt_err() -> anyhow::Error {
        anyhow::Error::new(RepoError::Corrupt {
            key: "k".into(),
            repo: "r".into(),
            detail: "crc".into(),
        })
    }

    #[test]
    fn push_failures_are_always_one() {
        for e in [store_err(), corrupt_err(), anyhow::anyhow!("anything")] {
            assert_eq!(Contract::ArchivePush.for_error(&e), FAILURE);
        }
        assert_eq!(Contract::ArchivePush.for_panic(), FAILURE);
    }

    #[test]
    fn get_failures_stop_recovery_except_unreachable_on_a_standby() {
        let primary = Contract::ArchiveGet { standby: false };
        let standby = Contract::ArchiveGet { standby: true };
        assert_eq!(primary.for_error(&store_err()), STOP_RECOVERY);
        assert_eq!(primary.for_error(&corrupt_err()), STOP_RECOVERY);
        assert_eq!(standby.for_error(&store_err()), FAILURE);
        assert_eq!(standby.for_error(&corrupt_err()), STOP_RECOVERY);
        assert_eq!(
            standby.for_error(&anyhow::anyhow!("disk full")),
            STOP_RECOVERY
        );
        assert_eq!(primary.for_panic(), STOP_RECOVERY);
        const { assert!(STOP_RECOVERY > 125) };
    }
}
