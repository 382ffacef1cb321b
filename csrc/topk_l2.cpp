// The ops knnlm::topk_l2 and knnlm::rerank_l2 (torch.ops.knnlm.*), and the CPU kernel of
// topk_l2: batched exact top-k search by squared L2 distance,
//     topk_l2(queries [B, d] f32, keys [N, d] f16/f32, k, key_norms [N] f32, key_chunk, query_block)
//         -> (dists [B, k] f32 ascending, ids [B, k] i64), equal distances to the smaller id.
// Torch picks the implementation by device: topk_l2_cpu here, topk_l2_cuda (the kernel of
// topk_l2_cuda.cu) on the GPU, topk_l2_meta (shapes only) when torch.compile traces.
// rerank_l2 lives in rerank_l2.cpp.
//
// The CPU kernel mirrors topk_l2_torch in knnlm.py step by step:
//     ||q - k||^2 = ||q||^2 - 2 q.k + ||k||^2
// 1. the inner products q.k of a block of queries with a chunk of keys by one
//    GEMM (ATen, so MKL/OpenBLAS); float16 keys are converted to float32 a chunk
//    at a time first (fp16 matmul on the CPU is slow); each thread takes its
//    share of the queries through all the keys;
// 2. per query, selection of the k smallest ||k||^2 - 2 q.k: a buffer of up to
//    2k candidates and a running threshold, the k-th best distance so far, so
//    that most keys are rejected with one compare; a full buffer is cut back to
//    the k best by a quickselect (FAISS's ReservoirTopN, which it uses from
//    k = distance_compute_min_k_reservoir on, is the same idea; below that
//    FAISS keeps a size-k heap);
// 3. ||q||^2 is the same for every key of a query: added after selection.
// Equal distances go to the smaller id, so the order of the keys decides every tie.
// The few ATen headers it uses (ATen/ops/*.h: one operator each), not torch/extension.h: that one
// brings the whole C++ API and pybind11, and most of the build's time went to reading them.
#include <Python.h>

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#if defined(__SSE2__)
#include <immintrin.h>
#endif

#ifdef WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

#include "candidate.h"
#include "topk_l2_cuda.h"

namespace {

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
  std::vector<uint64_t> spare;  // sort_candidates' scratch
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
    sort_candidates(buf.data(), k, spare);
    for (int64_t i = 0; i < k; ++i) {
      dists[i] = std::max(candidate_dist(buf[i]) + query_norm, 0.0f);
      ids[i] = candidate_id(buf[i]);
    }
  }
};

