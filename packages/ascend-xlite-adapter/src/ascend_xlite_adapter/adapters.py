"""Adapters: one model family's modules + Hugging Face config -> Xlite config and weight slots.

An adapter reads a model through the module names transformers and vLLM share (see
``_modules.py`` for the table) and its HF config, and produces an :class:`AdaptedModel`: an
:class:`~ascend_xlite_adapter.config.XliteModelConfig` and
:class:`~ascend_xlite_adapter.weights.XliteWeights` that reference the model's own tensors.
Model features Xlite cannot express (sliding windows, scaled RoPE, biases it has no slot for)
are errors here, at adaptation time, not wrong numbers later.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import torch
from torch import nn

from ascend_xlite_adapter._modules import (
    TextModelModules,
    attr,
    check_consistent_layers,
    expert_slots,
    find_text_model,
    fused_or_parts,
    missing_qkv,
    require_tensor,
    tensor,
)
from ascend_xlite_adapter.config import (
    AdapterSettings,
    AttnType,
    ScoringFuncType,
    XliteModelConfig,
)
from ascend_xlite_adapter.errors import MissingWeightError, UnsupportedModelError
from ascend_xlite_adapter.weights import LayerWeights, XliteWeights

__all__ = [
    "AdaptedModel",
    "DenseAdapter",
    "Qwen3MoeAdapter",
    "Qwen3VLAdapter",
    "XliteAdapter",
    "text_config",
]

_MISSING = object()


def text_config(hf_config: Any) -> Any:
    """The text part of a HF config (``text_config`` of VL models, else the config itself)."""
    sub = getattr(hf_config, "text_config", None)
    return sub if sub is not None else hf_config


@dataclass(frozen=True, eq=False)
class AdaptedModel:
    """What an adapter produces: everything Xlite's ``Model.init`` needs, nothing copied.

    Attributes:
        architecture: the HF architecture name the adapter was chosen by.
        config: the Xlite model configuration.
        weights: the weight slots, sharing storage with the source model.
    """

    architecture: str
    config: XliteModelConfig
    weights: XliteWeights


class XliteAdapter:
    """Base class: maps one model family onto Xlite.

    Subclasses list the HF architecture names they serve in :attr:`architectures` and extend
    :meth:`build_config` / :meth:`build_layer`. Construct with the model (transformers or vLLM
    modules), its HF config (a ``PretrainedConfig`` or any object with the same attributes)
    and the serving :class:`~ascend_xlite_adapter.config.AdapterSettings`.
    """

    architectures: ClassVar[tuple[str, ...]] = ()

    def __init__(
        self,
        model: nn.Module,
        hf_config: Any,
        settings: AdapterSettings | None = None,
        *,
        architecture: str | None = None,
    ) -> None:
        self.model = model
        self.hf_config = hf_config
        self.text_config = text_config(hf_config)
        self.settings = settings if settings is not None else AdapterSettings()
        self.architecture = architecture or (self.architectures[0] if self.architectures else "")

    # -- config helpers -------------------------------------------------------------------

    def _cfg(self, name: str, default: Any = _MISSING) -> Any:
        value = getattr(self.text_config, name, default)
        if value is _MISSING:
            raise UnsupportedModelError(
                f"{self.architecture}: the HF config has no {name!r}, which the Xlite "
                "configuration needs"
            )
        return value

    def _rope_parameters(self) -> Mapping[str, Any]:
        # transformers >= 5 keeps RoPE settings (theta included) in `rope_parameters`; older
        # versions and vLLM's configs have `rope_theta` plus an optional `rope_scaling` dict.
        for name in ("rope_parameters", "rope_scaling"):
            value = getattr(self.text_config, name, None)
            if isinstance(value, Mapping):
                return value
        return {}

    def _unsupported(self, key: str, value: object, accepted: str) -> UnsupportedModelError:
        return UnsupportedModelError(
            f"{self.architecture}: config {key} = {value!r} is not supported by Xlite; "
            f"accepted: {accepted}"
        )

    def _check_text_config(self) -> None:
        act = self._cfg("hidden_act", "silu")
        if act != "silu":
            raise self._unsupported("hidden_act", act, "'silu' (Xlite's MLP is SwiGLU)")
        if getattr(self.text_config, "use_sliding_window", False):
            raise self._unsupported(
                "use_sliding_window", True, "False (Xlite attends over the whole sequence)"
            )
        layer_types = getattr(self.text_config, "layer_types", None) or ()
        other = sorted({t for t in layer_types if t != "full_attention"})
        if other:
            raise self._unsupported("layer_types", other, "only 'full_attention' layers")
        rope = self._rope_parameters()
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "mrope"):
            raise self._unsupported(
                "rope_parameters.rope_type",
                rope_type,
                "'default' (Xlite's RoPE table is unscaled RoPE over the full head_dim)",
            )
        factor = rope.get(
            "partial_rotary_factor", getattr(self.text_config, "partial_rotary_factor", 1.0)
        )
        if factor != 1.0:
            raise self._unsupported("partial_rotary_factor", factor, "1.0")

    def _rope_theta(self) -> float:
        rope = self._rope_parameters()
        theta = rope.get("rope_theta", getattr(self.text_config, "rope_theta", None))
        if theta is None:
            raise UnsupportedModelError(
                f"{self.architecture}: the HF config has neither rope_parameters['rope_theta'] "
                "nor rope_theta"
            )
        return float(theta)

    def _head_dim(self) -> int:
        head_dim = getattr(self.text_config, "head_dim", None)
        if head_dim is None:
            return int(self._cfg("hidden_size")) // int(self._cfg("num_attention_heads"))
        return int(head_dim)

    # -- the mapping ----------------------------------------------------------------------

    def build_config(self) -> XliteModelConfig:
        """The Xlite configuration for this model and settings (dense MHA; see subclasses)."""
        self._check_text_config()
        s = self.settings
        n_layers = int(self._cfg("num_hidden_layers"))
        head_dim = self._head_dim()
        max_m = s.max_m if s.max_m is not None else s.max_batch_size
        return XliteModelConfig(
            vocab_size=int(self._cfg("vocab_size")),
            hidden_size=int(self._cfg("hidden_size")),
            n_layers=n_layers,
            attn_type=AttnType.AttnMHA,
            n_heads=int(self._cfg("num_attention_heads")),
            n_kv_heads=int(
                self._cfg("num_key_value_heads", None) or self._cfg("num_attention_heads")
            ),
            head_dim=head_dim,
            rope_head_dim=head_dim,
            norm_eps=float(self._cfg("rms_norm_eps")),
            rope_theta=self._rope_theta(),
            softmax_scale=head_dim**-0.5,
            n_dense_layers=n_layers,
            intermediate_size=int(self._cfg("intermediate_size")),
            def_tp_size=s.tp_size,
            # A dense model under data parallelism is one independent replica per DP rank.
            def_dp_size=1,
            moe_ep_size=1,
            moe_tp_size=1,
            max_seq_len=s.max_seq_len or int(self._cfg("max_position_embeddings")),
            max_batch_size=s.max_batch_size,
            max_m=max_m,
            max_num_batched_tokens=s.max_num_batched_tokens or max_m,
            block_size=s.block_size,
            weight_nz=s.weight_nz,
        )

    def build_layer(self, index: int, layer: nn.Module, config: XliteModelConfig) -> LayerWeights:
        """One decoder layer's slots: attention, norms and the dense MLP."""
        where = f"layers[{index}]"
        attn = attr(layer, "self_attn")
        tp = config.def_tp_size
        q_size = config.n_heads // tp * config.head_dim
        # vLLM replicates KV heads when there are fewer than TP ranks.
        kv_size = max(1, config.n_kv_heads // tp) * config.head_dim
        qkv = fused_or_parts(
            attn, "qkv_proj", ("q_proj", "k_proj", "v_proj"), (q_size, kv_size, kv_size), where
        )
        qkv_bias = fused_or_parts(
            attn,
            "qkv_proj",
            ("q_proj", "k_proj", "v_proj"),
            (q_size, kv_size, kv_size),
            where,
            kind="bias",
        )
        if tensor(attn, "o_proj.bias") is not None:
            raise self._unsupported(
                "attention_bias (o_proj.bias)", True, "no o_proj bias (Xlite has no slot for it)"
            )
        q_norm = tensor(attn, "q_norm.weight")
        k_norm = tensor(attn, "k_norm.weight")
        if (q_norm is None) != (k_norm is None):
            raise MissingWeightError(f"{where}.self_attn: q_norm and k_norm must both exist")
        weights = LayerWeights(
            attn_norm=require_tensor(layer, "input_layernorm.weight", where),
            mha_qkv=qkv if qkv is not None else missing_qkv(where),
            mha_qkv_bias=qkv_bias,
            mha_q_norm=q_norm,
            mha_k_norm=k_norm,
            attn_out=require_tensor(layer, "self_attn.o_proj.weight", where),
            mlp_norm=require_tensor(layer, "post_attention_layernorm.weight", where),
        )
        return self.build_mlp(index, layer, config, weights)

    def build_mlp(
        self, index: int, layer: nn.Module, config: XliteModelConfig, weights: LayerWeights
    ) -> LayerWeights:
        """Add the dense SwiGLU MLP slots to ``weights``."""
        where = f"layers[{index}]"
        mlp = attr(layer, "mlp")
        inter = config.intermediate_size // config.def_tp_size
        up_gate = fused_or_parts(
            mlp, "gate_up_proj", ("gate_proj", "up_proj"), (inter, inter), where
        )
        if up_gate is None:
            raise MissingWeightError(
                f"{where}.mlp: expected gate_up_proj.weight (vLLM) or gate_proj.weight and "
                "up_proj.weight (transformers)"
            )
        for name in ("gate_up_proj", "gate_proj", "up_proj", "down_proj"):
            if tensor(mlp, f"{name}.bias") is not None:
                raise self._unsupported("mlp_bias", True, "no MLP biases (Xlite has no slot)")
        return replace(
            weights,
            mlp_up_gate=up_gate,
            mlp_down=require_tensor(layer, "mlp.down_proj.weight", where),
        )

    def build_weights(self, config: XliteModelConfig) -> XliteWeights:
        """All weight slots, checked against ``config``."""
        mods = find_text_model(self.model)
        if len(mods.layers) != config.n_layers:
            raise MissingWeightError(
                f"{mods.decoder_path}.layers has {len(mods.layers)} layers; the config says "
                f"num_hidden_layers = {config.n_layers}"
            )
        layers = tuple(self.build_layer(i, m, config) for i, m in enumerate(mods.layers))
        check_consistent_layers(layers)
        return XliteWeights(embed=mods.embed, norm=mods.norm, head=self._head(mods), layers=layers)

    def _head(self, mods: TextModelModules) -> torch.Tensor:
        if mods.head is not None:
            return mods.head
        tied = getattr(self.hf_config, "tie_word_embeddings", None)
        if tied is None:
            tied = getattr(self.text_config, "tie_word_embeddings", False)
        if tied:
            return mods.embed
        raise MissingWeightError(
            f"{type(self.model).__name__}: no lm_head.weight (or language_model.lm_head.weight) "
            "and tie_word_embeddings is false"
        )

    def adapt(self) -> AdaptedModel:
        """Build the configuration, then the weight slots; both reference the model."""
        config = self.build_config()
        weights = self.build_weights(config)
        config = replace(
            config,
            qkv_bias=weights.layers[0].mha_qkv_bias is not None,
            qk_norm=weights.layers[0].mha_q_norm is not None,
        )
        return AdaptedModel(architecture=self.architecture, config=config, weights=weights)


class DenseAdapter(XliteAdapter):
    """Llama, Qwen2 and Qwen3 causal LMs: GQA attention (Qwen2: q/k/v bias; Qwen3: q/k norm)
    and a dense SwiGLU MLP in every layer."""

    architectures: ClassVar[tuple[str, ...]] = (
        "LlamaForCausalLM",
        "Qwen2ForCausalLM",
        "Qwen3ForCausalLM",
    )


class Qwen3VLAdapter(DenseAdapter):
    """The text decoder of Qwen3-VL: Qwen3's layers with interleaved multimodal RoPE.

    The vision tower is not mapped (Xlite takes the merged input embeddings and the deepstack
    features from the caller). Qwen3-VL always interleaves the mRoPE sections (transformers
    hard-codes it), so ``mrope_interleaved`` is true whatever the config says.
    """

    architectures: ClassVar[tuple[str, ...]] = ("Qwen3VLForConditionalGeneration",)

    # transformers' default when the config names no sections (the released checkpoints'
    # values, for head_dim 128).
    DEFAULT_MROPE_SECTION: ClassVar[tuple[int, ...]] = (24, 20, 20)

    def build_config(self) -> XliteModelConfig:
        config = super().build_config()
        section = tuple(
            int(v) for v in self._rope_parameters().get("mrope_section", self.DEFAULT_MROPE_SECTION)
        )
        if len(section) != 3 or sum(section) != config.head_dim // 2:
            raise self._unsupported(
                "rope_parameters.mrope_section",
                list(section),
                f"3 sections (t, h, w) summing to head_dim / 2 = {config.head_dim // 2}",
            )
        vision = getattr(self.hf_config, "vision_config", None)
        deepstack = getattr(vision, "deepstack_visual_indexes", None) or ()
        return replace(
            config,
            mrope_section=section,
            mrope_interleaved=True,
            deepstack_num_level=len(deepstack),
        )


class Qwen3MoeAdapter(XliteAdapter):
    """Qwen3-MoE: Qwen3 attention, and routed experts (softmax top-k, no shared experts).

    Layers listed in ``mlp_only_layers`` (or skipped by ``decoder_sparse_step``) keep a dense
    MLP; Xlite runs dense MLPs in the first ``n_dense_layers`` layers only, so those layers
    must come first.
    """

    architectures: ClassVar[tuple[str, ...]] = ("Qwen3MoeForCausalLM",)

    def build_config(self) -> XliteModelConfig:
        config = super().build_config()
        s = self.settings
        num_experts = int(self._cfg("num_experts"))
        sparse_step = int(self._cfg("decoder_sparse_step", 1))
        mlp_only = set(self._cfg("mlp_only_layers", None) or ())
        # Which layers route through experts, by the rule transformers and vLLM both use.
        is_moe = [
            i not in mlp_only and num_experts > 0 and (i + 1) % sparse_step == 0
            for i in range(config.n_layers)
        ]
        n_dense = is_moe.index(True) if True in is_moe else config.n_layers
        if not all(is_moe[n_dense:]):
            raise self._unsupported(
                "mlp_only_layers / decoder_sparse_step",
                (sorted(mlp_only), sparse_step),
                "dense MLP layers only before the first MoE layer (Xlite's n_dense_layers)",
            )
        return replace(
            config,
            n_dense_layers=n_dense,
            n_routed_experts=num_experts,
            n_shared_experts=0,
            n_act_experts=int(self._cfg("num_experts_per_tok")),
            moe_intermediate_size=int(self._cfg("moe_intermediate_size")),
            norm_topk_prob=bool(self._cfg("norm_topk_prob")),
            scoring_func=ScoringFuncType.ScoringFuncSoftmax,
            def_dp_size=s.dp_size,
            moe_ep_size=s.moe_ep_size,
            moe_tp_size=s.moe_tp_size,
            experts_weight_transpose=s.experts_weight_transpose,
        )

    def build_mlp(
        self, index: int, layer: nn.Module, config: XliteModelConfig, weights: LayerWeights
    ) -> LayerWeights:
        if index < config.n_dense_layers:
            return super().build_mlp(index, layer, config, weights)
        where = f"layers[{index}].mlp"
        mlp = attr(layer, "mlp")
        gate = tensor(mlp, "gate.weight")
        if gate is None:
            raise MissingWeightError(f"{where}: expected the router weight gate.weight")
        experts = attr(mlp, "experts")
        inter = config.moe_intermediate_size // config.moe_tp_size
        re_up_gate, re_down = expert_slots(experts, inter, config, where)
        if gate.shape[0] != config.n_routed_experts:
            raise MissingWeightError(
                f"{where}.gate.weight has {gate.shape[0]} rows; the config has "
                f"num_experts = {config.n_routed_experts}"
            )
        return replace(weights, gate=gate, re_up_gate=re_up_gate, re_down=re_down)
