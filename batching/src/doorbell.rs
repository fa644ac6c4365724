//! The doorbell (DESIGN.md "Scheduling": the device thread sleeps between
//! polls; producers wake it when they admit work).
//!
//! Protocol: the device thread calls [`Scheduler::poll`](crate::Scheduler::poll)
//! until it has nothing to dispatch, then [`Doorbell::wait`]. A ring that
//! lands between the poll and the wait is remembered, so that wait returns at
//! once: no lost wake-up (checked by `tests/loom.rs`).

use std::time::{Duration, Instant};

use crate::sync::{self, AtomicBool, Condvar, Mutex, Ordering};

/// A sticky wake-up flag for one waiting thread.
///
/// `ring` is cheap when the bell is already rung (one atomic swap, no lock),
/// which is the common case under load: producers only take the lock to
/// notify when they flip the flag from clear to rung.
#[derive(Debug, Default)]
pub struct Doorbell {
    /// Rung since the last `wait` consumed it.
    rung: AtomicBool,
    /// Orders "check flag then sleep" in `wait` against "set flag then
    /// notify" in `ring`: a waiter holds it from its last check of `rung`
    /// until the condvar releases it, so a ringer's notify (taken under it)
    /// cannot fall in between.
    lock: Mutex<()>,
    wake: Condvar,
}

impl Doorbell {
    /// A doorbell that is not rung.
    pub fn new() -> Self {
        Self::default()
    }

    /// Rings: the current or next [`wait`](Self::wait) returns. Never blocks
    /// for longer than a waiter's check of the flag.
    pub fn ring(&self) {
        // Already rung: whoever flipped the flag notifies (or has notified),
        // and the waiter has not consumed it yet.
        if self.rung.swap(true, Ordering::AcqRel) {
            return;
        }
        let _guard = sync::lock(&self.lock);
        self.wake.notify_all();
    }

    /// Returns at once if rung since the last wait, clearing the flag; else
    /// blocks until rung (clearing it) or until `timeout` has passed
    /// (`None` = no timeout). Spurious condvar wake-ups are absorbed.
    pub fn wait(&self, timeout: Option<Duration>) {
        if self.rung.swap(false, Ordering::AcqRel) {
            return;
        }
        let deadline = timeout.and_then(|t| Instant::now().checked_add(t));
        let mut guard = sync::lock(&self.lock);
        loop {
            if self.rung.swap(false, Ordering::AcqRel) {
                return;
            }
            match deadline {
                // No timeout, or one too long for `Instant`: wait for a ring.
                None => {
                    guard = self
                        .wake
                        .wait(guard)
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                }
                Some(deadline) => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return;
                    }
                    guard = match self.wake.wait_timeout(guard, left) {
                        Ok((guard, _)) => guard,
                        Err(poisoned) => poisoned.into_inner().0,
                    };
                }
            }
        }
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn ring_before_wait_is_remembered_once() {
        let bell = Doorbell::new();
        bell.ring();
        bell.ring();
        bell.wait(None); // returns at once: rung
        // Consumed: a zero timeout now returns without a ring.
        bell.wait(Some(Duration::ZERO));
        assert!(!bell.rung.load(Ordering::Acquire));
    }

    #[test]
    fn ring_from_another_thread_wakes_waiter() {
        let bell = std::sync::Arc::new(Doorbell::new());
        let ringer = {
            let bell = bell.clone();
            std::thread::spawn(move || bell.ring())
        };
        bell.wait(None);
        ringer.join().expect("ringer thread does not panic");
    }
}
