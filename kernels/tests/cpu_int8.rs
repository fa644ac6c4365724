//! The int8 linear layer (`quiver_kernels::cpu::QuantizedLinear`) and its quantizers: every
//! int8 kernel this CPU has against the scalar reference, bit for bit (the integer sums and
//! the dequantized f32 outputs), on awkward shapes (one row, odd depths and widths, depths
//! that are not a multiple of the vector width), in pools of 1 and 3 threads; the scalar
//! reference itself against a plain i64 product of the quantized values; the quantizers'
//! round-trip bounds; and the dequantized output against the f64 product within the
//! quantization error.

#![allow(
    clippy::unwrap_used,
    clippy::cast_precision_loss,
    clippy::cast_possible_truncation
)]

use quiver_kernels::cpu::{
    self, Activation, CpuKernelError, Int8Isa, QuantizedLinear, QuantizedRows,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn rng(seed: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed)
}

fn uniform(rng: &mut ChaCha8Rng, n: usize, lo: f32, hi: f32) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(lo..hi)).collect()
}

/// (rows, depth, outputs): one row; depths of 1, odd, not a multiple of 2, 4, 8 or 16, and
/// BERT's own; outputs not a multiple of a panel (16 or 48), and BERT's.
const SHAPES: [(usize, usize, usize); 10] = [
    (1, 1, 1),
    (1, 7, 5),
    (3, 13, 33),
    (2, 3, 49),
    (7, 385, 49),
    (49, 64, 40),
    (97, 384, 48),
    (13, 1536, 20),
    (1, 384, 1152),
    (50, 1537, 97),
];

fn pools() -> Vec<(usize, rayon::ThreadPool)> {
    [1, 3]
        .into_iter()
        .map(|t| {
            (
                t,
                rayon::ThreadPoolBuilder::new()
                    .num_threads(t)
                    .build()
                    .unwrap(),
            )
        })
        .collect()
}

#[test]
fn int8_isa_detection_is_consistent() {
    let available = Int8Isa::available();
    assert_eq!(available.first(), Some(&Int8Isa::Scalar));
    assert!(available.contains(&Int8Isa::detect()));
    assert_eq!(available.last(), Some(&Int8Isa::detect()));
    for isa in Int8Isa::ALL {
        assert_eq!(available.contains(&isa), isa.is_available());
    }
    eprintln!("int8 instruction sets on this CPU: {available:?}");
}

#[test]
fn weight_quantization_round_trips_within_half_a_step() {
    let mut r = rng(1);
    let k = 37;
    let mut w = uniform(&mut r, 5 * k, -3.0, 3.0);
    w[k..2 * k].fill(0.0); // an all-zero row
    w[2 * k..3 * k].iter_mut().for_each(|x| *x *= 1e-30); // a tiny one
    w[3 * k + 4] = -50.0; // an outlier
    let (q, scales) = cpu::quantize_weights(&w, k);
    assert_eq!((q.len(), scales.len()), (w.len(), 5));
    for (n, ((row, qs), &s)) in w.chunks(k).zip(q.chunks(k)).zip(&scales).enumerate() {
        assert!(s > 0.0 && s.is_finite(), "row {n}: scale {s}");
        for (&x, &v) in row.iter().zip(qs) {
            assert!(v.unsigned_abs() <= 127, "row {n}: level {v}");
            let err = (f64::from(x) - f64::from(v) * f64::from(s)).abs();
            assert!(
                err <= f64::from(s) * 0.5 * (1.0 + 1e-6),
                "row {n}: {x} -> {v} × {s}"
            );
        }
        if row.iter().any(|&x| x != 0.0) {
            // The largest magnitude maps to the last level.
            assert_eq!(
                qs.iter().map(|v| v.unsigned_abs()).max(),
                Some(127),
                "row {n}"
            );
        } else {
            assert!(qs.iter().all(|&v| v == 0), "row {n}");
        }
    }
}

fn quantized(isa: Int8Isa, a: &[f32], rows: usize, k: usize) -> QuantizedRows {
    let mut q = QuantizedRows::default();
    cpu::quantize_rows(isa, a, rows, k, &mut q).unwrap();
    q
}

/// Rows of every kind, every length class: mixed signs, all positive, all negative, all
/// zero, one outlier, magnitudes 1e-3 to 1e4.
fn activation_rows(r: &mut ChaCha8Rng, rows: usize, k: usize) -> Vec<f32> {
    let mut a = Vec::with_capacity(rows * k);
    for row in 0..rows {
        let scale = [1.0f32, 1e-3, 1e4, 3.0][row % 4];
        let (lo, hi) = match row % 5 {
            0 => (-scale, scale),
            1 => (0.0, scale),
            2 => (-scale, -scale * 0.5),
            3 => (-0.17 * scale, scale),
            _ => (0.0, 0.0),
        };
        let mut values: Vec<f32> = if lo == hi {
            vec![0.0; k]
        } else {
            uniform(r, k, lo, hi)
        };
        if row % 7 == 6 {
            values[k / 2] = 40.0 * scale;
        }
        a.extend(values);
    }
    a
}

