//! pitr: PostgreSQL WAL archiving and point-in-time recovery over object storage.
//!
//! The library: PostgreSQL formats (`pg`), the repository (`storage`), archiving, backups, the
//! catalog, restore planning and execution, and the trust commands' checks. It takes plain option
//! values and returns reports; the binary (`main.rs` and `cmd/`, one file per command) parses the
//! command line, calls it, prints, and maps outcomes to exit codes.

#![warn(missing_docs, unreachable_pub)]

pub mod archive;
pub mod backup;
pub mod bigbuf;
pub mod blocks;
pub mod catalog;
pub mod check;
pub mod cleanup;
pub mod compress;
pub mod config;
pub mod copy;
pub mod cpu;
pub mod drill;
pub mod durable;
pub mod error;
pub mod exit;
pub mod expire;
pub mod format;
#[cfg(test)]
mod golden;
pub mod index;
pub mod info;
pub mod manifest;
pub mod metrics;
pub mod pg;
pub mod pgconn;
pub mod receive;
pub mod replication;
pub mod repos;
pub mod restore;
pub mod rollup;
pub mod storage;
#[cfg(test)]
pub(crate) mod testing;
pub mod units;
pub mod users;
pub mod verify;
