//! Admission + dispatch cost per request (DESIGN.md "Scheduling"): 1, 4 and
//! 16 producer threads admit requests into one `Admission` while one device
//! thread polls, dispatches and completes them on a fake device that finishes
//! at once. Each iteration moves `REQUESTS` requests; criterion's throughput
//! (elements/s) gives the per-request figure, and the time per iteration
//! divided by `REQUESTS` is the time per request.
//!
//! `cargo bench -p quiver-bench --bench scheduler` (add `-- --quick` for a
//! short run).

use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use quiver_batching::{CancelToken, Cost, LatencyModel, Poll, Request, Scheduler, SchedulerConfig};

/// Requests per iteration, split evenly among the producers.
const REQUESTS: u64 = 16_384;

/// One run: `producers` threads admit `REQUESTS` requests while this thread
/// dispatches them; returns the time from the start signal to the last
/// dispatch (thread start-up and join are outside it).
fn run(producers: u64) -> Duration {
    let config = SchedulerConfig {
        max_in_flight: 1,
        ..SchedulerConfig::default()
    };
    let mut scheduler: Scheduler<u64> = Scheduler::new(config, LatencyModel::new());
    let admission = scheduler.admission();
    let start = Arc::new(Barrier::new(usize::try_from(producers).unwrap_or(1) + 1));
    let each = REQUESTS / producers;
    let handles: Vec<_> = (0..producers)
        .map(|p| {
            let admission = Arc::clone(&admission);
            let start = Arc::clone(&start);
            thread::spawn(move || {
                start.wait();
                for i in 0..each {
                    let now = Instant::now();
                    let mut req = Request {
                        id: p * each + i,
                        priority: 0,
                        arrival: now,
                        deadline: now + Duration::from_secs(60),
                        cost: Cost { rows: 1, tokens: 1 },
                        cancel: CancelToken::new(),
                        payload: i,
                    };
                    // Full lane: back off and retry, as a front end with a
                    // retrying client would.
                    while let Err(rejected) = admission.admit(req) {
                        req = rejected.request;
                        thread::yield_now();
                    }
                }
            })
        })
        .collect();

    start.wait();
    let began = Instant::now();
    let total = each * producers;
    let mut dispatched = 0u64;
    while dispatched < total {
        let now = Instant::now();
        match scheduler.poll(now) {
            Poll::Dispatch(batch) => {
                dispatched += batch.requests.len() as u64;
                scheduler.complete(now, batch.id, Duration::from_micros(1));
            }
            // The bound only guards against a bug; the doorbell wakes us.
            Poll::WaitUntil(_) | Poll::Idle => {
                admission.doorbell().wait(Some(Duration::from_millis(10)));
            }
        }
    }
    let elapsed = began.elapsed();
    for handle in handles {
        handle.join().expect("producer threads do not panic");
    }
    elapsed
}

fn admit_dispatch(c: &mut Criterion) {
    let mut group = c.benchmark_group("admit_dispatch");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3))
        .throughput(Throughput::Elements(REQUESTS));
    for producers in [1u64, 4, 16] {
        group.bench_function(format!("producers/{producers}"), |b| {
            b.iter_custom(|iters| (0..iters).map(|_| run(producers)).sum());
        });
    }
    group.finish();
}

criterion_group!(benches, admit_dispatch);
criterion_main!(benches);
