"""A run directory has one identity: the config its steps were trained with.

``opd-train`` writes that config to ``<run dir>/run_config.yaml`` when a run starts. A second
run into a directory that already holds one is refused unless ``trainer.resume=true``; a
resume continues with the saved config, to which the resume command's overrides may change
only the keys in ``RESUMABLE`` (how long to train, how often to save or evaluate, where to log,
batching and memory knobs that do not change what is computed). Anything else is refused,
naming the key: a run that trained ``loss=sampled_token`` cannot silently continue as
``topk_lsm``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf

from opd_cli.config.schema import TrainConfig
from opd_cli.errors import UserError

RUN_CONFIG = "run_config.yaml"

# the keys (and the groups of keys, by prefix) a resume may change: none of them changes what a step computes
RESUMABLE = (
    "trainer.resume",
    "trainer.max_steps",
    "trainer.save_every",
    "trainer.stop_timeout_s",
    "trainer.rdzv_timeout",
    "trainer.master_addr",
    "trainer.master_port",
    "trainer.node_rank",
    "trainer.micro_batch_size",
    "trainer.device",
    "trainer.cpu_linear",
    "trainer.gradient_checkpointing",
    "teacher.micro_batch_size",
    "teacher.url",
    "teacher.gpu_memory_utilization",
    "teacher.sleep",
    "rollout.gpu_memory_utilization",
    "rollout.sleep",
    "eval.every",
    "eval.batch_size",
    "eval.benchmark_paths",
    "logger",
    "paths",
)


def resumable(key: str) -> bool:
    return any(key == k or key.startswith(k + ".") for k in RESUMABLE)


def checkpoint_steps(run_dir: Path) -> list[int]:
    """The steps of the committed checkpoints in ``run_dir`` (by name; not checked for damage)."""
    root = Path(run_dir) / "checkpoints"
    names = (p.name for p in root.glob("step_*")) if root.is_dir() else ()
    return sorted(int(m.group(1)) for n in names if (m := re.fullmatch(r"step_(\d+)", n)))


def held_run(run_dir: Path) -> str | None:
    """What of a run ``run_dir`` holds (a checkpoint's step, a metrics log, a summary), or None."""
    run_dir = Path(run_dir)
    if steps := checkpoint_steps(run_dir):
        return f"a run with checkpoints up to step {steps[-1]}"
    for name in (RUN_CONFIG, "metrics.jsonl", "summary.json"):
        if (run_dir / name).is_file():
            return f"a run ({name})"
    return None


def check_fresh(run_dir: Path, key: str) -> None:
    """Refuse to start a new run where one already is: its logs and checkpoints would be mixed with the new ones."""
    if what := held_run(run_dir):
        raise UserError(
            f"{key}: {run_dir} already holds {what}; continue it with trainer.resume=true, or give a new {key}"
        )


def check_empty(out_dir: Path, key: str) -> None:
    """Refuse an output directory that holds anything but Hydra's own records (``.hydra``, the job's
    ``.log``, which a run refused after Hydra made the directory leaves): a command that writes a fresh
    output (``opd-data``) would mix it with what is there."""
    out_dir = Path(out_dir)
    held = (
        sorted(p.name for p in out_dir.iterdir() if p.name != ".hydra" and p.suffix != ".log")
        if out_dir.is_dir()
        else []
    )
    if held:
        more = ", ..." if len(held) > 3 else ""
        raise UserError(f"{key}: {out_dir} is not empty (it holds {', '.join(held[:3])}{more}); give a new {key}")


def check_writable(directory: Path, key: str) -> None:
    """The directory exists and is writable, or can be made: the nearest existing ancestor is a writable directory."""
    path = Path(directory).absolute()
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        raise UserError(f"{key}: cannot create {path}: {existing} is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{key}: cannot write to {existing} (read-only or no permission)")


def with_defaults(saved: DictConfig) -> DictConfig:
    """A saved config with the keys added to the schema since it was written, at their defaults (a key the
    run never had cannot have changed it); as saved where it does not fit the schema."""
    try:
        return OmegaConf.merge(OmegaConf.structured(TrainConfig), saved)
    except Exception:  # noqa: BLE001 - a config of another version: compared as it is
        return saved


def saved_config(run_dir: Path) -> DictConfig | None:
    """The config a run in ``run_dir`` trained with: ``run_config.yaml`` (or Hydra's record, for older runs)."""
    for path in (Path(run_dir) / RUN_CONFIG, Path(run_dir) / ".hydra" / "config.yaml"):
        if path.is_file():
            try:
                saved = OmegaConf.load(path)
            except Exception as e:  # noqa: BLE001 - any parse error of a damaged file
                raise UserError(f"{path}: cannot read the run's saved config ({type(e).__name__})") from None
            if not isinstance(saved, DictConfig) or "trainer" not in saved or "loss" not in saved:
                raise UserError(f"{path}: not a config opd-train wrote (no trainer or loss section)")
            return with_defaults(saved)
    return None


def leaves(cfg: Any, prefix: str = "") -> dict[str, Any]:
    """Every value of a nested config by its dotted key (lists are values)."""
    container = OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else cfg
    out: dict[str, Any] = {}
    for k, v in container.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(leaves(v, key + "."))
        else:
            out[key] = v
    return out


_MISSING = object()


def refuse_change(key: str, saved: Any, given: Any, run_dir: Path) -> UserError:
    was = "unset" if saved is _MISSING else repr(saved)
    now = "unset" if given is _MISSING else repr(given)
    return UserError(
        f"{key}: the run in {run_dir} trained with {was}; a resume cannot change it to {now} "
        f"(it may change trainer.max_steps, save and eval frequency, logging and batching: docs/design.md, "
        f"'Resuming'); start a new run in another directory instead"
    )


def touched_keys(overrides: list[str], groups: set[str], current: dict[str, Any]) -> set[str]:
    """The dotted keys a resume command's overrides set: a key override its key (and every key under it), a
    group override (``loss=topk_lsm``) every key under the group, an ``experiment`` override every key."""
    touched: set[str] = set()
    for o in OverridesParser.create().parse_overrides(overrides):
        key = o.key_or_group
        if key == "hydra" or key.startswith(("hydra.", "hydra/")):
            continue
        if key == "experiment":  # a paper's setting sets keys of every group
            return set(current)
        key = key.replace("/", ".") if key in groups else key
        touched.update(k for k in current if k == key or k.startswith(key + "."))
        touched.add(key)
    return touched


def restore(saved: DictConfig, current: DictConfig, overrides: list[str], groups: set[str], run_dir: Path) -> dict:
    """The config a resume runs: the saved one, with the values the resume command sets where ``RESUMABLE``.

    ``current`` is the config the resume command composed (defaults plus its overrides), without
    Hydra's own section. A value the command sets that differs from the saved one on a key a resume
    may not change is refused, naming the key.
    """
    was, now = leaves(saved), leaves(current)
    out = OmegaConf.create(OmegaConf.to_container(saved, resolve=True))
    for key in sorted(touched_keys(overrides, groups, now)):
        old, new = was.get(key, _MISSING), now.get(key, _MISSING)
        if old == new:
            continue
        if not resumable(key):
            raise refuse_change(key, old, new, run_dir)
        if new is not _MISSING:
            OmegaConf.update(out, key, new, force_add=True)
    return OmegaConf.to_container(out)


def check_same_run(saved: DictConfig, current: Any, run_dir: Path) -> None:
    """A resumed run's config equals the saved one except on ``RESUMABLE`` keys (a sweep's job, a rank)."""
    was, now = leaves(saved), leaves(current)
    for key in sorted(was.keys() | now.keys()):
        old, new = was.get(key, _MISSING), now.get(key, _MISSING)
        if old != new and not resumable(key):
            raise refuse_change(key, old, new, run_dir)


def check_steps_ahead(run_dir: Path, max_steps: int) -> None:
    """A resume must not end before the run's last checkpoint: its summary keeps the furthest step."""
    if (steps := checkpoint_steps(run_dir)) and steps[-1] > max_steps:
        raise UserError(
            f"trainer.max_steps: the run in {run_dir} is already at step {steps[-1]}; "
            f"give trainer.max_steps >= {steps[-1]} to continue it"
        )
