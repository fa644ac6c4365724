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
use std::time::{Duration, Instant};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::histogram::Histogram;
use quiver_batching::{
    Admission, Batch, DispatchReason, Ended, InlineLease, Poll, Sample, Scheduler,
};
use quiver_kernels::{DataType, HostTensor, Model, Prepared, TensorData};
use tokio::sync::oneshot;

use crate::error::GatewayError;
use crate::metrics::{BatchLabels, DeviceLabels, Metrics, ModelLabels};
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
    health: Arc<Health>,
    thread: Mutex<Option<JoinHandle<()>>>,
    /// What an inline batch records, resolved once.
    inline: InlineMetrics,
}

/// A device's health, shared by its thread and the inline path: failed
/// batches in a row, and whether the device takes work.
#[derive(Debug)]
struct Health {
    healthy: AtomicBool,
    failures: std::sync::atomic::AtomicU32,
    unhealthy_after: u32,
    /// An inline batch failed since the device thread last looked: its next
    /// probe waits a full interval from then, as after a failed batch of
    /// its own.
    inline_failed: AtomicBool,
    /// `quiver_device_healthy` of this device.
    gauge: prometheus_client::metrics::gauge::Gauge,
    model: String,
}

impl Health {
    fn set(&self, healthy: bool) {
        if self.healthy.swap(healthy, Ordering::AcqRel) != healthy {
            if healthy {
                tracing::info!(model = %self.model, "device healthy again");
            } else {
                tracing::warn!(model = %self.model, "device marked unhealthy");
            }
            self.gauge.set(i64::from(healthy));
        }
    }

    fn succeeded(&self) {
        self.failures.store(0, Ordering::Relaxed);
        self.set(true);
    }

    /// Counts a failed batch; returns the failures in a row.
    fn failed(&self) -> u32 {
        let n = self
            .failures
            .fetch_add(1, Ordering::AcqRel)
            .saturating_add(1);
        if n >= self.unhealthy_after {
            self.set(false);
        }
        n
    }
}

/// The metric series of an inline batch on one device, looked up once
/// rather than per request (each is a shared handle).
#[derive(Debug)]
struct InlineMetrics {
    batches: Counter,
    batch_size: Histogram,
    computed: Counter,
    padded_tokens: Counter,
    real_tokens: Counter,
    compute_seconds: crate::metrics::Latency,
    queue_seconds: crate::metrics::Latency,
}

impl InlineMetrics {
    fn new(metrics: &Metrics, device: &DeviceLabels) -> Self {
        let model = ModelLabels {
            model: device.model.clone(),
            version: device.version.clone(),
        };
        InlineMetrics {
            batches: metrics
                .batches
                .get_or_create(&BatchLabels {
                    model: device.model.clone(),
                    version: device.version.clone(),
                    device: device.device.clone(),
                    reason: DispatchReason::Inline.as_str(),
                })
                .clone(),
            batch_size: metrics.batch_size.get_or_create(device).clone(),
            computed: metrics.computed.get_or_create(device).clone(),
            padded_tokens: metrics.padded_tokens.get_or_create(device).clone(),
            real_tokens: metrics.real_tokens.get_or_create(device).clone(),
            compute_seconds: metrics.compute_seconds.get_or_create(&model),
            queue_seconds: metrics.queue_seconds.get_or_create(&model),
        }
    }
}

impl DeviceWorker {
    /// Starts the device thread for `model`.
    pub fn spawn(
        labels: DeviceLabels,
        model: Arc<dyn Model>,
        scheduler: Scheduler<Pending>,
        metrics: Arc<Metrics>,
        unhealthy_after_failures: u32,
    ) -> std::io::Result<Self> {
        let admission = scheduler.admission();
        let max_in_flight = scheduler.config().max_in_flight;
        let stop = Arc::new(AtomicBool::new(false));
        let gauge = metrics.device_healthy.get_or_create(&labels).clone();
        gauge.set(1);
        let health = Arc::new(Health {
            healthy: AtomicBool::new(true),
            failures: Default::default(),
            unhealthy_after: unhealthy_after_failures.max(1),
            inline_failed: AtomicBool::new(false),
            gauge,
            model: labels.model.clone(),
        });
        let inline = InlineMetrics::new(&metrics, &labels);
        let name = labels.model.clone();
        let thread = std::thread::Builder::new()
            .name(format!("quiver-device-{name}"))
            .spawn({
                let stop = stop.clone();
                let health = health.clone();
                move || {
                    DeviceLoop::new(labels, model, scheduler, metrics, health)
                        .run(&stop, max_in_flight)
                }
            })?;
        Ok(DeviceWorker {
            admission,
            stop,
            health,
            thread: Mutex::new(Some(thread)),
            inline,
        })
    }

