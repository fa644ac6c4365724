//! The QUIC native front end (ALPN `quiver/1`, UDP 4433 by default).
//!
//! One request per bidirectional stream: the client sends one
//! length-prefixed `ModelInferRequest` and the server answers with one
//! length-prefixed `Reply` on the same stream. A frame larger than the limit
//! is refused after its 4-byte header (the stream is stopped, the body never
//! read). A client that stops the stream before its answer cancels the
//! request: the scheduler skips it if it has not been dispatched.
//!
//! With bearer tokens configured, a request carries its token as the string
//! parameter `authorization` (`Bearer TOKEN`, [`super::auth::PARAMETER`]);
//! it is checked as soon as the frame is decoded, before the model is looked
//! up or the request reaches the router, and removed from the request.
//! A connection over `max_connections` is refused during its handshake
//! (CONNECTION_REFUSED); a stream over `max_concurrent_streams` is not
//! refused but waits for QUIC stream credit on the client.

use std::sync::Arc;
use std::time::{Duration, Instant};

use quiver_batching::CancelToken;

use super::auth::Auth;
use super::inflight::InFlight;
use crate::error::GatewayError;
use crate::framing::{self, FrameError};
use crate::metrics::Metrics;
use crate::proto::ModelInferRequest;
use crate::proto::native::{Reply, Status, reply};
use crate::router::Router;
use crate::tensor;
use crate::tls::{self, Identity, TlsError};

/// The protocol label of this front end in metrics.
pub const PROTOCOL: &str = "quic";

/// Application error code sent with STOP_SENDING when a frame is too large.
pub const STOP_TOO_LARGE: u32 = 0x1;

/// Application error code sent with STOP_SENDING when a frame did not arrive
/// within `server.request_read_timeout_ms`.
pub const STOP_REQUEST_TIMEOUT: u32 = 0x2;

/// Application error code sent with STOP_SENDING when a frame does not fit
/// the request-memory budget (`server.max_inflight_bytes`).
pub const STOP_OVER_BUDGET: u32 = 0x3;

/// Application error code that closes a connection over
/// `server.max_connections_per_source`.
pub const CLOSE_TOO_MANY_FROM_SOURCE: u32 = 0x2;

/// Limits of the QUIC listener.
#[derive(Clone, Debug)]
pub struct QuicLimits {
    /// Largest request frame, in bytes.
    pub max_frame_bytes: u32,
    /// Concurrent bidirectional streams a connection may open: QUIC stream
    /// credit, so a client opening more waits until one of its streams ends.
    pub max_concurrent_streams: u32,
    /// Connections at once, `quiver/1` and `h3` together; more are refused
    /// in their handshake. A closed connection counts until QUIC has drained
    /// it (three probe timeouts, milliseconds on a LAN).
    pub max_connections: u32,
    /// Connections at once from one source address, counted once their
    /// handshake is done (a spoofed source never completes one, so it cannot
    /// use up another host's places); more from it are closed at once.
    pub max_connections_per_source: u32,
    /// New handshakes per second above which unvalidated clients are asked
    /// for a Retry (`server.quic_retry_above_per_sec`; 0: always).
    pub retry_above_per_sec: u32,
    /// The CAs client certificates must chain to (`tls.client_ca`); `None`:
    /// no client certificates.
    pub client_roots: Option<Arc<rustls::RootCertStore>>,
    /// Longest a stream may take to deliver its whole request frame.
    pub request_read_timeout: Duration,
    /// The request-memory budget shared with the other front ends: a frame
    /// is counted from its header until its answer is sent.
    pub memory: Arc<crate::budget::MemoryBudget>,
    /// Idle time after which a connection is closed.
    pub idle_timeout: Duration,
}

/// The native protocol's status of an error (the map is
/// `ErrorKind::native`).
pub fn native_status(err: &GatewayError) -> Status {
    Status {
        code: err.kind().native() as i32,
        message: err.to_string(),
    }
}

