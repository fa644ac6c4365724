//! The vector layer under the CPU kernels: one [`Simd`] trait with three backends
//! ([`Scalar`], [`Avx2`], [`Avx512`]), so each kernel is written once and compiled three
//! times, and the shared vector math ([`exp`], [`gelu`]) on top of it.
//!
//! The pattern is pulp's (the SIMD layer under `gemm`, which candle uses): a backend is a
//! zero-sized token that can only be made after runtime detection of its instruction set,
//! so its methods are safe to call; [`dispatch`] enters a `#[target_feature]` function once
//! per block of rows and everything below it is `#[inline(always)]`, so LLVM compiles the
//! generic kernel body with the backend's instructions.

#![allow(unsafe_code)]

use super::Isa;

/// A vector backend. `V` holds `LANES` f32 lanes. A value of the implementing type is a proof
/// that the CPU supports its instructions (see [`Isa::is_available`]).
pub(crate) trait Simd: Copy + Send + Sync {
    /// f32 lanes per vector.
    const LANES: usize;
    /// The vector type.
    type V: Copy;

    fn splat(self, x: f32) -> Self::V;
    /// Loads `LANES` floats from the front of `s` (`s.len() >= LANES`).
    fn load(self, s: &[f32]) -> Self::V;
    /// Stores `LANES` floats at the front of `s` (`s.len() >= LANES`).
    fn store(self, s: &mut [f32], v: Self::V);
    fn add(self, a: Self::V, b: Self::V) -> Self::V;
    fn sub(self, a: Self::V, b: Self::V) -> Self::V;
    fn mul(self, a: Self::V, b: Self::V) -> Self::V;
    fn div(self, a: Self::V, b: Self::V) -> Self::V;
    /// `a * b + c`, fused (one rounding) on the SIMD backends.
    fn mul_add(self, a: Self::V, b: Self::V, c: Self::V) -> Self::V;
    /// Lane-wise maximum; where either lane is NaN the result is `b`'s lane.
    fn max(self, a: Self::V, b: Self::V) -> Self::V;
    /// Lane-wise minimum; where either lane is NaN the result is `b`'s lane.
    fn min(self, a: Self::V, b: Self::V) -> Self::V;
    fn abs(self, a: Self::V) -> Self::V;
    /// Rounds to the nearest integer, ties to even.
    fn round(self, a: Self::V) -> Self::V;
    /// `2^n` for integral `n` in `[-126, 127]`.
    fn pow2i(self, n: Self::V) -> Self::V;
    /// Lane-wise `if a < b { t } else { f }` (false where a lane is NaN).
    fn select_lt(self, a: Self::V, b: Self::V, t: Self::V, f: Self::V) -> Self::V;
    fn reduce_add(self, a: Self::V) -> f32;
    fn reduce_max(self, a: Self::V) -> f32;

    /// Loads the `s.len() < LANES` floats of `s`, the other lanes set to `fill`.
    #[inline(always)]
    fn load_tail(self, s: &[f32], fill: f32) -> Self::V {
        let mut buf = [fill; 16];
        buf[..s.len()].copy_from_slice(s);
        self.load(&buf)
    }

    /// Stores the first `s.len() < LANES` lanes of `v` into `s`.
    #[inline(always)]
    fn store_tail(self, s: &mut [f32], v: Self::V) {
        let mut buf = [0.0f32; 16];
        self.store(&mut buf, v);
        let n = s.len();
        s.copy_from_slice(&buf[..n]);
    }
}

/// A kernel body generic over the backend; [`dispatch`] runs it on the chosen one.
pub(crate) trait WithSimd {
    type Output;
    fn with_simd<S: Simd>(self, s: S) -> Self::Output;
}

