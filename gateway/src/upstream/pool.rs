//! The upstream pool's state machine: which CPU worker gets the next
//! overflowed request, and which workers are out.
//!
//! Sans-IO, as the scheduler is: every method takes `now`, and the caller
//! performs the requests and health probes and reports their outcomes. The
//! rules (DESIGN.md, "Overflow"):
//!
//! - **Power of two choices over peak-EWMA**: pick two distinct available
//!   endpoints at random, take the one with the lower cost, where cost is the
//!   peak-EWMA latency times (in-flight + 1). Peak-EWMA jumps to a slower
//!   observation at once and decays towards faster ones with time constant
//!   `decay`, so a worker that slows down loses traffic quickly.
//! - **Passive ejection**: `eject_after` consecutive failures eject an
//!   endpoint for a back-off that doubles with each ejection in a row (from
//!   `base_ejection` up to `max_ejection`). When the back-off ends the
//!   endpoint is on probation: it gets one request (or a successful health
//!   probe) at a time; a success restores it, a failure ejects it again for
//!   twice as long.
//! - **Active probes** report into the same machine: a failed probe counts as
//!   a failure, a successful probe of an ejected endpoint whose back-off is
//!   over restores it.
//! - **Retry budget**: retries are allowed while they stay under `ratio` of
//!   recent requests plus `min_per_sec`, as linkerd and Finagle budget them,
//!   so retries cannot multiply load on a failing pool.

use std::time::{Duration, Instant};

/// Knobs of the pool.
#[derive(Clone, Debug)]
pub struct PoolConfig {
    /// Consecutive failures that eject an endpoint. Default 3.
    pub eject_after: u32,
    /// First ejection's length. Default 1 s.
    pub base_ejection: Duration,
    /// Longest ejection. Default 30 s.
    pub max_ejection: Duration,
    /// Peak-EWMA decay time constant. Default 10 s.
    pub decay: Duration,
    /// Latency assumed for an endpoint with no observation yet. Default 5 ms.
    pub default_rtt: Duration,
    /// Retries allowed per request, on average. Default 0.2.
    pub retry_ratio: f64,
    /// Retries allowed per second regardless of traffic. Default 10.
    pub retry_min_per_sec: f64,
    /// Window of the retry budget. Default 10 s.
    pub retry_window: Duration,
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            eject_after: 3,
            base_ejection: Duration::from_secs(1),
            max_ejection: Duration::from_secs(30),
            decay: Duration::from_secs(10),
            default_rtt: Duration::from_millis(5),
            retry_ratio: 0.2,
            retry_min_per_sec: 10.0,
            retry_window: Duration::from_secs(10),
        }
    }
}

/// An endpoint's index in the pool.
pub type EndpointId = usize;

/// Whether an endpoint takes traffic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Health {
    /// Takes traffic.
    Healthy,
    /// Out until `until`; `ejections` in a row so far.
    Ejected { until: Instant, ejections: u32 },
    /// Back-off over: one request at a time decides.
    Probation { ejections: u32, probing: bool },
}

#[derive(Clone, Debug)]
struct PeakEwma {
    value_s: f64,
    at: Option<Instant>,
}

impl PeakEwma {
    fn observe(&mut self, now: Instant, rtt: Duration, decay: Duration) {
        let rtt = rtt.as_secs_f64();
        match self.at {
            None => self.value_s = rtt,
            Some(_) if rtt > self.value_s => self.value_s = rtt,
            Some(at) => {
                let elapsed = now.saturating_duration_since(at).as_secs_f64();
                let w = (-elapsed / decay.as_secs_f64().max(1e-9)).exp();
                self.value_s = self.value_s * w + rtt * (1.0 - w);
            }
        }
        self.at = Some(now);
    }

    /// The estimate read at `now`: it decays towards zero while no answer
    /// comes (as linkerd's peak-EWMA does), so an endpoint that was slow
    /// once and then got no traffic is tried again, and a real answer sets
    /// it straight.
    fn at_time(&self, now: Instant, decay: Duration) -> f64 {
        match self.at {
            None => self.value_s,
            Some(at) => {
                let idle = now.saturating_duration_since(at).as_secs_f64();
                self.value_s * (-idle / decay.as_secs_f64().max(1e-9)).exp()
            }
        }
    }
}

