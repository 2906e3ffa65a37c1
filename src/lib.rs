//! pitr: PostgreSQL WAL archiving and point-in-time recovery over object storage.
//!
//! The binary (`main.rs`) only parses arguments and maps outcomes to exit codes; everything else is
//! here, one module per concept.

#![warn(missing_docs, unreachable_pub)]

pub mod archive;
pub mod backup;
pub mod bigbuf;
pub mod catalog;
pub mod check;
pub mod cleanup;
pub mod cli;
pub mod commands;
pub mod compress;
pub mod config;
pub mod drill;
pub mod durable;
pub mod error;
pub mod exit;
pub mod expire;
pub mod index;
pub mod info;
pub mod metrics;
pub mod output;
pub mod pg;
pub mod pgconn;
pub mod restore;
pub mod storage;
pub mod users;
pub mod verify;
