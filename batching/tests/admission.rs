//! The producer side: rejections and their counters, admission prediction,
//! and a multi-threaded stress of the real lock-free lanes.
// Scheduler state lives in loom types under `--cfg loom`; only tests/loom.rs
// runs there.
#![cfg(not(loom))]
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use quiver_batching::{Cost, Poll, RejectReason, SchedulerConfig};

#[test]
fn full_lane_is_overloaded_and_counted_per_lane() {
    let clock = Clock::new();
    let config = SchedulerConfig {
        queue_capacity: 2,
        ..SchedulerConfig::default()
    };
    let mut s = scheduler(config);
    let adm = s.admission();
    let t0 = clock.us(0);
    adm.admit(simple(1, t0)).unwrap();
    adm.admit(simple(2, t0)).unwrap();
    let err = adm.admit(simple(3, t0)).unwrap_err();
    assert_eq!(err.reason, RejectReason::Overloaded);
    assert_eq!(err.request.id, 3);
    // The other lane has its own capacity.
    adm.admit(request(4, 1, t0, clock.ms(10), 1, 1)).unwrap();
    let stats = adm.stats();
    assert_eq!((stats.admitted, stats.overloaded, stats.queued), (3, 1, 3));

    // Handing requests back (dispatch) frees their slots...
    let batch = expect_dispatch(s.poll(t0));
    assert_eq!(ids(&batch), [1, 2]);
    adm.admit(simple(5, t0)).unwrap();
    adm.admit(simple(6, t0)).unwrap();
    // ...taking them into the scheduler's queues (device busy) does not.
    assert!(matches!(s.poll(t0), Poll::Idle));
    assert_eq!(s.stats().queued, 3);
    assert_eq!(
        adm.admit(simple(7, t0)).unwrap_err().reason,
        RejectReason::Overloaded
    );
    assert_eq!(adm.stats().overloaded, 2);
}

#[test]
fn slots_free_on_dispatch_and_on_drain_not_before() {
    let clock = Clock::new();
    let config = SchedulerConfig {
        queue_capacity: 1,
        ..SchedulerConfig::default()
    };
    let mut s = scheduler(config);
    let adm = s.admission();
    let t0 = clock.us(0);
    adm.admit(simple(1, t0)).unwrap();
    let batch = common::expect_dispatch(s.poll(t0));
    let doomed = simple(2, t0);
    doomed.cancel.cancel();
    adm.admit(doomed).unwrap();
    s.complete(t0, batch.id, device_time(1, 1));
    assert!(matches!(s.poll(t0), Poll::Idle));
    // Ended but not drained: the slot is still taken.
    assert_eq!(
        adm.admit(simple(3, t0)).unwrap_err().reason,
        RejectReason::Overloaded
    );
    assert_eq!(s.drain_ended().count(), 1);
    adm.admit(simple(4, t0)).unwrap();
}

#[test]
fn too_large_invalid_priority_invalid_cost_and_closed() {
    let clock = Clock::new();
    let config = SchedulerConfig {
        max_batch_size: 8,
        max_batch_tokens: 100,
        priority_levels: 2,
        ..SchedulerConfig::default()
    };
    let s = scheduler(config);
    let adm = s.admission();
    let (t0, due) = (clock.us(0), clock.ms(10));
    let reason = |r| adm.admit(r).unwrap_err().reason;
    assert_eq!(reason(request(1, 0, t0, due, 9, 1)), RejectReason::TooLarge);
    assert_eq!(
        reason(request(2, 0, t0, due, 2, 51)),
        RejectReason::TooLarge
    );
    assert_eq!(
        reason(request(3, 0, t0, due, u32::MAX, u32::MAX)),
        RejectReason::TooLarge
    );
    adm.admit(request(4, 0, t0, due, 8, 12)).unwrap(); // 96 tokens: fits
    assert_eq!(
        reason(request(5, 2, t0, due, 1, 1)),
        RejectReason::InvalidPriority
    );
    assert_eq!(
        reason(request(6, u8::MAX, t0, due, 1, 1)),
        RejectReason::InvalidPriority
    );
    assert_eq!(
        reason(request(7, 0, t0, due, 0, 1)),
        RejectReason::InvalidCost
    );
    assert_eq!(
        reason(request(8, 0, t0, due, 1, 0)),
        RejectReason::InvalidCost
    );
    assert!(!adm.is_closed());
    adm.close();
    assert!(adm.is_closed());
    assert_eq!(reason(simple(9, t0)), RejectReason::Closed);
    let stats = adm.stats();
    assert_eq!(stats.admitted, 1);
    assert_eq!(stats.too_large, 3);
    assert_eq!(stats.invalid_priority, 2);
    assert_eq!(stats.invalid_cost, 2);
    assert_eq!(stats.closed, 1);
    assert_eq!(stats.overloaded, 0);
    assert_eq!(stats.queued, 1);
}

#[test]
fn reject_reasons_display() {
    assert_eq!(
        RejectReason::Overloaded.to_string(),
        "overloaded: the priority lane is full"
    );
    assert_eq!(
        RejectReason::Closed.to_string(),
        "scheduler closed for shutdown"
    );
}

#[test]
fn dispatch_reason_names() {
    use quiver_batching::DispatchReason;
    let names: Vec<_> = DispatchReason::ALL
        .iter()
        .map(DispatchReason::as_str)
        .collect();
    assert_eq!(
        names,
        [
            "budget_full",
            "device_idle",
            "deadline_slack",
            "max_queue_delay",
            "inline"
        ]
    );
    for (i, r) in DispatchReason::ALL.iter().enumerate() {
        assert_eq!(r.index(), i);
    }
}