    /// Lends the idle device to the caller for `prepared` alone, if the
    /// scheduler allows it ([`Admission::try_inline`]: nothing queued or in
    /// flight, predicted within `inline_below` and the deadline); `None`
    /// otherwise, and the caller admits the request as usual. Only while
    /// healthy: failures are counted, and probes run, on the device thread.
    pub fn try_inline(
        &self,
        now: Instant,
        cost: quiver_batching::Cost,
        deadline: Instant,
    ) -> Option<InlineLease<'_, Pending>> {
        if !self.healthy() {
            return None;
        }
        self.admission.try_inline(now, cost, deadline)
    }

    /// Runs `prepared` as a batch of one on this thread under `lease` and
    /// records it as the device thread records a batch (reason `inline`,
    /// no queue time). A model error or panic counts as a failed batch of
    /// the device (its health, as on the device thread) and is handed back:
    /// the caller then moves the request to another device or an upstream,
    /// as for a batch that failed on the device thread.
    pub fn run_inline(
        &self,
        lease: InlineLease<'_, Pending>,
        model: &dyn Model,
        prepared: &Prepared,
    ) -> Result<(Vec<HostTensor>, LocalBatch), GatewayError> {
        let started = Instant::now();
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            model.forward(std::slice::from_ref(prepared))
        }));
        let compute_time = started.elapsed();
        let message = match result {
            Ok(Ok(mut sets)) if sets.len() == 1 => {
                let outputs = sets.pop().unwrap_or_default();
                lease.finish(compute_time);
                self.health.succeeded();
                return Ok(self.record_inline(outputs, prepared, compute_time));
            }
            Ok(Ok(sets)) => format!("model returned {} output sets for 1 request", sets.len()),
            Ok(Err(e)) => e.to_string(),
            Err(_) => "the model panicked".into(),
        };
        drop(lease);
        // A failed batch as on the device thread: counted, and past the
        // limit the device is marked unhealthy and its thread is woken to
        // start probing (after a full interval).
        self.health.inline_failed.store(true, Ordering::Release);
        let failures = self.health.failed();
        tracing::error!(model = %self.health.model, %message, failures, "inline batch failed");
        self.admission.doorbell().ring();
        Err(GatewayError::Model {
            model: self.health.model.clone(),
            message,
        })
    }

    fn record_inline(
        &self,
        outputs: Vec<HostTensor>,
        prepared: &Prepared,
        compute_time: Duration,
    ) -> (Vec<HostTensor>, LocalBatch) {
        let rows = prepared.rows;
        let m = &self.inline;
        m.batches.inc();
        m.batch_size.observe(1.0);
        m.computed.inc();
        if let Some(tokens) = TokenCounts::of(std::slice::from_ref(prepared)) {
            m.padded_tokens.inc_by(tokens.padded);
            m.real_tokens.inc_by(tokens.real);
        }
        m.compute_seconds.record(compute_time);
        m.queue_seconds.record(Duration::ZERO);
        (
            outputs,
            LocalBatch {
                batch_size: 1,
                batch_rows: rows,
                queue_time: Duration::ZERO,
                compute_time,
                reason: DispatchReason::Inline,
            },
        )
    }

    /// False after `unhealthy_after_failures` batches in a row failed on the
    /// device (a model error or a panic), until a batch or a probe batch
    /// succeeds; the router then sends the model's
    /// traffic to its upstreams, if it has any.
    pub fn healthy(&self) -> bool {
        self.health.healthy.load(Ordering::Acquire)
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
    /// The model version's labels (its latency histograms, summed over
    /// devices).
    labels: ModelLabels,
    /// This device's labels.
    device: DeviceLabels,
    model: Arc<dyn Model>,
    scheduler: Scheduler<Pending>,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    last_probe: Option<Instant>,
    /// With `max_in_flight` ≥ 2, the thread that runs `forward`: this
    /// thread forms, hands over and answers batches while it computes.
    executor: Option<Executor>,
}

/// A text batch's tokens as `forward` runs it: every row padded to the
/// longest sequence of the batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct TokenCounts {
    /// Rows × the longest sequence.
    padded: u64,
    /// The rows' own sequence lengths, summed.
    real: u64,
}

impl TokenCounts {
    /// `None` for a batch without token ids (a model without a tokenizer).
    fn of(batch: &[Prepared]) -> Option<TokenCounts> {
        let rows = batch.iter().flat_map(|p| &p.token_ids);
        let (count, real, longest) = rows.fold((0u64, 0u64, 0u64), |(n, sum, max), ids| {
            let len = ids.len() as u64;
            (n + 1, sum + len, max.max(len))
        });
        (real > 0).then_some(TokenCounts {
            padded: count * longest,
            real,
        })
    }
}

