//! The REST surface's OpenAPI 3.1 document, served at `/openapi.json`, and
//! the docs page at `/docs` that renders it.
//!
//! The document is derived with `utoipa` from the handlers' annotations and
//! their body types (the OpenAI and TEI types of [`super::embed`], the KServe
//! v2 types below), then completed in code rather than by hand:
//!
//! - each `/v2/models/{model}/...` route gets its
//!   `/v2/models/{model}/versions/{version}/...` twin (one handler serves
//!   both);
//! - every operation lists the error statuses of [`ErrorKind::ALL`] (the one
//!   map from errors to HTTP status) with its API's error body;
//! - the bearer token is declared (optional: tokens may be off).
//!
//! The docs page is Redoc's standalone bundle (npm `redoc`, MIT), vendored in
//! `gateway/assets/redoc/` and embedded in the binary: nothing is fetched at
//! run time.

use std::collections::BTreeMap;
use std::sync::OnceLock;

use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::openapi::path::{Operation, ParameterBuilder, ParameterIn};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme};
use utoipa::openapi::{ContentBuilder, OpenApi as Document, Ref, RefOr, Required, ResponseBuilder};
use utoipa::{Modify, OpenApi, ToSchema};

use super::embed::{self, Dialect};
use crate::error::ErrorKind;

// ---------------------------------------------------------------------------
// KServe v2 bodies (the JSON the handlers in `super::http` write).

/// A KServe / Triton error.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    /// What went wrong, in words.
    pub error: String,
}

/// `GET /v2/health/live`.
#[derive(Debug, Serialize, ToSchema)]
pub struct LiveBody {
    /// Always true while the process answers.
    pub live: bool,
}

/// `GET /v2/health/ready`.
#[derive(Debug, Serialize, ToSchema)]
pub struct ReadyBody {
    /// True while the gateway takes requests.
    pub ready: bool,
}

/// `GET /v2/models/{model}/ready` (503 with `ready: false` while the
/// model's device is unhealthy).
#[derive(Debug, Serialize, ToSchema)]
pub struct ModelReadyBody {
    /// The model.
    pub name: String,
    /// Whether it serves now.
    pub ready: bool,
}

/// The 503 of `GET /v2/models/{model}/ready`: the model's own answer while
/// its device is unhealthy, an error while the gateway shuts down.
#[derive(Debug, Serialize, ToSchema)]
#[serde(untagged)]
pub enum NotReady {
    /// `ready: false`.
    Model(ModelReadyBody),
    /// The gateway is shutting down.
    Error(ErrorBody),
}

/// `GET /v2`.
#[derive(Debug, Serialize, ToSchema)]
pub struct ServerMetadata {
    /// `quiver`.
    pub name: String,
    /// The gateway's version.
    pub version: String,
    /// The KServe / Triton extensions served.
    pub extensions: Vec<String>,
}

/// One tensor of a model's metadata.
#[derive(Debug, Serialize, ToSchema)]
pub struct TensorMetadata {
    /// Its name.
    pub name: String,
    /// Its KServe datatype (`FP32`, `BYTES`, ...).
    pub datatype: String,
    /// Its shape; -1 is any size.
    pub shape: Vec<i64>,
}

/// `GET /v2/models/{model}`.
#[derive(Debug, Serialize, ToSchema)]
pub struct ModelMetadata {
    /// The model.
    pub name: String,
    /// The versions serving.
    pub versions: Vec<String>,
    /// The model family.
    pub platform: String,
    /// Its inputs.
    pub inputs: Vec<TensorMetadata>,
    /// Its outputs.
    pub outputs: Vec<TensorMetadata>,
}

/// `GET /v2/models/{model}/config`: Triton's model configuration, protobuf
/// field names.
#[derive(Debug, Serialize, ToSchema)]
pub struct ModelConfig {
    /// The model.
    pub name: String,
    /// The model family.
    pub platform: String,
    /// Most rows of one batch.
    pub max_batch_size: i64,
    /// Its inputs (`name`, `data_type`, `dims`, ...).
    pub input: Vec<BTreeMap<String, Value>>,
    /// Its outputs.
    pub output: Vec<BTreeMap<String, Value>>,
}

