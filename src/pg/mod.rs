//! PostgreSQL formats: LSNs, WAL file names, per-version constants, segment headers, history files.
//!
//! Nothing outside this module knows PostgreSQL's byte layouts.

#![deny(clippy::indexing_slicing)]

pub mod blockref;
pub mod le;
pub mod lsn;
pub mod page;
pub mod segment;
pub mod sysid;
pub mod time;
pub mod timeline;
pub mod version;
pub mod walname;

pub use lsn::Lsn;
pub use sysid::SystemId;
pub use time::PgTimestamp;
pub use version::PgMajor;
pub use walname::{SegNo, SegmentName, TimelineId, WalFileName, WalSegSize};
#[cfg(test)]
#[allow(clippy::indexing_slicing)] // a test fixture builder
pub(crate) mod walbuilder;
pub mod waldecoder;
pub mod xlogrecord;
