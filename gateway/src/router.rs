//! The router: the one request path every front end goes through.
//!
//! It finds the model, validates the inputs against its signature (which
//! also gives the request's cost), turns the schedule-policy parameters into
//! a priority lane and an absolute deadline, and decides where the request
//! runs (DESIGN.md, "Overflow"):
//!
//! 1. on the local device, when the scheduler predicts completion before the
//!    deadline with the upstream pool's margin to spare;
//! 2. else on an upstream, when one is expected to answer (its peak-EWMA
//!    latency) within the time left;
//! 3. else nowhere: a typed rejection before any work.
//!
//! A request the local path hands back (the batcher's early drop, a full
//! admission lane, a failed batch) is spilled to an upstream if one can
//! still make the deadline. While the local device is unhealthy (its last
//! batch failed), traffic goes to the upstreams until a batch or probe
//! batch succeeds. `local-only` never overflows; `upstream-only` never runs
//! locally.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use quiver_batching::{CancelToken, Cost, RejectReason, Request};
use quiver_config::Routing;
use quiver_kernels::HostTensor;
use tokio::sync::oneshot;

use crate::device::{Pending, Reply};
use crate::error::GatewayError;
use crate::metrics::{Metrics, OverflowLabels, PathLabels};
use crate::registry::Registry;
use crate::request::{InferRequest, InferResponse, OverflowReason, Served, UpstreamServed};
use crate::upstream::Upstream;

pub use crate::registry::ModelEntry;

/// Routes requests to the models served here.
#[derive(Debug, Default)]
pub struct Router {
    registry: Arc<Registry>,
    next_id: AtomicU64,
    metrics: Arc<Metrics>,
    rate_limits: ArcSwap<crate::ratelimit::RateLimits>,
}

/// Counts a request that is dropped before its routing ends as
/// `cancelled` on the path it had reached.
struct RouteRecord<'a> {
    metrics: &'a Metrics,
    model: &'a str,
    version: u64,
    path: PathCell,
    done: bool,
}

/// The path a request has reached (`none`, `local`, `upstream`), readable
/// when its routing future is dropped.
#[derive(Debug, Default)]
struct PathCell(std::sync::atomic::AtomicU8);

impl PathCell {
    const PATHS: [&'static str; 3] = ["none", "local", "upstream"];

    fn set(&self, path: &'static str) {
        let i = Self::PATHS.iter().position(|p| *p == path).unwrap_or(0);
        self.0.store(
            u8::try_from(i).unwrap_or(0),
            std::sync::atomic::Ordering::Relaxed,
        );
    }

    fn get(&self) -> &'static str {
        let i = usize::from(self.0.load(std::sync::atomic::Ordering::Relaxed));
        Self::PATHS.get(i).copied().unwrap_or("none")
    }
}

impl Drop for RouteRecord<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.metrics
                .routed
                .get_or_create(&PathLabels {
                    model: self.model.to_owned(),
                    version: self.version.to_string(),
                    path: self.path.get(),
                    outcome: "cancelled",
                })
                .inc();
        }
    }
}

/// What a request carries into routing once its model is known.
struct Routed<'a> {
    id: &'a str,
    inputs: Vec<HostTensor>,
    options: quiver_kernels::PrepareOptions,
    priority: u32,
    lane: u8,
    deadline: Instant,
    timeout: Duration,
}

impl Router {
    pub fn new() -> Self {
        Self::default()
    }

    /// A router that counts its routing decisions in `metrics`.
    pub fn with_metrics(metrics: Arc<Metrics>) -> Self {
        Router {
            metrics,
            ..Self::default()
        }
    }

    /// The metrics it counts in.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Sets the per-client rate limits of the models (a reload replaces
    /// them whole).
    pub fn set_rate_limits(&self, limits: crate::ratelimit::RateLimits) {
        self.rate_limits.store(Arc::new(limits));
    }

    /// The per-client rate limits, for the periodic forgetting of idle
    /// clients.
    pub fn rate_limits(&self) -> Arc<crate::ratelimit::RateLimits> {
        self.rate_limits.load_full()
    }

