//! Dynamic int8 quantization for [`super::QuantizedLinear`]: weights once, at load, to int8
//! with one scale per output channel (symmetric); activations at run time to u8 with one
//! scale and zero point per row (asymmetric, so a row of GELU outputs, nearly all `>= -0.17`,
//! keeps all 256 levels).
//!
//! - a weight row `w` becomes `q = round(w / s)` in `[-127, 127]`, `s = max|w| / 127`
//!   (`-128` is never used, so `|q| <= 127` everywhere);
//! - an activation row `x` becomes `u = clamp(round(x / s) + z, 0, 255)`, with
//!   `s = (max(x, 0) - min(x, 0)) / 255` and `z = round(-min(x, 0) / s)`: the range always
//!   holds 0, which is exactly representable (`u = z`).
//!
//! Then `x · w ≈ s_x s_w Σ (u - z) q = s_x s_w (Σ u q - z Σ q)`: the product runs on the
//! integers `u`, `q`, and `Σ q` is the weight row's sum, computed once.
//!
//! Rounding is to nearest, ties to even, in every path, and the per-row scale is computed
//! by scalar code, so the vector quantizers give exactly the bytes of the scalar one
//! (`kernels/tests/cpu_int8.rs`). Non-finite inputs give unspecified (but memory-safe)
//! values.

use rayon::prelude::*;

use super::{CpuKernelError, Isa};

/// An instruction set an int8 kernel can run on (the int8 counterpart of [`Isa`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Int8Isa {
    /// Portable scalar code (the reference); available everywhere.
    Scalar,
    /// x86-64 AVX2 (with FMA): `vpmaddwd` on 16-bit widened operands, 8 × i32 lanes.
    Avx2,
    /// x86-64 AVX-512 with VNNI (`vpdpbusd`: u8 × i8, four products summed into each of 16
    /// i32 lanes).
    Avx512Vnni,
}

impl Int8Isa {
    /// Every int8 instruction set, widest last.
    pub const ALL: [Int8Isa; 3] = [Int8Isa::Scalar, Int8Isa::Avx2, Int8Isa::Avx512Vnni];

