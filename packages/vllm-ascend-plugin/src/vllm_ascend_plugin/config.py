"""The typed schema of vLLM's ``additional_config`` for vllm-ascend-plugin.

Users pass ``LLM(additional_config={...})`` or ``--additional-config '<json>'``; vLLM keeps the
dict in ``VllmConfig.additional_config`` and hands it to the platform and to every worker. This
module turns that dict into an :class:`AscendConfig`::

    config = parse_additional_config(vllm_config.additional_config)
    decision = resolve_compilation(config, "FULL_DECODE_ONLY")

Accepted keys (same names and meaning as vllm-ascend where we implement them):

- ``ascend_compilation_config``: ``enable_npugraph_ex``, ``enable_static_kernel`` and one
  ``fuse_*`` switch per npugraph_ex fusion (:class:`AscendCompilationConfig`);
- ``xlite_graph_config``: ``enabled``, ``full_mode`` (:class:`XliteGraphConfig`);
- ``torchair_graph_config``: ``enabled`` only, a deprecated alias (:class:`TorchairGraphConfig`).

Unknown keys, keys that only vllm-ascend implements, wrong types and contradictions raise
:class:`AscendConfigError`, whose message names the full dotted key, the value given and what is
accepted. Nothing is accepted and ignored silently.

This module imports neither vLLM nor torch: the schema is checked (and documented, and printed by
``ascend-graph explain``) on machines without either.
"""

from __future__ import annotations

import enum
import hashlib
import importlib
import json
import logging
import typing
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_core import ErrorDetails, PydanticCustomError

__all__ = [
    "AscendCompilationConfig",
    "AscendConfig",
    "AscendConfigError",
    "CompilationDecision",
    "TorchairGraphConfig",
    "XliteGraphConfig",
    "check_xlite_available",
    "parse_additional_config",
    "resolve_compilation",
]

logger = logging.getLogger(__name__)

# The fusions of ascend_npugraph_ex, in its pass order (ascend_npugraph_ex.FUSIONS). Spelled out
# here rather than imported so that this module stays free of torch; tests check they agree.
_FUSIONS = ("add_rms_norm", "rms_norm", "swiglu", "rotary", "qk_norm_rope")

_GRAPH_MODES = ("NONE", "PIECEWISE", "FULL", "FULL_DECODE_ONLY", "FULL_AND_PIECEWISE")

# Error type of the contradictions our validators raise; its context carries the key (relative to
# the model that raised it), the value as shown to the user, and the reason.
_CONFLICT = "ascend_config_conflict"

_NOT_IMPLEMENTED = "accepted by vllm-ascend but not implemented by vllm-ascend-plugin"


class AscendConfigError(ValueError):
    """An invalid ``additional_config``: unknown key, wrong type or contradiction.

    ``errors`` holds one line per problem; each names the full dotted key (e.g.
    ``additional_config.ascend_compilation_config.enable_static_kernel``), the value given and
    what is accepted.
    """

    def __init__(self, *errors: str) -> None:
        # The lines are the exception's args, so it pickles (vLLM ships errors across processes).
        super().__init__(*errors)
        self.errors: tuple[str, ...] = errors

    def __str__(self) -> str:
        if len(self.errors) == 1:
            return self.errors[0]
        lines = "\n".join(f"  {line}" for line in self.errors)
        return f"{len(self.errors)} errors in additional_config:\n{lines}"


class _ConfigModel(BaseModel):
    """Base of the schema models: strict (no coercion), closed (no extra keys), immutable."""

    # strict: "yes" or 1 for a bool is an error rather than a guess; frozen: a parsed config is
    # shared between the platform, the compiler and the workers and must not drift.
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    # Dotted path of this model inside vLLM's config, used in every error message.
    _PATH: ClassVar[str] = "additional_config"
    # Keys we reject with a specific reason rather than as unknown: key -> reason.
    _REJECTED: ClassVar[Mapping[str, str]] = {}

    def __init__(self, /, **data: Any) -> None:
        # Direct construction raises the same AscendConfigError as parse_additional_config.
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise _translate(exc, type(self)) from None

    # pydantic calls a model's own __init__ when it validates the model as a nested field, which
    # would turn one section's errors into a single opaque "Value error" of the parent. This is
    # pydantic's marker (its RootModel sets it too) for an __init__ that only wraps the base one:
    # nested validation then bypasses it and reports every error at its own location.
    __init__.__pydantic_base_init__ = True  # type: ignore[attr-defined]


