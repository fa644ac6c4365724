//! `dst = a · wᵀ` (or `dst += a · wᵀ`) for a linear layer's weight `w` stored as PyTorch
//! stores it (`[out, in]`, row-major), on the `gemm` crate (the one candle's CPU matmul
//! calls), written into a caller's buffer.
//!
//! For a weight used once, or where packing it ahead is not worth its own copy; a model's
//! layers use [`super::PackedLinear`] (the weight packed once at load, bias and GELU fused),
//! and the benchmarks time the two against each other. Unlike `Tensor::matmul` it writes
//! into the caller's buffer and can add a bias by accumulating onto it. Rows go in blocks
//! of [`ROW_BLOCK`]: one block's output and input stay in the caches between gemm's passes
//! over it, and a block of 1024 rows has enough work for gemm to use every thread.

use gemm::{Parallelism, gemm};

use super::CpuKernelError;

/// Rows of `a` per gemm call.
pub const ROW_BLOCK: usize = 1024;

/// `dst[m × n] = a[m × k] · w[n × k]ᵀ`, or `dst += a · wᵀ` when `accumulate` (e.g. onto a
/// bias already in `dst`). All row-major and contiguous. Multi-threaded on rayon's pool.
///
/// # Errors
///
/// [`CpuKernelError::Shape`] when a slice's length is not the product of its dimensions or
/// a dimension is 0.
pub fn matmul_transposed(
    a: &[f32],
    w: &[f32],
    dst: &mut [f32],
    (m, k, n): (usize, usize, usize),
    accumulate: bool,
) -> Result<(), CpuKernelError> {
    if m == 0 || k == 0 || n == 0 || a.len() != m * k || w.len() != n * k || dst.len() != m * n {
        return Err(CpuKernelError::shape(
            "matmul_transposed",
            format!(
                "a has {}, w {}, dst {} elements; (m, k, n) = ({m}, {k}, {n})",
                a.len(),
                w.len(),
                dst.len()
            ),
        ));
    }
    let threads = rayon::current_num_threads();
    let parallelism = if threads > 1 {
        Parallelism::Rayon(threads)
    } else {
        Parallelism::None
    };
    for (a, dst) in a.chunks(ROW_BLOCK * k).zip(dst.chunks_mut(ROW_BLOCK * n)) {
        let rows = a.len() / k;
        // SAFETY: `a` holds `rows × k` floats read with row stride k and column stride 1;
        // `w` holds `n × k`, read as the `k × n` matrix wᵀ (row stride 1, column stride k);
        // `dst` holds `rows × n`, written with row stride n and column stride 1 (read too
        // when `accumulate`). Every index gemm forms is inside its slice, `dst` does not
        // overlap the inputs (a `&mut` borrow), and the f32 type is one gemm supports.
        #[allow(clippy::cast_possible_wrap)]
        unsafe {
            gemm(
                rows,
                n,
                k,
                dst.as_mut_ptr(),
                1,
                n as isize,
                accumulate,
                a.as_ptr(),
                1,
                k as isize,
                w.as_ptr(),
                k as isize,
                1,
                // dst = alpha × dst + beta × a · wᵀ (alpha is ignored unless read_dst).
                1.0,
                1.0,
                false,
                false,
                false,
                parallelism,
            );
        }
    }
    Ok(())
}
