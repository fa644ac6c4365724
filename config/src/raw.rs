//! The file as serde reads it: every field optional, unknown fields refused.
//!
//! Integers are read as `i64` (what TOML holds) and addresses and kinds as
//! strings, so that a negative count or a misspelt kind reaches validation
//! and is reported with the others, instead of stopping serde at the first.

use serde::Deserialize;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawConfig {
    pub(crate) server: Option<RawServer>,
    pub(crate) tls: Option<RawTls>,
    pub(crate) models: Option<Vec<RawModel>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawServer {
    pub(crate) quic_listen: Option<String>,
    pub(crate) metrics_listen: Option<String>,
    pub(crate) http_listen: Option<String>,
    pub(crate) grpc_listen: Option<String>,
    pub(crate) https_listen: Option<String>,
    pub(crate) grpcs_listen: Option<String>,
    pub(crate) auth_tokens: Option<Vec<String>>,
    pub(crate) auth_token_identities: Option<Vec<String>>,
    pub(crate) auth_exempt_health: Option<bool>,
    pub(crate) max_frame_bytes: Option<i64>,
    pub(crate) max_inflight_bytes: Option<i64>,
    pub(crate) max_concurrent_streams: Option<i64>,
    pub(crate) max_connections: Option<i64>,
    pub(crate) max_connections_per_source: Option<i64>,
    pub(crate) quic_retry_above_per_sec: Option<i64>,
    pub(crate) idle_timeout_ms: Option<i64>,
    pub(crate) request_read_timeout_ms: Option<i64>,
    pub(crate) header_read_timeout_ms: Option<i64>,
    pub(crate) min_body_bytes_per_sec: Option<i64>,
    pub(crate) shutdown_grace_ms: Option<i64>,
    pub(crate) rate_limit_per_sec: Option<i64>,
    pub(crate) rate_limit_burst: Option<i64>,
    pub(crate) model_repository: Option<String>,
    pub(crate) model_control: Option<String>,
    pub(crate) repository_poll_ms: Option<i64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawTls {
    pub(crate) cert: Option<String>,
    pub(crate) key: Option<String>,
    pub(crate) client_ca: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawModel {
    pub(crate) name: Option<String>,
    pub(crate) kind: Option<String>,
    pub(crate) path: Option<String>,
    pub(crate) demo: Option<RawDemo>,
    pub(crate) device: Option<String>,
    pub(crate) cpu_kernels: Option<bool>,
    pub(crate) precision: Option<String>,
    pub(crate) auto_truncate: Option<bool>,
    pub(crate) length_grouping: Option<bool>,
    pub(crate) max_length_ratio: Option<f64>,
    pub(crate) output_margin: Option<bool>,
    pub(crate) engine: Option<String>,
    pub(crate) max_batch_size: Option<i64>,
    pub(crate) max_batch_tokens: Option<i64>,
    pub(crate) max_queue_delay_us: Option<i64>,
    pub(crate) queue_capacity: Option<i64>,
    pub(crate) priority_levels: Option<i64>,
    pub(crate) default_timeout_ms: Option<i64>,
    pub(crate) max_in_flight: Option<i64>,
    pub(crate) inline_below_us: Option<i64>,
    pub(crate) idle_spin_us: Option<i64>,
    pub(crate) unhealthy_after_failures: Option<i64>,
    pub(crate) rate_limit_per_sec: Option<i64>,
    pub(crate) rate_limit_burst: Option<i64>,
    pub(crate) routing: Option<String>,
    pub(crate) upstream: Option<crate::upstream::RawUpstream>,
    /// `"all"`, `{ latest = N }` or `{ specific = [..] }`: read by hand so
    /// that each spelling error is reported with its path.
    pub(crate) version_policy: Option<toml::Value>,
    pub(crate) devices: Option<Vec<String>>,
    pub(crate) placement: Option<String>,
    pub(crate) sim: Option<RawSim>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawSim {
    pub(crate) fixed_us: Option<i64>,
    pub(crate) per_row_us: Option<i64>,
    pub(crate) per_token_ns: Option<i64>,
    pub(crate) jitter_pct: Option<i64>,
    pub(crate) seed: Option<i64>,
    pub(crate) slowdown_pct: Option<Vec<i64>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawDemo {
    pub(crate) inputs: Option<i64>,
    pub(crate) hidden: Option<Vec<i64>>,
    pub(crate) outputs: Option<i64>,
    pub(crate) activation: Option<String>,
    pub(crate) seed: Option<i64>,
}
