//! The latency model against the simulated device's known cost function.
// Scheduler state lives in loom types under `--cfg loom`; only tests/loom.rs
// runs there.
#![cfg(not(loom))]
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::*;
use quiver_batching::{Coefficients, LatencyModel};

#[track_caller]
fn assert_close(actual: f64, expected: f64, rel: f64) {
    let err = (actual - expected).abs() / expected.abs();
    assert!(
        err <= rel,
        "{actual} vs {expected}: {:.2}% off",
        err * 100.0
    );
}

#[track_caller]
fn assert_matches_device(c: Coefficients, rel: f64) {
    assert_close(c.fixed_s, FIXED.as_secs_f64(), rel);
    assert_close(c.per_row_s, PER_ROW.as_secs_f64(), rel);
    assert_close(c.per_token_s, PER_TOKEN.as_secs_f64(), rel);
}

/// Deterministic batch shapes (a small LCG; no dependency on `rand`).
fn shapes(n: usize) -> impl Iterator<Item = (u32, u32)> {
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    std::iter::repeat_with(move || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let rows = 1 + ((state >> 33) % 32) as u32;
        let tokens = 1 + ((state >> 45) % 512) as u32;
        (rows, rows * tokens)
    })
    .take(n)
}

#[test]
fn prior_before_any_sample() {
    let model = LatencyModel::new();
    assert_eq!(model.samples(), 0);
    assert_eq!(model.coefficients(), Coefficients::PRIOR);
    assert_eq!(model.predict(1, 1), Duration::from_millis(1));
    assert_eq!(model.predict(32, 16384), Duration::from_millis(1));
}

#[test]
fn online_fit_converges_to_the_device() {
    let mut model = LatencyModel::new();
    for (rows, padded) in shapes(300) {
        model.observe(rows, padded, device_time(rows, padded));
    }
    assert_eq!(model.samples(), 300);
    assert_matches_device(model.coefficients(), 0.02);
    let predicted = model.predict(16, 16 * 100).as_secs_f64();
    assert_close(predicted, device_time(16, 1600).as_secs_f64(), 0.01);
}

#[test]
fn online_fit_converges_under_noise() {
    let mut model = LatencyModel::new();
    // ±5% deterministic jitter.
    for (i, (rows, padded)) in shapes(2000).enumerate() {
        let jitter = 1.0 + 0.05 * (((i * 7919) % 21) as f64 - 10.0) / 10.0;
        model.observe(rows, padded, device_time(rows, padded).mul_f64(jitter));
    }
    // The small fixed term is poorly determined under noise scaled to the
    // whole batch; predictions are what must hold.
    assert_close(
        model.coefficients().per_token_s,
        PER_TOKEN.as_secs_f64(),
        0.03,
    );
    for (rows, padded) in [(1, 1), (4, 400), (16, 1600), (32, 16384)] {
        let predicted = model.predict(rows, padded).as_secs_f64();
        assert_close(predicted, device_time(rows, padded).as_secs_f64(), 0.05);
    }
}

#[test]
fn calibrate_seeds_the_model() {
    let mut model = LatencyModel::new();
    let sweep = sweep();
    model.calibrate(&sweep);
    assert_eq!(model.samples(), sweep.len() as u64);
    assert_matches_device(model.coefficients(), 0.02);
}

#[test]
fn follows_a_device_that_slows_down() {
    let mut model = calibrated();
    for (rows, padded) in shapes(1000) {
        model.observe(rows, padded, device_time(rows, padded) * 2);
    }
    let c = model.coefficients();
    assert_close(c.fixed_s, 2.0 * FIXED.as_secs_f64(), 0.02);
    assert_close(c.per_token_s, 2.0 * PER_TOKEN.as_secs_f64(), 0.02);
}

#[test]
fn one_shape_only_stays_accurate_for_that_shape() {
    // Rows and tokens never vary: the coefficients cannot be separated, but
    // the fit must stay finite and right where it has data.
    let mut model = LatencyModel::new();
    for _ in 0..20_000 {
        model.observe(1, 1, device_time(1, 1));
    }
    let c = model.coefficients();
    assert!(c.fixed_s.is_finite() && c.per_row_s.is_finite() && c.per_token_s.is_finite());
    assert_close(
        model.predict(1, 1).as_secs_f64(),
        device_time(1, 1).as_secs_f64(),
        0.01,
    );
}