#[test]
fn activation_quantization_matches_scalar_on_every_isa_and_round_trips() {
    let mut r = rng(2);
    for k in [1, 3, 7, 8, 15, 16, 17, 31, 33, 384, 1537] {
        let rows = 11;
        let a = activation_rows(&mut r, rows, k);
        let reference = quantized(Int8Isa::Scalar, &a, rows, k);
        let levels = reference.levels();
        for (row, x) in a.chunks(k).enumerate() {
            let (s, z) = (reference.scales()[row], reference.zero_points()[row]);
            assert!((0..=255).contains(&z), "k {k} row {row}: zero point {z}");
            for (c, &x) in x.iter().enumerate() {
                let u = i32::from(levels[row * k + c]);
                let back = f64::from(u - z) * f64::from(s);
                let err = (f64::from(x) - back).abs();
                assert!(
                    err <= f64::from(s) * 0.5 * (1.0 + 1e-5),
                    "k {k} row {row} col {c}: {x} -> {u} (scale {s}, zero {z}) = {back}"
                );
            }
            if x.iter().all(|&v| v == 0.0) {
                assert!(levels[row * k..][..k].iter().all(|&u| i32::from(u) == z));
            }
        }
        for isa in Int8Isa::available() {
            let q = quantized(isa, &a, rows, k);
            assert_eq!(q.levels(), levels, "{isa:?} k {k}: levels");
            assert_eq!(q.scales(), reference.scales(), "{isa:?} k {k}: scales");
            assert_eq!(
                q.zero_points(),
                reference.zero_points(),
                "{isa:?} k {k}: zeros"
            );
        }
    }
}

/// The scalar reference's integer sums against an i64 product of the quantized values, on
/// random data and at the largest sums the format allows (every level 255 or 0 against
/// weights of ±127 over a depth of 1536), which would saturate `vpmaddubsw`'s i16 pairs.
#[test]
fn scalar_reference_sums_are_the_exact_integer_product() {
    let mut r = rng(3);
    let (m, k, n) = (5, 1536, 7);
    let mut a = uniform(&mut r, m * k, -1.0, 1.0);
    // Row 0: levels 255 except one 0 (its minimum), so zero point 0 and sums at the top.
    a[..k].fill(1.0);
    a[0] = 0.0;
    // Row 1: levels 0 except the zero point at 255 (all negative).
    a[k..2 * k].fill(-1.0);
    let mut w = uniform(&mut r, n * k, -1.0, 1.0);
    w[..k].fill(1.0);
    w[k..2 * k].fill(-1.0);
    for isa in Int8Isa::available() {
        let linear = QuantizedLinear::new(isa, &w, None, n, k).unwrap();
        let got = linear.accumulate(&a, m).unwrap();
        let q = quantized(isa, &a, m, k);
        let (wq, _) = cpu::quantize_weights(&w, k);
        let levels = q.levels();
        for row in 0..m {
            for c in 0..n {
                let want: i64 = (0..k)
                    .map(|p| {
                        (i64::from(levels[row * k + p]) - i64::from(q.zero_points()[row]))
                            * i64::from(wq[c * k + p])
                    })
                    .sum();
                assert_eq!(
                    i64::from(got[row * n + c]),
                    want,
                    "{isa:?} row {row} col {c}"
                );
            }
        }
        // The extreme rows do reach the format's largest sums.
        assert_eq!(got[0].unsigned_abs(), 255 * 127 * (k as u32 - 1));
    }
}

