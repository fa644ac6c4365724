//! Fused multi-head self-attention for batches of short sequences:
//! `softmax(Q Kᵀ / √d + mask) V` per head, read straight from the `[batch, seq, heads × d]`
//! outputs of the query/key/value projections and written in the same layout.
//!
//! Stock candle-transformers BERT transposes Q, K and V to `[batch, heads, seq, d]` (three
//! copies), runs two batched matrix products of tiny matrices (11 × 32 × 11 for a short
//! sentence), five element-wise softmax ops and a transpose back. Here one task per
//! (sequence, group of heads) does its heads in cache: it packs their `Kᵀ` once
//! (`heads × d × seq`, zero-padded to two vector widths), computes six query rows of scores against
//! two vectors of keys at a time (twelve independent FMA chains sharing each pair of `Kᵀ`
//! loads), applies the softmax in place, and accumulates `P V` the same way.

use rayon::prelude::*;

use super::simd::{Simd, WithSimd, dispatch};
use super::softmax::softmax_row;
use super::split::SharedOut;
use super::{CpuKernelError, Isa};

/// The dimensions of one [`attention`] call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttentionShape {
    /// Sequences in the batch.
    pub batch: usize,
    /// Attention heads; the hidden size is `heads × head_dim`.
    pub heads: usize,
    /// Query positions per sequence.
    pub q_len: usize,
    /// Key/value positions per sequence.
    pub kv_len: usize,
    /// Elements per head.
    pub head_dim: usize,
}

impl AttentionShape {
    /// `heads × head_dim`, the row length of Q, K, V and the output.
    #[must_use]
    pub fn hidden(&self) -> usize {
        self.heads * self.head_dim
    }
}

/// Query rows computed together. Each step loads two vectors (of keys, or of a value row)
/// and broadcasts one element per row: 6 rows × 2 vectors = 12 independent FMA chains,
/// more than the FMA latency of two pipes needs (4 cycles × 2), 8 loads per 12 FMAs, and
/// with the two vectors and the broadcast 15 of AVX2's 16 registers.
const ROWS: usize = 6;
/// Rows of a group after the last full group of [`ROWS`] (then one at a time).
const TAIL_ROWS: usize = 3;

/// Multi-head attention, `out = softmax(q kᵀ / √head_dim + mask) v` per sequence and head.
///
/// Layouts (row-major, contiguous): `q` and `out` are `[batch, q_len, heads × head_dim]`,
/// `k` and `v` are `[batch, kv_len, heads × head_dim]` (head `h` is columns
/// `h × head_dim .. (h + 1) × head_dim`), and `mask`, if given, is `[batch, kv_len]`,
/// added to every query's scores (0 to keep a key, `-inf` or a large negative such as
/// `f32::MIN` to drop it; BERT's extended attention mask has this shape up to unit
/// dimensions). A query whose keys are all `-inf` gets an output row of zeros.
///
/// # Errors
///
/// [`CpuKernelError::IsaUnavailable`] when this CPU lacks `isa`;
/// [`CpuKernelError::Shape`] when a dimension is 0 or a slice's length does not match the
/// shape.
pub fn attention(
    isa: Isa,
    shape: AttentionShape,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    mask: Option<&[f32]>,
    out: &mut [f32],
) -> Result<(), CpuKernelError> {
    let hidden = shape.hidden();
    let kv_elems = shape.batch * shape.kv_len * hidden;
    if k.len() != kv_elems || v.len() != kv_elems {
        return Err(CpuKernelError::shape(
            "attention",
            format!(
                "k has {} elements, v {}, {shape:?} needs {kv_elems}",
                k.len(),
                v.len()
            ),
        ));
    }
    if q.len() != shape.batch * shape.q_len * hidden {
        return Err(CpuKernelError::shape(
            "attention",
            format!(
                "q has {} elements, {shape:?} needs {}",
                q.len(),
                shape.batch * shape.q_len * hidden
            ),
        ));
    }
    attention_strided(isa, shape, [q, k, v], hidden, mask, out)
}

