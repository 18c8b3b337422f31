"""Build a tiny random-weight Qwen3 checkpoint locally, for tests and demos with real vLLM.

Nothing is downloaded: the tokenizer is a ByteLevel BPE trained on the Python standard library's
own sources, and the weights are drawn from a seeded generator. The result is a directory that
``transformers`` and ``vllm`` load like any Hugging Face checkpoint (``HF_HUB_OFFLINE=1`` works).

    python scripts/build_tiny_model.py --out /tmp/tiny-qwen3
    python scripts/build_tiny_model.py --out /tmp/qwen3-26m --preset qwen3-26m

or from Python (e.g. a test that loads this file with importlib)::

    build_tiny_model(out_dir, preset="tiny", seed=0) -> Path

The same preset and seed give byte-identical files. A directory that already holds a model built
with the same parameters is reused as is (its ``tiny_model_meta.json`` says so); ``--force``
rebuilds it.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import inspect
import json
import os
import shutil
import sys
import sysconfig
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

__all__ = ["PRESETS", "TinyPreset", "build_tiny_model", "main"]

# Bump when the build changes in a way the presets do not show (tokenizer layout, saved files),
# so that cached directories built by an older script are rebuilt.
BUILD_FORMAT = 1

META_FILE = "tiny_model_meta.json"
ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
# Their ids are 0, 1, 2: the trainer puts special tokens first, so they are always < vocab.
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END)

# Qwen's ChatML layout, so that vLLM's chat endpoint and apply_chat_template work.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- endif %}"
)

# The BPE corpus: the standard library's top-level modules, sorted by name, until this many
# bytes. Enough text for a few thousand merges, small enough to train in a few seconds.
CORPUS_BYTES = 1_500_000


@dataclasses.dataclass(frozen=True)
class TinyPreset:
    """Sizes of a random Qwen3. ``head_dim`` >= 32: vLLM's CPU attention refuses smaller."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    max_position_embeddings: int
    # transformers' default 0.02 makes a random tiny model repeat one token whatever the context,
    # which hides attention and padding bugs; 0.2 gives prompt-dependent, diverse continuations.
    initializer_range: float = 0.2
    tie_word_embeddings: bool = False


PRESETS: dict[str, TinyPreset] = {
    # 0.36M parameters: loads in vLLM in seconds, token-exact in float32.
    "tiny": TinyPreset(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        intermediate_size=128,
        vocab_size=2048,
        max_position_embeddings=512,
    ),
    # 25.7M parameters: big enough for throughput numbers (ms/token) to mean something on a CPU.
    "qwen3-26m": TinyPreset(
        hidden_size=512,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=64,
        intermediate_size=1408,
        vocab_size=2048,
        max_position_embeddings=2048,
    ),
}


def _log(message: str) -> None:
    # stderr, so that the CLI's stdout is only the model path (MODEL=$(python ... --out d)).
    print(f"[build_tiny_model] {message}", file=sys.stderr, flush=True)


def _corpus_files() -> list[Path]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files: list[Path] = []
    total = 0
    for path in sorted(stdlib.glob("*.py")):
        if total >= CORPUS_BYTES:
            break
        files.append(path)
        total += path.stat().st_size
    if not files:
        raise RuntimeError(f"no .py sources found under the standard library at {stdlib}")
    return files


def _corpus_texts(files: Sequence[Path]) -> Iterator[str]:
    for path in files:
        yield path.read_text(encoding="utf-8", errors="replace")


def _build_key(preset_name: str, preset: TinyPreset, seed: int, files: Sequence[Path]) -> str:
    """A hash of everything the output depends on that this script controls or reads."""
    corpus = hashlib.sha256()
    for path in files:
        corpus.update(path.name.encode())
        corpus.update(path.read_bytes())
    params = {
        "format": BUILD_FORMAT,
        "preset_name": preset_name,
        "preset": dataclasses.asdict(preset),
        "seed": seed,
        "special_tokens": SPECIAL_TOKENS,
        "chat_template": CHAT_TEMPLATE,
        "corpus_bytes": CORPUS_BYTES,
        "corpus_sha256": corpus.hexdigest(),
    }
    return hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()


def _read_meta(out_dir: Path) -> dict[str, Any] | None:
    try:
        meta = json.loads((out_dir / META_FILE).read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def _is_complete(out_dir: Path) -> bool:
    needed = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
    return all((out_dir / name).is_file() for name in needed)


def _train_tokenizer(preset: TinyPreset, files: Sequence[Path], out_dir: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=preset.vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        # Every byte is a token, so any text encodes (no unknown token needed).
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_corpus_texts(files), trainer=trainer)
    if tokenizer.get_vocab_size() != preset.vocab_size:
        raise RuntimeError(
            f"the BPE trainer made {tokenizer.get_vocab_size()} tokens, not {preset.vocab_size}:"
            f" raise CORPUS_BYTES ({CORPUS_BYTES}) or lower the preset's vocab_size"
        )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=None,
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        model_max_length=preset.max_position_embeddings,
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(out_dir))
    # transformers 5 names its own backend class here; the class name that transformers 4 and 5
    # both resolve keeps the checkpoint loadable by either.
    config_path = out_dir / "tokenizer_config.json"
    tokenizer_config = json.loads(config_path.read_text())
    tokenizer_config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(tokenizer_config, indent=2, sort_keys=True) + "\n")