    /// Whether `client` may send one more request to `model` now
    /// ([`GatewayError::RateLimited`] if not). A front end calls it after
    /// authentication and before reading or admitting the request.
    pub fn check_rate(
        &self,
        model: &str,
        client: crate::ratelimit::ClientKey,
    ) -> Result<(), GatewayError> {
        self.rate_limits.load().check(model, client)
    }

    /// The live registry of models this router serves.
    pub fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }

    /// Adds a model version; one with the same name and version replaces
    /// it (the replaced instance is stopped at once: for tests and tools
    /// that build a router by hand; the gateway swaps through
    /// [`crate::lifecycle`], which drains).
    pub fn insert(&self, entry: ModelEntry) {
        let mut versions = self
            .registry
            .snapshot()
            .versions(&entry.name)
            .cloned()
            .unwrap_or_default();
        let name = entry.name.clone();
        versions.insert(entry.version, Arc::new(entry));
        for old in self.registry.replace(&name, versions) {
            old.stop();
        }
    }

    /// The newest version of the model called `name`.
    pub fn model(&self, name: &str) -> Option<Arc<ModelEntry>> {
        self.registry.newest(name)
    }

    /// Every model version that serves now, by name then version.
    pub fn models(&self) -> Vec<Arc<ModelEntry>> {
        self.registry.snapshot().all().cloned().collect()
    }

    /// Stops every device thread; queued requests are answered with
    /// [`GatewayError::ShuttingDown`].
    pub fn stop(&self) {
        for entry in self.registry.snapshot().all() {
            entry.stop();
        }
    }

    /// Serves one request. `cancel` is the front end's: once it is
    /// cancelled, the scheduler skips the request if it has not been
    /// dispatched yet.
    pub async fn infer(
        &self,
        req: InferRequest,
        cancel: CancelToken,
    ) -> Result<InferResponse, GatewayError> {
        self.infer_on(None, req, cancel).await
    }

    /// [`infer`](Self::infer) with the model's newest instance already
    /// looked up by the front end ([`model`](Self::model)): used when the
    /// request asks for no particular version, so a request is looked up
    /// once. A swap between the two steps serves it on the instance the
    /// front end saw, which is held until the answer like any other.
    pub async fn infer_on(
        &self,
        newest: Option<Arc<ModelEntry>>,
        req: InferRequest,
        cancel: CancelToken,
    ) -> Result<InferResponse, GatewayError> {
        // The instance is held until the answer: a swap or unload meanwhile
        // drains it instead of pulling it away.
        let entry = match newest {
            Some(entry) if req.version.is_empty() && entry.name == req.model => entry,
            _ => self.registry.get(&req.model, &req.version)?,
        };
        let entry = entry.as_ref();
        entry.series.admitted(&self.metrics, entry).inc();
        // Each admitted request is counted once in `routed`: with its
        // outcome, or as cancelled when its front end drops it (the client
        // went away) before it ends.
        let mut record = RouteRecord {
            metrics: &self.metrics,
            model: &entry.name,
            version: entry.version,
            path: PathCell::default(),
            done: false,
        };
        let result = self.route(entry, req, cancel, &record.path).await;
        let path = match &result {
            Ok(resp) => resp.served.path(),
            Err(_) => record.path.get(),
        };
        record.done = true;
        match &result {
            Ok(_) => {
                entry.series.routed_ok(&self.metrics, entry, path).inc();
            }
            Err(e) => {
                self.metrics
                    .routed
                    .get_or_create(&PathLabels {
                        model: entry.name.clone(),
                        version: entry.version_str(),
                        path,
                        outcome: e.outcome(),
                    })
                    .inc();
            }
        }
        result
    }

    async fn route(
        &self,
        entry: &ModelEntry,
        req: InferRequest,
        cancel: CancelToken,
        path: &PathCell,
    ) -> Result<InferResponse, GatewayError> {
        let signature = entry.model.signature();
        for name in &req.outputs {
            if !signature.outputs.iter().any(|o| &o.name == name) {
                return Err(GatewayError::InvalidArgument(format!(
                    "model '{}' has no output '{name}'",
                    entry.name
                )));
            }
        }
        let lane = lane(req.priority, entry.priority_levels)?;
        let now = Instant::now();
        let timeout = req.timeout.unwrap_or(entry.default_timeout);
        // The client's timeout covers the whole round trip: the request's
        // way here and the answer's way back take about one RTT together,
        // so that much is set aside before any decision.
        let rtt_reserved = req.rtt.unwrap_or_default();
        if rtt_reserved >= timeout {
            return Err(GatewayError::DeadlineUnreachable {
                timeout,
                predicted: rtt_reserved,
            });
        }
        let routed = Routed {
            id: &req.id,
            inputs: req.inputs,
            options: quiver_kernels::PrepareOptions {
                truncate: req.truncate.unwrap_or(entry.config.auto_truncate),
                side: req.truncation_side,
            },
            priority: req.priority,
            lane,
            deadline: now + (timeout - rtt_reserved),
            timeout,
        };
        let upstream = match entry.routing {
            Routing::LocalOnly => None,
            _ => entry.upstream.as_deref(),
        };
        let mut usage = None;
        let outputs = match (entry.routing, upstream) {
            (Routing::UpstreamOnly, Some(up)) => {
                path.set("upstream");
                let (outputs, served) = self
                    .overflow(entry, up, routed, OverflowReason::Policy)
                    .await?;
                (outputs, served, None)
            }
            (Routing::UpstreamOnly, None) => {
                // Validation refuses this configuration; say so if built
                // in code.
                return Err(GatewayError::UpstreamUnavailable {
                    model: entry.name.clone(),
                    reason: "routing is upstream-only but no upstream is configured".into(),
                });
            }
            (_, upstream) => {
                self.local_first(entry, upstream, routed, cancel, path, &mut usage)
                    .await?
            }
        };
        let (mut outputs, served, device) = outputs;
        if !req.outputs.is_empty() {
            outputs.retain(|o| req.outputs.contains(&o.name));
        }
        Ok(InferResponse {
            model: entry.name.clone(),
            version: entry.version,
            rtt_reserved,
            device,
            id: req.id,
            outputs,
            served,
            usage,
        })
    }

    /// The local devices, with `upstream` (if any) for what they cannot do
    /// in time. The request is placed on the healthy device with the
    /// earliest predicted completion; a device whose lane is full passes it
    /// to the next, and a device whose batch fails hands it to another
    /// healthy device that can still make the deadline. `usage` gets a text
    /// model's token counts once it is tokenized.
    async fn local_first(
        &self,
        entry: &ModelEntry,
        upstream: Option<&Upstream>,
        mut routed: Routed<'_>,
        cancel: CancelToken,
        path: &PathCell,
        usage: &mut Option<crate::request::TextUsage>,
    ) -> Result<Local, GatewayError> {
        if !entry.healthy() {
            if let Some(up) = upstream
                && up.fits(Instant::now(), routed.deadline)
            {
                path.set("upstream");
                return self
                    .overflow(entry, up, routed, OverflowReason::DeviceUnhealthy)
                    .await
                    .map(no_device);
            }
            // Nowhere else to go: refused at once rather than failed on a
            // device known to fail; the probes run while it is idle.
            return Err(GatewayError::DeviceUnhealthy {
                model: entry.name.clone(),
            });
        }
        let prepared = entry
            .model
            .prepare_with(std::mem::take(&mut routed.inputs), &routed.options)?;
        if entry.model.as_text_embedding().is_some() {
            *usage = Some(crate::request::TextUsage {
                tokens: prepared.token_ids.iter().map(|ids| ids.len() as u64).sum(),
                truncated: prepared.truncated,
            });
        }
        let cost = Cost {
            rows: prepared.rows,
            tokens: prepared.tokens,
        };
        // Size first: a request no batch can hold gets the numbers, not a
        // deadline prediction made for a batch that can never form.
        check_budget(&entry.name, &entry.config, cost)?;
        let margin = upstream.map_or(Duration::ZERO, Upstream::local_margin);
        let mut failed: Vec<usize> = Vec::new();
        let mut prepared = prepared;
        let mut last_failure: Option<GatewayError> = None;
        loop {
            let now = Instant::now();
            let candidates = place(entry, usize::from(routed.lane), cost, now, &failed);
            let Some(&(_, predicted)) = candidates.first() else {
                // Every device failed this request's batch (or went
                // unhealthy meanwhile).
                routed.inputs = prepared.inputs;
                return match (upstream, last_failure) {
                    (Some(up), _) if up.fits(Instant::now(), routed.deadline) => {
                        path.set("upstream");
                        self.overflow(entry, up, routed, OverflowReason::DeviceFailed)
                            .await
                            .map(no_device)
                    }
                    (_, Some(e)) => Err(e),
                    (_, None) => Err(GatewayError::DeviceUnhealthy {
                        model: entry.name.clone(),
                    }),
                };
            };
            if predicted + margin > routed.deadline {
                if let Some(up) = upstream
                    && up.fits(now, routed.deadline)
                {
                    routed.inputs = prepared.inputs;
                    path.set("upstream");
                    let reason = if failed.is_empty() {
                        OverflowReason::Deadline
                    } else {
                        OverflowReason::DeviceFailed
                    };
                    return self
                        .overflow(entry, up, routed, reason)
                        .await
                        .map(no_device);
                }
                if predicted > routed.deadline {
                    if let Some(e) = last_failure {
                        return Err(e);
                    }
                    return Err(GatewayError::DeadlineUnreachable {
                        timeout: routed.timeout,
                        predicted: predicted.saturating_duration_since(now),
                    });
                }
                // Within the deadline but not the margin, and no upstream
                // can do better: the local device still tries.
            }

            path.set("local");
            // A batch that costs less than the hand-off runs here, on the
            // idle device, without crossing to its thread and back.
            if let Some(&(i, _)) = candidates.first()
                && let Some(replica) = entry.replicas.get(i)
                && let Some(lease) = replica.worker.try_inline(now, cost, routed.deadline)
            {
                match replica
                    .worker
                    .run_inline(lease, replica.model.as_ref(), &prepared)
                {
                    Ok((outputs, served)) => {
                        return Ok((outputs, Served::Local(served), Some(replica.device.clone())));
                    }
                    // As a batch that failed on the device thread: another
                    // device, an upstream, or the error.
                    Err(e) => {
                        failed.push(i);
                        last_failure = Some(e);
                        continue;
                    }
                }
            }
            let (tx, rx) = oneshot::channel();
            let mut pending = Some(Request {
                id: self.next_id.fetch_add(1, Ordering::Relaxed),
                priority: routed.lane,
                arrival: now,
                deadline: routed.deadline,
                cost,
                cancel: cancel.clone(),
                payload: Pending {
                    prepared,
                    reply: tx,
                },
            });
            // The best device first; a full lane passes the request to the
            // next one that can still make the deadline.
            let mut placed = None;
            let mut full = None;
            for &(i, predicted) in &candidates {
                // Past the first full lane, only a device that can still
                // make the deadline.
                if placed.is_some() || (full.is_some() && predicted > routed.deadline) {
                    break;
                }
                let (Some(replica), Some(request)) = (entry.replicas.get(i), pending.take()) else {
                    continue;
                };
                match replica.worker.admission().admit(request) {
                    Ok(()) => placed = Some(i),
                    Err(rejected) => match rejected.reason {
                        RejectReason::Overloaded => {
                            full = Some(rejected.reason);
                            pending = Some(rejected.request);
                        }
                        RejectReason::Closed => return Err(GatewayError::ShuttingDown),
                        other => {
                            return Err(GatewayError::InvalidArgument(format!(
                                "model '{}' cannot take this request: {other}",
                                entry.name
                            )));
                        }
                    },
                }
            }
            let Some(placed) = placed else {
                // Every lane was full.
                let reason = full.unwrap_or(RejectReason::Overloaded);
                if let Some(up) = upstream
                    && up.fits(Instant::now(), routed.deadline)
                    && let Some(request) = pending
                {
                    routed.inputs = request.payload.prepared.inputs;
                    path.set("upstream");
                    return self
                        .overflow(entry, up, routed, OverflowReason::Overloaded)
                        .await
                        .map(no_device);
                }
                return Err(GatewayError::Overloaded {
                    model: entry.name.clone(),
                    reason,
                });
            };
            let device = entry.replicas.get(placed).map(|r| r.device.clone());
            let reply = rx.await.map_err(|_| GatewayError::Model {
                model: entry.name.clone(),
                message: "the device thread stopped without answering".into(),
            })?;
            match reply {
                Reply::Computed(computed) => {
                    return Ok((computed.outputs, Served::Local(computed.served), device));
                }
                Reply::Failed(e) => return Err(e),
                Reply::Returned(prepared) => {
                    return match upstream {
                        Some(up) if up.fits(Instant::now(), routed.deadline) => {
                            routed.inputs = prepared.inputs;
                            path.set("upstream");
                            self.overflow(entry, up, routed, OverflowReason::EarlyDrop)
                                .await
                                .map(no_device)
                        }
                        _ => Err(GatewayError::DeadlineExceeded),
                    };
                }
                Reply::DeviceFailed(back, e) => {
                    // Another healthy device may still make the deadline.
                    failed.push(placed);
                    prepared = back;
                    last_failure = Some(e);
                }
            }
        }
    }

    /// Sends the request to `up`. Boxed: the upstream client's future is
    /// large, and held inline it would make every request's future (moved
    /// into its task on each spawn) as large, local requests included.
    fn overflow<'a>(
        &'a self,
        entry: &'a ModelEntry,
        up: &'a Upstream,
        routed: Routed<'a>,
        reason: OverflowReason,
    ) -> Overflowing<'a> {
        Box::pin(self.overflow_now(entry, up, routed, reason))
    }

    async fn overflow_now(
        &self,
        entry: &ModelEntry,
        up: &Upstream,
        routed: Routed<'_>,
        reason: OverflowReason,
    ) -> Result<(Vec<HostTensor>, Served), GatewayError> {
        self.metrics
            .overflow
            .get_or_create(&OverflowLabels {
                model: entry.name.clone(),
                reason: reason.as_str(),
            })
            .inc();
        let served = up
            .infer(
                routed.id,
                &routed.inputs,
                crate::upstream::client::Policy {
                    priority: routed.priority,
                    truncate: entry.model.as_text_embedding().map(|_| routed.options),
                },
                routed.deadline,
            )
            .await?;
        Ok((
            served.answer.outputs,
            Served::Upstream(UpstreamServed {
                endpoint: served.endpoint,
                reason,
                latency: served.latency,
                parameters: served.answer.parameters,
            }),
        ))
    }
}

