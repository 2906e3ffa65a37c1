//! A WAL record decoder for one segment, fed a window at a time or whole (sans-IO: bytes in,
//! records out).
//!
//! Follows `XLogDecodeNextRecord()` / `XLogReaderValidatePageHeader()` / `ValidXLogRecord()` in
//! PostgreSQL's `src/backend/access/transam/xlogreader.c`:
//! * every page header is checked (magic of the segment's major, known flag bits, `xlp_pageaddr`
//!   equal to the page's LSN, timeline never decreasing);
//! * records start MAXALIGN(8)ed, are reassembled across pages (each continuation page must carry
//!   `XLP_FIRST_IS_CONTRECORD` and the exact remaining length), and their CRC-32C (body, then the
//!   first 20 header bytes) is verified before any field beyond the length is trusted;
//! * a record that began in the previous segment is skipped (its bytes are returned as a head
//!   fragment), and one that runs past the end of the segment is returned as a tail fragment, so the
//!   index can join the two and no record is lost or counted twice;
//! * `XLOG_SWITCH` ends the segment (the rest is zero-filled);
//! * a zero `xl_tot_len` ends the data (the unused rest of a `.partial` file).
//!
//! It never panics on arbitrary input: every read is bounds-checked, and errors carry the LSN.

use super::lsn::Lsn;
use super::segment::{SIZE_OF_LONG_PHD, XLP_ALL_FLAGS, XLP_LONG_HEADER};
use super::version::PgMajor;

/// `XLP_FIRST_IS_CONTRECORD`.
pub const XLP_FIRST_IS_CONTRECORD: u16 = 0x0001;
/// `SizeOfXLogShortPHD`.
pub const SIZE_OF_SHORT_PHD: usize = 24;
/// `SizeOfXLogRecord`.
pub const SIZE_OF_XLOG_RECORD: usize = 24;
/// `XLogRecordMaxSize`.
pub const MAX_RECORD_SIZE: u32 = 1020 * 1024 * 1024;
/// Records that span segments are kept as fragments only up to this size (commit, checkpoint and
/// restore-point records are far smaller; big spanning records are full-page images).
pub const MAX_FRAGMENT: usize = 64 * 1024;

/// A decoding failure, with the LSN where it happened.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{msg} at {lsn}")]
pub struct DecodeError {
    /// What is wrong.
    pub msg: String,
    /// Where.
    pub lsn: Lsn,
}

/// One complete, CRC-checked record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record<'a> {
    /// Start LSN (`ReadRecPtr`).
    pub lsn: Lsn,
    /// LSN just past the record's last byte (before alignment).
    pub end_lsn: Lsn,
    /// The record: 24-byte header then body. Borrowed from the segment when it lies on one page;
    /// reassembled when it crosses pages.
    pub bytes: std::borrow::Cow<'a, [u8]>,
}

impl Record<'_> {
    /// The record with its bytes owned.
    pub fn into_owned(self) -> Record<'static> {
        Record {
            lsn: self.lsn,
            end_lsn: self.end_lsn,
            bytes: std::borrow::Cow::Owned(self.bytes.into_owned()),
        }
    }
    /// `xl_xid`.
    pub fn xid(&self) -> u32 {
        le_u32(&self.bytes, 4)
    }
    /// `xl_prev`.
    pub fn prev(&self) -> Lsn {
        Lsn(le_u64(&self.bytes, 8))
    }
    /// `xl_info`.
    pub fn info(&self) -> u8 {
        u8_at(&self.bytes, 16)
    }
    /// `xl_rmid`.
    pub fn rmid(&self) -> u8 {
        u8_at(&self.bytes, 17)
    }
}

/// The start of a record that continues in the next segment.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TailFragment {
    /// The record's start LSN.
    pub lsn: Lsn,
    /// `xl_tot_len`.
    pub tot_len: u32,
    /// The record bytes in this segment (empty when the record exceeds `MAX_FRAGMENT`).
    #[serde(with = "hex_bytes")]
    pub bytes: Vec<u8>,
}

/// The end of a record that began in the previous segment.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct HeadFragment {
    /// `xlp_rem_len` of the segment's first page: bytes of the record in this segment.
    pub rem_len: u32,
    /// Those bytes (empty when longer than `MAX_FRAGMENT`).
    #[serde(with = "hex_bytes")]
    pub bytes: Vec<u8>,
}

