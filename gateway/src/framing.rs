//! Length-prefixed framing of the QUIC native protocol.
//!
//! A frame is a 4-byte big-endian length followed by that many bytes of
//! protobuf. The length is checked against the limit before any of the body
//! is read, so an oversized frame costs the server four bytes. The pure
//! functions here hold the rules; [`read_frame`] and [`write_frame`] only move
//! bytes.

use bytes::{BufMut, Bytes, BytesMut};
use prost::Message;

/// Bytes of the length prefix.
pub const HEADER_LEN: usize = 4;

/// Why a frame could not be read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    /// The declared length is over the limit; the body was not read.
    #[error("frame of {declared} bytes exceeds the limit of {limit} bytes")]
    TooLarge { declared: u64, limit: u64 },
    /// The stream ended before the frame did.
    #[error("stream ended after {got} of {expected} bytes of a frame")]
    Truncated { expected: u64, got: u64 },
    /// The body is not the expected protobuf message.
    #[error("malformed protobuf: {0}")]
    Decode(#[from] prost::DecodeError),
    /// The transport failed while reading.
    #[error("stream read failed: {0}")]
    Read(String),
}

/// The body length a header declares, if it is within `limit`.
pub fn body_len(header: [u8; HEADER_LEN], limit: u32) -> Result<usize, FrameError> {
    let declared = u32::from_be_bytes(header);
    if declared > limit {
        return Err(FrameError::TooLarge {
            declared: u64::from(declared),
            limit: u64::from(limit),
        });
    }
    Ok(declared as usize)
}

/// Encodes `msg` as one frame. A message of 4 GiB or more gets the length
/// `u32::MAX`, which every peer refuses as too large: never a panic.
pub fn encode<M: Message>(msg: &M) -> Bytes {
    let len = msg.encoded_len();
    let mut buf = BytesMut::with_capacity(HEADER_LEN + len);
    buf.put_u32(u32::try_from(len).unwrap_or(u32::MAX));
    // `encode_raw` writes what `encode` would, without the capacity check
    // that a growing BytesMut never fails.
    msg.encode_raw(&mut buf);
    buf.freeze()
}

/// Reads one frame from a QUIC stream and decodes it as `M`.
///
/// On [`FrameError::TooLarge`] the caller should stop the stream: nothing past
/// the header has been read.
pub async fn read_frame<M: Message + Default>(
    recv: &mut quinn::RecvStream,
    limit: u32,
) -> Result<M, FrameError> {
    let len = read_header(recv, limit).await?;
    read_body(recv, len).await
}

/// Reads a frame's header: the body length it declares, if within `limit`.
/// Nothing of the body is read, so the caller can decide (a memory budget)
/// before it is.
pub async fn read_header(recv: &mut quinn::RecvStream, limit: u32) -> Result<usize, FrameError> {
    let mut header = [0u8; HEADER_LEN];
    read_exact(recv, &mut header).await?;
    body_len(header, limit)
}

/// Reads a frame's body of `len` bytes (from [`read_header`]) and decodes it.
pub async fn read_body<M: Message + Default>(
    recv: &mut quinn::RecvStream,
    len: usize,
) -> Result<M, FrameError> {
    let mut body = vec![0u8; len];
    read_exact(recv, &mut body).await?;
    Ok(M::decode(Bytes::from(body))?)
}

async fn read_exact(recv: &mut quinn::RecvStream, buf: &mut [u8]) -> Result<(), FrameError> {
    match recv.read_exact(buf).await {
        Ok(()) => Ok(()),
        Err(quinn::ReadExactError::FinishedEarly(got)) => Err(FrameError::Truncated {
            expected: buf.len() as u64,
            got: got as u64,
        }),
        Err(quinn::ReadExactError::ReadError(e)) => Err(FrameError::Read(e.to_string())),
    }
}

/// Writes `msg` as one frame and finishes the stream.
pub async fn write_frame<M: Message>(
    send: &mut quinn::SendStream,
    msg: &M,
) -> Result<(), quinn::WriteError> {
    send.write_all(&encode(msg)).await?;
    // A stream the peer already stopped cannot be finished; nothing is lost.
    let _ = send.finish();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::native::{Reply, Status, reply};

    #[test]
    fn header_within_limit_gives_its_length() {
        assert_eq!(body_len(7u32.to_be_bytes(), 10).ok(), Some(7));
        assert_eq!(body_len(10u32.to_be_bytes(), 10).ok(), Some(10));
    }

    #[test]
    fn header_over_limit_is_refused() {
        match body_len(11u32.to_be_bytes(), 10) {
            Err(FrameError::TooLarge { declared, limit }) => {
                assert_eq!((declared, limit), (11, 10));
            }
            other => panic!("expected TooLarge, got {other:?}"),
        }
    }

    #[test]
    fn encode_prefixes_the_body_length() {
        let msg = Reply {
            result: Some(reply::Result::Status(Status {
                code: 3,
                message: "bad".into(),
            })),
        };
        let frame = encode(&msg);
        let mut header = [0u8; HEADER_LEN];
        header.copy_from_slice(&frame[..HEADER_LEN]);
        let len = body_len(header, u32::MAX).expect("within u32::MAX");
        assert_eq!(len, frame.len() - HEADER_LEN);
        let back = Reply::decode(&frame[HEADER_LEN..]).expect("decodes");
        assert_eq!(back, msg);
    }
}
