//! The embedding APIs that clients already call, beside KServe v2 on the REST
//! port and HTTP/3 (DESIGN.md, "Wire protocols", 4):
//!
//! - OpenAI's `POST /v1/embeddings` and `GET /v1/models[/{model}]`, what the
//!   `openai` SDK calls when pointed at a `base_url`;
//! - text-embeddings-inference's `POST /embed`, `POST /tokenize`,
//!   `GET /info` and `GET /health`.
//!
//! Not a side path: an embedding request becomes an [`InferRequest`] with the
//! model's BYTES `text` input and goes through [`Router::infer`] — the same
//! admission, batching, deadlines, priorities and overflow as a KServe
//! request, cancelled when its client goes away. Bodies are read under the
//! same byte limit, read timeout and memory budget, and the client's rate is
//! checked once the body has named the model. Errors keep the HTTP statuses
//! of [`super::http::http_status`] (one mapping for every REST route) in each
//! API's own body: OpenAI's `{"error": {"message", "type", "param",
//! "code"}}`, TEI's `{"error", "error_type"}`.
//!
//! The request and response types here are the ones the OpenAPI document
//! ([`super::openapi`]) is derived from.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::body::Body;
use axum::extract::{Path, Query, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use bytes::Bytes;
use quiver_batching::CancelToken;
use quiver_kernels::{HostTensor, PrepareOptions, TensorData, TextEmbedding};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;

use super::http::{Api, CancelOnDrop, RateChecked, http_status};
use crate::error::GatewayError;
use crate::registry::ModelEntry;
use crate::request::{InferRequest, TextUsage};

/// The response header that says how many inputs were cut to the model's
/// token limit (on `/v1/embeddings` and `/embed`).
pub const TRUNCATED_HEADER: &str = "x-quiver-truncated";

// ---------------------------------------------------------------------------
// Wire types.

/// Text to embed: one string, or an array of strings (one embedding each).
/// Token-id arrays are refused (400): this gateway tokenizes itself. The
/// handlers read the field as JSON ([`texts_of`]) to say exactly what is
/// wrong with it; this type is its schema.
#[derive(Debug, Deserialize, Serialize)]
#[serde(untagged)]
pub enum TextInput {
    /// One text.
    One(String),
    /// Several texts (at least one), at most the model's `max_batch_size`.
    Many(Vec<String>),
}

// By hand, for what the derive cannot say of a variant: an array holds at
// least one text ([`texts_of`] refuses an empty one).
impl utoipa::PartialSchema for TextInput {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        use utoipa::openapi::schema::{ArrayBuilder, ObjectBuilder, OneOfBuilder, Type};
        let text = || ObjectBuilder::new().schema_type(Type::String);
        OneOfBuilder::new()
            .item(text().description(Some("One text")))
            .item(
                ArrayBuilder::new()
                    .items(text())
                    .min_items(Some(1))
                    .description(Some("Several texts, at most the model's max_batch_size")),
            )
            .description(Some(
                "Text to embed: a string or a non-empty array of strings (token ids are refused)",
            ))
            .into()
    }
}

impl ToSchema for TextInput {}

/// How OpenAI's embeddings come back.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum EncodingFormat {
    /// An array of numbers.
    #[default]
    Float,
    /// The little-endian f32 bytes, base64-encoded (what the `openai` SDK asks
    /// for by default, and decodes).
    Base64,
}

/// `POST /v1/embeddings` (OpenAI's create-embeddings request).
#[derive(Debug, Deserialize, ToSchema)]
pub struct EmbeddingsRequest {
    /// The model's name, as `GET /v1/models` lists it.
    pub model: String,
    /// The text(s) to embed.
    #[schema(value_type = TextInput)]
    pub input: Value,
    /// `float` (default) or `base64`.
    #[serde(default)]
    pub encoding_format: EncodingFormat,
    /// Keep the first `dimensions` values of each embedding and L2-normalise
    /// them again (Matryoshka truncation); at most the model's width.
    #[schema(minimum = 1)]
    pub dimensions: Option<u32>,
    /// Ignored (OpenAI's end-user id).
    pub user: Option<String>,
    /// Quiver: the schedule-policy priority (1 = most urgent; 0 or absent:
    /// the model's default), as the KServe `priority` parameter.
    pub priority: Option<u32>,
    /// Quiver: the relative deadline in microseconds (0 or absent: the
    /// model's `default_timeout_ms`), as the KServe `timeout` parameter.
    #[schema(minimum = 0)]
    pub timeout_us: Option<i64>,
}

/// One embedding: numbers, or base64 of little-endian f32.
#[derive(Debug, Serialize, ToSchema)]
#[serde(untagged)]
pub enum EmbeddingVector {
    /// `encoding_format: float`.
    Float(Vec<f32>),
    /// `encoding_format: base64`.
    Base64(String),
}

/// One entry of [`EmbeddingsResponse::data`].
#[derive(Debug, Serialize, ToSchema)]
pub struct EmbeddingData {
    /// Always `embedding`.
    pub object: &'static str,
    /// The input's position.
    pub index: usize,
    /// The embedding.
    pub embedding: EmbeddingVector,
}

/// Token counts of a request.
#[derive(Debug, Serialize, ToSchema)]
pub struct EmbeddingsUsage {
    /// Tokens of every input, special tokens included, after truncation.
    pub prompt_tokens: u64,
    /// The same as `prompt_tokens` (embeddings generate nothing).
    pub total_tokens: u64,
}

