//! Quiver's own CPU kernels for the hot element-wise and attention ops of a BERT forward.
//!
//! `DESIGN.md` makes the CPU a first-class device (CPU workers serve the overflow), but
//! candle 0.11 runs GELU, softmax and the attention glue single-threaded with scalar math:
//! on MiniLM a 704 × 1536 GELU costs as much as the matrix product before it. The kernels
//! here are vectorised (AVX-512 or AVX2 + FMA, chosen at run time, with a portable scalar
//! fallback) and split rows over rayon's global pool, the one candle's matrix products use.
//!
//! Two levels:
//!
//! - slice functions ([`gelu_slice`], [`gelu_in_place_slice`], [`bias_gelu_slice`],
//!   [`bias_add_slice`], [`softmax_last_dim_slice`], [`layer_norm_slice`],
//!   [`add_layer_norm_slice`], [`attention_slice`], [`attention_packed_slice`]) take an
//!   [`Isa`], so tests and benchmarks can force each path on a CPU that has several;
//!   [`PackedLinear`] (a linear layer on its weight packed once for Quiver's own
//!   register-tiled product, with the bias and GELU fused into it) and
//!   [`matmul_transposed_slice`] (the same product on `gemm`, the weight as stored) write
//!   into a caller's buffer;
//! - tensor functions ([`gelu`], [`bias_gelu`], [`bias_add`], [`softmax_last_dim`],
//!   [`layer_norm`], [`add_layer_norm`], [`attention`], [`attention_packed`]) take and return
//!   `candle_core::Tensor`s on the CPU device, f32, and use
//!   [`Isa::detect`]. A non-contiguous input is copied to a contiguous one first; the
//!   output is always a fresh contiguous tensor. Their error converts into
//!   `candle_core::Error`, so they drop into candle model code with `?`.
//!
//! [`QuantizedLinear`] is [`PackedLinear`] on int8 weights (dynamic quantization, see
//! [`quantize_rows`] and [`quantize_weights`]; kernels per [`Int8Isa`]: AVX-512 VNNI, AVX2,
//! scalar), the linear layers of a [`CpuBert`] loaded at [`Precision::Int8`].
//!
//! [`CpuBert`] is a BERT encoder built from these (its linear layers [`PackedLinear`]s), loading
//! the same weights as candle-transformers' `BertModel`: the text-embedding model's encoder
//! on the CPU device unless its `cpu_kernels` setting is off.
//!
//! Accuracy: GELU within about 1e-6 relative of the f64 erf form; softmax, layer norm and
//! attention within a few f32 ulps of f64 references (`kernels/tests/cpu_kernels.rs`).

#![allow(unsafe_code)]

mod attention;
mod bert;
mod elementwise;
mod layer_norm;
mod linear;
mod linear_i8;
mod matmul;
mod quant;
mod simd;
mod softmax;
mod split;

use candle_core::{DType, Device, Storage, Tensor};

pub use attention::{
    AttentionShape, attention as attention_slice, attention_packed as attention_packed_slice,
};
pub use bert::CpuBert;
pub use elementwise::{
    bias_add as bias_add_slice, bias_gelu as bias_gelu_slice, gelu as gelu_slice,
    gelu_in_place as gelu_in_place_slice, gelu_in_place_here as gelu_in_place_here_slice,
};
pub use layer_norm::{add_layer_norm as add_layer_norm_slice, layer_norm as layer_norm_slice};
pub use linear::{Activation, PackedLinear};
pub use linear_i8::{MAX_IN_FEATURES as INT8_MAX_IN_FEATURES, QuantizedLinear};
pub use matmul::{ROW_BLOCK as MATMUL_ROW_BLOCK, matmul_transposed as matmul_transposed_slice};
pub use quant::{Int8Isa, QuantizedRows, WEIGHT_LEVELS, quantize_rows, quantize_weights};
pub use softmax::softmax_last_dim as softmax_last_dim_slice;

