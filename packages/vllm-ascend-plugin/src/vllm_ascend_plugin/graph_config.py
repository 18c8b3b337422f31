"""Config normalisation for graph mode: what both platforms' ``check_and_update_config`` do.

vllm-ascend's ``NPUPlatform.check_and_update_config`` turns the user's ``compilation_config`` and
``additional_config`` into one consistent decision, before any model is built. This is ours,
shared by the NPU platform and the CPU twin:

1. parse ``additional_config`` (:mod:`vllm_ascend_plugin.config`): a bad key fails ``LLM()`` /
   ``vllm serve`` here, with one message;
2. ``enforce_eager``, LoRA or a compilation mode other than ``VLLM_COMPILE``: graph mode NONE,
   nothing captured;
3. otherwise ``VLLM_COMPILE`` with our compiler
   (:class:`~vllm_ascend_plugin.compiler.AscendCompiler`), the capture sizes the user or vLLM
   chose, and the graph split as the mode needs:
   FULL / FULL_DECODE_ONLY compile one whole graph (npugraph_ex sees the whole model; attention
   runs inside the FULL graph), the piecewise modes split at attention;
4. the effective graph mode, resolved by ascend_aclgraph's resolver from the requested one and
   the platform attention backend's declared support, each narrowing logged once with its cause
   (the model runner resolves again with the backends it really built, and says so if the
   answer differs);
5. the npugraph_ex decision for that mode, written back into ``additional_config`` so that every
   worker process compiles the same way.

It must be idempotent: vLLM's engine core runs the config setup a second time on the already
updated config.
"""

from __future__ import annotations

import logging
import os
import shlex
from dataclasses import dataclass
from typing import Any

import ascend_aclgraph as ag
from vllm.config import CompilationMode, CUDAGraphMode, VllmConfig

from vllm_ascend_plugin.config import (
    AscendConfig,
    CompilationDecision,
    parse_additional_config,
    resolve_compilation,
)

__all__ = [
    "GRAPH_DECISION_KEY",
    "GraphDecision",
    "SavedGraphConfig",
    "configure_graph_mode",
    "explain_command",
    "graph_decision",
    "our_additional_config",
]

# Under vLLM's logger, so that vLLM's logging configuration (format, level) shows our lines.
logger = logging.getLogger(f"vllm.{__name__}")

#: Where the resolved decision travels to worker processes, inside ``additional_config``.
GRAPH_DECISION_KEY = "_vllm_ascend_plugin_graph_decision"

_logged: set[str] = set()


def _log_once(level: int, line: str) -> None:
    if line not in _logged:
        _logged.add(line)
        logger.log(level, "%s", line)


@dataclass(frozen=True)
class SavedGraphConfig:
    """What vLLM's CPU platform erases in its ``check_and_update_config``, saved before it runs."""

    mode: CompilationMode | None
    capture_sizes: tuple[int, ...]
    max_capture_size: int | None

    @classmethod
    def take(cls, vllm_config: VllmConfig) -> SavedGraphConfig:
        cc = vllm_config.compilation_config
        return cls(
            mode=cc.mode,
            capture_sizes=tuple(cc.cudagraph_capture_sizes or ()),
            max_capture_size=cc.max_cudagraph_capture_size,
        )


@dataclass(frozen=True)
class GraphDecision:
    """The graph mode a configuration gets, and how its graphs are compiled."""

    requested: str
    effective: str
    reasons: tuple[str, ...]
    # The mode handed to the resolver: the request, or what the Xlite path imposed instead.
    resolved_from: str
    attention_support: str
    attention_split: bool
    compilation: CompilationDecision

    def to_json(self) -> dict[str, Any]:
        return {
            "requested": self.requested,
            "effective": self.effective,
            "resolved_from": self.resolved_from,
            "reasons": list(self.reasons),
            "attention_support": self.attention_support,
            "attention_split": self.attention_split,
        }


def explain_command(requested: str, support: str, split: bool, query_len: int = 1) -> str:
    """The ``ascend-graph explain`` call that prints the decision for these settings."""
    args = ["ascend-graph", "explain", "--mode", requested, "--attention-support", support]
    args.append("--attention-split" if split else "--no-attention-split")
    if query_len != 1:
        args += ["--uniform-decode-query-len", str(query_len)]
    return shlex.join(args)


def _requested_mode(vllm_config: VllmConfig) -> str:
    cc = vllm_config.compilation_config
    mode = cc.cudagraph_mode
    return "NONE" if mode is None else str(mode.name)