/// The answer of `POST /v1/embeddings`.
#[derive(Debug, Serialize, ToSchema)]
pub struct EmbeddingsResponse {
    /// Always `list`.
    pub object: &'static str,
    /// One embedding per input, in input order.
    pub data: Vec<EmbeddingData>,
    /// The model that answered.
    pub model: String,
    /// Token counts.
    pub usage: EmbeddingsUsage,
}

/// One model of `GET /v1/models`.
#[derive(Debug, Serialize, ToSchema)]
pub struct ModelCard {
    /// The model's name.
    pub id: String,
    /// Always `model`.
    pub object: &'static str,
    /// Unix seconds when this gateway started serving.
    pub created: u64,
    /// Always `quiver`.
    pub owned_by: &'static str,
}

/// The answer of `GET /v1/models`.
#[derive(Debug, Serialize, ToSchema)]
pub struct ModelList {
    /// Always `list`.
    pub object: &'static str,
    /// Every model served, by name.
    pub data: Vec<ModelCard>,
}

/// OpenAI's error object.
#[derive(Debug, Serialize, ToSchema)]
pub struct OpenAiError {
    /// What went wrong, in words.
    pub message: String,
    /// `invalid_request_error`, `authentication_error`, `rate_limit_error`
    /// or `server_error`.
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// The request field at fault, when one is.
    pub param: Option<&'static str>,
    /// A machine-readable code: `model_not_found`, else the gateway's
    /// outcome label (`invalid_argument`, `overloaded`, ...).
    pub code: Option<&'static str>,
}

/// Every error of the OpenAI routes.
#[derive(Debug, Serialize, ToSchema)]
pub struct OpenAiErrorBody {
    /// The error.
    pub error: OpenAiError,
}

/// Which end a truncation cuts (TEI's `truncation_direction`; any case).
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq, ToSchema)]
pub enum TruncationDirection {
    /// Keep the start of the text.
    #[default]
    #[serde(alias = "right", alias = "RIGHT")]
    Right,
    /// Keep the end of the text.
    #[serde(alias = "left", alias = "LEFT")]
    Left,
}

impl From<TruncationDirection> for quiver_kernels::TruncationSide {
    fn from(d: TruncationDirection) -> Self {
        match d {
            TruncationDirection::Right => quiver_kernels::TruncationSide::Right,
            TruncationDirection::Left => quiver_kernels::TruncationSide::Left,
        }
    }
}

/// `POST /embed` (text-embeddings-inference's request).
#[derive(Debug, Deserialize, ToSchema)]
pub struct EmbedRequest {
    /// The text(s) to embed.
    #[schema(value_type = TextInput)]
    pub inputs: Value,
    /// L2-normalise each embedding (default true). `false` is refused for a
    /// model that normalises in its own pipeline (its `Normalize` module).
    pub normalize: Option<bool>,
    /// Cut a text longer than the model's limit (`true`), or refuse it with
    /// 413 (`false`); absent or null: the model's `auto_truncate`.
    pub truncate: Option<bool>,
    /// `Right` (default) or `Left`.
    #[serde(default)]
    pub truncation_direction: TruncationDirection,
    /// Keep the first `dimensions` values and normalise again.
    #[schema(minimum = 1)]
    pub dimensions: Option<u32>,
    /// Quiver: the model, where several text-embedding models serve.
    pub model: Option<String>,
    /// Quiver: the schedule-policy priority, as on `/v1/embeddings`.
    pub priority: Option<u32>,
    /// Quiver: the relative deadline in microseconds, as on `/v1/embeddings`.
    #[schema(minimum = 0)]
    pub timeout_us: Option<i64>,
}

/// `POST /tokenize`.
#[derive(Debug, Deserialize, ToSchema)]
pub struct TokenizeRequest {
    /// The text(s) to tokenize.
    #[schema(value_type = TextInput)]
    pub inputs: Value,
    /// Add the model's special tokens (`[CLS]`, `[SEP]`); default true.
    pub add_special_tokens: Option<bool>,
    /// Quiver: the model, where several text-embedding models serve.
    pub model: Option<String>,
}

/// One token of `/tokenize`'s answer.
#[derive(Debug, Serialize, ToSchema)]
pub struct SimpleToken {
    /// Its vocabulary id.
    pub id: u32,
    /// The text it covers; a special token's own text.
    pub text: String,
    /// Whether it is a special token.
    pub special: bool,
    /// Its first byte in the input; null for a special token.
    pub start: Option<usize>,
    /// The byte after its last; null for a special token.
    pub stop: Option<usize>,
}

/// The text-embedding model's pooling.
#[derive(Debug, Serialize, ToSchema)]
pub struct EmbeddingModel {
    /// `mean` or `cls`.
    pub pooling: &'static str,
}

/// What kind of model `/info` describes (always an embedding model here).
#[derive(Debug, Serialize, ToSchema)]
pub struct ModelType {
    /// The embedding model.
    pub embedding: EmbeddingModel,
}

