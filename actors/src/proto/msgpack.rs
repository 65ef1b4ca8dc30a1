//! A small MessagePack reader over a byte slice, for the session packets:
//! it checks a whole value (every length within the input, no reserved
//! marker, containers at most a given depth) without allocating, and then
//! reads items one at a time, borrowing strings from the input. Decoding a
//! packet this way costs one allocation per text field instead of a tree
//! of values.

use thiserror::Error;

/// The deepest nesting [`Reader::skip_value`] can be asked to allow.
pub const MAX_DEPTH: usize = 32;

/// Why bytes are not one MessagePack value.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum Malformed {
    #[error("truncated at byte {0}")]
    Truncated(usize),
    #[error("reserved marker 0xc1 at byte {0}")]
    Reserved(usize),
    #[error("containers nested more than {0} deep")]
    TooDeep(usize),
}

/// One item: a scalar, or the header of a container whose elements follow.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Item<'a> {
    Nil,
    Bool(bool),
    /// Any integer that is not negative, whatever its encoding.
    Uint(u64),
    Negative(i64),
    Float,
    /// A `str`: its bytes, not checked for UTF-8.
    Str(&'a [u8]),
    Bin(&'a [u8]),
    Ext,
    /// Element count; the elements follow.
    Array(usize),
    /// Entry count; keys and values follow, alternating.
    Map(usize),
}

/// A cursor over MessagePack bytes.
#[derive(Clone)]
pub struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    pub fn new(bytes: &'a [u8]) -> Reader<'a> {
        Reader { bytes, pos: 0 }
    }

    /// Bytes not read yet.
    pub fn remaining(&self) -> usize {
        self.bytes.len() - self.pos
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], Malformed> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&end| end <= self.bytes.len())
            .ok_or(Malformed::Truncated(self.pos))?;
        let taken = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(taken)
    }

    fn be<const N: usize>(&mut self) -> Result<[u8; N], Malformed> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    /// A big-endian length of 1, 2 or 4 bytes.
    fn len(&mut self, width: u8) -> Result<usize, Malformed> {
        Ok(match width {
            1 => self.be::<1>()?[0] as usize,
            2 => u16::from_be_bytes(self.be()?) as usize,
            _ => u32::from_be_bytes(self.be()?) as usize,
        })
    }

    /// A length of `width` bytes, then that many bytes.
    fn sized(&mut self, width: u8) -> Result<&'a [u8], Malformed> {
        let n = self.len(width)?;
        self.take(n)
    }

    fn signed(value: i64) -> Item<'a> {
        if value >= 0 {
            Item::Uint(value as u64)
        } else {
            Item::Negative(value)
        }
    }

    /// Reads the next item; a container's elements are left to read.
    pub fn next_item(&mut self) -> Result<Item<'a>, Malformed> {
        let at = self.pos;
        let marker = self.be::<1>()?[0];
        Ok(match marker {
            0x00..=0x7f => Item::Uint(marker as u64),
            0x80..=0x8f => Item::Map((marker & 0x0f) as usize),
            0x90..=0x9f => Item::Array((marker & 0x0f) as usize),
            0xa0..=0xbf => Item::Str(self.take((marker & 0x1f) as usize)?),
            0xc0 => Item::Nil,
            0xc1 => return Err(Malformed::Reserved(at)),
            0xc2 => Item::Bool(false),
            0xc3 => Item::Bool(true),
            0xc4..=0xc6 => Item::Bin(self.sized(1 << (marker - 0xc4))?),
            0xc7..=0xc9 => {
                let n = self.len(1 << (marker - 0xc7))?;
                self.take(1 + n)?;
                Item::Ext
            }
            0xca => {
                self.take(4)?;
                Item::Float
            }
            0xcb => {
                self.take(8)?;
                Item::Float
            }
            0xcc => Item::Uint(self.be::<1>()?[0] as u64),
            0xcd => Item::Uint(u16::from_be_bytes(self.be()?) as u64),
            0xce => Item::Uint(u32::from_be_bytes(self.be()?) as u64),
            0xcf => Item::Uint(u64::from_be_bytes(self.be()?)),
            0xd0 => Self::signed(i8::from_be_bytes(self.be()?) as i64),
            0xd1 => Self::signed(i16::from_be_bytes(self.be()?) as i64),
            0xd2 => Self::signed(i32::from_be_bytes(self.be()?) as i64),
            0xd3 => Self::signed(i64::from_be_bytes(self.be()?)),
            0xd4..=0xd8 => {
                self.take(1 + (1usize << (marker - 0xd4)))?;
                Item::Ext
            }
            0xd9..=0xdb => Item::Str(self.sized(1 << (marker - 0xd9))?),
            0xdc => Item::Array(self.len(2)?),
            0xdd => Item::Array(self.len(4)?),
            0xde => Item::Map(self.len(2)?),
            0xdf => Item::Map(self.len(4)?),
            0xe0..=0xff => Item::Negative(marker as i8 as i64),
        })
    }

    /// Reads past one whole value, checking it. The value itself counts as
    /// one level if it is a container; `depth` containers enclose it; at
    /// most `max_depth` (itself at most [`MAX_DEPTH`]) are allowed.
    pub fn skip_value(&mut self, depth: usize, max_depth: usize) -> Result<(), Malformed> {
        let max_depth = max_depth.min(MAX_DEPTH);
        let start = self.pos;
        if !matches!(self.next_item()?, Item::Array(_) | Item::Map(_)) {
            return Ok(());
        }
        self.pos = start;
        // Elements still to read per open container, on an inline stack:
        // hostile nesting costs no recursion and no allocation.
        let mut pending = [0usize; MAX_DEPTH];
        let mut open = 0;
        let mut to_read = 1usize;
        loop {
            while to_read == 0 {
                if open == 0 {
                    return Ok(());
                }
                open -= 1;
                to_read = pending[open];
            }
            to_read -= 1;
            let elements = match self.next_item()? {
                Item::Array(n) => n,
                Item::Map(n) => n.checked_mul(2).ok_or(Malformed::Truncated(self.pos))?,
                _ => continue,
            };
            if depth + open + 1 > max_depth {
                return Err(Malformed::TooDeep(max_depth));
            }
            // Each element takes at least one byte: a count past the input
            // is truncated, found here before any work for it.
            if elements > self.remaining() {
                return Err(Malformed::Truncated(self.pos));
            }
            pending[open] = to_read;
            open += 1;
            to_read = elements;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(bytes: &[u8], max_depth: usize) -> Result<usize, Malformed> {
        let mut reader = Reader::new(bytes);
        reader.skip_value(0, max_depth)?;
        Ok(reader.remaining())
    }

    #[test]
    fn integers_of_every_width_read_as_their_value() {
        let cases: [(&[u8], Item); 8] = [
            (&[0x05], Item::Uint(5)),
            (&[0xcc, 0xff], Item::Uint(255)),
            (&[0xcd, 0x01, 0x00], Item::Uint(256)),
            (&[0xce, 0, 1, 0, 0], Item::Uint(65536)),
            (&[0xcf, 0, 0, 0, 1, 0, 0, 0, 0], Item::Uint(1 << 32)),
            (&[0xd0, 0x05], Item::Uint(5)),
            (&[0xd0, 0xfb], Item::Negative(-5)),
            (&[0xff], Item::Negative(-1)),
        ];
        for (bytes, item) in cases {
            assert_eq!(Reader::new(bytes).next_item().unwrap(), item, "{bytes:x?}");
        }
    }

    #[test]
    fn sized_items_of_every_width_take_their_bytes() {
        let cases: [(&[u8], Item); 8] = [
            (&[0xd9, 2, b'a', b'b'], Item::Str(b"ab")),
            (&[0xda, 0, 2, b'a', b'b'], Item::Str(b"ab")),
            (&[0xdb, 0, 0, 0, 2, b'a', b'b'], Item::Str(b"ab")),
            (&[0xc4, 1, 7], Item::Bin(&[7])),
            (&[0xc5, 0, 1, 7], Item::Bin(&[7])),
            (&[0xc6, 0, 0, 0, 1, 7], Item::Bin(&[7])),
            (&[0xc8, 0, 1, 5, 7], Item::Ext),
            (&[0xd5, 5, 7, 7], Item::Ext),
        ];
        for (bytes, item) in cases {
            let mut reader = Reader::new(bytes);
            assert_eq!(reader.next_item().unwrap(), item, "{bytes:x?}");
            assert_eq!(reader.remaining(), 0, "{bytes:x?}");
        }
    }

    #[test]
    fn nesting_is_counted_in_containers() {
        // [[[nil]]]: three levels.
        let three = [0x91, 0x91, 0x91, 0xc0];
        assert_eq!(check(&three, 3), Ok(0));
        assert_eq!(check(&three, 2), Err(Malformed::TooDeep(2)));
        let mut deep = vec![0x91; 100_000];
        deep.push(0xc0);
        assert_eq!(check(&deep, 8), Err(Malformed::TooDeep(8)));
    }

    #[test]
    fn lengths_past_the_input_are_truncated() {
        assert!(matches!(
            check(&[0xdb, 0xff, 0xff, 0xff, 0xff], 8),
            Err(Malformed::Truncated(_))
        ));
        assert!(matches!(
            check(&[0xdd, 0xff, 0xff, 0xff, 0xff], 8),
            Err(Malformed::Truncated(_))
        ));
        assert!(matches!(
            check(&[0xdf, 0xff, 0xff, 0xff, 0xff], 8),
            Err(Malformed::Truncated(_))
        ));
        assert!(matches!(
            check(&[0x82, 0xc0], 8),
            Err(Malformed::Truncated(_))
        ));
        assert_eq!(check(&[0xc1], 8), Err(Malformed::Reserved(0)));
        assert_eq!(check(&[0xc0, 0xc0], 8), Ok(1));
    }
}
