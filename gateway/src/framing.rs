//! The QUIC native protocol's frames on quinn streams.
//!
//! The rules (length prefix, limit, envelope) are the sans-IO codec of
//! `quiver_protocol::frame`; the functions here only move bytes.

use bytes::Bytes;
use prost::Message;

pub use quiver_protocol::frame::{
    FrameError, HEADER_LEN, ResponseRef, body_len, decode_body, encode, encode_response,
    encode_with, open_reply, reply_error, reply_ok,
};

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
///
/// The body is taken as quinn's received chunks: a body that arrived in one
/// chunk (any request that fits a packet) is decoded in place, its byte
/// fields sharing the chunk's buffer, with no copy; one that arrived in
/// several is gathered into one buffer of exactly `len` bytes.
pub async fn read_body<M: Message + Default>(
    recv: &mut quinn::RecvStream,
    len: usize,
) -> Result<M, FrameError> {
    let body = read_bytes(recv, len).await?;
    decode_body(body)
}

/// Reads exactly `len` bytes as [`Bytes`], without copying when they come
/// in one chunk.
pub async fn read_bytes(recv: &mut quinn::RecvStream, len: usize) -> Result<Bytes, FrameError> {
    let truncated = |got: usize| FrameError::Truncated {
        expected: len as u64,
        got: got as u64,
    };
    let read = |e: quinn::ReadError| FrameError::Read(e.to_string());
    let first = match recv.read_chunk(len, true).await.map_err(read)? {
        Some(chunk) => chunk.bytes,
        None if len == 0 => return Ok(Bytes::new()),
        None => return Err(truncated(0)),
    };
    if first.len() == len {
        return Ok(first);
    }
    let mut body = bytes::BytesMut::with_capacity(len);
    body.extend_from_slice(&first);
    while body.len() < len {
        match recv
            .read_chunk(len - body.len(), true)
            .await
            .map_err(read)?
        {
            Some(chunk) => body.extend_from_slice(&chunk.bytes),
            None => return Err(truncated(body.len())),
        }
    }
    Ok(body.freeze())
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

/// Writes `msg` as one frame and finishes the stream. The encoded frame is
/// handed to quinn as it is (`write_chunk`: no copy into its send buffer).
pub async fn write_frame<M: Message>(
    send: &mut quinn::SendStream,
    msg: &M,
) -> Result<(), quinn::WriteError> {
    send.write_chunk(encode(msg)).await?;
    // A stream the peer already stopped cannot be finished; nothing is lost.
    let _ = send.finish();
    Ok(())
}
