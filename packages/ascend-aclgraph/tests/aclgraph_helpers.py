"""Helpers shared by this package's tests."""

from __future__ import annotations

import torch
from ascend_aclgraph.backends import GraphBackend


def rand(backend: GraphBackend, *shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, dtype=dtype, device=backend.device)


def assert_same(actual: torch.Tensor, expected: torch.Tensor, backend: GraphBackend) -> None:
    """Bitwise on the cpu twin; on a device, kernels may differ between eager and graph launch
    configurations, so within 1e-5 relative / 1e-6 absolute (float32)."""
    if backend.name == "cpu":
        assert torch.equal(actual, expected), (actual - expected).abs().max()
    else:
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)
