//! The knobs of one device's scheduler (DESIGN.md "Scheduling": the batch
//! budget, the queue-delay bound, the admission queue bounds, the prefetch
//! depth and length grouping).

use std::time::Duration;

/// Configuration of one [`Scheduler`](crate::Scheduler) (one model on one
/// device).
///
/// [`Scheduler::new`](crate::Scheduler::new) clamps out-of-range values to
/// the nearest valid one so that it cannot fail; call
/// [`validate`](Self::validate) at load time to report them instead.
#[derive(Clone, Debug)]
pub struct SchedulerConfig {
    /// Most rows (sum of [`Cost::rows`](crate::Cost::rows)) in one batch.
    /// Default 32; at least 1. A request with more rows is rejected as
    /// [`RejectReason::TooLarge`](crate::RejectReason::TooLarge).
    pub max_batch_size: u32,
    /// Most padded tokens (`rows × longest sequence`) in one batch.
    /// Default 16384; at least 1. A request with `rows × tokens` above it is
    /// rejected as `TooLarge`.
    pub max_batch_tokens: u32,
    /// Longest a queued request waits for its batch to fill while the device
    /// is busy and a prefetch slot is free
    /// ([`DispatchReason::MaxQueueDelay`](crate::DispatchReason::MaxQueueDelay)).
    /// Default 2 ms.
    pub max_queue_delay: Duration,
    /// Most requests admitted and not yet handed back (dispatched, drained
    /// from [`Scheduler::drain_ended`](crate::Scheduler::drain_ended), or
    /// returned by shutdown), per priority lane. Default 1024; at least 1.
    /// Beyond it admission answers
    /// [`RejectReason::Overloaded`](crate::RejectReason::Overloaded).
    /// Worst-case memory: `queue_capacity × priority_levels` requests held,
    /// plus the same number of preallocated lane slots.
    pub queue_capacity: usize,
    /// Number of priority lanes; priorities are `0..priority_levels`, 0 the
    /// most urgent. Default 2; at least 1.
    pub priority_levels: u8,
    /// Batches handed to the device and not yet completed. Default 1 (no
    /// prefetch); 2 means one running and one prefetched. At least 1.
    pub max_in_flight: u32,
    /// Batches predicted to take at most this long may run inline, on the
    /// thread of the request that forms them, when the device is idle and
    /// nothing is queued ([`Admission::try_inline`](crate::Admission::try_inline)):
    /// for models that compute in microseconds, two thread hand-offs cost
    /// more than the model. The bound is also how long such a batch may hold
    /// the caller's thread, as predicted by the latency model. Default 50 µs;
    /// zero turns the inline path off.
    pub inline_below: Duration,
    /// How long the device thread spins, watching for work, before it sleeps
    /// ([`Doorbell::with_spin`](crate::Doorbell::with_spin)): while requests
    /// keep arriving it is never parked, and admitting one costs an atomic
    /// swap instead of a futex wake-up. Default zero: sleep at once (the
    /// spin pays only with a core to spare for the device thread).
    pub idle_spin: Duration,
    /// Form batches of requests of similar sequence length, to cut the
    /// padding of batches that mix short and long sequences (see
    /// [`LengthGrouping`]); `None` forms every batch as the plain
    /// earliest-deadline-first prefix of the queue. Default `None` (the
    /// gateway's `length_grouping` turns it on per model); where every
    /// request has the same length (tabular models, one token each) the two
    /// formations are the same batch anyway.
    pub length_grouping: Option<LengthGrouping>,
}

