"""vllm_ascend_plugin: graph mode for vLLM on Ascend NPUs (ACLGraph + npugraph_ex), as a plugin.

Installed, it registers two vLLM entry points:

- ``vllm.platform_plugins`` -> :func:`register`: the NPU platform when torch_npu and an NPU are
  present; the CPU twin platform when ``VLLM_ASCEND_PLUGIN_DEVICE=cpu``; otherwise ``None``
  (the plugin declines and vLLM behaves exactly as without it);
- ``vllm.general_plugins`` -> :func:`register_general`: nothing to patch today; it checks the
  vLLM version when one of our platforms is active.

Both run in every vLLM process (front end, engine core, workers), possibly several times, so
they only read the environment and return.
"""

from __future__ import annotations

import logging
import os

try:
    from vllm_ascend_plugin._version import __version__
except ImportError:  # a source tree that was never built
    __version__ = "0.0.0+unknown"

__all__ = ["DEVICE_ENV", "__version__", "register", "register_general"]

logger = logging.getLogger(__name__)

#: ``cpu`` selects the CPU twin platform; ``npu`` requires the NPU platform; unset: auto.
DEVICE_ENV = "VLLM_ASCEND_PLUGIN_DEVICE"

_CPU_TWIN = "vllm_ascend_plugin.platforms.cpu_twin.CpuTwinPlatform"
_NPU = "vllm_ascend_plugin.platforms.npu.NPUPlatform"


def _npu_present() -> bool:
    try:
        import torch
        import torch_npu  # noqa: F401  (registers torch.npu)
    except Exception:  # torch_npu missing, or present without CANN: no NPU here
        return False
    npu = getattr(torch, "npu", None)
    return bool(npu is not None and npu.is_available())


def register() -> str | None:
    """The ``vllm.platform_plugins`` entry point: our platform's qualified name, or ``None``."""
    device = os.environ.get(DEVICE_ENV, "").strip().lower()
    if device not in ("", "cpu", "npu"):
        raise ValueError(f"{DEVICE_ENV}={device!r}: expected 'cpu', 'npu' or unset")
    if device in ("cpu", "npu") or _npu_present():
        from vllm_ascend_plugin.compat import check_vllm_version

        check_vllm_version()
    if device == "cpu":
        return _CPU_TWIN
    if device == "npu" or _npu_present():
        if not _npu_present():
            raise RuntimeError(
                f"{DEVICE_ENV}=npu but no NPU is usable: torch_npu must import (with the CANN "
                "toolkit) and torch.npu.is_available() must be true"
            )
        return _NPU
    return None


def register_general() -> None:
    """The ``vllm.general_plugins`` entry point (runs in every process; re-entrant)."""
    return
