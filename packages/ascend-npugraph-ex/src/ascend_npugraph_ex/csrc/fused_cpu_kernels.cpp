// Row loops of the npugraph_ex CPU kernels (declared in fused_cpu_kernels.h).
//
// This file is compiled for one vector ISA: the one ATen dispatches its own kernels to on the
// building machine (torch.backends.cpu.get_cpu_capability(), which honours
// ATEN_CPU_CAPABILITY), with ATen's compiler flags and CPU_CAPABILITY macros for that level, so
// at::vec::Vectorized is as wide here as in the aten ops the fused ops replace (16 floats with
// AVX512). ops/cpu_cpp.py keys the built library by that level: a library never runs on a CPU
// that lacks the ISA it was built for, and no -march=native is involved. At DEFAULT, Vectorized
// is ATen's portable fallback on x86-64 (per-lane loops, a scalar exp()): measured 5-10x slower
// than this file at AVX512 and slower than ATen's own AVX512 kernels, which is why the level
// follows ATen's rather than the baseline ISA. (On aarch64, DEFAULT is NEON.)
//
// Every loop makes one pass over memory: a row is read once from memory (a second read of the
// same row, for the scaling after the statistics, hits L1) and each output is written once.
// Arithmetic is in float32 for bfloat16/half inputs, and rounds to the input dtype exactly where
// the unfused code in ops/reference.py stores an intermediate tensor of that dtype. Rows go to
// at::parallel_for, with ATen's grain, so they spread over threads when more than one is allowed
// and decode sizes stay on the calling thread.
#include "fused_cpu_kernels.h"

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <array>
#include <bit>
#include <cmath>
#include <cstdint>
#include <utility>

#ifndef CPU_CAPABILITY
#error "build with -DCPU_CAPABILITY=<AVX512|AVX2|DEFAULT> and its flags (ops/cpu_cpp.py)"
#endif

namespace npugraph_ex {
namespace {

using at::vec::Vectorized;
using fVec = Vectorized<float>;

// ---- rows ---------------------------------------------------------------------------------------

// Rows per parallel task: ATen's grain (at::internal::GRAIN_SIZE elements, defined in the much
// heavier TensorIterator.h), so that small inputs run inline on the calling thread.
constexpr int64_t kGrainElements = 32768;

int64_t grain_rows(int64_t h) {
  return std::max<int64_t>(1, kGrainElements / std::max<int64_t>(h, 1));
}

// Calls f(offsets) for rows [begin, end) of `l`; offsets[t] is where operand t's row starts.
template <int N, typename F>
void for_each_row(const RowLayout& l, int64_t begin, int64_t end, const F& f) {
  std::array<int64_t, kMaxRowDims> idx{};
  std::array<int64_t, N> off{};
  int64_t r = begin;
  for (int64_t d = l.ndim - 1; d >= 0; --d) {
    idx[d] = r % l.size[d];
    r /= l.size[d];
    for (int t = 0; t < N; ++t) {
      off[t] += idx[d] * l.stride[t][d];
    }
  }
  for (int64_t row = begin; row < end; ++row) {
    f(off);
    // Next row: an odometer over the leading dims, innermost first, without divisions.
    for (int64_t d = l.ndim - 1; d >= 0; --d) {
      if (++idx[d] < l.size[d]) {
        for (int t = 0; t < N; ++t) {
          off[t] += l.stride[t][d];
        }
        break;
      }
      idx[d] = 0;
      for (int t = 0; t < N; ++t) {
        off[t] -= (l.size[d] - 1) * l.stride[t][d];
      }
    }
  }
}

template <int N, typename F>
void parallel_rows(const RowLayout& l, int64_t h, const F& f) {
  at::parallel_for(0, l.rows(), grain_rows(h), [&](int64_t begin, int64_t end) {
    for_each_row<N>(l, begin, end, f);
  });
}

// ---- float32 views of a row -------------------------------------------------------------------

// RowIO<T> moves kStep elements of T between memory and two float vectors (a, b):
//   load(p, n)          widens n <= kStep elements (the rest of a and b is zero);
//   round(a, b)         what storing a T and reading it back does to a float (identity for float);
//   store(p, a, b, n)   rounds and narrows n elements;
//   store_rounded(...)  the same for values that round() already returned (no second rounding).
// Which element goes to which lane is the IO's business: every kernel here is elementwise along
// the row or reduces over it, and uses one IO for all its operands.

template <typename T>
struct RowIO {  // Half: ATen's conversions
  using bVec = Vectorized<T>;
  static constexpr int64_t kStep = bVec::size();
  static_assert(kStep == 2 * fVec::size());

