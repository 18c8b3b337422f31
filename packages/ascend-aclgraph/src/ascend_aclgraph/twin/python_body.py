"""Which operators the twin records *inside*: custom ops whose CPU kernel is a Python function.

A device kernel launched from a Python-bodied custom op (vLLM's attention ops read the forward
context) has its host arguments baked at capture. If the twin recorded such an op as one call,
replay would re-run its Python body and read live globals, so the twin would be looser than the
device. So the recorder runs the body with itself still active and records the ops it calls;
ops whose kernel is C++ (every aten op, and C++ custom ops) stay single recorded calls, as they
are single kernels on a device.

Whether the kernel that serves the CPU is Python has no public API in torch 2.13. Two private
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

import torch

__all__ = ["has_python_body"]

_BUILTIN_NAMESPACES = {"aten", "prim", "prims"}
# Where the dispatcher finds the CPU kernel, in its order of preference (OperatorEntry's
# computeDispatchTableEntry): a direct CPU kernel, then the composite aliases.
_CPU_SERVING_KEYS = (
    "CPU",
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


def has_python_body(func: torch._ops.OpOverload) -> bool:
    """Whether the kernel the dispatcher runs for ``func`` on CPU is a Python function.

    Built-in namespaces are never looked inside: their kernels are single device kernels (prims
    have Python reference kernels, but eager code never reaches them).
    """
    schema = func._schema
    namespace, _, name = schema.name.partition("::")
    if namespace in _BUILTIN_NAMESPACES:
        return False
    op_name = f"{name}.{schema.overload_name}" if schema.overload_name else name
    qualified = f"{namespace}::{op_name}"
    for key in _CPU_SERVING_KEYS:
        if torch._C._dispatch_has_kernel_for_dispatch_key(qualified, key):
            return _registered_from_python(
                namespace, op_name, key
            ) and _active_kernel_is_boxed_only(qualified, key)
    return False
