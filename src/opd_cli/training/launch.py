"""Starting the ranks of a multi-process job, and stopping them on request.

``opd-train`` composes the config once (Hydra), saves it resolved in the run directory,
and, when ``trainer.nproc_per_node * trainer.nnodes > 1``, starts the ranks with
PyTorch's elastic launcher (what ``torchrun`` uses). Each rank runs
``python -m opd_cli.commands.worker <resolved config> <run dir>``. A rank that dies stops
the whole job: the launcher kills the others, and ``opd-train`` exits non-zero with a line
naming the rank.
"""

from __future__ import annotations

import os
import re
import signal
import sys
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from opd_cli.dist import all_reduce, free_port
from opd_cli.errors import EXIT_STOPPED

EXIT_RANK_FAILED = 1


RESOLVED_CONFIG = "resolved_config.yaml"
# the environment variable that tells each rank the pid of the opd-train that started it (commands.worker)
LAUNCHER_PID = "OPD_LAUNCHER_PID"


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
    os.environ[LAUNCHER_PID] = str(os.getpid())  # the ranks inherit it
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
        elastic_launch(config, entrypoint=sys.executable)("-m", "opd_cli.commands.worker", str(resolved), str(run_dir))
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
