//! HTTP/3 on the QUIC port: the same KServe v2 REST API as TCP 8000.
//!
//! One UDP port serves both protocols: the QUIC front end
//! ([`super::quic`]) reads the ALPN the handshake chose and hands `h3`
//! connections here. Each HTTP/3 request is checked for its token and its
//! size before its body is read (a body over the limit is refused with 413
//! and STOP_SENDING), then becomes an `http::Request` for the very router of
//! [`super::http::app`], so REST behaves alike on every transport and goes
//! through the same [`crate::router::Router::infer`]. Concurrent requests per
//! connection are bounded by QUIC's stream limit (`max_concurrent_streams`).
//!
//! A client that stops a request stream (STOP_SENDING, as RFC 9114 §4.1.1
//! cancels a request, or by dropping it) before its answer cancels the
//! request, as on the QUIC native protocol: the REST handler is dropped, its
//! request's cancel token fires, and the scheduler skips the request if it
//! has not been dispatched. [`transport`] is what lets the stop be seen.

mod transport;

use std::sync::Arc;

use ::h3::server::RequestStream;
use axum::body::Body;
use bytes::{Buf, Bytes, BytesMut};
use tower::ServiceExt;

use crate::error::GatewayError;
use crate::frontend::auth::Auth;
use crate::frontend::inflight::InFlight;
use crate::metrics::Metrics;
use crate::router::Router;
use transport::StopSignals;

/// The protocol label of REST over HTTP/3 in metrics.
pub const PROTOCOL: &str = "h3";

/// The ALPN protocol name of HTTP/3.
pub const ALPN: &[u8] = b"h3";

/// Largest header section accepted, in bytes.
const MAX_FIELD_SECTION_BYTES: u64 = 64 << 10;

/// What HTTP/3 connections share.
#[derive(Clone, Debug)]
pub struct H3Service {
    /// The REST API ([`super::http::app`] with the `h3` protocol label).
    pub app: axum::Router,
    pub auth: Auth,
    pub metrics: Arc<Metrics>,
    /// Largest request body, in bytes.
    pub max_body_bytes: usize,
    /// Longest a request's body may take to arrive once its headers have.
    pub request_read_timeout: std::time::Duration,
    /// The slowest a body may arrive (`server.min_body_bytes_per_sec`;
    /// `None`: off), as on REST over TCP.
    pub min_body_rate: Option<super::http::BodyRate>,
    /// The request-memory budget shared with the other front ends.
    pub budget: Arc<crate::budget::MemoryBudget>,
    /// Requests being served, for shutdown.
    pub in_flight: Arc<InFlight>,
}

type Stream = RequestStream<transport::BidiStream<Bytes>, Bytes>;

/// What the requests of one connection share.
struct Conn {
    svc: H3Service,
    /// The peer and its client certificate's identity, for per-client
    /// rate limits.
    remote: std::net::SocketAddr,
    identity: Option<crate::ratelimit::PeerIdentity>,
    /// The QUIC connection, for its round-trip time.
    quic: quinn::Connection,
    /// Only to label a cancelled request with its (configured) model.
    router: Arc<Router>,
    stops: StopSignals,
}

/// Serves the HTTP/3 requests of one QUIC connection until it closes.
pub async fn serve_connection(conn: quinn::Connection, svc: H3Service, router: Arc<Router>) {
    let remote = conn.remote_address();
    let identity = crate::ratelimit::PeerIdentity::of_quic(&conn);
    let stops = StopSignals::default();
    let mut h3_conn = match ::h3::server::builder()
        .max_field_section_size(MAX_FIELD_SECTION_BYTES)
        .build::<_, Bytes>(transport::Connection::new(conn.clone(), stops.clone()))
        .await
    {
        Ok(c) => c,
        Err(e) => {
            tracing::debug!(%remote, error = %e, "HTTP/3 connection setup failed");
            return;
        }
    };
    let conn = Arc::new(Conn {
        svc,
        quic: conn,
        router,
        stops,
        remote,
        identity,
    });
    loop {
        match h3_conn.accept().await {
            Ok(Some(resolver)) => {
                let conn = conn.clone();
                let guard = conn.svc.in_flight.enter();
                tokio::spawn(async move {
                    match resolver.resolve_request().await {
                        Ok((req, stream)) => serve_request(req, stream, &conn).await,
                        Err(e) => tracing::debug!(error = %e, "HTTP/3 request header unreadable"),
                    }
                    drop(guard);
                });
            }
            Ok(None) => return,
            Err(e) => {
                tracing::debug!(%remote, reason = %e, "HTTP/3 connection closed");
                return;
            }
        }
    }
}

