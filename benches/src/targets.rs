//! The targets: one per wire protocol, all speaking only the standard Open
//! Inference Protocol (KServe v2) towards the server, so any KServe v2 server
//! can be measured, not only Quiver.
//!
//! | URL scheme | protocol |
//! | --- | --- |
//! | `quic://host:port` | Quiver's QUIC native protocol (ALPN `quiver/1`), [`quiver_gateway::client::Client`] |
//! | `quic-echo://host:port` | the same frames to `quiver-bench echo-server`, which sends them back: the transport's own limit |
//! | `http://`, `https://` | KServe v2 REST over HTTP/1.1 (JSON, or the binary tensor extension with `--binary`) |
//! | `h2c://`, `h2://` | the same over HTTP/2 (cleartext with prior knowledge, or TLS with ALPN `h2`) |
//! | `grpc://host:port` | KServe v2 gRPC `GRPCInferenceService/ModelInfer` (cleartext HTTP/2), the gateway's tonic client |
//! | `h3://host:port` | KServe v2 REST over HTTP/3 (ALPN `h3`), h3 + h3-quinn |
//! | `engine://local` | no wire: a gateway started in this process from `--engine-config` (default: the embedded configuration), its router called directly. The raw engine to set the gateway against |
//!
//! Every request is encoded before the first step, so the measured loop does
//! no encoding. A target reads the response parameters `quiver_path` and
//! `quiver_batch_size` when the server sets them (Quiver does; others need
//! not).
//!
//! With a bearer token ([`ConnectOptions::token`]), every request carries
//! it the way its protocol does: the `Authorization` header (REST, HTTP/3),
//! `authorization` metadata (gRPC), or the `authorization` request parameter
//! (QUIC native), encoded with the rest before the first step.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use quiver_gateway::client::{Client, ClientError, ClientOptions, RawResponse};
use quiver_gateway::error::Code;
use quiver_gateway::framing;
use quiver_gateway::frontend::auth;
use quiver_gateway::json::{parameters_to_json, tensor_to_json};
use quiver_gateway::proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use quiver_gateway::proto::{ModelInferRequest, ModelInferResponse};
use quiver_gateway::request::params;
use quiver_gateway::tensor::{ParamRef, request_to_proto, response_int, response_str};
use quiver_gateway::tls::{self, Trust};
use serde_json::{Value, json};

use crate::inputs::RequestPool;
use crate::load::{Infer, Outcome, Served};