/// Binds the QUIC endpoint on `addr` with the server's identity.
pub fn bind(
    addr: std::net::SocketAddr,
    identity: &Identity,
    limits: &QuicLimits,
) -> Result<quinn::Endpoint, BindError> {
    // One UDP port for both protocols; the handshake's ALPN picks one.
    let rustls = tls::server_config(
        identity,
        &[crate::NATIVE_ALPN, super::h3::ALPN],
        limits.client_roots.as_ref(),
    )?;
    let quic = quinn::crypto::rustls::QuicServerConfig::try_from(rustls)
        .map_err(|e| TlsError::Quic(e.to_string()))?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(quic));
    let mut transport = quinn::TransportConfig::default();
    transport
        .max_concurrent_bidi_streams(limits.max_concurrent_streams.into())
        // HTTP/3 needs the peer's control and QPACK streams (3), plus slack
        // for grease streams; the native protocol opens none.
        .max_concurrent_uni_streams(8u32.into())
        .max_idle_timeout(quinn::IdleTimeout::try_from(limits.idle_timeout).ok());
    config.transport_config(Arc::new(transport));
    quinn::Endpoint::server(config, addr).map_err(|source| BindError::Io { addr, source })
}

/// Why the QUIC listener could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BindError {
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("cannot bind the QUIC listener (QUIC native and HTTP/3) on udp {addr}: {source}")]
    Io {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
}

struct Ctx {
    router: Arc<Router>,
    metrics: Arc<Metrics>,
    /// `quiver_requests_received_total{protocol="quic"}`, resolved once.
    received: prometheus_client::metrics::counter::Counter,
    auth: Auth,
    limits: QuicLimits,
    in_flight: Arc<InFlight>,
    h3: Option<super::h3::H3Service>,
}

/// Accepts connections until the endpoint is closed. Connections that
/// chose ALPN `h3` go to `h3` (refused when it is `None`). `auth` checks the
/// native protocol's tokens (`h3` has its own, in [`super::h3::H3Service`]).
pub async fn serve(
    endpoint: quinn::Endpoint,
    router: Arc<Router>,
    metrics: Arc<Metrics>,
    auth: Auth,
    limits: QuicLimits,
    in_flight: Arc<InFlight>,
    h3: Option<super::h3::H3Service>,
) {
    let sources = super::sources::SourceLimit::new(limits.max_connections_per_source);
    let received = metrics
        .received
        .get_or_create(&crate::metrics::ProtocolLabels { protocol: PROTOCOL })
        .clone();
    let ctx = Arc::new(Ctx {
        router,
        received,
        metrics,
        auth,
        limits,
        in_flight,
        h3,
    });
    let mut handshakes = HandshakeRate::new(std::time::Instant::now());
    while let Some(mut incoming) = endpoint.accept().await {
        // Address validation under load: past the rate, a client that has
        // not proven its address gets a stateless Retry and must come back
        // with its token (quinn validates it) before any handshake state is
        // kept for it.
        let rate = handshakes.note(std::time::Instant::now());
        if rate > ctx.limits.retry_above_per_sec && incoming.may_retry() {
            match incoming.retry() {
                Ok(()) => {
                    ctx.metrics.quic_retries.inc();
                    continue;
                }
                Err(e) => incoming = e.into_incoming(),
            }
        }
        // An incoming connection is not counted until it is accepted, so
        // `max_connections` open ones already fill the limit.
        if endpoint.open_connections() >= ctx.limits.max_connections as usize {
            tracing::warn!(
                remote = %incoming.remote_address(),
                limit = ctx.limits.max_connections,
                "connection refused: too many connections"
            );
            ctx.metrics
                .record_rejection("", PROTOCOL, "too_many_connections");
            incoming.refuse();
            continue;
        }
        let ctx = ctx.clone();
        let sources = sources.clone();
        tokio::spawn(async move {
            let conn = match incoming.await {
                Ok(conn) => conn,
                Err(e) => return tracing::debug!(error = %e, "handshake failed"),
            };
            // Held while the connection lives.
            let Some(_slot) = sources.try_hold(conn.remote_address().ip()) else {
                tracing::warn!(
                    remote = %conn.remote_address(),
                    limit = sources.limit(),
                    "connection refused: too many connections from this address"
                );
                ctx.metrics
                    .record_rejection("", PROTOCOL, "too_many_connections_from_source");
                conn.close(
                    CLOSE_TOO_MANY_FROM_SOURCE.into(),
                    b"too many connections from this address",
                );
                return;
            };
            if alpn(&conn).as_deref() == Some(super::h3::ALPN) {
                match ctx.h3.clone() {
                    Some(h3) => super::h3::serve_connection(conn, h3, ctx.router.clone()).await,
                    None => conn.close(0x0101u32.into(), b"HTTP/3 is off"),
                }
            } else {
                serve_connection(conn, ctx).await;
            }
        });
    }
}

