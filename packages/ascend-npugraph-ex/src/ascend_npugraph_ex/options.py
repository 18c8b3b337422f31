"""``NpugraphExOptions``: the validated options of the ``npugraph_ex`` backend.

Options arrive as ``torch.compile(..., options={...})``, as keyword arguments of
:func:`ascend_npugraph_ex.make_backend`, or from vLLM's ``ascend_compilation_config``. Unknown
keys, wrong types and contradictions raise :class:`NpugraphExOptionsError` naming the key, the
value and what is accepted.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ascend_npugraph_ex.errors import NpugraphExOptionsError
from ascend_npugraph_ex.passes.manager import FUSIONS

__all__ = ["NpugraphExOptions"]


@dataclass(frozen=True)
class NpugraphExOptions:
    """Options of the ``npugraph_ex`` backend.

    Attributes:
        force_eager: optimize the FX graph and return it uncaptured (vLLM FULL /
            FULL_DECODE_ONLY, where ACLGraph captures the result). False: capture it with
            ascend_aclgraph's compile runner (a standalone reduce-overhead mode).
        optimize: run the fusion passes at all (npugraph_ex's ``pattern_fusion_pass``).
        fuse_add_rms_norm, fuse_rms_norm, fuse_swiglu, fuse_rotary, fuse_qk_norm_rope: one switch
            per fusion. ``fuse_qk_norm_rope`` builds on the rms_norm and rotary fusions.
        static_kernel: compile fixed-shape kernels per static size ahead of time and cache them
            in ``build_dir`` (opt-in; slow the first time).
        batch_sizes: capture sizes of the capture mode, and the static sizes of static_kernel
            (default: the capture runtime's list, or the example batch for static_kernel).
        dynamic_dim: the batch dim of the graph's batched inputs.
        build_dir: static-kernel cache directory (default ``$NPUGRAPH_EX_BUILD_DIR`` or
            ``~/.cache/ascend_npugraph_ex/static_kernels``).
        capture_backend: graph backend for the capture mode: "auto", "npu", "cuda" or "cpu".
    """

    force_eager: bool = False
    optimize: bool = True
    fuse_add_rms_norm: bool = True
    fuse_rms_norm: bool = True
    fuse_swiglu: bool = True
    fuse_rotary: bool = True
    fuse_qk_norm_rope: bool = True
    static_kernel: bool = False
    batch_sizes: tuple[int, ...] | None = None
    dynamic_dim: int = 0
    build_dir: str | None = None
    capture_backend: str = "auto"

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            _check_type(f.name, getattr(self, f.name))
        if self.static_kernel and not self.optimize:
            raise NpugraphExOptionsError(
                "static_kernel=True needs optimize=True: static kernels are compiled from the "
                "optimized graph; enable optimize or drop static_kernel"
            )
        if self.fuse_qk_norm_rope and not (self.fuse_rms_norm and self.fuse_rotary):
            raise NpugraphExOptionsError(
                "fuse_qk_norm_rope=True needs fuse_rms_norm=True and fuse_rotary=True (it fuses "
                "their results); set fuse_qk_norm_rope=False or enable both"
            )
        if self.batch_sizes is not None and (
            not self.batch_sizes or any(b <= 0 for b in self.batch_sizes)
        ):
            raise NpugraphExOptionsError(
                f"batch_sizes={self.batch_sizes!r}: expected a non-empty sequence of positive ints"
            )
        if self.capture_backend not in ("auto", "npu", "cuda", "cpu"):
            raise NpugraphExOptionsError(
                f"capture_backend={self.capture_backend!r}: expected 'auto', 'npu', 'cuda' or 'cpu'"
            )

    @property
    def enabled_fusions(self) -> tuple[str, ...]:
        """The fusions to run, in pass order (empty when ``optimize`` is False)."""
        if not self.optimize:
            return ()
        return tuple(name for name in FUSIONS if getattr(self, f"fuse_{name}"))

    @classmethod
    def accepted_keys(cls) -> tuple[str, ...]:
        """Every accepted option name."""
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_mapping(cls, options: Mapping[str, Any] | None) -> NpugraphExOptions:
        """Build options from a dict (``torch.compile(options=...)``); lists become tuples."""
        options = dict(options or {})
        unknown = sorted(set(options) - set(cls.accepted_keys()))
        if unknown:
            raise NpugraphExOptionsError(
                f"unknown npugraph_ex option(s) {unknown}; accepted options: "
                f"{', '.join(cls.accepted_keys())}"
            )
        if isinstance(options.get("batch_sizes"), list):
            options["batch_sizes"] = tuple(options["batch_sizes"])
        return cls(**options)

    @classmethod
    def from_ascend_compilation_config(cls, config: Mapping[str, Any]) -> NpugraphExOptions:
        """Map vLLM's ``additional_config["ascend_compilation_config"]`` onto backend options.

        ``enable_static_kernel`` becomes ``static_kernel``; ``fuse_*`` switches pass through;
        ``enable_npugraph_ex=False`` turns the optimizer off. ``force_eager`` is always True
        there: vLLM's graph wrapper does the capture.
        """
        mapping = {"enable_static_kernel": "static_kernel", "enable_npugraph_ex": "optimize"}
        accepted = [*mapping, *(f"fuse_{n}" for n in FUSIONS)]
        out: dict[str, Any] = {"force_eager": True}
        for key, value in config.items():
            if key not in accepted:
                raise NpugraphExOptionsError(
                    f"unknown ascend_compilation_config key {key!r}; "
                    f"accepted: {', '.join(accepted)}"
                )
            out[mapping.get(key, key)] = value
        return cls.from_mapping(out)


def _check_type(name: str, value: object) -> None:
    if name == "batch_sizes":
        ok = value is None or (
            isinstance(value, tuple)
            and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
        )
        expected = "a tuple/list of ints or None"
    elif name == "dynamic_dim":
        ok = isinstance(value, int) and not isinstance(value, bool)
        expected = "int"
    elif name == "build_dir":
        ok = value is None or isinstance(value, str)
        expected = "str or None"
    elif name == "capture_backend":
        ok = isinstance(value, str)
        expected = "str"
    else:
        ok = isinstance(value, bool)
        expected = "bool"
    if not ok:
        raise NpugraphExOptionsError(
            f"npugraph_ex option {name}={value!r} has type {type(value).__name__}; "
            f"expected {expected}"
        )
