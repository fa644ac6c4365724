//! A linear layer on int8 weights (dynamic quantization): `dst = act(a · wᵀ + bias)` as
//! [`PackedLinear`] computes it, with `w` quantized once at load per output channel and
//! each row of `a` quantized when the layer runs (see [`super::quant`]). The product runs on
//! integers, summed exactly in i32; the bias, and GELU, are applied in f32 after
//! dequantization: `y = (Σ u q - z Σ q) × (s_row × s_col) + bias` (one FMA).
//!
//! Kernels, picked by [`Int8Isa`]:
//! - `Avx512Vnni`: `vpdpbusd` (u8 activations × i8 weights, four products into each i32
//!   lane, no intermediate saturation); tile 8 rows × 48 outputs (24 zmm accumulators), the
//!   weights packed as `[depth / 4][48][4]` per panel;
//! - `Avx2`: `vpmaddwd` on 16-bit operands (the u8 levels and i8 weights widened, so no
//!   product pair can saturate as `vpmaddubsw`'s i16 sums of u8 × i8 would); tile 6 rows ×
//!   16 outputs, the weights packed as `[depth / 2][16][2]` i16;
//! - `Scalar`: the reference, a plain i32 dot product per output on the unpacked weights.
//!
//! Integer sums are exact on every path, and the f32 epilogue is the same operations in
//! the same order, so every kernel gives the scalar reference's output bit for bit
//! (`kernels/tests/cpu_int8.rs`).
//!
//! Work is split over rayon's pool as [`PackedLinear::forward`] splits it (`super::split`):
//! equal blocks of at most `MC` rows by ranges of column panels.

use std::cell::RefCell;
use std::ops::Range;

use rayon::prelude::*;

use super::linear::AddNorm;
use super::quant::{Int8Isa, QuantizedRows, quantize_rows, quantize_weights};
use super::split::Split;
use super::{Activation, CpuKernelError, PackedLinear};

/// The most rows of `a` per task (see `super::split`).
const MC: usize = 48;
/// Rows per parallel task of the GELU pass.
const GELU_ROWS: usize = 16;
/// The most input features: keeps every i32 sum exact (`65536 × 255 × 127 < 2³¹`).
pub const MAX_IN_FEATURES: usize = 1 << 16;

/// A linear layer's weight quantized to int8 (per output channel) and packed for one
/// [`Int8Isa`]'s micro-kernel, with its f32 bias.
#[derive(Clone)]
pub struct QuantizedLinear {
    isa: Int8Isa,
    out_features: usize,
    in_features: usize,
    /// Outputs per panel.
    nr: usize,
    /// `Scalar`: `[out, in]` as quantized; `Avx512Vnni`: panels `[in / 4][nr][4]`.
    packed: Vec<i8>,
    /// `Avx2`: panels `[in / 2][nr][2]`, widened.
    packed16: Vec<i16>,
    /// Per output, padded with zeros to a multiple of `nr`: the weight scale, the sum of
    /// the quantized weights, the bias (zeros for none).
    scale: Vec<f32>,
    sum: Vec<i32>,
    bias: Vec<f32>,
}

impl std::fmt::Debug for QuantizedLinear {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QuantizedLinear")
            .field("isa", &self.isa)
            .field("out_features", &self.out_features)
            .field("in_features", &self.in_features)
            .finish_non_exhaustive()
    }
}

fn panel_width(isa: Int8Isa) -> usize {
    match isa {
        // Not a register tile: the unit of the column split.
        Int8Isa::Scalar => 16,
        Int8Isa::Avx2 => 16,
        Int8Isa::Avx512Vnni => 48,
    }
}

thread_local! {
    /// The quantized activations of the calling thread's last forward, reused: a fresh
    /// buffer per layer is paid again in page faults.
    static SCRATCH: RefCell<QuantizedRows> = RefCell::default();
}

/// The most quantized-activation bytes a thread keeps between forwards.
const SCRATCH_KEEP_BYTES: usize = 64 << 20;

