//! The gateway's one error type, and the status codes it maps to.
//!
//! Each front end has exactly one function that maps a [`GatewayError`] to
//! its wire status (DESIGN.md, "Wire protocols"); this module only says
//! whose fault an error is and whether a retry can help.

use std::time::Duration;

use quiver_batching::RejectReason;
use quiver_kernels::InputError;

/// gRPC status codes, which the QUIC native protocol uses too.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(i32)]
#[non_exhaustive]
pub enum Code {
    Ok = 0,
    Cancelled = 1,
    Unknown = 2,
    InvalidArgument = 3,
    DeadlineExceeded = 4,
    NotFound = 5,
    ResourceExhausted = 8,
    Internal = 13,
    Unavailable = 14,
    Unauthenticated = 16,
}

impl Code {
    /// The code of a wire number; unknown numbers become [`Code::Unknown`].
    pub fn from_i32(n: i32) -> Code {
        match n {
            0 => Code::Ok,
            1 => Code::Cancelled,
            3 => Code::InvalidArgument,
            4 => Code::DeadlineExceeded,
            5 => Code::NotFound,
            8 => Code::ResourceExhausted,
            13 => Code::Internal,
            14 => Code::Unavailable,
            16 => Code::Unauthenticated,
            _ => Code::Unknown,
        }
    }

    /// The name as gRPC spells it, e.g. `INVALID_ARGUMENT`.
    pub fn as_str(&self) -> &'static str {
        match self {
            Code::Ok => "OK",
            Code::Cancelled => "CANCELLED",
            Code::Unknown => "UNKNOWN",
            Code::InvalidArgument => "INVALID_ARGUMENT",
            Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
            Code::NotFound => "NOT_FOUND",
            Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
            Code::Internal => "INTERNAL",
            Code::Unavailable => "UNAVAILABLE",
            Code::Unauthenticated => "UNAUTHENTICATED",
        }
    }
}

impl std::fmt::Display for Code {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

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
    /// The request is larger than the configured limit; it was not read whole.
    #[error("request of {got} bytes exceeds the limit of {limit} bytes")]
    TooLarge { limit: u64, got: u64 },
    /// The client did not send its whole request within
    /// `server.request_read_timeout_ms` of starting it (a length announced,
    /// then a stall): its bytes are released.
    #[error("the request was not received within {0:?} (server.request_read_timeout_ms)")]
    RequestTimeout(Duration),
    /// The request's bytes do not fit the request-memory budget
    /// (`server.max_inflight_bytes`) beside the requests held now; refused
    /// before its body is read where its length is announced.
    #[error(
        "the gateway holds {held} bytes of requests; {need} more would pass server.max_inflight_bytes {limit}"
    )]
    MemoryBudget { need: u64, held: u64, limit: u64 },
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

impl GatewayError {
    /// Whose fault this is.
    pub fn fault(&self) -> Fault {
        match self {
            GatewayError::InvalidArgument(_)
            | GatewayError::Input(_)
            | GatewayError::UnknownModel(_)
            | GatewayError::TooLarge { .. }
            | GatewayError::RequestTimeout(_) => Fault::Client,
            GatewayError::Overloaded { .. }
            | GatewayError::MemoryBudget { .. }
            | GatewayError::DeadlineUnreachable { .. }
            | GatewayError::DeadlineExceeded => Fault::Capacity,
            GatewayError::Model { .. } => Fault::Device,
            GatewayError::UpstreamUnavailable { .. } => Fault::Capacity,
            GatewayError::Upstream { .. } => Fault::Upstream,
            GatewayError::ShuttingDown => Fault::Gateway,
            GatewayError::Cancelled | GatewayError::Unauthenticated(_) => Fault::Client,
        }
    }

    /// Whether the same request may succeed if sent again later.
    pub fn retryable(&self) -> bool {
        matches!(
            self,
            GatewayError::Overloaded { .. }
                | GatewayError::MemoryBudget { .. }
                | GatewayError::DeadlineUnreachable { .. }
                | GatewayError::ShuttingDown
                | GatewayError::UpstreamUnavailable { .. }
        )
    }

    /// A short label for the `outcome` of metrics.
    pub fn outcome(&self) -> &'static str {
        match self {
            GatewayError::InvalidArgument(_) | GatewayError::Input(_) => "invalid_argument",
            GatewayError::UnknownModel(_) => "unknown_model",
            GatewayError::TooLarge { .. } => "too_large",
            GatewayError::RequestTimeout(_) => "request_timeout",
            GatewayError::MemoryBudget { .. } => "memory_budget",
            GatewayError::Overloaded { .. } => "overloaded",
            GatewayError::DeadlineUnreachable { .. } => "deadline_unreachable",
            GatewayError::DeadlineExceeded => "deadline_exceeded",
            GatewayError::Model { .. } => "model_error",
            GatewayError::ShuttingDown => "shutting_down",
            GatewayError::Cancelled => "cancelled",
            GatewayError::Unauthenticated(_) => "unauthenticated",
            GatewayError::UpstreamUnavailable { .. } => "upstream_unavailable",
            GatewayError::Upstream { .. } => "upstream_error",
        }
    }
}
