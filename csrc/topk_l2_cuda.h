// The CUDA kernel's entry point, in plain C++ so that topk_l2_cuda.cu compiles
// with `nvcc -c` alone (no torch headers), and topk_l2.cpp, which registers it as the CUDA
// kernel of the op knnlm::topk_l2, calls it with plain pointers.
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

// Asynchronous on `stream` (a cudaStream_t); all pointers are device memory, allocated by the caller:
// queries [B, d] f32, keys [N, d] f16 (keys_half) or f32, key_norms [N] f32, scratch chunk_dists
// [B, key_chunk] f32, best_dists [B, width] f32 and best_ids [B, width] i64; results dists [B, k] f32
// ascending and ids [B, k] i64. Returns nullptr, or the CUDA error a launch raised.
const char* topk_l2_cuda_launch(const float* queries, const void* keys, bool keys_half, const float* key_norms,
                                int64_t B, int64_t N, int64_t d, int64_t k, int64_t key_chunk, float* chunk_dists,
                                float* best_dists, int64_t* best_ids, float* dists, int64_t* ids, void* stream);
