"""Counters every graph runner keeps, for logs, tests and benchmarks."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["GraphStats"]


@dataclass
class GraphStats:
    captures: int = 0
    replays: int = 0
    # Batches larger than the largest capture size, run eagerly.
    eager_fallbacks: int = 0
    # Descriptors whose capture failed and that run eagerly under on_capture_failure="eager".
    capture_failures: int = 0
    capture_seconds: float = 0.0
    capture_seconds_by_size: dict[int, float] = field(default_factory=dict)
    pool_bytes: int = 0

    def record_capture(self, size: int, seconds: float) -> None:
        self.captures += 1
        self.capture_seconds += seconds
        self.capture_seconds_by_size[size] = seconds

    def as_dict(self) -> dict[str, object]:
        return {
            "captures": self.captures,
            "replays": self.replays,
            "eager_fallbacks": self.eager_fallbacks,
            "capture_failures": self.capture_failures,
            "capture_seconds": round(self.capture_seconds, 6),
            "pool_bytes": self.pool_bytes,
        }
