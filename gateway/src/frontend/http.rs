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
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use bytes::Bytes;
use quiver_batching::CancelToken;
use serde_json::{Value, json};

use crate::error::GatewayError;
use crate::frontend::auth::Auth;
use crate::frontend::catalog;
use crate::metrics::Metrics;
use crate::request::{InferRequest, InferResponse};
use crate::router::Router;
use crate::tensor;

/// The protocol label of REST over TCP in metrics.
pub const PROTOCOL: &str = "http";

/// Triton's header that gives the length of the JSON part of a body with
/// binary tensors.
pub use quiver_protocol::binary::HEADER_CONTENT_LENGTH;
use quiver_protocol::binary::{self, BinaryOutputs, ResponseHead};

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
    /// The slowest a body may arrive (`server.min_body_bytes_per_sec`;
    /// `None`: off): 408 when slower.
    pub min_body_rate: Option<BodyRate>,
    /// The request-memory budget shared with the other front ends.
    pub budget: Arc<crate::budget::MemoryBudget>,
    /// Cleared when shutdown starts: `/v2/health/ready` then says 503.
    pub ready: Arc<AtomicBool>,
    /// Loads, unloads and reloads (Triton's repository extension).
    pub lifecycle: Arc<crate::lifecycle::Lifecycle>,
    /// The metrics label of the transport: `http` or `h3`.
    pub protocol: &'static str,
}

/// The HTTP status of an error (the map is `ErrorKind::http`, shared by
/// every HTTP front end), with the `Retry-After` seconds where a retry later
/// can help.
pub fn http_status(err: &GatewayError) -> (StatusCode, Option<u32>) {
    let s = err.kind().http();
    let retry_after = match err {
        // The limiter knows when the client may send again.
        GatewayError::RateLimited { retry_after, .. } => {
            Some(crate::ratelimit::retry_after_secs(*retry_after))
        }
        _ => s.retry_after,
    };
    (
        StatusCode::from_u16(s.code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        retry_after,
    )
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

pub(crate) struct ApiError(GatewayError);

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

/// The REST API on `api`: KServe v2, OpenAI's and text-embeddings-inference's
/// embedding routes ([`super::embed`]), the OpenAPI document and its page
/// ([`super::openapi`]).
pub fn app(api: Api) -> axum::Router {
    use super::{embed, openapi};
    axum::Router::new()
        .route("/v1/embeddings", post(embed::openai_embeddings))
        .route("/v1/models", get(embed::openai_models))
        .route("/v1/models/{model}", get(embed::openai_model))
        .route("/embed", post(embed::tei_embed))
        .route("/tokenize", post(embed::tei_tokenize))
        .route("/info", get(embed::tei_info))
        .route("/health", get(embed::tei_health))
        .route("/openapi.json", get(openapi::openapi_json))
        .route("/docs", get(openapi::docs))
        .route("/docs/redoc.standalone.js", get(openapi::docs_script))
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
        .route("/v2/repository/index", post(repository_index))
        .route("/v2/repository/models/{model}/load", post(repository_load))
        .route(
            "/v2/repository/models/{model}/unload",
            post(repository_unload),
        )
        .route("/v2/repository/reload", post(repository_reload))
        .fallback(not_found)
        .layer(axum::Extension(embed::Started::now()))
        .layer(axum::middleware::from_fn(json_errors))
        .with_state(api)
}

/// Gives every error answer a JSON body in its API's shape: axum's own
/// refusals (a path segment that is not UTF-8, a method a route does not
/// have) come as plain text or empty, which no client of these APIs parses.
async fn json_errors(request: Request, next: axum::middleware::Next) -> Response {
    let dialect = super::embed::Dialect::of_path(request.uri().path());
    let response = next.run(request).await;
    let status = response.status();
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return response;
    }
    let (mut parts, body) = response.into_parts();
    // Axum's refusals are a line of text; a larger body is not one of them.
    let text = axum::body::to_bytes(body, 4096)
        .await
        .map(|b| String::from_utf8_lossy(&b).trim().to_owned())
        .unwrap_or_default();
    let message = if text.is_empty() {
        status
            .canonical_reason()
            .unwrap_or("error")
            .to_ascii_lowercase()
    } else {
        text
    };
    let body = super::embed::error_body(dialect, status, message, Default::default()).to_string();
    parts.headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    parts.headers.remove(header::CONTENT_LENGTH);
    Response::from_parts(parts, Body::from(body))
}

impl Api {
    /// Reads a request's body within this front end's limits (size, read
    /// timeout, minimum rate), counted in the memory budget unless its
    /// HTTP/3 front end already read and counted it. Hold the reservation
    /// until the answer is made.
    pub(crate) async fn read_request_body(
        &self,
        parts: &axum::http::request::Parts,
        body: Body,
    ) -> Result<(Bytes, Option<crate::budget::Reservation>), GatewayError> {
        let mut reservation = match parts.extensions.get::<BodyCounted>() {
            Some(_) => None,
            None => Some(self.budget.reserve(0)?),
        };
        let body = tokio::time::timeout(
            self.request_read_timeout,
            read_body(
                &parts.headers,
                body,
                self.max_body_bytes,
                reservation.as_mut(),
                self.min_body_rate,
            ),
        )
        .await
        .map_err(|_| GatewayError::RequestTimeout(self.request_read_timeout))??;
        Ok((body, reservation))
    }

    /// Checks a request's bearer token (`health`: a health endpoint, which
    /// `auth_exempt_health` may exempt), counting a refusal.
    pub(crate) fn authorize(&self, headers: &HeaderMap, health: bool) -> Result<(), GatewayError> {
        let result = self.auth.check(
            headers.get(header::AUTHORIZATION).map(|v| v.as_bytes()),
            health,
        );
        if result.is_err() {
            self.metrics
                .record_rejection("", self.protocol, "unauthenticated");
        }
        result.map(|_| ())
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
        "no route for {method} {} (KServe v2 is under /v2, OpenAI's embeddings under /v1, \
         text-embeddings-inference's at /embed, /tokenize, /info, /health; see /openapi.json)",
        uri.path()
    );
    let dialect = super::embed::Dialect::of_path(uri.path());
    (
        StatusCode::NOT_FOUND,
        [(header::CONTENT_TYPE, "application/json")],
        super::embed::error_body(dialect, StatusCode::NOT_FOUND, message, Default::default())
            .to_string(),
    )
        .into_response()
}

/// KServe v2 server liveness: 200 while the process answers.
#[utoipa::path(
    get, path = "/v2/health/live", tag = "KServe v2", operation_id = "kserve_health_live",
    responses((status = 200, description = "The process answers", body = super::openapi::LiveBody)),
)]
pub(crate) async fn live(State(api): State<Api>, headers: HeaderMap) -> Result<Response, ApiError> {
    api.authorize(&headers, true)?;
    Ok(json_response(&json!({ "live": true })))
}

