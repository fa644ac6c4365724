//! Dispatch rules, formation order and budget, early drop, cancellation and
//! shutdown of the scheduler, driven by a simulated clock and device.
// Scheduler state lives in loom types under `--cfg loom`; only tests/loom.rs
// runs there.
#![cfg(not(loom))]
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::*;
use quiver_batching::{DispatchReason, Ended, Poll, SchedulerConfig};

fn prefetching() -> SchedulerConfig {
    SchedulerConfig {
        max_batch_size: 4,
        max_in_flight: 2,
        max_queue_delay: Duration::from_secs(1),
        ..SchedulerConfig::default()
    }
}

#[test]
fn device_idle_dispatches_at_once_and_not_while_busy() {
    let clock = Clock::new();
    let mut s = scheduler(SchedulerConfig::default()); // max_in_flight 1
    let adm = s.admission();
    assert!(matches!(s.poll(clock.us(0)), Poll::Idle));
    adm.admit(simple(1, clock.us(0))).unwrap();
    let first = expect_dispatch(s.poll(clock.us(0)));
    assert_eq!(first.reason, DispatchReason::DeviceIdle);
    assert_eq!(ids(&first), [1]);
    assert_eq!(first.predicted, s.latency_model().predict(1, 1));

    // Busy and no free slot: nothing is dispatched, whatever the clock says.
    adm.admit(simple(2, clock.us(10))).unwrap();
    assert!(matches!(s.poll(clock.us(10)), Poll::Idle));
    assert!(matches!(s.poll(clock.ms(50)), Poll::Idle));
    s.complete(clock.ms(50), first.id, device_time(1, 1));
    let second = expect_dispatch(s.poll(clock.ms(50)));
    assert_eq!(second.reason, DispatchReason::DeviceIdle);
    assert_eq!(ids(&second), [2]);
    assert_eq!(s.stats().batches_for(DispatchReason::DeviceIdle), 2);
}

#[test]
fn budget_full_by_rows_only_when_full() {
    let clock = Clock::new();
    let mut s = scheduler(prefetching());
    let adm = s.admission();
    adm.admit(simple(0, clock.us(0))).unwrap();
    let warm = expect_dispatch(s.poll(clock.us(0)));
    assert_eq!(warm.reason, DispatchReason::DeviceIdle);

    for id in 1..=3 {
        adm.admit(simple(id, clock.us(1))).unwrap();
    }
    // Three of four rows: the device is busy, so the batch keeps forming.
    expect_wait(s.poll(clock.us(2)));
    adm.admit(simple(4, clock.us(3))).unwrap();
    let full = expect_dispatch(s.poll(clock.us(3)));
    assert_eq!(full.reason, DispatchReason::BudgetFull);
    assert_eq!(full.rows, 4);
    assert_eq!(ids(&full), [1, 2, 3, 4]);
}

#[test]
fn budget_full_by_padded_tokens_leaves_the_rest_queued() {
    let clock = Clock::new();
    let config = SchedulerConfig {
        max_batch_tokens: 64,
        ..prefetching()
    };
    let mut s = scheduler(config);
    let adm = s.admission();
    let t0 = clock.us(0);
    // EDF order: 1 (16 tokens) then 2 (40 tokens): 2 rows × 40 = 80 > 64.
    adm.admit(request(1, 0, t0, clock.ms(100), 1, 16)).unwrap();
    adm.admit(request(2, 0, t0, clock.ms(200), 1, 40)).unwrap();
    let first = expect_dispatch(s.poll(t0));
    assert_eq!(first.reason, DispatchReason::BudgetFull);
    assert_eq!(ids(&first), [1]);
    assert_eq!(first.padded_tokens, 16);
    // 2 stays queued; alone it does not fill the budget, so with the device
    // busy it waits.
    expect_wait(s.poll(t0));
    s.complete(t0, first.id, device_time(1, 16));
    let second = expect_dispatch(s.poll(t0));
    assert_eq!(second.reason, DispatchReason::DeviceIdle);
    assert_eq!(ids(&second), [2]);
}