/// Runs `k` on `isa`'s backend. The caller has checked `isa.is_available()` (the public
/// entry points do, and report [`super::CpuKernelError::IsaUnavailable`] otherwise); an
/// unavailable ISA here falls back to the scalar backend rather than fault.
#[inline]
pub(crate) fn dispatch<K: WithSimd>(isa: Isa, k: K) -> K::Output {
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 if isa.is_available() => {
            // SAFETY: `is_available` has just detected avx512f, avx2 and fma on this CPU.
            unsafe { run_avx512(k) }
        }
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 if isa.is_available() => {
            // SAFETY: `is_available` has just detected avx2 and fma on this CPU.
            unsafe { run_avx2(k) }
        }
        _ => k.with_simd(Scalar),
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn run_avx2<K: WithSimd>(k: K) -> K::Output {
    k.with_simd(Avx2(()))
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn run_avx512<K: WithSimd>(k: K) -> K::Output {
    k.with_simd(Avx512(()))
}

/// The portable backend: one lane, plain `f32` arithmetic (`mul_add` fused where the target
/// has FMA, otherwise through libm), so it runs on any target.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Scalar;

impl Simd for Scalar {
    const LANES: usize = 1;
    type V = f32;

    #[inline(always)]
    fn splat(self, x: f32) -> f32 {
        x
    }
    #[inline(always)]
    fn load(self, s: &[f32]) -> f32 {
        s[0]
    }
    #[inline(always)]
    fn store(self, s: &mut [f32], v: f32) {
        s[0] = v;
    }
    #[inline(always)]
    fn add(self, a: f32, b: f32) -> f32 {
        a + b
    }
    #[inline(always)]
    fn sub(self, a: f32, b: f32) -> f32 {
        a - b
    }
    #[inline(always)]
    fn mul(self, a: f32, b: f32) -> f32 {
        a * b
    }
    #[inline(always)]
    fn div(self, a: f32, b: f32) -> f32 {
        a / b
    }
    #[inline(always)]
    fn mul_add(self, a: f32, b: f32, c: f32) -> f32 {
        a.mul_add(b, c)
    }
    #[inline(always)]
    fn max(self, a: f32, b: f32) -> f32 {
        if a > b { a } else { b }
    }
    #[inline(always)]
    fn min(self, a: f32, b: f32) -> f32 {
        if a < b { a } else { b }
    }
    #[inline(always)]
    fn abs(self, a: f32) -> f32 {
        a.abs()
    }
    #[inline(always)]
    fn round(self, a: f32) -> f32 {
        a.round_ties_even()
    }
    #[inline(always)]
    fn pow2i(self, n: f32) -> f32 {
        // `n` is integral in [-126, 127], so the biased exponent is in [1, 254].
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let biased = (n as i32 + 127) as u32;
        f32::from_bits(biased << 23)
    }
    #[inline(always)]
    fn select_lt(self, a: f32, b: f32, t: f32, f: f32) -> f32 {
        if a < b { t } else { f }
    }
    #[inline(always)]
    fn reduce_add(self, a: f32) -> f32 {
        a
    }
    #[inline(always)]
    fn reduce_max(self, a: f32) -> f32 {
        a
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) use x86::{Avx2, Avx512};

/// Stand-ins on other architectures, never constructed (`Isa::is_available` is false).
#[cfg(not(target_arch = "x86_64"))]
pub(crate) type Avx2 = Scalar;
#[cfg(not(target_arch = "x86_64"))]
pub(crate) type Avx512 = Scalar;

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::Simd;
    use std::arch::x86_64::*;

    /// AVX2 + FMA, 8 lanes. Constructed only by [`super::dispatch`] after detection.
    #[derive(Debug, Clone, Copy)]
    pub(crate) struct Avx2(pub(super) ());

    /// AVX-512F, 16 lanes. Constructed only by [`super::dispatch`] after detection.
    #[derive(Debug, Clone, Copy)]
    pub(crate) struct Avx512(pub(super) ());

    // SAFETY (every `unsafe` block in this impl): a value of `Avx2` exists only inside
    // `run_avx2`, which `dispatch` enters after detecting avx2 and fma, so the intrinsics'
    // target features are present; loads and stores go through slices of at least 8 floats
    // (checked by the slicing), so the unaligned pointer accesses stay in bounds.
    impl Simd for Avx2 {
        const LANES: usize = 8;
        type V = __m256;

        #[inline(always)]
        fn splat(self, x: f32) -> __m256 {
            // SAFETY: see the impl comment.
            unsafe { _mm256_set1_ps(x) }
        }
        #[inline(always)]
        fn load(self, s: &[f32]) -> __m256 {
            let s = &s[..8];
            // SAFETY: see the impl comment; `s` has 8 floats.
            unsafe { _mm256_loadu_ps(s.as_ptr()) }
        }
        #[inline(always)]
        fn store(self, s: &mut [f32], v: __m256) {
            let s = &mut s[..8];
            // SAFETY: see the impl comment; `s` has 8 floats.
            unsafe { _mm256_storeu_ps(s.as_mut_ptr(), v) }
        }
        #[inline(always)]
        fn add(self, a: __m256, b: __m256) -> __m256 {
            // SAFETY: see the impl comment.
            unsafe { _mm256_add_ps(a, b) }
        }
        #[inline(always)]
        fn sub(self, a: __m256, b: __m256) -> __m256 {
            // SAFETY: see the impl comment.
            unsafe { _mm256_sub_ps(a, b) }
        }
        #[inline(always)]
        fn mul(self, a: __m256, b: __m256) -> __m256 {
            // SAFETY: see the impl comment.
            unsafe { _mm256_mul_ps(a, b) }
        }
        #[inline(always)]
        fn div(self, a: __m256, b: __m256) -> __m256 {
            // SAFETY: see the impl comment.
            unsafe { _mm256_div_ps(a, b) }
        }
        #[inline(always)]
        fn mul_add(self, a: __m256, b: __m256, c: __m256) -> __m256 {
            // SAFETY: see the impl comment.
            unsafe { _mm256_fmadd_ps(a, b, c) }
        }
        #[inline(always)]
        fn max(self, a: __m256, b: __m256) -> __m256 {
            // SAFETY: see the impl comment. (vmaxps returns the second operand on NaN.)
            unsafe { _mm256_max_ps(a, b) }
        }
        #[inline(always)]
        fn min(self, a: __m256, b: __m256) -> __m256 {
            // SAFETY: see the impl comment.
            unsafe { _mm256_min_ps(a, b) }
        }
        #[inline(always)]
        fn abs(self, a: __m256) -> __m256 {
            // SAFETY: see the impl comment.
            unsafe { _mm256_andnot_ps(_mm256_set1_ps(-0.0), a) }
        }
        #[inline(always)]
        fn round(self, a: __m256) -> __m256 {
            // SAFETY: see the impl comment.
            unsafe { _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(a) }
        }
        #[inline(always)]
        fn pow2i(self, n: __m256) -> __m256 {
            // SAFETY: see the impl comment.
            unsafe {
                let i = _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127));
                _mm256_castsi256_ps(_mm256_slli_epi32::<23>(i))
            }
        }
        #[inline(always)]
        fn select_lt(self, a: __m256, b: __m256, t: __m256, f: __m256) -> __m256 {
            // SAFETY: see the impl comment.
            unsafe { _mm256_blendv_ps(f, t, _mm256_cmp_ps::<_CMP_LT_OQ>(a, b)) }
        }
        #[inline(always)]
        fn reduce_add(self, a: __m256) -> f32 {
            // SAFETY: see the impl comment.
            unsafe {
                let s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps::<1>(a));
                let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
                let s = _mm_add_ss(s, _mm_shuffle_ps::<0b01>(s, s));
                _mm_cvtss_f32(s)
            }
        }
        #[inline(always)]
        fn reduce_max(self, a: __m256) -> f32 {
            // SAFETY: see the impl comment.
            unsafe {
                let s = _mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps::<1>(a));
                let s = _mm_max_ps(s, _mm_movehl_ps(s, s));
                let s = _mm_max_ss(s, _mm_shuffle_ps::<0b01>(s, s));
                _mm_cvtss_f32(s)
            }
        }
    }

    // SAFETY (every `unsafe` block in this impl): a value of `Avx512` exists only inside
    // `run_avx512`, which `dispatch` enters after detecting avx512f, avx2 and fma, so the
    // intrinsics' target features are present; loads and stores go through slices of at least 16 floats
    // (checked by the slicing), so the unaligned pointer accesses stay in bounds.
    impl Simd for Avx512 {
        const LANES: usize = 16;
        type V = __m512;

        #[inline(always)]
        fn splat(self, x: f32) -> __m512 {
            // SAFETY: see the impl comment.
            unsafe { _mm512_set1_ps(x) }
        }
        #[inline(always)]
        fn load(self, s: &[f32]) -> __m512 {
            let s = &s[..16];
            // SAFETY: see the impl comment; `s` has 16 floats.
            unsafe { _mm512_loadu_ps(s.as_ptr()) }
        }
        #[inline(always)]
        fn store(self, s: &mut [f32], v: __m512) {
            let s = &mut s[..16];
            // SAFETY: see the impl comment; `s` has 16 floats.
            unsafe { _mm512_storeu_ps(s.as_mut_ptr(), v) }
        }
        #[inline(always)]
        fn load_tail(self, s: &[f32], fill: f32) -> __m512 {
            let n = s.len().min(16);
            let mask: __mmask16 = ((1u32 << n) - 1) as __mmask16;
            // SAFETY: see the impl comment; the mask enables only the first `n <= s.len()`
            // lanes, and masked-off lanes are not accessed.
            unsafe { _mm512_mask_loadu_ps(_mm512_set1_ps(fill), mask, s.as_ptr()) }
        }
        #[inline(always)]
        fn store_tail(self, s: &mut [f32], v: __m512) {
            let n = s.len().min(16);
            let mask: __mmask16 = ((1u32 << n) - 1) as __mmask16;
            // SAFETY: see the impl comment; only the first `n <= s.len()` lanes are written.
            unsafe { _mm512_mask_storeu_ps(s.as_mut_ptr(), mask, v) }
        }
        #[inline(always)]
        fn add(self, a: __m512, b: __m512) -> __m512 {
            // SAFETY: see the impl comment.
            unsafe { _mm512_add_ps(a, b) }
        }
        #[inline(always)]
        fn sub(self, a: __m512, b: __m512) -> __m512 {
            // SAFETY: see the impl comment.
            unsafe { _mm512_sub_ps(a, b) }
        }
        #[inline(always)]
        fn mul(self, a: __m512, b: __m512) -> __m512 {
            // SAFETY: see the impl comment.
            unsafe { _mm512_mul_ps(a, b) }
        }
        #[inline(always)]
        fn div(self, a: __m512, b: __m512) -> __m512 {
            // SAFETY: see the impl comment.
            unsafe { _mm512_div_ps(a, b) }
        }
        #[inline(always)]
        fn mul_add(self, a: __m512, b: __m512, c: __m512) -> __m512 {
            // SAFETY: see the impl comment.
            unsafe { _mm512_fmadd_ps(a, b, c) }
        }
        #[inline(always)]
        fn max(self, a: __m512, b: __m512) -> __m512 {
            // SAFETY: see the impl comment. (vmaxps returns the second operand on NaN.)
            unsafe { _mm512_max_ps(a, b) }
        }
        #[inline(always)]
        fn min(self, a: __m512, b: __m512) -> __m512 {
            // SAFETY: see the impl comment.
            unsafe { _mm512_min_ps(a, b) }
        }
        #[inline(always)]
        fn abs(self, a: __m512) -> __m512 {
            // SAFETY: see the impl comment.
            unsafe { _mm512_abs_ps(a) }
        }
        #[inline(always)]
        fn round(self, a: __m512) -> __m512 {
            // SAFETY: see the impl comment.
            unsafe { _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(a) }
        }
        #[inline(always)]
        fn pow2i(self, n: __m512) -> __m512 {
            // SAFETY: see the impl comment.
            unsafe {
                let i = _mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127));
                _mm512_castsi512_ps(_mm512_slli_epi32::<23>(i))
            }
        }
        #[inline(always)]
        fn select_lt(self, a: __m512, b: __m512, t: __m512, f: __m512) -> __m512 {
            // SAFETY: see the impl comment.
            unsafe { _mm512_mask_blend_ps(_mm512_cmp_ps_mask::<_CMP_LT_OQ>(a, b), f, t) }
        }
        #[inline(always)]
        fn reduce_add(self, a: __m512) -> f32 {
            // SAFETY: see the impl comment.
            unsafe { _mm512_reduce_add_ps(a) }
        }
        #[inline(always)]
        fn reduce_max(self, a: __m512) -> f32 {
            // SAFETY: see the impl comment.
            unsafe { _mm512_reduce_max_ps(a) }
        }
    }
}