/// KServe v2 server readiness: 200 while the gateway takes requests, 503 once shutdown starts.
#[utoipa::path(
    get, path = "/v2/health/ready", tag = "KServe v2", operation_id = "kserve_health_ready",
    responses((status = 200, description = "The gateway takes requests", body = super::openapi::ReadyBody)),
)]
pub(crate) async fn ready(
    State(api): State<Api>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    api.authorize(&headers, true)?;
    if api.ready.load(Ordering::Acquire) {
        Ok(json_response(&json!({ "ready": true })))
    } else {
        Err(ApiError(GatewayError::ShuttingDown))
    }
}

/// KServe v2 server metadata: name, version, extensions.
#[utoipa::path(
    get, path = "/v2", tag = "KServe v2", operation_id = "kserve_server_metadata",
    responses((status = 200, description = "The server", body = super::openapi::ServerMetadata)),
)]
pub(crate) async fn server_metadata(
    State(api): State<Api>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    api.authorize(&headers, false)?;
    Ok(json_response(&catalog::server_metadata_json()))
}

/// KServe v2 model metadata: the versions serving and the signature.
#[utoipa::path(
    get, path = "/v2/models/{model}", tag = "KServe v2", operation_id = "kserve_model_metadata",
    params(("model" = String, Path, description = "The model's name")),
    responses((status = 200, description = "The model's signature", body = super::openapi::ModelMetadata)),
)]
pub(crate) async fn model_metadata(
    State(api): State<Api>,
    Path(params): Path<HashMap<String, String>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    api.authorize(&headers, false)?;
    let (model, version) = model_and_version(&params);
    let entry = catalog::find(&api.router, model, version)?;
    Ok(json_response(&catalog::metadata_json(&catalog::metadata(
        &api.router,
        &entry,
    ))))
}

