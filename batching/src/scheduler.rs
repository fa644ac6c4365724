//! The scheduler core (DESIGN.md "Scheduling": batch formation, dispatch
//! rule, early drop, cancellation), a sans-IO state machine owned by the
//! device thread and handed `now` on every call.
//!
//! Each [`poll`](Scheduler::poll) moves newly admitted requests from the
//! lock-free lanes into one earliest-deadline-first queue per priority, plans
//! the next batch from the most urgent non-empty priority, and either
//! dispatches it or says until when nothing will change. The device thread
//! runs the batch and reports back with [`complete`](Scheduler::complete),
//! which feeds the latency model.
//!
//! Formation rules:
//! - strict priority: a batch holds requests of one priority only, the most
//!   urgent one with live requests; lower priorities wait until it is empty.
//!   Mixing in less urgent requests would lengthen the urgent batch's
//!   service time.
//! - within a priority, earliest deadline first (ties: admission order), and
//!   the first request that would break the budget (rows or padded tokens)
//!   ends the batch: no skipping ahead to a smaller one, so EDF order holds.
//! - with [`length_grouping`](crate::SchedulerConfig::length_grouping), the
//!   most urgent request anchors the batch, which takes in deadline order the
//!   requests of similar sequence length and passes over the others, when the
//!   latency model says that this costs less than the plain batch and leaves
//!   every request passed over able to meet its deadline
//!   ([`LengthGrouping`](crate::LengthGrouping)). A batch's requests are in
//!   deadline order either way.
//! - cancelled requests, and requests that would miss their deadline even if
//!   dispatched now alone, are taken out as they are met in that order and
//!   reported by [`drain_ended`](Scheduler::drain_ended).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crate::admission::Admission;
use crate::latency::LatencyModel;
use crate::request::{BatchId, Cost, Request};
use crate::sync::Arc;
use crate::{LengthGrouping, SchedulerConfig};

/// Why a batch was dispatched.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DispatchReason {
    /// The next request would break the budget (or the budget is exactly
    /// used up).
    BudgetFull,
    /// No batch was in flight: dispatch whatever is queued (work-conserving).
    DeviceIdle,
    /// The device is busy and a prefetch slot is free, and waiting for one
    /// more row would make the earliest deadline in the batch miss, given the
    /// device's predicted busy-until instant.
    DeadlineSlack,
    /// The device is busy and a prefetch slot is free, and the oldest request
    /// of the batch has waited
    /// [`max_queue_delay`](crate::SchedulerConfig::max_queue_delay).
    MaxQueueDelay,
    /// Run by the request's own thread on the idle device, without a
    /// hand-off ([`Admission::try_inline`](crate::Admission::try_inline));
    /// never returned by [`Scheduler::poll`]; counted in
    /// [`SchedulerStats::batches`] from the admission's count.
    Inline,
}

impl DispatchReason {
    /// Every reason, in the order of [`index`](Self::index).
    pub const ALL: [DispatchReason; 5] = [
        Self::BudgetFull,
        Self::DeviceIdle,
        Self::DeadlineSlack,
        Self::MaxQueueDelay,
        Self::Inline,
    ];

    /// A stable snake_case name, for metric labels.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::BudgetFull => "budget_full",
            Self::DeviceIdle => "device_idle",
            Self::DeadlineSlack => "deadline_slack",
            Self::MaxQueueDelay => "max_queue_delay",
            Self::Inline => "inline",
        }
    }

    /// Position in [`ALL`](Self::ALL) and in [`SchedulerStats::batches`].
    pub fn index(&self) -> usize {
        match self {
            Self::BudgetFull => 0,
            Self::DeviceIdle => 1,
            Self::DeadlineSlack => 2,
            Self::MaxQueueDelay => 3,
            Self::Inline => 4,
        }
    }
}