/// `GET /info`: the text-embedding model and its limits.
#[derive(Debug, Serialize, ToSchema)]
pub struct Info {
    /// The model's name.
    pub model_id: String,
    /// The weights' type (`float32`).
    pub model_dtype: &'static str,
    /// The model's kind and pooling.
    pub model_type: ModelType,
    /// Requests the model's admission queue holds (`queue_capacity`).
    pub max_concurrent_requests: u32,
    /// Most tokens of one input (`max_seq_length`).
    pub max_input_length: usize,
    /// Most padded tokens in one batch (`max_batch_tokens`).
    pub max_batch_tokens: u32,
    /// Most inputs in one request (`max_batch_size`).
    pub max_client_batch_size: u32,
    /// Whether a text past `max_input_length` is cut when its request does
    /// not say (`auto_truncate`).
    pub auto_truncate: bool,
    /// Threads that tokenize (the front end's runtime workers).
    pub tokenization_workers: usize,
    /// The gateway's version.
    pub version: &'static str,
    /// The embedding width.
    pub dimensions: usize,
}

/// `?model=` of `GET /info`.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct InfoQuery {
    /// The model, where several text-embedding models serve.
    pub model: Option<String>,
}

/// TEI's error kinds, lowercase as TEI writes them.
#[derive(Clone, Copy, Debug, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum TeiErrorType {
    /// The request does not fit (4xx).
    Validation,
    /// No capacity now (429, 503).
    Overloaded,
    /// The model, its device or an upstream failed (5xx).
    Backend,
    /// The gateway is shutting down, or the model's device is unhealthy.
    Unhealthy,
}

/// Every error of the TEI routes.
#[derive(Debug, Serialize, ToSchema)]
pub struct TeiErrorBody {
    /// What went wrong, in words.
    pub error: String,
    /// Its kind.
    pub error_type: TeiErrorType,
}

// ---------------------------------------------------------------------------
// Errors.

/// Which API's error body a route answers with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dialect {
    /// `{"error": "..."}` (KServe v2, Triton).
    Kserve,
    /// `{"error": {"message", "type", "param", "code"}}`.
    OpenAi,
    /// `{"error", "error_type"}`.
    Tei,
}

impl Dialect {
    /// The dialect of a path: `/v1/...` is OpenAI's, TEI's routes are TEI's,
    /// the rest KServe's.
    pub fn of_path(path: &str) -> Dialect {
        if path == "/v1" || path.starts_with("/v1/") {
            Dialect::OpenAi
        } else if matches!(path, "/embed" | "/tokenize" | "/info" | "/health") {
            Dialect::Tei
        } else {
            Dialect::Kserve
        }
    }
}

/// What a client may do about an error, beyond its status: TEI tells a 503
/// that will pass (no capacity in time: `overloaded`) from one that will not
/// soon (shutting down, an unhealthy device: `unhealthy`).
#[derive(Clone, Copy, Debug, Default)]
pub struct ErrorDetail {
    /// The OpenAI request field at fault.
    pub param: Option<&'static str>,
    /// OpenAI's machine-readable code.
    pub code: Option<&'static str>,
    /// A 503 from a gateway or device that is not serving, not from load.
    pub unhealthy: bool,
}

/// The body of an error in `dialect`, for a status and message.
pub fn error_body(
    dialect: Dialect,
    status: StatusCode,
    message: String,
    detail: ErrorDetail,
) -> Value {
    let ErrorDetail {
        param,
        code,
        unhealthy,
    } = detail;
    match dialect {
        Dialect::Kserve => serde_json::json!({ "error": message }),
        Dialect::OpenAi => {
            let kind = match status.as_u16() {
                401 => "authentication_error",
                429 => "rate_limit_error",
                s if s >= 500 => "server_error",
                _ => "invalid_request_error",
            };
            serde_json::to_value(OpenAiErrorBody {
                error: OpenAiError {
                    message,
                    kind,
                    param,
                    code,
                },
            })
            .unwrap_or(Value::Null)
        }
        Dialect::Tei => {
            let error_type = match status.as_u16() {
                429 => TeiErrorType::Overloaded,
                503 if unhealthy => TeiErrorType::Unhealthy,
                503 => TeiErrorType::Overloaded,
                s if s >= 500 => TeiErrorType::Backend,
                _ => TeiErrorType::Validation,
            };
            serde_json::to_value(TeiErrorBody {
                error: message,
                error_type,
            })
            .unwrap_or(Value::Null)
        }
    }
}

/// An error of an embedding route, with the request field at fault.
#[derive(Debug)]
struct RouteError {
    err: GatewayError,
    param: Option<&'static str>,
}

impl From<GatewayError> for RouteError {
    fn from(err: GatewayError) -> Self {
        RouteError { err, param: None }
    }
}

fn invalid(param: &'static str, message: impl Into<String>) -> RouteError {
    RouteError {
        err: GatewayError::InvalidArgument(message.into()),
        param: Some(param),
    }
}

/// The detail of `err` beyond its status.
fn detail_of(err: &GatewayError, param: Option<&'static str>) -> ErrorDetail {
    ErrorDetail {
        param,
        code: Some(match err {
            GatewayError::UnknownModel(_) | GatewayError::UnknownVersion { .. } => {
                "model_not_found"
            }
            other => other.outcome(),
        }),
        unhealthy: matches!(
            err,
            GatewayError::ShuttingDown | GatewayError::DeviceUnhealthy { .. }
        ),
    }
}

/// An error as a response of `dialect`: the status of [`http_status`] (with
/// `Retry-After` where a retry later can help).
pub fn error_response_in(
    dialect: Dialect,
    err: &GatewayError,
    param: Option<&'static str>,
) -> Response {
    let (status, retry_after) = http_status(err);
    let body = error_body(dialect, status, err.to_string(), detail_of(err, param));
    let mut resp = (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response();
    if let Some(s) = retry_after {
        resp.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(s));
    }
    resp
}

