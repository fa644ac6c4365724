//! Typed configuration of the Quiver gateway.
//!
//! One TOML file (`quiver serve --config quiver.toml`) configures the front
//! end (`[server]`), its certificate (`[tls]`) and the models it serves
//! (`[[models]]`); see `DESIGN.md`, "Configuration". This crate turns that
//! text into the typed [`Config`] that the gateway wires together, and knows
//! nothing of sockets, models or threads: it only checks that an address
//! parses as a [`SocketAddr`] and that a device is spelled `cpu`, `cuda` or
//! `cuda:N`.
//!
//! Loading is two steps. The text is parsed by serde into *raw* structs,
//! where every field is optional and unknown fields are rejected; a TOML
//! syntax or type error stops here as one [`FieldError`] with the location
//! toml reports. The raw structs are then checked into the typed ones, and
//! every error found on the way (ranges, spellings, cross-field rules such as
//! duplicate model names or a certificate without its key) is collected with
//! its path, so an operator fixes a file in one pass:
//!
//! ```text
//! models[1].max_batch_size: must be between 1 and 4096, got 0
//! tls.key: required when tls.cert is set
//! ```
//!
//! Every knob has a default, a unit (in its name or its doc) and, where it
//! bounds memory, its worst case in its doc comment. The ranges are checked
//! again by [`Config::validate`], so a configuration changed after loading
//! (command-line flags) is held to the same rules.
//!
//! Relative paths (`tls.cert`, `models[].path`) are kept as written: they are
//! relative to the working directory of the process, not to the file.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

mod raw;
mod syntax;
mod upstream;
mod validate;

pub use upstream::{Endpoint, Routing, Upstream, UpstreamProtocol, UpstreamTls};

use std::fmt;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The whole configuration of one gateway process.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    /// The network front end: listeners and limits (`[server]`).
    pub server: Server,
    /// The certificate of the QUIC (and TLS-on-TCP) listeners (`[tls]`).
    pub tls: Tls,
    /// The models served, at least one, with unique names (`[[models]]`).
    pub models: Vec<Model>,
}

/// A per-client rate limit in effect for a model: see
/// [`Server::rate_limit_per_sec`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RateLimit {
    /// Requests per second, sustained (at least 1).
    pub per_sec: u32,
    /// Requests at once above the rate (at least 1).
    pub burst: u32,
}

impl Config {
    /// The per-client rate limit of `model`: its own rate and burst, else
    /// the server's; `None` when the rate in effect is 0 (off).
    #[must_use]
    pub fn rate_limit(&self, model: &Model) -> Option<RateLimit> {
        let (per_sec, burst) = match model.rate_limit_per_sec {
            Some(rate) => (rate, model.rate_limit_burst.unwrap_or(rate)),
            None => (
                self.server.rate_limit_per_sec,
                model
                    .rate_limit_burst
                    .or(self.server.rate_limit_burst)
                    .unwrap_or(self.server.rate_limit_per_sec),
            ),
        };
        (per_sec > 0).then_some(RateLimit {
            per_sec,
            burst: burst.max(1),
        })
    }

    /// The text of the embedded default configuration (`examples/default.toml`):
    /// what `quiver serve` runs with no `--config`.
    pub const EMBEDDED_DEFAULT_TOML: &'static str = include_str!("../examples/default.toml");

    /// Parses and checks a configuration from TOML text.
    ///
    /// # Errors
    ///
    /// A TOML syntax or type error (including an unknown field) gives one
    /// [`FieldError`], with the key path and the line and column that toml
    /// reports. Otherwise every range, spelling and cross-field error in the
    /// file is reported, each with its path.
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let raw = syntax::parse_raw(text).map_err(|error| ConfigError {
            errors: vec![error],
        })?;
        validate::from_raw(raw)
    }

    /// Reads and parses the configuration file at `path`.
    ///
    /// # Errors
    ///
    /// A file that cannot be read gives one error with path `<file>` that
    /// names the file and the reason; otherwise as [`Config::parse`].
    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|error| ConfigError {
            errors: vec![FieldError::new(
                "<file>",
                format!("cannot read {}: {error}", path.display()),
            )],
        })?;
        Config::parse(&text)
    }

    /// The embedded default configuration ([`Config::EMBEDDED_DEFAULT_TOML`]),
    /// parsed: models `identity` and `mlp` (demo weights) on the CPU, and the
    /// server on its defaults.
    #[must_use]
    pub fn embedded_default() -> Config {
        // A constant text: the test `embedded_default_parses` guarantees it.
        Config::parse(Config::EMBEDDED_DEFAULT_TOML)
            .expect("the embedded default configuration parses (tested)")
    }

    /// Checks the ranges and cross-field rules of a configuration that was
    /// changed after loading (for example by command-line flags), with the
    /// same paths and messages as [`Config::parse`].
    ///
    /// # Errors
    ///
    /// Every error found, each with its path.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut errors = validate::Errors::default();
        validate::check_config(self, &mut errors);
        errors.into_result(())
    }

    /// Parses a repository model's `model.toml`: the `[[models]]` table of
    /// model `name` without `name` and `path` (the weights are the version
    /// directories). Errors are reported under `file`, e.g.
    /// `mlp/model.toml.max_batch_size`. The model returned has no `path`;
    /// the gateway sets one per version.
    ///
    /// # Errors
    ///
    /// A syntax or type error, a `name` or `path` key, and every range and
    /// spelling error, each with its path.
    pub fn repository_model(name: &str, file: &str, text: &str) -> Result<Model, ConfigError> {
        let raw = syntax::parse_raw_model(text).map_err(|mut error| {
            error.path = format!("{file}.{}", error.path);
            ConfigError {
                errors: vec![error],
            }
        })?;
        validate::repository_model(name, file, raw)
    }

    /// The model named `name`, if it is configured.
    #[must_use]
    pub fn model(&self, name: &str) -> Option<&Model> {
        self.models.iter().find(|model| model.name == name)
    }
}