#[test]
fn padded_tokens_are_rows_times_longest_sequence() {
    let clock = Clock::new();
    let mut s = scheduler(SchedulerConfig::default());
    let adm = s.admission();
    let t0 = clock.us(0);
    adm.admit(request(1, 0, t0, clock.ms(100), 2, 10)).unwrap();
    adm.admit(request(2, 0, t0, clock.ms(101), 3, 30)).unwrap();
    let batch = expect_dispatch(s.poll(t0));
    assert_eq!(batch.rows, 5);
    assert_eq!(batch.padded_tokens, 5 * 30);
}

#[test]
fn max_queue_delay_fires_at_expiry_not_before() {
    let clock = Clock::new();
    let config = SchedulerConfig {
        max_queue_delay: Duration::from_millis(2),
        ..prefetching()
    };
    let mut s = scheduler(config);
    let adm = s.admission();
    adm.admit(simple(0, clock.us(0))).unwrap();
    expect_dispatch(s.poll(clock.us(0))); // device now busy, one slot free

    let arrival = clock.us(100);
    adm.admit(simple(1, arrival)).unwrap();
    let expiry = arrival + Duration::from_millis(2);
    assert_eq!(expect_wait(s.poll(clock.us(100))), expiry);
    assert_eq!(
        expect_wait(s.poll(expiry - Duration::from_nanos(1))),
        expiry
    );
    let batch = expect_dispatch(s.poll(expiry));
    assert_eq!(batch.reason, DispatchReason::MaxQueueDelay);
    assert_eq!(ids(&batch), [1]);
}

#[test]
fn deadline_slack_fires_at_the_slack_point_not_before() {
    let clock = Clock::new();
    let mut s = scheduler(prefetching());
    let adm = s.admission();
    adm.admit(simple(0, clock.us(0))).unwrap();
    let warm = expect_dispatch(s.poll(clock.us(0)));
    let busy_until = clock.us(0) + warm.predicted;
    assert_eq!(adm.busy_until(), Some(busy_until));

    let deadline = clock.ms(20);
    adm.admit(request(1, 0, clock.us(50), deadline, 1, 10))
        .unwrap();
    // Waiting pays while one more row (2 rows × 10 tokens) still fits before
    // the deadline.
    let grown = s.latency_model().predict(2, 20);
    let slack_point = deadline - grown;
    assert!(slack_point > busy_until);
    assert_eq!(expect_wait(s.poll(clock.us(50))), slack_point);
    assert_eq!(
        expect_wait(s.poll(slack_point - Duration::from_micros(1))),
        slack_point
    );
    let batch = expect_dispatch(s.poll(slack_point));
    assert_eq!(batch.reason, DispatchReason::DeadlineSlack);
    assert_eq!(ids(&batch), [1]);
}

#[test]
fn deadline_slack_fires_at_once_when_busy_until_leaves_no_room() {
    let clock = Clock::new();
    let mut s = scheduler(prefetching());
    let adm = s.admission();
    // A long batch in flight: 4 rows × 2000 tokens ≈ 8.4 ms on the device.
    adm.admit(request(0, 0, clock.us(0), clock.ms(100), 4, 2000))
        .unwrap();
    let warm = expect_dispatch(s.poll(clock.us(0)));
    assert!(warm.predicted > Duration::from_millis(8));
    // Reachable alone from now (≈ 0.26 ms), but not after the busy device
    // plus one more row.
    adm.admit(request(1, 0, clock.us(10), clock.ms(5), 1, 1))
        .unwrap();
    let batch = expect_dispatch(s.poll(clock.us(10)));
    assert_eq!(batch.reason, DispatchReason::DeadlineSlack);
}

#[test]
fn wait_until_is_the_earlier_of_slack_and_delay() {
    let clock = Clock::new();
    let config = SchedulerConfig {
        max_queue_delay: Duration::from_millis(2),
        ..prefetching()
    };
    let mut s = scheduler(config);
    let adm = s.admission();
    adm.admit(simple(0, clock.us(0))).unwrap();
    expect_dispatch(s.poll(clock.us(0)));
    adm.admit(request(1, 0, clock.us(0), clock.ms(3), 1, 1))
        .unwrap();
    let slack_point = clock.ms(3) - s.latency_model().predict(2, 2);
    let t = expect_wait(s.poll(clock.us(0)));
    assert_eq!(t, slack_point.min(clock.ms(2)));
}

