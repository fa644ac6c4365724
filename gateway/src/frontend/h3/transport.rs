//! h3's QUIC transport over quinn, as `h3-quinn` provides it, except that a
//! request stream's STOP_SENDING can be awaited.
//!
//! A client that gives up on an HTTP/3 request stops the stream (RFC 9114
//! §4.1.1; dropping an h3 client stream does it too). The request body is
//! whole by then, so only the send side of the stream learns of it, through
//! [`quinn::SendStream::stopped`], and `h3-quinn` keeps its quinn streams
//! private. This module therefore wraps the request (bidirectional) streams
//! itself and registers each one's `stopped` future in [`StopSignals`], where
//! the server takes it by stream id ([`StopSignals::take`]). Unidirectional
//! streams (control, QPACK) are `h3-quinn`'s own.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, ready};

use ::h3::quic::{self, ConnectionErrorIncoming, StreamErrorIncoming, StreamId, WriteBuf};
use bytes::{Buf, Bytes};

/// Resolves when the peer stops the stream, or the connection is lost:
/// either way, no one will read the answer.
pub type Stopped = Pin<Box<dyn Future<Output = ()> + Send>>;

type Accepting = Pin<
    Box<
        dyn Future<Output = Result<(quinn::SendStream, quinn::RecvStream), quinn::ConnectionError>>
            + Send
            + Sync,
    >,
>;

/// The [`Stopped`] futures of one connection's live request streams, by
/// QUIC stream id. An entry lives until the server takes it or the stream is
/// dropped, so there are at most as many as streams open at once
/// (`max_concurrent_streams`).
#[derive(Clone, Default)]
pub struct StopSignals(Arc<Mutex<HashMap<u64, Stopped>>>);

impl StopSignals {
    /// Takes the [`Stopped`] future of request stream `id`; `None` once
    /// taken.
    pub fn take(&self, id: StreamId) -> Option<Stopped> {
        self.lock().remove(&id.into_inner())
    }

    fn insert(&self, id: u64, stopped: Stopped) {
        self.lock().insert(id, stopped);
    }