/// The network front end (`[server]`).
///
/// Request bytes held at once, by every front end, queue and upstream call
/// together, are at most `max_inflight_bytes` (default 1 GiB): the one
/// budget. The product `max_connections × max_concurrent_streams ×
/// max_frame_bytes` (defaults: 1024 × 256 × 16 MiB = 4 TiB) is how much
/// could be *announced* at once; past the budget, requests are refused
/// before their bodies are read.
#[derive(Clone, Debug, PartialEq)]
pub struct Server {
    /// UDP address of the QUIC listener (ALPN `quiver/1`, later also `h3`).
    /// TOML `quic_listen`, a string. Default `0.0.0.0:4433`.
    pub quic_listen: SocketAddr,
    /// TCP address of the Prometheus `/metrics` endpoint, or `None` for no
    /// endpoint. TOML `metrics_listen`, a string; `""` or `"off"` disables it.
    /// Default `0.0.0.0:8002`.
    pub metrics_listen: Option<SocketAddr>,
    /// TCP address of the KServe v2 REST listener (HTTP/1.1 and h2c), or
    /// `None` for none. TOML `http_listen`, a string; `""` or `"off"`
    /// disables it. Default `0.0.0.0:8000` (Triton's port).
    pub http_listen: Option<SocketAddr>,
    /// TCP address of the gRPC `GRPCInferenceService` listener, or `None`
    /// for none. TOML `grpc_listen`, a string; `""` or `"off"` disables it.
    /// Default `0.0.0.0:8001` (Triton's port).
    pub grpc_listen: Option<SocketAddr>,
    /// TCP address of the KServe v2 REST listener over TLS (HTTP/1.1 and
    /// HTTP/2 by ALPN), with the certificate of `[tls]`, and client
    /// certificates required when `tls.client_ca` is set. TOML
    /// `https_listen`; `""` or `"off"` disables it. Default off.
    pub https_listen: Option<SocketAddr>,
    /// TCP address of the gRPC listener over TLS (HTTP/2), as
    /// `https_listen`. TOML `grpcs_listen`. Default off.
    ///
    /// With `tls.client_ca` set, only the QUIC listener and these two check
    /// client certificates: `http_listen` and `grpc_listen` stay plain, for
    /// loopback and sidecars (bind them to 127.0.0.1, or turn them off).
    pub grpcs_listen: Option<SocketAddr>,
    /// Bearer tokens accepted on every front end (`Authorization: Bearer
    /// TOKEN` on HTTP, HTTP/3 and gRPC). Empty: no authentication. TOML
    /// `auth_tokens`, an array of strings, each 1 to 4096 visible ASCII
    /// characters without spaces. Default `[]`.
    pub auth_tokens: Vec<String>,
    /// Binds tokens to client certificates: entry `i` is the identity
    /// (URI SAN, DNS SAN or `sha256:` fingerprint, as `tls.client_ca`
    /// derives it) of the only client that may use `auth_tokens[i]`; `""`
    /// leaves that token unbound. Checked on inference requests; a bound
    /// token from another (or no) certificate is refused 401 /
    /// UNAUTHENTICATED. Needs `tls.client_ca`. TOML
    /// `auth_token_identities`, as long as `auth_tokens` or empty. Default
    /// `[]`: no token is bound.
    pub auth_token_identities: Vec<String>,
    /// Whether the health endpoints (`/v2/health/*`, `/v2/models/{m}/ready`
    /// and their gRPC twins) answer without a token, for load balancers and
    /// readiness probes. TOML `auth_exempt_health`. Default `true`.
    pub auth_exempt_health: bool,
    /// Largest request accepted, in bytes: a QUIC native frame, a REST body
    /// (HTTP/1.1, HTTP/2, HTTP/3) or a gRPC message; a larger one is refused
    /// before it is read whole. TOML `max_frame_bytes`. Default 16 MiB
    /// (16 777 216), range 1 KiB..=1 GiB. Worst case per connection:
    /// `max_concurrent_streams × max_frame_bytes`.
    pub max_frame_bytes: u32,
    /// The request-memory budget: bytes of requests held at once over every
    /// connection, protocol and model, from the moment a request's length is
    /// known (a QUIC native frame's header, a REST `Content-Length`, or as a
    /// body without one arrives; a gRPC message once decoded) until its
    /// answer is sent, queued, computing or sent upstream alike. A request
    /// that would pass it is refused with the protocol's overload answer
    /// (HTTP 503 + `Retry-After`, gRPC and native `UNAVAILABLE`) before its
    /// body is read where its length is announced. Gauge
    /// `quiver_inflight_bytes`. TOML `max_inflight_bytes`. Default 1 GiB
    /// (1 073 741 824), range 1 MiB..=1 TiB, and at least `max_frame_bytes`.
    /// The process's request memory is this plus each request's decoded
    /// copy (tensors), bounded by the same figure again.
    pub max_inflight_bytes: u64,
    /// Streams a client may open at once on one QUIC connection. TOML
    /// `max_concurrent_streams`. Default 256, range 1..=65535.
    pub max_concurrent_streams: u32,
    /// Client connections held at once; more are refused. TOML
    /// `max_connections`. Default 1024, range 1..=1 048 576.
    pub max_connections: u32,
    /// Client connections held at once from one source address (IP), per
    /// listener (QUIC, REST, gRPC); more from that address are refused (REST:
    /// 503 with `Retry-After`; QUIC: the handshake is refused), so one host
    /// cannot take every place of `max_connections`. Clients behind one NAT
    /// share an address: size it for them. TOML `max_connections_per_source`.
    /// Default 256, range 1..=1 048 576.
    pub max_connections_per_source: u32,
    /// New QUIC handshakes per second above which the server makes each
    /// client whose address is not yet validated prove it with a Retry
    /// (one round trip more), so a flood of Initial packets from spoofed
    /// addresses costs the server a stateless reply each, not a handshake.
    /// TOML `quic_retry_above_per_sec`. Default 256, range 0..=1 048 576;
    /// 0 asks every new client for a Retry.
    pub quic_retry_above_per_sec: u32,
    /// A connection with no traffic for this long is closed. TOML
    /// `idle_timeout_ms`, milliseconds. Default 30 000 (30 s), range
    /// 1..=3 600 000 (1 h).
    pub idle_timeout: Duration,
    /// Longest a client may take to send one request once it has started:
    /// a QUIC native request's frame from the stream's opening, a REST body
    /// (HTTP/1.1, HTTP/2, HTTP/3) from its headers. A slower request is
    /// answered with a timeout (HTTP 408; native DEADLINE_EXCEEDED) and its
    /// bytes are released, so a client that announces a length and stalls
    /// holds nothing for long. TOML `request_read_timeout_ms`, milliseconds.
    /// Default 10 000 (10 s), range 1..=3 600 000 (1 h).
    pub request_read_timeout: Duration,
    /// Longest an HTTP/1.1 client may take to send a request's headers, from
    /// the first byte of the request (slowloris: a connection that trickles
    /// its header a byte at a time is closed when this passes). TOML
    /// `header_read_timeout_ms`, milliseconds. Default 10 000 (10 s), range
    /// 1..=3 600 000 (1 h).
    pub header_read_timeout: Duration,
    /// The slowest a REST request body (HTTP/1.1, HTTP/2, HTTP/3) may arrive, in
    /// bytes per second on average since its headers, checked once the
    /// first [`Server::MIN_BODY_RATE_GRACE`] has passed: a slower body is
    /// answered 408 and its bytes released before `request_read_timeout`
    /// would. TOML `min_body_bytes_per_sec`. Default 1024, range
    /// 0..=1 073 741 824; 0 turns the check off.
    pub min_body_bytes_per_sec: u32,
    /// On SIGINT or SIGTERM, how long in-flight requests may drain before
    /// the process exits. TOML `shutdown_grace_ms`, milliseconds. Default
    /// 10 000 (10 s), range 0..=600 000 (10 min); 0 exits without draining.
    pub shutdown_grace: Duration,
    /// Requests per second each client may send to each model, sustained:
    /// a token bucket (GCRA) per client, keyed by its bearer token when
    /// tokens are configured, else by its source address. Past it, HTTP 429
    /// with `Retry-After`, gRPC and native `RESOURCE_EXHAUSTED`, before any
    /// work, so one greedy client cannot push others past their deadlines.
    /// A model's own `rate_limit_per_sec` overrides it. TOML
    /// `rate_limit_per_sec`. Default 0 (off), range 0..=1 048 576.
    pub rate_limit_per_sec: u32,
    /// Requests a client may send at once above its rate (the bucket's
    /// size). TOML `rate_limit_burst`. Default: the rate (one second's
    /// worth), range 1..=1 048 576.
    pub rate_limit_burst: Option<u32>,
    /// A model repository: `DIR/NAME/model.toml` (the `[[models]]` table of
    /// model NAME, without `name` and `path`) and `DIR/NAME/VERSION/` (its
    /// weights, integer versions as in Triton), served beside the inline
    /// `[[models]]`. TOML `model_repository`, a directory. Default none.
    pub model_repository: Option<PathBuf>,
    /// When repository models load: see [`ModelControl`]. TOML
    /// `model_control`. Default `"none"`.
    pub model_control: ModelControl,
    /// With `model_control = "poll"`, how often the repository is rescanned.
    /// TOML `repository_poll_ms`, milliseconds. Default 5000, range
    /// 100..=3 600 000.
    pub repository_poll: Duration,
}