/// An upstream call in progress (boxed: see [`Router::overflow`]).
type Overflowing<'a> = std::pin::Pin<
    Box<dyn Future<Output = Result<(Vec<HostTensor>, Served), GatewayError>> + Send + 'a>,
>;

/// What the local path answers: the outputs, how they were served, and the
/// device that computed them (none when an upstream did).
type Local = (Vec<HostTensor>, Served, Option<Arc<str>>);

fn no_device((outputs, served): (Vec<HostTensor>, Served)) -> Local {
    (outputs, served, None)
}

/// The healthy devices of `entry` not in `exclude`, with their predicted
/// completion of a request of `cost` in `lane` admitted `now`, earliest
/// first.
/// The devices a request may go to, best first: on the stack for up to
/// eight replicas, as most models have, so placing allocates nothing.
type Candidates = smallvec::SmallVec<[(usize, Instant); 8]>;

fn place(
    entry: &ModelEntry,
    lane: usize,
    cost: Cost,
    now: Instant,
    exclude: &[usize],
) -> Candidates {
    let mut candidates: Candidates = entry
        .replicas
        .iter()
        .enumerate()
        .filter(|(i, r)| !exclude.contains(i) && r.worker.healthy())
        .map(|(i, r)| {
            (
                i,
                r.worker.admission().predict_completion_at(now, lane, cost),
            )
        })
        .collect();
    match entry.config.placement {
        quiver_config::Placement::Earliest => candidates.sort_by_key(|&(i, at)| (at, i)),
        quiver_config::Placement::RoundRobin if !candidates.is_empty() => {
            let turn = entry
                .next_replica
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                % candidates.len();
            candidates.rotate_left(turn);
        }
        quiver_config::Placement::RoundRobin => {}
    }
    candidates
}

