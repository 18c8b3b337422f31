// C++ CPU kernels of the npugraph_ex fused ops, built on first use by ops/cpu_cpp.py.
//
// This file checks the operands, allocates the outputs (with the layouts the fake
// implementations promise) and registers the kernels; the row loops live in
// fused_cpu_kernels.cpp, compiled for ATen's vector ISA on this machine.
//
// rms_norm, add_rms_norm and swiglu are single-pass loops. The aten composites they replace
// make 3-6 passes over memory and allocate as many temporaries (aten::_fused_rms_norm is a
// CompositeImplicitAutograd of pow, mean, add, rsqrt and two muls on CPU): measured on one
// thread, they ran at 2-4x the time of a plain copy of their data. The loops round where the
// unfused code rounds; in float32 the norms differ from it only in the order of the sum of
// squares (a few ulp; tests/test_ops.py states the tolerance), and swiglu is bitwise silu * up.
//
// rotary and qk_norm_rope run the RoPE loop: one pass per head row, cos/sin broadcast by
// strides, every product and sum rounded to the input dtype where the unfused HF code rounds
// it, so the result is bitwise equal to ops/reference.py. The library is built with
// -ffp-contract=off: no FMA contraction. qk_norm_rope normalizes each head row into a stack
// buffer and ropes it from there (bitwise rms_norm, then rotary; 1.3-1.7x faster in float32 at
// a 512-token prefill than writing the normalized q/k to memory and reading them back).
//
// Operand combinations the loops do not cover (mixed dtypes, float64 norms, broadcast outputs,
// more than kMaxRowDims non-mergeable leading dims) run the unfused aten ops instead.
#include "fused_cpu_kernels.h"

#include <ATen/TensorOperators.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/add.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/rsqrt.h>
#include <ATen/ops/silu.h>
#include <c10/util/Exception.h>
#include <c10/util/SmallVector.h>
#include <torch/library.h>

#include <algorithm>
#include <exception>
#include <initializer_list>
#include <optional>
#include <tuple>

namespace {

using at::Tensor;
using npugraph_ex::kMaxOperands;
using npugraph_ex::kMaxRowDims;
using npugraph_ex::RowLayout;

// ---- operands ---------------------------------------------------------------------------------

bool loop_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf;
}

// Where the rows (last dim) of `operands` start, each operand broadcasting to the shape of the
// first: nullopt unless every operand has the full last dim with unit stride. As TensorIterator
// does, leading dims of size 1 are dropped, the others are ordered by the strides of the last
// operand (an output: rows are visited in its memory order, which keeps a permuted layout such
// as HF's [B, H, S, D] q from striding across pages), and adjacent dims that are one for every
// operand are merged, so that a contiguous tensor, or a slice of rows, is one dim.
std::optional<RowLayout> row_layout(std::initializer_list<const Tensor*> operands) {
  TORCH_INTERNAL_ASSERT(operands.size() <= static_cast<size_t>(kMaxOperands));
  const Tensor& main = **operands.begin();
  const Tensor& last = **(operands.end() - 1);
  const int64_t ndim = main.dim();
  if (ndim < 1) {
    return std::nullopt;
  }
  const int64_t h = main.size(-1);
  for (const Tensor* t : operands) {
    if (t->dim() < 1 || t->dim() > ndim || t->size(-1) != h || (t->stride(-1) != 1 && h > 1)) {
      return std::nullopt;
    }
  }
  auto stride_of = [ndim](const Tensor& t, int64_t d) -> int64_t {
    const int64_t td = d - (ndim - t.dim());
    return (td < 0 || t.size(td) == 1) ? 0 : t.stride(td);  // 0: broadcast
  };
  c10::SmallVector<int64_t, 8> dims;
  for (int64_t d = 0; d < ndim - 1; ++d) {
    for (const Tensor* t : operands) {
      const int64_t td = d - (ndim - t->dim());
      if (td >= 0 && t->size(td) != 1 && t->size(td) != main.size(d)) {
        return std::nullopt;  // main would broadcast: the output is larger than main
      }
    }
    if (main.size(d) != 1) {
      dims.push_back(d);
    }
  }
  std::stable_sort(dims.begin(), dims.end(), [&](int64_t a, int64_t b) {
    return stride_of(last, a) > stride_of(last, b);
  });
  RowLayout l;
  for (const int64_t d : dims) {
    const int64_t size = main.size(d);
    bool merges = l.ndim > 0;
    int k = 0;
    for (const Tensor* t : operands) {
      merges = merges && l.stride[k][l.ndim - 1] == stride_of(*t, d) * size;
      ++k;
    }
    if (merges) {  // the previous dim steps over whole runs of this one: one dim
      l.size[l.ndim - 1] *= size;
    } else if (l.ndim == kMaxRowDims) {
      return std::nullopt;
    } else {
      l.size[l.ndim++] = size;
    }
    k = 0;
    for (const Tensor* t : operands) {
      l.stride[k++][l.ndim - 1] = stride_of(*t, d);
    }
  }
  return l;
}

bool is_row_weight(const Tensor& weight, const Tensor& x) {
  return weight.dim() == 1 && weight.size(0) == x.size(-1) &&
      weight.scalar_type() == x.scalar_type();
}

// ---- RMSNorm ----------------------------------------------------------------------------------

// weight * (x.float() * rsqrt(x.float().pow(2).mean(-1) + eps)).to(x.dtype): reference.py.
Tensor rms_norm_composite(const Tensor& x, const Tensor& weight, double eps) {
  Tensor xf = x.to(at::kFloat);
  Tensor variance = xf.pow(2).mean(-1, /*keepdim=*/true);
  return weight * (xf * at::rsqrt(variance + eps)).to(x.scalar_type());
}

