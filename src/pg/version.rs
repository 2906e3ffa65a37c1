//! PostgreSQL major versions pitr supports and the per-version constants it needs.
//!
//! One table, one `match` (STYLE R5). `XLOG_PAGE_MAGIC` comes from
//! `src/include/access/xlog_internal.h` of each release branch (see `reference/pg-internals.md` §0).

use std::fmt;

/// A supported PostgreSQL major version.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PgMajor {
    /// PostgreSQL 13.
    V13,
    /// PostgreSQL 14.
    V14,
    /// PostgreSQL 15.
    V15,
    /// PostgreSQL 16.
    V16,
    /// PostgreSQL 17.
    V17,
    /// PostgreSQL 18.
    V18,
}

impl PgMajor {
    /// Every supported version; keep in step with the enum.
    pub const ALL: [PgMajor; 6] = [
        PgMajor::V13,
        PgMajor::V14,
        PgMajor::V15,
        PgMajor::V16,
        PgMajor::V17,
        PgMajor::V18,
    ];

    /// `XLOG_PAGE_MAGIC` of the release (xlog_internal.h).
    pub fn xlog_page_magic(self) -> u16 {
        match self {
            PgMajor::V13 => 0xD106,
            PgMajor::V14 => 0xD10D,
            PgMajor::V15 => 0xD110,
            PgMajor::V16 => 0xD113,
            PgMajor::V17 => 0xD116,
            PgMajor::V18 => 0xD118,
        }
    }

    /// The version whose WAL pages carry `magic`, if supported.
    pub fn from_page_magic(magic: u16) -> Option<PgMajor> {
        PgMajor::ALL
            .into_iter()
            .find(|v| v.xlog_page_magic() == magic)
    }

    /// The major version number, e.g. 15.
    pub fn number(self) -> u32 {
        match self {
            PgMajor::V13 => 13,
            PgMajor::V14 => 14,
            PgMajor::V15 => 15,
            PgMajor::V16 => 16,
            PgMajor::V17 => 17,
            PgMajor::V18 => 18,
        }
    }

    /// The version with this major number, if supported.
    pub fn from_number(n: u32) -> Option<PgMajor> {
        PgMajor::ALL.into_iter().find(|v| v.number() == n)
    }
}

impl fmt::Display for PgMajor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.number())
    }
}

#[cfg(test)]
#[allow(clippy::indexing_slicing)] // tests index fixtures they built
mod tests {
    use super::*;

    #[test]
    fn magic_table_round_trips() {
        for v in PgMajor::ALL {
            assert_eq!(PgMajor::from_page_magic(v.xlog_page_magic()), Some(v));
            assert_eq!(PgMajor::from_number(v.number()), Some(v));
        }
        // PG 12, the PG 17 branch-point magic, PG 19 beta and zero are not supported.
        for m in [0xD101, 0xD115, 0xD121, 0] {
            assert_eq!(PgMajor::from_page_magic(m), None);
        }
        assert_eq!(PgMajor::from_number(12), None);
    }
}