/// [`attention`] on the fused projection `qkv` of `[batch, seq, 3 × hidden]` (each row: the
/// query, then the key, then the value, as one linear layer with the three weight matrices
/// stacked produces it), so Q, K and V need not be split into copies. `q_len == kv_len`.
///
/// # Errors
///
/// As [`attention`]; also when `shape.q_len != shape.kv_len`.
pub fn attention_packed(
    isa: Isa,
    shape: AttentionShape,
    qkv: &[f32],
    mask: Option<&[f32]>,
    out: &mut [f32],
) -> Result<(), CpuKernelError> {
    let hidden = shape.hidden();
    let need = shape.batch * shape.q_len * 3 * hidden;
    if shape.q_len != shape.kv_len || qkv.len() != need || need == 0 {
        return Err(CpuKernelError::shape(
            "attention_packed",
            format!(
                "qkv has {} elements, {shape:?} needs q_len = kv_len and {need}",
                qkv.len()
            ),
        ));
    }
    attention_strided(
        isa,
        shape,
        [qkv, &qkv[hidden..], &qkv[2 * hidden..]],
        3 * hidden,
        mask,
        out,
    )
}

/// The common body: row `r` of Q (of K, V) starts at `r × ld` in `qkv[0]` (`qkv[1]`,
/// `qkv[2]`); the callers have checked that every row's `hidden` elements are in bounds.
fn attention_strided(
    isa: Isa,
    shape: AttentionShape,
    [q, k, v]: [&[f32]; 3],
    ld: usize,
    mask: Option<&[f32]>,
    out: &mut [f32],
) -> Result<(), CpuKernelError> {
    isa.check()?;
    let AttentionShape {
        batch,
        heads,
        q_len,
        kv_len,
        head_dim,
    } = shape;
    let hidden = shape.hidden();
    let bad = |what: String| Err(CpuKernelError::shape("attention", what));
    if batch == 0 || heads == 0 || q_len == 0 || kv_len == 0 || head_dim == 0 {
        return bad(format!("{shape:?} has a zero dimension"));
    }
    if out.len() != batch * q_len * hidden {
        return bad(format!(
            "out has {} elements, {shape:?} needs {}",
            out.len(),
            batch * q_len * hidden
        ));
    }
    if let Some(m) = mask
        && m.len() != batch * kv_len
    {
        return bad(format!(
            "mask has {} elements, {shape:?} needs batch × kv_len = {}",
            m.len(),
            batch * kv_len
        ));
    }
    // One task per (sequence, group of heads): enough groups that a short batch still gives
    // every thread two tasks. A task packs `Kᵀ` and `V` of its own heads only; cut by blocks
    // of queries instead, every task of a sequence packed all of them again (at 128 tokens
    // and batch 1, a fifth of the attention's time).
    let threads = rayon::current_num_threads().max(1);
    let groups = (2 * threads).div_ceil(batch).clamp(1, heads);
    let per_group = heads.div_ceil(groups);
    let groups = heads.div_ceil(per_group);
    #[allow(clippy::cast_precision_loss)]
    let scale = 1.0 / (head_dim as f32).sqrt();
    let base = SharedOut::new(out);
    let task = |t: usize| {
        let (b, g) = (t / groups, t % groups);
        let first = g * per_group;
        let heads = first..(first + per_group).min(heads);
        let cols = heads.start * head_dim..heads.end * head_dim;
        // SAFETY: `out` is `batch × q_len × hidden` (checked above); task (b, g) makes slices
        // of rows `b × q_len ..` and columns `cols` only, so no two tasks' slices overlap, and
        // `out`'s borrow outlives the parallel loop.
        let mut rows: Vec<&mut [f32]> = (0..q_len)
            .map(|r| unsafe {
                std::slice::from_raw_parts_mut(
                    base.at((b * q_len + r) * hidden + cols.start),
                    cols.len(),
                )
            })
            .collect();
        dispatch(
            isa,
            AttentionBlock {
                shape,
                heads,
                scale,
                q: &q[b * q_len * ld..],
                k: &k[b * kv_len * ld..],
                v: &v[b * kv_len * ld..],
                ld,
                mask: mask.map(|m| &m[b * kv_len..][..kv_len]),
                out: &mut rows,
            },
        );
    };
    if batch * groups == 1 || threads == 1 {
        (0..batch * groups).for_each(task);
    } else {
        (0..batch * groups).into_par_iter().for_each(task);
    }
    Ok(())
}

