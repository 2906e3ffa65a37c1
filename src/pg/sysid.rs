//! The database system identifier (`pg_control`'s `system_identifier`, also in every WAL segment's
//! long header): what tells one cluster from another.

use std::fmt;
use std::str::FromStr;

/// A cluster's system identifier. Printed and stored in decimal, as `pg_controldata` and
/// `pg_control_system()` show it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SystemId(pub u64);

impl fmt::Display for SystemId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// The text is not a system identifier.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{0:?} is not a system identifier (a decimal number, as pg_controldata shows it)")]
pub struct SystemIdError(pub String);

impl FromStr for SystemId {
    type Err = SystemIdError;
    fn from_str(s: &str) -> Result<SystemId, SystemIdError> {
        if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
            return Err(SystemIdError(s.to_string()));
        }
        s.parse()
            .map(SystemId)
            .map_err(|_| SystemIdError(s.to_string()))
    }
}

/// Stored as a decimal string: JSON numbers lose precision beyond 2^53 in many readers.
impl serde::Serialize for SystemId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for SystemId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s: String = serde::Deserialize::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
#[allow(clippy::indexing_slicing)] // tests index fixtures they built
mod tests {
    use super::*;

    #[test]
    fn stored_as_decimal_text() {
        let id = SystemId(7_710_565_526_380_193_117);
        let json = serde_json::to_string(&id).unwrap();
        assert_eq!(json, "\"7710565526380193117\"");
        assert_eq!(serde_json::from_str::<SystemId>(&json).unwrap(), id);
        for bad in [
            "\"\"",
            "\"-1\"",
            "\"12a\"",
            "\"99999999999999999999\"",
            "12",
        ] {
            assert!(serde_json::from_str::<SystemId>(bad).is_err(), "{bad}");
        }
    }
}
