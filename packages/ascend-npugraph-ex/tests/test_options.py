"""Option validation: unknown keys, wrong types and contradictions are errors naming the fix."""

from __future__ import annotations

import pytest
from ascend_npugraph_ex import NpugraphExOptions, NpugraphExOptionsError


def test_defaults() -> None:
    opts = NpugraphExOptions()
    assert not opts.force_eager
    assert not opts.static_kernel
    assert opts.enabled_fusions == ("add_rms_norm", "rms_norm", "swiglu", "rotary", "qk_norm_rope")


def test_unknown_key_lists_accepted_options() -> None:
    with pytest.raises(
        NpugraphExOptionsError,
        match=r"unknown npugraph_ex option\(s\) \['forse_eager'\].*force_eager",
    ):
        NpugraphExOptions.from_mapping({"forse_eager": True})


def test_wrong_type_names_key_value_and_type() -> None:
    with pytest.raises(
        NpugraphExOptionsError, match=r"force_eager='yes' has type str; expected bool"
    ):
        NpugraphExOptions.from_mapping({"force_eager": "yes"})
    with pytest.raises(NpugraphExOptionsError, match=r"batch_sizes"):
        NpugraphExOptions.from_mapping({"batch_sizes": [1, "2"]})


def test_static_kernel_without_optimizer_is_a_contradiction() -> None:
    with pytest.raises(NpugraphExOptionsError, match="static_kernel=True needs optimize=True"):
        NpugraphExOptions(static_kernel=True, optimize=False)


def test_qk_norm_rope_needs_its_building_blocks() -> None:
    with pytest.raises(NpugraphExOptionsError, match="fuse_qk_norm_rope=True needs"):
        NpugraphExOptions(fuse_rotary=False)
    assert NpugraphExOptions(fuse_rotary=False, fuse_qk_norm_rope=False).enabled_fusions == (
        "add_rms_norm",
        "rms_norm",
        "swiglu",
    )


@pytest.mark.parametrize("sizes", [[], [0, 2]])
def test_batch_sizes_validated(sizes: list[int]) -> None:
    with pytest.raises(NpugraphExOptionsError, match="batch_sizes"):
        NpugraphExOptions.from_mapping({"batch_sizes": sizes})


def test_lists_become_tuples_and_options_are_frozen() -> None:
    opts = NpugraphExOptions.from_mapping({"batch_sizes": [1, 2]})
    assert opts.batch_sizes == (1, 2)
    with pytest.raises(AttributeError):
        opts.force_eager = True  # type: ignore[misc]


def test_ascend_compilation_config_mapping() -> None:
    opts = NpugraphExOptions.from_ascend_compilation_config(
        {"enable_npugraph_ex": True, "enable_static_kernel": True, "fuse_swiglu": False}
    )
    assert opts.force_eager
    assert opts.static_kernel
    assert not opts.fuse_swiglu
    with pytest.raises(
        NpugraphExOptionsError,
        match="unknown ascend_compilation_config key 'fuse_foo'; accepted: enable_static_kernel",
    ):
        NpugraphExOptions.from_ascend_compilation_config({"fuse_foo": True})
    with pytest.raises(NpugraphExOptionsError, match="needs optimize=True"):
        NpugraphExOptions.from_ascend_compilation_config(
            {"enable_npugraph_ex": False, "enable_static_kernel": True}
        )