/// Where a task writes: f32 outputs, or (for tests) the integer sums.
#[derive(Clone, Copy)]
enum Out {
    F32(*mut f32),
    I32(*mut i32),
}

// SAFETY: the tasks that share it write disjoint rectangles of the buffer (see `run`).
unsafe impl Send for Out {}
// SAFETY: as above.
unsafe impl Sync for Out {}

impl QuantizedLinear {
    /// Quantizes and packs `weight` (`[out_features, in_features]`, row-major) with `bias`
    /// (`[out_features]`) for `isa`.
    ///
    /// # Errors
    ///
    /// [`CpuKernelError::Int8IsaUnavailable`] when this CPU lacks `isa`;
    /// [`CpuKernelError::Shape`] when a dimension is 0, `in_features` exceeds
    /// [`MAX_IN_FEATURES`] or a slice's length does not match.
    pub fn new(
        isa: Int8Isa,
        weight: &[f32],
        bias: Option<&[f32]>,
        out_features: usize,
        in_features: usize,
    ) -> Result<Self, CpuKernelError> {
        isa.check()?;
        let (n, k) = (out_features, in_features);
        if n == 0
            || k == 0
            || k > MAX_IN_FEATURES
            || weight.len() != n * k
            || bias.is_some_and(|b| b.len() != n)
        {
            return Err(CpuKernelError::shape(
                "QuantizedLinear::new",
                format!(
                    "weight has {} elements, bias {:?}; [out, in] = [{n}, {k}] (in at most \
                     {MAX_IN_FEATURES})",
                    weight.len(),
                    bias.map(<[f32]>::len)
                ),
            ));
        }
        let (q, scales) = quantize_weights(weight, k);
        let nr = panel_width(isa);
        let padded = n.next_multiple_of(nr);
        let mut scale = vec![0.0f32; padded];
        scale[..n].copy_from_slice(&scales);
        let mut sum = vec![0i32; padded];
        for (s, row) in sum.iter_mut().zip(q.chunks_exact(k)) {
            *s = row.iter().map(|&v| i32::from(v)).sum();
        }
        let mut bias_padded = vec![0.0f32; padded];
        if let Some(b) = bias {
            bias_padded[..n].copy_from_slice(b);
        }
        let step = isa.depth_step();
        let groups = k.div_ceil(step);
        let (mut packed, mut packed16) = (Vec::new(), Vec::new());
        match isa {
            Int8Isa::Scalar => packed = q,
            Int8Isa::Avx512Vnni => {
                packed = vec![0i8; padded * groups * step];
                for (j, panel) in packed.chunks_exact_mut(groups * nr * step).enumerate() {
                    for (c, row) in q.chunks_exact(k).skip(j * nr).take(nr).enumerate() {
                        for (p, &w) in row.iter().enumerate() {
                            panel[(p / step) * nr * step + c * step + p % step] = w;
                        }
                    }
                }
            }
            Int8Isa::Avx2 => {
                packed16 = vec![0i16; padded * groups * step];
                for (j, panel) in packed16.chunks_exact_mut(groups * nr * step).enumerate() {
                    for (c, row) in q.chunks_exact(k).skip(j * nr).take(nr).enumerate() {
                        for (p, &w) in row.iter().enumerate() {
                            panel[(p / step) * nr * step + c * step + p % step] = i16::from(w);
                        }
                    }
                }
            }
        }
        Ok(QuantizedLinear {
            isa,
            out_features: n,
            in_features: k,
            nr,
            packed,
            packed16,
            scale,
            sum,
            bias: bias_padded,
        })
    }

    /// Outputs per row.
    #[must_use]
    pub fn out_features(&self) -> usize {
        self.out_features
    }

    /// Inputs per row.
    #[must_use]
    pub fn in_features(&self) -> usize {
        self.in_features
    }

    /// The instruction set it was packed for (and runs on).
    #[must_use]
    pub fn isa(&self) -> Int8Isa {
        self.isa
    }

    /// The per-output weight scales.
    #[must_use]
    pub fn weight_scales(&self) -> &[f32] {
        &self.scale[..self.out_features]
    }