/// A batch handed to the executor thread.
struct Job {
    id: quiver_batching::BatchId,
    reason: quiver_batching::DispatchReason,
    rows: u32,
    formed_at: Instant,
    prepared: Vec<Prepared>,
    waiting: Vec<(Instant, oneshot::Sender<Reply>)>,
}

/// A batch the executor is done with.
struct Done {
    job: Job,
    compute_time: std::time::Duration,
    result: std::thread::Result<Result<Vec<Vec<HostTensor>>, quiver_kernels::ModelError>>,
}

/// The executor thread and its two channels (bounded by `max_in_flight`).
struct Executor {
    jobs: Option<crossbeam_channel::Sender<Job>>,
    done: crossbeam_channel::Receiver<Done>,
    thread: Option<JoinHandle<()>>,
}

impl Executor {
    fn spawn(
        name: &str,
        model: Arc<dyn Model>,
        admission: Arc<Admission<Pending>>,
        slots: usize,
    ) -> std::io::Result<Self> {
        let (jobs, jobs_rx) = crossbeam_channel::bounded::<Job>(slots);
        let (done_tx, done) = crossbeam_channel::bounded::<Done>(slots);
        let thread = std::thread::Builder::new()
            .name(format!("quiver-exec-{name}"))
            .spawn(move || {
                for job in jobs_rx {
                    let started = Instant::now();
                    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        model.forward(&job.prepared)
                    }));
                    let compute_time = started.elapsed();
                    if done_tx
                        .send(Done {
                            job,
                            compute_time,
                            result,
                        })
                        .is_err()
                    {
                        return;
                    }
                    // Wakes the scheduler's thread to answer and refill.
                    admission.doorbell().ring();
                }
            })?;
        Ok(Executor {
            jobs: Some(jobs),
            done,
            thread: Some(thread),
        })
    }
}

impl Drop for Executor {
    fn drop(&mut self) {
        self.jobs = None;
        if let Some(t) = self.thread.take()
            && t.join().is_err()
        {
            tracing::error!("a device executor thread panicked");
        }
    }
}

impl DeviceLoop {
    fn new(
        device: DeviceLabels,
        model: Arc<dyn Model>,
        scheduler: Scheduler<Pending>,
        metrics: Arc<Metrics>,
        health: Arc<Health>,
    ) -> Self {
        let labels = ModelLabels {
            model: device.model.clone(),
            version: device.version.clone(),
        };
        DeviceLoop {
            name: device.model.clone(),
            labels,
            device,
            model,
            scheduler,
            metrics,
            health,
            last_probe: None,
            executor: None,
        }
    }