/// Lower clamp of [`exp`]: `exp(EXP_LO)` is the smallest normal f32; below it the result is 0.
const EXP_LO: f32 = -87.336_55;
/// Upper clamp of [`exp`] (`2^127` is the largest power the scaling step can make).
const EXP_HI: f32 = 88.0;

/// `e^(hi + lo)` where `lo` is a small correction to `hi` (|lo| well under 0.1), each lane
/// to about 1 ulp (Cephes `expf`: Cody-Waite reduction by ln 2, degree-6 polynomial).
/// Arguments below about -87.34 (and -inf) give exactly 0, above 88 give `e^88`; NaN gives
/// NaN.
// The coefficients are the published ones, verbatim.
#[allow(clippy::excessive_precision)]
#[inline(always)]
pub(crate) fn exp_split<S: Simd>(s: S, hi: S::V, lo: S::V) -> S::V {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const C1: f32 = 0.693_359_4;
    const C2: f32 = -2.121_944_4e-4;
    let x = s.min(s.splat(EXP_HI), s.max(s.splat(EXP_LO), hi));
    let n = s.round(s.mul(x, s.splat(LOG2E)));
    let r = s.mul_add(n, s.splat(-C1), x);
    let r = s.mul_add(n, s.splat(-C2), r);
    let r = s.add(r, lo);
    let mut p = s.splat(1.987_569_1e-4);
    p = s.mul_add(p, r, s.splat(1.398_199_9e-3));
    p = s.mul_add(p, r, s.splat(8.333_452e-3));
    p = s.mul_add(p, r, s.splat(4.166_579_6e-2));
    p = s.mul_add(p, r, s.splat(1.666_666_5e-1));
    p = s.mul_add(p, r, s.splat(5.000_000_1e-1));
    let y = s.mul_add(p, s.mul(r, r), s.add(r, s.splat(1.0)));
    let y = s.mul(y, s.pow2i(n));
    s.select_lt(hi, s.splat(EXP_LO), s.splat(0.0), y)
}