mod hex_bytes {
    pub(super) fn serialize<S: serde::Serializer>(b: &[u8], s: S) -> Result<S::Ok, S::Error> {
        let mut out = String::with_capacity(b.len() * 2);
        for x in b {
            out.push_str(&format!("{x:02x}"));
        }
        s.serialize_str(&out)
    }
    pub(super) fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s: String = serde::Deserialize::deserialize(d)?;
        if !s.len().is_multiple_of(2) {
            return Err(serde::de::Error::custom("odd hex length"));
        }
        (0..s.len())
            .step_by(2)
            .map(|i| {
                u8::from_str_radix(s.get(i..i + 2).unwrap_or("zz"), 16)
                    .map_err(serde::de::Error::custom)
            })
            .collect()
    }
}

/// How decoding a segment ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum End {
    /// Reached the segment's end (possibly with a tail fragment).
    SegmentEnd,
    /// An `XLOG_SWITCH` record at this LSN; the rest of the segment is unused.
    Switch(Lsn),
    /// A zero-length record header: no more data (the unused part of a `.partial` file).
    NoMoreData(Lsn),
}

use super::le::u8_at;
pub(crate) use super::le::{u16_at as le_u16, u32_at as le_u32, u64_at as le_u64};

fn maxalign(x: u64) -> u64 {
    (x + 7) & !7
}

/// Decodes the records of one segment, fed in order a window at a time (or whole): it keeps only
/// the bytes from the next record on, so a reader of a 16 MiB segment holds a window and the record
/// in progress, not the segment.
#[derive(Debug)]
pub struct SegmentDecoder {
    /// Bytes `base .. base + buf.len()` of the segment: what was fed and may still be needed.
    buf: Vec<u8>,
    base: usize,
    /// The segment's length.
    total: usize,
    start: Lsn,
    page_size: usize,
    magic: u16,
    /// Offset of the next record inside the segment (`None` until the first page is read).
    pos: Option<usize>,
    /// Set once decoding has ended (the segment's end, or damage): nothing more is kept.
    finished: bool,
    last_tli: u32,
    prev_lsn: Option<Lsn>,
    /// Set once decoding stops at the segment end with an incomplete record.
    pub tail: Option<TailFragment>,
    /// The continuation bytes at the segment start, if it began inside a record.
    pub head: Option<HeadFragment>,
    /// How decoding ended, once it has.
    pub end: Option<End>,
}

/// What the decoder has next.
#[derive(Debug)]
pub enum Step<'a> {
    /// A complete, CRC-checked record.
    Record(Record<'a>),
    /// The next record needs bytes not fed yet.
    More,
    /// The segment is done (see `end`, `tail`).
    Done,
}

/// Why a read stopped short of a record.
enum Stop {
    Damage(DecodeError),
    /// Bytes inside the segment that were not fed yet.
    More,
}

impl From<DecodeError> for Stop {
    fn from(e: DecodeError) -> Self {
        Stop::Damage(e)
    }
}

/// Where a record's bytes are: in the fed buffer (on one page), or reassembled.
enum Body {
    At(usize, usize),
    Owned(Vec<u8>),
}

impl SegmentDecoder {
    /// A decoder for a segment of `len` bytes beginning at `start`, to be fed with
    /// [`feed`](Self::feed).
    ///
    /// # Errors
    /// `len` is not a whole number of pages of a valid size.
    pub fn streaming(
        len: usize,
        start: Lsn,
        page_size: u32,
        major: PgMajor,
    ) -> Result<Self, DecodeError> {
        if !page_size.is_power_of_two()
            || !(1024..=65536).contains(&page_size)
            || len == 0
            || !len.is_multiple_of(page_size as usize)
        {
            return Err(DecodeError {
                msg: format!("{len} bytes is not a whole number of {page_size}-byte WAL pages"),
                lsn: start,
            });
        }
        Ok(SegmentDecoder {
            buf: Vec::new(),
            base: 0,
            total: len,
            start,
            page_size: page_size as usize,
            magic: major.xlog_page_magic(),
            pos: None,
            finished: false,
            last_tli: 0,
            prev_lsn: None,
            tail: None,
            head: None,
            end: None,
        })
    }

