"""Xlite's ``ModelConfig`` as a frozen dataclass, and the serving settings the adapter needs.

:class:`XliteModelConfig` mirrors ``xlite._C.ModelConfig`` field for field, with the stub's exact
names and order (``xlite/xlite/_C.pyi`` in openeuler-mirror/GVirt @ 7475497), so that handing it
to the native object is a loop of ``setattr`` and nothing is renamed on the way. The enums mirror
``xlite._C.AttnType`` and ``xlite._C.ScoringFuncType`` by member name.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, fields

__all__ = [
    "AdapterSettings",
    "AttnType",
    "ScoringFuncType",
    "XliteModelConfig",
]


class AttnType(enum.Enum):
    """``xlite._C.AttnType``: the attention family of a model."""

    AttnMHA = "AttnMHA"
    """Multi-head (and grouped-query) attention: Llama, Qwen2/3, Qwen3-MoE, Qwen3-VL."""
    AttnMLA = "AttnMLA"
    """Multi-head latent attention (DeepSeek V3); not mapped by this package."""
    AttnDSA = "AttnDSA"
    """Sparse attention (DeepSeek V3.2); not mapped by this package."""
    AttnHybrid = "AttnHybrid"
    """Full + linear attention (Qwen3.5); not mapped by this package."""


class ScoringFuncType(enum.Enum):
    """``xlite._C.ScoringFuncType``: how MoE router logits become expert scores."""

    ScoringFuncSoftmax = "ScoringFuncSoftmax"
    """Softmax over all experts, then top-k (Qwen3-MoE)."""
    ScoringFuncSigmoid = "ScoringFuncSigmoid"
    """Sigmoid per expert (GLM-4-MoE, DeepSeek); not mapped by this package."""


@dataclass(frozen=True)
class XliteModelConfig:
    """Every field of ``xlite._C.ModelConfig``, same names, same order.

    Fields this package never sets (MLA, DSA indexer, linear attention, quantization layout) keep
    their zero defaults; they are here so that the mirror is complete and a name check against
    the stub is exact. ``mrope_section`` is a tuple (the native field is a list) to keep the
    dataclass hashable and immutable.
    """

    vocab_size: int = 0
    hidden_size: int = 0
    n_layers: int = 0
    attn_type: AttnType = AttnType.AttnMHA
    n_heads: int = 0
    n_kv_heads: int = 0
    head_dim: int = 0
    nope_head_dim: int = 0
    rope_head_dim: int = 0
    v_head_dim: int = 0
    q_lora_rank: int = 0
    kv_lora_rank: int = 0
    quant_attn_weight_transpose: bool = False
    quant_attn_weight_nz: bool = False
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    softmax_scale: float = 0.0
    n_dense_layers: int = 0
    n_routed_experts: int = 0
    n_shared_experts: int = 0
    n_expert_groups: int = 0
    n_limited_groups: int = 0
    n_act_experts: int = 0
    intermediate_size: int = 0
    moe_intermediate_size: int = 0
    route_scale: float = 1.0
    def_tp_size: int = 1
    def_dp_size: int = 1
    moe_ep_size: int = 1
    moe_tp_size: int = 1
    max_seq_len: int = 0
    max_batch_size: int = 0
    max_m: int = 0
    max_num_batched_tokens: int = 0
    block_size: int = 0
    weight_nz: bool = False
    experts_weight_transpose: bool = False
    experts_weight_nz: bool = False
    gate_captured: bool = False
    qkv_bias: bool = False
    qk_norm: bool = False
    qk_norm_full: bool = False
    attn_output_gate: bool = False
    linear_num_k_heads: int = 0
    linear_num_v_heads: int = 0
    linear_key_head_dim: int = 0
    linear_value_head_dim: int = 0
    linear_conv_kernel_dim: int = 0
    full_attention_interval: int = 0
    scoring_func: ScoringFuncType = ScoringFuncType.ScoringFuncSoftmax
    norm_topk_prob: bool = False
    mrope_section: tuple[int, ...] = ()
    mrope_interleaved: bool = False
    deepstack_num_level: int = 0
    index_head_dim: int = 0
    index_n_heads: int = 0
    index_topk: int = 0
    index_softmax_scale: float = 0.0
    index_rope_interleaved: bool = False

    @property
    def is_moe(self) -> bool:
        """Whether any layer routes through experts (``n_routed_experts > 0``)."""
        return self.n_routed_experts > 0

    def changed_fields(self) -> dict[str, object]:
        """The fields whose value differs from the dataclass default, by name."""
        default = XliteModelConfig()
        return {
            f.name: getattr(self, f.name)
            for f in fields(self)
            if getattr(self, f.name) != getattr(default, f.name)
        }


@dataclass(frozen=True)
class AdapterSettings:
    """Serving-side values that Xlite's ``ModelConfig`` needs and a HF config does not hold.

    Attributes:
        max_batch_size: most requests in one step (vLLM ``max_num_seqs``).
        max_seq_len: longest sequence, and the length of the RoPE table; ``None`` takes the
            model's ``max_position_embeddings`` (vLLM passes ``max_model_len``).
        max_m: most tokens one Xlite forward takes; ``None`` means ``max_batch_size``, which
            is what vllm-ascend uses in decode-only mode (full mode uses
            ``max_num_batched_tokens``; see :meth:`for_vllm`).
        max_num_batched_tokens: most tokens in one scheduler step; ``None`` means ``max_m``.
        block_size: tokens per KV-cache block.
        tp_size: tensor-parallel size (``def_tp_size``).
        dp_size: data-parallel size (``def_dp_size``).
        moe_tp_size: tensor-parallel size inside MoE layers.
        moe_ep_size: expert-parallel size.
        weight_nz: whether the dense weights are in Ascend's NZ (fractal) layout.
        experts_weight_transpose: whether expert weights are stored ``[E, in, out]``
            (vllm-ascend transposes them after loading) instead of ``[E, out, in]`` (what
            transformers and vLLM create). The adapter checks the shapes against it.
    """

    max_batch_size: int = 256
    max_seq_len: int | None = None
    max_m: int | None = None
    max_num_batched_tokens: int | None = None
    block_size: int = 128
    tp_size: int = 1
    dp_size: int = 1
    moe_tp_size: int = 1
    moe_ep_size: int = 1
    weight_nz: bool = False
    experts_weight_transpose: bool = False

    def __post_init__(self) -> None:
        for name in (
            "max_batch_size",
            "max_seq_len",
            "max_m",
            "max_num_batched_tokens",
            "block_size",
            "tp_size",
            "dp_size",
            "moe_tp_size",
            "moe_ep_size",
        ):
            value = getattr(self, name)
            if value is None and name in ("max_seq_len", "max_m", "max_num_batched_tokens"):
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"AdapterSettings.{name} = {value!r}: expected an integer >= 1")

    @classmethod
    def for_vllm(
        cls,
        *,
        full_mode: bool,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        max_model_len: int,
        block_size: int,
        tensor_parallel_size: int = 1,
        data_parallel_size: int = 1,
        enable_expert_parallel: bool = False,
    ) -> AdapterSettings:
        """The settings vllm-ascend derives from a vLLM config, from plain values.

        Decode-only mode sizes Xlite for one token per request (``max_m = max_num_seqs``);
        full mode also runs prefills, so ``max_m`` is the step's token budget. MoE layers are
        split across the TP x DP ranks either by experts (expert parallel) or by tensor
        parallelism, never both.
        """
        moe_world = tensor_parallel_size * data_parallel_size
        return cls(
            max_batch_size=max_num_seqs,
            max_seq_len=max_model_len,
            max_m=max_num_batched_tokens if full_mode else max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens,
            block_size=block_size,
            tp_size=tensor_parallel_size,
            dp_size=data_parallel_size,
            moe_tp_size=1 if enable_expert_parallel else moe_world,
            moe_ep_size=moe_world if enable_expert_parallel else 1,
        )