/// New handshakes in the current one-second window.
#[derive(Debug)]
struct HandshakeRate {
    window_start: std::time::Instant,
    count: u32,
}

impl HandshakeRate {
    fn new(now: std::time::Instant) -> Self {
        HandshakeRate {
            window_start: now,
            count: 0,
        }
    }

    /// Counts one handshake at `now`; returns the count of its window,
    /// this one included.
    fn note(&mut self, now: std::time::Instant) -> u32 {
        if now.saturating_duration_since(self.window_start) >= Duration::from_secs(1) {
            self.window_start = now;
            self.count = 0;
        }
        self.count = self.count.saturating_add(1);
        self.count
    }
}

/// The ALPN protocol the handshake chose.
fn alpn(conn: &quinn::Connection) -> Option<Vec<u8>> {
    conn.handshake_data()?
        .downcast::<quinn::crypto::rustls::HandshakeData>()
        .ok()?
        .protocol
}

async fn serve_connection(conn: quinn::Connection, ctx: Arc<Ctx>) {
    let remote = conn.remote_address();
    let identity = crate::ratelimit::PeerIdentity::of_quic(&conn);
    tracing::debug!(%remote, "connection open");
    loop {
        match conn.accept_bi().await {
            Ok((send, recv)) => {
                let guard = ctx.in_flight.enter();
                let ctx = ctx.clone();
                let identity = identity.clone();
                let conn = conn.clone();
                // Boxed: the task then holds a pointer, and tokio's moves of
                // the task's stage (spawn, running, finished) copy 8 bytes
                // instead of the whole request future.
                tokio::spawn(Box::pin(async move {
                    serve_stream(send, recv, &ctx, &conn, identity.as_ref()).await;
                    drop(guard);
                }));
            }
            Err(e) => {
                tracing::debug!(remote = %conn.remote_address(), reason = %e, "connection closed");
                return;
            }
        }
    }
}

