//! The envelope every stored object is wrapped in: a 32-byte header carrying the compression
//! algorithm, the original length, a CRC-32C of the original bytes and of the stored payload, and a
//! CRC-32C of the header itself. Reading an object checks all three before returning a byte.
//!
//! ```text
//! 0..8   magic "PITROBJ1" (or "PITROBJ2": an attachment follows the payload)
//! 8      compression code (0 none, 1 zstd, 2 lz4)
//! 9..12  zero; in "PITROBJ2", the length of the trailer (attachment and footer), u24 LE
//! 12..20 original length, u64 LE
//! 20..24 CRC-32C of the original bytes, LE
//! 24..28 CRC-32C of the payload (bytes 32.. up to the trailer), LE
//! 28..32 CRC-32C of bytes 0..28, LE
//! 32..   payload
//! ```
//!
//! Format 2 carries a second, smaller object after the payload, found from either end: the header
//! gives the trailer's length, and the last 16 bytes (the footer) give the attachment's, so a
//! reader that fetches only an object's tail (a range read, with the size a listing gave) gets it
//! without the payload. A WAL segment carries its index summary this way, so archiving it is one
//! write. The attachment is an envelope itself (format 1), with its own checksums.
//!
//! ```text
//! trailer: attachment, then the footer:
//! 0..4   attachment length, u32 LE
//! 4..8   CRC-32C of the attachment, LE
//! 8..16  magic "PITRATT1"
//! ```

#![deny(clippy::indexing_slicing)]

use crate::compress::Compression;

/// Header magic and format version.
pub const MAGIC: &[u8; 8] = b"PITROBJ1";
/// Header magic of format 2: the same header, and an attachment after the payload.
pub const MAGIC_ATTACHED: &[u8; 8] = b"PITROBJ2";
/// Footer magic, the last 8 bytes of a format 2 object.
pub const FOOTER_MAGIC: &[u8; 8] = b"PITRATT1";
/// Footer length.
pub const FOOTER_LEN: usize = 16;
/// Longest trailer (attachment and footer) the header can state.
pub const MAX_TRAILER_LEN: usize = (1 << 24) - 1;
/// Header length.
pub const HEADER_LEN: usize = 32;
/// Largest original object accepted on read (guards allocations driven by a corrupt header).
pub const MAX_ORIGINAL_LEN: u64 = 4 << 30;

/// Header fields of a stored object.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// Payload compression.
    pub compression: Compression,
    /// Length of the original bytes.
    pub original_len: u64,
    /// CRC-32C of the original bytes.
    pub original_crc: u32,
    /// Length of the trailer after the payload (attachment and footer; 0 in format 1).
    pub trailer_len: usize,
}

/// Wrap `data`, compressed with `compression`.
///
/// # Errors
/// Only if the compressor fails to allocate.
pub fn encode(data: &[u8], compression: Compression) -> std::io::Result<Vec<u8>> {
    let payload = compression.compress(data)?;
    Ok(assemble(
        compression,
        data.len(),
        crc32c::crc32c(data),
        &[payload],
    ))
}

/// An envelope written as a stream: what is written is compressed [`PARALLEL_PIECE`] bytes at a
/// time, each window a frame of its own (zstd; lz4 and none compress the whole at the end, as
/// [`encode`] does), so a large document (a manifest of 100,000 files is some 25 MiB of JSON) is
/// never held whole: only a window and what it compressed to.
pub struct FramedWriter {
    compression: Compression,
    window: Vec<u8>,
    frames: Vec<Vec<u8>>,
    len: u64,
    crc: u32,
}

impl FramedWriter {
    /// An empty envelope of `compression`.
    pub fn new(compression: Compression) -> FramedWriter {
        FramedWriter {
            compression,
            window: Vec::new(),
            frames: Vec::new(),
            len: 0,
            crc: 0,
        }
    }

    fn flush_window(&mut self) -> std::io::Result<()> {
        let mut frame = self.compression.compress(&self.window)?;
        frame.shrink_to_fit();
        self.frames.push(frame);
        self.window.clear();
        Ok(())
    }

    /// The envelope of everything written.
    ///
    /// # Errors
    /// A compressor failure.
    pub fn finish(mut self) -> std::io::Result<Vec<u8>> {
        if !self.window.is_empty() || self.frames.is_empty() {
            self.flush_window()?;
        }
        Ok(encode_frames(
            self.compression,
            self.len,
            self.crc,
            &self.frames,
        ))
    }
}

