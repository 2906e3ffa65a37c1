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

/// The smallest piece worth compressing on its own thread: below this the lost history costs ratio
/// and the thread costs more than it saves.
pub const MIN_PARALLEL_PIECE: usize = 4 << 20;

/// Like [`encode`], but compressing with zstd on up to `threads` threads at once. Each thread
/// compresses one contiguous piece into its own zstd frame; concatenated frames are one valid zstd
/// stream, so readers need nothing new. At level 3 zstd looks back only 2 MiB, so pieces of 4 MiB
/// and more cost almost no ratio. `original_crc` may be passed when the caller already has it.
/// Other algorithms are compressed on the calling thread.
///
/// # Errors
/// Only if a compressor fails to allocate.
pub fn encode_parallel(
    data: &[u8],
    compression: Compression,
    threads: usize,
    original_crc: Option<u32>,
) -> std::io::Result<Vec<u8>> {
    let pieces = if threads > 1 {
        (data.len() / MIN_PARALLEL_PIECE).max(1)
    } else {
        1
    };
    if compression != Compression::Zstd || pieces == 1 {
        let payload = compression.compress(data)?;
        let crc = original_crc.unwrap_or_else(|| crc32c::crc32c(data));
        return Ok(assemble(compression, data.len(), crc, &[payload]));
    }
    // More pieces than threads, handed out one at a time: a thread slowed by other work (the WAL
    // index, another process) takes fewer, so both cores finish together.
    let piece_len = data.len().div_ceil(pieces);
    let chunks: Vec<&[u8]> = data.chunks(piece_len).collect();
    let want_crc = original_crc.is_none();
    let next = std::sync::atomic::AtomicUsize::new(0);
    type Done = (usize, Vec<u8>, Option<u32>);
    let mut done: Vec<Done> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads.min(chunks.len()))
            .map(|_| {
                s.spawn(|| -> std::io::Result<Vec<Done>> {
                    let mut z = zstd::bulk::Compressor::new(crate::compress::ZSTD_LEVEL)?;
                    let mut mine = Vec::new();
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let Some(piece) = chunks.get(i) else {
                            return Ok(mine);
                        };
                        let crc = want_crc.then(|| crc32c::crc32c(piece));
                        mine.push((i, z.compress(piece)?, crc));
                    }
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(std::io::Error::other("compression thread panicked")))
            })
            .collect::<std::io::Result<Vec<_>>>()
    })?
    .into_iter()
    .flatten()
    .collect();
    done.sort_unstable_by_key(|d| d.0);
    let crc = original_crc.unwrap_or_else(|| {
        done.iter().fold(0, |acc, (i, _, c)| {
            crc32c::crc32c_combine(acc, c.unwrap_or_default(), chunks[*i].len())
        })
    });
    let frames: Vec<Vec<u8>> = done.into_iter().map(|(_, frame, _)| frame).collect();
    Ok(assemble(compression, data.len(), crc, &frames))
}

/// The header for `original_len` bytes with `original_crc`, followed by the payload pieces.
fn assemble(
    compression: Compression,
    original_len: usize,
    original_crc: u32,
    payload: &[Vec<u8>],
) -> Vec<u8> {
    let payload_len: usize = payload.iter().map(Vec::len).sum();
    let mut out = Vec::with_capacity(HEADER_LEN + payload_len);
    out.extend_from_slice(MAGIC);
    out.push(compression.code());
    out.extend_from_slice(&[0, 0, 0]);
    out.extend_from_slice(&(original_len as u64).to_le_bytes());
    out.extend_from_slice(&original_crc.to_le_bytes());
    let payload_crc = payload
        .iter()
        .fold(0, |crc, p| crc32c::crc32c_append(crc, p));
    out.extend_from_slice(&payload_crc.to_le_bytes());
    let header_crc = crc32c::crc32c(&out[..28]);
    out.extend_from_slice(&header_crc.to_le_bytes());
    for p in payload {
        out.extend_from_slice(p);
    }
    out
}

fn le32(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}

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
    if &stored[..8] != MAGIC {
        return Err("object does not start with pitr's header magic".into());
    }
    if crc32c::crc32c(&stored[..28]) != le32(stored, 28) {
        return Err("header checksum mismatch".into());
    }
    let compression = Compression::from_code(stored[8])
        .ok_or_else(|| format!("unknown compression code {}", stored[8]))?;
    let mut len = [0u8; 8];
    len.copy_from_slice(&stored[12..20]);
    let original_len = u64::from_le_bytes(len);
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
    let payload = &stored[HEADER_LEN..];
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
    let payload = &stored[HEADER_LEN..];
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
    let payload = &stored[HEADER_LEN..];
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
                        let (size, base) = (sizes_ref[i], offsets[i]);
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
    let crc = done
        .iter()
        .fold(0, |acc, &(i, c)| crc32c::crc32c_combine(acc, c, sizes[i]));
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
            emit(&chunk[..produced])?;
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
        // 9 MiB of varied bytes: two 4.5 MiB frames on two threads.
        let data: Vec<u8> = (0..9u32 << 20)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8 & (i >> 12) as u8)
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
            two.len() <= one.len() + (64 << 10),
            "{} vs {}",
            two.len(),
            one.len()
        );
    }
}
