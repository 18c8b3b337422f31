"""Turn the ops to replay into one generated straight-line Python function.

Replaying from a loop over records costs a Python iteration, an attribute lookup and an argument
unpack per op; replaying through an FX GraphModule was measured *slower* than eager. One
generated function that calls each op with its arguments bound as globals is the cheapest way
to drive the dispatcher from Python, and the closest thing the CPU has to a device graph.

Functional ops are replayed through their ``.out`` overload (no allocation; the output lands in
the captured tensor). Ops without one are called and their result copied into the captured
output, which costs one allocation and one copy more.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from types import CodeType
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ascend_aclgraph.twin.recorder import OpRecord

__all__ = [
    "fast_binding",
    "find_out_overload",
    "generate_replay",
    "generate_segment",
    "replay_form",
]

_out_overload_cache: dict[torch._ops.OpOverload, torch._ops.OpOverload | None] = {}


def find_out_overload(func: torch._ops.OpOverload) -> torch._ops.OpOverload | None:
    """The ``out=`` overload computing the same function as ``func``, if the op has one.

    Matched on the schema: same non-out arguments (names and types) and one out argument per
    return value.
    """
    if func in _out_overload_cache:
        return _out_overload_cache[func]
    schema = func._schema
    signature = [(a.name, str(a.type)) for a in schema.arguments]
    found: torch._ops.OpOverload | None = None
    packet = func.overloadpacket
    for name in packet.overloads():
        candidate = getattr(packet, name)
        cs = candidate._schema
        outs = [a for a in cs.arguments if a.is_out]
        if not outs or len(outs) != len(schema.returns):
            continue
        if [(a.name, str(a.type)) for a in cs.arguments if not a.is_out] == signature:
            found = candidate
            break
    _out_overload_cache[func] = found
    return found


_binding_cache: dict[tuple[Any, ...], Callable[..., Any]] = {}


def _to_meta(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return torch.empty_strided(value.size(), value.stride(), dtype=value.dtype, device="meta")
    if isinstance(value, (list, tuple)):
        return type(value)(_to_meta(v) for v in value)
    return value


class _FirstOp(TorchDispatchMode):  # type: ignore[no-untyped-call]
    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.ops: list[torch._ops.OpOverload] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.ops.append(func)
        return func(*args, **(kwargs or {}))


def fast_binding(
    func: torch._ops.OpOverload, args: Sequence[Any], kwargs: dict[str, Any]
) -> Callable[..., Any]:
    """The cheapest callable that dispatches exactly to ``func`` for these arguments.

    ``torch.<op>`` / ``Tensor.<op>`` go through PyTorch's C++ argument parser, about 0.8 us per
    call cheaper than ``OpOverload._op``'s generic stack-based path. Whether the public binding
    resolves to the very same overload is verified once per call shape, on meta tensors (no
    data touched); otherwise the overload's own entry point is used.
    """
    shape = (
        func,
        tuple(map(_arg_kind, args)),
        tuple(sorted((k, _arg_kind(v)) for k, v in kwargs.items())),
    )
    cached = _binding_cache.get(shape)
    if cached is not None:
        return cached
    name = func.overloadpacket.__name__
    chosen: Callable[..., Any] = func._op
    for owner in (torch._C._VariableFunctions, torch._C.TensorBase):
        candidate = getattr(owner, name, None)
        if candidate is None:
            continue
        probe = _FirstOp()
        meta_args = _to_meta(tuple(args))
        meta_kwargs = {k: _to_meta(v) for k, v in kwargs.items()}
        try:
            with probe:
                candidate(*meta_args, **meta_kwargs)
        except Exception:
            continue
        if probe.ops[:1] == [func] and len(probe.ops) == 1:
            chosen = candidate
            break
    _binding_cache[shape] = chosen
    return chosen


def _arg_kind(value: Any) -> Any:
    """What decides the binding for an argument: its type, and for a list its element types.

    ``index_put_(x, [rows, None, cols], v)`` needs the overload's own entry point (the public
    binding rejects ``None`` in a tensor list) while ``index_put_(x, [rows], v)`` may use the
    public one; a key of ``list`` alone would let the first call shape decide for both.
    """
    if isinstance(value, (list, tuple)):
        return (type(value), tuple(map(_arg_kind, value)))
    return type(value)


class _Namer:
    """Binds non-literal values as globals of the generated function."""

    def __init__(self) -> None:
        self.env: dict[str, Any] = {}
        self._ids: dict[int, str] = {}

    def bind(self, value: Any, prefix: str = "v") -> str:
        key = id(value)
        name = self._ids.get(key)
        if name is None:
            name = f"_{prefix}{len(self.env)}"
            self.env[name] = value
            self._ids[key] = name
        return name

    def render(self, value: Any) -> str:
        if value is None or isinstance(value, (bool, str)):
            return repr(value)
        if isinstance(value, int):
            return repr(value)
        if isinstance(value, float) and math.isfinite(value):
            return repr(value)
        # Tensors, lists (host int lists and tensor lists), dtypes, devices, ...: bound once.
        # The bound object is the recorder's frozen copy, so caller mutations cannot leak in.
        return self.bind(value)


def _call_args(namer: _Namer, args: Sequence[Any], kwargs: dict[str, Any]) -> list[str]:
    parts = [namer.render(a) for a in args]
    parts += [f"{k}={namer.render(v)}" for k, v in kwargs.items()]
    return parts


def _result_accessor(result_paths: list[tuple[int, ...]], index: int) -> str:
    return "_r" + "".join(f"[{i}]" for i in result_paths[index])


def _copy_fresh(body: list[str], namer: _Namer, copy: str, rec: OpRecord) -> None:
    """Copy the op's new tensors (result ``_r``) into the outputs captured for them."""
    paths = rec.extra["result_paths"]
    for i in rec.fresh:
        target = namer.bind(rec.outputs[i], "t")
        body.append(f"{copy}({target}, {_result_accessor(paths, i)})")


