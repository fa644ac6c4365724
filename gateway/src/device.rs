//! The device thread: one OS thread per model and device drives the
//! scheduler's state machine with the real clock and runs its batches on a
//! `quiver_kernels::Model`. Compute never runs on the tokio runtime.
//!
//! This is the adapter of DESIGN.md between `quiver_batching` and
//! `quiver_kernels`: it turns a [`Batch`] of [`Pending`] requests into one
//! `Model::forward`, splits the outputs, and answers each request through its
//! oneshot channel. Requests that end without compute (cancelled, deadline
//! unreachable) and those still queued at shutdown are answered too.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

use quiver_batching::{Admission, Batch, Ended, Poll, Sample, Scheduler};
use quiver_kernels::{DataType, HostTensor, Model, Prepared, TensorData};
use tokio::sync::oneshot;

use crate::error::GatewayError;
use crate::metrics::{BatchLabels, Metrics, ModelLabels};
use crate::request::LocalBatch;

/// What the device thread sends back for one request: exactly one per
/// admitted request.
#[derive(Debug)]
pub enum Reply {
    /// Computed.
    Computed(Computed),
    /// Dropped by the batcher before compute because it could no longer
    /// make its deadline here (an early drop): handed back with its inputs,
    /// so the router can still send it to an upstream.
    Returned(Prepared),
    /// Failed: the model failed, or the gateway is shutting down, or the
    /// client cancelled it.
    Failed(GatewayError),
    /// The batch it was in failed on the device; handed back with its
    /// inputs, so the router can send it to an upstream, or answer `error`.
    DeviceFailed(Prepared, GatewayError),
}

/// A computed request's outputs and how it was served.
#[derive(Debug)]
pub struct Computed {
    pub outputs: Vec<HostTensor>,
    pub served: LocalBatch,
}

/// How long an unhealthy device waits between probe batches.
pub const PROBE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

/// A request waiting in the scheduler: its prepared inputs and where to
/// send its answer.
#[derive(Debug)]
pub struct Pending {
    pub prepared: Prepared,
    pub reply: oneshot::Sender<Reply>,
}

/// A running device thread and the admission side of its scheduler.
#[derive(Debug)]
pub struct DeviceWorker {
    admission: Arc<Admission<Pending>>,
    stop: Arc<AtomicBool>,
    healthy: Arc<AtomicBool>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl DeviceWorker {
    /// Starts the device thread for `model`.
    pub fn spawn(
        name: String,
        model: Arc<dyn Model>,
        scheduler: Scheduler<Pending>,
        metrics: Arc<Metrics>,
    ) -> std::io::Result<Self> {
        let admission = scheduler.admission();
        let stop = Arc::new(AtomicBool::new(false));
        let healthy = Arc::new(AtomicBool::new(true));
        metrics
            .device_healthy
            .get_or_create(&ModelLabels {
                model: name.clone(),
            })
            .set(1);
        let thread = std::thread::Builder::new()
            .name(format!("quiver-device-{name}"))
            .spawn({
                let stop = stop.clone();
                let healthy = healthy.clone();
                move || DeviceLoop::new(name, model, scheduler, metrics, healthy).run(&stop)
            })?;
        Ok(DeviceWorker {
            admission,
            stop,
            healthy,
            thread: Mutex::new(Some(thread)),
        })
    }

    /// False after a batch failed on the device (a model error), until a
    /// batch or a probe batch succeeds; the router then sends the model's
    /// traffic to its upstreams, if it has any.
    pub fn healthy(&self) -> bool {
        self.healthy.load(Ordering::Acquire)
    }

    /// Where the front end admits requests.
    pub fn admission(&self) -> &Arc<Admission<Pending>> {
        &self.admission
    }

    /// Stops the thread: admission closes, queued requests are answered
    /// with [`GatewayError::ShuttingDown`], and the thread is joined.
    pub fn stop(&self) {
        self.admission.close();
        self.stop.store(true, Ordering::Release);
        self.admission.doorbell().ring();
        let thread = match self.thread.lock() {
            Ok(mut t) => t.take(),
            Err(poisoned) => poisoned.into_inner().take(),
        };
        if let Some(t) = thread
            && t.join().is_err()
        {
            tracing::error!("a device thread panicked while stopping");
        }
    }
}

impl Drop for DeviceWorker {
    fn drop(&mut self) {
        self.stop();
    }
}

struct DeviceLoop {
    name: String,
    labels: ModelLabels,
    model: Arc<dyn Model>,
    scheduler: Scheduler<Pending>,
    metrics: Arc<Metrics>,
    healthy: Arc<AtomicBool>,
    last_probe: Option<Instant>,
}

impl DeviceLoop {
    fn new(
        name: String,
        model: Arc<dyn Model>,
        scheduler: Scheduler<Pending>,
        metrics: Arc<Metrics>,
        healthy: Arc<AtomicBool>,
    ) -> Self {
        let labels = ModelLabels {
            model: name.clone(),
        };
        DeviceLoop {
            name,
            labels,
            model,
            scheduler,
            metrics,
            healthy,
            last_probe: None,
        }
    }

