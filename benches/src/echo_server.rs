//! `quiver-bench echo-server`: a bare quinn server that answers each
//! bidirectional stream with the bytes it was sent.
//!
//! Same TLS (a self-signed certificate, ALPN `quiver/1`) and the same
//! one-request-per-stream pattern as the gateway's QUIC native front end, but
//! no decoding, no router, no batcher and no model. Measured with the
//! `quic-echo://` target, it is the transport's own limit on this machine:
//! what the gateway's numbers should be compared with.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use quiver_gateway::tls::{self, Identity, TlsError};

/// Why the echo server cannot start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EchoError {
    #[error("TLS: {0}")]
    Tls(#[from] TlsError),
    #[error("QUIC server configuration: {0}")]
    Quic(String),
    #[error("binding udp {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// Knobs of the echo server.
#[derive(Clone, Copy, Debug)]
pub struct EchoLimits {
    /// Largest stream echoed, bytes; longer ones are stopped. Default 64 MiB.
    pub max_stream_bytes: usize,
    /// Concurrent streams per connection. Default 1024.
    pub max_concurrent_streams: u32,
}

impl Default for EchoLimits {
    fn default() -> Self {
        EchoLimits {
            max_stream_bytes: 64 << 20,
            max_concurrent_streams: 1024,
        }
    }
}

/// A bound echo server and its certificate.
#[derive(Debug)]
pub struct EchoServer {
    pub endpoint: quinn::Endpoint,
    pub identity: Identity,
    limits: EchoLimits,
}

impl EchoServer {
    /// Binds `addr` with a fresh self-signed certificate.
    pub fn bind(addr: SocketAddr, limits: EchoLimits) -> Result<Self, EchoError> {
        let identity = Identity::self_signed(&[])?;
        let rustls = tls::server_config(&identity, &[quiver_gateway::NATIVE_ALPN], None)?;
        let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(rustls)
            .map_err(|e| EchoError::Quic(e.to_string()))?;
        let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
        let mut transport = quinn::TransportConfig::default();
        transport
            .max_concurrent_bidi_streams(limits.max_concurrent_streams.into())
            .max_concurrent_uni_streams(0u32.into())
            .max_idle_timeout(quinn::IdleTimeout::try_from(Duration::from_secs(30)).ok());
        config.transport_config(Arc::new(transport));
        let endpoint = quinn::Endpoint::server(config, addr)
            .map_err(|source| EchoError::Bind { addr, source })?;
        Ok(EchoServer {
            endpoint,
            identity,
            limits,
        })
    }

    /// The bound address.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.endpoint.local_addr()
    }

    /// Serves until the endpoint is closed.
    pub async fn serve(self) {
        let max = self.limits.max_stream_bytes;
        while let Some(incoming) = self.endpoint.accept().await {
            tokio::spawn(async move {
                let Ok(conn) = incoming.await else { return };
                while let Ok((mut send, mut recv)) = conn.accept_bi().await {
                    tokio::spawn(async move {
                        match recv.read_to_end(max).await {
                            Ok(bytes) => {
                                if send.write_all(&bytes).await.is_ok() {
                                    let _ = send.finish();
                                }
                            }
                            Err(_) => {
                                let _ = recv.stop(0u32.into());
                            }
                        }
                    });
                }
            });
        }
    }
}
