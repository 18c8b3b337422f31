// C++ CPU kernels of the npugraph_ex fused ops, built on first use by ops/cpu_cpp.py.
//
// rotary and qk_norm_rope are real loops: one pass per head row, cos/sin broadcast by strides,
// the output written once. Every product and sum is rounded to the input dtype where the
// unfused HF code rounds it (x*cos, rotate_half(x)*sin, their sum), so the result is bitwise
// equal to ops/reference.py. Built with -ffp-contract=off: no FMA contraction.
//
// rms_norm, add_rms_norm and swiglu call the same ATen ops as the Python composites in
// ops/cpu.py (aten::_fused_rms_norm, silu + mul_), so results are bitwise those of the
// composites; being C++ removes the Python dispatch layers around them.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/TensorOperators.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/add.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/rsqrt.h>
#include <ATen/ops/silu.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <bit>
#include <cstdint>
#include <exception>
#include <tuple>
#include <type_traits>

#if __has_include(<ATen/ops/_fused_rms_norm.h>)
#include <ATen/ops/_fused_rms_norm.h>
#define NPUGRAPH_EX_HAS_FUSED_RMS 1
#endif

namespace {

using at::Tensor;

// weight * (x.float() * rsqrt(x.float().pow(2).mean(-1) + eps)).to(x.dtype): reference.py.
Tensor rms_norm_ref(const Tensor& x, const Tensor& weight, double eps) {
  Tensor xf = x.to(at::kFloat);
  Tensor variance = xf.pow(2).mean(-1, /*keepdim=*/true);
  return weight * (xf * at::rsqrt(variance + eps)).to(x.scalar_type());
}

// Same steps as cpu.rms_norm.
Tensor rms_norm(const Tensor& x, const Tensor& weight, double eps) {
#ifdef NPUGRAPH_EX_HAS_FUSED_RMS
  if (x.is_contiguous()) {
    const std::array<int64_t, 1> hidden{x.size(-1)};
    if (x.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat) {
      return std::get<0>(at::_fused_rms_norm(x, hidden, weight, eps));
    }
    Tensor normed = std::get<0>(at::_fused_rms_norm(x.to(at::kFloat), hidden, std::nullopt, eps))
                        .to(x.scalar_type());
    if (at::promote_types(normed.scalar_type(), weight.scalar_type()) == normed.scalar_type()) {
      return normed.mul_(weight);
    }
    return weight * normed;
  }
#endif
  return rms_norm_ref(x, weight, eps);
}

std::tuple<Tensor, Tensor> add_rms_norm(
    const Tensor& x, const Tensor& residual, const Tensor& weight, double eps) {
  Tensor s = at::add(x, residual);
  return {rms_norm(s, weight, eps), s};
}

// Whether broadcasting up against gate gives gate's shape.
bool same_broadcast(const Tensor& gate, const Tensor& up) {
  if (up.dim() > gate.dim()) {
    return false;
  }
  const int64_t off = gate.dim() - up.dim();
  for (int64_t d = 0; d < up.dim(); ++d) {
    if (up.size(d) != 1 && up.size(d) != gate.size(d + off)) {
      return false;
    }
  }
  return true;
}

Tensor swiglu(const Tensor& gate, const Tensor& up) {
  const auto dtype = at::promote_types(gate.scalar_type(), up.scalar_type());
  if (dtype != gate.scalar_type() || !same_broadcast(gate, up)) {
    return at::silu(gate) * up;
  }
  return at::silu(gate).mul_(up);
}

// ---- RoPE -------------------------------------------------------------------------------------

// The composite of cpu._rope_one, for the layouts the loop does not cover.
Tensor rope_composite(const Tensor& x, const Tensor& cos, const Tensor& sin) {
  const int64_t half = x.size(-1) / 2;
  Tensor rotated = at::cat({-x.slice(-1, half), x.slice(-1, 0, half)}, -1);
  Tensor out = x * cos;
  if (out.scalar_type() != at::promote_types(out.scalar_type(), sin.scalar_type())) {
    return out + rotated * sin;
  }
  return out.addcmul_(rotated, sin);
}

// Whether the loop covers x with this cos/sin: same floating dtype, an even last dim with unit
// stride, and cos/sin broadcastable to x's shape (x is not broadcast).
bool rope_loop_ok(const Tensor& x, const Tensor& cos, const Tensor& sin) {
  const auto dt = x.scalar_type();
  if (!(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf || dt == at::kDouble)) {
    return false;
  }
  if (cos.scalar_type() != dt || sin.scalar_type() != dt || x.dim() < 1 || x.size(-1) % 2 != 0) {
    return false;
  }
  if (x.stride(-1) != 1 || cos.dim() > x.dim() || sin.dim() > x.dim()) {
    return false;
  }
  for (const Tensor* t : {&cos, &sin}) {
    const int64_t off = x.dim() - t->dim();
    for (int64_t d = 0; d < t->dim(); ++d) {
      if (t->size(d) != 1 && t->size(d) != x.size(d + off)) {
        return false;
      }
    }
    if (t->size(-1) != x.size(-1) || (t->stride(-1) != 1 && t->size(-1) > 1)) {
      return false;
    }
  }
  return true;
}

constexpr int kMaxDims = 8;

// Element offsets of row `row` (a multi-index over x's leading dims) in x, cos, sin, out.
struct RowIndexer {
  int64_t ndim = 0;  // leading dims
  std::array<int64_t, kMaxDims> size{};
  std::array<std::array<int64_t, kMaxDims>, 4> stride{};

