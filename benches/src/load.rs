//! The load runner: closed loop (N concurrent clients) and open loop (an
//! arrival [`Schedule`]), each step with a warm-up and a measured window.
//!
//! Latency is measured from each request's *intended* send time. In the open
//! loop that is `start + offset` from the schedule, whether or not the client
//! could send it then (a full in-flight bound, a late timer): a server that
//! stalls for a second shows a second of latency on every request that
//! should have been sent during the stall, as wrk2 reports it, instead of
//! hiding behind the client's own back-pressure (coordinated omission). In
//! the closed loop a client sends its next request when its previous answer
//! arrives, so its latency is service time by construction; the closed loop
//! measures capacity, the open loop measures latency.
//!
//! The open loop's dispatcher is its own OS thread sleeping with
//! `std::thread::sleep` (high-resolution on Linux), not a tokio timer, whose
//! 1 ms wheel would add up to a millisecond of client lateness to every
//! request; the lateness that is left is recorded as `send_lag`.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use tokio::sync::Semaphore;

use crate::schedule::Schedule;

/// What a target reports about one answer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Served {
    /// `Some(true)` when the response parameter `quiver_path` was there and
    /// not `local`; `None` when the server does not say.
    pub overflow: Option<bool>,
    /// The response parameter `quiver_batch_size`, when the server sets it.
    pub batch_size: Option<u32>,
}

/// The end of one request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// A result.
    Ok(Served),
    /// An error, by kind: the wire status (`RESOURCE_EXHAUSTED`, `http_429`)
    /// or the client's own (`transport`, `client_timeout`).
    Err(String),
}

/// Something requests can be sent to. Request `index` is the `index`-th of
/// the step; targets cycle their request pool with it.
pub trait Infer: Send + Sync + 'static {
    fn infer(&self, index: u64) -> impl Future<Output = Outcome> + Send;
}

/// Upper bound of the latency histograms: one hour, in µs.
pub const MAX_LATENCY_US: u64 = 3_600_000_000;

/// A histogram of microseconds, 1 µs to an hour, 3 significant digits.
pub fn latency_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_LATENCY_US, 3)
        .expect("the bounds are constants that hdrhistogram accepts")
}

/// The latency of a request: from its intended send time to its answer.
/// Never negative: an answer cannot come before its intended send time, and
/// if the clock says so it is zero.
pub fn latency_from_intended(intended: Instant, answered: Instant) -> Duration {
    answered.saturating_duration_since(intended)
}

/// Everything counted in one step's measured window. Requests intended
/// before the window (warm-up) are sent but not counted.
#[derive(Debug, Clone)]
pub struct StepRecorder {
    /// Latencies of results (not of errors), µs from the intended send time.
    pub latency_us: Histogram<u64>,
    /// How late the client sent, µs after the intended time (open loop).
    pub send_lag_us: Histogram<u64>,
    /// Requests whose intended send time fell in the window.
    pub sent: u64,
    /// Of those, answered with a result.
    pub ok: u64,
    /// Of the results, those within the deadline (all, with no deadline).
    pub good: u64,
    /// Errors by kind.
    pub errors: BTreeMap<String, u64>,
    /// Results whose server said which path served them.
    pub path_known: u64,
    /// Of those, served by overflow.
    pub overflow: u64,
    /// Results by the batch size the server reported.
    pub batch_sizes: BTreeMap<u32, u64>,
    /// The latest answer of a counted request, from the window's start.
    pub last_answer: Duration,
    deadline: Option<Duration>,
}

impl StepRecorder {
    /// An empty recorder; `deadline` decides what counts as goodput.
    pub fn new(deadline: Option<Duration>) -> Self {
        StepRecorder {
            latency_us: latency_histogram(),
            send_lag_us: latency_histogram(),
            sent: 0,
            ok: 0,
            good: 0,
            errors: BTreeMap::new(),
            path_known: 0,
            overflow: 0,
            batch_sizes: BTreeMap::new(),
            last_answer: Duration::ZERO,
            deadline,
        }
    }

    /// Counts one request of the window: its latency from the intended send
    /// time, how late it was sent, when (from the window's start) its answer
    /// came, and how it ended.
    pub fn record(
        &mut self,
        latency: Duration,
        send_lag: Duration,
        answered_at: Duration,
        outcome: &Outcome,
    ) {
        self.sent += 1;
        self.last_answer = self.last_answer.max(answered_at);
        self.send_lag_us.saturating_record(micros(send_lag));
        match outcome {
            Outcome::Ok(served) => {
                self.ok += 1;
                self.latency_us.saturating_record(micros(latency));
                if self.deadline.is_none_or(|d| latency <= d) {
                    self.good += 1;
                }
                if let Some(o) = served.overflow {
                    self.path_known += 1;
                    self.overflow += u64::from(o);
                }
                if let Some(b) = served.batch_size {
                    *self.batch_sizes.entry(b).or_default() += 1;
                }
            }
            Outcome::Err(kind) => *self.errors.entry(kind.clone()).or_default() += 1,
        }
    }

    /// The deadline goodput is counted against.
    pub fn deadline(&self) -> Option<Duration> {
        self.deadline
    }
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX).max(1)
}

/// The load of one step.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Load {
    /// `concurrency` clients, each sending when its previous answer came.
    Closed { concurrency: u32 },
    /// Arrivals from a schedule, at most `max_in_flight` outstanding; past
    /// that the dispatcher waits (and the wait counts in the latency).
    Open {
        schedule: Schedule,
        max_in_flight: u32,
    },
}

