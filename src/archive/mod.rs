//! The two commands PostgreSQL calls: `archive-push` (archive_command) and `archive-get`
//! (restore_command).

pub mod batch;
pub mod get;
pub mod prefetch;
pub mod push;
