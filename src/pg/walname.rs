//! WAL file names and the quantities they encode: `TimelineId`, `SegNo`, `WalSegSize`.
//!
//! Mirrors `XLogFileName()`, `IsXLogFileName()`, `IsPartialXLogFileName()`, `TLHistoryFileName()` and
//! `BackupHistoryFileName()` in PostgreSQL's `src/include/access/xlog_internal.h`. Parsing is strict in
//! both directions: upper-case hexadecimal only (as PostgreSQL writes them), exact lengths, timeline 0
//! refused, and `WalFileName::to_string()` gives back exactly the parsed text.
//!
//! ```
//! use pitr::pg::walname::WalFileName;
//! let name: WalFileName = "000000010000000000000003".parse().unwrap();
//! assert_eq!(name.to_string(), "000000010000000000000003");
//! assert!("00000001000000000000000g".parse::<WalFileName>().is_err());
//! assert!("../../etc/passwd".parse::<WalFileName>().is_err());
//! ```

use std::fmt;
use std::str::FromStr;

use super::lsn::Lsn;

/// A timeline id (never 0). Printed in decimal; names use 8 upper-case hex digits.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(try_from = "u32", into = "u32")]
pub struct TimelineId(u32);

impl TimelineId {
    /// Timeline 1, which every cluster starts on and which never has a history file.
    pub const ONE: TimelineId = TimelineId(1);

    /// `None` for 0, which is not a timeline.
    pub fn new(tli: u32) -> Option<TimelineId> {
        (tli != 0).then_some(TimelineId(tli))
    }

    /// The numeric value.
    pub fn get(self) -> u32 {
        self.0
    }
}

impl TryFrom<u32> for TimelineId {
    type Error = String;
    fn try_from(v: u32) -> Result<Self, String> {
        TimelineId::new(v).ok_or_else(|| "timeline 0 does not exist".to_string())
    }
}

impl From<TimelineId> for u32 {
    fn from(t: TimelineId) -> u32 {
        t.0
    }
}

impl fmt::Display for TimelineId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A WAL segment number (`XLogSegNo`): LSN / segment size.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SegNo(pub u64);

impl SegNo {
    /// The LSN of the first byte of this segment (`XLogSegNoOffsetToRecPtr(segno, 0)`).
    pub fn start_lsn(self, seg_size: WalSegSize) -> Option<Lsn> {
        self.0.checked_mul(u64::from(seg_size.bytes())).map(Lsn)
    }
}

/// The WAL segment size: a power of two from 1 MiB to 1 GiB (`IsValidWalSegSize`). Stored as
/// its size in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "u32", into = "u32")]
pub struct WalSegSize(u32);

impl TryFrom<u32> for WalSegSize {
    type Error = String;
    fn try_from(v: u32) -> Result<Self, String> {
        WalSegSize::new(v).ok_or_else(|| {
            format!("{v} is not a WAL segment size (a power of two from 1 MiB to 1 GiB)")
        })
    }
}

impl From<WalSegSize> for u32 {
    fn from(s: WalSegSize) -> u32 {
        s.0
    }
}

impl WalSegSize {
    /// PostgreSQL's default, 16 MiB.
    pub const DEFAULT: WalSegSize = WalSegSize(16 * 1024 * 1024);

    /// `None` unless `bytes` is a power of two between 1 MiB and 1 GiB.
    pub fn new(bytes: u32) -> Option<WalSegSize> {
        (bytes.is_power_of_two() && (1 << 20..=1 << 30).contains(&bytes))
            .then_some(WalSegSize(bytes))
    }

    /// The size in bytes.
    pub fn bytes(self) -> u32 {
        self.0
    }

    /// `XLogSegmentsPerXLogId`: how many segments share one value of the name's middle 8 digits.
    pub fn segments_per_xlogid(self) -> u64 {
        0x1_0000_0000 / u64::from(self.0)
    }
}

/// The 24-hex-digit part of a segment name: timeline, `log` (LSN >> 32) and `seg` digits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SegmentName {
    /// The timeline the segment belongs to.
    pub tli: TimelineId,
    log: u32,
    seg: u32,
}

