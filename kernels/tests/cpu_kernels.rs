//! The CPU kernels (`quiver_kernels::cpu`) against plain f64 references, on every
//! instruction set this CPU has (each forced through the slice functions' `Isa`), on random
//! inputs and on the edges: ±1e4 magnitudes, -inf masks, fully masked rows, length 1,
//! lengths that are not a multiple of the vector width, non-contiguous tensors.

#![allow(
    clippy::unwrap_used,
    clippy::cast_precision_loss,
    clippy::cast_possible_truncation
)]

use candle_core::cpu::erf::erfc_f64;
use candle_core::{D, Device, Tensor};
use quiver_kernels::cpu::{self, AttentionShape, CpuKernelError, Isa};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Row lengths that hit every tail case of 8 and 16 lanes, and BERT's own.
const LENGTHS: [usize; 10] = [1, 3, 7, 8, 11, 16, 17, 31, 128, 384];

fn rng(seed: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed)
}

fn uniform(rng: &mut ChaCha8Rng, n: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-scale..scale)).collect()
}

fn gelu_ref(x: f32) -> f64 {
    let x = f64::from(x);
    x * 0.5 * erfc_f64(-x / std::f64::consts::SQRT_2)
}

/// `|got - want| <= rel * |want| + abs`, with the offending index in the message.
fn assert_close(what: &str, got: &[f32], want: &[f64], rel: f64, abs: f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let err = (f64::from(g) - w).abs();
        assert!(
            err <= rel * w.abs() + abs,
            "{what}: element {i}: got {g:e}, want {w:e} (error {err:e})"
        );
    }
}

#[test]
fn scalar_is_always_available_and_detect_is_available() {
    assert!(Isa::Scalar.is_available());
    assert!(Isa::detect().is_available());
    assert!(Isa::available().contains(&Isa::Scalar));
    assert!(Isa::available().contains(&Isa::detect()));
}

#[test]
fn unavailable_isa_is_an_error_not_a_fault() {
    for isa in Isa::ALL.into_iter().filter(|i| !i.is_available()) {
        let mut out = [0.0; 4];
        let err = cpu::gelu_slice(isa, &[1.0; 4], &mut out).unwrap_err();
        assert!(
            matches!(err, CpuKernelError::IsaUnavailable(i) if i == isa),
            "{err}"
        );
    }
}

#[test]
fn gelu_matches_f64_erf_gelu_on_every_isa() {
    let mut r = rng(1);
    // A dense sweep of the range where GELU is neither 0 nor x, plus random values.
    let mut x: Vec<f32> = (-16_000..=16_000).map(|i| i as f32 * 1e-3).collect();
    x.extend(uniform(&mut r, 10_001, 30.0));
    let want: Vec<f64> = x.iter().map(|&v| gelu_ref(v)).collect();
    for isa in Isa::available() {
        let mut out = vec![f32::NAN; x.len()];
        cpu::gelu_slice(isa, &x, &mut out).unwrap();
        // 2e-6 relative everywhere (1.2e-7 from erfc, the rest f32 rounding); the tiny
        // absolute term covers results below f32's normal range.
        assert_close(&format!("gelu {isa:?}"), &out, &want, 2e-6, 1e-37);
    }
}

#[test]
fn gelu_edges_large_magnitudes_zero_nan_every_length() {
    for isa in Isa::available() {
        let x = [
            1e4f32, -1e4, 1e30, -1e30, 0.0, -0.0, 5.0, -5.0, -9.0, -13.0, 1e-30,
        ];
        let mut out = [f32::NAN; 11];
        cpu::gelu_slice(isa, &x, &mut out).unwrap();
        let want: Vec<f64> = x.iter().map(|&v| gelu_ref(v)).collect();
        assert_close(&format!("gelu edges {isa:?}"), &out, &want, 2e-6, 1e-37);
        assert_eq!(out[0], 1e4);
        assert_eq!(out[1], 0.0);
        let mut nan = [0.0f32; 3];
        cpu::gelu_slice(isa, &[1.0, f32::NAN, 2.0], &mut nan).unwrap();
        assert!(nan[1].is_nan(), "{isa:?}: NaN in, {} out", nan[1]);
        for n in LENGTHS {
            let x = uniform(&mut rng(n as u64), n, 4.0);
            let mut out = vec![f32::NAN; n];
            cpu::gelu_slice(isa, &x, &mut out).unwrap();
            let want: Vec<f64> = x.iter().map(|&v| gelu_ref(v)).collect();
            assert_close(&format!("gelu len {n} {isa:?}"), &out, &want, 2e-6, 1e-37);
        }
    }
    let mut out = [0.0; 2];
    assert!(matches!(
        cpu::gelu_slice(Isa::Scalar, &[1.0; 3], &mut out),
        Err(CpuKernelError::Shape { .. })
    ));
}

