//! The latency model (DESIGN.md "Scheduling"): predicted service time of a
//! batch as `fixed + per_row × rows + per_token × padded_tokens`, seeded by a
//! calibration sweep at start-up and fitted online from measured batches. The
//! scheduler uses it for dispatch decisions and early drop, and publishes its
//! coefficients to [`Admission`](crate::Admission) for admission prediction.
//!
//! The fit is exponentially weighted least squares: sums of `x xᵀ` and `x y`
//! decay by a forgetting factor on every sample, so the model follows a
//! device whose speed drifts (clocks, thermal limits, other tenants). A small
//! ridge term pulls towards the prior and is *not* forgotten, which keeps the
//! 3×3 system solvable when the batches seen so far cannot separate the
//! coefficients (all the same shape, say): where the data says nothing the
//! prior stands, and there is no covariance wind-up as in plain recursive
//! least squares with forgetting.
//!
//! The coefficients are constrained to be non-negative (a bounded least
//! squares: the minimum over θ ≥ 0). Unconstrained, noisy samples (a
//! calibration batch slowed by another tenant, a larger batch that happened to
//! run faster) can tilt the plane so far that a term goes negative: −1952 µs
//! per row was seen at start-up, which predicts that larger batches finish
//! sooner and, clamped at zero, that a large batch costs nothing. A batch can
//! only cost more with more rows or tokens, so the constraint is part of the
//! model, not a patch on it.

use std::time::Duration;

/// Longest service time the model ever predicts; keeps `Instant` arithmetic
/// far from overflow whatever the samples were.
pub const MAX_PREDICTION: Duration = Duration::from_secs(3600);

/// Default forgetting factor per sample: the weight of a sample halves after
/// about 69 further samples.
pub const DEFAULT_FORGETTING: f64 = 0.99;

/// Ridge weight towards the prior, in units of "samples": small against the
/// roughly 100 effective samples of the default forgetting factor.
const RIDGE: f64 = 1e-2;

/// Tokens are fitted per thousand so that the three features have similar
/// magnitudes (1, tens of rows, units of thousands of tokens).
const TOKEN_SCALE: f64 = 1e-3;

/// The coefficients of the linear service-time model, in seconds.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Coefficients {
    /// Seconds per batch whatever its size (launch, transfer set-up).
    pub fixed_s: f64,
    /// Seconds per batch row.
    pub per_row_s: f64,
    /// Seconds per padded token.
    pub per_token_s: f64,
}

impl Coefficients {
    /// The prior before any sample: 1 ms per batch, nothing per row or token.
    pub const PRIOR: Self = Self {
        fixed_s: 1e-3,
        per_row_s: 0.0,
        per_token_s: 0.0,
    };

    /// Service time these coefficients predict for `batches` batches holding
    /// `rows` rows and `padded_tokens` padded tokens in all; clamped to
    /// `0..=MAX_PREDICTION` (a non-finite value counts as the maximum).
    pub fn service_time(&self, batches: f64, rows: f64, padded_tokens: f64) -> Duration {
        let seconds =
            self.fixed_s * batches + self.per_row_s * rows + self.per_token_s * padded_tokens;
        clamp_seconds(seconds)
    }

    fn to_scaled(self) -> [f64; 3] {
        [
            self.fixed_s * 1e6,
            self.per_row_s * 1e6,
            self.per_token_s * 1e6 / TOKEN_SCALE,
        ]
    }

    fn from_scaled(theta: [f64; 3]) -> Self {
        Self {
            fixed_s: theta[0] * 1e-6,
            per_row_s: theta[1] * 1e-6,
            per_token_s: theta[2] * 1e-6 * TOKEN_SCALE,
        }
    }
}

/// Converts seconds to a `Duration` in `0..=MAX_PREDICTION`; NaN and +∞ map to
/// the maximum, negatives to zero.
pub(crate) fn clamp_seconds(seconds: f64) -> Duration {
    if seconds.is_nan() {
        return MAX_PREDICTION;
    }
    if seconds <= 0.0 {
        return Duration::ZERO;
    }
    Duration::try_from_secs_f64(seconds).map_or(MAX_PREDICTION, |d| d.min(MAX_PREDICTION))
}

/// One measured batch, as from a calibration sweep.
#[derive(Clone, Copy, Debug)]
pub struct Sample {
    /// Rows in the batch.
    pub rows: u32,
    /// Padded tokens in the batch.
    pub padded_tokens: u32,
    /// Measured service time.
    pub measured: Duration,
}

