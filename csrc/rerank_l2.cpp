// The op knnlm::rerank_l2 (torch.ops.knnlm.rerank_l2), on the CPU only: re-ranking,
//     rerank_l2(queries [B, d] f32, keys [N, d] f16/f32, ids [B, k] i64, fd, offset)
//         -> (dists [B, k] f32 ascending, ids [B, k] i64), equal distances to the smaller id:
// the exact squared L2 distances between each query and the keys of its own ids (the
// neighbours an approximate index, FAISS IVF-PQ, retrieved), sorted like the search
// (topk_l2.cpp, which also declares the op). Each key row is read once from wherever it lies
// (a memmap, or the open file fd, keys starting at byte offset, when fd >= 0) and compared on
// the fly; parallel over queries. Id -1 (FAISS: no more neighbours) gets distance +inf.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <limits>
#include <vector>

#include <unistd.h>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "candidate.h"

namespace {

float row_l2(const float* row, const float* q, int64_t d) {
  float sum = 0.0f;
  for (int64_t j = 0; j < d; ++j) sum += (row[j] - q[j]) * (row[j] - q[j]);
  return sum;
}

float row_l2(const at::Half* row, const float* q, int64_t d) {
  float sum = 0.0f;
  for (int64_t j = 0; j < d; ++j) sum += (static_cast<float>(row[j]) - q[j]) * (static_cast<float>(row[j]) - q[j]);
  return sum;
}

#if defined(__GNUC__) && defined(__x86_64__)
// The same with AVX2, FMA and F16C (float16 -> float32 in one instruction), used
// when the CPU has them; compiled for them here only, so the module runs anywhere.
#define KNNLM_AVX2 __attribute__((target("avx2,fma,f16c")))
KNNLM_AVX2 inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
KNNLM_AVX2 inline __m256 load8(const at::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

template <typename key_t>
KNNLM_AVX2 float row_l2_avx2(const key_t* row, const float* q, int64_t d) {
  __m256 acc = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 8 <= d; j += 8) {
    const __m256 diff = _mm256_sub_ps(load8(row + j), _mm256_loadu_ps(q + j));
    acc = _mm256_fmadd_ps(diff, diff, acc);
  }
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
  s = _mm_hadd_ps(s, s);
  s = _mm_hadd_ps(s, s);
  return _mm_cvtss_f32(s) + row_l2(row + j, q + j, d - j);
}

bool has_avx2() {
  static const bool yes = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                          __builtin_cpu_supports("f16c");
  return yes;
}
#endif

template <typename key_t>
void rerank_rows(const at::Tensor& q, const key_t* keys, int64_t stride, int64_t fd, int64_t offset,
                 at::Tensor& dists, at::Tensor& ids) {
  const int64_t k = ids.size(1), d = q.size(1);
  constexpr uint32_t kMissing = 0xffffffffu;
  constexpr int64_t kAhead = 8;
  at::parallel_for(0, ids.size(0), 1, [&](int64_t begin, int64_t end) {
    std::vector<uint64_t> found(k), spare;
    std::vector<key_t> buffer(fd >= 0 ? d : 0);
    bool read_failed = false;
    for (int64_t b = begin; b < end; ++b) {
      const float* qb = q.data_ptr<float>() + b * d;
      int64_t* id = ids.data_ptr<int64_t>() + b * k;
      float* dist = dists.data_ptr<float>() + b * k;
      for (int64_t i = 0; i < k; ++i) {
        if (id[i] < 0) {
          found[i] = candidate(std::numeric_limits<float>::infinity(), kMissing);
          continue;
        }
        const key_t* row = keys + id[i] * stride;
        if (fd >= 0) {  // read the row from the file instead: no page of it gets mapped into this process
          const ssize_t bytes = d * sizeof(key_t);
          read_failed |= pread(int(fd), buffer.data(), bytes, offset + id[i] * stride * sizeof(key_t)) != bytes;
          row = buffer.data();
        } else if (i + kAhead < k && id[i + kAhead] >= 0) {  // random rows: fetch a few ahead while this one is compared
          const char* next = reinterpret_cast<const char*>(keys + id[i + kAhead] * stride);
          for (int64_t byte = 0; byte < d * int64_t(sizeof(key_t)); byte += 64) __builtin_prefetch(next + byte);
        }
#if defined(KNNLM_AVX2)
        const float l2 = has_avx2() ? row_l2_avx2(row, qb, d) : row_l2(row, qb, d);
#else
        const float l2 = row_l2(row, qb, d);
#endif
        found[i] = candidate(l2, id[i]);
      }
      TORCH_CHECK(!read_failed, "rerank_l2: cannot read key rows from file descriptor ", fd);
      sort_candidates(found.data(), k, spare);
      for (int64_t i = 0; i < k; ++i) {
        dist[i] = candidate_dist(found[i]);
        id[i] = candidate_id(found[i]) == kMissing ? -1 : candidate_id(found[i]);
      }
    }
  });
}

// The one check of rerank_l2's inputs that needs no data: the CPU and Meta kernels run it.
void check_rerank_l2(const at::Tensor& queries, const at::Tensor& keys, const at::Tensor& ids) {
  TORCH_CHECK(queries.dim() == 2 && keys.dim() == 2 && ids.dim() == 2, "queries, keys and ids must be 2-D, got ",
              queries.sym_sizes(), ", ", keys.sym_sizes(), " and ", ids.sym_sizes());
  TORCH_CHECK(queries.sym_size(1) == keys.sym_size(1), "queries [B, ", queries.sym_size(1), "] and keys [N, ",
              keys.sym_size(1), "] differ in dimension");
  TORCH_CHECK(ids.sym_size(0) == queries.sym_size(0), "ids [", ids.sym_size(0), ", k] must have a row per query (",
              queries.sym_size(0), ")");
  TORCH_CHECK(queries.scalar_type() == at::kFloat, "queries must be float32, got ", queries.scalar_type());
  TORCH_CHECK(keys.scalar_type() == at::kFloat || keys.scalar_type() == at::kHalf,
              "keys must be float16 or float32, got ", keys.scalar_type());
  TORCH_CHECK(ids.scalar_type() == at::kLong, "ids must be int64, got ", ids.scalar_type());
  TORCH_CHECK(queries.device() == keys.device() && keys.device() == ids.device(),
              "queries, keys and ids must be on one device, got ", queries.device(), ", ", keys.device(), ", ",
              ids.device());
  TORCH_CHECK(keys.sym_size(0) < (int64_t(1) << 32) - 1, "fewer than 2^32 - 1 keys, got ", keys.sym_size(0));
}

std::tuple<at::Tensor, at::Tensor> rerank_l2_cpu(const at::Tensor& queries, const at::Tensor& keys,
                                                 const at::Tensor& ids, int64_t fd, int64_t offset) {
  check_rerank_l2(queries, keys, ids);
  TORCH_CHECK(ids.numel() == 0 || (ids.min().item<int64_t>() >= -1 && ids.max().item<int64_t>() < keys.size(0)),
              "ids must be in [0, ", keys.size(0), ") or -1 (missing)");
  TORCH_CHECK(fd < 0 || keys.is_contiguous(), "rerank_l2 reads a file only for contiguous keys");
  const auto q = queries.contiguous();
  const auto rows = keys.stride(1) == 1 ? keys : keys.contiguous();
  auto out_ids = ids.clone(at::MemoryFormat::Contiguous);
  auto out_dists = at::empty(ids.sizes(), q.options());
  if (rows.scalar_type() == at::kFloat)
    rerank_rows(q, rows.data_ptr<float>(), rows.stride(0), fd, offset, out_dists, out_ids);
  else
    rerank_rows(q, rows.data_ptr<at::Half>(), rows.stride(0), fd, offset, out_dists, out_ids);
  return {out_dists, out_ids};
}

// Shapes, dtypes and device of the results only: what torch.compile needs to trace a call.
std::tuple<at::Tensor, at::Tensor> rerank_l2_meta(const at::Tensor& queries, const at::Tensor& keys,
                                                  const at::Tensor& ids, int64_t fd, int64_t offset) {
  check_rerank_l2(queries, keys, ids);
  return {at::empty_symint(ids.sym_sizes(), queries.options()), at::empty_symint(ids.sym_sizes(), ids.options())};
}

}  // namespace

TORCH_LIBRARY_IMPL(knnlm, CPU, m) { m.impl("rerank_l2", &rerank_l2_cpu); }

TORCH_LIBRARY_IMPL(knnlm, Meta, m) { m.impl("rerank_l2", &rerank_l2_meta); }
