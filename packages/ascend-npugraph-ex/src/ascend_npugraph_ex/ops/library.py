"""The fused custom ops: schemas, fake (meta) implementations and per-device registration.

All ops live in the ``npugraph_ex`` namespace and are functional (no aliasing, no mutation), so
FX passes can insert them freely and capture runtimes can treat them like any aten op. Each has a
fake implementation for tracing and one kernel per dispatch key: ``CPU`` (C++ from
csrc/fused_cpu.cpp via cpu_cpp.py, else the composites of cpu.py), ``CUDA`` (cuda.py, Triton) and
``PrivateUse1`` (npu.py, torch_npu). Device libraries are imported lazily inside the kernels,
never here.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, Literal

import torch

from ascend_npugraph_ex.ops import cpu, cpu_cpp, cuda, npu

__all__ = ["NAMESPACE", "OPS", "cpu_kernels", "fused_op"]

NAMESPACE = "npugraph_ex"

# Schemas. Every op returns fresh tensors; the NPU kernels that work in place clone first.
_SCHEMAS: dict[str, str] = {
    "rms_norm": "rms_norm(Tensor x, Tensor weight, float eps) -> Tensor",
    "add_rms_norm": (
        "add_rms_norm(Tensor x, Tensor residual, Tensor weight, float eps) -> (Tensor, Tensor)"
    ),
    "swiglu": "swiglu(Tensor gate, Tensor up) -> Tensor",
    "rotary": "rotary(Tensor q, Tensor k, Tensor cos, Tensor sin) -> (Tensor, Tensor)",
    "qk_norm_rope": (
        "qk_norm_rope(Tensor q, Tensor k, Tensor q_weight, Tensor k_weight, float eps, "
        "Tensor cos, Tensor sin) -> (Tensor, Tensor)"
    ),
}

OPS: tuple[str, ...] = tuple(_SCHEMAS)

# Kept alive for the whole process: the Library object owns the registrations.
_LIB = torch.library.Library(NAMESPACE, "DEF")  # type: ignore[no-untyped-call]
for _schema in _SCHEMAS.values():
    _LIB.define(_schema)  # type: ignore[no-untyped-call]


def _check_norm_weight(x: torch.Tensor, weight: torch.Tensor, op: str) -> None:
    # The passes only fuse a weight of shape [hidden]; anything else is a caller bug.
    torch._check(  # type: ignore[no-untyped-call]
        weight.dim() == 1 and weight.shape[0] == x.shape[-1],
        lambda: (
            f"npugraph_ex.{op}: weight must have shape [{x.shape[-1]}], got {list(weight.shape)}"
        ),
    )


def _empty(shape: torch.Size | list[Any], dtype: torch.dtype, like: torch.Tensor) -> torch.Tensor:
    # Outputs keep the layout of the main input, as the elementwise aten ops they replace do
    # (TensorIterator preserves a dense permuted layout): later views rely on those strides.
    if tuple(shape) == tuple(like.shape):
        return torch.empty_like(like, dtype=dtype)
    return torch.empty(shape, dtype=dtype, device=like.device)


def _fake_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    _check_norm_weight(x, weight, "rms_norm")
    return _empty(x.shape, torch.promote_types(x.dtype, weight.dtype), x)


def _fake_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    _check_norm_weight(x, weight, "add_rms_norm")
    torch._check(  # type: ignore[no-untyped-call]
        x.shape == residual.shape, lambda: "add_rms_norm: x and residual differ in shape"
    )
    s_dtype = torch.promote_types(x.dtype, residual.dtype)
    return _empty(x.shape, torch.promote_types(s_dtype, weight.dtype), x), _empty(
        x.shape, s_dtype, x
    )


def _fake_swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    shape = torch.broadcast_shapes(gate.shape, up.shape)  # type: ignore[no-untyped-call]
    return _empty(shape, torch.promote_types(gate.dtype, up.dtype), gate)


def _rope_out(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    shape = torch.broadcast_shapes(x.shape, cos.shape, sin.shape)  # type: ignore[no-untyped-call]
    dtype = torch.promote_types(torch.promote_types(x.dtype, cos.dtype), sin.dtype)
    return _empty(shape, dtype, x)


def _fake_rotary(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    return _rope_out(q, cos, sin), _rope_out(k, cos, sin)


def _fake_qk_norm_rope(
    q: torch.Tensor,
    k: torch.Tensor,
    q_weight: torch.Tensor,
    k_weight: torch.Tensor,
    eps: float,
    cos: torch.Tensor,
    sin: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    qn = _fake_rms_norm(q, q_weight, eps)
    kn = _fake_rms_norm(k, k_weight, eps)
    return _rope_out(qn, cos, sin), _rope_out(kn, cos, sin)


_FAKES: dict[str, Callable[..., Any]] = {
    "rms_norm": _fake_rms_norm,
    "add_rms_norm": _fake_add_rms_norm,
    "swiglu": _fake_swiglu,
    "rotary": _fake_rotary,
    "qk_norm_rope": _fake_qk_norm_rope,
}

# CPU: the first call of any fused op on CPU picks the kernels for the process. The C++ kernels
# (built on first use, then cached) register themselves over the first-call kernels below, so
# later calls go straight from the dispatcher into C++; without them, the first-call kernels stay
# and run the Python composites of cpu.py.
_cpu_choice: Literal["cpp", "python"] | None = None
_cpu_lock = threading.Lock()


def cpu_kernels() -> Literal["cpp", "python"]:
    """Which CPU kernels the fused ops use, deciding (and building) on the first call."""
    global _cpu_choice
    with _cpu_lock:
        if _cpu_choice is None:
            _cpu_choice = "cpp" if cpu_cpp.load() else "python"
        return _cpu_choice


def _cpu_first_call(name: str) -> Callable[..., Any]:
    composite = cpu.KERNELS[name]

    def kernel(*args: Any) -> Any:
        if cpu_kernels() == "cpp":
            return fused_op(name)(*args)  # now dispatches to the C++ kernel
        return composite(*args)

    kernel.__name__ = kernel.__qualname__ = f"{name}_cpu"
    return kernel


for _name in OPS:
    torch.library.register_fake(f"{NAMESPACE}::{_name}", _FAKES[_name], lib=_LIB)
    _LIB.impl(_name, _cpu_first_call(_name), "CPU")  # type: ignore[no-untyped-call]
    _LIB.impl(_name, cuda.KERNELS[_name], "CUDA")  # type: ignore[no-untyped-call]
    _LIB.impl(_name, npu.KERNELS[_name], "PrivateUse1")  # type: ignore[no-untyped-call]


def fused_op(name: str) -> torch._ops.OpOverload:
    """The ``OpOverload`` of fused op ``name`` (one of :data:`OPS`)."""
    if name not in _SCHEMAS:
        raise KeyError(f"unknown fused op {name!r}; known: {', '.join(OPS)}")
    packet: torch._ops.OpOverloadPacket = getattr(getattr(torch.ops, NAMESPACE), name)
    return packet.default
