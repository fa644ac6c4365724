//! Parameter names on the wire: Triton's schedule policy in requests, and
//! the ones Quiver sets on every result.

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
/// Which path served it: `local` or `upstream` (string).
pub const PATH: &str = "quiver_path";
/// The upstream endpoint that served it, when `quiver_path` is
/// `upstream` (string).
pub const UPSTREAM: &str = "quiver_upstream";
/// Why it left the local device, when `quiver_path` is `upstream`
/// (string: policy, deadline, overloaded, early_drop, device_unhealthy,
/// device_failed).
pub const OVERFLOW_REASON: &str = "quiver_overflow_reason";
/// Which device of the model computed it (`cpu`, `cuda:N`, `sim:N`).
pub const DEVICE: &str = "quiver_device";
/// Microseconds of the deadline set aside for the network round trip (the
/// connection's smoothed RTT on QUIC), when any (int64).
pub const RTT_RESERVED_US: &str = "quiver_rtt_reserved_us";
/// Request parameter: relative deadline in microseconds (int64).
pub const TIMEOUT: &str = "timeout";
/// Request parameter: priority level, 1 = most urgent (int64).
pub const PRIORITY: &str = "priority";
/// Request parameter: cut a text longer than the model's token limit (bool; absent: the
/// model's `auto_truncate`). `false` refuses such a text with 413.
pub const TRUNCATE: &str = "truncate";
/// Request parameter: which end a truncation cuts, `right` (default) or `left` (string).
pub const TRUNCATION_DIRECTION: &str = "truncation_direction";
/// How many inputs were cut to the model's token limit (int64); set by text models.
pub const TRUNCATED: &str = "quiver_truncated";
