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
}

/// Where and how a request was computed; sent back as response parameters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Served {
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

/// A computed answer.
#[derive(Clone, Debug)]
pub struct InferResponse {
    pub model: String,
    pub id: String,
    pub outputs: Vec<HostTensor>,
    pub served: Served,
}

/// Response parameter names Quiver sets on every result.
pub mod params {
    /// Requests in the batch (int64).
    pub const BATCH_SIZE: &str = "quiver_batch_size";
    /// Rows in the batch (int64).
    pub const BATCH_ROWS: &str = "quiver_batch_rows";
    /// Microseconds from admission to dispatch (int64).
    pub const QUEUE_TIME_US: &str = "quiver_queue_time_us";
    /// Microseconds the batch spent on the device (int64).
    pub const COMPUTE_TIME_US: &str = "quiver_compute_time_us";
    /// Why the batch was dispatched (string).
    pub const DISPATCH_REASON: &str = "quiver_dispatch_reason";
    /// Which path served it: `local` (string).
    pub const PATH: &str = "quiver_path";
    /// Request parameter: relative deadline in microseconds (int64).
    pub const TIMEOUT: &str = "timeout";
    /// Request parameter: priority level, 1 = most urgent (int64).
    pub const PRIORITY: &str = "priority";
}