fn json_ok<T: Serialize>(value: &T) -> Response {
    match serde_json::to_vec(value) {
        Ok(body) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "application/json")],
            body,
        )
            .into_response(),
        Err(e) => error_response_in(
            Dialect::Kserve,
            &GatewayError::Model {
                model: String::new(),
                message: format!("cannot encode the answer: {e}"),
            },
            None,
        ),
    }
}

// ---------------------------------------------------------------------------
// The shared path: admission, the model, the router.

/// A request whose token is checked and whose body is read (counted against
/// the memory budget until it is dropped).
struct Admitted {
    parts: Parts,
    token: Option<usize>,
    body: Bytes,
    _reservation: Option<crate::budget::Reservation>,
}

/// Checks the token (before any byte of the body), then reads the body
/// under the REST limits, as the KServe infer route does.
async fn admit(api: &Api, request: Request) -> Result<Admitted, GatewayError> {
    let (parts, body): (Parts, Body) = request.into_parts();
    let token = api.auth.check(
        parts
            .headers
            .get(header::AUTHORIZATION)
            .map(|v| v.as_bytes()),
        false,
    );
    let token = match token {
        Ok(t) => t,
        Err(e) => {
            api.metrics
                .record_rejection("", api.protocol, "unauthenticated");
            return Err(e);
        }
    };
    let (body, reservation) = match api.read_request_body(&parts, body).await {
        Ok(read) => read,
        Err(e) => {
            if matches!(
                e,
                GatewayError::MemoryBudget { .. }
                    | GatewayError::RequestTimeout(_)
                    | GatewayError::BodyTooSlow { .. }
            ) {
                api.metrics.record_rejection("", api.protocol, e.outcome());
            }
            return Err(e);
        }
    };
    Ok(Admitted {
        parts,
        token,
        body,
        _reservation: reservation,
    })
}

impl Admitted {
    /// The body as `T`, or a 400 that says what is wrong with it.
    fn json<T: serde::de::DeserializeOwned>(&self) -> Result<T, RouteError> {
        serde_json::from_slice(&self.body).map_err(|e| {
            RouteError::from(GatewayError::InvalidArgument(format!(
                "the body is not a valid request: {e}"
            )))
        })
    }

    /// The client's rate for `model`, now that the body has named it (an
    /// HTTP/3 request whose front end checked it already is not counted
    /// twice).
    fn check_rate(&self, api: &Api, model: &str) -> Result<(), GatewayError> {
        if self.parts.extensions.get::<RateChecked>().is_some() {
            return Ok(());
        }
        let source = self
            .parts
            .extensions
            .get::<crate::ratelimit::ClientAddr>()
            .map(|a| a.0.ip());
        let client = api.auth.client(
            self.token,
            self.parts
                .extensions
                .get::<crate::ratelimit::PeerIdentity>(),
            source,
        )?;
        api.router.check_rate(model, client)
    }
}

/// The text-embedding model called `name`, or the only one served when
/// `name` is absent.
fn text_model(api: &Api, name: Option<&str>) -> Result<Arc<ModelEntry>, RouteError> {
    if let Some(name) = name {
        let entry = super::catalog::find(&api.router, name, "").map_err(|err| RouteError {
            err,
            param: Some("model"),
        })?;
        if entry.model.as_text_embedding().is_none() {
            return Err(invalid(
                "model",
                format!(
                    "model '{name}' is not a text-embedding model (its kind is {})",
                    entry.model.kind()
                ),
            ));
        }
        return Ok(entry);
    }
    let snapshot = api.router.registry().snapshot();
    let mut text = snapshot
        .newest()
        .filter(|e| e.model.as_text_embedding().is_some());
    match (text.next(), text.next()) {
        (Some(one), None) => Ok(one.clone()),
        (None, _) => Err(invalid("model", "no text-embedding model serves here")),
        (Some(_), Some(_)) => {
            let names: Vec<String> = snapshot
                .newest()
                .filter(|e| e.model.as_text_embedding().is_some())
                .map(|e| e.name.clone())
                .collect();
            Err(invalid(
                "model",
                format!(
                    "several text-embedding models serve ({}): name one with `model`",
                    names.join(", ")
                ),
            ))
        }
    }
}

fn text_of(entry: &ModelEntry) -> Result<&TextEmbedding, GatewayError> {
    entry.model.as_text_embedding().ok_or_else(|| {
        GatewayError::InvalidArgument(format!(
            "model '{}' is not a text-embedding model",
            entry.name
        ))
    })
}

/// The texts of an `input` / `inputs` field: a string, or a non-empty array
/// of strings. Token ids are refused with a clear message.
fn texts_of(v: &Value, param: &'static str) -> Result<Vec<String>, RouteError> {
    match v {
        Value::String(s) => Ok(vec![s.clone()]),
        Value::Array(items) if items.is_empty() => Err(invalid(
            param,
            format!("`{param}` must not be an empty array"),
        )),
        Value::Array(items) => items
            .iter()
            .enumerate()
            .map(|(i, item)| match item {
                Value::String(s) => Ok(s.clone()),
                Value::Number(_) | Value::Array(_) => Err(invalid(
                    param,
                    format!(
                        "`{param}` holds token ids (element {i}): not supported, send the text; \
                         this gateway tokenizes with the model's own tokenizer"
                    ),
                )),
                other => Err(invalid(
                    param,
                    format!("`{param}[{i}]` must be a string, got {}", json_type(other)),
                )),
            })
            .collect(),
        other => Err(invalid(
            param,
            format!(
                "`{param}` must be a string or an array of strings, got {}",
                json_type(other)
            ),
        )),
    }
}