impl std::io::Write for FramedWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.crc = crc32c::crc32c_append(self.crc, buf);
        self.len += buf.len() as u64;
        let mut rest = buf;
        while !rest.is_empty() {
            if self.compression != Compression::Zstd {
                self.window.extend_from_slice(rest);
                break;
            }
            let room = PARALLEL_PIECE - self.window.len();
            let (now, later) = rest.split_at(room.min(rest.len()));
            self.window.extend_from_slice(now);
            rest = later;
            if self.window.len() == PARALLEL_PIECE {
                self.flush_window()?;
            }
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// An uncompressed envelope whose payload is `parts` one after another (a backup's bundle of
/// small pieces, each an envelope itself), kept in parts so it is stored without a copy.
pub fn wrap_parts(parts: Vec<bytes::Bytes>) -> Encoded {
    let len: usize = parts.iter().map(bytes::Bytes::len).sum();
    let crc = parts.iter().fold(0, |c, p| crc32c::crc32c_append(c, p));
    let mut out = Vec::with_capacity(parts.len() + 1);
    out.push(bytes::Bytes::from(header(
        Compression::None,
        len,
        crc,
        crc,
        0,
    )));
    out.extend(parts);
    Encoded { parts: out }
}

/// Wrap frames already compressed with `compression` (one after another they are the payload)
/// of original bytes `original_len` long with CRC-32C `original_crc`. Concatenated zstd frames
/// are one zstd stream and raw pieces one raw payload; lz4 takes a single frame.
pub fn encode_frames(
    compression: Compression,
    original_len: u64,
    original_crc: u32,
    frames: &[Vec<u8>],
) -> Vec<u8> {
    assemble(
        compression,
        usize::try_from(original_len).unwrap_or(usize::MAX),
        original_crc,
        frames,
    )
}

/// The size of the pieces a buffer is cut into for compressing on several threads: small enough
/// that the threads finish together (a thread slowed by other work takes fewer pieces), large
/// enough that the history each piece starts without costs little ratio (zstd level 3 looks back
/// 2 MiB).
pub const PARALLEL_PIECE: usize = 2 << 20;

/// An envelope kept in parts (the header, then one zstd frame per piece) so it can be stored
/// without first being copied together.
#[derive(Clone, Debug)]
pub struct Encoded {
    parts: Vec<bytes::Bytes>,
}

impl Encoded {
    /// Nothing: for an object whose bytes already went to a staging file, so that memory does not
    /// hold them too while the upload waits.
    pub fn empty() -> Encoded {
        Encoded { parts: Vec::new() }
    }

    /// Its length in bytes.
    pub fn len(&self) -> usize {
        self.parts.iter().map(bytes::Bytes::len).sum()
    }

    /// Whether it is empty (never, for an envelope).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Its parts, in order: the header, then the payload.
    pub fn parts(&self) -> &[bytes::Bytes] {
        &self.parts
    }

    /// Its parts, in order.
    pub fn into_parts(self) -> Vec<bytes::Bytes> {
        self.parts
    }

    /// Its bytes in one buffer (copied unless there is one part).
    pub fn into_vec(mut self) -> Vec<u8> {
        if self.parts.len() == 1 {
            return Vec::from(self.parts.remove(0));
        }
        let mut out = Vec::with_capacity(self.len());
        for p in &self.parts {
            out.extend_from_slice(p);
        }
        out
    }
}

impl From<Vec<u8>> for Encoded {
    fn from(v: Vec<u8>) -> Self {
        Encoded {
            parts: vec![bytes::Bytes::from(v)],
        }
    }
}

/// Like [`encode`], but compressing with zstd on up to `threads` threads at once. Each piece of
/// [`PARALLEL_PIECE`] bytes becomes its own zstd frame; concatenated frames are one valid zstd
/// stream, so readers need nothing new. `original_crc` may be passed when the caller already has
/// it. Other algorithms are compressed on the calling thread.
///
/// # Errors
/// Only if a compressor fails to allocate.
pub fn encode_parallel(
    data: &[u8],
    compression: Compression,
    threads: usize,
    original_crc: Option<u32>,
) -> std::io::Result<Vec<u8>> {
    encode_parallel_beside(data, compression, threads, original_crc, None, || ())
        .0
        .map(Encoded::into_vec)
}

/// Where frames go as soon as they and every frame before them are compressed: called with the
/// offset in the stored object (after the header) and the frame's bytes.
pub type FrameSink<'s> = &'s (dyn Fn(u64, &[u8]) + Sync);

/// [`encode_parallel`] on `threads` threads in all, one of which first runs `beside`, then helps
/// compress whatever pieces are left, so every core stays busy to the end. Returns the envelope in
/// parts and what `beside` returned (`Err` if it panicked). With a `sink`, frames are also handed
/// to it in order as they are done (only when compressing in pieces: the caller checks how much it
/// got).
pub fn encode_parallel_beside<T: Send>(
    data: &[u8],
    compression: Compression,
    threads: usize,
    original_crc: Option<u32>,
    sink: Option<FrameSink<'_>>,
    beside: impl FnOnce() -> T + Send,
) -> (std::io::Result<Encoded>, std::thread::Result<T>) {
    let serial =
        compression != Compression::Zstd || threads <= 1 || data.len() < 2 * PARALLEL_PIECE;
    if serial {
        let other = std::panic::catch_unwind(std::panic::AssertUnwindSafe(beside));
        let stored = compression.compress(data).map(|payload| {
            let crc = original_crc.unwrap_or_else(|| crc32c::crc32c(data));
            Encoded::from(assemble(compression, data.len(), crc, &[payload]))
        });
        return (stored, other);
    }
    let chunks: Vec<&[u8]> = data.chunks(PARALLEL_PIECE).collect();
    // Every frame is written straight into its own region of one output buffer, sized for the
    // worst case; only the pages written are ever touched.
    let bounds: Vec<usize> = chunks
        .iter()
        .map(|c| zstd::zstd_safe::compress_bound(c.len()))
        .collect();
    let mut out = vec![0u8; bounds.iter().sum()];
    let mut regions = Vec::with_capacity(chunks.len());
    let mut rest = out.as_mut_slice();
    for b in &bounds {
        let (region, tail) = rest.split_at_mut(*b);
        regions.push(std::sync::Mutex::new(region));
        rest = tail;
    }
    let queue = PieceQueue {
        regions,
        next: std::sync::atomic::AtomicUsize::new(0),
        done: std::sync::Mutex::new(Done {
            frames: chunks.iter().map(|_| None).collect(),
            flushed: 0,
            offset: HEADER_LEN as u64,
        }),
        chunks,
        want_crc: original_crc.is_none(),
        sink,
    };
    let (worked, other) = std::thread::scope(|s| {
        let queue = &queue;
        let other = s.spawn(move || {
            let t = beside();
            (t, queue.work())
        });
        let workers: Vec<_> = (1..threads.min(queue.chunks.len()))
            .map(|_| s.spawn(|| queue.work()))
            .collect();
        // (A worker left unjoined by an error is joined when the scope ends.)
        let worked = workers.into_iter().try_for_each(|h| {
            h.join()
                .unwrap_or_else(|_| Err(std::io::Error::other("compression thread panicked")))
        });
        (worked, other.join())
    });
    let (other, helped) = match other {
        Ok((t, helped)) => (Ok(t), helped),
        Err(panic) => (Err(panic), Ok(())),
    };
    let lens: Vec<usize> = queue.chunks.iter().map(|c| c.len()).collect();
    let done = queue.done.into_inner();
    drop(queue.regions);
    let stored = worked.and(helped).and_then(|()| {
        let done = done.map_err(|_| std::io::Error::other("a compression thread panicked"))?;
        let crc = original_crc.unwrap_or_else(|| {
            done.frames.iter().flatten().fold(0, |acc, d| {
                let len = lens.get(d.index).copied().unwrap_or_default();
                crc32c::crc32c_combine(acc, d.piece_crc.unwrap_or_default(), len)
            })
        });
        frames_to_parts(data.len(), crc, done, out, &bounds)
    });
    (stored, other)
}

/// The envelope of zstd frames compressed into the regions (`bounds` long) of `out`.
fn frames_to_parts(
    original_len: usize,
    crc: u32,
    done: Done,
    out: Vec<u8>,
    bounds: &[usize],
) -> std::io::Result<Encoded> {
    let done: Vec<Compressed> = done.frames.into_iter().flatten().collect();
    if done.len() != bounds.len() {
        return Err(std::io::Error::other("a piece was not compressed"));
    }
    let payload_crc = done.iter().fold(0, |acc, d| {
        crc32c::crc32c_combine(acc, d.frame_crc, d.frame_len)
    });
    let payload_len = done.iter().map(|d| d.frame_len).sum();
    let out = bytes::Bytes::from(out);
    let mut parts = Vec::with_capacity(done.len() + 1);
    parts.push(bytes::Bytes::from(header(
        Compression::Zstd,
        original_len,
        crc,
        payload_crc,
        payload_len,
    )));
    let mut start = 0;
    for (i, b) in bounds.iter().enumerate() {
        if let Some(d) = done.get(i) {
            parts.push(out.slice(start..start + d.frame_len));
        }
        start += b;
    }
    Ok(Encoded { parts })
}

/// Reads bytes of an object's source: fills the buffer with the bytes at the offset, exactly.
pub type ReadAt<'r> = &'r (dyn Fn(u64, &mut [u8]) -> std::io::Result<()> + Sync);

/// Like [`encode_parallel_beside`] with zstd, for `len` bytes that `read` gives a window
/// ([`PARALLEL_PIECE`]) at a time, so memory holds a few windows, never the whole. The calling
/// thread reads the windows in order and hands each to `beside` before it is compressed, on up
/// to `threads` threads in all (the calling one included, when it has nothing to read); frames go
/// to `sink` in order as they are done.
///
/// # Errors
/// A read that fails (the source is shorter than `len`, say), or a compressor that cannot
/// allocate; a panic in `beside` is returned as `Err` beside the envelope.
pub fn encode_read_beside(
    len: usize,
    read: ReadAt<'_>,
    threads: usize,
    sink: Option<FrameSink<'_>>,
    beside: &mut dyn FnMut(&[u8]),
) -> (std::io::Result<Encoded>, std::thread::Result<()>) {
    let windows = len.div_ceil(PARALLEL_PIECE).max(1);
    let bounds: Vec<usize> = (0..windows)
        .map(|i| zstd::zstd_safe::compress_bound(PARALLEL_PIECE.min(len - i * PARALLEL_PIECE)))
        .collect();
    let mut out = vec![0u8; bounds.iter().sum()];
    let mut regions = Vec::with_capacity(windows);
    let mut rest = out.as_mut_slice();
    for b in &bounds {
        let (region, tail) = rest.split_at_mut(*b);
        regions.push(std::sync::Mutex::new(region));
        rest = tail;
    }
    let threads = threads.clamp(1, windows);
    let stream = Stream {
        regions,
        done: std::sync::Mutex::new(Done {
            frames: (0..windows).map(|_| None).collect(),
            flushed: 0,
            offset: HEADER_LEN as u64,
        }),
        sink,
        pool: std::sync::Mutex::new(Pool {
            free: Vec::new(),
            made: 0,
            // A window for the reader, one for each other thread, and one waiting.
            limit: threads + 1,
            queue: std::collections::VecDeque::new(),
            read_all: false,
            failed: false,
        }),
        changed: std::sync::Condvar::new(),
    };
    let mut other = Ok(());
    let (read_result, worked) = std::thread::scope(|s| {
        let stream = &stream;
        let workers: Vec<_> = (1..threads)
            .map(|_| s.spawn(|| stream.work_guarded()))
            .collect();
        let read_result = stream.feed(len, read, beside, &mut other);
        let worked = workers.into_iter().try_for_each(|h| {
            h.join()
                .unwrap_or_else(|_| Err(std::io::Error::other("compression thread panicked")))
        });
        (read_result, worked)
    });
    drop(stream.regions);
    let done = stream.done.into_inner();
    let stored = read_result
        .and_then(|crc| worked.map(|()| crc))
        .and_then(|crc| {
            let done = done.map_err(|_| std::io::Error::other("a compression thread panicked"))?;
            frames_to_parts(len, crc, done, out, &bounds)
        });
    (stored, other)
}

/// A source read a window at a time and compressed on several threads.
struct Stream<'b, 's> {
    regions: Vec<std::sync::Mutex<&'b mut [u8]>>,
    done: std::sync::Mutex<Done>,
    sink: Option<FrameSink<'s>>,
    pool: std::sync::Mutex<Pool>,
    changed: std::sync::Condvar,
}

/// The windows: free ones, read ones waiting for a compressor.
struct Pool {
    free: Vec<crate::bigbuf::BigBuf>,
    made: usize,
    limit: usize,
    /// Read windows: their index, buffer and length.
    queue: std::collections::VecDeque<(usize, crate::bigbuf::BigBuf, usize)>,
    read_all: bool,
    failed: bool,
}

type Compressor = Option<zstd::bulk::Compressor<'static>>;

fn poisoned() -> std::io::Error {
    std::io::Error::other("a compression thread panicked")
}

impl Stream<'_, '_> {
    /// Read every window (on the calling thread), hand it to `beside`, queue it; then help
    /// compress. Returns the CRC-32C of the bytes read.
    fn feed(
        &self,
        len: usize,
        read: ReadAt<'_>,
        beside: &mut dyn FnMut(&[u8]),
        other: &mut std::thread::Result<()>,
    ) -> std::io::Result<u32> {
        let mut z: Compressor = None;
        let result = (|| -> std::io::Result<u32> {
            let mut crc = 0u32;
            for (i, offset) in (0..len.max(1)).step_by(PARALLEL_PIECE).enumerate() {
                let n = PARALLEL_PIECE.min(len - offset);
                let mut buf = self.take_window(&mut z)?;
                let window = buf
                    .as_mut_slice()
                    .get_mut(..n)
                    .ok_or_else(|| std::io::Error::other("a window is too short"))?;
                read(offset as u64, window)?;
                let window = &*window;
                crc = crc32c::crc32c_combine(crc, crc32c::crc32c(window), n);
                if other.is_ok() {
                    *other =
                        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| beside(window)));
                }
                let mut pool = self.pool.lock().map_err(|_| poisoned())?;
                pool.queue.push_back((i, buf, n));
                self.changed.notify_one();
            }
            Ok(crc)
        })();
        if let Ok(mut pool) = self.pool.lock() {
            pool.read_all = true;
            pool.failed |= result.is_err();
        }
        self.changed.notify_all();
        let crc = result?;
        self.work(&mut z)?;
        Ok(crc)
    }

    /// A window to read into: a free one, a new one while fewer than the limit exist, else the
    /// first freed by a compressor (compressing a waiting one meanwhile).
    fn take_window(&self, z: &mut Compressor) -> std::io::Result<crate::bigbuf::BigBuf> {
        let mut pool = self.pool.lock().map_err(|_| poisoned())?;
        loop {
            if pool.failed {
                return Err(std::io::Error::other("a compression thread failed"));
            }
            if let Some(buf) = pool.free.pop() {
                return Ok(buf);
            }
            if pool.made < pool.limit {
                pool.made += 1;
                drop(pool);
                return Ok(crate::bigbuf::BigBuf::zeroed(PARALLEL_PIECE));
            }
            if let Some((i, buf, n)) = pool.queue.pop_front() {
                drop(pool);
                self.compress(z, i, buf.get(..n).unwrap_or_default())?;
                return Ok(buf);
            }
            pool = self.changed.wait(pool).map_err(|_| poisoned())?;
        }
    }

    /// [`work`](Self::work) on a thread of its own: a failure or panic stops the others.
    fn work_guarded(&self) -> std::io::Result<()> {
        let mut z: Compressor = None;
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.work(&mut z)))
            .unwrap_or_else(|_| Err(poisoned()));
        if r.is_err() {
            if let Ok(mut pool) = self.pool.lock() {
                pool.failed = true;
            }
            self.changed.notify_all();
        }
        r
    }

    /// Compress queued windows until every window is read and none waits.
    fn work(&self, z: &mut Compressor) -> std::io::Result<()> {
        loop {
            let job = {
                let mut pool = self.pool.lock().map_err(|_| poisoned())?;
                loop {
                    if let Some(job) = pool.queue.pop_front() {
                        break Some(job);
                    }
                    if pool.read_all || pool.failed {
                        break None;
                    }
                    pool = self.changed.wait(pool).map_err(|_| poisoned())?;
                }
            };
            let Some((i, buf, n)) = job else {
                return Ok(());
            };
            let r = self.compress(z, i, buf.get(..n).unwrap_or_default());
            let mut pool = self.pool.lock().map_err(|_| poisoned())?;
            pool.free.push(buf);
            self.changed.notify_all();
            r?;
        }
    }

    /// Compress window `index` into its region; hand frames to the sink in order.
    fn compress(&self, z: &mut Compressor, index: usize, piece: &[u8]) -> std::io::Result<()> {
        let region = self
            .regions
            .get(index)
            .ok_or_else(|| std::io::Error::other("no region for a piece"))?;
        let (frame_len, frame_crc) = compress_frame(z, region, piece)?;
        let frame = Compressed {
            index,
            frame_len,
            frame_crc,
            piece_crc: None,
        };
        frame_done(&self.done, &self.regions, self.sink, frame)
    }
}

