//! How a linear layer's product is cut into tasks for rayon's pool, shared by the f32
//! ([`super::PackedLinear`]) and int8 ([`super::QuantizedLinear`]) kernels.
//!
//! A task is a block of rows (whole register tiles, at most `MC` rows, so they stay in L2
//! while the weights stream past them) by a range of column panels. The tasks of one product
//! should be equal and their count a multiple of the threads: the product ends when its
//! slowest thread does, and with a handful of tasks one left over is a large share. Cut
//! into `MC`-row blocks, 256 rows made five tasks of 48 rows and one of 16: a batch of 16
//! sixteen-token texts ran 9% slower per text than one of 15 (240 rows, five equal tasks),
//! the two threads busy 1.80 of 2 CPUs instead of 1.95.

use std::ops::Range;

/// Row blocks per thread that a product is cut into before its blocks reach `mc` rows.
/// MiniLM, 2 threads, Zen 4 (paired runs of `embedding_throughput`): 256 rows in 32
/// one-tile blocks ran 1-2% faster than in 8 blocks of 32 rows; 512 rows in 64 one-tile
/// blocks 2-3% faster than in 32 of two tiles, and those 1-3% faster than 16 of four;
/// 2,048 rows the same in 64 blocks of 32 rows as in 43 of 48; 4,096 rows in one-tile
/// blocks ran 6% slower than in 48-row blocks (each block streams all the weights past its
/// rows), so large products keep `mc`.
const TASKS_PER_THREAD: usize = 32;
/// Row blocks per thread past which unequal blocks (by one tile) no longer matter.
const MANY_PER_THREAD: usize = 32;

/// The tasks of a `rows × panels` product: `row_tasks` blocks of register tiles (equal in
/// tiles where a count that is a multiple of the threads allows it, else differing by at
/// most one) by `col_tasks` ranges of panels (equal where they divide the panels).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Split {
    rows: usize,
    mr: usize,
    tiles: usize,
    row_tasks: usize,
    panels: usize,
    col_tasks: usize,
}

impl Split {
    /// Splits `rows` (in register tiles of `mr` rows, at most `mc` rows per task) and
    /// `panels` for `threads` threads. `rows`, `mr`, `mc` and `panels` are at least 1.
    pub(crate) fn new(rows: usize, mr: usize, mc: usize, panels: usize, threads: usize) -> Self {
        let (mr, panels, threads) = (mr.max(1), panels.max(1), threads.max(1));
        let tiles = rows.div_ceil(mr).max(1);
        // Blocks of at most `mc` rows, and smaller while that leaves fewer than `TASKS_PER_THREAD`
        // per thread: with few large tasks one thread waits for the other at the end of every
        // product.
        let max_tiles = (mc / mr).max(1);
        let per_block = if threads == 1 {
            max_tiles
        } else {
            (tiles / (TASKS_PER_THREAD * threads)).clamp(1, max_tiles)
        };
        let least = tiles.div_ceil(per_block);
        let row_tasks = if threads == 1 || least == 1 {
            least
        } else if least >= MANY_PER_THREAD * threads {
            // Blocks enough that one more or less at the end is noise.
            least.next_multiple_of(threads).min(tiles)
        } else {
            // The fewest row blocks that are a multiple of the threads and cut the tiles
            // evenly, if there are such within twice the least count; else the fewest that
            // are a multiple of the threads (blocks then differ by one tile).
            (least..=tiles.min(2 * least))
                .find(|r| r % threads == 0 && tiles % r == 0)
                .or_else(|| (least..=tiles).find(|r| r % threads == 0))
                .unwrap_or(least)
        };
        // A few tasks per thread when the rows alone make fewer: split the columns too, into
        // ranges that divide the panels where that is close at hand.
        let want = 4 * threads;
        let col_tasks = if threads == 1 || row_tasks >= want {
            1
        } else {
            let least = want.div_ceil(row_tasks).min(panels);
            (least..=panels.min(2 * least))
                .find(|c| panels % c == 0)
                .unwrap_or(least)
        };
        Split {
            rows,
            mr,
            tiles,
            row_tasks,
            panels,
            col_tasks,
        }
    }

    /// Ranges of panels the columns are cut into (1: every task owns whole rows).
    pub(crate) fn col_tasks(&self) -> usize {
        self.col_tasks
    }

    /// How many tasks.
    pub(crate) fn tasks(&self) -> usize {
        self.row_tasks * self.col_tasks
    }

    /// Task `t`'s rows (whole tiles but for the last row's tile) and column panels, for
    /// `t < tasks()`. The tasks cover `0..rows × 0..panels` without overlapping.
    pub(crate) fn task(&self, t: usize) -> (Range<usize>, Range<usize>) {
        let (rt, ct) = (t / self.col_tasks, t % self.col_tasks);
        let tile = |i: usize| (i * self.tiles / self.row_tasks * self.mr).min(self.rows);
        let panel = |i: usize| i * self.panels / self.col_tasks;
        (tile(rt)..tile(rt + 1), panel(ct)..panel(ct + 1))
    }
}