/// `GET /v2/models/{model}/stats`: Triton's statistics extension.
#[derive(Debug, Serialize, ToSchema)]
pub struct ModelStatistics {
    /// One entry per version asked for.
    pub model_stats: Vec<BTreeMap<String, Value>>,
}

/// A request or response parameter.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum ParameterValue {
    /// A boolean (`truncate`, `binary_data`).
    Bool(bool),
    /// An integer (`priority`, `timeout` in µs, `binary_data_size`).
    Int(i64),
    /// A number.
    Double(f64),
    /// A string (`truncation_direction`).
    String(String),
}

/// The KServe datatypes.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[allow(clippy::upper_case_acronyms)]
pub enum Datatype {
    BOOL,
    UINT8,
    UINT16,
    UINT32,
    UINT64,
    INT8,
    INT16,
    INT32,
    INT64,
    FP32,
    FP64,
    BYTES,
}

/// One input tensor: JSON `data` (flat or nested, row-major), or with
/// Triton's binary extension `parameters.binary_data_size` bytes after the
/// JSON header.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct InferInput {
    /// The input's name.
    pub name: String,
    /// Its datatype.
    pub datatype: Datatype,
    /// Its shape.
    pub shape: Vec<u64>,
    /// `binary_data_size` for a binary tensor.
    pub parameters: Option<BTreeMap<String, ParameterValue>>,
    /// The elements (absent for a binary tensor).
    pub data: Option<Value>,
}

/// An output asked for.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct RequestedOutput {
    /// The output's name.
    pub name: String,
    /// `binary_data: true` for a binary tensor.
    pub parameters: Option<BTreeMap<String, ParameterValue>>,
}

/// `POST /v2/models/{model}/infer`. The schedule policy (`priority`,
/// `timeout` µs), `truncate` and `truncation_direction` (text models) and
/// `binary_data_output` travel as `parameters`.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct InferRequestBody {
    /// Echoed in the answer.
    pub id: Option<String>,
    /// Request parameters.
    pub parameters: Option<BTreeMap<String, ParameterValue>>,
    /// The inputs.
    pub inputs: Vec<InferInput>,
    /// The outputs wanted (all when absent).
    pub outputs: Option<Vec<RequestedOutput>>,
}

/// One output tensor of an answer.
#[derive(Debug, Serialize, ToSchema)]
pub struct InferOutput {
    /// The output's name.
    pub name: String,
    /// Its datatype.
    pub datatype: String,
    /// Its shape.
    pub shape: Vec<u64>,
    /// `binary_data_size` for a binary tensor.
    pub parameters: Option<BTreeMap<String, ParameterValue>>,
    /// The elements, flat (absent for a binary tensor).
    pub data: Option<Vec<Value>>,
}

/// The answer of an inference request; `parameters` say how it was served
/// (`quiver_batch_size`, `quiver_path`, `quiver_truncated`, ...).
#[derive(Debug, Serialize, ToSchema)]
pub struct InferResponseBody {
    /// The model.
    pub model_name: String,
    /// The version that answered.
    pub model_version: String,
    /// The request's id.
    pub id: String,
    /// How it was served.
    pub parameters: BTreeMap<String, ParameterValue>,
    /// The outputs.
    pub outputs: Vec<InferOutput>,
}

/// `POST /v2/repository/index`.
#[derive(Debug, Deserialize, ToSchema)]
pub struct RepositoryIndexRequest {
    /// List only the versions serving.
    pub ready: Option<bool>,
}

/// One entry of the repository index.
#[derive(Debug, Serialize, ToSchema)]
pub struct RepositoryIndexEntry {
    /// The model.
    pub name: String,
    /// The version (absent for a model with none loaded).
    pub version: Option<String>,
    /// `READY`, `UNLOADING` or `UNAVAILABLE`.
    pub state: String,
    /// Why it is not ready.
    pub reason: Option<String>,
}