impl Server {
    /// Default of [`Server::quic_listen`]: `0.0.0.0:4433`.
    pub const DEFAULT_QUIC_LISTEN: SocketAddr =
        SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 4433));
    /// Default of [`Server::metrics_listen`]: `0.0.0.0:8002` (Triton's port).
    pub const DEFAULT_METRICS_LISTEN: SocketAddr =
        SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 8002));
    /// Default of [`Server::http_listen`]: `0.0.0.0:8000` (Triton's port).
    pub const DEFAULT_HTTP_LISTEN: SocketAddr =
        SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 8000));
    /// Default of [`Server::grpc_listen`]: `0.0.0.0:8001` (Triton's port).
    pub const DEFAULT_GRPC_LISTEN: SocketAddr =
        SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 8001));
    /// Default of [`Server::max_frame_bytes`]: 16 MiB.
    pub const DEFAULT_MAX_FRAME_BYTES: u32 = 16 << 20;
    /// Default of [`Server::max_inflight_bytes`]: 1 GiB.
    pub const DEFAULT_MAX_INFLIGHT_BYTES: u64 = 1 << 30;
    /// Default of [`Server::max_concurrent_streams`].
    pub const DEFAULT_MAX_CONCURRENT_STREAMS: u32 = 256;
    /// Default of [`Server::max_connections`].
    pub const DEFAULT_MAX_CONNECTIONS: u32 = 1024;
    /// Default of [`Server::max_connections_per_source`].
    pub const DEFAULT_MAX_CONNECTIONS_PER_SOURCE: u32 = 256;
    /// Default of [`Server::request_read_timeout`]: 10 s.
    pub const DEFAULT_REQUEST_READ_TIMEOUT: Duration = Duration::from_millis(10_000);
    /// Default of [`Server::quic_retry_above_per_sec`].
    pub const DEFAULT_QUIC_RETRY_ABOVE_PER_SEC: u32 = 256;
    /// Default of [`Server::header_read_timeout`]: 10 s.
    pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_millis(10_000);
    /// Default of [`Server::min_body_bytes_per_sec`]: 1 KiB/s.
    pub const DEFAULT_MIN_BODY_BYTES_PER_SEC: u32 = 1024;
    /// How long a body may take before [`Server::min_body_bytes_per_sec`]
    /// is checked: a slow start (TCP slow start, a client that computes its
    /// tensors while sending) is not a slow client.
    pub const MIN_BODY_RATE_GRACE: Duration = Duration::from_secs(2);
    /// Default of [`Server::idle_timeout`]: 30 s.
    pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_millis(30_000);
    /// Default of [`Server::shutdown_grace`]: 10 s.
    pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_millis(10_000);
    /// Default of [`Server::repository_poll`]: 5 s.
    pub const DEFAULT_REPOSITORY_POLL: Duration = Duration::from_millis(5000);
}