def _not_implemented(hint: str = "") -> str:
    return f"{_NOT_IMPLEMENTED}; {hint}" if hint else f"{_NOT_IMPLEMENTED}; remove it"


class AscendCompilationConfig(_ConfigModel):
    """``additional_config["ascend_compilation_config"]``: npugraph_ex and its fusions.

    Attributes:
        enable_npugraph_ex: run the npugraph_ex FX optimizer. ``None`` (the default) means on for
            cudagraph_mode FULL / FULL_DECODE_ONLY and off for PIECEWISE / FULL_AND_PIECEWISE /
            NONE; ``True`` is still overridden in those modes (see :func:`resolve_compilation`).
        enable_static_kernel: compile fixed-shape kernels per capture size at start-up (opt-in,
            slow the first time). Needs npugraph_ex, so it contradicts
            ``enable_npugraph_ex=False``.
        fuse_add_rms_norm, fuse_rms_norm, fuse_swiglu, fuse_rotary, fuse_qk_norm_rope: one switch
            per fusion, named as ``ascend_npugraph_ex.NpugraphExOptions``'s fields.
            ``fuse_qk_norm_rope`` fuses the results of the rms_norm and rotary fusions and so
            needs both.
    """

    _PATH: ClassVar[str] = "additional_config.ascend_compilation_config"
    _REJECTED: ClassVar[Mapping[str, str]] = {
        # vllm-ascend's own pass switches (vllm_ascend/ascend_config.py).
        "fuse_norm_quant": _not_implemented(
            "the norm + quantization fusion needs quantized models, which this plugin does not "
            "support; remove it"
        ),
        "fuse_qknorm_rope": _not_implemented(
            "the q/k-norm + RoPE fusion is switched by "
            "additional_config.ascend_compilation_config.fuse_qk_norm_rope here"
        ),
        "fuse_muls_add": _not_implemented("remove it"),
    }

    enable_npugraph_ex: bool | None = None
    enable_static_kernel: bool = False
    fuse_add_rms_norm: bool = True
    fuse_rms_norm: bool = True
    fuse_swiglu: bool = True
    fuse_rotary: bool = True
    fuse_qk_norm_rope: bool = True

    @model_validator(mode="after")
    def _check_dependencies(self) -> AscendCompilationConfig:
        if self.enable_static_kernel and self.enable_npugraph_ex is False:
            raise _conflict(
                "enable_static_kernel",
                True,
                "static kernels are compiled by npugraph_ex, but enable_npugraph_ex is False; "
                "accepted: enable_static_kernel false, or enable_npugraph_ex true or unset",
            )
        if self.fuse_qk_norm_rope and not (self.fuse_rms_norm and self.fuse_rotary):
            off = " and ".join(
                name for name in ("fuse_rms_norm", "fuse_rotary") if not getattr(self, name)
            )
            raise _conflict(
                "fuse_qk_norm_rope",
                True,
                f"it fuses the results of the rms_norm and rotary fusions, but {off} is False; "
                "accepted: fuse_qk_norm_rope false, or fuse_rms_norm and fuse_rotary both true",
            )
        return self

    def enabled_fusions(self) -> tuple[str, ...]:
        """The fusions switched on, in ascend_npugraph_ex's pass order (``"add_rms_norm"``, ...)."""
        return tuple(name for name in _FUSIONS if getattr(self, f"fuse_{name}"))


class XliteGraphConfig(_ConfigModel):
    """``additional_config["xlite_graph_config"]``: the XliteGraph path.

    Attributes:
        enabled: run the model through Xlite (decode batches only unless ``full_mode``). Needs
            the ``ascend-xlite-adapter`` package; see :func:`check_xlite_available`.
        full_mode: let Xlite run prefill and mixed batches too. Only meaningful with ``enabled``.
    """

    _PATH: ClassVar[str] = "additional_config.xlite_graph_config"

    enabled: bool = False
    full_mode: bool = False

    @model_validator(mode="after")
    def _check_enabled(self) -> XliteGraphConfig:
        if self.full_mode and not self.enabled:
            raise _conflict(
                "full_mode",
                True,
                "full_mode configures the XliteGraph path, but enabled is False; accepted: "
                "full_mode false, or enabled true as well",
            )
        if self.enabled:
            reason = _xlite_unavailable_reason()
            if reason is not None:
                raise _conflict("enabled", True, reason)
        return self


