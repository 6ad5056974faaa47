"""``opd-study <name> [overrides]``: the papers' analyses as commands: ``variance`` (paper A), ``auroc`` and
``reward-depth`` (paper B's reward analyses)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from opd_cli.analysis.reward_checks import validate_study
from opd_cli.analysis.reward_studies import run_auroc, run_reward_depth
from opd_cli.analysis.variance_study import run_study
from opd_cli.commands.app import CONF_DIR, run_app
from opd_cli.errors import UserError, fail, one_line_errors


@hydra.main(config_path=CONF_DIR, config_name="study_variance", version_base="1.3")
def _variance(cfg: DictConfig) -> None:
    if cfg.batch % cfg.micro_batches or min(cfg.batch, cfg.micro_batches, cfg.horizon, cfg.iterations) < 1:
        raise UserError("micro_batches: must divide batch (and batch, horizon, iterations must be >= 1)")
    if not cfg.gammas or any(not 0 <= g <= 1 for g in cfg.gammas):
        raise UserError(f"gammas: each must be in [0, 1], got {list(cfg.gammas)}")
    out = Path(HydraConfig.get().runtime.output_dir)
    result = run_study(cfg, out)
    print(json.dumps({k: v for k, v in result.items() if k != "summary"}), f"report: {out / 'report.md'}")


def _checked(cfg: DictConfig, study: str) -> Path:
    """The study's directory, once its config passed the study's checks (as the Hydra callback ran them)."""
    validate_study(cfg, study, list(HydraConfig.get().overrides.task))
    return Path(HydraConfig.get().runtime.output_dir)


@hydra.main(config_path=CONF_DIR, config_name="study_auroc", version_base="1.3")
def _auroc(cfg: DictConfig) -> None:
    with one_line_errors():
        out = _checked(cfg, "auroc")
        data = run_auroc(cfg, out)
    print(
        json.dumps({name: round(r["auroc"], 4) for name, r in data["teachers"].items()}), f"report: {out / 'auroc.md'}"
    )


@hydra.main(config_path=CONF_DIR, config_name="study_reward_depth", version_base="1.3")
def _reward_depth(cfg: DictConfig) -> None:
    with one_line_errors():
        out = _checked(cfg, "reward_depth")
        data = run_reward_depth(cfg, out)
    advantage = {r["depth"]: r["advantage"] for r in data["depths"]}
    print(json.dumps(advantage), f"report: {out / 'reward_depth.md'}")


# study name -> its Hydra entry point
STUDIES = {"variance": _variance, "auroc": _auroc, "reward-depth": _reward_depth}


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in STUDIES:
        fail(f"usage: opd-study {{{','.join(STUDIES)}}} [overrides]")
    run_app(STUDIES[sys.argv.pop(1)])


if __name__ == "__main__":
    main()
