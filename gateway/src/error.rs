//! The gateway's one error type.
//!
//! [`GatewayError::kind`] says which [`ErrorKind`] each error is; the maps
//! from a kind to the wire status of each protocol live in
//! `quiver_protocol::status` (DESIGN.md, "Wire protocols"). This module also
//! says whose fault an error is and whether a retry can help.

use std::time::Duration;

use quiver_batching::RejectReason;
use quiver_kernels::InputError;
use quiver_protocol::DecodeError;
pub use quiver_protocol::status::{Code, ErrorKind, HttpStatus};

/// Why a request got no result.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GatewayError {
    /// The request is malformed (bad frame, bad parameter, unknown output).
    #[error("invalid request: {0}")]
    InvalidArgument(String),
    /// An input does not fit the model's signature.
    #[error("invalid input: {0}")]
    Input(#[from] InputError),
    /// No model of that name is served here.
    #[error("unknown model '{0}'")]
    UnknownModel(String),
    /// A repository or configuration request (load, unload, reload) that
    /// failed; what was serving still serves.
    #[error("{0}")]
    Repository(String),
    /// The model serves, but not that version.
    #[error("model '{model}' has no version '{version}' serving (serving: {serving})")]
    UnknownVersion {
        model: String,
        version: String,
        /// The versions that serve, e.g. `1, 2`.
        serving: String,
    },
    /// The request is larger than the configured limit; it was not read whole.
    #[error("request of {got} bytes exceeds the limit of {limit} bytes")]
    TooLarge { limit: u64, got: u64 },
    /// The client did not send its whole request within
    /// `server.request_read_timeout_ms` of starting it (a length announced,
    /// then a stall): its bytes are released.
    #[error("the request was not received within {0:?} (server.request_read_timeout_ms)")]
    RequestTimeout(Duration),
    /// A REST body arrived slower than `server.min_body_bytes_per_sec`
    /// allows (a slowloris body): its bytes are released.
    #[error(
        "the request body arrived too slowly: {received} bytes in {elapsed:?}, under server.min_body_bytes_per_sec {min_rate}"
    )]
    BodyTooSlow {
        received: u64,
        elapsed: Duration,
        min_rate: u32,
    },
    /// The request's bytes do not fit the request-memory budget
    /// (`server.max_inflight_bytes`) beside the requests held now; refused
    /// before its body is read where its length is announced.
    #[error(
        "the gateway holds {held} bytes of requests; {need} more would pass server.max_inflight_bytes {limit}"
    )]
    MemoryBudget { need: u64, held: u64, limit: u64 },
    /// The client sent more than its rate limit allows
    /// (`rate_limit_per_sec`): refused before any work.
    #[error(
        "{client} is over its rate limit of {per_sec} requests/s for model '{model}'; retry in {retry_after:?}"
    )]
    RateLimited {
        model: String,
        client: String,
        per_sec: u32,
        retry_after: Duration,
    },
    /// The model's admission lane is full.
    #[error("model '{model}' is overloaded: {reason}")]
    Overloaded { model: String, reason: RejectReason },
    /// The deadline cannot be met: rejected before any work.
    #[error("deadline of {timeout:?} cannot be met: predicted completion in {predicted:?}")]
    DeadlineUnreachable {
        timeout: Duration,
        predicted: Duration,
    },
    /// The deadline passed before the request could be computed.
    #[error("deadline exceeded before the request could be computed")]
    DeadlineExceeded,
    /// The model or its device failed.
    #[error("model '{model}' failed: {message}")]
    Model { model: String, message: String },
    /// The model's device failed `unhealthy_after_failures` batches in a
    /// row and no upstream can take the request: refused before any work
    /// until a probe batch succeeds.
    #[error(
        "model '{model}': its device is unhealthy (failed batches in a row) and no upstream can take the request"
    )]
    DeviceUnhealthy { model: String },
    /// The gateway is shutting down and takes no more work.
    #[error("the gateway is shutting down")]
    ShuttingDown,
    /// The client cancelled the request (reset its stream) before its answer.
    #[error("the client cancelled the request")]
    Cancelled,
    /// Bearer tokens are configured and the request carried none that
    /// matches.
    #[error("unauthenticated: {0}")]
    Unauthenticated(String),
    /// The request had to go to an upstream (the local device could not
    /// make its deadline, or the routing says so) and no upstream could take
    /// it in time: refused, or every try refused, before any work.
    #[error("model '{model}': no upstream can take the request: {reason}")]
    UpstreamUnavailable { model: String, reason: String },
    /// An upstream took the request and failed it (a transport failure after
    /// the request may have started, or an error status that is not the
    /// client's fault).
    #[error("model '{model}': upstream {endpoint} failed: {message}")]
    Upstream {
        model: String,
        endpoint: String,
        message: String,
    },
}

/// Whose fault an error is, for logs and metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    Client,
    Capacity,
    Device,
    Upstream,
    Gateway,
}