/// The arithmetic of [`CpuBert`]'s linear layers (the config's `precision`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum Precision {
    /// f32 weights and products ([`PackedLinear`]).
    #[default]
    Fp32,
    /// Dynamic int8 quantization ([`QuantizedLinear`]): int8 weights per output channel,
    /// u8 activations per row, i32 sums; attention, softmax and layer norm stay f32.
    Int8,
}

impl Precision {
    /// The config's name for it: `"fp32"` or `"int8"`.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Precision::Fp32 => "fp32",
            Precision::Int8 => "int8",
        }
    }
}

/// An instruction set a kernel can run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Isa {
    /// Portable one-lane code; available everywhere.
    Scalar,
    /// x86-64 AVX2 with FMA, 8 lanes.
    Avx2,
    /// x86-64 AVX-512F (with AVX2 and FMA), 16 lanes.
    Avx512,
}

impl Isa {
    /// Every instruction set, widest last.
    pub const ALL: [Isa; 3] = [Isa::Scalar, Isa::Avx2, Isa::Avx512];

    /// Whether this CPU can run `self` (runtime detection; cached by std).
    #[must_use]
    pub fn is_available(self) -> bool {
        match self {
            Isa::Scalar => true,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => {
                // The AVX-512 entry point also enables AVX2 and FMA (for the 256-bit helpers
                // LLVM may pick), so all three are required.
                is_x86_feature_detected!("avx512f")
                    && is_x86_feature_detected!("avx2")
                    && is_x86_feature_detected!("fma")
            }
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }

    /// The widest instruction set this CPU has.
    #[must_use]
    ///
    /// `QUIVER_CPU_ISA=scalar|avx2|avx512` in the environment caps it (to compare the
    /// paths on one machine, or to rule a wide path out); a value that is not one of those,
    /// or names an instruction set this CPU lacks, is ignored.
    pub fn detect() -> Isa {
        let widest = Isa::ALL
            .into_iter()
            .rev()
            .find(|isa| isa.is_available())
            .unwrap_or(Isa::Scalar);
        let cap = match std::env::var("QUIVER_CPU_ISA").as_deref() {
            Ok("scalar") => Isa::Scalar,
            Ok("avx2") => Isa::Avx2,
            Ok("avx512") => Isa::Avx512,
            _ => return widest,
        };
        if cap.is_available() { cap } else { widest }
    }

    /// The instruction sets this CPU has, narrowest first.
    #[must_use]
    pub fn available() -> Vec<Isa> {
        Isa::ALL
            .into_iter()
            .filter(|isa| isa.is_available())
            .collect()
    }

    fn check(self) -> Result<(), CpuKernelError> {
        if self.is_available() {
            Ok(())
        } else {
            Err(CpuKernelError::IsaUnavailable(self))
        }
    }
}

/// What a CPU kernel call got wrong. All are the caller's (a model's) fault, not a client's:
/// the model validates client input before it reaches a kernel.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CpuKernelError {
    /// The instruction set asked for is not on this CPU.
    #[error("instruction set {0:?} is not available on this CPU")]
    IsaUnavailable(Isa),
    /// The int8 instruction set asked for is not on this CPU.
    #[error("int8 instruction set {0:?} is not available on this CPU")]
    Int8IsaUnavailable(Int8Isa),
    /// Slice lengths or tensor shapes do not fit together.
    #[error("{op}: {what}")]
    Shape {
        /// The kernel.
        op: &'static str,
        /// What does not fit.
        what: String,
    },
    /// A tensor is not on the CPU device.
    #[error("{op}: tensor is on {device}, the CPU kernels need the CPU device")]
    NotCpu {
        /// The kernel.
        op: &'static str,
        /// The tensor's device location.
        device: String,
    },
    /// A tensor is not f32.
    #[error("{op}: tensor is {dtype:?}, the CPU kernels need f32")]
    Dtype {
        /// The kernel.
        op: &'static str,
        /// The tensor's dtype.
        dtype: DType,
    },
    /// candle failed (making a tensor contiguous, or building the output).
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

impl CpuKernelError {
    fn shape(op: &'static str, what: String) -> Self {
        CpuKernelError::Shape { op, what }
    }
}

impl From<CpuKernelError> for candle_core::Error {
    fn from(e: CpuKernelError) -> Self {
        match e {
            CpuKernelError::Candle(e) => e,
            e => candle_core::Error::wrap(e),
        }
    }
}

/// Runs `f` on the contiguous f32 elements of `t` (copied to a contiguous tensor first if
/// need be), checking it is on the CPU device.
fn with_f32<R>(
    op: &'static str,
    t: &Tensor,
    f: impl FnOnce(&[f32]) -> Result<R, CpuKernelError>,
) -> Result<R, CpuKernelError> {
    if !t.device().is_cpu() {
        return Err(CpuKernelError::NotCpu {
            op,
            device: format!("{:?}", t.device().location()),
        });
    }
    if t.dtype() != DType::F32 {
        return Err(CpuKernelError::Dtype {
            op,
            dtype: t.dtype(),
        });
    }
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else {
        return Err(CpuKernelError::NotCpu {
            op,
            device: format!("{:?}", t.device().location()),
        });
    };
    let all = cpu.as_slice::<f32>()?;
    let Some((start, end)) = layout.contiguous_offsets() else {
        // `contiguous()` above makes this unreachable; report rather than assume.
        return Err(CpuKernelError::shape(
            op,
            "tensor is not contiguous".to_owned(),
        ));
    };
    f(&all[start..end])
}

fn fresh(shape: &candle_core::Shape, out: Vec<f32>) -> Result<Tensor, CpuKernelError> {
    Ok(Tensor::from_vec(out, shape.clone(), &Device::Cpu)?)
}

fn last_dim(op: &'static str, t: &Tensor) -> Result<usize, CpuKernelError> {
    t.dims().last().copied().filter(|&n| n > 0).ok_or_else(|| {
        CpuKernelError::shape(op, format!("shape {:?} has no last dimension", t.dims()))
    })
}

/// GELU (exact erf form, PyTorch's `nn.GELU()` default) of every element; replaces
/// candle's `Tensor::gelu_erf`. See [`gelu_slice`].
///
/// # Errors
///
/// [`CpuKernelError::NotCpu`] / [`CpuKernelError::Dtype`] unless `x` is an f32 CPU tensor.
pub fn gelu(x: &Tensor) -> Result<Tensor, CpuKernelError> {
    let mut out = vec![0.0; x.elem_count()];
    with_f32("gelu", x, |x| gelu_slice(Isa::detect(), x, &mut out))?;
    fresh(x.shape(), out)
}

/// `gelu(x + bias)` with `bias` broadcast along the last dimension of `x` (a linear layer's
/// bias-add fused with its activation). See [`bias_gelu_slice`].
///
/// # Errors
///
/// As [`gelu`], and [`CpuKernelError::Shape`] unless `bias` has as many elements as the
/// last dimension of `x`.
pub fn bias_gelu(x: &Tensor, bias: &Tensor) -> Result<Tensor, CpuKernelError> {
    let n = last_dim("bias_gelu", x)?;
    if bias.elem_count() != n {
        return Err(CpuKernelError::shape(
            "bias_gelu",
            format!(
                "bias shape {:?} does not match input shape {:?}",
                bias.dims(),
                x.dims()
            ),
        ));
    }
    let mut out = vec![0.0; x.elem_count()];
    with_f32("bias_gelu", x, |x| {
        with_f32("bias_gelu", bias, |b| {
            bias_gelu_slice(Isa::detect(), x, b, &mut out)
        })
    })?;
    fresh(x.shape(), out)
}

/// Softmax over the last dimension; replaces `candle_nn::ops::softmax(x, D::Minus1)` and
/// `candle_nn::ops::softmax_last_dim`. Fully `-inf` rows give zeros (see
/// [`softmax_last_dim_slice`]).
///
/// # Errors
///
/// As [`gelu`], and [`CpuKernelError::Shape`] for a scalar or an empty last dimension.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor, CpuKernelError> {
    let n = last_dim("softmax_last_dim", x)?;
    let mut out = vec![0.0; x.elem_count()];
    with_f32("softmax_last_dim", x, |x| {
        softmax_last_dim_slice(Isa::detect(), x, n, &mut out)
    })?;
    fresh(x.shape(), out)
}

