//! The backend messages a replication connection reads, parsed from their bytes (postgres-protocol
//! encodes the frontend ones; its backend parser knows no CopyBothResponse, which replication
//! needs, so the few messages used here are read by hand).

use bytes::{Buf, Bytes};

/// One backend message: its type byte and its body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// The message type (`R`, `E`, `T`, `D`, `C`, `Z`, `W`, `d`, `c`, …).
    pub tag: u8,
    /// The body, without type and length.
    pub body: Bytes,
}

/// The longest message accepted: a WAL message carries at most a few hundred KiB, a row of
/// `TIMELINE_HISTORY` a history file.
pub const MAX_MESSAGE: usize = 64 << 20;

/// Take one whole message off the front of `buf`, if it holds one.
///
/// # Errors
/// A length below 4 or above [`MAX_MESSAGE`]: not the protocol.
pub fn take_frame(buf: &mut bytes::BytesMut) -> Result<Option<Frame>, String> {
    if buf.len() < 5 {
        return Ok(None);
    }
    let tag = buf[0];
    let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
    if !(4..=MAX_MESSAGE).contains(&len) {
        return Err(format!(
            "message {:?} states a length of {len} bytes",
            char::from(tag)
        ));
    }
    if buf.len() < 1 + len {
        buf.reserve(1 + len - buf.len());
        return Ok(None);
    }
    let mut whole = buf.split_to(1 + len).freeze();
    whole.advance(5);
    Ok(Some(Frame { tag, body: whole }))
}

/// A reader over a message body that fails, never panics, on a short one.
pub struct Body {
    buf: Bytes,
    what: &'static str,
}

impl Body {
    /// Read `frame`'s body, naming it `what` in errors.
    pub fn new(buf: Bytes, what: &'static str) -> Body {
        Body { buf, what }
    }

    fn short(&self) -> String {
        format!("{} message is shorter than its fields", self.what)
    }

    /// One byte.
    pub fn u8(&mut self) -> Result<u8, String> {
        if self.buf.is_empty() {
            return Err(self.short());
        }
        Ok(self.buf.get_u8())
    }

    /// A big-endian `i16`.
    pub fn i16(&mut self) -> Result<i16, String> {
        if self.buf.len() < 2 {
            return Err(self.short());
        }
        Ok(self.buf.get_i16())
    }

    /// A big-endian `i32`.
    pub fn i32(&mut self) -> Result<i32, String> {
        if self.buf.len() < 4 {
            return Err(self.short());
        }
        Ok(self.buf.get_i32())
    }

    /// A big-endian `u64`.
    pub fn u64(&mut self) -> Result<u64, String> {
        if self.buf.len() < 8 {
            return Err(self.short());
        }
        Ok(self.buf.get_u64())
    }

    /// `n` bytes.
    pub fn bytes(&mut self, n: usize) -> Result<Bytes, String> {
        if self.buf.len() < n {
            return Err(self.short());
        }
        Ok(self.buf.split_to(n))
    }

    /// A NUL-terminated string.
    pub fn cstr(&mut self) -> Result<String, String> {
        let Some(end) = self.buf.iter().position(|&b| b == 0) else {
            return Err(format!("{} message has an unterminated string", self.what));
        };
        let s = String::from_utf8_lossy(&self.buf[..end]).into_owned();
        self.buf.advance(end + 1);
        Ok(s)
    }

    /// What is left.
    pub fn rest(self) -> Bytes {
        self.buf
    }
}

/// An `ErrorResponse` or `NoticeResponse` as one line: severity, message, detail and hint.
pub fn error_text(body: Bytes) -> String {
    let mut b = Body::new(body, "error");
    let (mut severity, mut message, mut detail, mut hint, mut code) =
        (String::new(), String::new(), None, None, String::new());
    while let Ok(kind) = b.u8() {
        if kind == 0 {
            break;
        }
        let Ok(value) = b.cstr() else { break };
        match kind {
            b'V' => severity = value,
            b'S' if severity.is_empty() => severity = value,
            b'M' => message = value,
            b'D' => detail = Some(value),
            b'H' => hint = Some(value),
            b'C' => code = value,
            _ => {}
        }
    }
    let mut out = format!("{severity}: {message}");
    if !code.is_empty() {
        out.push_str(&format!(" (SQLSTATE {code})"));
    }
    if let Some(d) = detail {
        out.push_str(&format!("; {d}"));
    }
    if let Some(h) = hint {
        out.push_str(&format!(" (hint: {h})"));
    }
    out
}

/// The SQLSTATE of an `ErrorResponse`.
pub fn error_code(body: Bytes) -> Option<String> {
    let mut b = Body::new(body, "error");
    while let Ok(kind) = b.u8() {
        if kind == 0 {
            return None;
        }
        let value = b.cstr().ok()?;
        if kind == b'C' {
            return Some(value);
        }
    }
    None
}

/// A `DataRow`: each column as text (`None`: NULL).
///
/// # Errors
/// A malformed row.
pub fn data_row(body: Bytes) -> Result<Vec<Option<Bytes>>, String> {
    let mut b = Body::new(body, "DataRow");
    let n = b.i16()?;
    let mut out = Vec::with_capacity(usize::try_from(n).unwrap_or(0));
    for _ in 0..n {
        let len = b.i32()?;
        out.push(match usize::try_from(len) {
            Ok(len) => Some(b.bytes(len)?),
            Err(_) => None,
        });
    }
    Ok(out)
}