Tensor rms_norm(const Tensor& x, const Tensor& weight, double eps) {
  if (x.dim() < 1 || !loop_dtype(x.scalar_type()) || !is_row_weight(weight, x)) {
    return rms_norm_composite(x, weight, eps);
  }
  Tensor y = at::empty_like(x);  // keeps x's (possibly permuted) layout, as the fake does
  const auto layout = row_layout({&x, &y});
  if (!layout) {
    return rms_norm_composite(x, weight, eps);
  }
  if (y.numel() > 0) {
    const Tensor w = weight.contiguous();
    npugraph_ex::rms_norm_rows(
        x.scalar_type(), *layout, x.size(-1), x.const_data_ptr(), w.const_data_ptr(),
        y.mutable_data_ptr(), static_cast<float>(eps));
  }
  return y;
}

std::tuple<Tensor, Tensor> add_rms_norm(
    const Tensor& x, const Tensor& residual, const Tensor& weight, double eps) {
  if (x.dim() >= 1 && loop_dtype(x.scalar_type()) && is_row_weight(weight, x) &&
      residual.scalar_type() == x.scalar_type() && residual.sizes() == x.sizes()) {
    Tensor y = at::empty_like(x);
    Tensor s = at::empty_like(x);
    if (const auto layout = row_layout({&x, &residual, &y, &s})) {
      if (y.numel() > 0) {
        const Tensor w = weight.contiguous();
        npugraph_ex::add_rms_norm_rows(
            x.scalar_type(), *layout, x.size(-1), x.const_data_ptr(), residual.const_data_ptr(),
            w.const_data_ptr(), y.mutable_data_ptr(), s.mutable_data_ptr(),
            static_cast<float>(eps));
      }
      return {y, s};
    }
  }
  Tensor s = at::add(x, residual);
  return {rms_norm(s, weight, eps), s};
}

// ---- SwiGLU -----------------------------------------------------------------------------------

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
  if (gate.dim() >= 1 && loop_dtype(gate.scalar_type()) &&
      up.scalar_type() == gate.scalar_type() && same_broadcast(gate, up)) {
    Tensor out = at::empty_like(gate);
    if (const auto layout = row_layout({&gate, &up, &out})) {
      if (out.numel() > 0) {
        npugraph_ex::swiglu_rows(
            gate.scalar_type(), *layout, gate.size(-1), gate.const_data_ptr(), up.const_data_ptr(),
            out.mutable_data_ptr());
      }
      return out;
    }
  }
  return at::silu(gate) * up;
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

Tensor rope_one(const Tensor& x, const Tensor& cos, const Tensor& sin) {
  const auto dt = x.scalar_type();
  const bool dtypes_ok = (loop_dtype(dt) || dt == at::kDouble) && cos.scalar_type() == dt &&
      sin.scalar_type() == dt;
  if (!dtypes_ok || x.dim() < 1 || x.size(-1) % 2 != 0) {
    return rope_composite(x, cos, sin);
  }
  Tensor out = at::empty_like(x);  // keeps x's (possibly permuted) layout, as the fake does
  // x comes first: cos/sin broadcast to x, never x to them (the output would be larger).
  const auto layout = row_layout({&x, &cos, &sin, &out});
  if (!layout) {
    return rope_composite(x, cos, sin);
  }
  if (out.numel() > 0) {
    npugraph_ex::rope_rows(
        dt, *layout, x.size(-1), x.const_data_ptr(), cos.const_data_ptr(), sin.const_data_ptr(),
        out.mutable_data_ptr());
  }
  return out;
}

std::tuple<Tensor, Tensor> rotary(
    const Tensor& q, const Tensor& k, const Tensor& cos, const Tensor& sin) {
  return {rope_one(q, cos, sin), rope_one(k, cos, sin)};
}

// rope_one(rms_norm(x, weight, eps), cos, sin), in one pass where both loops apply.
Tensor norm_rope_one(
    const Tensor& x, const Tensor& weight, double eps, const Tensor& cos, const Tensor& sin) {
  const auto dt = x.scalar_type();
  if (x.dim() >= 1 && loop_dtype(dt) && is_row_weight(weight, x) && cos.scalar_type() == dt &&
      sin.scalar_type() == dt && x.size(-1) % 2 == 0 &&
      x.size(-1) <= npugraph_ex::kMaxNormRopeDim) {
    Tensor out = at::empty_like(x);
    if (const auto layout = row_layout({&x, &cos, &sin, &out})) {
      if (out.numel() > 0) {
        const Tensor w = weight.contiguous();
        npugraph_ex::norm_rope_rows(
            dt, *layout, x.size(-1), x.const_data_ptr(), w.const_data_ptr(),
            cos.const_data_ptr(), sin.const_data_ptr(), out.mutable_data_ptr(),
            static_cast<float>(eps));
      }
      return out;
    }
  }
  return rope_one(rms_norm(x, weight, eps), cos, sin);
}

std::tuple<Tensor, Tensor> qk_norm_rope(
    const Tensor& q, const Tensor& k, const Tensor& q_weight, const Tensor& k_weight, double eps,
    const Tensor& cos, const Tensor& sin) {
  return {norm_rope_one(q, q_weight, eps, cos, sin), norm_rope_one(k, k_weight, eps, cos, sin)};
}

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

// The vector ISA the row loops were compiled for (ops/cpu_cpp.py reports it).
extern "C" __attribute__((visibility("default"))) const char* npugraph_ex_cpu_capability() {
  return npugraph_ex::kernels_capability();
}