# vllm-ascend's old torchair_graph_config keys -> what replaces them. TorchAir graph mode was
# dropped by vllm-ascend in v0.12.0rc1; ACLGraph (+ npugraph_ex) is the graph path now.
_TORCHAIR_REPLACEMENTS: Mapping[str, str] = {
    "mode": "the graph mode is compilation_config.cudagraph_mode",
    "use_cached_graph": "compiled graphs are cached by vLLM's compile cache; nothing to set",
    "graph_batch_sizes": "use compilation_config.cudagraph_capture_sizes instead",
    "graph_batch_sizes_init": (
        "leave compilation_config.cudagraph_capture_sizes unset for vLLM's default sizes, or "
        "set compilation_config.max_cudagraph_capture_size"
    ),
    "enable_multistream_mla": "there is no replacement; remove it",
    "enable_multistream_moe": "there is no replacement; remove it",
    "enable_view_optimize": "there is no replacement; remove it",
    "enable_frozen_parameter": (
        "there is nothing to set: ACLGraph captures parameters at fixed addresses; remove it"
    ),
    "enable_kv_nz": "there is no replacement; remove it",
    "enable_super_kernel": "there is no replacement; remove it",
}


class TorchairGraphConfig(_ConfigModel):
    """``additional_config["torchair_graph_config"]``: deprecated alias, ``enabled`` only.

    vllm-ascend removed TorchAir graph mode. ``{"enabled": true}`` maps to graph mode through
    ACLGraph + npugraph_ex, i.e. ``ascend_compilation_config.enable_npugraph_ex=True``;
    ``{"enabled": false}`` maps to nothing. :class:`AscendConfig` folds it in while validating
    (warning once per process), so a validated ``AscendConfig`` never holds one. Every other
    TorchAir key is rejected with its replacement.
    """

    _PATH: ClassVar[str] = "additional_config.torchair_graph_config"
    _REJECTED: ClassVar[Mapping[str, str]] = {
        key: (
            "torchair was removed from vllm-ascend (v0.12.0rc1) and is not implemented by "
            f"vllm-ascend-plugin; {replacement}"
        )
        for key, replacement in _TORCHAIR_REPLACEMENTS.items()
    }

    enabled: bool = False


# Top-level keys vllm-ascend accepts (vllm_ascend/ascend_config.py, current and recent releases)
# that this plugin does not implement. Rejecting them by name tells a user migrating from
# vllm-ascend why their config fails, instead of calling a well-known key "unknown".
_VLLM_ASCEND_ONLY_KEYS = (
    "ascend_fusion_config",
    "ascend_log_path",
    "ascend_scheduler_config",
    "batch_job_sched_config",
    "chunked_prefill_for_mla",
    "combine_quant_mode",
    "draft_window_size",
    "dump_config",
    "dump_config_path",
    "dynamic_eplb",
    "dynamic_spec_config",
    "enable_balance_scheduling",
    "enable_cpu_binding",
    "enable_dsa_cp",
    "enable_flashcomm1",
    "enable_force_eplb",
    "enable_fused_mc2",
    "enable_kv_nz",
    "enable_mc2_hierarchy_comm",
    "enable_mlapo",
    "enable_pcp_o_proj_weight_sharding",
    "enable_prefetch",
    "enable_prefill_mc2",
    "enable_reduce_sample",
    "enable_shared_expert_dp",
    "enable_sparse_li_c8",
    "enable_sparse_sfa_c8",
    "enable_transpose_kv_cache_by_block",
    "eplb_config",
    "expert_map_path",
    "finegrained_tp_config",
    "ft_communication_abort_timeout",
    "lmhead_tensor_parallel_size",
    "mc2_comm_alg",
    "mega_moe_max_tokens",
    "mix_placement",
    "mlapo_keep_prefill_weights",
    "msmonitor_use_daemon",
    "multistream_dsv4_dsa_overlap",
    "multistream_overlap_shared_expert",
    "oproj_tensor_parallel_size",
    "pa_shape_list",
    "profiling_chunk_config",
    "recompute_scheduler_enable",
    "refresh",
    "rejection_sampler_config",
    "rl_config",
    "scheduler_config",
    "short_request_first_config",
    "sparse_kv_offload_config",
    "weight_nz_mode",
    "weight_prefetch_config",
)