  static std::pair<fVec, fVec> load(const T* p, int64_t n = kStep) {
    auto [a, b] = at::vec::convert_to_float<T>(n == kStep ? bVec::loadu(p) : bVec::loadu(p, n));
    return {a, b};
  }
  static std::pair<fVec, fVec> round(const fVec& a, const fVec& b) {
    auto [ra, rb] = at::vec::convert_to_float<T>(at::vec::convert_from_float<T>(a, b));
    return {ra, rb};
  }
  static void store(T* p, const fVec& a, const fVec& b, int64_t n = kStep) {
    at::vec::convert_from_float<T>(a, b).store(p, static_cast<int>(n));
  }
  static void store_rounded(T* p, const fVec& a, const fVec& b, int64_t n = kStep) {
    store(p, a, b, n);
  }
};

template <>
struct RowIO<float> {
  static constexpr int64_t kStep = 2 * fVec::size();
  static constexpr int64_t kHalf = fVec::size();

  static std::pair<fVec, fVec> load(const float* p, int64_t n = kStep) {
    if (n == kStep) {
      return {fVec::loadu(p), fVec::loadu(p + kHalf)};
    }
    return {
        fVec::loadu(p, std::min(n, kHalf)),
        n > kHalf ? fVec::loadu(p + kHalf, n - kHalf) : fVec(0.0f)};
  }
  static std::pair<fVec, fVec> round(const fVec& a, const fVec& b) {
    return {a, b};
  }
  static void store(float* p, const fVec& a, const fVec& b, int64_t n = kStep) {
    if (n == kStep) {
      a.store(p);
      b.store(p + kHalf);
      return;
    }
    a.store(p, static_cast<int>(std::min(n, kHalf)));
    if (n > kHalf) {
      b.store(p + kHalf, static_cast<int>(n - kHalf));
    }
  }
  static void store_rounded(float* p, const fVec& a, const fVec& b, int64_t n = kStep) {
    store(p, a, b, n);
  }
};

// bfloat16 as pairs: kStep elements load as one vector of 32-bit words, word j holding elements
// 2j (low half) and 2j+1 (high half). a = the even elements (word << 16), b = the odd ones
// (word & 0xffff0000): two bit operations instead of convert_to_float's widening shuffles, and
// storing packs two already rounded vectors back with a shift and an or instead of a
// saturating pack and a cross-lane permute. That halves the instructions of the bfloat16 norms,
// whose conversions, not memory, bound them with ATen's conversions.
template <>
struct RowIO<c10::BFloat16> {
  using T = c10::BFloat16;
  using iVec = Vectorized<int32_t>;
  static constexpr int64_t kStep = 2 * iVec::size();
  static_assert(kStep == 2 * fVec::size());

