//! Benchmark of the embedding output step: [`mean_pool_l2`] (the fused CUDA kernel on a GPU,
//! the plain-Rust reference on the CPU) against the same pooling written with candle's tensor
//! ops, for MiniLM's width (384) at batch 1, 8, 32 and 64 and 16 and 128 tokens.
//!
//! `cargo bench -p quiver-kernels --bench pool` (CPU); with `--features cuda` it also runs on
//! `cuda:0` when one opens (`scripts/gpu-check` runs the prebuilt executable on a GPU host).
#![allow(clippy::unwrap_used)]

use candle_core::{D, DType, Device, Tensor};
use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use quiver_kernels::pool::mean_pool_l2;

fn tensor_ops(hidden: &Tensor, mask: &Tensor) -> candle_core::Result<Tensor> {
    let weights = mask.unsqueeze(2)?;
    let sum = hidden.broadcast_mul(&weights)?.sum(1)?;
    let mean = sum.broadcast_div(&weights.sum(1)?.clamp(1e-9f32, f32::MAX)?)?;
    let norm = mean
        .sqr()?
        .sum_keepdim(D::Minus1)?
        .sqrt()?
        .clamp(1e-12f32, f32::MAX)?;
    mean.broadcast_div(&norm)
}

/// Waits for the device's queued work, so a GPU measurement covers the kernels.
fn sync(device: &Device, t: &Tensor) {
    device.synchronize().unwrap();
    std::hint::black_box(t);
}

fn bench(c: &mut Criterion) {
    let mut devices = vec![("cpu", Device::Cpu)];
    match quiver_kernels::Device::Cuda(0).to_candle() {
        Ok(gpu) => devices.push(("cuda0", gpu)),
        Err(e) => println!("pool bench: cuda:0 not benchmarked ({e})"),
    }
    for (name, device) in &devices {
        let mut group = c.benchmark_group(format!("pool_{name}"));
        for s in [16usize, 128] {
            for b in [1usize, 8, 32, 64] {
                let hidden = Tensor::randn(0f32, 1.0, (b, s, 384), device).unwrap();
                let mask = Tensor::ones((b, s), DType::F32, device).unwrap();
                let id = format!("b{b}_s{s}");
                group.bench_function(BenchmarkId::new("fused", &id), |bench| {
                    bench.iter(|| sync(device, &mean_pool_l2(&hidden, &mask, true).unwrap()))
                });
                group.bench_function(BenchmarkId::new("tensor_ops", &id), |bench| {
                    bench.iter(|| sync(device, &tensor_ops(&hidden, &mask).unwrap()))
                });
            }
        }
        group.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