    /// Whether this CPU can run `self` (runtime detection; cached by std).
    #[must_use]
    pub fn is_available(self) -> bool {
        match self {
            Int8Isa::Scalar => true,
            #[cfg(target_arch = "x86_64")]
            Int8Isa::Avx2 => Isa::Avx2.is_available(),
            #[cfg(target_arch = "x86_64")]
            Int8Isa::Avx512Vnni => {
                Isa::Avx512.is_available()
                    && is_x86_feature_detected!("avx512bw")
                    && is_x86_feature_detected!("avx512vnni")
            }
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }

    /// The widest int8 instruction set this CPU has.
    #[must_use]
    pub fn detect() -> Int8Isa {
        Int8Isa::ALL
            .into_iter()
            .rev()
            .find(|isa| isa.is_available())
            .unwrap_or(Int8Isa::Scalar)
    }

    /// The int8 instruction sets this CPU has, narrowest first.
    #[must_use]
    pub fn available() -> Vec<Int8Isa> {
        Int8Isa::ALL
            .into_iter()
            .filter(|isa| isa.is_available())
            .collect()
    }

    /// The f32 instruction set on the same CPU features (GELU after dequantization).
    #[must_use]
    pub fn float_isa(self) -> Isa {
        match self {
            Int8Isa::Scalar => Isa::Scalar,
            Int8Isa::Avx2 => Isa::Avx2,
            Int8Isa::Avx512Vnni => Isa::Avx512,
        }
    }

    pub(crate) fn check(self) -> Result<(), CpuKernelError> {
        if self.is_available() {
            Ok(())
        } else {
            Err(CpuKernelError::Int8IsaUnavailable(self))
        }
    }

    /// Rows of the micro-kernel's register tile: quantized activations are padded to a
    /// multiple of it.
    pub(crate) fn mr(self) -> usize {
        match self {
            Int8Isa::Scalar => 1,
            Int8Isa::Avx2 => 6,
            Int8Isa::Avx512Vnni => 8,
        }
    }

    /// Depth consumed per step of the micro-kernel (products summed into one i32 lane):
    /// the depth is padded to a multiple of it.
    pub(crate) fn depth_step(self) -> usize {
        match self {
            Int8Isa::Scalar => 1,
            Int8Isa::Avx2 => 2,
            Int8Isa::Avx512Vnni => 4,
        }
    }
}

/// Largest magnitude of a quantized weight.
pub const WEIGHT_LEVELS: i8 = 127;

/// Quantizes `weight` (`[out_features, in_features]`, row-major) per output channel:
/// returns the int8 weights (same layout) and one scale per output, so that
/// `weight[n][k] ≈ q[n][k] × scale[n]` within `scale[n] / 2`. An all-zero (or non-finite)
/// row gets scale 1.
#[must_use]
pub fn quantize_weights(weight: &[f32], in_features: usize) -> (Vec<i8>, Vec<f32>) {
    let k = in_features.max(1);
    let mut q = vec![0i8; weight.len()];
    let mut scales = Vec::with_capacity(weight.len() / k);
    for (row, out) in weight.chunks(k).zip(q.chunks_mut(k)) {
        let max = row.iter().fold(0.0f32, |m, w| m.max(w.abs()));
        let scale = if max.is_finite() && max > 0.0 {
            max / f32::from(WEIGHT_LEVELS)
        } else {
            1.0
        };
        let limit = f32::from(WEIGHT_LEVELS);
        for (o, &w) in out.iter_mut().zip(row) {
            // In [-127, 127] after the clamp (NaN goes to 0 by `as`).
            #[allow(clippy::cast_possible_truncation)]
            {
                *o = (w / scale).round_ties_even().clamp(-limit, limit) as i8;
            }
        }
        scales.push(scale);
    }
    (q, scales)
}

/// A row's quantization parameters: `x ≈ (u - zero) × scale`, `u = clamp(round(x × inv) +
/// zero, 0, 255)`.
#[derive(Debug, Clone, Copy)]
struct RowParams {
    scale: f32,
    inv: f32,
    zero: i32,
}

fn row_params(min: f32, max: f32) -> RowParams {
    let (lo, hi) = (min.min(0.0), max.max(0.0));
    let scale = (hi - lo) / 255.0;
    if !scale.is_normal() {
        // All zeros (or a range too small, or not finite): every value maps to 0.
        return RowParams {
            scale: 1.0,
            inv: 1.0,
            zero: 0,
        };
    }
    // In [0, 255] after the clamp.
    #[allow(clippy::cast_possible_truncation)]
    let zero = (-lo / scale).round_ties_even().clamp(0.0, 255.0) as i32;
    RowParams {
        scale,
        inv: 1.0 / scale,
        zero,
    }
}

/// One value's level, as every quantizer computes it.
#[inline(always)]
fn level(x: f32, p: RowParams) -> i32 {
    // `x × inv` is within ±256 for a finite `x` of the row; NaN goes to 0 by `as`.
    #[allow(clippy::cast_possible_truncation)]
    let r = (x * p.inv).round_ties_even() as i32;
    r.saturating_add(p.zero).clamp(0, 255)
}

/// A batch of activation rows quantized for one [`Int8Isa`]'s kernel: u8 levels (16-bit
/// on AVX2, whose kernel multiplies 16-bit pairs), each row padded with zeros to a multiple
/// of the kernel's depth step, the rows padded to a multiple of its tile rows. Reused
/// across calls by [`quantize_rows`].
#[derive(Debug, Default, Clone)]
pub struct QuantizedRows {
    isa: Option<Int8Isa>,
    rows: usize,
    k: usize,
    /// Elements per row (`k` rounded up to the depth step).
    stride: usize,
    /// The levels on `Scalar` and `Avx512Vnni`: `padded rows × stride`.
    pub(crate) bytes: Vec<u8>,
    /// The levels on `Avx2`: `padded rows × stride`.
    pub(crate) wide: Vec<u16>,
    pub(crate) scale: Vec<f32>,
    pub(crate) zero: Vec<i32>,
}

impl QuantizedRows {
    /// Rows quantized.
    #[must_use]
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Values per row.
    #[must_use]
    pub fn k(&self) -> usize {
        self.k
    }