/// Online model of a device's batch service time.
///
/// Before any sample it predicts [`Coefficients::PRIOR`] (1 ms per batch).
/// Predictions are never negative and never above [`MAX_PREDICTION`].
#[derive(Clone, Debug)]
pub struct LatencyModel {
    /// Decayed sum of `x xᵀ`, features `[1, rows, padded_tokens × 1e-3]`.
    xx: [[f64; 3]; 3],
    /// Decayed sum of `x y`, `y` in microseconds.
    xy: [f64; 3],
    /// Current fit, in microseconds per feature unit.
    theta: [f64; 3],
    prior: [f64; 3],
    forgetting: f64,
    samples: u64,
}

impl Default for LatencyModel {
    fn default() -> Self {
        Self::new()
    }
}

impl LatencyModel {
    /// A model at [`Coefficients::PRIOR`] with [`DEFAULT_FORGETTING`].
    pub fn new() -> Self {
        Self::with_prior(Coefficients::PRIOR)
    }

    /// A model that predicts `prior` until samples say otherwise.
    /// Non-finite prior coefficients are replaced by those of
    /// [`Coefficients::PRIOR`].
    pub fn with_prior(prior: Coefficients) -> Self {
        let mut theta = prior.to_scaled();
        let fallback = Coefficients::PRIOR.to_scaled();
        for (t, f) in theta.iter_mut().zip(fallback) {
            if !t.is_finite() {
                *t = f;
            }
        }
        Self {
            xx: [[0.0; 3]; 3],
            xy: [0.0; 3],
            theta,
            prior: theta,
            forgetting: DEFAULT_FORGETTING,
            samples: 0,
        }
    }

    /// Sets the per-sample forgetting factor, clamped to `0.5..=1.0`
    /// (1.0 = never forget; NaN keeps the default).
    pub fn with_forgetting(mut self, forgetting: f64) -> Self {
        if !forgetting.is_nan() {
            self.forgetting = forgetting.clamp(0.5, 1.0);
        }
        self
    }

    /// Seeds the model from a calibration sweep: each sample is observed in
    /// order, as by [`observe`](Self::observe). A sweep over several batch
    /// shapes (rows and sequence lengths) lets the fit separate the three
    /// coefficients from the start.
    pub fn calibrate(&mut self, samples: &[Sample]) {
        for s in samples {
            self.observe(s.rows, s.padded_tokens, s.measured);
        }
    }

    /// Feeds one measured batch into the fit.
    pub fn observe(&mut self, rows: u32, padded_tokens: u32, measured: Duration) {
        let x = features(rows, padded_tokens);
        let y = measured.as_secs_f64() * 1e6;
        let lambda = self.forgetting;
        for (i, xi) in x.iter().enumerate() {
            for (j, xj) in x.iter().enumerate() {
                self.xx[i][j] = lambda * self.xx[i][j] + xi * xj;
            }
            self.xy[i] = lambda * self.xy[i] + xi * y;
        }
        self.samples = self.samples.saturating_add(1);
        let (a, b) = self.normal_equations();
        // With the ridge the matrix is positive definite; a failed solve
        // (only possible with absurd inputs) keeps the previous fit.
        if let Some(theta) = solve_non_negative(a, b) {
            self.theta = theta;
        }
    }

    /// The fit's normal equations `a θ = b`: the decayed sums plus the ridge
    /// towards the prior.
    fn normal_equations(&self) -> ([[f64; 3]; 3], [f64; 3]) {
        let mut a = self.xx;
        let mut b = self.xy;
        for i in 0..3 {
            a[i][i] += RIDGE;
            b[i] += RIDGE * self.prior[i];
        }
        (a, b)
    }

    /// Predicted service time of a batch of `rows` rows and `padded_tokens`
    /// padded tokens, in `0..=MAX_PREDICTION`.
    pub fn predict(&self, rows: u32, padded_tokens: u32) -> Duration {
        let x = features(rows, padded_tokens);
        let us: f64 = x.iter().zip(self.theta).map(|(x, t)| x * t).sum();
        clamp_seconds(us * 1e-6)
    }

    /// The current fit.
    pub fn coefficients(&self) -> Coefficients {
        Coefficients::from_scaled(self.theta)
    }

    /// Samples observed so far (calibration included).
    pub fn samples(&self) -> u64 {
        self.samples
    }
}

fn features(rows: u32, padded_tokens: u32) -> [f64; 3] {
    [1.0, f64::from(rows), f64::from(padded_tokens) * TOKEN_SCALE]
}

