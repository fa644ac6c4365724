//! The Rust client of the QUIC native protocol, used by the tests, the
//! benchmark harness and `quiver infer`.
//!
//! One [`Client`] holds one QUIC connection; each [`Client::infer`] opens one
//! bidirectional stream, so many requests run concurrently on it. Dropping an
//! `infer` future before its answer stops the stream, which cancels the
//! request on the server.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use prost::Message;

use crate::error::Code;
use crate::framing::{self, FrameError};
use crate::proto::native::{Reply, reply};
use crate::proto::{ModelInferRequest, ModelInferResponse};
use crate::tls::{self, Trust};

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
#[derive(Clone, Debug)]
pub struct ClientOptions {
    /// The name the server's certificate must hold; default `localhost`.
    pub server_name: String,
    /// How the server's certificate is trusted.
    pub trust: Trust,
    /// Largest reply accepted, in bytes; default 64 MiB.
    pub max_reply_bytes: u32,
    /// Idle timeout of the connection; default 30 s.
    pub idle_timeout: Duration,
}

impl ClientOptions {
    pub fn new(trust: Trust) -> Self {
        ClientOptions {
            server_name: "localhost".into(),
            trust,
            max_reply_bytes: 64 << 20,
            idle_timeout: Duration::from_secs(30),
        }
    }
}

/// A connection to a Quiver gateway over the QUIC native protocol.
#[derive(Debug, Clone)]
pub struct Client {
    endpoint: quinn::Endpoint,
    connection: quinn::Connection,
    max_reply_bytes: u32,
}

impl Client {
    /// Connects to `addr`.
    pub async fn connect(addr: SocketAddr, options: ClientOptions) -> Result<Client, ClientError> {
        let rustls = tls::client_config(&options.trust, &[crate::NATIVE_ALPN])?;
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
        })
    }

    /// Sends one request and waits for its answer.
    pub async fn infer(&self, req: &ModelInferRequest) -> Result<ModelInferResponse, ClientError> {
        self.send_frame(framing::encode(req)).await
    }

    /// Sends arbitrary bytes as a request stream (they need not be a valid
    /// frame) and waits for the server's answer. For testing the server's
    /// handling of bad input.
    pub async fn send_frame(&self, bytes: Bytes) -> Result<ModelInferResponse, ClientError> {
        let (mut send, mut recv) = self.connection.open_bi().await?;
        send.write_all(&bytes).await?;
        let _ = send.finish();
        let reply: Reply = framing::read_frame(&mut recv, self.max_reply_bytes).await?;
        match reply.result {
            Some(reply::Result::Response(r)) => Ok(r),
            Some(reply::Result::Status(s)) => Err(ClientError::Status {
                code: Code::from_i32(s.code),
                message: s.message,
            }),
            None => Err(ClientError::EmptyReply),
        }
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

/// Decodes a reply frame's body; exposed for tools that read raw streams.
pub fn decode_reply(body: &[u8]) -> Result<Reply, prost::DecodeError> {
    Reply::decode(body)
}