/// The routes that `server.auth_exempt_health` exempts, as the handlers
/// decide for REST over TCP: health, and the OpenAPI document and its page.
fn is_health(path: &str) -> bool {
    path.starts_with("/v2/health/")
        || (path.starts_with("/v2/models/") && path.ends_with("/ready"))
        || matches!(
            path,
            "/health" | "/openapi.json" | "/docs" | "/docs/redoc.standalone.js"
        )
}

/// The model of an inference path (`/v2/models/{m}[/versions/{v}]/infer`).
fn infer_model(path: &str) -> Option<&str> {
    let rest = path.strip_prefix("/v2/models/")?.strip_suffix("/infer")?;
    let model = rest.split('/').next()?;
    (!model.is_empty()).then_some(model)
}

async fn serve_request(req: http::Request<()>, mut stream: Stream, conn: &Conn) {
    let svc = &conn.svc;
    // Taken first, so the signal is dropped with this request whatever
    // path it ends by.
    let stopped = conn.stops.take(stream.id());
    let (parts, ()) = req.into_parts();
    // A refusal before the handler answers in the route's API (OpenAI's and
    // TEI's error bodies differ from KServe's), as the handler would.
    let dialect = super::embed::Dialect::of_path(parts.uri.path());
    let error_response = |e: &GatewayError| super::embed::error_response_in(dialect, e, None);
    // Refuse before reading the body: a missing token, a declared size
    // over the limit.
    let authorization = parts
        .headers
        .get(http::header::AUTHORIZATION)
        .map(|v| v.as_bytes());
    let token = match svc.auth.check(authorization, is_health(parts.uri.path())) {
        Ok(token) => token,
        Err(e) => {
            svc.metrics
                .record_rejection("", PROTOCOL, "unauthenticated");
            stream.stop_sending(::h3::error::Code::H3_NO_ERROR);
            return respond(&mut stream, error_response(&e)).await;
        }
    };
    // An inference request over its client's rate is refused before its
    // body is read, as on REST over TCP; the handler then does not count
    // it again.
    let model = (parts.method == http::Method::POST)
        .then(|| infer_model(parts.uri.path()))
        .flatten()
        .and_then(|m| conn.router.model(m))
        .map(|e| e.name.clone());
    if let Some(model) = &model {
        let checked = svc
            .auth
            .client(token, conn.identity.as_ref(), Some(conn.remote.ip()))
            .and_then(|client| conn.router.check_rate(model, client));
        if let Err(e) = checked {
            svc.metrics.record_rejection(model, PROTOCOL, e.outcome());
            stream.stop_sending(::h3::error::Code::H3_NO_ERROR);
            return respond(&mut stream, error_response(&e)).await;
        }
    }
    // The body's bytes are counted from here until the answer is sent.
    let mut reservation = match svc.budget.reserve(0) {
        Ok(r) => r,
        Err(e) => return respond(&mut stream, error_response(&e)).await,
    };
    let read = tokio::time::timeout(
        svc.request_read_timeout,
        read_body(
            &parts.headers,
            &mut stream,
            svc.max_body_bytes,
            &mut reservation,
            svc.min_body_rate,
        ),
    )
    .await
    .unwrap_or(Err(GatewayError::RequestTimeout(svc.request_read_timeout)));
    let body = match read {
        Ok(b) => b,
        Err(e) => {
            if matches!(
                e,
                GatewayError::TooLarge { .. }
                    | GatewayError::RequestTimeout(_)
                    | GatewayError::BodyTooSlow { .. }
                    | GatewayError::MemoryBudget { .. }
            ) {
                svc.metrics.record_rejection("", PROTOCOL, e.outcome());
                // The rest of the body is not wanted.
                stream.stop_sending(::h3::error::Code::H3_NO_ERROR);
            }
            return respond(&mut stream, error_response(&e)).await;
        }
    };
    let mut request = http::Request::from_parts(parts, Body::from(body));
    request.extensions_mut().insert(super::http::BodyCounted);
    if model.is_some() {
        request.extensions_mut().insert(super::http::RateChecked);
    }
    request
        .extensions_mut()
        .insert(crate::ratelimit::ClientAddr(conn.remote));
    if let Some(id) = &conn.identity {
        request.extensions_mut().insert(id.clone());
    }
    request
        .extensions_mut()
        .insert(super::http::RoundTrip(conn.quic.rtt()));
    let call = svc.app.clone().oneshot(request);
    let response = match stopped {
        Some(stopped) => tokio::select! {
            // Polling the request first admits it before a stop already
            // received is seen, so a cancelled request always ends in the
            // scheduler, which counts it and never computes it.
            biased;
            response = call => response,
            () = stopped => {
                // Dropping the handler cancels its request (`CancelOnDrop`)
                // and counts it as cancelled (its `RequestGuard`).
                tracing::debug!("HTTP/3 request stream stopped before its answer");
                return;
            }
        },
        None => call.await,
    };
    let response = match response {
        Ok(r) => r,
        Err(never) => match never {},
    };
    respond(&mut stream, response).await;
}

