//! The blocks a range of WAL changed, per relation fork: modified block numbers plus a limit block
//! (the shortest length the fork had in the range), as PostgreSQL's block reference table keeps
//! them (`blkreftable.c`). Each segment summary holds one for its records; the tables of
//! consecutive segments fold together in WAL order ([`BlockChanges::then`]).
//!
//! Rules, as in `BlockRefTableSetLimitBlock` / `BlockRefTableMarkBlockModified`: a limit only ever
//! lowers, and lowering it forgets the modified blocks at or past it (they are covered by the
//! limit: the fork was cut there, so whatever follows was written anew). A block modified after a
//! limit is recorded again.
//!
//! Stored compactly: one entry per fork, `[spc, db, rel, fork]`, the limit (or none), and the
//! modified blocks as runs in one string of hex gaps (see [`ranges`]).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::pg::blockref::{Change, RelFork};

/// What a fork's WAL did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ForkChanges {
    /// The shortest length (in blocks) the fork had; `None` if it was never created, truncated
    /// or dropped in the range.
    pub limit: Option<u32>,
    /// Modified blocks, sorted and unique once [`BlockChanges::finish`] ran.
    pub blocks: Vec<u32>,
}

/// The changed blocks of a range of WAL.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BlockChanges {
    forks: BTreeMap<RelFork, ForkChanges>,
}

impl BlockChanges {
    /// Apply one change, in WAL order.
    pub fn apply(&mut self, c: Change) {
        match c {
            Change::Modified(rel, block) => self.forks.entry(rel).or_default().blocks.push(block),
            Change::Limit(rel, limit) => {
                let f = self.forks.entry(rel).or_default();
                if f.limit.is_none_or(|l| limit < l) {
                    f.limit = Some(limit);
                    f.blocks.retain(|&b| b < limit);
                }
            }
        }
    }

    /// Sort and deduplicate the block lists (after the last `apply`).
    pub fn finish(&mut self) {
        for f in self.forks.values_mut() {
            f.blocks.sort_unstable();
            f.blocks.dedup();
        }
    }

    /// These changes followed by `later`'s (the next range of WAL).
    pub fn then(&mut self, later: &BlockChanges) {
        for (rel, l) in &later.forks {
            let f = self.forks.entry(*rel).or_default();
            if let Some(limit) = l.limit {
                if f.limit.is_none_or(|x| limit < x) {
                    f.limit = Some(limit);
                }
                f.blocks.retain(|&b| b < limit);
            }
            f.blocks.extend_from_slice(&l.blocks);
            f.blocks.sort_unstable();
            f.blocks.dedup();
        }
    }

    /// The forks changed, in order.
    pub fn forks(&self) -> impl Iterator<Item = (&RelFork, &ForkChanges)> {
        self.forks.iter()
    }

    /// What happened to one fork (`None`: nothing).
    pub fn fork(&self, rel: &RelFork) -> Option<&ForkChanges> {
        self.forks.get(rel)
    }

    /// How many modified blocks, over all forks.
    pub fn modified_blocks(&self) -> usize {
        self.forks.values().map(|f| f.blocks.len()).sum()
    }

    /// Whether nothing changed.
    pub fn is_empty(&self) -> bool {
        self.forks.is_empty()
    }
}

/// One fork as stored.
#[derive(Serialize, Deserialize)]
struct Stored {
    rel: [u32; 4],
    #[serde(default, skip_serializing_if = "Option::is_none")]
    limit: Option<u32>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    blocks: String,
}

/// The most blocks one stored entry may name (a 1 GiB segment of 8-byte records names fewer).
const MAX_BLOCKS: usize = 1 << 27;

/// Sorted unique blocks as runs, each `GAP` or `GAP+MORE` in hex: the run starts `GAP` blocks
/// after the block following the previous run (after block -1 for the first) and holds `MORE`
/// blocks after its first. Blocks 0-3, 17, 40-41 are `"0+3,d,16+1"`. Small numbers compress well:
/// a TPC-B segment's few thousand scattered blocks take about 5 KB stored.
pub(crate) fn ranges(blocks: &[u32]) -> String {
    let mut out = String::new();
    let mut next = 0u64; // the block after the previous run
    let mut i = 0;
    while let Some(&start) = blocks.get(i) {
        let mut end = start;
        while blocks
            .get(i + 1)
            .is_some_and(|&n| end.checked_add(1) == Some(n))
        {
            i += 1;
            end = blocks.get(i).copied().unwrap_or(end);
        }
        if !out.is_empty() {
            out.push(',');
        }
        out.push_str(&format!("{:x}", u64::from(start) - next));
        if end > start {
            out.push_str(&format!("+{:x}", end - start));
        }
        next = u64::from(end) + 1;
        i += 1;
    }
    out
}