/// KServe v2 model readiness: 503 while its device is unhealthy.
#[utoipa::path(
    get, path = "/v2/models/{model}/ready", tag = "KServe v2", operation_id = "kserve_model_ready",
    params(("model" = String, Path, description = "The model's name")),
    responses(
        (status = 200, description = "The model serves", body = super::openapi::ModelReadyBody),
        (status = 503, description = "The model's device is unhealthy, or the gateway is shutting down", body = super::openapi::NotReady),
    ),
)]
pub(crate) async fn model_ready(
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
    if !entry.healthy() {
        // KServe v2: a model that is not ready answers 503 (its device is
        // unhealthy until a probe batch succeeds).
        let mut resp = json_response(&json!({ "name": entry.name, "ready": false }));
        *resp.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
        return Ok(resp);
    }
    Ok(json_response(&json!({ "name": entry.name, "ready": true })))
}

/// Triton's model configuration.
#[utoipa::path(
    get, path = "/v2/models/{model}/config", tag = "KServe v2", operation_id = "kserve_model_config",
    params(("model" = String, Path, description = "The model's name")),
    responses((status = 200, description = "Triton's model configuration", body = super::openapi::ModelConfig)),
)]
pub(crate) async fn model_config(
    State(api): State<Api>,
    Path(params): Path<HashMap<String, String>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    api.authorize(&headers, false)?;
    let (model, version) = model_and_version(&params);
    let entry = catalog::find(&api.router, model, version)?;
    Ok(json_response(&catalog::model_config_json(
        &catalog::model_config(&entry),
    )))
}

/// Triton's model statistics.
#[utoipa::path(
    get, path = "/v2/models/{model}/stats", tag = "KServe v2", operation_id = "kserve_model_stats",
    params(("model" = String, Path, description = "The model's name")),
    responses((status = 200, description = "Triton's statistics", body = super::openapi::ModelStatistics)),
)]
pub(crate) async fn model_stats(
    State(api): State<Api>,
    Path(params): Path<HashMap<String, String>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    api.authorize(&headers, false)?;
    let (model, version) = model_and_version(&params);
    let entry = catalog::find(&api.router, model, version)?;
    Ok(json_response(&catalog::statistics_json(&[
        catalog::statistics(&entry, &api.metrics),
    ])))
}

/// A repository request's JSON body; empty (or `null`) is `{}`.
fn repository_body(body: &[u8]) -> Result<Value, GatewayError> {
    // JSON's whitespace only: schemathesis found a lone form feed (ASCII
    // whitespace, not JSON's) taken as an empty body.
    if body
        .iter()
        .all(|b| matches!(b, b' ' | b'\t' | b'\n' | b'\r'))
    {
        return Ok(json!({}));
    }
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| GatewayError::InvalidArgument(format!("the body is not JSON: {e}")))?;
    if v.is_null() {
        return Ok(json!({}));
    }
    if !v.is_object() {
        return Err(GatewayError::InvalidArgument(
            "the body must be a JSON object".into(),
        ));
    }
    Ok(v)
}

/// Triton's `POST /v2/repository/index`: `{"ready": true}` lists only the
/// versions serving.
#[utoipa::path(
    post, path = "/v2/repository/index", tag = "KServe v2", operation_id = "kserve_repository_index",
    request_body = Option<super::openapi::RepositoryIndexRequest>,
    responses((status = 200, description = "Every model and version", body = Vec<super::openapi::RepositoryIndexEntry>)),
)]
pub(crate) async fn repository_index(
    State(api): State<Api>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    api.authorize(&headers, false)?;
    let ready_only = match repository_body(&body)?.get("ready") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        // Schemathesis found `{"ready": {}}` read as false.
        Some(other) => {
            return Err(ApiError(GatewayError::InvalidArgument(format!(
                "ready must be a boolean, got {other}"
            ))));
        }
    };
    let index: Vec<Value> = api
        .lifecycle
        .index(ready_only)
        .into_iter()
        .map(|e| {
            let mut v = serde_json::Map::new();
            v.insert("name".into(), json!(e.name));
            if !e.version.is_empty() {
                v.insert("version".into(), json!(e.version));
            }
            v.insert("state".into(), json!(e.state));
            if !e.reason.is_empty() {
                v.insert("reason".into(), json!(e.reason));
            }
            Value::Object(v)
        })
        .collect();
    Ok(json_response(&Value::Array(index)))
}