/// Reads the body (at most `limit` bytes), counting it against the memory
/// budget: an announced length before anything is allocated, and whatever
/// arrives beyond it as it arrives.
fn length_mismatch(declared: u64, got: u64, how: &str) -> GatewayError {
    GatewayError::InvalidArgument(format!(
        "content-length is {declared} but the body has {how} {got} bytes"
    ))
}

async fn read_body(
    headers: &http::HeaderMap,
    stream: &mut Stream,
    limit: usize,
    reservation: &mut crate::budget::Reservation,
    rate: Option<super::http::BodyRate>,
) -> Result<Bytes, GatewayError> {
    let started = tokio::time::Instant::now();
    let declared = headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if let Some(len) = declared
        && len > limit as u64
    {
        return Err(GatewayError::TooLarge {
            limit: limit as u64,
            got: len,
        });
    }
    let counted_up_front = declared.unwrap_or(0);
    reservation.grow(counted_up_front)?;
    let mut body = BytesMut::with_capacity(counted_up_front as usize);
    loop {
        let next = stream.recv_data();
        let next = match rate {
            None => next.await,
            Some(rate) => {
                let due = started + rate.due(body.len() as u64 + 1);
                match tokio::time::timeout_at(due, next).await {
                    Ok(next) => next,
                    Err(_) => {
                        return Err(GatewayError::BodyTooSlow {
                            received: body.len() as u64,
                            elapsed: started.elapsed(),
                            min_rate: rate.bytes_per_sec,
                        });
                    }
                }
            }
        };
        match next {
            Ok(Some(mut chunk)) => {
                let total = (body.len() + chunk.remaining()) as u64;
                if total > limit as u64 {
                    return Err(GatewayError::TooLarge {
                        limit: limit as u64,
                        got: total,
                    });
                }
                if let Some(len) = declared
                    && total > len
                {
                    return Err(length_mismatch(len, total, "at least"));
                }
                if total > reservation.bytes() {
                    reservation.grow(total - reservation.bytes())?;
                }
                while chunk.has_remaining() {
                    let c = chunk.chunk();
                    body.extend_from_slice(c);
                    let n = c.len();
                    chunk.advance(n);
                }
            }
            Ok(None) => {
                return match declared {
                    // RFC 9114, 4.1.2: a body that is not its content-length
                    // makes the request malformed.
                    Some(len) if body.len() as u64 != len => {
                        Err(length_mismatch(len, body.len() as u64, "only"))
                    }
                    _ => Ok(body.freeze()),
                };
            }
            Err(e) => {
                return Err(GatewayError::InvalidArgument(format!(
                    "cannot read the request body: {e}"
                )));
            }
        }
    }
}

async fn respond(stream: &mut Stream, response: axum::response::Response) {
    let (parts, body) = response.into_parts();
    // Responses are built in memory by the REST handlers.
    let bytes = match axum::body::to_bytes(body, usize::MAX).await {
        Ok(b) => b,
        Err(e) => {
            tracing::debug!(error = %e, "response body unreadable");
            return;
        }
    };
    let head = http::Response::from_parts(parts, ());
    if let Err(e) = stream.send_response(head).await {
        tracing::debug!(error = %e, "HTTP/3 response not delivered");
        return;
    }
    if !bytes.is_empty()
        && let Err(e) = stream.send_data(bytes).await
    {
        tracing::debug!(error = %e, "HTTP/3 response body not delivered");
        return;
    }
    if let Err(e) = stream.finish().await {
        tracing::debug!(error = %e, "HTTP/3 stream not finished");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn health_paths_are_recognised() {
        assert!(is_health("/v2/health/live"));
        assert!(is_health("/v2/models/mlp/ready"));
        assert!(is_health("/v2/models/mlp/versions/1/ready"));
        assert!(!is_health("/v2/models/mlp/infer"));
        assert!(!is_health("/v2"));
    }

    #[test]
    fn the_model_of_an_inference_path() {
        assert_eq!(infer_model("/v2/models/mlp/infer"), Some("mlp"));
        assert_eq!(infer_model("/v2/models/mlp/versions/1/infer"), Some("mlp"));
        assert_eq!(infer_model("/v2/models//infer"), None);
        assert_eq!(infer_model("/v2/models/mlp/ready"), None);
        assert_eq!(infer_model("/v2/health/live"), None);
    }
}
