// The CUDA kernels' entry points, in plain C++ so that topk_l2_cuda.cu compiles with
// `nvcc -c` alone (no torch headers), and topk_l2.cpp, which registers the CUDA
// implementation of the op knnlm::topk_l2, calls them with plain pointers around the
// inner products it asks of ATen (cuBLAS), chunk by chunk of keys:
//     split (float16 keys only); init; for each chunk: GEMM, select; finalize.
#pragma once
#include <cstdint>

// k-selection keeps each query's best candidates in shared memory, sorted: up to this many.
constexpr int64_t TOPK_L2_CUDA_MAX_K = 1024;

// Width of a query's list of best candidates: a power of two >= k, and >= the 256 threads of a block.
inline int64_t topk_l2_cuda_width(int64_t k) {
  int64_t width = 256;
  while (width < k) width *= 2;
  return width;
}

// Each is asynchronous on `stream` (a cudaStream_t), with device pointers allocated by the caller,
// and returns nullptr or the CUDA error its launch raised.
// queries [B, d] f32 -> q2 [2B, d] f16 (rows hi, then rows lo) and scale [B] f32: q = scale (hi + lo).
const char* topk_l2_cuda_split(const float* queries, int64_t B, int64_t d, void* q2, float* scale, void* stream);
// best_dists [B, width] f32 and best_ids [B, width] i64 (size = B width elements): empty lists.
const char* topk_l2_cuda_init(float* best_dists, int64_t* best_ids, int64_t size, void* stream);
// Keys [start, start + n) into the best lists, from their inner products: ips [B, n] f32 (scale null),
// or [2B, n], the products of q2's rows, with scale [B]; key_norms [N] f32 is indexed from 0.
const char* topk_l2_cuda_select(const float* ips, const float* scale, const float* key_norms, int64_t B, int64_t n,
                                int64_t start, int64_t k, float* best_dists, int64_t* best_ids, void* stream);
// dists [B, k] f32 ascending (the best plus ||q||^2, clamped at 0) and ids [B, k] i64.
const char* topk_l2_cuda_finalize(const float* queries, int64_t B, int64_t d, int64_t k, const float* best_dists,
                                  const int64_t* best_ids, float* dists, int64_t* ids, void* stream);
