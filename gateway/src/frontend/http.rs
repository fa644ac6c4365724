//! The KServe v2 REST front end: HTTP/1.1 and h2c on TCP (8000 by default),
//! and the same API over HTTP/3 ([`super::h3`]).
//!
//! [`app`] is one axum router of the Open Inference Protocol's REST API with
//! Triton's extensions (binary tensors, model configuration, statistics,
//! schedule policy). Every request is authorised before its body is read;
//! a body over the limit is refused from its `Content-Length`, or as soon
//! as the bytes read pass the limit. Inference requests are decoded into
//! [`InferRequest`] and go through [`Router::infer`], like every protocol's;
//! a client that goes away cancels its request. [`http_status`] is the one
//! mapping of errors to HTTP status.
//!
//! [`serve_tcp`] runs an axum router on a TCP listener with hyper (HTTP/1.1
//! and HTTP/2, or HTTP/2 only for gRPC), bounding connections and
//! concurrent HTTP/2 streams per connection.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use bytes::Bytes;
use quiver_batching::CancelToken;
use quiver_kernels::{DataType, HostTensor};
use serde_json::{Map, Value, json};

use crate::error::GatewayError;
use crate::frontend::auth::Auth;
use crate::frontend::catalog;
use crate::json;
use crate::metrics::Metrics;
use crate::request::{InferRequest, InferResponse};
use crate::router::Router;
use crate::tensor;

/// The protocol label of REST over TCP in metrics.
pub const PROTOCOL: &str = "http";

/// Triton's header that gives the length of the JSON part of a body with
/// binary tensors.
pub const HEADER_CONTENT_LENGTH: &str = "inference-header-content-length";

/// What the REST handlers share.
#[derive(Clone, Debug)]
pub struct Api {
    pub router: Arc<Router>,
    pub metrics: Arc<Metrics>,
    pub auth: Auth,
    /// Largest request body, in bytes.
    pub max_body_bytes: usize,
    /// Longest the body of one request may take to arrive once its headers
    /// have (`server.request_read_timeout_ms`): 408 past it.
    pub request_read_timeout: Duration,
    /// The request-memory budget shared with the other front ends.
    pub budget: Arc<crate::budget::MemoryBudget>,
    /// Cleared when shutdown starts: `/v2/health/ready` then says 503.
    pub ready: Arc<AtomicBool>,
    /// The metrics label of the transport: `http` or `h3`.
    pub protocol: &'static str,
}

/// The one mapping of gateway errors to HTTP status (DESIGN.md table), with
/// the `Retry-After` seconds where a retry later can help.
pub fn http_status(err: &GatewayError) -> (StatusCode, Option<u32>) {
    match err {
        GatewayError::InvalidArgument(_) | GatewayError::Input(_) => {
            (StatusCode::BAD_REQUEST, None)
        }
        GatewayError::Unauthenticated(_) => (StatusCode::UNAUTHORIZED, None),
        GatewayError::UnknownModel(_) => (StatusCode::NOT_FOUND, None),
        GatewayError::TooLarge { .. } => (StatusCode::PAYLOAD_TOO_LARGE, None),
        GatewayError::Overloaded { .. } => (StatusCode::TOO_MANY_REQUESTS, Some(1)),
        GatewayError::DeadlineUnreachable { .. }
        | GatewayError::MemoryBudget { .. }
        | GatewayError::ShuttingDown
        | GatewayError::UpstreamUnavailable { .. } => (StatusCode::SERVICE_UNAVAILABLE, Some(1)),
        GatewayError::Upstream { .. } => (StatusCode::BAD_GATEWAY, None),
        GatewayError::DeadlineExceeded => (StatusCode::GATEWAY_TIMEOUT, None),
        GatewayError::RequestTimeout(_) => (StatusCode::REQUEST_TIMEOUT, None),
        GatewayError::Model { .. } => (StatusCode::INTERNAL_SERVER_ERROR, None),
        // Nobody is left to read it; 499 is the customary log code.
        GatewayError::Cancelled => (
            StatusCode::from_u16(499).unwrap_or(StatusCode::BAD_REQUEST),
            None,
        ),
    }
}