#[test]
fn gelu_in_place_equals_gelu_on_every_isa() {
    let mut x = uniform(&mut rng(40), 40_003, 12.0);
    x.extend([1e4f32, -1e4, 1e30, -1e30, 0.0, -0.0, -13.0, f32::NAN]);
    for isa in Isa::available() {
        let mut want = vec![0.0; x.len()];
        cpu::gelu_slice(isa, &x, &mut want).unwrap();
        for n in LENGTHS.into_iter().chain([x.len()]) {
            let mut got = x[..n].to_vec();
            cpu::gelu_in_place_slice(isa, &mut got).unwrap();
            for (i, (g, w)) in got.iter().zip(&want[..n]).enumerate() {
                assert!(
                    g.to_bits() == w.to_bits() || (g.is_nan() && w.is_nan()),
                    "{isa:?} len {n} element {i}: in place {g:e}, gelu {w:e}"
                );
            }
        }
    }
}

/// `a[m × k] · w[n × k]ᵀ` in f64, plus `init` (the destination's old contents).
fn matmul_transposed_ref(a: &[f32], w: &[f32], init: &[f32], m: usize, k: usize) -> Vec<f64> {
    let n = w.len() / k;
    (0..m * n)
        .map(|e| {
            let (r, c) = (e / n, e % n);
            let dot: f64 = (0..k)
                .map(|j| f64::from(a[r * k + j]) * f64::from(w[c * k + j]))
                .sum();
            dot + f64::from(init[e])
        })
        .collect()
}

#[test]
fn matmul_transposed_matches_reference_across_row_blocks() {
    let mut r = rng(45);
    // m crosses the row block (two gemm calls, the second short); k and n are not multiples
    // of any vector width; 1 × 1 × 1 is the smallest product.
    for (m, k, n) in [(1, 1, 1), (3, 7, 5), (cpu::MATMUL_ROW_BLOCK + 6, 13, 9)] {
        let a = uniform(&mut r, m * k, 1.0);
        let w = uniform(&mut r, n * k, 1.0);
        let bias = uniform(&mut r, m * n, 1.0);
        let zeros = vec![0.0; m * n];
        let mut dst = vec![f32::NAN; m * n];
        cpu::matmul_transposed_slice(&a, &w, &mut dst, (m, k, n), false).unwrap();
        let want = matmul_transposed_ref(&a, &w, &zeros, m, k);
        assert_close(&format!("{m}x{k}x{n}"), &dst, &want, 1e-5, 1e-5);
        let mut dst = bias.clone();
        cpu::matmul_transposed_slice(&a, &w, &mut dst, (m, k, n), true).unwrap();
        let want = matmul_transposed_ref(&a, &w, &bias, m, k);
        assert_close(&format!("{m}x{k}x{n} onto"), &dst, &want, 1e-5, 1e-5);
    }
    let mut dst = vec![0.0; 6];
    for dims in [(2, 3, 2), (2, 2, 3), (0, 3, 3)] {
        assert!(
            matches!(
                cpu::matmul_transposed_slice(&[1.0; 6], &[1.0; 9], &mut dst, dims, false),
                Err(CpuKernelError::Shape { .. })
            ),
            "{dims:?}"
        );
    }
}

/// `PackedLinear::forward` against f64 on every ISA, in pools of 1 and 3 threads (so both
/// the row split and the column split of its tasks run): rows that are not a multiple of the
/// register tile or of a task, outputs that are not a multiple of a panel (1, 5, 33),
/// depths of one step, of one block and across blocks of unequal split (385, 1536), inputs
/// of magnitude 1 and 1e3, with and without bias, with and without GELU. The error allowed
/// grows with the depth (f32 accumulation of `k` products) and with the magnitude.
#[test]
fn packed_linear_matches_reference_on_every_isa() {
    let mut r = rng(46);
    let shapes = [
        (1, 1, 1),
        (5, 7, 5),
        (7, 385, 33),
        (49, 64, 40),
        (97, 384, 48),
        (13, 1536, 20),
        (9, 384, 100),
    ];
    for threads in [1, 3] {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        for isa in Isa::available() {
            for ((m, k, n), scale) in shapes.into_iter().flat_map(|s| [(s, 1.0), (s, 1e3)]) {
                let a = uniform(&mut r, m * k, scale);
                let w = uniform(&mut r, n * k, scale);
                let bias = uniform(&mut r, n, scale * scale);
                let tol = 2e-7 * (k as f64).sqrt() * 4.0;
                let abs = tol * (k as f64).sqrt() * f64::from(scale * scale);
                for with_bias in [false, true] {
                    let b = with_bias.then_some(bias.as_slice());
                    let linear = cpu::PackedLinear::new(isa, &w, b, n, k).unwrap();
                    assert_eq!((linear.out_features(), linear.in_features()), (n, k));
                    let init: Vec<f32> = (0..m * n)
                        .map(|e| if with_bias { bias[e % n] } else { 0.0 })
                        .collect();
                    let want = matmul_transposed_ref(&a, &w, &init, m, k);
                    for act in [cpu::Activation::Identity, cpu::Activation::Gelu] {
                        let mut dst = vec![f32::NAN; m * n];
                        pool.install(|| linear.forward(&a, &mut dst, m, act))
                            .unwrap();
                        let want: Vec<f64> = match act {
                            cpu::Activation::Gelu => {
                                want.iter().map(|&x| gelu_ref(x as f32)).collect()
                            }
                            _ => want.clone(),
                        };
                        let what = format!(
                            "{isa:?} {threads} threads {m}x{k}x{n} scale {scale} bias {with_bias} {act:?}"
                        );
                        assert_close(&what, &dst, &want, tol, abs);
                    }
                }
            }
        }
    }
}

