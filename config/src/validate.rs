//! Raw structs to typed ones, collecting every error with its path.
//!
//! Two layers, so that [`Config::validate`] holds a configuration changed
//! after loading to the same rules as a file:
//!
//! - *conversion* (`from_raw`) turns what serde read into the typed values:
//!   addresses parsed, kinds spelled right, required fields present, and
//!   integers that do not fit their type reported with the knob's range (a
//!   default stands in, so that checking goes on);
//! - *checks* (`check_*`) run on the typed values: ranges and cross-field
//!   rules.
//!
//! The bounds live once, in the constants below, for both layers and for
//! the messages.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::raw::{RawConfig, RawDemo, RawModel, RawServer, RawSim, RawTls};
use crate::upstream;
use crate::{
    Config, ConfigError, FieldError, MlpDemo, Model, ModelControl, ModelKind, Server, SimDevice,
    Tls, VersionPolicy,
};

/// An inclusive range of a knob, in the unit of its TOML field.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Bound {
    min: u64,
    max: u64,
}

impl Bound {
    pub(crate) const fn new(min: u64, max: u64) -> Bound {
        Bound { min, max }
    }

    fn message(self, got: impl std::fmt::Display) -> String {
        format!("must be between {} and {}, got {got}", self.min, self.max)
    }
}

const MAX_FRAME_BYTES: Bound = Bound::new(1 << 10, 1 << 30);
const MAX_INFLIGHT_BYTES: Bound = Bound::new(1 << 20, 1 << 40);
const MAX_CONCURRENT_STREAMS: Bound = Bound::new(1, 65_535);
const MAX_CONNECTIONS: Bound = Bound::new(1, 1 << 20);
const QUIC_RETRY_ABOVE_PER_SEC: Bound = Bound::new(0, 1 << 20);
const IDLE_TIMEOUT_MS: Bound = Bound::new(1, 3_600_000);
const REQUEST_READ_TIMEOUT_MS: Bound = Bound::new(1, 3_600_000);
const HEADER_READ_TIMEOUT_MS: Bound = Bound::new(1, 3_600_000);
const MIN_BODY_BYTES_PER_SEC: Bound = Bound::new(0, 1 << 30);
const SHUTDOWN_GRACE_MS: Bound = Bound::new(0, 600_000);
const REPOSITORY_POLL_MS: Bound = Bound::new(100, 3_600_000);
const LATEST_VERSIONS: Bound = Bound::new(1, 64);
const VERSION: Bound = Bound::new(1, i64::MAX as u64);
const SIM_TIME: Bound = Bound::new(0, 10_000_000);
const SIM_JITTER_PCT: Bound = Bound::new(0, 100);
const SIM_SLOWDOWN_PCT: Bound = Bound::new(1, 100_000);
const MAX_DEVICES: usize = 16;

const MAX_BATCH_SIZE: Bound = Bound::new(1, 4096);
const MAX_BATCH_TOKENS: Bound = Bound::new(1, 1 << 24);
const MAX_QUEUE_DELAY_US: Bound = Bound::new(0, 10_000_000);
const QUEUE_CAPACITY: Bound = Bound::new(1, 1 << 20);
const PRIORITY_LEVELS: Bound = Bound::new(1, 16);
const DEFAULT_TIMEOUT_MS: Bound = Bound::new(1, 3_600_000);
const MAX_IN_FLIGHT: Bound = Bound::new(1, 8);
const INLINE_BELOW_US: Bound = Bound::new(0, 1000);
const IDLE_SPIN_US: Bound = Bound::new(0, 1000);
/// `max_length_ratio`: a grouped batch's longest over shortest length.
const MAX_LENGTH_RATIO: std::ops::RangeInclusive<f64> = 1.0..=16.0;
const UNHEALTHY_AFTER_FAILURES: Bound = Bound::new(1, 1000);
const RATE_LIMIT_PER_SEC: Bound = Bound::new(0, 1 << 20);
const RATE_LIMIT_BURST: Bound = Bound::new(1, 1 << 20);

const DEMO_WIDTH: Bound = Bound::new(1, 65_536);
const DEMO_MAX_HIDDEN_LAYERS: usize = 16;
const DEMO_MAX_PARAMETERS: u64 = 1 << 28;
const SEED: Bound = Bound::new(0, i64::MAX as u64);

const MODEL_NAME_MAX_LEN: usize = 128;
const AUTH_TOKEN_MAX_LEN: usize = 4096;

/// Errors found so far, in the order they were found.
#[derive(Debug, Default)]
pub(crate) struct Errors(Vec<FieldError>);

impl Errors {
    pub(crate) fn push(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.0.push(FieldError::new(path, message));
    }

    pub(crate) fn into_result<T>(self, value: T) -> Result<T, ConfigError> {
        if self.0.is_empty() {
            Ok(value)
        } else {
            Err(ConfigError { errors: self.0 })
        }
    }

    /// An integer of the file as `T`, or `None` (reported with `bound`)
    /// where it is out of `bound`.
    pub(crate) fn int<T: TryFrom<i64>>(
        &mut self,
        path: &str,
        raw: Option<i64>,
        bound: Bound,
    ) -> Option<T> {
        let raw = raw?;
        let converted = u64::try_from(raw)
            .ok()
            .filter(|value| (bound.min..=bound.max).contains(value))
            .and_then(|_| T::try_from(raw).ok());
        if converted.is_none() {
            self.push(path, bound.message(raw));
        }
        converted
    }

