"""Options of the ``aclgraph`` torch.compile backend, validated once at compile time."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from ascend_aclgraph.backends import GraphBackend
from ascend_aclgraph.capture_sizes import CaptureSizes
from ascend_aclgraph.errors import CompileOptionsError
from ascend_aclgraph.modes import GraphMode
from ascend_aclgraph.splitting import SplittingOps

__all__ = ["AclGraphCompileOptions"]

# What each key accepts, for error messages.
_ACCEPTS = {
    "mode": "a GraphMode or its name (NONE, PIECEWISE, FULL, FULL_DECODE_ONLY, FULL_AND_PIECEWISE)",
    "batch_sizes": "a list of positive ints, or None for vLLM's default list up to 512",
    "backend": "'auto', 'npu', 'cuda', 'cpu' or a GraphBackend",
    "num_warmups": "an int >= 0",
    "splitting_ops": "a list of op names ('ns::op'), dotted paths, OpOverloads or callables; "
    "None for the attention ops",
    "on_capture_failure": "'raise' or 'eager'",
    "dynamic_dim": "an int, the batch dim of every batched tensor",
    "pad_value": "a number for every batched input, a mapping {argument name: number} (others "
    "get 0), or None to leave padding rows stale",
    "clone_outputs": "a bool",
    "max_num_seqs": "an int >= 1, or None for the largest batch size",
    "debug": "a bool",
}


@dataclass(frozen=True)
class AclGraphCompileOptions:
    """Everything ``torch.compile(..., backend="aclgraph", options={...})`` accepts.

    Attributes:
        mode: the graph mode, as in vLLM. FULL captures the whole compiled graph per size;
            PIECEWISE splits it at ``splitting_ops`` and captures the pieces; the config modes
            FULL_DECODE_ONLY and FULL_AND_PIECEWISE use FULL for batches marked uniform decode
            (:func:`~ascend_aclgraph.batch_hint`) and NONE / PIECEWISE for the others.
        batch_sizes: capture sizes; a batch is padded to the next one up, larger ones run
            eagerly.
        backend: the graph backend.
        num_warmups: eager runs per batch descriptor before its graph is captured.
        splitting_ops: where PIECEWISE graphs are cut (see :mod:`ascend_aclgraph.splitting`).
        on_capture_failure: "raise", or "eager" to warn once and run that descriptor eagerly.
        dynamic_dim: the batch dim of batched inputs and outputs.
        pad_value: what padding rows of batched inputs are filled with: one number, or per
            argument name of the compiled function (``{"slot_mapping": -1}``), others 0.
        clone_outputs: return copies of the outputs (``False``: views of graph memory, valid
            until the next call).
        max_num_seqs: the largest uniform decode batch that gets a FULL graph in the config
            modes (vLLM's ``max_num_seqs``); ``None`` means the largest capture size.
        debug: check that every replay sees the captured input addresses.
    """

    mode: GraphMode = GraphMode.FULL_AND_PIECEWISE
    batch_sizes: CaptureSizes = dataclasses.field(default_factory=CaptureSizes)
    backend: str | GraphBackend = "auto"
    num_warmups: int = 1
    splitting_ops: SplittingOps = dataclasses.field(default_factory=SplittingOps)
    on_capture_failure: Literal["raise", "eager"] = "raise"
    dynamic_dim: int = 0
    # A mapping is kept as sorted (name, value) pairs: options are hashable (shared_compiler).
    pad_value: float | int | tuple[tuple[str, float | int | None], ...] | None = 0
    clone_outputs: bool = True
    max_num_seqs: int | None = None
    debug: bool = False

    @classmethod
    def from_dict(cls, options: Mapping[str, Any] | None) -> AclGraphCompileOptions:
        """Validate a ``torch.compile`` options dict.

        Raises:
            CompileOptionsError: for an unknown key or a value of the wrong type, naming the
                key, the value and what is accepted.
        """
        options = dict(options or {})
        unknown = sorted(set(options) - set(_ACCEPTS))
        if unknown:
            raise CompileOptionsError(
                f"unknown aclgraph option(s) {', '.join(map(repr, unknown))}; accepted keys: "
                f"{', '.join(_ACCEPTS)}"
            )
        kwargs: dict[str, Any] = {}
        for key, value in options.items():
            try:
                kwargs[key] = _convert(key, value)
            except (TypeError, ValueError) as exc:
                raise CompileOptionsError(
                    f"aclgraph option {key!r}={value!r} is invalid ({exc}); expected "
                    f"{_ACCEPTS[key]}"
                ) from exc
        return cls(**kwargs)

    @property
    def pad_values(self) -> float | int | dict[str, float | int | None] | None:
        """``pad_value`` in the form :func:`~ascend_aclgraph.batch_layout.resolve_pad_values`
        takes."""
        return dict(self.pad_value) if isinstance(self.pad_value, tuple) else self.pad_value

    @property
    def max_uniform_batch(self) -> int:
        return self.max_num_seqs if self.max_num_seqs is not None else self.batch_sizes.max_size


def _is_pad_number(value: Any) -> bool:
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))


def _int(value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise TypeError(f"not an int >= {minimum}")
    return value


def _convert(key: str, value: Any) -> Any:
    if key == "mode":
        return GraphMode.parse(value)
    if key == "batch_sizes":
        if value is None:
            return CaptureSizes()
        return value if isinstance(value, CaptureSizes) else CaptureSizes(value)
    if key == "backend":
        if isinstance(value, GraphBackend) or value in ("auto", "npu", "cuda", "cpu"):
            return value
        raise ValueError("unknown backend")
    if key == "num_warmups":
        return _int(value, 0)
    if key == "splitting_ops":
        if isinstance(value, (str, bytes)):
            raise TypeError("a single string; wrap it in a list")
        return value if isinstance(value, SplittingOps) else SplittingOps(value)
    if key == "on_capture_failure":
        if value not in ("raise", "eager"):
            raise ValueError("unknown policy")
        return value
    if key == "dynamic_dim":
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError("not an int")
        return value
    if key == "pad_value":
        if isinstance(value, Mapping):
            for name, number in value.items():
                if not isinstance(name, str) or not _is_pad_number(number):
                    raise TypeError(f"entry {name!r}: {number!r}")
            return tuple(sorted(value.items()))
        if not _is_pad_number(value):
            raise TypeError("not a number")
        return value
    if key in ("clone_outputs", "debug"):
        if not isinstance(value, bool):
            raise TypeError("not a bool")
        return value
    if key == "max_num_seqs":
        return None if value is None else _int(value, 1)
    raise AssertionError(key)  # _ACCEPTS and this function list the same keys
