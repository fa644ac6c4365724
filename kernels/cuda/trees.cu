// The forest kernel of the `trees` family on CUDA devices: the raw score (margin) of every
// (row, output group) pair, from the flat forest that kernels/src/trees/forest.rs builds and
// kernels/src/trees/cuda.rs copies to the device once per load.
//
// Node layout (16 bytes, PackedNode in forest.rs), as uint4:
//   x: feature index | DEFAULT_LEFT (bit 31) | ZERO_MISSING (bit 30)
//   y: threshold (f32 bits): a present value goes right iff value > threshold (NaN at a leaf)
//   z: left child (the right child is z + 1); a leaf's own index
// A missing value (NaN, or |value| <= 1e-35 where ZERO_MISSING is set) takes the default.
// This is the CPU engine's rule exactly (Forest::leaf_scalar), so every walk ends on the
// same leaf as on the CPU; only the order of the additions differs (see below).
//
// Launch: grid (rows, groups, 1), block (TREES_THREADS, 1, 1), dynamic shared memory
// features * 4 bytes (the row). A block owns one row and one group: it stages the row in
// shared memory, its threads take that group's trees in turn (tree k of the group to thread
// k mod blockDim.x), each sums its leaves in f64, and a fixed-order block reduction writes
// out[row * groups + group] = the sum (without the base score, which the host adds).
// The order is fixed, so results are deterministic run to run; they differ from the CPU
// engine's sequential sum by rounding only (the host test bounds it).

#define TREES_THREADS 128
#define FEATURE_MASK 0x3fffffffu
#define ZERO_MISSING 0x40000000u
#define DEFAULT_LEFT 0x80000000u
#define ZERO_THRESHOLD 1e-35f

extern "C" __global__ void __launch_bounds__(TREES_THREADS) quiver_forest_margins(
    const uint4* __restrict__ nodes,
    const double* __restrict__ values,
    const unsigned int* __restrict__ roots,
    const unsigned int* __restrict__ group_trees,
    const unsigned int* __restrict__ group_start,
    const float* __restrict__ x,
    double* __restrict__ out,
    const unsigned int features,
    const unsigned int groups) {
    extern __shared__ float row[];
    __shared__ double red[TREES_THREADS / 32];
    const size_t r = blockIdx.x;
    const unsigned int g = blockIdx.y;

    for (unsigned int i = threadIdx.x; i < features; i += blockDim.x) {
        row[i] = x[r * features + i];
    }
    __syncthreads();

    double acc = 0.0;
    const unsigned int end = group_start[g + 1];
    for (unsigned int k = group_start[g] + threadIdx.x; k < end; k += blockDim.x) {
        unsigned int n = roots[group_trees[k]];
        for (;;) {
            const uint4 node = nodes[n];
            if (node.z == n) {
                break;  // a leaf points at itself
            }
            const float v = row[node.x & FEATURE_MASK];
            const bool missing =
                isnan(v) || ((node.x & ZERO_MISSING) != 0u && fabsf(v) <= ZERO_THRESHOLD);
            const bool right =
                missing ? (node.x & DEFAULT_LEFT) == 0u : v > __uint_as_float(node.y);
            n = node.z + (right ? 1u : 0u);
        }
        acc += values[n];
    }

    // Block sum in a fixed order: within each warp by shuffles, then warp 0 over the warps.
    for (int offset = 16; offset > 0; offset >>= 1) {
        acc += __shfl_down_sync(0xffffffffu, acc, offset);
    }
    const unsigned int lane = threadIdx.x & 31u;
    const unsigned int warp = threadIdx.x >> 5;
    if (lane == 0) {
        red[warp] = acc;
    }
    __syncthreads();
    if (warp == 0) {
        const unsigned int warps = (blockDim.x + 31u) >> 5;
        acc = lane < warps ? red[lane] : 0.0;
        for (int offset = 16; offset > 0; offset >>= 1) {
            acc += __shfl_down_sync(0xffffffffu, acc, offset);
        }
        if (lane == 0) {
            out[r * groups + g] = acc;
        }
    }
}
