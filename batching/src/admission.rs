//! The admission side (DESIGN.md "Scheduling": admission queue and admission
//! prediction): what front-end threads call, lock-free, to hand a request to
//! one device's scheduler or learn at once why not, and to predict when a
//! request would complete before choosing local or overflow.
//!
//! One bounded lane per priority level. Each lane also keeps counters the
//! producers update before pushing and the device thread after taking work
//! out: an *occupancy* that enforces
//! [`queue_capacity`](crate::SchedulerConfig::queue_capacity) over everything
//! admitted and not yet handed back (lane, formation queue and ended
//! reports), and the queued rows and tokens that admission prediction reads.
//! The device thread publishes its predicted busy-until instant and the
//! latency model's coefficients into atomics here.

use std::time::{Duration, Instant};

use crate::latency::{Coefficients, Sample};
use crate::request::{Cost, Request};
use crate::sync::{self, AtomicU64, BoundedQueue, Ordering};
use crate::{Doorbell, SchedulerConfig};

/// Why [`Admission::admit`] refused a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RejectReason {
    /// The request's priority lane is at
    /// [`queue_capacity`](crate::SchedulerConfig::queue_capacity); retrying
    /// later or elsewhere (overflow) can help.
    #[error("overloaded: the priority lane is full")]
    Overloaded,
    /// The request alone breaks the batch budget (rows above
    /// `max_batch_size` or `rows × tokens` above `max_batch_tokens`); the
    /// client's fault here, though a device with a larger budget could take it.
    #[error("request too large for the batch budget")]
    TooLarge,
    /// `priority` is not below `priority_levels`; the caller's fault.
    #[error("priority out of range")]
    InvalidPriority,
    /// `rows` or `tokens` is zero; the caller's fault.
    #[error("request cost has zero rows or zero tokens")]
    InvalidCost,
    /// Admission was closed for shutdown; another instance may take it.
    #[error("scheduler closed for shutdown")]
    Closed,
}

/// A refused request, handed back so that the caller can answer it.
#[derive(Debug)]
pub struct Rejected<T> {
    /// Why it was refused.
    pub reason: RejectReason,
    /// The request, untouched.
    pub request: Request<T>,
}

/// Counters of an [`Admission`], read without stopping producers (each field
/// is a separate relaxed load, so the set is not one atomic snapshot).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AdmissionStats {
    /// Requests accepted.
    pub admitted: u64,
    /// Rejections with [`RejectReason::Overloaded`].
    pub overloaded: u64,
    /// Rejections with [`RejectReason::TooLarge`].
    pub too_large: u64,
    /// Rejections with [`RejectReason::InvalidPriority`].
    pub invalid_priority: u64,
    /// Rejections with [`RejectReason::InvalidCost`].
    pub invalid_cost: u64,
    /// Rejections with [`RejectReason::Closed`].
    pub closed: u64,
    /// Requests admitted and not yet handed back (queued, or ended and not
    /// yet drained), over all lanes.
    pub queued: u64,
}

/// The high bit of [`Admission::gate`]: admission is closed.
const CLOSED: u64 = 1 << 63;

/// Encoded busy-until meaning "no batch in flight".
const NOT_BUSY: i64 = i64::MIN;

/// [`Admission::device`]: the device thread owns the device (polling,
/// forming, computing, or parked with work it is waiting on).
const DEVICE_BUSY: u64 = 0;
/// [`Admission::device`]: the device thread is parked with nothing queued
/// and nothing in flight; a caller may borrow the device for one inline
/// batch.
const DEVICE_IDLE: u64 = 1;
/// [`Admission::device`]: a caller runs an inline batch; the device thread
/// dispatches nothing until the lease ends.
const DEVICE_LENT: u64 = 2;
/// [`Admission::device`]: lent, and the device thread woke meanwhile (work
/// was admitted) and wants it back: the lease's end rings the doorbell.
/// Every transition is a read-modify-write of the one atomic, so their order
/// is total and that ring cannot be missed.
const DEVICE_WANTED: u64 = 3;

/// Inline batches' measurements waiting for the device thread's latency
/// model; more are dropped (the model needs a stream of samples, not each).
const INLINE_SAMPLES: usize = 64;

#[derive(Debug)]
struct Lane<T> {
    queue: BoundedQueue<Request<T>>,
    /// Admitted and not yet handed back; at most `capacity` once settled.
    occupancy: AtomicU64,
    /// Rows of the requests admitted and not yet dispatched or ended.
    rows: AtomicU64,
    /// `rows × tokens` of the same requests (padding within future batches
    /// is not known yet).
    tokens: AtomicU64,
}

