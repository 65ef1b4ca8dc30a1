//! The message stream's line layer: LF-terminated lines of at most a set
//! number of bytes (a CR before the LF is dropped), the four header lines,
//! and the `error <code> <text>` answers.

use std::fmt;
use std::io;

use thiserror::Error;
use tokio::io::{AsyncBufRead, AsyncBufReadExt};

/// Default longest line, counting every byte before the LF.
pub const DEFAULT_LINE_LIMIT: usize = 1024;

/// The acknowledgement line, both ways.
pub const DONE: &[u8] = b"done\n";

/// Why a line could not be read.
#[derive(Debug, Error)]
pub enum LineError {
    #[error("line is longer than {0} bytes")]
    TooLong(usize),
    #[error("stream ended before the end of a line")]
    Eof,
    #[error("line is not UTF-8")]
    NotUtf8,
    #[error("i/o error: {0}")]
    Io(#[from] io::Error),
}

/// Reads one line without its LF (and without a CR right before it). Never
/// buffers more than `limit + 1` bytes, whatever the peer sends.
pub async fn read_line<R: AsyncBufRead + Unpin>(
    reader: &mut R,
    limit: usize,
) -> Result<String, LineError> {
    let mut line = Vec::new();
    loop {
        let available = reader.fill_buf().await?;
        if available.is_empty() {
            return Err(LineError::Eof);
        }
        let (chunk, found) = match memchr(available) {
            Some(pos) => (&available[..pos], true),
            None => (available, false),
        };
        if line.len() + chunk.len() > limit {
            return Err(LineError::TooLong(limit));
        }
        line.extend_from_slice(chunk);
        let used = chunk.len() + usize::from(found);
        reader.consume(used);
        if found {
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            return String::from_utf8(line).map_err(|_| LineError::NotUtf8);
        }
    }
}

fn memchr(bytes: &[u8]) -> Option<usize> {
    bytes.iter().position(|&b| b == b'\n')
}

/// What a message stream asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Send,
    Receive,
}

impl Action {
    pub fn parse(line: &str) -> Option<Action> {
        match line {
            "send" => Some(Action::Send),
            "receive" => Some(Action::Receive),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Action::Send => "send",
            Action::Receive => "receive",
        }
    }
}

/// The error codes of the message stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    Auth,
    Malformed,
    UnknownRecipient,
    NoSuchMessage,
    TooLarge,
    Duplicate,
    Quota,
    Unavailable,
    Internal,
}

impl ErrorCode {
    pub const ALL: [ErrorCode; 9] = [
        ErrorCode::Auth,
        ErrorCode::Malformed,
        ErrorCode::UnknownRecipient,
        ErrorCode::NoSuchMessage,
        ErrorCode::TooLarge,
        ErrorCode::Duplicate,
        ErrorCode::Quota,
        ErrorCode::Unavailable,
        ErrorCode::Internal,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::Auth => "auth",
            ErrorCode::Malformed => "malformed",
            ErrorCode::UnknownRecipient => "unknown-recipient",
            ErrorCode::NoSuchMessage => "no-such-message",
            ErrorCode::TooLarge => "too-large",
            ErrorCode::Duplicate => "duplicate",
            ErrorCode::Quota => "quota",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::Internal => "internal",
        }
    }

    pub fn parse(code: &str) -> Option<ErrorCode> {
        ErrorCode::ALL.into_iter().find(|c| c.as_str() == code)
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A refusal on the message stream: `error <code> <text>\n`.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("error {code} {text}")]
pub struct StreamError {
    pub code: ErrorCode,
    pub text: String,
}

impl StreamError {
    pub fn new(code: ErrorCode, text: impl Into<String>) -> Self {
        StreamError {
            code,
            text: text.into(),
        }
    }

    /// The whole line, LF included. CR and LF in the text become spaces.
    pub fn to_line(&self) -> Vec<u8> {
        let text: String = self
            .text
            .chars()
            .map(|c| if c == '\n' || c == '\r' { ' ' } else { c })
            .collect();
        format!("error {} {}\n", self.code, text).into_bytes()
    }

    /// Reads an `error …` line (without its LF); `None` if it is not one.
    pub fn parse(line: &str) -> Option<StreamError> {
        let rest = line.strip_prefix("error ")?;
        let (code, text) = rest.split_once(' ').unwrap_or((rest, ""));
        Some(StreamError::new(ErrorCode::parse(code)?, text))
    }
}

/// The four lines that open every message stream (and, with the sender in
/// place of the username and an empty password, a `receive` answer).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub username: String,
    pub password: String,
    pub message_id: String,
    pub action: Action,
}

impl Header {
    /// The four lines as sent.
    pub fn to_lines(&self) -> Vec<u8> {
        format!(
            "{}\n{}\n{}\n{}\n",
            self.username,
            self.password,
            self.message_id,
            self.action.as_str()
        )
        .into_bytes()
    }
}

/// The part of a send (or receive answer) after the header: the recipient
/// lines, the empty line and the `c` byte.
pub fn recipients_block<S: AsRef<str>>(recipients: &[S]) -> Vec<u8> {
    let mut out = Vec::new();
    for recipient in recipients {
        out.extend_from_slice(recipient.as_ref().as_bytes());
        out.push(b'\n');
    }
    out.extend_from_slice(b"\nc");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn lines(input: &[u8], limit: usize) -> Vec<Result<String, String>> {
        let mut reader = tokio::io::BufReader::with_capacity(4, input);
        let mut out = Vec::new();
        loop {
            match read_line(&mut reader, limit).await {
                Ok(line) => out.push(Ok(line)),
                Err(LineError::Eof) => return out,
                Err(e) => {
                    out.push(Err(e.to_string()));
                    return out;
                }
            }
        }
    }

    #[tokio::test]
    async fn splits_and_drops_cr() {
        let got = lines(b"alice\r\npw\n\nsend\n", 1024).await;
        assert_eq!(
            got,
            vec![
                Ok("alice".into()),
                Ok("pw".into()),
                Ok("".into()),
                Ok("send".into())
            ]
        );
    }

    #[tokio::test]
    async fn limit_counts_every_byte_before_lf() {
        let ok = format!("{}\n", "x".repeat(10));
        assert_eq!(lines(ok.as_bytes(), 10).await, vec![Ok("x".repeat(10))]);
        let cr = format!("{}\r\n", "x".repeat(10));
        assert!(lines(cr.as_bytes(), 10).await[0].is_err());
        let long = "y".repeat(100_000);
        assert!(lines(long.as_bytes(), 10).await[0].is_err());
    }

    #[tokio::test]
    async fn partial_last_line_is_eof() {
        let mut reader = &b"abc"[..];
        assert!(matches!(
            read_line(&mut reader, 10).await,
            Err(LineError::Eof)
        ));
    }

    #[test]
    fn error_lines() {
        let e = StreamError::new(ErrorCode::UnknownRecipient, "no user zed\nx");
        assert_eq!(e.to_line(), b"error unknown-recipient no user zed x\n");
        assert_eq!(
            StreamError::parse("error quota mailbox of bob is full")
                .unwrap()
                .code,
            ErrorCode::Quota
        );
        assert!(StreamError::parse("alice").is_none());
        for code in ErrorCode::ALL {
            assert_eq!(ErrorCode::parse(code.as_str()), Some(code));
        }
    }
}
