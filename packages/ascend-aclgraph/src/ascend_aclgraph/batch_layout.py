"""Which inputs carry the batch, how they are padded, how outputs are cut back: one rule.

Every runner that replays a graph captured at a padded size decides the same things, and
decides them here: :func:`ascend_aclgraph.capture` (through :func:`layout_for_callable`), the
``aclgraph`` compile runner and npugraph_ex's capture path (through
:func:`layout_for_dynamo_graph`). A :class:`BatchLayout` says, per input:

* ``batched``: the caller's tensor with a batch dim, copied into a static buffer each call and
  padded with its own pad value (vLLM pads slot mappings with -1, which its kernels skip, so
  padded rows never write a real KV slot);
* ``state``: parameters, buffers and other unbatched tensors, captured by address: the graph
  reads and writes them where they are, so their writes stay the caller's. Never batched;
* ``host``: a Python value baked into the graph;
* ``size``: a symbolic size equal to the batch (it takes the padded size);
* ``baked``: a 0-d tensor whose value the compile runner baked into the graph (it checks the
  value itself; dynamo passes Python floats such as an RMSNorm's eps this way);

and per output whether, and along which dim, it is cut back to the real batch. It also says
whether padding is sound at all: a graph whose rows see each other (a reduction, contraction,
sort or softmax over the batch dim; see :mod:`ascend_aclgraph.row_analysis`) is captured at
exact sizes only, with one log line naming the op and the user's source line.

The facts come from tracing the callable once with the batch size as a symbol (fake tensors, no
real work, no state touched): the symbolic shapes say which output dims carry the batch, and the
traced aten graph says whether rows stay independent and which inputs are written in place
(batched ones get their real rows copied back to the caller after a replay).
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import sympy
import torch
from torch import fx

from ascend_aclgraph.errors import GraphInputError
from ascend_aclgraph.row_analysis import Mixed, Rows, analyze_rows, describe

__all__ = [
    "BatchLayout",
    "InputSpec",
    "OutputSpec",
    "PadValues",
    "layout_for_callable",
    "layout_for_dynamo_graph",
    "resolve_pad_values",
]

logger = logging.getLogger(__name__)

PadValue = float | int | None
PadValues = PadValue | Sequence[PadValue] | Mapping[str, PadValue] | Mapping[int, PadValue]
InputRole = Literal["batched", "state", "host", "size", "baked"]


@dataclass(frozen=True)
class InputSpec:
    """How one input meets the graph (module docstring)."""

    role: InputRole
    dim: int | None = None
    pad_value: PadValue = 0
    # The graph writes this input in place: a batched one has its real rows copied back.
    written: bool = False
    name: str = ""


@dataclass(frozen=True)
class OutputSpec:
    """How one (flattened) output is returned: ``whole``, cut back along ``dim``, or a size."""

    kind: Literal["whole", "batched", "size"]
    dim: int = 0
    # Elements per batch row along ``dim`` (``x.reshape(-1)`` of [B, 3] has 3); for a size
    # output, the size is ``factor * n``.
    factor: int = 1


@dataclass
class BatchLayout:
    inputs: list[InputSpec]
    # None when unknown: the graph is then run at exact sizes and its outputs returned whole.
    outputs: list[OutputSpec] | None
    # Why padding would change real rows; empty when padding is sound.
    exact_reasons: list[str] = field(default_factory=list)

    @property
    def exact_only(self) -> bool:
        return bool(self.exact_reasons)

    @property
    def batched(self) -> list[int]:
        return [i for i, s in enumerate(self.inputs) if s.role == "batched"]

    def describe_exact(self) -> str:
        return describe(self.exact_reasons)


# --- pad values -----------------------------------------------------------------------------


def _check_pad(value: Any, where: str) -> PadValue:
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise GraphInputError(f"pad value for {where} must be a number or None, got {value!r}")
    return value


def resolve_pad_values(
    pad_value: PadValues,
    names: Sequence[str],
    *,
    strict: bool = True,
    optional: Sequence[str] = (),
) -> list[PadValue]:
    """One pad value per input: a number for all, one per input, or a mapping by name/index.

    Inputs a mapping does not name are padded with 0. With ``strict``, a name that is not an
    input is an error (a typo would otherwise pad a slot mapping with 0 and write real KV
    slots); a compiled graph may legitimately lack an argument (``None``, or past a graph
    break), so the compile path is not strict. ``optional`` names parameters the caller did not
    pass (a mapping may name them; they are simply not padded).
    """
    if pad_value is None or (
        isinstance(pad_value, (int, float)) and not isinstance(pad_value, bool)
    ):
        return [pad_value] * len(names)
    if isinstance(pad_value, Mapping):
        out: list[PadValue] = [0] * len(names)
        for key, value in pad_value.items():
            if isinstance(key, int) and not isinstance(key, bool) and 0 <= key < len(names):
                index = key
            elif isinstance(key, str) and key in names:
                index = names.index(key)
            elif not strict or key in optional:
                continue
            else:
                raise GraphInputError(
                    f"pad_value names input {key!r}, which is not an input; inputs: "
                    f"{', '.join(n for n in names if n) or '(none named)'} "
                    f"(or indices 0..{len(names) - 1})"
                )
            out[index] = _check_pad(value, repr(key))
        return out
    if isinstance(pad_value, Sequence) and not isinstance(pad_value, (str, bytes)):
        if len(pad_value) != len(names):
            raise GraphInputError(
                f"pad_value has {len(pad_value)} entries for {len(names)} inputs; give one per "
                "input, a mapping {name: value}, or one number for all"
            )
        return [_check_pad(v, f"input {i}") for i, v in enumerate(pad_value)]
    raise GraphInputError(
        f"pad_value must be a number, None, a list (one per input) or a mapping "
        f"{{input name or index: value}}; got {pad_value!r}"
    )


def _argument_names(fn: Callable[..., Any], count: int) -> tuple[list[str], list[str]]:
    """Names of the ``count`` positional arguments passed, and of the parameters not passed."""
    target = fn.forward if isinstance(fn, torch.nn.Module) else fn
    try:
        params = list(inspect.signature(target).parameters.values())
    except (TypeError, ValueError):
        return [""] * count, []
    names = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return (names + [""] * count)[:count], names[count:]


# --- tracing with a symbolic batch ----------------------------------------------------------


def _new_fake_mode() -> Any:
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    return FakeTensorMode(shape_env=ShapeEnv(), allow_non_fake_inputs=True)


_trace_lock = threading.Lock()


def _keep_frames(self: Any, user_stack_summary: Any) -> Any:
    return user_stack_summary


@contextlib.contextmanager
def _user_stack_traces() -> Iterator[None]:
    """Keep every frame in the stack traces make_fx records (it keeps ``forward`` frames only).

    The user's source line of an op that mixes rows is usually in a plain function, not a
    module's ``forward``; :func:`~ascend_aclgraph.row_analysis.user_location` picks it out.
    """
    from torch.fx.experimental.proxy_tensor import PythonKeyTracer

    with _trace_lock:
        original = PythonKeyTracer.__dict__.get("_filter_traceback_frames")
        PythonKeyTracer._filter_traceback_frames = _keep_frames  # type: ignore[method-assign]
        try:
            yield
        finally:
            if original is None:
                del PythonKeyTracer._filter_traceback_frames
            else:
                PythonKeyTracer._filter_traceback_frames = original  # type: ignore[method-assign]


def _trace(fn: Callable[..., Any], fake_args: Sequence[Any], fake_mode: Any) -> fx.GraphModule:
    from torch.fx.experimental.proxy_tensor import make_fx

    with _user_stack_traces(), fake_mode, torch.no_grad():
        return make_fx(fn, tracing_mode="real", record_stack_traces=True)(*fake_args)


def _spec_outputs(analysis_outputs: Sequence[Any]) -> tuple[list[OutputSpec], list[str]]:
    specs: list[OutputSpec] = []
    reasons: list[str] = []
    for ann in analysis_outputs:
        if isinstance(ann, Rows):
            specs.append(OutputSpec("batched", ann.dim, ann.factor))
        elif isinstance(ann, tuple):
            specs.append(OutputSpec("size", 0, ann[1]))
        elif isinstance(ann, Mixed):
            specs.append(OutputSpec("whole"))
            reasons.append(ann.reason)
        else:
            specs.append(OutputSpec("whole"))
    return specs, reasons


def layout_for_callable(
    fn: Callable[..., Any],
    sample_args: Sequence[Any],
    dims: Sequence[int | None],
    pad_value: PadValues,
) -> BatchLayout:
    """The layout of ``fn(*sample_args)`` for :func:`ascend_aclgraph.capture`.

    ``dims`` gives each argument's batch dim (``None``: not batched); parameters and buffers
    are never batched, whatever ``dims`` says. Tracing runs ``fn`` once on fake tensors whose
    batch dims share one symbol; if that fails, the layout is exact-size only, with the reason.
    """
    names, not_passed = _argument_names(_original(fn), len(sample_args))
    pads = resolve_pad_values(pad_value, names, optional=not_passed)
    owned = _module_state(fn)
    inputs: list[InputSpec] = []
    for i, (arg, dim) in enumerate(zip(sample_args, dims, strict=True)):
        if not isinstance(arg, torch.Tensor):
            inputs.append(InputSpec("host", None, None, name=names[i]))
        elif dim is None or isinstance(arg, torch.nn.Parameter) or id(arg) in owned:
            inputs.append(InputSpec("state", None, None, name=names[i]))
        else:
            inputs.append(InputSpec("batched", dim, pads[i], name=names[i]))
    return _analyze(_original(fn), sample_args, inputs)


def _module_state(fn: Callable[..., Any]) -> set[int]:
    """Ids of ``fn``'s parameters and buffers when it is a module: its state, never batched."""
    if not isinstance(fn, torch.nn.Module):
        return set()
    return {id(t) for t in fn.parameters()} | {id(t) for t in fn.buffers()}