#[test]
fn edf_within_a_lane() {
    let clock = Clock::new();
    let config = SchedulerConfig {
        max_batch_size: 2,
        ..SchedulerConfig::default()
    };
    let mut s = scheduler(config);
    let adm = s.admission();
    let t0 = clock.us(0);
    for (id, deadline_ms) in [(1, 30), (2, 10), (3, 20), (4, 10)] {
        adm.admit(request(id, 0, t0, clock.ms(deadline_ms), 1, 1))
            .unwrap();
    }
    let first = expect_dispatch(s.poll(t0));
    // Equal deadlines keep admission order.
    assert_eq!(ids(&first), [2, 4]);
    s.complete(t0, first.id, device_time(2, 2));
    let second = expect_dispatch(s.poll(t0));
    assert_eq!(ids(&second), [3, 1]);
}

#[test]
fn strict_priority_across_lanes() {
    let clock = Clock::new();
    let config = SchedulerConfig {
        priority_levels: 3,
        ..SchedulerConfig::default()
    };
    let mut s = scheduler(config);
    let adm = s.admission();
    let t0 = clock.us(0);
    // The least urgent lane has the earliest deadline: priority still wins.
    adm.admit(request(1, 2, t0, clock.ms(5), 1, 1)).unwrap();
    adm.admit(request(2, 1, t0, clock.ms(50), 1, 1)).unwrap();
    adm.admit(request(3, 0, t0, clock.ms(90), 1, 1)).unwrap();
    adm.admit(request(4, 1, t0, clock.ms(40), 1, 1)).unwrap();
    let mut order = Vec::new();
    for _ in 0..3 {
        let batch = expect_dispatch(s.poll(t0));
        let prio: Vec<u8> = batch.requests.iter().map(|r| r.priority).collect();
        assert!(
            prio.windows(2).all(|w| w[0] == w[1]),
            "one priority per batch"
        );
        order.push(ids(&batch));
        s.complete(t0, batch.id, device_time(batch.rows, batch.padded_tokens));
    }
    assert_eq!(order, [vec![3], vec![4, 2], vec![1]]);
}

#[test]
fn unreachable_deadline_is_dropped_early_and_never_dispatched() {
    let clock = Clock::new();
    let mut s = scheduler(SchedulerConfig::default());
    let adm = s.admission();
    let t0 = clock.us(0);
    // Alone it needs 200 + 50 + 100 = 350 µs; due in 300 µs.
    adm.admit(request(1, 0, t0, clock.us(300), 1, 100)).unwrap();
    // Needs 251 µs; due in 300 µs: kept.
    adm.admit(request(2, 0, t0, clock.us(301), 1, 1)).unwrap();
    let batch = expect_dispatch(s.poll(t0));
    assert_eq!(ids(&batch), [2]);
    let ended: Vec<_> = s.drain_ended().collect();
    assert!(matches!(ended.as_slice(), [Ended::DeadlineUnreachable(r)] if r.id == 1));
    assert_eq!(s.drain_ended().count(), 0, "reported once");
    assert_eq!(s.stats().deadline_unreachable, 1);
    s.complete(t0, batch.id, device_time(1, 1));
    assert!(matches!(s.poll(t0), Poll::Idle));
    assert!(s.shutdown().is_empty());
}

#[test]
fn reachable_request_becomes_unreachable_as_time_passes() {
    let clock = Clock::new();
    let mut s = scheduler(SchedulerConfig::default());
    let adm = s.admission();
    adm.admit(simple(0, clock.us(0))).unwrap();
    let busy = expect_dispatch(s.poll(clock.us(0)));
    adm.admit(request(1, 0, clock.us(0), clock.ms(1), 1, 1))
        .unwrap();
    assert!(matches!(s.poll(clock.us(100)), Poll::Idle));
    assert_eq!(s.drain_ended().count(), 0);
    // The busy batch overran: by 900 µs, 251 µs of service cannot make 1 ms.
    s.complete(clock.us(900), busy.id, Duration::from_micros(900));
    assert!(matches!(s.poll(clock.us(900)), Poll::Idle));
    let ended: Vec<_> = s.drain_ended().map(Ended::into_request).collect();
    assert_eq!(ended.iter().map(|r| r.id).collect::<Vec<_>>(), [1]);
}

