"""Eager vs graph mode, side by side, on a Qwen3-shaped decoder with a real KV cache.

``python -m ascend_aclgraph.demo`` greedily decodes a few requests twice from the same start
tokens, once eagerly and once through :func:`ascend_aclgraph.capture`, and prints the generated
tokens next to each other, the timings and the runtime's counters. Random weights; nothing is
downloaded.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable

import torch

import ascend_aclgraph as ag
from ascend_aclgraph.testing import Qwen3Config, Qwen3Decoder


def _generate(
    step: object, model: Qwen3Decoder, start: torch.Tensor, num_tokens: int
) -> tuple[torch.Tensor, list[float]]:
    """Greedy decoding from ``start``; returns tokens [batch, num_tokens] and step seconds."""
    model.reset_cache()
    tokens = start.clone()
    out = []
    seconds = []
    for pos in range(num_tokens):
        positions = torch.full_like(tokens, pos)
        begin = time.perf_counter()
        with torch.no_grad():
            logits = step(tokens, positions)  # type: ignore[operator]
        seconds.append(time.perf_counter() - begin)
        tokens = logits.argmax(-1)
        out.append(tokens)
    return torch.stack(out, dim=1), seconds


def _int_in(low: int, high: int | None = None, limit: str = "") -> Callable[[str], int]:
    """An argparse type for an int in ``[low, high]``; ``limit`` says what sets ``high``."""

    def convert(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        if high is not None and value > high:
            raise argparse.ArgumentTypeError(f"must be at most {high} ({limit}), got {value}")
        return value

    return convert


def main(argv: list[str] | None = None) -> int:
    cfg = Qwen3Config.small(
        hidden_size=256, num_layers=4, intermediate_size=768, vocab_size=1024, max_seq=64
    )
    sizes = [1, 2, 4, 8]
    # The KV cache has max_batch rows (one per request) and max_seq positions: a larger batch,
    # or a longer generation, would index past it. Checked here so that the user gets a usage
    # error naming the limit rather than an IndexError from inside the model.
    batch_limit = f"the model's KV cache holds {cfg.max_batch} requests"
    seq_limit = f"the model's KV cache holds {cfg.max_seq} positions"
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backend", default="auto", help="auto, cpu, cuda or npu")
    parser.add_argument(
        "--requests",
        type=_int_in(1, cfg.max_batch, batch_limit),
        default=3,
        metavar="N",
        help=f"batch size, 1 to {cfg.max_batch} ({batch_limit}); padded to a capture size "
        f"({', '.join(map(str, sizes))}), above {max(sizes)} every step runs eagerly "
        "(default: 3)",
    )
    parser.add_argument(
        "--tokens",
        type=_int_in(1, cfg.max_seq, seq_limit),
        default=24,
        metavar="N",
        help=f"tokens to generate per request, 1 to {cfg.max_seq} ({seq_limit}; default: 24)",
    )
    parser.add_argument(
        "--threads",
        type=_int_in(1),
        default=1,
        metavar="N",
        help="CPU threads (timings; default: 1)",
    )
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    backend = ag.get_backend(args.backend)
    model = Qwen3Decoder(cfg).to(backend.device)
    vocab = cfg.vocab_size
    assert vocab is not None
    print(
        f"ascend_aclgraph {ag.__version__} demo on backend '{backend.name}' "
        f"(torch {torch.__version__}, {torch.get_num_threads()} thread(s))"
    )
    print(
        f"model: Qwen3-shaped decoder, hidden {cfg.hidden_size}, {cfg.num_layers} layers, "
        f"{cfg.num_heads}/{cfg.num_kv_heads} heads x {cfg.head_dim}, MLP {cfg.intermediate_size}, "
        f"vocab {cfg.vocab_size}, KV cache {cfg.max_batch} x {cfg.max_seq} per layer"
    )
    sample = (
        torch.zeros(max(sizes), dtype=torch.long, device=backend.device),
        torch.zeros(max(sizes), dtype=torch.long, device=backend.device),
    )
    # Padded requests get position -1: their K/V go to the cache's sink slot, never a real one.
    graph_step = ag.capture(
        model, sample, batch_sizes=sizes, backend=backend, pad_value=Qwen3Decoder.PAD_VALUES
    )
    stats = graph_step.stats
    print(
        f"captured {stats.captures} graphs for batch sizes {list(graph_step.sizes)} in "
        f"{stats.capture_seconds:.2f} s; shared pool holds {stats.pool_bytes / 2**10:.1f} KiB"
    )

    gen = torch.Generator().manual_seed(0)
    start = torch.randint(0, vocab, (args.requests,), generator=gen).to(backend.device)
    eager_tokens, eager_s = _generate(model, model, start, args.tokens)
    replays_before = stats.replays
    graph_tokens, graph_s = _generate(graph_step, model, start, args.tokens)
    replayed = stats.replays - replays_before

    padded = graph_step.sizes.pad(args.requests)
    mode = f"graph (padded to {padded})" if padded else "eager fallback (above max size)"
    print(f"\n{'request':<8} {'eager tokens':<40} {mode:<40} same")
    for r in range(args.requests):
        e = " ".join(map(str, eager_tokens[r, :8].tolist())) + " ..."
        g = " ".join(map(str, graph_tokens[r, :8].tolist())) + " ..."
        same = torch.equal(eager_tokens[r], graph_tokens[r])
        print(f"{r:<8} {e:<40} {g:<40} {'yes' if same else 'NO'}")
    matches = int((eager_tokens == graph_tokens).sum())
    total = eager_tokens.numel()
    eager_ms = statistics.median(eager_s[1:] or eager_s) * 1e3
    graph_ms = statistics.median(graph_s[1:] or graph_s) * 1e3
    print(f"\ntokens equal: {matches}/{total}")
    if replayed:
        print(
            f"median step: eager {eager_ms:.3f} ms, graph {graph_ms:.3f} ms "
            f"({eager_ms / graph_ms:.2f}x), {torch.get_num_threads()} thread(s)"
        )
    else:
        # Both columns timed the eager model: a ratio of them would be noise, not a speed-up.
        print(
            f"median step: eager {eager_ms:.3f} ms; the graph path replayed no graph "
            f"(batch {args.requests} is above the largest capture size {max(sizes)}), so every "
            f"step ran eagerly ({graph_ms:.3f} ms) and there is no graph speed-up to report"
        )
    print(f"runtime counters: {stats.as_dict()}")
    return 0 if matches == total else 1


if __name__ == "__main__":
    sys.exit(main())
