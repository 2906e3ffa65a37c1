//! Timeline history files (`TTTTTTTT.history`): parsing and validation.
//!
//! Format from `writeTimeLineHistory()` / `readTimeLineHistory()` in
//! `src/backend/access/transam/timeline.c`: one line per ancestor, `parentTLI<TAB>switchpoint<TAB>reason`,
//! parent TLIs decimal and strictly increasing, switch points `X/X`; `#` comments and blank lines are
//! ignored (time and LSN reasons carry their own newline, so files often end with an empty line), and
//! fields after the second are free text.

use super::lsn::Lsn;
use super::walname::TimelineId;

/// One ancestor line: timeline `parent` ended at `switch_lsn`, where its child began.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HistoryEntry {
    /// The ancestor timeline.
    pub parent: TimelineId,
    /// The first LSN of the next timeline.
    pub switch_lsn: Lsn,
    /// The reason text PostgreSQL wrote (may be empty).
    pub reason: String,
}

/// A parsed history file of timeline `tli`: its ancestors, oldest first.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct History {
    /// The timeline this file describes.
    pub tli: TimelineId,
    /// Ancestor lines in file order (oldest first).
    pub entries: Vec<HistoryEntry>,
}

/// Why a history file is malformed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum HistoryError {
    /// Not UTF-8 text.
    #[error("history file is not text")]
    NotText,
    /// A line that is not `parentTLI<TAB>X/X…`.
    #[error("line {line}: {text:?} is not \"<parent timeline>\\t<switch LSN>\\t<reason>\"")]
    BadLine {
        /// 1-based line number.
        line: usize,
        /// The offending line.
        text: String,
    },
    /// Parent timelines must increase and stay below the file's own timeline.
    #[error(
        "line {line}: parent timeline {parent} is not newer than the previous line and older than {tli}"
    )]
    BadOrder {
        /// 1-based line number.
        line: usize,
        /// The parent on that line.
        parent: u32,
        /// The file's timeline.
        tli: TimelineId,
    },
    /// No ancestor line at all.
    #[error("history file has no timeline lines")]
    Empty,
}

impl History {
    /// Parse the history file of timeline `tli`.
    ///
    /// # Errors
    /// A [`HistoryError`] naming the line that is wrong.
    pub fn parse(tli: TimelineId, bytes: &[u8]) -> Result<History, HistoryError> {
        let text = std::str::from_utf8(bytes).map_err(|_| HistoryError::NotText)?;
        let mut entries: Vec<HistoryEntry> = Vec::new();
        for (i, raw) in text.split('\n').enumerate() {
            let line = i + 1;
            let trimmed = raw.trim_start();
            if trimmed.is_empty() || trimmed.starts_with('#') {
                continue;
            }
            let bad = || HistoryError::BadLine {
                line,
                text: raw.to_string(),
            };
            let mut fields = trimmed.splitn(3, '\t');
            let parent_txt = fields.next().ok_or_else(bad)?;
            let lsn_txt = fields.next().ok_or_else(bad)?;
            let reason = fields
                .next()
                .unwrap_or("")
                .trim_end_matches('\r')
                .to_string();
            if parent_txt.is_empty() || !parent_txt.bytes().all(|b| b.is_ascii_digit()) {
                return Err(bad());
            }
            let parent_num: u32 = parent_txt.parse().map_err(|_| bad())?;
            let switch_lsn: Lsn = lsn_txt.trim().parse().map_err(|_| bad())?;
            let order = || HistoryError::BadOrder {
                line,
                parent: parent_num,
                tli,
            };
            let parent = TimelineId::new(parent_num).ok_or_else(order)?;
            if parent >= tli || entries.last().is_some_and(|e| e.parent >= parent) {
                return Err(order());
            }
            entries.push(HistoryEntry {
                parent,
                switch_lsn,
                reason,
            });
        }
        if entries.is_empty() {
            return Err(HistoryError::Empty);
        }
        Ok(History { tli, entries })
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
    fn parses_the_formats_postgres_writes() {
        // The three PG 15 examples of pg-internals §1.2; the time reason ends with an empty line.
        let end = History::parse(tli(2), b"1\t0/8000000\tno recovery target specified\n").unwrap();
        assert_eq!(
            end.entries,
            vec![HistoryEntry {
                parent: tli(1),
                switch_lsn: Lsn(0x800_0000),
                reason: "no recovery target specified".into()
            }]
        );
        let time = History::parse(
            tli(2),
            b"1\t0/7015E10\tbefore 2026-11-21 10:13:04.91952+00\n\n",
        )
        .unwrap();
        assert_eq!(time.entries[0].switch_lsn, Lsn(0x701_5E10));
        let name = History::parse(tli(2), b"1\t0/7015F80\tat restore point \"after6\"\n").unwrap();
        assert_eq!(name.entries[0].reason, "at restore point \"after6\"");
        // A timeline 3 forked from 2: the parent's lines first; comments and blanks ignored.
        let three = History::parse(
            tli(3),
            b"# comment\n1\t0/7015E10\tbefore 2026-11-21 10:13:04.91952+00\n\n2\t0/9000000\tno recovery target specified\n",
        )
        .unwrap();
        assert_eq!(
            three
                .entries
                .iter()
                .map(|e| e.parent.get())
                .collect::<Vec<_>>(),
            vec![1, 2]
        );
        // PG 19 zero-pads LSNs.
        assert!(History::parse(tli(2), b"1\t0/08000000\tx\n").is_ok());
    }

    #[test]
    fn rejects_malformed_files() {
        assert_eq!(History::parse(tli(2), b""), Err(HistoryError::Empty));
        assert_eq!(History::parse(tli(2), b"\n\n"), Err(HistoryError::Empty));
        assert_eq!(
            History::parse(tli(2), &[0xff, 0xfe, 0x00]),
            Err(HistoryError::NotText)
        );
        for bad in [
            "1 0/8000000 x\n",
            "x\t0/8000000\n",
            "1\tnope\n",
            "-1\t0/1\n",
            "1\n",
        ] {
            assert!(
                matches!(
                    History::parse(tli(2), bad.as_bytes()),
                    Err(HistoryError::BadLine { .. })
                ),
                "{bad:?}"
            );
        }
        // Parent not older than the file's timeline, or not increasing, or zero.
        assert!(matches!(
            History::parse(tli(2), b"2\t0/1\tx\n"),
            Err(HistoryError::BadOrder { .. })
        ));
        assert!(matches!(
            History::parse(tli(4), b"2\t0/1\tx\n1\t0/2\ty\n"),
            Err(HistoryError::BadOrder { .. })
        ));
        assert!(matches!(
            History::parse(tli(4), b"0\t0/1\tx\n"),
            Err(HistoryError::BadOrder { .. })
        ));
    }
}
