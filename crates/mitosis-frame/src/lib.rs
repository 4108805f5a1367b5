//! Frames: a little-endian u32 length, then a postcard-encoded message. Every mitosis
//! protocol uses them: the page protocol between daemons, the control protocol between the
//! CLI and its daemon, and the setup channel between a daemon and its stubs.

use std::io::{Read, Write};

use serde::Serialize;
use serde::de::DeserializeOwned;
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Largest frame accepted; a descriptor or a batch of pages fits well within it.
pub const MAX_FRAME: usize = 64 << 20;

#[derive(Debug, Error)]
pub enum FrameError {
    #[error("connection closed")]
    Closed,
    #[error("frame of {0} bytes exceeds the limit")]
    TooLarge(usize),
    #[error("malformed message: {0}")]
    Malformed(#[from] postcard::Error),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// Encodes `msg` as one frame.
pub fn encode<T: Serialize>(msg: &T) -> Vec<u8> {
    let body = postcard::to_stdvec(msg).expect("messages serialize to memory");
    let mut out = Vec::with_capacity(4 + body.len());
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&body);
    out
}

/// The body length a frame header announces, refused above `max` before anything is
/// allocated for it.
pub fn body_len(header: [u8; 4], max: usize) -> Result<usize, FrameError> {
    let len = u32::from_le_bytes(header) as usize;
    if len > max {
        return Err(FrameError::TooLarge(len));
    }
    Ok(len)
}

/// A read error as a frame error: the stream ending mid-frame is the peer closing it.
pub fn closed_on_eof(e: std::io::Error) -> FrameError {
    if e.kind() == std::io::ErrorKind::UnexpectedEof {
        FrameError::Closed
    } else {
        FrameError::Io(e)
    }
}

pub async fn write<W: AsyncWrite + Unpin, T: Serialize>(
    w: &mut W,
    msg: &T,
) -> Result<(), FrameError> {
    w.write_all(&encode(msg)).await?;
    Ok(())
}

pub async fn read<R: AsyncRead + Unpin, T: DeserializeOwned>(r: &mut R) -> Result<T, FrameError> {
    read_limited(r, MAX_FRAME).await
}

/// Reads one frame whose body is at most `max` bytes (refused before it is read).
pub async fn read_limited<R: AsyncRead + Unpin, T: DeserializeOwned>(
    r: &mut R,
    max: usize,
) -> Result<T, FrameError> {
    Ok(postcard::from_bytes(&read_body(r, max).await?)?)
}

/// The undecoded body of one frame of at most `max` bytes.
pub async fn read_body<R: AsyncRead + Unpin>(r: &mut R, max: usize) -> Result<Vec<u8>, FrameError> {
    let mut header = [0u8; 4];
    r.read_exact(&mut header).await.map_err(closed_on_eof)?;
    let mut body = vec![0u8; body_len(header, max)?];
    r.read_exact(&mut body).await.map_err(closed_on_eof)?;
    Ok(body)
}

pub fn write_blocking<W: Write, T: Serialize>(w: &mut W, msg: &T) -> Result<(), FrameError> {
    w.write_all(&encode(msg))?;
    Ok(())
}

pub fn read_blocking<R: Read, T: DeserializeOwned>(r: &mut R) -> Result<T, FrameError> {
    let mut header = [0u8; 4];
    r.read_exact(&mut header).map_err(closed_on_eof)?;
    let mut body = vec![0u8; body_len(header, MAX_FRAME)?];
    r.read_exact(&mut body).map_err(closed_on_eof)?;
    Ok(postcard::from_bytes(&body)?)
}

/// Decodes the frame at the front of `bytes`, or `None` while it is incomplete; used where
/// frames arrive with descriptors attached and are read in pieces.
pub fn try_decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<Option<T>, FrameError> {
    try_decode_limited(bytes, MAX_FRAME)
}

/// [`try_decode`] of a frame whose body is at most `max` bytes: a larger one is refused as
/// soon as its header is in.
pub fn try_decode_limited<T: DeserializeOwned>(
    bytes: &[u8],
    max: usize,
) -> Result<Option<T>, FrameError> {
    let Some(header) = bytes.get(..4) else {
        return Ok(None);
    };
    let len = body_len(header.try_into().expect("4 bytes"), max)?;
    let Some(body) = bytes.get(4..4 + len) else {
        return Ok(None);
    };
    Ok(Some(postcard::from_bytes(body)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocking_round_trip() {
        let mut buf = Vec::new();
        write_blocking(&mut buf, &(7u32, "seven".to_string())).unwrap();
        let back: (u32, String) = read_blocking(&mut buf.as_slice()).unwrap();
        assert_eq!(back, (7, "seven".into()));
    }

    #[test]
    fn eof_is_closed_and_huge_is_refused() {
        let r: Result<u32, _> = read_blocking(&mut [].as_slice());
        assert!(matches!(r, Err(FrameError::Closed)));
        let huge = (MAX_FRAME as u32 + 1).to_le_bytes();
        let r: Result<u32, _> = read_blocking(&mut huge.as_slice());
        assert!(matches!(r, Err(FrameError::TooLarge(_))));
    }

    #[tokio::test]
    async fn limits_refuse_before_reading_the_body() {
        let big = encode(&vec![7u8; 100]);
        assert!(matches!(
            try_decode_limited::<Vec<u8>>(&big[..4], 50),
            Err(FrameError::TooLarge(_))
        ));
        assert!(
            try_decode_limited::<Vec<u8>>(&big[..10], 200)
                .unwrap()
                .is_none()
        );
        let r: Result<Vec<u8>, _> = read_limited(&mut big.as_slice(), 50).await;
        assert!(matches!(r, Err(FrameError::TooLarge(_))));
        let v: Vec<u8> = read_limited(&mut big.as_slice(), 200).await.unwrap();
        assert_eq!(v.len(), 100);
    }

    #[tokio::test]
    async fn async_round_trip() {
        let (mut a, mut b) = tokio::io::duplex(1024);
        write(&mut a, &vec![1u64, 2, 3]).await.unwrap();
        let v: Vec<u64> = read(&mut b).await.unwrap();
        assert_eq!(v, vec![1, 2, 3]);
    }
}
