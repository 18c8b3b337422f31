"""Weight slots: the model's own tensors, arranged the way Xlite's ``Model`` takes them.

Nothing here copies a weight. Every tensor is either a parameter of the source model or a view
of one, so the slots and the model share storage and a weight update (or a device move done
in place) is seen by both.

Xlite wants some weights fused: q/k/v in one ``[q | k | v]`` matrix (``mha_qkv``), gate and up
in one ``[gate | up]`` matrix (``mlp_up_gate``, ``re_up_gate``). vLLM's modules already keep
them fused (``qkv_proj``, ``gate_up_proj``, ``w13_weight``), so the slot holds the fused tensor
and its parts are views into it. transformers keeps q/k/v and dense gate/up as separate
tensors; then the slot holds the parts only, and :meth:`XliteWeights.to_slots` refuses (or, when
asked, makes the one copy that fusing needs).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ascend_xlite_adapter.errors import WeightCopyRequiredError

__all__ = [
    "FusedWeight",
    "LayerWeights",
    "XliteWeights",
]


@dataclass(frozen=True, eq=False)
class FusedWeight:
    """A weight Xlite takes as one fused tensor, kept as the model holds it.

    Attributes:
        parts: the pieces in Xlite's order (q, k, v or gate, up), each ``[out_i, in]`` (or
            ``[out_i]`` for a bias). When :attr:`fused` exists they are views into it
            (transposed views if the fused tensor is stored transposed).
        fused: the model's own fused tensor when it has one, in the layout Xlite gets:
            ``[sum(out_i), in]``, or ``[in, sum(out_i)]`` when :attr:`transposed`.
        transposed: whether :attr:`fused` is stored input-major (vllm-ascend's expert layout).
    """

    parts: tuple[torch.Tensor, ...]
    fused: torch.Tensor | None = None
    transposed: bool = False

    @classmethod
    def from_fused(
        cls, fused: torch.Tensor, sizes: Sequence[int], *, transposed: bool = False
    ) -> FusedWeight:
        """Split a fused tensor into views of ``sizes`` along its output dim (no copy)."""
        out_dim = fused.dim() - 1 if transposed else 0
        if fused.shape[out_dim] != sum(sizes):
            raise ValueError(
                f"fused weight of shape {tuple(fused.shape)} has {fused.shape[out_dim]} outputs "
                f"along dim {out_dim}; expected {sum(sizes)} = {' + '.join(map(str, sizes))}"
            )
        pieces = torch.split(fused, list(sizes), dim=out_dim)
        # Parts are always [out, in]: a transposed fused tensor yields transposed views.
        parts = tuple(p.transpose(0, 1) if transposed else p for p in pieces)
        return cls(parts=parts, fused=fused, transposed=transposed)

    @property
    def sizes(self) -> tuple[int, ...]:
        """Output size of each part."""
        return tuple(p.shape[0] for p in self.parts)

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """Every tensor this slot references (the fused one, else the parts)."""
        return (self.fused,) if self.fused is not None else self.parts

    def as_fused(self, *, allow_copy: bool = False, name: str = "weight") -> torch.Tensor:
        """The fused tensor Xlite takes; without one, a concatenation only if ``allow_copy``."""
        if self.fused is not None:
            return self.fused
        if not allow_copy:
            raise WeightCopyRequiredError(
                f"{name}: the model keeps {len(self.parts)} separate tensors where Xlite takes "
                "one fused tensor, and fusing them would copy the weights; load the model with "
                "fused projections (vLLM's qkv_proj / gate_up_proj) or pass allow_copy=True"
            )
        return torch.cat(self.parts, dim=0)

    def linear(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``x`` times each part (``F.linear``), through the fused tensor when there is one.

        Going through :attr:`fused` (one matmul, then a split) is what Xlite computes, so the
        reference executor checks the fused tensor and the split sizes, not just the views.
        """
        if self.fused is None:
            return tuple(F.linear(x, p) for p in self.parts)
        y = x @ self.fused if self.transposed else F.linear(x, self.fused)
        return tuple(torch.split(y, list(self.sizes), dim=-1))

    def bias(self) -> torch.Tensor:
        """The parts of a fused bias as one vector (a view when :attr:`fused` exists)."""
        if self.fused is not None:
            return self.fused
        return torch.cat(self.parts)


@dataclass(frozen=True, eq=False)
class LayerWeights:
    """One decoder layer's slots, named after ``xlite._C.Model``'s per-layer lists.

    A dense layer has :attr:`mlp_up_gate` and :attr:`mlp_down`; an MoE layer has :attr:`gate`,
    :attr:`re_up_gate` and :attr:`re_down` (one entry per expert) instead.
    """

    attn_norm: torch.Tensor
    mha_qkv: FusedWeight
    attn_out: torch.Tensor
    mlp_norm: torch.Tensor
    mha_qkv_bias: FusedWeight | None = None
    mha_q_norm: torch.Tensor | None = None
    mha_k_norm: torch.Tensor | None = None
    mlp_up_gate: FusedWeight | None = None
    mlp_down: torch.Tensor | None = None
    gate: torch.Tensor | None = None
    re_up_gate: tuple[FusedWeight, ...] = ()
    re_down: tuple[torch.Tensor, ...] = ()

    @property
    def is_moe(self) -> bool:
        """Whether this layer's MLP is a routed mixture of experts."""
        return self.gate is not None

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor the slots of this layer reference."""
        out: list[torch.Tensor] = [self.attn_norm, *self.mha_qkv.tensors(), self.attn_out]
        out.append(self.mlp_norm)
        if self.mha_qkv_bias is not None:
            out.extend(self.mha_qkv_bias.tensors())
        out.extend(t for t in (self.mha_q_norm, self.mha_k_norm) if t is not None)
        if self.mlp_up_gate is not None:
            out.extend(self.mlp_up_gate.tensors())
        out.extend(t for t in (self.mlp_down, self.gate) if t is not None)
        for up_gate in self.re_up_gate:
            out.extend(up_gate.tensors())
        out.extend(self.re_down)
        return out


@dataclass(frozen=True, eq=False)
class XliteWeights:
    """All weight slots of one model: embedding, final norm, LM head and the layers.

    Attributes:
        embed: ``[vocab(, padded), hidden]`` token embedding.
        norm: final RMSNorm weight.
        head: ``[vocab(, padded), hidden]`` LM head; the embedding itself when tied.
        layers: one :class:`LayerWeights` per decoder layer.
    """

    embed: torch.Tensor
    norm: torch.Tensor
    head: torch.Tensor
    layers: tuple[LayerWeights, ...]

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor referenced by a slot (for storage-sharing checks)."""
        out = [self.embed, self.norm, self.head]
        for layer in self.layers:
            out.extend(layer.tensors())
        return out

    def to_slots(self, *, allow_copy: bool = False) -> dict[str, torch.Tensor | list[torch.Tensor]]:
        """The attribute assignments of an ``xlite._C.Model``, by attribute name.

        Per-layer slots are lists over layers; ``mlp_up_gate`` / ``mlp_down`` list the dense
        layers only and ``gate`` the MoE layers; ``re_up_gate`` / ``re_down`` list every expert
        of every MoE layer in order (layer-major), which is how vllm-ascend hands them over.
        Optional slots (biases, q/k norms, MoE) appear only when the model has them.

        Raises:
            WeightCopyRequiredError: a fused slot has only separate parts and ``allow_copy`` is
                false (transformers-layout models).
        """
        slots: dict[str, torch.Tensor | list[torch.Tensor]] = {
            "embed": self.embed,
            "norm": self.norm,
            "head": self.head,
            "attn_norm": [lw.attn_norm for lw in self.layers],
            "attn_out": [lw.attn_out for lw in self.layers],
            "mha_qkv": [
                lw.mha_qkv.as_fused(allow_copy=allow_copy, name=f"layers[{i}].mha_qkv")
                for i, lw in enumerate(self.layers)
            ],
            "mlp_norm": [lw.mlp_norm for lw in self.layers],
        }
        biases = [lw.mha_qkv_bias for lw in self.layers if lw.mha_qkv_bias is not None]
        if biases:
            slots["mha_qkv_bias"] = [
                b.as_fused(allow_copy=allow_copy, name=f"layers[{i}].mha_qkv_bias")
                for i, b in enumerate(biases)
            ]
        q_norms = [lw.mha_q_norm for lw in self.layers if lw.mha_q_norm is not None]
        k_norms = [lw.mha_k_norm for lw in self.layers if lw.mha_k_norm is not None]
        if q_norms:
            slots["mha_q_norm"] = q_norms
            slots["mha_k_norm"] = k_norms
        dense = [(i, lw) for i, lw in enumerate(self.layers) if not lw.is_moe]
        if dense:
            up_gates: list[torch.Tensor] = []
            downs: list[torch.Tensor] = []
            for i, lw in dense:
                assert lw.mlp_up_gate is not None
                assert lw.mlp_down is not None
                name = f"layers[{i}].mlp_up_gate"
                up_gates.append(lw.mlp_up_gate.as_fused(allow_copy=allow_copy, name=name))
                downs.append(lw.mlp_down)
            slots["mlp_up_gate"] = up_gates
            slots["mlp_down"] = downs
        moe = [(i, lw) for i, lw in enumerate(self.layers) if lw.is_moe]
        if moe:
            gates: list[torch.Tensor] = []
            re_up_gate: list[torch.Tensor] = []
            re_down: list[torch.Tensor] = []
            for i, lw in moe:
                assert lw.gate is not None
                gates.append(lw.gate)
                for e, up_gate in enumerate(lw.re_up_gate):
                    name = f"layers[{i}].re_up_gate[{e}]"
                    re_up_gate.append(up_gate.as_fused(allow_copy=allow_copy, name=name))
                re_down.extend(lw.re_down)
            slots["gate"] = gates
            slots["re_up_gate"] = re_up_gate
            slots["re_down"] = re_down
        return slots
