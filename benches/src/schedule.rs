//! Arrival processes of the open loop: when each request is *meant* to be
//! sent.
//!
//! The load runner ([`crate::load`]) sends request `i` at `start + offset_i`
//! and measures its latency from that intended instant, not from when the
//! client managed to send it (wrk2's correction for coordinated omission).
//! The offsets are a pure function of the rate, the process and the seed, so
//! a run can be repeated exactly, and two targets compared with `--compare`
//! see the very same arrivals.

use std::time::Duration;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// How inter-arrival gaps are drawn.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Arrival {
    /// Evenly spaced: request `i` at `i / rate`.
    Constant,
    /// A Poisson process: exponential gaps of mean `1 / rate`, as independent
    /// clients produce; bursts happen, as they do in production.
    Poisson,
}

/// Why a schedule cannot be built.
#[derive(Debug, thiserror::Error, PartialEq)]
#[non_exhaustive]
pub enum ScheduleError {
    #[error("the arrival rate must be a positive, finite number of requests per second, got {0}")]
    BadRate(f64),
}

/// An open-loop arrival schedule: a process, a rate and a seed.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Schedule {
    arrival: Arrival,
    rate: f64,
    seed: u64,
}

impl Schedule {
    /// A schedule of `rate` requests per second (> 0, finite).
    pub fn new(arrival: Arrival, rate: f64, seed: u64) -> Result<Self, ScheduleError> {
        if !(rate.is_finite() && rate > 0.0) {
            return Err(ScheduleError::BadRate(rate));
        }
        Ok(Schedule {
            arrival,
            rate,
            seed,
        })
    }

    /// Requests per second.
    pub fn rate(&self) -> f64 {
        self.rate
    }

    /// The arrival process.
    pub fn arrival(&self) -> Arrival {
        self.arrival
    }

    /// The intended send offsets from the step's start, ascending, every one
    /// below `horizon`. The same schedule always yields the same offsets.
    pub fn offsets(&self, horizon: Duration) -> Offsets {
        Offsets {
            arrival: self.arrival,
            rate: self.rate,
            horizon: horizon.as_secs_f64(),
            index: 0,
            poisson_t: 0.0,
            rng: ChaCha8Rng::seed_from_u64(self.seed),
        }
    }
}

/// The iterator of [`Schedule::offsets`].
#[derive(Debug)]
pub struct Offsets {
    arrival: Arrival,
    rate: f64,
    horizon: f64,
    index: u64,
    poisson_t: f64,
    rng: ChaCha8Rng,
}

impl Iterator for Offsets {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        let t = match self.arrival {
            // From the index, not by adding gaps, so no rounding drift.
            Arrival::Constant => self.index as f64 / self.rate,
            Arrival::Poisson => {
                // Inverse CDF of the exponential; 1 - u is in (0, 1], so the
                // logarithm is finite.
                let u: f64 = self.rng.random();
                self.poisson_t += -(1.0 - u).ln() / self.rate;
                self.poisson_t
            }
        };
        if t >= self.horizon {
            return None;
        }
        self.index += 1;
        Some(Duration::from_secs_f64(t))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn constant_arrivals_are_evenly_spaced_and_stop_at_the_horizon() {
        let s = Schedule::new(Arrival::Constant, 4.0, 0).unwrap();
        let got: Vec<_> = s.offsets(Duration::from_secs(1)).collect();
        assert_eq!(
            got,
            vec![
                Duration::ZERO,
                Duration::from_millis(250),
                Duration::from_millis(500),
                Duration::from_millis(750)
            ]
        );
    }

    #[test]
    fn poisson_arrivals_repeat_with_the_seed_and_differ_without_it() {
        let a: Vec<_> = Schedule::new(Arrival::Poisson, 1000.0, 7)
            .unwrap()
            .offsets(Duration::from_secs(1))
            .collect();
        let b: Vec<_> = Schedule::new(Arrival::Poisson, 1000.0, 7)
            .unwrap()
            .offsets(Duration::from_secs(1))
            .collect();
        let c: Vec<_> = Schedule::new(Arrival::Poisson, 1000.0, 8)
            .unwrap()
            .offsets(Duration::from_secs(1))
            .collect();
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert!(a.windows(2).all(|w| w[0] <= w[1]), "offsets ascend");
        assert!(a.iter().all(|&t| t < Duration::from_secs(1)));
    }

    #[test]
    fn poisson_mean_rate_is_close_to_the_asked_rate() {
        // 100 s at 200/s: 20 000 arrivals expected, standard deviation ~141.
        let n = Schedule::new(Arrival::Poisson, 200.0, 42)
            .unwrap()
            .offsets(Duration::from_secs(100))
            .count();
        assert!((19_300..=20_700).contains(&n), "got {n} arrivals");
    }

    #[test]
    fn bad_rates_are_refused() {
        for r in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            assert!(Schedule::new(Arrival::Constant, r, 0).is_err(), "{r}");
        }
    }
}