/// One step of a run.
#[derive(Clone, Copy, Debug)]
pub struct StepPlan {
    pub load: Load,
    /// Sent but not counted. Default 2 s.
    pub warmup: Duration,
    /// The measured window. Default 10 s.
    pub duration: Duration,
    /// Goodput counts results within this latency (the `timeout` sent).
    pub deadline: Option<Duration>,
    /// The client gives up on a request after this long (`client_timeout`).
    pub client_timeout: Duration,
}

/// Progress of a running step, read by the progress bar.
#[derive(Debug, Default)]
pub struct Progress {
    pub answered: std::sync::atomic::AtomicU64,
    pub errors: std::sync::atomic::AtomicU64,
}

struct Shared {
    recorder: Mutex<StepRecorder>,
    progress: Arc<Progress>,
    window_start: Instant,
    window_end: Instant,
}

impl Shared {
    fn finish(&self, intended: Instant, sent: Instant, outcome: Outcome) {
        let answered = Instant::now();
        use std::sync::atomic::Ordering::Relaxed;
        self.progress.answered.fetch_add(1, Relaxed);
        if matches!(outcome, Outcome::Err(_)) {
            self.progress.errors.fetch_add(1, Relaxed);
        }
        if intended < self.window_start || intended >= self.window_end {
            return;
        }
        let mut rec = self
            .recorder
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        rec.record(
            latency_from_intended(intended, answered),
            sent.saturating_duration_since(intended),
            answered.saturating_duration_since(self.window_start),
            &outcome,
        );
    }
}

async fn bounded<T: Infer>(target: &T, index: u64, timeout: Duration) -> Outcome {
    tokio::time::timeout(timeout, target.infer(index))
        .await
        .unwrap_or_else(|_| Outcome::Err("client_timeout".into()))
}

/// Runs one step against `target` on the current tokio runtime and returns
/// what its window counted. `progress` is updated as answers come.
pub async fn run_step<T: Infer>(
    target: Arc<T>,
    plan: &StepPlan,
    progress: Arc<Progress>,
) -> StepRecorder {
    let start = Instant::now();
    let shared = Arc::new(Shared {
        recorder: Mutex::new(StepRecorder::new(plan.deadline)),
        progress,
        window_start: start + plan.warmup,
        window_end: start + plan.warmup + plan.duration,
    });
    match plan.load {
        Load::Closed { concurrency } => {
            run_closed(target, plan, concurrency.max(1), shared.clone(), start).await
        }
        Load::Open {
            schedule,
            max_in_flight,
        } => {
            run_open(
                target,
                plan,
                schedule,
                max_in_flight.max(1),
                shared.clone(),
                start,
            )
            .await
        }
    }
    let rec = shared
        .recorder
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    rec.clone()
}

async fn run_closed<T: Infer>(
    target: Arc<T>,
    plan: &StepPlan,
    concurrency: u32,
    shared: Arc<Shared>,
    start: Instant,
) {
    let end = start + plan.warmup + plan.duration;
    let timeout = plan.client_timeout;
    let mut tasks = tokio::task::JoinSet::new();
    for worker in 0..concurrency {
        let target = target.clone();
        let shared = shared.clone();
        tasks.spawn(async move {
            let mut k: u64 = 0;
            loop {
                let intended = Instant::now();
                if intended >= end {
                    break;
                }
                let index = k * u64::from(concurrency) + u64::from(worker);
                let outcome = bounded(target.as_ref(), index, timeout).await;
                shared.finish(intended, intended, outcome);
                k += 1;
            }
        });
    }
    while tasks.join_next().await.is_some() {}
}

async fn run_open<T: Infer>(
    target: Arc<T>,
    plan: &StepPlan,
    schedule: Schedule,
    max_in_flight: u32,
    shared: Arc<Shared>,
    start: Instant,
) {
    let permits = Arc::new(Semaphore::new(max_in_flight as usize));
    let handle = tokio::runtime::Handle::current();
    let offsets = schedule.offsets(plan.warmup + plan.duration);
    let timeout = plan.client_timeout;
    let dispatcher = {
        let permits = permits.clone();
        std::thread::Builder::new()
            .name("quiver-bench-dispatch".into())
            .spawn(move || {
                for (index, offset) in offsets.enumerate() {
                    let intended = start + offset;
                    let now = Instant::now();
                    if intended > now {
                        std::thread::sleep(intended - now);
                    }
                    // Waiting here is the client's back-pressure; the latency
                    // still runs from `intended`.
                    let Ok(permit) = handle.block_on(permits.clone().acquire_owned()) else {
                        return;
                    };
                    let target = target.clone();
                    let shared = shared.clone();
                    handle.spawn(async move {
                        let sent = Instant::now();
                        let outcome = bounded(target.as_ref(), index as u64, timeout).await;
                        shared.finish(intended, sent, outcome);
                        drop(permit);
                    });
                }
            })
            .expect("the OS can start one more thread")
    };
    // The dispatcher blocks; wait for it off the runtime's workers.
    let _ = tokio::task::spawn_blocking(move || dispatcher.join()).await;
    // Every request holds a permit until its answer is counted: holding them
    // all means every one has been.
    let _ = permits.acquire_many(max_in_flight).await;
}

#[cfg(test)]
mod tests;