    pub(crate) fn bounded(&mut self, path: &str, value: u64, bound: Bound) {
        if !(bound.min..=bound.max).contains(&value) {
            self.push(path, bound.message(value));
        }
    }

    pub(crate) fn bounded_millis(&mut self, path: &str, value: Duration, bound: Bound) {
        let millis = u64::try_from(value.as_millis()).unwrap_or(u64::MAX);
        self.bounded(path, millis, bound);
    }

    pub(crate) fn bounded_micros(&mut self, path: &str, value: Duration, bound: Bound) {
        let micros = u64::try_from(value.as_micros()).unwrap_or(u64::MAX);
        self.bounded(path, micros, bound);
    }
}

// ---------------------------------------------------------------------------
// Conversion: raw to typed.

pub(crate) fn from_raw(raw: RawConfig) -> Result<Config, ConfigError> {
    let mut errors = Errors::default();

    let server = convert_server(raw.server.unwrap_or_default(), &mut errors);
    check_server(&server, &mut errors);

    let tls = convert_tls(raw.tls.unwrap_or_default());
    check_tls(&tls, &mut errors);
    check_token_identities(&server, &tls, &mut errors);

    let raw_models = raw.models.unwrap_or_default();
    let mut models = Vec::with_capacity(raw_models.len());
    for (index, raw_model) in raw_models.into_iter().enumerate() {
        let prefix = format!("models[{index}]");
        let (model, known) = convert_model(raw_model, &prefix, &mut errors);
        check_model(&model, &prefix, known, &mut errors);
        models.push(model);
    }
    check_models(&models, server.model_repository.is_some(), &mut errors);

    errors.into_result(Config {
        server,
        tls,
        models,
    })
}

fn convert_server(raw: RawServer, errors: &mut Errors) -> Server {
    let defaults = Server::default();
    let quic_listen = match raw.quic_listen {
        None => defaults.quic_listen,
        Some(text) => parse_socket_addr(&text).unwrap_or_else(|reason| {
            errors.push(
                "server.quic_listen",
                format!("must be an IP address and port such as \"0.0.0.0:4433\", got \"{text}\" ({reason})"),
            );
            defaults.quic_listen
        }),
    };
    let metrics_listen = optional_listen(
        "server.metrics_listen",
        raw.metrics_listen,
        defaults.metrics_listen,
        "0.0.0.0:8002",
        errors,
    );
    let http_listen = optional_listen(
        "server.http_listen",
        raw.http_listen,
        defaults.http_listen,
        "0.0.0.0:8000",
        errors,
    );
    let grpc_listen = optional_listen(
        "server.grpc_listen",
        raw.grpc_listen,
        defaults.grpc_listen,
        "0.0.0.0:8001",
        errors,
    );
    let https_listen = optional_listen(
        "server.https_listen",
        raw.https_listen,
        defaults.https_listen,
        "0.0.0.0:8443",
        errors,
    );
    let grpcs_listen = optional_listen(
        "server.grpcs_listen",
        raw.grpcs_listen,
        defaults.grpcs_listen,
        "0.0.0.0:8444",
        errors,
    );
    Server {
        quic_listen,
        metrics_listen,
        http_listen,
        grpc_listen,
        https_listen,
        grpcs_listen,
        auth_tokens: raw.auth_tokens.unwrap_or_default(),
        auth_token_identities: raw.auth_token_identities.unwrap_or_default(),
        auth_exempt_health: raw
            .auth_exempt_health
            .unwrap_or(defaults.auth_exempt_health),
        max_frame_bytes: errors
            .int(
                "server.max_frame_bytes",
                raw.max_frame_bytes,
                MAX_FRAME_BYTES,
            )
            .unwrap_or(defaults.max_frame_bytes),
        max_inflight_bytes: errors
            .int(
                "server.max_inflight_bytes",
                raw.max_inflight_bytes,
                MAX_INFLIGHT_BYTES,
            )
            .unwrap_or(defaults.max_inflight_bytes),
        max_concurrent_streams: errors
            .int(
                "server.max_concurrent_streams",
                raw.max_concurrent_streams,
                MAX_CONCURRENT_STREAMS,
            )
            .unwrap_or(defaults.max_concurrent_streams),
        max_connections: errors
            .int(
                "server.max_connections",
                raw.max_connections,
                MAX_CONNECTIONS,
            )
            .unwrap_or(defaults.max_connections),
        max_connections_per_source: errors
            .int(
                "server.max_connections_per_source",
                raw.max_connections_per_source,
                MAX_CONNECTIONS,
            )
            .unwrap_or(defaults.max_connections_per_source),
        quic_retry_above_per_sec: errors
            .int(
                "server.quic_retry_above_per_sec",
                raw.quic_retry_above_per_sec,
                QUIC_RETRY_ABOVE_PER_SEC,
            )
            .unwrap_or(defaults.quic_retry_above_per_sec),
        idle_timeout: errors
            .int(
                "server.idle_timeout_ms",
                raw.idle_timeout_ms,
                IDLE_TIMEOUT_MS,
            )
            .map_or(defaults.idle_timeout, Duration::from_millis),
        request_read_timeout: errors
            .int(
                "server.request_read_timeout_ms",
                raw.request_read_timeout_ms,
                REQUEST_READ_TIMEOUT_MS,
            )
            .map_or(defaults.request_read_timeout, Duration::from_millis),
        header_read_timeout: errors
            .int(
                "server.header_read_timeout_ms",
                raw.header_read_timeout_ms,
                HEADER_READ_TIMEOUT_MS,
            )
            .map_or(defaults.header_read_timeout, Duration::from_millis),
        min_body_bytes_per_sec: errors
            .int(
                "server.min_body_bytes_per_sec",
                raw.min_body_bytes_per_sec,
                MIN_BODY_BYTES_PER_SEC,
            )
            .unwrap_or(defaults.min_body_bytes_per_sec),
        shutdown_grace: errors
            .int(
                "server.shutdown_grace_ms",
                raw.shutdown_grace_ms,
                SHUTDOWN_GRACE_MS,
            )
            .map_or(defaults.shutdown_grace, Duration::from_millis),
        rate_limit_per_sec: errors
            .int(
                "server.rate_limit_per_sec",
                raw.rate_limit_per_sec,
                RATE_LIMIT_PER_SEC,
            )
            .unwrap_or(defaults.rate_limit_per_sec),
        rate_limit_burst: errors.int(
            "server.rate_limit_burst",
            raw.rate_limit_burst,
            RATE_LIMIT_BURST,
        ),
        model_repository: raw.model_repository.map(PathBuf::from),
        model_control: match raw.model_control.as_deref() {
            None | Some("none") => ModelControl::None,
            Some("poll") => ModelControl::Poll,
            Some("explicit") => ModelControl::Explicit,
            Some(other) => {
                errors.push(
                    "server.model_control",
                    format!(
                        "must be \"none\", \"poll\" or \"explicit\", got \"{}\"",
                        other.escape_debug()
                    ),
                );
                ModelControl::None
            }
        },
        repository_poll: errors
            .int(
                "server.repository_poll_ms",
                raw.repository_poll_ms,
                REPOSITORY_POLL_MS,
            )
            .map_or(defaults.repository_poll, Duration::from_millis),
    }
}