_composite_cache: dict[torch._ops.OpOverload, bool] = {}


def _is_composite(func: torch._ops.OpOverload) -> bool:
    """Whether ``func`` is a CompositeImplicitAutograd op (it decomposes into other ops).

    Such ops reach the recorder as themselves inside a Python custom op's body (autograd keys
    are excluded there). Their ``out=`` overloads are composites too, and not always faithful:
    ``matmul.out`` of a vector and a matrix resizes its output to 2-D and back, warning on every
    call. So they replay through the op itself, their result copied into the captured output.
    """
    found = _composite_cache.get(func)
    if found is None:
        found = torch._C._dispatch_has_kernel_for_dispatch_key(
            func._name, "CompositeImplicitAutograd"
        )
        _composite_cache[func] = found
    return found


def replay_form(rec: OpRecord) -> tuple[torch._ops.OpOverload, dict[str, Any], bool]:
    """How ``rec`` is replayed: the overload called, its keyword arguments, and whether its new
    tensors (``rec.fresh``) are copied from the result into the captured outputs afterwards.

    The positional arguments are always ``rec.args``. Shared by the generated function and
    the native loop (:mod:`.native`), so both replay the very same calls.
    """
    func = rec.func
    if rec.written or not rec.fresh:
        # In-place and out= ops write their arguments: replay them exactly as called. One that
        # also returns new tensors (a custom op with mutates_args, say) has those copied into
        # the captured outputs, like a functional op without an out= overload.
        return func, rec.kwargs, bool(rec.fresh)
    out_func = None if _is_composite(func) else find_out_overload(func)
    if out_func is not None and len(rec.fresh) == len(rec.outputs):
        out_names = [a.name for a in out_func._schema.arguments if a.is_out]
        return (
            out_func,
            {**rec.kwargs, **{n: rec.outputs[i] for i, n in enumerate(out_names)}},
            False,
        )
    return func, rec.kwargs, True


