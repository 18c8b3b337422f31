"""The twin's cached fast bindings must not let one call shape decide for another."""

from __future__ import annotations

import ascend_aclgraph as ag
import torch


def test_index_put_with_and_without_none_indices_replay_in_one_process() -> None:
    backend = ag.get_backend("cpu")

    def write_rows(cache: torch.Tensor, rows: torch.Tensor, v: torch.Tensor) -> None:
        cache[rows] = v  # index_put_(cache, [rows], v): every index a tensor

    def write_slots(cache: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> None:
        cache[rows, :, cols] = 1.0  # index_put_(cache, [rows, None, cols], ...): a None index

    for fn, extra in ((write_rows, torch.ones(2, 3, 4)), (write_slots, torch.tensor([1, 2]))):
        cache = torch.zeros(4, 3, 4)
        rows = torch.tensor([0, 2])
        graph = backend.new_graph(backend.new_pool())
        with backend.capture(graph):
            fn(cache, rows, extra)
        expected = cache.clone()
        cache.zero_()
        graph.replay()  # a binding cached for the first shape raised a TypeError on the second
        assert torch.equal(cache, expected)