impl Default for Server {
    fn default() -> Self {
        Server {
            quic_listen: Server::DEFAULT_QUIC_LISTEN,
            metrics_listen: Some(Server::DEFAULT_METRICS_LISTEN),
            http_listen: Some(Server::DEFAULT_HTTP_LISTEN),
            grpc_listen: Some(Server::DEFAULT_GRPC_LISTEN),
            https_listen: None,
            grpcs_listen: None,
            auth_tokens: Vec::new(),
            auth_token_identities: Vec::new(),
            auth_exempt_health: true,
            max_frame_bytes: Server::DEFAULT_MAX_FRAME_BYTES,
            max_inflight_bytes: Server::DEFAULT_MAX_INFLIGHT_BYTES,
            max_concurrent_streams: Server::DEFAULT_MAX_CONCURRENT_STREAMS,
            max_connections: Server::DEFAULT_MAX_CONNECTIONS,
            max_connections_per_source: Server::DEFAULT_MAX_CONNECTIONS_PER_SOURCE,
            quic_retry_above_per_sec: Server::DEFAULT_QUIC_RETRY_ABOVE_PER_SEC,
            idle_timeout: Server::DEFAULT_IDLE_TIMEOUT,
            request_read_timeout: Server::DEFAULT_REQUEST_READ_TIMEOUT,
            header_read_timeout: Server::DEFAULT_HEADER_READ_TIMEOUT,
            min_body_bytes_per_sec: Server::DEFAULT_MIN_BODY_BYTES_PER_SEC,
            shutdown_grace: Server::DEFAULT_SHUTDOWN_GRACE,
            rate_limit_per_sec: 0,
            rate_limit_burst: None,
            model_repository: None,
            model_control: ModelControl::None,
            repository_poll: Server::DEFAULT_REPOSITORY_POLL,
        }
    }
}

/// When the models of `server.model_repository` load and unload, as
/// Triton's `--model-control-mode`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum ModelControl {
    /// Every repository model loads at start-up; later changes only through
    /// the repository API (`"none"`).
    #[default]
    None,
    /// As `None`, and the repository is rescanned every
    /// `repository_poll_ms`: new versions load, removed ones unload, a
    /// changed `model.toml` reloads (`"poll"`).
    Poll,
    /// Nothing from the repository loads until asked through the
    /// repository API (`"explicit"`).
    Explicit,
}

impl ModelControl {
    /// The TOML spelling.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            ModelControl::None => "none",
            ModelControl::Poll => "poll",
            ModelControl::Explicit => "explicit",
        }
    }
}

/// The arithmetic of an `embedding` model's linear layers ([`Model::precision`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Precision {
    /// f32 (`"fp32"`).
    #[default]
    Fp32,
    /// Dynamic int8 quantization (`"int8"`), on the CPU kernels only.
    Int8,
}

impl Precision {
    /// The TOML spelling.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Precision::Fp32 => "fp32",
            Precision::Int8 => "int8",
        }
    }
}

/// Which engine runs an `onnx` model ([`Model::engine`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum OnnxEngine {
    /// ONNX Runtime on the CPU when its library opens, else candle-onnx
    /// (with a warning); candle-onnx on CUDA (`"auto"`).
    #[default]
    Auto,
    /// ONNX Runtime, or the load fails (`"onnxruntime"`).
    OnnxRuntime,
    /// candle-onnx, on every device (`"candle"`).
    Candle,
}

impl OnnxEngine {
    /// The TOML spelling.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            OnnxEngine::Auto => "auto",
            OnnxEngine::OnnxRuntime => "onnxruntime",
            OnnxEngine::Candle => "candle",
        }
    }

    /// The engine a TOML spelling names.
    #[must_use]
    pub fn from_name(name: &str) -> Option<OnnxEngine> {
        match name {
            "auto" => Some(OnnxEngine::Auto),
            "onnxruntime" => Some(OnnxEngine::OnnxRuntime),
            "candle" => Some(OnnxEngine::Candle),
            _ => None,
        }
    }
}

/// How a request picks one of a model's devices.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Placement {
    /// The device with the earliest predicted completion (`"earliest"`).
    #[default]
    Earliest,
    /// Each device in turn, whatever its queue (`"round-robin"`).
    RoundRobin,
}

/// A simulated device's service time (`[models.sim]`): a batch of `rows`
/// rows and `tokens` padded tokens takes `fixed_us + per_row_us × rows +
/// per_token_ns × tokens / 1000` µs, times device `sim:N`'s
/// `slowdown_pct[N] / 100` (100 where not given), with uniform jitter of
/// ±`jitter_pct` %, spent sleeping (the outputs are the model's, computed on
/// the CPU first).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SimDevice {
    /// Per batch, µs. TOML `fixed_us`. Default 1000, range 0..=10 000 000.
    pub fixed_us: u64,
    /// Per row, µs. TOML `per_row_us`. Default 0, range 0..=10 000 000.
    pub per_row_us: u64,
    /// Per padded token, ns. TOML `per_token_ns`. Default 0, range
    /// 0..=10 000 000.
    pub per_token_ns: u64,
    /// Uniform jitter, % of the time. TOML `jitter_pct`. Default 0, range
    /// 0..=100.
    pub jitter_pct: u32,
    /// Seed of the jitter. TOML `seed`. Default 0.
    pub seed: u64,
    /// Per simulated ordinal, the time in % of the model's (100: as is, 300:
    /// three times as slow). TOML `slowdown_pct`, each 1..=100 000. Default
    /// empty (all 100).
    pub slowdown_pct: Vec<u32>,
}