fn json_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// What an embedding request asks beyond its texts.
#[derive(Clone, Copy, Debug, Default)]
struct EmbedOptions {
    truncate: Option<bool>,
    side: quiver_kernels::TruncationSide,
    priority: u32,
    timeout_us: Option<i64>,
}

/// The embeddings of `texts` through the router, one row each, with the
/// tokens they took.
async fn embed_texts(
    api: &Api,
    entry: &ModelEntry,
    texts: Vec<String>,
    options: EmbedOptions,
) -> Result<(Vec<Vec<f32>>, TextUsage, u64), GatewayError> {
    let rows = texts.len();
    let tensor = HostTensor::new(
        quiver_kernels::text::INPUT,
        vec![rows],
        TensorData::Bytes(texts.iter().map(|t| t.as_bytes().to_vec()).collect()),
    )?;
    let request = InferRequest {
        model: entry.name.clone(),
        version: String::new(),
        id: String::new(),
        inputs: vec![tensor],
        outputs: Vec::new(),
        priority: options.priority,
        timeout: options
            .timeout_us
            .filter(|&us| us > 0)
            .map(|us| std::time::Duration::from_micros(us.unsigned_abs())),
        truncate: options.truncate,
        truncation_side: options.side,
        rtt: None,
    };
    let cancel = CancelToken::new();
    let mut guard = CancelOnDrop(Some(cancel.clone()));
    let result = api.router.infer(request, cancel).await;
    guard.disarm();
    let resp = result?;
    let usage = match resp.usage {
        Some(u) => u,
        // Served upstream untokenized: count the tokens here.
        None => {
            let texts: Vec<&str> = texts.iter().map(String::as_str).collect();
            let (ids, truncated) = text_of(entry)?.tokenize_with(
                &texts,
                &PrepareOptions {
                    truncate: options.truncate.unwrap_or(entry.config.auto_truncate),
                    side: options.side,
                },
            )?;
            TextUsage {
                tokens: ids.iter().map(|i| i.len() as u64).sum(),
                truncated,
            }
        }
    };
    let output = resp
        .outputs
        .into_iter()
        .find(|o| o.name == quiver_kernels::text::OUTPUT)
        .ok_or_else(|| GatewayError::Model {
            model: entry.name.clone(),
            message: "the answer has no embedding output".into(),
        })?;
    let (TensorData::F32(values), [n, dim]) = (output.data, output.shape.as_slice()) else {
        return Err(GatewayError::Model {
            model: entry.name.clone(),
            message: "the embedding output is not FP32 [rows, dim]".into(),
        });
    };
    if *n != rows || *dim == 0 || values.len() != n * dim {
        return Err(GatewayError::Model {
            model: entry.name.clone(),
            message: format!("{rows} texts gave an embedding output of shape [{n}, {dim}]"),
        });
    }
    let vectors = values.chunks_exact(*dim).map(<[f32]>::to_vec).collect();
    Ok((vectors, usage, resp.version))
}

/// `timeout_us`: at least 0 (0 is the model's default), as KServe's `timeout`.
fn check_timeout(timeout_us: Option<i64>) -> Result<Option<i64>, RouteError> {
    match timeout_us {
        Some(us) if us < 0 => Err(invalid(
            "timeout_us",
            format!("timeout_us must be >= 0 microseconds, got {us}"),
        )),
        other => Ok(other),
    }
}

/// `dimensions` checked against the model's width: 1 ..= width.
fn check_dimensions(dimensions: Option<u32>, width: usize) -> Result<Option<usize>, RouteError> {
    match dimensions {
        None => Ok(None),
        Some(0) => Err(invalid("dimensions", "dimensions must be at least 1")),
        Some(d) if d as usize > width => Err(invalid(
            "dimensions",
            format!("dimensions {d} > the model's embedding width {width}"),
        )),
        Some(d) => Ok(Some(d as usize)),
    }
}

/// Cuts `v` to `dimensions` and L2-normalises what is left (Matryoshka
/// truncation); with no cut, normalises only when `normalize` is asked and
/// the model has not already.
pub fn shape_embedding(v: &mut Vec<f32>, dimensions: Option<usize>, normalize: bool) {
    if let Some(d) = dimensions {
        v.truncate(d);
    } else if !normalize {
        return;
    }
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
    v.iter_mut().for_each(|x| *x /= norm);
}

