//! Java's "modified UTF-8", as written by `DataOutputStream.writeUTF` and
//! read by `DataInputStream.readUTF`: U+0000 is `C0 80`, characters outside
//! the Basic Multilingual Plane are two 3-byte surrogates, and there are no
//! 4-byte sequences. The server only validates; decoding and encoding exist
//! for the clients (simulator, admin, tests).

use thiserror::Error;

/// Why a byte string is not one that `readUTF` would read.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum Mutf8Error {
    #[error("byte {byte:#04x} at offset {offset} cannot start a character")]
    BadLead { offset: usize, byte: u8 },
    #[error("missing continuation byte at offset {offset}")]
    BadContinuation { offset: usize },
    #[error("character cut by the end of the string at offset {offset}")]
    Truncated { offset: usize },
}

/// Checks `bytes` the way `DataInputStream.readUTF` does. Everything it
/// accepts is accepted here, including overlong forms and lone surrogates,
/// because the server must store and deliver such strings unchanged.
pub fn validate(bytes: &[u8]) -> Result<(), Mutf8Error> {
    let mut i = 0;
    while i < bytes.len() {
        let lead = bytes[i];
        let width = match lead >> 4 {
            0..=7 => 1,
            12 | 13 => 2,
            14 => 3,
            _ => {
                return Err(Mutf8Error::BadLead {
                    offset: i,
                    byte: lead,
                })
            }
        };
        if i + width > bytes.len() {
            return Err(Mutf8Error::Truncated { offset: i });
        }
        for k in 1..width {
            if bytes[i + k] & 0xC0 != 0x80 {
                return Err(Mutf8Error::BadContinuation { offset: i + k });
            }
        }
        i += width;
    }
    Ok(())
}

/// Encodes `text` as modified UTF-8 (without the u16 length prefix).
pub fn encode(text: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(text.len());
    for unit in text.encode_utf16() {
        match unit {
            0x0001..=0x007F => out.push(unit as u8),
            0x0000 | 0x0080..=0x07FF => {
                out.push(0xC0 | (unit >> 6) as u8);
                out.push(0x80 | (unit & 0x3F) as u8);
            }
            _ => {
                out.push(0xE0 | (unit >> 12) as u8);
                out.push(0x80 | ((unit >> 6) & 0x3F) as u8);
                out.push(0x80 | (unit & 0x3F) as u8);
            }
        }
    }
    out
}

/// Decodes modified UTF-8 into UTF-16 code units, as Java would hold them.
pub fn decode_utf16(bytes: &[u8]) -> Result<Vec<u16>, Mutf8Error> {
    validate(bytes)?;
    let mut units = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let lead = bytes[i];
        let (unit, width) = match lead >> 4 {
            0..=7 => (u16::from(lead), 1),
            12 | 13 => (
                (u16::from(lead & 0x1F) << 6) | u16::from(bytes[i + 1] & 0x3F),
                2,
            ),
            _ => (
                (u16::from(lead & 0x0F) << 12)
                    | (u16::from(bytes[i + 1] & 0x3F) << 6)
                    | u16::from(bytes[i + 2] & 0x3F),
                3,
            ),
        };
        units.push(unit);
        i += width;
    }
    Ok(units)
}

/// Decodes modified UTF-8 into a Rust string; a lone surrogate becomes
/// U+FFFD, since Rust strings cannot hold it (display only).
pub fn decode_lossy(bytes: &[u8]) -> Result<String, Mutf8Error> {
    Ok(String::from_utf16_lossy(&decode_utf16(bytes)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nul_is_two_bytes() {
        assert_eq!(encode("a\0b"), vec![b'a', 0xC0, 0x80, b'b']);
    }

    #[test]
    fn supplementary_is_two_surrogates() {
        // U+1F600 = D83D DE00
        assert_eq!(encode("😀"), vec![0xED, 0xA0, 0xBD, 0xED, 0xB8, 0x80]);
        assert_eq!(decode_lossy(&encode("x😀y")).unwrap(), "x😀y");
    }

    #[test]
    fn round_trip_mixed() {
        let s = "héllo \u{0}wörld ✓ 𝄞";
        assert_eq!(decode_lossy(&encode(s)).unwrap(), s);
    }

    #[test]
    fn accepts_what_read_utf_accepts() {
        validate(&[0xC0, 0x80]).unwrap();
        validate(&[0xED, 0xA0, 0x80]).unwrap(); // lone high surrogate
        validate(&[0xC1, 0xBF]).unwrap(); // overlong, still read by Java
        validate(b"").unwrap();
    }

    #[test]
    fn rejects_what_read_utf_rejects() {
        assert!(matches!(validate(&[0x80]), Err(Mutf8Error::BadLead { .. })));
        assert!(matches!(
            validate(&[0xF0, 0x9F, 0x98, 0x80]),
            Err(Mutf8Error::BadLead { .. })
        ));
        assert!(matches!(
            validate(&[0xC3, 0x41]),
            Err(Mutf8Error::BadContinuation { .. })
        ));
        assert!(matches!(
            validate(&[0xE2, 0x82]),
            Err(Mutf8Error::Truncated { .. })
        ));
        assert!(matches!(
            validate(&[0xE2, 0x82, 0x41]),
            Err(Mutf8Error::BadContinuation { .. })
        ));
    }
}
