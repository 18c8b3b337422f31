"""get_backend(): names, auto order, and errors that say what is missing."""

from __future__ import annotations

import ascend_aclgraph as ag
import pytest
import torch


def test_cpu_always_available_and_shared() -> None:
    assert "cpu" in ag.available_backends()
    assert ag.get_backend("cpu") is ag.get_backend("cpu")
    assert ag.get_backend("cpu").device == torch.device("cpu")


def test_auto_prefers_npu_then_cuda_then_cpu() -> None:
    expected = ag.available_backends()[0]
    assert ag.get_backend("auto").name == expected
    assert ag.available_backends()[-1] == "cpu"


def test_unknown_backend_lists_accepted_values() -> None:
    with pytest.raises(ValueError, match="accepted values: auto, npu, cuda, cpu"):
        ag.get_backend("tpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_missing_cuda_says_what_is_missing() -> None:
    with pytest.raises(
        ag.BackendUnavailableError, match="CUDA build of torch and a visible NVIDIA GPU"
    ):
        ag.get_backend("cuda")


def test_missing_npu_says_what_is_missing() -> None:
    if "npu" in ag.available_backends():
        pytest.skip("an NPU is present; this checks the error where torch_npu is absent")
    with pytest.raises(ag.BackendUnavailableError, match="torch_npu"):
        ag.get_backend("npu")