/// Triton's `POST /v2/repository/models/{m}/load`: loads (or reloads) the
/// model; `{"parameters": {"config": "<JSON>"}}` overrides its
/// `model.toml` keys. Answers once the new versions serve.
#[utoipa::path(
    post, path = "/v2/repository/models/{model}/load", tag = "KServe v2", operation_id = "kserve_repository_load",
    params(("model" = String, Path, description = "The model's name")),
    request_body = Option<super::openapi::RepositoryLoadRequest>,
    responses((status = 200, description = "Loaded; the new versions serve", body = super::openapi::LoadReport)),
)]
pub(crate) async fn repository_load(
    State(api): State<Api>,
    Path(model): Path<String>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    api.authorize(&headers, false)?;
    let body = repository_body(&body)?;
    // Schemathesis found `{"parameters": [null, null]}` taken as no parameters.
    let parameters = match body.get("parameters") {
        None | Some(Value::Null) => None,
        Some(Value::Object(p)) => Some(p),
        Some(other) => {
            return Err(ApiError(GatewayError::InvalidArgument(format!(
                "parameters must be an object, got {other}"
            ))));
        }
    };
    let config = match parameters.and_then(|p| p.get("config")) {
        None | Some(Value::Null) => None,
        Some(Value::String(text)) => Some(serde_json::from_str::<Value>(text).map_err(|e| {
            GatewayError::InvalidArgument(format!("parameters.config is not JSON: {e}"))
        })?),
        Some(other @ Value::Object(_)) => Some(other.clone()),
        Some(other) => {
            return Err(ApiError(GatewayError::InvalidArgument(format!(
                "parameters.config must be a JSON object or a string of one, got {other}"
            ))));
        }
    };
    if let Some(files) = body.get("parameters").and_then(Value::as_object)
        && files.keys().any(|k| k.starts_with("file:"))
    {
        return Err(ApiError(GatewayError::InvalidArgument(
            "file: parameters are not supported: put the version directory in the repository"
                .into(),
        )));
    }
    let report = api.lifecycle.load(&model, config.as_ref()).await?;
    Ok(json_response(&json!({
        "loaded": report.loaded.iter().map(|(v, t)| json!({
            "version": v.to_string(),
            "load_ms": t.as_millis() as u64,
        })).collect::<Vec<_>>(),
        "kept": report.kept.iter().map(u64::to_string).collect::<Vec<_>>(),
        "draining": report.draining.iter().map(u64::to_string).collect::<Vec<_>>(),
    })))
}

/// Triton's `POST /v2/repository/models/{m}/unload`: the model stops
/// taking requests now; what it holds drains.
#[utoipa::path(
    post, path = "/v2/repository/models/{model}/unload", tag = "KServe v2", operation_id = "kserve_repository_unload",
    params(("model" = String, Path, description = "The model's name")),
    request_body = Option<super::openapi::RepositoryUnloadRequest>,
    responses((status = 200, description = "Unloaded; what it holds drains", body = super::openapi::UnloadReport)),
)]
pub(crate) async fn repository_unload(
    State(api): State<Api>,
    Path(model): Path<String>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    api.authorize(&headers, false)?;
    // Triton's `unload_dependents` and the like are read nowhere, but a body
    // that is not the schema's is refused, not taken as none (schemathesis
    // found `{"parameters": 1}` accepted).
    match repository_body(&body)?.get("parameters") {
        None | Some(Value::Null | Value::Object(_)) => {}
        Some(other) => {
            return Err(ApiError(GatewayError::InvalidArgument(format!(
                "parameters must be an object, got {other}"
            ))));
        }
    }
    let versions = api.lifecycle.unload(&model).await?;
    Ok(json_response(&json!({
        "draining": versions.iter().map(u64::to_string).collect::<Vec<_>>(),
    })))
}

