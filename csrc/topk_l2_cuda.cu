// Batched exact top-k search by squared L2 distance on the GPU: the twin of the
// CPU kernel in topk_l2.cpp, with the same steps, chunk by chunk of keys:
//     ||q - k||^2 = ||q||^2 - 2 q.k + ||k||^2
// 1. the inner products q.k of every query with a chunk of keys by one GEMM, which
//    topk_l2.cpp asks of ATen (cuBLAS) between the launches of this file. Float16
//    keys go to the tensor cores: each float32 query is split by split_kernel into a
//    power-of-two scale s and two float16 rows, hi = half(q / s) and lo = half(q / s - hi),
//    so that q = s (hi + lo) to about 2^-22 of |q|; one float16 GEMM of [2B, d] by [d, n]
//    with float32 accumulation (and float32 out) gives q.k = s (hi.k + lo.k) within
//    float32's rounding, as the CPU computes it. Float32 keys take a float32 GEMM;
// 2. select_kernel: one block per query; ||k||^2 - 2 q.k for each key of the chunk,
//    and those below the query's running threshold (its k-th best distance so far)
//    are appended to a candidate buffer; a full buffer is bitonic-sorted and merged
//    into the sorted list of the best, which sets the new threshold;
// 3. finalize_kernel: ||q||^2 added to the k best, written out.
// Shapes: queries [B, d] f32, keys [N, d] f16 or f32, k <= 1024 (the best lists live in
// shared memory). Why it is fast: the arithmetic, 2 B N d (4 B N d split), runs on the
// tensor cores through cuBLAS; what this file adds reads each product once and keeps
// nearly every key out of the sort by one compare with the threshold.
// All on the caller's stream, no host synchronisation. Ties go to the smaller id.
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "topk_l2_cuda.h"

namespace {

constexpr int THREADS = 256;  // threads of a selection block
constexpr int SPLIT_BITS = 14;  // hi's largest element in [2^13, 2^14): far from float16's 65504
constexpr int64_t NO_ID = INT64_MAX;

// One block per query: s = a power of two, hi = half(q / s), lo = half(q / s - hi): q2 rows b and B + b.
__global__ void split_kernel(const float* __restrict__ queries, int64_t B, int64_t d, __half* __restrict__ q2,
                             float* __restrict__ scale) {
  __shared__ float partial[THREADS];
  const int64_t q = blockIdx.x;
  const float* row = queries + q * d;
  float largest = 0.0f;
  for (int64_t c = threadIdx.x; c < d; c += blockDim.x) largest = fmaxf(largest, fabsf(row[c]));
  partial[threadIdx.x] = largest;
  __syncthreads();
  for (int s = blockDim.x / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) partial[threadIdx.x] = fmaxf(partial[threadIdx.x], partial[threadIdx.x + s]);
    __syncthreads();
  }
  int exponent = 0;
  frexpf(partial[0], &exponent);  // largest = m 2^exponent, m in [0.5, 1); 0 for a zero row
  const float s = partial[0] > 0.0f && isfinite(partial[0]) ? ldexpf(1.0f, exponent - SPLIT_BITS) : 1.0f;
  for (int64_t c = threadIdx.x; c < d; c += blockDim.x) {
    const float x = row[c] / s;  // exact: s is a power of two
    const __half hi = __float2half_rn(x);
    q2[q * d + c] = hi;
    q2[(B + q) * d + c] = __float2half_rn(x - __half2float(hi));
  }
  if (threadIdx.x == 0) scale[q] = s;
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

// One block per query: ||k||^2 - 2 q.k for the chunk's keys (q.k = s (hi.k + lo.k) when split), and
// those below the threshold merged into the query's best list. ips: rows of n products, n apart.
__global__ void select_kernel(const float* __restrict__ ips, const float* __restrict__ scale,
                              const float* __restrict__ key_norms, int64_t B, int64_t n, int64_t start, int k,
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
  const float* hi = ips + q * n;
  const float* lo = scale != nullptr ? ips + (B + q) * n : nullptr;
  const float s = scale != nullptr ? scale[q] : 1.0f;
  for (int64_t base = 0; base < n; base += blockDim.x) {
    if (count + int(blockDim.x) > width) {  // no room for a whole pass: merge first
      merge(best_d, best_i, cand_d, cand_i, &count, width);
      threshold = best_d[k - 1];
    }
    const int64_t j = base + threadIdx.x;
    if (j < n) {
      const float ip = lo != nullptr ? (hi[j] + lo[j]) * s : hi[j];
      const float dist = key_norms[start + j] - 2.0f * ip;
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

const char* topk_l2_cuda_error() {
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

const char* topk_l2_cuda_split(const float* queries, int64_t B, int64_t d, void* q2, float* scale, void* stream) {
  split_kernel<<<unsigned(B), THREADS, 0, static_cast<cudaStream_t>(stream)>>>(queries, B, d, static_cast<__half*>(q2),
                                                                               scale);
  return topk_l2_cuda_error();
}

const char* topk_l2_cuda_init(float* best_dists, int64_t* best_ids, int64_t size, void* stream) {
  init_kernel<<<256, THREADS, 0, static_cast<cudaStream_t>(stream)>>>(best_dists, best_ids, size);
  return topk_l2_cuda_error();
}

const char* topk_l2_cuda_select(const float* ips, const float* scale, const float* key_norms, int64_t B, int64_t n,
                                int64_t start, int64_t k, float* best_dists, int64_t* best_ids, void* stream) {
  select_kernel<<<unsigned(B), THREADS, 0, static_cast<cudaStream_t>(stream)>>>(
      ips, scale, key_norms, B, n, start, int(k), int(topk_l2_cuda_width(k)), best_dists, best_ids);
  return topk_l2_cuda_error();
}

const char* topk_l2_cuda_finalize(const float* queries, int64_t B, int64_t d, int64_t k, const float* best_dists,
                                  const int64_t* best_ids, float* dists, int64_t* ids, void* stream) {
  finalize_kernel<<<unsigned(B), THREADS, 0, static_cast<cudaStream_t>(stream)>>>(
      queries, d, int(k), int(topk_l2_cuda_width(k)), best_dists, best_ids, dists, ids);
  return topk_l2_cuda_error();
}
