"""What every console command shares: the conf/ directory, and bad input as one line and exit code 2."""

from __future__ import annotations

import os
from pathlib import Path

from hydra.errors import HydraException, MissingConfigException, OverrideParseException
from omegaconf.errors import OmegaConfBaseException

from opd_cli.config.schema import register_configs
from opd_cli.errors import fail, one_line_errors

CONF_DIR = str(Path(__file__).resolve().parents[3] / "conf")


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