/// A listener address that `""` or `"off"` turns off.
fn optional_listen(
    path: &str,
    raw: Option<String>,
    default: Option<SocketAddr>,
    example: &str,
    errors: &mut Errors,
) -> Option<SocketAddr> {
    match raw {
        None => default,
        Some(text) if text.is_empty() || text == "off" => None,
        Some(text) => match parse_socket_addr(&text) {
            Ok(address) => Some(address),
            Err(reason) => {
                errors.push(
                    path,
                    format!(
                        "must be an IP address and port such as \"{example}\", or \"off\", got \"{text}\" ({reason})"
                    ),
                );
                default
            }
        },
    }
}

fn parse_socket_addr(text: &str) -> Result<SocketAddr, String> {
    text.trim()
        .parse::<SocketAddr>()
        .map_err(|error| error.to_string())
}

fn convert_tls(raw: RawTls) -> Tls {
    Tls {
        cert: raw.cert.map(PathBuf::from),
        key: raw.key.map(PathBuf::from),
        client_ca: raw.client_ca.map(PathBuf::from),
    }
}

/// Which fields of a converted model are what the file said, so that checks
/// do not report on the stand-ins for missing or unreadable ones.
#[derive(Clone, Copy, Debug)]
struct Known {
    name: bool,
    kind: bool,
    batch_size_and_tokens: bool,
}

impl Known {
    const ALL: Known = Known {
        name: true,
        kind: true,
        batch_size_and_tokens: true,
    };
}

