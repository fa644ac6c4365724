//! The forest on a CUDA device: [`CudaForest`] copies a [`Forest`] to device memory once (per
//! load) and computes raw scores with `kernels/cuda/trees.cu` (rows × groups blocks, the
//! trees of a group spread over a block's threads, a fixed-order reduction per row and
//! group), launched through candle's re-export of cudarc as `pool.rs` launches its kernel.
//!
//! Each tree walk follows the CPU engine's rule exactly; the sum of a row's leaves is a
//! parallel reduction in f64, so it differs from the CPU's sequential sum by rounding only
//! (for an XGBoost forest, whose CPU sum is in f32, by f32 rounding). `kernels/tests/
//! trees_cuda.rs` checks it against [`Forest::margins_scalar`] on a GPU, and says that it was
//! skipped where there is none.

#![allow(unsafe_code)]

use candle_core::cuda_backend::cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaDevice, WrapErr};

use super::forest::Forest;

/// The PTX of `kernels/cuda/trees.cu`, built by `build.rs`.
const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/trees.ptx"));
/// The module name the PTX is cached under, per device.
const MODULE: &str = "quiver_trees";
const FUNCTION: &str = "quiver_forest_margins";
/// Threads per block; must match `TREES_THREADS` in `trees.cu`.
const THREADS: u32 = 128;
/// Most features a row may have: the row is staged in 48 KiB of shared memory.
pub const MAX_CUDA_FEATURES: usize = 48 * 1024 / 4;

/// A forest in device memory.
pub struct CudaForest {
    device: CudaDevice,
    /// 4 × u32 per node: meta, threshold bits, left, key (`PackedNode`; the kernel does not read the key).
    nodes: CudaSlice<u32>,
    values: CudaSlice<f64>,
    roots: CudaSlice<u32>,
    /// The trees of group 0 in tree order, then group 1's, …
    group_trees: CudaSlice<u32>,
    /// Where each group's trees start in `group_trees`, and the end: `groups + 1` entries.
    group_start: CudaSlice<u32>,
    features: usize,
    groups: usize,
    base: Vec<f64>,
}

impl std::fmt::Debug for CudaForest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaForest")
            .field("device", &self.device)
            .field("features", &self.features)
            .field("groups", &self.groups)
            .finish_non_exhaustive()
    }
}

fn error(message: String) -> candle_core::Error {
    candle_core::Error::Msg(format!("trees on cuda: {message}"))
}

impl CudaForest {
    /// Copies `forest` to `device` (a CUDA device). Errors on another device, or a forest the
    /// kernel cannot take (more than [`MAX_CUDA_FEATURES`] features, or 2^32 groups).
    pub fn upload(forest: &Forest, device: &candle_core::Device) -> candle_core::Result<Self> {
        let dev = device.as_cuda_device()?.clone();
        if forest.features() > MAX_CUDA_FEATURES {
            return Err(error(format!(
                "{} features; the kernel stages a row in shared memory, at most {MAX_CUDA_FEATURES}",
                forest.features()
            )));
        }
        let too_big = || error("the forest is too large for 32-bit indices".to_owned());
        let groups = forest.groups();
        u32::try_from(groups).map_err(|_| too_big())?;
        let nodes: Vec<u32> = forest
            .node
            .iter()
            .flat_map(|n| [n.meta, n.threshold.to_bits(), n.left, 0])
            .collect();
        let mut group_trees = Vec::with_capacity(forest.trees());
        let mut group_start = Vec::with_capacity(groups + 1);
        for g in 0..groups {
            group_start.push(u32::try_from(group_trees.len()).map_err(|_| too_big())?);
            for (t, &tree_group) in forest.group.iter().enumerate() {
                if tree_group as usize == g {
                    group_trees.push(u32::try_from(t).map_err(|_| too_big())?);
                }
            }
        }
        group_start.push(u32::try_from(group_trees.len()).map_err(|_| too_big())?);
        Ok(CudaForest {
            nodes: dev.clone_htod(&nodes)?,
            values: dev.clone_htod(&forest.value)?,
            roots: dev.clone_htod(&forest.roots)?,
            group_trees: dev.clone_htod(&group_trees)?,
            group_start: dev.clone_htod(&group_start)?,
            features: forest.features(),
            groups,
            base: forest.base().to_vec(),
            device: dev,
        })
    }

    /// The raw scores of the rows of `x` (`[rows, features]`), `[rows, groups]`, base score
    /// included. Copies `x` in and the scores out; waits for the device.
    pub fn margins(&self, x: &[f32]) -> candle_core::Result<Vec<f64>> {
        if x.is_empty() {
            return Ok(Vec::new());
        }
        if !x.len().is_multiple_of(self.features) {
            return Err(error(format!(
                "{} values are not rows of {} features",
                x.len(),
                self.features
            )));
        }
        let rows = x.len() / self.features;
        let grid_x = u32::try_from(rows)
            .ok()
            .filter(|&r| r <= i32::MAX as u32)
            .ok_or_else(|| error(format!("{rows} rows in one call")))?;
        let grid_y = u32::try_from(self.groups)
            .ok()
            .filter(|&g| g <= 65_535)
            .ok_or_else(|| error(format!("{} groups", self.groups)))?;
        let features = self.features as u32; // <= MAX_CUDA_FEATURES (checked at upload)
        let groups = self.groups as u32;
        let dev = &self.device;
        let x = dev.clone_htod(x)?;
        let out = dev.alloc_zeros::<f64>(rows * self.groups)?;
        let func = dev.get_or_load_custom_func(FUNCTION, MODULE, PTX)?;
        let cfg = LaunchConfig {
            grid_dim: (grid_x, grid_y, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: features * 4,
        };
        let mut builder = func.builder();
        builder.arg(&self.nodes);
        builder.arg(&self.values);
        builder.arg(&self.roots);
        builder.arg(&self.group_trees);
        builder.arg(&self.group_start);
        builder.arg(&x);
        builder.arg(&out);
        builder.arg(&features);
        builder.arg(&groups);
        // SAFETY: the arguments match the kernel's signature (seven device pointers, two
        // u32). The node arrays are the forest's as built by ForestBuilder: every child and
        // root indexes `nodes`, every feature is < `features`, every leaf indexes `values`;
        // `group_start` has groups + 1 entries bounding `group_trees`, whose entries index
        // `roots`. `x` holds rows × features values and `out` rows × groups, and the grid
        // (rows, groups) keeps every block's reads and its one write within them; the
        // dynamic shared memory holds one row.
        unsafe { builder.launch(cfg) }.w()?;
        let mut margins = dev.clone_dtoh(&out)?;
        for row in margins.chunks_exact_mut(self.groups) {
            for (m, b) in row.iter_mut().zip(&self.base) {
                *m += b;
            }
        }
        Ok(margins)
    }
}
