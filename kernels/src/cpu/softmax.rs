//! Softmax over the last dimension: the attention probabilities (`[batch × heads, s, s]`),
//! which stock candle-transformers BERT computes with five single-threaded element-wise ops.

use rayon::prelude::*;

use super::simd::{Simd, WithSimd, dispatch, exp};
use super::{CpuKernelError, Isa};

/// Elements per parallel task (whole rows; see `elementwise::BLOCK`).
const BLOCK: usize = 16 * 1024;

/// Softmax of each row of `n` elements of `x` (`x.len()` a multiple of `n`) into `out`.
///
/// `-inf` entries get probability exactly 0. A row whose entries are all `-inf` (a fully
/// masked row) is all zeros rather than NaN: it attends to nothing. Rows holding `+inf` or
/// NaN give NaN.
///
/// # Errors
///
/// [`CpuKernelError::IsaUnavailable`] when this CPU lacks `isa`;
/// [`CpuKernelError::Shape`] when `n` is 0, `x.len()` is not a multiple of `n`, or `out`
/// differs from `x` in length.
pub fn softmax_last_dim(
    isa: Isa,
    x: &[f32],
    n: usize,
    out: &mut [f32],
) -> Result<(), CpuKernelError> {
    isa.check()?;
    if n == 0 || !x.len().is_multiple_of(n) || x.len() != out.len() {
        return Err(CpuKernelError::shape(
            "softmax_last_dim",
            format!(
                "input has {} elements, output {}, row length {n}: need input = output = rows × n, n > 0",
                x.len(),
                out.len()
            ),
        ));
    }
    let rows_per_block = (BLOCK / n).max(1);
    x.par_chunks(rows_per_block * n)
        .zip(out.par_chunks_mut(rows_per_block * n))
        .for_each(|(x, out)| dispatch(isa, SoftmaxRows { x, out, n }));
    Ok(())
}

struct SoftmaxRows<'a> {
    x: &'a [f32],
    out: &'a mut [f32],
    n: usize,
}

impl WithSimd for SoftmaxRows<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: Simd>(self, s: S) {
        for (x, out) in self
            .x
            .chunks_exact(self.n)
            .zip(self.out.chunks_exact_mut(self.n))
        {
            out.copy_from_slice(x);
            softmax_row(s, out);
        }
    }
}

/// Softmax of `row` in place (see [`softmax_last_dim`] for the edge cases).
#[inline(always)]
pub(crate) fn softmax_row<S: Simd>(s: S, row: &mut [f32]) {
    let l = S::LANES;
    let n = row.len();
    let full = n - n % l;
    let mut m = s.splat(f32::NEG_INFINITY);
    let mut i = 0;
    while i < full {
        m = s.max(s.load(&row[i..]), m);
        i += l;
    }
    if i < n {
        m = s.max(s.load_tail(&row[i..], f32::NEG_INFINITY), m);
    }
    let max = s.reduce_max(m);
    if max == f32::NEG_INFINITY {
        row.fill(0.0);
        return;
    }
    let vmax = s.splat(max);
    let mut acc = s.splat(0.0);
    i = 0;
    while i < full {
        let e = exp(s, s.sub(s.load(&row[i..]), vmax));
        s.store(&mut row[i..], e);
        acc = s.add(acc, e);
        i += l;
    }
    if i < n {
        let e = exp(s, s.sub(s.load_tail(&row[i..], f32::NEG_INFINITY), vmax));
        s.store_tail(&mut row[i..], e);
        acc = s.add(acc, e);
    }
    let inv = s.splat(1.0 / s.reduce_add(acc));
    i = 0;
    while i < full {
        let v = s.mul(s.load(&row[i..]), inv);
        s.store(&mut row[i..], v);
        i += l;
    }
    if i < n {
        let v = s.mul(s.load_tail(&row[i..], 0.0), inv);
        s.store_tail(&mut row[i..], v);
    }
}