    fn check_shapes(
        &self,
        op: &'static str,
        a: usize,
        dst: usize,
        rows: usize,
    ) -> Result<(), CpuKernelError> {
        let (n, k) = (self.out_features, self.in_features);
        if rows == 0 || a != rows * k || dst != rows * n {
            return Err(CpuKernelError::shape(
                op,
                format!("a has {a} elements, dst {dst}; rows {rows}, [out, in] = [{n}, {k}]"),
            ));
        }
        Ok(())
    }

    /// `dst = act(a · wᵀ + bias)` for `a` of `[rows, in_features]` and `dst` of
    /// `[rows, out_features]`, row-major, `a` quantized per row first (into a buffer the
    /// calling thread keeps); multi-threaded on rayon's pool.
    ///
    /// # Errors
    ///
    /// [`CpuKernelError::Shape`] when `rows` is 0 or a slice's length does not match.
    pub fn forward(
        &self,
        a: &[f32],
        dst: &mut [f32],
        rows: usize,
        act: Activation,
    ) -> Result<(), CpuKernelError> {
        self.check_shapes("QuantizedLinear::forward", a.len(), dst.len(), rows)?;
        let mut q = SCRATCH.with(|s| std::mem::take(&mut *s.borrow_mut()));
        quantize_rows(self.isa, a, rows, self.in_features, &mut q)?;
        self.run(&q, rows, Out::F32(dst.as_mut_ptr()));
        if act == Activation::Gelu {
            let isa = self.isa.float_isa();
            let gelu = |row: &mut [f32]| super::gelu_in_place_here_slice(isa, row);
            if rayon::current_num_threads() > 1 && rows > 1 {
                dst.par_chunks_mut(self.out_features * GELU_ROWS)
                    .try_for_each(gelu)?;
            } else {
                gelu(dst)?;
            }
        }
        if q.bytes.len() + 2 * q.wide.len() <= SCRATCH_KEEP_BYTES {
            SCRATCH.with(|s| *s.borrow_mut() = q);
        }
        Ok(())
    }

    /// The exact integer sums `Σ_k (u[r][k] - z[r]) q[c][k]` behind [`QuantizedLinear::forward`]
    /// (`[rows, out_features]`): what every kernel must agree on bit for bit.
    ///
    /// # Errors
    ///
    /// As [`QuantizedLinear::forward`].
    pub fn accumulate(&self, a: &[f32], rows: usize) -> Result<Vec<i32>, CpuKernelError> {
        let mut out = vec![0i32; rows * self.out_features];
        self.check_shapes("QuantizedLinear::accumulate", a.len(), out.len(), rows)?;
        let mut q = QuantizedRows::default();
        quantize_rows(self.isa, a, rows, self.in_features, &mut q)?;
        self.run(&q, rows, Out::I32(out.as_mut_ptr()));
        Ok(out)
    }

    /// Runs the kernel on quantized rows into `out` (`rows × out_features`, checked by the
    /// caller), split into tasks over rayon's pool.
    fn run(&self, q: &QuantizedRows, rows: usize, out: Out) {
        let n = self.out_features;
        let panels = n.div_ceil(self.nr);
        let threads = rayon::current_num_threads().max(1);
        let split = Split::new(rows, self.isa.mr(), MC, panels, threads);
        let task = |t: usize| {
            let (rows, panels) = split.task(t);
            let task = Task {
                w: self,
                q,
                rows,
                panels,
                out,
            };
            task.run();
        };
        let tasks = split.tasks();
        if tasks == 1 || threads == 1 {
            (0..tasks).for_each(task);
        } else {
            (0..tasks).into_par_iter().for_each(task);
        }
    }
}

/// One task: rows of the quantized activations against a range of column panels. Tasks
/// write disjoint rectangles of the output (`rows × panels' columns`).
struct Task<'a> {
    w: &'a QuantizedLinear,
    q: &'a QuantizedRows,
    rows: Range<usize>,
    panels: Range<usize>,
    out: Out,
}