  RowIndexer(const Tensor& x, const Tensor& cos, const Tensor& sin, const Tensor& out) {
    ndim = x.dim() - 1;
    const std::array<const Tensor*, 4> ts{&x, &cos, &sin, &out};
    for (int64_t d = 0; d < ndim; ++d) {
      size[d] = x.size(d);
      for (size_t t = 0; t < ts.size(); ++t) {
        const int64_t off = x.dim() - ts[t]->dim();
        const int64_t td = d - off;
        // Broadcast dims (missing or of size 1) do not move the pointer.
        stride[t][d] = (td < 0 || ts[t]->size(td) == 1) ? 0 : ts[t]->stride(td);
      }
    }
  }

  void offsets(int64_t row, std::array<int64_t, 4>& o) const {
    o = {0, 0, 0, 0};
    for (int64_t d = ndim - 1; d >= 0; --d) {
      const int64_t i = row % size[d];
      row /= size[d];
      for (size_t t = 0; t < 4; ++t) {
        o[t] += i * stride[t][d];
      }
    }
  }
};

// Storage type, widening and rounding per dtype, written so that GCC vectorizes the row loop:
// bfloat16 is handled as its uint16_t bit pattern with c10's round-to-nearest-even, branch-free
// (NaN stays NaN). Half keeps c10's scalar conversions (correct, not vectorized).
template <typename scalar_t>
struct Round {
  using raw_t = scalar_t;
  using acc_t = at::opmath_type<scalar_t>;
  static inline acc_t widen(raw_t v) { return static_cast<acc_t>(v); }
  static inline raw_t narrow(acc_t v) { return static_cast<raw_t>(v); }
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
// exactly where the unfused ops round. In float32 and float64 r is the identity.
template <typename scalar_t, typename raw_t = typename Round<scalar_t>::raw_t>
__attribute__((always_inline)) inline void rope_row(
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

// One clone of the row loop per ISA level (AVX2 where the CPU has it, picked once at load time
// through an ifunc); -ffp-contract=off keeps FMA out of both, so they round identically.
#define NPUGRAPH_EX_ROPE_ROWS(NAME, T)                                                      \
  __attribute__((target_clones("avx2", "default"))) void NAME(                             \
      const Round<T>::raw_t* x, const Round<T>::raw_t* c, const Round<T>::raw_t* s,        \
      Round<T>::raw_t* o, int64_t h, const int64_t* offsets, int64_t n) {                  \
    for (int64_t r = 0; r < n; ++r) {                                                      \
      rope_row<T>(                                                                         \
          x + offsets[4 * r], c + offsets[4 * r + 1], s + offsets[4 * r + 2],              \
          o + offsets[4 * r + 3], h);                                                      \
    }                                                                                      \
  }
NPUGRAPH_EX_ROPE_ROWS(rope_rows_f32, float)
NPUGRAPH_EX_ROPE_ROWS(rope_rows_f64, double)
NPUGRAPH_EX_ROPE_ROWS(rope_rows_bf16, c10::BFloat16)
NPUGRAPH_EX_ROPE_ROWS(rope_rows_f16, c10::Half)
#undef NPUGRAPH_EX_ROPE_ROWS

template <typename T>
void rope_rows(
    const typename Round<T>::raw_t* x, const typename Round<T>::raw_t* c,
    const typename Round<T>::raw_t* s, typename Round<T>::raw_t* o, int64_t h,
    const int64_t* offsets, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    rope_rows_f32(x, c, s, o, h, offsets, n);
  } else if constexpr (std::is_same_v<T, double>) {
    rope_rows_f64(x, c, s, o, h, offsets, n);
  } else if constexpr (std::is_same_v<T, c10::BFloat16>) {
    rope_rows_bf16(x, c, s, o, h, offsets, n);
  } else {
    rope_rows_f16(x, c, s, o, h, offsets, n);
  }
}

// RoPE of x into out (a distinct tensor of x's shape and dtype).
void rope_loop(const Tensor& x, const Tensor& cos, const Tensor& sin, const Tensor& out) {
  const int64_t d = x.size(-1);
  const int64_t h = d / 2;
  const int64_t rows = d == 0 ? 0 : x.numel() / d;
  const RowIndexer idx(x, cos, sin, out);
  // ~16K elements per task: decode sizes stay on the calling thread.
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(d, 1));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "npugraph_ex_rope", [&] {
    using raw_t = typename Round<scalar_t>::raw_t;
    const auto* xp = reinterpret_cast<const raw_t*>(x.const_data_ptr<scalar_t>());
    const auto* cp = reinterpret_cast<const raw_t*>(cos.const_data_ptr<scalar_t>());
    const auto* sp = reinterpret_cast<const raw_t*>(sin.const_data_ptr<scalar_t>());
    auto* op = reinterpret_cast<raw_t*>(out.mutable_data_ptr<scalar_t>());
    at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
      // Row offsets in blocks of 64, then one call into the vectorized loop per block.
      constexpr int64_t kBlock = 64;
      std::array<int64_t, 4 * kBlock> offsets{};
      std::array<int64_t, 4> o{};
      for (int64_t r0 = begin; r0 < end; r0 += kBlock) {
        const int64_t n = std::min(kBlock, end - r0);
        for (int64_t r = 0; r < n; ++r) {
          idx.offsets(r0 + r, o);
          std::copy(o.begin(), o.end(), offsets.begin() + 4 * r);
        }
        rope_rows<scalar_t>(xp, cp, sp, op, h, offsets.data(), n);
      }
    });
  });
}