/// One task: every query of one sequence, for a range of heads.
struct AttentionBlock<'a> {
    shape: AttentionShape,
    heads: std::ops::Range<usize>,
    scale: f32,
    /// `q_len` rows of `hidden`, `ld` apart.
    q: &'a [f32],
    /// `kv_len` rows of `hidden`, `ld` apart.
    k: &'a [f32],
    /// `kv_len` rows of `hidden`, `ld` apart.
    v: &'a [f32],
    /// Distance between rows of `q`, `k` and `v`.
    ld: usize,
    /// `[kv_len]`.
    mask: Option<&'a [f32]>,
    /// `q_len` rows: each the output's columns of `heads`.
    out: &'a mut [&'a mut [f32]],
}

impl WithSimd for AttentionBlock<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: Simd>(self, s: S) {
        let AttentionShape {
            kv_len,
            head_dim: d,
            ..
        } = self.shape;
        let rows = self.out.len();
        let (first, heads) = (self.heads.start, self.heads.len());
        let (c0, cols) = (first * d, heads * d);
        let kv_pad = kv_len.next_multiple_of(2 * S::LANES);
        // Scores bias per key: the mask, and -inf on the padding so it gets probability 0.
        let mut bias = vec![f32::NEG_INFINITY; kv_pad];
        match self.mask {
            Some(m) => bias[..kv_len].copy_from_slice(m),
            None => bias[..kv_len].fill(0.0),
        }
        // Kᵀ of the task's heads, `[cols, kv_pad]` (its head h is rows h × d ..), in one pass
        // that reads each key row front to back: per head, the reads would jump a whole row
        // of `qkv` for every 32 floats.
        // Eight keys at a time, so each row of Kᵀ gets eight consecutive floats per visit.
        let mut kt_all = vec![0.0f32; cols * kv_pad];
        for j0 in (0..kv_len).step_by(8) {
            let keys = (kv_len - j0).min(8);
            let rows = &self.k[j0 * self.ld + c0..];
            for (hc, kt) in kt_all.chunks_exact_mut(kv_pad).enumerate() {
                for (jj, t) in kt[j0..j0 + keys].iter_mut().enumerate() {
                    *t = rows[jj * self.ld + hc];
                }
            }
        }
        // V of the task's heads, `[heads, kv_len, d]`: each head's values contiguous, not a
        // row of `qkv` (one page) apart.
        let mut v_all = vec![0.0f32; cols * kv_len];
        for j in 0..kv_len {
            let row = &self.v[j * self.ld + c0..][..cols];
            for (h, src) in row.chunks_exact(d).enumerate() {
                v_all[(h * kv_len + j) * d..][..d].copy_from_slice(src);
            }
        }
        let mut scores = vec![0.0f32; ROWS * kv_pad];
        for h in 0..heads {
            let kt = &kt_all[h * d * kv_pad..][..d * kv_pad];
            let v = &v_all[h * kv_len * d..][..kv_len * d];
            let head = Head {
                s,
                d,
                kv_len,
                kv_pad,
                col: c0 + h * d,
                out_col: h * d,
                ld: self.ld,
                scale: self.scale,
            };
            let mut r = 0;
            while r + ROWS <= rows {
                head.rows::<ROWS>(r, self.q, kt, &bias, v, &mut scores, self.out);
                r += ROWS;
            }
            if r + TAIL_ROWS <= rows {
                head.rows::<TAIL_ROWS>(r, self.q, kt, &bias, v, &mut scores, self.out);
                r += TAIL_ROWS;
            }
            while r < rows {
                head.rows::<1>(r, self.q, kt, &bias, v, &mut scores, self.out);
                r += 1;
            }
        }
    }
}