#[derive(Clone, Debug)]
struct Endpoint {
    name: String,
    in_flight: u32,
    ewma: PeakEwma,
    failures: u32,
    health: Health,
    /// Ejections so far, for metrics.
    ejections_total: u64,
}

/// How a request to an upstream ended, for the pool.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// It answered (whatever the answer) after `latency`.
    Success { latency: Duration },
    /// Connect refused, reset, timeout, 5xx: the endpoint failed.
    Failure,
    /// The request was given up by the caller (its deadline passed, say)
    /// without a verdict on the endpoint.
    Abandoned,
}

/// A started request; hand it back to [`Pool::finish`] exactly once.
#[derive(Debug)]
#[must_use = "report the outcome with Pool::finish"]
pub struct Ticket {
    id: EndpointId,
    generation: u64,
    probe: bool,
}

impl Ticket {
    /// The endpoint the request went to.
    pub fn endpoint(&self) -> EndpointId {
        self.id
    }
}

/// The pool of one model's upstream endpoints.
#[derive(Debug)]
pub struct Pool {
    config: PoolConfig,
    endpoints: Vec<Endpoint>,
    /// Bumped when the endpoint list changes, so stale tickets are ignored.
    generation: u64,
    rng: u64,
    budget: RetryBudget,
}

impl Pool {
    /// A pool over `names` (addresses or URLs; only used for display).
    /// `seed` makes the random choices reproducible.
    pub fn new(config: PoolConfig, names: Vec<String>, seed: u64) -> Self {
        let budget = RetryBudget::new(&config);
        let mut pool = Pool {
            config,
            endpoints: Vec::new(),
            generation: 0,
            rng: seed | 1,
            budget,
        };
        pool.set_endpoints(names);
        pool
    }

    /// Replaces the endpoint list (after a DNS re-resolution, say). State of
    /// endpoints that stay is kept; new ones start healthy.
    pub fn set_endpoints(&mut self, names: Vec<String>) {
        let mut old = std::mem::take(&mut self.endpoints);
        self.endpoints = names
            .into_iter()
            .map(|name| match old.iter().position(|e| e.name == name) {
                Some(i) => old.swap_remove(i),
                None => Endpoint {
                    name,
                    in_flight: 0,
                    ewma: PeakEwma {
                        value_s: self.config.default_rtt.as_secs_f64(),
                        at: None,
                    },
                    failures: 0,
                    health: Health::Healthy,
                    ejections_total: 0,
                },
            })
            .collect();
        self.generation += 1;
    }

    /// Number of endpoints, whatever their health.
    pub fn len(&self) -> usize {
        self.endpoints.len()
    }

    /// True when the pool has no endpoint.
    pub fn is_empty(&self) -> bool {
        self.endpoints.is_empty()
    }

    /// An endpoint's display name.
    pub fn name(&self, id: EndpointId) -> Option<&str> {
        self.endpoints.get(id).map(|e| e.name.as_str())
    }

    /// An endpoint's health at `now` (ejections whose back-off is over show
    /// as probation).
    pub fn health(&mut self, id: EndpointId, now: Instant) -> Option<Health> {
        self.refresh(now);
        self.endpoints.get(id).map(|e| e.health)
    }

    /// The id of the endpoint called `name`, if it is in the pool.
    pub fn position(&self, name: &str) -> Option<EndpointId> {
        self.endpoints.iter().position(|e| e.name == name)
    }

    /// How many times an endpoint has been ejected.
    pub fn ejections(&self, id: EndpointId) -> u64 {
        self.endpoints.get(id).map_or(0, |e| e.ejections_total)
    }

    /// Requests in flight to an endpoint.
    pub fn in_flight(&self, id: EndpointId) -> u32 {
        self.endpoints.get(id).map(|e| e.in_flight).unwrap_or(0)
    }

