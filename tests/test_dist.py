"""Reductions across ranks (dist.py), in one process.

A single process reduces to its own values. Many ranks are played by threads of this process
that run the real ``all_reduce_named`` against a stand-in for ``torch.distributed`` whose
collectives trade values between the threads (no process group, no processes).
"""

import threading

import pytest
import torch
import torch.distributed

from opd_cli import dist
from opd_cli.dist import all_reduce_named
from opd_cli.objectives.diagnostics import MetricSums


class ThreadRanks:
    """``torch.distributed`` as ``world`` ranks see it, each rank a thread: all_gather_object and
    all_reduce (sum, max) over what every thread passes in."""

    ReduceOp = torch.distributed.ReduceOp

    def __init__(self, world: int) -> None:
        self.world = world
        self.barrier = threading.Barrier(world, timeout=30)
        self.slots: list = [None] * world
        self.local = threading.local()

    def is_initialized(self) -> bool:
        return True

    def get_world_size(self) -> int:
        return self.world

    def _exchange(self, value) -> list:
        self.barrier.wait()  # every rank is done reading the previous exchange
        self.slots[self.local.rank] = value
        self.barrier.wait()
        out = list(self.slots)
        self.barrier.wait()
        return out

    def all_gather_object(self, out: list, obj) -> None:
        out[:] = self._exchange(obj)

    def all_reduce(self, tensor: torch.Tensor, op=None) -> None:
        values = torch.stack(self._exchange(tensor.clone()))
        tensor.copy_(values.amax(0) if op == self.ReduceOp.MAX else values.sum(0))

    def run(self, fn, per_rank: list) -> list:
        """``fn(per_rank[r])`` on every rank r at once; the results by rank."""
        results, errors = [None] * self.world, []

        def rank(r):
            self.local.rank = r
            try:
                results[r] = fn(per_rank[r])
            except BaseException as e:  # re-raised in the test's thread
                errors.append(e)
                self.barrier.abort()

        threads = [threading.Thread(target=rank, args=(r,)) for r in range(self.world)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        return results


def test_one_process_reduces_to_its_own_values():
    values = {"b": 2.0, "a": -1.5}
    for op in ("sum", "max"):
        got = all_reduce_named(values, op)
        assert got == values and list(got) == ["a", "b"]  # the same values, keys sorted


def test_many_ranks_sum_and_max_with_keys_some_ranks_lack(monkeypatch):
    """Rank 0 logged a and b, rank 1 b and c, rank 2 only c: every rank gets every key; a missing
    key adds 0 to a sum and is left out of a maximum (so c's maximum stays negative)."""
    ranks = ThreadRanks(3)
    monkeypatch.setattr(dist, "dist", ranks)
    per_rank = [{"a": 1.0, "b": 2.0}, {"c": -3.0, "b": 5.0}, {"c": -4.0}]
    sums = ranks.run(lambda v: all_reduce_named(v, "sum"), per_rank)
    maxes = ranks.run(lambda v: all_reduce_named(v, "max"), per_rank)
    for got in sums:
        assert got == {"a": 1.0, "b": 7.0, "c": -7.0} and list(got) == ["a", "b", "c"]
    for got in maxes:
        assert got == {"a": 1.0, "b": 5.0, "c": -3.0}


def test_metric_sums_reduced_across_ranks_are_the_pooled_means(monkeypatch):
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

    def reduce(metrics):
        sums = MetricSums()
        for name, (values, weight) in metrics.items():
            sums.add(name, values, weight)
        return MetricSums.from_named(all_reduce_named(sums.named(), "sum")).means()

    ranks = ThreadRanks(2)
    monkeypatch.setattr(dist, "dist", ranks)
    got = ranks.run(reduce, raw)
    values = [float(v) for r in raw for v, w in zip(*r["entropy"], strict=True) if w > 0]
    assert got[0] == got[1]
    assert got[0]["entropy"] == pytest.approx(sum(values) / len(values), rel=1e-6)
    assert got[0]["teacher_rank"] == pytest.approx(3.5)