/// An output buffer's base pointer, shared by the tasks of one parallel step that each
/// write their own disjoint part of it (rows, or a rectangle of rows × columns). The
/// callers make their slices from it and say why those do not overlap.
#[derive(Clone, Copy)]
pub(crate) struct SharedOut(*mut f32);

impl SharedOut {
    pub(crate) fn new(out: &mut [f32]) -> Self {
        SharedOut(out.as_mut_ptr())
    }

    /// The element `offset` past the base (a method, so closures capture the whole
    /// `Sync` wrapper, not its raw field).
    ///
    /// # Safety
    ///
    /// `offset` is within the buffer.
    pub(crate) unsafe fn at(self, offset: usize) -> *mut f32 {
        // SAFETY: the caller keeps `offset` within the buffer.
        unsafe { self.0.add(offset) }
    }
}

// SAFETY: the tasks that share it write disjoint parts of the buffer (each caller's
// SAFETY comment says how), and the buffer's borrow outlives the parallel step.
unsafe impl Send for SharedOut {}
// SAFETY: as above.
unsafe impl Sync for SharedOut {}

#[cfg(test)]
mod tests {
    use super::Split;

    /// Every (row, panel) cell is in exactly one task, and rows start on tile bounds.
    fn check_cover(s: &Split, rows: usize, mr: usize, panels: usize) {
        let mut seen = vec![0u8; rows * panels];
        for t in 0..s.tasks() {
            let (r, p) = s.task(t);
            assert!(!r.is_empty() && !p.is_empty(), "{s:?}: task {t} is empty");
            assert_eq!(r.start % mr, 0, "{s:?}: task {t} starts inside a tile");
            for row in r {
                for panel in p.clone() {
                    seen[row * panels + panel] += 1;
                }
            }
        }
        assert!(seen.iter().all(|&c| c == 1), "{s:?} does not cover once");
    }

    #[test]
    fn every_cell_once() {
        for rows in 1..300 {
            for &(mr, mc) in &[(8, 48), (6, 48), (4, 48)] {
                for panels in [1, 2, 5, 8, 24, 32] {
                    for threads in 1..=4 {
                        let s = Split::new(rows, mr, mc, panels, threads);
                        check_cover(&s, rows, mr, panels);
                    }
                }
            }
        }
    }

    #[test]
    fn equal_tasks_a_multiple_of_the_threads() {
        // MiniLM's 16-token batches of 1, 8, 16 and 32 on AVX-512's 8-row tiles, 2 threads:
        // at least 32 row blocks per thread down to one tile each, then columns split.
        for (rows, tasks, rows_each) in [(128, 16, 8), (256, 32, 8), (512, 64, 8)] {
            let s = Split::new(rows, 8, 48, 8, 2);
            assert_eq!(s.tasks(), tasks, "{rows} rows: {s:?}");
            for t in 0..s.tasks() {
                assert_eq!(s.task(t).0.len(), rows_each, "{rows} rows, task {t}");
            }
        }
        // Many rows: blocks of `mc` rows, a multiple of the threads in number.
        let s = Split::new(4096, 8, 48, 8, 2);
        assert_eq!(s.tasks(), 86, "{s:?}");
        // A short batch is split by columns too: two tiles by four pairs of panels.
        let s = Split::new(16, 8, 48, 8, 2);
        assert_eq!((s.tasks(), s.task(5)), (8, (8..16, 2..4)));
        // One thread: blocks of at most `mc` rows, columns whole.
        let s = Split::new(256, 8, 48, 8, 1);
        assert_eq!(s.tasks(), 6);
        assert!((0..6).all(|t| s.task(t).0.len() <= 48 && s.task(t).1 == (0..8)));
    }

    #[test]
    fn blocks_never_exceed_mc_and_differ_by_a_tile_at_most() {
        for rows in [100, 257, 1000, 2048, 4095] {
            for threads in [2, 3, 8] {
                let s = Split::new(rows, 8, 48, 8, threads);
                let lens: Vec<usize> = (0..s.tasks()).map(|t| s.task(t).0.len()).collect();
                let full = &lens[..lens.len() - s.col_tasks];
                assert!(lens.iter().all(|&l| l <= 48), "{rows}/{threads}: {lens:?}");
                let lo = full.iter().copied().fold(usize::MAX, usize::min);
                let hi = full.iter().copied().fold(0, usize::max);
                assert!(hi - lo <= 8, "{rows}/{threads}: {lens:?}");
                assert!(
                    s.row_tasks.is_multiple_of(threads) || s.row_tasks == s.tiles,
                    "{rows}/{threads}: {s:?}"
                );
            }
        }
    }
}
