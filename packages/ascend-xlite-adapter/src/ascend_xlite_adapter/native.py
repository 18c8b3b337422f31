"""Handing what the adapter built to the native ``xlite._C`` objects (Ascend machines only).

Each function takes the native module as an argument (default: ``import xlite._C``), so the
same code is exercised on CPU with a stand-in module whose classes accept exactly the stub's
attribute names.

Xlite releases add ``ModelConfig`` fields over time. A field the installed ``xlite`` lacks is
skipped when this package leaves it at its default (nothing is lost) and is an error otherwise.
"""

from __future__ import annotations

import enum
import importlib
from dataclasses import fields
from types import ModuleType
from typing import Any

from ascend_xlite_adapter.attn_meta import XliteAttnMeta
from ascend_xlite_adapter.config import XliteModelConfig
from ascend_xlite_adapter.constraints import INSTALL_HINT
from ascend_xlite_adapter.errors import XliteAdapterError, XliteUnavailableError
from ascend_xlite_adapter.weights import XliteWeights

__all__ = [
    "import_xlite",
    "to_native_attn_meta",
    "to_native_config",
    "to_native_model",
]


def import_xlite() -> ModuleType:
    """``xlite._C``, or an :class:`~ascend_xlite_adapter.errors.XliteUnavailableError`."""
    try:
        return importlib.import_module("xlite._C")
    except Exception as exc:  # ImportError, or OSError from a missing CANN library
        raise XliteUnavailableError(
            f"cannot import xlite._C ({type(exc).__name__}: {exc}); {INSTALL_HINT}"
        ) from exc


def _module(xlite_c: ModuleType | None) -> ModuleType:
    return xlite_c if xlite_c is not None else import_xlite()


def to_native_config(config: XliteModelConfig, xlite_c: ModuleType | None = None) -> Any:
    """A filled ``xlite._C.ModelConfig``; enums map by member name, tuples become lists.

    Raises:
        XliteAdapterError: the installed Xlite lacks a field this configuration sets.
    """
    mod = _module(xlite_c)
    native = mod.ModelConfig()
    changed = config.changed_fields()
    for f in fields(config):
        value: Any = getattr(config, f.name)
        if isinstance(value, enum.Enum):
            value = getattr(mod, value.name)
        elif isinstance(value, tuple):
            value = list(value)
        # Look on the class: pybind11 fields (and slots) are class-level descriptors, and an
        # instance attribute may read as unset before its first assignment.
        if not hasattr(type(native), f.name):
            if f.name in changed:
                raise XliteAdapterError(
                    f"the installed xlite has no ModelConfig.{f.name}, which this model sets to "
                    f"{getattr(config, f.name)!r}; upgrade xlite (ascend-xlite-adapter[xlite])"
                )
            continue
        setattr(native, f.name, value)
    return native


def to_native_attn_meta(meta: XliteAttnMeta, xlite_c: ModuleType | None = None) -> Any:
    """A filled ``xlite._C.AttnMeta`` (host lists and the positions tensor)."""
    native = _module(xlite_c).AttnMeta()
    native.lens = list(meta.lens)
    native.cached_lens = list(meta.cached_lens)
    native.is_prefills = list(meta.is_prefills)
    native.block_tables_cpu = [list(row) for row in meta.block_tables_cpu]
    native.positions = meta.positions
    return native


def to_native_model(
    config: XliteModelConfig,
    weights: XliteWeights,
    xlite_c: ModuleType | None = None,
    *,
    rank: int = 0,
    allow_copy: bool = False,
) -> Any:
    """An initialized ``xlite._C.Model`` whose weights are the slots' tensors.

    The tensors must already be on the NPU (Xlite reads device memory); nothing is moved or
    copied here, except fused slots of a transformers-layout model when ``allow_copy``.

    Raises:
        WeightCopyRequiredError: the model keeps q/k/v or gate/up separate and ``allow_copy``
            is false.
    """
    mod = _module(xlite_c)
    native_config = to_native_config(config, mod)
    model = mod.Model()
    for name, value in weights.to_slots(allow_copy=allow_copy).items():
        setattr(model, name, value)
    model.init(native_config, rank)
    return model