    fn forget(&self, id: u64) {
        self.lock().remove(&id);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Stopped>> {
        // The map holds no invariant a panicking holder could break.
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A QUIC connection for h3's server, accepting request streams whose stop
/// is registered in a [`StopSignals`].
pub struct Connection {
    conn: quinn::Connection,
    /// Unidirectional streams and connection close.
    uni: h3_quinn::Connection,
    accepting: Option<Accepting>,
    stops: StopSignals,
}

impl Connection {
    pub fn new(conn: quinn::Connection, stops: StopSignals) -> Self {
        Connection {
            uni: h3_quinn::Connection::new(conn.clone()),
            conn,
            accepting: None,
            stops,
        }
    }
}

impl<B: Buf> quic::Connection<B> for Connection {
    type RecvStream = h3_quinn::RecvStream;
    type OpenStreams = Opener;

    fn poll_accept_recv(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Self::RecvStream, ConnectionErrorIncoming>> {
        quic::Connection::<B>::poll_accept_recv(&mut self.uni, cx)
    }

    fn poll_accept_bidi(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Self::BidiStream, ConnectionErrorIncoming>> {
        let conn = &self.conn;
        let accepting = self.accepting.get_or_insert_with(|| {
            let conn = conn.clone();
            Box::pin(async move { conn.accept_bi().await })
        });
        let accepted = ready!(accepting.as_mut().poll(cx));
        self.accepting = None;
        let (send, recv) = accepted.map_err(connection_error)?;
        let id = u64::from(send.id());
        let stopped = send.stopped();
        self.stops.insert(
            id,
            Box::pin(async move {
                let _ = stopped.await;
            }),
        );
        Poll::Ready(Ok(BidiStream {
            send: SendStream {
                stream: send,
                writing: None,
                stops: self.stops.clone(),
            },
            recv: RecvStream(recv),
        }))
    }

    fn opener(&self) -> Self::OpenStreams {
        Opener(quic::Connection::<B>::opener(&self.uni))
    }
}

impl<B: Buf> quic::OpenStreams<B> for Connection {
    type BidiStream = BidiStream<B>;
    type SendStream = h3_quinn::SendStream<B>;

    fn poll_open_bidi(
        &mut self,
        _cx: &mut Context<'_>,
    ) -> Poll<Result<Self::BidiStream, StreamErrorIncoming>> {
        Poll::Ready(Err(no_server_request_streams()))
    }

    fn poll_open_send(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Self::SendStream, StreamErrorIncoming>> {
        quic::OpenStreams::<B>::poll_open_send(&mut self.uni, cx)
    }

    fn close(&mut self, code: ::h3::error::Code, reason: &[u8]) {
        quic::OpenStreams::<B>::close(&mut self.uni, code, reason);
    }
}

/// Opens the server's unidirectional streams (h3's control and QPACK
/// streams).
pub struct Opener(h3_quinn::OpenStreams);

impl<B: Buf> quic::OpenStreams<B> for Opener {
    type BidiStream = BidiStream<B>;
    type SendStream = h3_quinn::SendStream<B>;

    fn poll_open_bidi(
        &mut self,
        _cx: &mut Context<'_>,
    ) -> Poll<Result<Self::BidiStream, StreamErrorIncoming>> {
        Poll::Ready(Err(no_server_request_streams()))
    }

    fn poll_open_send(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Self::SendStream, StreamErrorIncoming>> {
        quic::OpenStreams::<B>::poll_open_send(&mut self.0, cx)
    }

    fn close(&mut self, code: ::h3::error::Code, reason: &[u8]) {
        quic::OpenStreams::<B>::close(&mut self.0, code, reason);
    }
}

/// An HTTP/3 server never opens a bidirectional stream (RFC 9114 §6.1).
fn no_server_request_streams() -> StreamErrorIncoming {
    StreamErrorIncoming::Unknown(Box::new(std::io::Error::other(
        "an HTTP/3 server opens no bidirectional streams",
    )))
}

/// A request stream.
pub struct BidiStream<B: Buf> {
    send: SendStream<B>,
    recv: RecvStream,
}

impl<B: Buf> quic::BidiStream<B> for BidiStream<B> {
    type SendStream = SendStream<B>;
    type RecvStream = RecvStream;

    fn split(self) -> (Self::SendStream, Self::RecvStream) {
        (self.send, self.recv)
    }
}

impl<B: Buf> quic::RecvStream for BidiStream<B> {
    type Buf = Bytes;

    fn poll_data(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Option<Self::Buf>, StreamErrorIncoming>> {
        self.recv.poll_data(cx)
    }

    fn stop_sending(&mut self, error_code: u64) {
        self.recv.stop_sending(error_code);
    }

    fn recv_id(&self) -> StreamId {
        self.recv.recv_id()
    }
}

impl<B: Buf> quic::SendStream<B> for BidiStream<B> {
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), StreamErrorIncoming>> {
        self.send.poll_ready(cx)
    }

    fn send_data<T: Into<WriteBuf<B>>>(&mut self, data: T) -> Result<(), StreamErrorIncoming> {
        self.send.send_data(data)
    }

    fn poll_finish(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), StreamErrorIncoming>> {
        self.send.poll_finish(cx)
    }

    fn reset(&mut self, reset_code: u64) {
        self.send.reset(reset_code);
    }

    fn send_id(&self) -> StreamId {
        self.send.send_id()
    }
}

/// The receiving side of a request stream.
pub struct RecvStream(quinn::RecvStream);

impl quic::RecvStream for RecvStream {
    type Buf = Bytes;

    fn poll_data(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Option<Self::Buf>, StreamErrorIncoming>> {
        // `read_chunk` is cancel-safe: a future made and dropped on every
        // poll loses no data, and its waker stays registered.
        let chunk = ready!(std::pin::pin!(self.0.read_chunk(usize::MAX, true)).poll(cx));
        Poll::Ready(chunk.map(|c| c.map(|c| c.bytes)).map_err(read_error))
    }

    fn stop_sending(&mut self, error_code: u64) {
        // Already stopped or finished: nothing left to refuse.
        let _ = self.0.stop(varint(error_code));
    }

    fn recv_id(&self) -> StreamId {
        stream_id(self.0.id())
    }
}

/// The sending side of a request stream; forgets its stop signal when
/// dropped.
pub struct SendStream<B: Buf> {
    stream: quinn::SendStream,
    writing: Option<WriteBuf<B>>,
    stops: StopSignals,
}

impl<B: Buf> Drop for SendStream<B> {
    fn drop(&mut self) {
        self.stops.forget(u64::from(self.stream.id()));
    }
}

impl<B: Buf> quic::SendStream<B> for SendStream<B> {
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), StreamErrorIncoming>> {
        if let Some(data) = &mut self.writing {
            while data.has_remaining() {
                let written = ready!(Pin::new(&mut self.stream).poll_write(cx, data.chunk()))
                    .map_err(write_error)?;
                data.advance(written);
            }
        }
        self.writing = None;
        Poll::Ready(Ok(()))
    }

    fn send_data<T: Into<WriteBuf<B>>>(&mut self, data: T) -> Result<(), StreamErrorIncoming> {
        if self.writing.is_some() {
            // h3 waits for `poll_ready` before it sends more; this would be
            // a bug in h3, answered by closing the connection.
            return Err(StreamErrorIncoming::ConnectionErrorIncoming {
                connection_error: ConnectionErrorIncoming::InternalError(
                    "data sent before the previous data was written".into(),
                ),
            });
        }
        self.writing = Some(data.into());
        Ok(())
    }

    fn poll_finish(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), StreamErrorIncoming>> {
        Poll::Ready(
            self.stream
                .finish()
                .map_err(|e| StreamErrorIncoming::Unknown(Box::new(e))),
        )
    }

    fn reset(&mut self, reset_code: u64) {
        // Already reset or finished: nothing to abandon.
        let _ = self.stream.reset(varint(reset_code));
    }

    fn send_id(&self) -> StreamId {
        stream_id(self.stream.id())
    }
}

fn varint(code: u64) -> quinn::VarInt {
    // h3's codes are QUIC varints; anything larger is clamped.
    quinn::VarInt::from_u64(code).unwrap_or(quinn::VarInt::MAX)
}

// A local invariant, not peer input: quinn's stream ids are QUIC varints
// (below 2^62), which is exactly the range h3's `StreamId` takes.
#[allow(clippy::expect_used)]
fn stream_id(id: quinn::StreamId) -> StreamId {
    StreamId::try_from(u64::from(id)).expect("a quinn stream id is a QUIC varint, as h3's is")
}

fn connection_error(e: quinn::ConnectionError) -> ConnectionErrorIncoming {
    match e {
        quinn::ConnectionError::ApplicationClosed(close) => {
            ConnectionErrorIncoming::ApplicationClose {
                error_code: close.error_code.into_inner(),
            }
        }
        quinn::ConnectionError::TimedOut => ConnectionErrorIncoming::Timeout,
        other => ConnectionErrorIncoming::Undefined(Arc::new(other)),
    }
}

fn read_error(e: quinn::ReadError) -> StreamErrorIncoming {
    match e {
        quinn::ReadError::Reset(code) => StreamErrorIncoming::StreamTerminated {
            error_code: code.into_inner(),
        },
        quinn::ReadError::ConnectionLost(e) => StreamErrorIncoming::ConnectionErrorIncoming {
            connection_error: connection_error(e),
        },
        other => StreamErrorIncoming::Unknown(Box::new(other)),
    }
}

fn write_error(e: quinn::WriteError) -> StreamErrorIncoming {
    match e {
        quinn::WriteError::Stopped(code) => StreamErrorIncoming::StreamTerminated {
            error_code: code.into_inner(),
        },
        quinn::WriteError::ConnectionLost(e) => StreamErrorIncoming::ConnectionErrorIncoming {
            connection_error: connection_error(e),
        },
        other => StreamErrorIncoming::Unknown(Box::new(other)),
    }
}