/// Refuses a request larger than one batch of the model may be: more rows
/// than `max_batch_size`, or more padded tokens (rows × its longest row's
/// tokens) than `max_batch_tokens`. The message says the numbers, e.g. "40
/// rows > max_batch_size 32 of model all-MiniLM-L6-v2"; the client's fault
/// (400, INVALID_ARGUMENT): split the request.
fn check_budget(
    model: &str,
    config: &quiver_config::Model,
    cost: Cost,
) -> Result<(), GatewayError> {
    if cost.rows > config.max_batch_size {
        return Err(GatewayError::InvalidArgument(format!(
            "{} rows > max_batch_size {} of model {model}",
            cost.rows, config.max_batch_size
        )));
    }
    let padded = u64::from(cost.rows) * u64::from(cost.tokens);
    if padded > u64::from(config.max_batch_tokens) {
        return Err(GatewayError::InvalidArgument(format!(
            "{padded} padded tokens ({} rows × {} tokens) > max_batch_tokens {} of model {model}",
            cost.rows, cost.tokens, config.max_batch_tokens
        )));
    }
    Ok(())
}

/// The scheduler lane of a schedule-policy priority: 1 is the most urgent
/// (lane 0); 0 means the default, the least urgent lane.
fn lane(priority: u32, levels: u8) -> Result<u8, GatewayError> {
    let levels = u32::from(levels.max(1));
    match priority {
        0 => Ok((levels - 1) as u8),
        p if p <= levels => Ok((p - 1) as u8),
        p => Err(GatewayError::InvalidArgument(format!(
            "priority {p} is out of range: this model has levels 1..={levels} (0 = default)"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_larger_than_a_batch_is_refused_with_the_numbers() {
        let config = quiver_config::Model {
            max_batch_size: 32,
            max_batch_tokens: 4096,
            ..quiver_config::Model::new("m", quiver_config::ModelKind::Embedding)
        };
        let cost = |rows, tokens| Cost { rows, tokens };
        assert!(check_budget("m", &config, cost(32, 128)).is_ok());
        let rows = check_budget("all-MiniLM-L6-v2", &config, cost(40, 12))
            .expect_err("40 rows do not fit a batch of 32");
        assert_eq!(
            rows.to_string(),
            "invalid request: 40 rows > max_batch_size 32 of model all-MiniLM-L6-v2"
        );
        let tokens =
            check_budget("m", &config, cost(32, 129)).expect_err("32 × 129 tokens do not fit 4096");
        assert_eq!(
            tokens.to_string(),
            "invalid request: 4128 padded tokens (32 rows × 129 tokens) > max_batch_tokens 4096 of model m"
        );
        assert_eq!(tokens.outcome(), "invalid_argument");
    }

    #[test]
    fn priority_maps_to_lanes() {
        assert_eq!(lane(0, 3).ok(), Some(2));
        assert_eq!(lane(1, 3).ok(), Some(0));
        assert_eq!(lane(3, 3).ok(), Some(2));
        assert!(lane(4, 3).is_err());
        assert_eq!(lane(0, 1).ok(), Some(0));
    }
}