    /// Start decoding `seg`, a whole segment beginning at `start`.
    ///
    /// # Errors
    /// The first page header is invalid, or the continuation at the start cannot be skipped.
    pub fn new(
        seg: &[u8],
        start: Lsn,
        page_size: u32,
        major: PgMajor,
    ) -> Result<Self, DecodeError> {
        let mut d = Self::streaming(seg.len(), start, page_size, major)?;
        d.feed(seg);
        match d.begin() {
            Ok(pos) => d.pos = Some(pos),
            Err(Stop::Damage(e)) => return Err(e),
            Err(Stop::More) => return Err(d.err(0, "the segment is shorter than it says")),
        }
        Ok(d)
    }

    /// Hand the decoder the next bytes of the segment (in order, right after the last ones fed).
    /// Bytes it no longer needs are let go first.
    pub fn feed(&mut self, chunk: &[u8]) {
        let fed = self.fed();
        let keep = if self.finished {
            usize::MAX
        } else {
            self.pos.unwrap_or(0)
        };
        if keep >= fed {
            // Nothing fed so far is needed.
            let skip = (keep - fed).min(chunk.len());
            self.buf.clear();
            self.buf
                .extend_from_slice(chunk.get(skip..).unwrap_or_default());
            self.base = fed + skip;
        } else {
            if keep > self.base {
                self.buf.drain(..keep - self.base);
                self.base = keep;
            }
            self.buf.extend_from_slice(chunk);
        }
    }

    /// How many bytes of the segment were fed.
    pub fn fed(&self) -> usize {
        self.base + self.buf.len()
    }

    /// Bytes `a..b` of the segment: an error (`msg`) past the segment's end, `More` past what was
    /// fed.
    fn bytes(&self, a: usize, b: usize, msg: &str) -> Result<&[u8], Stop> {
        if b > self.total || a > b {
            return Err(self.err(a, msg).into());
        }
        if b > self.fed() {
            return Err(Stop::More);
        }
        a.checked_sub(self.base)
            .and_then(|from| self.buf.get(from..b - self.base))
            .ok_or_else(|| self.err(a, "the decoder let go of bytes it needed").into())
    }

    /// Read the first page header and skip the record that began in the previous segment;
    /// returns where the first record starts.
    fn begin(&mut self) -> Result<usize, Stop> {
        let (info, rem_len) = self.page_header(0)?;
        let mut pos = SIZE_OF_LONG_PHD;
        if info & XLP_FIRST_IS_CONTRECORD != 0 && rem_len > 0 {
            // Skip (and keep, if small) the end of a record that began in the previous segment.
            let keep = rem_len as usize <= MAX_FRAGMENT;
            let mut bytes = Vec::new();
            let mut remaining = rem_len as usize;
            let mut page = 0usize;
            loop {
                let here = remaining.min(self.page_size - (pos - page));
                let chunk = self.bytes(pos, pos + here, "continuation runs past the segment")?;
                if keep {
                    bytes.extend_from_slice(chunk);
                }
                remaining -= here;
                pos += here;
                if remaining == 0 {
                    break;
                }
                page += self.page_size;
                if page >= self.total {
                    return Err(self
                        .err(page, "continuation record runs past the end of the segment")
                        .into());
                }
                let (info, rem) = self.page_header(page)?;
                if info & XLP_FIRST_IS_CONTRECORD == 0 || rem as usize != remaining {
                    return Err(self
                        .err(
                            page,
                            &format!(
                                "continuation page says {rem} bytes remain, expected {remaining}"
                            ),
                        )
                        .into());
                }
                pos = page + SIZE_OF_SHORT_PHD;
            }
            self.head = Some(HeadFragment { rem_len, bytes });
            pos = maxalign(pos as u64) as usize;
        }
        Ok(pos)
    }

    fn lsn_at(&self, off: usize) -> Lsn {
        Lsn(self.start.0 + off as u64)
    }

    fn err(&self, off: usize, msg: &str) -> DecodeError {
        DecodeError {
            msg: msg.to_string(),
            lsn: self.lsn_at(off),
        }
    }

