//! The SIMD walks of the flat forest (see `forest.rs` for the layout they rely on).
//!
//! One walk steps 8 (AVX2) or 16 (AVX-512) lanes at once, each lane a (row, node) pair: per
//! step four gathers (the node's packed feature and flags, its threshold, its left child, and
//! the row's feature value), the split rule as lane masks, and `next = left + go_right`.
//! Leaves point at themselves and never go right, so a walk runs exactly the tree's depth in
//! steps. Two ways to fill the lanes:
//!
//! [`block_by_rows`]: many rows, one tree at a time: the lanes are rows (several vectors in
//! flight, so the gathers' latencies overlap). The leaves found are added to each row's sums
//! in tree order, as the scalar reference adds them, so results are bit-identical to it.
//!
//! Too few rows to fill a vector go to the keyed walk (`keyed.rs`) instead. (Filling the
//! lanes with one row's trees, as an earlier version did, spent four gathers per node visit:
//! 8.7 µs for one row of 500 trees of depth 8 on the development machines' AMD EPYC, where
//! the keyed walk's scalar loads take 5.9 µs.)

#![allow(unsafe_code)]

use super::forest::{Forest, ROW_BLOCK, add};
use crate::cpu::Isa;

/// Lanes of one walk on `isa` (1 for scalar).
pub(crate) fn lanes(isa: Isa) -> usize {
    match isa {
        Isa::Avx2 => 8,
        Isa::Avx512 => 16,
        _ => 1,
    }
}

/// Vectors walked together by [`block_by_rows`].
const IN_FLIGHT: usize = 4;

/// The sums of at most [`ROW_BLOCK`] rows (`x` is `[rows, features]`, `out` `[rows, groups]`)
/// on `isa`, which must be available and not scalar.
pub(crate) fn block_by_rows(f: &Forest, isa: Isa, x: &[f32], out: &mut [f64]) {
    let features = f.features();
    let groups = f.groups();
    let rows = x.len() / features;
    debug_assert!(rows <= ROW_BLOCK && out.len() == rows * groups);
    for acc in out.chunks_exact_mut(groups) {
        acc.copy_from_slice(f.base());
    }
    let lanes = lanes(isa);
    let vectors = rows / lanes;
    let simd_rows = vectors * lanes;
    // Each lane's offset into `x`: its row times the features. `rows * features` fits an
    // i32: `features <= MAX_FEATURES` and `rows <= ROW_BLOCK` (checked at load).
    let mut rowoff = [0i32; ROW_BLOCK];
    for (r, o) in rowoff.iter_mut().enumerate().take(rows) {
        *o = (r * features) as i32;
    }
    let mut leaves = [0u32; ROW_BLOCK];
    for t in 0..f.trees() {
        let root = f.roots[t];
        leaves[..simd_rows].fill(root);
        walk(
            f,
            isa,
            x,
            &mut leaves[..simd_rows],
            &rowoff[..simd_rows],
            f.depth[t],
        );
        for r in simd_rows..rows {
            leaves[r] = f.leaf_scalar(root, &x[r * features..(r + 1) * features]);
        }
        let g = f.group[t] as usize;
        for (r, &leaf) in leaves[..rows].iter().enumerate() {
            add(
                f.accumulate(),
                &mut out[r * groups + g],
                f.value[leaf as usize],
            );
        }
    }
}

