//! Reading the tar streams `BASE_BACKUP` sends: ustar headers (with their `prefix` field),
//! octal or base-256 sizes, file data padded to 512-byte blocks, and no end-of-archive blocks
//! (PostgreSQL leaves them out; zero blocks are accepted all the same). Fed in pieces of any size,
//! as the network delivers them.

use bytes::Bytes;

/// One tar block.
const BLOCK: usize = 512;

/// What a tar header describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A regular file (its data follows).
    File,
    /// A directory.
    Dir,
    /// A symbolic link (to the location in the header).
    Symlink,
    /// Anything else (skipped with its data).
    Other,
}

/// An entry's header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// Its path in the archive (no trailing `/`).
    pub name: String,
    /// What it is.
    pub kind: Kind,
    /// Bytes of data that follow.
    pub size: u64,
    /// Permission bits.
    pub mode: u32,
    /// Modification time (Unix seconds).
    pub mtime: i64,
    /// A symbolic link's target.
    pub link: String,
}

/// What the stream holds, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Item {
    /// A new entry.
    Entry(Header),
    /// Data of the current entry.
    Data(Bytes),
    /// The current entry's data is complete.
    EntryEnd,
}

/// A tar stream read as it arrives.
#[derive(Debug, Default)]
pub struct Reader {
    /// A header being put together.
    header: Vec<u8>,
    /// Data bytes of the current entry still to come, then padding to skip.
    remaining: u64,
    padding: u64,
    in_entry: bool,
}

fn octal(field: &[u8]) -> Result<u64, String> {
    // Base-256 (GNU): the first byte's high bit set, the rest big-endian.
    if field.first().is_some_and(|b| b & 0x80 != 0) {
        let mut v: u64 = u64::from(field.first().copied().unwrap_or(0) & 0x7f);
        for &b in field.get(1..).unwrap_or_default() {
            v = v
                .checked_mul(256)
                .and_then(|v| v.checked_add(u64::from(b)))
                .ok_or("a base-256 number too large")?;
        }
        return Ok(v);
    }
    let text: String = field
        .iter()
        .take_while(|&&b| b != 0)
        .map(|&b| char::from(b))
        .collect();
    let text = text.trim();
    if text.is_empty() {
        return Ok(0);
    }
    u64::from_str_radix(text, 8).map_err(|_| format!("not an octal number: {text:?}"))
}

fn string(field: &[u8]) -> String {
    let end = field.iter().position(|&b| b == 0).unwrap_or(field.len());
    String::from_utf8_lossy(field.get(..end).unwrap_or_default()).into_owned()
}

fn parse_header(block: &[u8]) -> Result<Option<Header>, String> {
    if block.iter().all(|&b| b == 0) {
        return Ok(None);
    }
    let field = |from: usize, len: usize| block.get(from..from + len).unwrap_or_default();
    let stated = octal(field(148, 8))?;
    let sum: u64 = block
        .iter()
        .enumerate()
        .map(|(i, &b)| {
            if (148..156).contains(&i) {
                32
            } else {
                u64::from(b)
            }
        })
        .sum();
    if sum != stated {
        return Err(format!(
            "a tar header whose checksum is {stated}, not {sum}: not a tar stream, or damaged"
        ));
    }
    let mut name = string(field(0, 100));
    if field(257, 5) == b"ustar" {
        let prefix = string(field(345, 155));
        if !prefix.is_empty() {
            name = format!("{prefix}/{name}");
        }
    }
    let kind = match field(156, 1).first().copied().unwrap_or(b'0') {
        b'0' | 0 => Kind::File,
        b'5' => Kind::Dir,
        b'2' => Kind::Symlink,
        _ => Kind::Other,
    };
    let name = name.trim_end_matches('/').to_string();
    if name.is_empty() || name.split('/').any(|p| p == "..") || name.starts_with('/') {
        return Err(format!("a tar entry named {name:?}"));
    }
    Ok(Some(Header {
        name,
        kind,
        size: octal(field(124, 12))?,
        mode: u32::try_from(octal(field(100, 8))? & 0o7777).unwrap_or(0o600),
        mtime: i64::try_from(octal(field(136, 12))?).unwrap_or(0),
        link: string(field(157, 100)),
    }))
}

impl Reader {
    /// A reader at the start of an archive.
    pub fn new() -> Reader {
        Reader::default()
    }

