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

from ascend_aclgraph.twin.recorder import OpRecord

__all__ = ["find_out_overload", "generate_replay"]

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
            # In-place and out= ops write their arguments: replay them exactly as called.
            fn = namer.bind(func._op, "op")
            body.append(f"    {fn}({', '.join(call_args)})")
            continue
        out_func = find_out_overload(func)
        if out_func is not None and len(rec.fresh) == len(rec.outputs):
            fn = namer.bind(out_func._op, "op")
            out_names = [a.name for a in out_func._schema.arguments if a.is_out]
            outs = [f"{n}={namer.bind(rec.outputs[i], 't')}" for i, n in enumerate(out_names)]
            body.append(f"    {fn}({', '.join(call_args + outs)})")
            continue
        fn = namer.bind(func._op, "op")
        body.append(f"    _r = {fn}({', '.join(call_args)})")
        paths = rec.extra["result_paths"]
        for i in rec.fresh:
            target = namer.bind(rec.outputs[i], "t")
            body.append(f"    {copy}({target}, {_result_accessor(paths, i)})")
    if not body:
        body.append("    pass")
    source = "def replay():\n" + "\n".join(body) + "\n"
    code = compile(source, "<ascend_aclgraph twin replay>", "exec")
    env = dict(namer.env)
    exec(code, env)
    replay: Callable[[], None] = env["replay"]
    return replay, source