/// An error as a REST response: the status of [`http_status`] and
/// `{"error": "..."}`.
pub fn error_response(err: &GatewayError) -> Response {
    let (status, retry_after) = http_status(err);
    let mut resp = (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        json!({ "error": err.to_string() }).to_string(),
    )
        .into_response();
    if let Some(s) = retry_after {
        resp.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(s));
    }
    resp
}

struct ApiError(GatewayError);

impl From<GatewayError> for ApiError {
    fn from(e: GatewayError) -> Self {
        ApiError(e)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        error_response(&self.0)
    }
}

fn json_response(v: &Value) -> Response {
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json")],
        v.to_string(),
    )
        .into_response()
}

/// The KServe v2 REST API on `api`.
pub fn app(api: Api) -> axum::Router {
    axum::Router::new()
        .route("/v2/health/live", get(live))
        .route("/v2/health/ready", get(ready))
        .route("/v2", get(server_metadata))
        .route("/v2/models/{model}", get(model_metadata))
        .route("/v2/models/{model}/versions/{version}", get(model_metadata))
        .route("/v2/models/{model}/ready", get(model_ready))
        .route(
            "/v2/models/{model}/versions/{version}/ready",
            get(model_ready),
        )
        .route("/v2/models/{model}/config", get(model_config))
        .route(
            "/v2/models/{model}/versions/{version}/config",
            get(model_config),
        )
        .route("/v2/models/{model}/stats", get(model_stats))
        .route(
            "/v2/models/{model}/versions/{version}/stats",
            get(model_stats),
        )
        .route("/v2/models/{model}/infer", post(infer))
        .route("/v2/models/{model}/versions/{version}/infer", post(infer))
        .fallback(not_found)
        .with_state(api)
}

impl Api {
    fn authorize(&self, headers: &HeaderMap, health: bool) -> Result<(), GatewayError> {
        let result = self.auth.check(
            headers.get(header::AUTHORIZATION).map(|v| v.as_bytes()),
            health,
        );
        if result.is_err() {
            self.metrics
                .record_rejection("", self.protocol, "unauthenticated");
        }
        result
    }
}

fn model_and_version(params: &HashMap<String, String>) -> (&str, &str) {
    (
        params.get("model").map(String::as_str).unwrap_or_default(),
        params
            .get("version")
            .map(String::as_str)
            .unwrap_or_default(),
    )
}

/// A path no route matches: 404 naming the method and path (not an unknown
/// model: no model was asked for).
async fn not_found(method: axum::http::Method, uri: axum::http::Uri) -> Response {
    let message = format!(
        "no route for {method} {} (the KServe v2 API is under /v2)",
        uri.path()
    );
    (
        StatusCode::NOT_FOUND,
        [(header::CONTENT_TYPE, "application/json")],
        json!({ "error": message }).to_string(),
    )
        .into_response()
}

async fn live(State(api): State<Api>, headers: HeaderMap) -> Result<Response, ApiError> {
    api.authorize(&headers, true)?;
    Ok(json_response(&json!({ "live": true })))
}

async fn ready(State(api): State<Api>, headers: HeaderMap) -> Result<Response, ApiError> {
    api.authorize(&headers, true)?;
    if api.ready.load(Ordering::Acquire) {
        Ok(json_response(&json!({ "ready": true })))
    } else {
        Err(ApiError(GatewayError::ShuttingDown))
    }
}

async fn server_metadata(State(api): State<Api>, headers: HeaderMap) -> Result<Response, ApiError> {
    api.authorize(&headers, false)?;
    Ok(json_response(&catalog::server_metadata_json()))
}

async fn model_metadata(
    State(api): State<Api>,
    Path(params): Path<HashMap<String, String>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    api.authorize(&headers, false)?;
    let (model, version) = model_and_version(&params);
    let entry = catalog::find(&api.router, model, version)?;
    Ok(json_response(&catalog::metadata_json(&catalog::metadata(
        entry,
    ))))
}

