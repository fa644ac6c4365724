//! The router: the one request path every front end goes through.
//!
//! It finds the model, validates the inputs against its signature (which
//! also gives the request's cost), turns the schedule-policy parameters into
//! a priority lane and an absolute deadline, asks the scheduler for a
//! prediction, and admits the request. A deadline that cannot be met is
//! rejected here, before any work. Overflow to upstreams joins here later
//! (DESIGN.md, "Overflow").

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use quiver_batching::{CancelToken, Cost, RejectReason, Request};
use quiver_kernels::Model;
use tokio::sync::oneshot;

use crate::device::{DeviceWorker, Pending};
use crate::error::GatewayError;
use crate::request::{InferRequest, InferResponse};

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
}

/// Routes requests to the models served here.
#[derive(Debug, Default)]
pub struct Router {
    models: BTreeMap<String, ModelEntry>,
    next_id: AtomicU64,
}

impl Router {
    pub fn new() -> Self {
        Self::default()
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
        let prepared = entry.model.prepare(req.inputs)?;
        let cost = Cost {
            rows: prepared.rows,
            tokens: prepared.tokens,
        };

        let now = Instant::now();
        let timeout = req.timeout.unwrap_or(entry.default_timeout);
        let deadline = now + timeout;
        let admission = entry.worker.admission();
        let predicted = admission.predict_completion_at(now, usize::from(lane), cost);
        if predicted > deadline {
            return Err(GatewayError::DeadlineUnreachable {
                timeout,
                predicted: predicted.saturating_duration_since(now),
            });
        }

        let (tx, rx) = oneshot::channel();
        let request = Request {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            priority: lane,
            arrival: now,
            deadline,
            cost,
            cancel,
            payload: Pending {
                prepared,
                reply: tx,
            },
        };
        if let Err(rejected) = admission.admit(request) {
            return Err(match rejected.reason {
                RejectReason::Overloaded => GatewayError::Overloaded {
                    model: entry.name.clone(),
                    reason: rejected.reason,
                },
                RejectReason::Closed => GatewayError::ShuttingDown,
                other => GatewayError::InvalidArgument(format!(
                    "model '{}' cannot take this request: {other}",
                    entry.name
                )),
            });
        }
        let computed = rx.await.map_err(|_| GatewayError::Model {
            model: entry.name.clone(),
            message: "the device thread stopped without answering".into(),
        })??;
        let mut outputs = computed.outputs;
        if !req.outputs.is_empty() {
            outputs.retain(|o| req.outputs.contains(&o.name));
        }
        Ok(InferResponse {
            model: entry.name.clone(),
            id: req.id,
            outputs,
            served: computed.served,
        })
    }
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
    fn priority_maps_to_lanes() {
        assert_eq!(lane(0, 3).ok(), Some(2));
        assert_eq!(lane(1, 3).ok(), Some(0));
        assert_eq!(lane(3, 3).ok(), Some(2));
        assert!(lane(4, 3).is_err());
        assert_eq!(lane(0, 1).ok(), Some(0));
    }
}