    /// While unhealthy and idle, runs a one-row synthetic batch every
    /// [`PROBE_INTERVAL`]; success marks the device healthy again.
    /// Returns how long to wait until the next probe, if one is due later.
    fn maybe_probe(&mut self, now: Instant) -> Option<std::time::Duration> {
        // Never beside a batch still on the executor.
        if self.health.inline_failed.swap(false, Ordering::AcqRel) {
            self.last_probe = Some(now);
        }
        if self.health.healthy.load(Ordering::Acquire) || self.scheduler.in_flight() > 0 {
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
                device: self.device.device.clone(),
                result: if ok { "ok" } else { "failed" },
            })
            .inc();
        if ok {
            self.health.succeeded();
            None
        } else {
            Some(PROBE_INTERVAL)
        }
    }

    fn run(mut self, stop: &AtomicBool, max_in_flight: u32) {
        if max_in_flight >= 2 {
            match Executor::spawn(
                &self.name,
                self.model.clone(),
                self.scheduler.admission().clone(),
                max_in_flight as usize,
            ) {
                Ok(e) => self.executor = Some(e),
                Err(e) => tracing::warn!(
                    model = %self.name,
                    error = %e,
                    "no executor thread: batches run one at a time"
                ),
            }
        }
        loop {
            self.collect_done(None);
            if stop.load(Ordering::Acquire) {
                // Batches on the device finish and are answered first.
                while self.scheduler.in_flight() > 0 && self.executor.is_some() {
                    if !self.collect_done(Some(std::time::Duration::from_secs(60))) {
                        break;
                    }
                }
                self.executor = None;
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
                .get_or_create(&self.device)
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
                        .get_or_create(&self.device)
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

    /// Answers the batches the executor finished; with `wait`, waits up
    /// to that long for one. False when none came.
    fn collect_done(&mut self, wait: Option<std::time::Duration>) -> bool {
        let mut got = false;
        loop {
            let Some(executor) = &self.executor else {
                return got;
            };
            let next = match (wait, got) {
                (Some(w), false) => executor.done.recv_timeout(w).ok(),
                _ => executor.done.try_recv().ok(),
            };
            let Some(done) = next else {
                return got;
            };
            got = true;
            self.finish(done);
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
        let mut prepared = Vec::with_capacity(requests.len());
        let mut waiting = Vec::with_capacity(requests.len());
        for req in requests {
            prepared.push(req.payload.prepared);
            waiting.push((req.arrival, req.payload.reply));
        }
        // `prepared` is kept until the batch's outcome is known: a failed
        // batch hands each request back with its inputs.
        let job = Job {
            id,
            reason,
            rows,
            formed_at,
            prepared,
            waiting,
        };
        self.metrics
            .batches_in_flight
            .get_or_create(&self.device)
            .inc();
        if let Some(jobs) = self.executor.as_ref().and_then(|e| e.jobs.as_ref()) {
            // The scheduler dispatches at most `max_in_flight` batches, the
            // channel's bound: this never waits.
            match jobs.send(job) {
                Ok(()) => return,
                Err(crossbeam_channel::SendError(job)) => {
                    // The executor is gone: run it here.
                    self.executor = None;
                    self.run_here(job);
                    return;
                }
            }
        }
        self.run_here(job);
    }

    /// Runs a batch on this thread (`max_in_flight = 1`: no hand-off).
    fn run_here(&mut self, job: Job) {
        let started = Instant::now();
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.model.forward(&job.prepared)
        }));
        let compute_time = started.elapsed();
        self.finish(Done {
            job,
            compute_time,
            result,
        });
    }

    /// Records a finished batch and answers its requests.
    fn finish(&mut self, done: Done) {
        let Done {
            job,
            compute_time,
            result,
        } = done;
        let Job {
            id,
            reason,
            rows,
            formed_at,
            prepared,
            waiting,
        } = job;
        let size = u32::try_from(waiting.len()).unwrap_or(u32::MAX);
        self.metrics
            .batches_in_flight
            .get_or_create(&self.device)
            .dec();
        self.scheduler.complete(Instant::now(), id, compute_time);

        self.metrics
            .batches
            .get_or_create(&BatchLabels {
                model: self.name.clone(),
                version: self.device.version.clone(),
                device: self.device.device.clone(),
                reason: reason.as_str(),
            })
            .inc();
        self.metrics
            .batch_size
            .get_or_create(&self.device)
            .observe(f64::from(size));
        self.metrics
            .compute_seconds
            .get_or_create(&self.labels)
            .observe(compute_time.as_secs_f64());
        self.metrics
            .computed
            .get_or_create(&self.device)
            .inc_by(u64::from(size));
        if let Some(tokens) = TokenCounts::of(&prepared) {
            self.metrics
                .padded_tokens
                .get_or_create(&self.device)
                .inc_by(tokens.padded);
            self.metrics
                .real_tokens
                .get_or_create(&self.device)
                .inc_by(tokens.real);
        }

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
        self.health.succeeded();
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
        let failures = self.health.failed();
        tracing::error!(model = %self.name, %message, failures, "batch failed");
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
                DataType::Bytes => TensorData::Bytes(vec![text.clone(); n]),
                other => TensorData::zeros(other, n)
                    .ok_or_else(|| format!("no synthetic input for datatype {}", other.as_str()))?,
            };
            HostTensor::new(spec.name.clone(), shape, data).map_err(|e| e.to_string())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(rows: &[usize]) -> Prepared {
        let token_ids: Vec<Vec<u32>> = rows.iter().map(|&n| vec![7; n]).collect();
        Prepared {
            inputs: Vec::new(),
            rows: u32::try_from(rows.len()).unwrap_or(u32::MAX),
            tokens: u32::try_from(rows.iter().copied().max().unwrap_or(1)).unwrap_or(u32::MAX),
            token_ids,
            truncated: 0,
        }
    }

    #[test]
    fn token_counts_pad_every_row_to_the_batch_longest() {
        // Three rows of 3, 10 and 4 tokens in two requests: 3 × 10 padded.
        let batch = [text(&[3, 10]), text(&[4])];
        assert_eq!(
            TokenCounts::of(&batch),
            Some(TokenCounts {
                padded: 30,
                real: 17
            })
        );
        // A model without token ids counts nothing.
        assert_eq!(TokenCounts::of(&[Prepared::rows(Vec::new(), 4)]), None);
    }
}