async fn serve_stream(
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    ctx: &Ctx,
    conn: &quinn::Connection,
    identity: Option<&crate::ratelimit::PeerIdentity>,
) {
    let started = Instant::now();
    let remote = conn.remote_address();
    let read = tokio::time::timeout(ctx.limits.request_read_timeout, async {
        let len = framing::read_header(&mut recv, ctx.limits.max_frame_bytes).await?;
        let bytes = (framing::HEADER_LEN + len) as u64;
        let reservation = match ctx.limits.memory.reserve(bytes) {
            Ok(r) => r,
            Err(e) => return Ok(Err(e)),
        };
        let body = framing::read_bytes(&mut recv, len).await?;
        // The common shape straight into tensors; anything else as prost
        // reads it (and refuses it, with its error).
        let req = match quiver_protocol::plain::decode_plain(&body) {
            Some(plain) => Body::Plain(plain),
            None => Body::Proto(framing::decode_body::<ModelInferRequest>(body)?),
        };
        Ok::<_, FrameError>(Ok((req, reservation)))
    })
    .await;
    let Ok(read) = read else {
        // A length announced, then a stall: the frame's bytes are released
        // and the client is told, once.
        let _ = recv.stop(STOP_REQUEST_TIMEOUT.into());
        let err = GatewayError::RequestTimeout(ctx.limits.request_read_timeout);
        ctx.metrics.record_rejection("", PROTOCOL, err.outcome());
        return answer(&mut send, ctx, "", started, Err(err)).await;
    };
    let (req, _reservation) = match read {
        Ok(Ok(held)) => held,
        Ok(Err(over_budget)) => {
            // Refused before its body is read: the rest is not wanted.
            let _ = recv.stop(STOP_OVER_BUDGET.into());
            ctx.metrics
                .record_rejection("", PROTOCOL, over_budget.outcome());
            return answer(&mut send, ctx, "", started, Err(over_budget)).await;
        }
        Err(FrameError::Read(reason)) => {
            // The client reset its stream or the connection went: no one to answer.
            tracing::debug!(%reason, "request stream reset before its frame");
            return;
        }
        Err(e) => {
            let err = match e {
                FrameError::TooLarge { declared, limit } => {
                    // Refuse the rest of the body without reading it.
                    let _ = recv.stop(STOP_TOO_LARGE.into());
                    GatewayError::TooLarge {
                        limit,
                        got: declared,
                    }
                }
                other => GatewayError::InvalidArgument(format!("malformed request frame: {other}")),
            };
            return answer(&mut send, ctx, "", started, Err(err)).await;
        }
    };
    ctx.received.inc();
    let mut req = req;
    // Before the model is looked up: a client without a token learns
    // nothing about which models exist.
    let token = match ctx.auth.check_parameters(req.parameters_mut()) {
        Ok(token) => token,
        Err(e) => return answer(&mut send, ctx, "", started, Err(e)).await,
    };
    // Bounded label values: only configured model names.
    let entry = ctx.router.model(req.model_name());
    let model = entry.as_deref().map_or("", |m| m.name.as_str());
    let checked = ctx
        .auth
        .client(token, identity, Some(remote.ip()))
        .and_then(|client| ctx.router.check_rate(model, client));
    if let Err(e) = checked {
        return answer(&mut send, ctx, model, started, Err(e)).await;
    }
    let decoded = match req {
        Body::Plain(plain) => tensor::request_from_plain(plain),
        Body::Proto(proto) => tensor::request_from_proto(proto),
    };
    let mut req = match decoded {
        Ok(r) => r,
        Err(e) => return answer(&mut send, ctx, model, started, Err(e)).await,
    };
    // The deadline covers the round trip: QUIC knows it.
    req.rtt = Some(conn.rtt());
    let cancel = CancelToken::new();
    let stopped = send.stopped();
    let result = tokio::select! {
        // Polling the request first admits it before a stop already received
        // is seen, so a cancelled request always ends in the scheduler,
        // which counts it and never computes it.
        biased;
        result = ctx.router.infer_on(entry.clone(), req, cancel.clone()) => result,
        _ = stopped => {
            cancel.cancel();
            ctx.metrics.record_request(model, "", PROTOCOL, "cancelled", started.elapsed());
            return;
        }
    };
    match result {
        Ok(mut resp) => match tensor::local_parameters(&mut resp) {
            Some(parameters) => {
                answer_local(&mut send, ctx, model, started, &resp, &parameters).await
            }
            None => {
                let resp = tensor::response_to_proto(resp);
                answer(&mut send, ctx, model, started, Ok(resp)).await;
            }
        },
        Err(e) => answer(&mut send, ctx, model, started, Err(e)).await,
    }
}

/// A request frame's body, decoded.
enum Body {
    /// Raw contents already tensors (`quiver_protocol::plain`).
    Plain(quiver_protocol::plain::PlainRequest),
    /// Anything else, as prost decodes it.
    Proto(ModelInferRequest),
}

impl Body {
    fn parameters_mut(
        &mut self,
    ) -> &mut std::collections::HashMap<String, crate::proto::inference::InferParameter> {
        match self {
            Body::Plain(p) => &mut p.parameters,
            Body::Proto(p) => &mut p.parameters,
        }
    }

    fn model_name(&self) -> &str {
        match self {
            Body::Plain(p) => &p.model_name,
            Body::Proto(p) => &p.model_name,
        }
    }
}