    /// Endpoints that can take a request now.
    pub fn available(&mut self, now: Instant) -> usize {
        self.refresh(now);
        (0..self.endpoints.len())
            .filter(|&i| self.is_available(i))
            .count()
    }

    fn refresh(&mut self, now: Instant) {
        for e in &mut self.endpoints {
            if let Health::Ejected { until, ejections } = e.health
                && now >= until
            {
                e.health = Health::Probation {
                    ejections,
                    probing: false,
                };
            }
        }
    }

    fn is_available(&self, i: EndpointId) -> bool {
        self.endpoints.get(i).is_some_and(|e| match e.health {
            Health::Healthy => true,
            Health::Probation { probing, .. } => !probing,
            Health::Ejected { .. } => false,
        })
    }

    fn cost(&self, i: EndpointId, now: Instant) -> f64 {
        self.endpoints.get(i).map_or(f64::INFINITY, |e| {
            e.ewma.at_time(now, self.config.decay) * f64::from(e.in_flight + 1)
        })
    }

    /// The expected latency of the best available endpoint: its peak-EWMA,
    /// or `None` when none is available.
    pub fn expected_latency(&mut self, now: Instant) -> Option<Duration> {
        self.refresh(now);
        self.endpoints
            .iter()
            .enumerate()
            .filter(|&(i, _)| self.is_available(i))
            .map(|(_, e)| e.ewma.at_time(now, self.config.decay))
            .min_by(f64::total_cmp)
            .map(Duration::from_secs_f64)
    }

    fn next_random(&mut self) -> u64 {
        // xorshift64*: enough for choosing among endpoints, and
        // reproducible from the seed in tests.
        let mut x = self.rng;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.rng = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Picks an endpoint by power of two choices and starts a request on it.
    /// `None` when no endpoint is available.
    pub fn start(&mut self, now: Instant) -> Option<Ticket> {
        self.start_excluding(now, None)
    }

    /// As [`Pool::start`], avoiding `exclude` (the endpoint a retry failed on)
    /// when another is available.
    pub fn start_excluding(&mut self, now: Instant, exclude: Option<EndpointId>) -> Option<Ticket> {
        self.refresh(now);
        let mut candidates: Vec<EndpointId> = (0..self.endpoints.len())
            .filter(|&i| self.is_available(i))
            .collect();
        if candidates.len() > 1
            && let Some(x) = exclude
        {
            candidates.retain(|&i| i != x);
        }
        let id = match *candidates.as_slice() {
            [] => return None,
            [only] => only,
            _ => {
                let n = candidates.len();
                let a = (self.next_random() % n as u64) as usize;
                let mut b = (self.next_random() % (n as u64 - 1)) as usize;
                if b >= a {
                    b += 1;
                }
                // Both below n by construction.
                let (a, b) = (*candidates.get(a)?, *candidates.get(b)?);
                if self.cost(b, now) < self.cost(a, now) {
                    b
                } else {
                    a
                }
            }
        };
        let e = self.endpoints.get_mut(id)?;
        e.in_flight += 1;
        let probe = match &mut e.health {
            Health::Probation { probing, .. } => {
                *probing = true;
                true
            }
            _ => false,
        };
        self.budget.deposit(now);
        Some(Ticket {
            id,
            generation: self.generation,
            probe,
        })
    }

    /// Reports how a started request ended.
    pub fn finish(&mut self, ticket: Ticket, now: Instant, outcome: Outcome) {
        if ticket.generation != self.generation {
            // The endpoint list changed meanwhile; find the endpoint by
            // position no more.
            return;
        }
        let Some(e) = self.endpoints.get_mut(ticket.id) else {
            return;
        };
        e.in_flight = e.in_flight.saturating_sub(1);
        if ticket.probe
            && let Health::Probation { probing, .. } = &mut e.health
        {
            *probing = false;
        }
        match outcome {
            Outcome::Success { latency } => {
                e.ewma.observe(now, latency, self.config.decay);
                e.failures = 0;
                if matches!(e.health, Health::Probation { .. }) {
                    e.health = Health::Healthy;
                }
            }
            Outcome::Failure => self.fail(ticket.id, now),
            Outcome::Abandoned => {}
        }
    }

    /// Reports an active health probe's result.
    pub fn probe(&mut self, id: EndpointId, now: Instant, ready: bool) {
        self.refresh(now);
        let Some(e) = self.endpoints.get_mut(id) else {
            return;
        };
        if ready {
            match e.health {
                Health::Probation { probing: false, .. } => {
                    e.health = Health::Healthy;
                    e.failures = 0;
                }
                Health::Healthy => e.failures = 0,
                _ => {}
            }
        } else {
            self.fail(id, now);
        }
    }

    fn fail(&mut self, id: EndpointId, now: Instant) {
        let config = &self.config;
        let Some(e) = self.endpoints.get_mut(id) else {
            return;
        };
        e.failures += 1;
        let ejections = match e.health {
            Health::Healthy if e.failures >= config.eject_after => 0,
            Health::Probation { ejections, .. } => ejections,
            _ => return,
        };
        let factor = 1u32.checked_shl(ejections).unwrap_or(u32::MAX);
        let backoff = config
            .base_ejection
            .saturating_mul(factor)
            .min(config.max_ejection);
        e.health = Health::Ejected {
            until: now + backoff,
            ejections: ejections + 1,
        };
        e.failures = 0;
        e.ejections_total += 1;
    }

    /// Whether a retry may be sent now; takes one from the budget if so.
    pub fn try_retry(&mut self, now: Instant) -> bool {
        self.budget.withdraw(now)
    }
}

/// Retries allowed: `ratio` of the requests of the last window, plus
/// `min_per_sec` over the window.
#[derive(Clone, Debug)]
struct RetryBudget {
    ratio: f64,
    min_per_sec: f64,
    window: Duration,
    /// (bucket start, requests, retries) per tenth of the window.
    buckets: [(Option<Instant>, u32, u32); 10],
}

impl RetryBudget {
    fn new(config: &PoolConfig) -> Self {
        RetryBudget {
            ratio: config.retry_ratio,
            min_per_sec: config.retry_min_per_sec,
            window: config.retry_window,
            buckets: [(None, 0, 0); 10],
        }
    }

