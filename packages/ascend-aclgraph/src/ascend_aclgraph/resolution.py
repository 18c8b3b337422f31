"""Resolve a requested graph mode to the mode that can actually run.

vLLM narrows ``cudagraph_mode`` in two places: at config time, by the splitting ops
(``set_splitting_ops_for_v1``), and after the attention backends are built, by the weakest
backend's graph support (``resolve_cudagraph_mode_and_sizes``). vllm-ascend adds its own rules at
platform-config time, before both: encoder-decoder models and context parallel do not run FULL
graphs. :func:`resolve_graph_mode` applies all of them, in that pipeline order, and explains each
step.
"""

from __future__ import annotations

import logging

from ascend_aclgraph.attention_support import AttentionSupport, resolve_attention_support
from ascend_aclgraph.errors import GraphModeError
from ascend_aclgraph.modes import GraphMode

__all__ = ["resolve_graph_mode"]

logger = logging.getLogger(__name__)

_NO_PIECEWISE = "attention is not split, so PIECEWISE graphs are unavailable"


class _Narrowing:
    """The mode being resolved plus one reason per narrowing step so far."""

    def __init__(self, mode: GraphMode, log: bool) -> None:
        self.mode = mode
        self.log = log
        self.reasons: list[str] = []

    def to(self, new: GraphMode, cause: str) -> None:
        # One line per step, logged and returned verbatim, so the log and `explain` agree.
        line = f"{self.mode.name} narrowed to {new.name}: {cause}"
        if self.log:
            logger.warning("%s", line)
        self.reasons.append(line)
        self.mode = new


def _piecewise_or_none(attention_is_split: bool) -> GraphMode:
    return GraphMode.PIECEWISE if attention_is_split else GraphMode.NONE


