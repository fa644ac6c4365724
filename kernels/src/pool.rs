//! Fused masked mean pooling + L2 normalisation: the last step of a sentence encoder,
//! turning the transformer's hidden state `[b, s, h]` and the attention mask `[b, s]` into
//! one embedding per input, `[b, h]`.
//!
//! In the design (`DESIGN.md`, "Models") the text-embedding model calls [`mean_pool_l2`]
//! on whatever device it runs on. It is a candle [`CustomOp2`]:
//!
//! - on the CPU, [`mean_pool_l2_reference`]'s plain-Rust loop (the reference that the GPU
//!   kernel is tested against, and itself tested against candle's tensor ops);
//! - with the `cuda` feature on a CUDA device, the kernel `kernels/cuda/pool.cu`, compiled to
//!   PTX by `build.rs`, loaded once per device through candle's re-export of cudarc
//!   (`CudaDevice::get_or_load_custom_func`) and launched on the device's stream: one pass
//!   over the hidden state instead of the eight kernels and temporaries of the tensor-op
//!   version.
//!
//! The semantics are sentence-transformers': masked rows are skipped, the sum is divided by
//! `max(Σ mask, 1e-9)` (an all-masked row pools to zeros), and normalisation divides by
//! `max(‖x‖₂, 1e-12)` (as `torch.nn.functional.normalize`).

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Shape, Tensor};

/// The smallest mask sum divided by (sentence-transformers' `clamp(min=1e-9)`).
pub const MASK_SUM_EPS: f32 = 1e-9;
/// The smallest norm divided by when normalising (`torch.nn.functional.normalize`).
pub const NORM_EPS: f32 = 1e-12;

/// Mean-pools `hidden` (`[b, s, h]`) over the positions where `mask` (`[b, s]`, 1 = token,
/// 0 = padding) is non-zero, then, if `normalize`, scales each row to unit L2 norm.
///
/// Returns `[b, h]` in F32 on `hidden`'s device, whatever the input dtypes (the mask may be
/// any dtype, e.g. the tokenizer's U32; it is moved to `hidden`'s device if needed). On a
/// CUDA device this runs the fused kernel; elsewhere the CPU reference. Errors if the ranks
/// or the `[b, s]` dimensions disagree, or if the device fails.
pub fn mean_pool_l2(
    hidden: &Tensor,
    mask: &Tensor,
    normalize: bool,
) -> candle_core::Result<Tensor> {
    let (b, s, h) = hidden.dims3()?;
    let (mb, ms) = mask.dims2()?;
    if (mb, ms) != (b, s) {
        candle_core::bail!(
            "mean_pool_l2: mask is [{mb}, {ms}] but the hidden state is [{b}, {s}, {h}]"
        );
    }
    let hidden = hidden.to_dtype(DType::F32)?.contiguous()?;
    let mask = mask
        .to_device(hidden.device())?
        .to_dtype(DType::F32)?
        .contiguous()?;
    if b == 0 || h == 0 {
        return Tensor::zeros((b, h), DType::F32, hidden.device());
    }
    hidden.apply_op2_no_bwd(&mask, &MeanPoolL2 { normalize })
}

/// The CPU reference of [`mean_pool_l2`] on plain slices: `hidden` is `[b, s, h]` and `mask`
/// `[b, s]`, both row-major; returns `[b, h]` row-major. Panics if the slice lengths do not
/// match the dimensions (a programming error; [`mean_pool_l2`] checks shapes first).
pub fn mean_pool_l2_reference(
    hidden: &[f32],
    mask: &[f32],
    (b, s, h): (usize, usize, usize),
    normalize: bool,
) -> Vec<f32> {
    assert_eq!(hidden.len(), b * s * h, "hidden is not [b, s, h]");
    assert_eq!(mask.len(), b * s, "mask is not [b, s]");
    let mut out = vec![0f32; b * h];
    for r in 0..b {
        let h_row = &hidden[r * s * h..(r + 1) * s * h];
        let m_row = &mask[r * s..(r + 1) * s];
        let o_row = &mut out[r * h..(r + 1) * h];
        let count: f32 = m_row.iter().sum();
        for (t, &m) in m_row.iter().enumerate() {
            if m != 0.0 {
                let token = &h_row[t * h..(t + 1) * h];
                for (o, &x) in o_row.iter_mut().zip(token) {
                    *o += x * m;
                }
            }
        }
        let denom = count.max(MASK_SUM_EPS);
        o_row.iter_mut().for_each(|o| *o /= denom);
        if normalize {
            let norm = o_row.iter().map(|x| x * x).sum::<f32>().sqrt();
            let scale = 1.0 / norm.max(NORM_EPS);
            o_row.iter_mut().for_each(|o| *o *= scale);
        }
    }
    out
}

