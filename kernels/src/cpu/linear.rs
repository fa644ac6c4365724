//! A linear layer on a weight packed once, at load, for Quiver's own matrix-product kernel:
//! `dst = act(a · wᵀ + bias)` with `w` stored as PyTorch stores it (`[out, in]`).
//!
//! [`super::matmul_transposed_slice`] hands `gemm` the weight as it is stored, and `gemm`
//! packs it again on every call; the bias needs a pass of its own before the product and
//! GELU one after it. Here the weight is rearranged once into column panels of
//! `NR = 2 × lanes` outputs (for each input position, the panel's `NR` weights side by
//! side, zero-padded past the last output), so the micro-kernel streams it straight from
//! memory; the bias is the accumulators' starting value and GELU is applied to the
//! accumulators before they are stored, so the output is written once.
//!
//! The loop nest is the usual one for a register-tiled product (as in BLIS and `gemm`):
//! - a task owns a block of at most `MC` rows of `a` (and of `dst`) and a range of column
//!   panels; tasks are spread over rayon's pool (split by columns too when there are few
//!   rows, so a short batch still uses every thread), equal and a multiple of the threads
//!   in number where the shape allows (`super::split`);
//! - the depth goes in blocks of `KC`: for each column panel (its `KC × NR` weights) the
//!   task runs the micro-kernel on each `MR`-row tile of its rows, reading `a` in place
//!   (no packed copy: see `Block::run`);
//! - the micro-kernel holds an `MR × NR` tile of `dst` in registers (8 × 48 on AVX-512:
//!   24 of its 32 vector registers; 6 × 16 on AVX2: 12 of 16), three (two) weight vectors
//!   and one broadcast of `a` per row and step, so each step is 24 (12) independent FMAs on
//!   11 (8) loads.

use std::ops::Range;

use rayon::prelude::*;

use super::simd::{Simd, WithSimd, dispatch, gelu};
use super::split::{SharedOut, Split};
use super::{CpuKernelError, Isa};

/// The largest [`nv`].
const NV: usize = 3;
/// Vectors per row of the register tile for `lanes`-wide vectors: a panel is
/// `NR = nv × lanes` outputs wide. 3 on AVX-512 (8 × 3 = 24 of its 32 registers
/// accumulate), 2 on AVX2 (6 × 2 = 12 of 16) and on the scalar reference.
const fn nv(lanes: usize) -> usize {
    if lanes >= 16 { 3 } else { 2 }
}
/// Rows of the register tile for `lanes`-wide vectors: 8 on AVX-512, 6 on AVX2 and on the
/// scalar reference. Measured on Zen 4 with `QUIVER_CPU_ISA=avx2` (MiniLM, 2 threads): 6 × 2
/// is 5-8% faster than 4 × 2, and 4 × 3 leaves too few registers for the weights and the
/// broadcast (LLVM spills an accumulator; 0.6× of 4 × 2).
const fn mr(lanes: usize) -> usize {
    if lanes >= 16 { 8 } else { 6 }
}
/// The largest [`mr`].
const MR_MAX: usize = 8;
/// The most rows of `a` per task (see `super::split`).
const MC: usize = 48;
/// Most depth per block. The depth is split into equal blocks of at most this (BERT's 384 is
/// one block, its 1536 four); one panel's `KC × NR` weights stay in L2 across the row
/// tiles of a task.
const KC: usize = 384;

/// What a [`PackedLinear`] applies to `a · wᵀ + bias` before storing it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Activation {
    /// Nothing: the affine map alone.
    #[default]
    Identity,
    /// GELU in its exact erf form, as [`super::gelu_slice`].
    Gelu,
}

/// A linear layer's weight (and optional bias), packed for one instruction set's
/// micro-kernel.
#[derive(Clone)]
pub struct PackedLinear {
    isa: Isa,
    out_features: usize,
    in_features: usize,
    /// Outputs per panel: [`nv`] vectors of `isa`.
    nr: usize,
    /// Panel `j` is `[in_features, nr]`, outputs `j × nr ..`, zero past `out_features`.
    panels: Vec<f32>,
    /// `out_features` rounded up to `nr`, zero-padded; `None` for no bias.
    bias: Option<Vec<f32>>,
}

impl std::fmt::Debug for PackedLinear {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PackedLinear")
            .field("isa", &self.isa)
            .field("out_features", &self.out_features)
            .field("in_features", &self.in_features)
            .field("bias", &self.bias.is_some())
            .finish_non_exhaustive()
    }
}

