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

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ascend_aclgraph.twin.recorder import OpRecord

__all__ = ["fast_binding", "find_out_overload", "generate_replay"]

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


def _entry(func: torch._ops.OpOverload, rec: OpRecord) -> Callable[..., Any]:
    # Updatable tasks get rewritten arguments, so they keep the overload's exact entry point.
    return func._op if rec.updatable else fast_binding(func, rec.args, rec.kwargs)


def _copy_fresh(body: list[str], namer: _Namer, copy: str, rec: OpRecord) -> None:
    """Copy the op's new tensors (result ``_r``) into the outputs captured for them."""
    paths = rec.extra["result_paths"]
    for i in rec.fresh:
        target = namer.bind(rec.outputs[i], "t")
        body.append(f"    {copy}({target}, {_result_accessor(paths, i)})")


def generate_replay(records: Sequence[OpRecord]) -> tuple[Callable[[], None], str]:
    """Compile ``records`` into a function that re-runs them in order; also return its source."""
    namer = _Namer()
    copy = namer.bind(torch.ops.aten.copy_.default._op, "copy")
    body: list[str] = []
    for rec in records:
        func = rec.func
        if rec.updatable:
            # The record's args are rewritten in place by task updates; read them at replay.
            holder = namer.bind(rec, "task")
            call_args = [f"*{holder}.args", f"**{holder}.kwargs"]
        else:
            call_args = _call_args(namer, rec.args, rec.kwargs)
        if rec.written or not rec.fresh:
            # In-place and out= ops write their arguments: replay them exactly as called. One
            # that also returns new tensors (a custom op with mutates_args, say) has those
            # copied into the captured outputs, like a functional op without an out= overload.
            fn = namer.bind(_entry(func, rec), "op")
            if not rec.fresh:
                body.append(f"    {fn}({', '.join(call_args)})")
                continue
            body.append(f"    _r = {fn}({', '.join(call_args)})")
            _copy_fresh(body, namer, copy, rec)
            continue
        out_func = find_out_overload(func)
        if out_func is not None and len(rec.fresh) == len(rec.outputs):
            out_names = [a.name for a in out_func._schema.arguments if a.is_out]
            out_kwargs = {n: rec.outputs[i] for i, n in enumerate(out_names)}
            fn = namer.bind(
                out_func._op
                if rec.updatable
                else fast_binding(out_func, rec.args, {**rec.kwargs, **out_kwargs}),
                "op",
            )
            outs = [f"{n}={namer.bind(rec.outputs[i], 't')}" for i, n in enumerate(out_names)]
            body.append(f"    {fn}({', '.join(call_args + outs)})")
            continue
        fn = namer.bind(_entry(func, rec), "op")
        body.append(f"    _r = {fn}({', '.join(call_args)})")
        _copy_fresh(body, namer, copy, rec)
    if not body:
        body.append("    pass")
    # Replays are inference: out= ops refuse to run under grad mode when a weight requires grad.
    # Toggling the flag directly costs far less than entering torch.no_grad().
    grad = namer.bind(torch._C._set_grad_enabled, "grad")
    is_grad = namer.bind(torch.is_grad_enabled, "grad")
    source = (
        "def replay():\n"
        f"    _prev = {is_grad}()\n"
        f"    {grad}(False)\n"
        "    try:\n"
        + "\n".join("    " + line for line in body)
        + f"\n    finally:\n        {grad}(_prev)\n"
    )
    code = compile(source, "<ascend_aclgraph twin replay>", "exec")
    env = dict(namer.env)
    exec(code, env)
    replay: Callable[[], None] = env["replay"]
    return replay, source
