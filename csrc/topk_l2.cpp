// Batched exact top-k search by squared L2 distance: the CPU kernel, and the
// binding of it and of the CUDA kernel (topk_l2_cuda.cu) to Python. At the end,
// rerank_l2: exact distances to given ids, sorted, for re-ranking FAISS's neighbours.
//
// It mirrors topk_l2_torch in knnlm.py step by step:
//     ||q - k||^2 = ||q||^2 - 2 q.k + ||k||^2
// 1. the inner products q.k of a block of queries with a chunk of keys by one
//    GEMM (ATen, so MKL/OpenBLAS); float16 keys are converted to float32 a chunk
//    at a time first (fp16 matmul on the CPU is slow); each thread takes its
//    share of the queries through all the keys;
// 2. per query, selection of the k smallest ||k||^2 - 2 q.k: a buffer of up to
//    2k candidates and a running threshold, the k-th best distance so far, so
//    that most keys are rejected with one compare (FAISS keeps a size-k heap
//    instead; a buffer cut back by a quickselect is cheaper per accepted key);
// 3. ||q||^2 is the same for every key of a query: added after selection.
// Equal distances go to the smaller id, so the order of the keys decides every tie.
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include <unistd.h>

#if defined(__SSE2__)
#include <immintrin.h>
#endif

#include "topk_l2_cuda.h"

namespace {

// A candidate is one 64-bit integer that sorts like the pair (dist, id): the float's
// bits made to sort as unsigned integers, then the id. So ids must fit in 32 bits.
inline uint64_t candidate(float dist, int64_t id) {
  uint32_t bits;
  dist += 0.0f;  // -0 -> +0: the two compare equal as floats, so they must here
  std::memcpy(&bits, &dist, sizeof bits);
  bits = (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
  return (uint64_t(bits) << 32) | uint64_t(id);
}

inline float candidate_dist(uint64_t c) {
  uint32_t bits = uint32_t(c >> 32);
  bits = (bits & 0x80000000u) ? (bits & 0x7fffffffu) : ~bits;
  float dist;
  std::memcpy(&dist, &bits, sizeof dist);
  return dist;
}

inline int64_t candidate_id(uint64_t c) { return int64_t(c & 0xffffffffu); }

// dists[t] = key_norms[t] - 2 ips[t] for a block of W keys; returns a bit mask of
// those below the threshold. With SSE (the x86-64 baseline) one branch tests W keys;
// compilers do not vectorise this loop by themselves.
constexpr int64_t W = 16;
inline uint32_t block_dists(const float* ips, const float* key_norms, float threshold, float* dists) {
  uint32_t below = 0;
#if defined(__SSE2__)
  const __m128 bound = _mm_set1_ps(threshold);
  for (int64_t t = 0; t < W; t += 4) {
    const __m128 ip = _mm_loadu_ps(ips + t);
    const __m128 dist = _mm_sub_ps(_mm_loadu_ps(key_norms + t), _mm_add_ps(ip, ip));
    _mm_storeu_ps(dists + t, dist);
    below |= uint32_t(_mm_movemask_ps(_mm_cmplt_ps(dist, bound))) << t;
  }
#else
  for (int64_t t = 0; t < W; ++t) {
    dists[t] = key_norms[t] - 2.0f * ips[t];
    below |= uint32_t(dists[t] < threshold) << t;
  }
#endif
  return below;
}

// Puts the (r+1)-th smallest of a[0, n) at a[r], the smaller ones before it and the
// larger after (as std::nth_element does): quickselect around a median of three with
// a branch-free partition. Its compares go either way at random, so a branching loop
// would mispredict half of them; std::nth_element finishes small ranges.
void select(uint64_t* a, int64_t n, int64_t r) {
  int64_t lo = 0, hi = n;  // a[r] belongs in [lo, hi)
  for (int rounds = 0; hi - lo > 64 && rounds < 64; ++rounds) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (a[mid] < a[lo]) std::swap(a[mid], a[lo]);
    if (a[hi - 1] < a[mid]) std::swap(a[hi - 1], a[mid]);
    if (a[mid] < a[lo]) std::swap(a[mid], a[lo]);
    std::swap(a[mid], a[hi - 1]);  // the median of the three is the pivot, at the end
    const uint64_t pivot = a[hi - 1];
    int64_t j = lo;  // a[lo, j) < pivot <= a[j, i)
    for (int64_t i = lo; i < hi - 1; ++i) {
      const uint64_t x = a[i];
      a[i] = a[j];
      a[j] = x;
      j += x < pivot;
    }
    std::swap(a[j], a[hi - 1]);  // the pivot at its place
    if (j == r) return;
    if (r < j) hi = j; else lo = j + 1;
  }
  std::nth_element(a + lo, a + r, a + hi);
}

// The k best (dist, id) seen so far by one query. Keys arrive in increasing id
// order, so a new key beats the k-th best only if its distance is strictly smaller.
struct TopK {
  int64_t k;
  std::vector<uint64_t> buf;  // candidates, the k best among them: up to 2k, plus one block's W
  int64_t size = 0;
  float threshold = std::numeric_limits<float>::infinity();  // k-th best once k are in