/// Compress `piece` into `region` as one zstd frame; returns the frame's length and CRC-32C.
fn compress_frame(
    z: &mut Compressor,
    region: &std::sync::Mutex<&mut [u8]>,
    piece: &[u8],
) -> std::io::Result<(usize, u32)> {
    let z = match z {
        Some(z) => z,
        None => z.insert(zstd::bulk::Compressor::new(crate::compress::ZSTD_LEVEL)?),
    };
    let mut region = region.lock().map_err(|_| poisoned())?;
    let frame_len = z.compress_to_buffer(piece, &mut **region)?;
    let frame = region
        .get(..frame_len)
        .ok_or_else(|| std::io::Error::other("the compressor wrote past its buffer"))?;
    Ok((frame_len, crc32c::crc32c(frame)))
}

/// Record a compressed frame, and hand the sink what is now in order.
fn frame_done(
    done: &std::sync::Mutex<Done>,
    regions: &[std::sync::Mutex<&mut [u8]>],
    sink: Option<FrameSink<'_>>,
    frame: Compressed,
) -> std::io::Result<()> {
    let mut done = done.lock().map_err(|_| poisoned())?;
    if let Some(slot) = done.frames.get_mut(frame.index) {
        *slot = Some(frame);
    }
    hand_over(&mut done, regions, sink)
}

/// Hand the sink every frame now preceded only by frames already handed over.
fn hand_over(
    done: &mut Done,
    regions: &[std::sync::Mutex<&mut [u8]>],
    sink: Option<FrameSink<'_>>,
) -> std::io::Result<()> {
    let Some(sink) = sink else { return Ok(()) };
    while let Some(Some(next)) = done.frames.get(done.flushed) {
        let len = next.frame_len;
        let region = regions
            .get(done.flushed)
            .ok_or_else(|| std::io::Error::other("no region for a piece"))?
            .lock()
            .map_err(|_| poisoned())?;
        let frame = region
            .get(..len)
            .ok_or_else(|| std::io::Error::other("a frame is longer than its buffer"))?;
        sink(done.offset, frame);
        done.offset += len as u64;
        done.flushed += 1;
    }
    Ok(())
}

