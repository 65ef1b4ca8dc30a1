//! Message data in Java `DataOutputStream` form: the text as `writeUTF`
//! (u16 byte count + modified UTF-8), an int32 attachment count, then per
//! attachment its name as `writeUTF`, an int32 length and the bytes.
//!
//! [`DataScanner`] is a push parser: it says how many bytes it needs next,
//! checks each length against the limits before those bytes are read, and
//! never looks inside attachment bodies. The server streams data through it
//! from the socket; [`MessageData::parse`] runs it over a slice.

use std::io;
use std::time::Duration;

use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt};

use super::mutf8;

/// Default largest message data, in bytes.
pub const DEFAULT_MAX_DATA: usize = 16 * 1024 * 1024;
/// Default most attachments per message.
pub const DEFAULT_MAX_ATTACHMENTS: usize = 256;
/// Largest string `writeUTF` can write.
pub const MAX_UTF_BYTES: usize = u16::MAX as usize;

/// How much message data is accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DataLimits {
    pub max_bytes: usize,
    pub max_attachments: usize,
}

impl Default for DataLimits {
    fn default() -> Self {
        DataLimits {
            max_bytes: DEFAULT_MAX_DATA,
            max_attachments: DEFAULT_MAX_ATTACHMENTS,
        }
    }
}

/// Why message data was refused; the variant names the error code.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DataError {
    #[error("malformed message data: {0}")]
    Malformed(String),
    #[error("message data too large: {0}")]
    TooLarge(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    TextLen,
    Text(usize),
    Count,
    NameLen,
    Name(usize),
    BodyLen,
    Body(usize),
    Done,
}

/// Incremental validator of message data; see the module doc.
#[derive(Debug, Clone)]
pub struct DataScanner {
    limits: DataLimits,
    state: State,
    consumed: usize,
    attachments_left: usize,
}

impl DataScanner {
    pub fn new(limits: DataLimits) -> Self {
        DataScanner {
            limits,
            state: State::TextLen,
            consumed: 0,
            attachments_left: 0,
        }
    }

    /// Bytes the next step needs, or `None` when the data is complete.
    /// Inside an attachment body any amount up to this may be fed.
    pub fn needed(&self) -> Option<usize> {
        match self.state {
            State::TextLen | State::NameLen => Some(2),
            State::Count | State::BodyLen => Some(4),
            State::Text(n) | State::Name(n) | State::Body(n) => Some(n),
            State::Done => None,
        }
    }

    /// True while the scanner is inside an attachment body, where partial
    /// feeds are allowed.
    pub fn in_body(&self) -> bool {
        matches!(self.state, State::Body(_))
    }

    /// Bytes accepted so far.
    pub fn consumed(&self) -> usize {
        self.consumed
    }

    /// Feeds the next bytes: exactly `needed()` of them, or (in a body) at
    /// most that many.
    pub fn feed(&mut self, bytes: &[u8]) -> Result<(), DataError> {
        let need = self
            .needed()
            .ok_or_else(|| DataError::Malformed("bytes after the end of the data".into()))?;
        let partial = self.in_body() && bytes.len() < need;
        if bytes.len() > need || (bytes.len() < need && !partial) {
            return Err(DataError::Malformed(format!(
                "scanner fed {} bytes where {need} were needed",
                bytes.len()
            )));
        }
        self.consumed += bytes.len();
        self.state = match self.state {
            State::TextLen => self.string_of(u16_at(bytes), State::Text)?,
            State::Text(_) => {
                check_utf(bytes, "text")?;
                State::Count
            }
            State::Count => {
                let count = i32_at(bytes);
                let count = usize::try_from(count).map_err(|_| {
                    DataError::Malformed(format!("negative attachment count {count}"))
                })?;
                if count > self.limits.max_attachments {
                    return Err(DataError::TooLarge(format!(
                        "{count} attachments, limit {}",
                        self.limits.max_attachments
                    )));
                }
                self.attachments_left = count;
                self.next_attachment()
            }
            State::NameLen => self.string_of(u16_at(bytes), State::Name)?,
            State::Name(_) => {
                check_utf(bytes, "attachment name")?;
                State::BodyLen
            }
            State::BodyLen => {
                let len = i32_at(bytes);
                let len = usize::try_from(len).map_err(|_| {
                    DataError::Malformed(format!("negative attachment length {len}"))
                })?;
                self.reserve(len)?;
                if len == 0 {
                    self.next_attachment()
                } else {
                    State::Body(len)
                }
            }
            State::Body(left) => {
                let left = left - bytes.len();
                if left == 0 {
                    self.next_attachment()
                } else {
                    State::Body(left)
                }
            }
            State::Done => unreachable!("checked by needed() above"),
        };
        Ok(())
    }

