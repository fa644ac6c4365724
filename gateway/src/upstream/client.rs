//! One upstream endpoint's client: KServe v2 gRPC (`grpc://`) or KServe v2
//! REST over HTTP/2 with prior knowledge and binary tensors (`http://`).
//! Only the standard protocol is spoken, so any Open Inference Protocol
//! server can be an upstream.
//!
//! A try that gets no answer ends in one of five ways ([`TryError`]),
//! which decide both what the pool learns and whether the router may retry
//! it elsewhere: refused before any work (connect refused, REFUSED_STREAM:
//! the endpoint failed, retry), busy (the upstream's own admission said
//! 503/429 or UNAVAILABLE/RESOURCE_EXHAUSTED: no work started, retry, but
//! no verdict on the endpoint, which is loaded, not broken), the transport
//! failed after the request may have started, the try's timeout (the time
//! left before the deadline) passed, or the upstream answered with an error
//! status.

use std::collections::HashMap;
use std::time::Duration;

use bytes::Bytes;
use quiver_config::{Endpoint, UpstreamProtocol};
use quiver_kernels::HostTensor;
use quiver_protocol::binary;
use rustls::pki_types::ServerName;
use serde_json::Value;
use std::sync::Arc;
use tonic::transport::Channel;

use crate::error::Code;
use crate::proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use crate::proto::inference::{ModelReadyRequest, ServerReadyRequest};
use crate::proto::{InferParameter, ModelInferResponse};
use crate::request::params;
use crate::tensor;

/// Largest response accepted from an upstream.
const MAX_RESPONSE_BYTES: usize = 256 << 20;

/// A successful answer from an upstream.
#[derive(Debug)]
pub struct Answer {
    pub outputs: Vec<HostTensor>,
    /// The response's parameters (a Quiver worker's `quiver_*` batch
    /// parameters among them).
    pub parameters: HashMap<String, InferParameter>,
}

/// Why a try got no answer.
#[derive(Debug, thiserror::Error)]
pub enum TryError {
    /// Refused before any work (connect refused, REFUSED_STREAM): the
    /// endpoint failed; it is safe to retry elsewhere.
    #[error("refused: {0}")]
    NotStarted(String),
    /// The upstream's admission refused it (busy, or the deadline cannot be
    /// met there): no work started, safe to retry elsewhere.
    #[error("busy: {0}")]
    Busy(String),
    /// The transport failed after the request may have started.
    #[error("transport failed: {0}")]
    Failed(String),
    /// The try's timeout (the time left before the deadline) passed.
    #[error("no answer within {0:?}")]
    TimedOut(Duration),
    /// The upstream answered with an error status.
    #[error("{code}: {message}")]
    Status { code: Code, message: String },
}

impl TryError {
    /// The `kind` label of `quiver_upstream_errors_total`.
    pub fn kind(&self) -> &'static str {
        match self {
            TryError::NotStarted(_) => "refused",
            TryError::Busy(_) => "busy",
            TryError::Failed(_) => "failed",
            TryError::TimedOut(_) => "timeout",
            TryError::Status { .. } => "status",
        }
    }

    /// Whether no work started upstream, so that a retry elsewhere is safe.
    pub fn not_started(&self) -> bool {
        matches!(self, TryError::NotStarted(_) | TryError::Busy(_))
    }

    /// What the pool learns from this try: a failure of the endpoint
    /// (counts towards its ejection), an answer (its latency feeds the
    /// peak-EWMA), or nothing (busy: loaded, not broken).
    pub fn outcome(&self, latency: Duration) -> super::pool::Outcome {
        use super::pool::Outcome;
        match self {
            TryError::NotStarted(_) | TryError::Failed(_) => Outcome::Failure,
            // Slow, not broken: the time it took is a lower bound of its
            // latency, which peak-EWMA takes at once, so P2C moves traffic
            // away without ejecting a worker that is only busy (ejecting it
            // would pile its load on the others). A hung worker fails its
            // probes and is ejected by them.
            TryError::TimedOut(_) => Outcome::Success { latency },
            TryError::Busy(_) => Outcome::Abandoned,
            // The model failed there, or the upstream does not serve it.
            TryError::Status {
                code: Code::Internal | Code::NotFound | Code::Unknown,
                ..
            } => Outcome::Failure,
            TryError::Status { .. } => Outcome::Success { latency },
        }
    }
}

