//! GELU (erf form) and the bias-add fused with it: the activation of BERT's intermediate
//! layer (`[tokens, 4 × hidden]`, e.g. 704 × 1536 for MiniLM at batch 64 × 11 tokens), which
//! candle runs single-threaded with scalar `erf`.

use rayon::prelude::*;

use super::simd::{self, Simd, WithSimd, dispatch};
use super::{CpuKernelError, Isa};

/// Elements per parallel task: large enough that rayon's hand-off (~µs) is noise, small
/// enough that a 704 × 1536 activation splits into dozens of tasks.
const BLOCK: usize = 16 * 1024;

/// `out[i] = gelu(x[i])`, GELU in its exact erf form (PyTorch's `nn.GELU()` default),
/// within about 1e-6 relative of the f64 value (see [`simd::gelu`]); NaN stays NaN.
///
/// # Errors
///
/// [`CpuKernelError::IsaUnavailable`] when this CPU lacks `isa`;
/// [`CpuKernelError::Shape`] when `x` and `out` differ in length.
pub fn gelu(isa: Isa, x: &[f32], out: &mut [f32]) -> Result<(), CpuKernelError> {
    isa.check()?;
    if x.len() != out.len() {
        return Err(CpuKernelError::shape(
            "gelu",
            format!("input has {} elements, output {}", x.len(), out.len()),
        ));
    }
    x.par_chunks(BLOCK)
        .zip(out.par_chunks_mut(BLOCK))
        .for_each(|(x, out)| {
            dispatch(
                isa,
                GeluBlock {
                    gelu: true,
                    x,
                    out,
                    bias: None,
                },
            )
        });
    Ok(())
}

/// GELU of every element of `x`, in place: [`gelu`] without a second buffer, for an
/// activation that nothing else reads (BERT's intermediate layer, bias already added).
///
/// # Errors
///
/// [`CpuKernelError::IsaUnavailable`] when this CPU lacks `isa`.
pub fn gelu_in_place(isa: Isa, x: &mut [f32]) -> Result<(), CpuKernelError> {
    isa.check()?;
    x.par_chunks_mut(BLOCK)
        .for_each(|x| dispatch(isa, GeluInPlace { x }));
    Ok(())
}

/// [`gelu_in_place`] on the calling thread, for small inputs: a rayon call from a thread
/// outside its pool is a hand-off to the pool and back, which for a few hundred elements
/// costs far more than the arithmetic.
///
/// # Errors
///
/// [`CpuKernelError::IsaUnavailable`] when this CPU lacks `isa`.
pub fn gelu_in_place_here(isa: Isa, x: &mut [f32]) -> Result<(), CpuKernelError> {
    isa.check()?;
    for x in x.chunks_mut(BLOCK) {
        dispatch(isa, GeluInPlace { x });
    }
    Ok(())
}

/// `out[r, j] = gelu(x[r, j] + bias[j])` for `x` of `rows × bias.len()`, in one pass (the
/// bias-add of a linear layer fused with its activation).
///
/// # Errors
///
/// [`CpuKernelError::IsaUnavailable`] when this CPU lacks `isa`;
/// [`CpuKernelError::Shape`] when `bias` is empty, `x.len()` is not a multiple of
/// `bias.len()`, or `out` differs from `x` in length.
pub fn bias_gelu(isa: Isa, x: &[f32], bias: &[f32], out: &mut [f32]) -> Result<(), CpuKernelError> {
    bias_rows("bias_gelu", true, isa, x, bias, out)
}

/// `out[r, j] = x[r, j] + bias[j]` for `x` of `rows × bias.len()` (a linear layer's bias-add,
/// which candle runs single-threaded).
///
/// # Errors
///
/// As [`bias_gelu`].
pub fn bias_add(isa: Isa, x: &[f32], bias: &[f32], out: &mut [f32]) -> Result<(), CpuKernelError> {
    bias_rows("bias_add", false, isa, x, bias, out)
}

fn bias_rows(
    op: &'static str,
    gelu: bool,
    isa: Isa,
    x: &[f32],
    bias: &[f32],
    out: &mut [f32],
) -> Result<(), CpuKernelError> {
    isa.check()?;
    let n = bias.len();
    if n == 0 || !x.len().is_multiple_of(n) || x.len() != out.len() {
        return Err(CpuKernelError::shape(
            op,
            format!(
                "input has {} elements, bias {}, output {}: need input = output = rows × bias",
                x.len(),
                n,
                out.len()
            ),
        ));
    }
    let rows_per_block = (BLOCK / n).max(1);
    x.par_chunks(rows_per_block * n)
        .zip(out.par_chunks_mut(rows_per_block * n))
        .for_each(|(x, out)| {
            for (x, out) in x.chunks_exact(n).zip(out.chunks_exact_mut(n)) {
                dispatch(
                    isa,
                    GeluBlock {
                        gelu,
                        x,
                        out,
                        bias: Some(bias),
                    },
                );
            }
        });
    Ok(())
}

/// One block of GELU, with the bias (as long as the block) added first if given.
struct GeluBlock<'a> {
    /// Whether to apply GELU (else the block is a plain bias-add).
    gelu: bool,
    x: &'a [f32],
    out: &'a mut [f32],
    bias: Option<&'a [f32]>,
}

impl WithSimd for GeluBlock<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: Simd>(self, s: S) {
        let l = S::LANES;
        let n = self.x.len();
        let full = n - n % l;
        let mut i = 0;
        match self.bias {
            None => {
                while i < full {
                    let v = simd::gelu(s, s.load(&self.x[i..]));
                    s.store(&mut self.out[i..], v);
                    i += l;
                }
                if i < n {
                    let v = simd::gelu(s, s.load_tail(&self.x[i..], 0.0));
                    s.store_tail(&mut self.out[i..], v);
                }
            }
            Some(bias) => {
                while i < full {
                    let v = s.add(s.load(&self.x[i..]), s.load(&bias[i..]));
                    s.store(
                        &mut self.out[i..],
                        if self.gelu { simd::gelu(s, v) } else { v },
                    );
                    i += l;
                }
                if i < n {
                    let v = s.add(s.load_tail(&self.x[i..], 0.0), s.load_tail(&bias[i..], 0.0));
                    s.store_tail(
                        &mut self.out[i..],
                        if self.gelu { simd::gelu(s, v) } else { v },
                    );
                }
            }
        }
    }
}

struct GeluInPlace<'a> {
    x: &'a mut [f32],
}

impl WithSimd for GeluInPlace<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: Simd>(self, s: S) {
        let l = S::LANES;
        let n = self.x.len();
        let full = n - n % l;
        let mut i = 0;
        while i < full {
            let v = simd::gelu(s, s.load(&self.x[i..]));
            s.store(&mut self.x[i..], v);
            i += l;
        }
        if i < n {
            let v = simd::gelu(s, s.load_tail(&self.x[i..], 0.0));
            s.store_tail(&mut self.x[i..], v);
        }
    }
}