async fn model_ready(
    State(api): State<Api>,
    Path(params): Path<HashMap<String, String>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    api.authorize(&headers, true)?;
    let (model, version) = model_and_version(&params);
    let entry = catalog::find(&api.router, model, version)?;
    if !api.ready.load(Ordering::Acquire) {
        return Err(ApiError(GatewayError::ShuttingDown));
    }
    Ok(json_response(&json!({ "name": entry.name, "ready": true })))
}

async fn model_config(
    State(api): State<Api>,
    Path(params): Path<HashMap<String, String>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    api.authorize(&headers, false)?;
    let (model, version) = model_and_version(&params);
    let entry = catalog::find(&api.router, model, version)?;
    Ok(json_response(&catalog::model_config_json(
        &catalog::model_config(entry),
    )))
}

async fn model_stats(
    State(api): State<Api>,
    Path(params): Path<HashMap<String, String>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    api.authorize(&headers, false)?;
    let (model, version) = model_and_version(&params);
    let entry = catalog::find(&api.router, model, version)?;
    Ok(json_response(&catalog::statistics_json(&[
        catalog::statistics(entry, &api.metrics),
    ])))
}

/// Cancels the request when dropped before [`CancelOnDrop::disarm`]: hyper
/// drops the handler's future when its client goes away.
pub(crate) struct CancelOnDrop(pub(crate) Option<CancelToken>);

impl CancelOnDrop {
    pub(crate) fn disarm(&mut self) {
        self.0 = None;
    }
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if let Some(t) = self.0.take() {
            t.cancel();
        }
    }
}

async fn infer(
    State(api): State<Api>,
    Path(params): Path<HashMap<String, String>>,
    request: Request,
) -> Response {
    let started = Instant::now();
    let (model, version) = model_and_version(&params);
    // Bounded label values: only configured model names.
    let label = api
        .router
        .model(model)
        .map(|m| m.name.clone())
        .unwrap_or_default();
    let (outcome, response) = match infer_inner(&api, model, version, request).await {
        Ok(resp) => ("ok", resp),
        Err(e) => {
            tracing::debug!(model, error = %e, "request failed");
            // Refused before its body was read whole, as the other front
            // ends count them.
            if matches!(
                e,
                GatewayError::MemoryBudget { .. } | GatewayError::RequestTimeout(_)
            ) {
                api.metrics.record_rejection("", api.protocol, e.outcome());
            }
            (e.outcome(), error_response(&e))
        }
    };
    api.metrics
        .record_request(&label, api.protocol, outcome, started.elapsed());
    response
}

async fn infer_inner(
    api: &Api,
    model: &str,
    version: &str,
    request: Request,
) -> Result<Response, GatewayError> {
    let (parts, body) = request.into_parts();
    api.auth.check(
        parts
            .headers
            .get(header::AUTHORIZATION)
            .map(|v| v.as_bytes()),
        false,
    )?;
    catalog::find(&api.router, model, version)?;
    // Held until the answer is made; an HTTP/3 request's body was counted
    // (and read) by its own front end.
    let mut reservation = match parts.extensions.get::<BodyCounted>() {
        Some(_) => None,
        None => Some(api.budget.reserve(0)?),
    };
    let body = tokio::time::timeout(
        api.request_read_timeout,
        read_body(
            &parts.headers,
            body,
            api.max_body_bytes,
            reservation.as_mut(),
        ),
    )
    .await
    .map_err(|_| GatewayError::RequestTimeout(api.request_read_timeout))??;
    let json_len = header_length(&parts.headers)?;
    let decoded = decode_request(model, &body, json_len)?;

    let cancel = CancelToken::new();
    let mut guard = CancelOnDrop(Some(cancel.clone()));
    let result = api.router.infer(decoded.request, cancel).await;
    guard.disarm();
    Ok(encode_response(result?, &decoded.binary_outputs))
}

/// Marks a request whose body its front end has already read and counted
/// against the memory budget (HTTP/3), so the handler does not count it again.
#[derive(Clone, Copy, Debug)]
pub struct BodyCounted;

