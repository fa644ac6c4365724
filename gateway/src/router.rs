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

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use quiver_batching::{CancelToken, Cost, RejectReason, Request};
use quiver_config::Routing;
use quiver_kernels::{HostTensor, Model};
use tokio::sync::oneshot;

use crate::device::{DeviceWorker, Pending, Reply};
use crate::error::GatewayError;
use crate::metrics::{Metrics, OverflowLabels, PathLabels};
use crate::request::{InferRequest, InferResponse, OverflowReason, Served, UpstreamServed};
use crate::upstream::Upstream;

/// One served model: its loaded model, its device thread, its policy.
#[derive(Debug)]
pub struct ModelEntry {
    pub name: String,
    pub model: Arc<dyn Model>,
    pub worker: DeviceWorker,
    /// The deadline of a request that sends no `timeout`.
    pub default_timeout: Duration,
    /// Priority lanes of the scheduler.
    pub priority_levels: u8,
    /// The model's configuration as loaded: its batching knobs, which the
    /// metadata endpoints report (Triton's model configuration extension).
    pub config: quiver_config::Model,
    /// Where requests may run.
    pub routing: Routing,
    /// The upstream pool requests overflow to, if any.
    pub upstream: Option<Arc<Upstream>>,
}

/// Routes requests to the models served here.
#[derive(Debug, Default)]
pub struct Router {
    models: BTreeMap<String, ModelEntry>,
    next_id: AtomicU64,
    metrics: Arc<Metrics>,
}

/// What a request carries into routing once its model is known.
struct Routed {
    id: String,
    inputs: Vec<HostTensor>,
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

    /// Adds a model; a second one with the same name replaces the first.
    pub fn insert(&mut self, entry: ModelEntry) {
        self.models.insert(entry.name.clone(), entry);
    }

    /// The model called `name`.
    pub fn model(&self, name: &str) -> Option<&ModelEntry> {
        self.models.get(name)
    }

    /// Every model, by name.
    pub fn models(&self) -> impl Iterator<Item = &ModelEntry> {
        self.models.values()
    }