/// How the scheduler groups requests of similar sequence length
/// ([`SchedulerConfig::length_grouping`]).
///
/// The most urgent request of the lane (its earliest deadline) anchors the
/// batch, which then takes, in deadline order, the requests whose
/// [`Cost::tokens`](crate::Cost::tokens) keep the batch's longest sequence
/// within `max_length_ratio` × its shortest; so a batch's padded tokens are at
/// most `max_length_ratio` × the tokens of its requests' longest rows. The
/// grouped batch replaces the plain earliest-deadline-first one only when all
/// of these hold:
///
/// - the latency model predicts that serving the two batches' requests as
///   the grouped batch and then the requests it passed over costs less than
///   the plain batch and then the requests it leaves out (padding saved must
///   outweigh the cost of one more batch: on a device whose cost is all per
///   batch, grouping turns itself off);
/// - every request the plain batch would have taken and the grouped one
///   passes over is still predicted to meet its deadline when run next,
///   right after the grouped batch;
/// - none of those requests has been passed over `max_skips` times already.
///
/// The anchor is never passed over, so a request waits behind grouping at
/// most until it is the most urgent of its lane, or `max_skips` batches.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LengthGrouping {
    /// Longest over shortest request sequence length in a grouped batch.
    /// Default 2; at least 1 (1: only requests of the anchor's length).
    pub max_length_ratio: f64,
    /// Grouped batches that may pass over a request the plain batch would
    /// have taken, before it must be taken. Default 8: with lengths spread
    /// over a range several times `max_length_ratio` wide, a request is
    /// passed over until a batch of its own length class forms, so a small
    /// bound falls back to the plain batch before the classes take turns.
    pub max_skips: u32,
}

impl Default for LengthGrouping {
    fn default() -> Self {
        Self {
            max_length_ratio: 2.0,
            max_skips: 8,
        }
    }
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            max_batch_size: 32,
            max_batch_tokens: 16384,
            max_queue_delay: Duration::from_millis(2),
            queue_capacity: 1024,
            priority_levels: 2,
            max_in_flight: 1,
            inline_below: Duration::from_micros(50),
            idle_spin: Duration::ZERO,
            length_grouping: None,
        }
    }
}

/// Every problem found in a [`SchedulerConfig`], reported at once.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid scheduler config: {}", .problems.join("; "))]
pub struct ConfigError {
    /// One line per invalid field.
    pub problems: Vec<&'static str>,
}

impl SchedulerConfig {
    /// Checks every field; lists all invalid ones in one error.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut problems = Vec::new();
        if self.max_batch_size == 0 {
            problems.push("max_batch_size must be at least 1");
        }
        if self.max_batch_tokens == 0 {
            problems.push("max_batch_tokens must be at least 1");
        }
        if self.queue_capacity == 0 {
            problems.push("queue_capacity must be at least 1");
        }
        if self.priority_levels == 0 {
            problems.push("priority_levels must be at least 1");
        }
        if self.max_in_flight == 0 {
            problems.push("max_in_flight must be at least 1");
        }
        if self
            .length_grouping
            .is_some_and(|g| g.max_length_ratio.is_nan() || g.max_length_ratio < 1.0)
        {
            problems.push("length_grouping.max_length_ratio must be at least 1");
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigError { problems })
        }
    }

    /// The same configuration with every zero that must not be zero raised
    /// to 1.
    pub(crate) fn clamped(mut self) -> Self {
        self.max_batch_size = self.max_batch_size.max(1);
        self.max_batch_tokens = self.max_batch_tokens.max(1);
        self.queue_capacity = self.queue_capacity.max(1);
        self.priority_levels = self.priority_levels.max(1);
        self.max_in_flight = self.max_in_flight.max(1);
        if let Some(g) = self.length_grouping.as_mut()
            && (g.max_length_ratio.is_nan() || g.max_length_ratio < 1.0)
        {
            g.max_length_ratio = 1.0;
        }
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_is_valid() {
        assert_eq!(SchedulerConfig::default().validate(), Ok(()));
    }

    #[test]
    fn reports_every_problem_at_once() {
        let config = SchedulerConfig {
            max_batch_size: 0,
            queue_capacity: 0,
            max_in_flight: 0,
            length_grouping: Some(LengthGrouping {
                max_length_ratio: f64::NAN,
                max_skips: 2,
            }),
            ..SchedulerConfig::default()
        };
        let err = config
            .validate()
            .expect_err("three zero fields and a NaN ratio");
        assert_eq!(err.problems.len(), 4);
        let clamped = config.clamped();
        assert_eq!(clamped.validate(), Ok(()));
    }
}
