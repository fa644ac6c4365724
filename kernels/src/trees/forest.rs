//! The flat forest: every tree's nodes in shared struct-of-arrays, and the evaluators over it.
//!
//! Layout (what makes one walk one cache line per level, and the SIMD walk possible):
//!
//! - the nodes of every tree in one flat array, each node 16 bytes ([`PackedNode`]: packed
//!   feature and flags, threshold, left child), a tree's nodes breadth first from its root;
//!   leaf values in a parallel array read once per tree at the end of a walk. (A first
//!   version kept feature, threshold and child in three arrays: three cache misses per level
//!   where one does, 1.5 to 2 times slower on a forest beyond L2; see `trees_latency`.)
//! - the two children of a split are adjacent: `left[i]` is the left child, `left[i] + 1` the
//!   right one, so a step is `next = left[i] + go_right`;
//! - a leaf points at itself (`left == i`) and can never go right: its threshold is NaN
//!   (`x > NaN` is false) and its default is left. A walk may therefore run a fixed number
//!   of steps (the tree's depth) and every lane ends on its leaf, which is what lets the SIMD
//!   evaluators step 8 or 16 rows, and the keyed walk 16 trees, in lockstep without per-lane exits;
//! - `meta` packs the feature index with two flag bits, so one load gets all three.
//!
//! Every library's split is brought to one rule at load time: for a present
//! value `x`, go right iff `x > threshold` (f32); a missing value (NaN, or a near-zero value
//! where the split treats zero as missing) takes the default direction. The scalar walk
//! ([`Forest::leaf_scalar`]) is the reference; the SIMD walks in `simd.rs` and the keyed walk
//! in `keyed.rs` must find the same leaf, and the sums are then added in the same order, so all evaluators agree bit for bit.

use rayon::prelude::*;

use super::keyed;
use crate::cpu::Isa;

/// `meta` bit: a missing value goes left.
pub(crate) const DEFAULT_LEFT: u32 = 1 << 31;
/// `meta` bit: a value with `|x| <= ZERO_THRESHOLD` is missing too (LightGBM's missing type
/// Zero).
pub(crate) const ZERO_MISSING: u32 = 1 << 30;
/// `meta` bits that hold the feature index.
pub(crate) const FEATURE_MASK: u32 = ZERO_MISSING - 1;
/// LightGBM's `kZeroThreshold` (`1e-35f`): what it counts as zero.
pub(crate) const ZERO_THRESHOLD: f32 = 1e-35;
/// Most features a forest may read: with [`ROW_BLOCK`] rows of them, every offset into a
/// block fits the i32 indices of the gathers.
pub const MAX_FEATURES: usize = 1 << 24;
/// Rows walked together, tree by tree, by the row-parallel evaluators (a block's features
/// stay in L1 while every tree reads them).
pub(crate) const ROW_BLOCK: usize = 64;
/// Rows from which a batch is split over rayon's pool; below, it runs on the calling thread
/// (a hand-off costs more than a few rows of trees).
pub const PARALLEL_ROWS: usize = 256;

/// XGBoost's rule, `x < t` goes left (on f32), as a threshold of the common rule: right iff
/// `x >= t` iff `x > next_down(t)`. `None` when no f32 bound exists (`t` is -inf or NaN: every
/// present value goes right).
pub(crate) fn xgboost_threshold(t: f32) -> Option<f32> {
    if t.is_nan() || t == f32::NEG_INFINITY {
        None
    } else {
        Some(t.next_down())
    }
}

/// LightGBM's rule, `(x as f64) <= t` goes left, as a threshold of the common rule: for an
/// f32 `x` that is `x <= floor(t)`, the largest f32 not above `t`, so right iff
/// `x > floor(t)`. `None` for a NaN `t` (nothing is `<=` NaN: every present value goes right).
pub(crate) fn lightgbm_threshold(t: f64) -> Option<f32> {
    if t.is_nan() {
        return None;
    }
    // `as` rounds to nearest (to ±inf beyond f32's range); step down where that went up.
    let near = t as f32;
    Some(if f64::from(near) > t {
        near.next_down()
    } else {
        near
    })
}

