"""Hugging Face architecture name -> adapter class, and the one-call entry point."""

from __future__ import annotations

from typing import Any

from torch import nn

from ascend_xlite_adapter.adapters import (
    AdaptedModel,
    DenseAdapter,
    Qwen3MoeAdapter,
    Qwen3VLAdapter,
    XliteAdapter,
)
from ascend_xlite_adapter.config import AdapterSettings
from ascend_xlite_adapter.errors import UnsupportedArchitectureError

__all__ = [
    "adapt_model",
    "get_adapter_class",
    "model_architecture",
    "register_adapter",
    "supported_architectures",
]

_REGISTRY: dict[str, type[XliteAdapter]] = {}


def register_adapter(cls: type[XliteAdapter]) -> type[XliteAdapter]:
    """Register ``cls`` for every name in its ``architectures``; usable as a decorator.

    Raises:
        ValueError: ``cls`` lists no architecture, or one already has another adapter.
    """
    if not cls.architectures:
        raise ValueError(f"{cls.__name__}.architectures is empty; list the HF names it maps")
    for name in cls.architectures:
        current = _REGISTRY.get(name)
        if current is not None and current is not cls:
            raise ValueError(f"{name} is already mapped by {current.__name__}")
    for name in cls.architectures:
        _REGISTRY[name] = cls
    return cls


for _cls in (DenseAdapter, Qwen3VLAdapter, Qwen3MoeAdapter):
    register_adapter(_cls)


def supported_architectures() -> tuple[str, ...]:
    """Every registered HF architecture name, sorted."""
    return tuple(sorted(_REGISTRY))


def get_adapter_class(architecture: str) -> type[XliteAdapter]:
    """The adapter class for a HF architecture name.

    Raises:
        UnsupportedArchitectureError: no adapter is registered; the message lists those that are.
    """
    try:
        return _REGISTRY[architecture]
    except KeyError:
        raise UnsupportedArchitectureError(architecture, supported_architectures()) from None


def model_architecture(model: nn.Module, hf_config: Any) -> str:
    """``hf_config.architectures[0]``, else the model's class name.

    Both transformers and vLLM name their model classes after the HF architecture
    (``Qwen3ForCausalLM``), and configs built in code often have no ``architectures``.
    """
    names = getattr(hf_config, "architectures", None)
    if names:
        return str(names[0])
    return type(model).__name__


def adapt_model(
    model: nn.Module,
    hf_config: Any,
    settings: AdapterSettings | None = None,
    *,
    architecture: str | None = None,
) -> AdaptedModel:
    """Map ``model`` (transformers or vLLM modules) onto Xlite's config and weight slots.

    Args:
        model: the model; its tensors are shared, never copied.
        hf_config: its Hugging Face config (the top-level one for VL models).
        settings: serving-side values (batch and sequence limits, block size, parallelism).
        architecture: overrides :func:`model_architecture`.

    Raises:
        UnsupportedArchitectureError: the architecture has no adapter.
        UnsupportedModelError: the model uses a feature Xlite cannot express.
        MissingWeightError: a needed weight is missing or has the wrong shape.
    """
    name = architecture or model_architecture(model, hf_config)
    cls = get_adapter_class(name)
    return cls(model, hf_config, settings, architecture=name).adapt()