    /// Validate the page header at `off` (a page boundary); returns (info, rem_len).
    fn page_header(&mut self, off: usize) -> Result<(u16, u32), Stop> {
        let long = off == 0;
        let size = if long {
            SIZE_OF_LONG_PHD
        } else {
            SIZE_OF_SHORT_PHD
        };
        let h = self.bytes(off, off + size, "page header runs past the segment")?;
        let (magic, info, tli, addr, rem) = (
            le_u16(h, 0),
            le_u16(h, 2),
            le_u32(h, 4),
            Lsn(le_u64(h, 8)),
            le_u32(h, 16),
        );
        if magic != self.magic {
            return Err(self
                .err(off, &format!("invalid page magic 0x{magic:04X}"))
                .into());
        }
        if info & !XLP_ALL_FLAGS != 0 || (info & XLP_LONG_HEADER != 0) != long {
            return Err(self
                .err(off, &format!("invalid page info flags 0x{info:04X}"))
                .into());
        }
        if tli < self.last_tli {
            return Err(self
                .err(
                    off,
                    &format!(
                        "page timeline {tli} is older than the previous page's {}",
                        self.last_tli
                    ),
                )
                .into());
        }
        self.last_tli = tli;
        if addr != self.lsn_at(off) {
            return Err(self
                .err(
                    off,
                    &format!("page address {addr} does not match its position"),
                )
                .into());
        }
        Ok((info, rem))
    }

    /// The next record, `Ok(None)` when the segment is done (see `end`, `tail`). For a decoder
    /// made with [`new`](Self::new), which holds the whole segment.
    ///
    /// # Errors
    /// A `DecodeError` with the LSN of the damage; the decoder then stops.
    pub fn next_record(&mut self) -> Result<Option<Record<'_>>, DecodeError> {
        let short = self.err(self.pos.unwrap_or(0), "the segment is shorter than it says");
        match self.step()? {
            Step::Record(r) => Ok(Some(r)),
            Step::Done => Ok(None),
            Step::More => Err(short),
        }
    }

    /// The next record, or `More` when it needs bytes not fed yet (feed them and ask again), or
    /// `Done`.
    ///
    /// # Errors
    /// A `DecodeError` with the LSN of the damage; the decoder then stops.
    pub fn step(&mut self) -> Result<Step<'_>, DecodeError> {
        if self.finished {
            return Ok(Step::Done);
        }
        // A read cut short for bytes not fed yet is done again from the start: undo what it
        // changed.
        let tli = self.last_tli;
        let pos = match self.pos {
            Some(pos) => pos,
            None => match self.begin() {
                Ok(pos) => {
                    self.pos = Some(pos);
                    pos
                }
                Err(stop) => return self.stopped(stop, tli),
            },
        };
        let mut at = pos;
        let (lsn, end, body) = match self.read_record(&mut at) {
            Ok(Some(found)) => found,
            Ok(None) => {
                self.finished = true;
                return Ok(Step::Done);
            }
            Err(stop) => return self.stopped(stop, tli),
        };
        let end_lsn = self.lsn_at(end);
        let bytes = match body {
            Body::At(a, b) => std::borrow::Cow::Borrowed(
                a.checked_sub(self.base)
                    .and_then(|from| self.buf.get(from..b - self.base))
                    .unwrap_or_default(),
            ),
            Body::Owned(v) => std::borrow::Cow::Owned(v),
        };
        let record = Record {
            lsn,
            end_lsn,
            bytes,
        };
        if let Err(e) = verify_record(&record, self.prev_lsn) {
            self.finished = true;
            return Err(e);
        }
        self.prev_lsn = Some(lsn);
        let mut next = maxalign(end as u64) as usize;
        if record.rmid() == RM_XLOG_ID && record.info() & !XLR_INFO_MASK == XLOG_SWITCH {
            self.end = Some(End::Switch(lsn));
            next = self.total;
        }
        self.pos = Some(next);
        Ok(Step::Record(record))
    }

    fn stopped(&mut self, stop: Stop, tli: u32) -> Result<Step<'_>, DecodeError> {
        match stop {
            Stop::More => {
                self.last_tli = tli;
                Ok(Step::More)
            }
            Stop::Damage(e) => {
                self.finished = true;
                Err(e)
            }
        }
    }

    /// The record at `*pos`: its LSN, the offset just past it, and its bytes; `None` when the
    /// segment is done.
    fn read_record(&mut self, pos: &mut usize) -> Result<Option<(Lsn, usize, Body)>, Stop> {
        let ps = self.page_size;
        if *pos >= self.total {
            // Keep `Switch` if that is what ended the segment.
            self.end.get_or_insert(End::SegmentEnd);
            return Ok(None);
        }
        if (*pos).is_multiple_of(ps) {
            let (info, _) = self.page_header(*pos)?;
            if info & XLP_FIRST_IS_CONTRECORD != 0 {
                return Err(self
                    .err(
                        *pos,
                        "unexpected continuation page where a record should start",
                    )
                    .into());
            }
            *pos += SIZE_OF_SHORT_PHD;
        }
        let rec_off = *pos;
        let lsn = self.lsn_at(rec_off);
        // MAXALIGN leaves >= 8 bytes on the page.
        let tot_len = le_u32(
            self.bytes(rec_off, rec_off + 4, "record runs past the end of the file")?,
            0,
        );
        if tot_len == 0 {
            self.end = Some(End::NoMoreData(lsn));
            return Ok(None);
        }
        if (tot_len as usize) < SIZE_OF_XLOG_RECORD || tot_len > MAX_RECORD_SIZE {
            return Err(self
                .err(rec_off, &format!("invalid record length {tot_len}"))
                .into());
        }
        let total = tot_len as usize;
        if rec_off % ps + total <= ps {
            // On one page (most records): no copy.
            self.bytes(
                rec_off,
                rec_off + total,
                "record runs past the end of the file",
            )?;
            return Ok(Some((
                lsn,
                rec_off + total,
                Body::At(rec_off, rec_off + total),
            )));
        }
        let keep_all = total <= MAX_FRAGMENT;
        let mut bytes = Vec::with_capacity(total.min(MAX_FRAGMENT));
        let mut got = 0usize;
        let mut off = rec_off;
        loop {
            let page_start = off - off % ps;
            let here = (total - got).min(page_start + ps - off);
            let piece = self.bytes(off, off + here, "record runs past the end of the file")?;
            bytes.extend_from_slice(piece);
            got += here;
            off += here;
            if got == total {
                break;
            }
            // Continue on the next page, if this segment has one.
            if off >= self.total {
                let kept = if keep_all { bytes } else { Vec::new() };
                self.tail = Some(TailFragment {
                    lsn,
                    tot_len,
                    bytes: kept,
                });
                self.end = Some(End::SegmentEnd);
                return Ok(None);
            }
            let (info, rem) = self.page_header(off)?;
            if info & XLP_FIRST_IS_CONTRECORD == 0 || rem as usize != total - got {
                return Err(self.err(off, &format!("record at {lsn} continues with a page that says {rem} bytes remain, expected {}", total - got)).into());
            }
            off += SIZE_OF_SHORT_PHD;
        }
        Ok(Some((lsn, off, Body::Owned(bytes))))
    }

    /// The LSN of the segment's first byte.
    pub fn start(&self) -> Lsn {
        self.start
    }
}