    // `i` comes from `position` or `enumerate` over this same array.
    #[allow(clippy::indexing_slicing)]
    fn bucket(&mut self, now: Instant) -> &mut (Option<Instant>, u32, u32) {
        let slot = self.window / 10;
        let slot = if slot.is_zero() {
            Duration::from_millis(1)
        } else {
            slot
        };
        let window = self.window;
        for b in &mut self.buckets {
            if let Some(start) = b.0
                && now.saturating_duration_since(start) >= window
            {
                *b = (None, 0, 0);
            }
        }
        let current = self
            .buckets
            .iter()
            .position(|b| b.0.is_some_and(|s| now.saturating_duration_since(s) < slot));
        let i = match current {
            Some(i) => i,
            None => {
                let i = self
                    .buckets
                    .iter()
                    .position(|b| b.0.is_none())
                    .unwrap_or_else(|| {
                        // Every slot in use: reuse the oldest.
                        self.buckets
                            .iter()
                            .enumerate()
                            .min_by_key(|(_, b)| b.0)
                            .map(|(i, _)| i)
                            .unwrap_or(0)
                    });
                self.buckets[i] = (Some(now), 0, 0);
                i
            }
        };
        &mut self.buckets[i]
    }

    fn deposit(&mut self, now: Instant) {
        let b = self.bucket(now);
        b.1 = b.1.saturating_add(1);
    }

    fn withdraw(&mut self, now: Instant) -> bool {
        self.bucket(now);
        let (requests, retries) = self.buckets.iter().fold((0u64, 0u64), |(r, t), b| {
            (r + u64::from(b.1), t + u64::from(b.2))
        });
        let allowed = self.ratio * requests as f64 + self.min_per_sec * self.window.as_secs_f64();
        if (retries as f64) < allowed {
            let b = self.bucket(now);
            b.2 = b.2.saturating_add(1);
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
#[path = "pool_tests.rs"]
mod tests;