#[test]
fn packed_linear_rejects_shapes_that_do_not_fit() {
    let isa = Isa::detect();
    for (w, b, n, k) in [
        (&[1.0f32; 6][..], None, 2, 2),
        (&[1.0; 6], Some(&[0.0; 2][..]), 3, 2),
        (&[], None, 0, 3),
        (&[], None, 3, 0),
    ] {
        assert!(
            matches!(
                cpu::PackedLinear::new(isa, w, b, n, k),
                Err(CpuKernelError::Shape { .. })
            ),
            "{n}x{k}"
        );
    }
    // 3 outputs of 2 inputs: a = [rows, 2], dst = [rows, 3].
    let linear = cpu::PackedLinear::new(isa, &[1.0; 6], None, 3, 2).unwrap();
    let mut dst = vec![0.0; 6];
    linear
        .forward(&[1.0; 4], &mut dst, 2, cpu::Activation::Identity)
        .unwrap();
    assert_eq!(dst, [2.0; 6]);
    for (a, dst_len, rows) in [(3, 3, 1), (4, 5, 2), (0, 0, 0)] {
        assert!(
            matches!(
                linear.forward(
                    &vec![1.0; a],
                    &mut dst[..dst_len],
                    rows,
                    cpu::Activation::Identity
                ),
                Err(CpuKernelError::Shape { .. })
            ),
            "a {a}, dst {dst_len}, {rows} rows"
        );
    }
    for isa in Isa::ALL.into_iter().filter(|i| !i.is_available()) {
        assert!(matches!(
            cpu::PackedLinear::new(isa, &[1.0; 6], None, 3, 2),
            Err(CpuKernelError::IsaUnavailable(i)) if i == isa
        ));
    }
}

#[test]
fn bias_gelu_matches_reference_on_every_isa() {
    for isa in Isa::available() {
        for n in LENGTHS {
            let mut r = rng(100 + n as u64);
            let rows = 5;
            let x = uniform(&mut r, rows * n, 6.0);
            let bias = uniform(&mut r, n, 2.0);
            let mut out = vec![f32::NAN; rows * n];
            cpu::bias_gelu_slice(isa, &x, &bias, &mut out).unwrap();
            let want: Vec<f64> = x
                .iter()
                .enumerate()
                .map(|(i, &v)| gelu_ref(v + bias[i % n]))
                .collect();
            assert_close(
                &format!("bias_gelu n {n} {isa:?}"),
                &out,
                &want,
                2e-6,
                1e-37,
            );
        }
    }
    let mut out = [0.0; 6];
    assert!(matches!(
        cpu::bias_gelu_slice(Isa::Scalar, &[1.0; 6], &[1.0; 4], &mut out),
        Err(CpuKernelError::Shape { .. })
    ));
}

fn softmax_ref(x: &[f32], n: usize) -> Vec<f64> {
    x.chunks(n)
        .flat_map(|row| {
            let max = row
                .iter()
                .fold(f64::NEG_INFINITY, |m, &v| m.max(f64::from(v)));
            if max == f64::NEG_INFINITY {
                return vec![0.0; n];
            }
            let e: Vec<f64> = row.iter().map(|&v| (f64::from(v) - max).exp()).collect();
            let sum: f64 = e.iter().sum();
            e.into_iter().map(|v| v / sum).collect()
        })
        .collect()
}