#[test]
fn int8_kernels_match_the_scalar_reference_bit_for_bit() {
    let mut r = rng(4);
    let pools = pools();
    for (m, k, n) in SHAPES {
        let a = activation_rows(&mut r, m, k);
        let mut w = uniform(&mut r, n * k, -0.5, 0.5);
        w[..k.min(n * k)].fill(0.0);
        let bias = uniform(&mut r, n, -2.0, 2.0);
        for with_bias in [false, true] {
            let b = with_bias.then_some(bias.as_slice());
            let reference = QuantizedLinear::new(Int8Isa::Scalar, &w, b, n, k).unwrap();
            let want_sums = reference.accumulate(&a, m).unwrap();
            let mut want = [vec![0.0f32; m * n], vec![0.0f32; m * n]];
            for (act, want) in [Activation::Identity, Activation::Gelu]
                .into_iter()
                .zip(&mut want)
            {
                reference.forward(&a, want, m, act).unwrap();
            }
            for isa in Int8Isa::available() {
                let linear = QuantizedLinear::new(isa, &w, b, n, k).unwrap();
                assert_eq!((linear.out_features(), linear.in_features()), (n, k));
                assert_eq!(linear.weight_scales(), reference.weight_scales());
                for (threads, pool) in &pools {
                    let what = format!("{isa:?} {threads} threads {m}x{k}x{n} bias {with_bias}");
                    let sums = pool.install(|| linear.accumulate(&a, m)).unwrap();
                    assert_eq!(sums, want_sums, "{what}: sums");
                    for (act, want) in [Activation::Identity, Activation::Gelu]
                        .into_iter()
                        .zip(&want)
                    {
                        let mut dst = vec![f32::NAN; m * n];
                        pool.install(|| linear.forward(&a, &mut dst, m, act))
                            .unwrap();
                        let same = dst
                            .iter()
                            .zip(want)
                            .position(|(x, y)| x.to_bits() != y.to_bits());
                        assert_eq!(same, None, "{what} {act:?}: first difference");
                    }
                }
            }
        }
    }
}

/// The dequantized output against the f64 product of the f32 inputs, within the error the
/// quantization allows: each product `x w` is off by at most `|x| s_w/2 + |w| s_x/2 +
/// s_x s_w/4`.
#[test]
fn int8_forward_is_within_the_quantization_error_of_the_f32_product() {
    let mut r = rng(5);
    for (m, k, n) in SHAPES {
        let a = activation_rows(&mut r, m, k);
        let w = uniform(&mut r, n * k, -0.5, 0.5);
        let bias = uniform(&mut r, n, -2.0, 2.0);
        let isa = Int8Isa::detect();
        let linear = QuantizedLinear::new(isa, &w, Some(&bias), n, k).unwrap();
        let mut dst = vec![0.0f32; m * n];
        linear
            .forward(&a, &mut dst, m, Activation::Identity)
            .unwrap();
        let q = quantized(isa, &a, m, k);
        for row in 0..m {
            let s_x = f64::from(q.scales()[row]);
            for c in 0..n {
                let s_w = f64::from(linear.weight_scales()[c]);
                let (mut want, mut bound) = (f64::from(bias[c]), 0.0);
                for p in 0..k {
                    let (x, y) = (f64::from(a[row * k + p]), f64::from(w[c * k + p]));
                    want += x * y;
                    bound += x.abs() * s_w / 2.0 + y.abs() * s_x / 2.0 + s_x * s_w / 4.0;
                }
                let got = f64::from(dst[row * n + c]);
                let slack = 1e-5 * (want.abs() + bound) + 1e-6;
                assert!(
                    (got - want).abs() <= bound * 1.0001 + slack,
                    "{m}x{k}x{n} row {row} col {c}: {got} vs {want}, bound {bound}"
                );
            }
        }
    }
}

#[test]
fn quantized_linear_rejects_shapes_that_do_not_fit() {
    let isa = Int8Isa::detect();
    for (w, b, n, k) in [
        (&[1.0f32; 6][..], None, 2, 2),
        (&[1.0; 6], Some(&[0.0; 2][..]), 3, 2),
        (&[], None, 0, 0),
    ] {
        assert!(matches!(
            QuantizedLinear::new(isa, w, b, n, k),
            Err(CpuKernelError::Shape { .. })
        ));
    }
    let too_deep = vec![0.0; cpu::INT8_MAX_IN_FEATURES + 1];
    assert!(matches!(
        QuantizedLinear::new(isa, &too_deep, None, 1, too_deep.len()),
        Err(CpuKernelError::Shape { .. })
    ));
    let linear = QuantizedLinear::new(isa, &[1.0; 6], None, 3, 2).unwrap();
    let mut dst = [0.0; 6];
    for (a, rows) in [(&[1.0f32; 5][..], 2), (&[1.0; 3][..], 1), (&[][..], 0)] {
        assert!(matches!(
            linear.forward(a, &mut dst[..rows * 3], rows, Activation::Identity),
            Err(CpuKernelError::Shape { .. })
        ));
    }
    assert!(matches!(
        linear.forward(&[1.0; 2], &mut dst[..2], 1, Activation::Identity),
        Err(CpuKernelError::Shape { .. })
    ));
    let mut q = QuantizedRows::default();
    assert!(matches!(
        cpu::quantize_rows(isa, &[1.0; 3], 2, 2, &mut q),
        Err(CpuKernelError::Shape { .. })
    ));
    for isa in Int8Isa::ALL.into_iter().filter(|i| !i.is_available()) {
        assert!(matches!(
            QuantizedLinear::new(isa, &[1.0; 6], None, 3, 2),
            Err(CpuKernelError::Int8IsaUnavailable(i)) if i == isa
        ));
    }
}