/// `RM_XLOG_ID`.
pub const RM_XLOG_ID: u8 = 0;
/// `RM_XACT_ID`.
pub const RM_XACT_ID: u8 = 1;
/// `XLOG_SWITCH`.
pub const XLOG_SWITCH: u8 = 0x40;
/// `XLR_INFO_MASK`: the low bits of `xl_info` belong to the WAL machinery, the high ones to the
/// resource manager.
pub const XLR_INFO_MASK: u8 = 0x0F;
/// `RM_MAX_BUILTIN_ID` (`RM_LOGICALMSG_ID`, the last built-in resource manager in 13–18).
pub const RM_MAX_BUILTIN_ID: u8 = 21;
/// `RM_MIN_CUSTOM_ID`: ids from here to 255 belong to extensions.
pub const RM_MIN_CUSTOM_ID: u8 = 128;

/// Check a reassembled record's header and CRC (`ValidXLogRecordHeader`, `ValidXLogRecord`).
///
/// # Errors
/// Length, resource manager, `xl_prev` or CRC problems.
pub fn verify_record(r: &Record, expected_prev: Option<Lsn>) -> Result<(), DecodeError> {
    let err = |msg: String| DecodeError { msg, lsn: r.lsn };
    if r.bytes.len() < SIZE_OF_XLOG_RECORD || le_u32(&r.bytes, 0) as usize != r.bytes.len() {
        return Err(err(format!(
            "record length {} does not match its header",
            r.bytes.len()
        )));
    }
    // RmgrIdIsValid(): built in, or an extension's custom id.
    if r.rmid() > RM_MAX_BUILTIN_ID && r.rmid() < RM_MIN_CUSTOM_ID {
        return Err(err(format!("invalid resource manager id {}", r.rmid())));
    }
    if let Some(prev) = expected_prev
        && r.prev() != prev
    {
        return Err(err(format!(
            "record points back to {}, expected {prev}",
            r.prev()
        )));
    }
    let (Some(data), Some(head)) = (r.bytes.get(SIZE_OF_XLOG_RECORD..), r.bytes.get(..20)) else {
        return Err(err("record shorter than its header".to_string()));
    };
    let crc = crc32c::crc32c_append(crc32c::crc32c(data), head);
    if crc != le_u32(&r.bytes, 20) {
        return Err(err("incorrect record checksum".to_string()));
    }
    Ok(())
}