/// One compressed piece.
struct Compressed {
    index: usize,
    frame_len: usize,
    frame_crc: u32,
    /// The CRC-32C of the piece itself, when wanted.
    piece_crc: Option<u32>,
}

/// The pieces of one buffer, handed out one at a time to whichever thread asks next, and the
/// region of the output buffer each one's frame goes to.
struct PieceQueue<'a, 'b, 's> {
    chunks: Vec<&'a [u8]>,
    regions: Vec<std::sync::Mutex<&'b mut [u8]>>,
    next: std::sync::atomic::AtomicUsize,
    done: std::sync::Mutex<Done>,
    want_crc: bool,
    sink: Option<FrameSink<'s>>,
}

/// The pieces compressed so far, and how many of the first ones went to the sink.
struct Done {
    frames: Vec<Option<Compressed>>,
    flushed: usize,
    /// Where the next frame for the sink starts in the stored object.
    offset: u64,
}

impl PieceQueue<'_, '_, '_> {
    /// Compress pieces until none are left.
    fn work(&self) -> std::io::Result<()> {
        let mut z: Compressor = None;
        loop {
            let index = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let (Some(piece), Some(region)) = (self.chunks.get(index), self.regions.get(index))
            else {
                return Ok(());
            };
            let piece_crc = self.want_crc.then(|| crc32c::crc32c(piece));
            let (frame_len, frame_crc) = compress_frame(&mut z, region, piece)?;
            let frame = Compressed {
                index,
                frame_len,
                frame_crc,
                piece_crc,
            };
            frame_done(&self.done, &self.regions, self.sink, frame)?;
        }
    }
}

/// The header for `original_len` bytes with `original_crc`, followed by the payload pieces.
fn assemble(
    compression: Compression,
    original_len: usize,
    original_crc: u32,
    payload: &[Vec<u8>],
) -> Vec<u8> {
    let payload_len: usize = payload.iter().map(Vec::len).sum();
    let payload_crc = payload
        .iter()
        .fold(0, |crc, p| crc32c::crc32c_append(crc, p));
    let mut out = header(
        compression,
        original_len,
        original_crc,
        payload_crc,
        payload_len,
    );
    for p in payload {
        out.extend_from_slice(p);
    }
    out
}

/// The envelope's header, in a buffer with room for `payload_len` more bytes.
fn header(
    compression: Compression,
    original_len: usize,
    original_crc: u32,
    payload_crc: u32,
    payload_len: usize,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + payload_len);
    out.extend_from_slice(MAGIC);
    out.push(compression.code());
    out.extend_from_slice(&[0, 0, 0]);
    out.extend_from_slice(&(original_len as u64).to_le_bytes());
    out.extend_from_slice(&original_crc.to_le_bytes());
    out.extend_from_slice(&payload_crc.to_le_bytes());
    let header_crc = crc32c::crc32c(out.get(..28).unwrap_or_default());
    out.extend_from_slice(&header_crc.to_le_bytes());
    out
}

use crate::pg::le::u32_at as le32;

/// Check and decode the header of a stored object.
///
/// # Errors
/// A description of what is wrong.
pub fn decode_header(stored: &[u8]) -> Result<Header, String> {
    if stored.len() < HEADER_LEN {
        return Err(format!(
            "object is {} bytes, shorter than its {HEADER_LEN}-byte header",
            stored.len()
        ));
    }
    let attached = match stored.get(..8) {
        Some(m) if m == MAGIC.as_slice() => false,
        Some(m) if m == MAGIC_ATTACHED.as_slice() => true,
        _ => return Err("object does not start with pitr's header magic".into()),
    };
    if crc32c::crc32c(stored.get(..28).unwrap_or_default()) != le32(stored, 28) {
        return Err("header checksum mismatch".into());
    }
    let code = crate::pg::le::u8_at(stored, 8);
    let compression =
        Compression::from_code(code).ok_or_else(|| format!("unknown compression code {code}"))?;
    let original_len = crate::pg::le::u64_at(stored, 12);
    if original_len > MAX_ORIGINAL_LEN {
        return Err(format!("header claims {original_len} original bytes"));
    }
    let trailer_len = usize::from(crate::pg::le::u8_at(stored, 9))
        | usize::from(crate::pg::le::u8_at(stored, 10)) << 8
        | usize::from(crate::pg::le::u8_at(stored, 11)) << 16;
    if !attached && trailer_len != 0 {
        return Err("format 1 header with nonzero reserved bytes".into());
    }
    if attached && trailer_len < FOOTER_LEN {
        return Err(format!(
            "header states a {trailer_len}-byte trailer, shorter than its footer"
        ));
    }
    Ok(Header {
        compression,
        original_len,
        original_crc: le32(stored, 20),
        trailer_len,
    })
}

/// The payload of a stored object whose header is `header`: from the header to the trailer.
///
/// # Errors
/// The object is shorter than its header and trailer.
pub fn payload<'a>(stored: &'a [u8], header: &Header) -> Result<&'a [u8], String> {
    let end = stored
        .len()
        .checked_sub(header.trailer_len)
        .filter(|end| *end >= HEADER_LEN)
        .ok_or_else(|| {
            format!(
                "object is {} bytes, shorter than its header and {}-byte trailer",
                stored.len(),
                header.trailer_len
            )
        })?;
    Ok(stored.get(HEADER_LEN..end).unwrap_or_default())
}

/// `encoded` (a format 1 envelope) with `attachment` (an envelope itself) carried after its
/// payload: the header becomes format 2 and states the trailer's length; the payload and its
/// checksums are unchanged, so a staging file already holding the payload needs only the new
/// header and the trailer (see [`Encoded::parts`]: the header is then its own first part).
///
/// # Errors
/// `encoded` is not a format 1 envelope, or the attachment is too long for the header to state.
pub fn attach(encoded: Encoded, attachment: &[u8]) -> Result<Encoded, String> {
    let trailer_len = attachment.len() + FOOTER_LEN;
    if trailer_len > MAX_TRAILER_LEN {
        return Err(format!(
            "an attachment of {} bytes is longer than a header can state",
            attachment.len()
        ));
    }
    let mut parts = encoded.into_parts().into_iter();
    let first = parts.next().unwrap_or_default();
    if first.len() < HEADER_LEN || first.get(..8) != Some(MAGIC.as_slice()) {
        return Err("only a format 1 envelope takes an attachment".into());
    }
    let mut head = first.get(..HEADER_LEN).unwrap_or_default().to_vec();
    let len_bytes = (trailer_len as u32).to_le_bytes();
    if let Some(magic) = head.get_mut(..8) {
        magic.copy_from_slice(MAGIC_ATTACHED);
    }
    if let Some(b) = head.get_mut(9..12) {
        b.copy_from_slice(len_bytes.get(..3).unwrap_or_default());
    }
    let header_crc = crc32c::crc32c(head.get(..28).unwrap_or_default());
    if let Some(b) = head.get_mut(28..32) {
        b.copy_from_slice(&header_crc.to_le_bytes());
    }
    let mut out = vec![bytes::Bytes::from(head)];
    if first.len() > HEADER_LEN {
        out.push(first.slice(HEADER_LEN..));
    }
    out.extend(parts);
    let mut trailer = Vec::with_capacity(trailer_len);
    trailer.extend_from_slice(attachment);
    trailer.extend_from_slice(&(attachment.len() as u32).to_le_bytes());
    trailer.extend_from_slice(&crc32c::crc32c(attachment).to_le_bytes());
    trailer.extend_from_slice(FOOTER_MAGIC);
    out.push(bytes::Bytes::from(trailer));
    Ok(Encoded { parts: out })
}

/// What the last bytes of an object say about its attachment.
#[derive(Debug, PartialEq, Eq)]
pub enum Tail<'a> {
    /// No footer: the object has no attachment (a format 1 object).
    None,
    /// The attachment starts further back: the last `n` bytes of the object hold it and its footer.
    Need(usize),
    /// The attachment, checked against the footer's checksum (an envelope: decode it).
    Found(&'a [u8]),
}