/// Quiver's `POST /v2/repository/reload`: re-reads the configuration file
/// (as SIGHUP does) and says what took effect and what needs a restart.
#[utoipa::path(
    post, path = "/v2/repository/reload", tag = "KServe v2", operation_id = "kserve_repository_reload",
    responses((status = 200, description = "The configuration file, read again", body = super::openapi::ReloadReport)),
)]
pub(crate) async fn repository_reload(
    State(api): State<Api>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    api.authorize(&headers, false)?;
    let report = api.lifecycle.reload().await?;
    Ok(json_response(&report.to_json()))
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

/// KServe v2 inference: JSON tensors, or Triton's binary tensor extension.
#[utoipa::path(
    post, path = "/v2/models/{model}/infer", tag = "KServe v2", operation_id = "kserve_infer",
    params(("model" = String, Path, description = "The model's name"),
        ("Inference-Header-Content-Length" = Option<u64>, Header,
            description = "Triton's binary tensor extension: the length of the JSON part of an application/octet-stream body; the tensors' bytes follow it"),
    ),
    request_body(description = "KServe v2 JSON, or with the binary extension a JSON header and the tensors' bytes",
        content(
            (super::openapi::InferRequestBody = "application/json"),
            ("application/octet-stream"),
        ),
    ),
    responses((status = 200, description = "The outputs",
        headers(("Inference-Header-Content-Length" = u64,
            description = "With binary outputs: the length of the JSON part")),
        content(
            (super::openapi::InferResponseBody = "application/json"),
            ("application/octet-stream"),
        ),
    )),
)]
pub(crate) async fn infer(
    State(api): State<Api>,
    Path(params): Path<HashMap<String, String>>,
    request: Request,
) -> Response {
    let mut record = api.metrics.start_request(api.protocol);
    let (model, version) = model_and_version(&params);
    // Bounded label values: only configured model names.
    let label = api
        .router
        .model(model)
        .map(|m| m.name.clone())
        .unwrap_or_default();
    record.set_model(label);
    let (outcome, response) = match infer_inner(&api, model, version, request).await {
        Ok((resp, served_version)) => {
            record.set_version(served_version);
            ("ok", resp)
        }
        Err(e) => {
            tracing::debug!(model, error = %e, "request failed");
            // Refused before its body was read whole, as the other front
            // ends count them.
            if matches!(
                e,
                GatewayError::MemoryBudget { .. }
                    | GatewayError::RequestTimeout(_)
                    | GatewayError::BodyTooSlow { .. }
            ) {
                api.metrics.record_rejection("", api.protocol, e.outcome());
            }
            (e.outcome(), error_response(&e))
        }
    };
    record.finish(outcome);
    response
}

async fn infer_inner(
    api: &Api,
    model: &str,
    version: &str,
    request: Request,
) -> Result<(Response, u64), GatewayError> {
    let (parts, body) = request.into_parts();
    let token = api.auth.check(
        parts
            .headers
            .get(header::AUTHORIZATION)
            .map(|v| v.as_bytes()),
        false,
    )?;
    let entry = catalog::find(&api.router, model, version)?;
    // Before the body is read: a client over its rate costs nothing more.
    let source = parts
        .extensions
        .get::<crate::ratelimit::ClientAddr>()
        .map(|a| a.0.ip());
    let client = api.auth.client(
        token,
        parts.extensions.get::<crate::ratelimit::PeerIdentity>(),
        source,
    )?;
    if parts.extensions.get::<RateChecked>().is_none() {
        api.router.check_rate(&entry.name, client)?;
    }
    // Held until the answer is made.
    let (body, _reservation) = api.read_request_body(&parts, body).await?;
    let json_len = header_length(&parts.headers)?;
    let mut decoded = decode_request(model, version, &body, json_len)?;
    decoded.request.rtt = parts.extensions.get::<RoundTrip>().map(|r| r.0);

    let cancel = CancelToken::new();
    let mut guard = CancelOnDrop(Some(cancel.clone()));
    let result = api.router.infer(decoded.request, cancel).await;
    guard.disarm();
    let resp = result?;
    let served_version = resp.version;
    Ok((
        encode_response(resp, &decoded.binary_outputs),
        served_version,
    ))
}

/// Marks a request whose client's rate its front end has already checked
/// (HTTP/3, before reading the body), so the handler does not count it again.
#[derive(Clone, Copy, Debug)]
pub struct RateChecked;