    pub(crate) fn stride(&self) -> usize {
        self.stride
    }

    /// The instruction set it was quantized for.
    #[must_use]
    pub fn isa(&self) -> Option<Int8Isa> {
        self.isa
    }

    /// The levels, `[rows, k]` row-major, without padding.
    #[must_use]
    pub fn levels(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.rows * self.k);
        for r in 0..self.rows {
            let start = r * self.stride;
            if self.isa == Some(Int8Isa::Avx2) {
                // Levels are at most 255 (the quantizer clamps them).
                #[allow(clippy::cast_possible_truncation)]
                out.extend(self.wide[start..start + self.k].iter().map(|&u| u as u8));
            } else {
                out.extend_from_slice(&self.bytes[start..start + self.k]);
            }
        }
        out
    }

    /// Each row's scale.
    #[must_use]
    pub fn scales(&self) -> &[f32] {
        &self.scale[..self.rows]
    }

    /// Each row's zero point (the level of 0.0), in `[0, 255]`.
    #[must_use]
    pub fn zero_points(&self) -> &[i32] {
        &self.zero[..self.rows]
    }
}

/// Rows per parallel chunk of [`quantize_rows`].
const ROWS_PER_TASK: usize = 16;

/// Quantizes `a` (`[rows, k]`, row-major) into `out` for `isa`'s kernel (see the module
/// docs), splitting rows over rayon's pool when there are many.
///
/// # Errors
///
/// [`CpuKernelError::Int8IsaUnavailable`] when this CPU lacks `isa`;
/// [`CpuKernelError::Shape`] when `k` is 0 or `a.len() != rows × k`.
pub fn quantize_rows(
    isa: Int8Isa,
    a: &[f32],
    rows: usize,
    k: usize,
    out: &mut QuantizedRows,
) -> Result<(), CpuKernelError> {
    isa.check()?;
    if k == 0 || a.len() != rows * k {
        return Err(CpuKernelError::shape(
            "quantize_rows",
            format!("a has {} elements; [rows, k] = [{rows}, {k}]", a.len()),
        ));
    }
    let stride = k.next_multiple_of(isa.depth_step());
    let padded = rows.next_multiple_of(isa.mr());
    out.isa = Some(isa);
    out.rows = rows;
    out.k = k;
    out.stride = stride;
    out.scale.resize(padded, 1.0);
    out.zero.resize(padded, 0);
    // Padding columns must hold level 0 (their weights are 0 too, but the kernels read
    // them); rows past `rows` are read by the tile and their results dropped, so any
    // level will do there. Buffers only grow, so stale levels are overwritten below.
    let parallel = rows * k >= 1 << 15 && rayon::current_num_threads() > 1;
    let rows_out = Rows {
        rows,
        k,
        stride,
        scale: &mut out.scale[..rows],
        zero: &mut out.zero[..rows],
        parallel,
    };
    match isa {
        Int8Isa::Avx2 => {
            out.wide.resize(padded * stride, 0);
            rows_out.fill(a, &mut out.wide[..rows * stride], |x, d| {
                quantize_row_wide(isa, x, d)
            });
        }
        Int8Isa::Scalar | Int8Isa::Avx512Vnni => {
            out.bytes.resize(padded * stride, 0);
            rows_out.fill(a, &mut out.bytes[..rows * stride], |x, d| {
                quantize_row_bytes(isa, x, d)
            });
        }
    }
    Ok(())
}

/// A chunk of rows as [`Rows::fill`] splits them: levels, scales, zero points, source.
type RowChunk<'a, T> = (((&'a mut [T], &'a mut [f32]), &'a mut [i32]), &'a [f32]);

/// Where [`quantize_rows`] writes each row's parameters.
struct Rows<'a> {
    rows: usize,
    k: usize,
    stride: usize,
    scale: &'a mut [f32],
    zero: &'a mut [i32],
    parallel: bool,
}

