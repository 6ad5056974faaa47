"""``opd-train``: compose the config with Hydra and run ``train``.

Bad input (an unknown preset or key, a value out of range, a missing file or
model) ends with one line ``error: ...`` on stderr and exit code 2, no traceback.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException, MissingConfigException, OverrideParseException
from hydra.types import RunMode
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from opd_cli.config import register_configs
from opd_cli.errors import EXIT_STOPPED, Stopped, UserError

CONF_DIR = str(Path(__file__).resolve().parents[2] / "conf")
EXIT_BAD_INPUT = 2


def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(EXIT_BAD_INPUT)


def describe_config_error(err: Exception) -> str:
    """One line from Hydra's and OmegaConf's (multi-line) composition errors."""
    if isinstance(err, MissingConfigException) and err.options is not None and err.missing_cfg_file:
        group, _, name = err.missing_cfg_file.rpartition("/")
        options = [o for o in err.options if not o.startswith("_")]  # _base files are not presets
        return f"{group}: unknown preset '{name}'; choose one of: {', '.join(options)}"
    if isinstance(err, OverrideParseException):
        return (
            f"cannot parse the override '{err.override}': quote values with special characters, e.g. key='<|im_end|>'"
        )
    cause = err.__cause__ if isinstance(err.__cause__, OmegaConfBaseException) else err
    lines = [ln.strip() for ln in str(cause).splitlines() if ln.strip()]
    key = getattr(cause, "full_key", None)
    head = lines[0] if lines else type(cause).__name__
    return f"{key}: {head}" if key and key not in head else head


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
    try:
        if cfg.trainer.nproc_per_node * cfg.trainer.nnodes > 1:
            from opd_cli.distributed import launch

            launch(cfg, run_dir)  # the ranks run opd_cli.worker on the saved, resolved config
        else:
            from opd_cli.train import train

            train(cfg, run_dir)
    except UserError as e:
        fail(str(e))
    except Stopped as e:
        print(e.message(), file=sys.stderr)
        sys.exit(EXIT_STOPPED)


def run_app(hydra_main) -> None:
    """Run a ``@hydra.main`` function with bad input (ours, Hydra's, OmegaConf's) as one line, exit 2."""
    # Let exceptions reach us instead of Hydra's multi-line report, so that bad
    # input becomes one line; real crashes still print their full traceback.
    os.environ["HYDRA_FULL_ERROR"] = "1"
    register_configs()
    try:
        hydra_main()
    except UserError as e:
        fail(str(e))
    except (HydraException, OmegaConfBaseException) as e:
        fail(describe_config_error(e))


def main() -> None:
    # a launcher (hydra/launcher=slurm) only acts in multirun mode: a single run becomes a 1-job multirun
    modes = {"-m", "--multirun", "-c", "--cfg", "-i", "--info", "--shell-completion", "-sc"}
    if any(a.startswith("hydra/launcher=") for a in sys.argv[1:]) and not modes & set(sys.argv):
        sys.argv.insert(1, "--multirun")
    run_app(_hydra_main)


if __name__ == "__main__":
    main()