/// Walks every lane `steps` steps: `nodes[k]` starts as a node index and ends as the node
/// reached, reading row values at `x[rowoff[k] + feature]`. `nodes.len()` is a multiple of
/// the lanes of `isa`.
///
/// Every start must be a node of `f` and every `rowoff[k] + features` at most `x.len()`:
/// checked here (cheaply, per call), since the gathers read without bounds checks.
fn walk(f: &Forest, isa: Isa, x: &[f32], nodes: &mut [u32], rowoff: &[i32], steps: u32) {
    let lanes = lanes(isa);
    assert_eq!(nodes.len(), rowoff.len());
    assert_eq!(nodes.len() % lanes, 0);
    assert!(nodes.iter().all(|&n| (n as usize) < f.nodes()));
    assert!(
        rowoff
            .iter()
            .all(|&o| o >= 0 && o as usize + f.features() <= x.len())
    );
    assert!(isa.is_available());
    #[cfg(target_arch = "x86_64")]
    {
        let p = x86::Ptrs {
            node: f.node.as_ptr().cast(),
            x: x.as_ptr(),
        };
        match isa {
            Isa::Avx2 => {
                let mut n = nodes.chunks_exact_mut(8 * IN_FLIGHT);
                let mut o = rowoff.chunks_exact(8 * IN_FLIGHT);
                for (n, o) in (&mut n).zip(&mut o) {
                    // SAFETY: AVX2 is available (asserted); every start is a node, and the
                    // forest's children are nodes (by construction), so every node index
                    // gathered is in bounds; features are < `f.features()` (checked at load),
                    // so every row read is in `x` (asserted above).
                    unsafe { x86::walk8::<IN_FLIGHT>(&p, n, o, steps) };
                }
                for (n, o) in n
                    .into_remainder()
                    .chunks_exact_mut(8)
                    .zip(o.remainder().chunks_exact(8))
                {
                    // SAFETY: as above.
                    unsafe { x86::walk8::<1>(&p, n, o, steps) };
                }
                return;
            }
            Isa::Avx512 => {
                let mut n = nodes.chunks_exact_mut(16 * IN_FLIGHT);
                let mut o = rowoff.chunks_exact(16 * IN_FLIGHT);
                for (n, o) in (&mut n).zip(&mut o) {
                    // SAFETY: as for AVX2, with AVX-512F available (asserted).
                    unsafe { x86::walk16::<IN_FLIGHT>(&p, n, o, steps) };
                }
                for (n, o) in n
                    .into_remainder()
                    .chunks_exact_mut(16)
                    .zip(o.remainder().chunks_exact(16))
                {
                    // SAFETY: as above.
                    unsafe { x86::walk16::<1>(&p, n, o, steps) };
                }
                return;
            }
            _ => {}
        }
    }
    // Scalar lanes (no SIMD here): the reference rule, step by step.
    for (n, &o) in nodes.iter_mut().zip(rowoff) {
        let row = &x[o as usize..o as usize + f.features()];
        *n = f.leaf_scalar(*n, row);
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::super::forest::{DEFAULT_LEFT, FEATURE_MASK, ZERO_MISSING, ZERO_THRESHOLD};

    /// The forest's nodes (16-byte [`PackedNode`](super::super::forest::PackedNode)s: meta,
    /// threshold, left, key) and the rows, as the gathers take them.
    pub(super) struct Ptrs {
        pub node: *const u32,
        pub x: *const f32,
    }

    /// [`super::walk`] on `8 × N` lanes with AVX2.
    ///
    /// # Safety
    /// AVX2 must be available; `nodes` and `rowoff` hold `8 × N` lanes; every node index in
    /// `nodes`, and every child of a node, indexes the nodes; every
    /// `rowoff[k] + feature` of a node indexes `x`.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn walk8<const N: usize>(
        p: &Ptrs,
        nodes: &mut [u32],
        rowoff: &[i32],
        steps: u32,
    ) {
        debug_assert!(nodes.len() == 8 * N && rowoff.len() == 8 * N);
        let features = _mm256_set1_epi32(FEATURE_MASK as i32);
        let abs = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fff_ffff));
        let zero = _mm256_set1_ps(ZERO_THRESHOLD);
        let all = _mm256_castsi256_ps(_mm256_set1_epi32(-1));
        let mut v = [_mm256_setzero_si256(); N];
        let mut o = [_mm256_setzero_si256(); N];
        for k in 0..N {
            // SAFETY: `nodes` and `rowoff` hold 8 lanes per vector (checked by the caller).
            unsafe {
                v[k] = _mm256_loadu_si256(nodes.as_ptr().add(8 * k).cast());
                o[k] = _mm256_loadu_si256(rowoff.as_ptr().add(8 * k).cast());
            }
        }
        for _ in 0..steps {
            for k in 0..N {
                // Node i's fields are at byte 16 i + 0, 4, 8: index 2 i at scale 8.
                let i = _mm256_slli_epi32::<1>(v[k]);
                // SAFETY: every lane's node indexes the nodes, and its row offset plus the
                // node's feature indexes `x` (the caller's contract).
                let (m, t, l, xv) = unsafe {
                    let m = _mm256_i32gather_epi32::<8>(p.node.cast(), i);
                    let t = _mm256_i32gather_ps::<8>(p.node.add(1).cast(), i);
                    let l = _mm256_i32gather_epi32::<8>(p.node.add(2).cast(), i);
                    let at = _mm256_add_epi32(o[k], _mm256_and_si256(m, features));
                    (m, t, l, _mm256_i32gather_ps::<4>(p.x, at))
                };
                let nan = _mm256_cmp_ps::<_CMP_UNORD_Q>(xv, xv);
                // All ones where the node's ZERO_MISSING (bit 30) / DEFAULT_LEFT (bit 31) is set.
                let zero_missing =
                    _mm256_castsi256_ps(_mm256_srai_epi32::<31>(_mm256_slli_epi32::<1>(m)));
                let default_left = _mm256_castsi256_ps(_mm256_srai_epi32::<31>(m));
                let small = _mm256_cmp_ps::<_CMP_LE_OQ>(_mm256_and_ps(xv, abs), zero);
                let missing = _mm256_or_ps(nan, _mm256_and_ps(zero_missing, small));
                let greater = _mm256_cmp_ps::<_CMP_GT_OQ>(xv, t);
                let right = _mm256_blendv_ps(greater, _mm256_xor_ps(default_left, all), missing);
                // `right` is all ones (-1) where the lane goes right: left - (-1).
                v[k] = _mm256_sub_epi32(l, _mm256_castps_si256(right));
            }
        }
        for (k, v) in v.iter().enumerate() {
            // SAFETY: as for the loads.
            unsafe { _mm256_storeu_si256(nodes.as_mut_ptr().add(8 * k).cast(), *v) };
        }
    }

    /// [`super::walk`] on `16 × N` lanes with AVX-512F.
    ///
    /// # Safety
    /// As [`walk8`], with AVX-512F available and 16 lanes per vector.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn walk16<const N: usize>(
        p: &Ptrs,
        nodes: &mut [u32],
        rowoff: &[i32],
        steps: u32,
    ) {
        debug_assert!(nodes.len() == 16 * N && rowoff.len() == 16 * N);
        let features = _mm512_set1_epi32(FEATURE_MASK as i32);
        let zero_bit = _mm512_set1_epi32(ZERO_MISSING as i32);
        let left_bit = _mm512_set1_epi32(DEFAULT_LEFT as i32);
        let zero = _mm512_set1_ps(ZERO_THRESHOLD);
        let one = _mm512_set1_epi32(1);
        let mut v = [_mm512_setzero_si512(); N];
        let mut o = [_mm512_setzero_si512(); N];
        for k in 0..N {
            // SAFETY: `nodes` and `rowoff` hold 16 lanes per vector (checked by the caller).
            unsafe {
                v[k] = _mm512_loadu_si512(nodes.as_ptr().add(16 * k).cast());
                o[k] = _mm512_loadu_si512(rowoff.as_ptr().add(16 * k).cast());
            }
        }
        for _ in 0..steps {
            for k in 0..N {
                let i = _mm512_slli_epi32::<1>(v[k]);
                // SAFETY: as in `walk8`.
                let (m, t, l, xv) = unsafe {
                    let m = _mm512_i32gather_epi32::<8>(i, p.node.cast());
                    let t = _mm512_i32gather_ps::<8>(i, p.node.add(1).cast());
                    let l = _mm512_i32gather_epi32::<8>(i, p.node.add(2).cast());
                    let at = _mm512_add_epi32(o[k], _mm512_and_si512(m, features));
                    (m, t, l, _mm512_i32gather_ps::<4>(at, p.x))
                };
                let nan = _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(xv, xv);
                let small = _mm512_cmp_ps_mask::<_CMP_LE_OQ>(_mm512_abs_ps(xv), zero);
                let missing = nan | (_mm512_test_epi32_mask(m, zero_bit) & small);
                let default_left = _mm512_test_epi32_mask(m, left_bit);
                let greater = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(xv, t);
                let right = (missing & !default_left) | (!missing & greater);
                v[k] = _mm512_mask_add_epi32(l, right, l, one);
            }
        }
        for (k, v) in v.iter().enumerate() {
            // SAFETY: as for the loads.
            unsafe { _mm512_storeu_si512(nodes.as_mut_ptr().add(16 * k).cast(), *v) };
        }
    }
}
