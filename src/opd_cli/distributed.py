"""Many processes: starting the ranks, each rank's view of the job, reductions across ranks.

``opd-train`` composes the config once (Hydra), saves it resolved in the run
directory, and, when ``trainer.nproc_per_node * trainer.nnodes > 1``, starts the
ranks with PyTorch's elastic launcher (what ``torchrun`` uses). Each rank runs
``python -m opd_cli.worker <resolved config> <run dir>``. A rank that dies stops
the whole job: the launcher kills the others, and ``opd-train`` exits non-zero
with a line naming the rank.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from opd_cli.errors import EXIT_STOPPED

EXIT_RANK_FAILED = 1
RESOLVED_CONFIG = "resolved_config.yaml"


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
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    if device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo", verbose=False)
    return this_rank()


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


def shard(items: list, rank: Rank) -> list:
    """This rank's contiguous share of ``items`` (the length must divide evenly)."""
    per = len(items) // rank.world
    return items[rank.rank * per : (rank.rank + 1) * per]


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: ``gpu[07-09,12],cpu3`` -> ``gpu07``."""
    head = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if head is None:
        raise ValueError(f"cannot read the SLURM node list {nodelist!r}")
    prefix, ranges = head.group(1), head.group(2)
    return prefix + ranges.split(",")[0].split("-")[0] if ranges else prefix


def slurm_rendezvous(env: dict[str, str]) -> dict[str, Any] | None:
    """Node count, node rank, master address and port of the SLURM job this process runs in (or None).

    One task per node runs opd-train (hydra/launcher=slurm), so SLURM_NODEID is the node
    rank. The port is derived from the job id, so jobs sharing a node do not collide.
    """
    if "SLURM_JOB_ID" not in env or "SLURM_NODEID" not in env:
        return None
    return {
        "nnodes": int(env.get("SLURM_JOB_NUM_NODES") or env.get("SLURM_NNODES") or 1),
        "node_rank": int(env["SLURM_NODEID"]),
        "master_addr": first_host(env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST") or "127.0.0.1"),
        "master_port": 20000 + int(env["SLURM_JOB_ID"]) % 20000,
    }


def launch(cfg, run_dir: Path) -> None:
    """Save the resolved config and run ``trainer.nproc_per_node`` ranks on this node; return when all end."""
    from omegaconf import OmegaConf
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    tc = cfg.trainer
    where = {k: tc[k] for k in ("nnodes", "node_rank", "master_addr", "master_port")}
    if slurm := slurm_rendezvous(dict(os.environ)):
        where.update(slurm)  # the allocation decides, whatever the config said
    resolved = run_dir / RESOLVED_CONFIG
    OmegaConf.save(cfg, resolved, resolve=True)
    port = where["master_port"] or free_port()
    config = LaunchConfig(
        min_nodes=where["nnodes"],
        max_nodes=where["nnodes"],
        nproc_per_node=tc.nproc_per_node,
        run_id=run_dir.name,
        rdzv_backend="static",  # fixed node ranks, as torchrun --master_addr/--node_rank
        rdzv_endpoint=f"{where['master_addr']}:{port}",
        rdzv_configs={"rank": where["node_rank"], "timeout": tc.rdzv_timeout},
        max_restarts=0,
        monitor_interval=0.5,
        start_method="spawn",
        # on SIGTERM the ranks finish their step and save a checkpoint; after this long they are killed
        shutdown_timeout=tc.stop_timeout_s,
    )
    try:
        elastic_launch(config, entrypoint=sys.executable)("-m", "opd_cli.worker", str(resolved), str(run_dir))
    except SignalException as e:
        print(
            f"error: stopped by {e.sigval.name}; resume with trainer.resume=true hydra.run.dir={run_dir}",
            file=sys.stderr,
        )
        raise SystemExit(EXIT_STOPPED) from None
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        if failure.exitcode in (2, EXIT_STOPPED):  # the rank already printed its one line
            raise SystemExit(failure.exitcode) from None
        how = f"signal {failure.signal_name()}" if failure.exitcode < 0 else f"exit code {failure.exitcode}"
        print(f"error: rank {rank} failed ({how}); the job was stopped. See {run_dir}", file=sys.stderr)
        raise SystemExit(EXIT_RANK_FAILED) from None


class StopRequest:
    """SIGTERM (a SLURM preemption or time limit, or the launcher stopping the job) as a flag.

    The training loop asks ``requested()`` after each step; every rank then agrees
    (one all-reduce), saves a checkpoint and stops, so a requeued job resumes.
    """

    def __init__(self) -> None:
        self.flag = False
        signal.signal(signal.SIGTERM, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        self.flag = True

    def requested(self) -> bool:
        return all_reduce([float(self.flag)], op="max")[0] > 0
