//! Data pages: the header fields a backup checks (`bufpage.h`) and the page checksum
//! (`pg_checksum_page()` in `checksum_impl.h`: 32 parallel FNV-1a-style lanes over the page as
//! little-endian 32-bit words with `pd_checksum` taken as zero, two more rounds of zeros, the lanes
//! folded by XOR, the block number mixed in, and the result mapped to 1..=65535).

use super::le::{u16_at, u32_at};
use super::lsn::Lsn;

/// Lanes computed in parallel.
const N_SUMS: usize = 32;
/// FNV-1a's prime.
const FNV_PRIME: u32 = 16_777_619;
/// Each lane's starting value.
const CHECKSUM_BASE_OFFSETS: [u32; N_SUMS] = [
    0x5B1F36E9, 0xB8525960, 0x02AB50AA, 0x1DE66D2A, 0x79FF467A, 0x9BB9F8A3, 0x217E7CD2, 0x83E13D2C,
    0xF8D4474F, 0xE39EB970, 0x42C6AE16, 0x993216FA, 0x7B093B5D, 0x98DAFF3C, 0xF718902A, 0x0B1C9CDB,
    0xE58F764B, 0x187636BC, 0x5D7B3BB1, 0xE73DE7DE, 0x92BEC979, 0xCCA6C0B2, 0x304A0979, 0x85AA43D4,
    0x783125BB, 0x6CA8EAA2, 0xE407EAC6, 0x4B5CFC3E, 0x9FBF8C76, 0x15CA20BE, 0xF2CA9FD3, 0x959BD756,
];
/// Offset of `pd_checksum` in the page header.
const PD_CHECKSUM: usize = 8;
/// Offset of `pd_upper`.
const PD_UPPER: usize = 14;
/// `SizeOfPageHeaderData`.
pub const SIZE_OF_PAGE_HEADER: usize = 24;

fn comp(sum: u32, value: u32) -> u32 {
    let tmp = sum ^ value;
    tmp.wrapping_mul(FNV_PRIME) ^ (tmp >> 17)
}

/// `pg_checksum_page(page, blkno)`: the checksum the page should carry as block `blkno` of its
/// relation (counted from the start of the relation, not of the 1 GB segment file). `page` is one
/// whole block (a multiple of 128 bytes).
pub fn checksum(page: &[u8], blkno: u32) -> u16 {
    let mut sums = CHECKSUM_BASE_OFFSETS;
    for (row, words) in page.chunks_exact(4 * N_SUMS).enumerate() {
        for (lane, sum) in sums.iter_mut().enumerate() {
            let at = lane * 4;
            let mut w = u32_at(words, at);
            if row == 0 && at == PD_CHECKSUM {
                w &= 0xFFFF_0000; // pd_checksum (the low half, little-endian) counts as zero
            }
            *sum = comp(*sum, w);
        }
    }
    for _ in 0..2 {
        for sum in sums.iter_mut() {
            *sum = comp(*sum, 0);
        }
    }
    let folded = sums.iter().fold(0u32, |acc, s| acc ^ s) ^ blkno;
    (folded % 65_535 + 1) as u16
}

/// `pd_checksum`.
pub fn stored_checksum(page: &[u8]) -> u16 {
    u16_at(page, PD_CHECKSUM)
}

/// `pd_lsn`: the end of the last WAL record that changed the page.
pub fn page_lsn(page: &[u8]) -> Lsn {
    Lsn((u64::from(u32_at(page, 0)) << 32) | u64::from(u32_at(page, 4)))
}

/// `PageIsNew()`: a page never initialized (`pd_upper == 0`; PostgreSQL accepts it only when all
/// zeros) carries no checksum.
pub fn is_new(page: &[u8]) -> bool {
    u16_at(page, PD_UPPER) == 0
}

/// Whether a page read by a backup that started at `start` is sound as far as its checksum can
/// tell: new pages and pages changed since `start` (which recovery rewrites from WAL: they may be
/// caught half-written) are not judged.
pub fn verifies(page: &[u8], blkno: u32, start: Lsn) -> bool {
    if is_new(page) {
        return page.iter().all(|&b| b == 0);
    }
    page_lsn(page) >= start || checksum(page, blkno) == stored_checksum(page)
}

/// `DEFAULTTABLESPACE_OID`: `base/`.
pub const DEFAULTTABLESPACE_OID: u32 = 1663;
/// `GLOBALTABLESPACE_OID`: `global/`.
pub const GLOBALTABLESPACE_OID: u32 = 1664;

/// A relation data file named by its path in the data directory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RelationFile {
    /// Its relation fork.
    pub rel: super::blockref::RelFork,
    /// Its 1 GB segment number (`.N`; 0 for the first).
    pub segno: u32,
}