/// The attachment in `tail`, the last bytes of an object (or all of them).
///
/// # Errors
/// The footer's checksum does not match the bytes before it.
pub fn attachment_in_tail(tail: &[u8]) -> Result<Tail<'_>, String> {
    let Some(footer_at) = tail.len().checked_sub(FOOTER_LEN) else {
        return Ok(Tail::None);
    };
    let footer = tail.get(footer_at..).unwrap_or_default();
    if footer.get(8..16) != Some(FOOTER_MAGIC.as_slice()) {
        return Ok(Tail::None);
    }
    let len = le32(footer, 0) as usize;
    let Some(start) = footer_at.checked_sub(len) else {
        return Ok(Tail::Need(len + FOOTER_LEN));
    };
    let attachment = tail.get(start..footer_at).unwrap_or_default();
    if crc32c::crc32c(attachment) != le32(footer, 4) {
        return Err("attachment checksum mismatch".into());
    }
    Ok(Tail::Found(attachment))
}

/// The attachment of a whole stored object: `None` for format 1.
///
/// # Errors
/// The header or the trailer fails a check.
pub fn attachment(stored: &[u8]) -> Result<Option<&[u8]>, String> {
    let header = decode_header(stored)?;
    if header.trailer_len == 0 {
        return Ok(None);
    }
    payload(stored, &header)?;
    let trailer = stored
        .get(stored.len().saturating_sub(header.trailer_len)..)
        .unwrap_or_default();
    match attachment_in_tail(trailer)? {
        Tail::Found(a) if a.len() + FOOTER_LEN == trailer.len() => Ok(Some(a)),
        _ => Err("the footer does not match the trailer the header states".into()),
    }
}

/// Check a stored object whole: its payload and, for a segment, the summary it carries after it;
/// the length of the original bytes.
///
/// # Errors
/// A description of the first check that failed.
pub fn check_stored(stored: &[u8]) -> Result<usize, String> {
    let decoded = decode(stored)?;
    if let Some(a) = attachment(stored)? {
        decode(a).map_err(|e| format!("attachment: {e}"))?;
    }
    Ok(decoded.len())
}

/// Verify and unwrap a stored object, returning the original bytes.
///
/// # Errors
/// A description of the first check that failed.
pub fn decode(stored: &[u8]) -> Result<Vec<u8>, String> {
    let header = decode_header(stored)?;
    let payload = payload(stored, &header)?;
    if crc32c::crc32c(payload) != le32(stored, 24) {
        return Err("payload checksum mismatch".into());
    }
    let data = header
        .compression
        .decompress(payload, header.original_len as usize)?;
    let crc = crc32c::crc32c(&data);
    if crc != header.original_crc {
        return Err(format!(
            "content checksum {crc:08x} differs from the stored {:08x}",
            header.original_crc
        ));
    }
    Ok(data)
}

/// [`decode`] as a stream: `read` reads the original bytes as they are decompressed (a large
/// document is parsed without being held whole). The stored bytes' checksums are checked first
/// (the payload's) and after `read` (the content's, over every byte to the end, whatever `read`
/// left unread); `Err` means the object failed a check, whatever `read` returned.
///
/// # Errors
/// A check that failed, named.
pub fn decode_streaming<T>(
    stored: &[u8],
    read: impl FnOnce(&mut dyn std::io::Read) -> T,
) -> Result<T, String> {
    let header = decode_header(stored)?;
    let payload = payload(stored, &header)?;
    if crc32c::crc32c(payload) != le32(stored, 24) {
        return Err("payload checksum mismatch".into());
    }
    let inner: Box<dyn std::io::Read + '_> = match header.compression {
        Compression::Zstd => Box::new(
            zstd::stream::read::Decoder::with_buffer(payload).map_err(|e| format!("zstd: {e}"))?,
        ),
        other => Box::new(std::io::Cursor::new(
            other.decompress(payload, header.original_len as usize)?,
        )),
    };
    let mut counted = Counted {
        inner,
        crc: 0,
        len: 0,
        limit: header.original_len,
    };
    let mut buffered = std::io::BufReader::with_capacity(64 << 10, &mut counted);
    let out = read(&mut buffered);
    let rest = std::io::copy(&mut buffered, &mut std::io::sink());
    drop(buffered);
    rest.map_err(|e| format!("decompress: {e}"))?;
    if counted.len != header.original_len {
        return Err(format!(
            "content is {} bytes where the header says {}",
            counted.len, header.original_len
        ));
    }
    if counted.crc != header.original_crc {
        return Err(format!(
            "content checksum {:08x} differs from the stored {:08x}",
            counted.crc, header.original_crc
        ));
    }
    Ok(out)
}

/// A reader that checksums and counts what passes, refusing more than `limit` bytes.
struct Counted<R> {
    inner: R,
    crc: u32,
    len: u64,
    limit: u64,
}

impl<R: std::io::Read> std::io::Read for Counted<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        let got = buf.get(..n).unwrap_or_default();
        self.crc = crc32c::crc32c_append(self.crc, got);
        self.len += n as u64;
        if self.len > self.limit {
            return Err(std::io::Error::other(format!(
                "decompresses to more than the {} bytes the header says",
                self.limit
            )));
        }
        Ok(n)
    }
}

/// Why [`decode_to`] stopped.
#[derive(Debug)]
pub enum DecodeToError {
    /// The stored object failed a check (what failed). Bytes already handed to the sink are not to be
    /// trusted.
    Corrupt(String),
    /// The sink failed.
    Sink(std::io::Error),
}

impl From<std::io::Error> for DecodeToError {
    fn from(e: std::io::Error) -> Self {
        DecodeToError::Sink(e)
    }
}

/// How much decompressed data [`decode_to`] hands to its sink at a time: small enough to stay in
/// the CPU's cache between the decompressor writing it, the checksum reading it and the sink copying
/// it out, large enough that each sink call is worth its system call.
pub const STREAM_CHUNK: usize = 256 << 10;