    fn set_healthy(&self, healthy: bool) {
        if self.healthy.swap(healthy, Ordering::AcqRel) != healthy {
            if healthy {
                tracing::info!(model = %self.name, "device healthy again");
            } else {
                tracing::warn!(model = %self.name, "device marked unhealthy");
            }
            self.metrics
                .device_healthy
                .get_or_create(&self.labels)
                .set(i64::from(healthy));
        }
    }

    /// While unhealthy and idle, runs a one-row synthetic batch every
    /// [`PROBE_INTERVAL`]; success marks the device healthy again.
    /// Returns how long to wait until the next probe, if one is due later.
    fn maybe_probe(&mut self, now: Instant) -> Option<std::time::Duration> {
        if self.healthy.load(Ordering::Acquire) {
            return None;
        }
        if let Some(at) = self.last_probe {
            let since = now.saturating_duration_since(at);
            if since < PROBE_INTERVAL {
                return Some(PROBE_INTERVAL - since);
            }
        }
        self.last_probe = Some(now);
        let model = self.model.clone();
        let ok = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            synthetic_inputs(model.as_ref(), 1, 16)
                .ok()
                .and_then(|inputs| model.prepare(inputs).ok())
                .is_some_and(|p| model.forward(std::slice::from_ref(&p)).is_ok())
        }))
        .unwrap_or(false);
        self.metrics
            .device_probes
            .get_or_create(&crate::metrics::ProbeLabels {
                model: self.name.clone(),
                result: if ok { "ok" } else { "failed" },
            })
            .inc();
        if ok {
            self.set_healthy(true);
            None
        } else {
            Some(PROBE_INTERVAL)
        }
    }

    fn run(mut self, stop: &AtomicBool) {
        loop {
            if stop.load(Ordering::Acquire) {
                for req in self.scheduler.shutdown() {
                    let _ = req
                        .payload
                        .reply
                        .send(Reply::Failed(GatewayError::ShuttingDown));
                }
                self.answer_ended();
                return;
            }
            let now = Instant::now();
            let poll = self.scheduler.poll(now);
            self.answer_ended();
            self.metrics
                .queue_depth
                .get_or_create(&self.labels)
                .set(i64::try_from(self.scheduler.stats().queued).unwrap_or(i64::MAX));
            let probe_in = match poll {
                Poll::Dispatch(_) => None,
                _ => self.maybe_probe(now),
            };
            match poll {
                Poll::Dispatch(batch) => self.execute(batch),
                Poll::WaitUntil(at) => {
                    let wait = at.saturating_duration_since(now);
                    let wait = probe_in.map_or(wait, |p| p.min(wait));
                    self.scheduler.admission().doorbell().wait(Some(wait))
                }
                Poll::Idle => self.scheduler.admission().doorbell().wait(probe_in),
            }
        }
    }

    fn answer_ended(&mut self) {
        for ended in self.scheduler.drain_ended() {
            match ended {
                Ended::Cancelled(req) => {
                    self.metrics
                        .cancelled_in_queue
                        .get_or_create(&self.labels)
                        .inc();
                    // Its client is gone, so this send normally finds nobody.
                    let _ = req
                        .payload
                        .reply
                        .send(Reply::Failed(GatewayError::Cancelled));
                }
                Ended::DeadlineUnreachable(req) => {
                    // The router spills it to an upstream if one can still
                    // make the deadline, else answers DEADLINE_EXCEEDED.
                    let _ = req
                        .payload
                        .reply
                        .send(Reply::Returned(req.payload.prepared));
                }
            }
        }
    }

    fn execute(&mut self, batch: Batch<Pending>) {
        let Batch {
            id,
            reason,
            requests,
            rows,
            formed_at,
            ..
        } = batch;
        let size = u32::try_from(requests.len()).unwrap_or(u32::MAX);
        let mut prepared = Vec::with_capacity(requests.len());
        let mut waiting = Vec::with_capacity(requests.len());
        for req in requests {
            prepared.push(req.payload.prepared);
            waiting.push((req.arrival, req.payload.reply));
        }
        // `prepared` is kept until the batch's outcome is known: a failed
        // batch hands each request back with its inputs.
        let in_flight = self
            .metrics
            .batches_in_flight
            .get_or_create(&self.labels)
            .clone();
        in_flight.inc();
        let started = Instant::now();
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.model.forward(&prepared)
        }));
        let compute_time = started.elapsed();
        in_flight.dec();
        self.scheduler.complete(Instant::now(), id, compute_time);

        self.metrics
            .batches
            .get_or_create(&BatchLabels {
                model: self.name.clone(),
                reason: reason.as_str(),
            })
            .inc();
        self.metrics
            .batch_size
            .get_or_create(&self.labels)
            .observe(f64::from(size));
        self.metrics
            .compute_seconds
            .get_or_create(&self.labels)
            .observe(compute_time.as_secs_f64());
        self.metrics
            .computed
            .get_or_create(&self.labels)
            .inc_by(u64::from(size));

        let outputs = match result {
            Ok(Ok(outputs)) if outputs.len() == waiting.len() => outputs,
            Ok(Ok(outputs)) => {
                let message = format!(
                    "model returned {} output sets for {} requests",
                    outputs.len(),
                    waiting.len()
                );
                return self.fail_all(waiting, prepared, message);
            }
            Ok(Err(e)) => return self.fail_all(waiting, prepared, e.to_string()),
            Err(_) => return self.fail_all(waiting, prepared, "the model panicked".into()),
        };
        self.set_healthy(true);
        for ((arrival, reply), outputs) in waiting.into_iter().zip(outputs) {
            let queue_time = formed_at.saturating_duration_since(arrival);
            self.metrics
                .queue_seconds
                .get_or_create(&self.labels)
                .observe(queue_time.as_secs_f64());
            let served = LocalBatch {
                batch_size: size,
                batch_rows: rows,
                queue_time,
                compute_time,
                reason,
            };
            let _ = reply.send(Reply::Computed(Computed { outputs, served }));
        }
    }

    fn fail_all(
        &mut self,
        waiting: Vec<(Instant, oneshot::Sender<Reply>)>,
        prepared: Vec<Prepared>,
        message: String,
    ) {
        tracing::error!(model = %self.name, %message, "batch failed");
        self.set_healthy(false);
        // The next probe waits a full interval: the batch just failed.
        self.last_probe = Some(Instant::now());
        for ((_, reply), prepared) in waiting.into_iter().zip(prepared) {
            let _ = reply.send(Reply::DeviceFailed(
                prepared,
                GatewayError::Model {
                    model: self.name.clone(),
                    message: message.clone(),
                },
            ));
        }
    }
}