impl std::fmt::Display for DispatchReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A batch for the device.
#[derive(Debug)]
pub struct Batch<T> {
    /// Pass back to [`Scheduler::complete`] when the device is done.
    pub id: BatchId,
    /// Which rule dispatched it.
    pub reason: DispatchReason,
    /// Earliest deadline first; all of one priority.
    pub requests: Vec<Request<T>>,
    /// Total rows; at most `max_batch_size`.
    pub rows: u32,
    /// `rows × longest sequence`; at most `max_batch_tokens`.
    pub padded_tokens: u32,
    /// The latency model's service time for this batch, at dispatch.
    pub predicted: Duration,
    /// The `now` of the poll that formed it.
    pub formed_at: Instant,
}

/// What the device thread should do next.
#[derive(Debug)]
pub enum Poll<T> {
    /// Run this batch.
    Dispatch(Batch<T>),
    /// Nothing will be dispatched before this instant (the earliest
    /// queue-delay expiry or deadline-slack point) unless the doorbell rings
    /// or a batch completes. Always later than the `now` polled.
    WaitUntil(Instant),
    /// Nothing queued, or every in-flight slot taken: wait for the doorbell
    /// or a completion.
    Idle,
}

/// A request that ended without compute.
#[derive(Debug)]
pub enum Ended<T> {
    /// Its [`CancelToken`](crate::CancelToken) was cancelled before dispatch.
    Cancelled(Request<T>),
    /// It would miss its deadline even if dispatched at once in a batch of
    /// its own; the caller overflows it or answers `DeadlineExceeded`.
    DeadlineUnreachable(Request<T>),
}

impl<T> Ended<T> {
    /// The request, whatever the reason.
    pub fn request(&self) -> &Request<T> {
        match self {
            Self::Cancelled(r) | Self::DeadlineUnreachable(r) => r,
        }
    }

    /// The request, whatever the reason.
    pub fn into_request(self) -> Request<T> {
        match self {
            Self::Cancelled(r) | Self::DeadlineUnreachable(r) => r,
        }
    }
}

/// Counters of a [`Scheduler`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SchedulerStats {
    /// Batches dispatched, indexed by [`DispatchReason::index`].
    pub batches: [u64; 5],
    /// Requests dispatched in batches (inline batches not included: they
    /// never pass through the scheduler).
    pub dispatched_requests: u64,
    /// Requests ended as [`Ended::Cancelled`].
    pub cancelled: u64,
    /// Requests ended as [`Ended::DeadlineUnreachable`].
    pub deadline_unreachable: u64,
    /// Batches formed by length grouping that differ from the plain
    /// earliest-deadline-first batch ([`LengthGrouping`]).
    pub grouped_batches: u64,
    /// Times a request the plain batch would have taken was passed over by a
    /// grouped batch.
    pub passed_over: u64,
    /// Batches dispatched and not yet completed.
    pub in_flight: u32,
    /// Requests waiting for a batch (formation queues and lanes).
    pub queued: u64,
}

impl SchedulerStats {
    /// Batches dispatched for `reason`.
    pub fn batches_for(&self, reason: DispatchReason) -> u64 {
        self.batches[reason.index()]
    }
}

#[derive(Debug)]
struct InFlight {
    id: BatchId,
    rows: u32,
    padded_tokens: u32,
    predicted: Duration,
}

/// Orders a formation queue: deadline, then admission order.
type Key = (Instant, u64);

/// A request in a formation queue.
#[derive(Debug)]
struct Queued<T> {
    req: Request<T>,
    /// Grouped batches that passed it over while the plain batch would have
    /// taken it.
    skips: u32,
}

/// The plan for the next batch of one priority; its members' keys are in
/// [`Scheduler::members`], in queue order.
struct Plan {
    rows: u32,
    max_tokens: u32,
    padded_tokens: u32,
    earliest_deadline: Instant,
    oldest_arrival: Instant,
    /// Nothing more can join.
    full: bool,
    /// Formed by length grouping, and not the plain batch.
    grouped: bool,
}

