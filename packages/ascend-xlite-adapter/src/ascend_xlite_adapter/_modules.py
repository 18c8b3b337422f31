"""Finding weights in a model's module tree, for both transformers and vLLM layouts.

The two layouts share most names (``model.embed_tokens``, ``layers[i].self_attn.o_proj``,
``input_layernorm``, ...) and differ where vLLM fuses projections:

==============  ======================================  ====================================
slot            vLLM                                    transformers
==============  ======================================  ====================================
q/k/v           ``self_attn.qkv_proj.weight`` [q|k|v]   ``self_attn.{q,k,v}_proj.weight``
dense gate/up   ``mlp.gate_up_proj.weight`` [gate|up]   ``mlp.{gate,up}_proj.weight``
expert gate/up  ``mlp.experts.w13_weight`` [E, 2I, H]   ``mlp.experts.gate_up_proj`` (>= 5),
                                                        ``experts[e].{gate,up}_proj`` (< 5)
expert down     ``mlp.experts.w2_weight`` [E, H, I]     ``mlp.experts.down_proj`` (>= 5),
                                                        ``experts[e].down_proj`` (< 5)
text decoder    ``language_model.model`` (VL)           ``model.language_model`` (VL)
==============  ======================================  ====================================

vLLM 0.32 moved the fused expert tensors under the MoE runner:
``mlp.experts.routed_experts.w13_weight``; both places are read.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ascend_xlite_adapter.config import XliteModelConfig
from ascend_xlite_adapter.errors import MissingWeightError, UnsupportedModelError
from ascend_xlite_adapter.weights import FusedWeight, LayerWeights

__all__ = [
    "TextModelModules",
    "attr",
    "check_consistent_layers",
    "expert_slots",
    "find_text_model",
    "fused_or_parts",
    "missing_qkv",
    "require_tensor",
    "tensor",
]

# Where the text decoder (embed_tokens, layers, norm) lives, tried in order: vLLM VL models,
# transformers VL models, every causal LM of both libraries, a bare decoder.
_DECODER_PATHS = ("language_model.model", "model.language_model", "model", "")
# Where the LM head lives: vLLM VL models keep it inside the language model.
_HEAD_PATHS = ("language_model.lm_head", "lm_head")


def attr(obj: object, path: str) -> object | None:
    """``obj.a.b.c`` for ``path="a.b.c"``; ``None`` where any step is missing or ``None``."""
    cur: object | None = obj
    for name in path.split(".") if path else ():
        if cur is None:
            return None
        cur = getattr(cur, name, None)
    return cur


def tensor(obj: object, path: str) -> torch.Tensor | None:
    """The tensor at ``path`` under ``obj``, or ``None`` (absent, or not a tensor)."""
    value = attr(obj, path)
    return value if isinstance(value, torch.Tensor) else None


@dataclass(frozen=True, eq=False)
class TextModelModules:
    """The parts of a model the adapter reads.

    Attributes:
        decoder_path: dotted path of the text decoder under the root (for messages).
        embed: token embedding weight.
        norm: final norm weight.
        head: LM head weight, or ``None`` where the model has none (tied, or a bare decoder).
        layers: the decoder layers, in order.
    """

    decoder_path: str
    embed: torch.Tensor
    norm: torch.Tensor
    head: torch.Tensor | None
    layers: tuple[nn.Module, ...]


def find_text_model(root: nn.Module) -> TextModelModules:
    """Locate the text decoder and LM head of a transformers or vLLM model.

    Raises:
        MissingWeightError: no known path holds a decoder with ``embed_tokens``, ``layers`` and
            ``norm``.
    """
    for path in _DECODER_PATHS:
        decoder = attr(root, path) if path else root
        layers = attr(decoder, "layers")
        embed = tensor(decoder, "embed_tokens.weight")
        norm = tensor(decoder, "norm.weight")
        if isinstance(layers, nn.ModuleList) and embed is not None and norm is not None:
            head = next(
                (h for p in _HEAD_PATHS if (h := tensor(root, f"{p}.weight")) is not None), None
            )
            return TextModelModules(
                decoder_path=path or "<root>",
                embed=embed,
                norm=norm,
                head=head,
                layers=tuple(layers),
            )
    tried = ", ".join(repr(p or "<root>") for p in _DECODER_PATHS)
    raise MissingWeightError(
        f"{type(root).__name__}: no text decoder found; looked for a module with embed_tokens, "
        f"layers and norm at {tried}"
    )


def _check_not_released(t: torch.Tensor, path: str, where: str) -> torch.Tensor:
    # vLLM's CPU platform repacks linear weights for oneDNN in process_weights_after_loading
    # and leaves an empty `.weight` behind: say so instead of reporting a shape mismatch.
    if t.numel() == 0:
        raise MissingWeightError(
            f"{where}: {path} is empty (its storage was released; vLLM's CPU platform does this "
            "when it repacks linear weights after loading): adapt the model before "
            "process_weights_after_loading, or on a platform that keeps its weights"
        )
    return t


def require_tensor(obj: object, path: str, where: str) -> torch.Tensor:
    """The tensor at ``path`` under ``obj``; ``where`` prefixes the error when it is absent."""
    value = tensor(obj, path)
    if value is None:
        raise MissingWeightError(f"{where}: no tensor at {path}")
    return _check_not_released(value, path, where)


def missing_qkv(where: str) -> FusedWeight:
    """Raise the error for a layer with neither attention layout (typed to fit an expression)."""
    raise MissingWeightError(
        f"{where}.self_attn: expected qkv_proj.weight (vLLM) or q_proj.weight, k_proj.weight "
        "and v_proj.weight (transformers)"
    )


def fused_or_parts(
    parent: object,
    fused_name: str,
    part_names: tuple[str, ...],
    sizes: tuple[int, ...],
    where: str,
    *,
    kind: str = "weight",
) -> FusedWeight | None:
    """A fused slot from ``parent.<fused_name>.<kind>`` (views) or the separate parts.

    ``None`` when neither exists (an absent bias); a partial set of parts is an error.
    """
    fused = tensor(parent, f"{fused_name}.{kind}")
    if fused is not None:
        _check_not_released(fused, f"{fused_name}.{kind}", where)
        try:
            return FusedWeight.from_fused(fused, sizes)
        except ValueError as exc:
            raise MissingWeightError(f"{where}: {fused_name}.{kind}: {exc}") from None
    parts = [tensor(parent, f"{name}.{kind}") for name in part_names]
    present = [t for t in parts if t is not None]
    if not present:
        return None
    if len(present) != len(parts):
        missing = [n for n, t in zip(part_names, parts, strict=True) if t is None]
        raise MissingWeightError(f"{where}: {', '.join(missing)}.{kind} missing")
    return FusedWeight(parts=tuple(present))


def expert_slots(
    experts: object, inter: int, config: XliteModelConfig, where: str
) -> tuple[tuple[FusedWeight, ...], tuple[torch.Tensor, ...]]:
    """Per-expert (gate|up, down) slots from a fused 3-D layout or a list of expert MLPs."""
    hidden = config.hidden_size
    transposed = config.experts_weight_transpose
    # vLLM names the fused tensors w13/w2 (on `experts`, or since 0.32 on the MoE runner's
    # `experts.routed_experts`); transformers >= 5 names them gate_up_proj/down_proj.
    for owner, up_name, down_name in (
        ("", "w13_weight", "w2_weight"),
        ("routed_experts.", "w13_weight", "w2_weight"),
        ("", "gate_up_proj", "down_proj"),
    ):
        w13 = tensor(experts, owner + up_name)
        w2 = tensor(experts, owner + down_name)
        if w13 is None or w2 is None:
            continue
        up_shape = (hidden, 2 * inter) if transposed else (2 * inter, hidden)
        down_shape = (inter, hidden) if transposed else (hidden, inter)
        if w13.dim() != 3 or tuple(w13.shape[1:]) != up_shape or tuple(w2.shape[1:]) != down_shape:
            raise UnsupportedModelError(
                f"{where}.experts.{owner}{up_name} {tuple(w13.shape)} / {down_name} "
                f"{tuple(w2.shape)} do "
                f"not match [E, {up_shape[0]}, {up_shape[1]}] / [E, {down_shape[0]}, "
                f"{down_shape[1]}] for experts_weight_transpose={transposed}; set "
                "AdapterSettings.experts_weight_transpose to the layout the model has"
            )
        # vLLM may allocate more expert rows than this rank owns (EPLB redundancy).
        local = attr(experts, owner + "local_num_experts")
        n = int(local) if isinstance(local, int) else w13.shape[0]
        up_gate = tuple(
            FusedWeight.from_fused(w13[e], (inter, inter), transposed=transposed) for e in range(n)
        )
        return up_gate, tuple(w2[e] for e in range(n))
    if isinstance(experts, nn.ModuleList):
        # transformers < 5: one MLP module per expert, gate/up separate.
        if transposed:
            raise UnsupportedModelError(
                f"{where}.experts: per-expert modules are [out, in]; "
                "experts_weight_transpose=True does not apply"
            )
        up_gate_list: list[FusedWeight] = []
        down_list: list[torch.Tensor] = []
        for e, expert in enumerate(experts):
            fw = fused_or_parts(
                expert, "gate_up_proj", ("gate_proj", "up_proj"), (inter, inter), f"{where}[{e}]"
            )
            if fw is None:
                raise MissingWeightError(f"{where}.experts[{e}]: no gate_proj/up_proj weights")
            up_gate_list.append(fw)
            down_list.append(require_tensor(expert, "down_proj.weight", f"{where}.experts[{e}]"))
        return tuple(up_gate_list), tuple(down_list)
    raise MissingWeightError(
        f"{where}.experts: expected [routed_experts.]w13_weight/w2_weight (vLLM), "
        "gate_up_proj/down_proj "
        "(transformers >= 5) or a list of expert MLPs (transformers < 5)"
    )


def check_consistent_layers(layers: tuple[LayerWeights, ...]) -> None:
    # Xlite's qkv_bias / qk_norm are model-wide switches: every layer must agree.
    for name in ("mha_qkv_bias", "mha_q_norm"):
        have = [getattr(lw, name) is not None for lw in layers]
        if any(have) and not all(have):
            raise UnsupportedModelError(
                f"{name} exists in layers {[i for i, h in enumerate(have) if h]} only; Xlite "
                "takes it for every layer or none"
            )