/// Marks a request whose body its front end has already read and counted
/// against the memory budget (HTTP/3), so the handler does not count it again.
#[derive(Clone, Copy, Debug)]
pub struct BodyCounted;

/// Set by the HTTP/3 front end: the QUIC connection's smoothed RTT, which
/// the request's deadline sets aside for the network.
#[derive(Clone, Copy, Debug)]
pub struct RoundTrip(pub std::time::Duration);

/// The slowest a body may arrive (`server.min_body_bytes_per_sec`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BodyRate {
    /// Bytes per second, on average since the headers.
    pub bytes_per_sec: u32,
    /// Time before the rate is checked.
    pub grace: Duration,
}

impl BodyRate {
    /// The rate of `server.min_body_bytes_per_sec`; `None` when it is 0 (off).
    pub fn new(bytes_per_sec: u32, grace: Duration) -> Option<BodyRate> {
        (bytes_per_sec > 0).then_some(BodyRate {
            bytes_per_sec,
            grace,
        })
    }

    /// How long after the headers byte number `n` (counting from 1) may
    /// arrive: never before the grace has passed, else `n / rate` seconds.
    pub fn due(&self, n: u64) -> Duration {
        self.grace.max(Duration::from_secs_f64(
            n as f64 / f64::from(self.bytes_per_sec),
        ))
    }
}

/// Reads a body of at most `limit` bytes: refused from its
/// `Content-Length` before any byte is read, or as soon as what arrives
/// passes the limit, or (with a `rate`) as soon as it arrives slower than
/// the rate allows. With a `reservation`, the body's bytes are counted
/// against the memory budget: the announced length before any byte is read,
/// else each chunk as it arrives.
pub async fn read_body(
    headers: &HeaderMap,
    body: Body,
    limit: usize,
    mut reservation: Option<&mut crate::budget::Reservation>,
    rate: Option<BodyRate>,
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
    let capacity = declared.map_or(0, |len| usize::try_from(len).unwrap_or(limit));
    collect(body, capacity, limit, reservation, rate).await
}

/// Reads a body chunk by chunk: each counted against the budget before it
/// is kept (when `reservation` is given), refused at the first chunk that
/// passes `limit` or the budget, or when the next byte is later than `rate`
/// allows.
async fn collect(
    mut body: Body,
    capacity: usize,
    limit: usize,
    mut reservation: Option<&mut crate::budget::Reservation>,
    rate: Option<BodyRate>,
) -> Result<Bytes, GatewayError> {
    use http_body_util::BodyExt;
    let started = tokio::time::Instant::now();
    let mut chunks = bytes::BytesMut::with_capacity(capacity.min(limit));
    loop {
        let next = body.frame();
        let frame = match rate {
            None => next.await,
            Some(rate) => {
                let due = started + rate.due(chunks.len() as u64 + 1);
                match tokio::time::timeout_at(due, next).await {
                    Ok(frame) => frame,
                    Err(_) => {
                        return Err(GatewayError::BodyTooSlow {
                            received: chunks.len() as u64,
                            elapsed: started.elapsed(),
                            min_rate: rate.bytes_per_sec,
                        });
                    }
                }
            }
        };
        let Some(frame) = frame else {
            return Ok(chunks.freeze());
        };
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
            if let Some(r) = reservation.as_deref_mut() {
                r.grow(data.len() as u64)?;
            }
            chunks.extend_from_slice(&data);
        }
    }
}

fn header_length(headers: &HeaderMap) -> Result<Option<usize>, GatewayError> {
    headers
        .get(HEADER_CONTENT_LENGTH)
        .map(|v| binary::header_length(v.as_bytes()))
        .transpose()
        .map_err(GatewayError::from)
}

/// A decoded REST inference request.
#[derive(Debug)]
pub struct Decoded {
    pub request: InferRequest,
    /// Which outputs go back as binary tensors; `all` for
    /// `binary_data_output`.
    pub binary_outputs: BinaryOutputs,
}