impl SegmentName {
    /// The name of segment `segno` on timeline `tli` (`XLogFileName`).
    pub fn new(tli: TimelineId, segno: SegNo, seg_size: WalSegSize) -> Option<SegmentName> {
        let per = seg_size.segments_per_xlogid();
        let log = u32::try_from(segno.0 / per).ok()?;
        Some(SegmentName {
            tli,
            log,
            seg: (segno.0 % per) as u32,
        })
    }

    /// The segment number, or `None` if the last 8 digits are out of range for this segment size
    /// (e.g. `…00000100` with 16 MiB segments, where only 00–FF exist).
    pub fn segno(self, seg_size: WalSegSize) -> Option<SegNo> {
        let per = seg_size.segments_per_xlogid();
        (u64::from(self.seg) < per).then(|| SegNo(u64::from(self.log) * per + u64::from(self.seg)))
    }

    fn parse(s: &str) -> Option<SegmentName> {
        if s.len() != 24 || !is_upper_hex(s) {
            return None;
        }
        let part = |r: std::ops::Range<usize>| u32::from_str_radix(&s[r], 16).ok();
        Some(SegmentName {
            tli: TimelineId::new(part(0..8)?)?,
            log: part(8..16)?,
            seg: part(16..24)?,
        })
    }
}

impl fmt::Display for SegmentName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:08X}{:08X}{:08X}", self.tli.0, self.log, self.seg)
    }
}

impl FromStr for SegmentName {
    type Err = NameError;
    fn from_str(s: &str) -> Result<SegmentName, NameError> {
        SegmentName::parse(s).ok_or_else(|| NameError(s.to_string()))
    }
}

/// Stored as its 24-digit name.
impl serde::Serialize for SegmentName {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for SegmentName {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s: String = serde::Deserialize::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A file name PostgreSQL hands to `archive_command` (`%f`) or asks `restore_command` for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum WalFileName {
    /// A complete WAL segment: `000000010000000000000003`.
    Segment(SegmentName),
    /// The last, incomplete segment of a timeline left at promotion: `…0003.partial`.
    Partial(SegmentName),
    /// A timeline history file: `00000002.history`.
    History(TimelineId),
    /// A backup history file: `000000010000000000000003.00000028.backup`.
    BackupHistory {
        /// The segment holding the backup's start LSN (with the stop timeline).
        segment: SegmentName,
        /// The start LSN's offset inside that segment.
        offset: u32,
    },
}

/// The text is not a name PostgreSQL gives WAL, history, partial or backup-history files.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "{0:?} is not a WAL file name (expected 24 upper-case hex digits, optionally followed by \
     .partial, or TTTTTTTT.history, or <segment>.XXXXXXXX.backup)"
)]
pub struct NameError(pub String);

fn is_upper_hex(s: &str) -> bool {
    s.bytes()
        .all(|b| b.is_ascii_digit() || (b'A'..=b'F').contains(&b))
}

impl FromStr for WalFileName {
    type Err = NameError;

    fn from_str(s: &str) -> Result<Self, NameError> {
        let err = || NameError(s.to_string());
        if let Some(tli) = s.strip_suffix(".history") {
            if tli.len() != 8 || !is_upper_hex(tli) {
                return Err(err());
            }
            let tli = u32::from_str_radix(tli, 16).map_err(|_| err())?;
            return TimelineId::new(tli)
                .map(WalFileName::History)
                .ok_or_else(err);
        }
        if let Some(seg) = s.strip_suffix(".partial") {
            return SegmentName::parse(seg)
                .map(WalFileName::Partial)
                .ok_or_else(err);
        }
        if let Some(rest) = s.strip_suffix(".backup") {
            // <24 hex>.<8 hex>
            if rest.len() != 33 || rest.as_bytes().get(24) != Some(&b'.') {
                return Err(err());
            }
            let segment = SegmentName::parse(&rest[..24]).ok_or_else(err)?;
            let off = &rest[25..];
            if !is_upper_hex(off) {
                return Err(err());
            }
            let offset = u32::from_str_radix(off, 16).map_err(|_| err())?;
            return Ok(WalFileName::BackupHistory { segment, offset });
        }
        SegmentName::parse(s)
            .map(WalFileName::Segment)
            .ok_or_else(err)
    }
}

impl fmt::Display for WalFileName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WalFileName::Segment(s) => write!(f, "{s}"),
            WalFileName::Partial(s) => write!(f, "{s}.partial"),
            WalFileName::History(t) => write!(f, "{:08X}.history", t.0),
            WalFileName::BackupHistory { segment, offset } => {
                write!(f, "{segment}.{offset:08X}.backup")
            }
        }
    }
}

