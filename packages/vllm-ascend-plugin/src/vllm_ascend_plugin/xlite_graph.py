"""XliteGraph inside vLLM: which batches Xlite runs, and the wrapper that routes them there.

``additional_config={"xlite_graph_config": {"enabled": true}}`` puts an :class:`XliteWrapper`
around the model (outside the FULL :class:`~vllm_ascend_plugin.graph_wrapper.ACLGraphWrapper`,
where vllm-ascend's ``XliteWrapper`` sits too). Each forward either runs Xlite's whole-model
forward or passes through to the wrapped model:

- decode-only (the default): pure decode batches run in Xlite; prefill and mixed batches run
  the ACLGraph path, whose mode is FULL_DECODE_ONLY (:func:`xlite_graph_mode`);
- ``full_mode``: every batch runs in Xlite and ACLGraph captures nothing.

Xlite writes the step's keys and values into vLLM's own KV cache (strided views in Xlite's
layout, given by the platform's attention backend), so either path can continue a request the
other one started. Dummy runs (memory profiling, graph capture) always take the wrapped model:
they warm up and capture the ACLGraph path, which Xlite does not replace.

The executor is the platform's: on an NPU the native ``xlite._C`` model, on the CPU twin the
adapter's :class:`~ascend_xlite_adapter.ReferenceExecutor`, which computes what Xlite's
contract describes in plain PyTorch.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import torch

from vllm_ascend_plugin.config import AscendConfig, AscendConfigError, XliteGraphConfig

__all__ = [
    "XliteCounters",
    "XliteExecutor",
    "XliteWrapper",
    "check_xlite_constraints",
    "xlite_graph_mode",
]

logger = logging.getLogger(f"vllm.{__name__}")  # shown by vLLM's logging set-up


class XliteExecutor(Protocol):
    """Xlite's ``Model.forward`` calls without the runtime and stream arguments.

    :class:`ascend_xlite_adapter.ReferenceExecutor` is one; the NPU platform wraps the native
    model and its runtime into another.
    """

    def forward(
        self,
        input: torch.Tensor,
        attn_meta: Any,
        kv_cache: Any,
        freqs_cis: torch.Tensor,
        output: torch.Tensor,
    ) -> None: ...

    def forward_with_inputs_embeds(
        self,
        input: torch.Tensor,
        attn_meta: Any,
        kv_cache: Any,
        freqs_cis: torch.Tensor,
        output: torch.Tensor,
        deepstack_input: Any = (),
    ) -> None: ...


def xlite_graph_mode(xlite: XliteGraphConfig, *, speculative: bool) -> tuple[str, str] | None:
    """The ACLGraph mode the Xlite path imposes, and why; ``None`` when Xlite is off.

    vllm-ascend's rule: decode-only Xlite leaves prefill and mixed batches to ACLGraph in
    FULL_DECODE_ONLY; full mode turns ACLGraph off (unless speculative decoding needs it for
    its draft steps).
    """
    if not xlite.enabled:
        return None
    if xlite.full_mode and not speculative:
        return "NONE", (
            "xlite_graph_config.full_mode: Xlite runs every batch, so ACLGraph captures nothing "
            "(eager outside Xlite)"
        )
    return "FULL_DECODE_ONLY", (
        "xlite_graph_config (decode-only): decode batches run in Xlite; prefill and mixed "
        "batches run the ACLGraph path in FULL_DECODE_ONLY"
    )


def check_xlite_constraints(vllm_config: Any, *, native: bool) -> None:
    """Refuse, before any weight loads, a configuration the Xlite path cannot serve.

    ``native``: the platform runs the native ``xlite._C`` (so it must import); the CPU twin's
    stand-in is the reference executor, which needs no package.

    Raises:
        AscendConfigError: naming each setting, its value and what is accepted.
    """
    from ascend_xlite_adapter import (
        UnsupportedArchitectureError,
        XliteConstraintError,
        check_constraints,
        get_adapter_class,
    )

    model_config = vllm_config.model_config
    parallel = vllm_config.parallel_config
    spec = vllm_config.speculative_config
    problems: list[str] = []
    try:
        check_constraints(
            pipeline_parallel_size=parallel.pipeline_parallel_size,
            prefill_context_parallel_size=parallel.prefill_context_parallel_size,
            decode_context_parallel_size=parallel.decode_context_parallel_size,
            num_speculative_tokens=None if spec is None else spec.num_speculative_tokens,
            block_size=int(vllm_config.cache_config.block_size or 0),
            quantization=model_config.quantization,
            xlite_importable=None if native else True,
        )
    except XliteConstraintError as exc:
        problems.append(str(exc))
    architectures = list(getattr(model_config, "architectures", None) or ())
    try:
        get_adapter_class(architectures[0] if architectures else "")
    except UnsupportedArchitectureError as exc:
        problems.append(str(exc))
    if problems:
        raise AscendConfigError(
            f"{XliteGraphConfig._PATH}.enabled = True cannot serve this configuration: "
            + "; ".join(problems)
        )


@dataclass
class XliteCounters:
    """Forward passes by route, for ``graph_report`` and the tests."""

    decode_steps: int = 0  # pure decode batches run by Xlite
    prefill_steps: int = 0  # prefill or mixed batches run by Xlite (full mode)
    fallback_steps: int = 0  # batches run by the wrapped model (ACLGraph path)


class XliteWrapper:
    """Routes each forward to Xlite or to the wrapped model (see the module docstring).

    Args:
        runnable: the model as the runner holds it (possibly inside an ACLGraphWrapper).
        vllm_config: the engine's config.
        ascend: the parsed ``additional_config``.
        executor_factory: builds the platform's executor from the adapted model.

    Before the first forward, :meth:`bind_attention` gives it the KV caches and the attention
    backend's metadata translation (both exist only once vLLM has built the attention
    backends and allocated the caches).
    """

    def __init__(
        self,
        runnable: Any,
        vllm_config: Any,
        ascend: AscendConfig,
        *,
        executor_factory: Callable[[Any], XliteExecutor],
    ) -> None:
        from ascend_xlite_adapter import AdapterSettings, adapt_model, precompute_freqs_cis

        self.runnable = runnable
        self.full_mode = ascend.xlite_graph_config.full_mode
        self.counters = XliteCounters()
        self._step_builder: Callable[[Any, torch.Tensor], tuple[bool, Any]] | None = None
        self._bypass = False
        self._kv_caches: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self._logged: set[str] = set()

        model_config = vllm_config.model_config
        scheduler = vllm_config.scheduler_config
        parallel = vllm_config.parallel_config
        settings = AdapterSettings.for_vllm(
            full_mode=self.full_mode,
            max_num_seqs=scheduler.max_num_seqs,
            max_num_batched_tokens=scheduler.max_num_batched_tokens,
            max_model_len=model_config.max_model_len,
            block_size=int(vllm_config.cache_config.block_size),
            tensor_parallel_size=parallel.tensor_parallel_size,
            data_parallel_size=parallel.data_parallel_size,
            enable_expert_parallel=parallel.enable_expert_parallel,
        )
        model = _innermost(runnable)
        self.adapted = adapt_model(
            model, model_config.hf_config, settings, architecture=model_config.architectures[0]
        )
        self.executor = executor_factory(self.adapted)
        device = self.adapted.weights.embed.device
        dtype = model_config.dtype
        self.freqs_cis = precompute_freqs_cis(self.adapted.config, dtype=dtype, device=device)
        self.hidden_states = torch.empty(
            scheduler.max_num_batched_tokens, self.adapted.config.hidden_size, dtype=dtype,
            device=device,
        )  # fmt: skip
        logger.info(
            "XliteGraph %s: %s adapted (%d layers), weights shared with vLLM's model",
            "full mode" if self.full_mode else "decode-only",
            self.adapted.architecture,
            self.adapted.config.n_layers,
        )

    # -- vLLM's model interface ----------------------------------------------------------------

    def __getattr__(self, name: str) -> Any:
        # compute_logits, get_input_embeddings, ... : the wrapped model's.
        return getattr(self.__dict__["runnable"], name)

    def unwrap(self) -> Any:
        """The wrapped model (an ACLGraphWrapper or the model itself)."""
        return self.runnable

    def bind_attention(
        self,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        step_builder: Callable[[Any, torch.Tensor], tuple[bool, Any]],
    ) -> None:
        """Give the wrapper vLLM's caches and the attention backend's metadata translation.

        Args:
            kv_caches: per layer, ``(keys, values)`` views of vLLM's caches in Xlite's layout.
            step_builder: ``(attention metadata, positions) -> (is_decode, Xlite AttnMeta)``.
        """
        if len(kv_caches) != self.adapted.config.n_layers:
            raise RuntimeError(
                f"XliteGraph: {len(kv_caches)} attention KV caches for a model of "
                f"{self.adapted.config.n_layers} layers"
            )
        self._kv_caches = kv_caches
        self._step_builder = step_builder

    @contextmanager
    def bypassed(self) -> Iterator[None]:
        """Run the wrapped model for every forward inside (dummy runs: profiling, capture)."""
        previous, self._bypass = self._bypass, True
        try:
            yield
        finally:
            self._bypass = previous

    def report(self) -> dict[str, Any]:
        return {"mode": "full" if self.full_mode else "decode-only", **asdict(self.counters)}

    def __call__(
        self,
        input_ids: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        intermediate_tensors: Any = None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> Any:
        from vllm.forward_context import get_forward_context

        def fallback() -> Any:
            self.counters.fallback_steps += 1
            return self.runnable(
                input_ids=input_ids,
                positions=positions,
                intermediate_tensors=intermediate_tensors,
                inputs_embeds=inputs_embeds,
                **kwargs,
            )

        if self._bypass:  # a dummy run: not a step, not counted
            return self.runnable(
                input_ids=input_ids,
                positions=positions,
                intermediate_tensors=intermediate_tensors,
                inputs_embeds=inputs_embeds,
                **kwargs,
            )
        metadata = get_forward_context().attn_metadata
        if (
            positions is None
            or intermediate_tensors is not None
            or not isinstance(metadata, dict)  # None (no attention) or micro-batches
            or not metadata
        ):
            return fallback()
        if self._step_builder is None or self._kv_caches is None:
            raise RuntimeError("XliteGraph: a forward with attention before bind_attention")
        is_decode, meta = self._step_builder(next(iter(metadata.values())), positions)
        if not (is_decode or self.full_mode):
            self._log_once("prefill and mixed batches run the ACLGraph path")
            return fallback()
        self._log_once("decode batches run in Xlite" if is_decode else "prefills run in Xlite")
        padded = (input_ids if input_ids is not None else inputs_embeds).shape[0]  # type: ignore[union-attr]
        if padded > self.hidden_states.shape[0]:
            raise RuntimeError(
                f"XliteGraph: a step of {padded} tokens exceeds max_num_batched_tokens "
                f"({self.hidden_states.shape[0]})"
            )
        out = self.hidden_states[:padded]
        if inputs_embeds is None:
            assert input_ids is not None
            self.executor.forward(input_ids, meta, self._kv_caches, self.freqs_cis, out)
        else:
            # Qwen3-VL's deepstack: the vision features added after the first layers.
            deepstack = [
                level[:padded] for level in getattr(self.runnable, "deepstack_input_embeds", ())
            ]
            self.executor.forward_with_inputs_embeds(
                inputs_embeds, meta, self._kv_caches, self.freqs_cis, out, deepstack
            )
            clear = getattr(self.runnable, "_clear_deepstack_input_embeds", None)
            if deepstack and clear is not None:
                clear(padded)
        if is_decode:
            self.counters.decode_steps += 1
        else:
            self.counters.prefill_steps += 1
        # Rows past the step's real tokens are padding, as in the model's own output.
        return out

    def _log_once(self, line: str) -> None:
        if line not in self._logged:
            self._logged.add(line)
            logger.info("XliteGraph: %s", line)


def _innermost(runnable: Any) -> Any:
    while hasattr(type(runnable), "unwrap"):
        runnable = runnable.unwrap()
    return runnable