/// Reads a body of at most `limit` bytes: refused from its
/// `Content-Length` before any byte is read, or as soon as what arrives
/// passes the limit. With a `reservation`, the body's bytes are counted
/// against the memory budget: the announced length before any byte is read,
/// else each chunk as it arrives.
pub async fn read_body(
    headers: &HeaderMap,
    body: Body,
    limit: usize,
    mut reservation: Option<&mut crate::budget::Reservation>,
) -> Result<Bytes, GatewayError> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
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
    if let (Some(len), Some(r)) = (declared, reservation.as_deref_mut()) {
        r.grow(len)?;
        // The length is counted; hyper refuses a body that runs past it.
        reservation = None;
    }
    if let Some(r) = reservation {
        return count_chunks(body, r, limit).await;
    }
    axum::body::to_bytes(body, limit).await.map_err(|e| {
        let source = std::error::Error::source(&e)
            .map(|s| s.to_string())
            .unwrap_or_default();
        if source.contains("length limit") || e.to_string().contains("length limit") {
            GatewayError::TooLarge {
                limit: limit as u64,
                got: limit as u64 + 1,
            }
        } else {
            GatewayError::InvalidArgument(format!("cannot read the request body: {e}"))
        }
    })
}

/// Reads a body without a declared length chunk by chunk, counting each
/// against the budget before it is kept; refused at the first chunk that
/// does not fit the budget or passes `limit`.
async fn count_chunks(
    mut body: Body,
    reservation: &mut crate::budget::Reservation,
    limit: usize,
) -> Result<Bytes, GatewayError> {
    use http_body_util::BodyExt;
    let mut chunks = bytes::BytesMut::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| {
            GatewayError::InvalidArgument(format!("cannot read the request body: {e}"))
        })?;
        if let Ok(data) = frame.into_data() {
            let total = chunks.len() + data.len();
            if total > limit {
                return Err(GatewayError::TooLarge {
                    limit: limit as u64,
                    got: total as u64,
                });
            }
            reservation.grow(data.len() as u64)?;
            chunks.extend_from_slice(&data);
        }
    }
    Ok(chunks.freeze())
}

fn header_length(headers: &HeaderMap) -> Result<Option<usize>, GatewayError> {
    match headers.get(HEADER_CONTENT_LENGTH) {
        None => Ok(None),
        Some(v) => v
            .to_str()
            .ok()
            .and_then(|s| s.trim().parse::<usize>().ok())
            .map(Some)
            .ok_or_else(|| {
                GatewayError::InvalidArgument(format!(
                    "{HEADER_CONTENT_LENGTH} must be a byte count"
                ))
            }),
    }
}

/// A decoded REST inference request.
#[derive(Debug)]
pub struct Decoded {
    pub request: InferRequest,
    /// Which outputs go back as binary tensors; `all` for
    /// `binary_data_output`.
    pub binary_outputs: BinaryOutputs,
}

/// Which outputs are sent as binary tensors.
#[derive(Debug, Default)]
pub struct BinaryOutputs {
    pub all: bool,
    pub names: Vec<String>,
}

impl BinaryOutputs {
    fn contains(&self, name: &str) -> bool {
        self.all || self.names.iter().any(|n| n == name)
    }
}

fn invalid(msg: impl Into<String>) -> GatewayError {
    GatewayError::InvalidArgument(msg.into())
}