/// Sequence lengths (tokens per row, roughly) swept for models with a BYTES
/// (text) input, so the latency model sees padded tokens as well as rows.
pub const CALIBRATION_TEXT_TOKENS: [usize; 2] = [16, 128];

/// Largest calibration batch of a text model, in padded tokens (rows ×
/// tokens), past the first batch size; keeps the start-up sweep to seconds
/// on a small CPU (MiniLM: batches up to 32 × 16 and 4 × 128 tokens).
pub const CALIBRATION_MAX_TOKENS: u32 = 512;

/// Runs a short sweep of batch sizes on `model` with synthetic inputs and
/// returns the measured samples, to seed the scheduler's latency model.
///
/// Batch sizes: 1, then doubling up to `max_rows`, each measured `reps`
/// times after one warm-up run. A model with a BYTES (text) input is swept
/// once per length of [`CALIBRATION_TEXT_TOKENS`], with batch sizes up to
/// [`CALIBRATION_MAX_TOKENS`] padded tokens.
pub fn calibrate(model: &dyn Model, max_rows: u32, reps: u32) -> Result<Vec<Sample>, String> {
    let mut sizes = vec![1u32];
    while let Some(&last) = sizes.last() {
        let next = last.saturating_mul(2).min(max_rows);
        if next <= last {
            break;
        }
        sizes.push(next);
    }
    let text = model
        .signature()
        .inputs
        .iter()
        .any(|spec| spec.datatype == DataType::Bytes);
    let lengths: &[usize] = if text { &CALIBRATION_TEXT_TOKENS } else { &[1] };
    let mut samples = Vec::new();
    for (&length, rows) in lengths
        .iter()
        .flat_map(|length| sizes.iter().map(move |&rows| (length, rows)))
    {
        let tokens = rows.saturating_mul(u32::try_from(length).unwrap_or(u32::MAX));
        if text && rows > 1 && tokens > CALIBRATION_MAX_TOKENS {
            continue;
        }
        let prepared = model
            .prepare(synthetic_inputs(model, rows as usize, length)?)
            .map_err(|e| format!("calibration input for {rows} rows: {e}"))?;
        let batch = std::slice::from_ref(&prepared);
        model
            .forward(batch)
            .map_err(|e| format!("calibration batch of {rows} rows: {e}"))?;
        for _ in 0..reps {
            let t = Instant::now();
            model
                .forward(batch)
                .map_err(|e| format!("calibration batch of {rows} rows: {e}"))?;
            samples.push(Sample {
                rows,
                padded_tokens: rows.saturating_mul(prepared.tokens.max(1)),
                measured: t.elapsed(),
            });
        }
    }
    Ok(samples)
}