def _check_query_len(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(
            f"uniform_decode_query_len must be an int >= 1 (1 + num_speculative_tokens), "
            f"got {value!r}"
        )
    return value


def resolve_graph_mode(
    requested: GraphMode | str,
    attention_support: AttentionSupport | str | None,
    *,
    attention_is_split: bool,
    uniform_decode_query_len: int = 1,
    context_parallel: bool = False,
    encoder_decoder: bool = False,
    attention_backend: str | None = None,
    log: bool = True,
) -> tuple[GraphMode, list[str]]:
    """Narrow ``requested`` to the graph mode that can run, and say why.

    Args:
        requested: the configured mode, a :class:`GraphMode` or its name in any case.
        attention_support: the *weakest* support level over all attention backends of the
            model, an :class:`AttentionSupport` or its name in any case; or ``None`` to take the
            level of ``attention_backend`` from
            :data:`~ascend_aclgraph.attention_support.ASCEND_ATTENTION_BACKENDS` (``ALWAYS`` if
            no backend is named). See
            :func:`~ascend_aclgraph.attention_support.resolve_attention_support`.
        attention_is_split: whether the compiled FX graph is split at the attention ops
            (vLLM's ``splitting_ops`` contain attention under ``VLLM_COMPILE``). Without the
            split there are no piecewise graphs.
        uniform_decode_query_len: ``1 + num_speculative_tokens``; above 1 is speculative decode.
        context_parallel: prefill or decode context parallelism is enabled.
        encoder_decoder: the model is an encoder-decoder model.
        attention_backend: name of the weakest backend, matched in any case. With an explicit
            ``attention_support`` it is only used in the explanations and may be any name;
            without one it must be a known Ascend backend.
        log: log each narrowing here. Integrations that resolve the same configuration in
            several processes or several times (vLLM's engine re-runs its config setup) pass
            ``False`` and log the returned reasons once themselves.

    Returns:
        ``(effective_mode, reasons)``: one reason per narrowing step, in order, each of the form
        ``"<FROM> narrowed to <TO>: <cause>"``. Unless ``log`` is false, the same line is logged
        once at WARNING level on this module's logger. An unchanged mode gives an empty list.

    Rules, applied once each in this fixed order (each sees the result of the previous ones):

    1. ``NONE`` stays ``NONE``; nothing else applies.
    2. Encoder-decoder model (vllm-ascend platform rule): a mode with FULL graphs becomes
       ``PIECEWISE`` if attention is split, else ``NONE``.
    3. Context parallel (vllm-ascend platform rule, FULL is not supported there yet): a mode
       with FULL graphs (``FULL``, ``FULL_DECODE_ONLY``, ``FULL_AND_PIECEWISE``) becomes
       ``PIECEWISE`` if attention is split, else ``NONE``. ``FULL_DECODE_ONLY`` is treated like
       vLLM treats it when FULL is impossible (rule 6): with a split graph the piecewise graphs
       cost no extra compilation, so mixed and decode batches both get them.
    4. Attention not split (vLLM ``set_splitting_ops_for_v1``): ``PIECEWISE`` becomes ``NONE``;
       ``FULL_AND_PIECEWISE`` becomes ``FULL`` (mixed batches are then captured as FULL graphs,
       which rule 5 checks against the attention support).
    5. FULL graphs of mixed batches (``mixed_mode() is FULL``, i.e. ``FULL``) need ``ALWAYS``.
       With ``NEVER`` this raises :class:`GraphModeError`; with a uniform level the mode becomes
       ``FULL_AND_PIECEWISE`` if attention is split, else ``FULL_DECODE_ONLY``.
    6. FULL decode graphs (``decode_mode() is FULL``) with ``NEVER`` support: ``PIECEWISE`` if
       attention is split, else ``NONE``.
    7. Speculative decode (``uniform_decode_query_len > 1``) with FULL decode graphs needs
       ``UNIFORM_BATCH`` or better; below it the mode becomes ``PIECEWISE`` if attention is
       split, else ``NONE``.

    Rules 5-7 are vLLM's ``resolve_cudagraph_mode_and_sizes`` rules 2-4. Its rule 5 (FULL graphs
    left with ``NEVER`` support raise) cannot trigger after rules 5 and 6, and its capture-size
    rounding for speculative decode is done by :class:`~ascend_aclgraph.GraphDispatcher`.

    Raises:
        ValueError: an unknown mode or support name, an unknown backend name without an
            explicit ``attention_support``, or a bad ``uniform_decode_query_len``.
        GraphModeError: the request cannot be narrowed to anything that keeps its meaning
            (``FULL`` graphs of mixed batches with an attention backend that supports
            ``NEVER``); the message says what to request instead.
    """
    original = GraphMode.parse(requested)
    support, _, backend_name = resolve_attention_support(attention_support, attention_backend)
    query_len = _check_query_len(uniform_decode_query_len)
    split = bool(attention_is_split)
    backend = f"attention backend {backend_name}" if backend_name else "the attention backend"
    no_piecewise = "" if split else f", and {_NO_PIECEWISE}"

    state = _Narrowing(original, log)
    if state.mode is GraphMode.NONE:
        return state.mode, state.reasons

    if encoder_decoder and state.mode.has_full_graphs():
        state.to(
            _piecewise_or_none(split),
            f"encoder-decoder models run PIECEWISE or NONE graphs only{no_piecewise}",
        )

    if context_parallel and state.mode.has_full_graphs():
        state.to(
            _piecewise_or_none(split),
            f"context parallel does not support FULL graphs{no_piecewise}",
        )

    if not split:
        if state.mode is GraphMode.PIECEWISE:
            state.to(GraphMode.NONE, _NO_PIECEWISE)
        elif state.mode is GraphMode.FULL_AND_PIECEWISE:
            state.to(
                GraphMode.FULL,
                "attention is not split, so mixed batches cannot run PIECEWISE graphs "
                "and are captured as FULL graphs",
            )

    if state.mode.mixed_mode() is GraphMode.FULL and support is not AttentionSupport.ALWAYS:
        if support is AttentionSupport.NEVER:
            raise GraphModeError(_never_message(original, state, backend, split))
        state.to(
            GraphMode.FULL_AND_PIECEWISE if split else GraphMode.FULL_DECODE_ONLY,
            f"{backend} supports {support.name} only; FULL graphs of mixed prefill/decode "
            f"batches need ALWAYS",
        )

    if state.mode.decode_mode() is GraphMode.FULL and support is AttentionSupport.NEVER:
        state.to(
            _piecewise_or_none(split),
            f"{backend} supports NEVER, so no FULL graphs{no_piecewise}",
        )

    if (
        state.mode.decode_mode() is GraphMode.FULL
        and query_len > 1
        and support < AttentionSupport.UNIFORM_BATCH
    ):
        state.to(
            _piecewise_or_none(split),
            f"speculative decoding (uniform decode query length {query_len}) needs "
            f"UNIFORM_BATCH, {backend} supports {support.name} only{no_piecewise}",
        )

    return state.mode, state.reasons


def _never_message(original: GraphMode, state: _Narrowing, backend: str, split: bool) -> str:
    via = (
        ""
        if original is state.mode
        else f" (requested {original.name}; {'; '.join(state.reasons)})"
    )
    fix = (
        "request PIECEWISE (attention runs eagerly between piecewise graphs) or NONE"
        if split
        else "request NONE, or split the compiled graph at attention (piecewise compilation) "
        "and request PIECEWISE"
    )
    return (
        f"{state.mode.name} graphs capture attention for mixed prefill/decode batches, but "
        f"{backend} supports NEVER{via}. Fix: {fix}."
    )