/// A node of one tree as a parser reads it, children by index into the same tree's list.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum Node {
    /// An inner node. `threshold: None` means every present value goes right.
    Split {
        feature: u32,
        threshold: Option<f32>,
        default_left: bool,
        zero_missing: bool,
        left: usize,
        right: usize,
    },
    /// A leaf and its value (the library's, as it adds it).
    Leaf(f64),
}

/// One node, as the walks read it: 16 bytes, so a node never straddles a cache line and
/// two siblings (adjacent) usually share one.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
#[repr(C, align(16))]
pub(crate) struct PackedNode {
    /// The feature index with [`DEFAULT_LEFT`] and [`ZERO_MISSING`].
    pub meta: u32,
    /// Right iff `x > threshold`; NaN at a leaf (never right).
    pub threshold: f32,
    /// The left child's index (the right child follows it); a leaf's own index.
    pub left: u32,
    /// The split for the keyed walk (`keyed.rs`): right iff the row's key for this node's
    /// feature and flags is above it ([`keyed::node_key`] of the threshold; `u32::MAX` at a
    /// leaf, never right).
    pub key: u32,
}

/// How a forest adds its leaves: as its library does, so the sums match the library's.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Accumulate {
    /// In f32, from the base score, tree by tree (XGBoost's CPU predictor).
    F32,
    /// In f64, from the base score, tree by tree (LightGBM).
    #[default]
    F64,
}

/// The whole forest, flat. Built by [`ForestBuilder`]; immutable afterwards.
#[derive(Clone, Debug, Default)]
pub struct Forest {
    pub(crate) node: Vec<PackedNode>,
    pub(crate) value: Vec<f64>,
    pub(crate) roots: Vec<u32>,
    pub(crate) depth: Vec<u32>,
    pub(crate) group: Vec<u32>,
    features: usize,
    groups: usize,
    base: Vec<f64>,
    accumulate: Accumulate,
}

/// Builds a [`Forest`] tree by tree, checking each tree's structure.
#[derive(Debug)]
pub(crate) struct ForestBuilder {
    forest: Forest,
}

impl ForestBuilder {
    /// An empty forest reading `features` features, with one output per group (class) and
    /// the base score of each group (`base.len()` groups).
    pub fn new(features: usize, base: Vec<f64>, accumulate: Accumulate) -> Result<Self, String> {
        if features == 0 || features > MAX_FEATURES {
            return Err(format!(
                "{features} features (supported: 1 to {MAX_FEATURES})"
            ));
        }
        if base.is_empty() {
            return Err("no output group".to_owned());
        }
        Ok(ForestBuilder {
            forest: Forest {
                features,
                groups: base.len(),
                base,
                accumulate,
                ..Forest::default()
            },
        })
    }