class AscendConfig(_ConfigModel):
    """The whole ``additional_config`` of vllm-ascend-plugin.

    vLLM's ``additional_config`` is one dict for every plugin, so it may in principle hold keys of
    other plugins. We cannot know those, and accepting unknown keys would hide typos (a
    misspelled ``ascend_compilation_config`` would silently run the defaults), so every unknown
    top-level key is an error whose message lists the keys we accept.

    Attributes:
        ascend_compilation_config: npugraph_ex, static kernels and fusion switches.
        xlite_graph_config: the XliteGraph path.
        torchair_graph_config: deprecated input alias; folded into ``ascend_compilation_config``
            during validation, so it is always None on a validated config.
    """

    _REJECTED: ClassVar[Mapping[str, str]] = dict.fromkeys(
        _VLLM_ASCEND_ONLY_KEYS, _not_implemented()
    )

    ascend_compilation_config: AscendCompilationConfig = Field(
        default_factory=AscendCompilationConfig
    )
    xlite_graph_config: XliteGraphConfig = Field(default_factory=XliteGraphConfig)
    torchair_graph_config: TorchairGraphConfig | None = None

    @model_validator(mode="before")
    @classmethod
    def _fold_torchair(cls, data: Any) -> Any:
        # Folded before field validation: a frozen model validated through __init__ cannot swap
        # in a rebuilt instance afterwards. A malformed section is left in place for the field
        # validation to report with the usual messages.
        if not isinstance(data, Mapping) or data.get("torchair_graph_config") is None:
            return data
        enabled = _torchair_enabled(data["torchair_graph_config"])
        if enabled is None:
            return data
        folded = {key: value for key, value in data.items() if key != "torchair_graph_config"}
        if enabled:
            compilation = folded.get("ascend_compilation_config")
            if compilation is None:
                folded["ascend_compilation_config"] = {"enable_npugraph_ex": True}
            elif isinstance(compilation, Mapping | AscendCompilationConfig):
                explicit = (
                    compilation.enable_npugraph_ex
                    if isinstance(compilation, AscendCompilationConfig)
                    else compilation.get("enable_npugraph_ex")
                )
                if explicit is False:
                    raise _conflict(
                        "torchair_graph_config.enabled",
                        True,
                        "the deprecated torchair_graph_config.enabled=True maps to "
                        "ascend_compilation_config.enable_npugraph_ex=True, but "
                        "enable_npugraph_ex is False; accepted: drop torchair_graph_config (the "
                        "ACLGraph path without npugraph_ex), or set enable_npugraph_ex true",
                    )
                if explicit is None:
                    if isinstance(compilation, AscendCompilationConfig):
                        compilation = compilation.model_copy(update={"enable_npugraph_ex": True})
                    else:
                        compilation = {**compilation, "enable_npugraph_ex": True}
                    folded["ascend_compilation_config"] = compilation
            # Any other section type is left as is; its field validation reports it.
        _warn_torchair_once(enabled)
        return folded

    def to_additional_config(self) -> dict[str, Any]:
        """This config as a JSON-able ``additional_config`` dict, only our keys.

        Meant to be written back into ``VllmConfig.additional_config`` so that worker processes,
        which re-parse it, see the same config. The deprecated alias is already folded in, so
        re-parsing does not warn again; ``parse_additional_config(c.to_additional_config())``
        equals ``c``.
        """
        return {
            "ascend_compilation_config": self.ascend_compilation_config.model_dump(),
            "xlite_graph_config": self.xlite_graph_config.model_dump(),
        }

    def compute_hash(self) -> str:
        """A stable sha256 hex digest of the fields that change compiled graphs.

        vLLM folds it into its compile cache key. It covers every npugraph_ex, static-kernel and
        fusion switch, and the Xlite switches too (they change the graph mode and what runs
        inside the graphs): a needless cache miss only costs start-up time, a stale hit would run
        the wrong graph. Key order of the input does not matter (canonical JSON).
        """
        canonical = json.dumps(
            {"schema": "vllm_ascend_plugin.additional_config/1", **self.to_additional_config()},
            sort_keys=True,
            separators=(",", ":"),
        )
        return hashlib.sha256(canonical.encode()).hexdigest()