/// Little-endian f32 bytes in base64, as the OpenAI SDK decodes them.
pub fn base64_f32(v: &[f32]) -> String {
    let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// Runs an embedding route with its metrics: one `received`, one outcome.
async fn counted<F>(api: &Api, dialect: Dialect, work: F) -> Response
where
    F: std::future::Future<Output = Result<(Response, String, u64), (RouteError, String)>>,
{
    let mut record = api.metrics.start_request(api.protocol);
    match work.await {
        Ok((response, model, version)) => {
            record.set_model(model);
            record.set_version(version);
            record.finish("ok");
            response
        }
        Err((e, model)) => {
            tracing::debug!(model, error = %e.err, "embedding request failed");
            record.set_model(model);
            record.finish(e.err.outcome());
            error_response_in(dialect, &e.err, e.param)
        }
    }
}

fn truncated_header(mut resp: Response, truncated: u32) -> Response {
    resp.headers_mut()
        .insert(TRUNCATED_HEADER, HeaderValue::from(truncated));
    resp
}

// ---------------------------------------------------------------------------
// OpenAI.

/// OpenAI's create embeddings.
#[utoipa::path(
    post,
    path = "/v1/embeddings",
    tag = "OpenAI",
    operation_id = "openai_create_embeddings",
    request_body = EmbeddingsRequest,
    responses(
        (status = 200, description = "One embedding per input", body = EmbeddingsResponse,
            headers(("x-quiver-truncated" = u32, description = "Inputs cut to the model's token limit"))),
    ),
)]
pub(crate) async fn openai_embeddings(State(api): State<Api>, request: Request) -> Response {
    let work = async {
        let admitted = admit(&api, request)
            .await
            .map_err(|e| (e.into(), String::new()))?;
        let req: EmbeddingsRequest = admitted.json().map_err(|e| (e, String::new()))?;
        let entry = text_model(&api, Some(&req.model)).map_err(|e| (e, String::new()))?;
        let label = entry.name.clone();
        let fail = |e: RouteError| (e, label.clone());
        admitted
            .check_rate(&api, &entry.name)
            .map_err(|e| fail(e.into()))?;
        let texts = texts_of(&req.input, "input").map_err(fail)?;
        let text = text_of(&entry).map_err(|e| fail(e.into()))?;
        let dimensions = check_dimensions(req.dimensions, text.dim()).map_err(fail)?;
        let options = EmbedOptions {
            priority: req.priority.unwrap_or(0),
            timeout_us: check_timeout(req.timeout_us).map_err(fail)?,
            ..EmbedOptions::default()
        };
        let (vectors, usage, version) = embed_texts(&api, &entry, texts, options)
            .await
            .map_err(|e| fail(e.into()))?;
        let normalize = !text.normalizes();
        let data = vectors
            .into_iter()
            .enumerate()
            .map(|(index, mut v)| {
                shape_embedding(&mut v, dimensions, normalize);
                EmbeddingData {
                    object: "embedding",
                    index,
                    embedding: match req.encoding_format {
                        EncodingFormat::Float => EmbeddingVector::Float(v),
                        EncodingFormat::Base64 => EmbeddingVector::Base64(base64_f32(&v)),
                    },
                }
            })
            .collect();
        let body = EmbeddingsResponse {
            object: "list",
            data,
            model: entry.name.clone(),
            usage: EmbeddingsUsage {
                prompt_tokens: usage.tokens,
                total_tokens: usage.tokens,
            },
        };
        Ok((
            truncated_header(json_ok(&body), usage.truncated),
            label,
            version,
        ))
    };
    counted(&api, Dialect::OpenAi, work).await
}

/// The process's start, in Unix seconds (`created` of `/v1/models`).
#[derive(Clone, Copy, Debug)]
pub struct Started(pub u64);

impl Started {
    /// Now.
    pub fn now() -> Started {
        Started(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        )
    }
}

fn model_card(name: &str, started: Started) -> ModelCard {
    ModelCard {
        id: name.to_owned(),
        object: "model",
        created: started.0,
        owned_by: "quiver",
    }
}

/// OpenAI's list models: every model served.
#[utoipa::path(
    get,
    path = "/v1/models",
    tag = "OpenAI",
    operation_id = "openai_list_models",
    responses((status = 200, description = "The models served", body = ModelList)),
)]
pub(crate) async fn openai_models(
    State(api): State<Api>,
    axum::Extension(started): axum::Extension<Started>,
    headers: axum::http::HeaderMap,
) -> Response {
    if let Err(e) = api.authorize(&headers, false) {
        return error_response_in(Dialect::OpenAi, &e, None);
    }
    let data = api
        .router
        .registry()
        .snapshot()
        .newest()
        .map(|e| model_card(&e.name, started))
        .collect();
    json_ok(&ModelList {
        object: "list",
        data,
    })
}

/// OpenAI's retrieve model.
#[utoipa::path(
    get,
    path = "/v1/models/{model}",
    tag = "OpenAI",
    operation_id = "openai_retrieve_model",
    params(("model" = String, Path, description = "The model's name")),
    responses((status = 200, description = "The model", body = ModelCard)),
)]
pub(crate) async fn openai_model(
    State(api): State<Api>,
    axum::Extension(started): axum::Extension<Started>,
    Path(model): Path<String>,
    headers: axum::http::HeaderMap,
) -> Response {
    let found = api
        .authorize(&headers, false)
        .and_then(|()| super::catalog::find(&api.router, &model, ""));
    match found {
        Ok(entry) => json_ok(&model_card(&entry.name, started)),
        Err(e) => error_response_in(Dialect::OpenAi, &e, Some("model")),
    }
}

// ---------------------------------------------------------------------------
// text-embeddings-inference.