/// One head of one task, with the sizes its row groups share.
#[derive(Clone, Copy)]
struct Head<S> {
    s: S,
    d: usize,
    kv_len: usize,
    kv_pad: usize,
    /// The head's first column in `q`.
    col: usize,
    /// The head's first column in the task's output rows.
    out_col: usize,
    ld: usize,
    scale: f32,
}

impl<S: Simd> Head<S> {
    /// Query rows `r0 .. r0 + R` of this head: scores, softmax, `P V`.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    fn rows<const R: usize>(
        &self,
        r0: usize,
        q: &[f32],
        kt: &[f32],
        bias: &[f32],
        v: &[f32],
        scores: &mut [f32],
        out: &mut [&mut [f32]],
    ) {
        let Head {
            s,
            d,
            kv_len,
            kv_pad,
            col,
            out_col,
            ld,
            scale,
        } = *self;
        let l = S::LANES;
        let qrows: [&[f32]; R] = std::array::from_fn(|r| &q[(r0 + r) * ld + col..][..d]);
        // Scores, two vectors of keys at a time for all R rows.
        let vscale = s.splat(scale);
        let mut j = 0;
        while j < kv_pad {
            let mut acc = [[s.splat(0.0); 2]; R];
            for c in 0..d {
                let kv = &kt[c * kv_pad + j..][..2 * l];
                let (k0, k1) = (s.load(kv), s.load(&kv[l..]));
                for (r, a) in acc.iter_mut().enumerate() {
                    let x = s.splat(qrows[r][c]);
                    a[0] = s.mul_add(x, k0, a[0]);
                    a[1] = s.mul_add(x, k1, a[1]);
                }
            }
            let (b0, b1) = (s.load(&bias[j..]), s.load(&bias[j + l..]));
            for (r, a) in acc.iter().enumerate() {
                let row = &mut scores[r * kv_pad + j..][..2 * l];
                s.store(row, s.mul_add(a[0], vscale, b0));
                s.store(&mut row[l..], s.mul_add(a[1], vscale, b1));
            }
            j += 2 * l;
        }
        for r in 0..R {
            softmax_row(s, &mut scores[r * kv_pad..(r + 1) * kv_pad]);
        }
        // Output: two vectors of the head's columns at a time for all R rows (the second,
        // or both, partial or empty past the head's last column).
        let mut c0 = 0;
        while c0 < d {
            let width = (d - c0).min(2 * l);
            let w0 = width.min(l);
            let mut acc = [[s.splat(0.0); 2]; R];
            for jj in 0..kv_len {
                let vrow = &v[jj * d + c0..][..width];
                let (v0, v1) = if width == 2 * l {
                    (s.load(vrow), s.load(&vrow[l..]))
                } else {
                    (load_part(s, &vrow[..w0]), load_part(s, &vrow[w0..]))
                };
                for (r, a) in acc.iter_mut().enumerate() {
                    let p = s.splat(scores[r * kv_pad + jj]);
                    a[0] = s.mul_add(p, v0, a[0]);
                    a[1] = s.mul_add(p, v1, a[1]);
                }
            }
            for (r, a) in acc.iter().enumerate() {
                let o = &mut out[r0 + r][out_col + c0..][..width];
                if width == 2 * l {
                    s.store(o, a[0]);
                    s.store(&mut o[l..], a[1]);
                } else {
                    store_part(s, &mut o[..w0], a[0]);
                    store_part(s, &mut o[w0..], a[1]);
                }
            }
            c0 += width;
        }
    }
}

/// Up to `LANES` floats (the rest of the vector zero).
#[inline(always)]
fn load_part<S: Simd>(s: S, x: &[f32]) -> S::V {
    match x.len() {
        0 => s.splat(0.0),
        n if n == S::LANES => s.load(x),
        _ => s.load_tail(x, 0.0),
    }
}

/// The first `o.len() <= LANES` lanes of `v` into `o`.
#[inline(always)]
fn store_part<S: Simd>(s: S, o: &mut [f32], v: S::V) {
    match o.len() {
        0 => {}
        n if n == S::LANES => s.store(o, v),
        _ => s.store_tail(o, v),
    }
}
