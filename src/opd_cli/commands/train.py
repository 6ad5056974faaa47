"""``opd-train``: compose the config with Hydra and run ``train``.

Bad input (an unknown preset or key, a value out of range, a missing file or
model) ends with one line ``error: ...`` on stderr and exit code 2, no traceback.
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from opd_cli.commands.app import CONF_DIR, run_app
from opd_cli.errors import one_line_errors
from opd_cli.training.launch import launch
from opd_cli.training.loop import train


def sweep_group_and_tags(group: str | None, tags: list[str], multirun: bool, sweep_dir: str, overrides: list[str]):
    """W&B grouping: the jobs of one sweep share a group (the sweep directory), and each job's
    overrides become its tags (W&B caps a tag at 64 characters). Set values are kept."""
    if not multirun:
        return group, tags
    extra = [o[:64] for o in overrides if not o.startswith(("hydra.", "hydra/"))]
    return group or sweep_dir, list(tags) + [t for t in extra if t not in tags]


@hydra.main(config_path=CONF_DIR, config_name="train", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> None:
    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    cfg.logger.group, cfg.logger.tags = sweep_group_and_tags(
        cfg.logger.group, list(cfg.logger.tags), hc.mode == RunMode.MULTIRUN, hc.sweep.dir, list(hc.overrides.task)
    )
    with one_line_errors():
        if cfg.trainer.nproc_per_node * cfg.trainer.nnodes > 1:
            launch(cfg, run_dir)  # the ranks run opd_cli.commands.worker on the saved, resolved config
        else:
            train(cfg, run_dir)


def main() -> None:
    # a launcher (hydra/launcher=slurm) only acts in multirun mode: a single run becomes a 1-job multirun
    modes = {"-m", "--multirun", "-c", "--cfg", "-i", "--info", "--shell-completion", "-sc"}
    if any(a.startswith("hydra/launcher=") for a in sys.argv[1:]) and not modes & set(sys.argv):
        sys.argv.insert(1, "--multirun")
    run_app(_hydra_main)


if __name__ == "__main__":
    main()
