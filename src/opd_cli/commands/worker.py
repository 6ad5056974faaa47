"""One rank of a multi-process job: ``python -m opd_cli.commands.worker <resolved config> <run dir>``.

``opd-train`` composes the config with Hydra, saves it resolved in the run directory
and starts the ranks (distributed.launch); each rank reads that file, so every rank
runs exactly the composed config, sweeps included.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
import warnings
from pathlib import Path

from omegaconf import OmegaConf

from opd_cli.config.schema import TrainConfig
from opd_cli.dist import leave_process_group, this_rank
from opd_cli.errors import EXIT_STOPPED, one_line_errors
from opd_cli.training.launch import LAUNCHER_PID
from opd_cli.training.loop import train

PR_SET_PDEATHSIG = 1  # prctl(2)


def die_with_launcher() -> None:
    """Ask Linux to SIGKILL this rank when opd-train, which started it, dies (``kill -9`` leaves no
    signal handler to stop the ranks): an orphaned rank would go on writing into the run directory.
    A launcher that died before this call already made us an orphan: end now."""
    if sys.platform != "linux":
        return
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if str(os.getppid()) != os.environ.get(LAUNCHER_PID, str(os.getppid())):
        os._exit(EXIT_STOPPED)


def main() -> None:
    die_with_launcher()
    config_path, run_dir = Path(sys.argv[1]), Path(sys.argv[2])
    rank = this_rank()
    logging.basicConfig(
        level=logging.INFO if rank.main else logging.WARNING,
        format=f"[%(asctime)s][rank {rank.rank}][%(name)s][%(levelname)s] - %(message)s",
    )
    warnings.filterwarnings("ignore", category=FutureWarning)  # torch.distributed deprecations inside DeepSpeed
    cfg = OmegaConf.merge(OmegaConf.structured(TrainConfig), OmegaConf.load(config_path))

    code = 0
    try:
        with one_line_errors(show=rank.main):  # every rank raises it; one prints
            train(cfg, run_dir)
    except SystemExit as e:
        code = e.code
    leave_process_group()  # after a run or an error every rank raised, not after a crash
    sys.exit(code)


if __name__ == "__main__":
    main()