fn convert_model(raw: RawModel, prefix: &str, errors: &mut Errors) -> (Model, Known) {
    let at = |field: &str| format!("{prefix}.{field}");
    let mut known = Known::ALL;

    let name = raw.name.unwrap_or_else(|| {
        errors.push(at("name"), "required");
        known.name = false;
        String::new()
    });
    let kind = match raw.kind {
        None => {
            errors.push(
                at("kind"),
                "required: \"identity\", \"mlp\", \"embedding\", \"trees\" or \"onnx\"",
            );
            known.kind = false;
            ModelKind::Identity
        }
        Some(text) => ModelKind::from_name(&text).unwrap_or_else(|| {
            errors.push(
                at("kind"),
                format!(
                    "must be \"identity\", \"mlp\", \"embedding\", \"trees\" or \"onnx\", got \"{text}\""
                ),
            );
            known.kind = false;
            ModelKind::Identity
        }),
    };
    let mut model = Model::new(name, kind);
    model.path = raw.path.map(PathBuf::from);
    model.demo = raw.demo.map(|demo| convert_demo(demo, &at("demo"), errors));
    let device_given = raw.device.is_some();
    if let Some(device) = raw.device {
        model.device = device;
    }
    if let Some(cpu_kernels) = raw.cpu_kernels {
        // Only the embedding model has a CPU-kernel engine; on another kind
        // the knob would be silently ignored.
        if known.kind && kind != ModelKind::Embedding {
            errors.push(at("cpu_kernels"), "only for kind \"embedding\"");
        }
        model.cpu_kernels = cpu_kernels;
    }
    if let Some(precision) = raw.precision {
        // Only the embedding model has linear layers to quantize.
        if known.kind && kind != ModelKind::Embedding {
            errors.push(at("precision"), "only for kind \"embedding\"");
        }
        model.precision = match precision.as_str() {
            "fp32" => crate::Precision::Fp32,
            "int8" => crate::Precision::Int8,
            other => {
                errors.push(
                    at("precision"),
                    format!(
                        "must be \"fp32\" or \"int8\", got \"{}\"",
                        other.escape_debug()
                    ),
                );
                crate::Precision::Fp32
            }
        };
    }
    if let Some(auto_truncate) = raw.auto_truncate {
        // Only the embedding model tokenizes; elsewhere it would mean nothing.
        if known.kind && kind != ModelKind::Embedding {
            errors.push(at("auto_truncate"), "only for kind \"embedding\"");
        }
        model.auto_truncate = auto_truncate;
    }
    if let Some(length_grouping) = raw.length_grouping {
        // Only the embedding model's requests carry token lengths; elsewhere
        // every request is one token and there is nothing to group.
        if known.kind && kind != ModelKind::Embedding {
            errors.push(at("length_grouping"), "only for kind \"embedding\"");
        }
        model.length_grouping = length_grouping;
    }
    if let Some(ratio) = raw.max_length_ratio {
        if known.kind && kind != ModelKind::Embedding {
            errors.push(at("max_length_ratio"), "only for kind \"embedding\"");
        }
        if MAX_LENGTH_RATIO.contains(&ratio) {
            model.max_length_ratio = ratio;
        } else {
            errors.push(
                at("max_length_ratio"),
                format!("must be in 1.0..=16.0, got {ratio}"),
            );
        }
    }
    if let Some(output_margin) = raw.output_margin {
        // Only tree models have a margin distinct from their output's transform.
        if known.kind && kind != ModelKind::Trees {
            errors.push(at("output_margin"), "only for kind \"trees\"");
        }
        model.output_margin = output_margin;
    }
    if let Some(engine) = raw.engine {
        // Only ONNX graphs have a choice of engine.
        if known.kind && kind != ModelKind::Onnx {
            errors.push(at("engine"), "only for kind \"onnx\"");
        }
        match crate::OnnxEngine::from_name(&engine) {
            Some(e) => model.engine = e,
            None => errors.push(
                at("engine"),
                format!(
                    "must be \"auto\", \"onnxruntime\" or \"candle\", got \"{}\"",
                    engine.escape_debug()
                ),
            ),
        }
    }

    let max_batch_size = errors.int(&at("max_batch_size"), raw.max_batch_size, MAX_BATCH_SIZE);
    let max_batch_tokens = errors.int(
        &at("max_batch_tokens"),
        raw.max_batch_tokens,
        MAX_BATCH_TOKENS,
    );
    // A stand-in for one would make the cross-field check between the two
    // report a number the file does not hold.
    known.batch_size_and_tokens = (raw.max_batch_size.is_none() || max_batch_size.is_some())
        && (raw.max_batch_tokens.is_none() || max_batch_tokens.is_some());
    if let Some(value) = max_batch_size {
        model.max_batch_size = value;
    }
    if let Some(value) = max_batch_tokens {
        model.max_batch_tokens = value;
    }
    if let Some(micros) = errors.int(
        &at("max_queue_delay_us"),
        raw.max_queue_delay_us,
        MAX_QUEUE_DELAY_US,
    ) {
        model.max_queue_delay = Duration::from_micros(micros);
    }
    if let Some(value) = errors.int(&at("queue_capacity"), raw.queue_capacity, QUEUE_CAPACITY) {
        model.queue_capacity = value;
    }
    if let Some(value) = errors.int(&at("priority_levels"), raw.priority_levels, PRIORITY_LEVELS) {
        model.priority_levels = value;
    }
    if let Some(millis) = errors.int(
        &at("default_timeout_ms"),
        raw.default_timeout_ms,
        DEFAULT_TIMEOUT_MS,
    ) {
        model.default_timeout = Duration::from_millis(millis);
    }
    if let Some(value) = errors.int(&at("max_in_flight"), raw.max_in_flight, MAX_IN_FLIGHT) {
        model.max_in_flight = value;
    }
    if let Some(micros) = errors.int(&at("inline_below_us"), raw.inline_below_us, INLINE_BELOW_US) {
        model.inline_below = Duration::from_micros(micros);
    }
    if let Some(micros) = errors.int(&at("idle_spin_us"), raw.idle_spin_us, IDLE_SPIN_US) {
        model.idle_spin = Duration::from_micros(micros);
    }
    if let Some(value) = errors.int(
        &at("unhealthy_after_failures"),
        raw.unhealthy_after_failures,
        UNHEALTHY_AFTER_FAILURES,
    ) {
        model.unhealthy_after_failures = value;
    }
    model.rate_limit_per_sec = errors.int(
        &at("rate_limit_per_sec"),
        raw.rate_limit_per_sec,
        RATE_LIMIT_PER_SEC,
    );
    model.rate_limit_burst = errors.int(
        &at("rate_limit_burst"),
        raw.rate_limit_burst,
        RATE_LIMIT_BURST,
    );
    model.routing = upstream::convert_routing(raw.routing, &at("routing"), errors);
    model.upstream = raw
        .upstream
        .map(|up| upstream::convert_upstream(up, &at("upstream"), errors));
    if let Some(devices) = raw.devices {
        if device_given {
            errors.push(at("devices"), "give `device` or `devices`, not both");
        }
        if let Some(first) = devices.first() {
            model.device.clone_from(first);
        }
        model.devices = devices;
    }
    model.sim = raw.sim.map(|sim| convert_sim(sim, &at("sim"), errors));
    model.placement = match raw.placement.as_deref() {
        None | Some("earliest") => crate::Placement::Earliest,
        Some("round-robin") => crate::Placement::RoundRobin,
        Some(other) => {
            errors.push(
                at("placement"),
                format!(
                    "must be \"earliest\" or \"round-robin\", got \"{}\"",
                    other.escape_debug()
                ),
            );
            crate::Placement::Earliest
        }
    };
    if let Some(policy) = raw.version_policy {
        model.version_policy = convert_version_policy(&policy, &at("version_policy"), errors);
    }
    (model, known)
}

