//! The fused mean-pool + L2-normalise op: the CPU reference against candle's tensor ops
//! (always), and the CUDA kernel against the CPU reference (with the `cuda` feature on a
//! machine with a GPU; elsewhere that test prints `skipped: no CUDA device (...)`).
#![allow(clippy::unwrap_used)]

use candle_core::{D, DType, Device, Tensor};
use quiver_kernels::pool::{MASK_SUM_EPS, NORM_EPS, mean_pool_l2, mean_pool_l2_reference};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// A random hidden state `[b, s, h]` and a mask whose row `r` has `lens[r]` leading ones.
fn inputs(b: usize, s: usize, h: usize, lens: &[usize], seed: u64) -> (Vec<f32>, Vec<f32>) {
    assert_eq!(lens.len(), b);
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let hidden = (0..b * s * h)
        .map(|_| rng.random_range(-3.0f32..3.0))
        .collect();
    let mask = lens
        .iter()
        .flat_map(|&n| (0..s).map(move |t| if t < n { 1.0 } else { 0.0 }))
        .collect();
    (hidden, mask)
}

/// Pooling written with candle's ordinary tensor ops, as a text model would without the
/// fused op.
fn pooled_with_tensor_ops(hidden: &Tensor, mask: &Tensor, normalize: bool) -> Tensor {
    let mask = mask.to_dtype(DType::F32).unwrap();
    let summed = hidden
        .broadcast_mul(&mask.unsqueeze(2).unwrap())
        .unwrap()
        .sum(1)
        .unwrap();
    let counts = mask
        .sum_keepdim(1)
        .unwrap()
        .clamp(MASK_SUM_EPS, f32::MAX)
        .unwrap();
    let mean = summed.broadcast_div(&counts).unwrap();
    if !normalize {
        return mean;
    }
    let norm = mean
        .sqr()
        .unwrap()
        .sum_keepdim(D::Minus1)
        .unwrap()
        .sqrt()
        .unwrap()
        .clamp(NORM_EPS, f32::MAX)
        .unwrap();
    mean.broadcast_div(&norm).unwrap()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn to_vec(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

#[test]
fn cpu_reference_matches_candle_tensor_ops() {
    for (b, s, h, lens) in [
        (1, 1, 1, vec![1]),
        (3, 7, 19, vec![7, 3, 1]),
        (4, 16, 384, vec![16, 9, 1, 12]),
        (2, 5, 300, vec![0, 5]),
    ] {
        let (hidden, mask) = inputs(b, s, h, &lens, 7);
        let ht = Tensor::from_vec(hidden, (b, s, h), &Device::Cpu).unwrap();
        let mt = Tensor::from_vec(mask, (b, s), &Device::Cpu).unwrap();
        for normalize in [false, true] {
            let got = mean_pool_l2(&ht, &mt, normalize).unwrap();
            assert_eq!(got.dims(), &[b, h]);
            assert_eq!(got.dtype(), DType::F32);
            let want = pooled_with_tensor_ops(&ht, &mt, normalize);
            let diff = max_abs_diff(&to_vec(&got), &to_vec(&want));
            assert!(
                diff <= 1e-5,
                "[{b}, {s}, {h}] normalize={normalize}: diff {diff}"
            );
        }
    }
}

#[test]
fn normalised_rows_have_unit_norm_and_an_all_masked_row_is_zero() {
    let (hidden, mask) = inputs(3, 6, 32, &[6, 0, 2], 11);
    let out = mean_pool_l2_reference(&hidden, &mask, (3, 6, 32), true);
    for (r, row) in out.chunks_exact(32).enumerate() {
        let norm = row.iter().map(|x| x * x).sum::<f32>().sqrt();
        if r == 1 {
            assert!(row.iter().all(|&x| x == 0.0), "all-masked row: {row:?}");
        } else {
            assert!((norm - 1.0).abs() < 1e-6, "row {r}: norm {norm}");
        }
    }
}

#[test]
fn padding_does_not_change_a_row() {
    // One sequence of 5 tokens alone, then padded to 12 with (different) garbage after it.
    let (h, n) = (24, 5);
    let (alone, alone_mask) = inputs(1, n, h, &[n], 3);
    let (mut padded, padded_mask) = inputs(1, 12, h, &[n], 4);
    padded[..n * h].copy_from_slice(&alone);
    let a = mean_pool_l2_reference(&alone, &alone_mask, (1, n, h), true);
    let p = mean_pool_l2_reference(&padded, &padded_mask, (1, 12, h), true);
    assert_eq!(a, p);
}

#[test]
fn mask_dtype_and_strided_hidden_states_are_accepted() {
    let (b, s, h) = (2, 4, 8);
    let (hidden, mask) = inputs(b, s, h, &[4, 2], 5);
    let ht = Tensor::from_vec(hidden.clone(), (b, s, h), &Device::Cpu).unwrap();
    let mask_u32: Vec<u32> = mask.iter().map(|&m| m as u32).collect();
    let mt = Tensor::from_vec(mask_u32, (b, s), &Device::Cpu).unwrap();
    let want = mean_pool_l2_reference(&hidden, &mask, (b, s, h), true);
    assert_eq!(to_vec(&mean_pool_l2(&ht, &mt, true).unwrap()), want);

    // The same values, stored transposed: the op makes them contiguous first.
    let strided = ht
        .transpose(1, 2)
        .unwrap()
        .contiguous()
        .unwrap()
        .transpose(1, 2)
        .unwrap();
    assert!(!strided.is_contiguous());
    assert_eq!(to_vec(&mean_pool_l2(&strided, &mt, true).unwrap()), want);

    // A row range of a batch (a non-zero start offset).
    let tail = ht.narrow(0, 1, 1).unwrap();
    let got = to_vec(&mean_pool_l2(&tail, &mt.narrow(0, 1, 1).unwrap(), true).unwrap());
    assert_eq!(got, want[h..]);
}

#[test]
fn mismatched_shapes_are_errors_and_empty_batches_are_empty() {
    let ht = Tensor::zeros((2, 3, 4), DType::F32, &Device::Cpu).unwrap();
    let bad_mask = Tensor::ones((2, 4), DType::F32, &Device::Cpu).unwrap();
    let err = mean_pool_l2(&ht, &bad_mask, true).unwrap_err();
    assert!(err.to_string().contains("mask is [2, 4]"), "{err}");
    assert!(mean_pool_l2(&ht.flatten_all().unwrap(), &bad_mask, true).is_err());

    let empty = Tensor::zeros((0, 3, 4), DType::F32, &Device::Cpu).unwrap();
    let empty_mask = Tensor::zeros((0, 3), DType::F32, &Device::Cpu).unwrap();
    assert_eq!(
        mean_pool_l2(&empty, &empty_mask, true).unwrap().dims(),
        &[0, 4]
    );
}

/// Opens `cuda:0`, or says why the GPU tests are skipped.
fn cuda_device() -> Result<Device, String> {
    quiver_kernels::Device::Cuda(0)
        .to_candle()
        .map_err(|e| e.to_string())
}

/// GPU test: the fused CUDA kernel against the CPU reference, within 1e-5. Without the
/// `cuda` feature or without a GPU it prints `skipped: no CUDA device (...)` and passes.
#[test]
fn gpu_kernel_matches_cpu_reference_or_skips_without_cuda_device() {
    let gpu = match cuda_device() {
        Ok(d) => d,
        Err(why) => {
            println!("skipped: no CUDA device ({why})");
            return;
        }
    };
    assert!(gpu.is_cuda());
    for (b, s, h, lens) in [
        (1, 1, 1, vec![1]),
        (3, 7, 19, vec![7, 3, 0]),
        (8, 128, 384, vec![128, 1, 64, 100, 7, 128, 33, 2]),
        (64, 16, 384, (0..64).map(|i| 1 + i % 16).collect()),
        (2, 40, 1000, vec![40, 13]),
    ] {
        let (hidden, mask) = inputs(b, s, h, &lens, 13);
        let ht = Tensor::from_vec(hidden.clone(), (b, s, h), &gpu).unwrap();
        let mt = Tensor::from_vec(mask.clone(), (b, s), &gpu).unwrap();
        for normalize in [false, true] {
            let got = mean_pool_l2(&ht, &mt, normalize).unwrap();
            assert!(got.device().is_cuda());
            assert_eq!(got.dims(), &[b, h]);
            let want = mean_pool_l2_reference(&hidden, &mask, (b, s, h), normalize);
            let diff = max_abs_diff(&to_vec(&got), &want);
            assert!(
                diff <= 1e-5,
                "[{b}, {s}, {h}] normalize={normalize}: diff {diff}"
            );
        }
    }
}

/// With the `cuda` feature but no usable GPU (as on CI), opening `cuda:0` is a clear
/// `Unavailable` error naming the device, not a panic. On a GPU host it prints that it
/// was skipped.
#[cfg(feature = "cuda")]
#[test]
fn cuda_open_without_a_device_names_it_or_skips_on_a_gpu_host() {
    match quiver_kernels::Device::Cuda(0).to_candle() {
        Ok(_) => println!("skipped: a CUDA device is present"),
        Err(err) => {
            assert!(
                matches!(&err, quiver_kernels::DeviceError::Unavailable { device, .. } if device == "cuda:0"),
                "{err:?}"
            );
            assert!(err.to_string().contains("cuda:0"), "{err}");
        }
    }
}