/// The client of one endpoint. Cheap to clone (connections are shared).
#[derive(Clone)]
pub struct EndpointClient {
    wire: Wire,
    /// `Bearer TOKEN`, sent with every request and probe.
    authorization: Option<String>,
}

#[derive(Clone, Debug)]
enum Wire {
    Grpc(GrpcInferenceServiceClient<Channel>),
    Rest {
        client: reqwest::Client,
        base: String,
    },
}

impl std::fmt::Debug for EndpointClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The token is a secret: say only whether there is one.
        f.debug_struct("EndpointClient")
            .field("wire", &self.wire)
            .field("token", &self.authorization.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

impl EndpointClient {
    /// A client for `endpoint`; connects lazily, on the first request.
    /// `token`: the bearer token of the upstream, if it wants one.
    pub fn new(
        endpoint: &Endpoint,
        connect_timeout: Duration,
        token: Option<&str>,
        tls: Option<&TlsDial>,
    ) -> Result<Self, String> {
        Ok(EndpointClient {
            wire: Wire::new(endpoint, connect_timeout, tls)?,
            authorization: token.map(|t| format!("Bearer {t}")),
        })
    }
    /// Sends one inference request; `timeout` bounds the whole try and is
    /// also sent as the request's `timeout` parameter, so the upstream's
    /// scheduler sees the same deadline.
    pub async fn infer(
        &self,
        model: &str,
        id: &str,
        inputs: &[HostTensor],
        policy: Policy,
        timeout: Duration,
    ) -> Result<Answer, TryError> {
        let call = async {
            let auth = self.authorization.as_deref();
            match &self.wire {
                Wire::Grpc(client) => {
                    grpc_infer(client.clone(), auth, model, id, inputs, policy, timeout).await
                }
                Wire::Rest { client, base } => {
                    rest_infer(client, auth, base, model, id, inputs, policy, timeout).await
                }
            }
        };
        match tokio::time::timeout(timeout, call).await {
            Ok(result) => result,
            Err(_) => Err(TryError::TimedOut(timeout)),
        }
    }

    /// An active health probe: the server is ready and serves `model`
    /// ready. False on any error or after `timeout`.
    pub async fn ready(&self, model: &str, timeout: Duration) -> bool {
        let probe = async {
            let auth = self.authorization.as_deref();
            match &self.wire {
                Wire::Grpc(client) => {
                    let mut c = client.clone();
                    let server = c
                        .server_ready(with_auth(ServerReadyRequest {}, auth))
                        .await
                        .is_ok_and(|r| r.get_ref().ready);
                    server
                        && c.model_ready(with_auth(
                            ModelReadyRequest {
                                name: model.into(),
                                version: String::new(),
                            },
                            auth,
                        ))
                        .await
                        .is_ok_and(|r| r.get_ref().ready)
                }
                Wire::Rest { client, base } => {
                    let ok = |url: String| async move {
                        with_bearer(client.get(url), auth)
                            .send()
                            .await
                            .is_ok_and(|r| r.status().is_success())
                    };
                    ok(format!("{base}/v2/health/ready")).await
                        && ok(format!("{base}/v2/models/{model}/ready")).await
                }
            }
        };
        tokio::time::timeout(timeout, probe).await.unwrap_or(false)
    }
}

/// TLS toward the upstreams (`[models.upstream.tls]`): the client
/// configuration (CA, client certificate, ALPN h2) and the name the
/// workers' certificates must carry (default: each endpoint's host).
#[derive(Clone, Debug)]
pub struct TlsDial {
    config: Arc<rustls::ClientConfig>,
    server_name: Option<String>,
}

impl TlsDial {
    /// Loads the CA and client certificate files of `tls`.
    pub fn load(tls: &quiver_config::UpstreamTls) -> Result<TlsDial, String> {
        let what = |e: crate::tls::TlsError| format!("[models.upstream.tls]: {e}");
        let certificate = match (&tls.cert, &tls.key) {
            (Some(cert), Some(key)) => {
                Some(crate::tls::Identity::from_pem_files(cert, key).map_err(what)?)
            }
            _ => None,
        };
        let config = crate::tls::client_config_with(
            &crate::tls::Trust::CaFile(tls.ca.clone()),
            &[b"h2"],
            certificate.as_ref(),
        )
        .map_err(what)?;
        Ok(TlsDial {
            config: Arc::new(config),
            server_name: tls.server_name.clone(),
        })
    }

    fn server_name(&self, endpoint: &Endpoint) -> Result<ServerName<'static>, String> {
        let name = self.server_name.as_deref().unwrap_or(&endpoint.host);
        ServerName::try_from(name.to_owned())
            .map_err(|e| format!("{endpoint}: bad TLS server name \"{name}\": {e}"))
    }
}

