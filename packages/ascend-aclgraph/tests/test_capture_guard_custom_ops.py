"""The device backends' capture guard looks inside custom ops with a Python body, as the cpu
twin's recorder does: a kernel such a body launches is captured into the device graph, so a
host sync in the body breaks the capture (or bakes one step's value) exactly like one in the
model. C++ kernels stay single ops, checked as themselves.

``CaptureGuardMode`` is a ``TorchDispatchMode``, so it is entered directly on CPU tensors here;
the cuda and npu backends run it around their capture.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from ascend_aclgraph.capture_guard import CaptureGuardMode
from ascend_aclgraph.errors import CaptureError


def _read_scale(x: torch.Tensor) -> torch.Tensor:
    return x * x.abs().max().item()  # a host sync inside the body


torch.library.custom_op("aclgraph_guard_test::read_scale", mutates_args=())(_read_scale)


@torch.library.custom_op("aclgraph_guard_test::doubled", mutates_args=())
def doubled(x: torch.Tensor) -> torch.Tensor:
    return x * 2


@torch.library.custom_op("aclgraph_guard_test::read_scale_nested", mutates_args=("out",))
def read_scale_nested(x: torch.Tensor, out: torch.Tensor) -> None:
    out.copy_(doubled(torch.ops.aclgraph_guard_test.read_scale(x)))


_LIB = torch.library.Library("aclgraph_guard_test", "FRAGMENT")  # type: ignore[no-untyped-call]
_LIB.define("python_then_cpp(Tensor x) -> Tensor")  # type: ignore[no-untyped-call]
# A Python CPU kernel, then a C++ one over it (as ascend_npugraph_ex registers its C++ kernels):
# the C++ kernel is what runs, a single kernel with nothing inside for the guard to check.
_LIB.impl("python_then_cpp", _read_scale, "CPU")  # type: ignore[no-untyped-call]
_LIB.m.impl_t_t("python_then_cpp", "CPU")  # a precanned C++ kernel (identity)


class _SeenGuard(CaptureGuardMode):
    """The guard, noting every op it is asked to check."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[torch._ops.OpOverload] = []

    def __torch_dispatch__(
        self,
        func: torch._ops.OpOverload,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        self.seen.append(func)
        return super().__torch_dispatch__(func, types, args, kwargs)


def test_a_host_sync_inside_a_python_custom_op_is_refused_at_its_line() -> None:
    line = _read_scale.__code__.co_firstlineno + 1
    with (
        pytest.raises(
            CaptureError,
            match=rf"aten\.item.* at \S*test_capture_guard_custom_ops\.py:{line} "
            r".*host sync",
        ),
        CaptureGuardMode(),
    ):
        torch.ops.aclgraph_guard_test.read_scale(torch.randn(4))


def test_a_host_sync_two_python_bodies_down_is_refused() -> None:
    line = _read_scale.__code__.co_firstlineno + 1
    with (
        pytest.raises(CaptureError, match=rf"test_capture_guard_custom_ops\.py:{line} "),
        CaptureGuardMode(),
    ):
        read_scale_nested(torch.randn(4), torch.empty(4))


def test_the_ops_of_a_python_body_are_checked_and_run() -> None:
    x = torch.randn(4)
    guard = _SeenGuard()
    with guard:
        y = doubled(x)
    assert guard.seen == [torch.ops.aclgraph_guard_test.doubled.default, torch.ops.aten.mul.Tensor]
    assert torch.equal(y, x * 2)


def test_cpp_kernels_are_checked_as_one_op() -> None:
    x = torch.randn(4)
    guard = _SeenGuard()
    with guard:
        y = torch.ops.aclgraph_guard_test.python_then_cpp(x)  # its C++ kernel: no host sync
        z = torch.add(x, 1)
    assert guard.seen == [
        torch.ops.aclgraph_guard_test.python_then_cpp.default,
        torch.ops.aten.add.Tensor,
    ]
    assert torch.equal(y, x)
    assert torch.equal(z, x + 1)
    with pytest.raises(CaptureError, match=r"aten\.nonzero.*data"), CaptureGuardMode():
        torch.nonzero(x > 0)
