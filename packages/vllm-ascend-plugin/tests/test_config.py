"""Tests of vllm_ascend_plugin.config: the additional_config schema and the mode decisions."""

from __future__ import annotations

import ast
import copy
import json
import logging
import pickle
import sys
import types
import warnings
from pathlib import Path
from types import MappingProxyType
from typing import Any

import pytest
from pydantic import ValidationError
from vllm_ascend_plugin import config as config_module
from vllm_ascend_plugin.config import (
    AscendCompilationConfig,
    AscendConfig,
    AscendConfigError,
    CompilationDecision,
    TorchairGraphConfig,
    XliteGraphConfig,
    check_xlite_available,
    parse_additional_config,
    resolve_compilation,
)

ACC = "additional_config.ascend_compilation_config"
TOP_KEYS = "ascend_compilation_config, xlite_graph_config, torchair_graph_config"
ACC_KEYS = (
    "enable_npugraph_ex, enable_static_kernel, fuse_add_rms_norm, fuse_rms_norm, fuse_swiglu, "
    "fuse_rotary, fuse_qk_norm_rope"
)
ALL_FUSIONS = ("add_rms_norm", "rms_norm", "swiglu", "rotary", "qk_norm_rope")
MODES = ("NONE", "PIECEWISE", "FULL", "FULL_DECODE_ONLY", "FULL_AND_PIECEWISE")
NOT_IMPLEMENTED = "accepted by vllm-ascend but not implemented by vllm-ascend-plugin"
CONFIG_LOGGER = "vllm_ascend_plugin.config"


@pytest.fixture(autouse=True)
def _fresh_torchair_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    # The deprecation warning is once per process; every test starts as a fresh process would.
    monkeypatch.setattr(config_module, "_torchair_warned", False)


@pytest.fixture
def no_xlite_adapter(monkeypatch: pytest.MonkeyPatch) -> None:
    # A None entry makes `import ascend_xlite_adapter` fail even once the package exists.
    monkeypatch.setitem(sys.modules, "ascend_xlite_adapter", None)