/// The producer side of one scheduler, shared as `Arc<Admission<T>>` by the
/// front end's threads (`Send + Sync` when `T: Send`).
///
/// Nothing here blocks or panics: [`admit`](Self::admit) is a few atomic
/// operations and a push into a bounded lock-free queue, then a doorbell ring
/// that takes a lock only when the bell was not already rung.
#[derive(Debug)]
pub struct Admission<T> {
    lanes: Box<[Lane<T>]>,
    capacity: u64,
    max_rows: u32,
    max_tokens: u32,
    /// Admits in progress (low bits) and [`CLOSED`]; lets shutdown wait for
    /// admits that passed the closed check so none is stranded in a lane.
    gate: AtomicU64,
    doorbell: Doorbell,
    admitted: AtomicU64,
    overloaded: AtomicU64,
    too_large: AtomicU64,
    invalid_priority: AtomicU64,
    invalid_cost: AtomicU64,
    closed: AtomicU64,
    /// The instant `busy_until` counts from.
    base: Instant,
    /// Predicted end of the work in flight on the device, as `i64`
    /// nanoseconds from `base` (negative before it), or [`NOT_BUSY`].
    busy_until: AtomicU64,
    /// [`Coefficients`] as `f64` bits: fixed, per row, per token.
    coefficients: [AtomicU64; 3],
    /// [`DEVICE_BUSY`], [`DEVICE_IDLE`], [`DEVICE_LENT`] or [`DEVICE_WANTED`].
    device: AtomicU64,
    /// Inline batches may run when predicted at or below this.
    inline_below: Duration,
    /// Inline batches' measurements, for the device thread's latency model.
    inline_samples: BoundedQueue<Sample>,
    /// Inline batches run.
    inlined: AtomicU64,
}

/// The device lent to one caller for one inline batch
/// ([`Admission::try_inline`]). Ending it ([`finish`](Self::finish), or a
/// drop, as when the batch panicked) gives the device back and wakes the
/// device thread if work was queued meanwhile.
#[derive(Debug)]
#[must_use = "the device stays lent until the lease ends"]
pub struct InlineLease<'a, T> {
    admission: &'a Admission<T>,
    cost: Cost,
    predicted: Duration,
    sample: Option<Sample>,
}

impl<T> InlineLease<'_, T> {
    /// The batch's predicted service time (at most the inline bound).
    pub fn predicted(&self) -> Duration {
        self.predicted
    }

    /// Ends the lease after the batch ran for `measured`: the measurement
    /// feeds the latency model on the device thread's next poll.
    pub fn finish(mut self, measured: Duration) {
        self.sample = Some(Sample {
            rows: self.cost.rows,
            padded_tokens: self.cost.padded_tokens(),
            measured,
        });
    }
}

impl<T> Drop for InlineLease<'_, T> {
    fn drop(&mut self) {
        let a = self.admission;
        if let Some(sample) = self.sample.take() {
            // A full queue drops the sample: the model keeps its fit.
            let _ = a.inline_samples.push(sample);
        }
        a.inlined.fetch_add(1, Ordering::Relaxed);
        a.publish_busy_until(None);
        a.return_device();
    }
}

/// Leaves the admission gate when dropped, on every return path of `admit`.
struct GateTicket<'a>(&'a AtomicU64);

impl Drop for GateTicket<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Release);
    }
}