impl Rows<'_> {
    /// Quantizes every row of `a` into `levels` (`rows × stride`) with `row`, which
    /// returns the row's parameters; zeros the padding columns.
    fn fill<T: Copy + Default + Send>(
        self,
        a: &[f32],
        levels: &mut [T],
        row: impl Fn(&[f32], &mut [T]) -> RowParams + Sync,
    ) {
        let Rows {
            rows,
            k,
            stride,
            scale,
            zero,
            parallel,
        } = self;
        let chunk = ROWS_PER_TASK;
        let run = |(((dst, scale), zero), src): RowChunk<'_, T>| {
            for (((d, s), z), x) in dst
                .chunks_exact_mut(stride)
                .zip(scale.iter_mut())
                .zip(zero.iter_mut())
                .zip(src.chunks_exact(k))
            {
                let p = row(x, &mut d[..k]);
                d[k..].fill(T::default());
                (*s, *z) = (p.scale, p.zero);
            }
        };
        debug_assert_eq!(levels.len(), rows * stride);
        if parallel {
            levels
                .par_chunks_mut(chunk * stride)
                .zip(scale.par_chunks_mut(chunk))
                .zip(zero.par_chunks_mut(chunk))
                .zip(a.par_chunks(chunk * k))
                .for_each(run);
        } else {
            levels
                .chunks_mut(chunk * stride)
                .zip(scale.chunks_mut(chunk))
                .zip(zero.chunks_mut(chunk))
                .zip(a.chunks(chunk * k))
                .for_each(run);
        }
    }
}

fn min_max_scalar(x: &[f32]) -> (f32, f32) {
    x.iter()
        .fold((0.0f32, 0.0f32), |(lo, hi), &v| (lo.min(v), hi.max(v)))
}

/// One row into 8-bit levels.
fn quantize_row_bytes(isa: Int8Isa, x: &[f32], out: &mut [u8]) -> RowParams {
    #[cfg(target_arch = "x86_64")]
    if isa == Int8Isa::Avx512Vnni && isa.is_available() {
        // SAFETY: `is_available` has just detected avx512f (and more) on this CPU.
        return unsafe { x86::quantize_row_avx512(x, out) };
    }
    let _ = isa;
    let (lo, hi) = min_max_scalar(x);
    let p = row_params(lo, hi);
    for (o, &v) in out.iter_mut().zip(x) {
        // `level` is in [0, 255].
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        {
            *o = level(v, p) as u8;
        }
    }
    p
}