    /// Appends one tree (root `nodes[0]`) whose sum goes to output `group`. Every child index
    /// must be in range and every node reached at most once (a tree, not a graph); nodes not
    /// reached from the root are dropped.
    pub fn push_tree(&mut self, nodes: &[Node], group: usize) -> Result<(), String> {
        let f = &mut self.forest;
        if group >= f.groups {
            return Err(format!("output group {group} of {}", f.groups));
        }
        if nodes.is_empty() {
            return Err("a tree without nodes".to_owned());
        }
        let start = f.node.len();
        let too_many = || "more than 2^30 nodes".to_owned();
        // The SIMD walks address node i at 2 i (scale 8) in an i32.
        if start + nodes.len() > 1 << 30 {
            return Err(too_many());
        }
        let mut seen = vec![false; nodes.len()];
        // Breadth first: (node in `nodes`, its slot in the flat arrays, its depth).
        let mut queue = std::collections::VecDeque::from([(0usize, start, 0u32)]);
        seen[0] = true;
        let mut next_free = start + 1;
        let mut depth = 0;
        let slots = nodes.len();
        f.node.resize(start + slots, PackedNode::default());
        f.value.resize(start + slots, 0.0);
        while let Some((i, slot, d)) = queue.pop_front() {
            depth = depth.max(d);
            match nodes[i] {
                Node::Leaf(v) => {
                    f.node[slot] = PackedNode {
                        meta: DEFAULT_LEFT,
                        threshold: f32::NAN,
                        left: slot as u32,
                        key: keyed::KEY_LEAF,
                    };
                    f.value[slot] = v;
                }
                Node::Split {
                    feature,
                    threshold,
                    default_left,
                    zero_missing,
                    left,
                    right,
                } => {
                    if feature as usize >= f.features {
                        return Err(format!(
                            "node {i} splits on feature {feature}, the model has {}",
                            f.features
                        ));
                    }
                    for child in [left, right] {
                        if child >= nodes.len() {
                            return Err(format!(
                                "node {i} has child {child}, the tree has {} nodes",
                                nodes.len()
                            ));
                        }
                        if std::mem::replace(&mut seen[child], true) {
                            return Err(format!("node {child} is reached twice (not a tree)"));
                        }
                    }
                    // Every present value right: swap the children and send everything to
                    // the (new) left one, which `x > NaN` (always false) does; the missing
                    // value's default swaps with them.
                    let (first, second, threshold, default_left) = match threshold {
                        Some(t) => (left, right, t, default_left),
                        None => (right, left, f32::NAN, !default_left),
                    };
                    let mut meta = feature;
                    if default_left {
                        meta |= DEFAULT_LEFT;
                    }
                    if zero_missing {
                        meta |= ZERO_MISSING;
                    }
                    f.node[slot] = PackedNode {
                        meta,
                        threshold,
                        left: next_free as u32,
                        key: keyed::node_key(threshold),
                    };
                    queue.push_back((first, next_free, d + 1));
                    queue.push_back((second, next_free + 1, d + 1));
                    next_free += 2;
                }
            }
        }
        // Unreached nodes took no slot.
        f.node.truncate(next_free);
        f.value.truncate(next_free);
        f.roots.push(start as u32);
        f.depth.push(depth);
        f.group.push(group as u32);
        Ok(())
    }

    pub fn finish(self) -> Forest {
        self.forest
    }
}

/// Adds `v` to `acc` as the forest's library does.
#[inline(always)]
pub(crate) fn add(accumulate: Accumulate, acc: &mut f64, v: f64) {
    match accumulate {
        // Both are f32 values; their f32 sum is exact in f64.
        Accumulate::F32 => *acc = f64::from(*acc as f32 + v as f32),
        Accumulate::F64 => *acc += v,
    }
}

impl Forest {
    /// Features per row.
    pub fn features(&self) -> usize {
        self.features
    }

    /// Outputs per row (1, or the classes of a multiclass model).
    pub fn groups(&self) -> usize {
        self.groups
    }

    /// Trees.
    pub fn trees(&self) -> usize {
        self.roots.len()
    }

    /// Nodes, leaves included.
    pub fn nodes(&self) -> usize {
        self.node.len()
    }

    /// The deepest tree's depth (edges from root to its farthest leaf).
    pub fn max_depth(&self) -> u32 {
        self.depth.iter().copied().max().unwrap_or(0)
    }

    /// The base score of each group, where the sums start.
    pub fn base(&self) -> &[f64] {
        &self.base
    }

    /// How the sums are added.
    pub fn accumulate(&self) -> Accumulate {
        self.accumulate
    }

    /// The reference walk: the leaf (flat index) that `row` reaches from `root`.
    #[inline]
    pub(crate) fn leaf_scalar(&self, root: u32, row: &[f32]) -> u32 {
        let mut i = root as usize;
        loop {
            let left = self.node[i].left;
            if left as usize == i {
                return left;
            }
            i = left as usize + usize::from(self.go_right(i, row));
        }
    }