/// Decodes a KServe v2 REST body: JSON, or with Triton's binary tensor
/// extension a JSON header of `json_len` bytes followed by the tensors'
/// raw bytes, in input order, each `parameters.binary_data_size` long.
pub fn decode_request(
    model: &str,
    body: &[u8],
    json_len: Option<usize>,
) -> Result<Decoded, GatewayError> {
    let (header, mut binary) = match json_len {
        None => (body, &[][..]),
        Some(n) if n <= body.len() => body.split_at(n),
        Some(n) => {
            return Err(invalid(format!(
                "{HEADER_CONTENT_LENGTH} is {n} but the body has only {} bytes",
                body.len()
            )));
        }
    };
    let v: Value = serde_json::from_slice(header)
        .map_err(|e| invalid(format!("the request body is not valid JSON: {e}")))?;
    let obj = v
        .as_object()
        .ok_or_else(|| invalid("the request body must be a JSON object"))?;
    let inputs = obj
        .get("inputs")
        .and_then(Value::as_array)
        .ok_or_else(|| invalid("the request needs an 'inputs' array"))?;
    let mut tensors = Vec::with_capacity(inputs.len());
    for input in inputs {
        let size = binary_size(input)?;
        match size {
            None => tensors.push(json::tensor_from_json(input)?),
            Some(n) => {
                if n > binary.len() {
                    return Err(invalid(format!(
                        "binary_data_size {n} runs past the end of the body"
                    )));
                }
                let (raw, rest) = binary.split_at(n);
                binary = rest;
                tensors.push(binary_tensor(input, raw)?);
            }
        }
    }
    if !binary.is_empty() {
        return Err(invalid(format!(
            "{} bytes of binary data follow the tensors that name them",
            binary.len()
        )));
    }
    let parameters = json::parameters_from_json(obj.get("parameters"))?;
    let (priority, timeout) = tensor::schedule_policy(&parameters)?;
    let mut binary_outputs = BinaryOutputs {
        all: obj
            .get("parameters")
            .and_then(|p| p.get("binary_data_output"))
            .and_then(Value::as_bool)
            .unwrap_or(false),
        names: Vec::new(),
    };
    let mut outputs = Vec::new();
    if let Some(requested) = obj.get("outputs") {
        let requested = requested
            .as_array()
            .ok_or_else(|| invalid("'outputs' must be an array"))?;
        for o in requested {
            let name = o
                .get("name")
                .and_then(Value::as_str)
                .ok_or_else(|| invalid("each requested output needs a 'name'"))?;
            if o.get("parameters")
                .and_then(|p| p.get("binary_data"))
                .and_then(Value::as_bool)
                .unwrap_or(false)
            {
                binary_outputs.names.push(name.to_owned());
            }
            outputs.push(name.to_owned());
        }
    }
    Ok(Decoded {
        request: InferRequest {
            model: model.to_owned(),
            id: obj
                .get("id")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned(),
            inputs: tensors,
            outputs,
            priority,
            timeout,
        },
        binary_outputs,
    })
}

fn binary_size(input: &Value) -> Result<Option<usize>, GatewayError> {
    match input
        .get("parameters")
        .and_then(|p| p.get("binary_data_size"))
    {
        None => Ok(None),
        Some(v) => v
            .as_u64()
            .and_then(|n| usize::try_from(n).ok())
            .map(Some)
            .ok_or_else(|| invalid("binary_data_size must be a byte count")),
    }
}

pub(crate) fn binary_tensor(input: &Value, raw: &[u8]) -> Result<HostTensor, GatewayError> {
    let name = input
        .get("name")
        .and_then(Value::as_str)
        .ok_or_else(|| invalid("tensor is missing its 'name'"))?;
    let dt = input
        .get("datatype")
        .and_then(Value::as_str)
        .ok_or_else(|| invalid(format!("tensor '{name}' is missing its 'datatype'")))?;
    let datatype = DataType::parse(dt)
        .ok_or_else(|| invalid(format!("tensor '{name}' has unknown datatype '{dt}'")))?;
    let shape = input
        .get("shape")
        .and_then(Value::as_array)
        .ok_or_else(|| invalid(format!("tensor '{name}' is missing its 'shape'")))?
        .iter()
        .map(Value::as_i64)
        .collect::<Option<Vec<i64>>>()
        .ok_or_else(|| invalid(format!("tensor '{name}': shape must be integers")))?;
    Ok(HostTensor::from_raw(name, datatype, &shape, raw)?)
}