    /// Stops every device thread; queued requests are answered with
    /// [`GatewayError::ShuttingDown`].
    pub fn stop(&self) {
        for entry in self.models.values() {
            entry.worker.stop();
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
        let entry = self
            .models
            .get(&req.model)
            .ok_or_else(|| GatewayError::UnknownModel(req.model.clone()))?;
        let mut path = "none";
        let result = self.route(entry, req, cancel, &mut path).await;
        self.metrics
            .routed
            .get_or_create(&PathLabels {
                model: entry.name.clone(),
                path: match &result {
                    Ok(resp) => resp.served.path(),
                    Err(_) => path,
                },
                outcome: match &result {
                    Ok(_) => "ok",
                    Err(e) => e.outcome(),
                },
            })
            .inc();
        result
    }

    async fn route(
        &self,
        entry: &ModelEntry,
        req: InferRequest,
        cancel: CancelToken,
        path: &mut &'static str,
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
        let request_id = req.id.clone();
        let routed = Routed {
            id: req.id,
            inputs: req.inputs,
            priority: req.priority,
            lane,
            deadline: now + timeout,
            timeout,
        };
        let upstream = match entry.routing {
            Routing::LocalOnly => None,
            _ => entry.upstream.as_deref(),
        };
        let outputs = match (entry.routing, upstream) {
            (Routing::UpstreamOnly, Some(up)) => {
                *path = "upstream";
                self.overflow(entry, up, routed, OverflowReason::Policy)
                    .await?
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
                self.local_first(entry, upstream, routed, cancel, path)
                    .await?
            }
        };
        let (mut outputs, served) = outputs;
        if !req.outputs.is_empty() {
            outputs.retain(|o| req.outputs.contains(&o.name));
        }
        Ok(InferResponse {
            model: entry.name.clone(),
            id: request_id,
            outputs,
            served,
        })
    }

    /// The local device, with `upstream` (if any) for what it cannot do in
    /// time.
    async fn local_first(
        &self,
        entry: &ModelEntry,
        upstream: Option<&Upstream>,
        mut routed: Routed,
        cancel: CancelToken,
        path: &mut &'static str,
    ) -> Result<(Vec<HostTensor>, Served), GatewayError> {
        let now = Instant::now();
        if let Some(up) = upstream
            && !entry.worker.healthy()
            && up.fits(now, routed.deadline)
        {
            *path = "upstream";
            return self
                .overflow(entry, up, routed, OverflowReason::DeviceUnhealthy)
                .await;
        }
        let prepared = entry.model.prepare(std::mem::take(&mut routed.inputs))?;
        let cost = Cost {
            rows: prepared.rows,
            tokens: prepared.tokens,
        };
        // Size first: a request no batch can hold gets the numbers, not a
        // deadline prediction made for a batch that can never form.
        check_budget(&entry.name, &entry.config, cost)?;
        let admission = entry.worker.admission();
        let predicted = admission.predict_completion_at(now, usize::from(routed.lane), cost);
        let margin = upstream.map_or(Duration::ZERO, Upstream::local_margin);
        if predicted + margin > routed.deadline {
            if let Some(up) = upstream
                && up.fits(now, routed.deadline)
            {
                routed.inputs = prepared.inputs;
                *path = "upstream";
                return self
                    .overflow(entry, up, routed, OverflowReason::Deadline)
                    .await;
            }
            if predicted > routed.deadline {
                return Err(GatewayError::DeadlineUnreachable {
                    timeout: routed.timeout,
                    predicted: predicted.saturating_duration_since(now),
                });
            }
            // Within the deadline but not the margin, and no upstream can
            // do better: the local device still tries.
        }

        *path = "local";
        let (tx, rx) = oneshot::channel();
        let request = Request {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            priority: routed.lane,
            arrival: now,
            deadline: routed.deadline,
            cost,
            cancel,
            payload: Pending {
                prepared,
                reply: tx,
            },
        };
        if let Err(rejected) = admission.admit(request) {
            return match rejected.reason {
                RejectReason::Overloaded => {
                    if let Some(up) = upstream
                        && up.fits(Instant::now(), routed.deadline)
                    {
                        routed.inputs = rejected.request.payload.prepared.inputs;
                        *path = "upstream";
                        self.overflow(entry, up, routed, OverflowReason::Overloaded)
                            .await
                    } else {
                        Err(GatewayError::Overloaded {
                            model: entry.name.clone(),
                            reason: rejected.reason,
                        })
                    }
                }
                RejectReason::Closed => Err(GatewayError::ShuttingDown),
                other => Err(GatewayError::InvalidArgument(format!(
                    "model '{}' cannot take this request: {other}",
                    entry.name
                ))),
            };
        }
        let reply = rx.await.map_err(|_| GatewayError::Model {
            model: entry.name.clone(),
            message: "the device thread stopped without answering".into(),
        })?;
        match reply {
            Reply::Computed(computed) => Ok((computed.outputs, Served::Local(computed.served))),
            Reply::Failed(e) => Err(e),
            Reply::Returned(prepared) => match upstream {
                Some(up) if up.fits(Instant::now(), routed.deadline) => {
                    routed.inputs = prepared.inputs;
                    *path = "upstream";
                    self.overflow(entry, up, routed, OverflowReason::EarlyDrop)
                        .await
                }
                _ => Err(GatewayError::DeadlineExceeded),
            },
            Reply::DeviceFailed(prepared, e) => match upstream {
                Some(up) if up.fits(Instant::now(), routed.deadline) => {
                    routed.inputs = prepared.inputs;
                    *path = "upstream";
                    self.overflow(entry, up, routed, OverflowReason::DeviceFailed)
                        .await
                }
                _ => Err(e),
            },
        }
    }

    async fn overflow(
        &self,
        entry: &ModelEntry,
        up: &Upstream,
        routed: Routed,
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
            .infer(&routed.id, &routed.inputs, routed.priority, routed.deadline)
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
