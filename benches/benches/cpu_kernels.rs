//! Quiver's CPU kernels (`quiver_kernels::cpu`) against the stock candle ops they replace,
//! at MiniLM (all-MiniLM-L6-v2: hidden 384, 12 heads of 32, intermediate 1536) shapes:
//! 64 sentences × 11 tokens = 704 token rows, and 16 × 128 for long inputs. Both sides take
//! and return candle tensors on the CPU device, so allocation is counted on both.
//!
//! `cargo bench -p quiver-bench --bench cpu_kernels -- --warm-up-time 1 --measurement-time 3`
//! (threads: rayon's global pool, `RAYON_NUM_THREADS` or all cores, for both).

#![allow(clippy::unwrap_used)]

use candle_core::{D, Device, Tensor};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use quiver_kernels::cpu::{self, AttentionShape, Isa};

fn random(shape: &[usize]) -> Tensor {
    Tensor::randn(0f32, 1.0, shape, &Device::Cpu).unwrap()
}

fn elementwise(c: &mut Criterion) {
    let x = random(&[704, 1536]);
    let bias = random(&[1536]);
    let mut g = c.benchmark_group("gelu_704x1536");
    g.throughput(Throughput::Elements(704 * 1536));
    g.bench_function("candle_gelu_erf", |b| b.iter(|| x.gelu_erf().unwrap()));
    g.bench_function("quiver", |b| b.iter(|| cpu::gelu(&x).unwrap()));
    let xs = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let mut out = vec![0.0; xs.len()];
    for isa in Isa::available() {
        g.bench_function(format!("quiver_slice_{isa:?}"), |b| {
            b.iter(|| cpu::gelu_slice(isa, &xs, &mut out).unwrap());
        });
    }
    g.finish();

    let mut g = c.benchmark_group("bias_gelu_704x1536");
    g.throughput(Throughput::Elements(704 * 1536));
    g.bench_function("candle_broadcast_add_gelu_erf", |b| {
        b.iter(|| x.broadcast_add(&bias).unwrap().gelu_erf().unwrap());
    });
    g.bench_function("quiver", |b| b.iter(|| cpu::bias_gelu(&x, &bias).unwrap()));
    g.finish();
}

fn softmax(c: &mut Criterion) {
    for (batch, s) in [(16usize, 11usize), (64, 11), (16, 128)] {
        let x = random(&[batch * 12, s, s]);
        let mut g = c.benchmark_group(format!("softmax_{}x{s}x{s}", batch * 12));
        g.throughput(Throughput::Elements((batch * 12 * s * s) as u64));
        g.bench_function("candle_nn_softmax", |b| {
            b.iter(|| candle_nn::ops::softmax(&x, D::Minus1).unwrap());
        });
        g.bench_function("candle_nn_softmax_last_dim", |b| {
            b.iter(|| candle_nn::ops::softmax_last_dim(&x).unwrap());
        });
        g.bench_function("quiver", |b| b.iter(|| cpu::softmax_last_dim(&x).unwrap()));
        g.finish();
    }
}

fn layer_norm(c: &mut Criterion) {
    let x = random(&[704, 384]);
    let w = random(&[384]);
    let bias = random(&[384]);
    let ln = candle_nn::LayerNorm::new(w.clone(), bias.clone(), 1e-12);
    let mut g = c.benchmark_group("layer_norm_704x384");
    g.throughput(Throughput::Elements(704 * 384));
    g.bench_function("candle_nn_layer_norm", |b| {
        b.iter(|| candle_core::Module::forward(&ln, &x).unwrap());
    });
    g.bench_function("quiver", |b| {
        b.iter(|| cpu::layer_norm(&x, &w, &bias, 1e-12).unwrap())
    });
    g.finish();
}

/// candle-transformers' `BertSelfAttention::forward` after the three projections.
fn stock_attention(q: &Tensor, k: &Tensor, v: &Tensor, mask: &Tensor, heads: usize) -> Tensor {
    let (b, s, hidden) = q.dims3().unwrap();
    let d = hidden / heads;
    let split = |t: &Tensor| {
        t.reshape((b, s, heads, d))
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .contiguous()
            .unwrap()
    };
    let scores = (split(q).matmul(&split(k).t().unwrap()).unwrap() / (d as f64).sqrt()).unwrap();
    let probs = candle_nn::ops::softmax(&scores.broadcast_add(mask).unwrap(), D::Minus1).unwrap();
    probs
        .matmul(&split(v))
        .unwrap()
        .transpose(1, 2)
        .unwrap()
        .contiguous()
        .unwrap()
        .flatten_from(D::Minus2)
        .unwrap()
}

