//! Length grouping (`SchedulerConfig::length_grouping`), driven by a simulated
//! clock and device: batches of similar lengths form when they pay, a request
//! with a tight deadline is not held back, a long request among a stream of
//! short ones is not starved, and on a fixed mixed trace padded tokens per
//! real token fall against the plain earliest-deadline-first formation.
// Scheduler state lives in loom types under `--cfg loom`; only tests/loom.rs
// runs there.
#![cfg(not(loom))]
#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::*;
use quiver_batching::{Batch, LengthGrouping, Poll, Scheduler, SchedulerConfig};

fn config(grouping: Option<LengthGrouping>) -> SchedulerConfig {
    SchedulerConfig {
        max_batch_size: 32,
        max_batch_tokens: 16384,
        max_in_flight: 1,
        length_grouping: grouping,
        ..SchedulerConfig::default()
    }
}

fn on() -> Option<LengthGrouping> {
    Some(LengthGrouping::default())
}

fn longest_over_shortest(batch: &Batch<u64>) -> f64 {
    let tokens = batch.requests.iter().map(|r| r.cost.tokens);
    let max = tokens.clone().max().unwrap();
    let min = tokens.min().unwrap();
    f64::from(max) / f64::from(min)
}

/// Sixteen requests alternating 8 and 200 tokens, deadlines in arrival
/// order: the plain batch mixes them (16 rows × 200 padded), the grouped one
/// takes the eight short ones, then the eight long ones.
#[test]
fn mixed_lengths_group_by_length() {
    let clock = Clock::new();
    let t0 = clock.us(0);
    let admit_trace = |s: &Scheduler<u64>| {
        for id in 0..16u64 {
            let tokens = if id % 2 == 0 { 8 } else { 200 };
            let deadline = clock.ms(100) + Duration::from_micros(id);
            s.admission()
                .admit(request(id, 0, t0, deadline, 1, tokens))
                .unwrap();
        }
    };

    let mut plain = scheduler(config(None));
    admit_trace(&plain);
    let batch = expect_dispatch(plain.poll(t0));
    assert_eq!(batch.rows, 16);
    assert_eq!(batch.padded_tokens, 16 * 200);

    let mut s = scheduler(config(on()));
    admit_trace(&s);
    let first = expect_dispatch(s.poll(t0));
    assert_eq!(ids(&first), [0, 2, 4, 6, 8, 10, 12, 14]);
    assert_eq!(first.padded_tokens, 8 * 8);
    // Deadline order within the batch, as always.
    assert!(
        first
            .requests
            .windows(2)
            .all(|w| w[0].deadline <= w[1].deadline)
    );
    let done = t0 + device_time(first.rows, first.padded_tokens);
    s.complete(done, first.id, device_time(first.rows, first.padded_tokens));
    let second = expect_dispatch(s.poll(done));
    assert_eq!(ids(&second), [1, 3, 5, 7, 9, 11, 13, 15]);
    assert_eq!(second.padded_tokens, 8 * 200);
    assert_eq!(s.stats().grouped_batches, 1);
    assert_eq!(s.stats().passed_over, 8);
    // 64 + 1600 padded tokens against 3200, and less device time in all.
    let grouped_time = device_time(8, 64) + device_time(8, 1600);
    assert!(grouped_time < device_time(16, 3200));
}

/// Grouping only where the latency model says it pays: a device whose cost
/// is all per batch gains nothing from cutting padding, and gets the plain
/// batch.
#[test]
fn grouping_turns_itself_off_where_padding_costs_nothing() {
    let clock = Clock::new();
    let t0 = clock.us(0);
    let mut model = quiver_batching::LatencyModel::new();
    model.calibrate(
        &[1u32, 4, 16, 32]
            .iter()
            .flat_map(|&rows| {
                [1u32, 64, 256].map(|tokens| quiver_batching::Sample {
                    rows,
                    padded_tokens: rows * tokens,
                    measured: Duration::from_millis(2),
                })
            })
            .collect::<Vec<_>>(),
    );
    let mut s = Scheduler::new(config(on()), model);
    for id in 0..8u64 {
        let tokens = if id % 2 == 0 { 8 } else { 200 };
        s.admission()
            .admit(request(id, 0, t0, clock.ms(100), 1, tokens))
            .unwrap();
    }
    let batch = expect_dispatch(s.poll(t0));
    assert_eq!(batch.rows, 8);
    assert_eq!(s.stats().grouped_batches, 0);
}