#[test]
fn softmax_matches_reference_with_masks_on_every_isa() {
    for isa in Isa::available() {
        for n in LENGTHS {
            let mut r = rng(200 + n as u64);
            let rows = 7;
            let mut x = uniform(&mut r, rows * n, 10.0);
            // Row 1: large magnitudes. Row 2: every other entry masked. Row 3: fully masked.
            // Row 4: all but the last masked.
            for v in &mut x[n..2 * n] {
                *v *= 1e3;
            }
            for v in x[2 * n..3 * n].iter_mut().step_by(2) {
                *v = f32::NEG_INFINITY;
            }
            x[3 * n..4 * n].fill(f32::NEG_INFINITY);
            x[4 * n..5 * n - 1].fill(f32::NEG_INFINITY);
            let mut out = vec![f32::NAN; rows * n];
            cpu::softmax_last_dim_slice(isa, &x, n, &mut out).unwrap();
            let want = softmax_ref(&x, n);
            assert_close(&format!("softmax n {n} {isa:?}"), &out, &want, 1e-5, 1e-7);
            assert!(
                out[3 * n..4 * n].iter().all(|&p| p == 0.0),
                "fully masked row"
            );
            assert_eq!(out[5 * n - 1], 1.0, "one unmasked entry");
            for (i, &p) in out[2 * n..3 * n].iter().enumerate() {
                if i % 2 == 0 {
                    assert_eq!(p, 0.0, "masked entry {i} of n {n}");
                }
            }
        }
        let mut out = [0.0; 3];
        assert!(matches!(
            cpu::softmax_last_dim_slice(isa, &[0.0; 3], 2, &mut out),
            Err(CpuKernelError::Shape { .. })
        ));
    }
}

fn layer_norm_ref(x: &[f32], w: &[f32], b: &[f32], eps: f32) -> Vec<f64> {
    let n = w.len();
    x.chunks(n)
        .flat_map(|row| {
            let mean = row.iter().map(|&v| f64::from(v)).sum::<f64>() / n as f64;
            let var = row
                .iter()
                .map(|&v| (f64::from(v) - mean).powi(2))
                .sum::<f64>()
                / n as f64;
            let rstd = 1.0 / (var + f64::from(eps)).sqrt();
            row.iter()
                .zip(w.iter().zip(b))
                .map(move |(&v, (&w, &b))| {
                    (f64::from(v) - mean) * rstd * f64::from(w) + f64::from(b)
                })
                .collect::<Vec<_>>()
        })
        .collect()
}

#[test]
fn layer_norm_matches_reference_on_every_isa() {
    for isa in Isa::available() {
        for n in LENGTHS {
            let mut r = rng(300 + n as u64);
            let rows = 4;
            let mut x = uniform(&mut r, rows * n, 3.0);
            // Row 1: a large offset with a small spread; row 2: ±1e4 values; row 3: constant.
            for v in &mut x[n..2 * n] {
                *v += 1e4;
            }
            for v in &mut x[2 * n..3 * n] {
                *v *= 3e3;
            }
            x[3 * n..4 * n].fill(7.0);
            let w = uniform(&mut r, n, 2.0);
            let b = uniform(&mut r, n, 1.0);
            for eps in [1e-12, 1e-5] {
                let mut out = vec![f32::NAN; rows * n];
                cpu::layer_norm_slice(isa, &x, &w, &b, eps, &mut out).unwrap();
                let want = layer_norm_ref(&x, &w, &b, eps);
                // The 1e4 offset row: f32 input spacing there is 1e-3, so the centred
                // values are only good to ~1e-3 relative of the spread, in any f32 code;
                // the reference sees the same f32 inputs, so the error is the kernel's.
                assert_close(
                    &format!("layer_norm n {n} eps {eps} {isa:?}"),
                    &out,
                    &want,
                    1e-4,
                    1e-4,
                );
            }
        }
        let mut out = [0.0; 4];
        assert!(matches!(
            cpu::layer_norm_slice(isa, &[0.0; 4], &[1.0; 2], &[0.0; 3], 1e-5, &mut out),
            Err(CpuKernelError::Shape { .. })
        ));
    }
}

/// f64 reference: per sequence and head, softmax(q kᵀ / √d + mask) v, fully `-inf` rows 0.
fn attention_ref(
    s: AttentionShape,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    mask: Option<&[f32]>,
) -> Vec<f64> {
    let hid = s.hidden();
    let d = s.head_dim;
    let mut out = vec![0.0; s.batch * s.q_len * hid];
    for b in 0..s.batch {
        for h in 0..s.heads {
            for i in 0..s.q_len {
                let qi = &q[(b * s.q_len + i) * hid + h * d..][..d];
                let scores: Vec<f32> = (0..s.kv_len)
                    .map(|j| {
                        let kj = &k[(b * s.kv_len + j) * hid + h * d..][..d];
                        let dot: f64 = qi
                            .iter()
                            .zip(kj)
                            .map(|(&a, &c)| f64::from(a) * f64::from(c))
                            .sum();
                        let m = mask.map_or(0.0, |m| f64::from(m[b * s.kv_len + j]));
                        (dot / (d as f64).sqrt() + m) as f32
                    })
                    .collect();
                let p = softmax_ref(&scores, s.kv_len);
                for c in 0..d {
                    out[(b * s.q_len + i) * hid + h * d + c] = (0..s.kv_len)
                        .map(|j| p[j] * f64::from(v[(b * s.kv_len + j) * hid + h * d + c]))
                        .sum();
                }
            }
        }
    }
    out
}

