//! Layer norm over the last dimension with weight and bias: twice per BERT layer and once
//! after the embeddings, on `[tokens, hidden]`.

use rayon::prelude::*;

use super::simd::{Simd, WithSimd, dispatch};
use super::{CpuKernelError, Isa};

/// Elements per parallel task (whole rows; see `elementwise::BLOCK`).
const BLOCK: usize = 16 * 1024;

/// `out[r, j] = (x[r, j] - mean_r) / sqrt(var_r + eps) * weight[j] + bias[j]` for each row
/// of `n = weight.len()` elements, with the biased variance (divided by `n`), as
/// `torch.nn.LayerNorm` and `candle_nn::LayerNorm`. The variance is computed from the
/// centred values (two passes) and the mean from values shifted by the row's first, so
/// large offsets (±1e4) do not cancel either away.
///
/// # Errors
///
/// [`CpuKernelError::IsaUnavailable`] when this CPU lacks `isa`;
/// [`CpuKernelError::Shape`] when `weight` is empty, `bias` differs from it in length,
/// `x.len()` is not a multiple of `n`, or `out` differs from `x` in length.
pub fn layer_norm(
    isa: Isa,
    x: &[f32],
    weight: &[f32],
    bias: &[f32],
    eps: f32,
    out: &mut [f32],
) -> Result<(), CpuKernelError> {
    isa.check()?;
    let n = weight.len();
    if n == 0 || bias.len() != n || !x.len().is_multiple_of(n) || x.len() != out.len() {
        return Err(CpuKernelError::shape(
            "layer_norm",
            format!(
                "input has {} elements, weight {}, bias {}, output {}: need input = output = rows × weight = rows × bias",
                x.len(),
                n,
                bias.len(),
                out.len()
            ),
        ));
    }
    let rows_per_block = (BLOCK / n).max(1);
    x.par_chunks(rows_per_block * n)
        .zip(out.par_chunks_mut(rows_per_block * n))
        .for_each(|(x, out)| {
            dispatch(
                isa,
                LayerNormRows {
                    x,
                    residual: None,
                    out,
                    weight,
                    bias,
                    eps,
                },
            );
        });
    Ok(())
}

/// `layer_norm(x + x_bias + residual)`: the end of each BERT sub-layer (a linear layer's
/// bias-add, the residual connection and the norm) in one pass; `x` and `residual` are
/// `rows × n`, `x_bias`, `weight` and `bias` are `n = weight.len()` long.
///
/// # Errors
///
/// As [`layer_norm`], and [`CpuKernelError::Shape`] when `residual` differs from `x` or
/// `x_bias` from `weight` in length.
#[allow(clippy::too_many_arguments)]
pub fn add_layer_norm(
    isa: Isa,
    x: &[f32],
    residual: &[f32],
    x_bias: &[f32],
    weight: &[f32],
    bias: &[f32],
    eps: f32,
    out: &mut [f32],
) -> Result<(), CpuKernelError> {
    isa.check()?;
    let n = weight.len();
    if n == 0
        || bias.len() != n
        || x_bias.len() != n
        || residual.len() != x.len()
        || !x.len().is_multiple_of(n)
        || x.len() != out.len()
    {
        return Err(CpuKernelError::shape(
            "add_layer_norm",
            format!(
                "input has {} elements, residual {}, input bias {}, weight {}, bias {}, output {}",
                x.len(),
                residual.len(),
                x_bias.len(),
                n,
                bias.len(),
                out.len()
            ),
        ));
    }
    let rows_per_block = (BLOCK / n).max(1);
    x.par_chunks(rows_per_block * n)
        .zip(residual.par_chunks(rows_per_block * n))
        .zip(out.par_chunks_mut(rows_per_block * n))
        .for_each(|((x, r), out)| {
            add_layer_norm_rows(isa, x, r, x_bias, weight, bias, eps, out);
        });
    Ok(())
}

/// [`add_layer_norm`] on the calling thread, for rows that one task of a product has just
/// written (see `PackedLinear::forward_add_norm`); the caller has checked the lengths.
#[allow(clippy::too_many_arguments)]
pub(crate) fn add_layer_norm_rows(
    isa: Isa,
    x: &[f32],
    residual: &[f32],
    x_bias: &[f32],
    weight: &[f32],
    bias: &[f32],
    eps: f32,
    out: &mut [f32],
) {
    dispatch(
        isa,
        LayerNormRows {
            x,
            residual: Some((residual, x_bias)),
            out,
            weight,
            bias,
            eps,
        },
    );
}

struct LayerNormRows<'a> {
    x: &'a [f32],
    /// For [`add_layer_norm`]: the residual (as long as `x`) and the bias of `x`.
    residual: Option<(&'a [f32], &'a [f32])>,
    out: &'a mut [f32],
    weight: &'a [f32],
    bias: &'a [f32],
    eps: f32,
}

