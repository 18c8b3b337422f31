"""Compile a module once, then call dynamo's compiled code directly: no guards per call.

``torch.compile`` checks guards before every call: the identity, shape, dtype and strides of
each input, parameter and buffer dynamo saw. For a small decoder that is tens to hundreds of
microseconds per step, more than the graph replay it leads to, and it makes graph mode *slower*
than eager on the CPU. vLLM removes it the same way this module does (its
``TorchCompileWrapperWithCustomDispatcher``): compile once through ``torch.compile``, keep the
bytecode dynamo generated for ``forward`` (a ``register_bytecode_hook``), and afterwards run
``forward`` with that bytecode swapped in. The bytecode calls the compiled graph directly.

That is only sound while what the guards checked stays true, which is what a serving loop
guarantees and what :class:`~ascend_aclgraph.compile_runner.CompiledGraphRunner` checks itself
where it matters: the batch dim may vary (the graph is compiled with it dynamic), batched
inputs keep their non-batch shape and dtype (a mismatch is a ``GraphInputError``), state keeps
its address (else the call runs eagerly). Python-level changes that dynamo would have guarded
(a different code path taken on a flag, a new float attribute) are *not* seen: recompile with a
new :class:`GuardFreeModule` after changing the module.

::

    step = ascend_aclgraph.GuardFreeModule(model, mode="FULL", batch_sizes=[1, 2, 4, 8])
    logits = step(tokens, positions)   # the first call compiles; later ones skip dynamo
"""

from __future__ import annotations

import contextlib
import sys
import threading
import types
from collections.abc import Iterator
from typing import Any

import torch

from ascend_aclgraph.compile_backend import AclGraphCompiler, make_compile_backend

__all__ = ["GuardFreeModule"]

# Swapping a class's forward code is visible to every thread: one dispatch at a time.
_swap_lock = threading.RLock()


class GuardFreeModule:
    """``module`` compiled with the ``aclgraph`` backend, dispatched without guards.

    Args:
        module: the model; its ``forward`` is compiled with every input's dim
            ``dynamic_dim`` (``options``, default 0) marked dynamic.
        **options: ``aclgraph`` backend options (see :class:`AclGraphCompileOptions`).

    Attributes:
        compiler: the :class:`AclGraphCompiler` (its ``runners`` and ``stats``).
        compiled_codes: dynamo's bytecode for ``forward``; calls dispatch to the first.
    """

    def __init__(self, module: torch.nn.Module, **options: Any) -> None:
        self.module = module
        self.compiler: AclGraphCompiler = make_compile_backend(**options)
        self._dim = self.compiler.options.dynamic_dim
        forward = type(module).forward
        if not isinstance(forward, types.FunctionType):
            raise TypeError(
                f"{type(module).__name__}.forward must be a plain Python function to dispatch "
                f"to its compiled code, got {type(forward).__name__}"
            )
        self._forward = forward
        self.original_code = forward.__code__
        self.compiled_codes: list[types.CodeType] = []
        self._compiled = torch.compile(module, backend=self.compiler, dynamic=False)
        self._hook = torch._dynamo.convert_frame.register_bytecode_hook(self._bytecode_hook)

    def _bytecode_hook(
        self, code: types.CodeType, new_code: types.CodeType
    ) -> types.CodeType | None:
        """Record ``new_code`` if dynamo compiled it for this module's forward; change nothing."""
        old_code = code
        if old_code is not self.original_code:
            return None
        # Other instances of the class share the code object: keep only bytecode compiled for
        # a call on *this* module. Dynamo's frame conversion holds the frame being compiled in
        # a local named ``frame`` (vLLM finds it the same way); without it, record nothing.
        caller: Any = sys._getframe()
        while caller is not None:
            compiled = caller.f_locals.get("frame")
            if getattr(compiled, "f_code", None) is old_code:
                if compiled.f_locals.get("self") is self.module:
                    self.compiled_codes.append(new_code)
                return None
            caller = caller.f_back
        return None

    def _mark(self, args: tuple[Any, ...]) -> None:
        # Compile once with the batch dim dynamic (dynamo would otherwise specialise the first
        # size, then recompile): one graph serves every size, as in vLLM.
        for arg in args:
            if isinstance(arg, torch.Tensor) and arg.dim() > self._dim:
                torch._dynamo.mark_dynamic(arg, self._dim)

    @contextlib.contextmanager
    def dispatch_to_code(self, index: int) -> Iterator[None]:
        """Run ``forward`` with compiled bytecode ``index`` in place of its source code."""
        with _swap_lock:
            self._forward.__code__ = self.compiled_codes[index]
            try:
                yield
            finally:
                self._forward.__code__ = self.original_code

    def __call__(self, *args: Any) -> Any:
        if not self.compiled_codes:
            self._mark(args)
            return self._compiled(*args)
        with self.dispatch_to_code(0):
            return self._forward(self.module, *args)

    def close(self) -> None:
        """Stop listening for dynamo's bytecode (the compiled code stays usable)."""
        self._hook.remove()