/// Layer norm over the last dimension with `weight` and `bias` (each as long as it);
/// replaces `candle_nn::LayerNorm::forward` / `candle_nn::ops::layer_norm`. See
/// [`layer_norm_slice`].
///
/// # Errors
///
/// As [`gelu`], and [`CpuKernelError::Shape`] unless `weight` and `bias` have as many
/// elements as the last dimension of `x`.
pub fn layer_norm(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f32,
) -> Result<Tensor, CpuKernelError> {
    let n = last_dim("layer_norm", x)?;
    if weight.elem_count() != n || bias.elem_count() != n {
        return Err(CpuKernelError::shape(
            "layer_norm",
            format!(
                "weight shape {:?} / bias shape {:?} do not match input shape {:?}",
                weight.dims(),
                bias.dims(),
                x.dims()
            ),
        ));
    }
    let mut out = vec![0.0; x.elem_count()];
    with_f32("layer_norm", x, |x| {
        with_f32("layer_norm", weight, |w| {
            with_f32("layer_norm", bias, |b| {
                layer_norm_slice(Isa::detect(), x, w, b, eps, &mut out)
            })
        })
    })?;
    fresh(x.shape(), out)
}

/// Multi-head attention `softmax(q kᵀ / √d + mask) v` on the projections' own layout:
/// `q` is `[batch, q_len, hidden]`, `k` and `v` are `[batch, kv_len, hidden]`, `hidden =
/// heads × d`; `mask` is additive with `batch × kv_len` elements (`[batch, kv_len]`, or
/// BERT's extended `[batch, 1, 1, kv_len]`). Returns `[batch, q_len, hidden]`, which is what
/// candle-transformers' `BertSelfAttention::forward` returns after its transposes. See
/// [`attention_slice`].
///
/// # Errors
///
/// As [`gelu`], and [`CpuKernelError::Shape`] when the shapes do not fit together or
/// `heads` does not divide the hidden size.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    heads: usize,
) -> Result<Tensor, CpuKernelError> {
    let bad = |what: String| CpuKernelError::shape("attention", what);
    let (batch, q_len, hidden) = q.dims3().map_err(|_| {
        bad(format!(
            "q shape {:?} is not [batch, seq, hidden]",
            q.dims()
        ))
    })?;
    let (kb, kv_len, kh) = k.dims3().map_err(|_| {
        bad(format!(
            "k shape {:?} is not [batch, seq, hidden]",
            k.dims()
        ))
    })?;
    if kb != batch || kh != hidden || v.dims() != k.dims() {
        return Err(bad(format!(
            "q {:?}, k {:?}, v {:?} do not fit together",
            q.dims(),
            k.dims(),
            v.dims()
        )));
    }
    if heads == 0 || hidden % heads != 0 {
        return Err(bad(format!(
            "{heads} heads do not divide hidden size {hidden}"
        )));
    }
    let shape = AttentionShape {
        batch,
        heads,
        q_len,
        kv_len,
        head_dim: hidden / heads,
    };
    let mut out = vec![0.0; q.elem_count()];
    with_f32("attention", q, |q| {
        with_f32("attention", k, |k| {
            with_f32("attention", v, |v| match mask {
                None => attention_slice(Isa::detect(), shape, q, k, v, None, &mut out),
                Some(m) => with_f32("attention", m, |m| {
                    attention_slice(Isa::detect(), shape, q, k, v, Some(m), &mut out)
                }),
            })
        })
    })?;
    fresh(q.shape(), out)
}