    fn string_of(&self, len: usize, next: fn(usize) -> State) -> Result<State, DataError> {
        self.reserve(len)?;
        Ok(if len == 0 {
            self.after_empty_string(next)
        } else {
            next(len)
        })
    }

    /// An empty string completes at once: step past it.
    fn after_empty_string(&self, next: fn(usize) -> State) -> State {
        match next(0) {
            State::Text(_) => State::Count,
            _ => State::BodyLen,
        }
    }

    fn next_attachment(&mut self) -> State {
        if self.attachments_left == 0 {
            State::Done
        } else {
            self.attachments_left -= 1;
            State::NameLen
        }
    }

    /// Refuses a declared length that would take the data over the limit,
    /// before any of it is read.
    fn reserve(&self, len: usize) -> Result<(), DataError> {
        if self.consumed.saturating_add(len) > self.limits.max_bytes {
            return Err(DataError::TooLarge(format!(
                "message data over the limit of {} bytes",
                self.limits.max_bytes
            )));
        }
        Ok(())
    }
}

fn u16_at(bytes: &[u8]) -> usize {
    usize::from(u16::from_be_bytes([bytes[0], bytes[1]]))
}

fn i32_at(bytes: &[u8]) -> i32 {
    i32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]])
}

fn check_utf(bytes: &[u8], what: &str) -> Result<(), DataError> {
    mutf8::validate(bytes).map_err(|e| DataError::Malformed(format!("{what}: {e}")))
}

/// One named attachment, its name in modified UTF-8 as sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attachment {
    pub name_mutf8: Vec<u8>,
    pub data: Vec<u8>,
}

impl Attachment {
    pub fn new(name: &str, data: Vec<u8>) -> Self {
        Attachment {
            name_mutf8: mutf8::encode(name),
            data,
        }
    }

    /// The name for display (a lone surrogate shows as U+FFFD).
    pub fn name(&self) -> String {
        mutf8::decode_lossy(&self.name_mutf8).unwrap_or_else(|_| String::from("\u{FFFD}"))
    }
}

/// Decoded message data, for clients: the server stores the bytes as sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageData {
    pub text_mutf8: Vec<u8>,
    pub attachments: Vec<Attachment>,
}

impl MessageData {
    pub fn new(text: &str, attachments: Vec<Attachment>) -> Self {
        MessageData {
            text_mutf8: mutf8::encode(text),
            attachments,
        }
    }

    /// The text for display (a lone surrogate shows as U+FFFD).
    pub fn text(&self) -> String {
        mutf8::decode_lossy(&self.text_mutf8).unwrap_or_else(|_| String::from("\u{FFFD}"))
    }

    /// Writes the data as `DataOutputStream` would. Fails when a string is
    /// over the 65,535 bytes that `writeUTF` can hold, or an attachment is
    /// over `i32::MAX` bytes.
    pub fn encode(&self) -> Result<Vec<u8>, DataError> {
        let size = 2
            + self.text_mutf8.len()
            + 4
            + self
                .attachments
                .iter()
                .map(|a| 2 + a.name_mutf8.len() + 4 + a.data.len())
                .sum::<usize>();
        let mut out = Vec::with_capacity(size);
        write_utf(&mut out, &self.text_mutf8)?;
        write_i32(&mut out, self.attachments.len())?;
        for attachment in &self.attachments {
            write_utf(&mut out, &attachment.name_mutf8)?;
            write_i32(&mut out, attachment.data.len())?;
            out.extend_from_slice(&attachment.data);
        }
        Ok(out)
    }

    /// Parses a whole message, as the server would accept it.
    pub fn parse(bytes: &[u8], limits: DataLimits) -> Result<MessageData, DataError> {
        let mut scanner = DataScanner::new(limits);
        let mut text = Vec::new();
        let mut attachments = Vec::new();
        let mut pending_name = Vec::new();
        let mut rest = bytes;
        while let Some(need) = scanner.needed() {
            if rest.len() < need {
                return Err(DataError::Malformed(format!(
                    "data ends {} bytes early",
                    need - rest.len()
                )));
            }
            let (chunk, tail) = rest.split_at(need);
            let state = scanner.state;
            scanner.feed(chunk)?;
            match state {
                State::Text(_) => text = chunk.to_vec(),
                State::Name(_) => pending_name = chunk.to_vec(),
                State::BodyLen => attachments.push(Attachment {
                    name_mutf8: std::mem::take(&mut pending_name),
                    data: Vec::new(),
                }),
                State::Body(_) => {
                    if let Some(last) = attachments.last_mut() {
                        last.data.extend_from_slice(chunk);
                    }
                }
                _ => {}
            }
            rest = tail;
        }
        if !rest.is_empty() {
            return Err(DataError::Malformed(format!(
                "{} bytes after the data",
                rest.len()
            )));
        }
        Ok(MessageData {
            text_mutf8: text,
            attachments,
        })
    }
}

