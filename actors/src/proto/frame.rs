//! Session-stream framing: a 4-byte big-endian length `L`, then `L` bytes.
//! The length is checked against the limit before any of the body is read,
//! so an announced 2 GiB frame costs four bytes of reading, not 2 GiB.

use std::future::Future;
use std::io;
use std::task::Poll;
use std::time::Duration;

use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt};

/// Bytes in the length prefix.
pub const FRAME_HEADER_LEN: usize = 4;

/// Why a frame could not be read. Every one of these closes the stream.
#[derive(Debug, Error)]
pub enum FrameError {
    #[error("frame length {0} is over the limit of {1} bytes")]
    TooLarge(u32, usize),
    #[error("frame length is zero")]
    Empty,
    #[error("frame not completed within {0:?}")]
    Timeout(Duration),
    #[error("stream ended inside a frame")]
    Truncated,
    #[error("i/o error: {0}")]
    Io(#[from] io::Error),
}

/// Appends `body` with its length prefix to `out`.
///
/// Panics only if `body` is over 4 GiB, which no packet can be.
pub fn encode_frame(body: &[u8], out: &mut Vec<u8>) {
    let len = u32::try_from(body.len()).expect("packet bodies are far below 4 GiB");
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(body);
}

/// Checks a length prefix against the limit.
pub fn check_length(header: [u8; FRAME_HEADER_LEN], limit: usize) -> Result<usize, FrameError> {
    let len = u32::from_be_bytes(header);
    if len == 0 {
        return Err(FrameError::Empty);
    }
    let as_usize = usize::try_from(len).map_err(|_| FrameError::TooLarge(len, limit))?;
    if as_usize > limit {
        return Err(FrameError::TooLarge(len, limit));
    }
    Ok(as_usize)
}

/// Reads one frame body. Waits for its first byte for as long as it takes
/// (a session may be silent for hours); once a frame has begun, the rest
/// must arrive within `frame_timeout`. Returns `None` on a clean end of
/// stream between frames.
pub async fn read_frame<R: AsyncRead + Unpin>(
    reader: &mut R,
    limit: usize,
    frame_timeout: Duration,
) -> Result<Option<Vec<u8>>, FrameError> {
    let mut body = Vec::new();
    let read = read_frame_into(reader, limit, frame_timeout, &mut body).await?;
    Ok(read.then_some(body))
}

/// [`read_frame`] into `body` (its old content replaced), for a reader
/// that takes many frames and would rather not allocate one buffer each.
/// False on a clean end of stream between frames.
pub async fn read_frame_into<R: AsyncRead + Unpin>(
    reader: &mut R,
    limit: usize,
    frame_timeout: Duration,
    body: &mut Vec<u8>,
) -> Result<bool, FrameError> {
    let mut header = [0u8; FRAME_HEADER_LEN];
    let first = reader.read(&mut header[..1]).await?;
    if first == 0 {
        return Ok(false);
    }
    let rest = async {
        read_exact_or_truncated(reader, &mut header[1..]).await?;
        let len = check_length(header, limit)?;
        body.clear();
        body.resize(len, 0);
        read_exact_or_truncated(reader, body).await
    };
    let mut rest = std::pin::pin!(rest);
    // A frame is most often buffered whole by the time its first byte is:
    // such a frame is read without arming (and cancelling) a timer.
    let first_try = std::future::poll_fn(|cx| Poll::Ready(rest.as_mut().poll(cx))).await;
    if let Poll::Ready(result) = first_try {
        return result.map(|()| true);
    }
    match tokio::time::timeout(frame_timeout, rest).await {
        Ok(result) => result.map(|()| true),
        Err(_) => Err(FrameError::Timeout(frame_timeout)),
    }
}

async fn read_exact_or_truncated<R: AsyncRead + Unpin>(
    reader: &mut R,
    buf: &mut [u8],
) -> Result<(), FrameError> {
    match reader.read_exact(buf).await {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Err(FrameError::Truncated),
        Err(e) => Err(FrameError::Io(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMIT: usize = 64 * 1024;
    const WAIT: Duration = Duration::from_secs(5);

    #[tokio::test]
    async fn round_trip() {
        let mut wire = Vec::new();
        encode_frame(b"hello", &mut wire);
        assert_eq!(&wire[..4], &[0, 0, 0, 5]);
        let mut reader = &wire[..];
        assert_eq!(
            read_frame(&mut reader, LIMIT, WAIT).await.unwrap().unwrap(),
            b"hello"
        );
        assert!(read_frame(&mut reader, LIMIT, WAIT)
            .await
            .unwrap()
            .is_none());
    }

    #[tokio::test]
    async fn refuses_huge_length_before_reading_body() {
        let wire = [0x7F, 0xFF, 0xFF, 0xFF, 1, 2, 3];
        let mut reader = &wire[..];
        let err = read_frame(&mut reader, LIMIT, WAIT).await.unwrap_err();
        assert!(matches!(err, FrameError::TooLarge(0x7FFF_FFFF, LIMIT)));
    }

    #[tokio::test]
    async fn refuses_zero_and_truncated() {
        let mut zero = &[0u8, 0, 0, 0][..];
        assert!(matches!(
            read_frame(&mut zero, LIMIT, WAIT).await,
            Err(FrameError::Empty)
        ));
        let mut cut = &[0u8, 0, 0, 9, 1, 2][..];
        assert!(matches!(
            read_frame(&mut cut, LIMIT, WAIT).await,
            Err(FrameError::Truncated)
        ));
        let mut cut_header = &[0u8, 0][..];
        assert!(matches!(
            read_frame(&mut cut_header, LIMIT, WAIT).await,
            Err(FrameError::Truncated)
        ));
    }

    #[tokio::test]
    async fn a_started_frame_must_finish_in_time() {
        let (mut client, mut server) = tokio::io::duplex(64);
        tokio::io::AsyncWriteExt::write_all(&mut client, &[0, 0])
            .await
            .unwrap();
        let err = read_frame(&mut server, LIMIT, Duration::from_millis(50))
            .await
            .unwrap_err();
        assert!(matches!(err, FrameError::Timeout(_)));
    }
}