def parse_additional_config(
    additional_config: Mapping[str, Any] | AscendConfig | None,
) -> AscendConfig:
    """Validate vLLM's ``additional_config`` into an :class:`AscendConfig`.

    ``None`` or an empty mapping gives the defaults; an :class:`AscendConfig` is returned as is.
    The input is never mutated.

    Raises:
        AscendConfigError: for every unknown key, key only vllm-ascend implements, wrong type
            and contradiction, one line each, naming the full dotted key, the value and what is
            accepted.
    """
    if additional_config is None:
        return AscendConfig()
    if isinstance(additional_config, AscendConfig):
        return additional_config
    if not isinstance(additional_config, Mapping):
        raise AscendConfigError(
            f"additional_config = {_show(additional_config)}: expected a mapping (dict) with the "
            f"keys {_accepted_keys(AscendConfig)}, or None"
        )
    # Strict pydantic takes only real dicts; copying the sections (one level is all the schema
    # has) also keeps the caller's mapping untouched.
    data = {
        key: dict(value) if isinstance(value, Mapping) else value
        for key, value in additional_config.items()
    }
    try:
        return AscendConfig.model_validate(data)
    except ValidationError as exc:
        raise _translate(exc, AscendConfig) from None


def check_xlite_available() -> None:
    """Raise :class:`AscendConfigError` unless the XliteGraph adapter can be imported.

    ``xlite_graph_config.enabled=True`` needs the ``ascend-xlite-adapter`` package (import
    ``ascend_xlite_adapter``), which the plugin depends on. Whether the serving configuration
    suits Xlite (and, on an NPU, whether ``xlite._C`` imports) is checked when the platform
    normalises the vLLM config (:func:`vllm_ascend_plugin.xlite_graph.check_xlite_constraints`).
    """
    reason = _xlite_unavailable_reason()
    if reason is not None:
        raise AscendConfigError(f"{XliteGraphConfig._PATH}.enabled = True: {reason}")


@dataclass(frozen=True)
class CompilationDecision:
    """What the compiler runs for one effective cudagraph_mode (see :func:`resolve_compilation`).

    Attributes:
        npugraph_ex: run the npugraph_ex optimizer (compile-time only; ACLGraph captures).
        static_kernel: compile static kernels (only ever True together with ``npugraph_ex``).
        fusion_passes: the fusions to run, ascend_npugraph_ex pass names in pass order
            (``"add_rms_norm"``, ...): by npugraph_ex when it is on, as plain FX passes
            otherwise; empty for NONE.
        reasons: one human-readable line per decision (npugraph_ex, static kernel, fusions).
    """

    npugraph_ex: bool
    static_kernel: bool
    fusion_passes: tuple[str, ...]
    reasons: tuple[str, ...]