/// Join a tail fragment of segment N with the head fragment of segment N+1 into a verified record.
/// `None` when either side was too large to keep or the bytes do not form a valid record.
pub fn join_fragments(tail: &TailFragment, head: &HeadFragment) -> Option<Record<'static>> {
    let total = tail.tot_len as usize;
    if tail.bytes.is_empty()
        || head.bytes.len() != head.rem_len as usize
        || tail.bytes.len() + head.bytes.len() != total
    {
        return None;
    }
    let mut bytes = tail.bytes.clone();
    bytes.extend_from_slice(&head.bytes);
    let r = Record {
        lsn: tail.lsn,
        end_lsn: Lsn(0),
        bytes: std::borrow::Cow::Owned(bytes),
    };
    verify_record(&r, None).ok().map(|()| r)
}

#[cfg(test)]
#[allow(clippy::indexing_slicing)] // tests index fixtures they built
mod tests {
    use super::*;
    use crate::pg::walbuilder::WalBuilder;
    use crate::pg::xlogrecord::{Event, event};

    const MIB: usize = 1 << 20;

    fn decode_all(
        seg: &[u8],
        start: u64,
    ) -> (Vec<Record<'static>>, SegmentDecoder, Option<DecodeError>) {
        let mut d = SegmentDecoder::new(seg, Lsn(start), 8192, PgMajor::V15).unwrap();
        let mut v = Vec::new();
        let err = loop {
            match d.next_record() {
                Ok(Some(r)) => v.push(r.into_owned()),
                Ok(None) => break None,
                Err(e) => break Some(e),
            }
        };
        (v, d, err)
    }

    /// Decode `seg` fed `window` bytes at a time; also returns the most bytes the decoder held.
    fn decode_windowed(
        seg: &[u8],
        start: u64,
        window: usize,
    ) -> (
        Vec<Record<'static>>,
        SegmentDecoder,
        Option<DecodeError>,
        usize,
    ) {
        let mut d = SegmentDecoder::streaming(seg.len(), Lsn(start), 8192, PgMajor::V15).unwrap();
        let (mut v, mut held, mut chunks) = (Vec::new(), 0, seg.chunks(window));
        let err = loop {
            match d.step() {
                Ok(Step::Record(r)) => v.push(r.into_owned()),
                Ok(Step::Done) => break None,
                Ok(Step::More) => match chunks.next() {
                    Some(c) => {
                        d.feed(c);
                        held = held.max(d.buf.len());
                    }
                    None => panic!("asked for more than the segment"),
                },
                Err(e) => break Some(e),
            }
        };
        (v, d, err, held)
    }

