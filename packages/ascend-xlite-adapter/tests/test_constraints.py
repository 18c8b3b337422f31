"""check_constraints: every refusal names the setting, its value and what is accepted."""

from __future__ import annotations

import importlib.util
from typing import Any

import ascend_xlite_adapter as xa
import pytest

OK: dict[str, Any] = {"xlite_importable": True}


def test_defaults_and_limits_pass() -> None:
    xa.check_constraints(**OK)
    xa.check_constraints(
        pipeline_parallel_size=1,
        prefill_context_parallel_size=1,
        decode_context_parallel_size=1,
        num_speculative_tokens=1,
        block_size=128,
        quantization=None,
        xlite_importable=True,
    )
    xa.check_constraints(num_speculative_tokens=0, block_size=16, **OK)


@pytest.mark.parametrize(
    ("setting", "value", "accepted"),
    [
        ("pipeline_parallel_size", 2, "accepted: 1"),
        ("prefill_context_parallel_size", 2, "accepted: 1 (Xlite does not support context"),
        ("decode_context_parallel_size", 4, "accepted: 1 (Xlite does not support context"),
        ("num_speculative_tokens", 2, "accepted: none, 0 or 1"),
        ("block_size", 256, "accepted: 1 to 128 tokens per KV-cache block"),
        ("block_size", 129, "accepted: 1 to 128"),
        ("quantization", "w8a8", "accepted: None"),
    ],
)
def test_each_violation_names_setting_value_and_accepted(
    setting: str, value: object, accepted: str
) -> None:
    with pytest.raises(xa.XliteConstraintError) as info:
        xa.check_constraints(**{setting: value}, **OK)
    (violation,) = info.value.violations
    assert violation.setting == setting
    assert violation.value == value
    assert f"{setting} = {value!r}: {accepted}" in str(info.value)
    assert isinstance(info.value, ValueError)


def test_all_violations_are_reported_together() -> None:
    with pytest.raises(xa.XliteConstraintError) as info:
        xa.check_constraints(
            pipeline_parallel_size=2,
            num_speculative_tokens=3,
            block_size=512,
            quantization="w4a8",
            xlite_importable=False,
        )
    settings = [v.setting for v in info.value.violations]
    assert settings == [
        "pipeline_parallel_size",
        "num_speculative_tokens",
        "block_size",
        "quantization",
        "xlite",
    ]
    assert len(str(info.value).splitlines()) == 1 + len(settings)


def test_missing_xlite_names_the_extra_and_the_hardware() -> None:
    (violation,) = xa.constraint_violations(xlite_importable=False)
    text = str(violation)
    assert violation.setting == "xlite"
    assert 'pip install "ascend-xlite-adapter[xlite]"' in text
    assert "Ascend NPU" in text
    assert "runtime" in text


def test_probe_reports_xlite_missing_here() -> None:
    # This CPU environment never installs xlite (its wheels need torch <= 2.10 and CANN).
    if importlib.util.find_spec("xlite") is not None:
        pytest.fail("xlite is installed in the CPU test environment; it must not be")
    assert xa.xlite_import_error() == "the xlite package is not installed"
    with pytest.raises(xa.XliteConstraintError, match=r"xlite = 'the xlite package is not"):
        xa.check_constraints()