/// `e^x`, see [`exp_split`].
#[inline(always)]
pub(crate) fn exp<S: Simd>(s: S, x: S::V) -> S::V {
    exp_split(s, x, s.splat(0.0))
}

/// GELU in its exact (erf) form, `x * Φ(x)`, as PyTorch's `nn.GELU()` default.
///
/// `Φ` goes through `erfc(|x|/√2)` (Numerical Recipes' `erfcc`, relative error under
/// 1.2e-7 for all arguments), so the result keeps its relative accuracy in the negative
/// tail where `1 + erf` would cancel: `Φ(x) = erfc(z)/2` for `x < 0`, `1 - erfc(z)/2`
/// otherwise. The exponent `-z² + P(t)` is carried in two parts (`-x²/2` exactly by an FMA,
/// then a TwoSum with `P(t)`), so large `|x|` loses no accuracy to it.
// The coefficients are the published ones, verbatim.
#[allow(clippy::excessive_precision)]
#[inline(always)]
pub(crate) fn gelu<S: Simd>(s: S, x: S::V) -> S::V {
    // Beyond |x| = 14 (z ≈ 9.9), erfc(z) < 1e-43: the exponential is 0 in f32 anyway. The
    // clamp keeps x² finite for huge |x| (NaN passes through: `min` returns its second
    // operand).
    let xa = s.min(s.splat(14.0), s.abs(x));
    let z = s.mul(xa, s.splat(std::f32::consts::FRAC_1_SQRT_2));
    let t = s.div(s.splat(1.0), s.mul_add(s.splat(0.5), z, s.splat(1.0)));
    let mut p = s.splat(0.170_872_77);
    p = s.mul_add(p, t, s.splat(-0.822_152_23));
    p = s.mul_add(p, t, s.splat(1.488_515_87));
    p = s.mul_add(p, t, s.splat(-1.135_203_98));
    p = s.mul_add(p, t, s.splat(0.278_868_07));
    p = s.mul_add(p, t, s.splat(-0.186_288_06));
    p = s.mul_add(p, t, s.splat(0.096_784_18));
    p = s.mul_add(p, t, s.splat(0.374_091_96));
    p = s.mul_add(p, t, s.splat(1.000_023_68));
    p = s.mul_add(p, t, s.splat(-1.265_512_23));
    // -z² = -x²/2, exactly as a_hi - zz_err (from x, not from the rounded z: the rounding
    // of z alone would cost 2.5e-6 relative at z = 4.5).
    let xx = s.mul(xa, xa);
    let xx_err = s.mul_add(xa, xa, s.sub(s.splat(0.0), xx));
    let a_hi = s.mul(xx, s.splat(-0.5));
    let zz_err = s.mul(xx_err, s.splat(0.5));
    // TwoSum(a_hi, p): sum + err == a_hi + p exactly.
    let sum = s.add(a_hi, p);
    let bb = s.sub(sum, a_hi);
    let err = s.add(s.sub(a_hi, s.sub(sum, bb)), s.sub(p, bb));
    let half_erfc = s.mul(
        s.mul(s.splat(0.5), t),
        exp_split(s, sum, s.sub(err, zz_err)),
    );
    let phi = s.select_lt(x, s.splat(0.0), half_erfc, s.sub(s.splat(1.0), half_erfc));
    s.mul(x, phi)
}
