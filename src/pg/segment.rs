//! Validation of a WAL segment's long page header before it is archived.
//!
//! Layout from `XLogLongPageHeaderData` in `src/include/access/xlog_internal.h` (little-endian,
//! 64-bit MAXALIGN): magic u16 @0, info u16 @2, tli u32 @4, pageaddr u64 @8, rem_len u32 @16,
//! sysid u64 @24, seg_size u32 @32, xlog_blcksz u32 @36. The checks follow
//! `XLogReaderValidatePageHeader()` in `xlogreader.c`, plus the ones only an archiver can make: the
//! page address must match the file *name*, and the file size the header's segment size.
//! Deeper record-level checks belong to the WAL index, which never blocks archiving.

use super::lsn::Lsn;
use super::version::PgMajor;
use super::walname::{SegmentName, TimelineId, WalSegSize};

/// `XLP_LONG_HEADER`.
pub const XLP_LONG_HEADER: u16 = 0x0002;
/// `XLP_ALL_FLAGS` for PostgreSQL 13–18 (with the Nov-2021 `XLP_FIRST_IS_OVERWRITE_CONTRECORD`).
pub const XLP_ALL_FLAGS: u16 = 0x000F;
/// `SizeOfXLogLongPHD`.
pub const SIZE_OF_LONG_PHD: usize = 40;

/// What the first page of a segment says about the cluster that wrote it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SegmentHeader {
    /// The PostgreSQL major version, from `xlp_magic`.
    pub major: PgMajor,
    /// The timeline of the first record on the page (may be older than the name's timeline on the
    /// segment where a timeline switch happened).
    pub tli: TimelineId,
    /// `xlp_pageaddr`: the LSN of the segment's first byte.
    pub pageaddr: Lsn,
    /// The cluster's system identifier (`xlp_sysid`).
    pub system_identifier: u64,
    /// `xlp_seg_size`.
    pub seg_size: WalSegSize,
    /// `xlp_xlog_blcksz`, the WAL page size.
    pub page_size: u32,
}

/// Why bytes are not a valid WAL segment.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum SegmentError {
    /// Shorter than a long page header.
    #[error("file is {len} bytes, too short for a WAL page header")]
    TooShort {
        /// The file length.
        len: usize,
    },
    /// The magic is not one of a supported release.
    #[error("page magic 0x{magic:04X} is not PostgreSQL 13–18 WAL")]
    BadMagic {
        /// The magic found.
        magic: u16,
    },
    /// The first page lacks a long header or has unknown flag bits.
    #[error("first page info flags 0x{info:04X} are not those of a segment's first page")]
    BadInfo {
        /// The flags found.
        info: u16,
    },
    /// Timeline 0 or a timeline newer than the file name's.
    #[error("page timeline {found} does not fit the file name's timeline {expected}")]
    BadTimeline {
        /// The page's timeline.
        found: u32,
        /// The name's timeline.
        expected: TimelineId,
    },
    /// `xlp_seg_size` is not a valid segment size.
    #[error("header segment size {0} is not a power of two between 1 MiB and 1 GiB")]
    BadSegSize(u32),
    /// `xlp_xlog_blcksz` is not a valid WAL page size.
    #[error("header WAL page size {0} is not a power of two between 1 kB and 64 kB")]
    BadPageSize(u32),
    /// The file is not exactly one segment long (truncated or padded).
    #[error("file is {len} bytes but the header says segments are {expected} bytes (truncated?)")]
    SizeMismatch {
        /// The file length.
        len: usize,
        /// The segment size from the header.
        expected: u32,
    },
    /// The name's last digits cannot exist with this segment size.
    #[error("the name {name} is out of range for {seg_size}-byte segments")]
    NameOutOfRange {
        /// The segment name.
        name: SegmentName,
        /// The segment size.
        seg_size: u32,
    },
    /// The page address does not match the name: the bytes belong to another segment.
    #[error("page address {found} does not match the file name, which starts at {expected}")]
    PageAddrMismatch {
        /// The address in the header.
        found: Lsn,
        /// The address the name implies.
        expected: Lsn,
    },
}

use super::le::{u16_at, u32_at, u64_at};

