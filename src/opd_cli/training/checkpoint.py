"""Checkpoint directories: written under a temporary name, then renamed into place.

``<run_dir>/checkpoints/step_000100/`` holds ``model/`` (the student in HF format:
safetensors, config, tokenizer), ``trainer_state.pt`` (step, scheduler, evaluation
results so far, and the plain-torch optimizer), ``rng_rank<r>.pt`` per rank, and for
the DeepSpeed engine ``deepspeed/`` (its own sharded module and optimizer state). A
process killed mid-save leaves only a ``.tmp-step_*`` directory, so the previous
checkpoint stays the latest complete one. The training engines (engines.py) fill
the directory; this module names, commits and finds them. The test suite kills a
save on purpose with ``OPD_TEST_KILL_BEFORE_COMMIT=step_<NNNNNN>``.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import random
import shutil
import signal
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

_PREFIX = "step_"


STATE_FILE = "trainer_state.pt"


def checkpoint_dirs(run_dir: Path, step: int) -> tuple[Path, Path]:
    """(temporary, final) directories of the checkpoint of ``step``."""
    root = run_dir / "checkpoints"
    return root / f".tmp-{_PREFIX}{step:06d}", root / f"{_PREFIX}{step:06d}"


def commit(tmp: Path, final: Path) -> Path:
    """Rename a fully written checkpoint into place (replacing one of the same step)."""
    if os.environ.get("OPD_TEST_KILL_BEFORE_COMMIT") == final.name:
        os.kill(os.getpid(), signal.SIGKILL)  # test hook: a process killed in the middle of a save
    if final.exists():  # re-saving the same step (e.g. a resumed run's final save)
        shutil.rmtree(final)
    tmp.rename(final)
    return final


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint that can be read; newer damaged ones are skipped with a warning."""
    root = run_dir / "checkpoints"
    done = sorted(p for p in root.glob(f"{_PREFIX}*") if (p / STATE_FILE).exists())
    for ckpt in reversed(done):
        if (problem := damage(ckpt)) is None:
            return ckpt
        log.warning("%s is damaged (%s): resuming from an earlier checkpoint", ckpt, problem)
    return None


def damage(ckpt: Path) -> str | None:
    """What makes a committed checkpoint unreadable (a truncated or corrupt file), or None.

    Reads the trainer state, the model's config and each safetensors file's header (not the
    tensors), so a damaged newest checkpoint is found before any weight is loaded.
    """
    from safetensors import safe_open

    try:
        torch.load(ckpt / STATE_FILE, weights_only=False, map_location="cpu")
        json.loads((ckpt / "model" / "config.json").read_text())
        weights = sorted((ckpt / "model").glob("*.safetensors"))
        if not weights:
            return "no model weights"
        for path in weights:
            with safe_open(str(path), framework="pt"):  # checks the header against the file's size
                pass
    except Exception as e:  # any unreadable file: the message says which
        return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:160]}"
    return None


def remove_stale_saves(run_dir: Path) -> None:
    """Delete the ``.tmp-step_*`` directories of saves a killed process never committed."""
    for tmp in (run_dir / "checkpoints").glob(f".tmp-{_PREFIX}*"):
        shutil.rmtree(tmp, ignore_errors=True)


def explain_failed_save(run_dir: Path, step: int, free_before: int, error: Exception) -> str | None:
    """After a save of ``step`` failed with ``error``: remove its temporary directory, and say so in one
    line if the disk is full. torch and safetensors report a full disk in their own words, so it counts
    as full when the error says so or the save wrote about as much as was free. None otherwise."""
    tmp, _ = checkpoint_dirs(run_dir, step)
    written = sum(f.stat().st_size for f in tmp.rglob("*") if f.is_file()) if tmp.exists() else 0
    shutil.rmtree(tmp, ignore_errors=True)
    says_full = getattr(error, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or "No space left" in str(error)
    if not says_full and written < 0.9 * free_before:
        return None
    return (
        f"{tmp.parent}: no space left on device saving step {step} ({written / 2**20:.1f} MiB written, "
        f"{free_before / 2**20:.1f} MiB were free); free space, then resume with trainer.resume=true "
        "(the last complete checkpoint is kept)"
    )


def save_rng(directory: Path, rank: int) -> None:
    torch.save({"torch": torch.get_rng_state(), "python": random.getstate()}, directory / f"rng_rank{rank}.pt")


def load_rng(directory: Path, rank: int) -> None:
    path = directory / f"rng_rank{rank}.pt"
    if path.exists():  # a checkpoint written by fewer ranks: the extra ranks keep their seeded state
        rng = torch.load(path, weights_only=False)
        torch.set_rng_state(rng["torch"])
        random.setstate(rng["python"])


def load_state(ckpt: Path) -> dict[str, Any]:
    return torch.load(ckpt / STATE_FILE, weights_only=False)
