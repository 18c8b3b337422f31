"""What the Xlite graph path accepts, checked from plain values before anything is built.

The limits are vllm-ascend's for ``xlite_graph_config`` (its platform check and the Xlite
feature guide): one pipeline stage, no context parallelism, at most one speculative token
(linear MTP), KV blocks of at most 128 tokens. Quantized checkpoints are refused because this
adapter maps no quantized weight slots (Xlite itself runs W8A8 through slots this package does
not fill).
"""

from __future__ import annotations

import importlib
import importlib.util

from ascend_xlite_adapter.errors import ConstraintViolation, XliteConstraintError

__all__ = [
    "INSTALL_HINT",
    "MAX_BLOCK_SIZE",
    "check_constraints",
    "constraint_violations",
    "xlite_import_error",
]

MAX_BLOCK_SIZE = 128
"""Largest KV-cache block size Xlite's attention kernels take."""

INSTALL_HINT = (
    'pip install "ascend-xlite-adapter[xlite]"; Xlite needs an Ascend NPU (A2/A3) and its CANN '
    "runtime"
)


def xlite_import_error() -> str | None:
    """Why ``xlite._C`` cannot be imported here, or ``None`` when it can.

    ``import xlite`` succeeds without the Ascend runtime; the native ``xlite._C`` does not,
    so that is what is probed.
    """
    if importlib.util.find_spec("xlite") is None:
        return "the xlite package is not installed"
    try:
        importlib.import_module("xlite._C")
    except Exception as exc:  # ImportError, or OSError from a missing CANN library
        return f"import xlite._C failed: {type(exc).__name__}: {exc}"
    return None


def constraint_violations(
    *,
    pipeline_parallel_size: int = 1,
    prefill_context_parallel_size: int = 1,
    decode_context_parallel_size: int = 1,
    num_speculative_tokens: int | None = None,
    block_size: int = MAX_BLOCK_SIZE,
    quantization: str | None = None,
    xlite_importable: bool | None = None,
) -> tuple[ConstraintViolation, ...]:
    """Every setting the Xlite path does not accept, one :class:`ConstraintViolation` each.

    ``xlite_importable=None`` probes the machine (:func:`xlite_import_error`); pass a bool to
    check a configuration for another machine.
    """
    out: list[ConstraintViolation] = []
    if pipeline_parallel_size != 1:
        out.append(
            ConstraintViolation(
                "pipeline_parallel_size",
                pipeline_parallel_size,
                "accepted: 1 (Xlite runs every layer of the model in one stage)",
            )
        )
    for name, value in (
        ("prefill_context_parallel_size", prefill_context_parallel_size),
        ("decode_context_parallel_size", decode_context_parallel_size),
    ):
        if value != 1:
            out.append(
                ConstraintViolation(
                    name, value, "accepted: 1 (Xlite does not support context parallelism)"
                )
            )
    if num_speculative_tokens is not None and not 0 <= num_speculative_tokens <= 1:
        out.append(
            ConstraintViolation(
                "num_speculative_tokens",
                num_speculative_tokens,
                "accepted: none, 0 or 1 (Xlite verifies one linear MTP draft token per step)",
            )
        )
    if not 1 <= block_size <= MAX_BLOCK_SIZE:
        out.append(
            ConstraintViolation(
                "block_size",
                block_size,
                f"accepted: 1 to {MAX_BLOCK_SIZE} tokens per KV-cache block "
                f"({MAX_BLOCK_SIZE} recommended)",
            )
        )
    if quantization is not None:
        out.append(
            ConstraintViolation(
                "quantization",
                quantization,
                "accepted: None (unquantized weights; this adapter maps no quantized weight slots)",
            )
        )
    if xlite_importable is None:
        reason = xlite_import_error()
    else:
        reason = None if xlite_importable else "xlite._C is not importable"
    if reason is not None:
        out.append(
            ConstraintViolation(
                "xlite", reason, f"accepted: an importable xlite._C ({INSTALL_HINT})"
            )
        )
    return tuple(out)


def check_constraints(
    *,
    pipeline_parallel_size: int = 1,
    prefill_context_parallel_size: int = 1,
    decode_context_parallel_size: int = 1,
    num_speculative_tokens: int | None = None,
    block_size: int = MAX_BLOCK_SIZE,
    quantization: str | None = None,
    xlite_importable: bool | None = None,
) -> None:
    """Raise if any setting is outside what the Xlite graph path supports.

    Args:
        pipeline_parallel_size: vLLM's ``pipeline_parallel_size``; must be 1.
        prefill_context_parallel_size: vLLM's prefill context parallel size; must be 1.
        decode_context_parallel_size: vLLM's decode context parallel size; must be 1.
        num_speculative_tokens: ``speculative_config.num_speculative_tokens``; None, 0 or 1.
        block_size: ``cache_config.block_size``; 1 to 128.
        quantization: ``model_config.quantization``; must be None.
        xlite_importable: whether ``xlite._C`` imports; ``None`` probes this machine.

    Raises:
        XliteConstraintError: one line per violated setting, naming it, its value and what is
            accepted.
    """
    violations = constraint_violations(
        pipeline_parallel_size=pipeline_parallel_size,
        prefill_context_parallel_size=prefill_context_parallel_size,
        decode_context_parallel_size=decode_context_parallel_size,
        num_speculative_tokens=num_speculative_tokens,
        block_size=block_size,
        quantization=quantization,
        xlite_importable=xlite_importable,
    )
    if violations:
        raise XliteConstraintError(violations)
