"""Reductions across ranks (dist.py), in one process.

A single process reduces to its own values (unit tier); many ranks are real gloo processes
(cli tier: they are spawned).
"""

import pytest
import torch
import torch.distributed

from opd_cli.dist import all_reduce_named
from opd_cli.objectives.diagnostics import MetricSums


def on_ranks(fn, per_rank: list, tmp_path) -> list:
    """``fn(per_rank[r])`` on ``len(per_rank)`` real gloo ranks (spawned processes); results by rank."""
    world = len(per_rank)
    torch.multiprocessing.spawn(_rank_main, args=(world, fn, per_rank, str(tmp_path)), nprocs=world, join=True)
    return [torch.load(tmp_path / f"result_{r}.pt") for r in range(world)]


def _rank_main(rank: int, world: int, fn, per_rank: list, tmp: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=world)
    try:
        torch.save(fn(per_rank[rank]), f"{tmp}/result_{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


def _sum_and_max(values: dict) -> tuple[dict, dict]:
    return all_reduce_named(values, "sum"), all_reduce_named(values, "max")


def _pooled_means(metrics: dict) -> dict:
    sums = MetricSums()
    for name, (values, weight) in metrics.items():
        sums.add(name, values, weight)
    return MetricSums.from_named(all_reduce_named(sums.named(), "sum")).means()


def test_one_process_reduces_to_its_own_values():
    values = {"b": 2.0, "a": -1.5}
    for op in ("sum", "max"):
        got = all_reduce_named(values, op)
        assert got == values and list(got) == ["a", "b"]  # the same values, keys sorted


@pytest.mark.cli
def test_many_ranks_sum_and_max_with_keys_some_ranks_lack(tmp_path):
    """Rank 0 logged a and b, rank 1 b and c, rank 2 only c: every rank gets every key; a missing
    key adds 0 to a sum and is left out of a maximum (so c's maximum stays negative). Real gloo ranks."""
    per_rank = [{"a": 1.0, "b": 2.0}, {"c": -3.0, "b": 5.0}, {"c": -4.0}]
    for sums, maxes in on_ranks(_sum_and_max, per_rank, tmp_path):
        assert sums == {"a": 1.0, "b": 7.0, "c": -7.0} and list(sums) == ["a", "b", "c"]
        assert maxes == {"a": 1.0, "b": 5.0, "c": -3.0}


@pytest.mark.cli
def test_metric_sums_reduced_across_ranks_are_the_pooled_means(tmp_path):
    """Each rank's MetricSums -> named -> summed across ranks -> from_named -> means: the weighted
    mean over every rank's tokens, computed here from the raw values; a metric one rank lacks counts
    the others' tokens only."""
    g = torch.Generator().manual_seed(0)
    raw = [
        {"entropy": (torch.rand(5, generator=g), torch.tensor([1.0, 1, 0, 1, 1]))},
        {
            "entropy": (torch.rand(3, generator=g), torch.ones(3)),
            "teacher_rank": (torch.tensor([2.0, 5]), torch.ones(2)),
        },
    ]
    got = on_ranks(_pooled_means, raw, tmp_path)
    values = [float(v) for r in raw for v, w in zip(*r["entropy"], strict=True) if w > 0]
    assert got[0] == got[1]
    assert got[0]["entropy"] == pytest.approx(sum(values) / len(values), rel=1e-6)
    assert got[0]["teacher_rank"] == pytest.approx(3.5)
