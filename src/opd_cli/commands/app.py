"""What every console command shares: the conf/ directory, and bad input as one line and exit code 2."""

from __future__ import annotations

import os
from pathlib import Path

from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException

from opd_cli.config.schema import register_configs
from opd_cli.config.validate import describe_config_error
from opd_cli.errors import fail, one_line_errors

CONF_DIR = str(Path(__file__).resolve().parents[3] / "conf")


def run_app(hydra_main) -> None:
    """Run a ``@hydra.main`` function with bad input (ours, Hydra's, OmegaConf's) as one line, exit 2."""
    # Let exceptions reach us instead of Hydra's multi-line report, so that bad
    # input becomes one line; real crashes still print their full traceback.
    os.environ["HYDRA_FULL_ERROR"] = "1"
    register_configs()
    with one_line_errors():
        try:
            hydra_main()
        except (HydraException, OmegaConfBaseException) as e:
            fail(describe_config_error(e))