def resolve_compilation(
    config: AscendConfig, effective_mode: str | enum.Enum
) -> CompilationDecision:
    """Decide npugraph_ex, static kernels and fusion passes for the *effective* cudagraph_mode.

    ``effective_mode`` is the mode after vLLM's and the platform's narrowing: a name ("NONE",
    "PIECEWISE", "FULL", "FULL_DECODE_ONLY", "FULL_AND_PIECEWISE", any case), or an enum member
    with one of those names (``ascend_aclgraph.GraphMode``, vLLM's ``CUDAGraphMode``).

    Rules (those of the vLLM Ascend graph mode guide, and of vllm-ascend's platform):

    - FULL / FULL_DECODE_ONLY: npugraph_ex on unless ``enable_npugraph_ex=False``, which keeps
      the plain fusion passes only. Static kernels when requested.
    - PIECEWISE / FULL_AND_PIECEWISE: npugraph_ex off, even when explicitly enabled (it needs the
      whole FX graph, which piecewise compilation splits); plain fusion passes only.
    - NONE: nothing is compiled; no npugraph_ex, no static kernels, no passes.
    - Static kernels only ever run when npugraph_ex does.

    Raises:
        ValueError: for a mode that is none of the five.
    """
    mode = _mode_name(effective_mode)
    compilation = config.ascend_compilation_config
    requested = compilation.enable_npugraph_ex
    full = mode in ("FULL", "FULL_DECODE_ONLY")
    where = f"cudagraph_mode {mode}"

    if full:
        npugraph_ex = requested is not False
        if requested is None:
            npx_reason = (
                f"npugraph_ex on: the default for {where} (it optimizes the whole FX graph at "
                "compile time, then ACLGraph captures the result)"
            )
        elif requested:
            npx_reason = (
                f"npugraph_ex on: enable_npugraph_ex=True ({where} runs it on the whole FX "
                "graph, then ACLGraph captures the result)"
            )
        else:
            npx_reason = (
                f"npugraph_ex off: enable_npugraph_ex=False; {where} runs only the plain "
                "fusion passes"
            )
    else:
        npugraph_ex = False
        if mode == "NONE":
            why = f"{where} runs the model eagerly and compiles nothing"
        else:
            why = (
                f"{where} splits the FX graph for piecewise capture and npugraph_ex needs the "
                "whole graph, so only the plain fusion passes run"
            )
        if requested:
            # vllm-ascend forces enable_npugraph_ex=False in these modes; we do the same, loudly.
            npx_reason = (
                f"npugraph_ex off: the explicit enable_npugraph_ex=True is overridden: {why} "
                "(npugraph_ex runs in FULL and FULL_DECODE_ONLY; set cudagraph_mode to one of "
                "them to use it)"
            )
        elif requested is False:
            npx_reason = f"npugraph_ex off: enable_npugraph_ex=False, and {why}"
        elif mode == "NONE":
            npx_reason = f"npugraph_ex off: {why}"
        else:
            npx_reason = (
                f"npugraph_ex off: {where} runs only the plain fusion passes (npugraph_ex runs "
                "in FULL and FULL_DECODE_ONLY)"
            )

    static_kernel = compilation.enable_static_kernel and npugraph_ex
    if not compilation.enable_static_kernel:
        static_reason = "static kernel off: enable_static_kernel is False (it is opt-in)"
    elif static_kernel:
        static_reason = (
            "static kernel on: enable_static_kernel=True (kernels are compiled per capture size "
            "at start-up, or reused from the cache)"
        )
    else:
        static_reason = (
            "static kernel off: the explicit enable_static_kernel=True is overridden: static "
            f"kernels are compiled by npugraph_ex, which is off in {where}"
        )

    if mode == "NONE":
        fusion_passes: tuple[str, ...] = ()
        fusion_reason = f"fusion passes: none, {where} compiles nothing"
    elif not npugraph_ex:
        # The fusions are npugraph_ex's passes. vLLM's own post-grad fusion passes (the plain
        # passes a graph gets without npugraph_ex) exist for CUDA-alike platforms only.
        fusion_passes = ()
        fusion_reason = (
            f"fusion passes: none, npugraph_ex is off in {where} and vLLM's plain post-grad "
            "fusion passes exist for CUDA only"
        )
    else:
        fusion_passes = compilation.enabled_fusions()
        runner = "run by npugraph_ex"
        switched_off = [f"fuse_{name}" for name in _FUSIONS if name not in fusion_passes]
        listed = ", ".join(fusion_passes) if fusion_passes else "none"
        fusion_reason = f"fusion passes ({runner}): {listed}"
        if switched_off:
            fusion_reason += f" (switched off: {', '.join(switched_off)})"

    return CompilationDecision(
        npugraph_ex=npugraph_ex,
        static_kernel=static_kernel,
        fusion_passes=fusion_passes,
        reasons=(npx_reason, static_reason, fusion_reason),
    )


# ---------------------------------------------------------------------------------------------
# helpers

# Once per process: the platform, the compiler and each worker parse the same config; one warning
# is enough, and workers re-parse the folded dict (to_additional_config) anyway.
_torchair_warned = False


def _warn_torchair_once(enabled: bool) -> None:
    global _torchair_warned
    if _torchair_warned:
        return
    _torchair_warned = True
    if enabled:
        maps_to = (
            '{"enabled": true} maps to graph mode through ACLGraph + npugraph_ex, i.e. '
            "additional_config.ascend_compilation_config.enable_npugraph_ex=True (npugraph_ex "
            "runs when compilation_config.cudagraph_mode is FULL or FULL_DECODE_ONLY); use "
            '{"ascend_compilation_config": {"enable_npugraph_ex": true}} instead'
        )
    else:
        maps_to = '{"enabled": false} maps to nothing; remove it'
    message = (
        "additional_config.torchair_graph_config is deprecated: vllm-ascend removed TorchAir "
        f"graph mode; {maps_to}"
    )
    # DeprecationWarning is hidden by default outside __main__, hence the log line as well.
    warnings.warn(message, DeprecationWarning, stacklevel=2)
    logger.warning(message)