/// Answers a request computed here: the reply is written into its frame
/// straight from the model's output tensors and the parameters' values,
/// without building the protobuf message.
async fn answer_local(
    send: &mut quinn::SendStream,
    ctx: &Ctx,
    model: &str,
    started: Instant,
    resp: &crate::request::InferResponse,
    parameters: &tensor::LocalParameters,
) {
    let mut version = itoa::Buffer::new();
    let version = version.format(resp.version);
    ctx.metrics
        .record_request(model, version, PROTOCOL, "ok", started.elapsed());
    let (pairs, n) = parameters.pairs();
    let view = framing::ResponseRef {
        model_name: &resp.model,
        model_version: version,
        id: &resp.id,
        outputs: &resp.outputs,
    };
    let frame = match framing::encode_response(&view, pairs.get(..n).unwrap_or_default()) {
        Ok(frame) => frame,
        Err(e) => {
            // Only a BYTES element over 4 GiB, which no frame can carry.
            let err = GatewayError::Model {
                model: model.to_owned(),
                message: format!("output cannot be encoded: {e}"),
            };
            return answer(send, ctx, model, started, Err(err)).await;
        }
    };
    if let Err(e) = send.write_chunk(frame).await {
        tracing::debug!(error = %e, "reply not delivered");
        return;
    }
    // A stream the peer already stopped cannot be finished; nothing is lost.
    let _ = send.finish();
}

async fn answer(
    send: &mut quinn::SendStream,
    ctx: &Ctx,
    model: &str,
    started: Instant,
    result: Result<crate::proto::ModelInferResponse, GatewayError>,
) {
    let mut version = String::new();
    let (outcome, reply) = match result {
        Ok(resp) => {
            version.clone_from(&resp.model_version);
            ("ok", reply::Result::Response(resp))
        }
        Err(e) => {
            tracing::debug!(model, error = %e, "request failed");
            (e.outcome(), reply::Result::Status(native_status(&e)))
        }
    };
    ctx.metrics
        .record_request(model, &version, PROTOCOL, outcome, started.elapsed());
    let reply = Reply {
        result: Some(reply),
    };
    if let Err(e) = framing::write_frame(send, &reply).await {
        tracing::debug!(error = %e, "reply not delivered");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_handshake_rate_counts_per_one_second_window() {
        let t0 = std::time::Instant::now();
        let mut rate = HandshakeRate::new(t0);
        assert_eq!(rate.note(t0), 1);
        assert_eq!(rate.note(t0 + Duration::from_millis(999)), 2);
        assert_eq!(rate.note(t0 + Duration::from_millis(1000)), 1);
        assert_eq!(rate.note(t0 + Duration::from_millis(1500)), 2);
        // A clock that goes back does not reset or panic.
        assert_eq!(rate.note(t0), 3);
    }
    use crate::error::Code;

    #[test]
    fn every_error_maps_to_the_design_table() {
        let cases: Vec<(GatewayError, Code)> = vec![
            (
                GatewayError::InvalidArgument("x".into()),
                Code::InvalidArgument,
            ),
            (GatewayError::UnknownModel("m".into()), Code::NotFound),
            (
                GatewayError::Overloaded {
                    model: "m".into(),
                    reason: quiver_batching::RejectReason::Overloaded,
                },
                Code::ResourceExhausted,
            ),
            (
                GatewayError::DeadlineUnreachable {
                    timeout: Duration::from_millis(1),
                    predicted: Duration::from_millis(2),
                },
                Code::Unavailable,
            ),
            (GatewayError::DeadlineExceeded, Code::DeadlineExceeded),
            (
                GatewayError::MemoryBudget {
                    need: 2,
                    held: 1,
                    limit: 2,
                },
                Code::Unavailable,
            ),
            (
                GatewayError::RequestTimeout(std::time::Duration::from_secs(1)),
                Code::DeadlineExceeded,
            ),
            (
                GatewayError::Model {
                    model: "m".into(),
                    message: "boom".into(),
                },
                Code::Internal,
            ),
            (
                GatewayError::TooLarge { limit: 1, got: 2 },
                Code::ResourceExhausted,
            ),
            (
                GatewayError::Unauthenticated("no token".into()),
                Code::Unauthenticated,
            ),
        ];
        for (err, code) in cases {
            assert_eq!(native_status(&err).code, code as i32, "{err}");
        }
    }
}