fn convert_sim(raw: RawSim, prefix: &str, errors: &mut Errors) -> SimDevice {
    let at = |field: &str| format!("{prefix}.{field}");
    let d = SimDevice::default();
    SimDevice {
        fixed_us: errors
            .int(&at("fixed_us"), raw.fixed_us, SIM_TIME)
            .unwrap_or(d.fixed_us),
        per_row_us: errors
            .int(&at("per_row_us"), raw.per_row_us, SIM_TIME)
            .unwrap_or(d.per_row_us),
        per_token_ns: errors
            .int(&at("per_token_ns"), raw.per_token_ns, SIM_TIME)
            .unwrap_or(d.per_token_ns),
        jitter_pct: errors
            .int(&at("jitter_pct"), raw.jitter_pct, SIM_JITTER_PCT)
            .unwrap_or(d.jitter_pct),
        seed: errors.int(&at("seed"), raw.seed, SEED).unwrap_or(d.seed),
        slowdown_pct: raw
            .slowdown_pct
            .unwrap_or_default()
            .into_iter()
            .enumerate()
            .map(|(i, v)| {
                errors
                    .int(
                        &format!("{prefix}.slowdown_pct[{i}]"),
                        Some(v),
                        SIM_SLOWDOWN_PCT,
                    )
                    .unwrap_or(100)
            })
            .collect(),
    }
}

/// `"all"`, `{ latest = N }` or `{ specific = [V, ...] }`.
fn convert_version_policy(value: &toml::Value, path: &str, errors: &mut Errors) -> VersionPolicy {
    const EXPECTED: &str = "must be \"all\", { latest = N } or { specific = [V, ...] }";
    match value {
        toml::Value::String(s) if s == "all" => VersionPolicy::All,
        toml::Value::Table(t) if t.len() == 1 => match t.iter().next() {
            Some((key, toml::Value::Integer(n))) if key == "latest" => errors
                .int(&format!("{path}.latest"), Some(*n), LATEST_VERSIONS)
                .map_or_else(VersionPolicy::default, VersionPolicy::Latest),
            Some((key, toml::Value::Array(versions))) if key == "specific" => {
                let mut out = Vec::with_capacity(versions.len());
                for (i, v) in versions.iter().enumerate() {
                    let at = format!("{path}.specific[{i}]");
                    match v {
                        toml::Value::Integer(n) => {
                            if let Some(v) = errors.int::<u64>(&at, Some(*n), VERSION) {
                                out.push(v);
                            }
                        }
                        other => errors.push(at, format!("must be a version number, got {other}")),
                    }
                }
                if versions.is_empty() {
                    errors.push(format!("{path}.specific"), "must name at least one version");
                }
                VersionPolicy::Specific(out)
            }
            _ => {
                errors.push(path, format!("{EXPECTED}, got {value}"));
                VersionPolicy::default()
            }
        },
        other => {
            errors.push(path, format!("{EXPECTED}, got {other}"));
            VersionPolicy::default()
        }
    }
}

/// A repository's `model.toml` (see [`Config::repository_model`]).
pub(crate) fn repository_model(
    name: &str,
    file: &str,
    mut raw: RawModel,
) -> Result<Model, ConfigError> {
    let mut errors = Errors::default();
    if raw.name.is_some() {
        errors.push(
            format!("{file}.name"),
            "a repository model is named by its directory: remove `name`",
        );
    }
    if raw.path.is_some() {
        errors.push(
            format!("{file}.path"),
            "a repository model's weights are its version directories (NAME/VERSION/): remove `path`",
        );
    }
    raw.name = Some(name.to_owned());
    raw.path = None;
    let (mut model, known) = convert_model(raw, file, &mut errors);
    // The version directory stands in for `path` in the checks.
    let needs_path = model.kind != ModelKind::Identity && model.demo.is_none();
    if needs_path {
        model.path = Some(PathBuf::from(name));
    }
    check_model(&model, file, known, &mut errors);
    model.path = None;
    errors.into_result(model)
}

fn convert_demo(raw: RawDemo, prefix: &str, errors: &mut Errors) -> MlpDemo {
    let at = |field: &str| format!("{prefix}.{field}");
    let defaults = MlpDemo::default();
    let hidden = match raw.hidden {
        None => defaults.hidden,
        Some(widths) => widths
            .into_iter()
            .enumerate()
            .map(|(index, width)| {
                errors
                    .int(
                        &format!("{prefix}.hidden[{index}]"),
                        Some(width),
                        DEMO_WIDTH,
                    )
                    // The stand-in keeps the layer count, which is checked too.
                    .unwrap_or(1)
            })
            .collect(),
    };
    MlpDemo {
        inputs: errors
            .int(&at("inputs"), raw.inputs, DEMO_WIDTH)
            .unwrap_or(defaults.inputs),
        hidden,
        outputs: errors
            .int(&at("outputs"), raw.outputs, DEMO_WIDTH)
            .unwrap_or(defaults.outputs),
        activation: raw.activation.unwrap_or(defaults.activation),
        seed: errors
            .int(&at("seed"), raw.seed, SEED)
            .unwrap_or(defaults.seed),
    }
}