/// Why a target cannot be reached or set up.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TargetError {
    #[error(
        "bad target '{0}': give scheme://host:port with scheme quic, quic-echo, http, https, h2c, h2, grpc or h3, or engine://local"
    )]
    BadUrl(String),
    #[error("{0} uses TLS: give --ca FILE, --pin SHA256 or --insecure")]
    NoTrust(String),
    #[error("cannot resolve {0}")]
    Resolve(String),
    #[error("QUIC: {0}")]
    Quic(#[from] ClientError),
    #[error("TLS: {0}")]
    Tls(#[from] tls::TlsError),
    #[error("HTTP client: {0}")]
    Http(#[from] reqwest::Error),
    #[error("gRPC: {0}")]
    Grpc(#[from] tonic::transport::Error),
    #[error("HTTP/3: {0}")]
    H3(String),
    #[error("engine: {0}")]
    Engine(String),
    #[error("the token cannot be sent in an HTTP header or gRPC metadata: {0}")]
    BadToken(String),
}

/// The wire protocol of a target.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Protocol {
    Quic,
    QuicEcho,
    Http1,
    Http2,
    Grpc,
    Http3,
    Engine,
}

/// A parsed target address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TargetUrl {
    pub protocol: Protocol,
    pub tls: bool,
    pub host: String,
    pub port: u16,
}

impl std::str::FromStr for TargetUrl {
    type Err = TargetError;
    fn from_str(s: &str) -> Result<Self, TargetError> {
        let bad = || TargetError::BadUrl(s.into());
        let (scheme, rest) = s.split_once("://").ok_or_else(bad)?;
        let (protocol, tls, default_port) = match scheme {
            "quic" => (Protocol::Quic, true, 4433),
            "quic-echo" => (Protocol::QuicEcho, true, 4434),
            "http" => (Protocol::Http1, false, 8000),
            "https" => (Protocol::Http1, true, 8000),
            "h2c" => (Protocol::Http2, false, 8000),
            "h2" => (Protocol::Http2, true, 8000),
            "grpc" => (Protocol::Grpc, false, 8001),
            "h3" => (Protocol::Http3, true, 4433),
            "engine" => (Protocol::Engine, false, 0),
            _ => return Err(bad()),
        };
        let authority = rest.trim_end_matches('/');
        if authority.is_empty() || authority.contains('/') {
            return Err(bad());
        }
        // `[::1]:4433`, `host:4433` or `host`.
        let (host, port) = match authority.rsplit_once(':') {
            Some((h, p)) if !h.ends_with(':') && (h.starts_with('[') || !h.contains(':')) => {
                (h, p.parse::<u16>().map_err(|_| bad())?)
            }
            _ => (authority, default_port),
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() {
            return Err(bad());
        }
        Ok(TargetUrl {
            protocol,
            tls,
            host: host.into(),
            port,
        })
    }
}

impl std::fmt::Display for TargetUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let scheme = match (self.protocol, self.tls) {
            (Protocol::Quic, _) => "quic",
            (Protocol::QuicEcho, _) => "quic-echo",
            (Protocol::Http1, false) => "http",
            (Protocol::Http1, true) => "https",
            (Protocol::Http2, false) => "h2c",
            (Protocol::Http2, true) => "h2",
            (Protocol::Grpc, _) => "grpc",
            (Protocol::Http3, _) => "h3",
            (Protocol::Engine, _) => return write!(f, "engine://{}", self.host),
        };
        if self.host.contains(':') {
            write!(f, "{scheme}://[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{scheme}://{}:{}", self.host, self.port)
        }
    }
}

/// How to connect.
#[derive(Clone, Debug)]
pub struct ConnectOptions {
    /// How the server's certificate is trusted; required for TLS targets.
    pub trust: Option<Trust>,
    /// The name the certificate must hold; default the URL's host, or
    /// `localhost` when that is an IP address.
    pub server_name: Option<String>,
    /// QUIC connections (requests spread round-robin); default 1.
    pub connections: usize,
    /// REST: send tensors with the binary tensor extension.
    pub binary: bool,
    /// `engine://`: the gateway configuration to start in-process; `None`
    /// for the embedded default.
    pub engine_config: Option<std::path::PathBuf>,
    /// Bearer token sent with every request; `None` sends none. Ignored by
    /// `quic-echo://` and `engine://`, which check no token.
    pub token: Option<String>,
}

/// A connected target.
#[derive(Debug)]
pub enum Target {
    Quic(QuicTarget),
    Echo(EchoTarget),
    Rest(RestTarget),
    Grpc(GrpcTarget),
    H3(H3Target),
    Engine(EngineTarget),
}