impl Task<'_> {
    fn run(&self) {
        match self.w.isa {
            #[cfg(target_arch = "x86_64")]
            Int8Isa::Avx512Vnni if self.w.isa.is_available() => {
                // SAFETY: `is_available` has just detected avx512f, avx512bw and avx512vnni;
                // the task's rectangle is inside the output (see `x86::task_vnni`).
                unsafe { x86::task_vnni(self) }
            }
            #[cfg(target_arch = "x86_64")]
            Int8Isa::Avx2 if self.w.isa.is_available() => {
                // SAFETY: `is_available` has just detected avx2 and fma; as above.
                unsafe { x86::task_avx2(self) }
            }
            _ => self.scalar(),
        }
    }

    /// The reference: one i32 dot product per output, on the unpacked weights.
    fn scalar(&self) {
        let w = self.w;
        let (n, k) = (w.out_features, w.in_features);
        let stride = self.q.stride();
        let cols = self.panels.start * w.nr..(self.panels.end * w.nr).min(n);
        for r in self.rows.clone() {
            let a = &self.q.bytes[r * stride..][..k];
            let (zero, row_scale) = (self.q.zero[r], self.q.scale[r]);
            for c in cols.clone() {
                let weights = &w.packed[c * k..][..k];
                let acc = a.iter().zip(weights).fold(0i32, |s, (&x, &y)| {
                    s.wrapping_add(i32::from(x) * i32::from(y))
                });
                let t = acc.wrapping_sub(zero.wrapping_mul(w.sum[c]));
                // SAFETY: `r < rows`, `c < n`, and the output is `rows × n` (checked by
                // `forward`/`accumulate`); this task alone writes this element.
                unsafe {
                    match self.out {
                        Out::I32(p) => *p.add(r * n + c) = t,
                        Out::F32(p) => {
                            // Exact for |t| < 2²⁴; beyond, rounded as `vcvtdq2ps` rounds.
                            #[allow(clippy::cast_precision_loss)]
                            let f = t as f32;
                            *p.add(r * n + c) = f.mul_add(row_scale * w.scale[c], w.bias[c]);
                        }
                    }
                }
            }
        }
    }
}

/// A linear layer of [`super::CpuBert`] at either precision.
#[derive(Debug, Clone)]
pub(crate) enum BertLinear {
    Fp32(PackedLinear),
    Int8(QuantizedLinear),
}

impl BertLinear {
    pub(crate) fn forward(
        &self,
        a: &[f32],
        dst: &mut [f32],
        rows: usize,
        act: Activation,
    ) -> Result<(), CpuKernelError> {
        match self {
            BertLinear::Fp32(l) => l.forward(a, dst, rows, act),
            BertLinear::Int8(l) => l.forward(a, dst, rows, act),
        }
    }