Tensor rope_one(const Tensor& x, const Tensor& cos, const Tensor& sin) {
  if (x.dim() - 1 > kMaxDims || !rope_loop_ok(x, cos, sin)) {
    return rope_composite(x, cos, sin);
  }
  Tensor out = at::empty_like(x);  // keeps x's (possibly permuted) layout, as the fake does
  rope_loop(x, cos, sin, out);
  return out;
}

std::tuple<Tensor, Tensor> rotary(
    const Tensor& q, const Tensor& k, const Tensor& cos, const Tensor& sin) {
  return {rope_one(q, cos, sin), rope_one(k, cos, sin)};
}

std::tuple<Tensor, Tensor> qk_norm_rope(
    const Tensor& q, const Tensor& k, const Tensor& q_weight, const Tensor& k_weight, double eps,
    const Tensor& cos, const Tensor& sin) {
  return {
      rope_one(rms_norm(q, q_weight, eps), cos, sin),
      rope_one(rms_norm(k, k_weight, eps), cos, sin)};
}

}  // namespace

namespace {

// Drops warnings while our kernels replace the Python first-call kernels of ops/library.py:
// that override is intended, and the dispatcher would otherwise print "Overriding a previously
// registered kernel" (once per process, so later overrides by other code go unreported too).
class SilentHandler : public c10::WarningHandler {
 public:
  void process(const c10::Warning& /*warning*/) override {}
};

}  // namespace

// Registers the CPU kernels of npugraph_ex::* (defined by ops/library.py, which must be imported
// first). Called once by ops/cpu_cpp.py through ctypes; returns 0, or 1 if registration threw.
extern "C" __attribute__((visibility("default"))) int npugraph_ex_register_cpu_kernels() {
  try {
    static SilentHandler silent;
    const c10::WarningUtils::WarningHandlerGuard guard(&silent);
    static torch::Library lib(
        torch::Library::IMPL, "npugraph_ex", c10::DispatchKey::CPU, __FILE__, __LINE__);
    static const bool done = [] {
      lib.impl("rms_norm", &rms_norm);
      lib.impl("add_rms_norm", &add_rms_norm);
      lib.impl("swiglu", &swiglu);
      lib.impl("rotary", &rotary);
      lib.impl("qk_norm_rope", &qk_norm_rope);
      return true;
    }();
    return done ? 0 : 1;
  } catch (const std::exception&) {
    return 1;
  }
}