/// The minimiser of `½ θᵀ a θ − bᵀ θ` over `θ ≥ 0` (every component), for a
/// positive definite `a`: the least-squares fit with non-negative
/// coefficients. The problem is strictly convex, so its one minimiser is the
/// unconstrained solution on some set of free coordinates with the others at
/// zero; with three coordinates all eight sets are tried and the feasible
/// candidate of least objective is the minimiser. `None` only if no candidate
/// but zero could be solved and zero is not finite (never, for finite input).
fn solve_non_negative(a: [[f64; 3]; 3], b: [f64; 3]) -> Option<[f64; 3]> {
    let objective = |t: &[f64; 3]| {
        let mut f = 0.0;
        for i in 0..3 {
            f -= b[i] * t[i];
            for j in 0..3 {
                f += 0.5 * t[i] * a[i][j] * t[j];
            }
        }
        f
    };
    let mut best: Option<([f64; 3], f64)> = None;
    for free in 0u8..8 {
        let is_free = |i: usize| free & (1 << i) != 0;
        // The system restricted to the free coordinates: a fixed one's row
        // and column are replaced by the identity, its right side by zero.
        let mut sub_a = a;
        let mut sub_b = b;
        for i in 0..3 {
            if !is_free(i) {
                sub_a[i] = [0.0; 3];
                for row in &mut sub_a {
                    row[i] = 0.0;
                }
                sub_a[i][i] = 1.0;
                sub_b[i] = 0.0;
            }
        }
        let Some(theta) = solve3(sub_a, sub_b) else {
            continue;
        };
        if theta.iter().any(|&t| t < 0.0) {
            continue;
        }
        let f = objective(&theta);
        if f.is_finite() && best.is_none_or(|(_, g)| f < g) {
            best = Some((theta, f));
        }
    }
    best.map(|(theta, _)| theta)
}

/// Solves `a θ = b` by Gaussian elimination with partial pivoting; `None` if
/// the matrix is (numerically) singular or the result is not finite.
fn solve3(mut a: [[f64; 3]; 3], mut b: [f64; 3]) -> Option<[f64; 3]> {
    for col in 0..3 {
        let pivot = (col..3).max_by(|&i, &j| a[i][col].abs().total_cmp(&a[j][col].abs()))?;
        if a[pivot][col].abs() < 1e-12 {
            return None;
        }
        a.swap(col, pivot);
        b.swap(col, pivot);
        for row in col + 1..3 {
            let factor = a[row][col] / a[col][col];
            let pivot_row = a[col];
            for (target, source) in a[row].iter_mut().zip(pivot_row).skip(col) {
                *target -= factor * source;
            }
            b[row] -= factor * b[col];
        }
    }
    let mut theta = [0.0; 3];
    for row in (0..3).rev() {
        let tail: f64 = (row + 1..3).map(|k| a[row][k] * theta[k]).sum();
        theta[row] = (b[row] - tail) / a[row][row];
    }
    theta.iter().all(|t| t.is_finite()).then_some(theta)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The bounded fit against the plain one on data whose plain fit has a
    /// negative slope: the plain solve goes negative, the bounded one does not,
    /// and where the plain fit is already non-negative both agree.
    #[test]
    fn bounded_fit_differs_from_the_plain_one_only_where_a_term_went_negative() {
        let mut model = LatencyModel::new().with_forgetting(1.0);
        for (rows, us) in [(1u32, 10_000u64), (4, 8_000), (16, 4_000), (32, 1_000)] {
            model.observe(rows, rows * 16, Duration::from_micros(us));
        }
        let (a, b) = model.normal_equations();
        let plain = solve3(a, b).expect("a positive definite system");
        assert!(plain.iter().any(|&t| t < 0.0), "plain fit {plain:?}");
        assert!(model.theta.iter().all(|&t| t >= 0.0), "{:?}", model.theta);

        let mut clean = LatencyModel::new().with_forgetting(1.0);
        for (rows, tokens) in [(1u32, 16u32), (4, 64), (16, 256), (32, 512), (8, 1024)] {
            let us = 500 + 20 * u64::from(rows) + u64::from(tokens);
            clean.observe(rows, tokens, Duration::from_micros(us));
        }
        let (a, b) = clean.normal_equations();
        let plain = solve3(a, b).expect("a positive definite system");
        for (p, t) in plain.iter().zip(clean.theta) {
            assert!(
                (p - t).abs() < 1e-9 * p.abs().max(1.0),
                "{plain:?} vs {:?}",
                clean.theta
            );
        }
    }
}