def _emit(body: list[str], namer: _Namer, copy: str, rec: OpRecord) -> None:
    """Append the lines that replay ``rec`` (unindented)."""
    func, kwargs, copies = replay_form(rec)
    fn = namer.bind(fast_binding(func, rec.args, kwargs), "op")
    call = f"{fn}({', '.join(_call_args(namer, rec.args, kwargs))})"
    if not copies:
        body.append(call)
        return
    body.append(f"_r = {call}")
    _copy_fresh(body, namer, copy, rec)


def _compile(source: str | CodeType, namer: _Namer, name: str) -> Callable[[], None]:
    code = source if isinstance(source, CodeType) else compile(source, _FILENAME, "exec")
    env = dict(namer.env)
    exec(code, env)
    fn: Callable[[], None] = env[name]
    return fn


_FILENAME = "<ascend_aclgraph twin replay>"


@functools.lru_cache(maxsize=512)
def _segment_code(source: str) -> CodeType:
    # Updates record a task again at every step, and its source is mostly the same text (the
    # values it binds differ, not their names): compiling costs far more than the lookup.
    return compile(source, _FILENAME, "exec")


def generate_replay(items: Sequence[OpRecord | Any]) -> tuple[Callable[[], None], str]:
    """Compile ``items`` into a function that re-runs them in order; also return its source.

    An item that is not an :class:`OpRecord` is an updatable task's segment: the function calls
    its ``run()``, which replays the task's current ops (see :mod:`.segment`). Keeping those out
    of the graph's own function lets an update replace them without generating it again.
    """
    namer = _Namer()
    copy = namer.bind(torch.ops.aten.copy_.default._op, "copy")
    body: list[str] = []
    for item in items:
        if isinstance(item, OpRecord):
            _emit(body, namer, copy, item)
        else:
            body.append(f"{namer.bind(item, 'seg')}.run()")
    if not body:
        body.append("pass")
    # Replays are inference: out= ops refuse to run under grad mode when a weight requires grad.
    # Toggling the flag directly costs far less than entering torch.no_grad().
    grad = namer.bind(torch._C._set_grad_enabled, "grad")
    is_grad = namer.bind(torch.is_grad_enabled, "grad")
    source = (
        "def replay():\n"
        f"    _prev = {is_grad}()\n"
        f"    {grad}(False)\n"
        "    try:\n"
        + "".join(f"        {line}\n" for line in body)
        + f"    finally:\n        {grad}(_prev)\n"
    )
    return _compile(source, namer, "replay"), source


def segment_replay(records: Sequence[OpRecord]) -> Callable[[], None]:
    """The function that replays one task segment's ``records``.

    A segment of one call that needs no copies afterwards (an updated task's own kernel
    writing its arguments, as vLLM's attention does at every step) is that call with its
    arguments bound: the same call the generated line would make, without generating and
    binding source at every update. Anything else is :func:`generate_segment`'s function.
    """
    if len(records) == 1:
        (rec,) = records
        func, kwargs, copies = replay_form(rec)
        if not copies:
            return functools.partial(fast_binding(func, rec.args, kwargs), *rec.args, **kwargs)
    return generate_segment(records)[0]


def generate_segment(records: Sequence[OpRecord]) -> tuple[Callable[[], None], str]:
    """Compile the ops of one task segment; the graph's replay function calls the result.

    It runs inside that function only, so grad mode is already off.
    """
    namer = _Namer()
    copy = namer.bind(torch.ops.aten.copy_.default._op, "copy")
    body: list[str] = []
    for rec in records:
        _emit(body, namer, copy, rec)
    source = "def segment():\n" + "".join(f"    {line}\n" for line in body or ["pass"])
    return _compile(_segment_code(source), namer, "segment"), source