pub(crate) fn parse_ranges(s: &str) -> Result<Vec<u32>, String> {
    let mut out = Vec::new();
    let mut next = 0u64;
    for part in s.split(',').filter(|p| !p.is_empty()) {
        let bad = || format!("block run {part:?} is not GAP or GAP+MORE in hex");
        let (gap, more) = part.split_once('+').unwrap_or((part, "0"));
        let hex = |t: &str| {
            (!t.is_empty() && t.len() <= 8 && t.bytes().all(|b| b.is_ascii_hexdigit()))
                .then(|| u64::from_str_radix(t, 16).ok())
                .flatten()
                .ok_or_else(bad)
        };
        let (gap, more) = (hex(gap)?, hex(more)?);
        let first = next + gap;
        let last = first + more;
        if last > u64::from(u32::MAX) {
            return Err(format!(
                "block run {part:?} goes past the last block number"
            ));
        }
        // More blocks than any segment's records can name: damage, not data.
        if out.len() as u64 + more >= MAX_BLOCKS as u64 {
            return Err(format!("block runs name more than {MAX_BLOCKS} blocks"));
        }
        out.extend((first as u32)..=(last as u32));
        next = last + 1;
    }
    Ok(out)
}

impl Serialize for BlockChanges {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.forks.iter().map(|(r, f)| Stored {
            rel: [r.spc, r.db, r.rel, u32::from(r.fork)],
            limit: f.limit,
            blocks: ranges(&f.blocks),
        }))
    }
}

impl<'de> Deserialize<'de> for BlockChanges {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let stored: Vec<Stored> = Deserialize::deserialize(d)?;
        let mut forks = BTreeMap::new();
        for e in stored {
            let [spc, db, rel, fork] = e.rel;
            let fork = u8::try_from(fork).map_err(serde::de::Error::custom)?;
            let blocks = parse_ranges(&e.blocks).map_err(serde::de::Error::custom)?;
            let rel = RelFork { spc, db, rel, fork };
            if forks
                .insert(
                    rel,
                    ForkChanges {
                        limit: e.limit,
                        blocks,
                    },
                )
                .is_some()
            {
                return Err(serde::de::Error::custom(format!(
                    "relation fork {rel:?} listed twice"
                )));
            }
        }
        Ok(BlockChanges { forks })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rel(r: u32) -> RelFork {
        RelFork {
            spc: 1663,
            db: 5,
            rel: r,
            fork: 0,
        }
    }

    #[test]
    fn limits_forget_what_they_cover_and_later_blocks_count_again() {
        let mut c = BlockChanges::default();
        for b in [9, 1, 5, 5, 2] {
            c.apply(Change::Modified(rel(1), b));
        }
        c.apply(Change::Limit(rel(1), 5));
        c.apply(Change::Modified(rel(1), 7));
        c.apply(Change::Limit(rel(1), 8)); // higher: no effect
        c.finish();
        let f = c.fork(&rel(1)).unwrap();
        assert_eq!((f.limit, f.blocks.as_slice()), (Some(5), &[1, 2, 7][..]));

        // Folding the next range in: its limit cuts what came before, its blocks add.
        let mut later = BlockChanges::default();
        later.apply(Change::Limit(rel(1), 2));
        later.apply(Change::Modified(rel(1), 3));
        later.apply(Change::Modified(rel(2), 0));
        later.finish();
        c.then(&later);
        let f = c.fork(&rel(1)).unwrap();
        assert_eq!((f.limit, f.blocks.as_slice()), (Some(2), &[1, 3][..]));
        assert_eq!(c.modified_blocks(), 3);
    }

    #[test]
    fn stored_as_ranges_and_read_back() {
        let mut c = BlockChanges::default();
        for b in [0, 1, 2, 3, 17, 40, 41, u32::MAX] {
            c.apply(Change::Modified(rel(1), b));
        }
        c.apply(Change::Limit(rel(2), 0));
        c.finish();
        let json = serde_json::to_string(&c).unwrap();
        assert_eq!(
            json,
            format!(
                r#"[{{"rel":[1663,5,1,0],"blocks":"0+3,d,16+1,{:x}"}},{{"rel":[1663,5,2,0],"limit":0}}]"#,
                u32::MAX - 42
            )
        );
        assert_eq!(serde_json::from_str::<BlockChanges>(&json).unwrap(), c);
        for bad in [
            r#"[{"rel":[1,2,3,0],"blocks":"5-3"}]"#,
            r#"[{"rel":[1,2,3,0],"blocks":"3+"}]"#,
            r#"[{"rel":[1,2,3,0],"blocks":"x"}]"#,
            r#"[{"rel":[1,2,3,0],"blocks":"ffffffff,1"}]"#,
            r#"[{"rel":[1,2,3,0],"blocks":"-1"}]"#,
            r#"[{"rel":[1,2,3,300]}]"#,
            r#"[{"rel":[1,2,3,0]},{"rel":[1,2,3,0]}]"#,
            r#"[{"rel":[1,2,3,0],"blocks":"0+ffffffff"}]"#,
        ] {
            assert!(serde_json::from_str::<BlockChanges>(bad).is_err(), "{bad}");
        }
    }
}