#[test]
fn attention_matches_reference_on_every_isa() {
    let shapes = [
        (1, 1, 1, 1, 1),
        (2, 3, 5, 5, 7),
        (16, 12, 11, 11, 32),
        (2, 12, 128, 128, 32),
        (3, 2, 9, 17, 20),
        (1, 4, 33, 33, 64),
        // Query blocks that end in a group of 4 rows and single rows after groups of 8.
        (1, 2, 15, 15, 8),
        (2, 3, 14, 14, 16),
        // Heads that split into unequal groups (of 2, 2 and 1 on two threads).
        (1, 5, 7, 7, 8),
    ];
    for isa in Isa::available() {
        for (batch, heads, q_len, kv_len, head_dim) in shapes {
            let s = AttentionShape {
                batch,
                heads,
                q_len,
                kv_len,
                head_dim,
            };
            let mut r = rng(400 + (batch * heads * q_len * head_dim) as u64);
            let q = uniform(&mut r, batch * q_len * s.hidden(), 2.0);
            let k = uniform(&mut r, batch * kv_len * s.hidden(), 2.0);
            let v = uniform(&mut r, batch * kv_len * s.hidden(), 2.0);
            // Sequence b keeps its first kv_len - b keys (padding, as a batch of unequal
            // sentences); the last sequence of a batch of 3+ is fully masked with -inf.
            let mut mask = vec![0.0f32; batch * kv_len];
            for b in 0..batch {
                for j in kv_len.saturating_sub(b).max(1)..kv_len {
                    mask[b * kv_len + j] = f32::NEG_INFINITY;
                }
            }
            if batch >= 3 {
                mask[(batch - 1) * kv_len..].fill(f32::NEG_INFINITY);
            }
            for m in [None, Some(mask.as_slice())] {
                let mut out = vec![f32::NAN; q.len()];
                cpu::attention_slice(isa, s, &q, &k, &v, m, &mut out).unwrap();
                let want = attention_ref(s, &q, &k, &v, m);
                assert_close(
                    &format!("attention {s:?} mask {} {isa:?}", m.is_some()),
                    &out,
                    &want,
                    1e-4,
                    1e-5,
                );
            }
        }
        let s = AttentionShape {
            batch: 1,
            heads: 2,
            q_len: 2,
            kv_len: 2,
            head_dim: 2,
        };
        let mut out = [0.0; 8];
        assert!(matches!(
            cpu::attention_slice(isa, s, &[0.0; 8], &[0.0; 8], &[0.0; 7], None, &mut out),
            Err(CpuKernelError::Shape { .. })
        ));
    }
}

#[test]
fn attention_with_bert_f32_min_mask_matches_reference() {
    let s = AttentionShape {
        batch: 4,
        heads: 12,
        q_len: 11,
        kv_len: 11,
        head_dim: 32,
    };
    let mut r = rng(500);
    let q = uniform(&mut r, 4 * 11 * 384, 2.0);
    let k = uniform(&mut r, 4 * 11 * 384, 2.0);
    let v = uniform(&mut r, 4 * 11 * 384, 2.0);
    let mut mask = vec![0.0f32; 4 * 11];
    for b in 0..4 {
        for j in 11 - 2 * b..11 {
            mask[b * 11 + j] = f32::MIN;
        }
    }
    for isa in Isa::available() {
        let mut out = vec![f32::NAN; q.len()];
        cpu::attention_slice(isa, s, &q, &k, &v, Some(&mask), &mut out).unwrap();
        assert_close(
            &format!("bert mask {isa:?}"),
            &out,
            &attention_ref(s, &q, &k, &v, Some(&mask)),
            1e-4,
            1e-5,
        );
    }
}

fn tensor(data: Vec<f32>, shape: &[usize]) -> Tensor {
    Tensor::from_vec(data, shape, &Device::Cpu).unwrap()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar()
        .unwrap()
}