/// The custom op: argument 1 the hidden state `[b, s, h]`, argument 2 the mask `[b, s]`, both
/// F32 and contiguous ([`mean_pool_l2`] sees to that).
#[derive(Clone, Copy, Debug)]
struct MeanPoolL2 {
    normalize: bool,
}

/// The contiguous element range of a layout, or an error naming the argument.
fn contiguous_range(layout: &Layout, what: &str) -> candle_core::Result<(usize, usize)> {
    layout
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg(format!("mean_pool_l2: {what} is not contiguous")))
}

impl CustomOp2 for MeanPoolL2 {
    fn name(&self) -> &'static str {
        "quiver-mean-pool-l2"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (b, s, h) = l1.shape().dims3()?;
        let (h0, h1) = contiguous_range(l1, "the hidden state")?;
        let (m0, m1) = contiguous_range(l2, "the mask")?;
        let hidden = &s1.as_slice::<f32>()?[h0..h1];
        let mask = &s2.as_slice::<f32>()?[m0..m1];
        let out = mean_pool_l2_reference(hidden, mask, (b, s, h), self.normalize);
        Ok((CpuStorage::F32(out), Shape::from((b, h))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        cuda::forward(self.normalize, s1, l1, s2, l2)
    }
}

#[cfg(feature = "cuda")]
#[allow(unsafe_code)]
mod cuda {
    //! The launch of `kernels/cuda/pool.cu` (unsafe: a raw kernel launch through cudarc).

    use candle_core::cuda_backend::WrapErr;
    use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
    use candle_core::{CudaStorage, Layout, Shape};

    use super::contiguous_range;

    /// The PTX of `kernels/cuda/pool.cu`, built by `build.rs`.
    const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/pool.ptx"));
    /// The module name the PTX is cached under, per device.
    const MODULE: &str = "quiver_pool";
    const FUNCTION: &str = "quiver_mean_pool_l2_f32";
    /// Threads per block; must match `POOL_THREADS` in `pool.cu`.
    const THREADS: u32 = 256;

    pub(super) fn forward(
        normalize: bool,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let (b, s, h) = l1.shape().dims3()?;
        let (h0, h1) = contiguous_range(l1, "the hidden state")?;
        let (m0, m1) = contiguous_range(l2, "the mask")?;
        let too_big =
            || candle_core::Error::Msg(format!("mean_pool_l2: [{b}, {s}, {h}] too large"));
        let grid = u32::try_from(b).map_err(|_| too_big())?;
        let seq = u32::try_from(s).map_err(|_| too_big())?;
        let dim = u32::try_from(h).map_err(|_| too_big())?;

        let dev = &s1.device;
        let hidden = s1.as_cuda_slice::<f32>()?.slice(h0..h1);
        let mask = s2.as_cuda_slice::<f32>()?.slice(m0..m1);
        let func = dev.get_or_load_custom_func(FUNCTION, MODULE, PTX)?;
        // SAFETY: the kernel writes every one of the b * h elements before anything reads
        // them (each block writes its whole row, and the grid covers all b rows).
        let out = unsafe { dev.alloc::<f32>(b * h)? };
        let flag = u32::from(normalize);
        let cfg = LaunchConfig {
            grid_dim: (grid, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut builder = func.builder();
        builder.arg(&hidden);
        builder.arg(&mask);
        builder.arg(&out);
        builder.arg(&seq);
        builder.arg(&dim);
        builder.arg(&flag);
        // SAFETY: the argument list matches the kernel's signature (three f32 pointers and
        // three u32); `hidden` holds b * s * h and `mask` b * s elements (the contiguous
        // ranges of [b, s, h] and [b, s] layouts), `out` b * h, and the kernel reads and
        // writes only within those bounds for the grid (b) it is launched with.
        unsafe { builder.launch(cfg) }.w()?;
        Ok((
            CudaStorage::wrap_cuda_slice(out, dev.clone()),
            Shape::from((b, h)),
        ))
    }
}