/// TEI's embed: one embedding per input, as arrays of numbers.
#[utoipa::path(
    post,
    path = "/embed",
    tag = "text-embeddings-inference",
    operation_id = "tei_embed",
    request_body = EmbedRequest,
    responses(
        (status = 200, description = "One embedding per input", body = Vec<Vec<f32>>,
            headers(("x-quiver-truncated" = u32, description = "Inputs cut to the model's token limit"))),
    ),
)]
pub(crate) async fn tei_embed(State(api): State<Api>, request: Request) -> Response {
    let work = async {
        let admitted = admit(&api, request)
            .await
            .map_err(|e| (e.into(), String::new()))?;
        let req: EmbedRequest = admitted.json().map_err(|e| (e, String::new()))?;
        let entry = text_model(&api, req.model.as_deref()).map_err(|e| (e, String::new()))?;
        let label = entry.name.clone();
        let fail = |e: RouteError| (e, label.clone());
        admitted
            .check_rate(&api, &entry.name)
            .map_err(|e| fail(e.into()))?;
        let texts = texts_of(&req.inputs, "inputs").map_err(fail)?;
        let text = text_of(&entry).map_err(|e| fail(e.into()))?;
        let dimensions = check_dimensions(req.dimensions, text.dim()).map_err(fail)?;
        let normalize = req.normalize.unwrap_or(true);
        if !normalize && text.normalizes() {
            return Err(fail(invalid(
                "normalize",
                format!(
                    "model '{}' normalises its embeddings in its own pipeline (a Normalize \
                     module): normalize=false is not available",
                    entry.name
                ),
            )));
        }
        let options = EmbedOptions {
            truncate: req.truncate,
            side: req.truncation_direction.into(),
            priority: req.priority.unwrap_or(0),
            timeout_us: check_timeout(req.timeout_us).map_err(fail)?,
        };
        let (mut vectors, usage, version) = embed_texts(&api, &entry, texts, options)
            .await
            .map_err(|e| fail(e.into()))?;
        let renormalize = normalize && !text.normalizes();
        for v in &mut vectors {
            shape_embedding(v, dimensions, renormalize);
        }
        Ok((
            truncated_header(json_ok(&vectors), usage.truncated),
            label,
            version,
        ))
    };
    counted(&api, Dialect::Tei, work).await
}

/// TEI's tokenize: each input's tokens, whole (never truncated).
#[utoipa::path(
    post,
    path = "/tokenize",
    tag = "text-embeddings-inference",
    operation_id = "tei_tokenize",
    request_body = TokenizeRequest,
    responses((status = 200, description = "Each input's tokens", body = Vec<Vec<SimpleToken>>)),
)]
pub(crate) async fn tei_tokenize(State(api): State<Api>, request: Request) -> Response {
    let work = async {
        let admitted = admit(&api, request)
            .await
            .map_err(|e| (e.into(), String::new()))?;
        let req: TokenizeRequest = admitted.json().map_err(|e| (e, String::new()))?;
        let entry = text_model(&api, req.model.as_deref()).map_err(|e| (e, String::new()))?;
        let label = entry.name.clone();
        let fail = |e: RouteError| (e, label.clone());
        admitted
            .check_rate(&api, &entry.name)
            .map_err(|e| fail(e.into()))?;
        let texts = texts_of(&req.inputs, "inputs").map_err(fail)?;
        let special = req.add_special_tokens.unwrap_or(true);
        // Off the runtime's threads: a body of many megabytes of text takes a while.
        let model = Arc::clone(&entry);
        let tokens = tokio::task::spawn_blocking(move || {
            let text = text_of(&model)?;
            texts
                .iter()
                .map(|t| {
                    Ok(text
                        .tokens_of(t, special)?
                        .into_iter()
                        .map(|k| SimpleToken {
                            id: k.id,
                            text: k.text,
                            special: k.special,
                            start: k.offsets.map(|o| o.0),
                            stop: k.offsets.map(|o| o.1),
                        })
                        .collect::<Vec<_>>())
                })
                .collect::<Result<Vec<_>, GatewayError>>()
        })
        .await
        .map_err(|e| {
            fail(
                GatewayError::Model {
                    model: entry.name.clone(),
                    message: format!("the tokenizer task failed: {e}"),
                }
                .into(),
            )
        })?
        .map_err(|e| fail(e.into()))?;
        Ok((json_ok(&tokens), label, entry.version))
    };
    counted(&api, Dialect::Tei, work).await
}

/// TEI's info: the text-embedding model and its limits.
#[utoipa::path(
    get,
    path = "/info",
    tag = "text-embeddings-inference",
    operation_id = "tei_info",
    params(InfoQuery),
    responses((status = 200, description = "The model and its limits", body = Info)),
)]
pub(crate) async fn tei_info(
    State(api): State<Api>,
    query: Result<Query<InfoQuery>, axum::extract::rejection::QueryRejection>,
    headers: axum::http::HeaderMap,
) -> Response {
    let found = api
        .authorize(&headers, false)
        .map_err(RouteError::from)
        .and_then(|()| query.map_err(|e| invalid("model", format!("bad query string: {e}"))))
        .and_then(|Query(q)| text_model(&api, q.model.as_deref()))
        .and_then(|entry| {
            let text = text_of(&entry)?;
            Ok(Info {
                model_id: entry.name.clone(),
                model_dtype: "float32",
                model_type: ModelType {
                    embedding: EmbeddingModel {
                        pooling: match text.pooling() {
                            quiver_kernels::Pooling::Cls => "cls",
                            _ => "mean",
                        },
                    },
                },
                max_concurrent_requests: entry.config.queue_capacity,
                max_input_length: text.max_seq_length(),
                max_batch_tokens: entry.config.max_batch_tokens,
                max_client_batch_size: entry.config.max_batch_size,
                auto_truncate: entry.config.auto_truncate,
                tokenization_workers: tokio::runtime::Handle::current().metrics().num_workers(),
                version: env!("CARGO_PKG_VERSION"),
                dimensions: text.dim(),
            })
        });
    match found {
        Ok(info) => json_ok(&info),
        Err(e) => error_response_in(Dialect::Tei, &e.err, e.param),
    }
}