/// The anchor is long; the plain batch (four rows) would take a short
/// request whose deadline it meets, while the grouped batch would pass over
/// it for a fourth long one and run it only after: too late. The short one
/// goes in the first batch. With a loose deadline the same short request is
/// passed over, which shows that its deadline is what kept it in.
#[test]
fn a_short_request_with_a_tight_deadline_is_not_held_back() {
    let run = |short_deadline: Instant, clock: Clock| {
        let mut s = scheduler(SchedulerConfig {
            max_batch_size: 4,
            ..config(on())
        });
        let t0 = clock.us(0);
        let adm = s.admission();
        // Plain: long 0, short 1, long 2, long 3: 4 rows × 200 ≈ 1200 µs.
        // Grouped: longs 0, 2, 3, 4 (≈ 1200 µs), then short 1 (≈ 258 µs).
        adm.admit(request(0, 0, t0, clock.us(1250), 1, 200))
            .unwrap();
        adm.admit(request(1, 0, t0, short_deadline, 1, 8)).unwrap();
        for id in 2..=4 {
            adm.admit(request(id, 0, t0, clock.ms(10), 1, 200)).unwrap();
        }
        let batch = expect_dispatch(s.poll(t0));
        (ids(&batch), batch.padded_tokens, s.stats().grouped_batches)
    };
    let clock = Clock::new();
    let (tight, padded, grouped) = run(clock.us(1300), clock);
    assert_eq!(tight, [0, 1, 2, 3]);
    assert_eq!(grouped, 0);
    // The short request's batch ends within its deadline.
    assert!(device_time(4, padded) <= Duration::from_micros(1300));

    let (loose, _, grouped) = run(clock.ms(5), clock);
    assert_eq!(loose, [0, 2, 3, 4]);
    assert_eq!(grouped, 1);
}

/// What one run of a simulated device did to a request of interest.
struct Served {
    /// Batches dispatched after its admission and before the one that took
    /// it.
    batches_before: usize,
    /// When its batch ended on the simulated device, from the start.
    done: Duration,
}

/// A stream of short requests (8 tokens, due in 5 ms each), one every
/// 100 µs for 80 ms, on a device that runs one batch at a time (about five
/// short requests a batch); at 10 ms one long request (200 tokens, due in
/// 40 ms) joins. Every short request is more urgent than the long one until
/// near its deadline, so it is not the anchor while the stream lasts.
fn long_among_short(grouping: Option<LengthGrouping>) -> (Served, u64) {
    const LONG_AT_US: u64 = 10_000;
    let clock = Clock::new();
    let mut s = scheduler(config(grouping));
    let adm = s.admission();
    let mut next_id = 1u64;
    let mut next_arrival_us = 0u64;
    let mut now_us = 0u64;
    let mut batches_since_long = None;
    let mut served = None;
    while now_us < 80_000 {
        // Admit every request that arrived by now.
        while next_arrival_us <= now_us {
            let at = clock.us(next_arrival_us);
            if next_arrival_us == LONG_AT_US {
                adm.admit(request(0, 0, at, at + Duration::from_millis(40), 1, 200))
                    .unwrap();
                batches_since_long = Some(0);
            }
            adm.admit(request(next_id, 0, at, at + Duration::from_millis(5), 1, 8))
                .unwrap();
            next_id += 1;
            next_arrival_us += 100;
        }
        match s.poll(clock.us(now_us)) {
            Poll::Dispatch(batch) => {
                let took = device_time(batch.rows, batch.padded_tokens);
                let done = Duration::from_micros(now_us) + took;
                if batch.requests.iter().any(|r| r.id == 0) {
                    served = Some(Served {
                        batches_before: batches_since_long.unwrap(),
                        done,
                    });
                }
                batches_since_long = batches_since_long.map(|n| n + 1);
                now_us += u64::try_from(took.as_micros()).unwrap();
                s.complete(clock.us(now_us), batch.id, took);
            }
            Poll::WaitUntil(_) | Poll::Idle => now_us = next_arrival_us,
        }
        let _ = s.drain_ended().count();
    }
    (
        served.expect("the long request was dispatched"),
        s.stats().deadline_unreachable,
    )
}