@pytest.fixture
def fake_xlite_adapter(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = types.ModuleType("ascend_xlite_adapter")
    monkeypatch.setitem(sys.modules, "ascend_xlite_adapter", fake)


def error_of(additional_config: Any) -> AscendConfigError:
    with pytest.raises(AscendConfigError) as info:
        parse_additional_config(additional_config)
    return info.value


def only_line(additional_config: Any) -> str:
    error = error_of(additional_config)
    assert len(error.errors) == 1, error.errors
    assert str(error) == error.errors[0]
    return error.errors[0]


# -------------------------------------------------------------------------------------------------
# defaults and the schema's shape


def test_defaults() -> None:
    config = parse_additional_config(None)
    compilation = config.ascend_compilation_config
    assert compilation.enable_npugraph_ex is None
    assert compilation.enable_static_kernel is False
    assert compilation.enabled_fusions() == ALL_FUSIONS
    assert config.xlite_graph_config == XliteGraphConfig(enabled=False, full_mode=False)
    assert config.torchair_graph_config is None
    assert parse_additional_config({}) == config
    assert AscendConfig() == config


def test_an_ascend_config_is_returned_as_is() -> None:
    config = AscendConfig(ascend_compilation_config=AscendCompilationConfig(fuse_swiglu=False))
    assert parse_additional_config(config) is config


def test_fusion_switches_match_npugraph_ex_options() -> None:
    # The switches must be named as NpugraphExOptions' fields, in ascend_npugraph_ex's pass order.
    npugraph_ex = pytest.importorskip("ascend_npugraph_ex")
    ours = tuple(k for k in AscendCompilationConfig.model_fields if k.startswith("fuse_"))
    theirs = tuple(
        k for k in npugraph_ex.NpugraphExOptions.accepted_keys() if k.startswith("fuse_")
    )
    assert ours == theirs
    assert tuple(npugraph_ex.FUSIONS) == ALL_FUSIONS
    assert tuple(f"fuse_{name}" for name in ALL_FUSIONS) == ours


def test_models_are_frozen() -> None:
    config = parse_additional_config({})
    with pytest.raises(ValidationError):
        config.ascend_compilation_config.fuse_swiglu = False


def test_config_module_imports_neither_vllm_nor_torch() -> None:
    source = Path(config_module.__file__).read_text()
    imported: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    assert "pydantic" in imported  # the walk does see the imports
    assert not imported & {"vllm", "torch", "ascend_aclgraph", "ascend_npugraph_ex"}


def test_public_names() -> None:
    for name in config_module.__all__:
        assert getattr(config_module, name).__doc__, name


# -------------------------------------------------------------------------------------------------
# wrong types


@pytest.mark.parametrize(
    ("section", "key", "value", "expected"),
    [
        (
            "ascend_compilation_config",
            "enable_npugraph_ex",
            "yes",
            f"{ACC}.enable_npugraph_ex = 'yes': expected true or false "
            "(or null: the default for the cudagraph_mode)",
        ),
        (
            "ascend_compilation_config",
            "enable_static_kernel",
            "true",
            f"{ACC}.enable_static_kernel = 'true': expected true or false",
        ),
        (
            "ascend_compilation_config",
            "fuse_swiglu",
            1,
            f"{ACC}.fuse_swiglu = 1: expected true or false",
        ),
        (
            "ascend_compilation_config",
            "enable_static_kernel",
            None,
            f"{ACC}.enable_static_kernel = None: expected true or false",
        ),
        (
            "xlite_graph_config",
            "enabled",
            0,
            "additional_config.xlite_graph_config.enabled = 0: expected true or false",
        ),
        (
            "xlite_graph_config",
            "full_mode",
            "false",
            "additional_config.xlite_graph_config.full_mode = 'false': expected true or false",
        ),
        (
            "torchair_graph_config",
            "enabled",
            "true",
            "additional_config.torchair_graph_config.enabled = 'true': expected true or false",
        ),
    ],
)
def test_wrong_types_are_rejected_not_coerced(
    section: str, key: str, value: object, expected: str
) -> None:
    assert only_line({section: {key: value}}) == expected


@pytest.mark.parametrize(
    ("section", "value", "expected"),
    [
        (
            "ascend_compilation_config",
            True,
            f"{ACC} = True: expected an object (dict) with the keys {ACC_KEYS}",
        ),
        (
            "xlite_graph_config",
            ["enabled"],
            "additional_config.xlite_graph_config = ['enabled']: expected an object (dict) with "
            "the keys enabled, full_mode",
        ),
        (
            "torchair_graph_config",
            True,
            "additional_config.torchair_graph_config = True: expected an object (dict) with the "
            "keys enabled, or null",
        ),
    ],
)
def test_a_section_that_is_no_object(section: str, value: object, expected: str) -> None:
    assert only_line({section: value}) == expected


def test_additional_config_that_is_no_mapping() -> None:
    assert only_line(["ascend_compilation_config"]) == (
        "additional_config = ['ascend_compilation_config']: expected a mapping (dict) with the "
        f"keys {TOP_KEYS}, or None"
    )


def test_non_string_keys() -> None:
    assert only_line({1: True}) == (
        f"additional_config has the key 1: keys must be strings; accepted keys of "
        f"additional_config: {TOP_KEYS}"
    )
    assert only_line({"ascend_compilation_config": {2: True}}) == (
        f"{ACC} has the key 2: keys must be strings; accepted keys of {ACC}: {ACC_KEYS}"
    )


def test_long_values_are_shortened() -> None:
    line = only_line({"mystery": "x" * 500})
    assert line.startswith("additional_config.mystery = 'xxx")
    assert "x" * 200 not in line
    assert "...: unknown key" in line


# -------------------------------------------------------------------------------------------------
# unknown keys and keys only vllm-ascend implements


def test_unknown_top_level_key() -> None:
    assert only_line({"ascend_compilation_confg": {"enable_npugraph_ex": True}}) == (
        "additional_config.ascend_compilation_confg = {'enable_npugraph_ex': True}: unknown key; "
        f"accepted keys of additional_config: {TOP_KEYS}"
    )


def test_unknown_nested_keys() -> None:
    assert only_line({"ascend_compilation_config": {"enable_npugraphex": True}}) == (
        f"{ACC}.enable_npugraphex = True: unknown key; accepted keys of {ACC}: {ACC_KEYS}"
    )
    assert only_line({"xlite_graph_config": {"decode_only": True}}) == (
        "additional_config.xlite_graph_config.decode_only = True: unknown key; accepted keys of "
        "additional_config.xlite_graph_config: enabled, full_mode"
    )
    assert only_line({"torchair_graph_config": {"enabled": True, "speed": 3}}) == (
        "additional_config.torchair_graph_config.speed = 3: unknown key; accepted keys of "
        "additional_config.torchair_graph_config: enabled"
    )


@pytest.mark.parametrize(
    "key",
    [
        "ascend_fusion_config",
        "enable_shared_expert_dp",
        "enable_dsa_cp",
        "refresh",
        "weight_prefetch_config",
        "ascend_scheduler_config",
        "enable_cpu_binding",
        "multistream_overlap_shared_expert",
        "lmhead_tensor_parallel_size",
        "oproj_tensor_parallel_size",
        "enable_prefetch",
        "dynamic_eplb",
        "expert_map_path",
        "chunked_prefill_for_mla",
        "finegrained_tp_config",
    ],
)
def test_vllm_ascend_only_top_level_keys(key: str) -> None:
    assert only_line({key: False}) == (
        f"additional_config.{key} = False: {NOT_IMPLEMENTED}; remove it; accepted keys of "
        f"additional_config: {TOP_KEYS}"
    )


@pytest.mark.parametrize("key", ["fuse_norm_quant", "fuse_qknorm_rope", "fuse_muls_add"])
def test_vllm_ascend_only_compilation_keys(key: str) -> None:
    line = only_line({"ascend_compilation_config": {key: True}})
    assert line.startswith(f"{ACC}.{key} = True: {NOT_IMPLEMENTED}; ")
    assert line.endswith(f"; accepted keys of {ACC}: {ACC_KEYS}")


def test_fuse_qknorm_rope_points_to_our_switch() -> None:
    line = only_line({"ascend_compilation_config": {"fuse_qknorm_rope": False}})
    assert f"is switched by {ACC}.fuse_qk_norm_rope here" in line


@pytest.mark.parametrize(
    ("key", "replacement"),
    [
        ("mode", "compilation_config.cudagraph_mode"),
        ("use_cached_graph", "vLLM's compile cache"),
        ("graph_batch_sizes", "use compilation_config.cudagraph_capture_sizes instead"),
        ("graph_batch_sizes_init", "compilation_config.cudagraph_capture_sizes"),
        ("enable_multistream_mla", "no replacement"),
        ("enable_multistream_moe", "no replacement"),
        ("enable_view_optimize", "no replacement"),
        ("enable_frozen_parameter", "ACLGraph captures parameters at fixed addresses"),
        ("enable_kv_nz", "no replacement"),
        ("enable_super_kernel", "no replacement"),
    ],
)
def test_removed_torchair_keys(key: str, replacement: str) -> None:
    line = only_line({"torchair_graph_config": {"enabled": True, key: [1, 8]}})
    prefix = (
        f"additional_config.torchair_graph_config.{key} = [1, 8]: torchair was removed from "
        "vllm-ascend (v0.12.0rc1) and is not implemented by vllm-ascend-plugin; "
    )
    assert line.startswith(prefix)
    assert replacement in line[len(prefix) :]
    assert line.endswith("; accepted keys of additional_config.torchair_graph_config: enabled")


def test_several_errors_are_listed_one_per_line() -> None:
    error = error_of(
        {
            "foo": 1,
            "ascend_compilation_config": {"enable_npugraph_ex": "yes", "fuse_muls_add": True},
            "xlite_graph_config": {"full_mode": 1},
        }
    )
    assert error.errors == (
        f"{ACC}.enable_npugraph_ex = 'yes': expected true or false "
        "(or null: the default for the cudagraph_mode)",
        f"{ACC}.fuse_muls_add = True: {NOT_IMPLEMENTED}; remove it; accepted keys of {ACC}: "
        f"{ACC_KEYS}",
        "additional_config.xlite_graph_config.full_mode = 1: expected true or false",
        f"additional_config.foo = 1: unknown key; accepted keys of additional_config: {TOP_KEYS}",
    )
    assert str(error) == "4 errors in additional_config:\n" + "\n".join(
        f"  {line}" for line in error.errors
    )


def test_error_is_a_value_error_and_pickles() -> None:
    error = error_of({"foo": 1, "bar": 2})
    assert isinstance(error, ValueError)
    copied = pickle.loads(pickle.dumps(error))
    assert copied.errors == error.errors
    assert str(copied) == str(error)


def test_direct_construction_raises_the_same_error() -> None:
    bad: dict[str, Any] = {"enable_npugraph_ex": "yes"}
    with pytest.raises(AscendConfigError) as info:
        AscendCompilationConfig(**bad)
    assert str(info.value) == (
        f"{ACC}.enable_npugraph_ex = 'yes': expected true or false "
        "(or null: the default for the cudagraph_mode)"
    )
    with pytest.raises(AscendConfigError) as info:
        AscendConfig(ascend_compilation_config=bad)  # type: ignore[arg-type]
    assert info.value.errors == (str(info.value),)
    assert str(info.value).startswith(f"{ACC}.enable_npugraph_ex = 'yes': ")


# -------------------------------------------------------------------------------------------------
# contradictions


def test_static_kernel_needs_npugraph_ex() -> None:
    assert only_line(
        {"ascend_compilation_config": {"enable_npugraph_ex": False, "enable_static_kernel": True}}
    ) == (
        f"{ACC}.enable_static_kernel = True: static kernels are compiled by npugraph_ex, but "
        "enable_npugraph_ex is False; accepted: enable_static_kernel false, or "
        "enable_npugraph_ex true or unset"
    )
    # Unset npugraph_ex is fine: it is on by default where static kernels can run.
    unset = parse_additional_config({"ascend_compilation_config": {"enable_static_kernel": True}})
    assert unset.ascend_compilation_config.enable_static_kernel is True


@pytest.mark.parametrize(
    ("switches", "off"),
    [
        ({"fuse_rms_norm": False}, "fuse_rms_norm"),
        ({"fuse_rotary": False}, "fuse_rotary"),
        ({"fuse_rms_norm": False, "fuse_rotary": False}, "fuse_rms_norm and fuse_rotary"),
    ],
)
def test_qk_norm_rope_needs_rms_norm_and_rotary(switches: dict[str, bool], off: str) -> None:
    assert only_line({"ascend_compilation_config": switches}) == (
        f"{ACC}.fuse_qk_norm_rope = True: it fuses the results of the rms_norm and rotary "
        f"fusions, but {off} is False; accepted: fuse_qk_norm_rope false, or fuse_rms_norm and "
        "fuse_rotary both true"
    )
    allowed = parse_additional_config(
        {"ascend_compilation_config": {**switches, "fuse_qk_norm_rope": False}}
    )
    assert "qk_norm_rope" not in allowed.ascend_compilation_config.enabled_fusions()


def test_xlite_full_mode_needs_enabled() -> None:
    assert only_line({"xlite_graph_config": {"full_mode": True}}) == (
        "additional_config.xlite_graph_config.full_mode = True: full_mode configures the "
        "XliteGraph path, but enabled is False; accepted: full_mode false, or enabled true as well"
    )


@pytest.mark.usefixtures("no_xlite_adapter")
def test_xlite_enabled_without_the_adapter() -> None:
    line = only_line({"xlite_graph_config": {"enabled": True}})
    assert line.startswith(
        "additional_config.xlite_graph_config.enabled = True: the XliteGraph adapter (package "
        "ascend-xlite-adapter, module ascend_xlite_adapter) is not installed ("
    )
    assert line.endswith(
        "); install it (pip install ascend-xlite-adapter), or accepted: false (the default)"
    )
    with pytest.raises(AscendConfigError) as info:
        check_xlite_available()
    assert str(info.value) == line


@pytest.mark.usefixtures("fake_xlite_adapter")
def test_xlite_enabled_with_the_adapter_parses() -> None:
    # The serving constraints (parallelism, block size, architecture, xlite._C on an NPU) are
    # checked against the vLLM config by the platform, not by the schema.
    config = parse_additional_config({"xlite_graph_config": {"enabled": True, "full_mode": True}})
    assert config.xlite_graph_config == XliteGraphConfig(enabled=True, full_mode=True)
    check_xlite_available()


# -------------------------------------------------------------------------------------------------
# the deprecated torchair_graph_config alias


def _parse_recording(
    additional_config: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> tuple[AscendConfig, list[str], list[str]]:
    caplog.clear()
    with (
        warnings.catch_warnings(record=True) as caught,
        caplog.at_level(logging.WARNING, logger=CONFIG_LOGGER),
    ):
        warnings.simplefilter("always")
        config = parse_additional_config(additional_config)
    deprecations = [str(w.message) for w in caught if w.category is DeprecationWarning]
    logged = [r.getMessage() for r in caplog.records if r.name == CONFIG_LOGGER]
    return config, deprecations, logged


def test_torchair_enabled_maps_to_npugraph_ex_and_warns_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    first, warned, logged = _parse_recording({"torchair_graph_config": {"enabled": True}}, caplog)
    assert len(warned) == 1
    assert logged == warned
    assert warned[0].startswith(
        "additional_config.torchair_graph_config is deprecated: vllm-ascend removed TorchAir "
        'graph mode; {"enabled": true} maps to graph mode through ACLGraph + npugraph_ex, i.e. '
        f"{ACC}.enable_npugraph_ex=True"
    )
    assert first == parse_additional_config(
        {"ascend_compilation_config": {"enable_npugraph_ex": True}}
    )
    assert first.torchair_graph_config is None

    second, warned_again, logged_again = _parse_recording(
        {"torchair_graph_config": {"enabled": True}}, caplog
    )
    assert second == first
    assert warned_again == []
    assert logged_again == []


def test_torchair_disabled_maps_to_nothing(caplog: pytest.LogCaptureFixture) -> None:
    config, warned, logged = _parse_recording({"torchair_graph_config": {"enabled": False}}, caplog)
    assert config == AscendConfig()
    assert len(warned) == 1
    assert warned[0].endswith('{"enabled": false} maps to nothing; remove it')
    assert logged == warned
    # An empty section is enabled=False.
    assert parse_additional_config({"torchair_graph_config": {}}) == AscendConfig()
    # null is no section at all, nothing to warn about.
    config_module._torchair_warned = False
    assert parse_additional_config({"torchair_graph_config": None}) == AscendConfig()
    assert config_module._torchair_warned is False


def test_torchair_keeps_the_other_compilation_switches(caplog: pytest.LogCaptureFixture) -> None:
    given = {
        "torchair_graph_config": {"enabled": True},
        "ascend_compilation_config": {"fuse_swiglu": False, "enable_static_kernel": True},
    }
    config, _, _ = _parse_recording(given, caplog)
    assert config.ascend_compilation_config == AscendCompilationConfig(
        enable_npugraph_ex=True, enable_static_kernel=True, fuse_swiglu=False
    )
    explicit = {**given, "ascend_compilation_config": {"enable_npugraph_ex": True}}
    assert _parse_recording(explicit, caplog)[0].ascend_compilation_config.enable_npugraph_ex


def test_torchair_folds_in_direct_construction(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger=CONFIG_LOGGER), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        config = AscendConfig(
            ascend_compilation_config=AscendCompilationConfig(
                fuse_rotary=False, fuse_qk_norm_rope=False
            ),
            torchair_graph_config=TorchairGraphConfig(enabled=True),
        )
    assert config.torchair_graph_config is None
    assert config.ascend_compilation_config.enable_npugraph_ex is True
    assert config.ascend_compilation_config.fuse_rotary is False


def test_torchair_enabled_contradicts_npugraph_ex_off() -> None:
    assert only_line(
        {
            "torchair_graph_config": {"enabled": True},
            "ascend_compilation_config": {"enable_npugraph_ex": False},
        }
    ) == (
        "additional_config.torchair_graph_config.enabled = True: the deprecated "
        "torchair_graph_config.enabled=True maps to ascend_compilation_config."
        "enable_npugraph_ex=True, but enable_npugraph_ex is False; accepted: drop "
        "torchair_graph_config (the ACLGraph path without npugraph_ex), or set "
        "enable_npugraph_ex true"
    )


def test_malformed_torchair_section_does_not_warn(caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(AscendConfigError):
        _parse_recording({"torchair_graph_config": {"enabled": "true"}}, caplog)
    assert config_module._torchair_warned is False


def test_reparsing_the_folded_config_does_not_warn(caplog: pytest.LogCaptureFixture) -> None:
    config, warned, _ = _parse_recording({"torchair_graph_config": {"enabled": True}}, caplog)
    assert len(warned) == 1
    # A worker process: the once-flag is fresh there, and still nothing warns.
    config_module._torchair_warned = False
    again, warned_in_worker, logged_in_worker = _parse_recording(
        config.to_additional_config(), caplog
    )
    assert again == config
    assert warned_in_worker == []
    assert logged_in_worker == []


# -------------------------------------------------------------------------------------------------
# the input is not mutated


def test_input_is_not_mutated(caplog: pytest.LogCaptureFixture) -> None:
    given: dict[str, Any] = {
        "torchair_graph_config": {"enabled": True},
        "ascend_compilation_config": {"fuse_swiglu": False},
        "xlite_graph_config": {},
    }
    snapshot = copy.deepcopy(given)
    sections = {key: id(value) for key, value in given.items()}
    _parse_recording(given, caplog)
    assert given == snapshot
    assert {key: id(value) for key, value in given.items()} == sections

    bad: dict[str, Any] = {"ascend_compilation_config": {"enable_npugraph_ex": "yes"}, "x": 1}
    bad_snapshot = copy.deepcopy(bad)
    error_of(bad)
    assert bad == bad_snapshot


def test_read_only_mappings_are_accepted() -> None:
    given = MappingProxyType(
        {"ascend_compilation_config": MappingProxyType({"enable_npugraph_ex": False})}
    )
    config = parse_additional_config(given)
    assert config.ascend_compilation_config.enable_npugraph_ex is False


# -------------------------------------------------------------------------------------------------
# round trip and hash

ROUND_TRIP_CASES: list[dict[str, Any]] = [
    {},
    {"ascend_compilation_config": {"enable_npugraph_ex": True, "enable_static_kernel": True}},
    {"ascend_compilation_config": {"enable_npugraph_ex": False, "fuse_swiglu": False}},
    {
        "ascend_compilation_config": {
            "fuse_rms_norm": False,
            "fuse_rotary": False,
            "fuse_qk_norm_rope": False,
        }
    },
    {"torchair_graph_config": {"enabled": True}},
]


@pytest.mark.parametrize("given", ROUND_TRIP_CASES)
def test_round_trip(given: dict[str, Any]) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        config = parse_additional_config(given)
    dumped = config.to_additional_config()
    assert set(dumped) == {"ascend_compilation_config", "xlite_graph_config"}
    assert json.loads(json.dumps(dumped)) == dumped
    assert parse_additional_config(dumped) == config
    assert parse_additional_config(json.loads(json.dumps(dumped))) == config
    assert parse_additional_config(dumped).compute_hash() == config.compute_hash()


def test_round_trip_values() -> None:
    config = parse_additional_config({"ascend_compilation_config": {"fuse_swiglu": False}})
    assert config.to_additional_config() == {
        "ascend_compilation_config": {
            "enable_npugraph_ex": None,
            "enable_static_kernel": False,
            "fuse_add_rms_norm": True,
            "fuse_rms_norm": True,
            "fuse_swiglu": False,
            "fuse_rotary": True,
            "fuse_qk_norm_rope": True,
        },
        "xlite_graph_config": {"enabled": False, "full_mode": False},
    }


def test_to_additional_config_returns_a_fresh_dict() -> None:
    config = parse_additional_config({})
    dumped = config.to_additional_config()
    dumped["ascend_compilation_config"]["fuse_swiglu"] = False
    assert config.ascend_compilation_config.fuse_swiglu is True
    assert config.to_additional_config()["ascend_compilation_config"]["fuse_swiglu"] is True


def test_hash_is_stable() -> None:
    digest = parse_additional_config(None).compute_hash()
    # Pinned: a change of the canonical form silently invalidates (or worse, aliases) vLLM's
    # compile caches, so it must be a deliberate edit of this test.
    assert digest == "2990a5b5ec6f34d573c26ca007ba84825fbc0ac6a6438fc52537a2b56fd79be1"
    assert parse_additional_config({}).compute_hash() == digest


def test_hash_ignores_key_order() -> None:
    one = {
        "ascend_compilation_config": {"fuse_swiglu": False, "enable_npugraph_ex": True},
        "xlite_graph_config": {"enabled": False},
    }
    other = {
        "xlite_graph_config": {"enabled": False},
        "ascend_compilation_config": {"enable_npugraph_ex": True, "fuse_swiglu": False},
    }
    assert list(one) != list(other)
    assert parse_additional_config(one).compute_hash() == (
        parse_additional_config(other).compute_hash()
    )


@pytest.mark.parametrize(
    "key",
    ["fuse_add_rms_norm", "fuse_rms_norm", "fuse_swiglu", "fuse_rotary", "fuse_qk_norm_rope"],
)
def test_hash_changes_with_each_fusion_switch(key: str) -> None:
    # qk_norm_rope off in both, so that rms_norm and rotary may be switched off alone.
    base = {"fuse_qk_norm_rope": False}
    toggled = {**base, key: not base.get(key, True)}
    base_hash = parse_additional_config({"ascend_compilation_config": base}).compute_hash()
    toggled_hash = parse_additional_config({"ascend_compilation_config": toggled}).compute_hash()
    assert toggled_hash != base_hash


@pytest.mark.parametrize(
    "compilation",
    [
        {"enable_npugraph_ex": True},
        {"enable_npugraph_ex": False},
        {"enable_static_kernel": True},
    ],
)
def test_hash_changes_with_npugraph_ex_switches(compilation: dict[str, bool]) -> None:
    default = parse_additional_config({}).compute_hash()
    changed = parse_additional_config({"ascend_compilation_config": compilation})
    assert changed.compute_hash() != default


# -------------------------------------------------------------------------------------------------
# resolve_compilation: 5 modes x (default / explicit True / explicit False / static kernel)

VARIANTS: dict[str, dict[str, bool]] = {
    "default": {},
    "explicit_on": {"enable_npugraph_ex": True},
    "explicit_off": {"enable_npugraph_ex": False},
    "static_kernel": {"enable_static_kernel": True},
}

# (npugraph_ex, static_kernel, passes) per mode and variant.
EXPECTED: dict[tuple[str, str], tuple[bool, bool, tuple[str, ...]]] = {}
for _mode in MODES:
    _full = _mode in ("FULL", "FULL_DECODE_ONLY")
    # The fusions are npugraph_ex's passes: they run exactly when npugraph_ex does.
    _passes = ALL_FUSIONS if _full else ()
    EXPECTED[(_mode, "default")] = (_full, False, _passes)
    EXPECTED[(_mode, "explicit_on")] = (_full, False, _passes)
    EXPECTED[(_mode, "explicit_off")] = (False, False, ())
    EXPECTED[(_mode, "static_kernel")] = (_full, _full, _passes)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_resolve_compilation(mode: str, variant: str) -> None:
    config = parse_additional_config({"ascend_compilation_config": VARIANTS[variant]})
    decision = resolve_compilation(config, mode)
    assert (decision.npugraph_ex, decision.static_kernel, decision.fusion_passes) == (
        EXPECTED[(mode, variant)]
    )
    npx_line, static_line, fusion_line = decision.reasons
    assert npx_line.startswith("npugraph_ex on: " if decision.npugraph_ex else "npugraph_ex off: ")
    assert static_line.startswith(
        "static kernel on: " if decision.static_kernel else "static kernel off: "
    )
    assert fusion_line.startswith("fusion passes")
    full = mode in ("FULL", "FULL_DECODE_ONLY")
    # An explicit request the mode cannot honour is reported as overridden, with the reason.
    assert ("the explicit enable_npugraph_ex=True is overridden" in npx_line) == (
        variant == "explicit_on" and not full
    )
    assert ("the explicit enable_static_kernel=True is overridden" in static_line) == (
        variant == "static_kernel" and not full
    )
    if not full:
        assert f"cudagraph_mode {mode}" in npx_line


def test_resolve_reason_texts() -> None:
    default = parse_additional_config({})
    on = parse_additional_config({"ascend_compilation_config": {"enable_npugraph_ex": True}})
    off = parse_additional_config({"ascend_compilation_config": {"enable_npugraph_ex": False}})
    assert resolve_compilation(default, "PIECEWISE").reasons == (
        "npugraph_ex off: cudagraph_mode PIECEWISE runs only the plain fusion passes "
        "(npugraph_ex runs in FULL and FULL_DECODE_ONLY)",
        "static kernel off: enable_static_kernel is False (it is opt-in)",
        "fusion passes: none, npugraph_ex is off in cudagraph_mode PIECEWISE and vLLM's plain "
        "post-grad fusion passes exist for CUDA only",
    )
    assert resolve_compilation(default, "FULL").reasons[0] == (
        "npugraph_ex on: the default for cudagraph_mode FULL (it optimizes the whole FX graph at "
        "compile time, then ACLGraph captures the result)"
    )
    assert resolve_compilation(on, "FULL_AND_PIECEWISE").reasons[0] == (
        "npugraph_ex off: the explicit enable_npugraph_ex=True is overridden: cudagraph_mode "
        "FULL_AND_PIECEWISE splits the FX graph for piecewise capture and npugraph_ex needs the "
        "whole graph, so only the plain fusion passes run (npugraph_ex runs in FULL and "
        "FULL_DECODE_ONLY; set cudagraph_mode to one of them to use it)"
    )
    assert resolve_compilation(off, "FULL_DECODE_ONLY").reasons[0] == (
        "npugraph_ex off: enable_npugraph_ex=False; cudagraph_mode FULL_DECODE_ONLY runs only "
        "the plain fusion passes"
    )
    assert resolve_compilation(default, "NONE").reasons[2] == (
        "fusion passes: none, cudagraph_mode NONE compiles nothing"
    )


def test_resolve_reports_switched_off_fusions() -> None:
    config = parse_additional_config(
        {"ascend_compilation_config": {"fuse_swiglu": False, "fuse_add_rms_norm": False}}
    )
    decision = resolve_compilation(config, "FULL")
    assert decision.fusion_passes == ("rms_norm", "rotary", "qk_norm_rope")
    assert decision.reasons[2] == (
        "fusion passes (run by npugraph_ex): rms_norm, rotary, qk_norm_rope "
        "(switched off: fuse_add_rms_norm, fuse_swiglu)"
    )


def test_resolve_accepts_graph_mode_and_any_case() -> None:
    graph_mode = pytest.importorskip("ascend_aclgraph").GraphMode
    config = parse_additional_config({})
    for mode in MODES:
        expected = resolve_compilation(config, mode)
        assert resolve_compilation(config, graph_mode[mode]) == expected
        assert resolve_compilation(config, f" {mode.lower()} ") == expected
    assert resolve_compilation(config, graph_mode.FULL_DECODE_ONLY).npugraph_ex is True


def test_resolve_rejects_unknown_modes() -> None:
    config = parse_additional_config({})
    with pytest.raises(ValueError, match="unknown cudagraph_mode 'FULLY'; accepted values: ") as e:
        resolve_compilation(config, "FULLY")
    assert str(e.value).endswith("NONE, PIECEWISE, FULL, FULL_DECODE_ONLY, FULL_AND_PIECEWISE")
    with pytest.raises(ValueError, match="unknown cudagraph_mode 2"):
        resolve_compilation(config, 2)  # type: ignore[arg-type]


def test_decision_is_frozen() -> None:
    decision = resolve_compilation(parse_additional_config({}), "FULL")
    assert isinstance(decision, CompilationDecision)
    with pytest.raises(AttributeError):
        decision.npugraph_ex = False  # type: ignore[misc]