impl WalFileName {
    /// The timeline this file belongs to.
    pub fn timeline(&self) -> TimelineId {
        match self {
            WalFileName::Segment(s) | WalFileName::Partial(s) => s.tli,
            WalFileName::BackupHistory { segment, .. } => segment.tli,
            WalFileName::History(t) => *t,
        }
    }

    /// The segment this file is named after (`None` for a history file).
    pub fn segment(&self) -> Option<SegmentName> {
        match self {
            WalFileName::Segment(s) | WalFileName::Partial(s) => Some(*s),
            WalFileName::BackupHistory { segment, .. } => Some(*segment),
            WalFileName::History(_) => None,
        }
    }
}

#[cfg(test)]
#[allow(clippy::indexing_slicing)] // tests index fixtures they built
mod tests {
    use super::*;

    fn tli(n: u32) -> TimelineId {
        TimelineId::new(n).unwrap()
    }

    #[test]
    fn parses_every_kind_and_round_trips() {
        let cases = [
            "000000010000000000000003",
            "0000000A00000001000000FF",
            "000000010000000000000007.partial",
            "00000002.history",
            "0000000F.history",
            "000000010000000000000003.00000028.backup",
        ];
        for c in cases {
            let n: WalFileName = c.parse().unwrap();
            assert_eq!(n.to_string(), c);
        }
        let n: WalFileName = "0000000A00000001000000FF".parse().unwrap();
        assert_eq!(n.timeline(), tli(10));
        match "000000010000000000000003.00000028.backup".parse().unwrap() {
            WalFileName::BackupHistory { segment, offset } => {
                assert_eq!(offset, 0x28);
                assert_eq!(segment.segno(WalSegSize::DEFAULT), Some(SegNo(3)));
            }
            other => panic!("wrong kind {other:?}"),
        }
    }

    #[test]
    fn rejects_what_postgres_would_not_write() {
        for bad in [
            "",
            "00000001000000000000003",   // 23 digits
            "0000000100000000000000030", // 25 digits
            "00000001000000000000000a",  // lower case
            "000000000000000000000003",  // timeline 0
            "00000000.history",          // timeline 0
            "0000002.history",           // 7 digits
            "00000002.History",
            "0000000g.history",
            "000000010000000000000003.partia",
            "000000010000000000000003.0000028.backup",
            "000000010000000000000003-00000028.backup",
            "000000010000000000000003.0000002x.backup",
            "RECOVERYXLOG",
            "../000000010000000000000003",
            "000000010000000000000003/",
            "+00000010000000000000003",
            "٠٠٠٠٠٠٠١٠٠٠٠٠٠٠٠٠٠٠٠٠٠٠٣", // non-ASCII digits
        ] {
            assert!(
                bad.parse::<WalFileName>().is_err(),
                "{bad:?} must be rejected"
            );
        }
    }

    #[test]
    fn segno_conversion_depends_on_segment_size() {
        let sz16 = WalSegSize::DEFAULT;
        let sz1g = WalSegSize::new(1 << 30).unwrap();
        let name = SegmentName::new(tli(1), SegNo(0x1FF), sz16).unwrap();
        assert_eq!(name.to_string(), "0000000100000001000000FF");
        assert_eq!(name.segno(sz16), Some(SegNo(0x1FF)));
        // With 1 GiB segments only 0–3 are valid last digits.
        let WalFileName::Segment(s) = "000000010000000000000004".parse().unwrap() else {
            panic!()
        };
        assert_eq!(s.segno(sz1g), None);
        assert_eq!(s.segno(sz16), Some(SegNo(4)));
        assert_eq!(SegNo(3).start_lsn(sz16), Some(Lsn(0x300_0000)));
    }

    #[test]
    fn segment_sizes() {
        for ok in [1 << 20, 1 << 24, 1 << 30] {
            assert!(WalSegSize::new(ok).is_some());
        }
        for bad in [0, 1 << 19, (1 << 20) + 1, 3 << 20, 1 << 31] {
            assert!(WalSegSize::new(bad).is_none(), "{bad}");
        }
        assert_eq!(WalSegSize::DEFAULT.segments_per_xlogid(), 256);
    }
}