/// Largest read of an attachment body at once, so that a peer announcing a
/// large attachment and sending it slowly holds only what it has sent.
const BODY_CHUNK: usize = 64 * 1024;

/// Why message data could not be read from a stream.
#[derive(Debug, Error)]
pub enum ReadDataError {
    #[error(transparent)]
    Data(#[from] DataError),
    #[error("message data ends early")]
    Eof,
    #[error("message data stalled for {0:?}")]
    Stalled(Duration),
    #[error("i/o error: {0}")]
    Io(io::Error),
    /// The server's budget of message bytes in flight has no room.
    #[error(transparent)]
    Budget(#[from] crate::budget::BudgetError),
}

/// Reads exactly one message's data from `reader`, checking it as it
/// arrives; every read must bring bytes within `stall`.
pub async fn read_data<R: AsyncRead + Unpin>(
    reader: &mut R,
    limits: DataLimits,
    stall: Duration,
) -> Result<Vec<u8>, ReadDataError> {
    read_data_within(reader, limits, stall, None).await
}

/// [`read_data`], reserving every byte from `budget` before the buffer
/// grows to hold it.
pub async fn read_data_within<R: AsyncRead + Unpin>(
    reader: &mut R,
    limits: DataLimits,
    stall: Duration,
    mut budget: Option<&mut crate::budget::Reservation>,
) -> Result<Vec<u8>, ReadDataError> {
    let mut scanner = DataScanner::new(limits);
    let mut data = Vec::new();
    while let Some(need) = scanner.needed() {
        let start = data.len();
        let want = if scanner.in_body() {
            need.min(BODY_CHUNK)
        } else {
            need
        };
        // The buffer briefly holds `want` bytes; what a read leaves unused
        // stays reserved for the next one.
        if let Some(budget) = budget.as_deref_mut() {
            let held = budget.held();
            if start + want > held {
                budget.grow(start + want - held).await?;
            }
        }
        data.resize(start + want, 0);
        let mut filled = 0;
        // Fields are read whole; a body may be fed in pieces.
        while filled == 0 || (!scanner.in_body() && filled < want) {
            let read = tokio::time::timeout(stall, reader.read(&mut data[start + filled..]))
                .await
                .map_err(|_| ReadDataError::Stalled(stall))?
                .map_err(ReadDataError::Io)?;
            if read == 0 {
                return Err(ReadDataError::Eof);
            }
            filled += read;
        }
        data.truncate(start + filled);
        scanner.feed(&data[start..])?;
    }
    Ok(data)
}

fn write_utf(out: &mut Vec<u8>, bytes: &[u8]) -> Result<(), DataError> {
    let len = u16::try_from(bytes.len())
        .map_err(|_| DataError::TooLarge(format!("string of {} bytes", bytes.len())))?;
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(bytes);
    Ok(())
}

fn write_i32(out: &mut Vec<u8>, value: usize) -> Result<(), DataError> {
    let value = i32::try_from(value)
        .map_err(|_| DataError::TooLarge(format!("length {value} over i32::MAX")))?;
    out.extend_from_slice(&value.to_be_bytes());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(data: &MessageData) {
        let bytes = data.encode().unwrap();
        assert_eq!(
            &MessageData::parse(&bytes, DataLimits::default()).unwrap(),
            data
        );
    }

    #[test]
    fn empty_text_no_attachments_is_six_bytes() {
        let data = MessageData::new("", vec![]);
        assert_eq!(data.encode().unwrap(), vec![0, 0, 0, 0, 0, 0]);
        round_trip(&data);
    }

    #[test]
    fn nul_and_supplementary_characters() {
        let data = MessageData::new(
            "a\0b 😀",
            vec![Attachment::new("nul\0😀.txt", b"x".to_vec())],
        );
        round_trip(&data);
        assert_eq!(data.text(), "a\0b 😀");
        assert_eq!(data.attachments[0].name(), "nul\0😀.txt");
    }

    #[test]
    fn empty_attachment_and_empty_name() {
        round_trip(&MessageData::new(
            "t",
            vec![Attachment::new("", vec![]), Attachment::new("b", vec![1])],
        ));
    }

    #[test]
    fn sixteen_mib_of_attachments() {
        let chunk = DEFAULT_MAX_DATA / 4 - 64;
        let attachments = (0..4u8)
            .map(|i| Attachment::new(&format!("part{i}"), vec![i; chunk]))
            .collect();
        let data = MessageData::new("big", attachments);
        let bytes = data.encode().unwrap();
        assert!(bytes.len() > 16 * 1024 * 1024 - 1024 && bytes.len() <= DEFAULT_MAX_DATA);
        round_trip(&data);
    }

    #[test]
    fn over_the_size_limit_is_too_large() {
        let data = MessageData::new("x", vec![Attachment::new("a", vec![0; 100])]);
        let limits = DataLimits {
            max_bytes: 50,
            max_attachments: 10,
        };
        assert!(matches!(
            MessageData::parse(&data.encode().unwrap(), limits),
            Err(DataError::TooLarge(_))
        ));
    }

    #[test]
    fn too_many_attachments_is_too_large() {
        let data = MessageData::new("x", vec![Attachment::new("a", vec![]); 3]);
        let limits = DataLimits {
            max_bytes: 1000,
            max_attachments: 2,
        };
        assert!(matches!(
            MessageData::parse(&data.encode().unwrap(), limits),
            Err(DataError::TooLarge(_))
        ));
    }

    #[test]
    fn negative_count_and_length_are_malformed() {
        let negative_count = [0, 0, 0xFF, 0xFF, 0xFF, 0xFF];
        assert!(matches!(
            MessageData::parse(&negative_count, DataLimits::default()),
            Err(DataError::Malformed(_))
        ));
        let negative_len = [0, 0, 0, 0, 0, 1, 0, 1, b'a', 0x80, 0, 0, 0];
        assert!(matches!(
            MessageData::parse(&negative_len, DataLimits::default()),
            Err(DataError::Malformed(_))
        ));
    }

    #[test]
    fn counts_past_the_data_are_malformed() {
        let claims_two = [0, 0, 0, 0, 0, 2, 0, 1, b'a', 0, 0, 0, 0];
        assert!(matches!(
            MessageData::parse(&claims_two, DataLimits::default()),
            Err(DataError::Malformed(_))
        ));
        let long_text = [0, 9, b'a'];
        assert!(matches!(
            MessageData::parse(&long_text, DataLimits::default()),
            Err(DataError::Malformed(_))
        ));
    }

    #[test]
    fn bad_modified_utf8_is_malformed() {
        for text in [
            &[0x80u8][..],
            &[0xF0, 0x9F, 0x98, 0x80],
            &[0xC3],
            &[0xE2, 0x28, 0xA1],
        ] {
            let mut bytes = vec![0, text.len() as u8];
            bytes.extend_from_slice(text);
            bytes.extend_from_slice(&[0, 0, 0, 0]);
            assert!(
                matches!(
                    MessageData::parse(&bytes, DataLimits::default()),
                    Err(DataError::Malformed(_))
                ),
                "{text:?}"
            );
        }
    }

    #[test]
    fn lone_surrogate_is_accepted_unchanged() {
        let bytes = [0, 3, 0xED, 0xA0, 0x80, 0, 0, 0, 0];
        let data = MessageData::parse(&bytes, DataLimits::default()).unwrap();
        assert_eq!(data.encode().unwrap(), bytes);
    }

    #[tokio::test]
    async fn reads_from_a_stream_in_pieces() {
        let data = MessageData::new("hi", vec![Attachment::new("a", vec![7; 200_000])])
            .encode()
            .unwrap();
        let (mut tx, mut rx) = tokio::io::duplex(1000);
        let sent = data.clone();
        let writer = tokio::spawn(async move {
            tokio::io::AsyncWriteExt::write_all(&mut tx, &sent)
                .await
                .unwrap();
            tokio::io::AsyncWriteExt::write_all(&mut tx, b"done\n")
                .await
                .unwrap();
        });
        let got = read_data(&mut rx, DataLimits::default(), Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(got, data);
        let mut rest = Vec::new();
        writer.await.unwrap();
        rx.read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest, b"done\n", "reads must stop at the end of the data");
    }

    #[tokio::test]
    async fn stream_ending_early_is_eof() {
        let data = MessageData::new("hi", vec![Attachment::new("a", vec![7; 100])])
            .encode()
            .unwrap();
        let mut cut = &data[..data.len() - 1];
        assert!(matches!(
            read_data(&mut cut, DataLimits::default(), Duration::from_secs(5)).await,
            Err(ReadDataError::Eof)
        ));
    }

    #[test]
    fn scanner_accepts_body_in_pieces() {
        let data = MessageData::new("", vec![Attachment::new("a", vec![7; 10])])
            .encode()
            .unwrap();
        let mut scanner = DataScanner::new(DataLimits::default());
        let mut at = 0;
        while let Some(need) = scanner.needed() {
            let take = if scanner.in_body() { need.min(3) } else { need };
            scanner.feed(&data[at..at + take]).unwrap();
            at += take;
        }
        assert_eq!(at, data.len());
        assert_eq!(scanner.consumed(), data.len());
    }
}