/// `POST /v2/repository/models/{model}/load`: `parameters.config` (a JSON
/// string or object) overrides the model's `model.toml` keys.
#[derive(Debug, Deserialize, ToSchema)]
pub struct RepositoryLoadRequest {
    /// `config`; `file:` parameters are refused.
    pub parameters: Option<BTreeMap<String, Value>>,
}

/// `POST /v2/repository/models/{model}/unload`.
#[derive(Debug, Deserialize, ToSchema)]
pub struct RepositoryUnloadRequest {
    /// Triton's unload parameters (`unload_dependents`); none is read.
    pub parameters: Option<BTreeMap<String, Value>>,
}

/// A version loaded.
#[derive(Debug, Serialize, ToSchema)]
pub struct LoadedVersion {
    /// The version.
    pub version: String,
    /// Its load time, ms.
    pub load_ms: u64,
}

/// The answer of a load.
#[derive(Debug, Serialize, ToSchema)]
pub struct LoadReport {
    /// Versions loaded.
    pub loaded: Vec<LoadedVersion>,
    /// Versions kept as they were.
    pub kept: Vec<String>,
    /// Versions draining (no longer in the policy).
    pub draining: Vec<String>,
}

/// The answer of an unload.
#[derive(Debug, Serialize, ToSchema)]
pub struct UnloadReport {
    /// The versions draining.
    pub draining: Vec<String>,
}

/// The answer of a configuration reload.
#[derive(Debug, Serialize, ToSchema)]
pub struct ReloadReport {
    /// Keys that took effect.
    pub applied: Vec<String>,
    /// Keys that changed but need a restart.
    pub needs_restart: Vec<String>,
    /// Models that failed to load (what served still serves).
    pub failed: Vec<String>,
}

// ---------------------------------------------------------------------------
// The document.

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Quiver",
        description = "Quiver's REST surface (HTTP/1.1, HTTP/2 and HTTP/3): the KServe v2 \
            Open Inference Protocol with Triton's extensions, OpenAI-compatible embeddings, \
            and text-embeddings-inference's routes. Every inference route goes through the \
            same admission, batching, deadlines and overflow.",
        license(name = "Apache-2.0", identifier = "Apache-2.0"),
    ),
    paths(
        super::http::live,
        super::http::ready,
        super::http::server_metadata,
        super::http::model_metadata,
        super::http::model_ready,
        super::http::model_config,
        super::http::model_stats,
        super::http::infer,
        super::http::repository_index,
        super::http::repository_load,
        super::http::repository_unload,
        super::http::repository_reload,
        embed::openai_embeddings,
        embed::openai_models,
        embed::openai_model,
        embed::tei_embed,
        embed::tei_tokenize,
        embed::tei_info,
        embed::tei_health,
        openapi_json,
        docs,
    ),
    components(schemas(ErrorBody, embed::OpenAiErrorBody, embed::TeiErrorBody)),
    modifiers(&Completion),
    tags(
        (name = "KServe v2", description = "The Open Inference Protocol (REST), with Triton's \
            binary tensor, model configuration, statistics, schedule policy and repository \
            extensions."),
        (name = "OpenAI", description = "OpenAI-compatible embeddings (the `openai` SDK with \
            `base_url=http://HOST:8000/v1`)."),
        (name = "text-embeddings-inference", description = "Hugging Face \
            text-embeddings-inference's routes."),
        (name = "Documentation", description = "This document and its page."),
    ),
)]
struct ApiDoc;

/// The completion of the derived document (see the module's docs).
struct Completion;

impl Modify for Completion {
    fn modify(&self, doc: &mut Document) {
        add_versioned_twins(doc);
        for (path, item) in doc.paths.paths.iter_mut() {
            let dialect = Dialect::of_path(path);
            for op in operations(item) {
                add_error_responses(op, dialect);
            }
        }
        let components = doc.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
        // A bearer token, or none where tokens are off (and on health routes
        // under `auth_exempt_health`).
        doc.security = Some(vec![
            SecurityRequirement::new("bearer", Vec::<String>::new()),
            SecurityRequirement::default(),
        ]);
    }
}

