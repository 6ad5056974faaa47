"""Checkpoints: the student in HF format plus the trainer state, written atomically.

``<run_dir>/checkpoints/step_000100/`` holds ``model/`` (safetensors, config,
tokenizer) and ``trainer_state.pt`` (step, optimizer, scheduler, RNG states and
the evaluation results so far). A checkpoint is written under a temporary name
and renamed into place, so a process killed mid-save leaves the previous
checkpoint as the latest complete one.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path
from typing import Any

import torch

_PREFIX = "step_"


def save_checkpoint(run_dir: Path, step: int, model, tokenizer, state: dict[str, Any]) -> Path:
    root = run_dir / "checkpoints"
    final = root / f"{_PREFIX}{step:06d}"
    tmp = root / f".tmp-{_PREFIX}{step:06d}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp / "model", safe_serialization=True)
    tokenizer.save_pretrained(tmp / "model")
    rng = {"torch": torch.get_rng_state(), "python": random.getstate()}
    torch.save({**state, "step": step, "rng": rng}, tmp / "trainer_state.pt")
    if final.exists():  # re-saving the same step (e.g. a resumed run's final save)
        shutil.rmtree(final)
    tmp.rename(final)
    return final


def latest_checkpoint(run_dir: Path) -> Path | None:
    root = run_dir / "checkpoints"
    done = sorted(p for p in root.glob(f"{_PREFIX}*") if (p / "trainer_state.pt").exists())
    return done[-1] if done else None


def load_trainer_state(ckpt: Path) -> dict[str, Any]:
    state = torch.load(ckpt / "trainer_state.pt", weights_only=False)
    torch.set_rng_state(state["rng"]["torch"])
    random.setstate(state["rng"]["python"])
    return state