// ---------------------------------------------------------------------------
// Checks: typed values, ranges and cross-field rules.

pub(crate) fn check_config(config: &Config, errors: &mut Errors) {
    check_server(&config.server, errors);
    check_tls(&config.tls, errors);
    check_token_identities(&config.server, &config.tls, errors);
    for (index, model) in config.models.iter().enumerate() {
        check_model(model, &format!("models[{index}]"), Known::ALL, errors);
    }
    check_models(
        &config.models,
        config.server.model_repository.is_some(),
        errors,
    );
}

fn check_server(server: &Server, errors: &mut Errors) {
    if server.model_control != ModelControl::None && server.model_repository.is_none() {
        errors.push(
            "server.model_control",
            format!(
                "\"{}\" needs server.model_repository",
                server.model_control.as_str()
            ),
        );
    }
    if server
        .model_repository
        .as_ref()
        .is_some_and(|p| p.as_os_str().is_empty())
    {
        errors.push("server.model_repository", "must not be empty");
    }
    errors.bounded(
        "server.max_frame_bytes",
        server.max_frame_bytes.into(),
        MAX_FRAME_BYTES,
    );
    errors.bounded(
        "server.max_inflight_bytes",
        server.max_inflight_bytes,
        MAX_INFLIGHT_BYTES,
    );
    if server.max_inflight_bytes < u64::from(server.max_frame_bytes) {
        errors.push(
            "server.max_inflight_bytes",
            format!(
                "must be at least server.max_frame_bytes ({}), got {}: no request of the largest size could ever be held",
                server.max_frame_bytes, server.max_inflight_bytes
            ),
        );
    }
    errors.bounded(
        "server.max_concurrent_streams",
        server.max_concurrent_streams.into(),
        MAX_CONCURRENT_STREAMS,
    );
    errors.bounded(
        "server.max_connections",
        server.max_connections.into(),
        MAX_CONNECTIONS,
    );
    errors.bounded(
        "server.max_connections_per_source",
        server.max_connections_per_source.into(),
        MAX_CONNECTIONS,
    );
    errors.bounded_millis(
        "server.idle_timeout_ms",
        server.idle_timeout,
        IDLE_TIMEOUT_MS,
    );
    errors.bounded_millis(
        "server.request_read_timeout_ms",
        server.request_read_timeout,
        REQUEST_READ_TIMEOUT_MS,
    );
    errors.bounded(
        "server.rate_limit_per_sec",
        server.rate_limit_per_sec.into(),
        RATE_LIMIT_PER_SEC,
    );
    if let Some(burst) = server.rate_limit_burst {
        errors.bounded("server.rate_limit_burst", burst.into(), RATE_LIMIT_BURST);
    }
    errors.bounded(
        "server.quic_retry_above_per_sec",
        server.quic_retry_above_per_sec.into(),
        QUIC_RETRY_ABOVE_PER_SEC,
    );
    errors.bounded_millis(
        "server.header_read_timeout_ms",
        server.header_read_timeout,
        HEADER_READ_TIMEOUT_MS,
    );
    errors.bounded(
        "server.min_body_bytes_per_sec",
        server.min_body_bytes_per_sec.into(),
        MIN_BODY_BYTES_PER_SEC,
    );
    errors.bounded_millis(
        "server.shutdown_grace_ms",
        server.shutdown_grace,
        SHUTDOWN_GRACE_MS,
    );
    for (index, token) in server.auth_tokens.iter().enumerate() {
        if let Err(reason) = check_auth_token(token) {
            errors.push(format!("server.auth_tokens[{index}]"), reason);
        }
    }
}

/// Token bindings: one per token (or none), and only with client
/// certificates to bind to.
fn check_token_identities(server: &Server, tls: &Tls, errors: &mut Errors) {
    let ids = &server.auth_token_identities;
    if ids.is_empty() {
        return;
    }
    if ids.len() != server.auth_tokens.len() {
        errors.push(
            "server.auth_token_identities",
            format!(
                "has {} entries for {} auth_tokens: give one per token (\"\" for unbound) or none",
                ids.len(),
                server.auth_tokens.len()
            ),
        );
    }
    if tls.client_ca.is_none() && ids.iter().any(|id| !id.is_empty()) {
        errors.push(
            "server.auth_token_identities",
            "binds tokens to client certificates, which need tls.client_ca",
        );
    }
}

/// A bearer token: 1 to [`AUTH_TOKEN_MAX_LEN`] visible ASCII characters,
/// so that it travels unchanged in an HTTP header or gRPC metadata.
fn check_auth_token(token: &str) -> Result<(), String> {
    if token.is_empty() || token.len() > AUTH_TOKEN_MAX_LEN {
        return Err(format!(
            "must be 1 to {AUTH_TOKEN_MAX_LEN} characters, got {}",
            token.len()
        ));
    }
    if !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err("must be visible ASCII characters without spaces".to_owned());
    }
    Ok(())
}

fn check_tls(tls: &Tls, errors: &mut Errors) {
    if tls
        .client_ca
        .as_ref()
        .is_some_and(|path| path.as_os_str().is_empty())
    {
        errors.push(
            "tls.client_ca",
            "must not be empty (leave it out for no client certificates)",
        );
    }
    for (field, path) in [("tls.cert", &tls.cert), ("tls.key", &tls.key)] {
        if path
            .as_ref()
            .is_some_and(|path| path.as_os_str().is_empty())
        {
            errors.push(
                field,
                "must not be empty (leave it out for a self-signed certificate)",
            );
        }
    }
    match (&tls.cert, &tls.key) {
        (Some(_), None) => errors.push("tls.key", "required when tls.cert is set"),
        (None, Some(_)) => errors.push("tls.cert", "required when tls.key is set"),
        _ => {}
    }
}