  static iVec words(const T* p, int64_t n) {
    if (n == kStep) {
      return iVec::loadu(p);
    }
    // A partial row: never read past its last element (n may be odd).
    std::array<T, kStep> buf{};
    std::copy_n(p, n, buf.begin());
    return iVec::loadu(buf.data());
  }
  static std::pair<fVec, fVec> load(const T* p, int64_t n = kStep) {
    const iVec w = words(p, n);
    return {at::vec::cast<float>(w << iVec(16)), at::vec::cast<float>(w & iVec(kHigh))};
  }
  // Round to nearest even on the bit pattern, as c10::BFloat16 does, leaving the low 16 bits
  // zero. No NaN test: every NaN here comes from bfloat16 inputs or float arithmetic on them, so
  // its low 16 bits are zero and the rounding leaves it as it is (c10 would canonicalize it).
  static fVec round(const fVec& f) {
    const iVec u = at::vec::cast<int32_t>(f);
    const iVec lsb = (u >> iVec(16)) & iVec(1);
    return at::vec::cast<float>((u + iVec(0x7fff) + lsb) & iVec(kHigh));
  }
  static std::pair<fVec, fVec> round(const fVec& a, const fVec& b) {
    return {round(a), round(b)};
  }
  static void store_rounded(T* p, const fVec& a, const fVec& b, int64_t n = kStep) {
    // >> is an arithmetic shift: mask the sign copies out of the high half.
    const iVec w = ((at::vec::cast<int32_t>(a) >> iVec(16)) & iVec(0xffff)) |
        at::vec::cast<int32_t>(b);
    if (n == kStep) {
      w.store(p);
      return;
    }
    std::array<T, kStep> buf;
    w.store(buf.data());
    std::copy_n(buf.begin(), n, p);
  }
  static void store(T* p, const fVec& a, const fVec& b, int64_t n = kStep) {
    store_rounded(p, round(a), round(b), n);
  }

