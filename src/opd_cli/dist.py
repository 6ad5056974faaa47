"""Each process's view of the job: its rank and device, and reductions across ranks.

In a single process every reduction returns its input, so the same code runs on a laptop
and on many GPUs.
"""

from __future__ import annotations

import math
import os
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from opd_cli.errors import UserError


@dataclass(frozen=True)
class Rank:
    """Where this process sits in the job (read from the launcher's environment)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def this_rank() -> Rank:
    env = os.environ
    return Rank(int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_process_group(device: torch.device) -> Rank:
    """Join the job's process group (gloo on CPU, NCCL on GPUs) through DeepSpeed.

    A single process (no launcher) becomes a job of one, so the DeepSpeed engine
    runs the same code path on a laptop.
    """
    import deepspeed

    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    if device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")

    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo", verbose=False)
    return this_rank()


def save_pretrained(model, directory: Path | str, **kwargs) -> None:
    """``model.save_pretrained`` (safetensors) without importing DeepSpeed in a process that has not.

    transformers unwraps the model through accelerate, which imports DeepSpeed whenever it is
    installed, only to test ``isinstance(model, DeepSpeedEngine)``; on a plain-torch run that import
    takes about 0.3 s here and logs DeepSpeed's accelerator warning. A process that never imported
    DeepSpeed holds no DeepSpeed engine, so there the test is skipped (accelerate's availability
    check answers no while the model is saved); the saved files are the same. ``kwargs`` go to
    ``save_pretrained`` (a ``state_dict``).
    """
    import accelerate.utils.other as unwrapping

    available = getattr(unwrapping, "is_deepspeed_available", None)
    if "deepspeed" in sys.modules or available is None:
        model.save_pretrained(directory, safe_serialization=True, **kwargs)
        return
    unwrapping.is_deepspeed_available = lambda: False
    try:
        model.save_pretrained(directory, safe_serialization=True, **kwargs)
    finally:
        unwrapping.is_deepspeed_available = available


def leave_process_group() -> None:
    """Destroy the process group before the interpreter exits (after a run, or an error every rank hit).

    Left to interpreter finalization, gloo's worker threads are torn down after Python and the
    process can abort with "terminate called without an active exception" (seen in about 1 of 10
    two-rank test runs). Not after an unexpected exception: a rank still inside a collective
    could make the others wait.
    """
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce(values: list[float], op: str = "sum") -> list[float]:
    """Sum (or max) a list of floats across ranks; unchanged in a single process."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return t.tolist()


def all_keys(keys: list[str]) -> list[str]:
    """The sorted union of every rank's keys (metric names can differ between ranks)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return sorted(keys)
    gathered: list[list[str]] = [[] for _ in range(dist.get_world_size())]
    dist.all_gather_object(gathered, sorted(keys))
    return sorted(set().union(*gathered))


def all_reduce_named(values: dict[str, float], op: str = "sum") -> dict[str, float]:
    """Sum (or max) named floats across ranks, in one reduction; a name some rank lacks counts as 0
    (sum) or is left out of its maximum."""
    keys = all_keys(list(values))
    missing = 0.0 if op == "sum" else -math.inf
    return dict(zip(keys, all_reduce([values.get(k, missing) for k in keys], op=op), strict=True))


def shard(items: list, rank: Rank) -> list:
    """This rank's contiguous share of ``items`` (the length must divide evenly)."""
    per = len(items) // rank.world
    return items[rank.rank * per : (rank.rank + 1) * per]


def pick_device(name: str, rank: Rank) -> torch.device:
    """The device of this rank: its local GPU, or the CPU."""
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("trainer.device: 'cuda' was asked for but no GPU is visible")
    if name == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    torch.cuda.set_device(rank.local_rank)
    return torch.device("cuda", rank.local_rank)