def _save_model(preset: TinyPreset, seed: int, out_dir: Path) -> int:
    import torch
    from transformers import GenerationConfig, Qwen3Config, Qwen3ForCausalLM

    endoftext, _, im_end = range(len(SPECIAL_TOKENS))
    config = Qwen3Config(
        vocab_size=preset.vocab_size,
        hidden_size=preset.hidden_size,
        intermediate_size=preset.intermediate_size,
        num_hidden_layers=preset.num_hidden_layers,
        num_attention_heads=preset.num_attention_heads,
        num_key_value_heads=preset.num_key_value_heads,
        head_dim=preset.head_dim,
        max_position_embeddings=preset.max_position_embeddings,
        initializer_range=preset.initializer_range,
        tie_word_embeddings=preset.tie_word_embeddings,
        bos_token_id=endoftext,
        eos_token_id=im_end,
        pad_token_id=endoftext,
    )
    previous_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    try:
        torch.manual_seed(seed)
        model = Qwen3ForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(previous_dtype)
    model.generation_config = GenerationConfig(
        bos_token_id=endoftext, eos_token_id=[im_end, endoftext], pad_token_id=endoftext
    )
    kwargs: dict[str, Any] = {}
    if "safe_serialization" in inspect.signature(model.save_pretrained).parameters:
        kwargs["safe_serialization"] = True  # transformers 4; 5 only writes safetensors
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a one-shard bar per save is noise next to our lines
    try:
        model.save_pretrained(str(out_dir), **kwargs)
    finally:
        hf_logging.enable_progress_bar()
    if not (out_dir / "model.safetensors").is_file():
        raise RuntimeError(f"save_pretrained wrote no model.safetensors into {out_dir}")
    return sum(p.numel() for p in model.parameters())


def _check_replaceable(out_dir: Path) -> None:
    """Refuse to replace anything but a directory this script built, rather than lose files."""
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise FileExistsError(f"{out_dir} exists and is not a directory")
    if any(out_dir.iterdir()) and not (out_dir / META_FILE).is_file():
        raise FileExistsError(
            f"{out_dir} is not empty and was not made by this script (no {META_FILE}):"
            " pick another --out, or empty it yourself"
        )


def build_tiny_model(
    out_dir: str | os.PathLike[str], preset: str = "tiny", seed: int = 0, force: bool = False
) -> Path:
    """Build (or reuse) a random Qwen3 checkpoint with its tokenizer in ``out_dir``.

    Returns the directory. ``preset`` is a key of :data:`PRESETS`. The same preset and seed give
    byte-identical files; a directory whose ``tiny_model_meta.json`` matches is returned without
    rebuilding unless ``force``. The build goes to a temporary sibling directory that replaces
    ``out_dir`` only when complete, so an interrupted build never looks like a cached one.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}: choose one of {', '.join(PRESETS)}")
    sizes = PRESETS[preset]
    out = Path(out_dir).resolve()
    files = _corpus_files()
    key = _build_key(preset, sizes, seed, files)
    meta = {"preset": preset, "seed": seed, "build_key": key}

    if not force and _is_complete(out) and _read_meta(out) == meta:
        _log(f"reusing {out} (preset {preset}, seed {seed}; --force rebuilds)")
        return out

    _check_replaceable(out)
    start = time.perf_counter()
    _log(f"building preset {preset!r} (seed {seed}) into {out}")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.building-{os.getpid()}"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir()
    try:
        step = time.perf_counter()
        _train_tokenizer(sizes, files, staging)
        _log(
            f"tokenizer: ByteLevel BPE, {sizes.vocab_size} tokens, trained on {len(files)}"
            f" stdlib files in {time.perf_counter() - step:.1f} s"
        )
        step = time.perf_counter()
        n_params = _save_model(sizes, seed, staging)
        _log(
            f"model: Qwen3, {n_params:,} parameters ({n_params / 1e6:.2f}M), float32,"
            f" initialized and saved in {time.perf_counter() - step:.1f} s"
        )
        (staging / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        if not force and _is_complete(out) and _read_meta(out) == meta:
            # Another process (e.g. a parallel test worker) finished the same build first and
            # may be reading it: keep its files.
            _log(f"another process built {out} meanwhile; using it")
        else:
            _check_replaceable(out)
            if out.exists():
                shutil.rmtree(out)
            try:
                staging.rename(out)
            except OSError:
                if not (_is_complete(out) and _read_meta(out) == meta):
                    raise
                _log(f"another process built {out} meanwhile; using it")
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    _log(f"done in {time.perf_counter() - start:.1f} s: {out}")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="directory to write the model to")
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS), help="model sizes")
    parser.add_argument("--seed", default=0, type=int, help="weight seed (default 0)")
    parser.add_argument("--force", action="store_true", help="rebuild even if cached")
    args = parser.parse_args(argv)
    try:
        path = build_tiny_model(args.out, preset=args.preset, seed=args.seed, force=args.force)
    except FileExistsError as exc:
        parser.error(str(exc))
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