impl Wire {
    fn new(
        endpoint: &Endpoint,
        connect_timeout: Duration,
        tls: Option<&TlsDial>,
    ) -> Result<Self, String> {
        let authority = if endpoint.host.contains(':') {
            format!("[{}]:{}", endpoint.host, endpoint.port)
        } else {
            format!("{}:{}", endpoint.host, endpoint.port)
        };
        match endpoint.protocol {
            UpstreamProtocol::Grpc => {
                let builder = Channel::from_shared(format!("http://{authority}"))
                    .map_err(|e| format!("{endpoint}: {e}"))?
                    .connect_timeout(connect_timeout)
                    .tcp_nodelay(true)
                    .http2_keep_alive_interval(Duration::from_secs(10))
                    .keep_alive_while_idle(true);
                let channel = match tls {
                    None => builder.connect_lazy(),
                    Some(tls) => {
                        // TLS by a connector of our own (tokio-rustls), so
                        // tonic needs no TLS stack of its own.
                        let connector = tokio_rustls::TlsConnector::from(tls.config.clone());
                        let name = tls.server_name(endpoint)?;
                        let address = authority.clone();
                        builder.connect_with_connector_lazy(tower::service_fn(
                            move |_: http::Uri| {
                                let (connector, name, address) =
                                    (connector.clone(), name.clone(), address.clone());
                                async move {
                                    let tcp = tokio::time::timeout(
                                        connect_timeout,
                                        tokio::net::TcpStream::connect(address),
                                    )
                                    .await
                                    .map_err(|_| {
                                        std::io::Error::new(
                                            std::io::ErrorKind::TimedOut,
                                            "connect timed out",
                                        )
                                    })??;
                                    let _ = tcp.set_nodelay(true);
                                    let tls = connector.connect(name, tcp).await?;
                                    Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tls))
                                }
                            },
                        ))
                    }
                };
                Ok(Wire::Grpc(
                    GrpcInferenceServiceClient::new(channel)
                        .max_decoding_message_size(MAX_RESPONSE_BYTES)
                        .max_encoding_message_size(MAX_RESPONSE_BYTES),
                ))
            }
            UpstreamProtocol::Http => {
                let mut builder = reqwest::Client::builder()
                    .http2_prior_knowledge()
                    .connect_timeout(connect_timeout)
                    .tcp_nodelay(true)
                    .pool_idle_timeout(Duration::from_secs(60));
                let mut base = format!("http://{authority}");
                if let Some(tls) = tls {
                    builder = builder.use_preconfigured_tls((*tls.config).clone());
                    // The URL's host is what reqwest checks the certificate
                    // against; with a server_name, connect to that name at
                    // the endpoint's address instead.
                    base = match &tls.server_name {
                        None => format!("https://{authority}"),
                        Some(name) => {
                            let addr = authority.parse::<std::net::SocketAddr>().map_err(|e| {
                                format!("{endpoint}: server_name needs an IP endpoint: {e}")
                            })?;
                            builder = builder.resolve(name, addr);
                            format!("https://{name}:{}", endpoint.port)
                        }
                    };
                }
                let client = builder.build().map_err(|e| format!("{endpoint}: {e}"))?;
                Ok(Wire::Rest { client, base })
            }
        }
    }
}

