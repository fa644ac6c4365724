//! `quiver-batching`: Quiver's deadline-aware dynamic batcher, one per model
//! and device (DESIGN.md "Scheduling").
//!
//! The front end's threads hand requests to a lock-free, bounded
//! [`Admission`] (one lane per priority; full is a typed, counted
//! [`RejectReason::Overloaded`]) and ask it for a predicted completion to
//! choose local or overflow. The device thread owns the [`Scheduler`], a
//! sans-IO state machine handed `now`: it forms batches earliest deadline
//! first under a rows and padded-tokens budget, grouping requests of similar
//! sequence length where that pays ([`LengthGrouping`]), dispatches by the rules of
//! [`DispatchReason`], drops requests that cannot meet their deadline or
//! were cancelled ([`Ended`]), and fits a [`LatencyModel`] online from
//! measured batches. Between polls the device thread sleeps on the
//! [`Doorbell`], which admission rings.
//!
//! ```text
//! front-end threads ── admit ──▶ Admission lanes ──▶ Scheduler::poll ──▶ Batch ──▶ device
//!                    ◀─ Rejected       │ doorbell          ▲                        │
//!                                      └──── wait ─────────┴──── complete(measured) ┘
//! ```
//!
//! A device thread's loop:
//!
//! ```
//! use std::time::{Duration, Instant};
//! use quiver_batching::{Cost, CancelToken, LatencyModel, Poll, Request, Scheduler, SchedulerConfig};
//!
//! let mut scheduler = Scheduler::new(SchedulerConfig::default(), LatencyModel::new());
//! let admission = scheduler.admission();
//! let now = Instant::now();
//! admission
//!     .admit(Request {
//!         id: 1,
//!         priority: 0,
//!         arrival: now,
//!         deadline: now + Duration::from_millis(50),
//!         cost: Cost { rows: 1, tokens: 8 },
//!         cancel: CancelToken::new(),
//!         payload: "input",
//!     })
//!     .expect("an empty lane has room");
//! match scheduler.poll(now) {
//!     Poll::Dispatch(batch) => {
//!         // ... run the batch on the device, answer each request ...
//!         scheduler.complete(Instant::now(), batch.id, Duration::from_micros(300));
//!     }
//!     Poll::WaitUntil(t) => admission.doorbell().wait(Some(t.saturating_duration_since(now))),
//!     Poll::Idle => admission.doorbell().wait(None),
//! }
//! for ended in scheduler.drain_ended() {
//!     // ... answer cancelled / deadline-unreachable requests ...
//!     let _ = ended;
//! }
//! ```
//!
//! All atomics and locks of the hand-off go through [`sync`], so the same
//! code is model-checked by loom (`tests/loom.rs`).

#![forbid(unsafe_code)]

mod admission;
mod config;
mod doorbell;
mod latency;
mod request;
mod scheduler;
pub mod sync;

pub use admission::{Admission, AdmissionStats, InlineLease, RejectReason, Rejected};
pub use config::{ConfigError, LengthGrouping, SchedulerConfig};
pub use doorbell::Doorbell;
pub use latency::{Coefficients, DEFAULT_FORGETTING, LatencyModel, MAX_PREDICTION, Sample};
pub use request::{BatchId, CancelToken, Cost, Request, RequestId};
pub use scheduler::{Batch, DispatchReason, Ended, Poll, Scheduler, SchedulerStats};
