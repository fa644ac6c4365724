//! The few-rows walk: one row, many trees side by side, on integer keys.
//!
//! A single row cannot fill the SIMD walks' lanes with rows, and filling them with trees
//! spends four gathers per node visit, which on the development machines' AMD EPYC cost more
//! than the visit's work. This walk is plain scalar code instead, the same on every
//! instruction set:
//! [`INTERLEAVE`] trees of the row are walked in lockstep, one level of each in turn, so that
//! their independent chains of dependent loads overlap in the core, and a visit is three
//! loads (node, row key, node key), a compare and an add, with no branch.
//!
//! What makes a visit that short is that the split rule is moved out of the visit into two
//! precomputed integer keys:
//!
//! - each node's threshold as [`key`] (an order-preserving map of f32 to u32), in
//!   [`PackedNode::key`](super::forest::PackedNode), set at load time;
//! - the row's values as keys, once per row ([`row_keys`]), four per feature: one per
//!   combination of the node's two flags ([`DEFAULT_LEFT`], [`ZERO_MISSING`]), where a
//!   missing value is already the key that goes the default way: `u32::MAX` (above every
//!   threshold key: right) or 0 (below every one: left).
//!
//! A node's index into the row's keys is its `meta` rotated left by two bits (`4 × feature +
//! 2 × default_left + zero_missing`), and the step is `next = left + (row_key > node_key)`,
//! which is exactly the common rule of `forest.rs` (proof in [`key`]'s comment and the tests:
//! the keyed walk is compared bit for bit with the scalar reference).

#![allow(unsafe_code)]

use super::forest::{DEFAULT_LEFT, Forest, ZERO_MISSING, ZERO_THRESHOLD, add};

/// Trees walked in lockstep for one row: enough independent load chains to cover an L2 hit's
/// latency, few enough that their node indices stay in registers.
pub(crate) const INTERLEAVE: usize = 16;

/// Row keys per feature (one per combination of the two flag bits).
pub(crate) const KEYS_PER_FEATURE: usize = 4;

/// Node key of a split whose every present value goes left (a NaN threshold): above every
/// present value's key, below the key of a missing value that goes right.
pub(crate) const KEY_ALL_LEFT: u32 = u32::MAX - 1;
/// Node key of a leaf: nothing is above it, so a walk stays on the leaf.
pub(crate) const KEY_LEAF: u32 = u32::MAX;

/// The order-preserving key of a present (non-NaN) f32: `a > b` iff `key(a) > key(b)`.
///
/// Adding `+0.0` makes `-0.0` into `+0.0` (the two compare equal as floats, and must get one
/// key) and changes nothing else. Then a non-negative float's bits, with the sign bit set,
/// order as the floats do and lie above every negative one's; a negative float's bits,
/// inverted, order in reverse of their magnitude and lie below. The keys of present values
/// run from `key(-inf) = 0x007f_ffff` to `key(+inf) = 0xff80_0000`, strictly between 0 (a
/// missing value going left) and [`KEY_ALL_LEFT`].
#[inline(always)]
pub(crate) fn key(x: f32) -> u32 {
    let bits = (x + 0.0).to_bits();
    if bits >> 31 == 1 {
        !bits
    } else {
        bits | 1 << 31
    }
}

/// The node key of a split with threshold `t` (right iff `x > t`): NaN means every present
/// value goes left.
pub(crate) fn node_key(t: f32) -> u32 {
    if t.is_nan() { KEY_ALL_LEFT } else { key(t) }
}

/// Writes the keys of `row` into `keys` (`KEYS_PER_FEATURE × row.len()`), at
/// `4 × feature + 2 × default_left + zero_missing`: the value's key where it is present for
/// such a node, else the key that takes the default direction.
pub(crate) fn row_keys(row: &[f32], keys: &mut [u32]) {
    debug_assert_eq!(keys.len(), KEYS_PER_FEATURE * row.len());
    for (&x, k) in row.iter().zip(keys.chunks_exact_mut(KEYS_PER_FEATURE)) {
        let nan = x.is_nan();
        let missing_zero = nan || x.abs() <= ZERO_THRESHOLD;
        let present = if nan { 0 } else { key(x) };
        let pick = |missing: bool, default: u32| if missing { default } else { present };
        k[0] = pick(nan, u32::MAX);
        k[1] = pick(missing_zero, u32::MAX);
        k[2] = pick(nan, 0);
        k[3] = pick(missing_zero, 0);
    }
}