/// One row into 16-bit levels (the AVX2 kernel's operand).
fn quantize_row_wide(isa: Int8Isa, x: &[f32], out: &mut [u16]) -> RowParams {
    #[cfg(target_arch = "x86_64")]
    if isa == Int8Isa::Avx2 && isa.is_available() {
        // SAFETY: `is_available` has just detected avx2 on this CPU.
        return unsafe { x86::quantize_row_avx2(x, out) };
    }
    let _ = isa;
    let (lo, hi) = min_max_scalar(x);
    let p = row_params(lo, hi);
    for (o, &v) in out.iter_mut().zip(x) {
        // `level` is in [0, 255].
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        {
            *o = level(v, p) as u16;
        }
    }
    p
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{RowParams, level, row_params};
    use std::arch::x86_64::*;

    /// `quantize_row_bytes` on AVX-512F: 16 values a step, the tail as the scalar code.
    ///
    /// # Safety
    ///
    /// The CPU has avx512f; `out.len() == x.len()`.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn quantize_row_avx512(x: &[f32], out: &mut [u8]) -> RowParams {
        let n = x.len().min(out.len());
        let body = n - n % 16;
        let (mut lo, mut hi) = (_mm512_setzero_ps(), _mm512_setzero_ps());
        for i in (0..body).step_by(16) {
            // SAFETY: `i + 16 <= body <= x.len()`.
            let v = unsafe { _mm512_loadu_ps(x.as_ptr().add(i)) };
            lo = _mm512_min_ps(lo, v);
            hi = _mm512_max_ps(hi, v);
        }
        let (mut l, mut h) = ([0.0f32; 16], [0.0f32; 16]);
        // SAFETY: 16 floats each.
        unsafe {
            _mm512_storeu_ps(l.as_mut_ptr(), lo);
            _mm512_storeu_ps(h.as_mut_ptr(), hi);
        }
        let (mut min, mut max) = super::min_max_scalar(&x[body..n]);
        for (&a, &b) in l.iter().zip(&h) {
            min = min.min(a);
            max = max.max(b);
        }
        let p = row_params(min, max);
        let inv = _mm512_set1_ps(p.inv);
        let zero = _mm512_set1_epi32(p.zero);
        let (floor, ceil) = (_mm512_setzero_si512(), _mm512_set1_epi32(255));
        for i in (0..body).step_by(16) {
            // SAFETY: `i + 16 <= body <= x.len()`, and `<= out.len()`.
            unsafe {
                let v = _mm512_mul_ps(_mm512_loadu_ps(x.as_ptr().add(i)), inv);
                let q = _mm512_cvt_roundps_epi32::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
                    v,
                );
                let q = _mm512_min_epi32(_mm512_max_epi32(_mm512_add_epi32(q, zero), floor), ceil);
                _mm_storeu_si128(out.as_mut_ptr().add(i).cast(), _mm512_cvtepi32_epi8(q));
            }
        }
        for (o, &v) in out[body..n].iter_mut().zip(&x[body..n]) {
            // `level` is in [0, 255].
            #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
            {
                *o = level(v, p) as u8;
            }
        }
        p
    }

    /// `quantize_row_wide` on AVX2: 8 values a step, the tail as the scalar code.
    ///
    /// # Safety
    ///
    /// The CPU has avx2; `out.len() == x.len()`.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn quantize_row_avx2(x: &[f32], out: &mut [u16]) -> RowParams {
        let n = x.len().min(out.len());
        let body = n - n % 8;
        let (mut lo, mut hi) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        for i in (0..body).step_by(8) {
            // SAFETY: `i + 8 <= body <= x.len()`.
            let v = unsafe { _mm256_loadu_ps(x.as_ptr().add(i)) };
            lo = _mm256_min_ps(lo, v);
            hi = _mm256_max_ps(hi, v);
        }
        let (mut l, mut h) = ([0.0f32; 8], [0.0f32; 8]);
        // SAFETY: 8 floats each.
        unsafe {
            _mm256_storeu_ps(l.as_mut_ptr(), lo);
            _mm256_storeu_ps(h.as_mut_ptr(), hi);
        }
        let (mut min, mut max) = super::min_max_scalar(&x[body..n]);
        for (&a, &b) in l.iter().zip(&h) {
            min = min.min(a);
            max = max.max(b);
        }
        let p = row_params(min, max);
        let inv = _mm256_set1_ps(p.inv);
        let zero = _mm256_set1_epi32(p.zero);
        let (floor, ceil) = (_mm256_setzero_si256(), _mm256_set1_epi32(255));
        for i in (0..body).step_by(8) {
            // SAFETY: `i + 8 <= body <= x.len()`, and `<= out.len()`.
            unsafe {
                let v = _mm256_mul_ps(_mm256_loadu_ps(x.as_ptr().add(i)), inv);
                // vcvtps2dq rounds by MXCSR: to nearest, ties to even (Rust never changes it).
                let q = _mm256_cvtps_epi32(v);
                let q = _mm256_min_epi32(_mm256_max_epi32(_mm256_add_epi32(q, zero), floor), ceil);
                // [q0..q3 q0..q3 | q4..q7 q4..q7] as u16, then qwords 0 and 2 to the front.
                let packed = _mm256_permute4x64_epi64::<0b1000>(_mm256_packus_epi32(q, q));
                _mm_storeu_si128(
                    out.as_mut_ptr().add(i).cast(),
                    _mm256_castsi256_si128(packed),
                );
            }
        }
        for (o, &v) in out[body..n].iter_mut().zip(&x[body..n]) {
            // `level` is in [0, 255].
            #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
            {
                *o = level(v, p) as u16;
            }
        }
        p
    }
}
