// A lever measured and not taken (bench/fused_cross_entropy.py; docs/speed.md, "Tried and not
// taken"): the training loss's backward in one pass. torch computes the gradient of
// F.cross_entropy(logits [N, V], targets) (mean) as nll_loss's backward, a tensor of zeros with
// -1/N at each target, then log_softmax's backward, g - exp(log_p) * sum(g) per row, which reads
// that tensor twice. Here, from log_p alone:
//     grad = exp(log_p) / N,   and at the target  -1/N + exp(log_p) / N  (one rounding, an FMA),
// with the exp that torch's own kernel calls (Sleef's expf8_u10 on AVX2, expf16_u10 on AVX-512,
// exported by libtorch_cpu), so that the bits are torch's; the benchmark checks they are.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <cmath>

#include <immintrin.h>

extern "C" __m256 Sleef_expf8_u10(__m256);
extern "C" __m512 Sleef_expf16_u10(__m512);

namespace {

// One row: the products exp(log_p) * c, then the target's -c + exp(log_p[t]) * c in one rounding.
__attribute__((target("avx2,fma"))) void row_avx2(const float* lp, float* g, int64_t V, int64_t t, float c) {
  const __m256 vc = _mm256_set1_ps(c);
  int64_t j = 0;
  for (; j + 8 <= V; j += 8) _mm256_storeu_ps(g + j, _mm256_mul_ps(Sleef_expf8_u10(_mm256_loadu_ps(lp + j)), vc));
  if (j < V) {
    float in[8] = {0}, out[8];
    for (int64_t k = j; k < V; ++k) in[k - j] = lp[k];
    _mm256_storeu_ps(out, _mm256_mul_ps(Sleef_expf8_u10(_mm256_loadu_ps(in)), vc));
    for (int64_t k = j; k < V; ++k) g[k] = out[k - j];
  }
  float e[8];
  _mm256_storeu_ps(e, Sleef_expf8_u10(_mm256_set1_ps(lp[t])));
  g[t] = std::fma(e[0], c, -c);
}

__attribute__((target("avx512f,fma"))) void row_avx512(const float* lp, float* g, int64_t V, int64_t t, float c) {
  const __m512 vc = _mm512_set1_ps(c);
  int64_t j = 0;
  for (; j + 16 <= V; j += 16) _mm512_storeu_ps(g + j, _mm512_mul_ps(Sleef_expf16_u10(_mm512_loadu_ps(lp + j)), vc));
  if (j < V) {
    float in[16] = {0}, out[16];
    for (int64_t k = j; k < V; ++k) in[k - j] = lp[k];
    _mm512_storeu_ps(out, _mm512_mul_ps(Sleef_expf16_u10(_mm512_loadu_ps(in)), vc));
    for (int64_t k = j; k < V; ++k) g[k] = out[k - j];
  }
  float e[16];
  _mm512_storeu_ps(e, Sleef_expf16_u10(_mm512_set1_ps(lp[t])));
  g[t] = std::fma(e[0], c, -c);
}

// log_p [N, V] float32 contiguous, targets [N] int64, grad: the loss's gradient (1 after
// loss.backward()), width: 8 (AVX2) or 16 (AVX-512), torch's CPU capability -> d loss / d logits.
at::Tensor cross_entropy_backward(const at::Tensor& log_p, const at::Tensor& targets, double grad, int64_t width) {
  TORCH_CHECK(log_p.dim() == 2 && log_p.scalar_type() == at::kFloat && log_p.is_contiguous(), "log_p: [N, V] float32");
  TORCH_CHECK(targets.dim() == 1 && targets.size(0) == log_p.size(0) && targets.scalar_type() == at::kLong, "targets: [N] int64");
  TORCH_CHECK(width == 8 || width == 16, "width: 8 or 16");
  auto out = at::empty_like(log_p);
  const int64_t N = log_p.size(0), V = log_p.size(1);
  const float c = static_cast<float>(grad) / static_cast<float>(N);  // nll_loss's -(g / N), negated
  const float* lp = log_p.data_ptr<float>();
  const int64_t* t = targets.data_ptr<int64_t>();
  float* g = out.data_ptr<float>();
  at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) (width == 16 ? row_avx512 : row_avx2)(lp + i * V, g + i * V, V, t[i], c);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(knnlm_bench, m) {
  m.def("cross_entropy_backward(Tensor log_p, Tensor targets, float grad, int width) -> Tensor", cross_entropy_backward);
}
