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

/// A read-only view of a whole file, mapped from the page cache: no buffer to fault in and zero, no
/// copy. Only for files nobody truncates while they are read (a WAL segment being archived is
/// complete and PostgreSQL leaves it alone until the archiver is done with it): touching a page past
/// a concurrently shortened end raises SIGBUS, which stops the process before anything is stored.
pub struct Mapped {
    ptr: std::ptr::NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is read-only and owned by this value; sharing `&[u8]` views across threads is
// as safe as for any immutable slice.
unsafe impl Send for Mapped {}
// SAFETY: as above.
unsafe impl Sync for Mapped {}

impl Mapped {
    /// Map the first `len` bytes of `file` (which must be at least that long) and fault them in.
    ///
    /// # Errors
    /// `len` is zero, or the kernel refuses the mapping.
    pub fn file(file: &std::fs::File, len: usize) -> std::io::Result<Mapped> {
        use std::os::fd::AsRawFd;
        if len == 0 {
            return Err(std::io::Error::other("cannot map an empty file"));
        }
        // SAFETY: a fresh private read-only mapping of an open descriptor; the kernel picks the
        // address, and the result is checked before use.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_PRIVATE,
                file.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        let ptr = std::ptr::NonNull::new(ptr.cast::<u8>())
            .ok_or_else(|| std::io::Error::other("mmap returned a null address"))?;
        Ok(Mapped { ptr, len })
    }
}

impl std::ops::Deref for Mapped {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: `ptr..ptr + len` is a live read-only mapping until `drop`.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for Mapped {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly the range mapped in `file`, once.
        unsafe {
            libc::munmap(self.ptr.as_ptr().cast(), self.len);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mapped_file_reads_as_its_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let data: Vec<u8> = (0..3 << 20).map(|i: u32| (i % 253) as u8).collect();
        std::fs::write(&path, &data).unwrap();
        let f = std::fs::File::open(&path).unwrap();
        assert_eq!(&*Mapped::file(&f, data.len()).unwrap(), &data[..]);
        assert_eq!(&*Mapped::file(&f, 4096).unwrap(), &data[..4096]);
        std::fs::write(&path, b"").unwrap();
        let empty = std::fs::File::open(&path).unwrap();
        assert!(Mapped::file(&empty, 0).is_err());
        let mut big = BigBuf::zeroed(5 << 20);
        big.as_mut_slice()[..3].copy_from_slice(b"abc");
        big.truncate(4);
        assert_eq!(&*big, b"abc\0");
    }
}