def configure_graph_mode(
    vllm_config: VllmConfig,
    saved: SavedGraphConfig,
    *,
    attention_support: ag.AttentionSupport,
    native_forwards_for_fusion: bool,
    worker_cls: str | None,
    xlite_native: bool,
) -> GraphDecision | None:
    """Normalise ``vllm_config`` for graph mode in place (see the module docstring).

    ``attention_support`` is what the platform's attention backend declares;
    ``native_forwards_for_fusion``: the platform's fusion passes match vLLM's native (PyTorch)
    forwards of its custom ops, so those are switched on when a fusion runs;
    ``xlite_native``: the platform's XliteGraph executor is the native ``xlite._C`` (so it must
    import), not the reference executor. Returns ``None`` when there is no model config yet
    (vLLM builds partial configs).
    """
    ascend = parse_additional_config(_our_keys(vllm_config.additional_config))
    if vllm_config.model_config is None:
        return None
    if worker_cls is not None:
        vllm_config.parallel_config.worker_cls = worker_cls
    cc = vllm_config.compilation_config
    previous = graph_decision_json(vllm_config)
    # On the engine core's second pass the config already holds the effective mode: the
    # request is the one recorded by the first pass.
    requested = previous["requested"] if previous else _requested_mode(vllm_config)
    imposed = None
    if ascend.xlite_graph_config.enabled:
        from vllm_ascend_plugin.xlite_graph import check_xlite_constraints, xlite_graph_mode

        check_xlite_constraints(vllm_config, native=xlite_native)
        imposed = xlite_graph_mode(
            ascend.xlite_graph_config, speculative=vllm_config.speculative_config is not None
        )
        assert imposed is not None
        if imposed[0] == "NONE":
            # vllm-ascend does the same: nothing outside Xlite is compiled or captured.
            vllm_config.model_config.enforce_eager = True
        cc.cudagraph_mode = CUDAGraphMode[imposed[0]]
    graphs_possible = (
        not vllm_config.model_config.enforce_eager
        and vllm_config.lora_config is None
        and saved.mode == CompilationMode.VLLM_COMPILE
    )
    if not graphs_possible:
        cc.cudagraph_mode = CUDAGraphMode.NONE
        # The request is NONE itself (enforce_eager, LoRA, no VLLM_COMPILE), unless Xlite's
        # full mode made it so: then the user's request is kept and the reason says why.
        xlite_none = imposed if imposed is not None and imposed[0] == "NONE" else None
        decision = _decide(
            vllm_config,
            ascend,
            attention_support,
            requested if xlite_none else "NONE",
            xlite_none,
            split=False,
        )
        _write_back(vllm_config, ascend, decision)
        return decision

    from vllm_ascend_plugin.compiler import AscendCompiler

    _disable_aot_compile()
    cc.mode = CompilationMode.VLLM_COMPILE
    cc.backend = AscendCompiler.name
    # vLLM's O1+ defaults turn these on with a custom backend; their pass classes exist only on
    # CUDA-alike platforms (pass_manager.py), and they are CUDA quantization fusions anyway.
    cc.pass_config.fuse_norm_quant = False
    cc.pass_config.fuse_act_quant = False
    if saved.capture_sizes:
        cc.cudagraph_capture_sizes = list(saved.capture_sizes)
    if saved.max_capture_size is not None:
        cc.max_cudagraph_capture_size = saved.max_capture_size
    if cc.cudagraph_mode in (CUDAGraphMode.FULL, CUDAGraphMode.FULL_DECODE_ONLY) and (
        cc.splitting_ops is None
    ):
        # One whole graph: npugraph_ex optimizes the whole model and ACLGraph captures it
        # (vllm-ascend's _setup_compile_backend does the same).
        cc.splitting_ops = []
    split = cc.splitting_ops is None or len(cc.splitting_ops) > 0
    decision = _decide(vllm_config, ascend, attention_support, requested, imposed, split=split)
    cc.cudagraph_mode = CUDAGraphMode[decision.effective]
    if native_forwards_for_fusion and decision.compilation.npugraph_ex:
        # The fusion passes match PyTorch code: vLLM's custom ops must run their native
        # forwards (not the CPU C++ kernels) for the passes to see, and fuse, them.
        cc.custom_ops = ["none"]
    _write_back(vllm_config, ascend, decision)
    return decision


