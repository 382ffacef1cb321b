// Batched exact top-k search by squared L2 distance on the GPU: the twin of the
// CPU kernel in topk_l2.cpp, with the same steps, chunk by chunk of keys:
// 1. chunk_dists_kernel: ||k||^2 - 2 q.k for every query and key of the chunk,
//    by 32 x 32 tiles in shared memory; float16 keys, float32 accumulation;
// 2. select_kernel: one block per query; keys below the query's running
//    threshold (its k-th best distance so far) are appended to a candidate
//    buffer; a full buffer is bitonic-sorted and merged into the sorted list of
//    the best, which sets the new threshold;
// 3. finalize_kernel: ||q||^2 added to the k best, written out.
// All on the caller's stream, no host synchronisation. Ties go to the smaller id.
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "topk_l2_cuda.h"

namespace {

constexpr int TILE = 32;      // distance tiles: 32 queries x 32 keys, d in steps of 32
constexpr int THREADS = 256;  // threads of a selection block
constexpr int64_t NO_ID = INT64_MAX;

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }

// out[b, j] = key_norms[start + j] - 2 queries[b] . keys[start + j], rows of out `ld` apart.
template <typename Key>
__global__ void chunk_dists_kernel(const float* __restrict__ queries, const Key* __restrict__ keys,
                                   const float* __restrict__ key_norms, int64_t B, int64_t d, int64_t start,
                                   int64_t n, int64_t ld, float* __restrict__ out) {
  __shared__ float q_tile[TILE][TILE + 1];  // +1: no shared-memory bank conflicts
  __shared__ float k_tile[TILE][TILE + 1];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t b0 = int64_t(blockIdx.y) * TILE, j0 = int64_t(blockIdx.x) * TILE;
  float acc = 0.0f;
  for (int64_t d0 = 0; d0 < d; d0 += TILE) {
    const int64_t c = d0 + tx;
    q_tile[ty][tx] = (b0 + ty < B && c < d) ? queries[(b0 + ty) * d + c] : 0.0f;
    k_tile[ty][tx] = (j0 + ty < n && c < d) ? to_float(keys[(start + j0 + ty) * d + c]) : 0.0f;
    __syncthreads();
#pragma unroll
    for (int t = 0; t < TILE; ++t) acc += q_tile[ty][t] * k_tile[tx][t];
    __syncthreads();
  }
  if (b0 + ty < B && j0 + tx < n) out[(b0 + ty) * ld + j0 + tx] = key_norms[start + j0 + tx] - 2.0f * acc;
}

__device__ __forceinline__ bool less(float da, int64_t ia, float db, int64_t ib) {
  return da < db || (da == db && ia < ib);
}

__device__ __forceinline__ void compare_swap(float* dist, int64_t* id, int a, int b, bool ascending) {
  if (less(dist[b], id[b], dist[a], id[a]) == ascending) {
    const float td = dist[a];
    dist[a] = dist[b];
    dist[b] = td;
    const int64_t ti = id[a];
    id[a] = id[b];
    id[b] = ti;
  }
}

// Sort (dist, id)[0, width) ascending in shared memory; width a power of two.
__device__ void bitonic_sort(float* dist, int64_t* id, int width) {
  for (int size = 2; size <= width; size <<= 1)
    for (int stride = size >> 1; stride > 0; stride >>= 1) {
      for (int a = threadIdx.x; a < width; a += blockDim.x)
        if ((a ^ stride) > a) compare_swap(dist, id, a, a ^ stride, (a & size) == 0);
      __syncthreads();
    }
}

// best <- the `width` smallest of best (sorted) and cand[0, count), sorted; count reset to 0.
__device__ void merge(float* best_d, int64_t* best_i, float* cand_d, int64_t* cand_i, int* count, int width) {
  for (int a = *count + threadIdx.x; a < width; a += blockDim.x) {
    cand_d[a] = INFINITY;
    cand_i[a] = NO_ID;
  }
  __syncthreads();
  bitonic_sort(cand_d, cand_i, width);
  // min of an ascending and a descending list: a bitonic list holding the `width` smallest of both
  for (int a = threadIdx.x; a < width; a += blockDim.x) {
    const int c = width - 1 - a;
    if (less(cand_d[c], cand_i[c], best_d[a], best_i[a])) {
      best_d[a] = cand_d[c];
      best_i[a] = cand_i[c];
    }
  }
  __syncthreads();
  for (int stride = width >> 1; stride > 0; stride >>= 1) {  // bitonic merge: sort it
    for (int a = threadIdx.x; a < width; a += blockDim.x)
      if ((a ^ stride) > a) compare_swap(best_d, best_i, a, a ^ stride, true);
    __syncthreads();
  }
  if (threadIdx.x == 0) *count = 0;
  __syncthreads();
}

