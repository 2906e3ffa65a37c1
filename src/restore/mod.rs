//! Restoring base backups.

pub mod files;
pub mod plan;
pub mod target;
