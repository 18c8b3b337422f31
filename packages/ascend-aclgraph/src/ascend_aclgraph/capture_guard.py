"""Refuse operations that cannot live inside a device graph, naming the user's file:line.

A device graph records device work only. Anything that needs the host to see tensor *data*
during capture (``.item()``, ``if tensor:``, ``.tolist()``, ``nonzero``, boolean-mask indexing)
either breaks the capture on a device or, worse, bakes one step's data into every replay.
Reseeding the generators (``torch.manual_seed``) is host state a graph does not record either.
The checks here run on every backend, so the CPU twin fails exactly where an NPU would. They
apply to the capturing thread only.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
import traceback
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ascend_aclgraph.errors import CaptureError
from ascend_aclgraph.twin.python_body import python_body_keys, run_python_body

__all__ = [
    "CaptureGuardMode",
    "capture_refusal",
    "check_capturable",
    "check_updatable_op",
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
# Ops returning a host value computed from tensor *metadata* only. They reach a dispatch mode
# where autograd keys are excluded (inside a custom op's body, under inference_mode), since
# they are composites that otherwise decompose before it.
_METADATA_OPS = {
    "aten::result_type",
    "aten::is_same_size",
    "aten::is_floating_point",
    "aten::is_complex",
    "aten::is_signed",
    "aten::is_conj",
    "aten::is_neg",
    "aten::_is_zerotensor",
    "aten::is_inference",
    "aten::size",
    "aten::stride",
    "aten::dim",
    "aten::numel",
    "aten::sym_size",
    "aten::sym_stride",
    "aten::sym_numel",
    "aten::sym_storage_offset",
    "aten::is_contiguous",
}


def user_frame(extra_skip: Sequence[str] = ()) -> str:
    """``file:line (function)`` of the innermost frame outside torch and this runtime."""
    skip = (_TORCH_DIR, _OWN_DIR, *extra_skip)
    for frame in reversed(traceback.extract_stack()):
        name = frame.filename
        if name.startswith(skip) or name.endswith(_STDLIB_SKIP) or name.startswith("<"):
            continue
        return f"{name}:{frame.lineno} (in {frame.name})"
    return "<unknown location>"


def _takes_a_tensor(args: Sequence[Any], kwargs: dict[str, Any]) -> bool:
    return any(
        isinstance(v, torch.Tensor)
        or (isinstance(v, (list, tuple)) and any(isinstance(i, torch.Tensor) for i in v))
        for v in (*args, *kwargs.values())
    )


def _has_mask_index(args: Sequence[Any], kwargs: dict[str, Any]) -> bool:
    indices = kwargs.get("indices", args[1] if len(args) > 1 else None)
    if not isinstance(indices, (list, tuple)):
        return False
    return any(isinstance(i, torch.Tensor) and i.dtype in _BOOL_DTYPES for i in indices)


@functools.cache
def _op_facts(func: torch._ops.OpOverload) -> tuple[str, bool, bool, str | None]:
    """What the refusal rule reads from ``func``'s tags and schema, which do not change.

    Cached: every op of a capture (and of a task update, recorded again at each step) asks, and
    reading a schema from Python builds its argument objects anew each time.
    """
    tags = func.tags
    host_return = next(
        (
            str(ret.type)
            for ret in func._schema.returns
            if not isinstance(ret.type, (torch.TensorType, torch.ListType, torch.OptionalType))
        ),
        None,
    )
    return (
        func._schema.name,
        torch.Tag.data_dependent_output in tags,
        torch.Tag.dynamic_output_shape in tags,
        host_return,
    )


def capture_refusal(
    func: torch._ops.OpOverload, args: Sequence[Any], kwargs: dict[str, Any]
) -> str | None:
    """Why ``func(*args, **kwargs)`` cannot be captured, or ``None`` if it can."""
    name, data_dependent, dynamic_shape, host_return = _op_facts(func)
    if data_dependent:
        return "it reads tensor data on the host (host sync: .item(), int(t), bool(t), `if t:`)"
    if name in _MASK_INDEXED_OPS:
        if _has_mask_index(args, kwargs):
            return "boolean-mask indexing needs nonzero(), a host sync with a data-dependent shape"
        return None
    if dynamic_shape:
        if name == "aten::repeat_interleave" and kwargs.get("output_size") is not None:
            return None
        return "its output shape depends on tensor data (a host sync on a device)"
    if host_return is None or name in _METADATA_OPS or not _takes_a_tensor(args, kwargs):
        # A host result from dtypes, shapes or flags, or from no tensor at all
        # (torch.promote_types): a device graph has those at capture too.
        return None
    return f"it returns a host value ({host_return}) computed from tensor data (host sync)"


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


# Host-side entry points that read tensor data or reseed the generators without going through
# the dispatcher, so no dispatch mode sees them: (owner, attribute, name in messages, why it
# cannot be captured). ``np.asarray(t)`` reaches ``Tensor.numpy`` through ``Tensor.__array__``.
# ``torch.manual_seed`` is ``torch.random.manual_seed`` until torch._dynamo wraps it, so both
# names are shadowed.
_HOST_SYNC = "it copies tensor data to the host (host sync). Move it out of the captured region."
_RESEED = (
    "it reseeds the random generators, host-side state that a device graph does not record "
    "(CUDA refuses it during capture): random ops in the graph draw from the generator as it "
    "is at each replay. Seed before capturing (or before each replay) instead."
)
_REFUSED_HOST_CALLS: tuple[tuple[Any, str, str, str], ...] = (
    (torch.Tensor, "tolist", "Tensor.tolist", _HOST_SYNC),
    (torch.Tensor, "numpy", "Tensor.numpy", _HOST_SYNC),
    (torch, "manual_seed", "torch.manual_seed", _RESEED),
    (torch.random, "manual_seed", "torch.manual_seed", _RESEED),
    (torch, "seed", "torch.seed", _RESEED),
    (torch.random, "seed", "torch.seed", _RESEED),
)

# How many captures this thread is inside. The shadows below are process-wide (they live on
# torch.Tensor and the torch module), but they refuse only where this is non-zero: another
# thread, say one serving eagerly while this one captures, keeps its .tolist() and manual_seed.
_this_thread = threading.local()
_shadow_lock = threading.Lock()
_shadow_users = 0
# (owner, attribute, original, shadow, whether the owner itself held the original)
_installed: list[tuple[Any, str, Any, Any, bool]] = []


def _capturing_here() -> bool:
    return bool(getattr(_this_thread, "depth", 0))


def _refusing(label: str, why: str, original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def shadow(*args: Any, **kwargs: Any) -> Any:
        if _capturing_here():
            raise CaptureError(f"cannot capture {label}() at {user_frame()}: {why}")
        return original(*args, **kwargs)

    return shadow


def _install_shadows() -> None:
    # torch._dynamo, when first imported, replaces torch.manual_seed by a wrapper around it. An
    # import during a capture (the first call of a custom op does it) would wrap the shadow,
    # which could then never be removed; importing it first makes it wrap the real function.
    import torch._dynamo  # noqa: F401

    # One shadow per original function: names that held one function still hold one.
    shadows: dict[int, Callable[..., Any]] = {}
    for owner, name, label, why in _REFUSED_HOST_CALLS:
        original = getattr(owner, name)
        shadow = shadows.setdefault(id(original), _refusing(label, why, original))
        _installed.append((owner, name, original, shadow, name in vars(owner)))
        setattr(owner, name, shadow)


def _remove_shadows() -> None:
    for owner, name, original, shadow, owned in reversed(_installed):
        if getattr(owner, name) is not shadow:
            continue  # someone replaced it since; theirs stays (ours passes calls through)
        if owned:
            setattr(owner, name, original)
        else:
            # torch.Tensor inherits tolist/numpy from torch._C.TensorBase: deleting the shadow
            # uncovers the original.
            delattr(owner, name)
    _installed.clear()


@contextlib.contextmanager
def host_sync_methods_refused() -> Iterator[None]:
    """Within the block, this thread's host syncs and reseeds outside the dispatcher raise.

    ``Tensor.tolist()`` / ``Tensor.numpy()`` read data, and ``torch.manual_seed`` /
    ``torch.seed`` reseed the generators, without going through the dispatcher, so no dispatch
    mode sees them; each raises :class:`CaptureError` naming the caller's file:line. They are
    shadowed while any thread captures (one shared shadow, removed when the last capture
    ends), and the shadows refuse only in threads that are capturing.

    A ``TorchFunctionMode`` would be thread-local by itself, but it does not see calls made
    inside ``__torch_function__`` handlers or inside a custom op's Python body (the mode is off
    while the op runs), and a ``.tolist()`` on host lengths inside an attention op is exactly
    what must be refused.
    """
    global _shadow_users
    with _shadow_lock:
        if _shadow_users == 0:
            _install_shadows()
        _shadow_users += 1
    _this_thread.depth = getattr(_this_thread, "depth", 0) + 1
    try:
        yield
    finally:
        _this_thread.depth -= 1
        with _shadow_lock:
            _shadow_users -= 1
            if _shadow_users == 0:
                _remove_shadows()


def check_updatable_op(op: Callable[..., Any], task: str, backend: str) -> None:
    """Raise :class:`CaptureError` unless ``op`` can be an updatable task on an NPU.

    A task update re-issues the captured op, with new host arguments, into the buffers the graph
    captured; so the op must write preallocated outputs: an ``.out`` overload or an op whose
    schema marks what it writes (``Tensor(a!)``; a ``torch.library.custom_op`` with
    ``mutates_args``). A functional op allocates its output at each launch, and the graph would
    keep reading the captured one. The cpu twin applies the same rule as the npu backend, so a
    model that runs on the twin runs on an NPU. ``task`` names the task in the message.
    """
    schema = getattr(op, "_schema", None)
    if schema is not None and schema.is_mutable:
        return
    got = f"{op}, schema {schema}" if schema is not None else f"{op!r}, which has no schema"
    raise CaptureError(
        f"{task} at {user_frame()}: on the {backend} backend an updatable op must write "
        "preallocated outputs: call its .out overload (e.g. npu_fused_infer_attention_score.out "
        "with a workspace) or an op with a mutable schema (a torch.library.custom_op with "
        "mutates_args=...), because a task update re-issues it into the captured outputs; "
        f"got {got}"
    )


class CaptureGuardMode(TorchDispatchMode):  # type: ignore[no-untyped-call]
    """Checks every op run during a device capture; device backends run it around capture.

    The CPU twin's recorder performs the same checks itself. On a device the check turns a
    late, cryptic driver error (or a silently baked value) into a ``CaptureError`` with the
    user's file and line.

    Like the recorder, it looks inside custom ops whose kernel for the tensors' device is a
    Python function (:mod:`ascend_aclgraph.twin.python_body`): the kernels such a body launches
    are captured into the graph, so the ops it calls are checked; a C++ kernel is checked as
    one op.
    """

    def __torch_dispatch__(
        self,
        func: torch._ops.OpOverload,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        keys = python_body_keys(func, args, kwargs)
        if keys is not None:
            return run_python_body(self, func, keys, args, kwargs)
        check_capturable(func, args, kwargs)
        return func(*args, **kwargs)