/// TEI's health: 200 while the gateway takes requests and every
/// text-embedding model's device is healthy.
#[utoipa::path(
    get,
    path = "/health",
    tag = "text-embeddings-inference",
    operation_id = "tei_health",
    responses((status = 200, description = "Serving")),
)]
pub(crate) async fn tei_health(State(api): State<Api>, headers: axum::http::HeaderMap) -> Response {
    if let Err(e) = api.authorize(&headers, true) {
        return error_response_in(Dialect::Tei, &e, None);
    }
    if !api.ready.load(Ordering::Acquire) {
        return error_response_in(Dialect::Tei, &GatewayError::ShuttingDown, None);
    }
    let snapshot = api.router.registry().snapshot();
    if let Some(sick) = snapshot
        .newest()
        .find(|e| e.model.as_text_embedding().is_some() && !e.healthy())
    {
        return error_response_in(
            Dialect::Tei,
            &GatewayError::DeviceUnhealthy {
                model: sick.name.clone(),
            },
            None,
        );
    }
    StatusCode::OK.into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dimensions_cut_and_normalise_again() {
        let mut v = vec![3.0, 4.0, 12.0];
        shape_embedding(&mut v, Some(2), false);
        assert_eq!(v, vec![0.6, 0.8]);
        let mut v = vec![3.0, 4.0];
        shape_embedding(&mut v, None, false);
        assert_eq!(v, vec![3.0, 4.0], "nothing asked, nothing changed");
        shape_embedding(&mut v, None, true);
        assert_eq!(v, vec![0.6, 0.8]);
        assert!(matches!(check_dimensions(Some(0), 384), Err(e) if e.param == Some("dimensions")));
        let too_wide = check_dimensions(Some(385), 384).expect_err("wider than the model");
        assert_eq!(
            too_wide.err.to_string(),
            "invalid request: dimensions 385 > the model's embedding width 384"
        );
        assert_eq!(check_dimensions(Some(384), 384).ok(), Some(Some(384)));
        assert!(check_timeout(Some(-1)).is_err());
        assert_eq!(check_timeout(Some(0)).ok(), Some(Some(0)));
    }

    #[test]
    fn base64_is_little_endian_f32() {
        // 1.0f32 = 0x3f800000, little-endian 00 00 80 3f.
        assert_eq!(base64_f32(&[1.0]), "AACAPw==");
        assert_eq!(base64_f32(&[1.0, -2.0]), "AACAPwAAAMA=");
    }

    #[test]
    fn inputs_are_text_and_token_ids_are_refused_clearly() {
        let one = texts_of(&serde_json::json!("a b"), "input").expect("a string");
        assert_eq!(one, vec!["a b"]);
        let many = texts_of(&serde_json::json!(["a", "b"]), "input").expect("strings");
        assert_eq!(many.len(), 2);
        for bad in [serde_json::json!([1, 2]), serde_json::json!([[1, 2]])] {
            let e = texts_of(&bad, "input").expect_err("token ids");
            assert!(e.err.to_string().contains("token ids"), "{}", e.err);
            assert_eq!(e.param, Some("input"));
        }
        assert!(texts_of(&serde_json::json!([]), "input").is_err());
        assert!(texts_of(&serde_json::json!({"a": 1}), "input").is_err());
        assert!(texts_of(&serde_json::json!(["a", null]), "input").is_err());
    }

    #[test]
    fn each_dialect_has_its_error_shape() {
        let e = GatewayError::UnknownModel("m".into());
        let (status, _) = http_status(&e);
        let openai = error_body(
            Dialect::OpenAi,
            status,
            e.to_string(),
            ErrorDetail {
                param: Some("model"),
                code: Some("model_not_found"),
                unhealthy: false,
            },
        );
        assert_eq!(openai["error"]["type"], "invalid_request_error");
        assert_eq!(openai["error"]["param"], "model");
        assert_eq!(openai["error"]["code"], "model_not_found");
        let tei = error_body(
            Dialect::Tei,
            StatusCode::TOO_MANY_REQUESTS,
            "busy".into(),
            ErrorDetail::default(),
        );
        assert_eq!(
            tei,
            serde_json::json!({"error": "busy", "error_type": "overloaded"})
        );
        // A deadline no device can meet is load, not ill health (schemathesis
        // found it labelled `unhealthy`).
        let late = GatewayError::DeadlineUnreachable {
            timeout: std::time::Duration::from_micros(628),
            predicted: std::time::Duration::from_millis(17),
        };
        let tei_type = |e: &GatewayError| {
            let (status, _) = http_status(e);
            error_body(Dialect::Tei, status, e.to_string(), detail_of(e, None))["error_type"]
                .clone()
        };
        assert_eq!(tei_type(&late), "overloaded");
        assert_eq!(tei_type(&GatewayError::ShuttingDown), "unhealthy");
        assert_eq!(
            tei_type(&GatewayError::InvalidArgument("x".into())),
            "validation"
        );
        assert_eq!(Dialect::of_path("/v1/nope"), Dialect::OpenAi);
        assert_eq!(Dialect::of_path("/embed"), Dialect::Tei);
        assert_eq!(Dialect::of_path("/v2/models/x"), Dialect::Kserve);
    }
}