/// The relation fork and segment a data-directory path names
/// (`base/<db>/<relfilenode>[_fork][.<segno>]`, `global/…`, `pg_tblspc/<oid>/<version>/<db>/…`);
/// `None` for anything else (maps, `PG_VERSION`, temporary relations, other directories' files).
pub fn relation_file(path: &str) -> Option<RelationFile> {
    let parts: Vec<&str> = path.split('/').collect();
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    let number = |s: &str| s.parse::<u32>().ok();
    let (spc, db, file) = match parts.as_slice() {
        ["base", db, file] if digits(db) => (DEFAULTTABLESPACE_OID, number(db)?, *file),
        ["global", file] => (GLOBALTABLESPACE_OID, 0, *file),
        ["pg_tblspc", spc, version, db, file]
            if digits(spc) && version.starts_with("PG_") && digits(db) =>
        {
            (number(spc)?, number(db)?, *file)
        }
        _ => return None,
    };
    let (stem, segno) = match file.split_once('.') {
        Some((stem, n)) if digits(n) => (stem, number(n)?),
        Some(_) => return None,
        None => (file, 0),
    };
    use super::blockref::{FSM_FORKNUM, INIT_FORKNUM, MAIN_FORKNUM, VISIBILITYMAP_FORKNUM};
    let (node, fork) = [
        ("_fsm", FSM_FORKNUM),
        ("_vm", VISIBILITYMAP_FORKNUM),
        ("_init", INIT_FORKNUM),
    ]
    .iter()
    .find_map(|(suffix, fork)| Some((stem.strip_suffix(suffix)?, *fork)))
    .unwrap_or((stem, MAIN_FORKNUM));
    if !digits(node) {
        return None;
    }
    Some(RelationFile {
        rel: super::blockref::RelFork {
            spc,
            db,
            rel: number(node)?,
            fork,
        },
        segno,
    })
}

/// The segment number of a relation data file (see [`relation_file`]).
pub fn relation_file_segno(path: &str) -> Option<u32> {
    relation_file(path).map(|f| f.segno)
}

#[cfg(test)]
#[allow(clippy::indexing_slicing)] // tests index fixtures they built
mod tests {
    use super::*;

    /// A page with a header, some tuples' worth of bytes, and its checksum set for `blkno`.
    fn page(blkno: u32, lsn: Lsn) -> Vec<u8> {
        let mut p = vec![0u8; 8192];
        p[0..4].copy_from_slice(&((lsn.0 >> 32) as u32).to_le_bytes());
        p[4..8].copy_from_slice(&(lsn.0 as u32).to_le_bytes());
        p[12..14].copy_from_slice(&40u16.to_le_bytes()); // pd_lower
        p[14..16].copy_from_slice(&8000u16.to_le_bytes()); // pd_upper
        for (i, b) in p.iter_mut().enumerate().skip(8000) {
            *b = (i * 7 % 251) as u8;
        }
        let c = checksum(&p, blkno);
        p[8..10].copy_from_slice(&c.to_le_bytes());
        p
    }

    #[test]
    fn checksums_catch_damage_and_moved_pages() {
        let start = Lsn(0x100_0000);
        let p = page(3, Lsn(0x50_0000));
        assert!(verifies(&p, 3, start));
        // The stored checksum does not feed its own computation.
        assert_eq!(checksum(&p, 3), stored_checksum(&p));
        // The same bytes as another block fail (a page written to the wrong place).
        assert!(!verifies(&p, 4, start));
        let mut bad = p.clone();
        bad[8100] ^= 0x01;
        assert!(!verifies(&bad, 3, start));
        // Changed since the backup started: recovery rewrites it, so it is not judged.
        let mut late = page(3, Lsn(0x200_0000));
        late[8100] ^= 0x01;
        assert!(verifies(&late, 3, start));
        // A new page counts only when all zeros.
        assert!(verifies(&vec![0u8; 8192], 9, start));
        let mut junk = vec![0u8; 8192];
        junk[100] = 1;
        assert!(!verifies(&junk, 9, start));
        // Never 0: PostgreSQL reserves it for "no checksum".
        assert!((0..2000).all(|b| checksum(&p, b) != 0));
    }

    #[test]
    fn relation_files_by_path() {
        for (path, want) in [
            ("base/5/16384", Some(0)),
            ("base/5/16384.3", Some(3)),
            ("base/5/16384_vm", Some(0)),
            ("base/5/16384_fsm.1", Some(1)),
            ("global/1262", Some(0)),
            ("pg_tblspc/16390/PG_18_202406281/5/16391.2", Some(2)),
            ("base/5/PG_VERSION", None),
            ("base/5/pg_filenode.map", None),
            ("base/5/t3_16384", None),
            ("base/5/16384.x", None),
            ("global/pg_control", None),
            ("pg_xact/0000", None),
            ("base/5/16384_other", None),
        ] {
            assert_eq!(relation_file_segno(path), want, "{path}");
        }
        let f = relation_file("pg_tblspc/16390/PG_18_202406281/5/16391_vm.2").unwrap();
        assert_eq!(
            (f.rel.spc, f.rel.db, f.rel.rel, f.rel.fork, f.segno),
            (16390, 5, 16391, 2, 2)
        );
        let g = relation_file("global/1262").unwrap();
        assert_eq!(
            (g.rel.spc, g.rel.db, g.rel.rel),
            (GLOBALTABLESPACE_OID, 0, 1262)
        );
    }
}