/// What the server sends inside the replication stream (CopyData payloads).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamMessage {
    /// `w`: WAL.
    XLogData {
        /// Where the bytes start.
        start: u64,
        /// The server's end of WAL.
        end: u64,
        /// The server's clock (microseconds since 2000-01-01).
        time: i64,
        /// The bytes.
        data: Bytes,
    },
    /// `k`: a keepalive.
    Keepalive {
        /// The server's end of WAL.
        end: u64,
        /// The server's clock.
        time: i64,
        /// Whether it wants a status update now.
        reply: bool,
    },
}

/// Parse one CopyData payload of a physical replication stream.
///
/// # Errors
/// An unknown or short message.
pub fn stream_message(payload: Bytes) -> Result<StreamMessage, String> {
    let mut b = Body::new(payload, "replication");
    match b.u8()? {
        b'w' => {
            let start = b.u64()?;
            let end = b.u64()?;
            let time = b.u64()? as i64;
            Ok(StreamMessage::XLogData {
                start,
                end,
                time,
                data: b.rest(),
            })
        }
        b'k' => {
            let end = b.u64()?;
            let time = b.u64()? as i64;
            let reply = b.u8()? != 0;
            Ok(StreamMessage::Keepalive { end, time, reply })
        }
        other => Err(format!(
            "unknown replication message {:?}",
            char::from(other)
        )),
    }
}

/// The standby status update (`r`): written, flushed and applied positions, the client's clock
/// (microseconds since 2000-01-01), and whether the server should answer at once.
pub fn status_update(write: u64, flush: u64, apply: u64, time: i64, reply: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(34);
    out.push(b'r');
    out.extend_from_slice(&write.to_be_bytes());
    out.extend_from_slice(&flush.to_be_bytes());
    out.extend_from_slice(&apply.to_be_bytes());
    out.extend_from_slice(&time.to_be_bytes());
    out.push(u8::from(reply));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut v = vec![tag];
        v.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
        v.extend_from_slice(body);
        v
    }

    #[test]
    fn frames_come_off_a_stream_whole_and_only_whole() {
        let mut stream = frame(b'Z', b"I");
        stream.extend(frame(b'C', b"IDENTIFY_SYSTEM\0"));
        let mut buf = bytes::BytesMut::new();
        // Byte by byte: nothing until a message is complete.
        let mut got = Vec::new();
        for b in &stream {
            buf.extend_from_slice(&[*b]);
            while let Some(f) = take_frame(&mut buf).unwrap() {
                got.push(f);
            }
        }
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].tag, b'Z');
        assert_eq!(&got[0].body[..], b"I");
        assert_eq!(&got[1].body[..], b"IDENTIFY_SYSTEM\0");
        // A length no message has.
        let mut bad = bytes::BytesMut::from(&[b'D', 0, 0, 0, 2][..]);
        assert!(take_frame(&mut bad).is_err());
        let mut huge = bytes::BytesMut::from(&[b'D', 0x7f, 0, 0, 0][..]);
        assert!(take_frame(&mut huge).is_err());
    }

    #[test]
    fn rows_errors_and_replication_messages_parse_and_short_ones_fail() {
        // IDENTIFY_SYSTEM's row: systemid, timeline, xlogpos, dbname (NULL).
        let mut row = 4i16.to_be_bytes().to_vec();
        for col in [&b"7000000000000000001"[..], b"1", b"0/3000148"] {
            row.extend_from_slice(&(col.len() as i32).to_be_bytes());
            row.extend_from_slice(col);
        }
        row.extend_from_slice(&(-1i32).to_be_bytes());
        let cols = data_row(Bytes::from(row.clone())).unwrap();
        assert_eq!(cols.len(), 4);
        assert_eq!(cols[2].as_deref(), Some(&b"0/3000148"[..]));
        assert_eq!(cols[3], None);
        assert!(data_row(Bytes::from(row[..row.len() - 3].to_vec())).is_err());

        let err = b"SFATAL\0VFATAL\0C28000\0Mno pg_hba.conf entry\0Hadd one\0\0";
        let text = error_text(Bytes::from_static(err));
        assert_eq!(
            text,
            "FATAL: no pg_hba.conf entry (SQLSTATE 28000) (hint: add one)"
        );
        assert_eq!(
            error_code(Bytes::from_static(err)).as_deref(),
            Some("28000")
        );

        let mut w = vec![b'w'];
        w.extend_from_slice(&0x0300_0000u64.to_be_bytes());
        w.extend_from_slice(&0x0300_0100u64.to_be_bytes());
        w.extend_from_slice(&42u64.to_be_bytes());
        w.extend_from_slice(b"walbytes");
        assert_eq!(
            stream_message(Bytes::from(w.clone())).unwrap(),
            StreamMessage::XLogData {
                start: 0x0300_0000,
                end: 0x0300_0100,
                time: 42,
                data: Bytes::from_static(b"walbytes"),
            }
        );
        assert!(stream_message(Bytes::from(w[..20].to_vec())).is_err());
        let mut k = vec![b'k'];
        k.extend_from_slice(&7u64.to_be_bytes());
        k.extend_from_slice(&9u64.to_be_bytes());
        k.push(1);
        assert_eq!(
            stream_message(Bytes::from(k)).unwrap(),
            StreamMessage::Keepalive {
                end: 7,
                time: 9,
                reply: true
            }
        );
        assert!(stream_message(Bytes::from_static(b"x")).is_err());
        let r = status_update(1, 2, 3, 4, true);
        assert_eq!(r.len(), 34);
        assert_eq!(r[0], b'r');
        assert_eq!(r[33], 1);
    }
}