#[test]
fn tensor_functions_match_stock_candle_ops() {
    let mut r = rng(600);
    let x = tensor(uniform(&mut r, 6 * 35, 4.0), &[2, 3, 35]);
    assert!(max_diff(&cpu::gelu(&x).unwrap(), &x.gelu_erf().unwrap()) < 1e-5);
    let bias = tensor(uniform(&mut r, 35, 1.0), &[35]);
    let stock = x.broadcast_add(&bias).unwrap().gelu_erf().unwrap();
    assert!(max_diff(&cpu::bias_gelu(&x, &bias).unwrap(), &stock) < 1e-5);
    let stock = candle_nn::ops::softmax(&x, D::Minus1).unwrap();
    assert!(max_diff(&cpu::softmax_last_dim(&x).unwrap(), &stock) < 1e-6);
    let w = tensor(uniform(&mut r, 35, 2.0), &[35]);
    let stock = candle_nn::ops::layer_norm(&x, &w, &bias, 1e-12).unwrap();
    assert!(max_diff(&cpu::layer_norm(&x, &w, &bias, 1e-12).unwrap(), &stock) < 1e-4);
}

#[test]
fn tensor_attention_matches_candle_transformers_bert_arithmetic() {
    // The stock path of candle-transformers' BertSelfAttention after the projections.
    let (b, s, heads, d) = (3, 11, 12, 32);
    let mut r = rng(700);
    let q = tensor(uniform(&mut r, b * s * heads * d, 2.0), &[b, s, heads * d]);
    let k = tensor(uniform(&mut r, b * s * heads * d, 2.0), &[b, s, heads * d]);
    let v = tensor(uniform(&mut r, b * s * heads * d, 2.0), &[b, s, heads * d]);
    let keep: Vec<f32> = (0..b * s)
        .map(|i| if i % s < s - 3 * (i / s) { 1.0 } else { 0.0 })
        .collect();
    let keep = tensor(keep, &[b, s]);
    let ext = ((keep.ones_like().unwrap() - &keep).unwrap() * f64::from(f32::MIN))
        .unwrap()
        .reshape((b, 1, 1, s))
        .unwrap();
    let split = |t: &Tensor| {
        t.reshape((b, s, heads, d))
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .contiguous()
            .unwrap()
    };
    let scores = (split(&q).matmul(&split(&k).t().unwrap()).unwrap() / (d as f64).sqrt()).unwrap();
    let probs = candle_nn::ops::softmax(&scores.broadcast_add(&ext).unwrap(), D::Minus1).unwrap();
    let stock = probs
        .matmul(&split(&v))
        .unwrap()
        .transpose(1, 2)
        .unwrap()
        .contiguous()
        .unwrap()
        .flatten_from(D::Minus2)
        .unwrap();
    let ours = cpu::attention(&q, &k, &v, Some(&ext), heads).unwrap();
    assert!(
        max_diff(&ours, &stock) < 1e-5,
        "{}",
        max_diff(&ours, &stock)
    );
}

#[test]
fn non_contiguous_tensors_are_copied_not_misread() {
    let mut r = rng(800);
    let x = tensor(uniform(&mut r, 24 * 40, 3.0), &[24, 40]);
    let xt = x.t().unwrap();
    assert!(!xt.is_contiguous());
    let want = xt.contiguous().unwrap().gelu_erf().unwrap();
    assert!(max_diff(&cpu::gelu(&xt).unwrap(), &want) < 1e-5);
    let want = candle_nn::ops::softmax(&xt.contiguous().unwrap(), D::Minus1).unwrap();
    assert!(max_diff(&cpu::softmax_last_dim(&xt).unwrap(), &want) < 1e-6);
    // A narrowed view (non-zero offset) reads from its own start.
    let narrow = x.narrow(0, 3, 5).unwrap();
    let want = narrow.contiguous().unwrap().gelu_erf().unwrap();
    assert!(max_diff(&cpu::gelu(&narrow).unwrap(), &want) < 1e-5);
}

#[test]
fn tensor_functions_reject_wrong_dtype_and_shapes() {
    let x = Tensor::zeros((2, 4), candle_core::DType::F64, &Device::Cpu).unwrap();
    assert!(matches!(cpu::gelu(&x), Err(CpuKernelError::Dtype { .. })));
    let x = tensor(vec![0.0; 8], &[2, 4]);
    let bad = tensor(vec![0.0; 3], &[3]);
    assert!(matches!(
        cpu::bias_gelu(&x, &bad),
        Err(CpuKernelError::Shape { .. })
    ));
    assert!(matches!(
        cpu::layer_norm(&x, &bad, &bad, 1e-5),
        Err(CpuKernelError::Shape { .. })
    ));
    let q = tensor(vec![0.0; 24], &[1, 2, 12]);
    assert!(matches!(
        cpu::attention(&q, &q, &q, None, 5),
        Err(CpuKernelError::Shape { .. })
    ));
    let k = tensor(vec![0.0; 36], &[1, 3, 12]);
    assert!(matches!(
        cpu::attention(&q, &k, &q, None, 2),
        Err(CpuKernelError::Shape { .. })
    ));
    // The error converts into candle's, so model code can use `?`.
    let e: candle_core::Error =
        cpu::gelu(&Tensor::zeros(2, candle_core::DType::F64, &Device::Cpu).unwrap())
            .unwrap_err()
            .into();
    assert!(e.to_string().contains("f32"), "{e}");
}