/// What a request asks of an upstream besides its tensors and deadline.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Policy {
    /// The schedule-policy priority (0: the upstream model's default).
    pub priority: u32,
    /// A text model's truncation, as decided here (the request's, else this
    /// gateway's `auto_truncate`), so that a request cuts or is refused alike
    /// wherever it runs; `None` for other models.
    pub truncate: Option<quiver_kernels::PrepareOptions>,
}

fn schedule_parameters(policy: Policy, timeout: Duration) -> HashMap<String, InferParameter> {
    let mut parameters = HashMap::new();
    parameters.insert(
        params::TIMEOUT.into(),
        tensor::int_param(i64::try_from(timeout.as_micros()).unwrap_or(i64::MAX)),
    );
    parameters.insert(
        params::PRIORITY.into(),
        tensor::int_param(policy.priority.into()),
    );
    if let Some(options) = policy.truncate {
        parameters.insert(
            params::TRUNCATE.into(),
            InferParameter {
                parameter_choice: Some(
                    crate::proto::inference::infer_parameter::ParameterChoice::BoolParam(
                        options.truncate,
                    ),
                ),
            },
        );
        let side = match options.side {
            quiver_kernels::TruncationSide::Right => "right",
            quiver_kernels::TruncationSide::Left => "left",
        };
        parameters.insert(
            params::TRUNCATION_DIRECTION.into(),
            tensor::string_param(side),
        );
    }
    parameters
}

/// A REST request carrying the `Authorization` header when there is a token.
fn with_bearer(
    req: reqwest::RequestBuilder,
    authorization: Option<&str>,
) -> reqwest::RequestBuilder {
    match authorization {
        Some(a) => req.header(reqwest::header::AUTHORIZATION, a),
        None => req,
    }
}

/// A gRPC request carrying `authorization` metadata when there is a token.
fn with_auth<T>(message: T, authorization: Option<&str>) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    if let Some(value) = authorization.and_then(|a| a.parse().ok()) {
        request.metadata_mut().insert("authorization", value);
    }
    request
}

async fn grpc_infer(
    mut client: GrpcInferenceServiceClient<Channel>,
    authorization: Option<&str>,
    model: &str,
    id: &str,
    inputs: &[HostTensor],
    policy: Policy,
    timeout: Duration,
) -> Result<Answer, TryError> {
    let req = tensor::request_to_proto(model, id, inputs, schedule_parameters(policy, timeout));
    let mut request = with_auth(req, authorization);
    request.set_timeout(timeout);
    match client.model_infer(request).await {
        Ok(resp) => {
            let resp: ModelInferResponse = resp.into_inner();
            let outputs = tensor::outputs_from_proto(&resp).map_err(|e| TryError::Status {
                code: Code::Internal,
                message: format!("undecodable response: {e}"),
            })?;
            Ok(Answer {
                outputs,
                parameters: resp.parameters,
            })
        }
        Err(status) => Err(classify_grpc(&status)),
    }
}

/// Sorts a gRPC failure: a transport error (it carries its source) versus
/// a status the upstream sent.
fn classify_grpc(status: &tonic::Status) -> TryError {
    use std::error::Error as _;
    let message = status.message().to_owned();
    if let Some(source) = status.source() {
        let chain = error_chain(source);
        // tonic's own enforcement of the request's grpc-timeout.
        if in_chain::<tonic::TimeoutExpired>(source) {
            return TryError::TimedOut(Duration::ZERO);
        }
        return if in_chain::<tonic::ConnectError>(source)
            || refused(source)
            || chain.contains("REFUSED_STREAM")
        {
            TryError::NotStarted(chain)
        } else {
            TryError::Failed(chain)
        };
    }
    let code = Code::from_i32(status.code() as i32);
    match code {
        Code::DeadlineExceeded => TryError::TimedOut(Duration::ZERO),
        // The upstream's own admission: nothing was computed.
        Code::Unavailable | Code::ResourceExhausted => TryError::Busy(format!("{code}: {message}")),
        code => TryError::Status { code, message },
    }
}

/// Whether any error in the chain is a `T`.
fn in_chain<T: std::error::Error + 'static>(err: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = Some(err);
    while let Some(e) = next {
        if e.is::<T>() {
            return true;
        }
        next = e.source();
    }
    false
}

