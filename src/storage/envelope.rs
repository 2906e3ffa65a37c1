//! The envelope every stored object is wrapped in: a 32-byte header carrying the compression
//! algorithm, the original length, a CRC-32C of the original bytes and of the stored payload, and a
//! CRC-32C of the header itself. Reading an object checks all three before returning a byte.
//!
//! ```text
//! 0..8   magic "PITROBJ1"
//! 8      compression code (0 none, 1 zstd, 2 lz4)
//! 9..12  zero
//! 12..20 original length, u64 LE
//! 20..24 CRC-32C of the original bytes, LE
//! 24..28 CRC-32C of the payload (bytes 32..), LE
//! 28..32 CRC-32C of bytes 0..28, LE
//! 32..   payload
//! ```

#![deny(clippy::indexing_slicing)]

use crate::compress::Compression;

/// Header magic and format version.
pub const MAGIC: &[u8; 8] = b"PITROBJ1";
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
        let done: Vec<Compressed> = done.frames.into_iter().flatten().collect();
        if done.len() != lens.len() {
            return Err(std::io::Error::other("a piece was not compressed"));
        }
        let crc = original_crc.unwrap_or_else(|| {
            done.iter().fold(0, |acc, d| {
                let len = lens.get(d.index).copied().unwrap_or_default();
                crc32c::crc32c_combine(acc, d.piece_crc.unwrap_or_default(), len)
            })
        });
        let payload_crc = done.iter().fold(0, |acc, d| {
            crc32c::crc32c_combine(acc, d.frame_crc, d.frame_len)
        });
        let payload_len = done.iter().map(|d| d.frame_len).sum();
        let out = bytes::Bytes::from(out);
        let mut parts = Vec::with_capacity(done.len() + 1);
        parts.push(bytes::Bytes::from(header(
            compression,
            data.len(),
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
    });
    (stored, other)
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
        let poisoned = || std::io::Error::other("a compression thread panicked");
        let mut z: Option<zstd::bulk::Compressor<'static>> = None;
        loop {
            let index = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let (Some(piece), Some(region)) = (self.chunks.get(index), self.regions.get(index))
            else {
                return Ok(());
            };
            let z = match &mut z {
                Some(z) => z,
                None => z.insert(zstd::bulk::Compressor::new(crate::compress::ZSTD_LEVEL)?),
            };
            let piece_crc = self.want_crc.then(|| crc32c::crc32c(piece));
            let (frame_len, frame_crc) = {
                let mut region = region.lock().map_err(|_| poisoned())?;
                let frame_len = z.compress_to_buffer(piece, &mut **region)?;
                let frame = region
                    .get(..frame_len)
                    .ok_or_else(|| std::io::Error::other("the compressor wrote past its buffer"))?;
                (frame_len, crc32c::crc32c(frame))
            };
            let mut done = self.done.lock().map_err(|_| poisoned())?;
            if let Some(slot) = done.frames.get_mut(index) {
                *slot = Some(Compressed {
                    index,
                    frame_len,
                    frame_crc,
                    piece_crc,
                });
            }
            if let Some(sink) = self.sink {
                // Hand over every frame now preceded only by frames already handed over.
                while let Some(Some(next)) = done.frames.get(done.flushed) {
                    let len = next.frame_len;
                    let region = self
                        .regions
                        .get(done.flushed)
                        .ok_or_else(|| std::io::Error::other("no region for a piece"))?
                        .lock()
                        .map_err(|_| poisoned())?;
                    let frame = region.get(..len).ok_or_else(|| {
                        std::io::Error::other("a frame is longer than its buffer")
                    })?;
                    sink(done.offset, frame);
                    done.offset += len as u64;
                    done.flushed += 1;
                }
            }
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
    if stored.get(..8) != Some(MAGIC.as_slice()) {
        return Err("object does not start with pitr's header magic".into());
    }
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
    Ok(Header {
        compression,
        original_len,
        original_crc: le32(stored, 20),
    })
}

/// Verify and unwrap a stored object, returning the original bytes.
///
/// # Errors
/// A description of the first check that failed.
pub fn decode(stored: &[u8]) -> Result<Vec<u8>, String> {
    let header = decode_header(stored)?;
    let payload = stored.get(HEADER_LEN..).unwrap_or_default();
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
    let payload = stored.get(HEADER_LEN..).unwrap_or_default();
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
    let payload = stored.get(HEADER_LEN..).unwrap_or_default();
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
}
