//! Test support: writes synthetic but well-formed WAL (page headers, continuation pages, record
//! CRCs), so decoder tests can corrupt exactly the byte they mean to.

use super::version::PgMajor;

pub(crate) struct WalBuilder {
    pub(crate) seg_size: usize,
    pub(crate) page: usize,
    pub(crate) major: PgMajor,
    pub(crate) start: u64,
    pub(crate) buf: Vec<u8>,
    prev: u64,
}

impl WalBuilder {
    pub(crate) fn new(start: u64, seg_size: usize, major: PgMajor) -> WalBuilder {
        WalBuilder {
            seg_size,
            page: 8192,
            major,
            start,
            buf: Vec::new(),
            prev: 0,
        }
    }

    fn lsn(&self) -> u64 {
        self.start + self.buf.len() as u64
    }

    /// Write a page header if at a page boundary.
    fn page_header(&mut self, rem_len: u32) {
        if !self.buf.len().is_multiple_of(self.page) {
            return;
        }
        let long = self.lsn().is_multiple_of(self.seg_size as u64);
        let mut info: u16 = if rem_len > 0 { 0x0001 } else { 0 };
        if long {
            info |= 0x0002;
        }
        let addr = self.lsn();
        self.buf
            .extend_from_slice(&self.major.xlog_page_magic().to_le_bytes());
        self.buf.extend_from_slice(&info.to_le_bytes());
        self.buf.extend_from_slice(&1u32.to_le_bytes());
        self.buf.extend_from_slice(&addr.to_le_bytes());
        self.buf.extend_from_slice(&rem_len.to_le_bytes());
        self.buf.extend_from_slice(&[0; 4]);
        if long {
            self.buf.extend_from_slice(&42u64.to_le_bytes());
            self.buf
                .extend_from_slice(&(self.seg_size as u32).to_le_bytes());
            self.buf
                .extend_from_slice(&(self.page as u32).to_le_bytes());
        }
    }

    /// Append a record with `body` after the 24-byte header; returns its LSN.
    pub(crate) fn record(&mut self, rmid: u8, info: u8, xid: u32, body: &[u8]) -> u64 {
        while !self.buf.len().is_multiple_of(8) {
            self.buf.push(0);
        }
        self.page_header(0);
        let lsn = self.lsn();
        let tot = (24 + body.len()) as u32;
        let mut rec = Vec::with_capacity(tot as usize);
        rec.extend_from_slice(&tot.to_le_bytes());
        rec.extend_from_slice(&xid.to_le_bytes());
        rec.extend_from_slice(&self.prev.to_le_bytes());
        rec.push(info);
        rec.push(rmid);
        rec.extend_from_slice(&[0, 0]);
        let crc = crc32c::crc32c_append(crc32c::crc32c(body), &rec[..20]);
        rec.extend_from_slice(&crc.to_le_bytes());
        rec.extend_from_slice(body);
        let mut written = 0;
        while written < rec.len() {
            if written > 0 {
                self.page_header((rec.len() - written) as u32);
            }
            let room = self.page - self.buf.len() % self.page;
            let n = room.min(rec.len() - written);
            self.buf.extend_from_slice(&rec[written..written + n]);
            written += n;
        }
        self.prev = lsn;
        lsn
    }

    /// Main data only, with the short or long data header.
    pub(crate) fn main_data(data: &[u8]) -> Vec<u8> {
        let mut b = Vec::new();
        if data.len() < 256 {
            b.push(255);
            b.push(data.len() as u8);
        } else {
            b.push(254);
            b.extend_from_slice(&(data.len() as u32).to_le_bytes());
        }
        b.extend_from_slice(data);
        b
    }

    pub(crate) fn commit(&mut self, xid: u32, time: i64) -> u64 {
        self.record(1, 0x00, xid, &Self::main_data(&time.to_le_bytes()))
    }

    pub(crate) fn restore_point(&mut self, name: &str, time: i64) -> u64 {
        let mut d = time.to_le_bytes().to_vec();
        let mut n = [0u8; 64];
        n[..name.len()].copy_from_slice(name.as_bytes());
        d.extend_from_slice(&n);
        self.record(0, 0x70, 0, &Self::main_data(&d))
    }

    /// A filler record of about `len` bytes (a logical message, not indexed).
    pub(crate) fn filler(&mut self, len: usize) -> u64 {
        self.record(21, 0, 0, &Self::main_data(&vec![0xAB; len]))
    }

    pub(crate) fn switch(&mut self) -> u64 {
        self.record(0, 0x40, 0, &[])
    }

    /// Zero-fill to a whole number of segments and return the bytes.
    pub(crate) fn finish(mut self) -> Vec<u8> {
        let segs = self.buf.len().div_ceil(self.seg_size).max(1);
        self.buf.resize(segs * self.seg_size, 0);
        self.buf
    }
}
