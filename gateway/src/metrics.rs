//! Prometheus metrics, served as text on the metrics listener (`/metrics`).
//!
//! One [`Metrics`] is shared by the front ends, the router and the device
//! threads. Label values are bounded: model names come from the
//! configuration, protocols, outcomes and reasons from fixed lists.
//!
//! Request, queue and compute durations are recorded in hdrhistogram
//! ([`LatencyFamily`]) and exported twice at each scrape: as a Prometheus
//! histogram (`_bucket`, `_sum`, `_count`; rates and aggregation across
//! gateways) and as gauges of the exact p50, p90 and p99 since start
//! (`..._quantile_seconds{quantile="0.99"}`). prometheus-client has no
//! summary type, hence the gauges.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub model: String,
    pub protocol: &'static str,
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, PartialOrd, Ord, EncodeLabelSet)]
pub struct ModelLabels {
    pub model: String,
    /// The model version (`1` for an inline `[[models]]` table).
    pub version: String,
}

impl ModelLabels {
    /// The labels of model `model` at `version`.
    pub fn new(model: &str, version: u64) -> Self {
        ModelLabels {
            model: model.to_owned(),
            version: version.to_string(),
        }
    }
}

/// A model by name alone: what belongs to the model whatever its versions
/// (its loads and unloads, its upstream pool's retries).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct NameLabels {
    pub model: String,
}

/// A model's load attempts, by outcome (`ok`, `failed`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LoadLabels {
    pub model: String,
    pub outcome: &'static str,
}

/// Configuration reloads, by outcome (`ok`, `invalid`, `failed`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BatchLabels {
    pub model: String,
    pub version: String,
    pub device: String,
    pub reason: &'static str,
}

/// One device of a model version.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DeviceLabels {
    pub model: String,
    pub version: String,
    /// `cpu`, `cuda:N`, `sim:N`.
    pub device: String,
}

/// A request refused before any compute, by model (empty when the model is
/// unknown or not yet read), protocol and reason.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RejectionLabels {
    pub model: String,
    pub protocol: &'static str,
    pub reason: &'static str,
}

/// A front end's protocol.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProtocolLabels {
    pub protocol: &'static str,
}

/// One term of a model's latency model (`fixed`, `per_row`, `per_token`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TermLabels {
    pub model: String,
    pub version: String,
    pub device: String,
    pub term: &'static str,
}

/// A device probe batch's result (`ok` or `failed`), by model.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProbeLabels {
    pub model: String,
    pub device: String,
    pub result: &'static str,
}

/// Requests sent to an upstream, by model and reason (`policy`,
/// `deadline`, `overloaded`, `early_drop`, `device_unhealthy`,
/// `device_failed`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OverflowLabels {
    pub model: String,
    pub reason: &'static str,
}

/// Requests answered by the router, by model, the path that served them
/// (`local`, `upstream`, or `none` when refused before any work) and
/// outcome.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PathLabels {
    pub model: String,
    pub version: String,
    pub path: &'static str,
    pub outcome: &'static str,
}

/// One upstream endpoint of a model. Endpoint values come from the
/// configuration or from DNS answers for a configured name.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EndpointLabels {
    pub model: String,
    pub endpoint: String,
}

/// A failed try to an upstream endpoint, by kind (`refused`, `failed`,
/// `timeout`, `status`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UpstreamErrorLabels {
    pub model: String,
    pub endpoint: String,
    pub kind: &'static str,
}