/// Decode the long page header at the start of `bytes`, checking it is self-consistent.
///
/// # Errors
/// Any [`SegmentError`] except `SizeMismatch`, `NameOutOfRange` and `PageAddrMismatch`.
pub fn parse_long_header(bytes: &[u8]) -> Result<SegmentHeader, SegmentError> {
    if bytes.len() < SIZE_OF_LONG_PHD {
        return Err(SegmentError::TooShort { len: bytes.len() });
    }
    let magic = u16_at(bytes, 0);
    let major = PgMajor::from_page_magic(magic).ok_or(SegmentError::BadMagic { magic })?;
    let info = u16_at(bytes, 2);
    if info & XLP_LONG_HEADER == 0 || info & !XLP_ALL_FLAGS != 0 {
        return Err(SegmentError::BadInfo { info });
    }
    let tli_raw = u32_at(bytes, 4);
    let tli = TimelineId::new(tli_raw).ok_or(SegmentError::BadTimeline {
        found: 0,
        expected: TimelineId::ONE,
    })?;
    let seg_raw = u32_at(bytes, 32);
    let seg_size = WalSegSize::new(seg_raw).ok_or(SegmentError::BadSegSize(seg_raw))?;
    let page_size = u32_at(bytes, 36);
    if !page_size.is_power_of_two() || !(1024..=65536).contains(&page_size) {
        return Err(SegmentError::BadPageSize(page_size));
    }
    Ok(SegmentHeader {
        major,
        tli,
        pageaddr: Lsn(u64_at(bytes, 8)),
        system_identifier: u64_at(bytes, 24),
        seg_size,
        page_size,
    })
}

/// Validate a whole segment (or `.partial`) file against its name.
///
/// # Errors
/// A [`SegmentError`] saying what does not fit.
pub fn validate_segment(name: SegmentName, bytes: &[u8]) -> Result<SegmentHeader, SegmentError> {
    validate_segment_start(name, bytes, bytes.len())
}

/// Validate a segment file from its first page and its length, before reading the rest.
///
/// # Errors
/// A [`SegmentError`] saying what does not fit.
pub fn validate_segment_start(
    name: SegmentName,
    first_page: &[u8],
    file_len: usize,
) -> Result<SegmentHeader, SegmentError> {
    let h = parse_long_header(first_page)?;
    if h.tli > name.tli {
        return Err(SegmentError::BadTimeline {
            found: h.tli.get(),
            expected: name.tli,
        });
    }
    if file_len != h.seg_size.bytes() as usize {
        return Err(SegmentError::SizeMismatch {
            len: file_len,
            expected: h.seg_size.bytes(),
        });
    }
    let out_of_range = || SegmentError::NameOutOfRange {
        name,
        seg_size: h.seg_size.bytes(),
    };
    let expected = name
        .segno(h.seg_size)
        .and_then(|s| s.start_lsn(h.seg_size))
        .ok_or_else(out_of_range)?;
    if h.pageaddr != expected {
        return Err(SegmentError::PageAddrMismatch {
            found: h.pageaddr,
            expected,
        });
    }
    Ok(h)
}

#[cfg(test)]
#[allow(clippy::indexing_slicing)] // tests index fixtures they built
pub(crate) mod tests {
    use super::*;
    use crate::pg::walname::{SegNo, WalFileName};

    /// A synthetic segment: a valid long header, the rest zero.
    pub(crate) fn fake_segment(
        major: PgMajor,
        tli: u32,
        segno: u64,
        sysid: u64,
        seg_size: u32,
    ) -> Vec<u8> {
        let mut b = vec![0u8; seg_size as usize];
        b[0..2].copy_from_slice(&major.xlog_page_magic().to_le_bytes());
        b[2..4].copy_from_slice(&XLP_LONG_HEADER.to_le_bytes());
        b[4..8].copy_from_slice(&tli.to_le_bytes());
        b[8..16].copy_from_slice(&(segno * u64::from(seg_size)).to_le_bytes());
        b[24..32].copy_from_slice(&sysid.to_le_bytes());
        b[32..36].copy_from_slice(&seg_size.to_le_bytes());
        b[36..40].copy_from_slice(&8192u32.to_le_bytes());
        b
    }

    fn seg(name: &str) -> SegmentName {
        match name.parse::<WalFileName>().unwrap() {
            WalFileName::Segment(s) => s,
            _ => panic!(),
        }
    }