 private:
  static constexpr int32_t kHigh = static_cast<int32_t>(0xffff0000u);
};

// Calls f(i, n) over [0, h) in steps of kStep; the last step may be partial (n < kStep).
template <typename T, typename F>
inline void for_each_step(int64_t h, const F& f) {
  constexpr int64_t kStep = RowIO<T>::kStep;
  int64_t i = 0;
  for (; i + kStep <= h; i += kStep) {
    f(i, kStep);
  }
  if (i < h) {
    f(i, h - i);
  }
}

// ---- RMSNorm ----------------------------------------------------------------------------------

// 1 / sqrt(sum / h + eps), as the reference's mean (a sum, then a division) and rsqrt round it.
inline float rstd_of(const fVec& acc0, const fVec& acc1, int64_t h, float eps) {
  const float sum = at::vec::vec_reduce_all<float>(
      [](const fVec& a, const fVec& b) { return a + b; }, acc0 + acc1);
  return 1.0f / std::sqrt(sum / static_cast<float>(h) + eps);
}

// y = weight * round(x * rstd): the reference normalizes in float32, rounds to the input dtype,
// then scales by the weight in that dtype.
template <typename T>
inline void scale_row(const T* x, const T* w, T* y, int64_t h, float rstd) {
  using IO = RowIO<T>;
  const fVec r(rstd);
  for_each_step<T>(h, [&](int64_t i, int64_t n) {
    auto [a, b] = IO::load(x + i, n);
    auto [na, nb] = IO::round(a * r, b * r);
    auto [wa, wb] = IO::load(w + i, n);
    IO::store(y + i, na * wa, nb * wb, n);
  });
}

// The sum of squares of a row, in two pairs of float accumulators: a single FMA chain would be
// bound by its latency (4 cycles a step), not by the loads.
template <typename T>
inline std::pair<fVec, fVec> sum_squares(const T* x, int64_t h) {
  using IO = RowIO<T>;
  constexpr int64_t kStep = IO::kStep;
  fVec acc0(0.0f), acc1(0.0f), acc2(0.0f), acc3(0.0f);
  int64_t i = 0;
  for (; i + 2 * kStep <= h; i += 2 * kStep) {
    auto [a, b] = IO::load(x + i);
    auto [c, d] = IO::load(x + i + kStep);
    acc0 = at::vec::fmadd(a, a, acc0);
    acc1 = at::vec::fmadd(b, b, acc1);
    acc2 = at::vec::fmadd(c, c, acc2);
    acc3 = at::vec::fmadd(d, d, acc3);
  }
  for (; i < h; i += kStep) {
    auto [a, b] = IO::load(x + i, std::min(kStep, h - i));  // zero past the row: adds nothing
    acc0 = at::vec::fmadd(a, a, acc0);
    acc1 = at::vec::fmadd(b, b, acc1);
  }
  return {acc0 + acc2, acc1 + acc3};
}

template <typename T>
void rms_norm_impl(const RowLayout& l, int64_t h, const T* x, const T* w, T* y, float eps) {
  parallel_rows<2>(l, h, [&](const std::array<int64_t, 2>& o) {
    const T* xr = x + o[0];
    auto [acc0, acc1] = sum_squares(xr, h);
    scale_row(xr, w, y + o[1], h, rstd_of(acc0, acc1, h, eps));  // the row is in L1 again
  });
}

template <typename T>
void add_rms_norm_impl(
    const RowLayout& l, int64_t h, const T* x, const T* res, const T* w, T* y, T* s, float eps) {
  using IO = RowIO<T>;
  parallel_rows<4>(l, h, [&](const std::array<int64_t, 4>& o) {
    const T* xr = x + o[0];
    const T* rr = res + o[1];
    T* sr = s + o[3];
    fVec acc0(0.0f), acc1(0.0f);
    for_each_step<T>(h, [&](int64_t i, int64_t n) {
      auto [xa, xb] = IO::load(xr + i, n);
      auto [ra, rb] = IO::load(rr + i, n);
      // The statistics are those of s as stored (rounded to T), as in the unfused code.
      auto [sa, sb] = IO::round(xa + ra, xb + rb);
      IO::store_rounded(sr + i, sa, sb, n);
      acc0 = at::vec::fmadd(sa, sa, acc0);
      acc1 = at::vec::fmadd(sb, sb, acc1);
    });
    scale_row<T>(sr, w, y + o[2], h, rstd_of(acc0, acc1, h, eps));  // s is in L1 again
  });
}

// ---- SwiGLU -----------------------------------------------------------------------------------

// silu(g) = g / (1 + exp(-g)), the formula and exp of ATen's vectorized silu kernel, so that the
// fused op is bitwise silu(gate) * up where ATen takes its vectorized path. exp() is SLEEF's
// (1 ulp) with AVX2/AVX512 and std::exp per lane with DEFAULT, as in ATen: it, not memory, bounds
// this loop, at ~0.5 ns per element with AVX512.
inline fVec silu(const fVec& g) {
  return g / (fVec(1.0f) + g.neg().exp());
}

template <typename T>
void swiglu_impl(const RowLayout& l, int64_t h, const T* gate, const T* up, T* out) {
  using IO = RowIO<T>;
  parallel_rows<3>(l, h, [&](const std::array<int64_t, 3>& o) {
    const T* gr = gate + o[0];
    const T* ur = up + o[1];
    T* outr = out + o[2];
    for_each_step<T>(h, [&](int64_t i, int64_t n) {
      auto [ga, gb] = IO::load(gr + i, n);
      auto [ua, ub] = IO::load(ur + i, n);
      auto [sa, sb] = IO::round(silu(ga), silu(gb));  // silu(gate) is a tensor of T, unfused
      IO::store(outr + i, sa * ua, sb * ub, n);
    });
  });
}

// ---- RoPE -------------------------------------------------------------------------------------

// Storage type, widening and rounding per dtype, written so that GCC vectorizes the row loop
// with this file's ISA: bfloat16 is handled as its uint16_t bit pattern with c10's
// round-to-nearest-even, branch-free (NaN stays NaN). Half keeps c10's scalar conversions
// (correct, not vectorized).
template <typename scalar_t>
struct Round {
  using raw_t = scalar_t;
  using acc_t = at::opmath_type<scalar_t>;
  static inline acc_t widen(raw_t v) {
    return static_cast<acc_t>(v);
  }
  static inline raw_t narrow(acc_t v) {
    return static_cast<raw_t>(v);
  }
};

template <>
struct Round<c10::BFloat16> {
  using raw_t = uint16_t;
  static inline float widen(uint16_t v) {
    return std::bit_cast<float>(static_cast<uint32_t>(v) << 16);
  }
  static inline uint16_t narrow(float f) {
    const uint32_t u = std::bit_cast<uint32_t>(f);
    const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    return static_cast<uint16_t>(f != f ? 0x7fc0u : rounded);
  }
};

// out[i] = r(r(x1*c1) + r(-x2*s1)), out[i+h] = r(r(x2*c2) + r(x1*s2)); r rounds to the dtype,
// exactly where the unfused ops round. In float32 and float64 r is the identity. The library
// is built with -ffp-contract=off: no FMA contraction here.
template <typename scalar_t, typename raw_t = typename Round<scalar_t>::raw_t>
inline void rope_row(
    const raw_t* __restrict__ x, const raw_t* __restrict__ c, const raw_t* __restrict__ s,
    raw_t* __restrict__ o, int64_t h) {
  using R = Round<scalar_t>;
  for (int64_t i = 0; i < h; ++i) {
    const auto x1 = R::widen(x[i]);
    const auto x2 = R::widen(x[i + h]);
    const auto a = R::widen(R::narrow(x1 * R::widen(c[i])));
    const auto b = R::widen(R::narrow(-x2 * R::widen(s[i])));
    const auto p = R::widen(R::narrow(x2 * R::widen(c[i + h])));
    const auto q = R::widen(R::narrow(x1 * R::widen(s[i + h])));
    o[i] = R::narrow(a + b);
    o[i + h] = R::narrow(p + q);
  }
}

template <typename T>
void rope_impl(const RowLayout& l, int64_t d, const T* x, const T* cos, const T* sin, T* out) {
  using raw_t = typename Round<T>::raw_t;
  const auto* xp = reinterpret_cast<const raw_t*>(x);
  const auto* cp = reinterpret_cast<const raw_t*>(cos);
  const auto* sp = reinterpret_cast<const raw_t*>(sin);
  auto* op = reinterpret_cast<raw_t*>(out);
  parallel_rows<4>(l, d, [&](const std::array<int64_t, 4>& o) {
    rope_row<T>(xp + o[0], cp + o[1], sp + o[2], op + o[3], d / 2);
  });
}

// ---- RMSNorm, then RoPE ------------------------------------------------------------------------

// Qwen3's q/k norm then RoPE, per head row: the normalized row goes through a buffer on the
// stack (L1), not through a tensor the size of q written to memory and read back.
template <typename T>
void norm_rope_impl(
    const RowLayout& l, int64_t d, const T* x, const T* w, const T* cos, const T* sin, T* out,
    float eps) {
  using raw_t = typename Round<T>::raw_t;
  parallel_rows<4>(l, d, [&](const std::array<int64_t, 4>& o) {
    const T* xr = x + o[0];
    auto [acc0, acc1] = sum_squares(xr, d);
    std::array<T, kMaxNormRopeDim> normed;
    scale_row(xr, w, normed.data(), d, rstd_of(acc0, acc1, d, eps));
    rope_row<T>(
        reinterpret_cast<const raw_t*>(normed.data()), reinterpret_cast<const raw_t*>(cos + o[1]),
        reinterpret_cast<const raw_t*>(sin + o[2]), reinterpret_cast<raw_t*>(out + o[3]), d / 2);
  });
}

}  // namespace

// ---- entry points -----------------------------------------------------------------------------

#define NPUGRAPH_EX_REDUCED_OR_FLOAT(dtype, NAME, ...)                                   \
  switch (dtype) {                                                                       \
    case c10::ScalarType::Float: {                                                       \
      using scalar_t = float;                                                            \
      __VA_ARGS__;                                                                       \
      break;                                                                             \
    }                                                                                    \
    case c10::ScalarType::BFloat16: {                                                    \
      using scalar_t = c10::BFloat16;                                                    \
      __VA_ARGS__;                                                                       \
      break;                                                                             \
    }                                                                                    \
    case c10::ScalarType::Half: {                                                        \
      using scalar_t = c10::Half;                                                        \
      __VA_ARGS__;                                                                       \
      break;                                                                             \
    }                                                                                    \
    default:                                                                             \
      TORCH_CHECK(false, "npugraph_ex::" NAME ": no CPU loop for dtype ", dtype);        \
  }

void rms_norm_rows(
    c10::ScalarType dtype, const RowLayout& layout, int64_t h, const void* x, const void* weight,
    void* y, float eps) {
  NPUGRAPH_EX_REDUCED_OR_FLOAT(
      dtype, "rms_norm",
      rms_norm_impl<scalar_t>(
          layout, h, static_cast<const scalar_t*>(x), static_cast<const scalar_t*>(weight),
          static_cast<scalar_t*>(y), eps))
}

void add_rms_norm_rows(
    c10::ScalarType dtype, const RowLayout& layout, int64_t h, const void* x,
    const void* residual, const void* weight, void* y, void* s, float eps) {
  NPUGRAPH_EX_REDUCED_OR_FLOAT(
      dtype, "add_rms_norm",
      add_rms_norm_impl<scalar_t>(
          layout, h, static_cast<const scalar_t*>(x), static_cast<const scalar_t*>(residual),
          static_cast<const scalar_t*>(weight), static_cast<scalar_t*>(y),
          static_cast<scalar_t*>(s), eps))
}

void swiglu_rows(
    c10::ScalarType dtype, const RowLayout& layout, int64_t h, const void* gate, const void* up,
    void* out) {
  NPUGRAPH_EX_REDUCED_OR_FLOAT(
      dtype, "swiglu",
      swiglu_impl<scalar_t>(
          layout, h, static_cast<const scalar_t*>(gate), static_cast<const scalar_t*>(up),
          static_cast<scalar_t*>(out)))
}

void rope_rows(
    c10::ScalarType dtype, const RowLayout& layout, int64_t h, const void* x, const void* cos,
    const void* sin, void* out) {
  if (dtype == c10::ScalarType::Double) {
    rope_impl<double>(
        layout, h, static_cast<const double*>(x), static_cast<const double*>(cos),
        static_cast<const double*>(sin), static_cast<double*>(out));
    return;
  }
  NPUGRAPH_EX_REDUCED_OR_FLOAT(
      dtype, "rotary",
      rope_impl<scalar_t>(
          layout, h, static_cast<const scalar_t*>(x), static_cast<const scalar_t*>(cos),
          static_cast<const scalar_t*>(sin), static_cast<scalar_t*>(out)))
}

void norm_rope_rows(
    c10::ScalarType dtype, const RowLayout& layout, int64_t h, const void* x, const void* weight,
    const void* cos, const void* sin, void* out, float eps) {
  TORCH_CHECK(
      h <= kMaxNormRopeDim, "npugraph_ex::qk_norm_rope: head dim ", h, " > ", kMaxNormRopeDim);
  NPUGRAPH_EX_REDUCED_OR_FLOAT(
      dtype, "qk_norm_rope",
      norm_rope_impl<scalar_t>(
          layout, h, static_cast<const scalar_t*>(x), static_cast<const scalar_t*>(weight),
          static_cast<const scalar_t*>(cos), static_cast<const scalar_t*>(sin),
          static_cast<scalar_t*>(out), eps))
}

#undef NPUGRAPH_EX_REDUCED_OR_FLOAT

#define NPUGRAPH_EX_STR2(x) #x
#define NPUGRAPH_EX_STR(x) NPUGRAPH_EX_STR2(x)

const char* kernels_capability() {
  return NPUGRAPH_EX_STR(CPU_CAPABILITY);
}

}  // namespace npugraph_ex