#[test]
fn predictions_are_never_negative() {
    let mut model = LatencyModel::new();
    // Bigger batches measured faster: a negative slope.
    for i in 1..=32u32 {
        model.observe(i, i * 100, Duration::from_micros(u64::from(4000 - 100 * i)));
    }
    // The fit keeps every term non-negative (a bounded least squares), so a
    // huge batch is never predicted to cost less than a small one, let alone
    // nothing (an unconstrained fit went negative here and clamped to zero).
    let c = model.coefficients();
    assert!(
        c.fixed_s >= 0.0 && c.per_row_s >= 0.0 && c.per_token_s >= 0.0,
        "{c:?}"
    );
    assert!(model.predict(1, 100) > Duration::ZERO);
    assert!(model.predict(u32::MAX, u32::MAX) >= model.predict(1, 100));
}

#[test]
fn predictions_are_capped() {
    let mut model = LatencyModel::new();
    model.calibrate(&sweep());
    assert!(model.predict(u32::MAX, u32::MAX) <= quiver_batching::MAX_PREDICTION);
    let absurd = LatencyModel::with_prior(Coefficients {
        fixed_s: f64::NAN,
        per_row_s: 1e300,
        per_token_s: f64::INFINITY,
    });
    assert_eq!(absurd.predict(1, 1), quiver_batching::MAX_PREDICTION);
}

/// A start-up sweep like the gateway's (1 to 32 rows, three repetitions) on a
/// device shared with a noisy neighbour that slowed the small batches down: the
/// measured time falls as the batch grows. The fit must still charge every row
/// and token something non-negative, so a larger batch is never predicted to
/// finish sooner than a smaller one.
#[test]
fn noisy_calibration_keeps_every_term_non_negative() {
    let mut samples = Vec::new();
    for rep in 0..3u64 {
        for (i, rows) in [1u32, 2, 4, 8, 16, 32].into_iter().enumerate() {
            let slowdown = 12_000 - 2_000 * i as u64 + 500 * rep;
            samples.push(quiver_batching::Sample {
                rows,
                padded_tokens: rows * 16,
                measured: Duration::from_micros(slowdown),
            });
        }
    }
    let mut model = LatencyModel::new();
    model.calibrate(&samples);
    let c = model.coefficients();
    assert!(
        c.fixed_s >= 0.0 && c.per_row_s >= 0.0 && c.per_token_s >= 0.0,
        "{c:?}"
    );
    // The fit still explains the data: a batch costs about the samples' mean,
    // not zero and not the prior.
    let p = model.predict(8, 128).as_secs_f64();
    assert!((0.004..0.012).contains(&p), "predicted {p} s");
    for rows in 1..64 {
        assert!(model.predict(rows + 1, (rows + 1) * 16) >= model.predict(rows, rows * 16));
    }
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig { cases: 512, ..Default::default() })]

    /// Whatever the samples (any shapes, any times, in any order), every
    /// coefficient is non-negative and predictions never fall as a batch grows.
    #[test]
    fn any_samples_give_non_negative_monotone_predictions(
        samples in proptest::collection::vec((1u32..=64, 1u32..=512, 0u64..=200_000), 1..40),
    ) {
        let mut model = LatencyModel::new();
        for &(rows, tokens, us) in &samples {
            model.observe(rows, rows * tokens, Duration::from_micros(us));
        }
        let c = model.coefficients();
        proptest::prop_assert!(c.fixed_s >= 0.0 && c.per_row_s >= 0.0 && c.per_token_s >= 0.0, "{:?}", c);
        for (rows, padded) in [(1u32, 1u32), (1, 512), (8, 128), (32, 8192), (64, 32768)] {
            proptest::prop_assert!(model.predict(rows + 1, padded) >= model.predict(rows, padded));
            proptest::prop_assert!(model.predict(rows, padded + 64) >= model.predict(rows, padded));
        }
    }
}