def _original(fn: Callable[..., Any]) -> Callable[..., Any]:
    """The function under a ``torch.compile`` wrapper (FX cannot trace a dynamo-optimized one).

    Compiling never changes which rows an output depends on, so the original function's trace
    decides the layout of the compiled one too.
    """
    orig = getattr(fn, "_orig_mod", None)  # torch.compile(module)
    if isinstance(orig, torch.nn.Module):
        return orig
    from torch._dynamo.eval_frame import innermost_fn

    inner: Callable[..., Any] = innermost_fn(fn)
    return inner


def _analyze(
    fn: Callable[..., Any], sample_args: Sequence[Any], inputs: list[InputSpec]
) -> BatchLayout:
    fake_mode = _new_fake_mode()
    shape_env = fake_mode.shape_env
    batched = [i for i, s in enumerate(inputs) if s.role == "batched"]
    if not batched:
        raise GraphInputError("no tensor argument has a batch dim: nothing to pad")
    first = sample_args[batched[0]]
    hint = int(first.shape[inputs[batched[0]].dim])
    try:
        from torch._dynamo.source import ConstantSource

        symbol = shape_env.create_symbol(max(hint, 2), source=ConstantSource("batch"))
        size = shape_env.create_symintnode(symbol, hint=max(hint, 2))
        fake_args: list[Any] = []
        with fake_mode:
            for arg, spec in zip(sample_args, inputs, strict=True):
                if spec.role == "batched":
                    shape = list(arg.shape)
                    shape[spec.dim] = size  # type: ignore[index]
                    fake_args.append(torch.empty(shape, dtype=arg.dtype, device=arg.device))
                elif spec.role == "state":
                    fake_args.append(fake_mode.from_tensor(arg, static_shapes=True))
                else:
                    fake_args.append(arg)
        gm = _trace(fn, fake_args, fake_mode)
    except Exception as exc:  # any failure to trace means we cannot prove padding sound
        reason = f"tracing with a symbolic batch size failed ({type(exc).__name__}: {exc})"
        return BatchLayout(inputs, None, [reason])
    return _finish(gm, symbol, inputs, flat_placeholders=True)


