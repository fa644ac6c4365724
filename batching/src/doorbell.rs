//! The doorbell (DESIGN.md "Scheduling": the device thread sleeps between
//! polls; producers wake it when they admit work).
//!
//! Protocol: the device thread calls [`Scheduler::poll`](crate::Scheduler::poll)
//! until it has nothing to dispatch, then [`Doorbell::wait`]. A ring that
//! lands between the poll and the wait is remembered, so that wait returns at
//! once: no lost wake-up (checked by `tests/loom.rs`).
//!
//! Cost per ring: one atomic swap. A ringer takes the lock and makes the
//! futex call only when the waiter is asleep on the condition variable; while
//! work keeps arriving the waiter does not get that far, because it first
//! spins for a bounded time ([`Doorbell::with_spin`]) watching for a ring.

use std::time::{Duration, Instant};

use crate::sync::{self, AtomicU64, Condvar, Mutex, Ordering};

/// Not rung, and the waiter is not asleep.
const EMPTY: u64 = 0;
/// Rung since the last `wait` consumed it.
const RUNG: u64 = 1;
/// The waiter is asleep on the condition variable (or about to be: it holds
/// the lock): a ringer must notify.
const SLEEPING: u64 = 2;

/// A sticky wake-up flag for one waiting thread.
///
/// `ring` is one atomic swap unless the waiter sleeps: only a ring that finds
/// it asleep takes the lock and notifies. All transitions are read-modify-write
/// operations on one atomic, so their order is total and a ring can never
/// fall between the waiter's last check and its sleep (the waiter publishes
/// [`SLEEPING`] under the lock it sleeps with).
#[derive(Debug, Default)]
pub struct Doorbell {
    /// [`EMPTY`], [`RUNG`] or [`SLEEPING`].
    state: AtomicU64,
    /// How long [`wait`](Self::wait) spins watching for a ring before it
    /// sleeps.
    spin: Duration,
    /// Held by the waiter from publishing [`SLEEPING`] until the condition
    /// variable releases it, and by a ringer while it notifies.
    lock: Mutex<()>,
    wake: Condvar,
}

impl Doorbell {
    /// A doorbell that is not rung and whose waiter sleeps at once.
    pub fn new() -> Self {
        Self::default()
    }

    /// A doorbell whose waiter spins for up to `spin` (bounded by its
    /// timeout) before it sleeps: a ring within that time costs the ringer
    /// one atomic swap and the waiter no futex wake-up, at the price of up
    /// to `spin` of CPU each time the waiter runs out of work.
    pub fn with_spin(spin: Duration) -> Self {
        Self {
            spin,
            ..Self::default()
        }
    }

    /// The spin before sleeping.
    pub fn spin(&self) -> Duration {
        self.spin
    }

    /// Rings: the current or next [`wait`](Self::wait) returns. Never blocks
    /// for longer than a sleeping waiter's hand-over of the lock.
    pub fn ring(&self) {
        if self.state.swap(RUNG, Ordering::AcqRel) == SLEEPING {
            let _guard = sync::lock(&self.lock);
            self.wake.notify_all();
        }
    }

    /// Returns at once if rung since the last wait, consuming the ring; else
    /// spins for up to the doorbell's spin, then blocks until rung or until
    /// `timeout` has passed (`None` = no timeout). Spurious condvar wake-ups
    /// are absorbed. Only one thread may wait at a time.
    pub fn wait(&self, timeout: Option<Duration>) {
        if self.take_ring() {
            return;
        }
        let start = Instant::now();
        let deadline = timeout.and_then(|t| start.checked_add(t));
        if self.spin_for_ring(start, deadline) {
            return;
        }
        let mut guard = sync::lock(&self.lock);
        loop {
            match self
                .state
                .compare_exchange(EMPTY, SLEEPING, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => {}
                // Rung meanwhile.
                Err(_) => {
                    self.state.store(EMPTY, Ordering::Release);
                    return;
                }
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
                    if !left.is_zero() {
                        guard = match self.wake.wait_timeout(guard, left) {
                            Ok((guard, _)) => guard,
                            Err(poisoned) => poisoned.into_inner().0,
                        };
                    }
                }
            }
            // Awake: rung (consumed here), timed out, or spurious.
            if self.state.swap(EMPTY, Ordering::AcqRel) == RUNG {
                return;
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return;
            }
        }
    }

    /// Consumes a pending ring.
    fn take_ring(&self) -> bool {
        // Only the waiter moves the state away from RUNG, and it is not
        // SLEEPING outside `wait`'s locked section.
        self.state
            .compare_exchange(RUNG, EMPTY, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    /// Spins until rung (true, consumed) or until the spin or `deadline`
    /// runs out (false).
    fn spin_for_ring(&self, start: Instant, deadline: Option<Instant>) -> bool {
        if self.spin.is_zero() {
            return false;
        }
        let until = start.checked_add(self.spin).unwrap_or(start);
        let until = deadline.map_or(until, |d| d.min(until));
        let mut checks = 0u32;
        loop {
            for _ in 0..64 {
                if self.state.load(Ordering::Acquire) == RUNG {
                    return self.take_ring();
                }
                sync::spin_loop();
            }
            checks = checks.wrapping_add(1);
            // The clock is read every 64 checks (tens of nanoseconds each).
            if checks.is_multiple_of(4) && Instant::now() >= until {
                return false;
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
        assert_eq!(bell.state.load(Ordering::Acquire), EMPTY);
    }

    #[test]
    fn ring_from_another_thread_wakes_waiter() {
        for spin in [Duration::ZERO, Duration::from_micros(50)] {
            let bell = std::sync::Arc::new(Doorbell::with_spin(spin));
            let ringer = {
                let bell = bell.clone();
                std::thread::spawn(move || {
                    std::thread::sleep(Duration::from_millis(5));
                    bell.ring()
                })
            };
            bell.wait(None);
            ringer.join().expect("ringer thread does not panic");
            assert_eq!(bell.state.load(Ordering::Acquire), EMPTY);
        }
    }

    #[test]
    fn a_ring_while_awake_takes_no_lock() {
        let bell = Doorbell::new();
        // The lock held elsewhere: a ring that needed it would block forever.
        let _held = sync::lock(&bell.lock);
        bell.ring();
        bell.ring();
        assert_eq!(bell.state.load(Ordering::Acquire), RUNG);
    }

    #[test]
    fn a_timed_wait_with_a_spin_returns_at_its_timeout() {
        let bell = Doorbell::with_spin(Duration::from_millis(50));
        let t = Instant::now();
        bell.wait(Some(Duration::from_millis(1)));
        // Bounded by the timeout, not the longer spin (generous slack for
        // a loaded machine; the point is that it returns).
        assert!(t.elapsed() < Duration::from_secs(5));
        assert_eq!(bell.state.load(Ordering::Acquire), EMPTY);
    }
}