/// A batch being formed: rows, longest and shortest sequence.
#[derive(Clone, Copy, Debug, Default)]
struct Shape {
    rows: u32,
    max_tokens: u32,
    min_tokens: u32,
}

impl Shape {
    fn is_empty(&self) -> bool {
        self.rows == 0
    }

    fn padded(&self) -> u32 {
        self.rows.saturating_mul(self.max_tokens)
    }

    /// The shape with `cost` added, if it stays within the budget.
    fn with(&self, cost: Cost, config: &SchedulerConfig) -> Option<Shape> {
        let rows = u64::from(self.rows) + u64::from(cost.rows);
        let max_tokens = self.max_tokens.max(cost.tokens);
        let padded = rows * u64::from(max_tokens);
        let rows = u32::try_from(rows).ok()?;
        let padded = u32::try_from(padded).ok()?;
        if rows > config.max_batch_size || padded > config.max_batch_tokens {
            return None;
        }
        let min_tokens = if self.is_empty() {
            cost.tokens
        } else {
            self.min_tokens.min(cost.tokens)
        };
        Some(Shape {
            rows,
            max_tokens,
            min_tokens,
        })
    }

    /// Whether `tokens` keeps the longest within `ratio` × the shortest.
    fn admits(&self, tokens: u32, ratio: f64) -> bool {
        if self.is_empty() {
            return true;
        }
        let longest = self.max_tokens.max(tokens);
        let shortest = self.min_tokens.min(tokens);
        f64::from(longest) <= ratio * f64::from(shortest)
    }

    fn used_up(&self, config: &SchedulerConfig) -> bool {
        self.rows >= config.max_batch_size || self.padded() >= config.max_batch_tokens
    }
}

/// One live request met while planning, in queue order, that the plain
/// batch or the grouped one takes.
#[derive(Clone, Copy, Debug)]
struct Candidate {
    key: Key,
    cost: Cost,
    arrival: Instant,
    skips: u32,
    in_plain: bool,
    in_group: bool,
}

#[derive(Clone, Copy, Debug)]
enum EndKind {
    Cancelled,
    Unreachable,
}

/// One device's scheduler, owned by its device thread.
///
/// Every admitted request leaves exactly once: in a [`Batch`], in
/// [`drain_ended`](Self::drain_ended), or in [`shutdown`](Self::shutdown).
#[derive(Debug)]
pub struct Scheduler<T> {
    config: SchedulerConfig,
    admission: Arc<Admission<T>>,
    latency: LatencyModel,
    /// Earliest-deadline-first queue per priority; bounded by lane occupancy.
    queues: Vec<BTreeMap<Key, Queued<T>>>,
    next_seq: u64,
    next_batch: BatchId,
    in_flight: Vec<InFlight>,
    /// Predicted end of the in-flight work; `None` when none.
    busy_until: Option<Instant>,
    /// Ended and not yet drained; bounded by lane occupancy.
    ended: Vec<Ended<T>>,
    /// Reused by `plan` to avoid an allocation per poll.
    scratch: Vec<(Key, EndKind)>,
    /// Reused by `plan`: the requests the plain or grouped batch takes.
    candidates: Vec<Candidate>,
    /// The last plan's members, in queue order; `dispatch` takes them.
    members: Vec<Key>,
    /// The requests the last plan passes over that the plain batch would
    /// have taken; `dispatch` counts a skip for each.
    passed: Vec<Key>,
    stats: SchedulerStats,
}