  explicit TopK(int64_t k) : k(k), buf(2 * k + W) {}

  void cut() {  // keep the k best, and their worst as the new threshold
    select(buf.data(), size, k - 1);
    threshold = candidate_dist(buf[k - 1]);
    size = k;
  }

  // Scan dists_j = key_norms[j] - 2 ips[j] for keys first_id .. first_id + n - 1.
  void scan(const float* ips, const float* key_norms, int64_t n, int64_t first_id) {
    int64_t j = 0;
    for (; j < n && size < k; ++j) {  // the first k go in unseen
      float dist = key_norms[j] - 2.0f * ips[j];
      buf[size++] = candidate(std::isnan(dist) ? std::numeric_limits<float>::infinity() : dist, first_id + j);
      if (size == k) threshold = candidate_dist(*std::max_element(buf.begin(), buf.begin() + k));
    }
    for (; j + W <= n; j += W) {  // then W at a time: all below the threshold go in, cut back at 2k
      float dists[W];
      uint32_t below = block_dists(ips + j, key_norms + j, threshold, dists);
      if (!below) continue;
      for (; below; below &= below - 1) {
        const int t = __builtin_ctz(below);  // the lowest bit set
        buf[size++] = candidate(dists[t], first_id + j + t);
      }
      if (size >= 2 * k) cut();
    }
    for (; j < n; ++j) {
      float dist = key_norms[j] - 2.0f * ips[j];
      if (dist < threshold) {
        buf[size++] = candidate(dist, first_id + j);
        if (size >= 2 * k) cut();
      }
    }
  }

