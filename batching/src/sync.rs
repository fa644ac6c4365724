//! The synchronisation shim of the front-end → device-thread hand-off.
//!
//! Every atomic, lock, condition variable and `Arc` that [`Admission`] and
//! [`Doorbell`] share between producer threads and the device thread comes
//! from here, as in tokio's `src/loom`. Normal builds get `std` and
//! `crossbeam_queue::ArrayQueue`; under `RUSTFLAGS="--cfg loom"` they get
//! loom's model-checked types, and the bounded lane queue becomes a loom
//! `Mutex<VecDeque>` with a capacity so that loom explores its interleavings
//! too (loom cannot see inside crossbeam's lock-free internals).
//!
//! [`Admission`]: crate::Admission
//! [`Doorbell`]: crate::Doorbell

#[cfg(not(loom))]
mod imp {
    pub use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    pub use std::sync::{Arc, Condvar, Mutex, MutexGuard};

    /// Lets another thread run while a spin waits on it.
    pub fn yield_now() {
        std::thread::yield_now();
    }

    /// One pause of a busy-wait (`PAUSE` on x86).
    pub fn spin_loop() {
        std::hint::spin_loop();
    }

    /// A bounded multi-producer multi-consumer FIFO that never blocks.
    #[derive(Debug)]
    pub struct BoundedQueue<T> {
        inner: crossbeam_queue::ArrayQueue<T>,
    }

    impl<T> BoundedQueue<T> {
        /// A queue holding at most `capacity` items; a capacity of 0 is
        /// raised to 1 (`ArrayQueue` cannot be empty-sized).
        pub fn new(capacity: usize) -> Self {
            Self {
                inner: crossbeam_queue::ArrayQueue::new(capacity.max(1)),
            }
        }

        /// Appends `item`, or hands it back when the queue is full.
        pub fn push(&self, item: T) -> Result<(), T> {
            self.inner.push(item)
        }

        /// Removes the oldest item, if any.
        pub fn pop(&self) -> Option<T> {
            self.inner.pop()
        }

        /// Items in the queue now (a snapshot).
        pub fn len(&self) -> usize {
            self.inner.len()
        }

        /// Whether the queue is empty now (a snapshot).
        pub fn is_empty(&self) -> bool {
            self.len() == 0
        }
    }
}

#[cfg(loom)]
mod imp {
    pub use loom::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    pub use loom::sync::{Arc, Condvar, Mutex, MutexGuard};
    use std::collections::VecDeque;

    /// Lets another thread run while a spin waits on it (loom requires it).
    pub fn yield_now() {
        loom::thread::yield_now();
    }

    /// One pause of a busy-wait: a yield, so that loom can schedule others.
    pub fn spin_loop() {
        loom::thread::yield_now();
    }

    /// The loom stand-in for `ArrayQueue`: same contract, explored by loom.
    #[derive(Debug)]
    pub struct BoundedQueue<T> {
        inner: Mutex<VecDeque<T>>,
        capacity: usize,
    }

    impl<T> BoundedQueue<T> {
        /// A queue holding at most `capacity` items (at least 1).
        pub fn new(capacity: usize) -> Self {
            let capacity = capacity.max(1);
            Self {
                inner: Mutex::new(VecDeque::with_capacity(capacity)),
                capacity,
            }
        }

        /// Appends `item`, or hands it back when the queue is full.
        pub fn push(&self, item: T) -> Result<(), T> {
            let mut queue = super::lock(&self.inner);
            if queue.len() >= self.capacity {
                return Err(item);
            }
            queue.push_back(item);
            Ok(())
        }

        /// Removes the oldest item, if any.
        pub fn pop(&self) -> Option<T> {
            super::lock(&self.inner).pop_front()
        }

        /// Items in the queue now (a snapshot).
        pub fn len(&self) -> usize {
            super::lock(&self.inner).len()
        }

        /// Whether the queue is empty now (a snapshot).
        pub fn is_empty(&self) -> bool {
            self.len() == 0
        }
    }
}

pub use imp::*;

/// Locks `mutex`, ignoring poisoning: the data under our locks (a unit or a
/// queue) stays consistent even if a holder panicked, and a poisoned lock
/// must not turn into a panic on the request path.
pub fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}
