//! Shared test fixtures: a simulated clock and a simulated device whose cost
//! function is known, so that tests can compute what the scheduler should do.
#![allow(dead_code, clippy::unwrap_used)]

use std::time::{Duration, Instant};

use quiver_batching::{
    Batch, CancelToken, Cost, LatencyModel, Poll, Request, Sample, Scheduler, SchedulerConfig,
};

/// The simulated device: 200 µs per batch + 50 µs per row + 1 µs per padded
/// token.
pub const FIXED: Duration = Duration::from_micros(200);
pub const PER_ROW: Duration = Duration::from_micros(50);
pub const PER_TOKEN: Duration = Duration::from_micros(1);

pub fn device_time(rows: u32, padded_tokens: u32) -> Duration {
    FIXED + PER_ROW * rows + PER_TOKEN * padded_tokens
}

/// A calibration sweep of the simulated device over several shapes.
pub fn sweep() -> Vec<Sample> {
    let mut out = Vec::new();
    for rows in [1u32, 2, 4, 8, 16, 32] {
        for tokens in [1u32, 16, 64, 256] {
            let padded = rows * tokens;
            out.push(Sample {
                rows,
                padded_tokens: padded,
                measured: device_time(rows, padded),
            });
        }
    }
    out
}

/// A latency model that already knows the simulated device.
pub fn calibrated() -> LatencyModel {
    let mut model = LatencyModel::new();
    model.calibrate(&sweep());
    model
}

/// Simulated time: a base instant plus offsets; nothing ever sleeps.
#[derive(Clone, Copy, Debug)]
pub struct Clock {
    pub base: Instant,
}

impl Clock {
    pub fn new() -> Self {
        Self {
            base: Instant::now(),
        }
    }

    pub fn us(&self, us: u64) -> Instant {
        self.base + Duration::from_micros(us)
    }

    pub fn ms(&self, ms: u64) -> Instant {
        self.base + Duration::from_millis(ms)
    }
}

pub fn request(
    id: u64,
    priority: u8,
    arrival: Instant,
    deadline: Instant,
    rows: u32,
    tokens: u32,
) -> Request<u64> {
    Request {
        id,
        priority,
        arrival,
        deadline,
        cost: Cost { rows, tokens },
        cancel: CancelToken::new(),
        payload: id,
    }
}

/// A one-row, one-token request of priority 0 due in 10 s.
pub fn simple(id: u64, at: Instant) -> Request<u64> {
    request(id, 0, at, at + Duration::from_secs(10), 1, 1)
}

pub fn scheduler(config: SchedulerConfig) -> Scheduler<u64> {
    Scheduler::new(config, calibrated())
}

#[track_caller]
pub fn expect_dispatch(poll: Poll<u64>) -> Batch<u64> {
    match poll {
        Poll::Dispatch(batch) => batch,
        other => panic!("expected a dispatch, got {other:?}"),
    }
}

#[track_caller]
pub fn expect_wait(poll: Poll<u64>) -> Instant {
    match poll {
        Poll::WaitUntil(t) => t,
        other => panic!("expected WaitUntil, got {other:?}"),
    }
}

pub fn ids(batch: &Batch<u64>) -> Vec<u64> {
    batch.requests.iter().map(|r| r.id).collect()
}