impl Default for SimDevice {
    fn default() -> Self {
        SimDevice {
            fixed_us: 1000,
            per_row_us: 0,
            per_token_ns: 0,
            jitter_pct: 0,
            seed: 0,
            slowdown_pct: Vec::new(),
        }
    }
}

/// Which versions of a repository model are served (`version_policy`), as
/// Triton's version policy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VersionPolicy {
    /// The newest N versions (`{ latest = N }`, N in 1..=64).
    Latest(u32),
    /// Every version in the repository (`"all"`).
    All,
    /// Exactly these versions (`{ specific = [1, 3] }`).
    Specific(Vec<u64>),
}

impl Default for VersionPolicy {
    fn default() -> Self {
        VersionPolicy::Latest(1)
    }
}

impl VersionPolicy {
    /// The versions served out of those `available`, newest last.
    #[must_use]
    pub fn select(&self, available: &[u64]) -> Vec<u64> {
        let mut sorted = available.to_vec();
        sorted.sort_unstable();
        sorted.dedup();
        match self {
            VersionPolicy::Latest(n) => {
                let keep = (*n as usize).min(sorted.len());
                sorted.split_off(sorted.len() - keep)
            }
            VersionPolicy::All => sorted,
            VersionPolicy::Specific(wanted) => {
                sorted.retain(|v| wanted.contains(v));
                sorted
            }
        }
    }
}

/// The certificate of the listeners (`[tls]`): both files or neither.
///
/// With neither, a self-signed certificate is made at start-up (and its
/// fingerprint printed). TLS 1.3 is always on for QUIC.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct Tls {
    /// PEM file with the certificate chain, leaf first. TOML `cert`.
    /// Default none.
    pub cert: Option<PathBuf>,
    /// PEM file with the private key of `cert`. TOML `key`. Default none.
    pub key: Option<PathBuf>,
    /// PEM file with the CA certificates that client certificates must
    /// chain to. When set, every connection to the QUIC listener (native
    /// and HTTP/3), `https_listen` and `grpcs_listen` must present a valid,
    /// unexpired client certificate, and its identity (first URI SAN, else
    /// first DNS SAN, else its SHA-256 fingerprint) keys its rate limit.
    /// TOML `client_ca`. Default none: no client certificates.
    pub client_ca: Option<PathBuf>,
}