/// `x + bias`, `bias` broadcast along the last dimension (a linear layer's bias-add). See
/// [`bias_add_slice`].
///
/// # Errors
///
/// As [`bias_gelu`].
pub fn bias_add(x: &Tensor, bias: &Tensor) -> Result<Tensor, CpuKernelError> {
    let n = last_dim("bias_add", x)?;
    if bias.elem_count() != n {
        return Err(CpuKernelError::shape(
            "bias_add",
            format!(
                "bias shape {:?} does not match input shape {:?}",
                bias.dims(),
                x.dims()
            ),
        ));
    }
    let mut out = vec![0.0; x.elem_count()];
    with_f32("bias_add", x, |x| {
        with_f32("bias_add", bias, |b| {
            bias_add_slice(Isa::detect(), x, b, &mut out)
        })
    })?;
    fresh(x.shape(), out)
}

/// `layer_norm(x + x_bias + residual, weight, bias, eps)` over the last dimension, in one
/// pass: the end of each BERT sub-layer. See [`add_layer_norm_slice`].
///
/// # Errors
///
/// As [`layer_norm`], and [`CpuKernelError::Shape`] unless `residual` has `x`'s shape and
/// `x_bias` as many elements as its last dimension.
pub fn add_layer_norm(
    x: &Tensor,
    residual: &Tensor,
    x_bias: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f32,
) -> Result<Tensor, CpuKernelError> {
    let n = last_dim("add_layer_norm", x)?;
    if residual.dims() != x.dims()
        || x_bias.elem_count() != n
        || weight.elem_count() != n
        || bias.elem_count() != n
    {
        return Err(CpuKernelError::shape(
            "add_layer_norm",
            format!(
                "input {:?}, residual {:?}, input bias {:?}, weight {:?}, bias {:?} do not fit",
                x.dims(),
                residual.dims(),
                x_bias.dims(),
                weight.dims(),
                bias.dims()
            ),
        ));
    }
    let mut out = vec![0.0; x.elem_count()];
    let op = "add_layer_norm";
    with_f32(op, x, |x| {
        with_f32(op, residual, |r| {
            with_f32(op, x_bias, |xb| {
                with_f32(op, weight, |w| {
                    with_f32(op, bias, |b| {
                        add_layer_norm_slice(Isa::detect(), x, r, xb, w, b, eps, &mut out)
                    })
                })
            })
        })
    })?;
    fresh(x.shape(), out)
}