impl Target {
    /// Connects to `url` and encodes `pool` for its protocol.
    pub async fn connect(
        url: &TargetUrl,
        options: &ConnectOptions,
        pool: &RequestPool,
    ) -> Result<Target, TargetError> {
        let trust = match (url.tls, &options.trust) {
            (false, _) => None,
            (true, Some(t)) => Some(t.clone()),
            (true, None) => return Err(TargetError::NoTrust(url.to_string())),
        };
        let server_name = options.server_name.clone().unwrap_or_else(|| {
            if url.host.parse::<std::net::IpAddr>().is_ok() {
                "localhost".into()
            } else {
                url.host.clone()
            }
        });
        let authorization = options
            .token
            .as_deref()
            .map(authorization_header)
            .transpose()?;
        Ok(match url.protocol {
            Protocol::Engine => Target::Engine(EngineTarget::start(options, pool).await?),
            Protocol::Grpc => {
                let endpoint =
                    tonic::transport::Endpoint::from_shared(format!("http://{}", authority(url)))?;
                let authorization = authorization
                    .map(|v| {
                        let mut m = tonic::metadata::MetadataValue::try_from(v.as_bytes())
                            .map_err(|e| TargetError::BadToken(e.to_string()))?;
                        m.set_sensitive(true);
                        Ok::<_, TargetError>(m)
                    })
                    .transpose()?;
                Target::Grpc(GrpcTarget {
                    client: GrpcInferenceServiceClient::new(endpoint.connect().await?),
                    requests: native_requests(pool, None),
                    authorization,
                })
            }
            Protocol::Http3 => {
                let addr = resolve(url).await?;
                let trust = trust.ok_or_else(|| TargetError::NoTrust(url.to_string()))?;
                let mut t =
                    H3Target::connect(addr, &server_name, &trust, url, pool, options.binary)
                        .await?;
                t.authorization = authorization;
                Target::H3(t)
            }
            Protocol::Quic | Protocol::QuicEcho => {
                let addr = resolve(url).await?;
                let trust = trust.ok_or_else(|| TargetError::NoTrust(url.to_string()))?;
                let mut clients = Vec::with_capacity(options.connections.max(1));
                for _ in 0..options.connections.max(1) {
                    let mut o = ClientOptions::new(trust.clone());
                    o.server_name = server_name.clone();
                    clients.push(Client::connect(addr, o).await?);
                }
                if url.protocol == Protocol::Quic {
                    let frames = native_frames(pool, options.token.as_deref());
                    Target::Quic(QuicTarget { clients, frames })
                } else {
                    let frames = native_frames(pool, None);
                    Target::Echo(EchoTarget { clients, frames })
                }
            }
            Protocol::Http1 | Protocol::Http2 => {
                // reqwest is built without a crypto provider of its own and
                // wants a process default even for cleartext; ring is the one
                // the rest of Quiver uses. An error means one is installed.
                let _ = rustls::crypto::ring::default_provider().install_default();
                let mut b = reqwest::Client::builder();
                if let Some(value) = authorization {
                    let mut headers = reqwest::header::HeaderMap::new();
                    headers.insert(reqwest::header::AUTHORIZATION, value);
                    b = b.default_headers(headers);
                }
                let alpn: &[&[u8]] = if url.protocol == Protocol::Http1 {
                    b = b.http1_only();
                    &[b"http/1.1"]
                } else {
                    b = b.http2_prior_knowledge();
                    &[b"h2"]
                };
                if let Some(trust) = &trust {
                    b = b.use_preconfigured_tls(tls::client_config(trust, alpn)?);
                    if let Ok(addr) = resolve(url).await {
                        // Connect to the URL's address while the certificate
                        // is checked against `server_name`.
                        b = b.resolve(&server_name, addr);
                    }
                }
                let host = if trust.is_some() {
                    server_name.clone()
                } else if url.host.contains(':') {
                    format!("[{}]", url.host)
                } else {
                    url.host.clone()
                };
                let scheme = if url.tls { "https" } else { "http" };
                let infer_url = format!(
                    "{scheme}://{host}:{}/v2/models/{}/infer",
                    url.port, pool.model
                );
                Target::Rest(RestTarget {
                    client: b.build()?,
                    url: infer_url,
                    bodies: rest_bodies(pool, options.binary),
                })
            }
        })
    }
}

impl Infer for Target {
    async fn infer(&self, index: u64) -> Outcome {
        match self {
            Target::Quic(t) => t.infer(index).await,
            Target::Echo(t) => t.infer(index).await,
            Target::Rest(t) => t.infer(index).await,
            Target::Grpc(t) => t.infer(index).await,
            Target::H3(t) => t.infer(index).await,
            Target::Engine(t) => t.infer(index).await,
        }
    }
}