fn operations(item: &mut utoipa::openapi::PathItem) -> impl Iterator<Item = &mut Operation> {
    [
        item.get.as_mut(),
        item.post.as_mut(),
        item.put.as_mut(),
        item.delete.as_mut(),
    ]
    .into_iter()
    .flatten()
}

/// `/v2/models/{model}[/rest]` → `/v2/models/{model}/versions/{version}[/rest]`.
fn add_versioned_twins(doc: &mut Document) {
    const PREFIX: &str = "/v2/models/{model}";
    let twins: Vec<(String, utoipa::openapi::PathItem)> = doc
        .paths
        .paths
        .iter()
        .filter_map(|(path, item)| {
            let rest = path.strip_prefix(PREFIX)?;
            let mut twin = item.clone();
            for op in operations(&mut twin) {
                if let Some(id) = &mut op.operation_id {
                    id.push_str("_version");
                }
                op.parameters.get_or_insert_with(Vec::new).push(RefOr::T(
                    ParameterBuilder::new()
                        .name("version")
                        .parameter_in(ParameterIn::Path)
                        .required(Required::True)
                        .description(Some("The model version (a positive integer)"))
                        .schema(Some(
                            utoipa::openapi::ObjectBuilder::new()
                                .schema_type(utoipa::openapi::schema::Type::String),
                        ))
                        .build(),
                ));
            }
            Some((format!("{PREFIX}/versions/{{version}}{rest}"), twin))
        })
        .collect();
    for (path, item) in twins {
        doc.paths.paths.insert(path, item);
    }
}

/// Every error status of [`ErrorKind::ALL`] an operation does not describe
/// itself, with its API's error body.
fn add_error_responses(op: &mut Operation, dialect: Dialect) {
    let schema = match dialect {
        Dialect::Kserve => "ErrorBody",
        Dialect::OpenAi => "OpenAiErrorBody",
        Dialect::Tei => "TeiErrorBody",
    };
    for kind in ErrorKind::ALL {
        // Nobody reads a cancelled request's answer.
        if kind == ErrorKind::Cancelled {
            continue;
        }
        let status = kind.http();
        let code = status.code.to_string();
        if op.responses.responses.contains_key(&code) {
            continue;
        }
        let reason = StatusCode::from_u16(status.code)
            .ok()
            .and_then(|s| s.canonical_reason())
            .unwrap_or("Error");
        let mut response = ResponseBuilder::new().description(reason).content(
            "application/json",
            ContentBuilder::new()
                .schema(Some(Ref::from_schema_name(schema)))
                .build(),
        );
        if status.retry_after.is_some() {
            response = response.header(
                "Retry-After",
                utoipa::openapi::header::HeaderBuilder::new()
                    .schema(Some(
                        utoipa::openapi::ObjectBuilder::new()
                            .schema_type(utoipa::openapi::schema::Type::Integer),
                    ))
                    .description(Some("Seconds before a retry may succeed"))
                    .build(),
            );
        }
        op.responses
            .responses
            .insert(code, RefOr::T(response.build()));
    }
}

/// The document, made once.
pub fn document() -> &'static str {
    static DOC: OnceLock<String> = OnceLock::new();
    DOC.get_or_init(|| {
        let mut doc = ApiDoc::openapi();
        doc.info.version = env!("CARGO_PKG_VERSION").to_owned();
        doc.to_json().unwrap_or_else(|e| {
            tracing::error!(error = %e, "the OpenAPI document does not serialise");
            "{}".to_owned()
        })
    })
}

/// This OpenAPI document.
#[utoipa::path(
    get,
    path = "/openapi.json",
    tag = "Documentation",
    operation_id = "openapi_document",
    responses((status = 200, description = "The OpenAPI 3.1 document", body = Object)),
)]
pub(crate) async fn openapi_json(
    axum::extract::State(api): axum::extract::State<super::http::Api>,
    headers: axum::http::HeaderMap,
) -> Response {
    if let Err(e) = docs_authorized(&api, &headers) {
        return embed::error_response_in(Dialect::Kserve, &e, None);
    }
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json")],
        document(),
    )
        .into_response()
}