/// Zero-filled inputs of `rows` rows that fit the model's signature; free
/// dimensions past the batch dimension get size 1. BYTES elements are texts
/// of about `text_tokens` tokens (a word repeated, `[CLS]`/`[SEP]` counted).
fn synthetic_inputs(
    model: &dyn Model,
    rows: usize,
    text_tokens: usize,
) -> Result<Vec<HostTensor>, String> {
    let words = text_tokens.saturating_sub(2).max(1);
    let text = vec!["calibration"; words].join(" ").into_bytes();
    model
        .signature()
        .inputs
        .iter()
        .map(|spec| {
            let shape: Vec<usize> = spec
                .shape
                .iter()
                .enumerate()
                .map(|(i, &d)| {
                    if i == 0 {
                        rows
                    } else {
                        usize::try_from(d).unwrap_or(1)
                    }
                })
                .collect();
            let n: usize = shape.iter().product();
            let data = match spec.datatype {
                DataType::Fp32 => TensorData::F32(vec![0.0; n]),
                DataType::Fp64 => TensorData::F64(vec![0.0; n]),
                DataType::Int64 => TensorData::I64(vec![0; n]),
                DataType::Int32 => TensorData::I32(vec![0; n]),
                DataType::Bytes => TensorData::Bytes(vec![text.clone(); n]),
                other => {
                    return Err(format!(
                        "no synthetic input for datatype {}",
                        other.as_str()
                    ));
                }
            };
            HostTensor::new(spec.name.clone(), shape, data).map_err(|e| e.to_string())
        })
        .collect()
}