    #[test]
    fn accepts_a_real_pg15_header() {
        // The first 40 bytes of a real PG 15.18 segment (pg-internals.md §2.1).
        let hex =
            "10d1020001000000000000010000000000000000000000005da543717e6e016b0000000100200000";
        let mut bytes: Vec<u8> = (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
            .collect();
        bytes.resize(16 << 20, 0);
        let h = validate_segment(seg("000000010000000000000001"), &bytes).unwrap();
        assert_eq!(h.major, PgMajor::V15);
        assert_eq!(h.pageaddr, Lsn(0x0100_0000));
        assert_eq!(h.page_size, 8192);
        assert_eq!(h.seg_size, WalSegSize::DEFAULT);
        assert_eq!(h.system_identifier, 7710565526380193117);
    }

    #[test]
    fn every_version_validates() {
        for v in PgMajor::ALL {
            let b = fake_segment(v, 1, 3, 42, 16 << 20);
            let h = validate_segment(seg("000000010000000000000003"), &b).unwrap();
            assert_eq!(
                (h.major, h.system_identifier, h.seg_size.bytes()),
                (v, 42, 16 << 20)
            );
        }
        // A 1 MiB cluster: segment 0x15.
        let b = fake_segment(PgMajor::V18, 1, 0x15, 7, 1 << 20);
        assert!(validate_segment(seg("000000010000000000000015"), &b).is_ok());
    }

    #[test]
    fn rejects_bad_segments() {
        let good = fake_segment(PgMajor::V15, 1, 3, 42, 16 << 20);
        let name = seg("000000010000000000000003");
        let check = |b: &[u8], n: SegmentName| validate_segment(n, b).unwrap_err();

        assert_eq!(check(&good[..10], name), SegmentError::TooShort { len: 10 });
        assert!(matches!(
            check(&good[..1 << 20], name),
            SegmentError::SizeMismatch { .. }
        ));
        let mut longer = good.clone();
        longer.push(0);
        assert!(matches!(
            check(&longer, name),
            SegmentError::SizeMismatch { .. }
        ));

        let mut b = good.clone();
        b[0] = 0x01;
        assert!(matches!(check(&b, name), SegmentError::BadMagic { .. }));
        let mut b = good.clone();
        b[2] = 0x01; // short header at offset 0
        assert!(matches!(check(&b, name), SegmentError::BadInfo { .. }));
        let mut b = good.clone();
        b[3] = 0x10; // unknown flag bit
        assert!(matches!(check(&b, name), SegmentError::BadInfo { .. }));
        let mut b = good.clone();
        b[32..36].copy_from_slice(&(3u32 << 20).to_le_bytes());
        assert!(matches!(check(&b, name), SegmentError::BadSegSize(_)));
        let mut b = good.clone();
        b[36..40].copy_from_slice(&100u32.to_le_bytes());
        assert!(matches!(check(&b, name), SegmentError::BadPageSize(100)));
        let mut b = good.clone();
        b[4..8].copy_from_slice(&0u32.to_le_bytes());
        assert!(matches!(check(&b, name), SegmentError::BadTimeline { .. }));

        // The right bytes under another segment's name, or a newer page timeline than the name's.
        assert!(matches!(
            check(&good, seg("000000010000000000000004")),
            SegmentError::PageAddrMismatch { .. }
        ));
        let tli2 = fake_segment(PgMajor::V15, 2, 3, 42, 16 << 20);
        assert!(matches!(
            check(&tli2, name),
            SegmentError::BadTimeline { found: 2, .. }
        ));
        // An older page timeline is fine: the first pages of a switch segment still carry it.
        assert!(validate_segment(seg("000000020000000000000003"), &good).is_ok());
        // Name digits impossible for the segment size.
        let big = fake_segment(PgMajor::V15, 1, 0, 42, 1 << 30);
        assert!(matches!(
            check(&big, seg("000000010000000000000004")),
            SegmentError::NameOutOfRange { .. }
        ));

        // Random bytes never panic.
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        for len in [0usize, 1, 39, 40, 41, 8192, 16 << 20] {
            let junk: Vec<u8> = (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect();
            assert!(validate_segment(name, &junk).is_err());
        }
        let _ = SegNo(0);
    }
}
