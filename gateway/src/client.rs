//! The Rust client of the QUIC native protocol, used by the tests, the
//! benchmark harness and `quiver infer`.
//!
//! One [`Client`] holds one QUIC connection; each [`Client::infer`] opens one
//! bidirectional stream, so many requests run concurrently on it. Dropping an
//! `infer` future before its answer stops the stream, which cancels the
//! request on the server. With [`ClientOptions::token`] set, every
//! [`Client::infer`] carries the bearer token as the request parameter
//! `authorization` ([`crate::frontend::auth::PARAMETER`]).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use prost::Message;

use crate::error::Code;
use crate::framing::{self, FrameError};
use crate::proto::native::Reply;
use crate::proto::{ModelInferRequest, ModelInferResponse};
use crate::tls::{self, Trust};
use quiver_protocol::frame::ReplyError;
use quiver_protocol::plain::{ReplyPeek, ResponsePeek};

/// Why a request got no response.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    #[error("TLS: {0}")]
    Tls(#[from] tls::TlsError),
    #[error("cannot connect: {0}")]
    Connect(String),
    #[error("connection lost: {0}")]
    Connection(#[from] quinn::ConnectionError),
    #[error("stream write failed: {0}")]
    Write(#[from] quinn::WriteError),
    #[error("bad reply: {0}")]
    Frame(#[from] FrameError),
    #[error("reply holds neither a response nor a status")]
    EmptyReply,
    /// The server answered with an error status.
    #[error("{code}: {message}")]
    Status { code: Code, message: String },
}

impl ClientError {
    /// The server's status code, when the server answered with one.
    pub fn code(&self) -> Option<Code> {
        match self {
            ClientError::Status { code, .. } => Some(*code),
            _ => None,
        }
    }
}

/// Knobs of a client connection.
#[derive(Clone)]
pub struct ClientOptions {
    /// The name the server's certificate must hold; default `localhost`.
    pub server_name: String,
    /// How the server's certificate is trusted.
    pub trust: Trust,
    /// Largest reply accepted, in bytes; default 64 MiB.
    pub max_reply_bytes: u32,
    /// Idle timeout of the connection; default 30 s.
    pub idle_timeout: Duration,
    /// The bearer token sent with every [`Client::infer`], for a server
    /// with `server.auth_tokens`; default none.
    pub token: Option<String>,
    /// The client certificate presented to a server with `tls.client_ca`
    /// (mTLS); default none.
    pub certificate: Option<Arc<tls::Identity>>,
}

impl std::fmt::Debug for ClientOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The token is a secret: say only whether there is one.
        f.debug_struct("ClientOptions")
            .field("server_name", &self.server_name)
            .field("trust", &self.trust)
            .field("max_reply_bytes", &self.max_reply_bytes)
            .field("idle_timeout", &self.idle_timeout)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field(
                "certificate",
                &self.certificate.as_ref().map(|c| c.fingerprint()),
            )
            .finish()
    }
}

impl ClientOptions {
    pub fn new(trust: Trust) -> Self {
        ClientOptions {
            server_name: "localhost".into(),
            trust,
            max_reply_bytes: 64 << 20,
            idle_timeout: Duration::from_secs(30),
            token: None,
            certificate: None,
        }
    }
}

/// A connection to a Quiver gateway over the QUIC native protocol.
#[derive(Debug, Clone)]
pub struct Client {
    endpoint: quinn::Endpoint,
    connection: quinn::Connection,
    max_reply_bytes: u32,
    /// See [`encode_request`].
    token: Option<TokenFields>,
}

/// The protobuf encoding of a `ModelInferRequest` that holds only the token
/// parameter. Its `Debug` hides the secret.
#[derive(Clone)]
struct TokenFields(Bytes);

impl std::fmt::Debug for TokenFields {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

impl Client {
    /// Connects to `addr`.
    pub async fn connect(addr: SocketAddr, options: ClientOptions) -> Result<Client, ClientError> {
        let rustls = tls::client_config_with(
            &options.trust,
            &[crate::NATIVE_ALPN],
            options.certificate.as_deref(),
        )?;
        let quic = quinn::crypto::rustls::QuicClientConfig::try_from(rustls)
            .map_err(|e| ClientError::Connect(e.to_string()))?;
        let mut config = quinn::ClientConfig::new(Arc::new(quic));
        let mut transport = quinn::TransportConfig::default();
        transport.max_idle_timeout(
            quinn::IdleTimeout::try_from(options.idle_timeout)
                .map(Some)
                .unwrap_or(None),
        );
        config.transport_config(Arc::new(transport));
        let bind: SocketAddr = if addr.is_ipv4() {
            (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
        } else {
            (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
        };
        let mut endpoint =
            quinn::Endpoint::client(bind).map_err(|e| ClientError::Connect(e.to_string()))?;
        endpoint.set_default_client_config(config);
        let connection = endpoint
            .connect(addr, &options.server_name)
            .map_err(|e| ClientError::Connect(e.to_string()))?
            .await?;
        Ok(Client {
            endpoint,
            connection,
            max_reply_bytes: options.max_reply_bytes,
            token: options.token.as_deref().map(token_fields),
        })
    }

    /// Sends one request (with the token of [`ClientOptions::token`], if
    /// any) and waits for its answer.
    pub async fn infer(&self, req: &ModelInferRequest) -> Result<ModelInferResponse, ClientError> {
        self.send_frame(encode_request(req, self.token.as_ref().map(|t| &t.0[..])))
            .await
    }

    /// Sends arbitrary bytes as a request stream (they need not be a valid
    /// frame, and no token is added) and waits for the server's answer. For
    /// testing the server's handling of bad input, and for callers that
    /// encode their frames ahead of time.
    pub async fn send_frame(&self, bytes: Bytes) -> Result<ModelInferResponse, ClientError> {
        let (mut send, mut recv) = self.connection.open_bi().await?;
        send.write_all(&bytes).await?;
        let _ = send.finish();
        let reply: Reply = framing::read_frame(&mut recv, self.max_reply_bytes).await?;
        framing::open_reply(reply).map_err(|e| match e {
            ReplyError::Status { code, message } => ClientError::Status { code, message },
            _ => ClientError::EmptyReply,
        })
    }

    /// [`send_frame`](Self::send_frame), with the reply kept as its bytes:
    /// for callers that read a few fields of many replies (the benchmark
    /// harness reads where each was served), which
    /// [`RawResponse::peek`] gives without building the message. A reply
    /// that starts with a response is returned as it is and checked when
    /// read ([`peek`](RawResponse::peek) or [`decode`](RawResponse::decode));
    /// any other is decoded here, and a status is an error as for
    /// `send_frame`.
    pub async fn send_frame_raw(&self, bytes: Bytes) -> Result<RawResponse, ClientError> {
        let (mut send, mut recv) = self.connection.open_bi().await?;
        send.write_all(&bytes).await?;
        let _ = send.finish();
        let len = framing::read_header(&mut recv, self.max_reply_bytes).await?;
        let body = RawResponse(framing::read_bytes(&mut recv, len).await?);
        // `Reply.response`'s key: field 1, length-delimited.
        if body.0.first() == Some(&0x0a) {
            return Ok(body);
        }
        body.decode().map(|_| body)
    }

    /// The underlying QUIC connection, for callers that drive streams
    /// themselves.
    pub fn connection(&self) -> &quinn::Connection {
        &self.connection
    }

    /// Closes the connection and waits until the server has been told.
    pub async fn close(self) {
        self.connection.close(0u32.into(), b"done");
        self.endpoint.wait_idle().await;
    }
}

/// A reply from [`Client::send_frame_raw`], kept as its bytes.
#[derive(Debug, Clone)]
pub struct RawResponse(Bytes);

impl RawResponse {
    /// The response's names, output count and parameters, read in place;
    /// `None` for a reply not in the common shape
    /// ([`peek_reply`](quiver_protocol::plain::peek_reply)) or not a
    /// response: [`decode`](Self::decode) it.
    pub fn peek(&self) -> Option<ResponsePeek<'_>> {
        match quiver_protocol::plain::peek_reply(&self.0) {
            Some(ReplyPeek::Response(r)) => Some(r),
            _ => None,
        }
    }

    /// The whole message, as [`Client::send_frame`] gives it (a malformed
    /// reply, or a status, is the same error).
    pub fn decode(&self) -> Result<ModelInferResponse, ClientError> {
        let reply: Reply = framing::decode_body(self.0.clone())?;
        framing::open_reply(reply).map_err(|e| match e {
            ReplyError::Status { code, message } => ClientError::Status { code, message },
            _ => ClientError::EmptyReply,
        })
    }
}

fn token_fields(token: &str) -> TokenFields {
    let mut only_token = ModelInferRequest::default();
    only_token.parameters.insert(
        crate::frontend::auth::PARAMETER.into(),
        crate::frontend::auth::bearer_parameter(token),
    );
    TokenFields(Bytes::from(only_token.encode_to_vec()))
}

/// The frame of `req`, with `token_fields` appended to its body. Protobuf
/// merges concatenated messages, and a map entry read later replaces one
/// read earlier, so the server decodes `req` with the token parameter set,
/// without the request (and its tensors) being copied to add it.
fn encode_request(req: &ModelInferRequest, token_fields: Option<&[u8]>) -> Bytes {
    framing::encode_with(req, token_fields.unwrap_or_default())
}

/// Decodes a reply frame's body; exposed for tools that read raw streams.
pub fn decode_reply(body: &[u8]) -> Result<Reply, prost::DecodeError> {
    Reply::decode(body)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frontend::auth::PARAMETER;
    use crate::proto::inference::infer_parameter::ParameterChoice;

    #[test]
    fn the_token_rides_along_as_a_parameter_and_replaces_a_stale_one() {
        let mut req = crate::tensor::request_to_proto(
            "m",
            "7",
            &[quiver_kernels::HostTensor::new(
                "INPUT0",
                vec![1, 2],
                quiver_kernels::TensorData::F32(vec![1.0, 2.0]),
            )
            .expect("a valid tensor")],
            [("priority".to_string(), crate::tensor::int_param(1))].into(),
        );
        req.parameters.insert(
            PARAMETER.into(),
            crate::frontend::auth::bearer_parameter("stale"),
        );
        let frame = encode_request(&req, Some(&token_fields("s3cret").0));
        let len = u32::from_be_bytes([frame[0], frame[1], frame[2], frame[3]]) as usize;
        assert_eq!(len, frame.len() - framing::HEADER_LEN);
        let decoded = ModelInferRequest::decode(&frame[framing::HEADER_LEN..])
            .expect("a valid ModelInferRequest");

        let mut want = req.clone();
        want.parameters.insert(
            PARAMETER.into(),
            crate::frontend::auth::bearer_parameter("s3cret"),
        );
        assert_eq!(decoded, want);
        assert_eq!(
            decoded.parameters[PARAMETER].parameter_choice,
            Some(ParameterChoice::StringParam("Bearer s3cret".into()))
        );
        // Without a token, the frame is the plain encoding.
        assert_eq!(encode_request(&req, None), framing::encode(&req));
    }
}
