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
            Compression::Zstd => zstd::bulk::compress(data, ZSTD_LEVEL)?,
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

impl fmt::Display for Compression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Compression::Zstd => "zstd",
            Compression::Lz4 => "lz4",
            Compression::None => "none",
        })
    }
}