/// f32 lanes of `isa`'s vectors.
fn lanes(isa: Isa) -> usize {
    match isa {
        Isa::Scalar => 1,
        Isa::Avx2 => 8,
        Isa::Avx512 => 16,
    }
}

impl PackedLinear {
    /// Packs `weight` (`[out_features, in_features]`, row-major: PyTorch's `Linear.weight`)
    /// and `bias` (`[out_features]`) for `isa`.
    ///
    /// # Errors
    ///
    /// [`CpuKernelError::IsaUnavailable`] when this CPU lacks `isa`;
    /// [`CpuKernelError::Shape`] when a dimension is 0 or a slice's length does not match.
    pub fn new(
        isa: Isa,
        weight: &[f32],
        bias: Option<&[f32]>,
        out_features: usize,
        in_features: usize,
    ) -> Result<Self, CpuKernelError> {
        isa.check()?;
        let (n, k) = (out_features, in_features);
        if n == 0 || k == 0 || weight.len() != n * k || bias.is_some_and(|b| b.len() != n) {
            return Err(CpuKernelError::shape(
                "PackedLinear::new",
                format!(
                    "weight has {} elements, bias {:?}; [out, in] = [{n}, {k}]",
                    weight.len(),
                    bias.map(<[f32]>::len)
                ),
            ));
        }
        let nr = nv(lanes(isa)) * lanes(isa);
        let padded = n.next_multiple_of(nr);
        let mut panels = vec![0.0f32; padded * k];
        for (j, panel) in panels.chunks_exact_mut(k * nr).enumerate() {
            for (c, row) in weight.chunks_exact(k).skip(j * nr).take(nr).enumerate() {
                for (p, &w) in row.iter().enumerate() {
                    panel[p * nr + c] = w;
                }
            }
        }
        let bias = bias.map(|b| {
            let mut padded = vec![0.0f32; padded];
            padded[..n].copy_from_slice(b);
            padded
        });
        Ok(PackedLinear {
            isa,
            out_features: n,
            in_features: k,
            nr,
            panels,
            bias,
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
    pub fn isa(&self) -> Isa {
        self.isa
    }

    /// `dst = act(a · wᵀ + bias)` for `a` of `[rows, in_features]` and `dst` of
    /// `[rows, out_features]`, row-major; multi-threaded on rayon's pool.
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
        self.check(a, dst, rows)?;
        let split = self.split(rows);
        self.run(a, dst, act, split, None);
        Ok(())
    }

    /// The end of a BERT sub-layer in one call: `dst = a · wᵀ` (+ the bias, if any), then
    /// `out = layer_norm(dst + norm.x_bias + norm.residual)` as `add_layer_norm`.
    /// Where each task owns whole rows (every product but the shortest), it normalizes its
    /// rows as soon as it has computed them, while they are in its cache, and the norm needs
    /// no parallel step of its own.
    ///
    /// # Errors
    ///
    /// As [`PackedLinear::forward`], and [`CpuKernelError::Shape`] when `out` or
    /// `norm.residual` differ from `dst` in length or a vector of `norm` from
    /// `out_features`.
    pub(crate) fn forward_add_norm(
        &self,
        a: &[f32],
        dst: &mut [f32],
        rows: usize,
        norm: AddNorm<'_>,
        out: &mut [f32],
    ) -> Result<(), CpuKernelError> {
        let n = self.out_features;
        if out.len() != dst.len()
            || norm.residual.len() != dst.len()
            || [norm.x_bias, norm.weight, norm.bias]
                .iter()
                .any(|v| v.len() != n)
        {
            return Err(CpuKernelError::shape(
                "PackedLinear::forward_add_norm",
                format!(
                    "dst has {} elements, out {}, residual {}; bias, weight and norm bias {:?}; {n} outputs",
                    dst.len(),
                    out.len(),
                    norm.residual.len(),
                    [norm.x_bias.len(), norm.weight.len(), norm.bias.len()]
                ),
            ));
        }
        let split = self.split(rows);
        if split.col_tasks() > 1 {
            self.forward(a, dst, rows, Activation::Identity)?;
            return norm.apply(self.isa, dst, out);
        }
        self.check(a, dst, rows)?;
        let isa = self.isa;
        let base = SharedOut::new(out);
        let then = |range: Range<usize>, done: &[f32]| {
            // SAFETY: `out` is as long as `dst` (checked above), and the task that calls this
            // owns rows `range` of both alone (whole rows: one column task).
            let out = unsafe {
                std::slice::from_raw_parts_mut(base.at(range.start * n), range.len() * n)
            };
            super::layer_norm::add_layer_norm_rows(
                isa,
                done,
                &norm.residual[range.start * n..range.end * n],
                norm.x_bias,
                norm.weight,
                norm.bias,
                norm.eps,
                out,
            );
        };
        self.run(a, dst, Activation::Identity, split, Some(&then));
        Ok(())
    }

    /// [`CpuKernelError::Shape`] unless `a` is `rows × in_features` and `dst` `rows ×
    /// out_features`, `rows > 0`.
    fn check(&self, a: &[f32], dst: &[f32], rows: usize) -> Result<(), CpuKernelError> {
        let (n, k) = (self.out_features, self.in_features);
        if rows == 0 || a.len() != rows * k || dst.len() != rows * n {
            return Err(CpuKernelError::shape(
                "PackedLinear::forward",
                format!(
                    "a has {} elements, dst {}; rows {rows}, [out, in] = [{n}, {k}]",
                    a.len(),
                    dst.len()
                ),
            ));
        }
        Ok(())
    }

    /// How a product of `rows` is cut into tasks on the current pool.
    fn split(&self, rows: usize) -> Split {
        let panels = self.out_features.div_ceil(self.nr);
        let threads = rayon::current_num_threads().max(1);
        Split::new(rows, mr(lanes(self.isa)), MC, panels, threads)
    }

    /// Runs the product's tasks over rayon's pool (shapes checked by the caller); `then`,
    /// given only when every task owns whole rows, gets each task's rows of `dst` once
    /// they are done.
    #[allow(clippy::type_complexity)]
    fn run(
        &self,
        a: &[f32],
        dst: &mut [f32],
        act: Activation,
        split: Split,
        then: Option<&(dyn Fn(Range<usize>, &[f32]) + Sync)>,
    ) {
        debug_assert!(then.is_none() || split.col_tasks() == 1);
        let (n, k) = (self.out_features, self.in_features);
        let out = SharedOut::new(dst);
        let run = |t: usize| {
            let (row_range, panel_range) = split.task(t);
            let cols = panel_range.start * self.nr..(panel_range.end * self.nr).min(n);
            // SAFETY: tasks cover disjoint (row range × column range) rectangles of `dst`,
            // which is `rows × n` (checked by the caller), so each row slice made here is in
            // bounds and no two live slices overlap; `dst`'s borrow outlives the parallel
            // loop.
            let mut dst_rows: Vec<&mut [f32]> = row_range
                .clone()
                .map(|r| unsafe {
                    std::slice::from_raw_parts_mut(out.at(r * n + cols.start), cols.len())
                })
                .collect();
            dispatch(
                self.isa,
                Block {
                    w: self,
                    a: &a[row_range.start * k..row_range.end * k],
                    panels: panel_range,
                    dst: &mut dst_rows,
                    act,
                },
            );
            drop(dst_rows);
            if let Some(then) = then {
                // SAFETY: with `then` every task owns whole rows (one column task), so rows
                // `row_range` of `dst` are this task's alone, and its mutable slices of them
                // are gone.
                let done = unsafe {
                    std::slice::from_raw_parts(out.at(row_range.start * n), row_range.len() * n)
                };
                then(row_range, done);
            }
        };
        let tasks = split.tasks();
        if tasks == 1 || rayon::current_num_threads() <= 1 {
            (0..tasks).for_each(run);
        } else {
            (0..tasks).into_par_iter().for_each(run);
        }
    }
}

/// The layer norm that ends a BERT sub-layer, for [`PackedLinear::forward_add_norm`]:
/// `residual` is as long as the product, the vectors `out_features` long.
#[derive(Debug, Clone, Copy)]
pub(crate) struct AddNorm<'a> {
    pub(crate) residual: &'a [f32],
    pub(crate) x_bias: &'a [f32],
    pub(crate) weight: &'a [f32],
    pub(crate) bias: &'a [f32],
    pub(crate) eps: f32,
}

impl AddNorm<'_> {
    /// `out = layer_norm(dst + x_bias + residual)` over rayon's pool, as a step of its own.
    pub(crate) fn apply(
        self,
        isa: Isa,
        dst: &[f32],
        out: &mut [f32],
    ) -> Result<(), CpuKernelError> {
        let AddNorm {
            residual,
            x_bias,
            weight,
            bias,
            eps,
        } = self;
        super::add_layer_norm_slice(isa, dst, residual, x_bias, weight, bias, eps, out)
    }
}

