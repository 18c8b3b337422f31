"""Refuse operations that cannot live inside a device graph, naming the user's file:line.

A device graph records device work only. Anything that needs the host to see tensor *data*
during capture (``.item()``, ``if tensor:``, ``.tolist()``, ``nonzero``, boolean-mask indexing)
either breaks the capture on a device or, worse, bakes one step's data into every replay. The
checks here run on every backend, so the CPU twin fails exactly where an NPU would.
"""

from __future__ import annotations

import contextlib
import os
import threading
import traceback
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ascend_aclgraph.errors import CaptureError

__all__ = [
    "CaptureGuardMode",
    "capture_refusal",
    "check_capturable",
    "host_sync_methods_refused",
    "user_frame",
]

_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep
_OWN_DIR = os.path.dirname(__file__) + os.sep
_STDLIB_SKIP = (os.sep + "contextlib.py", os.sep + "threading.py", os.sep + "functools.py")

# Ops whose output shape depends on tensor data, but whose common uses are fine: they are only
# refused when a boolean (mask) index is involved, which is what makes them data dependent.
_MASK_INDEXED_OPS = {
    "aten::index",
    "aten::index_put",
    "aten::index_put_",
    "aten::_index_put_impl_",
}
_BOOL_DTYPES = (torch.bool, torch.uint8)


def user_frame(extra_skip: Sequence[str] = ()) -> str:
    """``file:line (function)`` of the innermost frame outside torch and this runtime."""
    skip = (_TORCH_DIR, _OWN_DIR, *extra_skip)
    for frame in reversed(traceback.extract_stack()):
        name = frame.filename
        if name.startswith(skip) or name.endswith(_STDLIB_SKIP) or name.startswith("<"):
            continue
        return f"{name}:{frame.lineno} (in {frame.name})"
    return "<unknown location>"


def _has_mask_index(args: Sequence[Any], kwargs: dict[str, Any]) -> bool:
    indices = kwargs.get("indices", args[1] if len(args) > 1 else None)
    if not isinstance(indices, (list, tuple)):
        return False
    return any(isinstance(i, torch.Tensor) and i.dtype in _BOOL_DTYPES for i in indices)


def capture_refusal(
    func: torch._ops.OpOverload, args: Sequence[Any], kwargs: dict[str, Any]
) -> str | None:
    """Why ``func(*args, **kwargs)`` cannot be captured, or ``None`` if it can."""
    tags = func.tags
    name = func._schema.name
    if torch.Tag.data_dependent_output in tags:
        return "it reads tensor data on the host (host sync: .item(), int(t), bool(t), `if t:`)"
    if name in _MASK_INDEXED_OPS:
        if _has_mask_index(args, kwargs):
            return "boolean-mask indexing needs nonzero(), a host sync with a data-dependent shape"
        return None
    if torch.Tag.dynamic_output_shape in tags:
        if name == "aten::repeat_interleave" and kwargs.get("output_size") is not None:
            return None
        return "its output shape depends on tensor data (a host sync on a device)"
    for ret in func._schema.returns:
        if not isinstance(ret.type, (torch.TensorType, torch.ListType, torch.OptionalType)):
            return f"it returns a host value ({ret.type}) computed from tensor data (host sync)"
    return None


def check_capturable(
    func: torch._ops.OpOverload, args: Sequence[Any], kwargs: dict[str, Any]
) -> None:
    """Raise :class:`CaptureError` naming the op and the user's file:line if it is refused."""
    reason = capture_refusal(func, args, kwargs)
    if reason is not None:
        raise CaptureError(
            f"cannot capture {func} at {user_frame()}: {reason}. Move it out of the captured "
            "region, or compute it on the device without reading values on the host."
        )


_method_patch_lock = threading.Lock()
_method_patch_depth = 0
_REFUSED_METHODS = ("tolist", "numpy")


def _refusing(method: str) -> Callable[..., Any]:
    def refuse(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        raise CaptureError(
            f"cannot capture Tensor.{method}() at {user_frame()}: it copies tensor data to the "
            "host (host sync). Move it out of the captured region."
        )

    refuse.__name__ = method
    return refuse


@contextlib.contextmanager
def host_sync_methods_refused() -> Iterator[None]:
    """Make ``Tensor.tolist()`` / ``Tensor.numpy()`` raise :class:`CaptureError`.

    These two read data without going through the dispatcher, so no dispatch mode sees them.
    They are shadowed on ``torch.Tensor`` for the duration of a capture; nested and concurrent
    captures share one patch, removed when the last capture ends.
    """
    global _method_patch_depth
    with _method_patch_lock:
        if _method_patch_depth == 0:
            for method in _REFUSED_METHODS:
                setattr(torch.Tensor, method, _refusing(method))
        _method_patch_depth += 1
    try:
        yield
    finally:
        with _method_patch_lock:
            _method_patch_depth -= 1
            if _method_patch_depth == 0:
                for method in _REFUSED_METHODS:
                    # torch.Tensor inherits both from torch._C.TensorBase; deleting the shadow
                    # restores the original method.
                    delattr(torch.Tensor, method)


class CaptureGuardMode(TorchDispatchMode):  # type: ignore[no-untyped-call]
    """Checks every op run during a device capture; device backends run it around capture.

    The CPU twin's recorder performs the same checks itself. On a device the check turns a
    late, cryptic driver error (or a silently baked value) into a ``CaptureError`` with the
    user's file and line.
    """

    def __torch_dispatch__(
        self,
        func: torch._ops.OpOverload,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        check_capturable(func, args, kwargs)
        return func(*args, **kwargs)