  // The k best in ascending order, plus ||q||^2.
  void write(float query_norm, float* dists, int64_t* ids) {
    if (size > k) cut();
    std::sort(buf.begin(), buf.begin() + k);
    for (int64_t i = 0; i < k; ++i) {
      dists[i] = std::max(candidate_dist(buf[i]) + query_norm, 0.0f);
      ids[i] = candidate_id(buf[i]);
    }
  }
};

void check_inputs(const torch::Tensor& queries, const torch::Tensor& keys, int64_t k,
                  const torch::Tensor& key_norms) {
  TORCH_CHECK(queries.dim() == 2 && keys.dim() == 2, "queries and keys must be 2-D, got ", queries.sizes(),
              " and ", keys.sizes());
  TORCH_CHECK(queries.size(1) == keys.size(1), "queries [B, ", queries.size(1), "] and keys [N, ", keys.size(1),
              "] differ in dimension");
  TORCH_CHECK(k >= 1 && k <= keys.size(0), "k must be in [1, ", keys.size(0), "] (the number of keys), got ", k);
  TORCH_CHECK(keys.size(0) <= (int64_t(1) << 32), "at most 2^32 keys, got ", keys.size(0));
  TORCH_CHECK(queries.scalar_type() == torch::kFloat32, "queries must be float32, got ", queries.scalar_type());
  TORCH_CHECK(keys.scalar_type() == torch::kFloat32 || keys.scalar_type() == torch::kFloat16,
              "keys must be float16 or float32, got ", keys.scalar_type());
  TORCH_CHECK(key_norms.scalar_type() == torch::kFloat32 && key_norms.dim() == 1 &&
                  key_norms.size(0) == keys.size(0),
              "key_norms must be float32 [", keys.size(0), "], got ", key_norms.scalar_type(), " ",
              key_norms.sizes());
  TORCH_CHECK(queries.device() == keys.device() && keys.device() == key_norms.device(),
              "queries, keys and key_norms must be on one device, got ", queries.device(), ", ", keys.device(),
              ", ", key_norms.device());
}

// One thread's share of the queries [nq, d], through every chunk of the keys, a block of
// query_block queries at a time; its own buffers, reused from chunk to chunk.
void search(const torch::Tensor& queries, const torch::Tensor& keys, const torch::Tensor& key_norms, int64_t k,
            int64_t key_chunk, int64_t query_block, float* dists, int64_t* ids) {
  const int64_t B = queries.size(0), N = keys.size(0), d = keys.size(1);
  auto ips_buf = torch::empty({std::min(query_block, B), key_chunk}, queries.options());
  const bool convert = keys.scalar_type() != torch::kFloat32 || !keys.is_contiguous();
  auto chunk_buf = convert ? torch::empty({key_chunk, d}, queries.options()) : torch::Tensor();
  auto query_norms = queries.pow(2).sum(1);
  for (int64_t q0 = 0; q0 < B; q0 += query_block) {
    const int64_t nq = std::min(query_block, B - q0);
    std::vector<TopK> best;
    best.reserve(nq);
    for (int64_t b = 0; b < nq; ++b) best.emplace_back(k);
    for (int64_t start = 0; start < N; start += key_chunk) {
      const int64_t n = std::min(key_chunk, N - start);
      auto chunk = keys.narrow(0, start, n);
      if (convert) chunk = chunk_buf.narrow(0, 0, n).copy_(chunk);
      auto ips = ips_buf.narrow(0, 0, nq).narrow(1, 0, n);  // [nq, n], rows key_chunk apart
      at::mm_out(ips, queries.narrow(0, q0, nq), chunk.t());
      for (int64_t b = 0; b < nq; ++b)
        best[b].scan(ips.data_ptr<float>() + b * ips.stride(0), key_norms.data_ptr<float>() + start, n, start);
    }
    const float* qn = query_norms.data_ptr<float>() + q0;
    for (int64_t b = 0; b < nq; ++b) best[b].write(qn[b], dists + (q0 + b) * k, ids + (q0 + b) * k);
  }
}

std::tuple<torch::Tensor, torch::Tensor> topk_l2_cpu(torch::Tensor queries, torch::Tensor keys, int64_t k,
                                                     torch::Tensor key_norms, int64_t key_chunk,
                                                     int64_t query_block) {
  const int64_t B = queries.size(0), N = keys.size(0);
  queries = queries.contiguous();
  key_norms = key_norms.contiguous();
  // Blocks: a [query_block, key_chunk] block of inner products (1 MB), read by the selection
  // while it is still in cache. Many queries per block, so each thread packs each key for
  // the GEMM few times. bench/search_blocks.py: 512 x 512 and the older 2048 x 1024 are within
  // this machine's noise of each other at B = 1024 (paired medians 1.03-1.14x FAISS either way)
  // and 512 x 512 was no slower at B = 64; the smaller block needs 4x less memory per thread.
  if (query_block <= 0) query_block = 512;
  if (key_chunk <= 0) key_chunk = 512;
  key_chunk = std::min(key_chunk, N);
  auto dists = torch::empty({B, k}, queries.options());
  auto ids = torch::empty({B, k}, queries.options().dtype(torch::kInt64));
  // Parallel over queries: each thread runs its share through all the keys (GEMMs in a
  // parallel region are single-threaded), so threads never wait for each other.
  const int64_t threads = at::get_num_threads();
  at::parallel_for(0, B, std::max<int64_t>(1, (B + threads - 1) / threads), [&](int64_t b0, int64_t b1) {
    search(queries.narrow(0, b0, b1 - b0), keys, key_norms, k, key_chunk, query_block,
           dists.data_ptr<float>() + b0 * k, ids.data_ptr<int64_t>() + b0 * k);
  });
  return {dists, ids};
}

#ifdef WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

std::tuple<torch::Tensor, torch::Tensor> topk_l2_cuda(torch::Tensor queries, torch::Tensor keys, int64_t k,
                                                      torch::Tensor key_norms, int64_t key_chunk) {
  TORCH_CHECK(k <= TOPK_L2_CUDA_MAX_K, "the CUDA kernel supports k <= ", TOPK_L2_CUDA_MAX_K, ", got ", k);
  const c10::cuda::CUDAGuard guard(queries.device());
  const int64_t B = queries.size(0), N = keys.size(0), d = keys.size(1);
  queries = queries.contiguous();
  keys = keys.contiguous();
  key_norms = key_norms.contiguous();
  if (key_chunk <= 0) key_chunk = std::max<int64_t>(4096, (1 << 24) / std::max<int64_t>(B, 1));
  key_chunk = std::min(key_chunk, N);
  const int64_t width = topk_l2_cuda_width(k);
  auto dists = torch::empty({B, k}, queries.options());
  auto ids = torch::empty({B, k}, queries.options().dtype(torch::kInt64));
  auto chunk_dists = torch::empty({B, key_chunk}, queries.options());  // scratch, from torch's allocator
  auto best_dists = torch::empty({B, width}, queries.options());
  auto best_ids = torch::empty({B, width}, ids.options());
  const char* error = topk_l2_cuda_launch(queries.data_ptr<float>(), keys.data_ptr(), keys.scalar_type() == torch::kFloat16,
                      key_norms.data_ptr<float>(), B, N, d, k, key_chunk, chunk_dists.data_ptr<float>(),
                      best_dists.data_ptr<float>(), best_ids.data_ptr<int64_t>(), dists.data_ptr<float>(),
                      ids.data_ptr<int64_t>(), c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(error == nullptr, "the CUDA top-k kernel failed to launch: ", error);
  return {dists, ids};
}
#endif

std::tuple<torch::Tensor, torch::Tensor> topk_l2(torch::Tensor queries, torch::Tensor keys, int64_t k,
                                                 torch::Tensor key_norms, int64_t key_chunk, int64_t query_block) {
  check_inputs(queries, keys, k, key_norms);
  if (queries.device().is_cpu()) return topk_l2_cpu(queries, keys, k, key_norms, key_chunk, query_block);
#ifdef WITH_CUDA
  if (queries.device().is_cuda()) return topk_l2_cuda(queries, keys, k, key_norms, key_chunk);
#endif
  TORCH_CHECK(false, "knnlm_ext was built without support for device ", queries.device());
}

// Re-ranking: the exact squared L2 distances between each query and the keys of
// its own ids (the neighbours an approximate index, FAISS IVF-PQ, retrieved),
// sorted like the search: ascending, equal distances to the smaller id. Each key
// row is read once from wherever it lies (a memmap) and compared on the fly;
// parallel over queries. Id -1 (FAISS: no more neighbours) gets distance +inf.
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
void rerank_rows(const torch::Tensor& q, const key_t* keys, int64_t stride, int64_t fd, int64_t offset,
                 torch::Tensor& dists, torch::Tensor& ids) {
  const int64_t k = ids.size(1), d = q.size(1);
  constexpr uint32_t kMissing = 0xffffffffu;
  constexpr int64_t kAhead = 8;
  at::parallel_for(0, ids.size(0), 1, [&](int64_t begin, int64_t end) {
    std::vector<uint64_t> found(k);
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
      std::sort(found.begin(), found.end());
      for (int64_t i = 0; i < k; ++i) {
        dist[i] = candidate_dist(found[i]);
        id[i] = candidate_id(found[i]) == kMissing ? -1 : candidate_id(found[i]);
      }
    }
  });
}

std::tuple<torch::Tensor, torch::Tensor> rerank_l2(const torch::Tensor& queries, const torch::Tensor& keys,
                                                   const torch::Tensor& ids, int64_t fd, int64_t offset) {
  TORCH_CHECK(queries.dim() == 2 && keys.dim() == 2 && ids.dim() == 2, "queries, keys and ids must be 2-D, got ",
              queries.sizes(), ", ", keys.sizes(), " and ", ids.sizes());
  TORCH_CHECK(queries.size(1) == keys.size(1), "queries [B, ", queries.size(1), "] and keys [N, ", keys.size(1),
              "] differ in dimension");
  TORCH_CHECK(ids.size(0) == queries.size(0), "ids [", ids.size(0), ", k] must have a row per query (",
              queries.size(0), ")");
  TORCH_CHECK(queries.scalar_type() == torch::kFloat32, "queries must be float32, got ", queries.scalar_type());
  TORCH_CHECK(keys.scalar_type() == torch::kFloat32 || keys.scalar_type() == torch::kFloat16,
              "keys must be float16 or float32, got ", keys.scalar_type());
  TORCH_CHECK(ids.scalar_type() == torch::kInt64, "ids must be int64, got ", ids.scalar_type());
  TORCH_CHECK(queries.is_cpu() && keys.is_cpu() && ids.is_cpu(), "rerank_l2 runs on the CPU");
  TORCH_CHECK(keys.size(0) < (int64_t(1) << 32) - 1, "fewer than 2^32 - 1 keys, got ", keys.size(0));
  TORCH_CHECK(ids.numel() == 0 || (ids.min().item<int64_t>() >= -1 && ids.max().item<int64_t>() < keys.size(0)),
              "ids must be in [0, ", keys.size(0), ") or -1 (missing)");
  const auto q = queries.contiguous();
  TORCH_CHECK(fd < 0 || keys.is_contiguous(), "rerank_l2 reads a file only for contiguous keys");
  const auto rows = keys.stride(1) == 1 ? keys : keys.contiguous();
  auto out_ids = ids.clone(at::MemoryFormat::Contiguous);
  auto out_dists = torch::empty(ids.sizes(), q.options());
  if (rows.scalar_type() == torch::kFloat32)
    rerank_rows(q, rows.data_ptr<float>(), rows.stride(0), fd, offset, out_dists, out_ids);
  else
    rerank_rows(q, rows.data_ptr<at::Half>(), rows.stride(0), fd, offset, out_dists, out_ids);
  return {out_dists, out_ids};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Batched exact top-k squared-L2 search (CPU, and CUDA when built with it)";
  m.def("topk_l2", &topk_l2, "(queries [B, d] f32, keys [N, d] f16/f32, k, key_norms [N] f32, key_chunk, "
        "query_block) -> (dists [B, k] f32 ascending, ids [B, k] i64)",
        py::arg("queries"), py::arg("keys"), py::arg("k"), py::arg("key_norms"), py::arg("key_chunk") = 0,
        py::arg("query_block") = 0);
  m.def("rerank_l2", &rerank_l2, "(queries [B, d] f32, keys [N, d] f16/f32, ids [B, k] i64) -> (the exact "
        "||queries[b] - keys[id]||^2 [B, k] f32 ascending, ids [B, k] i64), ties by id; CPU",
        py::arg("queries"), py::arg("keys"), py::arg("ids"), py::arg("fd") = -1, py::arg("offset") = 0);
  m.attr("CUDA_MAX_K") = TOPK_L2_CUDA_MAX_K;
#ifdef WITH_CUDA
  m.attr("cuda") = true;
#else
  m.attr("cuda") = false;
#endif
}