/// One task: rows of `a` against a range of column panels.
struct Block<'a, 'd> {
    w: &'a PackedLinear,
    /// `dst.len()` rows of `in_features`.
    a: &'a [f32],
    panels: Range<usize>,
    /// This task's rows of `dst`, each from the first column of `panels` to its last.
    dst: &'a mut [&'d mut [f32]],
    act: Activation,
}

impl WithSimd for Block<'_, '_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: Simd>(self, s: S) {
        match (mr(S::LANES), nv(S::LANES)) {
            (8, 3) => self.run::<S, 8, 3>(s),
            _ => self.run::<S, 6, 2>(s),
        }
    }
}

impl Block<'_, '_> {
    /// The loop nest for a register tile of `MR` rows (`mr(S::LANES)`).
    ///
    /// `a` is read where it lies, row by row: no copy into packed strips. A task's rows
    /// (at most [`MC`] × [`KC`] floats) stay in L2 while its panels stream past them, and
    /// at the short batches where latency matters a packed copy per task cost as much as a
    /// third of the product (each column task packed the same rows again).
    #[inline(always)]
    fn run<S: Simd, const MR: usize, const V: usize>(self, s: S) {
        let Block {
            w,
            a,
            panels,
            dst,
            act,
        } = self;
        let (k, nr) = (w.in_features, w.nr);
        debug_assert_eq!(nr, V * S::LANES);
        let rows = dst.len();
        let col0 = panels.start * nr;
        let kc_max = k.div_ceil(k.div_ceil(KC));
        // The rows past the last of a partial tile read zeros.
        let zeros = [0.0f32; KC];
        let mut p0 = 0;
        while p0 < k {
            let kc = kc_max.min(k - p0);
            let first = p0 == 0;
            let last = p0 + kc == k;
            for j in panels.clone() {
                let weights = &w.panels[j * k * nr + p0 * nr..][..kc * nr];
                let init = if first {
                    match &w.bias {
                        Some(b) => Init::Bias(&b[j * nr..][..nr]),
                        None => Init::Zero,
                    }
                } else {
                    Init::Load
                };
                let act = if last { act } else { Activation::Identity };
                let col = j * nr - col0;
                let cols = (w.out_features - j * nr).min(nr);
                for (i, tile_rows) in dst.chunks_mut(MR).enumerate() {
                    let xs: [&[f32]; MR] = std::array::from_fn(|r| {
                        let row = i * MR + r;
                        if row < rows {
                            &a[row * k + p0..][..kc]
                        } else {
                            &zeros[..kc]
                        }
                    });
                    tile::<S, MR, V>(s, &xs, weights, tile_rows, col, cols, init, act);
                }
            }
            p0 += kc;
        }
    }
}