/// Decodes a KServe v2 REST body (`quiver_protocol::binary`): JSON, or with
/// Triton's binary tensor extension a JSON header of `json_len` bytes
/// followed by the tensors' raw bytes.
pub fn decode_request(
    model: &str,
    version: &str,
    body: &[u8],
    json_len: Option<usize>,
) -> Result<Decoded, GatewayError> {
    let req = binary::decode_request(body, json_len)?;
    let (priority, timeout) = tensor::schedule_policy(&req.parameters)?;
    let (truncate, truncation_side) = tensor::truncation(&req.parameters)?;
    Ok(Decoded {
        request: InferRequest {
            model: model.to_owned(),
            version: version.to_owned(),
            rtt: None,
            id: req.id,
            inputs: req.inputs,
            outputs: req.outputs,
            priority,
            timeout,
            truncate,
            truncation_side,
        },
        binary_outputs: req.binary_outputs,
    })
}

/// Encodes an answer as KServe v2 JSON, with the outputs named in `binary`
/// as binary tensors after the JSON header.
pub fn encode_response(resp: InferResponse, binary: &BinaryOutputs) -> Response {
    let parameters = tensor::response_parameters(&resp);
    let head = ResponseHead {
        model_name: &resp.model,
        model_version: &resp.version.to_string(),
        id: &resp.id,
        parameters: &parameters,
    };
    let (body, json_len) = binary::encode_response(&head, &resp.outputs, binary);
    let Some(json_len) = json_len else {
        return (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "application/json")],
            body,
        )
            .into_response();
    };
    let mut resp = (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/octet-stream")],
        body,
    )
        .into_response();
    resp.headers_mut()
        .insert(HEADER_CONTENT_LENGTH, HeaderValue::from(json_len));
    resp
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
    /// closed (HTTP/1.1); a TLS handshake not done in this time too.
    pub header_timeout: Duration,
    /// TLS on the listener (`https_listen`, `grpcs_listen`), with client
    /// certificates required when its verifier asks for them; `None`: plain.
    pub tls: Option<Arc<rustls::ServerConfig>>,
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
        let builder = builder.clone();
        let service = service.clone();
        let watcher = graceful.watcher();
        let tls = limits.tls.clone().map(tokio_rustls::TlsAcceptor::from);
        let handshake_timeout = limits.header_timeout;
        tokio::spawn(async move {
            let result = match tls {
                None => {
                    let service = with_peer(service, remote, None);
                    let conn = builder
                        .serve_connection_with_upgrades(TokioIo::new(stream), service)
                        .into_owned();
                    watcher.watch(conn).await
                }
                Some(acceptor) => {
                    // The handshake (and the client certificate's check)
                    // happens here, off the accept loop, bounded in time.
                    let tls = match tokio::time::timeout(handshake_timeout, acceptor.accept(stream))
                        .await
                    {
                        Ok(Ok(tls)) => tls,
                        Ok(Err(e)) => {
                            tracing::debug!(%remote, error = %e, "TLS handshake failed");
                            return;
                        }
                        Err(_) => {
                            tracing::debug!(%remote, "TLS handshake timed out");
                            return;
                        }
                    };
                    let identity = tls
                        .get_ref()
                        .1
                        .peer_certificates()
                        .and_then(crate::ratelimit::PeerIdentity::of_chain);
                    let service = with_peer(service, remote, identity);
                    let conn = builder
                        .serve_connection_with_upgrades(TokioIo::new(tls), service)
                        .into_owned();
                    watcher.watch(conn).await
                }
            };
            if let Err(e) = result {
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

/// Wraps a connection's service so that each of its requests carries the
/// peer's address and client-certificate identity (for per-client limits).
fn with_peer(
    service: hyper_util::service::TowerToHyperService<axum::Router>,
    remote: std::net::SocketAddr,
    identity: Option<crate::ratelimit::PeerIdentity>,
) -> impl hyper::service::Service<
    hyper::Request<hyper::body::Incoming>,
    Response = Response,
    Error = std::convert::Infallible,
    Future: Send + 'static,
> + Clone
+ Send
+ 'static {
    hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
        req.extensions_mut()
            .insert(crate::ratelimit::ClientAddr(remote));
        if let Some(id) = &identity {
            req.extensions_mut().insert(id.clone());
        }
        hyper::service::Service::call(&service, req)
    })
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
        let d = decode_request("m", "", &body, Some(head.len())).expect("valid request");
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
        assert!(decode_request("m", "", &extra, Some(head.len())).is_err());
        assert!(decode_request("m", "", &body[..body.len() - 1], Some(head.len())).is_err());
        assert!(decode_request("m", "", &body, Some(body.len() + 1)).is_err());
    }
}