/// Whether any error in the chain is a refused TCP connection.
fn refused(err: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = Some(err);
    while let Some(e) = next {
        if let Some(io) = e.downcast_ref::<std::io::Error>()
            && matches!(
                io.kind(),
                std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::NotConnected
            )
        {
            return true;
        }
        let text = e.to_string();
        if text.contains("onnection refused") || text.contains("tcp connect error") {
            return true;
        }
        next = e.source();
    }
    false
}

fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut parts = vec![err.to_string()];
    let mut next = err.source();
    while let Some(e) = next {
        parts.push(e.to_string());
        next = e.source();
    }
    parts.join(": ")
}

#[allow(clippy::too_many_arguments)]
async fn rest_infer(
    client: &reqwest::Client,
    authorization: Option<&str>,
    base: &str,
    model: &str,
    id: &str,
    inputs: &[HostTensor],
    policy: Policy,
    timeout: Duration,
) -> Result<Answer, TryError> {
    let parameters = schedule_parameters(policy, timeout);
    let (body, json_len) = binary::encode_request(id, inputs, &parameters);
    let post = client
        .post(format!("{base}/v2/models/{model}/infer"))
        .header(binary::HEADER_CONTENT_LENGTH, json_len)
        .header(reqwest::header::CONTENT_TYPE, "application/octet-stream");
    let resp = with_bearer(post, authorization)
        .body(body)
        .send()
        .await
        .map_err(classify_reqwest)?;
    let status = resp.status();
    let json_len = resp
        .headers()
        .get(binary::HEADER_CONTENT_LENGTH)
        .and_then(|v| binary::header_length(v.as_bytes()).ok());
    if let Some(len) = resp.content_length()
        && len > MAX_RESPONSE_BYTES as u64
    {
        return Err(TryError::Status {
            code: Code::Internal,
            message: format!("response of {len} bytes is over {MAX_RESPONSE_BYTES}"),
        });
    }
    let bytes = resp.bytes().await.map_err(classify_reqwest)?;
    if !status.is_success() {
        let message = serde_json::from_slice::<Value>(&bytes)
            .ok()
            .and_then(|v| v.get("error").and_then(Value::as_str).map(str::to_owned))
            .unwrap_or_else(|| String::from_utf8_lossy(&bytes).into_owned());
        return Err(match status.as_u16() {
            // The upstream's admission refused it before any work.
            429 | 503 => TryError::Busy(format!("HTTP {status}: {message}")),
            400 => TryError::Status {
                code: Code::InvalidArgument,
                message,
            },
            401 | 403 => TryError::Status {
                code: Code::Unauthenticated,
                message,
            },
            404 => TryError::Status {
                code: Code::NotFound,
                message,
            },
            413 => TryError::Status {
                code: Code::ResourceExhausted,
                message,
            },
            504 => TryError::Status {
                code: Code::DeadlineExceeded,
                message,
            },
            _ => TryError::Status {
                code: Code::Internal,
                message: format!("HTTP {status}: {message}"),
            },
        });
    }
    decode_rest_response(&bytes, json_len).map_err(|message| TryError::Status {
        code: Code::Internal,
        message: format!("undecodable response: {message}"),
    })
}

fn classify_reqwest(e: reqwest::Error) -> TryError {
    let chain = error_chain(&e);
    if e.is_connect() || refused(&e) || chain.contains("REFUSED_STREAM") {
        TryError::NotStarted(chain)
    } else if e.is_timeout() {
        TryError::TimedOut(Duration::ZERO)
    } else {
        TryError::Failed(chain)
    }
}

