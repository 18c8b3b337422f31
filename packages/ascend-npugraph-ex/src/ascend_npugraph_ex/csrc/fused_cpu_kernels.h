// The row loops of the npugraph_ex CPU kernels, on raw pointers.
//
// fused_cpu_kernels.cpp defines them and is compiled with the vector ISA that ATen itself
// dispatches to on the building machine (see ops/cpu_cpp.py); fused_cpu.cpp checks the tensors,
// allocates the outputs, describes where each row lives and calls these. Keeping this interface
// free of at::Tensor keeps the ISA-specific translation unit small and fast to compile.
#pragma once

#include <c10/core/ScalarType.h>

#include <cstdint>

namespace npugraph_ex {

constexpr int kMaxRowDims = 8;
constexpr int kMaxOperands = 4;

// Where the rows of up to kMaxOperands tensors start, as element offsets from their data
// pointers. Every operand has rows of the same length, contiguous (unit stride) within a row.
// The leading dims are coalesced (usually to one, or none for a single row); a broadcast
// operand has stride 0 along the dims it is broadcast over.
struct RowLayout {
  int64_t ndim = 0;
  int64_t size[kMaxRowDims] = {};
  int64_t stride[kMaxOperands][kMaxRowDims] = {};

  int64_t rows() const {
    int64_t n = 1;
    for (int64_t d = 0; d < ndim; ++d) {
      n *= size[d];
    }
    return n;
  }
};

// Operands in the order of each signature. `dtype` is kFloat, kBFloat16 or kHalf; every tensor
// operand has that dtype; `weight` is contiguous with `h` elements. Outputs never alias inputs.

// y = weight * (x * rsqrt(mean(x^2) + eps)), rounded where ops/reference.py rounds.
// Operands: x, y.
void rms_norm_rows(
    c10::ScalarType dtype, const RowLayout& layout, int64_t h, const void* x, const void* weight,
    void* y, float eps);

// s = x + residual; y = rms_norm(s). Operands: x, residual, y, s.
void add_rms_norm_rows(
    c10::ScalarType dtype, const RowLayout& layout, int64_t h, const void* x,
    const void* residual, const void* weight, void* y, void* s, float eps);

// out = silu(gate) * up. Operands: gate, up, out.
void swiglu_rows(
    c10::ScalarType dtype, const RowLayout& layout, int64_t h, const void* gate, const void* up,
    void* out);

// out = x * cos + rotate_half(x) * sin, bitwise the unfused ops. `dtype` may also be kDouble.
// Operands: x, cos, sin, out.
void rope_rows(
    c10::ScalarType dtype, const RowLayout& layout, int64_t h, const void* x, const void* cos,
    const void* sin, void* out);

// Per-head RMSNorm, then RoPE, in one pass per row: rope(rms_norm(x)), bitwise the two loops
// above in turn. h <= kMaxNormRopeDim. Operands: x, cos, sin, out.
constexpr int64_t kMaxNormRopeDim = 1024;
void norm_rope_rows(
    c10::ScalarType dtype, const RowLayout& layout, int64_t h, const void* x, const void* weight,
    const void* cos, const void* sin, void* out, float eps);

// The vector ISA the loops were compiled for ("AVX512", "AVX2" or "DEFAULT").
const char* kernels_capability();

}  // namespace npugraph_ex