#[test]
fn prediction_on_an_idle_empty_device_is_one_batch() {
    let clock = Clock::new();
    let s = scheduler(SchedulerConfig::default());
    let adm = s.admission();
    let now = clock.us(0);
    let cost = Cost {
        rows: 2,
        tokens: 10,
    };
    let predicted = adm.predict_completion(now, cost) - now;
    assert_eq!(predicted, s.latency_model().predict(2, 20));
}

#[test]
fn prediction_grows_with_queued_work() {
    let clock = Clock::new();
    let s = scheduler(SchedulerConfig::default());
    let adm = s.admission();
    let now = clock.us(0);
    let cost = Cost {
        rows: 1,
        tokens: 64,
    };
    let mut last = adm.predict_completion(now, cost);
    for id in 0..40 {
        adm.admit(request(id, 1, now, clock.ms(100), 1, 64))
            .unwrap();
        let next = adm.predict_completion(now, cost);
        assert!(next > last, "request {id}: {next:?} <= {last:?}");
        last = next;
    }
    // 41 rows: two batches' fixed cost, plus rows and tokens.
    let expected = 2.0 * FIXED.as_secs_f64() + 41.0 * (PER_ROW + 64 * PER_TOKEN).as_secs_f64();
    let got = (last - now).as_secs_f64();
    assert!(
        (got - expected).abs() / expected < 0.02,
        "{got} vs {expected}"
    );
    // A priority-0 request does not queue behind priority 1.
    let urgent = adm.predict_completion_at(now, 0, cost) - now;
    assert_eq!(urgent, s.latency_model().predict(1, 64));
}

#[test]
fn prediction_grows_with_device_busy_time_and_shrinks_as_it_passes() {
    let clock = Clock::new();
    let mut s = scheduler(SchedulerConfig::default());
    let adm = s.admission();
    let cost = Cost { rows: 1, tokens: 1 };
    let t0 = clock.us(0);
    let idle = adm.predict_completion(t0, cost) - t0;
    adm.admit(request(1, 0, t0, clock.ms(100), 32, 400))
        .unwrap();
    let batch = expect_dispatch(s.poll(t0));
    // Equal up to the nanosecond rounding of f64 seconds.
    let close = |a: Duration, b: Duration| a.abs_diff(b) <= Duration::from_nanos(10);
    let busy = adm.predict_completion(t0, cost) - t0;
    assert!(close(busy, idle + batch.predicted), "{busy:?}");
    let later = clock.us(0) + batch.predicted / 2;
    let halfway = adm.predict_completion(later, cost) - later;
    assert!(close(halfway, idle + batch.predicted / 2), "{halfway:?}");
    s.complete(clock.us(0) + batch.predicted, batch.id, batch.predicted);
    let after = clock.us(0) + batch.predicted;
    assert!(close(adm.predict_completion(after, cost) - after, idle));
}

#[test]
fn concurrent_producers_lose_and_duplicate_nothing() {
    const PRODUCERS: u64 = 4;
    const EACH: u64 = 2000;
    let config = SchedulerConfig {
        queue_capacity: 64,
        ..SchedulerConfig::default()
    };
    let mut s = scheduler(config);
    let adm = s.admission();
    let start = Instant::now();
    let producers: Vec<_> = (0..PRODUCERS)
        .map(|p| {
            let adm = Arc::clone(&adm);
            std::thread::spawn(move || {
                let mut overloaded = 0u64;
                for i in 0..EACH {
                    let mut req = simple(p * EACH + i, start);
                    req.priority = (i % 2) as u8;
                    loop {
                        match adm.admit(req) {
                            Ok(()) => break,
                            Err(rejected) => {
                                assert_eq!(rejected.reason, RejectReason::Overloaded);
                                overloaded += 1;
                                req = rejected.request;
                                std::thread::yield_now();
                            }
                        }
                    }
                }
                overloaded
            })
        })
        .collect();
    let mut seen = HashSet::new();
    let now = start; // simulated: the device is instant
    while seen.len() < (PRODUCERS * EACH) as usize {
        match s.poll(now) {
            Poll::Dispatch(batch) => {
                for r in &batch.requests {
                    assert!(seen.insert(r.id), "request {} dispatched twice", r.id);
                }
                s.complete(now, batch.id, Duration::from_micros(1));
            }
            // Bounded wait on the event; the bound only guards the test.
            _ => adm.doorbell().wait(Some(Duration::from_secs(5))),
        }
    }
    let overloaded: u64 = producers.into_iter().map(|p| p.join().unwrap()).sum();
    let stats = adm.stats();
    assert_eq!(stats.admitted, PRODUCERS * EACH);
    assert_eq!(stats.overloaded, overloaded);
    assert_eq!(stats.queued, 0);
    assert!(s.shutdown().is_empty());
}

#[test]
fn handles_are_thread_safe() {
    fn send_sync<T: Send + Sync>() {}
    fn send<T: Send>() {}
    send_sync::<quiver_batching::Admission<Vec<u8>>>();
    send_sync::<Arc<quiver_batching::Admission<Vec<u8>>>>();
    send::<quiver_batching::Scheduler<Vec<u8>>>();
    send::<quiver_batching::Batch<Vec<u8>>>();
}
