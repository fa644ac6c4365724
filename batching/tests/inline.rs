//! The inline path (`Admission::try_inline`): a batch predicted to take less
//! than a hand-off runs on the caller's thread, but only on an idle device
//! with nothing queued, and the scheduler stays the one owner of dispatch.
//! Simulated clock, no sleeps.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::*;
use quiver_batching::{Cost, DispatchReason, Poll, SchedulerConfig};

/// The simulated device's one-row batch (251 µs) fits under the bound.
fn inline_config() -> SchedulerConfig {
    SchedulerConfig {
        inline_below: Duration::from_micros(300),
        idle_spin: Duration::ZERO,
        ..SchedulerConfig::default()
    }
}

const ONE: Cost = Cost { rows: 1, tokens: 1 };

#[test]
fn only_a_device_the_scheduler_found_idle_is_lent() {
    let clock = Clock::new();
    let mut s = scheduler(inline_config());
    let a = s.admission();
    let far = clock.ms(1000);
    // Before any poll the device thread owns the device.
    assert!(a.try_inline(clock.us(0), ONE, far).is_none());
    assert!(matches!(s.poll(clock.us(0)), Poll::Idle));
    let lease = a
        .try_inline(clock.us(10), ONE, far)
        .expect("idle device is lent");
    assert_eq!(lease.predicted(), s.latency_model().predict(1, 1));
    // One lease at a time.
    assert!(a.try_inline(clock.us(11), ONE, far).is_none());
    // Predictions count the inline batch as work in flight.
    assert_eq!(a.busy_until(), Some(clock.us(10) + lease.predicted()));
    lease.finish(Duration::from_micros(251));
    assert_eq!(a.busy_until(), None);
    // Lent again right away: the device thread has no reason to poll.
    let lease = a.try_inline(clock.us(300), ONE, far).expect("lent again");
    drop(lease);
    assert_eq!(s.stats().batches_for(DispatchReason::Inline), 2);
}

#[test]
fn while_lent_the_scheduler_dispatches_nothing_and_then_everything() {
    let clock = Clock::new();
    let mut s = scheduler(inline_config());
    let a = s.admission();
    assert!(matches!(s.poll(clock.us(0)), Poll::Idle));
    let lease = a.try_inline(clock.us(1), ONE, clock.ms(1000)).unwrap();
    a.admit(simple(7, clock.us(2))).unwrap();
    // The admit rang; the device thread polls and finds the device lent.
    assert!(matches!(s.poll(clock.us(3)), Poll::Idle));
    assert!(matches!(s.poll(clock.us(4)), Poll::Idle));
    lease.finish(Duration::from_micros(251));
    // The lease's end rang the doorbell again (a zero wait returns at once
    // either way; the point is that the next poll dispatches).
    let batch = expect_dispatch(s.poll(clock.us(260)));
    assert_eq!(ids(&batch), vec![7]);
    assert_eq!(batch.reason, DispatchReason::DeviceIdle);
    // Queued or in flight: never lent.
    assert!(a.try_inline(clock.us(261), ONE, clock.ms(1000)).is_none());
    s.complete(clock.us(520), batch.id, Duration::from_micros(251));
    assert!(matches!(s.poll(clock.us(521)), Poll::Idle));
    assert!(a.try_inline(clock.us(522), ONE, clock.ms(1000)).is_some());
}

#[test]
fn a_request_never_jumps_the_queue() {
    let clock = Clock::new();
    let mut s = scheduler(inline_config());
    let a = s.admission();
    assert!(matches!(s.poll(clock.us(0)), Poll::Idle));
    // Admitted after the device thread parked, not yet taken in.
    a.admit(simple(1, clock.us(1))).unwrap();
    assert!(a.try_inline(clock.us(2), ONE, clock.ms(1000)).is_none());
    // The refusal handed the device back to the device thread.
    let batch = expect_dispatch(s.poll(clock.us(3)));
    assert_eq!(ids(&batch), vec![1]);
}

#[test]
fn slow_late_oversized_or_closed_batches_are_not_inlined() {
    let clock = Clock::new();
    let mut s = scheduler(inline_config());
    let a = s.admission();
    assert!(matches!(s.poll(clock.us(0)), Poll::Idle));
    let far = clock.ms(1000);
    // Predicted 200 + 50·2 + 2 = 302 µs: above the bound.
    assert!(
        a.try_inline(clock.us(1), Cost { rows: 2, tokens: 1 }, far)
            .is_none()
    );
    // Predicted 251 µs, due in 200 µs.
    assert!(a.try_inline(clock.us(1), ONE, clock.us(201)).is_none());
    // Breaks the batch budget, zero cost.
    assert!(
        a.try_inline(
            clock.us(1),
            Cost {
                rows: 33,
                tokens: 1
            },
            far
        )
        .is_none()
    );
    assert!(
        a.try_inline(clock.us(1), Cost { rows: 0, tokens: 1 }, far)
            .is_none()
    );
    // None of that took the device.
    assert!(a.try_inline(clock.us(1), ONE, far).is_some());
    a.close();
    assert!(a.try_inline(clock.us(2), ONE, far).is_none());

    let mut off = scheduler(SchedulerConfig {
        inline_below: Duration::ZERO,
        ..inline_config()
    });
    assert!(matches!(off.poll(clock.us(0)), Poll::Idle));
    assert!(off.admission().try_inline(clock.us(1), ONE, far).is_none());
}

#[test]
fn inline_measurements_feed_the_latency_model() {
    let clock = Clock::new();
    let mut s = scheduler(inline_config());
    let a = s.admission();
    assert!(matches!(s.poll(clock.us(0)), Poll::Idle));
    let before = s.latency_model().samples();
    for i in 0..10u64 {
        let lease = a
            .try_inline(clock.us(i * 100), ONE, clock.ms(1000))
            .unwrap();
        lease.finish(Duration::from_micros(251));
    }
    // A dropped lease (a panicking batch) gives the device back, unmeasured.
    drop(a.try_inline(clock.us(2000), ONE, clock.ms(1000)).unwrap());
    assert!(matches!(s.poll(clock.us(3000)), Poll::Idle));
    assert_eq!(s.latency_model().samples(), before + 10);
    assert_eq!(s.stats().batches_for(DispatchReason::Inline), 11);
    assert_eq!(s.stats().dispatched_requests, 0);
}