impl WithSimd for LayerNormRows<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: Simd>(self, s: S) {
        let n = self.weight.len();
        match self.residual {
            None => {
                for (x, out) in self.x.chunks_exact(n).zip(self.out.chunks_exact_mut(n)) {
                    layer_norm_row(s, x, self.weight, self.bias, self.eps, out);
                }
            }
            Some((residual, x_bias)) => {
                let mut sum = vec![0.0f32; n];
                let rows = self.x.chunks_exact(n).zip(residual.chunks_exact(n));
                for ((x, r), out) in rows.zip(self.out.chunks_exact_mut(n)) {
                    add3(s, x, r, x_bias, &mut sum);
                    layer_norm_row(s, &sum, self.weight, self.bias, self.eps, out);
                }
            }
        }
    }
}

/// `out = x + r + b`, all of one length.
#[inline(always)]
fn add3<S: Simd>(s: S, x: &[f32], r: &[f32], b: &[f32], out: &mut [f32]) {
    let l = S::LANES;
    let n = out.len();
    let full = n - n % l;
    let mut i = 0;
    while i < full {
        let v = s.add(s.add(s.load(&x[i..]), s.load(&r[i..])), s.load(&b[i..]));
        s.store(&mut out[i..], v);
        i += l;
    }
    if i < n {
        let v = s.add(
            s.add(s.load_tail(&x[i..], 0.0), s.load_tail(&r[i..], 0.0)),
            s.load_tail(&b[i..], 0.0),
        );
        s.store_tail(&mut out[i..], v);
    }
}

/// Layer norm of one row `x` into `out` (see [`layer_norm`]).
#[inline(always)]
fn layer_norm_row<S: Simd>(
    s: S,
    x: &[f32],
    weight: &[f32],
    bias: &[f32],
    eps: f32,
    out: &mut [f32],
) {
    let n = weight.len();
    let l = S::LANES;
    let full = n - n % l;
    #[allow(clippy::cast_precision_loss)]
    let inv_n = 1.0 / n as f32;
    // The sum is of `x - x[0]` (the shifted-data algorithm): with an offset such as
    // 1e4 and a small spread, a plain f32 sum would round the mean by more than
    // the spread's own precision. Two accumulators halve the add-latency chain.
    let shift = x[0];
    let vshift = s.splat(shift);
    let (mut a0, mut a1) = (s.splat(0.0), s.splat(0.0));
    let mut i = 0;
    while i + 2 * l <= full {
        a0 = s.add(a0, s.sub(s.load(&x[i..]), vshift));
        a1 = s.add(a1, s.sub(s.load(&x[i + l..]), vshift));
        i += 2 * l;
    }
    while i < full {
        a0 = s.add(a0, s.sub(s.load(&x[i..]), vshift));
        i += l;
    }
    if i < n {
        // Padding lanes load `shift`, so they add 0.
        a1 = s.add(a1, s.sub(s.load_tail(&x[i..], shift), vshift));
    }
    // The mean is `shift + m`; centred values are `(x - shift) - m`, never rounding the
    // mean itself to an f32 near the offset.
    let m = s.reduce_add(s.add(a0, a1)) * inv_n;
    let vm = s.splat(m);
    let (mut q0, mut q1) = (s.splat(0.0), s.splat(0.0));
    i = 0;
    while i + 2 * l <= full {
        let d0 = s.sub(s.sub(s.load(&x[i..]), vshift), vm);
        let d1 = s.sub(s.sub(s.load(&x[i + l..]), vshift), vm);
        q0 = s.mul_add(d0, d0, q0);
        q1 = s.mul_add(d1, d1, q1);
        i += 2 * l;
    }
    while i < full {
        let d0 = s.sub(s.sub(s.load(&x[i..]), vshift), vm);
        q0 = s.mul_add(d0, d0, q0);
        i += l;
    }
    // Padding lanes load `shift`, so each adds exactly `m²`, taken off below.
    let mut padding = 0.0;
    if i < n {
        let d1 = s.sub(s.sub(s.load_tail(&x[i..], shift), vshift), vm);
        q1 = s.mul_add(d1, d1, q1);
        #[allow(clippy::cast_precision_loss)]
        let pad = (l - (n - i)) as f32;
        padding = pad * m * m;
    }
    let var = (s.reduce_add(s.add(q0, q1)) - padding).max(0.0) * inv_n;
    let rstd = s.splat(1.0 / (var + eps).sqrt());
    i = 0;
    while i < full {
        let d = s.mul(s.sub(s.sub(s.load(&x[i..]), vshift), vm), rstd);
        let y = s.mul_add(d, s.load(&weight[i..]), s.load(&bias[i..]));
        s.store(&mut out[i..], y);
        i += l;
    }
    if i < n {
        let d = s.mul(s.sub(s.sub(s.load_tail(&x[i..], 0.0), vshift), vm), rstd);
        let y = s.mul_add(
            d,
            s.load_tail(&weight[i..], 0.0),
            s.load_tail(&bias[i..], 0.0),
        );
        s.store_tail(&mut out[i..], y);
    }
}