__global__ void init_kernel(float* best_dists, int64_t* best_ids, int64_t size) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < size; i += int64_t(gridDim.x) * blockDim.x) {
    best_dists[i] = INFINITY;
    best_ids[i] = NO_ID;
  }
}

// One block per query: merge the chunk's keys with dist < threshold into the query's best list.
__global__ void select_kernel(const float* __restrict__ chunk_dists, int64_t ld, int64_t n, int64_t start, int k,
                              int width, float* __restrict__ best_dists, int64_t* __restrict__ best_ids) {
  __shared__ float best_d[TOPK_L2_CUDA_MAX_K], cand_d[TOPK_L2_CUDA_MAX_K];
  __shared__ int64_t best_i[TOPK_L2_CUDA_MAX_K], cand_i[TOPK_L2_CUDA_MAX_K];
  __shared__ int count;
  const int64_t q = blockIdx.x;
  for (int a = threadIdx.x; a < width; a += blockDim.x) {
    best_d[a] = best_dists[q * width + a];
    best_i[a] = best_ids[q * width + a];
  }
  if (threadIdx.x == 0) count = 0;
  __syncthreads();
  float threshold = best_d[k - 1];
  const float* row = chunk_dists + q * ld;
  for (int64_t base = 0; base < n; base += blockDim.x) {
    if (count + int(blockDim.x) > width) {  // no room for a whole pass: merge first
      merge(best_d, best_i, cand_d, cand_i, &count, width);
      threshold = best_d[k - 1];
    }
    const int64_t j = base + threadIdx.x;
    if (j < n) {
      const float dist = row[j];
      if (dist < threshold) {  // keys come in increasing id order: a tie loses to the earlier key
        const int pos = atomicAdd(&count, 1);
        cand_d[pos] = dist;
        cand_i[pos] = start + j;
      }
    }
    __syncthreads();
  }
  if (count > 0) merge(best_d, best_i, cand_d, cand_i, &count, width);
  for (int a = threadIdx.x; a < width; a += blockDim.x) {
    best_dists[q * width + a] = best_d[a];
    best_ids[q * width + a] = best_i[a];
  }
}

// One block per query: dists = best + ||q||^2 (clamped at 0), for the first k.
__global__ void finalize_kernel(const float* __restrict__ queries, int64_t d, int k, int width,
                                const float* __restrict__ best_dists, const int64_t* __restrict__ best_ids,
                                float* __restrict__ dists, int64_t* __restrict__ ids) {
  __shared__ float partial[THREADS];
  const int64_t q = blockIdx.x;
  float sum = 0.0f;
  for (int64_t c = threadIdx.x; c < d; c += blockDim.x) sum += queries[q * d + c] * queries[q * d + c];
  partial[threadIdx.x] = sum;
  __syncthreads();
  for (int s = blockDim.x / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) partial[threadIdx.x] += partial[threadIdx.x + s];
    __syncthreads();
  }
  const float query_norm = partial[0];
  for (int i = threadIdx.x; i < k; i += blockDim.x) {
    dists[q * k + i] = fmaxf(best_dists[q * width + i] + query_norm, 0.0f);
    ids[q * k + i] = best_ids[q * width + i];
  }
}

}  // namespace

const char* topk_l2_cuda_launch(const float* queries, const void* keys, bool keys_half, const float* key_norms,
                                int64_t B, int64_t N, int64_t d, int64_t k, int64_t key_chunk, float* chunk_dists,
                                float* best_dists, int64_t* best_ids, float* dists, int64_t* ids, void* stream) {
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  const int width = int(topk_l2_cuda_width(k));
  init_kernel<<<256, THREADS, 0, s>>>(best_dists, best_ids, B * width);
  for (int64_t start = 0; start < N; start += key_chunk) {
    const int64_t n = N - start < key_chunk ? N - start : key_chunk;
    const dim3 grid(unsigned((n + TILE - 1) / TILE), unsigned((B + TILE - 1) / TILE)), block(TILE, TILE);
    if (keys_half)
      chunk_dists_kernel<__half><<<grid, block, 0, s>>>(queries, static_cast<const __half*>(keys), key_norms, B, d,
                                                        start, n, key_chunk, chunk_dists);
    else
      chunk_dists_kernel<float><<<grid, block, 0, s>>>(queries, static_cast<const float*>(keys), key_norms, B, d,
                                                       start, n, key_chunk, chunk_dists);
    select_kernel<<<unsigned(B), THREADS, 0, s>>>(chunk_dists, key_chunk, n, start, int(k), width, best_dists,
                                                   best_ids);
  }
  finalize_kernel<<<unsigned(B), THREADS, 0, s>>>(queries, d, int(k), width, best_dists, best_ids, dists, ids);
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}