#[test]
fn bias_add_and_add_layer_norm_match_reference_on_every_isa() {
    for isa in Isa::available() {
        for n in LENGTHS {
            let mut r = rng(900 + n as u64);
            let rows = 3;
            let x = uniform(&mut r, rows * n, 5.0);
            let res = uniform(&mut r, rows * n, 5.0);
            let xb = uniform(&mut r, n, 1.0);
            let w = uniform(&mut r, n, 2.0);
            let b = uniform(&mut r, n, 1.0);
            let mut out = vec![f32::NAN; rows * n];
            cpu::bias_add_slice(isa, &x, &xb, &mut out).unwrap();
            let sum: Vec<f32> = x.iter().enumerate().map(|(i, &v)| v + xb[i % n]).collect();
            assert_eq!(out, sum, "bias_add n {n} {isa:?}");
            cpu::add_layer_norm_slice(isa, &x, &res, &xb, &w, &b, 1e-12, &mut out).unwrap();
            let sum: Vec<f32> = x
                .iter()
                .zip(&res)
                .enumerate()
                .map(|(i, (&v, &r))| v + r + xb[i % n])
                .collect();
            let want = layer_norm_ref(&sum, &w, &b, 1e-12);
            assert_close(
                &format!("add_layer_norm n {n} {isa:?}"),
                &out,
                &want,
                1e-4,
                1e-4,
            );
        }
    }
}

#[test]
fn packed_attention_equals_separate_attention_on_every_isa() {
    let s = AttentionShape {
        batch: 3,
        heads: 4,
        q_len: 13,
        kv_len: 13,
        head_dim: 24,
    };
    let h = s.hidden();
    let mut r = rng(1000);
    let qkv = uniform(&mut r, 3 * 13 * 3 * h, 2.0);
    let part = |p: usize| -> Vec<f32> {
        qkv.chunks_exact(3 * h)
            .flat_map(|row| row[p * h..(p + 1) * h].to_vec())
            .collect()
    };
    let (q, k, v) = (part(0), part(1), part(2));
    let mut mask = vec![0.0f32; 3 * 13];
    mask[13 + 10..2 * 13].fill(f32::NEG_INFINITY);
    let want = attention_ref(s, &q, &k, &v, Some(&mask));
    for isa in Isa::available() {
        let mut out = vec![f32::NAN; q.len()];
        cpu::attention_packed_slice(isa, s, &qkv, Some(&mask), &mut out).unwrap();
        assert_close(&format!("packed {isa:?}"), &out, &want, 1e-4, 1e-5);
    }
    let mut out = vec![0.0; q.len()];
    assert!(matches!(
        cpu::attention_packed_slice(Isa::Scalar, s, &qkv[1..], None, &mut out),
        Err(CpuKernelError::Shape { .. })
    ));
}

/// Random BERT weights under candle-transformers' names.
fn random_bert(
    config: &candle_transformers::models::bert::Config,
) -> candle_nn::VarBuilder<'static> {
    let mut r = rng(1100);
    let (h, i) = (config.hidden_size, config.intermediate_size);
    let mut map = std::collections::HashMap::new();
    let mut put = |name: String, shape: &[usize], scale: f32, offset: f32| {
        let n = shape.iter().product();
        let data: Vec<f32> = uniform(&mut r, n, scale)
            .into_iter()
            .map(|v| v + offset)
            .collect();
        map.insert(name, tensor(data, shape));
    };
    put(
        "embeddings.word_embeddings.weight".into(),
        &[config.vocab_size, h],
        1.0,
        0.0,
    );
    put(
        "embeddings.position_embeddings.weight".into(),
        &[config.max_position_embeddings, h],
        0.5,
        0.0,
    );
    put(
        "embeddings.token_type_embeddings.weight".into(),
        &[config.type_vocab_size, h],
        0.5,
        0.0,
    );
    put("embeddings.LayerNorm.weight".into(), &[h], 0.2, 1.0);
    put("embeddings.LayerNorm.bias".into(), &[h], 0.1, 0.0);
    for l in 0..config.num_hidden_layers {
        let p = format!("encoder.layer.{l}");
        for m in ["query", "key", "value"] {
            put(format!("{p}.attention.self.{m}.weight"), &[h, h], 0.3, 0.0);
            put(format!("{p}.attention.self.{m}.bias"), &[h], 0.1, 0.0);
        }
        put(
            format!("{p}.attention.output.dense.weight"),
            &[h, h],
            0.2,
            0.0,
        );
        put(format!("{p}.attention.output.dense.bias"), &[h], 0.1, 0.0);
        put(format!("{p}.intermediate.dense.weight"), &[i, h], 0.2, 0.0);
        put(format!("{p}.intermediate.dense.bias"), &[i], 0.1, 0.0);
        put(format!("{p}.output.dense.weight"), &[h, i], 0.1, 0.0);
        put(format!("{p}.output.dense.bias"), &[h], 0.1, 0.0);
        for ln in ["attention.output", "output"] {
            put(format!("{p}.{ln}.LayerNorm.weight"), &[h], 0.2, 1.0);
            put(format!("{p}.{ln}.LayerNorm.bias"), &[h], 0.1, 0.0);
        }
    }
    candle_nn::VarBuilder::from_tensors(map, candle_core::DType::F32, &Device::Cpu)
}

