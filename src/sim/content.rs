//! Message contents that can be checked on receipt: derived from the
//! message id, with text that exercises modified UTF-8 (U+0000, a character
//! outside the BMP) and attachments of chosen number and size.

use csm_actors::proto::data::{Attachment, MessageData};
use serde::{Deserialize, Serialize};

/// The shape of each simulated message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ContentSpec {
    /// Bytes of text (before encoding).
    pub text_bytes: usize,
    /// Attachments per message.
    pub attachments: usize,
    /// Bytes per attachment.
    pub attachment_bytes: usize,
}

impl Default for ContentSpec {
    fn default() -> Self {
        ContentSpec {
            text_bytes: 200,
            attachments: 1,
            attachment_bytes: 1024,
        }
    }
}

/// A small, fast, deterministic generator (xorshift64*).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

/// FNV-1a over bytes: a 64-bit fingerprint of message data.
pub fn digest(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01B3)
    })
}

/// The message data for `id`.
pub fn message_for(id: &str, spec: &ContentSpec) -> Vec<u8> {
    let mut rng = Rng(digest(id.as_bytes()) | 1);
    let mut text: String = format!("{id} \u{0}😀 ");
    while text.len() < spec.text_bytes {
        text.push(char::from(b'a' + (rng.next() % 26) as u8));
    }
    let attachments = (0..spec.attachments)
        .map(|i| {
            let mut data = vec![0u8; spec.attachment_bytes];
            for chunk in data.chunks_mut(8) {
                let word = rng.next().to_le_bytes();
                chunk.copy_from_slice(&word[..chunk.len()]);
            }
            Attachment::new(&format!("part-{i}.bin"), data)
        })
        .collect();
    MessageData::new(&text, attachments)
        .encode()
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use csm_actors::proto::data::DataLimits;

    #[test]
    fn contents_are_deterministic_valid_and_distinct() {
        let spec = ContentSpec {
            text_bytes: 50,
            attachments: 2,
            attachment_bytes: 100,
        };
        let a = message_for("m1", &spec);
        assert_eq!(a, message_for("m1", &spec));
        assert_ne!(digest(&a), digest(&message_for("m2", &spec)));
        let parsed = MessageData::parse(&a, DataLimits::default()).unwrap();
        assert_eq!(parsed.attachments.len(), 2);
        assert!(parsed.text().contains('\0'));
    }
}
