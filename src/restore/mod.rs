//! Restoring base backups.

pub mod exec;
pub mod files;
pub mod plan;
pub mod target;