/// One served model (`[[models]]`), with its batcher's knobs.
///
/// Request bytes queued for one model: at most
/// `queue_capacity × priority_levels × server.max_frame_bytes` by the
/// queue's shape (defaults: 1024 × 2 × 16 MiB = 32 GiB; see
/// [`Model::worst_case_queued_bytes`]), and at most
/// [`Server::max_inflight_bytes`] for all models together, the real bound.
#[derive(Clone, Debug, PartialEq)]
pub struct Model {
    /// Name clients ask for (`/v2/models/{name}`). Required; 1 to 128 of
    /// `A-Z a-z 0-9 _ . -`, not `.` or `..`, unique in the file.
    pub name: String,
    /// What the model computes. Required: `"identity"`, `"mlp"`, `"embedding"`,
    /// `"trees"` or `"onnx"`.
    pub kind: ModelKind,
    /// Model directory in the Hugging Face layout (for `mlp`: `config.json`
    /// and `model.safetensors`; for `embedding`: a sentence-transformers
    /// directory with `tokenizer.json` too; for `trees`: an XGBoost JSON or
    /// LightGBM text model file, or a directory holding one `model.json` or
    /// `model.txt`; for `onnx`: a `.onnx` file, or a directory holding
    /// `model.onnx`). An `mlp` needs `path` or `demo`, not both; an
    /// `embedding`, `trees` and `onnx` need `path`; `identity` takes neither.
    /// Default none.
    pub path: Option<PathBuf>,
    /// `mlp` only, instead of `path`: deterministic demo weights
    /// (`[models.demo]`). Default none.
    pub demo: Option<MlpDemo>,
    /// Device that runs the model: `"cpu"`, `"cuda"` (the first GPU) or
    /// `"cuda:N"`. Default `"cpu"`.
    pub device: String,
    /// `embedding` only: on the `cpu` device, run the BERT encoder on
    /// Quiver's own vectorised, multi-threaded CPU kernels (GELU, softmax,
    /// layer norm, attention) instead of candle-transformers' stock BERT;
    /// same weights, results within the reference bounds, 1.4–2.7× the
    /// throughput on MiniLM at batch 8 and above (`benches/README.md`).
    /// `false` keeps stock candle (for comparison, or a CPU where the
    /// kernels misbehave). No effect on a `cuda` device. TOML
    /// `cpu_kernels`; set on another kind it is an error. Default true.
    pub cpu_kernels: bool,
    /// `embedding` only: the arithmetic of the BERT encoder's linear layers.
    /// `"fp32"`; or `"int8"`, dynamic quantization: weights quantized once at
    /// load to int8 per output channel, activations to u8 per row as the
    /// model runs, integer products (AVX-512 VNNI, AVX2 or scalar, picked at
    /// run time), bias and GELU in f32 after dequantization; attention,
    /// softmax and layer norm stay f32. Embeddings within cosine 0.995 of
    /// fp32 on the reference sentences, 2.3–4.3× the throughput on MiniLM
    /// with AVX-512 VNNI (`benches/README.md`). Int8 runs on Quiver's CPU kernels only: with a
    /// `cuda` device or `cpu_kernels = false` it is an error. TOML
    /// `precision`; set on another kind it is an error. Default `"fp32"`.
    pub precision: Precision,
    /// `embedding` only: what happens to a text longer than the model's
    /// `max_seq_length` tokens when its request does not say (a KServe
    /// `truncate` parameter, `/embed`'s `truncate`). `true`: it is cut to
    /// the limit (the response counts the inputs cut); `false`: the request
    /// is refused with 413 naming the token count and the limit. TOML
    /// `auto_truncate`; set on another kind it is an error. Default true
    /// (what every route did before it was a choice).
    pub auto_truncate: bool,
    /// `embedding` only: form batches of texts of similar token length, so
    /// that a batch mixing short and long texts does not pad every short one
    /// to the longest. The most urgent request anchors each batch, which
    /// takes the queued requests whose lengths stay within
    /// `max_length_ratio` of each other, earliest deadline first; the
    /// scheduler keeps the plain earliest-deadline-first batch where its
    /// latency model says grouping would not pay, or where a request passed
    /// over would miss its deadline (quiver-batching's `LengthGrouping`).
    /// TOML `length_grouping`; set on another kind it is an error. Default
    /// false: on MiniLM it cuts the padding from 1.7 to 1.25 padded tokens
    /// per real token and serves about 40 % more sentences a second, but
    /// gateways serving two MiniLM models stalled in runs not yet explained
    /// (benches/README.md, "Length grouping").
    pub length_grouping: bool,
    /// `embedding` only: the longest over the shortest token length in a
    /// grouped batch, which bounds its padded tokens per real token. TOML
    /// `max_length_ratio`, a number. Default 2.0, range 1.0..=16.0.
    pub max_length_ratio: f64,
    /// `trees` only: serve the raw scores (margins) instead of probabilities,
    /// as XGBoost's `output_margin=True` and LightGBM's `raw_score=True`.
    /// TOML `output_margin`; set on another kind it is an error. Default
    /// false.
    pub output_margin: bool,
    /// `onnx` only: the engine that runs the graph (see [`OnnxEngine`]):
    /// `"auto"` runs ONNX Runtime on the CPU when its shared library opens
    /// (`ORT_DYLIB_PATH`, e.g. PyPI's onnxruntime wheel's
    /// `onnxruntime/capi/libonnxruntime.so.1.31.1`), else candle-onnx with a
    /// warning, and candle-onnx on `cuda`; `"onnxruntime"` fails the load
    /// when the library does not open (and on `cuda`); `"candle"` always
    /// runs candle-onnx. TOML `engine`; set on another kind it is an error.
    /// Default `"auto"`.
    pub engine: OnnxEngine,
    /// Most requests (rows) in one batch. TOML `max_batch_size`. Default 32,
    /// range 1..=4096.
    pub max_batch_size: u32,
    /// Most padded tokens in one batch (rows × longest sequence); bounds the
    /// activation memory of one batch. TOML `max_batch_tokens`. Default
    /// 16 384, range 1..=16 777 216, and at least `max_batch_size`.
    pub max_batch_tokens: u32,
    /// Longest a request waits for its batch to fill before the batch is
    /// dispatched anyway. TOML `max_queue_delay_us`, microseconds. Default
    /// 2000 (2 ms), range 0..=10 000 000 (10 s); 0 dispatches at once.
    pub max_queue_delay: Duration,
    /// Requests queued per priority lane; a full lane answers `Overloaded`.
    /// TOML `queue_capacity`. Default 1024, range 1..=1 048 576. Worst case
    /// `queue_capacity × priority_levels × server.max_frame_bytes` bytes
    /// queued for this model.
    pub queue_capacity: u32,
    /// Priority lanes of the admission queue (0 is the most urgent). TOML
    /// `priority_levels`. Default 2, range 1..=16.
    pub priority_levels: u8,
    /// Deadline of a request that sends none. TOML `default_timeout_ms`,
    /// milliseconds. Default 1000 (1 s), range 1..=3 600 000 (1 h).
    pub default_timeout: Duration,
    /// Batches on the device at once (1: one batch computes while the next
    /// one forms). TOML `max_in_flight`. Default 1, range 1..=8. Worst case
    /// `max_in_flight` batches of activation memory on the device.
    pub max_in_flight: u32,
    /// A batch predicted (by the latency model) to take at most this long
    /// runs inline on the request's own front-end thread when the device is
    /// idle and nothing is queued, skipping the two thread hand-offs that
    /// cost more than a microsecond model (identity, a small MLP, trees).
    /// It is also the stated bound on how long such a batch holds an async
    /// runtime thread, as predicted. CPU devices only: a CUDA device's calls
    /// stay on its device thread. TOML `inline_below_us`, microseconds.
    /// Default 50, range 0..=1000; 0 sends every request through the
    /// device thread.
    pub inline_below: Duration,
    /// How long the device thread spins watching for work before it sleeps:
    /// while requests keep arriving it never parks, and admitting one costs
    /// an atomic swap rather than a futex wake-up, for up to this much CPU
    /// each time the queue runs dry. Worth it with a core to spare per
    /// device (a GPU box); where the cores are all busy (two cores shared
    /// with the clients) the spin takes CPU from the requests it waits for
    /// (benches/README.md, "Per-request cost on the QUIC path"). TOML
    /// `idle_spin_us`, microseconds. Default 0 (sleep at once), range
    /// 0..=1000.
    pub idle_spin: Duration,
    /// Consecutive failed batches (a model error or a panic in `forward`)
    /// after which the device is marked unhealthy: its traffic then goes to
    /// the upstreams, or is refused with 503 / UNAVAILABLE when there are
    /// none, the model's ready endpoint says not ready, and a one-row probe
    /// batch each second brings it back once it succeeds. TOML
    /// `unhealthy_after_failures`. Default 3, range 1..=1000.
    pub unhealthy_after_failures: u32,
    /// This model's per-client rate, overriding `server.rate_limit_per_sec`
    /// (0 turns it off for this model). TOML `rate_limit_per_sec`. Default:
    /// the server's.
    pub rate_limit_per_sec: Option<u32>,
    /// This model's per-client burst, overriding `server.rate_limit_burst`.
    /// TOML `rate_limit_burst`. Default: the server's when the rate is the
    /// server's, else the model's rate.
    pub rate_limit_burst: Option<u32>,
    /// Where requests may run: the local device, upstreams, or the local
    /// device first (see [`Routing`]). TOML `routing`. Default
    /// `"local-first"`.
    pub routing: Routing,
    /// The upstream pool requests overflow to (`[models.upstream]`).
    /// Default none: the model is served locally only.
    pub upstream: Option<Upstream>,
    /// Several devices for this model (replicas), instead of `device`:
    /// e.g. `["cuda:0", "cuda:1"]` or `["sim:0", "sim:1"]`. Each has its
    /// own scheduler, latency model and health; a request goes to the one
    /// with the earliest predicted completion that meets its deadline. TOML
    /// `devices`, 1 to 16 distinct devices; excludes `device`. Default
    /// empty: the one `device`.
    pub devices: Vec<String>,
    /// How a request picks one of several `devices`: `"earliest"` (the
    /// earliest predicted completion that meets its deadline) or
    /// `"round-robin"` (in turn, for comparison). TOML `placement`.
    /// Default `"earliest"`.
    pub placement: Placement,
    /// The service time of the model's simulated devices (`sim:N`), a
    /// benchmarking and testing tool (`[models.sim]`). Required with a
    /// `sim:N` device, refused without one. Default none.
    pub sim: Option<SimDevice>,
    /// Which versions of a repository model are served. TOML
    /// `version_policy`: `"all"`, `{ latest = N }` or `{ specific = [..] }`.
    /// Default `{ latest = 1 }`. An inline `[[models]]` table is version 1.
    pub version_policy: VersionPolicy,
}

