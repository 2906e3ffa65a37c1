//! Compression algorithms for stored objects.

use std::fmt;

/// How an object's bytes are compressed in the repository.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    /// Zstandard at level 3: a good ratio at the speed archiving needs.
    #[default]
    Zstd,
    /// LZ4 block compression: faster, larger.
    Lz4,
    /// Stored as is.
    None,
}

/// The zstd level used for `Compression::Zstd`.
pub const ZSTD_LEVEL: i32 = 3;

impl Compression {
    /// The code stored in an object header.
    pub fn code(self) -> u8 {
        match self {
            Compression::None => 0,
            Compression::Zstd => 1,
            Compression::Lz4 => 2,
        }
    }

    /// The algorithm with this header code.
    pub fn from_code(code: u8) -> Option<Compression> {
        [Compression::None, Compression::Zstd, Compression::Lz4]
            .into_iter()
            .find(|c| c.code() == code)
    }

    /// Compress `data`.
    ///
    /// # Errors
    /// Only if zstd fails to allocate its context.
    pub fn compress(self, data: &[u8]) -> std::io::Result<Vec<u8>> {
        Ok(match self {
            Compression::None => data.to_vec(),
            Compression::Zstd => with_compressor(|z| z.compress(data))?,
            Compression::Lz4 => lz4_flex::block::compress(data),
        })
    }

    /// Decompress `data` into exactly `orig_len` bytes.
    ///
    /// # Errors
    /// A message when the payload does not decode to `orig_len` bytes.
    pub fn decompress(self, data: &[u8], orig_len: usize) -> Result<Vec<u8>, String> {
        let out = match self {
            Compression::None => data.to_vec(),
            Compression::Zstd => {
                zstd::bulk::decompress(data, orig_len).map_err(|e| format!("zstd: {e}"))?
            }
            Compression::Lz4 => {
                lz4_flex::block::decompress(data, orig_len).map_err(|e| format!("lz4: {e}"))?
            }
        };
        if out.len() != orig_len {
            return Err(format!(
                "decompressed to {} bytes, expected {orig_len}",
                out.len()
            ));
        }
        Ok(out)
    }
}

/// Idle zstd compression contexts. Creating one per call costs an allocation of its tables and a
/// page fault for each of their pages, which for a backup of thousands of small files measured as
/// more than the compression itself; so each is kept for the next call. Never more than the most
/// compressions ever run at once (at most one per CPU, `cpu::slots`).
static COMPRESSORS: std::sync::Mutex<Vec<zstd::bulk::Compressor<'static>>> =
    std::sync::Mutex::new(Vec::new());

/// Run `f` with an idle zstd context (a new one if none is idle), and keep it for the next call.
///
/// # Errors
/// zstd cannot allocate a context, or what `f` returns.
pub fn with_compressor<R>(
    f: impl FnOnce(&mut zstd::bulk::Compressor<'static>) -> std::io::Result<R>,
) -> std::io::Result<R> {
    let idle = COMPRESSORS.lock().ok().and_then(|mut idle| idle.pop());
    let mut z = match idle {
        Some(z) => z,
        None => zstd::bulk::Compressor::new(ZSTD_LEVEL)?,
    };
    let result = f(&mut z);
    if let Ok(mut idle) = COMPRESSORS.lock() {
        idle.push(z);
    }
    result
}

impl fmt::Display for Compression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Compression::Zstd => "zstd",
            Compression::Lz4 => "lz4",
            Compression::None => "none",
        })
    }
}