def _finish(
    gm: fx.GraphModule, symbol: sympy.Symbol, inputs: list[InputSpec], *, flat_placeholders: bool
) -> BatchLayout:
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    tensor_inputs = [i for i, s in enumerate(inputs) if s.role in ("batched", "state")]
    # make_fx makes a placeholder for every argument (host values included).
    index_of = list(range(len(inputs))) if flat_placeholders else tensor_inputs
    rows: list[Any] = []
    for i in index_of[: len(placeholders)]:
        spec = inputs[i]
        rows.append(Rows(spec.dim) if spec.role == "batched" and spec.dim is not None else None)
    state = [k for k, i in enumerate(index_of) if inputs[i].role == "state"]
    analysis = analyze_rows(gm.graph, symbol, rows, state_inputs=state)
    written = {index_of[k] for k in analysis.written_inputs if k < len(index_of)}
    final = [
        InputSpec(s.role, s.dim, s.pad_value, written=i in written, name=s.name)
        for i, s in enumerate(inputs)
    ]
    outputs, out_reasons = _spec_outputs(analysis.outputs)
    reasons = list(analysis.mixing)
    reasons += [r for r in out_reasons if r not in reasons]
    return BatchLayout(final, outputs, reasons)


# --- dynamo graphs ----------------------------------------------------------------------------


def _symbol(value: Any) -> Any:
    if isinstance(value, torch.SymInt):
        expr = value.node.expr
        return None if expr.is_number else expr
    return None