    /// Read `data` (the next bytes of the stream), appending what it holds to `out`.
    ///
    /// # Errors
    /// A header that is not a tar header (its checksum does not match), or an entry name that
    /// would leave the archive.
    pub fn feed(&mut self, mut data: Bytes, out: &mut Vec<Item>) -> Result<(), String> {
        while !data.is_empty() {
            if self.remaining > 0 {
                let take = (self.remaining.min(data.len() as u64)) as usize;
                out.push(Item::Data(data.split_to(take)));
                self.remaining -= take as u64;
                if self.remaining == 0 {
                    out.push(Item::EntryEnd);
                    self.in_entry = false;
                }
                continue;
            }
            if self.padding > 0 {
                let skip = (self.padding.min(data.len() as u64)) as usize;
                let _ = data.split_to(skip);
                self.padding -= skip as u64;
                continue;
            }
            let want = BLOCK - self.header.len();
            let take = want.min(data.len());
            self.header.extend_from_slice(&data.split_to(take));
            if self.header.len() < BLOCK {
                continue;
            }
            let block = std::mem::take(&mut self.header);
            let Some(h) = parse_header(&block)? else {
                continue;
            };
            let size = match h.kind {
                Kind::File | Kind::Other => h.size,
                Kind::Dir | Kind::Symlink => 0,
            };
            self.remaining = size;
            self.padding = (BLOCK as u64 - size % BLOCK as u64) % BLOCK as u64;
            let kind = h.kind;
            out.push(Item::Entry(h));
            if size == 0 {
                out.push(Item::EntryEnd);
            } else {
                self.in_entry = kind == Kind::File || kind == Kind::Other;
            }
        }
        Ok(())
    }

    /// Whether the stream ended between entries (not inside one or inside a header).
    pub fn at_boundary(&self) -> bool {
        self.header.is_empty() && self.remaining == 0 && !self.in_entry
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A ustar header as PostgreSQL's tarCreateHeader writes one.
    fn header(name: &str, kind: u8, size: u64, link: &str) -> Vec<u8> {
        let mut h = vec![0u8; 512];
        h[..name.len()].copy_from_slice(name.as_bytes());
        h[100..108].copy_from_slice(b"0000600\0");
        h[108..116].copy_from_slice(b"0004000\0");
        h[116..124].copy_from_slice(b"0004000\0");
        h[124..136].copy_from_slice(format!("{size:011o}\0").as_bytes());
        h[136..148].copy_from_slice(b"14707316570\0");
        h[156] = kind;
        h[157..157 + link.len()].copy_from_slice(link.as_bytes());
        h[257..263].copy_from_slice(b"ustar\0");
        h[263..265].copy_from_slice(b"00");
        h[148..156].copy_from_slice(b"        ");
        let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
        h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
        h
    }

    fn archive() -> Vec<u8> {
        let mut a = header("base", b'5', 0, "");
        a.extend(header("base/1/1259", b'0', 700, ""));
        a.extend(vec![7u8; 700]);
        a.extend(vec![0u8; 512 - 700 % 512]);
        a.extend(header("pg_tblspc/16384", b'2', 0, "/srv/ts"));
        a.extend(header("global/pg_control", b'0', 512, ""));
        a.extend(vec![9u8; 512]);
        a
    }

    #[test]
    fn entries_and_data_whatever_the_pieces_they_arrive_in() {
        let whole = archive();
        for piece in [1usize, 7, 512, 513, 100_000] {
            let mut r = Reader::new();
            let mut items = Vec::new();
            for chunk in whole.chunks(piece) {
                r.feed(Bytes::copy_from_slice(chunk), &mut items).unwrap();
            }
            assert!(r.at_boundary(), "piece {piece}");
            let mut files: Vec<(String, Vec<u8>)> = Vec::new();
            let mut other = Vec::new();
            for it in items {
                match it {
                    Item::Entry(h) if h.kind == Kind::File => files.push((h.name, Vec::new())),
                    Item::Entry(h) => other.push((h.name, h.kind, h.link)),
                    Item::Data(d) => files.last_mut().unwrap().1.extend_from_slice(&d),
                    Item::EntryEnd => {}
                }
            }
            assert_eq!(files.len(), 2);
            assert_eq!(files[0].0, "base/1/1259");
            assert_eq!(files[0].1, vec![7u8; 700]);
            assert_eq!(files[1], ("global/pg_control".to_string(), vec![9u8; 512]));
            assert_eq!(
                other,
                [
                    ("base".to_string(), Kind::Dir, String::new()),
                    (
                        "pg_tblspc/16384".to_string(),
                        Kind::Symlink,
                        "/srv/ts".to_string()
                    )
                ]
            );
        }
    }

    #[test]
    fn damage_and_escapes_are_refused_and_a_cut_is_seen() {
        let mut bad = archive();
        bad[520] ^= 1;
        let mut items = Vec::new();
        assert!(Reader::new().feed(Bytes::from(bad), &mut items).is_err());
        let escape = header("../etc/passwd", b'0', 0, "");
        assert!(
            Reader::new()
                .feed(Bytes::from(escape), &mut Vec::new())
                .is_err()
        );
        let whole = archive();
        let mut r = Reader::new();
        r.feed(Bytes::copy_from_slice(&whole[..1000]), &mut Vec::new())
            .unwrap();
        assert!(!r.at_boundary(), "cut inside an entry");
        assert_eq!(octal(b"0001750\0").unwrap(), 1000);
        assert_eq!(
            octal(&[0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0]).unwrap(),
            256
        );
    }
}
