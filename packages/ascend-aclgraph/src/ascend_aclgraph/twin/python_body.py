"""Which operators a capture looks *inside*: custom ops whose kernel is a Python function.

A device kernel launched from a Python-bodied custom op (vLLM's attention ops read the forward
context) has its host arguments baked at capture, and a host sync in the body breaks the capture
like one in the model. If the twin recorded such an op as one call, replay would re-run its
Python body and read live globals, so the twin would be looser than the device; if the device
backends' capture guard checked it as one op, a ``.item()`` in its body would go unseen. So both
run the body with their dispatch mode still active (:func:`run_python_body`) and see the ops it
calls; ops whose kernel is C++ (every aten op, and C++ custom ops) stay single ops, as they are
single kernels on a device.

Whether the kernel that serves a device is Python has no public API in torch 2.13. Two private
facts are combined, each covering the other's blind spot:

* ``torch.library._impls`` lists every ``ns/op/DispatchKey`` that received a kernel from Python
  (``Library.impl`` and ``torch.library.custom_op`` both register through it), but it keeps the
  entry when a C++ library later registers over the same key, as ascend_npugraph_ex does with
  its C++ CPU kernels;
* the dispatcher's state dump (``torch._C._dispatch_dump``) shows which kernel is *active* for a
  key, and a Python kernel is a boxed-only functor: ``[ boxed ]``, where C++ kernels registered
  with a function are ``[ boxed unboxed ]`` and fallthroughs ``[ fallthrough boxed ]``.

If a future torch changed either, the check answers "not Python" and the custom-op tests of the
twin fail loudly; it never makes a C++ kernel's inner calls replayed in its place.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["has_python_body", "python_body_keys", "run_python_body"]

_BUILTIN_NAMESPACES = {"aten", "prim", "prims"}
# Where the dispatcher finds a backend's kernel after the backend's own key, in its order of
# preference (OperatorEntry's computeDispatchTableEntry): the composite aliases.
_COMPOSITE_KEYS = (
    "CompositeExplicitAutogradNonFunctional",
    "CompositeExplicitAutograd",
    "CompositeImplicitAutograd",
)


def _registered_from_python(namespace: str, op_name: str, key: str) -> bool:
    impls: set[str] = torch.library._impls
    if f"{namespace}/{op_name}/{key}" in impls:
        return True
    # Library.impl(name, fn) with neither a key nor a library default registers to
    # CompositeImplicitAutograd under the key string "".
    return key == "CompositeImplicitAutograd" and f"{namespace}/{op_name}/" in impls


def _active_kernel_is_boxed_only(qualified: str, key: str) -> bool:
    for line in torch._C._dispatch_dump(qualified).splitlines():
        if line.startswith((f"{key}: ", f"{key}[alias]: ")):
            return line.rstrip().endswith("[ boxed ]")
    return False


def has_python_body(func: torch._ops.OpOverload, backend_key: str = "CPU") -> bool:
    """Whether the kernel the dispatcher runs for ``func`` on ``backend_key`` is a Python function.

    ``backend_key`` names a backend dispatch key (``"CPU"``, ``"CUDA"``, ``"PrivateUse1"`` for
    the NPU). Built-in namespaces are never looked inside: their kernels are single device
    kernels (prims have Python reference kernels, but eager code never reaches them).
    """
    if func.namespace in _BUILTIN_NAMESPACES:  # checked first: every aten op of a capture asks
        return False
    schema = func._schema
    namespace, _, name = schema.name.partition("::")
    op_name = f"{name}.{schema.overload_name}" if schema.overload_name else name
    qualified = f"{namespace}::{op_name}"
    for key in (backend_key, *_COMPOSITE_KEYS):
        if torch._C._dispatch_has_kernel_for_dispatch_key(qualified, key):
            return _registered_from_python(
                namespace, op_name, key
            ) and _active_kernel_is_boxed_only(qualified, key)
    return False


def _device_of(args: Sequence[Any], kwargs: dict[str, Any]) -> torch.device | None:
    """The device the dispatcher picks a kernel for: that of the first tensor argument."""
    values = (*args, *kwargs.values())
    for value in values:
        if isinstance(value, torch.Tensor):
            return value.device
        if isinstance(value, (list, tuple)):
            for item in value:
                if isinstance(item, torch.Tensor):
                    return item.device
    # A factory-like op: its device argument, as for torch.empty(..., device=...).
    for value in values:
        if isinstance(value, torch.device):
            return value
    return None


def python_body_keys(
    func: torch._ops.OpOverload,
    args: Sequence[Any],
    kwargs: dict[str, Any],
    default_device: torch.device | None = None,
) -> torch._C.DispatchKeySet | None:
    """The key set that runs ``func``'s Python body for these arguments, or ``None``.

    ``None`` means the kernel serving the arguments' device is C++ (a single kernel on a
    device), so the op is checked as itself. ``default_device`` is assumed when no argument
    names a device.
    """
    if func.namespace in _BUILTIN_NAMESPACES:  # the common case, answered first
        return None
    device = _device_of(args, kwargs) or default_device
    if device is None:
        return None
    backend_key = torch._C._dispatch_key_for_device(device.type)
    if not has_python_body(func, backend_key):
        return None
    key = torch._C._parse_dispatch_key(backend_key)
    assert key is not None, backend_key  # the dispatcher named it
    return torch._C.DispatchKeySet(key)


def run_python_body(
    mode: TorchDispatchMode,
    func: torch._ops.OpOverload,
    keys: torch._C.DispatchKeySet,
    args: Sequence[Any],
    kwargs: dict[str, Any],
) -> Any:
    """Run ``func``'s Python body (``keys`` from :func:`python_body_keys`) under ``mode``.

    Call it from ``mode.__torch_dispatch__``: the body's kernel is reached directly, below the
    mode, with the mode pushed again, so every op the body calls dispatches back to ``mode``.
    Calling ``func`` as for any other op would run the body with the mode popped, unseen.
    """
    with mode:
        return func.redispatch(keys, *args, **kwargs)