#[test]
fn cancelled_request_is_skipped_and_reported_once() {
    let clock = Clock::new();
    let mut s = scheduler(SchedulerConfig::default());
    let adm = s.admission();
    let t0 = clock.us(0);
    let doomed = simple(1, t0);
    let token = doomed.cancel.clone();
    adm.admit(doomed).unwrap();
    adm.admit(simple(2, t0)).unwrap();
    token.cancel();
    let batch = expect_dispatch(s.poll(t0));
    assert_eq!(ids(&batch), [2]);
    let ended: Vec<_> = s.drain_ended().collect();
    assert!(matches!(ended.as_slice(), [Ended::Cancelled(r)] if r.id == 1));
    assert_eq!(s.drain_ended().count(), 0);
    assert_eq!(s.stats().cancelled, 1);
    assert_eq!(adm.stats().queued, 0);
}

#[test]
fn cancel_after_dispatch_does_not_report() {
    let clock = Clock::new();
    let mut s = scheduler(SchedulerConfig::default());
    let adm = s.admission();
    let req = simple(1, clock.us(0));
    let token = req.cancel.clone();
    adm.admit(req).unwrap();
    let batch = expect_dispatch(s.poll(clock.us(0)));
    token.cancel();
    s.complete(clock.us(300), batch.id, device_time(1, 1));
    assert!(matches!(s.poll(clock.us(300)), Poll::Idle));
    assert_eq!(s.drain_ended().count(), 0);
}

#[test]
fn shutdown_hands_back_everything_queued_and_closes() {
    let clock = Clock::new();
    let mut s = scheduler(SchedulerConfig::default());
    let adm = s.admission();
    let t0 = clock.us(0);
    adm.admit(simple(1, t0)).unwrap();
    let batch = expect_dispatch(s.poll(t0));
    adm.admit(request(2, 1, t0, clock.ms(10), 1, 1)).unwrap();
    adm.admit(request(3, 0, t0, clock.ms(20), 1, 1)).unwrap();
    let back: Vec<u64> = s.shutdown().into_iter().map(|r| r.id).collect();
    assert_eq!(back, [3, 2], "most urgent first");
    let err = adm.admit(simple(4, t0)).unwrap_err();
    assert_eq!(err.reason, quiver_batching::RejectReason::Closed);
    assert_eq!(err.request.id, 4);
    // The in-flight batch still completes.
    s.complete(t0, batch.id, device_time(1, 1));
    assert_eq!(s.in_flight(), 0);
    assert!(matches!(s.poll(t0), Poll::Idle));
}

#[test]
fn completion_feeds_the_model_and_unknown_ids_are_ignored() {
    let clock = Clock::new();
    let mut s = quiver_batching::Scheduler::new(
        SchedulerConfig::default(),
        quiver_batching::LatencyModel::new(),
    );
    let adm = s.admission();
    adm.admit(simple(1, clock.us(0))).unwrap();
    let batch = expect_dispatch(s.poll(clock.us(0)));
    s.complete(clock.us(5), 999, Duration::from_secs(1));
    assert_eq!(s.latency_model().samples(), 0);
    assert_eq!(s.in_flight(), 1);
    s.complete(clock.us(300), batch.id, Duration::from_micros(300));
    s.complete(clock.us(300), batch.id, Duration::from_micros(300));
    assert_eq!(s.latency_model().samples(), 1);
    assert_eq!(s.in_flight(), 0);
    assert_eq!(adm.busy_until(), None);
    let published = adm.coefficients();
    assert_eq!(published, s.latency_model().coefficients());
}

#[test]
fn prefetched_batch_queues_behind_the_running_one() {
    let clock = Clock::new();
    let mut s = scheduler(SchedulerConfig {
        max_batch_size: 1,
        ..prefetching()
    });
    let adm = s.admission();
    let t0 = clock.us(0);
    for id in 0..3 {
        adm.admit(simple(id, t0)).unwrap();
    }
    let a = expect_dispatch(s.poll(t0));
    let b = expect_dispatch(s.poll(t0));
    assert_eq!(b.reason, DispatchReason::BudgetFull);
    assert_eq!(adm.busy_until(), Some(t0 + a.predicted + b.predicted));
    // Two in flight: the third waits for a completion.
    assert!(matches!(s.poll(t0), Poll::Idle));
    assert_eq!(s.stats().in_flight, 2);
    assert_eq!(s.stats().queued, 1);
    s.complete(clock.us(300), a.id, Duration::from_micros(300));
    assert_eq!(adm.busy_until(), Some(clock.us(300) + b.predicted));
    expect_dispatch(s.poll(clock.us(300)));
}