impl<T> Admission<T> {
    pub(crate) fn new(config: &SchedulerConfig, base: Instant, coefficients: Coefficients) -> Self {
        let lanes = (0..config.priority_levels)
            .map(|_| Lane {
                queue: BoundedQueue::new(config.queue_capacity),
                occupancy: AtomicU64::new(0),
                rows: AtomicU64::new(0),
                tokens: AtomicU64::new(0),
            })
            .collect();
        let admission = Self {
            lanes,
            capacity: u64::try_from(config.queue_capacity).unwrap_or(u64::MAX),
            max_rows: config.max_batch_size,
            max_tokens: config.max_batch_tokens,
            gate: AtomicU64::new(0),
            doorbell: Doorbell::with_spin(config.idle_spin),
            admitted: AtomicU64::new(0),
            overloaded: AtomicU64::new(0),
            too_large: AtomicU64::new(0),
            invalid_priority: AtomicU64::new(0),
            invalid_cost: AtomicU64::new(0),
            closed: AtomicU64::new(0),
            base,
            busy_until: AtomicU64::new(NOT_BUSY.cast_unsigned()),
            coefficients: [AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0)],
            device: AtomicU64::new(DEVICE_BUSY),
            inline_below: config.inline_below,
            inline_samples: BoundedQueue::new(INLINE_SAMPLES),
            inlined: AtomicU64::new(0),
        };
        admission.publish_coefficients(coefficients);
        admission
    }

    /// Queues `req` in the lane of its priority and rings the doorbell.
    ///
    /// Refuses, handing the request back, with (checked in this order)
    /// [`Closed`](RejectReason::Closed) after [`close`](Self::close),
    /// [`InvalidPriority`](RejectReason::InvalidPriority),
    /// [`InvalidCost`](RejectReason::InvalidCost),
    /// [`TooLarge`](RejectReason::TooLarge), or
    /// [`Overloaded`](RejectReason::Overloaded) when the lane is at capacity.
    /// Each refusal is counted in [`stats`](Self::stats). Never blocks, never
    /// panics. Cancelled requests are admitted (and reported as cancelled by
    /// the scheduler).
    pub fn admit(&self, req: Request<T>) -> Result<(), Rejected<T>> {
        let reject = |counter: &AtomicU64, reason, request| {
            counter.fetch_add(1, Ordering::Relaxed);
            Err(Rejected { reason, request })
        };
        if self.gate.fetch_add(1, Ordering::Acquire) & CLOSED != 0 {
            self.gate.fetch_sub(1, Ordering::Release);
            return reject(&self.closed, RejectReason::Closed, req);
        }
        let ticket = GateTicket(&self.gate);
        let Some(lane) = self.lanes.get(usize::from(req.priority)) else {
            return reject(&self.invalid_priority, RejectReason::InvalidPriority, req);
        };
        let Cost { rows, tokens } = req.cost;
        if rows == 0 || tokens == 0 {
            return reject(&self.invalid_cost, RejectReason::InvalidCost, req);
        }
        let padded = u64::from(rows) * u64::from(tokens);
        if rows > self.max_rows || padded > u64::from(self.max_tokens) {
            return reject(&self.too_large, RejectReason::TooLarge, req);
        }
        if lane.occupancy.fetch_add(1, Ordering::Relaxed) >= self.capacity {
            lane.occupancy.fetch_sub(1, Ordering::Relaxed);
            return reject(&self.overloaded, RejectReason::Overloaded, req);
        }
        // Counted before the push so that the device thread, which subtracts
        // after popping, never takes the counters below zero.
        lane.rows.fetch_add(u64::from(rows), Ordering::Relaxed);
        lane.tokens.fetch_add(padded, Ordering::Relaxed);
        if let Err(req) = lane.queue.push(req) {
            // Unreachable while occupancy bounds the lane, kept as a typed
            // answer rather than a panic.
            lane.rows.fetch_sub(u64::from(rows), Ordering::Relaxed);
            lane.tokens.fetch_sub(padded, Ordering::Relaxed);
            lane.occupancy.fetch_sub(1, Ordering::Relaxed);
            return reject(&self.overloaded, RejectReason::Overloaded, req);
        }
        self.admitted.fetch_add(1, Ordering::Relaxed);
        drop(ticket);
        self.doorbell.ring();
        Ok(())
    }

    /// Predicted completion of a request of `cost` not yet admitted, queued
    /// behind the work of every lane: see
    /// [`predict_completion_at`](Self::predict_completion_at).
    pub fn predict_completion(&self, now: Instant, cost: Cost) -> Instant {
        self.predict_completion_at(now, self.lanes.len().saturating_sub(1), cost)
    }

    /// Predicted completion of a request of `cost` admitted now at
    /// `priority`: `now`, plus what is left of the device's predicted busy
    /// time, plus the service time of the queued work of lanes `0..=priority` together
    /// with this request, taken as full batches (`fixed` per batch, plus
    /// per-row and per-token terms; padding inside future batches is not
    /// counted). Uses the coefficients and busy-until instant the device
    /// thread last published. A priority beyond the last lane counts all
    /// lanes. Never panics; saturates at [`MAX_PREDICTION`](crate::MAX_PREDICTION)
    /// per term.
    pub fn predict_completion_at(&self, now: Instant, priority: usize, cost: Cost) -> Instant {
        let busy = self
            .busy_until()
            .map_or(Duration::ZERO, |until| until.saturating_duration_since(now));
        let (mut rows, mut tokens) = (
            u64::from(cost.rows),
            u64::from(cost.rows) * u64::from(cost.tokens),
        );
        for lane in self.lanes.iter().take(priority.saturating_add(1)) {
            rows = rows.saturating_add(lane.rows.load(Ordering::Relaxed));
            tokens = tokens.saturating_add(lane.tokens.load(Ordering::Relaxed));
        }
        let batches = rows
            .div_ceil(u64::from(self.max_rows.max(1)))
            .max(tokens.div_ceil(u64::from(self.max_tokens.max(1))))
            .max(1);
        // u64 → f64 rounds for huge values, which is fine for a prediction.
        #[allow(clippy::cast_precision_loss)]
        let service = self
            .coefficients()
            .service_time(batches as f64, rows as f64, tokens as f64);
        let wait = busy.saturating_add(service);
        // Only unrepresentable hours past the end of `Instant`'s range.
        now.checked_add(wait).unwrap_or(now)
    }

    /// Lends the device to the caller for one batch of `cost` that must end
    /// by `deadline`, to run on the caller's own thread without a hand-off,
    /// if all of these hold: the device thread is parked idle (nothing
    /// queued, formed or in flight), admission is open, the cost fits the
    /// batch budget, and the latency model predicts the batch at or below
    /// [`inline_below`](crate::SchedulerConfig::inline_below) and done by
    /// `deadline`. Otherwise `None`, and the caller admits the request as
    /// usual: a request never jumps ahead of queued ones, and the device
    /// never runs two batches at once. While lent, admitted requests queue
    /// and predictions count the inline batch as work in flight.
    pub fn try_inline(
        &self,
        now: Instant,
        cost: Cost,
        deadline: Instant,
    ) -> Option<InlineLease<'_, T>> {
        if self.inline_below.is_zero()
            || cost.rows == 0
            || cost.tokens == 0
            || cost.rows > self.max_rows
            || u64::from(cost.rows) * u64::from(cost.tokens) > u64::from(self.max_tokens)
        {
            return None;
        }
        let predicted = self.coefficients().service_time(
            1.0,
            f64::from(cost.rows),
            f64::from(cost.padded_tokens()),
        );
        if predicted > self.inline_below || now.checked_add(predicted).is_none_or(|d| d > deadline)
        {
            return None;
        }
        // Cheap checks first: under load the device is rarely idle.
        if self.device.load(Ordering::Relaxed) != DEVICE_IDLE || self.is_closed() {
            return None;
        }
        if self
            .device
            .compare_exchange(
                DEVICE_IDLE,
                DEVICE_LENT,
                Ordering::AcqRel,
                Ordering::Relaxed,
            )
            .is_err()
        {
            return None;
        }
        // An admit that landed since the device thread parked goes first:
        // give the device back (its ring wakes the device thread).
        if self.work_queued() || self.is_closed() {
            self.return_device();
            return None;
        }
        self.publish_busy_until(now.checked_add(predicted));
        Some(InlineLease {
            admission: self,
            cost,
            predicted,
            sample: None,
        })
    }

    /// Inline batches run so far ([`try_inline`](Self::try_inline)).
    pub fn inlined(&self) -> u64 {
        self.inlined.load(Ordering::Relaxed)
    }

    /// Whether any lane holds a request admitted and not handed back.
    fn work_queued(&self) -> bool {
        self.lanes
            .iter()
            .any(|l| l.occupancy.load(Ordering::Acquire) > 0)
    }

    /// Ends a lend: the device is idle again, and the device thread, if it
    /// woke while the device was lent, is rung to take it back.
    fn return_device(&self) {
        if self.device.swap(DEVICE_IDLE, Ordering::AcqRel) == DEVICE_WANTED {
            self.doorbell.ring();
        }
    }

    /// The bell the device thread waits on; [`admit`](Self::admit) rings it.
    pub fn doorbell(&self) -> &Doorbell {
        &self.doorbell
    }

    /// Closes admission: every later [`admit`](Self::admit) answers
    /// [`Closed`](RejectReason::Closed). Requests already admitted stay
    /// queued until dispatched or handed back by
    /// [`Scheduler::shutdown`](crate::Scheduler::shutdown). Idempotent.
    pub fn close(&self) {
        self.gate.fetch_or(CLOSED, Ordering::AcqRel);
        // Wake the device thread so that it can notice and shut down.
        self.doorbell.ring();
    }

    /// Whether [`close`](Self::close) was called.
    pub fn is_closed(&self) -> bool {
        self.gate.load(Ordering::Acquire) & CLOSED != 0
    }

    /// Counters since creation.
    pub fn stats(&self) -> AdmissionStats {
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        AdmissionStats {
            admitted: load(&self.admitted),
            overloaded: load(&self.overloaded),
            too_large: load(&self.too_large),
            invalid_priority: load(&self.invalid_priority),
            invalid_cost: load(&self.invalid_cost),
            closed: load(&self.closed),
            queued: self.lanes.iter().map(|l| load(&l.occupancy)).sum(),
        }
    }

    /// The coefficients the device thread last published.
    pub fn coefficients(&self) -> Coefficients {
        let load = |i: usize| f64::from_bits(self.coefficients[i].load(Ordering::Relaxed));
        Coefficients {
            fixed_s: load(0),
            per_row_s: load(1),
            per_token_s: load(2),
        }
    }

    /// The device's predicted busy-until instant as last published; `None`
    /// when no batch is in flight.
    pub fn busy_until(&self) -> Option<Instant> {
        let nanos = self.busy_until.load(Ordering::Acquire).cast_signed();
        if nanos == NOT_BUSY {
            return None;
        }
        let offset = Duration::from_nanos(nanos.unsigned_abs());
        if nanos >= 0 {
            self.base.checked_add(offset)
        } else {
            self.base.checked_sub(offset)
        }
    }

    // ---- device-thread side ----

    /// Takes the device back from idle before a poll: false while it is
    /// lent (marked wanted, so that the lease's end rings the doorbell).
    pub(crate) fn claim_device(&self) -> bool {
        let mut seen = self.device.load(Ordering::Acquire);
        loop {
            let want = match seen {
                DEVICE_BUSY => return true,
                DEVICE_IDLE => DEVICE_BUSY,
                DEVICE_LENT => DEVICE_WANTED,
                _ => return false,
            };
            match self
                .device
                .compare_exchange(seen, want, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return want == DEVICE_BUSY,
                Err(now) => seen = now,
            }
        }
    }

    /// The device thread has nothing queued, formed or in flight and is
    /// about to park: callers may borrow the device.
    pub(crate) fn offer_device(&self) {
        // Only the device thread moves the state away from BUSY.
        let _ = self.device.compare_exchange(
            DEVICE_BUSY,
            DEVICE_IDLE,
            Ordering::AcqRel,
            Ordering::Relaxed,
        );
    }

    /// The next inline batch's measurement not yet fed to the model.
    pub(crate) fn pop_inline_sample(&self) -> Option<Sample> {
        self.inline_samples.pop()
    }

    /// Number of lanes (priority levels).
    pub(crate) fn lane_count(&self) -> usize {
        self.lanes.len()
    }

    /// Requests in lane `lane`'s queue now (not yet taken by the scheduler).
    pub(crate) fn lane_len(&self, lane: usize) -> usize {
        self.lanes.get(lane).map_or(0, |l| l.queue.len())
    }

    pub(crate) fn pop(&self, lane: usize) -> Option<Request<T>> {
        self.lanes.get(lane)?.queue.pop()
    }

    /// The request no longer counts as work ahead (dispatched or ended).
    pub(crate) fn release_work(&self, lane: usize, cost: Cost) {
        if let Some(lane) = self.lanes.get(lane) {
            lane.rows.fetch_sub(u64::from(cost.rows), Ordering::Relaxed);
            lane.tokens
                .fetch_sub(cost.padded_tokens().into(), Ordering::Relaxed);
        }
    }

    /// The request was handed back to the caller: its lane slot is free.
    pub(crate) fn release_slot(&self, lane: usize) {
        if let Some(lane) = self.lanes.get(lane) {
            lane.occupancy.fetch_sub(1, Ordering::Relaxed);
        }
    }

    pub(crate) fn publish_busy_until(&self, until: Option<Instant>) {
        let nanos = until.map_or(NOT_BUSY, |until| {
            let signed = |d: Duration| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX);
            if until >= self.base {
                signed(until.duration_since(self.base))
            } else {
                // Cannot reach NOT_BUSY: -i64::MAX > i64::MIN.
                -signed(self.base.duration_since(until))
            }
        });
        self.busy_until
            .store(nanos.cast_unsigned(), Ordering::Release);
    }

    pub(crate) fn publish_coefficients(&self, c: Coefficients) {
        for (slot, value) in self
            .coefficients
            .iter()
            .zip([c.fixed_s, c.per_row_s, c.per_token_s])
        {
            slot.store(value.to_bits(), Ordering::Relaxed);
        }
    }

    /// Closes admission and waits until no admit is between its closed check
    /// and its push, so that the lanes can be drained for good. The wait is
    /// bounded by a few atomic operations of each such admit.
    pub(crate) fn close_and_quiesce(&self) {
        self.gate.fetch_or(CLOSED, Ordering::AcqRel);
        while self.gate.load(Ordering::Acquire) & !CLOSED != 0 {
            sync::yield_now();
        }
    }
}