/// A decompression context and an output chunk for [`decode_to`].
type StreamState = (zstd::zstd_safe::DCtx<'static>, Vec<u8>);

/// Idle [`StreamState`]s, so that restoring thousands of pieces allocates (and page-faults) one per
/// concurrent decode, not one per piece. Never more than the most decodes ever run at once.
static STREAM_STATES: std::sync::Mutex<Vec<StreamState>> = std::sync::Mutex::new(Vec::new());

/// Verify and unwrap a stored object chunk by chunk, calling `sink(offset, bytes)` for consecutive
/// pieces of the original, without ever holding all of it. The header and the payload checksum are
/// checked before the first call; the content checksum and length only at the end, so a caller must
/// treat what it was given as unverified until this returns `Ok`. Returns the original length.
///
/// # Errors
/// `Corrupt` with the check that failed, or `Sink` with the sink's error.
pub fn decode_to(
    stored: &[u8],
    mut sink: impl FnMut(u64, &[u8]) -> std::io::Result<()>,
) -> Result<u64, DecodeToError> {
    use DecodeToError::{Corrupt, Sink};
    let header = decode_header(stored).map_err(Corrupt)?;
    let payload = payload(stored, &header).map_err(Corrupt)?;
    if crc32c::crc32c(payload) != le32(stored, 24) {
        return Err(Corrupt("payload checksum mismatch".into()));
    }
    let mut crc = 0u32;
    let mut offset = 0u64;
    let mut emit = |bytes: &[u8]| -> Result<(), DecodeToError> {
        if offset + bytes.len() as u64 > header.original_len {
            return Err(Corrupt(format!(
                "decompresses to more than the {} bytes its header states",
                header.original_len
            )));
        }
        crc = crc32c::crc32c_append(crc, bytes);
        sink(offset, bytes).map_err(Sink)?;
        offset += bytes.len() as u64;
        Ok(())
    };
    match header.compression {
        Compression::None => {
            for chunk in payload.chunks(STREAM_CHUNK) {
                emit(chunk)?;
            }
        }
        Compression::Lz4 => {
            let len = usize::try_from(header.original_len)
                .map_err(|_| Corrupt("object too large".into()))?;
            emit(
                &header
                    .compression
                    .decompress(payload, len)
                    .map_err(Corrupt)?,
            )?;
        }
        Compression::Zstd => {
            let taken = STREAM_STATES.lock().ok().and_then(|mut idle| idle.pop());
            let mut state =
                taken.unwrap_or_else(|| (zstd::zstd_safe::DCtx::create(), vec![0; STREAM_CHUNK]));
            let result = zstd_stream(payload, &mut state, &mut emit);
            if let Ok(mut idle) = STREAM_STATES.lock() {
                idle.push(state);
            }
            result?;
        }
    }
    if offset != header.original_len {
        return Err(Corrupt(format!(
            "decompressed to {offset} bytes, expected {}",
            header.original_len
        )));
    }
    if crc != header.original_crc {
        return Err(Corrupt(format!(
            "content checksum {crc:08x} differs from the stored {:08x}",
            header.original_crc
        )));
    }
    Ok(offset)
}

/// Whether the object `stored` holds exactly `data`, decompressed a chunk at a time and compared as
/// it goes (nothing of its size is allocated). `Err` when the object fails verification.
///
/// # Errors
/// The check that failed, as [`decode_to`] reports it.
pub fn same_content(stored: &[u8], data: &[u8]) -> Result<bool, String> {
    let header = decode_header(stored)?;
    if header.original_len != data.len() as u64 {
        // Still verified whole: a damaged object is reported, not taken for a different one.
        return decode_to(stored, |_, _| Ok(()))
            .map(|_| false)
            .map_err(describe);
    }
    let mut same = true;
    decode_to(stored, |at, bytes| {
        let at = usize::try_from(at).unwrap_or(usize::MAX);
        if data.get(at..at.saturating_add(bytes.len())) != Some(bytes) {
            same = false;
        }
        Ok(())
    })
    .map_err(describe)?;
    Ok(same)
}

fn describe(e: DecodeToError) -> String {
    match e {
        DecodeToError::Corrupt(detail) => detail,
        DecodeToError::Sink(e) => e.to_string(),
    }
}

/// [`decode_to`] with the zstd frames of a payload written by [`encode_parallel`] decoded on up to
/// `threads` threads at once, each streaming its frame to `sink` at the frame's offset (so calls
/// arrive out of order, from several threads). The content checksum is combined from the frames'.
///
/// # Errors
/// As [`decode_to`].
pub fn decode_to_parallel(
    stored: &[u8],
    threads: usize,
    sink: impl Fn(u64, &[u8]) -> std::io::Result<()> + Sync,
) -> Result<u64, DecodeToError> {
    use DecodeToError::{Corrupt, Sink};
    let header = decode_header(stored).map_err(Corrupt)?;
    let payload = payload(stored, &header).map_err(Corrupt)?;
    let frames = match header.compression {
        Compression::Zstd if threads > 1 => zstd_frames(payload).map_err(Corrupt)?,
        _ => Vec::new(),
    };
    let sizes: Option<Vec<usize>> = frames.iter().map(|f| f.1).collect();
    let sizes = match sizes {
        Some(sizes)
            if frames.len() > 1 && sizes.iter().sum::<usize>() as u64 == header.original_len =>
        {
            sizes
        }
        _ => return decode_to(stored, sink),
    };
    if crc32c::crc32c(payload) != le32(stored, 24) {
        return Err(Corrupt("payload checksum mismatch".into()));
    }
    let offsets: Vec<u64> = sizes
        .iter()
        .scan(0u64, |at, &n| {
            let this = *at;
            *at += n as u64;
            Some(this)
        })
        .collect();
    let next = std::sync::atomic::AtomicUsize::new(0);
    let (frames, sink) = (&frames, &sink);
    let (sizes_ref, offsets) = (&sizes, &offsets);
    let done = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads.min(frames.len()))
            .map(|_| {
                let next = &next;
                s.spawn(move || -> Result<Vec<(usize, u32)>, DecodeToError> {
                    let mut mine = Vec::new();
                    let mut state = STREAM_STATES
                        .lock()
                        .ok()
                        .and_then(|mut idle| idle.pop())
                        .unwrap_or_else(new_stream_state);
                    let result = loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let Some(frame) = frames.get(i) else {
                            break Ok(());
                        };
                        let (Some(&size), Some(&base)) = (sizes_ref.get(i), offsets.get(i)) else {
                            break Err(Corrupt("a frame has no size or offset".into()));
                        };
                        let (mut crc, mut pos) = (0u32, 0usize);
                        let streamed = zstd_stream(frame.0, &mut state, &mut |bytes: &[u8]| {
                            if pos + bytes.len() > size {
                                return Err(Corrupt(format!(
                                    "a frame decompresses to more than the {size} bytes it declares"
                                )));
                            }
                            crc = crc32c::crc32c_append(crc, bytes);
                            sink(base + pos as u64, bytes).map_err(Sink)?;
                            pos += bytes.len();
                            Ok(())
                        });
                        if let Err(e) = streamed {
                            break Err(e);
                        }
                        if pos != size {
                            break Err(Corrupt(format!(
                                "a frame decompressed to {pos} bytes, expected {size}"
                            )));
                        }
                        mine.push((i, crc));
                    };
                    if let Ok(mut idle) = STREAM_STATES.lock() {
                        idle.push(state);
                    }
                    result.map(|()| mine)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join().unwrap_or_else(|_| {
                    Err(Sink(std::io::Error::other("decompression thread panicked")))
                })
            })
            .collect::<Result<Vec<_>, DecodeToError>>()
    })?;
    let mut done: Vec<(usize, u32)> = done.into_iter().flatten().collect();
    done.sort_unstable_by_key(|d| d.0);
    let crc = done.iter().fold(0, |acc, &(i, c)| {
        crc32c::crc32c_combine(acc, c, sizes.get(i).copied().unwrap_or_default())
    });
    if crc != header.original_crc {
        return Err(Corrupt(format!(
            "content checksum {crc:08x} differs from the stored {:08x}",
            header.original_crc
        )));
    }
    Ok(header.original_len)
}

fn new_stream_state() -> StreamState {
    (zstd::zstd_safe::DCtx::create(), vec![0; STREAM_CHUNK])
}

/// Decompress the zstd `payload` chunk by chunk into `emit`.
fn zstd_stream(
    payload: &[u8],
    (dctx, chunk): &mut StreamState,
    emit: &mut impl FnMut(&[u8]) -> Result<(), DecodeToError>,
) -> Result<(), DecodeToError> {
    use zstd::zstd_safe::{InBuffer, OutBuffer, ResetDirective};
    let zerr =
        |code| DecodeToError::Corrupt(format!("zstd: {}", zstd::zstd_safe::get_error_name(code)));
    dctx.reset(ResetDirective::SessionOnly).map_err(zerr)?;
    let mut input = InBuffer::around(payload);
    let mut frame_done = true;
    while input.pos() < payload.len() || !frame_done {
        let before = input.pos();
        let mut out = OutBuffer::around(&mut chunk[..]);
        let hint = dctx.decompress_stream(&mut out, &mut input).map_err(zerr)?;
        let produced = out.pos();
        frame_done = hint == 0;
        if produced > 0 {
            emit(chunk.get(..produced).unwrap_or_default())?;
        } else if input.pos() == before {
            return Err(DecodeToError::Corrupt(
                "zstd: the payload ends inside a frame".into(),
            ));
        }
    }
    Ok(())
}

/// One zstd frame of a payload and the content size it declares, if any.
type Frame<'a> = (&'a [u8], Option<usize>);

/// The zstd frames of `payload`, each with its declared content size (if it declares one).
fn zstd_frames(payload: &[u8]) -> Result<Vec<Frame<'_>>, String> {
    let mut frames = Vec::new();
    let mut rest = payload;
    while !rest.is_empty() {
        let n = zstd::zstd_safe::find_frame_compressed_size(rest)
            .map_err(|code| format!("zstd: {}", zstd::zstd_safe::get_error_name(code)))?;
        if n == 0 || n > rest.len() {
            return Err("zstd: bad frame length".into());
        }
        let (frame, tail) = rest.split_at(n);
        let size = zstd::zstd_safe::get_frame_content_size(frame)
            .ok()
            .flatten()
            .and_then(|s| usize::try_from(s).ok());
        frames.push((frame, size));
        rest = tail;
    }
    Ok(frames)
}