/// `Authorization: Bearer TOKEN`, marked sensitive so that no log shows it.
fn authorization_header(token: &str) -> Result<http::HeaderValue, TargetError> {
    let mut v = http::HeaderValue::try_from(format!("Bearer {token}"))
        .map_err(|e| TargetError::BadToken(e.to_string()))?;
    v.set_sensitive(true);
    Ok(v)
}

async fn resolve(url: &TargetUrl) -> Result<SocketAddr, TargetError> {
    let name = format!("{}:{}", url.host, url.port);
    tokio::net::lookup_host((url.host.as_str(), url.port))
        .await
        .ok()
        .and_then(|mut a| a.next())
        .ok_or(TargetError::Resolve(name))
}

fn authority(url: &TargetUrl) -> String {
    if url.host.contains(':') {
        format!("[{}]:{}", url.host, url.port)
    } else {
        format!("{}:{}", url.host, url.port)
    }
}

fn pick<T>(items: &[T], index: u64) -> &T {
    // Targets are built with non-empty pools and client lists.
    &items[(index % items.len() as u64) as usize]
}

/// Every request of the pool as a protobuf message, tensors in
/// `raw_input_contents`; with `token`, the QUIC native protocol's
/// `authorization` parameter set to it.
pub fn native_requests(pool: &RequestPool, token: Option<&str>) -> Vec<ModelInferRequest> {
    pool.payloads
        .iter()
        .map(|p| {
            let mut parameters = pool.parameters.clone();
            if let Some(token) = token {
                parameters.insert(auth::PARAMETER.into(), auth::bearer_parameter(token));
            }
            request_to_proto(&pool.model, &p.id, &p.inputs, parameters)
        })
        .collect()
}

/// The native frame of every request in the pool, with `token` as in
/// [`native_requests`].
pub fn native_frames(pool: &RequestPool, token: Option<&str>) -> Vec<Bytes> {
    native_requests(pool, token)
        .iter()
        .map(framing::encode)
        .collect()
}

/// What Quiver says about where and how it served a result, from the
/// protobuf response parameters.
pub fn served_from_proto(resp: &ModelInferResponse) -> Served {
    Served {
        overflow: response_str(resp, params::PATH).map(|p| p != "local"),
        batch_size: response_int(resp, params::BATCH_SIZE).and_then(|b| u32::try_from(b).ok()),
    }
}

/// [`served_from_proto`] for a reply kept as bytes: read in place, or
/// decoded when it is not in the common shape (then a malformed reply or a
/// status is the error it is for [`Client::send_frame`]).
pub fn served_from_raw(resp: &RawResponse) -> Result<Served, ClientError> {
    let Some(peek) = resp.peek() else {
        return resp.decode().map(|m| served_from_proto(&m));
    };
    Ok(Served {
        overflow: match peek.parameter(params::PATH) {
            Some(ParamRef::Str(p)) => Some(p != "local"),
            _ => None,
        },
        batch_size: match peek.parameter(params::BATCH_SIZE) {
            Some(ParamRef::Int(b)) => u32::try_from(b).ok(),
            _ => None,
        },
    })
}

/// The error kind of a QUIC native client error: the status name, or the
/// client's own failure.
pub fn native_error_kind(e: &ClientError) -> String {
    match e {
        ClientError::Status { code, .. } => code.as_str().into(),
        ClientError::Connection(_) => "connection".into(),
        ClientError::Write(_) => "stream_write".into(),
        ClientError::Frame(_) => "bad_reply".into(),
        ClientError::EmptyReply => "empty_reply".into(),
        _ => "transport".into(),
    }
}

/// The QUIC native protocol.
#[derive(Debug)]
pub struct QuicTarget {
    clients: Vec<Client>,
    frames: Vec<Bytes>,
}

