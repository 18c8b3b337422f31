"""ascend_xlite_adapter: maps Llama / Qwen dense / Qwen3-MoE / Qwen3-VL models onto Xlite.

    adapted = adapt_model(model, model.config, AdapterSettings(block_size=128))
    adapted.config    # XliteModelConfig: xlite._C.ModelConfig's fields, filled
    adapted.weights   # XliteWeights: the model's own tensors, arranged as Xlite's slots

The model may be a transformers model or vLLM's model modules (fused ``qkv_proj`` /
``gate_up_proj`` / ``w13_weight``); weights are shared by reference, never copied.
:class:`ReferenceExecutor` runs the mapped model in plain PyTorch with Xlite's call signatures,
and :func:`check_constraints` says whether a serving configuration can use the Xlite path at all.
The native runtime (``xlite``, Ascend NPUs only) is an optional extra, used by :mod:`.native`.
"""

from __future__ import annotations

from ascend_xlite_adapter.adapters import (
    AdaptedModel,
    DenseAdapter,
    Qwen3MoeAdapter,
    Qwen3VLAdapter,
    XliteAdapter,
    text_config,
)
from ascend_xlite_adapter.attn_meta import (
    XliteAttnMeta,
    build_attn_meta,
    query_lens_from_start_loc,
)
from ascend_xlite_adapter.config import (
    AdapterSettings,
    AttnType,
    ScoringFuncType,
    XliteModelConfig,
)
from ascend_xlite_adapter.constraints import (
    INSTALL_HINT,
    MAX_BLOCK_SIZE,
    check_constraints,
    constraint_violations,
    xlite_import_error,
)
from ascend_xlite_adapter.errors import (
    AttnMetaError,
    ConstraintViolation,
    MissingWeightError,
    UnsupportedArchitectureError,
    UnsupportedModelError,
    WeightCopyRequiredError,
    XliteAdapterError,
    XliteConstraintError,
    XliteUnavailableError,
)
from ascend_xlite_adapter.executor import ReferenceExecutor, allocate_kv_cache, rms_norm
from ascend_xlite_adapter.native import (
    import_xlite,
    to_native_attn_meta,
    to_native_config,
    to_native_model,
)
from ascend_xlite_adapter.registry import (
    adapt_model,
    get_adapter_class,
    model_architecture,
    register_adapter,
    supported_architectures,
)
from ascend_xlite_adapter.rope import apply_rope, mrope_rows, precompute_freqs_cis, rope_cos_sin
from ascend_xlite_adapter.weights import FusedWeight, LayerWeights, XliteWeights

try:
    from ascend_xlite_adapter._version import __version__
except ImportError:  # a source tree without the hatch-vcs version file
    __version__ = "0.0.0+unknown"

__all__ = [
    "INSTALL_HINT",
    "MAX_BLOCK_SIZE",
    "AdaptedModel",
    "AdapterSettings",
    "AttnMetaError",
    "AttnType",
    "ConstraintViolation",
    "DenseAdapter",
    "FusedWeight",
    "LayerWeights",
    "MissingWeightError",
    "Qwen3MoeAdapter",
    "Qwen3VLAdapter",
    "ReferenceExecutor",
    "ScoringFuncType",
    "UnsupportedArchitectureError",
    "UnsupportedModelError",
    "WeightCopyRequiredError",
    "XliteAdapter",
    "XliteAdapterError",
    "XliteAttnMeta",
    "XliteConstraintError",
    "XliteModelConfig",
    "XliteUnavailableError",
    "XliteWeights",
    "__version__",
    "adapt_model",
    "allocate_kv_cache",
    "apply_rope",
    "build_attn_meta",
    "check_constraints",
    "constraint_violations",
    "get_adapter_class",
    "import_xlite",
    "model_architecture",
    "mrope_rows",
    "precompute_freqs_cis",
    "query_lens_from_start_loc",
    "register_adapter",
    "rms_norm",
    "rope_cos_sin",
    "supported_architectures",
    "text_config",
    "to_native_attn_meta",
    "to_native_config",
    "to_native_model",
    "xlite_import_error",
]
