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
use crate::request::Served;

/// What the device thread sends back for one request.
pub type Reply = Result<Computed, GatewayError>;

/// A computed request's outputs and how it was served.
#[derive(Debug)]
pub struct Computed {
    pub outputs: Vec<HostTensor>,
    pub served: Served,
}

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
        let thread = std::thread::Builder::new()
            .name(format!("quiver-device-{name}"))
            .spawn({
                let stop = stop.clone();
                move || DeviceLoop::new(name, model, scheduler, metrics).run(&stop)
            })?;
        Ok(DeviceWorker {
            admission,
            stop,
            thread: Mutex::new(Some(thread)),
        })
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
}

impl DeviceLoop {
    fn new(
        name: String,
        model: Arc<dyn Model>,
        scheduler: Scheduler<Pending>,
        metrics: Arc<Metrics>,
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
        }
    }

    fn run(mut self, stop: &AtomicBool) {
        loop {
            if stop.load(Ordering::Acquire) {
                for req in self.scheduler.shutdown() {
                    let _ = req.payload.reply.send(Err(GatewayError::ShuttingDown));
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
            match poll {
                Poll::Dispatch(batch) => self.execute(batch),
                Poll::WaitUntil(at) => self
                    .scheduler
                    .admission()
                    .doorbell()
                    .wait(Some(at.saturating_duration_since(now))),
                Poll::Idle => self.scheduler.admission().doorbell().wait(None),
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
                    let _ = req.payload.reply.send(Err(GatewayError::Cancelled));
                }
                Ended::DeadlineUnreachable(req) => {
                    let _ = req.payload.reply.send(Err(GatewayError::DeadlineExceeded));
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
                return self.fail_all(waiting, message);
            }
            Ok(Err(e)) => return self.fail_all(waiting, e.to_string()),
            Err(_) => return self.fail_all(waiting, "the model panicked".into()),
        };
        for ((arrival, reply), outputs) in waiting.into_iter().zip(outputs) {
            let queue_time = formed_at.saturating_duration_since(arrival);
            self.metrics
                .queue_seconds
                .get_or_create(&self.labels)
                .observe(queue_time.as_secs_f64());
            let served = Served {
                batch_size: size,
                batch_rows: rows,
                queue_time,
                compute_time,
                reason,
            };
            let _ = reply.send(Ok(Computed { outputs, served }));
        }
    }

    fn fail_all(&self, waiting: Vec<(Instant, oneshot::Sender<Reply>)>, message: String) {
        tracing::error!(model = %self.name, %message, "batch failed");
        for (_, reply) in waiting {
            let _ = reply.send(Err(GatewayError::Model {
                model: self.name.clone(),
                message: message.clone(),
            }));
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
