// The op knnlm::bernoulli_ (torch.ops.knnlm.bernoulli_), on the CPU:
//     bernoulli_(self, p, generator) -> self, each element 1 with probability p, else 0:
// torch's own Tensor.bernoulli_(p) on the CPU, to the bit, leaving the generator in the same
// state, only faster. Dropout draws its masks with it (train.py: cpu.exact_bernoulli()).
//
// torch's kernel (bernoulli_kernel in ATen/native/cpu/DistributionTemplates.h, which runs where
// MKL's does not: on a CPU that is not Intel's) draws every element through the generator's
// mt19937, one call at a time: two 32-bit numbers r1, r2, the double u = (r1 2^32 + r2 mod 2^53)
// 2^-53 and u < p. Here the same mt19937 (ATen/core/MT19937RNGEngine.h) regenerates and tempers
// its 624-number state in loops the compiler vectorizes, and u < p is the integer comparison
// (r1 mod 2^21) 2^32 + r2 < ceil(p 2^53), which is the same since u is that integer times 2^-53.
// What it does not handle (a tensor that is not contiguous, not floating point) goes to torch's
// own kernel.
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Dispatch.h>
#include <ATen/core/DistributionsHelper.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/bernoulli_native.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <mutex>

#if defined(__GNUC__) && defined(__x86_64__)
#define KNNLM_AVX2_CLONE __attribute__((target_clones("avx2", "default")))  // AVX2 where the CPU has it
#else
#define KNNLM_AVX2_CLONE
#endif

namespace {

constexpr int kN = 624, kM = 397;  // at::mt19937: its state's length and its shift

inline uint32_t twist(uint32_t u, uint32_t v) {
  return (((u & 0x80000000u) | (v & 0x7fffffffu)) >> 1) ^ (-(v & 1u) & 0x9908b0dfu);
}

inline uint32_t temper(uint32_t y) {
  y ^= y >> 11;
  y ^= (y << 7) & 0x9d2c5680u;
  y ^= (y << 15) & 0xefc60000u;
  return y ^ (y >> 18);
}

// at::mt19937's next_state(): the state's next 624 numbers.
void regenerate(uint32_t* s) {
  for (int i = 0; i < kN - kM; ++i) s[i] = s[i + kM] ^ twist(s[i], s[i + 1]);
  for (int i = kN - kM; i < kN - 1; ++i) s[i] = s[i + kM - kN] ^ twist(s[i], s[i + 1]);
  s[kN - 1] = s[kM - 1] ^ twist(s[kN - 1], s[0]);
}

// n numbers, as n calls of at::mt19937's operator() give them: the state holds left_ - 1 unused
// numbers from next_ on; when none are left it is regenerated.
void draw(at::mt19937_data_pod& e, uint32_t* out, int64_t n) {
  while (n > 0) {
    if (e.left_ == 1) {
      regenerate(e.state_.data());
      e.left_ = kN + 1;
      e.next_ = 0;
    }
    const int64_t take = std::min<int64_t>(e.left_ - 1, n);
    const uint32_t* s = e.state_.data() + e.next_;
    for (int64_t i = 0; i < take; ++i) out[i] = temper(s[i]);
    e.next_ += take;
    e.left_ -= take;
    out += take;
    n -= take;
  }
}

template <typename scalar_t>
KNNLM_AVX2_CLONE void fill(scalar_t* out, int64_t n, double p, at::mt19937_data_pod& e) {
  const uint64_t bound = uint64_t(std::ceil(std::ldexp(p, 53)));  // p in [0, 1]: at most 2^53
  constexpr int64_t kBlock = 2048;
  uint32_t r[2 * kBlock];
  for (int64_t start = 0; start < n; start += kBlock) {
    const int64_t m = std::min(kBlock, n - start);
    draw(e, r, 2 * m);
    for (int64_t j = 0; j < m; ++j) {
      const uint64_t u = (uint64_t(r[2 * j] & 0x1fffffu) << 32) | r[2 * j + 1];
      out[start + j] = scalar_t(u < bound ? 1.0f : 0.0f);
    }
  }
}

at::Tensor& bernoulli_cpu(at::Tensor& self, double p, std::optional<at::Generator> generator) {
  const auto type = self.scalar_type();
  const bool floating = type == at::kFloat || type == at::kDouble || type == at::kBFloat16 || type == at::kHalf;
  if (!floating || !self.is_contiguous() || !(p >= 0 && p <= 1))
    return at::native::bernoulli_(self, p, generator);  // torch's own kernel, and its errors
  auto* gen = at::get_generator_or_default<at::CPUGeneratorImpl>(generator, at::detail::getDefaultCPUGenerator());
  std::lock_guard<std::mutex> lock(gen->mutex_);
  at::mt19937 engine = gen->engine();
  at::mt19937_data_pod state = engine.data();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, type, "knnlm_bernoulli_", [&] {
    fill(self.data_ptr<scalar_t>(), self.numel(), p, state);
  });
  engine.set_data(state);
  gen->set_engine(engine);
  return self;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(knnlm, m) {
  m.def("bernoulli_(Tensor(a!) self, float p, Generator? generator=None) -> Tensor(a!)");
}

TORCH_LIBRARY_IMPL(knnlm, CPU, m) { m.impl("bernoulli_", &bernoulli_cpu); }