    #[test]
    fn a_segment_fed_in_windows_decodes_as_it_does_whole() {
        let (seg, _) = sample();
        let mut b = WalBuilder::new(0, MIB, PgMajor::V15);
        while b.buf.len() < MIB - 5000 {
            b.filler(3000);
        }
        b.filler(30_000);
        b.commit(1000, 43);
        let two = b.finish();
        let (s1, s2) = two.split_at(MIB);
        let mut damaged = seg.clone();
        damaged[5 * 8192 + 100] ^= 0x10;
        for (bytes, start) in [
            (&seg[..], 3 * MIB as u64),
            (s1, 0),
            (s2, MIB as u64),
            (&damaged[..], 3 * MIB as u64),
        ] {
            let (whole, dw, ew) = decode_all(bytes, start);
            for window in [8192, 8192 * 3, 100_000, 333_333, MIB] {
                let (parts, dp, ep, held) = decode_windowed(bytes, start, window);
                assert_eq!(parts, whole, "window {window}");
                assert_eq!(
                    (&dp.head, &dp.tail, &dp.end, &ep),
                    (&dw.head, &dw.tail, &dw.end, &ew),
                    "window {window}"
                );
                // A window, and the record in progress (the 20 kB and 30 kB ones here).
                assert!(held <= window + 40_000, "window {window} held {held}");
            }
        }
    }

    fn sample() -> (Vec<u8>, Vec<u64>) {
        let mut b = WalBuilder::new(3 * MIB as u64, MIB, PgMajor::V15);
        let mut lsns = vec![b.commit(700, 1_000_000)];
        lsns.push(b.filler(20_000)); // spans three pages
        lsns.push(b.restore_point("before_migration", 2_000_000));
        for i in 0..50 {
            lsns.push(b.filler(300 + i * 7));
            lsns.push(b.commit(701 + i as u32, 3_000_000 + i as i64));
        }
        lsns.push(b.switch());
        (b.finish(), lsns)
    }

    #[test]
    fn decodes_records_and_events() {
        let (seg, lsns) = sample();
        assert_eq!(seg.len(), MIB);
        let (records, d, err) = decode_all(&seg, 3 * MIB as u64);
        assert_eq!(err, None);
        assert_eq!(records.iter().map(|r| r.lsn.0).collect::<Vec<_>>(), lsns);
        assert_eq!(d.end, Some(End::Switch(Lsn(*lsns.last().unwrap()))));
        let events: Vec<Event> = records
            .iter()
            .filter_map(|r| event(r, PgMajor::V15).unwrap())
            .collect();
        assert_eq!(events.len(), 1 + 1 + 50 + 1);
        assert!(
            matches!(&events[1], Event::RestorePoint { name, .. } if name == "before_migration")
        );
        assert!(matches!(events[2], Event::Xact { xid: 701, .. }));
    }

    #[test]
    fn records_spanning_segments_join() {
        let mut b = WalBuilder::new(0, MIB, PgMajor::V15);
        let mut lsns = Vec::new();
        while b.buf.len() < MIB - 5000 {
            lsns.push(b.filler(3000));
        }
        let spanning = b.commit(999, 42); // small record: may or may not span
        let big = b.filler(30_000); // certainly spans into segment 2
        let after = b.commit(1000, 43);
        let all = b.finish();
        let (s1, s2) = all.split_at(MIB);
        let (r1, d1, e1) = decode_all(s1, 0);
        let (r2, d2, e2) = decode_all(s2, MIB as u64);
        assert_eq!((e1, e2), (None, None));
        let tail = d1.tail.clone().expect("the 30 kB record continues");
        assert_eq!(tail.lsn.0, big);
        let head = d2.head.clone().expect("segment 2 starts inside it");
        let joined = join_fragments(&tail, &head).expect("joins with a valid CRC");
        assert_eq!(joined.lsn.0, big);
        // Each record exactly once: segment 1's, the joined one, segment 2's.
        let mut seen: Vec<u64> = r1
            .iter()
            .chain(std::iter::once(&joined))
            .chain(&r2)
            .map(|r| r.lsn.0)
            .collect();
        seen.sort();
        let mut want = lsns;
        want.extend([spanning, big, after]);
        assert_eq!(seen, want);
        // A damaged fragment does not join.
        let mut bad = head.clone();
        bad.bytes[10] ^= 1;
        assert!(join_fragments(&tail, &bad).is_none());
    }

