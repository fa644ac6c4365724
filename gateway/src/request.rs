//! The one request type every front end decodes into, and the answer the
//! router gives back.

use std::time::Duration;

use quiver_batching::DispatchReason;
use quiver_kernels::HostTensor;

/// An inference request, whatever protocol it came over.
#[derive(Clone, Debug)]
pub struct InferRequest {
    /// The model's name.
    pub model: String,
    /// The version asked for; empty: the newest one serving.
    pub version: String,
    /// The client's request id, echoed in the answer (may be empty).
    pub id: String,
    /// The input tensors, in the client's order.
    pub inputs: Vec<HostTensor>,
    /// Output names the client asked for; empty means all of them.
    pub outputs: Vec<String>,
    /// Triton's schedule-policy `priority`: 1 is the most urgent level, 0 or
    /// absent means the model's default (its least urgent) level.
    pub priority: u32,
    /// Triton's schedule-policy `timeout`: the relative deadline. `None` means
    /// the model's `default_timeout`.
    pub timeout: Option<Duration>,
    /// The connection's smoothed round-trip time, where the front end knows
    /// it (QUIC native and HTTP/3): the deadline covers the whole round
    /// trip, so this much of it is set aside for the network.
    pub rtt: Option<Duration>,
    /// Text models: cut a text past the model's token limit (`Some(true)`), refuse it
    /// (`Some(false)`, 413), or do what the model's `auto_truncate` says (`None`).
    pub truncate: Option<bool>,
    /// Which end a truncation cuts.
    pub truncation_side: quiver_kernels::TruncationSide,
}

/// What a text model's tokenizer made of a request (the usage that the OpenAI and TEI
/// routes report).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TextUsage {
    /// Tokens over every row, special tokens included, after truncation.
    pub tokens: u64,
    /// Rows cut to the model's token limit.
    pub truncated: u32,
}

/// Where and how a request was computed; sent back as response parameters.
#[derive(Clone, Debug, PartialEq)]
pub enum Served {
    /// On this gateway's device.
    Local(LocalBatch),
    /// On an upstream (overflow).
    Upstream(UpstreamServed),
}

/// The local batch a request was computed in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LocalBatch {
    /// Requests in the batch this one was computed in.
    pub batch_size: u32,
    /// Rows in that batch.
    pub batch_rows: u32,
    /// From admission to dispatch.
    pub queue_time: Duration,
    /// The batch's time on the device.
    pub compute_time: Duration,
    /// Why the batch was dispatched.
    pub reason: DispatchReason,
}

/// An answer from an upstream.
#[derive(Clone, Debug, PartialEq)]
pub struct UpstreamServed {
    /// The endpoint that answered, e.g. `grpc://10.0.0.7:9001`.
    pub endpoint: String,
    /// Why the request left the local device.
    pub reason: OverflowReason,
    /// From sending to the upstream's answer, retries included.
    pub latency: Duration,
    /// The upstream's own `quiver_*` batch parameters, when it is a Quiver
    /// worker (batch size, queue and compute time, dispatch reason).
    pub parameters: std::collections::HashMap<String, crate::proto::InferParameter>,
}

impl Served {
    /// The value of the `quiver_path` response parameter and of the `path`
    /// metrics label: `local` or `upstream`.
    pub fn path(&self) -> &'static str {
        match self {
            Served::Local(_) => "local",
            Served::Upstream(_) => "upstream",
        }
    }
}

/// Why a request was sent to an upstream rather than the local device.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum OverflowReason {
    /// The model's routing is `upstream-only`.
    Policy,
    /// The local prediction missed the deadline (with the margin).
    Deadline,
    /// The local admission lane was full.
    Overloaded,
    /// The batcher dropped it early: it could no longer make its deadline
    /// locally.
    EarlyDrop,
    /// The local device failed (a model error) and is marked unhealthy.
    DeviceUnhealthy,
    /// The local batch it was in failed; it was sent on.
    DeviceFailed,
}

impl OverflowReason {
    /// The label value in metrics and the `quiver_overflow_reason` parameter.
    pub fn as_str(self) -> &'static str {
        match self {
            OverflowReason::Policy => "policy",
            OverflowReason::Deadline => "deadline",
            OverflowReason::Overloaded => "overloaded",
            OverflowReason::EarlyDrop => "early_drop",
            OverflowReason::DeviceUnhealthy => "device_unhealthy",
            OverflowReason::DeviceFailed => "device_failed",
        }
    }
}

/// A computed answer.
#[derive(Clone, Debug)]
pub struct InferResponse {
    pub model: String,
    /// The version that answered.
    pub version: u64,
    /// The part of the deadline set aside for the round trip.
    pub rtt_reserved: Duration,
    /// The local device that computed it (none when an upstream did).
    pub device: Option<std::sync::Arc<str>>,
    pub id: String,
    pub outputs: Vec<HostTensor>,
    pub served: Served,
    /// Text models, when the request was tokenized here: its tokens and truncations.
    /// `None` when it went to an upstream untokenized (upstream-only routing, or an
    /// unhealthy device).
    pub usage: Option<TextUsage>,
}

/// Parameter names on the wire.
pub use quiver_protocol::params;