impl<T> Scheduler<T> {
    /// A scheduler for `config` (out-of-range fields clamped, see
    /// [`SchedulerConfig::validate`]) starting from `latency` (a calibrated
    /// model, or [`LatencyModel::new`] for the prior).
    pub fn new(config: SchedulerConfig, latency: LatencyModel) -> Self {
        let config = config.clamped();
        let admission = Arc::new(Admission::new(
            &config,
            Instant::now(),
            latency.coefficients(),
        ));
        let levels = admission.lane_count();
        let in_flight_cap = usize::try_from(config.max_in_flight)
            .unwrap_or(usize::MAX)
            .min(64);
        Self {
            config,
            admission,
            latency,
            queues: (0..levels).map(|_| BTreeMap::new()).collect(),
            next_seq: 0,
            next_batch: 0,
            in_flight: Vec::with_capacity(in_flight_cap),
            busy_until: None,
            ended: Vec::new(),
            scratch: Vec::new(),
            candidates: Vec::new(),
            members: Vec::new(),
            passed: Vec::new(),
            stats: SchedulerStats::default(),
        }
    }

    /// The producer side, for the front end's threads.
    pub fn admission(&self) -> Arc<Admission<T>> {
        Arc::clone(&self.admission)
    }

    /// The configuration in force (after clamping).
    pub fn config(&self) -> &SchedulerConfig {
        &self.config
    }

    /// Takes in newly admitted requests, ends cancelled and unreachable ones
    /// met while planning, and decides.
    ///
    /// Dispatches when a slot is free (fewer than `max_in_flight` batches in
    /// flight) and the batch of the most urgent priority is full
    /// ([`BudgetFull`](DispatchReason::BudgetFull)), or nothing is in flight
    /// ([`DeviceIdle`](DispatchReason::DeviceIdle)), or, with the device busy,
    /// at its deadline-slack point ([`DeadlineSlack`](DispatchReason::DeadlineSlack))
    /// or queue-delay expiry ([`MaxQueueDelay`](DispatchReason::MaxQueueDelay)).
    /// Otherwise [`Poll::WaitUntil`] the earlier of those two instants, or
    /// [`Poll::Idle`]. Call again after a dispatch: one batch per call.
    ///
    /// While the device is lent for an inline batch
    /// ([`Admission::try_inline`]) the answer is [`Poll::Idle`]: the lease's
    /// end rings the doorbell if work was admitted meanwhile. A poll that
    /// finds nothing queued and nothing in flight offers the device for
    /// inline batches until the next poll.
    pub fn poll(&mut self, now: Instant) -> Poll<T> {
        if !self.admission.claim_device() {
            return Poll::Idle;
        }
        self.take_inline_samples();
        self.take_admitted();
        let mut head = None;
        for lane in 0..self.queues.len() {
            if let Some(plan) = self.plan(lane, now) {
                head = Some((lane, plan));
                break;
            }
        }
        let Some((lane, plan)) = head else {
            if self.in_flight.is_empty() && self.ended.is_empty() {
                self.admission.offer_device();
            }
            return Poll::Idle;
        };
        if self.in_flight.len() >= self.max_in_flight() {
            return Poll::Idle;
        }
        if plan.full {
            return Poll::Dispatch(self.dispatch(lane, &plan, now, DispatchReason::BudgetFull));
        }
        let Some(busy_until) = self.busy_until.filter(|_| !self.in_flight.is_empty()) else {
            return Poll::Dispatch(self.dispatch(lane, &plan, now, DispatchReason::DeviceIdle));
        };
        // Waiting only pays if one more row could still join in time: the
        // batch must start by `latest_start` to meet its earliest deadline
        // with one more row, and it cannot start before the device is free.
        let grown_rows = plan.rows.saturating_add(1);
        let grown = self
            .latency
            .predict(grown_rows, grown_rows.saturating_mul(plan.max_tokens));
        let latest_start = plan.earliest_deadline.checked_sub(grown).unwrap_or(now);
        if now.max(busy_until) >= latest_start {
            return Poll::Dispatch(self.dispatch(lane, &plan, now, DispatchReason::DeadlineSlack));
        }
        let delay_expiry = plan.oldest_arrival.checked_add(self.config.max_queue_delay);
        match delay_expiry {
            Some(expiry) if now >= expiry => {
                Poll::Dispatch(self.dispatch(lane, &plan, now, DispatchReason::MaxQueueDelay))
            }
            Some(expiry) => Poll::WaitUntil(expiry.min(latest_start)),
            None => Poll::WaitUntil(latest_start),
        }
    }