    /// The common split rule at node `i` for `row`.
    #[inline(always)]
    fn go_right(&self, i: usize, row: &[f32]) -> bool {
        let PackedNode {
            meta, threshold, ..
        } = self.node[i];
        let x = row[(meta & FEATURE_MASK) as usize];
        let missing = x.is_nan() || (meta & ZERO_MISSING != 0 && x.abs() <= ZERO_THRESHOLD);
        if missing {
            meta & DEFAULT_LEFT == 0
        } else {
            x > threshold
        }
    }

    /// The raw scores (margins) of `rows` rows of `x` (`[rows, features]`, row-major) into
    /// `out` (`[rows, groups]`), on the reference walk: row by row, tree by tree.
    ///
    /// Panics if the slices do not have those lengths (a caller's bug; the model checks
    /// shapes first).
    pub fn margins_scalar(&self, x: &[f32], out: &mut [f64]) {
        let rows = self.check_lengths(x, out);
        for r in 0..rows {
            let row = &x[r * self.features..(r + 1) * self.features];
            let acc = &mut out[r * self.groups..(r + 1) * self.groups];
            acc.copy_from_slice(&self.base);
            for (t, &root) in self.roots.iter().enumerate() {
                let leaf = self.leaf_scalar(root, row);
                add(
                    self.accumulate,
                    &mut acc[self.group[t] as usize],
                    self.value[leaf as usize],
                );
            }
        }
    }

    fn check_lengths(&self, x: &[f32], out: &[f64]) -> usize {
        let rows = x.len() / self.features;
        assert_eq!(x.len(), rows * self.features, "x is not [rows, features]");
        assert_eq!(out.len(), rows * self.groups, "out is not [rows, groups]");
        rows
    }

    /// [`Forest::margins_scalar`] on instruction set `isa` (falling back to scalar where this
    /// CPU lacks it), on the calling thread. Bit-identical to the scalar walk.
    pub fn margins_here(&self, isa: Isa, x: &[f32], out: &mut [f64]) {
        let rows = self.check_lengths(x, out);
        if !isa.is_available() || isa == Isa::Scalar {
            return self.margins_scalar(x, out);
        }
        let lanes = super::simd::lanes(isa);
        if rows < lanes {
            // Too few rows to fill the lanes: each row alone, its trees side by side.
            return self.margins_keyed(x, out);
        }
        for (xb, ob) in x
            .chunks(ROW_BLOCK * self.features)
            .zip(out.chunks_mut(ROW_BLOCK * self.groups))
        {
            super::simd::block_by_rows(self, isa, xb, ob);
        }
    }

    /// [`Forest::margins_scalar`] on the keyed walk (`keyed.rs`): each row alone, its trees
    /// side by side in plain scalar code, for any instruction set. Bit-identical to the
    /// scalar walk.
    pub fn margins_keyed(&self, x: &[f32], out: &mut [f64]) {
        let rows = self.check_lengths(x, out);
        let mut keys = vec![0u32; keyed::KEYS_PER_FEATURE * self.features];
        for r in 0..rows {
            keyed::row_keys(&x[r * self.features..(r + 1) * self.features], &mut keys);
            let acc = &mut out[r * self.groups..(r + 1) * self.groups];
            acc.copy_from_slice(&self.base);
            keyed::add_row(self, &keys, acc);
        }
    }

    /// [`Forest::margins_here`], split over rayon's pool when there are at least
    /// [`PARALLEL_ROWS`] rows (and more than one thread); a smaller batch stays on the
    /// calling thread. Same results either way: each row is summed alone.
    pub fn margins(&self, isa: Isa, x: &[f32], out: &mut [f64]) {
        let rows = self.check_lengths(x, out);
        let threads = rayon::current_num_threads();
        if rows < PARALLEL_ROWS || threads < 2 {
            return self.margins_here(isa, x, out);
        }
        // A few chunks per thread (for balance), each a whole number of row blocks.
        let per = rows.div_ceil(threads * 4).div_ceil(ROW_BLOCK) * ROW_BLOCK;
        x.par_chunks(per * self.features)
            .zip(out.par_chunks_mut(per * self.groups))
            .for_each(|(xc, oc)| self.margins_here(isa, xc, oc));
    }
}
