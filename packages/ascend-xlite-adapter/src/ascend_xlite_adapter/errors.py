"""Exception types raised by the Xlite adapter.

Every error names what went wrong (the setting, config key, module path or value) and what is
accepted instead.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "AttnMetaError",
    "ConstraintViolation",
    "MissingWeightError",
    "UnsupportedArchitectureError",
    "UnsupportedModelError",
    "WeightCopyRequiredError",
    "XliteAdapterError",
    "XliteConstraintError",
    "XliteUnavailableError",
]


class XliteAdapterError(Exception):
    """Base class of every error raised by ``ascend_xlite_adapter``."""


class UnsupportedArchitectureError(XliteAdapterError, ValueError):
    """No adapter is registered for the model's Hugging Face architecture name."""

    def __init__(self, architecture: str, supported: tuple[str, ...]) -> None:
        self.architecture = architecture
        self.supported = supported
        super().__init__(
            f"architecture {architecture!r} has no Xlite adapter; supported architectures: "
            + ", ".join(supported)
        )


class UnsupportedModelError(XliteAdapterError, ValueError):
    """The architecture is supported but this model uses a feature Xlite cannot express."""


class MissingWeightError(XliteAdapterError, LookupError):
    """A weight the adapter needs is not where either supported module layout keeps it."""


class WeightCopyRequiredError(XliteAdapterError, ValueError):
    """Handing the weights to Xlite would need a copy (separate q/k/v or gate/up tensors)."""


class AttnMetaError(XliteAdapterError, ValueError):
    """Attention metadata is inconsistent (lengths, block tables or positions)."""


class XliteUnavailableError(XliteAdapterError, ImportError):
    """The native ``xlite._C`` module cannot be imported on this machine."""


@dataclass(frozen=True)
class ConstraintViolation:
    """One setting that the Xlite path does not accept.

    Attributes:
        setting: the setting's name, as the user spells it (e.g. ``pipeline_parallel_size``).
        value: the value that was given.
        accepted: what the Xlite path accepts instead, in words.
    """

    setting: str
    value: object
    accepted: str

    def __str__(self) -> str:
        return f"{self.setting} = {self.value!r}: {self.accepted}"


class XliteConstraintError(XliteAdapterError, ValueError):
    """One or more settings are outside what the Xlite path supports; one line each."""

    def __init__(self, violations: tuple[ConstraintViolation, ...]) -> None:
        self.violations = violations
        super().__init__(
            "the Xlite graph path cannot run with these settings:\n"
            + "\n".join(f"  - {v}" for v in violations)
        )