fn check_model(model: &Model, prefix: &str, known: Known, errors: &mut Errors) {
    let at = |field: &str| format!("{prefix}.{field}");

    if known.name
        && let Err(message) = check_model_name(&model.name)
    {
        errors.push(at("name"), message);
    }
    if model.devices.is_empty() {
        if let Err(message) = parse_device(&model.device) {
            errors.push(at("device"), message);
        }
    } else {
        if model.devices.len() > MAX_DEVICES {
            errors.push(
                at("devices"),
                format!("at most {MAX_DEVICES} devices, got {}", model.devices.len()),
            );
        }
        for (i, device) in model.devices.iter().enumerate() {
            if let Err(message) = parse_device(device) {
                errors.push(format!("{prefix}.devices[{i}]"), message);
            } else if model.devices[..i].contains(device) {
                errors.push(
                    format!("{prefix}.devices[{i}]"),
                    format!("duplicate device \"{}\"", device.escape_debug()),
                );
            }
        }
    }
    let simulated = model.device_list().iter().any(|d| d.starts_with("sim:"));
    match (simulated, &model.sim) {
        (true, None) => errors.push(
            at("sim"),
            "a sim:N device needs [models.sim] (its service time)",
        ),
        (false, Some(_)) => errors.push(at("sim"), "only with a sim:N device"),
        _ => {}
    }
    // ONNX Runtime is served on the CPU only; candle-onnx runs the graph on CUDA.
    if model.engine == crate::OnnxEngine::OnnxRuntime
        && let Some(gpu) = model
            .device_list()
            .into_iter()
            .find(|d| matches!(parse_device(d), Ok(Some(_))))
    {
        errors.push(
            at("engine"),
            format!(
                "\"onnxruntime\" runs on the cpu only, not on \"{}\"; use \"auto\" or \"candle\"",
                gpu.escape_debug()
            ),
        );
    }

    if model.precision == crate::Precision::Int8 {
        // The int8 layers exist on Quiver's CPU kernels only; a model that would
        // run candle's BERT must not silently serve fp32 instead.
        if !model.cpu_kernels {
            errors.push(
                at("precision"),
                "\"int8\" runs on Quiver's CPU kernels: it needs cpu_kernels = true",
            );
        }
        if model
            .device_list()
            .iter()
            .any(|d| matches!(parse_device(d), Ok(Some(_))))
        {
            errors.push(
                at("precision"),
                "\"int8\" runs on the CPU kernels only, not on a cuda device",
            );
        }
    }
    if model
        .path
        .as_ref()
        .is_some_and(|path| path.as_os_str().is_empty())
    {
        errors.push(at("path"), "must not be empty");
    }
    if known.kind {
        match model.kind {
            ModelKind::Identity => {
                if model.path.is_some() {
                    errors.push(at("path"), "kind \"identity\" loads no model directory");
                }
                if model.demo.is_some() {
                    errors.push(at("demo"), "only for kind \"mlp\"");
                }
            }
            ModelKind::Mlp => match (&model.path, &model.demo) {
                (None, None) => errors.push(
                    prefix,
                    "kind \"mlp\" needs `path` (a model directory) or `[models.demo]`",
                ),
                (Some(_), Some(_)) => errors.push(
                    prefix,
                    "`path` and `[models.demo]` exclude each other: give one",
                ),
                _ => {}
            },
            ModelKind::Embedding => {
                if model.path.is_none() {
                    errors.push(
                        at("path"),
                        "required for kind \"embedding\" (a model directory)",
                    );
                }
                if model.demo.is_some() {
                    errors.push(at("demo"), "only for kind \"mlp\"");
                }
            }
            ModelKind::Trees => {
                if model.path.is_none() {
                    errors.push(
                        at("path"),
                        "required for kind \"trees\" (an XGBoost JSON or LightGBM text model file)",
                    );
                }
                if model.demo.is_some() {
                    errors.push(at("demo"), "only for kind \"mlp\"");
                }
            }
            ModelKind::Onnx => {
                if model.path.is_none() {
                    errors.push(
                        at("path"),
                        "required for kind \"onnx\" (a .onnx file, or a directory with model.onnx)",
                    );
                }
                if model.demo.is_some() {
                    errors.push(at("demo"), "only for kind \"mlp\"");
                }
            }
        }
    }
    if let Some(demo) = &model.demo {
        check_demo(demo, &at("demo"), errors);
    }

    errors.bounded(
        &at("max_batch_size"),
        model.max_batch_size.into(),
        MAX_BATCH_SIZE,
    );
    errors.bounded(
        &at("max_batch_tokens"),
        model.max_batch_tokens.into(),
        MAX_BATCH_TOKENS,
    );
    errors.bounded_micros(
        &at("max_queue_delay_us"),
        model.max_queue_delay,
        MAX_QUEUE_DELAY_US,
    );
    errors.bounded(
        &at("queue_capacity"),
        model.queue_capacity.into(),
        QUEUE_CAPACITY,
    );
    errors.bounded(
        &at("priority_levels"),
        model.priority_levels.into(),
        PRIORITY_LEVELS,
    );
    errors.bounded_millis(
        &at("default_timeout_ms"),
        model.default_timeout,
        DEFAULT_TIMEOUT_MS,
    );
    errors.bounded(
        &at("max_in_flight"),
        model.max_in_flight.into(),
        MAX_IN_FLIGHT,
    );
    errors.bounded_micros(&at("inline_below_us"), model.inline_below, INLINE_BELOW_US);
    errors.bounded_micros(&at("idle_spin_us"), model.idle_spin, IDLE_SPIN_US);
    if !MAX_LENGTH_RATIO.contains(&model.max_length_ratio) {
        errors.push(
            at("max_length_ratio"),
            format!("must be in 1.0..=16.0, got {}", model.max_length_ratio),
        );
    }
    if let Some(rate) = model.rate_limit_per_sec {
        errors.bounded(&at("rate_limit_per_sec"), rate.into(), RATE_LIMIT_PER_SEC);
    }
    if let Some(burst) = model.rate_limit_burst {
        errors.bounded(&at("rate_limit_burst"), burst.into(), RATE_LIMIT_BURST);
    }
    errors.bounded(
        &at("unhealthy_after_failures"),
        model.unhealthy_after_failures.into(),
        UNHEALTHY_AFTER_FAILURES,
    );
    upstream::check_routing(model.routing, model.upstream.as_ref(), prefix, errors);
    // Every request is at least one token, so a token budget under the row
    // budget makes `max_batch_size` unreachable.
    if known.batch_size_and_tokens && model.max_batch_tokens < model.max_batch_size {
        errors.push(
            at("max_batch_tokens"),
            format!(
                "must be at least max_batch_size ({}), got {}",
                model.max_batch_size, model.max_batch_tokens
            ),
        );
    }
}

