// Fused masked mean pooling + optional L2 normalisation of a transformer's last hidden
// state: the embedding output of a BERT-family sentence encoder, in one pass over the
// hidden state instead of candle's broadcast-multiply, two sums, a division, a square,
// a third sum, a sqrt and a second division (each its own kernel and temporary).
//
// The CPU reference, the semantics (those of sentence-transformers) and the launch are
// in kernels/src/pool.rs; compiled to PTX by kernels/build.rs when the `cuda` feature
// is on.
//
//   hidden [b, s, h] f32, contiguous;  mask [b, s] f32 (0 or 1), contiguous
//   out[r, j] = sum_t hidden[r, t, j] * mask[r, t] / max(sum_t mask[r, t], 1e-9)
//   normalize: out[r, :] /= max(||out[r, :]||_2, 1e-12)
//
// Launch: grid (b, 1, 1), block (POOL_THREADS, 1, 1), no dynamic shared memory. One block
// per row; a thread owns the columns j = threadIdx.x + k * blockDim.x, so the loads of
// hidden[r, t, :] are coalesced across the block.

#define POOL_THREADS 256

// Sum of v over the block; every thread gets the result. `red` holds one value per warp.
__device__ __forceinline__ float block_sum(float v, float* red) {
    for (int offset = 16; offset > 0; offset >>= 1) {
        v += __shfl_xor_sync(0xffffffffu, v, offset);
    }
    const unsigned int lane = threadIdx.x & 31u;
    const unsigned int warp = threadIdx.x >> 5;
    __syncthreads();  // `red` may still be read from a previous call
    if (lane == 0) {
        red[warp] = v;
    }
    __syncthreads();
    const unsigned int warps = (blockDim.x + 31u) >> 5;
    if (warp == 0) {
        v = lane < warps ? red[lane] : 0.0f;
        for (int offset = 16; offset > 0; offset >>= 1) {
            v += __shfl_xor_sync(0xffffffffu, v, offset);
        }
        if (lane == 0) {
            red[0] = v;
        }
    }
    __syncthreads();
    return red[0];
}

extern "C" __global__ void __launch_bounds__(POOL_THREADS) quiver_mean_pool_l2_f32(
    const float* __restrict__ hidden,
    const float* __restrict__ mask,
    float* __restrict__ out,
    const unsigned int seq,
    const unsigned int dim,
    const unsigned int normalize) {
    __shared__ float red[POOL_THREADS / 32];
    const size_t row = blockIdx.x;
    const float* h_row = hidden + row * (size_t)seq * dim;
    const float* m_row = mask + row * (size_t)seq;
    float* o_row = out + row * (size_t)dim;

    float count = 0.0f;
    for (unsigned int t = threadIdx.x; t < seq; t += blockDim.x) {
        count += m_row[t];
    }
    count = block_sum(count, red);
    const float denom = fmaxf(count, 1e-9f);

    float squares = 0.0f;
    for (unsigned int j = threadIdx.x; j < dim; j += blockDim.x) {
        float acc = 0.0f;
        for (unsigned int t = 0; t < seq; ++t) {
            const float m = m_row[t];
            if (m != 0.0f) {
                acc += h_row[(size_t)t * dim + j] * m;
            }
        }
        acc /= denom;
        o_row[j] = acc;
        squares += acc * acc;
    }

    if (normalize != 0u) {
        // Every thread takes part in the reduction (no early return above).
        squares = block_sum(squares, red);
        const float scale = 1.0f / fmaxf(sqrtf(squares), 1e-12f);
        for (unsigned int j = threadIdx.x; j < dim; j += blockDim.x) {
            o_row[j] *= scale;  // only this thread wrote o_row[j]
        }
    }
}
