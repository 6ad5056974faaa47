"""``opd-train``: compose the config with Hydra and run ``train``.

Bad input (an unknown preset or key, a value out of range, a missing file or
model) ends with one line ``error: ...`` on stderr and exit code 2, no traceback.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from opd_cli.commands.app import CONF_DIR, run_app
from opd_cli.errors import one_line_errors
from opd_cli.training.launch import launch
from opd_cli.training.logger import env_value, wandb_settings
from opd_cli.training.loop import train


def sweep_logging(logger, env: Mapping[str, str], multirun: bool, sweep_dir: str, job: str, overrides: list[str]):
    """W&B name, group and tags of a run: in a multirun the jobs of one sweep share a group (the sweep
    directory), each job is named ``<sweep dir name>/<job>`` (``job``: its values of the swept keys,
    ``loss.k=4,trainer.seed=1``), and each job's overrides join its tags (W&B caps a tag at 64
    characters). A value the config sets, or a ``WANDB_*`` variable sets (``training/logger.py``), is kept."""
    if not multirun:
        return logger.name, logger.group, logger.tags
    name, group = logger.name, logger.group
    if name is None and env_value("name", env) is None:
        name = f"{Path(sweep_dir).name}/{job}"
    if group is None and env_value("group", env) is None:
        group = sweep_dir
    tags = wandb_settings(logger, env, "")["tags"]
    extra = [o[:64] for o in overrides if not o.startswith(("hydra.", "hydra/"))]
    return name, group, tags + [t for t in extra if t not in tags]


def swept_overrides(sweep_dir: str, overrides: list[str]) -> str | None:
    """The job's overrides of the keys its sweep varies (``loss.k=4,trainer.seed=1``), from the sweep's
    ``multirun.yaml``; None where that record is missing."""
    record = Path(sweep_dir) / "multirun.yaml"
    if not record.is_file():
        return None
    parsed = OverridesParser.create().parse_overrides(list(OmegaConf.load(record).hydra.overrides.task))
    swept = {o.key_or_group for o in parsed if o.is_sweep_override()}
    return ",".join(o for o in overrides if o.split("=", 1)[0].lstrip("+~") in swept) or None


@hydra.main(config_path=CONF_DIR, config_name="train", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> None:
    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    multirun = hc.mode == RunMode.MULTIRUN
    job = multirun and swept_overrides(hc.sweep.dir, list(hc.overrides.task)) or hc.job.override_dirname
    job = job or str(hc.job.num)
    cfg.logger.name, cfg.logger.group, cfg.logger.tags = sweep_logging(
        cfg.logger, os.environ, multirun, hc.sweep.dir, job, list(hc.overrides.task)
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
    # `+experiment=...` (the habit of templates whose defaults list has no experiment slot) means experiment=...
    sys.argv[1:] = [a.removeprefix("+") if a.startswith("+experiment=") else a for a in sys.argv[1:]]
    run_app(_hydra_main)


if __name__ == "__main__":
    main()