/// Decodes a KServe v2 REST response: a JSON header, then (for the
/// outputs with `binary_data_size`) their raw bytes in order.
fn decode_rest_response(body: &Bytes, json_len: Option<usize>) -> Result<Answer, String> {
    let resp = binary::decode_response(body, json_len).map_err(|e| e.to_string())?;
    Ok(Answer {
        outputs: resp.outputs,
        parameters: resp.parameters,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_text_models_truncation_travels_with_the_schedule_policy() {
        let timeout = Duration::from_millis(5);
        let plain = schedule_parameters(
            Policy {
                priority: 2,
                truncate: None,
            },
            timeout,
        );
        assert_eq!(plain.len(), 2, "{plain:?}");
        let (truncate, side) = tensor::truncation(&plain).expect("valid parameters");
        assert_eq!(
            (truncate, side),
            (None, quiver_kernels::TruncationSide::Right)
        );
        let text = schedule_parameters(
            Policy {
                priority: 0,
                truncate: Some(quiver_kernels::PrepareOptions {
                    truncate: false,
                    side: quiver_kernels::TruncationSide::Left,
                }),
            },
            timeout,
        );
        // What the upstream's front end reads back is what was decided here.
        let (truncate, side) = tensor::truncation(&text).expect("valid parameters");
        assert_eq!(truncate, Some(false));
        assert_eq!(side, quiver_kernels::TruncationSide::Left);
        let (priority, deadline) = tensor::schedule_policy(&text).expect("valid parameters");
        assert_eq!((priority, deadline), (0, Some(timeout)));
    }

    #[test]
    fn a_binary_rest_response_decodes_in_order() {
        let a = HostTensor::new(
            "A",
            vec![1, 2],
            quiver_kernels::TensorData::F32(vec![1.0, 2.0]),
        )
        .expect("tensor");
        let raw = a.to_raw();
        let header = json!({
            "parameters": {"quiver_batch_size": 3},
            "outputs": [
                {"name": "A", "datatype": "FP32", "shape": [1, 2],
                 "parameters": {"binary_data_size": raw.len()}},
                {"name": "B", "datatype": "INT64", "shape": [1], "data": [7]},
            ],
        })
        .to_string();
        let mut body = header.clone().into_bytes();
        body.extend_from_slice(&raw);
        let answer = decode_rest_response(&Bytes::from(body), Some(header.len())).expect("decodes");
        assert_eq!(answer.outputs.len(), 2);
        assert_eq!(answer.outputs[0], a);
        assert_eq!(answer.outputs[1].name, "B");
        assert!(answer.parameters.contains_key("quiver_batch_size"));
    }

    #[test]
    fn a_truncated_rest_response_is_an_error_not_a_panic() {
        let header = r#"{"outputs":[{"name":"A","datatype":"FP32","shape":[4],"parameters":{"binary_data_size":16}}]}"#;
        let mut body = header.as_bytes().to_vec();
        body.extend_from_slice(&[0; 8]);
        assert!(decode_rest_response(&Bytes::from(body), Some(header.len())).is_err());
        assert!(decode_rest_response(&Bytes::from_static(b"{}"), Some(99)).is_err());
    }

    #[test]
    fn tonic_timeouts_are_timeouts_and_server_statuses_keep_their_kind() {
        let timeout = tonic::Status::from_error(Box::new(tonic::TimeoutExpired(())));
        assert!(matches!(classify_grpc(&timeout), TryError::TimedOut(_)));
        let busy = tonic::Status::unavailable("deadline cannot be met");
        assert!(matches!(classify_grpc(&busy), TryError::Busy(_)));
        let bad = tonic::Status::invalid_argument("bad shape");
        assert!(matches!(
            classify_grpc(&bad),
            TryError::Status {
                code: Code::InvalidArgument,
                ..
            }
        ));
    }

    #[tokio::test]
    async fn a_closed_port_is_not_started_on_both_protocols() {
        // Bind then drop a listener: its port refuses connections.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("bind")
            .port();
        for scheme in ["grpc", "http"] {
            let e = Endpoint::parse(&format!("{scheme}://127.0.0.1:{port}")).expect("endpoint");
            let c =
                EndpointClient::new(&e, Duration::from_millis(500), None, None).expect("client");
            let t = HostTensor::new("X", vec![1], quiver_kernels::TensorData::F32(vec![0.0]))
                .expect("tensor");
            let err = c
                .infer("m", "", &[t], Policy::default(), Duration::from_secs(5))
                .await
                .expect_err("nobody listens");
            assert!(matches!(err, TryError::NotStarted(_)), "{scheme}: {err:?}");
            assert!(!c.ready("m", Duration::from_secs(5)).await, "{scheme}");
        }
    }
}