def _user_input_name(node: fx.Node) -> str | None:
    """The caller's argument name for a dynamo placeholder, or None (parameters, buffers)."""
    from torch._dynamo.source import LocalSource

    grapharg = node.meta.get("grapharg")
    source = getattr(grapharg, "source", None)
    if isinstance(source, LocalSource):
        return str(source.local_name)
    return None


def layout_for_dynamo_graph(
    gm: fx.GraphModule,
    example_inputs: Sequence[Any],
    dim: int,
    pad_value: PadValues,
) -> tuple[BatchLayout | None, int | None, str | None]:
    """The layout of a dynamo-compiled graph; returns ``(layout, static_size, unsupported)``.

    With dynamic shapes, batched inputs are the tensors whose ``dim`` is the batch symbol and
    SymInt inputs equal to it take the padded size. A graph dynamo specialised to one size has no
    symbol: it runs at exactly that size (``static_size``), its batched inputs are the caller's
    own tensors, and parameters and buffers are state. ``unsupported`` says why a graph cannot be
    captured at all (another symbolic size); it then runs eagerly.
    """
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(example_inputs):
        return None, None, f"{len(placeholders)} graph inputs but {len(example_inputs)} examples"
    values = [
        n.meta.get("example_value", ex) for n, ex in zip(placeholders, example_inputs, strict=True)
    ]
    user_names = [_user_input_name(n) for n in placeholders]
    names = [u or "" for u in user_names]
    pads = resolve_pad_values(pad_value, names, strict=False)
    batch = None
    for value in values:
        if isinstance(value, torch.Tensor) and value.dim() > dim:
            batch = _symbol(value.shape[dim])
            if batch is not None:
                break
    inputs: list[InputSpec] = []
    static_size = None
    if batch is None:
        for i, ex in enumerate(example_inputs):
            if isinstance(ex, torch.Tensor) and user_names[i] is not None and ex.dim() > dim:
                if static_size is None:
                    static_size = int(ex.shape[dim])
                if ex.shape[dim] == static_size:
                    inputs.append(InputSpec("batched", dim, pads[i], name=names[i]))
                    continue
            role: InputRole = "state" if isinstance(ex, torch.Tensor) else "host"
            inputs.append(InputSpec(role, None, None, name=names[i]))
        if static_size is None:
            return None, None, f"no input tensor of the caller has a dim {dim} to batch over"
    else:
        for i, value in enumerate(values):
            if isinstance(value, torch.SymInt):
                if _symbol(value) != batch:
                    return None, None, f"input {i} is a symbolic size {value} other than the batch"
                inputs.append(InputSpec("size", name=names[i]))
                continue
            if not isinstance(value, torch.Tensor):
                inputs.append(InputSpec("host", name=names[i]))
                continue
            spec = InputSpec("state", None, None, name=names[i])
            for d, size in enumerate(value.shape):
                sym = _symbol(size)
                if sym is None:
                    continue
                if d != dim or sym != batch:
                    return (
                        None,
                        None,
                        (
                            f"input {i} has symbolic size {size} at dim {d}; only dim {dim} may "
                            f"vary, and only as the batch size {batch}"
                        ),
                    )
                spec = InputSpec("batched", dim, pads[i], name=names[i])
            inputs.append(spec)
    layout = _analyze_dynamo(gm, values, inputs, batch)
    if static_size is not None:
        # Exact size by construction: padding never happens, outputs are returned whole.
        layout = BatchLayout(layout.inputs, [OutputSpec("whole")] * len(layout.outputs or []))
    return layout, static_size, None


def _analyze_dynamo(
    gm: fx.GraphModule, values: Sequence[Any], inputs: list[InputSpec], batch: Any
) -> BatchLayout:
    """Retrace the dynamo graph to aten ops on its own fake inputs, then analyse it."""
    # The placeholders' own fake mode: dynamo hands backends a fresh one in the tracing
    # context, which shares the shape env but cannot mix with these tensors.
    fake_mode = next((v.fake_mode for v in values if hasattr(v, "fake_mode")), None)
    try:
        if fake_mode is None:
            raise RuntimeError("the graph's inputs carry no fake tensors")
        with torch.fx.traceback.preserve_node_meta():
            gm_aten = _trace(fx.Interpreter(gm).run, list(values), fake_mode)
    except Exception as exc:
        reason = f"retracing the compiled graph failed ({type(exc).__name__}: {exc})"
        return BatchLayout(inputs, None, [reason])
    symbol = batch if batch is not None else sympy.Symbol("__no_batch__")
    return _finish(gm_aten, symbol, inputs, flat_placeholders=True)
