//! What the front end hands the scheduler: one inference request with its
//! priority, deadline, batch cost and cancellation token (DESIGN.md
//! "Scheduling": the unit that admission queues and batch formation orders).

use std::time::Instant;

use crate::sync::{Arc, AtomicBool, Ordering};

/// Identifies a request; chosen by the front end, opaque to the scheduler.
pub type RequestId = u64;

/// Identifies a dispatched batch; assigned by the [`Scheduler`](crate::Scheduler)
/// in dispatch order, starting at 0.
pub type BatchId = u64;

/// What a request costs a batch.
///
/// A batch's padded tokens are `total rows × max tokens` over its requests,
/// because every row is padded to the longest sequence in the batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cost {
    /// Batch rows this request contributes; must be at least 1.
    pub rows: u32,
    /// Sequence length of each row; 1 for tabular inputs; must be at least 1.
    pub tokens: u32,
}

impl Cost {
    /// Padded tokens of a batch holding only this request (`rows × tokens`,
    /// saturating).
    pub fn padded_tokens(&self) -> u32 {
        self.rows.saturating_mul(self.tokens)
    }
}

/// Cancellation shared between the front end and the scheduler.
///
/// The front end keeps a clone and calls [`cancel`](Self::cancel) when the
/// client goes away; the scheduler then skips the request at formation and
/// reports it as [`Ended::Cancelled`](crate::Ended::Cancelled). Cancelling
/// after dispatch has no effect on the batch. The flag goes through the
/// [`sync`](crate::sync) shim so that loom sees it.
#[derive(Clone, Debug, Default)]
pub struct CancelToken(Arc<AtomicBool>);

impl CancelToken {
    /// A token that is not cancelled.
    pub fn new() -> Self {
        Self::default()
    }

    /// Marks the request cancelled; idempotent.
    pub fn cancel(&self) {
        self.0.store(true, Ordering::Release);
    }

    /// Whether [`cancel`](Self::cancel) was called on any clone.
    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}

/// One request waiting for a batch.
#[derive(Debug)]
pub struct Request<T> {
    /// The front end's identifier, echoed back in batches and ended reports.
    pub id: RequestId,
    /// Priority lane; 0 is the most urgent; must be below
    /// [`SchedulerConfig::priority_levels`](crate::SchedulerConfig::priority_levels).
    pub priority: u8,
    /// When the request arrived; [`max_queue_delay`](crate::SchedulerConfig::max_queue_delay)
    /// counts from here.
    pub arrival: Instant,
    /// When the answer is due; orders the lane (earliest first) and drives
    /// early drop and [`DispatchReason::DeadlineSlack`](crate::DispatchReason::DeadlineSlack).
    pub deadline: Instant,
    /// Rows and tokens this request adds to a batch.
    pub cost: Cost,
    /// Cancellation; the front end keeps a clone.
    pub cancel: CancelToken,
    /// The caller's data (inputs, reply channel); never inspected.
    pub payload: T,
}
