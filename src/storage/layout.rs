//! Every object key in a repository comes from here.
//!
//! ```text
//! pitr.json                                  repository identity (cluster, version, segment size)
//! wal/<TTTTTTTT>/<segment>.pitr              WAL segments, `.partial` and `.backup` files
//! wal/history/<TTTTTTTT>.history.pitr        timeline history files
//! ```
//! WAL objects keep PostgreSQL's file names so a person can find a segment by eye; `.pitr` marks
//! pitr's envelope (checksums and compression, see `envelope`).

use object_store::path::Path;

use crate::pg::WalFileName;

/// Something stored in a repository.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ObjectKey {
    /// The repository identity.
    Identity,
    /// A file PostgreSQL archived.
    Wal(WalFileName),
}

/// Suffix of every enveloped object.
pub const SUFFIX: &str = ".pitr";

impl ObjectKey {
    /// The key relative to the repository prefix.
    pub fn key(&self) -> String {
        match self {
            ObjectKey::Identity => "pitr.json".to_string(),
            ObjectKey::Wal(name @ WalFileName::History(_)) => format!("wal/history/{name}{SUFFIX}"),
            ObjectKey::Wal(name) => format!("wal/{:08X}/{name}{SUFFIX}", name.timeline().get()),
        }
    }

    /// The key as an object-store path.
    pub fn path(&self) -> Path {
        Path::from(self.key())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys() {
        let k = |s: &str| ObjectKey::Wal(s.parse().unwrap()).key();
        assert_eq!(ObjectKey::Identity.key(), "pitr.json");
        assert_eq!(
            k("000000010000000000000003"),
            "wal/00000001/000000010000000000000003.pitr"
        );
        assert_eq!(
            k("0000000A0000000000000003.partial"),
            "wal/0000000A/0000000A0000000000000003.partial.pitr"
        );
        assert_eq!(k("00000002.history"), "wal/history/00000002.history.pitr");
        assert_eq!(
            k("000000010000000000000003.00000028.backup"),
            "wal/00000001/000000010000000000000003.00000028.backup.pitr"
        );
        // The object-store path is the same text (no escaping needed for these names).
        assert_eq!(ObjectKey::Identity.path().as_ref(), "pitr.json");
    }
}