impl Model {
    /// Default of [`Model::device`].
    pub const DEFAULT_DEVICE: &'static str = "cpu";
    /// Default of [`Model::cpu_kernels`].
    pub const DEFAULT_CPU_KERNELS: bool = true;
    /// Default of [`Model::auto_truncate`].
    pub const DEFAULT_AUTO_TRUNCATE: bool = true;
    /// Default of [`Model::length_grouping`].
    pub const DEFAULT_LENGTH_GROUPING: bool = false;
    /// Default of [`Model::max_length_ratio`].
    pub const DEFAULT_MAX_LENGTH_RATIO: f64 = 2.0;
    /// Default of [`Model::output_margin`].
    pub const DEFAULT_OUTPUT_MARGIN: bool = false;
    /// Default of [`Model::max_batch_size`].
    pub const DEFAULT_MAX_BATCH_SIZE: u32 = 32;
    /// Default of [`Model::max_batch_tokens`].
    pub const DEFAULT_MAX_BATCH_TOKENS: u32 = 16_384;
    /// Default of [`Model::max_queue_delay`]: 2 ms.
    pub const DEFAULT_MAX_QUEUE_DELAY: Duration = Duration::from_micros(2000);
    /// Default of [`Model::queue_capacity`].
    pub const DEFAULT_QUEUE_CAPACITY: u32 = 1024;
    /// Default of [`Model::priority_levels`].
    pub const DEFAULT_PRIORITY_LEVELS: u8 = 2;
    /// Default of [`Model::default_timeout`]: 1 s.
    pub const DEFAULT_DEFAULT_TIMEOUT: Duration = Duration::from_millis(1000);
    /// Default of [`Model::max_in_flight`].
    pub const DEFAULT_MAX_IN_FLIGHT: u32 = 1;
    /// Default of [`Model::inline_below`]: 50 µs.
    pub const DEFAULT_INLINE_BELOW: Duration = Duration::from_micros(50);
    /// Default of [`Model::idle_spin`]: none.
    pub const DEFAULT_IDLE_SPIN: Duration = Duration::ZERO;
    /// Default of [`Model::unhealthy_after_failures`].
    pub const DEFAULT_UNHEALTHY_AFTER_FAILURES: u32 = 3;

    /// A model of `kind` named `name` with every other knob on its default
    /// (no `path`, no `demo`).
    #[must_use]
    pub fn new(name: impl Into<String>, kind: ModelKind) -> Model {
        Model {
            name: name.into(),
            kind,
            path: None,
            demo: None,
            device: Model::DEFAULT_DEVICE.to_owned(),
            cpu_kernels: Model::DEFAULT_CPU_KERNELS,
            precision: Precision::Fp32,
            auto_truncate: Model::DEFAULT_AUTO_TRUNCATE,
            length_grouping: Model::DEFAULT_LENGTH_GROUPING,
            max_length_ratio: Model::DEFAULT_MAX_LENGTH_RATIO,
            output_margin: Model::DEFAULT_OUTPUT_MARGIN,
            engine: OnnxEngine::Auto,
            max_batch_size: Model::DEFAULT_MAX_BATCH_SIZE,
            max_batch_tokens: Model::DEFAULT_MAX_BATCH_TOKENS,
            max_queue_delay: Model::DEFAULT_MAX_QUEUE_DELAY,
            queue_capacity: Model::DEFAULT_QUEUE_CAPACITY,
            priority_levels: Model::DEFAULT_PRIORITY_LEVELS,
            default_timeout: Model::DEFAULT_DEFAULT_TIMEOUT,
            max_in_flight: Model::DEFAULT_MAX_IN_FLIGHT,
            inline_below: Model::DEFAULT_INLINE_BELOW,
            idle_spin: Model::DEFAULT_IDLE_SPIN,
            unhealthy_after_failures: Model::DEFAULT_UNHEALTHY_AFTER_FAILURES,
            rate_limit_per_sec: None,
            rate_limit_burst: None,
            routing: Routing::LocalFirst,
            upstream: None,
            version_policy: VersionPolicy::default(),
            devices: Vec::new(),
            placement: Placement::Earliest,
            sim: None,
        }
    }