// One thread's share of the queries [nq, d], through every chunk of the keys, a block of
// query_block queries at a time; its own buffers, reused from chunk to chunk.
void search(const at::Tensor& queries, const at::Tensor& keys, const at::Tensor& key_norms, int64_t k,
            int64_t key_chunk, int64_t query_block, float* dists, int64_t* ids) {
  const int64_t B = queries.size(0), N = keys.size(0), d = keys.size(1);
  auto ips_buf = at::empty({std::min(query_block, B), key_chunk}, queries.options());
  const bool convert = keys.scalar_type() != at::kFloat || !keys.is_contiguous();
  auto chunk_buf = convert ? at::empty({key_chunk, d}, queries.options()) : at::Tensor();
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

// The one check of topk_l2's inputs, for every device. Sizes as SymInts, so that the
// Meta kernel can run it on the symbolic shapes of torch.compile.
void check_topk_l2(const at::Tensor& queries, const at::Tensor& keys, int64_t k, const at::Tensor& key_norms) {
  TORCH_CHECK(queries.dim() == 2 && keys.dim() == 2, "queries and keys must be 2-D, got ", queries.sym_sizes(),
              " and ", keys.sym_sizes());
  TORCH_CHECK(queries.sym_size(1) == keys.sym_size(1), "queries [B, ", queries.sym_size(1), "] and keys [N, ",
              keys.sym_size(1), "] differ in dimension");
  TORCH_CHECK(k >= 1 && keys.sym_size(0) >= k, "k must be in [1, ", keys.sym_size(0),
              "] (the number of keys), got ", k);
  TORCH_CHECK(keys.sym_size(0) <= (int64_t(1) << 32), "at most 2^32 keys, got ", keys.sym_size(0));
  TORCH_CHECK(queries.scalar_type() == at::kFloat, "queries must be float32, got ", queries.scalar_type());
  TORCH_CHECK(keys.scalar_type() == at::kFloat || keys.scalar_type() == at::kHalf,
              "keys must be float16 or float32, got ", keys.scalar_type());
  TORCH_CHECK(key_norms.scalar_type() == at::kFloat && key_norms.dim() == 1 &&
                  key_norms.sym_size(0) == keys.sym_size(0),
              "key_norms must be float32 [", keys.sym_size(0), "], got ", key_norms.scalar_type(), " ",
              key_norms.sym_sizes());
  TORCH_CHECK(queries.device() == keys.device() && keys.device() == key_norms.device(),
              "queries, keys and key_norms must be on one device, got ", queries.device(), ", ", keys.device(),
              ", ", key_norms.device());
}

std::tuple<at::Tensor, at::Tensor> topk_l2_cpu(at::Tensor queries, at::Tensor keys, int64_t k,
                                               at::Tensor key_norms, int64_t key_chunk, int64_t query_block) {
  check_topk_l2(queries, keys, k, key_norms);
  const int64_t B = queries.size(0), N = keys.size(0);
  queries = queries.contiguous();
  key_norms = key_norms.contiguous();
  // Blocks: a [query_block, key_chunk] block of inner products, read by the selection while
  // it is still in cache. Many queries per block, so each thread packs each key for the GEMM
  // few times. bench/search_blocks.py compares block sizes; it chose these defaults.
  if (query_block <= 0) query_block = 512;
  if (key_chunk <= 0) key_chunk = 512;
  key_chunk = std::min(key_chunk, N);
  auto dists = at::empty({B, k}, queries.options());
  auto ids = at::empty({B, k}, queries.options().dtype(at::kLong));
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
void check_cuda(const char* error, const char* what) {
  TORCH_CHECK(error == nullptr, "the CUDA top-k kernel failed (", what, "): ", error);
}

// The kernels of topk_l2_cuda.cu around ATen's GEMM (cuBLAS: float16 keys on the tensor cores, float32
// accumulation and out). query_block is the CPU kernel's blocking: the GPU one has none.
std::tuple<at::Tensor, at::Tensor> topk_l2_cuda(at::Tensor queries, at::Tensor keys, int64_t k,
                                                at::Tensor key_norms, int64_t key_chunk, int64_t query_block) {
  check_topk_l2(queries, keys, k, key_norms);
  TORCH_CHECK(k <= TOPK_L2_CUDA_MAX_K, "the CUDA kernel supports k <= ", TOPK_L2_CUDA_MAX_K, ", got ", k);
  const c10::cuda::CUDAGuard guard(queries.device());
  void* stream = c10::cuda::getCurrentCUDAStream().stream();
  const int64_t B = queries.size(0), N = keys.size(0), d = keys.size(1), width = topk_l2_cuda_width(k);
  const bool split = keys.scalar_type() == at::kHalf;  // the tensor cores' float16 GEMM, queries split in two
  queries = queries.contiguous();
  keys = keys.contiguous();
  key_norms = key_norms.contiguous();
  if (key_chunk <= 0) key_chunk = std::max<int64_t>(4096, (1 << 24) / std::max<int64_t>(B, 1));
  key_chunk = std::min(key_chunk, N);
  auto dists = at::empty({B, k}, queries.options());
  auto ids = at::empty({B, k}, queries.options().dtype(at::kLong));
  if (B == 0) return {dists, ids};
  const int64_t rows = split ? 2 * B : B;
  at::Tensor q2 = queries, scale;
  if (split) {
    q2 = at::empty({rows, d}, queries.options().dtype(at::kHalf));
    scale = at::empty({B}, queries.options());
    check_cuda(topk_l2_cuda_split(queries.data_ptr<float>(), B, d, q2.data_ptr(), scale.data_ptr<float>(), stream),
               "split");
  }
  auto ips_buffer = at::empty({rows * key_chunk}, queries.options());  // scratch, from torch's allocator
  auto best_dists = at::empty({B, width}, queries.options());
  auto best_ids = at::empty({B, width}, ids.options());
  check_cuda(topk_l2_cuda_init(best_dists.data_ptr<float>(), best_ids.data_ptr<int64_t>(), B * width, stream), "init");
  for (int64_t start = 0; start < N; start += key_chunk) {
    const int64_t n = std::min(key_chunk, N - start);
    auto ips = ips_buffer.narrow(0, 0, rows * n).view({rows, n});
    const auto chunk = keys.narrow(0, start, n).t();
    if (split)
      at::mm_out(ips, q2, chunk, at::kFloat);  // float16 x float16 -> float32
    else
      at::mm_out(ips, q2, chunk);
    check_cuda(topk_l2_cuda_select(ips.data_ptr<float>(), split ? scale.data_ptr<float>() : nullptr,
                                   key_norms.data_ptr<float>(), B, n, start, k, best_dists.data_ptr<float>(),
                                   best_ids.data_ptr<int64_t>(), stream), "select");
  }
  check_cuda(topk_l2_cuda_finalize(queries.data_ptr<float>(), B, d, k, best_dists.data_ptr<float>(),
                                   best_ids.data_ptr<int64_t>(), dists.data_ptr<float>(), ids.data_ptr<int64_t>(),
                                   stream), "finalize");
  return {dists, ids};
}
#endif

// Shapes, dtypes and device of the results only: what torch.compile needs to trace a call.
std::tuple<at::Tensor, at::Tensor> topk_l2_meta(at::Tensor queries, at::Tensor keys, int64_t k,
                                                at::Tensor key_norms, int64_t key_chunk, int64_t query_block) {
  check_topk_l2(queries, keys, k, key_norms);
  const c10::SymInt B = queries.sym_size(0);
  return {at::empty_symint({B, k}, queries.options()), at::empty_symint({B, k}, queries.options().dtype(at::kLong))};
}

}  // namespace

TORCH_LIBRARY(knnlm, m) {
  m.def("topk_l2(Tensor queries, Tensor keys, int k, Tensor key_norms, int key_chunk=0, int query_block=0) "
        "-> (Tensor, Tensor)");
  m.def("rerank_l2(Tensor queries, Tensor keys, Tensor ids, int fd=-1, int offset=0) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(knnlm, CPU, m) { m.impl("topk_l2", &topk_l2_cpu); }

#ifdef WITH_CUDA
TORCH_LIBRARY_IMPL(knnlm, CUDA, m) { m.impl("topk_l2", &topk_l2_cuda); }
#endif

TORCH_LIBRARY_IMPL(knnlm, Meta, m) { m.impl("topk_l2", &topk_l2_meta); }

// Importing the module knnlm_ext loads this library, which registers the ops; the module
// itself only says what was built (a plain CPython module: no pybind11 needed for that).
PyMODINIT_FUNC PyInit_knnlm_ext() {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "knnlm_ext", "the C++ search kernels of csrc/", -1, nullptr};
  PyObject* m = PyModule_Create(&module);
#ifdef WITH_CUDA
  const bool cuda = true;
#else
  const bool cuda = false;
#endif
  if (m == nullptr || PyModule_AddIntConstant(m, "CUDA_MAX_K", TOPK_L2_CUDA_MAX_K) < 0 ||
      PyModule_AddObject(m, "cuda", PyBool_FromLong(cuda)) < 0) {
    Py_XDECREF(m);
    return nullptr;
  }
  return m;
}