#[test]
fn a_long_request_among_short_ones_is_not_starved() {
    // The skip bound: passed over `max_skips` times at most, then taken.
    let bound = LengthGrouping::default().max_skips as usize;
    let (served, unreachable) = long_among_short(on());
    assert!(
        served.batches_before <= bound,
        "{} batches",
        served.batches_before
    );
    assert_eq!(unreachable, 0);

    // Without the skip bound it is passed over for longer, and its deadline
    // still gets it served in time.
    let unbounded = Some(LengthGrouping {
        max_skips: u32::MAX,
        ..LengthGrouping::default()
    });
    let (served, unreachable) = long_among_short(unbounded);
    assert!(
        served.batches_before > bound,
        "{} batches",
        served.batches_before
    );
    // Admitted at 10 ms, due at 50 ms.
    assert!(
        served.done <= Duration::from_millis(50),
        "done at {:?}, after its deadline",
        served.done
    );
    assert_eq!(unreachable, 0);
}

/// A fixed mixed trace: 600 one-row requests of 8 to 256 tokens (a seeded
/// generator), arriving every 150 µs with 1 s deadlines, on a device that runs
/// one batch at a time. Grouping must serve all of them as plain formation
/// does, with fewer padded tokens per real token and less device time.
#[test]
fn padded_per_real_tokens_fall_on_a_fixed_mixed_trace() {
    #[derive(Default, Debug)]
    struct Totals {
        padded: u64,
        real: u64,
        busy: Duration,
        dispatched: usize,
    }
    let run = |grouping: Option<LengthGrouping>| {
        let clock = Clock::new();
        let mut s = scheduler(config(grouping));
        let adm = s.admission();
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        let mut lengths = Vec::new();
        for _ in 0..600 {
            // xorshift64: a fixed, dependency-free trace.
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            lengths.push(8 + u32::try_from(state % 249).unwrap());
        }
        let mut totals = Totals::default();
        let mut grouped_before = 0;
        let mut next = 0usize;
        let mut now_us = 0u64;
        while totals.dispatched < lengths.len() {
            while next < lengths.len() && next as u64 * 150 <= now_us {
                let at = clock.us(next as u64 * 150);
                adm.admit(request(
                    next as u64,
                    0,
                    at,
                    at + Duration::from_secs(1),
                    1,
                    lengths[next],
                ))
                .unwrap();
                next += 1;
            }
            match s.poll(clock.us(now_us)) {
                Poll::Dispatch(batch) => {
                    let took = device_time(batch.rows, batch.padded_tokens);
                    let grouped_now = s.stats().grouped_batches;
                    if grouped_now > grouped_before {
                        // A grouped batch keeps its lengths within the ratio.
                        assert!(longest_over_shortest(&batch) <= 2.0);
                    }
                    grouped_before = grouped_now;
                    totals.padded += u64::from(batch.padded_tokens);
                    totals.real += batch
                        .requests
                        .iter()
                        .map(|r| u64::from(r.cost.tokens))
                        .sum::<u64>();
                    totals.busy += took;
                    totals.dispatched += batch.requests.len();
                    now_us += u64::try_from(took.as_micros()).unwrap();
                    s.complete(clock.us(now_us), batch.id, took);
                }
                Poll::WaitUntil(_) | Poll::Idle => now_us = next as u64 * 150,
            }
            assert_eq!(s.drain_ended().count(), 0, "a request ended unserved");
        }
        (totals, s.stats().grouped_batches)
    };
    let (plain, none) = run(None);
    let (grouped, batches) = run(on());
    assert_eq!(none, 0);
    assert!(batches > 0);
    assert_eq!(plain.dispatched, grouped.dispatched);
    let ratio = |t: &Totals| t.padded as f64 / t.real as f64;
    assert!(
        ratio(&grouped) < 0.8 * ratio(&plain),
        "padded/real {:.3} grouped vs {:.3} plain",
        ratio(&grouped),
        ratio(&plain)
    );
    assert!(
        grouped.busy < plain.busy,
        "{:?} vs {:?}",
        grouped.busy,
        plain.busy
    );
}
