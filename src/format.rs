//! Versioned stored formats: what every reader of a JSON object pitr stores (`pitr.json`, backup
//! manifests, segment summaries) checks before it trusts the content.
//!
//! A format newer than this pitr reads is refused with a message saying so, never parsed as if it
//! were an older one; a value that fails to parse is reported, never replaced by a default.

use serde::Deserialize;
use serde::de::DeserializeOwned;

/// A stored JSON format with a version.
pub trait Versioned: DeserializeOwned {
    /// What the object is, for messages ("backup manifest").
    const WHAT: &'static str;
    /// The newest version this pitr reads (and the one it writes).
    const SUPPORTED: u32;
    /// The version the object records.
    fn version(&self) -> u32;
}

/// A stored object that cannot be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FormatError {
    /// Written by a newer pitr.
    #[error(
        "{what} is format {found}, newer than this pitr ({}) reads (format {supported}): read it with a newer pitr",
        env!("CARGO_PKG_VERSION")
    )]
    Newer {
        /// What it is.
        what: &'static str,
        /// The version it records.
        found: u32,
        /// The newest version this pitr reads.
        supported: u32,
    },
    /// Not valid JSON of the format, or a value out of range.
    #[error("unreadable {what}: {detail}")]
    Invalid {
        /// What it is.
        what: &'static str,
        /// The parser's complaint.
        detail: String,
    },
}

/// The version fields the formats use (`format_version`; summaries say `format`).
#[derive(Deserialize)]
struct Probe {
    format_version: Option<u32>,
    format: Option<u32>,
}

/// [`decode`] from a reader (a large object parsed as it is decompressed). A value that does not
/// parse is `Invalid` here without looking for a newer version: a caller that wants that
/// distinction reads the object whole with [`decode`].
///
/// # Errors
/// As [`decode`].
pub fn decode_reader<T: Versioned>(read: &mut dyn std::io::Read) -> Result<T, FormatError> {
    match serde_json::from_reader::<_, T>(read) {
        Ok(t) if t.version() > T::SUPPORTED => Err(FormatError::Newer {
            what: T::WHAT,
            found: t.version(),
            supported: T::SUPPORTED,
        }),
        Ok(t) => Ok(t),
        Err(e) => Err(FormatError::Invalid {
            what: T::WHAT,
            detail: e.to_string(),
        }),
    }
}

/// Parse a stored object of format `T`, checking its version.
///
/// # Errors
/// [`FormatError::Newer`] for a newer format (also when its content no longer parses as this
/// version's), [`FormatError::Invalid`] for anything else that does not parse.
pub fn decode<T: Versioned>(bytes: &[u8]) -> Result<T, FormatError> {
    let newer = |found: u32| FormatError::Newer {
        what: T::WHAT,
        found,
        supported: T::SUPPORTED,
    };
    match serde_json::from_slice::<T>(bytes) {
        Ok(t) if t.version() > T::SUPPORTED => Err(newer(t.version())),
        Ok(t) => Ok(t),
        Err(e) => {
            let found = serde_json::from_slice::<Probe>(bytes)
                .ok()
                .and_then(|p| p.format_version.or(p.format));
            match found {
                Some(v) if v > T::SUPPORTED => Err(newer(v)),
                _ => Err(FormatError::Invalid {
                    what: T::WHAT,
                    detail: e.to_string(),
                }),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    struct Thing {
        format_version: u32,
        #[allow(dead_code)]
        size: u64,
    }

    impl Versioned for Thing {
        const WHAT: &'static str = "thing";
        const SUPPORTED: u32 = 2;
        fn version(&self) -> u32 {
            self.format_version
        }
    }

    #[test]
    fn newer_formats_are_refused_and_bad_values_reported() {
        assert!(decode::<Thing>(br#"{"format_version":2,"size":1}"#).is_ok());
        assert_eq!(
            decode::<Thing>(br#"{"format_version":3,"size":1}"#).unwrap_err(),
            FormatError::Newer {
                what: "thing",
                found: 3,
                supported: 2
            }
        );
        // A newer format whose fields changed is still named as newer, not as garbage.
        assert!(matches!(
            decode::<Thing>(br#"{"format_version":9,"size":"big"}"#),
            Err(FormatError::Newer { found: 9, .. })
        ));
        let e = decode::<Thing>(br#"{"format_version":1,"size":-1}"#).unwrap_err();
        assert!(
            matches!(e, FormatError::Invalid { what: "thing", .. }),
            "{e}"
        );
        assert!(e.to_string().starts_with("unreadable thing: "), "{e}");
    }
}