    /// `dst = a · wᵀ (+ bias)`, then `out = layer_norm(dst + norm.x_bias + norm.residual)`:
    /// fused on f32 (see [`PackedLinear::forward_add_norm`]), two steps on int8 (the norm
    /// on `isa`).
    pub(crate) fn forward_add_norm(
        &self,
        isa: super::Isa,
        a: &[f32],
        dst: &mut [f32],
        rows: usize,
        norm: AddNorm<'_>,
        out: &mut [f32],
    ) -> Result<(), CpuKernelError> {
        match self {
            BertLinear::Fp32(l) => l.forward_add_norm(a, dst, rows, norm, out),
            BertLinear::Int8(l) => {
                l.forward(a, dst, rows, Activation::Identity)?;
                norm.apply(isa, dst, out)
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{Out, Task};
    use std::arch::x86_64::*;

    /// The AVX-512 VNNI task: 8 × 48 tiles, `vpdpbusd`.
    ///
    /// # Safety
    ///
    /// The CPU has avx512f, avx512bw and avx512vnni; `t.rows` are rows of `t.q` (whose
    /// buffer holds them padded to a multiple of 8), `t.panels` panels of `t.w`, and the
    /// output has `t.q.rows() × out_features` elements.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub(super) unsafe fn task_vnni(t: &Task<'_>) {
        const MR: usize = 8;
        const V: usize = 3;
        const NR: usize = 48;
        let (w, q) = (t.w, t.q);
        let n = w.out_features;
        let stride = q.stride();
        let groups = stride / 4;
        debug_assert!(q.bytes.len() >= t.rows.start.next_multiple_of(MR) * stride);
        debug_assert!(q.bytes.len() >= t.rows.end.next_multiple_of(MR) * stride);
        debug_assert!(w.packed.len() >= t.panels.end * groups * NR * 4);
        for j in t.panels.clone() {
            // SAFETY: panel `j` is within the packed weights (see the debug assertion).
            let panel = unsafe { w.packed.as_ptr().add(j * groups * NR * 4) };
            let mut r0 = t.rows.start;
            while r0 < t.rows.end {
                // SAFETY: rows `r0 .. r0 + 8` are inside the padded buffer (`r0` is a
                // multiple of 8: tasks start at multiples of 48).
                let a = unsafe { q.bytes.as_ptr().add(r0 * stride) };
                let mut acc = [[_mm512_setzero_si512(); V]; MR];
                for g in 0..groups {
                    // SAFETY: group `g < groups` of the panel: 192 bytes; each row's 4
                    // bytes at `4g < stride`.
                    unsafe {
                        let wp = panel.add(g * NR * 4);
                        let w0 = _mm512_loadu_si512(wp.cast());
                        let w1 = _mm512_loadu_si512(wp.add(64).cast());
                        let w2 = _mm512_loadu_si512(wp.add(128).cast());
                        for (r, acc) in acc.iter_mut().enumerate() {
                            let x = _mm512_set1_epi32(
                                a.add(r * stride + 4 * g).cast::<i32>().read_unaligned(),
                            );
                            acc[0] = _mm512_dpbusd_epi32(acc[0], x, w0);
                            acc[1] = _mm512_dpbusd_epi32(acc[1], x, w1);
                            acc[2] = _mm512_dpbusd_epi32(acc[2], x, w2);
                        }
                    }
                }
                let live = (t.rows.end - r0).min(MR);
                for (r, acc) in acc.iter().enumerate().take(live) {
                    let row = r0 + r;
                    let zero = _mm512_set1_epi32(q.zero[row]);
                    let row_scale = _mm512_set1_ps(q.scale[row]);
                    for (v, &acc) in acc.iter().enumerate() {
                        let c = j * NR + v * 16;
                        if c >= n {
                            break;
                        }
                        let cols = (n - c).min(16);
                        let mask: __mmask16 = if cols == 16 {
                            0xffff
                        } else {
                            ((1u32 << cols) - 1) as __mmask16
                        };
                        // SAFETY: the per-output vectors are padded to a multiple of 48
                        // (`c + 16` is within them); the masked store writes only
                        // `row × n + c .. + cols`, inside the output and this task's
                        // rectangle.
                        unsafe {
                            let sum = _mm512_loadu_si512(w.sum.as_ptr().add(c).cast());
                            let s = _mm512_sub_epi32(acc, _mm512_mullo_epi32(zero, sum));
                            match t.out {
                                Out::I32(p) => {
                                    _mm512_mask_storeu_epi32(p.add(row * n + c).cast(), mask, s);
                                }
                                Out::F32(p) => {
                                    let f = _mm512_cvtepi32_ps(s);
                                    let sc = _mm512_mul_ps(
                                        row_scale,
                                        _mm512_loadu_ps(w.scale.as_ptr().add(c)),
                                    );
                                    let y = _mm512_fmadd_ps(
                                        f,
                                        sc,
                                        _mm512_loadu_ps(w.bias.as_ptr().add(c)),
                                    );
                                    _mm512_mask_storeu_ps(p.add(row * n + c), mask, y);
                                }
                            }
                        }
                    }
                }
                r0 += MR;
            }
        }
    }

    /// The AVX2 task: 6 × 16 tiles, `vpmaddwd` on 16-bit operands.
    ///
    /// # Safety
    ///
    /// The CPU has avx2 and fma; as [`task_vnni`], the buffer padded to a multiple of 6
    /// rows.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn task_avx2(t: &Task<'_>) {
        const MR: usize = 6;
        const NR: usize = 16;
        let (w, q) = (t.w, t.q);
        let n = w.out_features;
        let stride = q.stride();
        let groups = stride / 2;
        debug_assert!(q.wide.len() >= t.rows.end.next_multiple_of(MR) * stride);
        debug_assert!(w.packed16.len() >= t.panels.end * groups * NR * 2);
        for j in t.panels.clone() {
            // SAFETY: panel `j` is within the packed weights.
            let panel = unsafe { w.packed16.as_ptr().add(j * groups * NR * 2) };
            let mut r0 = t.rows.start;
            while r0 < t.rows.end {
                // SAFETY: rows `r0 .. r0 + 6` are inside the padded buffer (`r0` is a
                // multiple of 6).
                let a = unsafe { q.wide.as_ptr().add(r0 * stride) };
                let mut acc = [[_mm256_setzero_si256(); 2]; MR];
                for g in 0..groups {
                    // SAFETY: group `g` of the panel: 32 i16; each row's pair at `2g`.
                    unsafe {
                        let wp = panel.add(g * NR * 2);
                        let w0 = _mm256_loadu_si256(wp.cast());
                        let w1 = _mm256_loadu_si256(wp.add(16).cast());
                        for (r, acc) in acc.iter_mut().enumerate() {
                            let x = _mm256_set1_epi32(
                                a.add(r * stride + 2 * g).cast::<i32>().read_unaligned(),
                            );
                            acc[0] = _mm256_add_epi32(acc[0], _mm256_madd_epi16(x, w0));
                            acc[1] = _mm256_add_epi32(acc[1], _mm256_madd_epi16(x, w1));
                        }
                    }
                }
                let live = (t.rows.end - r0).min(MR);
                for (r, acc) in acc.iter().enumerate().take(live) {
                    let row = r0 + r;
                    let zero = _mm256_set1_epi32(q.zero[row]);
                    let row_scale = _mm256_set1_ps(q.scale[row]);
                    for (v, &acc) in acc.iter().enumerate() {
                        let c = j * NR + v * 8;
                        if c >= n {
                            break;
                        }
                        let cols = (n - c).min(8);
                        // SAFETY: the per-output vectors are padded to a multiple of 16;
                        // the stores write only `row × n + c .. + cols`.
                        unsafe {
                            let sum = _mm256_loadu_si256(w.sum.as_ptr().add(c).cast());
                            let s = _mm256_sub_epi32(acc, _mm256_mullo_epi32(zero, sum));
                            match t.out {
                                Out::I32(p) => {
                                    let mut buf = [0i32; 8];
                                    _mm256_storeu_si256(buf.as_mut_ptr().cast(), s);
                                    std::ptr::copy_nonoverlapping(
                                        buf.as_ptr(),
                                        p.add(row * n + c),
                                        cols,
                                    );
                                }
                                Out::F32(p) => {
                                    let f = _mm256_cvtepi32_ps(s);
                                    let sc = _mm256_mul_ps(
                                        row_scale,
                                        _mm256_loadu_ps(w.scale.as_ptr().add(c)),
                                    );
                                    let y = _mm256_fmadd_ps(
                                        f,
                                        sc,
                                        _mm256_loadu_ps(w.bias.as_ptr().add(c)),
                                    );
                                    if cols == 8 {
                                        _mm256_storeu_ps(p.add(row * n + c), y);
                                    } else {
                                        let mut buf = [0.0f32; 8];
                                        _mm256_storeu_ps(buf.as_mut_ptr(), y);
                                        std::ptr::copy_nonoverlapping(
                                            buf.as_ptr(),
                                            p.add(row * n + c),
                                            cols,
                                        );
                                    }
                                }
                            }
                        }
                    }
                }
                r0 += MR;
            }
        }
    }
}