#[test]
fn cpu_bert_matches_candle_transformers_bert() {
    use candle_transformers::models::bert::{BertModel, Config};
    let config = Config {
        vocab_size: 97,
        hidden_size: 96,
        num_hidden_layers: 3,
        num_attention_heads: 4,
        intermediate_size: 192,
        max_position_embeddings: 64,
        ..Config::default()
    };
    let vb = random_bert(&config);
    let stock = BertModel::load(vb.clone(), &config).unwrap();
    let ours = cpu::CpuBert::load(vb, &config).unwrap();
    // 4 × 19 rows, and 19 × 57 = 1083 rows: past one matmul row block, so the feed-forward
    // runs in two blocks of rows.
    const { assert!(19 * 57 > cpu::MATMUL_ROW_BLOCK) };
    for (b, s) in [(4, 19), (19, 57)] {
        cpu_bert_matches(&stock, &ours, b, s);
    }
    // Ids out of the vocabulary and sequences past max_position_embeddings are errors.
    let bad = Tensor::from_vec(vec![5u32, 97], (1, 2), &Device::Cpu).unwrap();
    assert!(
        ours.forward(&bad, &bad.zeros_like().unwrap(), None)
            .is_err()
    );
    let long = Tensor::zeros((1, 65), candle_core::DType::U32, &Device::Cpu).unwrap();
    assert!(ours.forward(&long, &long, None).is_err());
}

fn cpu_bert_matches(
    stock: &candle_transformers::models::bert::BertModel,
    ours: &cpu::CpuBert,
    b: usize,
    s: usize,
) {
    let mut r = rng(1200);
    let ids: Vec<u32> = (0..b * s).map(|_| r.random_range(0..97)).collect();
    let ids = Tensor::from_vec(ids, (b, s), &Device::Cpu).unwrap();
    let types = ids.zeros_like().unwrap();
    // Sequence k has 3k padding positions (at most s - 1).
    let mask: Vec<f32> = (0..b * s)
        .map(|i| {
            if i % s < s - (3 * (i / s)).min(s - 1) {
                1.0
            } else {
                0.0
            }
        })
        .collect();
    let mask = tensor(mask, &[b, s]);
    for m in [None, Some(&mask)] {
        let want = stock.forward(&ids, &types, m).unwrap();
        let got = ours.forward(&ids, &types, m).unwrap();
        assert_eq!(got.dims(), want.dims());
        let got = got.flatten_to(1).unwrap().to_vec2::<f32>().unwrap();
        let want = want.flatten_to(1).unwrap().to_vec2::<f32>().unwrap();
        for (t, (g, w)) in got.iter().zip(&want).enumerate() {
            let dot: f64 = g
                .iter()
                .zip(w)
                .map(|(&a, &b)| f64::from(a) * f64::from(b))
                .sum();
            let ng: f64 = g.iter().map(|&a| f64::from(a).powi(2)).sum::<f64>().sqrt();
            let nw: f64 = w.iter().map(|&a| f64::from(a).powi(2)).sum::<f64>().sqrt();
            let cos = dot / (ng * nw);
            assert!(cos >= 0.999_999, "{b} x {s}: token {t}: cosine {cos}");
            let diff = g
                .iter()
                .zip(w)
                .map(|(&a, &b)| (a - b).abs())
                .fold(0.0f32, f32::max);
            assert!(diff < 1e-3, "{b} x {s}: token {t}: max difference {diff}");
        }
    }
}