/// The row-key index of a node's `meta`: `4 × feature + 2 × default_left + zero_missing`.
#[inline(always)]
fn key_index(meta: u32) -> usize {
    const _: () = assert!(DEFAULT_LEFT == 1 << 31 && ZERO_MISSING == 1 << 30);
    meta.rotate_left(2) as usize
}

/// Adds the leaves of every tree of `f` for one row (its keys from [`row_keys`]) to `out`
/// (`[groups]`, holding the base scores), in tree order, as the scalar reference does.
pub(crate) fn add_row(f: &Forest, keys: &[u32], out: &mut [f64]) {
    assert_eq!(keys.len(), KEYS_PER_FEATURE * f.features());
    assert_eq!(out.len(), f.groups());
    let trees = f.trees();
    let mut t0 = 0;
    while t0 < trees {
        let n = INTERLEAVE.min(trees - t0);
        // A short last chunk repeats its last tree in the spare lanes (walked, not added).
        let mut at = [f.roots[t0 + n - 1]; INTERLEAVE];
        at[..n].copy_from_slice(&f.roots[t0..t0 + n]);
        let steps = f.depth[t0..t0 + n].iter().copied().max().unwrap_or(0);
        walk(f, keys, &mut at, steps);
        let leaves = &at[..n];
        if let [acc] = out {
            for &leaf in leaves {
                add(f.accumulate(), acc, f.value[leaf as usize]);
            }
        } else {
            for (&leaf, &g) in leaves.iter().zip(&f.group[t0..t0 + n]) {
                add(f.accumulate(), &mut out[g as usize], f.value[leaf as usize]);
            }
        }
        t0 += n;
    }
}

/// Steps every lane of `at` (node indices, each a root of `f`) `steps` levels down, one level
/// of each in turn.
#[inline(always)]
fn walk(f: &Forest, keys: &[u32], at: &mut [u32; INTERLEAVE], steps: u32) {
    let nodes = f.node.as_slice();
    debug_assert!(at.iter().all(|&a| (a as usize) < nodes.len()));
    debug_assert_eq!(keys.len(), KEYS_PER_FEATURE * f.features());
    for _ in 0..steps {
        for a in at.iter_mut() {
            // SAFETY: both indices are in bounds. `*a` is a node: it starts as a root and
            // becomes a node's child, and `ForestBuilder` (the only way to a non-empty
            // `Forest`; its fields are private to this crate) gives every tree's root and
            // every child a slot of `f.node`. The key index is `4 × feature + 0..4` and
            // every node's feature is below `f.features()` (checked by `push_tree`), so it
            // is below `keys.len()` (asserted by the only caller, `add_row`).
            let (node, row_key) = unsafe {
                let node = nodes.get_unchecked(*a as usize);
                (node, *keys.get_unchecked(key_index(node.meta)))
            };
            *a = node.left + u32::from(row_key > node.key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_order_as_the_floats_do() {
        let values = [
            f32::NEG_INFINITY,
            f32::MIN,
            -1.5,
            -f32::MIN_POSITIVE,
            -1e-45,
            -0.0,
            0.0,
            1e-45,
            f32::MIN_POSITIVE,
            1.0,
            f32::MAX,
            f32::INFINITY,
        ];
        for &a in &values {
            for &b in &values {
                assert_eq!(a > b, key(a) > key(b), "{a:e} > {b:e}");
            }
            assert!(0 < key(a) && key(a) < KEY_ALL_LEFT, "{a:e}");
        }
    }

    #[test]
    fn a_missing_row_key_takes_the_default_against_every_node_key() {
        let mut keys = [0; 4 * 3];
        row_keys(&[f32::NAN, 1e-36, 2.0], &mut keys);
        for t in [
            f32::NEG_INFINITY,
            -1.0,
            0.0,
            f32::MAX,
            f32::INFINITY,
            f32::NAN,
        ] {
            let t = node_key(t);
            // NaN: right unless default left, with or without zero-missing.
            assert_eq!(
                [0, 1, 2, 3].map(|i| keys[i] > t),
                [true, true, false, false]
            );
            // A near-zero value is missing only for a zero-missing node.
            let small = key(1e-36) > t;
            assert_eq!(
                [4, 5, 6, 7].map(|i| keys[i] > t),
                [small, true, small, false]
            );
        }
        assert!(keys[8..].iter().all(|&k| k == key(2.0)));
    }
}