fn latency_histogram() -> Histogram {
    Histogram::new(bucket_bounds())
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct QuantileLabels {
    model: String,
    quantile: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BucketLabels {
    model: String,
}

fn batch_size_histogram() -> Histogram {
    Histogram::new(exponential_buckets(1.0, 2.0, 13))
}

/// Quantiles exported for every latency.
pub const QUANTILES: [(f64, &str); 3] = [(0.5, "0.5"), (0.9, "0.9"), (0.99, "0.99")];

/// Upper bounds (seconds) of the exported histogram buckets: 50 µs doubling
/// to ~52 s.
fn bucket_bounds() -> impl Iterator<Item = f64> {
    (0..21).map(|i| 50e-6 * f64::from(1u32 << i))
}

/// One latency distribution, recorded in microseconds by hdrhistogram (3
/// significant digits, 1 µs to 1 h; longer values are clamped to 1 h).
/// Memory: about 30 KiB each, one per model and metric.
#[derive(Clone, Debug)]
pub struct Latency {
    inner: Arc<Mutex<Recorded>>,
}

#[derive(Debug)]
struct Recorded {
    histogram: hdrhistogram::Histogram<u64>,
    /// Exact sum of the observed seconds.
    sum: f64,
}

impl Latency {
    const MAX_US: u64 = 3_600_000_000;

    // Bounds are constants within hdrhistogram's limits (tested by every
    // metrics test): a local invariant.
    #[allow(clippy::expect_used)]
    fn new() -> Self {
        let histogram = hdrhistogram::Histogram::new_with_bounds(1, Self::MAX_US, 3)
            .expect("1 us ..= 1 h with 3 significant digits is a valid hdrhistogram");
        Latency {
            inner: Arc::new(Mutex::new(Recorded {
                histogram,
                sum: 0.0,
            })),
        }
    }

    /// Records one duration, in seconds (as prometheus-client's histograms).
    pub fn observe(&self, seconds: f64) {
        let us = (seconds * 1e6).round().clamp(1.0, Self::MAX_US as f64) as u64;
        let mut r = match self.inner.lock() {
            Ok(r) => r,
            Err(poisoned) => poisoned.into_inner(),
        };
        r.histogram.saturating_record(us);
        r.sum += seconds.max(0.0);
    }

    /// Records one duration.
    pub fn record(&self, elapsed: Duration) {
        self.observe(elapsed.as_secs_f64());
    }

    /// The value (seconds) at quantile `q`, and the count and sum (seconds).
    pub fn snapshot(&self) -> LatencySnapshot {
        let r = match self.inner.lock() {
            Ok(r) => r,
            Err(poisoned) => poisoned.into_inner(),
        };
        let h = &r.histogram;
        let count = h.len();
        let quantiles = QUANTILES.map(|(q, _)| {
            if count == 0 {
                0.0
            } else {
                h.value_at_quantile(q) as f64 / 1e6
            }
        });
        let buckets = bucket_bounds()
            .map(|le| (le, h.count_between(1, (le * 1e6) as u64)))
            .collect();
        LatencySnapshot {
            count,
            sum: r.sum,
            quantiles,
            buckets,
        }
    }
}

/// What [`Latency::snapshot`] reads.
#[derive(Clone, Debug)]
pub struct LatencySnapshot {
    pub count: u64,
    /// Seconds.
    pub sum: f64,
    /// p50, p90, p99 in seconds, as [`QUANTILES`].
    pub quantiles: [f64; 3],
    /// Cumulative counts at each upper bound (seconds); `+Inf` is `count`.
    pub buckets: Vec<(f64, u64)>,
}

/// The per-request metric series of one model version, resolved on first
/// use and kept as shared handles: the request path then updates a counter
/// instead of hashing a label set (and allocating its strings) into a
/// family's map on every request. Same series, same values.
#[derive(Debug, Default)]
pub struct EntrySeries {
    admitted: std::sync::OnceLock<Counter>,
    /// `routed{path, outcome="ok"}` for `local` and `upstream`.
    routed_local_ok: std::sync::OnceLock<Counter>,
    routed_upstream_ok: std::sync::OnceLock<Counter>,
}

impl EntrySeries {
    /// `quiver_admitted_total` of `entry`.
    pub fn admitted(&self, metrics: &Metrics, entry: &crate::registry::ModelEntry) -> &Counter {
        self.admitted
            .get_or_init(|| metrics.admitted.get_or_create(&entry.labels()).clone())
    }

    /// `quiver_routed_total{outcome="ok"}` of `entry` on `path`.
    pub fn routed_ok(
        &self,
        metrics: &Metrics,
        entry: &crate::registry::ModelEntry,
        path: &'static str,
    ) -> Counter {
        let make = || {
            metrics
                .routed
                .get_or_create(&PathLabels {
                    model: entry.name.clone(),
                    version: entry.version_str(),
                    path,
                    outcome: "ok",
                })
                .clone()
        };
        match path {
            "local" => self.routed_local_ok.get_or_init(make).clone(),
            "upstream" => self.routed_upstream_ok.get_or_init(make).clone(),
            _ => make(),
        }
    }
}

/// The `ok` series of one (model, version, protocol): what every answered
/// request updates.
#[derive(Debug)]
struct OkSeries {
    model: String,
    version: String,
    protocol: &'static str,
    requests: Counter,
    seconds: Latency,
}

/// Most (model, version, protocol) triples kept in [`Metrics::record_request`]'s
/// cache; past it, requests go through the families' maps as before.
const OK_SERIES_MAX: usize = 256;

/// Latencies by model, exported as one histogram and one quantile gauge
/// family. Cheap to clone (shared).
#[derive(Clone, Debug)]
pub struct LatencyFamily {
    name: &'static str,
    help: &'static str,
    members: Arc<RwLock<BTreeMap<String, Latency>>>,
}

impl LatencyFamily {
    fn new(name: &'static str, help: &'static str) -> Self {
        LatencyFamily {
            name,
            help,
            members: Arc::default(),
        }
    }

    /// The latency of `labels.model`, made on first use.
    pub fn get_or_create(&self, labels: &ModelLabels) -> Latency {
        if let Ok(members) = self.members.read()
            && let Some(l) = members.get(&labels.model)
        {
            return l.clone();
        }
        let mut members = match self.members.write() {
            Ok(m) => m,
            Err(poisoned) => poisoned.into_inner(),
        };
        members
            .entry(labels.model.clone())
            .or_insert_with(Latency::new)
            .clone()
    }

    fn snapshots(&self) -> Vec<(String, LatencySnapshot)> {
        let members = match self.members.read() {
            Ok(m) => m,
            Err(poisoned) => poisoned.into_inner(),
        };
        members
            .iter()
            .map(|(model, l)| (model.clone(), l.snapshot()))
            .collect()
    }
}

impl prometheus_client::collector::Collector for LatencyFamily {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let snapshots = self.snapshots();
        {
            let mut family =
                encoder.encode_descriptor(self.name, self.help, None, MetricType::Histogram)?;
            for (model, snap) in &snapshots {
                let labels = BucketLabels {
                    model: model.clone(),
                };
                family
                    .encode_family(&labels)?
                    .encode_histogram::<BucketLabels>(
                        snap.sum,
                        snap.count,
                        &per_bucket(&snap.buckets, snap.count),
                        None,
                    )?;
            }
        }
        let quantile_name = format!("{}_quantile", self.name.trim_end_matches("_seconds"));
        let quantile_help = format!("{} (p50, p90, p99 since start)", self.help);
        let mut family = encoder.encode_descriptor(
            &quantile_name,
            &quantile_help,
            Some(&prometheus_client::registry::Unit::Seconds),
            MetricType::Gauge,
        )?;
        for (model, snap) in &snapshots {
            for ((_, q), value) in QUANTILES.iter().zip(&snap.quantiles) {
                let labels = QuantileLabels {
                    model: model.clone(),
                    quantile: q,
                };
                family.encode_family(&labels)?.encode_gauge(value)?;
            }
        }
        Ok(())
    }
}

/// Cumulative counts (as hdrhistogram reads them) to the per-bucket counts
/// prometheus-client's encoder sums up, with the `+Inf` bucket last.
fn per_bucket(cumulative: &[(f64, u64)], count: u64) -> Vec<(f64, u64)> {
    let mut out = Vec::with_capacity(cumulative.len() + 1);
    let mut below = 0;
    for &(le, c) in cumulative {
        // hdrhistogram's bucket edges may round a value across a bound;
        // never let a count go backwards.
        let c = c.max(below);
        out.push((le, c - below));
        below = c;
    }
    out.push((f64::INFINITY, count.saturating_sub(below)));
    out
}

/// The gateway's metrics.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// The `ok` series of each (model, version, protocol) seen, for
    /// [`record_request`](Self::record_request).
    ok_series: RwLock<Vec<OkSeries>>,
    /// Requests answered, by model, protocol and outcome (`ok` or an error).
    pub requests: Family<RequestLabels, Counter>,
    /// Time from a request's decoding to its answer, by model.
    pub request_seconds: LatencyFamily,
    /// Time from admission to dispatch, by model.
    pub queue_seconds: LatencyFamily,
    /// A batch's time on the device, by model.
    pub compute_seconds: LatencyFamily,
    /// Requests refused before any compute, by model, protocol and reason
    /// (the error outcome, or `unauthenticated`, `too_many_connections`).
    pub rejections: Family<RejectionLabels, Counter>,
    /// QUIC handshakes answered with a Retry (address validation).
    pub quic_retries: Counter,
    /// Inference requests taken in, by protocol (QUIC native: once its
    /// frame is read; REST, HTTP/3 and gRPC: once their handler runs); each
    /// then ends in exactly one `quiver_requests_total` outcome, so once
    /// traffic stops the two balance.
    pub received: Family<ProtocolLabels, Counter>,
    /// Batches dispatched, by model and dispatch reason.
    pub batches: Family<BatchLabels, Counter>,
    /// Requests per dispatched batch, by model.
    pub batch_size: Family<DeviceLabels, Histogram, fn() -> Histogram>,
    /// Requests computed on a device, by model.
    pub computed: Family<DeviceLabels, Counter>,
    /// Text models: tokens a device computed, padding included (each
    /// batch's rows × its longest sequence).
    pub padded_tokens: Family<DeviceLabels, Counter>,
    /// Text models: the tokens of the requests' own sequences in the same
    /// batches; `padded_tokens / real_tokens` is the padding overhead.
    pub real_tokens: Family<DeviceLabels, Counter>,
    /// Requests that ended in the scheduler without compute because their
    /// client cancelled them.
    pub cancelled_in_queue: Family<DeviceLabels, Counter>,
    /// Requests queued and not yet dispatched, by model.
    pub queue_depth: Family<DeviceLabels, Gauge>,
    /// Batches on the device now, by model.
    pub batches_in_flight: Family<DeviceLabels, Gauge>,
    /// 1 while the model's local device is healthy, 0 after a failed batch
    /// until a batch or probe batch succeeds.
    pub device_healthy: Family<DeviceLabels, Gauge>,
    /// Probe batches of unhealthy devices, by model and result.
    pub device_probes: Family<ProbeLabels, Counter>,
    /// The latency model's fitted terms at start-up calibration, in
    /// seconds (per batch, per row, per padded token).
    pub latency_model: Family<TermLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    /// Requests sent to an upstream, by model and reason.
    pub overflow: Family<OverflowLabels, Counter>,
    /// Bytes of requests held now, over every front end and model (the
    /// request-memory budget, `server.max_inflight_bytes`).
    pub inflight_bytes: Gauge,
    /// Requests answered, by model, path and outcome (`cancelled` when the
    /// client went away before the end).
    pub routed: Family<PathLabels, Counter>,
    /// Requests that entered routing, by model: once traffic stops, the sum
    /// of `routed` over paths and outcomes equals it.
    pub admitted: Family<ModelLabels, Counter>,
    /// Time of each try to an upstream that got an answer, by endpoint.
    pub upstream_seconds: Family<EndpointLabels, Histogram, fn() -> Histogram>,
    /// Failed tries to upstreams, by endpoint and kind.
    pub upstream_errors: Family<UpstreamErrorLabels, Counter>,
    /// Retries of tries that started no work upstream.
    pub upstream_retries: Family<NameLabels, Counter>,
    /// 1 while a model version serves, 0 once it is unloaded (or replaced).
    pub model_ready: Family<ModelLabels, Gauge>,
    /// Load attempts (start-up, API, poll, reload), by model and outcome.
    pub model_loads: Family<LoadLabels, Counter>,
    /// Model versions unloaded (drained and freed), by model and version.
    pub model_unloads: Family<ModelLabels, Counter>,
    /// Configuration reloads (SIGHUP, `POST /v2/repository/reload`), by
    /// outcome.
    pub config_reloads: Family<OutcomeLabels, Counter>,
    /// Ejections of upstream endpoints (consecutive failures, failed
    /// probation or probes).
    pub upstream_ejections: Family<EndpointLabels, Counter>,
    /// Requests in flight to each upstream endpoint.
    pub upstream_in_flight: Family<EndpointLabels, Gauge>,
    /// 1 while an endpoint takes traffic (healthy or on probation), 0 while
    /// it is ejected.
    pub upstream_available: Family<EndpointLabels, Gauge>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("quiver");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "requests",
            "Requests answered, by model, protocol and outcome",
            requests.clone(),
        );
        let request_seconds = LatencyFamily::new(
            "request_duration_seconds",
            "Time from decoding a request to answering it, requests answered ok",
        );
        registry.register_collector(Box::new(request_seconds.clone()));
        let queue_seconds =
            LatencyFamily::new("queue_duration_seconds", "Time from admission to dispatch");
        registry.register_collector(Box::new(queue_seconds.clone()));
        let compute_seconds =
            LatencyFamily::new("compute_duration_seconds", "A batch's time on the device");
        registry.register_collector(Box::new(compute_seconds.clone()));
        let rejections = Family::<RejectionLabels, Counter>::default();
        registry.register(
            "rejections",
            "Requests refused before any compute, by model, protocol and reason",
            rejections.clone(),
        );
        let received = Family::<ProtocolLabels, Counter>::default();
        registry.register(
            "requests_received",
            "Inference requests taken in (QUIC native: its frame read; REST, HTTP/3, gRPC: its handler run), by protocol; each ends in one quiver_requests_total outcome",
            received.clone(),
        );
        let quic_retries = Counter::default();
        registry.register(
            "quic_retries",
            "QUIC handshakes answered with a Retry: server.quic_retry_above_per_sec passed",
            quic_retries.clone(),
        );
        let batches = Family::<BatchLabels, Counter>::default();
        registry.register(
            "batches",
            "Batches dispatched, by model and dispatch reason",
            batches.clone(),
        );
        let batch_size = Family::<DeviceLabels, Histogram, fn() -> Histogram>::new_with_constructor(
            batch_size_histogram,
        );
        registry.register(
            "batch_size",
            "Requests per dispatched batch",
            batch_size.clone(),
        );
        let computed = Family::<DeviceLabels, Counter>::default();
        registry.register(
            "computed_requests",
            "Requests computed on a device",
            computed.clone(),
        );
        let padded_tokens = Family::<DeviceLabels, Counter>::default();
        registry.register(
            "padded_tokens",
            "Text models: tokens computed, padding included (each batch's rows x its longest sequence)",
            padded_tokens.clone(),
        );
        let real_tokens = Family::<DeviceLabels, Counter>::default();
        registry.register(
            "real_tokens",
            "Text models: tokens of the requests' own sequences in the batches computed; quiver_padded_tokens_total / quiver_real_tokens_total is the padding overhead",
            real_tokens.clone(),
        );
        let cancelled_in_queue = Family::<DeviceLabels, Counter>::default();
        registry.register(
            "cancelled_in_queue",
            "Requests cancelled by their client and skipped before compute",
            cancelled_in_queue.clone(),
        );
        let queue_depth = Family::<DeviceLabels, Gauge>::default();
        registry.register(
            "queue_depth",
            "Requests queued and not yet dispatched",
            queue_depth.clone(),
        );
        let batches_in_flight = Family::<DeviceLabels, Gauge>::default();
        registry.register(
            "batches_in_flight",
            "Batches on the device now",
            batches_in_flight.clone(),
        );
        let device_healthy = Family::<DeviceLabels, Gauge>::default();
        registry.register(
            "device_healthy",
            "1 while the model's local device is healthy, 0 after a failed batch until a batch or probe succeeds",
            device_healthy.clone(),
        );
        let device_probes = Family::<ProbeLabels, Counter>::default();
        registry.register(
            "device_probes",
            "Probe batches run on an unhealthy device, by result",
            device_probes.clone(),
        );
        let latency_model =
            Family::<TermLabels, Gauge<f64, std::sync::atomic::AtomicU64>>::default();
        registry.register(
            "latency_model_seconds",
            "The scheduler's latency model as fitted by start-up calibration: seconds per batch (fixed), per row and per padded token",
            latency_model.clone(),
        );
        let overflow = Family::<OverflowLabels, Counter>::default();
        registry.register(
            "overflow",
            "Requests sent to an upstream instead of the local device, by reason",
            overflow.clone(),
        );
        let admitted = Family::<ModelLabels, Counter>::default();
        registry.register(
            "admitted_requests",
            "Requests that entered routing, by model; each ends in one quiver_routed_requests_total",
            admitted.clone(),
        );
        let routed = Family::<PathLabels, Counter>::default();
        registry.register(
            "routed_requests",
            "Requests answered by the router, by the path that served them (local, upstream, none) and outcome",
            routed.clone(),
        );
        let upstream_seconds =
            Family::<EndpointLabels, Histogram, fn() -> Histogram>::new_with_constructor(
                latency_histogram,
            );
        registry.register(
            "upstream_request_duration_seconds",
            "Time of each try to an upstream that got an answer",
            upstream_seconds.clone(),
        );
        let upstream_errors = Family::<UpstreamErrorLabels, Counter>::default();
        registry.register(
            "upstream_errors",
            "Failed tries to upstream endpoints, by kind (refused, failed, timeout, status)",
            upstream_errors.clone(),
        );
        let model_ready = Family::<ModelLabels, Gauge>::default();
        registry.register(
            "model_ready",
            "1 while a model version serves, 0 once it is unloaded or replaced",
            model_ready.clone(),
        );
        let model_loads = Family::<LoadLabels, Counter>::default();
        registry.register(
            "model_loads",
            "Model load attempts, by outcome (ok, failed)",
            model_loads.clone(),
        );
        let model_unloads = Family::<ModelLabels, Counter>::default();
        registry.register(
            "model_unloads",
            "Model versions unloaded after draining",
            model_unloads.clone(),
        );
        let config_reloads = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "config_reloads",
            "Configuration reloads, by outcome (ok, invalid, failed)",
            config_reloads.clone(),
        );
        let upstream_retries = Family::<NameLabels, Counter>::default();
        registry.register(
            "upstream_retries",
            "Retries of upstream tries that started no work",
            upstream_retries.clone(),
        );
        let upstream_ejections = Family::<EndpointLabels, Counter>::default();
        registry.register(
            "upstream_ejections",
            "Ejections of upstream endpoints",
            upstream_ejections.clone(),
        );
        let upstream_in_flight = Family::<EndpointLabels, Gauge>::default();
        registry.register(
            "upstream_in_flight",
            "Requests in flight to each upstream endpoint",
            upstream_in_flight.clone(),
        );
        let upstream_available = Family::<EndpointLabels, Gauge>::default();
        registry.register(
            "upstream_available",
            "1 while an upstream endpoint takes traffic, 0 while it is ejected",
            upstream_available.clone(),
        );
        let inflight_bytes = Gauge::default();
        registry.register(
            "inflight_bytes",
            "Bytes of requests held now, from the moment their length is known until their answer is sent (server.max_inflight_bytes bounds it)",
            inflight_bytes.clone(),
        );
        Metrics {
            inflight_bytes,
            latency_model,
            device_healthy,
            device_probes,
            overflow,
            routed,
            admitted,
            upstream_seconds,
            upstream_errors,
            upstream_retries,
            model_ready,
            model_loads,
            model_unloads,
            config_reloads,
            upstream_ejections,
            upstream_in_flight,
            upstream_available,
            registry,
            ok_series: RwLock::default(),
            requests,
            request_seconds,
            queue_seconds,
            compute_seconds,
            rejections,
            quic_retries,
            received,
            batches,
            batch_size,
            computed,
            padded_tokens,
            real_tokens,
            cancelled_in_queue,
            queue_depth,
            batches_in_flight,
        }
    }

    /// Counts one answered request.
    pub fn record_request(
        &self,
        model: &str,
        version: &str,
        protocol: &'static str,
        outcome: &'static str,
        elapsed: Duration,
    ) {
        if outcome == "ok" && self.record_ok_cached(model, version, protocol, elapsed) {
            return;
        }
        self.requests
            .get_or_create(&RequestLabels {
                model: model.into(),
                protocol,
                outcome,
            })
            .inc();
        if outcome == "ok" {
            self.request_seconds
                .get_or_create(&ModelLabels {
                    model: model.into(),
                    version: version.into(),
                })
                .record(elapsed);
        } else if is_rejection(outcome) {
            self.record_rejection(model, protocol, outcome);
        }
    }

    /// Records an `ok` request through the cache of its series: a short list
    /// (models × versions × protocols) scanned under a read lock. False when
    /// the cache is full and the caller should use the families.
    fn record_ok_cached(
        &self,
        model: &str,
        version: &str,
        protocol: &'static str,
        elapsed: Duration,
    ) -> bool {
        let find = |list: &[OkSeries]| {
            list.iter()
                .position(|s| s.protocol == protocol && s.model == model && s.version == version)
        };
        {
            let list = match self.ok_series.read() {
                Ok(l) => l,
                Err(poisoned) => poisoned.into_inner(),
            };
            if let Some(series) = find(&list).and_then(|i| list.get(i)) {
                series.requests.inc();
                series.seconds.record(elapsed);
                return true;
            }
        }
        let mut list = match self.ok_series.write() {
            Ok(l) => l,
            Err(poisoned) => poisoned.into_inner(),
        };
        if find(&list).is_none() {
            if list.len() >= OK_SERIES_MAX {
                return false;
            }
            let labels = ModelLabels {
                model: model.into(),
                version: version.into(),
            };
            list.push(OkSeries {
                requests: self
                    .requests
                    .get_or_create(&RequestLabels {
                        model: model.into(),
                        protocol,
                        outcome: "ok",
                    })
                    .clone(),
                seconds: self.request_seconds.get_or_create(&labels),
                model: labels.model,
                version: labels.version,
                protocol,
            });
        }
        drop(list);
        self.record_ok_cached(model, version, protocol, elapsed)
    }

    /// Counts a request taken in by `protocol` (in
    /// `quiver_requests_received_total`); the guard records its one
    /// `quiver_requests_total` outcome: [`RequestGuard::finish`]'s, or
    /// `cancelled` if the handler is dropped first (its client went away).
    pub fn start_request(self: &Arc<Self>, protocol: &'static str) -> RequestGuard {
        self.received
            .get_or_create(&ProtocolLabels { protocol })
            .inc();
        RequestGuard {
            metrics: self.clone(),
            protocol,
            model: String::new(),
            version: String::new(),
            started: std::time::Instant::now(),
            done: false,
        }
    }

    /// Counts one request refused before any compute (also counted by
    /// [`Metrics::record_request`] for the error outcomes that are refusals).
    pub fn record_rejection(&self, model: &str, protocol: &'static str, reason: &'static str) {
        self.rejections
            .get_or_create(&RejectionLabels {
                model: model.into(),
                protocol,
                reason,
            })
            .inc();
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// Error outcomes (see `GatewayError::outcome`) that refuse a request before
/// any compute.
fn is_rejection(outcome: &str) -> bool {
    matches!(
        outcome,
        "invalid_argument"
            | "unknown_model"
            | "too_large"
            | "overloaded"
            | "rate_limited"
            | "deadline_unreachable"
            | "unauthenticated"
            | "shutting_down"
            | "upstream_unavailable"
    )
}

/// One request between [`Metrics::start_request`] and its outcome.
#[derive(Debug)]
pub struct RequestGuard {
    metrics: Arc<Metrics>,
    protocol: &'static str,
    model: String,
    version: String,
    started: std::time::Instant,
    done: bool,
}

impl RequestGuard {
    /// The model label (a configured name, or `""`), once known.
    pub fn set_model(&mut self, model: String) {
        self.model = model;
    }

    /// The version that answered, once known.
    pub fn set_version(&mut self, version: u64) {
        self.version = version.to_string();
    }

    /// Records the request's outcome (`ok` or an error's).
    pub fn finish(mut self, outcome: &'static str) {
        self.done = true;
        self.metrics.record_request(
            &self.model,
            &self.version,
            self.protocol,
            outcome,
            self.started.elapsed(),
        );
    }
}

impl Drop for RequestGuard {
    fn drop(&mut self) {
        if !self.done {
            self.metrics.record_request(
                &self.model,
                &self.version,
                self.protocol,
                "cancelled",
                self.started.elapsed(),
            );
        }
    }
}

/// Serves `/metrics` on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: Arc<Metrics>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use axum::routing::get;
    let app = axum::Router::new().route(
        "/metrics",
        get(move || {
            let metrics = metrics.clone();
            async move {
                (
                    [(
                        axum::http::header::CONTENT_TYPE,
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    )],
                    metrics.encode(),
                )
            }
        }),
    );
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}