#[cfg(test)]
#[allow(clippy::indexing_slicing)] // tests index fixtures they built
mod tests {
    #[test]
    fn a_framed_writer_writes_what_encode_would_decode_to() {
        use std::io::Write;
        for compression in [Compression::Zstd, Compression::Lz4, Compression::None] {
            for len in [0usize, 1, 1000, PARALLEL_PIECE, 2 * PARALLEL_PIECE + 12_345] {
                let data: Vec<u8> = (0..len)
                    .map(|i| (i % 251) as u8 ^ (i / 7919) as u8)
                    .collect();
                let mut w = FramedWriter::new(compression);
                // In uneven writes, some crossing window boundaries.
                for chunk in data.chunks(777_777) {
                    w.write_all(chunk).unwrap();
                }
                let stored = w.finish().unwrap();
                assert_eq!(decode(&stored).unwrap(), data, "{compression:?} {len}");
                let frames = decode_header(&stored).unwrap();
                assert_eq!(frames.original_len, len as u64);
                // Read back as a stream, also by a reader that stops early.
                let streamed = decode_streaming(&stored, |r| {
                    let mut v = Vec::new();
                    r.read_to_end(&mut v).map(|_| v)
                });
                assert_eq!(streamed.unwrap().unwrap(), data);
                assert!(decode_streaming(&stored, |_| ()).is_ok());
                // Any flipped byte is found, however little the reader read.
                for at in [HEADER_LEN, stored.len() / 2, stored.len() - 1] {
                    if at < HEADER_LEN || at >= stored.len() {
                        continue;
                    }
                    let mut bad = stored.clone();
                    bad[at] ^= 0x40;
                    assert!(
                        decode_streaming(&bad, |_| ()).is_err(),
                        "{compression:?} {len} {at}"
                    );
                }
            }
        }
    }

    use super::*;

    fn sample() -> Vec<u8> {
        (0..100_000u32)
            .map(|i| (i % 251) as u8 ^ (i / 1000) as u8)
            .collect()
    }

    #[test]
    fn round_trips_every_algorithm() {
        let data = sample();
        for c in [Compression::None, Compression::Zstd, Compression::Lz4] {
            let stored = encode(&data, c).unwrap();
            assert_eq!(decode_header(&stored).unwrap().compression, c);
            assert_eq!(decode(&stored).unwrap(), data);
            if c != Compression::None {
                assert!(stored.len() < data.len() / 2, "{c} should compress");
            }
        }
        assert_eq!(
            decode(&encode(b"", Compression::Zstd).unwrap()).unwrap(),
            b""
        );
    }

    #[test]
    fn content_is_compared_without_decoding_it_whole() {
        let data = sample();
        for c in [Compression::None, Compression::Zstd, Compression::Lz4] {
            let stored = encode_parallel(&data, c, 2, None).unwrap();
            assert_eq!(same_content(&stored, &data), Ok(true), "{c}");
            let mut other = data.clone();
            if let Some(b) = other.last_mut() {
                *b ^= 1;
            }
            assert_eq!(same_content(&stored, &other), Ok(false), "{c}");
            assert_eq!(same_content(&stored, &data[1..]), Ok(false), "{c}");
            let mut damaged = stored.clone();
            if let Some(b) = damaged.last_mut() {
                *b ^= 1;
            }
            assert!(same_content(&damaged, &data).is_err(), "{c}");
        }
    }

    /// `data` in an envelope of `c` on `threads` threads, carrying `attachment`'s envelope.
    fn with_attachment(data: &[u8], c: Compression, threads: usize, attachment: &[u8]) -> Vec<u8> {
        let (stored, _) = encode_parallel_beside(data, c, threads, None, None, || ());
        let sealed = encode(attachment, Compression::Zstd).unwrap();
        attach(stored.unwrap(), &sealed).unwrap().into_vec()
    }

