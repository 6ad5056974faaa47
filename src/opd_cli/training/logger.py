"""Metrics: one JSON object per step in ``metrics.jsonl``, and Weights & Biases.

W&B runs offline by default (no network needed; ``wandb sync`` uploads later);
``logger.mode=online`` streams, ``logger.backend=none`` turns it off.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any


class MetricsLogger:
    def __init__(self, run_dir: Path, cfg, config_dict: dict[str, Any], resume_step: int | None) -> None:
        self.path = run_dir / "metrics.jsonl"
        if resume_step is not None and self.path.exists():
            # Steps after the checkpoint we resume from are redone: drop their old lines, and a line a
            # killed run left half-written
            kept = [ln for ln in self.path.read_text().splitlines() if _step(ln, resume_step + 1) <= resume_step]
            tmp = self.path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(ln + "\n" for ln in kept))
            os.replace(tmp, self.path)
        # a fresh run in a reused directory (e.g. a sweep run again) starts its metrics anew
        self.file = self.path.open("a" if resume_step is not None else "w")
        self.wandb = None
        if cfg.backend == "wandb" and cfg.mode != "disabled":
            import wandb

            self.wandb = wandb.init(
                project=cfg.project,
                entity=cfg.entity,
                name=cfg.name or run_dir.name,
                group=cfg.group,
                tags=list(cfg.tags),
                mode=cfg.mode,
                dir=str(run_dir),
                config=config_dict,
                resume="allow",
                id=_wandb_id(run_dir),
            )

    def log(self, step: int, metrics: dict[str, float]) -> None:
        row = {"step": step, **metrics}
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)

    def summary(self, values: dict[str, Any]) -> None:
        if self.wandb is not None:
            self.wandb.summary.update(values)

    def close(self) -> None:
        self.file.close()
        if self.wandb is not None:
            self.wandb.finish()


class NullLogger:
    """What ranks other than 0 log to: nothing."""

    def log(self, step: int, metrics: dict[str, float]) -> None:
        pass

    def summary(self, values: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


def _step(line: str, otherwise: int) -> int:
    """The step of a ``metrics.jsonl`` line; ``otherwise`` for a line that is not a whole row."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError:
        return otherwise
    return row["step"] if isinstance(row, dict) and isinstance(row.get("step"), int) else otherwise


def _wandb_id(run_dir: Path) -> str:
    """A stable W&B run id per run directory, so a resumed run continues the same W&B run."""
    id_file = run_dir / "wandb_run_id"
    if not id_file.exists():
        id_file.write_text(uuid.uuid4().hex[:12])
    return id_file.read_text().strip()
