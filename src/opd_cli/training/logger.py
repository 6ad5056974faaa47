"""Metrics: one JSON object per step in ``metrics.jsonl``, rollout samples in ``samples.jsonl``, and
Weights & Biases.

W&B runs offline by default (no network needed; ``wandb sync`` uploads later);
``logger.mode=online`` streams, ``logger.backend=none`` turns it off. Each of ``logger.mode``,
``project``, ``entity``, ``name``, ``group`` and ``tags`` left null takes its ``WANDB_*``
environment variable (``wandb_settings``): a value set in the config wins.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

# logger.<key> -> the environment variable that gives its value when the config leaves it null
WANDB_ENV = {
    "mode": "WANDB_MODE",
    "project": "WANDB_PROJECT",
    "entity": "WANDB_ENTITY",
    "name": "WANDB_NAME",
    "group": "WANDB_RUN_GROUP",
    "tags": "WANDB_TAGS",
}
# what a key is when neither the config nor the environment sets it (name: the run directory's name)
WANDB_DEFAULTS: dict[str, Any] = {"mode": "offline", "project": "opd-cli", "entity": None, "group": None, "tags": []}


def env_value(key: str, env: Mapping[str, str]) -> Any:
    """The value of ``logger.<key>`` its ``WANDB_*`` variable gives (tags: comma-separated), or None if unset or empty."""
    raw = env.get(WANDB_ENV[key], "").strip()
    if not raw:
        return None
    return [t.strip() for t in raw.split(",") if t.strip()] if key == "tags" else raw


def wandb_settings(cfg: Any, env: Mapping[str, str], run_name: str) -> dict[str, Any]:
    """The W&B run's mode, project, entity, name, group and tags: for each, the config's value when it is
    not null, else its ``WANDB_*`` variable when set and not empty, else the default (``run_name`` for the name)."""
    out: dict[str, Any] = {}
    for key in WANDB_ENV:
        value = getattr(cfg, key)
        if value is None:
            value = env_value(key, env)
        if value is None:
            value = run_name if key == "name" else WANDB_DEFAULTS[key]
        out[key] = list(value) if key == "tags" else value
    return out


def keep_steps_up_to(path: Path, step: int) -> None:
    """Drop the lines of a JSON-lines log after ``step`` (they are redone on resume), and a line a killed
    run left half-written."""
    if not path.exists():
        return
    kept = [ln for ln in path.read_text().splitlines() if _step(ln, step + 1) <= step]
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(ln + "\n" for ln in kept))
    os.replace(tmp, path)


class MetricsLogger:
    def __init__(
        self,
        run_dir: Path,
        cfg,
        config_dict: dict[str, Any],
        resume_step: int | None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.path = run_dir / "metrics.jsonl"
        self.samples_path = run_dir / "samples.jsonl"
        if resume_step is not None:
            # Steps after the checkpoint we resume from are redone: drop their old lines
            keep_steps_up_to(self.path, resume_step)
            keep_steps_up_to(self.samples_path, resume_step)
        # a fresh run in a reused directory (e.g. a sweep run again) starts its logs anew
        mode = "a" if resume_step is not None else "w"
        self.file = self.path.open(mode)
        self.samples_file = self.samples_path.open(mode) if cfg.samples_every else None
        self.wandb = self.table = None
        settings = wandb_settings(cfg, os.environ if env is None else env, run_dir.name)
        if cfg.backend == "wandb" and settings["mode"] != "disabled":
            import wandb

            self.wandb = wandb.init(
                **settings,
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

    def samples(self, step: int, rows: list[dict[str, Any]]) -> None:
        """Rollout samples (``training/samples.py``): appended to ``samples.jsonl``, and to the W&B table
        ``samples`` (logged incrementally: each call uploads its new rows)."""
        if self.samples_file is None or not rows:
            return
        self.samples_file.write("".join(json.dumps(r) + "\n" for r in rows))
        self.samples_file.flush()
        if self.wandb is not None:
            import wandb

            if self.table is None:  # the columns of the first rows (fixed for a run)
                self.table = wandb.Table(columns=list(rows[0]), log_mode="INCREMENTAL")
            for r in rows:
                self.table.add_data(*(r.get(c) for c in self.table.columns))
            self.wandb.log({"samples": self.table}, step=step)

    def summary(self, values: dict[str, Any]) -> None:
        if self.wandb is not None:
            self.wandb.summary.update(values)

    def close(self) -> None:
        self.file.close()
        if self.samples_file is not None:
            self.samples_file.close()
        if self.wandb is not None:
            self.wandb.finish()


class NullLogger:
    """What ranks other than 0 log to: nothing."""

    def log(self, step: int, metrics: dict[str, float]) -> None:
        pass

    def samples(self, step: int, rows: list[dict[str, Any]]) -> None:
        pass

    def summary(self, values: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


def _step(line: str, otherwise: int) -> int:
    """The step of a JSON-lines row; ``otherwise`` for a line that is not a whole row."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError:
        return otherwise
    return row["step"] if isinstance(row, dict) and isinstance(row.get("step"), int) else otherwise


def _wandb_id(run_dir: Path) -> str:
    """A stable W&B run id per run directory, so a resumed run continues the same W&B run.

    Offline, W&B writes each process's part of the run to its own ``wandb/offline-run-<time>-<id>``
    folder (it always makes a new one); the folders share this id, and ``wandb sync
    <run dir>/wandb/offline-run-*`` uploads them into one run, in order of start time.
    """
    id_file = run_dir / "wandb_run_id"
    if not id_file.exists():
        id_file.write_text(uuid.uuid4().hex[:12])
    return id_file.read_text().strip()