    #[test]
    fn corruption_is_reported_with_the_lsn() {
        let (seg, lsns) = sample();
        let start = 3 * MIB as u64;
        let first_error = |bytes: &[u8]| decode_all(bytes, start).2;

        // A flipped byte in a record body: CRC failure at that record.
        let mut b = seg.clone();
        let off = (lsns[4] - start) as usize + 30;
        b[off] ^= 0x01;
        let e = first_error(&b).expect("bad CRC found");
        assert_eq!(
            (e.lsn.0, e.msg.as_str()),
            (lsns[4], "incorrect record checksum")
        );

        // Bad magic on page 2, bad page address on page 3.
        let mut b = seg.clone();
        b[8192] ^= 0xFF;
        let e = first_error(&b).unwrap();
        assert_eq!(e.lsn.0, start + 8192);
        assert!(e.msg.contains("magic"), "{e}");
        let mut b = seg.clone();
        b[2 * 8192 + 9] ^= 0x01;
        let e = first_error(&b).unwrap();
        assert_eq!(e.lsn.0, start + 2 * 8192);
        assert!(e.msg.contains("page address"), "{e}");

        // A continuation page with the wrong remaining length (the 20 kB record spans pages 1-3).
        let mut b = seg.clone();
        b[8192 + 16] ^= 0x04;
        assert!(first_error(&b).unwrap().msg.contains("remain"));

        // Truncated record: an impossible length.
        let mut b = seg.clone();
        let off = (lsns[2] - start) as usize;
        b[off..off + 4].copy_from_slice(&10u32.to_le_bytes());
        let e = first_error(&b).unwrap();
        assert_eq!(e.lsn.0, lsns[2]);
        assert!(e.msg.contains("invalid record length"));

        // A broken xl_prev chain.
        let mut b = seg.clone();
        let off = (lsns[5] - start) as usize + 8;
        b[off] ^= 0x08;
        assert_eq!(first_error(&b).unwrap().lsn.0, lsns[5]);

        // The first page itself is checked by `new`.
        let mut b = seg.clone();
        b[0] = 0;
        assert!(SegmentDecoder::new(&b, Lsn(start), 8192, PgMajor::V15).is_err());
        assert!(
            SegmentDecoder::new(&seg, Lsn(start), 8192, PgMajor::V18).is_err(),
            "wrong major's magic"
        );
    }

    #[test]
    fn partial_pages_are_refused_not_indexed_past() {
        let (seg, _) = sample();
        for len in [0, 1, 8191, 8193, 3 * 8192 + 7] {
            assert!(
                SegmentDecoder::new(&seg[..len], Lsn(3 * MIB as u64), 8192, PgMajor::V15).is_err(),
                "{len}"
            );
        }
        assert!(SegmentDecoder::new(&seg, Lsn(3 * MIB as u64), 1000, PgMajor::V15).is_err());
    }

    mod fuzz {
        use super::*;
        use proptest::prelude::*;

        fn run(bytes: &[u8], start: u64) {
            let size = crate::pg::WalSegSize::new(MIB as u32).unwrap();
            let name = crate::pg::SegmentName::new(
                crate::pg::TimelineId::ONE,
                crate::pg::SegNo(start / MIB as u64),
                size,
            )
            .unwrap();
            for major in [PgMajor::V13, PgMajor::V15, PgMajor::V18] {
                let s = crate::index::summarize(bytes, name, size, 8192, major);
                let whole = serde_json::to_string(&s).unwrap();
                // Fed a window at a time (not page-aligned), the summary is the same.
                let mut w = crate::index::Summarizer::new(name, size, 8192, major, bytes.len());
                for window in bytes.chunks(150_001) {
                    w.feed(window);
                }
                assert_eq!(serde_json::to_string(&w.finish()).unwrap(), whole);
            }
        }

        proptest! {
            #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

            #[test]
            fn mutated_segments_never_panic(edits in proptest::collection::vec((0usize..(1 << 20), any::<u8>()), 1..40)) {
                let (mut seg, _) = sample();
                for (pos, val) in edits {
                    seg[pos] = val;
                }
                run(&seg, 3 * MIB as u64);
            }

            #[test]
            fn random_bytes_never_panic(mut head in proptest::collection::vec(any::<u8>(), 0..20_000), magic_ok: bool) {
                if magic_ok && head.len() >= 40 {
                    head[0..2].copy_from_slice(&PgMajor::V15.xlog_page_magic().to_le_bytes());
                    head[2] = 0x02;
                    head[8..16].copy_from_slice(&(3u64 << 20).to_le_bytes());
                }
                head.resize(MIB, 0);
                run(&head, 3 * MIB as u64);
            }
        }
    }
}
