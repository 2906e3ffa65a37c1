//! `Lsn`: a WAL position (`XLogRecPtr`), printed and parsed as PostgreSQL does (`%X/%X`).
//!
//! Parsing is strict: each half must be 1–8 hex digits, so `0/1FFFFFFFF` is rejected instead of
//! spilling into the high word. Zero-padded halves (PostgreSQL 19 prints `%X/%08X`) are accepted.

use std::fmt;
use std::str::FromStr;

use super::walname::{SegNo, WalSegSize};

/// A byte position in the WAL stream.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Lsn(pub u64);

/// The text was not an LSN of the form `X/X`.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid LSN {0:?}: expected two hexadecimal halves of at most 8 digits, like 0/3000060")]
pub struct LsnParseError(pub String);

impl Lsn {
    /// The invalid LSN (`InvalidXLogRecPtr`).
    pub const INVALID: Lsn = Lsn(0);

    /// The segment holding the byte at this position (`XLByteToSeg`).
    pub fn segno(self, seg_size: WalSegSize) -> SegNo {
        SegNo(self.0 / u64::from(seg_size.bytes()))
    }

    /// The offset of this position inside its segment (`XLogSegmentOffset`).
    pub fn segment_offset(self, seg_size: WalSegSize) -> u32 {
        // The mask keeps the value below the segment size, which is at most 1 GiB.
        (self.0 & (u64::from(seg_size.bytes()) - 1)) as u32
    }

    /// `self + bytes`, or `None` on overflow.
    pub fn checked_add(self, bytes: u64) -> Option<Lsn> {
        self.0.checked_add(bytes).map(Lsn)
    }
}

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xFFFF_FFFF)
    }
}

impl FromStr for Lsn {
    type Err = LsnParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || LsnParseError(s.to_string());
        let (hi, lo) = s.split_once('/').ok_or_else(err)?;
        let half = |h: &str| -> Result<u64, LsnParseError> {
            if h.is_empty() || h.len() > 8 || !h.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(err());
            }
            u32::from_str_radix(h, 16).map(u64::from).map_err(|_| err())
        };
        Ok(Lsn((half(hi)? << 32) | half(lo)?))
    }
}

impl serde::Serialize for Lsn {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Lsn {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
#[allow(clippy::indexing_slicing)] // tests index fixtures they built
mod tests {
    use super::*;

    #[test]
    fn display_and_parse_round_trip() {
        for (text, value) in [
            ("0/0", 0u64),
            ("0/3000060", 0x0300_0060),
            ("1/0", 1 << 32),
            ("FFFFFFFF/FFFFFFFF", u64::MAX),
            ("16/B374D848", 0x16_B374_D848),
        ] {
            let lsn: Lsn = text.parse().unwrap();
            assert_eq!(lsn, Lsn(value));
            assert_eq!(lsn.to_string(), text);
        }
        // PostgreSQL 19 zero-pads the low half; lower-case hex is accepted on input.
        assert_eq!("0/03000060".parse::<Lsn>().unwrap(), Lsn(0x0300_0060));
        assert_eq!("a/b".parse::<Lsn>().unwrap(), Lsn((0xA << 32) | 0xB));
    }

    #[test]
    fn rejects_malformed() {
        for bad in [
            "",
            "/",
            "0/",
            "/0",
            "0",
            "0/1FFFFFFFF",
            "123456789/0",
            "0/-1",
            "0/+1",
            "0/ 1",
            " 0/1",
            "0/1/2",
            "G/0",
            "0x0/0",
            "0/3000060\n",
        ] {
            assert!(bad.parse::<Lsn>().is_err(), "{bad:?} must be rejected");
        }
    }

    #[test]
    fn segment_arithmetic() {
        let sz16 = WalSegSize::new(16 * 1024 * 1024).unwrap();
        let sz1 = WalSegSize::new(1024 * 1024).unwrap();
        // The worked example of pg-internals §1.1.
        let lsn: Lsn = "0/15168A0".parse().unwrap();
        assert_eq!(lsn.segno(sz16), SegNo(1));
        assert_eq!(lsn.segno(sz1), SegNo(0x15));
        assert_eq!(lsn.segment_offset(sz16), 0x5168A0);
    }

    #[test]
    fn serde_as_text() {
        let json = serde_json::to_string(&Lsn(0x0300_0060)).unwrap();
        assert_eq!(json, "\"0/3000060\"");
        assert_eq!(
            serde_json::from_str::<Lsn>(&json).unwrap(),
            Lsn(0x0300_0060)
        );
        assert!(serde_json::from_str::<Lsn>("\"zz\"").is_err());
    }
}
