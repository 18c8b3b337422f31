"""Comparing the KV-cache state two generations wrote (``vllm_generate.py``'s ``kv_state_out``).

The one rule of graph mode covers the state a graph writes as well as its outputs: after the
same generation, a graph mode's KV cache must hold what eager's holds, in the same blocks.
"""

from __future__ import annotations

from pathlib import Path

import torch


def max_kv_difference(reference: Path, other: Path) -> float:
    """Largest absolute difference between two saved KV states, over every written block.

    Raises:
        AssertionError: the workers, layers or written block ids differ.
    """
    ref_workers = torch.load(reference)
    other_workers = torch.load(other)
    assert len(ref_workers) == len(other_workers), "different worker counts"
    worst = 0.0
    for rank, (ref_layers, other_layers) in enumerate(zip(ref_workers, other_workers, strict=True)):
        assert len(ref_layers) == len(other_layers), f"rank {rank}: different layer counts"
        for layer, ((ref_blocks, ref_values), (blocks, values)) in enumerate(
            zip(ref_layers, other_layers, strict=True)
        ):
            assert ref_blocks, f"rank {rank} layer {layer}: the reference wrote no block"
            assert blocks == ref_blocks, (
                f"rank {rank} layer {layer}: written blocks {blocks}, reference {ref_blocks}"
            )
            difference = (torch.tensor(values) - torch.tensor(ref_values)).abs().max().item()
            worst = max(worst, difference)
    return worst