impl QuicTarget {
    async fn infer(&self, index: u64) -> Outcome {
        let frame = pick(&self.frames, index).clone();
        // The reply read in place: building the message (a map of nine
        // parameters) cost the client more than the gateway's own work per
        // request, on cores it shares with the gateway.
        let served = match pick(&self.clients, index).send_frame_raw(frame).await {
            Ok(resp) => served_from_raw(&resp),
            Err(e) => Err(e),
        };
        match served {
            Ok(served) => Outcome::Ok(served),
            Err(e) => Outcome::Err(native_error_kind(&e)),
        }
    }
}

/// Native frames to an echo server: one stream per request, answered by the
/// same bytes. No model, no batcher: what QUIC and the client cost alone.
#[derive(Debug)]
pub struct EchoTarget {
    clients: Vec<Client>,
    frames: Vec<Bytes>,
}

impl EchoTarget {
    async fn infer(&self, index: u64) -> Outcome {
        let frame = pick(&self.frames, index);
        let conn = pick(&self.clients, index).connection();
        let result = async {
            let (mut send, mut recv) = conn.open_bi().await.map_err(|_| "connection")?;
            send.write_all(frame).await.map_err(|_| "stream_write")?;
            let _ = send.finish();
            recv.read_to_end(frame.len())
                .await
                .map_err(|_| "stream_read")
        }
        .await;
        match result {
            Ok(back) if back.len() == frame.len() => Outcome::Ok(Served::default()),
            Ok(_) => Outcome::Err("echo_mismatch".into()),
            Err(kind) => Outcome::Err(kind.into()),
        }
    }
}

/// A pre-encoded REST request body; `header_len` is set for the binary
/// tensor extension (`Inference-Header-Content-Length`).
#[derive(Clone, Debug)]
pub struct RestBody {
    pub body: Bytes,
    pub header_len: Option<usize>,
}

/// The header of the binary tensor extension.
pub const HEADER_LENGTH: &str = "Inference-Header-Content-Length";

/// KServe v2 REST bodies of every request in the pool: JSON, or (with
/// `binary`) a JSON header followed by the raw tensors.
pub fn rest_bodies(pool: &RequestPool, binary: bool) -> Vec<RestBody> {
    let parameters = parameters_to_json(&pool.parameters);
    pool.payloads
        .iter()
        .map(|p| {
            if !binary {
                let body = json!({
                    "id": p.id,
                    "parameters": parameters,
                    "inputs": p.inputs.iter().map(tensor_to_json).collect::<Vec<_>>(),
                });
                return RestBody {
                    body: Bytes::from(body.to_string()),
                    header_len: None,
                };
            }
            let raws: Vec<Vec<u8>> = p.inputs.iter().map(|t| t.to_raw()).collect();
            let inputs: Vec<Value> = p
                .inputs
                .iter()
                .zip(&raws)
                .map(|(t, raw)| {
                    json!({
                        "name": t.name,
                        "datatype": t.datatype().as_str(),
                        "shape": t.shape,
                        "parameters": {"binary_data_size": raw.len()},
                    })
                })
                .collect();
            let header =
                json!({"id": p.id, "parameters": parameters, "inputs": inputs}).to_string();
            let mut body = header.clone().into_bytes();
            for raw in &raws {
                body.extend_from_slice(raw);
            }
            RestBody {
                body: Bytes::from(body),
                header_len: Some(header.len()),
            }
        })
        .collect()
}

/// Reads `quiver_path` and `quiver_batch_size` from a KServe v2 JSON
/// response (or the JSON header of a binary one).
pub fn served_from_json(json: &[u8]) -> Option<Served> {
    #[derive(serde::Deserialize)]
    struct Answer {
        #[serde(default)]
        parameters: serde_json::Map<String, Value>,
    }
    let a: Answer = serde_json::from_slice(json).ok()?;
    Some(Served {
        overflow: a
            .parameters
            .get(params::PATH)
            .and_then(Value::as_str)
            .map(|p| p != "local"),
        batch_size: a
            .parameters
            .get(params::BATCH_SIZE)
            .and_then(Value::as_u64)
            .and_then(|b| u32::try_from(b).ok()),
    })
}