/// Encodes an answer as KServe v2 JSON, with the outputs named in `binary`
/// as binary tensors after the JSON header.
pub fn encode_response(resp: InferResponse, binary: &BinaryOutputs) -> Response {
    let parameters = json::parameters_to_json(&tensor::served_parameters(&resp.served));
    let mut raw = Vec::new();
    let mut outputs = Vec::with_capacity(resp.outputs.len());
    for t in &resp.outputs {
        if binary.contains(&t.name) {
            let bytes = t.to_raw();
            let mut o = Map::new();
            o.insert("name".into(), json!(t.name));
            o.insert("datatype".into(), json!(t.datatype().as_str()));
            o.insert("shape".into(), json!(t.shape));
            o.insert(
                "parameters".into(),
                json!({ "binary_data_size": bytes.len() }),
            );
            outputs.push(Value::Object(o));
            raw.push(bytes);
        } else {
            outputs.push(json::tensor_to_json(t));
        }
    }
    let head = json!({
        "model_name": resp.model,
        "model_version": catalog::MODEL_VERSION,
        "id": resp.id,
        "parameters": parameters,
        "outputs": outputs,
    })
    .to_string();
    if raw.is_empty() {
        return json_response_text(head);
    }
    let mut body = Vec::with_capacity(head.len() + raw.iter().map(Vec::len).sum::<usize>());
    body.extend_from_slice(head.as_bytes());
    for r in &raw {
        body.extend_from_slice(r);
    }
    let mut resp = (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/octet-stream")],
        body,
    )
        .into_response();
    resp.headers_mut()
        .insert(HEADER_CONTENT_LENGTH, HeaderValue::from(head.len()));
    resp
}

fn json_response_text(text: String) -> Response {
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json")],
        text,
    )
        .into_response()
}

// ---------------------------------------------------------------------------
// TCP serving.

/// Limits of a TCP listener.
#[derive(Clone, Debug)]
pub struct TcpLimits {
    /// Connections at once; more are answered 503 (HTTP/1.1) or closed.
    pub max_connections: u32,
    /// Connections at once from one source address; more from it are
    /// answered 503 (HTTP/1.1) or closed.
    pub max_connections_per_source: u32,
    /// Concurrent HTTP/2 streams per connection (SETTINGS_MAX_CONCURRENT_STREAMS).
    pub max_concurrent_streams: u32,
    /// A connection whose request header does not arrive in this time is
    /// closed (HTTP/1.1).
    pub header_timeout: Duration,
}

/// Serves `app` on `listener` until `shutdown` resolves, then lets the
/// open connections finish their requests for up to `grace`.
/// `http2_only`: for gRPC. `protocol` labels refused connections in metrics.
#[allow(clippy::too_many_arguments)]
pub async fn serve_tcp(
    listener: tokio::net::TcpListener,
    app: axum::Router,
    limits: TcpLimits,
    http2_only: bool,
    metrics: Arc<Metrics>,
    protocol: &'static str,
    shutdown: impl std::future::Future<Output = ()>,
    grace: Duration,
) {
    use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
    use hyper_util::server::conn::auto;

    let permits = Arc::new(tokio::sync::Semaphore::new(limits.max_connections as usize));
    let sources = super::sources::SourceLimit::new(limits.max_connections_per_source);
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(limits.max_concurrent_streams)
        // A gateway cancels every try whose deadline passes (RST_STREAM),
        // often before a busy worker has accepted the stream; h2's default
        // of 20 such resets pending accept (its rapid-reset defence) would
        // then close the whole connection with every request on it. Bound
        // them by the stream limit instead: still bounded per connection.
        .max_pending_accept_reset_streams(limits.max_concurrent_streams as usize);
    if http2_only {
        builder = builder.http2_only();
    }
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let service = hyper_util::service::TowerToHyperService::new(app);
    tokio::pin!(shutdown);
    loop {
        let (stream, remote) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: back off, go on.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            tracing::warn!(%remote, limit = limits.max_connections, "connection refused: too many connections");
            metrics.record_rejection("", protocol, "too_many_connections");
            if !http2_only {
                tokio::spawn(refuse_http1(stream));
            }
            continue;
        };
        let Some(slot) = sources.try_hold(remote.ip()) else {
            tracing::warn!(%remote, limit = sources.limit(), "connection refused: too many connections from this address");
            metrics.record_rejection("", protocol, "too_many_connections_from_source");
            if !http2_only {
                tokio::spawn(refuse_http1(stream));
            }
            continue;
        };
        let _ = stream.set_nodelay(true);
        let conn = builder
            .serve_connection_with_upgrades(TokioIo::new(stream), service.clone())
            .into_owned();
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(%remote, error = %e, "connection ended with an error");
            }
            drop(slot);
            drop(permit);
        });
    }
    drop(listener);
    if tokio::time::timeout(grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(protocol, "shutdown grace over with connections still open");
    }
}