def _torchair_enabled(section: object) -> bool | None:
    """``enabled`` of a well-formed torchair section, or None if it is malformed."""
    if isinstance(section, TorchairGraphConfig):
        return section.enabled
    if not isinstance(section, Mapping) or set(section) - {"enabled"}:
        return None
    enabled = section.get("enabled", False)
    return enabled if isinstance(enabled, bool) else None


def _xlite_unavailable_reason() -> str | None:
    try:
        importlib.import_module("ascend_xlite_adapter")
    except ImportError as exc:
        return (
            "the XliteGraph adapter (package ascend-xlite-adapter, module ascend_xlite_adapter) "
            f"is not installed ({exc}); install it (pip install ascend-xlite-adapter), or "
            "accepted: false (the default)"
        )
    return None


def _mode_name(mode: object) -> str:
    if isinstance(mode, enum.Enum):
        name: object = mode.name
    elif isinstance(mode, str):
        name = mode.strip().upper()
    else:
        name = None
    if name not in _GRAPH_MODES:
        raise ValueError(
            f"unknown cudagraph_mode {mode!r}; accepted values: {', '.join(_GRAPH_MODES)}"
        )
    return name


def _conflict(key: str, value: object, reason: str) -> PydanticCustomError:
    return PydanticCustomError(
        _CONFLICT, "{reason}", {"key": key, "value": _show(value), "reason": reason}
    )


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 120 else f"{text[:117]}..."


def _accepted_keys(model: type[_ConfigModel]) -> str:
    return ", ".join(model.model_fields)


def _nested_model(model: type[_ConfigModel], key: str) -> type[_ConfigModel] | None:
    field = model.model_fields.get(key)
    if field is None:
        return None
    for candidate in (field.annotation, *typing.get_args(field.annotation)):
        if isinstance(candidate, type) and issubclass(candidate, _ConfigModel):
            return candidate
    return None


def _model_at(root: type[_ConfigModel], loc: tuple[str, ...]) -> type[_ConfigModel] | None:
    model: type[_ConfigModel] | None = root
    for key in loc:
        if model is None:
            return None
        model = _nested_model(model, key)
    return model


def _translate(exc: ValidationError, root: type[_ConfigModel]) -> AscendConfigError:
    return AscendConfigError(*(_describe(error, root) for error in exc.errors(include_url=False)))


def _describe(error: ErrorDetails, root: type[_ConfigModel]) -> str:
    loc = tuple(str(part) for part in error["loc"])
    kind = error["type"]
    value = _show(error.get("input"))
    ctx = error.get("ctx") or {}

    if kind == _CONFLICT:
        path = ".".join((root._PATH, *loc, ctx["key"]))
        return f"{path} = {ctx['value']}: {ctx['reason']}"

    path = ".".join((root._PATH, *loc))
    if kind in ("extra_forbidden", "invalid_key"):
        section = _model_at(root, loc[:-1])
        if section is None:  # not reachable with this schema; keep pydantic's words
            return f"{path} = {value}: {error['msg']}"
        section_path = ".".join((root._PATH, *loc[:-1]))
        accepted = f"accepted keys of {section_path}: {_accepted_keys(section)}"
        if kind == "invalid_key":
            return f"{section_path} has the key {value}: keys must be strings; {accepted}"
        what = section._REJECTED.get(loc[-1], "unknown key")
        return f"{path} = {value}: {what}; {accepted}"

    nested = _model_at(root, loc)
    nullable = _nullable(root, loc)
    if kind == "bool_type":
        expected = "expected true or false"
        if nullable:
            expected += " (or null: the default for the cudagraph_mode)"
    elif kind in ("model_type", "dict_type", "model_attributes_type") and nested is not None:
        expected = f"expected an object (dict) with the keys {_accepted_keys(nested)}"
        if nullable:
            expected += ", or null"
    else:
        expected = error["msg"]
    return f"{path} = {value}: {expected}"


def _nullable(root: type[_ConfigModel], loc: tuple[str, ...]) -> bool:
    parent = _model_at(root, loc[:-1]) if loc else None
    if parent is None:
        return False
    field = parent.model_fields.get(loc[-1])
    return field is not None and type(None) in typing.get_args(field.annotation)