    /// The device finished batch `batch`, measured at `measured`: feeds the
    /// latency model, frees the in-flight slot and re-predicts busy-until
    /// (the remaining in-flight batches run back to back from `now`). An
    /// unknown or already completed id is ignored.
    pub fn complete(&mut self, now: Instant, batch: BatchId, measured: Duration) {
        let Some(pos) = self.in_flight.iter().position(|b| b.id == batch) else {
            return;
        };
        let done = self.in_flight.remove(pos);
        self.latency
            .observe(done.rows, done.padded_tokens, measured);
        self.admission
            .publish_coefficients(self.latency.coefficients());
        self.busy_until = if self.in_flight.is_empty() {
            None
        } else {
            let left = self
                .in_flight
                .iter()
                .fold(Duration::ZERO, |sum, b| sum.saturating_add(b.predicted));
            Some(now.checked_add(left).unwrap_or(now))
        };
        self.admission.publish_busy_until(self.busy_until);
    }

    /// The requests that ended without compute since the last call, each
    /// exactly once. Their lane slots are freed now (so an undrained backlog
    /// counts against `queue_capacity` and cannot grow without bound).
    pub fn drain_ended(&mut self) -> std::vec::Drain<'_, Ended<T>> {
        for ended in &self.ended {
            self.admission
                .release_slot(usize::from(ended.request().priority));
        }
        self.ended.drain(..)
    }

    /// Closes admission, waits out admits in progress (a few atomic
    /// operations each), and hands back every queued request, most urgent
    /// priority first and earliest deadline first within one, so that the
    /// caller answers each. Batches in flight stay in flight; requests ended
    /// and not yet drained stay in [`drain_ended`](Self::drain_ended).
    pub fn shutdown(&mut self) -> Vec<Request<T>> {
        self.admission.close_and_quiesce();
        self.take_admitted();
        let mut out = Vec::with_capacity(self.queues.iter().map(BTreeMap::len).sum());
        for (lane, queue) in self.queues.iter_mut().enumerate() {
            for (_, Queued { req, .. }) in std::mem::take(queue) {
                self.admission.release_work(lane, req.cost);
                self.admission.release_slot(lane);
                out.push(req);
            }
        }
        out
    }

    /// The latency model as fitted so far.
    pub fn latency_model(&self) -> &LatencyModel {
        &self.latency
    }

    /// Batches in flight.
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// Counters since creation, with the current in-flight and queued counts.
    pub fn stats(&self) -> SchedulerStats {
        let lanes: usize = (0..self.admission.lane_count())
            .map(|l| self.admission.lane_len(l))
            .sum();
        let queued: usize = self.queues.iter().map(BTreeMap::len).sum::<usize>() + lanes;
        let mut batches = self.stats.batches;
        batches[DispatchReason::Inline.index()] = self.admission.inlined();
        SchedulerStats {
            batches,
            in_flight: u32::try_from(self.in_flight.len()).unwrap_or(u32::MAX),
            queued: u64::try_from(queued).unwrap_or(u64::MAX),
            ..self.stats
        }
    }

    fn max_in_flight(&self) -> usize {
        usize::try_from(self.config.max_in_flight).unwrap_or(usize::MAX)
    }

    /// Feeds the measurements of the inline batches run since the last poll
    /// to the latency model.
    fn take_inline_samples(&mut self) {
        let mut any = false;
        while let Some(sample) = self.admission.pop_inline_sample() {
            self.latency
                .observe(sample.rows, sample.padded_tokens, sample.measured);
            any = true;
        }
        if any {
            self.admission
                .publish_coefficients(self.latency.coefficients());
        }
    }

    /// Moves everything in the lanes into the formation queues. Terminates:
    /// lane occupancy bounds what producers can add until this thread hands
    /// requests back.
    fn take_admitted(&mut self) {
        for (lane, queue) in self.queues.iter_mut().enumerate() {
            while let Some(req) = self.admission.pop(lane) {
                queue.insert((req.deadline, self.next_seq), Queued { req, skips: 0 });
                self.next_seq = self.next_seq.wrapping_add(1);
            }
        }
    }

    /// Plans the next batch of `lane`, ending the cancelled and unreachable
    /// requests met on the way; `None` if no live request is left. The
    /// batch's members are left in `self.members`, the requests it passes
    /// over in `self.passed`.
    fn plan(&mut self, lane: usize, now: Instant) -> Option<Plan> {
        let grouping = self.config.length_grouping;
        let queue = self.queues.get_mut(lane)?;
        let mut doomed = std::mem::take(&mut self.scratch);
        let mut candidates = std::mem::take(&mut self.candidates);
        candidates.clear();
        // The plain batch: the longest EDF prefix within the budget.
        let mut plain = Shape::default();
        let mut plain_open = true;
        // The grouped batch: the anchor, then in EDF order the requests of
        // similar length, until one of them breaks the budget.
        let mut group = Shape::default();
        let mut group_open = grouping.is_some();
        let mut group_full = false;
        for (key, queued) in queue.iter() {
            let req = &queued.req;
            if req.cancel.is_cancelled() {
                doomed.push((*key, EndKind::Cancelled));
                continue;
            }
            let alone = self
                .latency
                .predict(req.cost.rows, req.cost.padded_tokens());
            if now
                .checked_add(alone)
                .is_none_or(|done| done > req.deadline)
            {
                doomed.push((*key, EndKind::Unreachable));
                continue;
            }
            let mut in_plain = false;
            if plain_open {
                match plain.with(req.cost, &self.config) {
                    Some(grown) => {
                        plain = grown;
                        in_plain = true;
                    }
                    None => plain_open = false,
                }
            }
            let mut in_group = false;
            if let Some(g) = grouping.filter(|_| group_open)
                && group.admits(req.cost.tokens, g.max_length_ratio)
            {
                match group.with(req.cost, &self.config) {
                    Some(grown) => {
                        group = grown;
                        in_group = true;
                    }
                    None => {
                        group_open = false;
                        group_full = true;
                    }
                }
            }
            if in_plain || in_group {
                candidates.push(Candidate {
                    key: *key,
                    cost: req.cost,
                    arrival: req.arrival,
                    skips: queued.skips,
                    in_plain,
                    in_group,
                });
            }
            if !plain_open && !group_open {
                break;
            }
        }
        for (key, kind) in doomed.drain(..) {
            if let Some(Queued { req, .. }) = queue.remove(&key) {
                self.admission.release_work(lane, req.cost);
                self.ended.push(match kind {
                    EndKind::Cancelled => {
                        self.stats.cancelled += 1;
                        Ended::Cancelled(req)
                    }
                    EndKind::Unreachable => {
                        self.stats.deadline_unreachable += 1;
                        Ended::DeadlineUnreachable(req)
                    }
                });
            }
        }
        self.scratch = doomed;
        let grouped =
            grouping.is_some_and(|g| self.grouping_pays(&candidates, plain, group, now, g));
        self.members.clear();
        self.passed.clear();
        let mut earliest_deadline = None;
        let mut oldest_arrival: Option<Instant> = None;
        for c in &candidates {
            let member = if grouped { c.in_group } else { c.in_plain };
            if member {
                self.members.push(c.key);
                earliest_deadline.get_or_insert(c.key.0);
                oldest_arrival = Some(oldest_arrival.map_or(c.arrival, |a| a.min(c.arrival)));
            } else if grouped && c.in_plain {
                self.passed.push(c.key);
            }
        }
        self.candidates = candidates;
        let (shape, full) = if grouped {
            (group, group_full)
        } else {
            (plain, !plain_open)
        };
        Some(Plan {
            rows: shape.rows,
            max_tokens: shape.max_tokens,
            padded_tokens: shape.padded(),
            earliest_deadline: earliest_deadline?,
            oldest_arrival: oldest_arrival?,
            // A used-up budget takes no one more, whoever is queued.
            full: full || shape.used_up(&self.config),
            grouped,
        })
    }

    /// Whether the grouped batch `group` should replace the plain one
    /// `plain` (see [`LengthGrouping`]): they differ, the two batches' requests
    /// are predicted to cost less grouped, and no request the grouped batch
    /// passes over is pushed past its deadline or its skip bound.
    fn grouping_pays(
        &self,
        candidates: &[Candidate],
        plain: Shape,
        group: Shape,
        now: Instant,
        grouping: LengthGrouping,
    ) -> bool {
        // The requests only one of the two batches takes.
        let mut passed = Shape::default();
        let mut reached = Shape::default();
        for c in candidates {
            let part = match (c.in_plain, c.in_group) {
                (true, false) => &mut passed,
                (false, true) => &mut reached,
                _ => continue,
            };
            // Each part is a subset of a batch within the budget.
            *part = part.with(c.cost, &self.config).unwrap_or(*part);
        }
        if passed.is_empty() && reached.is_empty() {
            return false;
        }
        let time = |shape: Shape| {
            if shape.is_empty() {
                Duration::ZERO
            } else {
                self.latency.predict(shape.rows, shape.padded())
            }
        };
        let grouped_first = time(group);
        let grouped_total = grouped_first.saturating_add(time(passed));
        let plain_total = time(plain).saturating_add(time(reached));
        if grouped_total >= plain_total {
            return false;
        }
        // The requests passed over run next, right after the grouped batch.
        let start = self
            .busy_until
            .filter(|_| !self.in_flight.is_empty())
            .map_or(now, |until| until.max(now));
        let Some(next_done) = start.checked_add(grouped_total) else {
            return false;
        };
        candidates
            .iter()
            .filter(|c| c.in_plain && !c.in_group)
            .all(|c| c.skips < grouping.max_skips && next_done <= c.key.0)
    }

    fn dispatch(
        &mut self,
        lane: usize,
        plan: &Plan,
        now: Instant,
        reason: DispatchReason,
    ) -> Batch<T> {
        let mut requests = Vec::with_capacity(self.members.len());
        if let Some(queue) = self.queues.get_mut(lane) {
            for key in &self.members {
                let Some(Queued { req, .. }) = queue.remove(key) else {
                    continue;
                };
                self.admission.release_work(lane, req.cost);
                self.admission.release_slot(lane);
                requests.push(req);
            }
            for key in &self.passed {
                if let Some(queued) = queue.get_mut(key) {
                    queued.skips = queued.skips.saturating_add(1);
                }
            }
        }
        if plan.grouped {
            self.stats.grouped_batches += 1;
            self.stats.passed_over += self.passed.len() as u64;
        }
        self.members.clear();
        self.passed.clear();
        let predicted = self.latency.predict(plan.rows, plan.padded_tokens);
        let id = self.next_batch;
        self.next_batch = self.next_batch.wrapping_add(1);
        self.in_flight.push(InFlight {
            id,
            rows: plan.rows,
            padded_tokens: plan.padded_tokens,
            predicted,
        });
        let start = self.busy_until.map_or(now, |until| until.max(now));
        self.busy_until = Some(start.checked_add(predicted).unwrap_or(start));
        self.admission.publish_busy_until(self.busy_until);
        self.stats.batches[reason.index()] += 1;
        self.stats.dispatched_requests += requests.len() as u64;
        Batch {
            id,
            reason,
            requests,
            rows: plan.rows,
            padded_tokens: plan.padded_tokens,
            predicted,
            formed_at: now,
        }
    }
}