fn attention(c: &mut Criterion) {
    let heads = 12;
    for (batch, s) in [(1usize, 11usize), (16, 11), (64, 11), (16, 128)] {
        let q = random(&[batch, s, 384]);
        let k = random(&[batch, s, 384]);
        let v = random(&[batch, s, 384]);
        let mask = Tensor::zeros((batch, 1, 1, s), candle_core::DType::F32, &Device::Cpu).unwrap();
        let mut g = c.benchmark_group(format!("attention_b{batch}_s{s}"));
        g.throughput(Throughput::Elements(batch as u64));
        g.bench_function("candle_stock", |b| {
            b.iter(|| stock_attention(&q, &k, &v, &mask, heads))
        });
        g.bench_function("quiver", |b| {
            b.iter(|| cpu::attention(&q, &k, &v, Some(&mask), heads).unwrap());
        });
        if batch == 16 {
            let shape = AttentionShape {
                batch,
                heads,
                q_len: s,
                kv_len: s,
                head_dim: 32,
            };
            let [qs, ks, vs] =
                [&q, &k, &v].map(|t| t.flatten_all().unwrap().to_vec1::<f32>().unwrap());
            let ms = vec![0.0; batch * s];
            let mut out = vec![0.0; qs.len()];
            for isa in Isa::available() {
                g.bench_function(format!("quiver_slice_{isa:?}"), |b| {
                    b.iter(|| {
                        cpu::attention_slice(isa, shape, &qs, &ks, &vs, Some(&ms), &mut out)
                            .unwrap()
                    });
                });
            }
        }
        g.finish();
    }
}

/// A linear layer with its bias: as `CpuBert` runs it (`PackedLinear`, the weight packed once,
/// bias and GELU fused), on `gemm` (`matmul_transposed` onto the bias, then GELU in place),
/// and candle's `x.matmul(&w.t()) + b` (a fresh output per op).
fn linear(c: &mut Criterion) {
    for (rows, k, n) in [
        (16usize, 384usize, 1152usize),
        (1024, 384, 1536),
        (1024, 1536, 384),
        (8192, 384, 1152),
    ] {
        let x = random(&[rows, k]);
        let w = random(&[n, k]);
        let bias = random(&[n]);
        let mut g = c.benchmark_group(format!("linear_{rows}x{k}x{n}"));
        g.throughput(Throughput::Elements((rows * k * n) as u64));
        g.bench_function("candle_matmul_broadcast_add", |b| {
            b.iter(|| {
                x.matmul(&w.t().unwrap())
                    .unwrap()
                    .broadcast_add(&bias)
                    .unwrap()
            });
        });
        let xs = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let ws = w.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let bs = bias.to_vec1::<f32>().unwrap();
        let mut dst = vec![0.0; rows * n];
        let packed = cpu::PackedLinear::new(Isa::detect(), &ws, Some(&bs), n, k).unwrap();
        g.bench_function("quiver_packed_linear", |b| {
            b.iter(|| {
                packed
                    .forward(&xs, &mut dst, rows, cpu::Activation::Identity)
                    .unwrap();
            });
        });
        g.bench_function("quiver_matmul_transposed_onto_bias", |b| {
            b.iter(|| {
                for row in dst.chunks_exact_mut(n) {
                    row.copy_from_slice(&bs);
                }
                cpu::matmul_transposed_slice(&xs, &ws, &mut dst, (rows, k, n), true).unwrap();
            });
        });
        if n == 1536 {
            g.bench_function("candle_matmul_broadcast_add_gelu_erf", |b| {
                b.iter(|| {
                    x.matmul(&w.t().unwrap())
                        .unwrap()
                        .broadcast_add(&bias)
                        .unwrap()
                        .gelu_erf()
                        .unwrap()
                });
            });
            g.bench_function("quiver_packed_linear_gelu", |b| {
                b.iter(|| {
                    packed
                        .forward(&xs, &mut dst, rows, cpu::Activation::Gelu)
                        .unwrap();
                });
            });
            g.bench_function("quiver_matmul_transposed_onto_bias_gelu_in_place", |b| {
                b.iter(|| {
                    for row in dst.chunks_exact_mut(n) {
                        row.copy_from_slice(&bs);
                    }
                    cpu::matmul_transposed_slice(&xs, &ws, &mut dst, (rows, k, n), true).unwrap();
                    cpu::gelu_in_place_slice(Isa::detect(), &mut dst).unwrap();
                });
            });
        }
        g.finish();
    }
}

criterion_group!(benches, elementwise, softmax, layer_norm, attention, linear);
criterion_main!(benches);