/// Where a tile's accumulators start.
#[derive(Clone, Copy)]
enum Init<'a> {
    Zero,
    /// The bias of the panel's `NR` outputs.
    Bias(&'a [f32]),
    /// What is in `dst` (the previous depth blocks' sum).
    Load,
}

/// The micro-kernel: `dst[r][col .. col + cols] = act(init + xs[r] · weights)` for the
/// `dst.len() <= MR` rows, over one depth block (`xs`: `MR` rows of `kc`, `weights`:
/// `kc × NR`). Each depth step loads `NV` weight vectors and broadcasts one value per row:
/// `MR × NV` independent FMAs on `MR + NV` loads.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn tile<S: Simd, const MR: usize, const V: usize>(
    s: S,
    xs: &[&[f32]; MR],
    weights: &[f32],
    dst: &mut [&mut [f32]],
    col: usize,
    cols: usize,
    init: Init<'_>,
    act: Activation,
) {
    let l = S::LANES;
    let nr = V * l;
    let kc = weights.len() / nr;
    assert!(
        MR <= MR_MAX && V <= NV && xs.iter().all(|x| x.len() == kc) && dst.len() <= MR,
        "tile: rows of a shorter than the weights' depth"
    );
    // `acc` is only ever indexed by constants (loops of `MR` and `V` steps, unrolled), so
    // LLVM keeps it in registers. Indexed by a loop bound that is not a constant, `acc`
    // would live in memory, and every FMA of the inner loop would store it (half the
    // speed). So a full tile (`MR` rows, `NR` columns: nearly all of them) moves between
    // `acc` and `dst` in constant loops, and a partial one goes through a stack buffer.
    let full = dst.len() == MR && cols == nr;
    let mut acc = [[s.splat(0.0); V]; MR];
    match init {
        Init::Zero => {}
        Init::Bias(b) => {
            let b: [S::V; V] = std::array::from_fn(|v| s.load(&b[v * l..]));
            acc = [b; MR];
        }
        Init::Load if full => {
            acc = std::array::from_fn(|r| std::array::from_fn(|v| s.load(&dst[r][col + v * l..])));
        }
        Init::Load => {
            let mut buf = [0.0f32; MR_MAX * NV * 16];
            for (r, row) in dst.iter().enumerate() {
                buf[r * nr..][..cols].copy_from_slice(&row[col..col + cols]);
            }
            acc = std::array::from_fn(|r| std::array::from_fn(|v| s.load(&buf[(r * V + v) * l..])));
        }
    }
    let ptrs: [*const f32; MR] = std::array::from_fn(|r| xs[r].as_ptr());
    for (p, w) in weights.chunks_exact(nr).enumerate() {
        let w: [S::V; V] = std::array::from_fn(|v| s.load(&w[v * l..]));
        for r in 0..MR {
            // SAFETY: `p < kc` (one weight row per depth step) and every row of `xs` holds
            // `kc` floats (asserted above).
            let x = s.splat(unsafe { *ptrs[r].add(p) });
            for v in 0..V {
                acc[r][v] = s.mul_add(x, w[v], acc[r][v]);
            }
        }
    }
    if full {
        for (r, acc) in acc.iter().enumerate() {
            for (v, &a) in acc.iter().enumerate() {
                s.store(&mut dst[r][col + v * l..], a);
            }
        }
        if act == Activation::Gelu {
            for row in dst.iter_mut() {
                for v in 0..V {
                    let x = s.load(&row[col + v * l..]);
                    s.store(&mut row[col + v * l..], gelu(s, x));
                }
            }
        }
        return;
    }
    let mut buf = [0.0f32; MR_MAX * NV * 16];
    for (r, acc) in acc.iter().enumerate() {
        for (v, &a) in acc.iter().enumerate() {
            s.store(&mut buf[(r * V + v) * l..], a);
        }
    }
    for (r, row) in dst.iter_mut().enumerate() {
        let out = &mut buf[r * nr..][..nr];
        if act == Activation::Gelu {
            for v in 0..V {
                let x = s.load(&out[v * l..]);
                s.store(&mut out[v * l..], gelu(s, x));
            }
        }
        row[col..col + cols].copy_from_slice(&out[..cols]);
    }
}