const REDOC_JS: &[u8] = include_bytes!("../../assets/redoc/redoc.standalone.js");

const DOCS_HTML: &str = r#"<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Quiver API</title>
<style>body { margin: 0; padding: 0; }</style>
</head>
<body>
<redoc spec-url="openapi.json" hide-download-button="false"></redoc>
<script src="docs/redoc.standalone.js"></script>
</body>
</html>
"#;

/// This document, rendered (Redoc, embedded in the binary).
#[utoipa::path(
    get,
    path = "/docs",
    tag = "Documentation",
    operation_id = "docs_page",
    responses((status = 200, description = "The page", content_type = "text/html", body = String)),
)]
pub(crate) async fn docs(
    axum::extract::State(api): axum::extract::State<super::http::Api>,
    headers: axum::http::HeaderMap,
) -> Response {
    if let Err(e) = docs_authorized(&api, &headers) {
        return embed::error_response_in(Dialect::Kserve, &e, None);
    }
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        DOCS_HTML,
    )
        .into_response()
}

/// The page's script.
pub(crate) async fn docs_script(
    axum::extract::State(api): axum::extract::State<super::http::Api>,
    headers: axum::http::HeaderMap,
) -> Response {
    if let Err(e) = docs_authorized(&api, &headers) {
        return embed::error_response_in(Dialect::Kserve, &e, None);
    }
    (
        StatusCode::OK,
        [
            (header::CONTENT_TYPE, "text/javascript; charset=utf-8"),
            (header::CACHE_CONTROL, "public, max-age=86400"),
        ],
        REDOC_JS,
    )
        .into_response()
}

/// The document and its page describe no data: they need a token only where
/// health routes do (`server.auth_exempt_health` off), so a browser can open
/// them.
fn docs_authorized(
    api: &super::http::Api,
    headers: &axum::http::HeaderMap,
) -> Result<(), crate::error::GatewayError> {
    api.auth
        .check(
            headers.get(header::AUTHORIZATION).map(|v| v.as_bytes()),
            true,
        )
        .map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_document_is_openapi_3_1_with_every_route() {
        let doc: Value = serde_json::from_str(document()).expect("JSON");
        assert_eq!(doc["openapi"], "3.1.0");
        let paths = doc["paths"].as_object().expect("paths");
        for path in [
            "/v2/health/live",
            "/v2/models/{model}/infer",
            "/v2/models/{model}/versions/{version}/infer",
            "/v2/models/{model}/versions/{version}",
            "/v2/repository/index",
            "/v2/repository/models/{model}/load",
            "/v2/repository/models/{model}/unload",
            "/v2/repository/reload",
            "/v1/embeddings",
            "/v1/models",
            "/embed",
            "/tokenize",
            "/info",
            "/health",
            "/openapi.json",
            "/docs",
        ] {
            assert!(paths.contains_key(path), "{path} missing");
        }
        let twin = &paths["/v2/models/{model}/versions/{version}/infer"]["post"];
        assert_eq!(twin["operationId"], "kserve_infer_version");
        let names: Vec<&str> = twin["parameters"]
            .as_array()
            .expect("parameters")
            .iter()
            .filter_map(|p| p["name"].as_str())
            .collect();
        assert!(
            names.contains(&"model") && names.contains(&"version"),
            "{names:?}"
        );
        // Errors in each API's own shape, with the statuses of the one map.
        let openai = &paths["/v1/embeddings"]["post"]["responses"];
        assert_eq!(
            openai["404"]["content"]["application/json"]["schema"]["$ref"],
            "#/components/schemas/OpenAiErrorBody"
        );
        assert!(openai["429"]["headers"]["Retry-After"].is_object());
        let tei = &paths["/embed"]["post"]["responses"];
        assert_eq!(
            tei["413"]["content"]["application/json"]["schema"]["$ref"],
            "#/components/schemas/TeiErrorBody"
        );
        let kserve = &paths["/v2/models/{model}/infer"]["post"]["responses"];
        assert_eq!(
            kserve["400"]["content"]["application/json"]["schema"]["$ref"],
            "#/components/schemas/ErrorBody"
        );
    }
}
