//! Model check of the front-end → device-thread hand-off with loom.
//!
//! Run with:
//!
//! ```text
//! RUSTFLAGS="--cfg loom" cargo test -p quiver-batching --test loom --release --target-dir target/loom
//! ```
//!
//! Under a normal build this file compiles to nothing. The models are kept
//! small (two producers, one request each) and exploration is bounded by
//! preemptions (4 for the two-producer model, 3 for the others) so that the
//! run takes seconds; raising the bounds to 5 takes minutes.
#![cfg(loom)]
#![allow(clippy::unwrap_used)]

use std::collections::HashSet;
use std::time::{Duration, Instant};

use loom::sync::Arc;
use loom::thread;
use quiver_batching::{
    CancelToken, Cost, Ended, LatencyModel, Poll, Request, Scheduler, SchedulerConfig,
};

fn config() -> SchedulerConfig {
    SchedulerConfig {
        queue_capacity: 2,
        priority_levels: 1,
        // The spin only delays sleeping; loom explores the sleep.
        idle_spin: Duration::ZERO,
        ..SchedulerConfig::default()
    }
}

fn request(id: u64, now: Instant) -> Request<u64> {
    Request {
        id,
        priority: 0,
        arrival: now,
        deadline: now + Duration::from_secs(3600),
        cost: Cost { rows: 1, tokens: 1 },
        cancel: CancelToken::new(),
        payload: id,
    }
}

fn model(preemptions: usize) -> loom::model::Builder {
    let mut builder = loom::model::Builder::new();
    builder.preemption_bound = Some(preemptions);
    builder
}

/// Two producers admit while the device thread polls and sleeps on the
/// doorbell: it must see both requests exactly once and never sleep through
/// an admit (loom reports a deadlock if it does).
#[test]
fn no_lost_wakeup_and_no_lost_or_duplicated_request() {
    model(4).check(|| {
        let now = Instant::now();
        let mut scheduler: Scheduler<u64> = Scheduler::new(config(), LatencyModel::new());
        let admission = scheduler.admission();
        let producers: Vec<_> = (0..2u64)
            .map(|id| {
                let admission = Arc::clone(&admission);
                thread::spawn(move || admission.admit(request(id, now)).unwrap())
            })
            .collect();

        let mut seen = HashSet::new();
        while seen.len() < 2 {
            while let Poll::Dispatch(batch) = scheduler.poll(now) {
                for r in &batch.requests {
                    assert!(seen.insert(r.id), "request {} dispatched twice", r.id);
                }
                scheduler.complete(now, batch.id, Duration::from_micros(1));
            }
            if seen.len() < 2 {
                admission.doorbell().wait(None);
            }
        }
        for p in producers {
            p.join().unwrap();
        }
        assert!(matches!(scheduler.poll(now), Poll::Idle));
        assert_eq!(admission.stats().queued, 0);
    });
}

/// A cancel racing with polls: the request ends exactly once, either in a
/// batch (cancel came too late) or as `Ended::Cancelled`.
#[test]
fn cancel_racing_with_poll_ends_the_request_once() {
    model(3).check(|| {
        let now = Instant::now();
        let mut scheduler: Scheduler<u64> = Scheduler::new(config(), LatencyModel::new());
        let admission = scheduler.admission();
        let req = request(7, now);
        let token = req.cancel.clone();
        admission.admit(req).unwrap();
        let canceller = thread::spawn(move || token.cancel());

        let mut outcomes = 0;
        for _ in 0..2 {
            if let Poll::Dispatch(batch) = scheduler.poll(now) {
                assert_eq!(batch.requests.len(), 1);
                outcomes += 1;
                scheduler.complete(now, batch.id, Duration::from_micros(1));
            }
            for ended in scheduler.drain_ended() {
                assert!(matches!(ended, Ended::Cancelled(ref r) if r.id == 7));
                outcomes += 1;
            }
        }
        canceller.join().unwrap();
        assert_eq!(outcomes, 1);
        assert_eq!(admission.stats().queued, 0);
    });
}

/// Shutdown racing with an admit: the request is either refused as `Closed`
/// or handed back by shutdown; never stranded in a lane.
#[test]
fn shutdown_racing_with_admit_strands_nothing() {
    model(3).check(|| {
        let now = Instant::now();
        let mut scheduler: Scheduler<u64> = Scheduler::new(config(), LatencyModel::new());
        let admission = scheduler.admission();
        let producer = {
            let admission = Arc::clone(&admission);
            thread::spawn(move || admission.admit(request(1, now)).is_ok())
        };
        let back = scheduler.shutdown();
        let admitted = producer.join().unwrap();
        assert_eq!(back.len(), usize::from(admitted));
        assert_eq!(admission.stats().queued, 0);
    });
}

/// An inline lease racing with an admit and the device thread's polls and
/// sleeps: the device never runs two batches at once, the admitted request
/// is dispatched exactly once, and the device thread never sleeps through
/// it (the lease's end rings when an admit found the device lent).
#[test]
fn an_inline_lease_never_overlaps_a_batch_nor_strands_an_admit() {
    use loom::sync::atomic::{AtomicBool, Ordering};
    use quiver_batching::Coefficients;

    model(3).check(|| {
        let now = Instant::now();
        let config = SchedulerConfig {
            inline_below: Duration::from_millis(1),
            ..config()
        };
        let cheap = LatencyModel::with_prior(Coefficients {
            fixed_s: 1e-6,
            per_row_s: 0.0,
            per_token_s: 0.0,
        });
        let mut scheduler: Scheduler<u64> = Scheduler::new(config, cheap);
        let admission = scheduler.admission();
        let busy = Arc::new(AtomicBool::new(false));
        let compute = |busy: &AtomicBool| {
            assert!(!busy.swap(true, Ordering::SeqCst), "two batches at once");
            busy.store(false, Ordering::SeqCst);
        };
        let lender = {
            let admission = Arc::clone(&admission);
            let busy = Arc::clone(&busy);
            thread::spawn(move || {
                let deadline = now + Duration::from_secs(3600);
                let cost = Cost { rows: 1, tokens: 1 };
                if let Some(lease) = admission.try_inline(now, cost, deadline) {
                    compute(&busy);
                    lease.finish(Duration::from_micros(1));
                }
            })
        };
        let producer = {
            let admission = Arc::clone(&admission);
            thread::spawn(move || admission.admit(request(1, now)).unwrap())
        };
        let mut dispatched = 0;
        while dispatched == 0 {
            match scheduler.poll(now) {
                Poll::Dispatch(batch) => {
                    compute(&busy);
                    dispatched += batch.requests.len();
                    scheduler.complete(now, batch.id, Duration::from_micros(1));
                }
                _ => admission.doorbell().wait(None),
            }
        }
        lender.join().unwrap();
        producer.join().unwrap();
        assert_eq!(dispatched, 1);
        assert_eq!(admission.stats().queued, 0);
    });
}