/// KServe v2 REST over HTTP/1.1 or HTTP/2.
#[derive(Debug)]
pub struct RestTarget {
    client: reqwest::Client,
    url: String,
    bodies: Vec<RestBody>,
}

impl RestTarget {
    async fn infer(&self, index: u64) -> Outcome {
        let b = pick(&self.bodies, index);
        let content_type = if b.header_len.is_some() {
            "application/octet-stream"
        } else {
            "application/json"
        };
        let mut req = self
            .client
            .post(&self.url)
            .header(reqwest::header::CONTENT_TYPE, content_type);
        if let Some(n) = b.header_len {
            req = req.header(HEADER_LENGTH, n);
        }
        let resp = match req.body(b.body.clone()).send().await {
            Ok(r) => r,
            Err(e) if e.is_connect() => return Outcome::Err("connect".into()),
            Err(_) => return Outcome::Err("transport".into()),
        };
        let status = resp.status();
        let header_len = resp
            .headers()
            .get(HEADER_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<usize>().ok());
        let Ok(body) = resp.bytes().await else {
            return Outcome::Err("transport".into());
        };
        if !status.is_success() {
            return Outcome::Err(format!("http_{}", status.as_u16()));
        }
        let json = match header_len {
            Some(n) if n <= body.len() => &body[..n],
            _ => &body[..],
        };
        match served_from_json(json) {
            Some(s) => Outcome::Ok(s),
            None => Outcome::Err("bad_reply".into()),
        }
    }
}

/// KServe v2 gRPC, one HTTP/2 connection (tonic multiplexes the calls).
#[derive(Debug)]
pub struct GrpcTarget {
    client: GrpcInferenceServiceClient<tonic::transport::Channel>,
    requests: Vec<ModelInferRequest>,
    authorization: Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>,
}

impl GrpcTarget {
    async fn infer(&self, index: u64) -> Outcome {
        // Tensors are `Bytes`: the clone shares them.
        let mut req = tonic::Request::new(pick(&self.requests, index).clone());
        if let Some(v) = &self.authorization {
            req.metadata_mut().insert("authorization", v.clone());
        }
        match self.client.clone().model_infer(req).await {
            Ok(resp) => Outcome::Ok(served_from_proto(resp.get_ref())),
            Err(status) => Outcome::Err(Code::from_i32(status.code() as i32).as_str().into()),
        }
    }
}

/// KServe v2 REST over HTTP/3, one QUIC connection.
pub struct H3Target {
    send: h3::client::SendRequest<h3_quinn::OpenStreams, Bytes>,
    uri: http::Uri,
    bodies: Vec<RestBody>,
    authorization: Option<http::HeaderValue>,
    // Keeps the endpoint's socket alive for the connection.
    _endpoint: quinn::Endpoint,
}

impl std::fmt::Debug for H3Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // h3's request handle has no Debug.
        f.debug_struct("H3Target")
            .field("uri", &self.uri)
            .field("bodies", &self.bodies.len())
            .finish_non_exhaustive()
    }
}