def _disable_aot_compile() -> None:
    """Turn off vLLM's AOT-compiled-function cache for our compiler (keep its graph cache).

    vLLM 0.32 rebuilds an AOT-compiled function from inductor's standalone artifacts only: with
    any other compiler the reloaded pieces are empty, and the second start with the same
    configuration failed (``'NoneType' object is not callable`` in the split graph). vLLM turns
    AOT compile off for its own ``eager`` backend for the same reason. The per-graph cache
    (``Directly load the compiled graph(s) ... from the cache``) keeps working: our compiler's
    ``load`` reruns the passes on the cached graph. Set in the front-end process, before the
    engine core and the workers are spawned, so all of them see it.
    """
    if os.environ.get("VLLM_USE_AOT_COMPILE") != "0":
        os.environ["VLLM_USE_AOT_COMPILE"] = "0"
        _log_once(
            logging.INFO,
            "VLLM_USE_AOT_COMPILE=0: vLLM reloads AOT-compiled functions only from inductor "
            "artifacts; the compiled-graph cache stays on",
        )


def _decide(
    vllm_config: VllmConfig,
    ascend: AscendConfig,
    support: ag.AttentionSupport,
    requested: str,
    imposed: tuple[str, str] | None,
    *,
    split: bool,
) -> GraphDecision:
    """Resolve ``requested`` (or the ``(mode, reason)`` the Xlite path imposed instead) against
    the platform's attention support."""
    cc = vllm_config.compilation_config
    previous = graph_decision_json(vllm_config)
    query_len = 1
    spec = vllm_config.speculative_config
    if spec is not None and spec.num_speculative_tokens:
        query_len = 1 + int(spec.num_speculative_tokens)
    resolved = imposed[0] if imposed else requested
    effective, resolver_reasons = ag.resolve_graph_mode(
        resolved,
        support,
        attention_is_split=split,
        uniform_decode_query_len=query_len,
        context_parallel=(
            vllm_config.parallel_config.prefill_context_parallel_size > 1
            or vllm_config.parallel_config.decode_context_parallel_size > 1
        ),
        encoder_decoder=bool(
            vllm_config.model_config is not None and vllm_config.model_config.is_encoder_decoder
        ),
        attention_backend=None,
        log=False,  # logged once below, with the explain command that reproduces it
    )
    reasons = ([imposed[1]] if imposed else []) + list(resolver_reasons)
    compilation = resolve_compilation(ascend, effective.name)
    if previous is not None:
        pass  # the engine core's second pass: the front end logged this decision already
    elif reasons or requested != effective.name:
        _log_once(
            logging.WARNING,
            f"graph mode {requested} -> {effective.name}: "
            + ("; ".join(reasons) or "unchanged")
            + f" (same answer: {explain_command(resolved, support.name, split, query_len)})",
        )
    else:
        _log_once(logging.INFO, f"graph mode {effective.name}")
    if previous is None:
        for line in compilation.reasons:
            _log_once(logging.INFO, line)
    del cc
    return GraphDecision(
        requested=requested,
        effective=effective.name,
        resolved_from=resolved,
        reasons=tuple(reasons),
        attention_support=support.name,
        attention_split=split,
        compilation=compilation,
    )


def our_additional_config(vllm_config: VllmConfig) -> dict[str, Any]:
    """The plugin's keys of ``vllm_config.additional_config`` (without the decision)."""
    return _our_keys(vllm_config.additional_config)


def _our_keys(additional_config: Any) -> dict[str, Any]:
    if not additional_config:
        return {}
    if not isinstance(additional_config, dict):
        raise TypeError(
            f"additional_config must be a JSON object (a dict), got "
            f"{type(additional_config).__name__}"
        )
    return {k: v for k, v in additional_config.items() if k != GRAPH_DECISION_KEY}


def _write_back(vllm_config: VllmConfig, ascend: AscendConfig, decision: GraphDecision) -> None:
    # Workers re-parse additional_config: give them the parsed form (deprecated aliases
    # already folded in, so they do not warn again) and the decision.
    merged = ascend.to_additional_config()
    merged[GRAPH_DECISION_KEY] = decision.to_json()
    vllm_config.additional_config = merged


def graph_decision_json(vllm_config: VllmConfig) -> dict[str, Any] | None:
    extra = vllm_config.additional_config
    if not isinstance(extra, dict) or GRAPH_DECISION_KEY not in extra:
        return None
    data: dict[str, Any] = extra[GRAPH_DECISION_KEY]
    return data


def graph_decision(vllm_config: VllmConfig) -> GraphDecision | None:
    """The decision the platform wrote into ``vllm_config`` (``None`` before it ran)."""
    data = graph_decision_json(vllm_config)
    if data is None:
        return None
    extra = vllm_config.additional_config
    ascend = parse_additional_config(_our_keys(extra))
    return GraphDecision(
        requested=data["requested"],
        effective=data["effective"],
        resolved_from=data["resolved_from"],
        reasons=tuple(data["reasons"]),
        attention_support=data["attention_support"],
        attention_split=bool(data["attention_split"]),
        compilation=resolve_compilation(ascend, data["effective"]),
    )