    /// The devices the model runs on: `devices`, else the one `device`.
    #[must_use]
    pub fn device_list(&self) -> Vec<String> {
        if self.devices.is_empty() {
            vec![self.device.clone()]
        } else {
            self.devices.clone()
        }
    }

    /// The CUDA ordinal of [`Model::device`]: `None` for `cpu`, `Some(0)`
    /// for `cuda`, `Some(n)` for `cuda:n`; `None` also for a spelling that
    /// [`Config::validate`] rejects.
    #[must_use]
    pub fn cuda_ordinal(&self) -> Option<u32> {
        validate::parse_device(&self.device).ok().flatten()
    }

    /// Upper bound of the request bytes queued for this model:
    /// `queue_capacity × priority_levels × max_frame_bytes`.
    #[must_use]
    pub fn worst_case_queued_bytes(&self, max_frame_bytes: u32) -> u64 {
        u64::from(self.queue_capacity)
            * u64::from(self.priority_levels)
            * u64::from(max_frame_bytes)
    }
}

/// What a model computes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModelKind {
    /// Echoes its input: measures the serving overhead alone.
    Identity,
    /// A tabular multi-layer perceptron (dense layers).
    Mlp,
    /// A BERT-family sentence-embedding model (text in, a vector out).
    Embedding,
    /// A gradient-boosted tree ensemble (XGBoost JSON or LightGBM text).
    Trees,
    /// An ONNX graph (`model.onnx`), run by candle-onnx on any device.
    Onnx,
}

impl ModelKind {
    /// Every kind, in the order of the error message that lists them.
    pub const ALL: [ModelKind; 5] = [
        ModelKind::Identity,
        ModelKind::Mlp,
        ModelKind::Embedding,
        ModelKind::Trees,
        ModelKind::Onnx,
    ];

    /// The spelling in the TOML file: `"identity"`, `"mlp"`, `"embedding"`,
    /// `"trees"` or `"onnx"`.
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            ModelKind::Identity => "identity",
            ModelKind::Mlp => "mlp",
            ModelKind::Embedding => "embedding",
            ModelKind::Trees => "trees",
            ModelKind::Onnx => "onnx",
        }
    }

    /// The kind spelled `text`, if any (exact, lower case).
    #[must_use]
    pub fn from_name(text: &str) -> Option<ModelKind> {
        ModelKind::ALL
            .into_iter()
            .find(|kind| kind.as_str() == text)
    }
}

impl fmt::Display for ModelKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Deterministic demo weights for an `mlp` (`[models.demo]`): a model that
/// serves without a model directory.
///
/// Weights take `4 × Σ (fan_in + 1) × fan_out` bytes (f32, with biases)
/// over the layers `inputs → hidden… → outputs`; at most 2^28 parameters
/// (1 GiB) are accepted.
#[derive(Clone, Debug, PartialEq)]
pub struct MlpDemo {
    /// Input features per row. Default 16, range 1..=65536.
    pub inputs: u32,
    /// Width of each hidden layer, in order. Default `[64]`; 0 to 16
    /// layers, each 1..=65536 wide.
    pub hidden: Vec<u32>,
    /// Output features per row. Default 4, range 1..=65536.
    pub outputs: u32,
    /// Activation after each hidden layer: `relu`, `gelu`, `tanh`,
    /// `sigmoid` or `none`. Default `relu`.
    pub activation: String,
    /// Seed of the weight generator: the same seed gives the same weights.
    /// Default 42, range 0..=2^63−1 (a TOML integer).
    pub seed: u64,
}

impl MlpDemo {
    /// The accepted spellings of [`MlpDemo::activation`].
    pub const ACTIVATIONS: [&'static str; 5] = ["relu", "gelu", "tanh", "sigmoid", "none"];

    /// Parameters (weights and biases) of the demo model.
    #[must_use]
    pub fn parameter_count(&self) -> u64 {
        let mut widths = Vec::with_capacity(self.hidden.len() + 2);
        widths.push(self.inputs);
        widths.extend_from_slice(&self.hidden);
        widths.push(self.outputs);
        widths
            .windows(2)
            .map(|pair| (u64::from(pair[0]) + 1) * u64::from(pair[1]))
            .sum()
    }
}

impl Default for MlpDemo {
    fn default() -> Self {
        MlpDemo {
            inputs: 16,
            hidden: vec![64],
            outputs: 4,
            activation: "relu".to_owned(),
            seed: 42,
        }
    }
}

/// Every error found in a configuration; `Display` writes one
/// `path: message` per line.
#[derive(Debug, thiserror::Error, PartialEq)]
#[error("{}", render_lines(errors))]
pub struct ConfigError {
    /// The errors, in the order of the file, cross-field errors after the
    /// fields they join.
    pub errors: Vec<FieldError>,
}

impl ConfigError {
    /// The paths of the errors, in order (for tests and summaries).
    #[must_use]
    pub fn paths(&self) -> Vec<&str> {
        self.errors
            .iter()
            .map(|error| error.path.as_str())
            .collect()
    }
}

fn render_lines(errors: &[FieldError]) -> String {
    errors
        .iter()
        .map(FieldError::to_string)
        .collect::<Vec<_>>()
        .join("\n")
}

/// One error at one place of the file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldError {
    /// Where: a key path such as `models[1].max_batch_size`, `models` or
    /// `tls.key`; `<file>` when the file could not be read; for a TOML
    /// syntax error, the line and column (`line 3, column 7`).
    pub path: String,
    /// What is wrong, and what was found.
    pub message: String,
}

impl FieldError {
    /// An error at `path`.
    pub fn new(path: impl Into<String>, message: impl Into<String>) -> FieldError {
        FieldError {
            path: path.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}