/// Answers a connection over the limit with 503 and closes it.
async fn refuse_http1(mut stream: tokio::net::TcpStream) {
    use tokio::io::AsyncWriteExt;
    let body = r#"{"error":"too many connections; retry later"}"#;
    let text = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = tokio::time::timeout(Duration::from_secs(1), stream.write_all(text.as_bytes())).await;
    let _ = stream.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_error_maps_to_the_design_table() {
        let cases: Vec<(GatewayError, u16, bool)> = vec![
            (GatewayError::InvalidArgument("x".into()), 400, false),
            (GatewayError::Unauthenticated("x".into()), 401, false),
            (GatewayError::UnknownModel("m".into()), 404, false),
            (GatewayError::TooLarge { limit: 1, got: 2 }, 413, false),
            (
                GatewayError::Overloaded {
                    model: "m".into(),
                    reason: quiver_batching::RejectReason::Overloaded,
                },
                429,
                true,
            ),
            (
                GatewayError::DeadlineUnreachable {
                    timeout: Duration::from_millis(1),
                    predicted: Duration::from_millis(2),
                },
                503,
                true,
            ),
            (GatewayError::DeadlineExceeded, 504, false),
            (
                GatewayError::MemoryBudget {
                    need: 2,
                    held: 1,
                    limit: 2,
                },
                503,
                true,
            ),
            (
                GatewayError::RequestTimeout(Duration::from_secs(1)),
                408,
                false,
            ),
            (
                GatewayError::Model {
                    model: "m".into(),
                    message: "boom".into(),
                },
                500,
                false,
            ),
        ];
        for (err, status, retry) in cases {
            let (s, r) = http_status(&err);
            assert_eq!(s.as_u16(), status, "{err}");
            assert_eq!(r.is_some(), retry, "{err}");
        }
    }

    #[test]
    fn binary_inputs_are_cut_from_the_body_in_order() {
        let head = br#"{"inputs":[{"name":"A","datatype":"FP32","shape":[1,2],"parameters":{"binary_data_size":8}},{"name":"B","datatype":"INT64","shape":[1],"data":[7]}],"outputs":[{"name":"OUT","parameters":{"binary_data":true}}]}"#;
        let mut body = head.to_vec();
        body.extend_from_slice(&1.5f32.to_le_bytes());
        body.extend_from_slice(&(-2.0f32).to_le_bytes());
        let d = decode_request("m", &body, Some(head.len())).expect("valid request");
        assert_eq!(d.request.inputs.len(), 2);
        assert_eq!(
            d.request.inputs[0].data,
            quiver_kernels::TensorData::F32(vec![1.5, -2.0])
        );
        assert_eq!(
            d.request.inputs[1].data,
            quiver_kernels::TensorData::I64(vec![7])
        );
        assert!(d.binary_outputs.contains("OUT"));
        assert!(!d.binary_outputs.contains("OTHER"));

        // Bytes left over, or a size past the end, are errors.
        let mut extra = body.clone();
        extra.push(0);
        assert!(decode_request("m", &extra, Some(head.len())).is_err());
        assert!(decode_request("m", &body[..body.len() - 1], Some(head.len())).is_err());
        assert!(decode_request("m", &body, Some(body.len() + 1)).is_err());
    }
}
