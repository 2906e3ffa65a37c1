//! Large byte buffers that are cheap to fill.

/// A zeroed buffer for a WAL file or a backup piece (megabytes). Filling 16 MiB of fresh memory costs
/// a page fault per 4 KiB page, which measured as much as the copy itself; so the buffer starts on a
/// 2 MiB boundary and asks Linux for transparent huge pages (`madvise`, which is only advice: where huge pages are off it
/// changes nothing).
pub struct BigBuf {
    backing: Vec<u8>,
    start: usize,
    len: usize,
}

/// Linux's transparent huge page size on x86-64 and arm64.
const HUGE_PAGE: usize = 2 << 20;

impl BigBuf {
    /// `len` zero bytes.
    pub fn zeroed(len: usize) -> BigBuf {
        if len < HUGE_PAGE {
            return BigBuf {
                backing: vec![0u8; len],
                start: 0,
                len,
            };
        }
        // Large zeroed allocations are fresh mappings: the pages before `start` are never touched.
        let mut backing = vec![0u8; len + HUGE_PAGE];
        let start = backing.as_ptr().align_offset(HUGE_PAGE).min(HUGE_PAGE);
        let advised = len.next_multiple_of(HUGE_PAGE).min(backing.len() - start);
        // SAFETY: `start..start + advised` lies inside `backing`, which is alive and not otherwise
        // borrowed; MADV_HUGEPAGE changes how pages are backed, never their contents.
        unsafe {
            libc::madvise(
                backing.as_mut_ptr().add(start).cast(),
                advised,
                libc::MADV_HUGEPAGE,
            );
        }
        BigBuf {
            backing,
            start,
            len,
        }
    }

    /// Keep only the first `len` bytes.
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// The bytes, to fill.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.backing[self.start..self.start + self.len]
    }
}

impl std::ops::Deref for BigBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.backing[self.start..self.start + self.len]
    }
}

impl From<Vec<u8>> for BigBuf {
    fn from(bytes: Vec<u8>) -> BigBuf {
        BigBuf {
            len: bytes.len(),
            backing: bytes,
            start: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_big_buffer_is_zeroed_and_truncates() {
        let mut big = BigBuf::zeroed(5 << 20);
        big.as_mut_slice()[..3].copy_from_slice(b"abc");
        big.truncate(4);
        assert_eq!(&*big, b"abc\0");
    }
}