#[cfg(test)]
mod tests {
    use super::{Activation, AddNorm, PackedLinear};
    use crate::cpu::{Isa, add_layer_norm_slice};

    fn values(seed: u32, n: usize) -> Vec<f32> {
        let mut x = seed.max(1);
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                #[allow(clippy::cast_precision_loss)]
                let v = x as f32 / u32::MAX as f32;
                v * 2.0 - 1.0
            })
            .collect()
    }

    /// The fused norm writes what the product followed by `add_layer_norm` writes, bit for
    /// bit, whether the tasks own whole rows (fused) or split the columns (two steps).
    #[test]
    fn forward_add_norm_equals_the_product_then_the_norm() {
        let (n, k) = (100, 70);
        for isa in Isa::available() {
            let w = PackedLinear::new(isa, &values(1, n * k), None, n, k).expect("packs");
            let (xb, g, b) = (values(2, n), values(3, n), values(4, n));
            for rows in [1, 7, 16, 100, 256] {
                let a = values(5, rows * k);
                let residual = values(6, rows * n);
                let norm = AddNorm {
                    residual: &residual,
                    x_bias: &xb,
                    weight: &g,
                    bias: &b,
                    eps: 1e-12,
                };
                let (mut dst, mut out) = (vec![0.0; rows * n], vec![f32::NAN; rows * n]);
                w.forward_add_norm(&a, &mut dst, rows, norm, &mut out)
                    .expect("fused");
                let (mut dst2, mut out2) = (vec![0.0; rows * n], vec![0.0; rows * n]);
                w.forward(&a, &mut dst2, rows, Activation::Identity)
                    .expect("product");
                add_layer_norm_slice(isa, &dst2, &residual, &xb, &g, &b, 1e-12, &mut out2)
                    .expect("norm");
                assert_eq!(dst, dst2, "{isa:?}, {rows} rows: product");
                let same = out
                    .iter()
                    .zip(&out2)
                    .all(|(x, y)| x.to_bits() == y.to_bits());
                assert!(same, "{isa:?}, {rows} rows: norm");
            }
            let mut short = vec![0.0; n];
            let norm = AddNorm {
                residual: &xb,
                x_bias: &xb,
                weight: &g,
                bias: &b[1..],
                eps: 1e-12,
            };
            assert!(
                w.forward_add_norm(&values(7, k), &mut vec![0.0; n], 1, norm, &mut short)
                    .is_err()
            );
        }
    }
}