impl From<DecodeError> for GatewayError {
    fn from(e: DecodeError) -> Self {
        match e {
            DecodeError::Input(e) => GatewayError::Input(e),
            other => GatewayError::InvalidArgument(other.to_string()),
        }
    }
}

impl GatewayError {
    /// What kind of failure this is on the wire: each front end answers
    /// with that kind's status (`ErrorKind::http`, `grpc`, `native`).
    pub fn kind(&self) -> ErrorKind {
        match self {
            // A text over the model's token limit with truncation off: too large, as
            // text-embeddings-inference answers it (413).
            GatewayError::Input(InputError::TooLong { .. }) => ErrorKind::TooLarge,
            GatewayError::InvalidArgument(_)
            | GatewayError::Input(_)
            | GatewayError::Repository(_) => ErrorKind::InvalidArgument,
            GatewayError::Unauthenticated(_) => ErrorKind::Unauthenticated,
            GatewayError::UnknownModel(_) | GatewayError::UnknownVersion { .. } => {
                ErrorKind::NotFound
            }
            GatewayError::TooLarge { .. } => ErrorKind::TooLarge,
            GatewayError::Overloaded { .. } | GatewayError::RateLimited { .. } => {
                ErrorKind::Overloaded
            }
            GatewayError::DeadlineUnreachable { .. }
            | GatewayError::MemoryBudget { .. }
            | GatewayError::ShuttingDown
            | GatewayError::DeviceUnhealthy { .. }
            | GatewayError::UpstreamUnavailable { .. } => ErrorKind::Unavailable,
            GatewayError::Upstream { .. } => ErrorKind::BadGateway,
            GatewayError::DeadlineExceeded => ErrorKind::DeadlineExceeded,
            GatewayError::RequestTimeout(_) | GatewayError::BodyTooSlow { .. } => {
                ErrorKind::RequestTimeout
            }
            GatewayError::Model { .. } => ErrorKind::Internal,
            GatewayError::Cancelled => ErrorKind::Cancelled,
        }
    }

    /// Whose fault this is.
    pub fn fault(&self) -> Fault {
        match self {
            GatewayError::InvalidArgument(_)
            | GatewayError::Input(_)
            | GatewayError::UnknownModel(_)
            | GatewayError::UnknownVersion { .. }
            | GatewayError::Repository(_)
            | GatewayError::TooLarge { .. }
            | GatewayError::RequestTimeout(_)
            | GatewayError::BodyTooSlow { .. } => Fault::Client,
            GatewayError::Overloaded { .. }
            | GatewayError::MemoryBudget { .. }
            | GatewayError::DeadlineUnreachable { .. }
            | GatewayError::DeadlineExceeded => Fault::Capacity,
            GatewayError::Model { .. } | GatewayError::DeviceUnhealthy { .. } => Fault::Device,
            GatewayError::UpstreamUnavailable { .. } => Fault::Capacity,
            GatewayError::Upstream { .. } => Fault::Upstream,
            GatewayError::ShuttingDown => Fault::Gateway,
            GatewayError::Cancelled
            | GatewayError::Unauthenticated(_)
            | GatewayError::RateLimited { .. } => Fault::Client,
        }
    }

    /// Whether the same request may succeed if sent again later.
    pub fn retryable(&self) -> bool {
        matches!(
            self,
            GatewayError::Overloaded { .. }
                | GatewayError::RateLimited { .. }
                | GatewayError::MemoryBudget { .. }
                | GatewayError::DeadlineUnreachable { .. }
                | GatewayError::ShuttingDown
                | GatewayError::DeviceUnhealthy { .. }
                | GatewayError::UpstreamUnavailable { .. }
        )
    }

    /// A short label for the `outcome` of metrics.
    pub fn outcome(&self) -> &'static str {
        match self {
            GatewayError::InvalidArgument(_) | GatewayError::Input(_) => "invalid_argument",
            GatewayError::UnknownModel(_) | GatewayError::UnknownVersion { .. } => "unknown_model",
            GatewayError::Repository(_) => "repository_error",
            GatewayError::TooLarge { .. } => "too_large",
            GatewayError::RequestTimeout(_) => "request_timeout",
            GatewayError::BodyTooSlow { .. } => "body_too_slow",
            GatewayError::MemoryBudget { .. } => "memory_budget",
            GatewayError::Overloaded { .. } => "overloaded",
            GatewayError::RateLimited { .. } => "rate_limited",
            GatewayError::DeadlineUnreachable { .. } => "deadline_unreachable",
            GatewayError::DeadlineExceeded => "deadline_exceeded",
            GatewayError::Model { .. } => "model_error",
            GatewayError::ShuttingDown => "shutting_down",
            GatewayError::DeviceUnhealthy { .. } => "device_unhealthy",
            GatewayError::Cancelled => "cancelled",
            GatewayError::Unauthenticated(_) => "unauthenticated",
            GatewayError::UpstreamUnavailable { .. } => "upstream_unavailable",
            GatewayError::Upstream { .. } => "upstream_error",
        }
    }
}