impl H3Target {
    async fn connect(
        addr: SocketAddr,
        server_name: &str,
        trust: &Trust,
        url: &TargetUrl,
        pool: &RequestPool,
        binary: bool,
    ) -> Result<Self, TargetError> {
        let h3 = |e: &dyn std::fmt::Display| TargetError::H3(e.to_string());
        let rustls = tls::client_config(trust, &[b"h3"])?;
        let quic = quinn::crypto::rustls::QuicClientConfig::try_from(rustls).map_err(|e| h3(&e))?;
        let bind: SocketAddr = if addr.is_ipv4() {
            (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
        } else {
            (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
        };
        let mut endpoint = quinn::Endpoint::client(bind).map_err(|e| h3(&e))?;
        endpoint.set_default_client_config(quinn::ClientConfig::new(Arc::new(quic)));
        let conn = endpoint
            .connect(addr, server_name)
            .map_err(|e| h3(&e))?
            .await
            .map_err(|e| h3(&e))?;
        let (mut driver, send) = h3::client::new(h3_quinn::Connection::new(conn))
            .await
            .map_err(|e| h3(&e))?;
        // The connection's control streams are driven here until it closes.
        tokio::spawn(async move {
            let _ = std::future::poll_fn(|cx| driver.poll_close(cx)).await;
        });
        let uri = format!("https://{}/v2/models/{}/infer", authority(url), pool.model)
            .parse::<http::Uri>()
            .map_err(|e| h3(&e))?;
        Ok(H3Target {
            send,
            uri,
            bodies: rest_bodies(pool, binary),
            authorization: None,
            _endpoint: endpoint,
        })
    }

    async fn infer(&self, index: u64) -> Outcome {
        use bytes::Buf as _;
        let b = pick(&self.bodies, index);
        let mut req = http::Request::post(self.uri.clone()).header(
            http::header::CONTENT_TYPE,
            if b.header_len.is_some() {
                "application/octet-stream"
            } else {
                "application/json"
            },
        );
        if let Some(n) = b.header_len {
            req = req.header(HEADER_LENGTH, n);
        }
        if let Some(v) = &self.authorization {
            req = req.header(http::header::AUTHORIZATION, v.clone());
        }
        let Ok(req) = req.body(()) else {
            return Outcome::Err("bad_request".into());
        };
        let result = async {
            let mut stream = self.send.clone().send_request(req).await?;
            // A server may answer before it has read the whole request (a refusal) and
            // stop the request stream with H3_NO_ERROR; its response still stands
            // (RFC 9114 §4.1), so a failed send only counts when no response follows.
            let sent = match stream.send_data(b.body.clone()).await {
                Ok(()) => stream.finish().await,
                Err(e) => Err(e),
            };
            let resp = match stream.recv_response().await {
                Ok(resp) => resp,
                Err(e) => return Err(sent.err().unwrap_or(e)),
            };
            let mut body = Vec::new();
            while let Some(mut chunk) = stream.recv_data().await? {
                while chunk.has_remaining() {
                    let c = chunk.chunk();
                    body.extend_from_slice(c);
                    let n = c.len();
                    chunk.advance(n);
                }
            }
            Ok::<_, h3::error::StreamError>((resp, body))
        }
        .await;
        let (resp, body) = match result {
            Ok(r) => r,
            Err(_) => return Outcome::Err("transport".into()),
        };
        if !resp.status().is_success() {
            return Outcome::Err(format!("http_{}", resp.status().as_u16()));
        }
        let header_len = resp
            .headers()
            .get(HEADER_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<usize>().ok());
        let json = match header_len {
            Some(n) if n <= body.len() => &body[..n],
            _ => &body[..],
        };
        match served_from_json(json) {
            Some(s) => Outcome::Ok(s),
            None => Outcome::Err("bad_reply".into()),
        }
    }
}

/// The engine with no wire: the gateway's router, batcher and device threads
/// in this process, requests decoded once before the run.
#[derive(Debug)]
pub struct EngineTarget {
    gateway: quiver_gateway::serve::Gateway,
    requests: Vec<quiver_gateway::request::InferRequest>,
}

impl EngineTarget {
    async fn start(options: &ConnectOptions, pool: &RequestPool) -> Result<Self, TargetError> {
        let engine = |e: &dyn std::fmt::Display| TargetError::Engine(e.to_string());
        let mut config = match &options.engine_config {
            Some(path) => quiver_config::Config::from_file(path).map_err(|e| engine(&e))?,
            None => quiver_config::Config::embedded_default(),
        };
        config.server.quic_listen = (std::net::Ipv4Addr::LOCALHOST, 0).into();
        config.server.metrics_listen = None;
        config.server.http_listen = None;
        config.server.grpc_listen = None;
        let gateway = quiver_gateway::serve::Gateway::start(&config, None)
            .await
            .map_err(|e| engine(&e))?;
        let requests = native_requests(pool, None)
            .into_iter()
            .map(quiver_gateway::tensor::request_from_proto)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| engine(&e))?;
        Ok(EngineTarget { gateway, requests })
    }

    async fn infer(&self, index: u64) -> Outcome {
        let req = pick(&self.requests, index).clone();
        match self
            .gateway
            .router()
            .infer(req, quiver_batching::CancelToken::new())
            .await
        {
            Ok(resp) => Outcome::Ok(match &resp.served {
                quiver_gateway::request::Served::Local(batch) => Served {
                    overflow: Some(false),
                    batch_size: Some(batch.batch_size),
                },
                // The rare path: read it as a wire client would.
                upstream => served_from_proto(&ModelInferResponse {
                    parameters: quiver_gateway::tensor::served_parameters(upstream),
                    ..Default::default()
                }),
            }),
            Err(e) => Outcome::Err(
                Code::from_i32(quiver_gateway::frontend::quic::native_status(&e).code)
                    .as_str()
                    .into(),
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::inputs::{Shape, policy_parameters, tensor_payloads};

    #[test]
    fn urls_parse_with_their_protocol_and_default_port() {
        let u: TargetUrl = "quic://127.0.0.1:4433".parse().unwrap();
        assert_eq!((u.protocol, u.tls, u.port), (Protocol::Quic, true, 4433));
        let u: TargetUrl = "h2c://[::1]:9000/".parse().unwrap();
        assert_eq!(
            (u.protocol, u.tls, u.host.as_str(), u.port),
            (Protocol::Http2, false, "::1", 9000)
        );
        assert_eq!(u.to_string(), "h2c://[::1]:9000");
        let u: TargetUrl = "https://example.org".parse().unwrap();
        assert_eq!((u.protocol, u.tls, u.port), (Protocol::Http1, true, 8000));
        assert!("ftp://x:1".parse::<TargetUrl>().is_err());
        assert!("quic://x:notaport".parse::<TargetUrl>().is_err());
        assert!("http://x:1/v2".parse::<TargetUrl>().is_err());
    }

    #[test]
    fn binary_bodies_carry_the_header_then_the_raw_tensor() {
        let pool = RequestPool {
            model: "identity".into(),
            payloads: tensor_payloads("INPUT0", &Shape(vec![1, 4]), 1, 1).unwrap(),
            parameters: policy_parameters(Some(1000), None),
        };
        let b = &rest_bodies(&pool, true)[0];
        let n = b.header_len.unwrap();
        assert_eq!(b.body.len(), n + 16, "4 FP32 values follow the header");
        let header: Value = serde_json::from_slice(&b.body[..n]).unwrap();
        assert_eq!(header["inputs"][0]["parameters"]["binary_data_size"], 16);
        assert_eq!(header["parameters"]["timeout"], 1000);
        let j = &rest_bodies(&pool, false)[0];
        let v: Value = serde_json::from_slice(&j.body).unwrap();
        assert_eq!(v["inputs"][0]["data"].as_array().unwrap().len(), 4);
    }

    #[test]
    fn served_parameters_are_read_from_json_answers() {
        let s = served_from_json(
            br#"{"parameters":{"quiver_path":"overflow","quiver_batch_size":8},"outputs":[]}"#,
        )
        .unwrap();
        assert_eq!(
            s,
            Served {
                overflow: Some(true),
                batch_size: Some(8)
            }
        );
        assert_eq!(
            served_from_json(br#"{"outputs":[]}"#).unwrap(),
            Served::default()
        );
        assert!(served_from_json(b"not json").is_none());
    }
}