    #[test]
    fn an_attachment_rides_after_the_payload_and_is_found_from_either_end() {
        let data: Vec<u8> = sample().repeat(60); // 6 MB: compressed in pieces on 2 threads
        // Not compressible, so longer than the 100-byte tail read first below.
        let note: Vec<u8> = (0..3000u64)
            .map(|i| {
                (i.wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407)
                    >> 33) as u8
            })
            .collect();
        for (c, threads) in [
            (Compression::None, 1),
            (Compression::Zstd, 1),
            (Compression::Zstd, 2),
            (Compression::Lz4, 1),
        ] {
            let stored = with_attachment(&data, c, threads, &note);
            assert_eq!(&stored[..8], MAGIC_ATTACHED);
            // Every reader of the payload sees the original, nothing of the attachment.
            assert_eq!(decode(&stored).unwrap(), data, "{c}");
            assert_eq!(streamed(&stored).unwrap(), data, "{c}");
            assert_eq!(streamed_parallel(&stored, 2).unwrap(), data, "{c}");
            assert_eq!(same_content(&stored, &data), Ok(true), "{c}");
            assert_eq!(same_content(&stored, &data[1..]), Ok(false), "{c}");
            // From the header.
            assert_eq!(decode(attachment(&stored).unwrap().unwrap()).unwrap(), note);
            // From the tail alone: too short says how much more; long enough finds it.
            let need = match attachment_in_tail(&stored[stored.len() - 100..]).unwrap() {
                Tail::Need(n) => n,
                other => panic!("{other:?}"),
            };
            assert_eq!(need, decode_header(&stored).unwrap().trailer_len);
            for len in [need, need + 1, stored.len()] {
                match attachment_in_tail(&stored[stored.len() - len..]).unwrap() {
                    Tail::Found(a) => assert_eq!(decode(a).unwrap(), note),
                    other => panic!("{len}: {other:?}"),
                }
            }
            // A format 1 object has none, from either end.
            let plain = encode(&data, c).unwrap();
            assert_eq!(attachment(&plain), Ok(None));
            assert_eq!(
                attachment_in_tail(&plain[plain.len() - 4096..]),
                Ok(Tail::None)
            );
        }
        // Only a format 1 envelope takes one.
        let stored = with_attachment(&data, Compression::Zstd, 2, &note);
        assert!(attach(stored.into(), b"x").is_err());
    }

    #[test]
    fn a_damaged_attachment_is_caught_and_leaves_the_payload_readable() {
        let data = sample();
        let note = b"summary".repeat(100);
        let stored = with_attachment(&data, Compression::Zstd, 1, &note);
        let trailer = decode_header(&stored).unwrap().trailer_len;
        for pos in stored.len() - trailer..stored.len() {
            let mut bad = stored.clone();
            bad[pos] ^= 0x01;
            // The payload does not depend on the trailer.
            assert_eq!(decode(&bad).unwrap(), data, "flip at {pos}");
            // The attachment's checks catch it, from the header and from the tail.
            let whole = attachment(&bad).and_then(|a| decode(a.unwrap_or_default()));
            assert!(whole.is_err(), "flip at {pos}: {whole:?}");
            // (Read from a tail as long as the whole object: a footer asking for more than that
            // is refused by the reader, `Repo::get_attached`.)
            let tail = match attachment_in_tail(&bad) {
                Ok(Tail::Found(a)) => decode(a).map(|_| ()),
                Ok(Tail::Need(n)) if n > bad.len() => Err("longer than the object".into()),
                Ok(_) => Ok(()),
                Err(e) => Err(e),
            };
            // (A flipped footer magic reads as "no attachment": the tail reader then finds none,
            // which leaves the segment unindexed, never misindexed.)
            let in_magic = pos >= stored.len() - 8;
            assert!(tail.is_err() || in_magic, "flip at {pos}");
        }
        // The header states the trailer: a flip there, or a cut, is the header's or the
        // payload's failure.
        let mut bad = stored.clone();
        bad[9] ^= 0x01;
        assert!(decode(&bad).is_err());
        assert!(decode(&stored[..stored.len() - 1]).is_err());
        assert!(decode(&stored[..HEADER_LEN + 3]).is_err());
    }

    #[test]
    fn every_flipped_byte_is_detected() {
        let data = sample();
        for c in [Compression::None, Compression::Zstd, Compression::Lz4] {
            let stored = encode(&data, c).unwrap();
            // Every header byte and a spread of payload bytes.
            let positions = (0..HEADER_LEN).chain((HEADER_LEN..stored.len()).step_by(97));
            for pos in positions {
                let mut bad = stored.clone();
                bad[pos] ^= 0x01;
                assert!(decode(&bad).is_err(), "{c}: flip at {pos} went unnoticed");
            }
            assert!(decode(&stored[..stored.len() - 1]).is_err());
            assert!(decode(&stored[..10]).is_err());
        }
        assert!(decode(b"not an object at all, just some text").is_err());
    }

    /// `decode_to` in chunks, collected.
    fn streamed(stored: &[u8]) -> Result<Vec<u8>, String> {
        let mut out = Vec::new();
        decode_to(stored, |off, b| {
            assert_eq!(off, out.len() as u64, "chunks arrive in order");
            out.extend_from_slice(b);
            Ok(())
        })
        .map_err(|e| format!("{e:?}"))?;
        Ok(out)
    }

    /// `decode_to_parallel` on `threads` threads, collected.
    fn streamed_parallel(stored: &[u8], threads: usize) -> Result<Vec<u8>, String> {
        let len = decode_header(stored)?.original_len as usize;
        let out = std::sync::Mutex::new(vec![0u8; len]);
        let n = decode_to_parallel(stored, threads, |off, b| {
            let off = off as usize;
            out.lock().unwrap()[off..off + b.len()].copy_from_slice(b);
            Ok(())
        })
        .map_err(|e| format!("{e:?}"))?;
        assert_eq!(n as usize, len);
        Ok(out.into_inner().unwrap())
    }

    #[test]
    fn streaming_decode_matches_and_catches_damage() {
        let data: Vec<u8> = (0..9u32 << 20)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8 & (i >> 12) as u8)
            .collect();
        for c in [Compression::None, Compression::Zstd, Compression::Lz4] {
            for threads in [1, 2] {
                let stored = encode_parallel(&data, c, threads, None).unwrap();
                assert_eq!(
                    streamed(&stored).unwrap(),
                    data,
                    "{c} from {threads} threads"
                );
                let mut bad = stored.clone();
                let mid = HEADER_LEN + (bad.len() - HEADER_LEN) / 2;
                bad[mid] ^= 1;
                assert!(streamed(&bad).is_err(), "{c}: payload flip");
                assert!(streamed_parallel(&bad, 2).is_err(), "{c}: payload flip");
                assert!(
                    streamed(&stored[..stored.len() - 1]).is_err(),
                    "{c}: truncated"
                );
            }
        }
        assert_eq!(
            streamed(&encode(b"", Compression::Zstd).unwrap()).unwrap(),
            b""
        );
        // A payload whose checksums were recomputed over a truncated zstd stream: only the stream's
        // own end (and the length check) can notice.
        let stored = encode(&data, Compression::Zstd).unwrap();
        let cut = &stored[HEADER_LEN..stored.len() - 100];
        let forged = assemble(
            Compression::Zstd,
            data.len(),
            crc32c::crc32c(&data),
            &[cut.to_vec()],
        );
        assert!(streamed(&forged).is_err());
        // The same for a two-frame payload whose second frame was cut and its checksums recomputed.
        let two = encode_parallel(&data, Compression::Zstd, 2, None).unwrap();
        let cut = &two[HEADER_LEN..two.len() - 100];
        let forged = assemble(
            Compression::Zstd,
            data.len(),
            crc32c::crc32c(&data),
            &[cut.to_vec()],
        );
        assert!(streamed_parallel(&forged, 2).is_err());
        // A sink error stops the decode and is passed back as is.
        let err = decode_to(&stored, |_, _| Err(std::io::Error::other("disk full"))).unwrap_err();
        assert!(
            matches!(err, DecodeToError::Sink(ref e) if e.to_string() == "disk full"),
            "{err:?}"
        );
    }

    #[test]
    fn parallel_zstd_frames_decode_as_one_object() {
        // 9 MiB of bytes repetitive only nearby, as in WAL: five frames (four of 2 MiB).
        let data: Vec<u8> = (0..9u32 << 20)
            .map(|i| {
                let word = (i / 2).wrapping_mul(2_654_435_761) >> 28;
                b"abcdefghijklmnop"[word as usize] ^ ((i >> 13) as u8 & 1)
            })
            .collect();
        for threads in [1, 2, 3] {
            for c in [Compression::None, Compression::Zstd, Compression::Lz4] {
                let stored = encode_parallel(&data, c, threads, None).unwrap();
                assert_eq!(decode(&stored).unwrap(), data, "{c} on {threads} threads");
                for readers in [1, 2, 3] {
                    assert_eq!(streamed_parallel(&stored, readers).unwrap(), data);
                    let mut bad = stored.clone();
                    let last = bad.len() - 1;
                    bad[last] ^= 1;
                    assert!(streamed_parallel(&bad, readers).is_err());
                }
                let with_crc =
                    encode_parallel(&data, c, threads, Some(crc32c::crc32c(&data))).unwrap();
                assert_eq!(with_crc, stored);
            }
        }
        let one = encode(&data, Compression::Zstd).unwrap();
        let two = encode_parallel(&data, Compression::Zstd, 2, None).unwrap();
        assert_ne!(one, two, "two threads should have written two frames");
        assert!(
            two.len() <= one.len() + one.len() / 100,
            "{} vs {}",
            two.len(),
            one.len()
        );
    }

    #[test]
    fn a_source_read_a_window_at_a_time_encodes_as_the_whole_does() {
        // Frames of the same windows: the bytes equal those of the whole buffer compressed in
        // pieces, on any number of threads.
        let data: Vec<u8> = (0..(9u32 << 20) + 8192)
            .map(|i| (i / 3).wrapping_mul(2_654_435_761).to_le_bytes()[3] & 0x0F)
            .collect();
        let whole = encode_parallel(&data, Compression::Zstd, 2, None).unwrap();
        let read = |offset: u64, buf: &mut [u8]| {
            let at = offset as usize;
            match data.get(at..at + buf.len()) {
                Some(src) => {
                    buf.copy_from_slice(src);
                    Ok(())
                }
                None => Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof)),
            }
        };
        for threads in [1, 2, 3, 8] {
            let sunk = std::sync::Mutex::new(Vec::new());
            let sink = |offset: u64, frame: &[u8]| {
                let mut s = sunk.lock().unwrap();
                assert_eq!(offset as usize, HEADER_LEN + s.len(), "frames in order");
                s.extend_from_slice(frame);
            };
            let mut seen = Vec::new();
            let (stored, beside) = encode_read_beside(
                data.len(),
                &read,
                threads,
                Some(&sink),
                &mut |w: &[u8]| seen.extend_from_slice(w),
            );
            beside.unwrap();
            let stored = stored.unwrap().into_vec();
            assert_eq!(stored, whole, "{threads} threads");
            assert_eq!(seen, data, "beside saw every byte in order");
            assert_eq!(&sunk.into_inner().unwrap()[..], &stored[HEADER_LEN..]);
            // A source shorter than it said is an error, not a short object.
            let (short, _) = encode_read_beside(data.len() + 1, &read, threads, None, &mut |_| {});
            assert_eq!(short.unwrap_err().kind(), std::io::ErrorKind::UnexpectedEof);
            // A panic beside is reported; the envelope is still whole.
            let (stored, beside) =
                encode_read_beside(data.len(), &read, threads, None, &mut |_| panic!("index"));
            assert!(beside.is_err());
            assert_eq!(stored.unwrap().into_vec(), whole);
        }
        let (empty, _) = encode_read_beside(0, &read, 2, None, &mut |_| {});
        assert_eq!(decode(&empty.unwrap().into_vec()).unwrap(), b"");
    }
}