/// [`attention`] on the fused projection `qkv` `[batch, seq, 3 × hidden]` (query, key and
/// value side by side in each row); returns `[batch, seq, hidden]`. See
/// [`attention_packed_slice`].
///
/// # Errors
///
/// As [`attention`].
pub fn attention_packed(
    qkv: &Tensor,
    mask: Option<&Tensor>,
    heads: usize,
) -> Result<Tensor, CpuKernelError> {
    let bad = |what: String| CpuKernelError::shape("attention_packed", what);
    let (batch, seq, three_hidden) = qkv.dims3().map_err(|_| {
        bad(format!(
            "qkv shape {:?} is not [batch, seq, 3 × hidden]",
            qkv.dims()
        ))
    })?;
    let hidden = three_hidden / 3;
    if heads == 0 || three_hidden % 3 != 0 || hidden % heads != 0 {
        return Err(bad(format!(
            "qkv width {three_hidden} is not 3 × {heads} heads × d"
        )));
    }
    let shape = AttentionShape {
        batch,
        heads,
        q_len: seq,
        kv_len: seq,
        head_dim: hidden / heads,
    };
    let mut out = vec![0.0; batch * seq * hidden];
    with_f32("attention_packed", qkv, |qkv| match mask {
        None => attention_packed_slice(Isa::detect(), shape, qkv, None, &mut out),
        Some(m) => with_f32("attention_packed", m, |m| {
            attention_packed_slice(Isa::detect(), shape, qkv, Some(m), &mut out)
        }),
    })?;
    fresh(&candle_core::Shape::from((batch, seq, hidden)), out)
}