fn check_model_name(name: &str) -> Result<(), String> {
    let allowed = |c: char| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-');
    if name.is_empty() || name.len() > MODEL_NAME_MAX_LEN || !name.chars().all(allowed) {
        return Err(format!(
            "must be 1 to {MODEL_NAME_MAX_LEN} of A-Z a-z 0-9 _ . -, got \"{}\"",
            name.escape_debug()
        ));
    }
    // Both would be rewritten by URL path normalisation (`/v2/models/..`).
    if name == "." || name == ".." {
        return Err(format!("must not be \"{name}\""));
    }
    Ok(())
}

/// `Ok(None)` for the CPU, `Ok(Some(n))` for CUDA device `n`, else the
/// message of the error.
pub(crate) fn parse_device(device: &str) -> Result<Option<u32>, String> {
    let ordinal = match device {
        "cpu" => return Ok(None),
        "cuda" => Some(0),
        other => {
            let digits = |d: &str| {
                (!d.is_empty() && d.bytes().all(|b| b.is_ascii_digit()))
                    .then(|| d.parse::<u32>().ok())
                    .flatten()
            };
            // A simulated device is not a GPU.
            if other.strip_prefix("sim:").and_then(digits).is_some() {
                return Ok(None);
            }
            other.strip_prefix("cuda:").and_then(digits)
        }
    };
    ordinal.map(Some).ok_or_else(|| {
        format!(
            "must be \"cpu\", \"cuda\", \"cuda:N\" or \"sim:N\", got \"{}\"",
            device.escape_debug()
        )
    })
}

fn check_demo(demo: &MlpDemo, prefix: &str, errors: &mut Errors) {
    let at = |field: &str| format!("{prefix}.{field}");
    errors.bounded(&at("inputs"), demo.inputs.into(), DEMO_WIDTH);
    errors.bounded(&at("outputs"), demo.outputs.into(), DEMO_WIDTH);
    if demo.hidden.len() > DEMO_MAX_HIDDEN_LAYERS {
        errors.push(
            at("hidden"),
            format!(
                "at most {DEMO_MAX_HIDDEN_LAYERS} layers, got {}",
                demo.hidden.len()
            ),
        );
    }
    for (index, width) in demo.hidden.iter().enumerate() {
        errors.bounded(
            &format!("{prefix}.hidden[{index}]"),
            (*width).into(),
            DEMO_WIDTH,
        );
    }
    if !MlpDemo::ACTIVATIONS.contains(&demo.activation.as_str()) {
        errors.push(
            at("activation"),
            format!(
                "must be one of {}, got \"{}\"",
                MlpDemo::ACTIVATIONS.join(", "),
                demo.activation.escape_debug()
            ),
        );
    }
    errors.bounded(&at("seed"), demo.seed, SEED);
    let parameters = demo.parameter_count();
    if parameters > DEMO_MAX_PARAMETERS {
        errors.push(
            prefix,
            format!(
                "{parameters} parameters, more than the {DEMO_MAX_PARAMETERS} (1 GiB of f32) allowed"
            ),
        );
    }
}

fn check_models(models: &[Model], repository: bool, errors: &mut Errors) {
    if models.is_empty() && !repository {
        errors.push(
            "models",
            "at least one model is required (a [[models]] table, or server.model_repository)",
        );
    }
    let mut first_index: HashMap<&str, usize> = HashMap::new();
    for (index, model) in models.iter().enumerate() {
        if model.name.is_empty() {
            continue; // reported as missing or malformed already
        }
        if let Some(first) = first_index.get(model.name.as_str()) {
            errors.push(
                format!("models[{index}].name"),
                format!(
                    "duplicate of models[{first}].name \"{}\"",
                    model.name.escape_debug()
                ),
            );
        } else {
            first_index.insert(&model.name, index);
        }
    }
}
