//! The knobs of one device's scheduler (DESIGN.md "Scheduling": the batch
//! budget, the queue-delay bound, the admission queue bounds and the prefetch
//! depth).

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
            ..SchedulerConfig::default()
        };
        let err = config.validate().expect_err("three zero fields");
        assert_eq!(err.problems.len(), 3);
        let clamped = config.clamped();
        assert_eq!(clamped.validate(), Ok(()));
    }
}
