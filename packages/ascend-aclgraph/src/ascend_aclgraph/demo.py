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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backend", default="auto", help="auto, cpu, cuda or npu")
    parser.add_argument("--requests", type=int, default=3, help="batch size (padded to a graph)")
    parser.add_argument("--tokens", type=int, default=24, help="tokens to generate per request")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (timings)")
    args = parser.parse_args(argv)
    if args.requests < 1 or args.tokens < 1:
        parser.error("--requests and --tokens must be positive")

    torch.set_num_threads(args.threads)
    backend = ag.get_backend(args.backend)
    cfg = Qwen3Config.small(
        hidden_size=256, num_layers=4, intermediate_size=768, vocab_size=1024, max_seq=64
    )
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
    sizes = [1, 2, 4, 8]
    sample = (
        torch.zeros(max(sizes), dtype=torch.long, device=backend.device),
        torch.zeros(max(sizes), dtype=torch.long, device=backend.device),
    )
    graph_step = ag.capture(model, sample, batch_sizes=sizes, backend=backend)
    stats = graph_step.stats
    print(
        f"captured {stats.captures} graphs for batch sizes {list(graph_step.sizes)} in "
        f"{stats.capture_seconds:.2f} s; shared pool holds {stats.pool_bytes / 2**10:.1f} KiB"
    )

    gen = torch.Generator().manual_seed(0)
    start = torch.randint(0, vocab, (args.requests,), generator=gen).to(backend.device)
    eager_tokens, eager_s = _generate(model, model, start, args.tokens)
    graph_tokens, graph_s = _generate(graph_step, model, start, args.tokens)

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
    print(
        f"median step: eager {eager_ms:.3f} ms, graph {graph_ms:.3f} ms "
        f"({eager_ms / graph_ms:.2f}x), {torch.get_num_threads()} thread(s)"
    )
    print(f"runtime counters: {stats.as_dict()}")
    return 0 if matches == total else 1


if __name__ == "__main__":
    sys.exit(main())
