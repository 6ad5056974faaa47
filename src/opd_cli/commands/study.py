"""``opd-study <name> [overrides]``: the papers' analyses as commands. Now: ``variance`` (paper A)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from opd_cli.analysis.variance_study import run_study
from opd_cli.commands.app import CONF_DIR, run_app
from opd_cli.errors import UserError, fail

STUDIES = ("variance",)


@hydra.main(config_path=CONF_DIR, config_name="study_variance", version_base="1.3")
def _variance(cfg: DictConfig) -> None:
    if cfg.batch % cfg.micro_batches or min(cfg.batch, cfg.micro_batches, cfg.horizon, cfg.iterations) < 1:
        raise UserError("micro_batches: must divide batch (and batch, horizon, iterations must be >= 1)")
    if not cfg.gammas or any(not 0 <= g <= 1 for g in cfg.gammas):
        raise UserError(f"gammas: each must be in [0, 1], got {list(cfg.gammas)}")
    out = Path(HydraConfig.get().runtime.output_dir)
    result = run_study(cfg, out)
    print(json.dumps({k: v for k, v in result.items() if k != "summary"}), f"report: {out / 'report.md'}")


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in STUDIES:
        fail(f"usage: opd-study {{{','.join(STUDIES)}}} [overrides]")
    sys.argv.pop(1)
    run_app(_variance)


if __name__ == "__main__":
    main()
