//! Restoring base backups.

pub mod files;
