"""Several tasks in one run (``multitask``): each task's config and teacher, and which task a step trains on.

Pure functions of the config and the step number, so a resumed run trains on the tasks it would have.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from opd_cli.config.schema import MultiTaskEntry, TaskConfig, TeacherConfig
from opd_cli.errors import UserError
from opd_cli.tasks.problems import TASK_DIR

TEACHER_DIR = Path(TASK_DIR).parent / "teacher"
MULTITASK_MODES = ("alternate", "mixed")


def _preset(directory: Path, schema, name: str, key: str):
    """A preset ``directory/<name>.yaml`` over its ``_base.yaml`` (its defaults list dropped)."""
    presets = sorted(
        str(p.relative_to(directory).with_suffix("")) for p in directory.rglob("*.yaml") if not p.name.startswith("_")
    )
    if name not in presets:
        raise UserError(f"{key}: unknown preset '{name}'; choose from: {', '.join(presets)}")
    own = OmegaConf.load(directory / f"{name}.yaml")
    own.pop("defaults", None)
    return OmegaConf.merge(OmegaConf.structured(schema), OmegaConf.load(directory / "_base.yaml"), own)


def entries(cfg) -> dict[str, Any]:
    """``multitask.tasks``, each entry typed as a ``MultiTaskEntry`` (a wrong key or type is one line)."""
    out = {}
    for name, raw in cfg.multitask.tasks.items():
        try:
            out[name] = OmegaConf.merge(OmegaConf.structured(MultiTaskEntry), raw)
        except OmegaConfBaseException as e:
            raise UserError(
                f"multitask.tasks.{name}: {str(e).splitlines()[0]} (keys: task, weight, overrides)"
            ) from None
    return out


def task_entries(cfg) -> list[tuple[str, Any]]:
    """Each ``multitask.tasks`` entry's name and task config: its preset with its ``overrides`` over it."""
    out = []
    for name, entry in entries(cfg).items():
        task = _preset(TASK_DIR, TaskConfig, entry.task, f"multitask.tasks.{name}.task")
        try:
            task = OmegaConf.merge(task, dict(entry.overrides))
        except OmegaConfBaseException as e:
            raise UserError(f"multitask.tasks.{name}.overrides: {str(e).splitlines()[0]}") from None
        out.append((name, task))
    return out


def task_teacher(cfg, name: str):
    """The teacher config of task ``name``: ``multitask.teachers.<name>`` (a teacher preset, or a model path over
    the run's ``teacher``), else the run's ``teacher``."""
    value = cfg.multitask.teachers.get(name)
    if value is None:
        return cfg.teacher
    if (TEACHER_DIR / f"{value}.yaml").exists():
        return _preset(TEACHER_DIR, TeacherConfig, value, f"multitask.teachers.{name}")
    teacher = OmegaConf.merge(OmegaConf.structured(TeacherConfig), OmegaConf.to_container(cfg.teacher))
    teacher.name_or_path = value
    return teacher


def teacher_key(tc) -> str:
    """What makes two teacher configs the same loaded teacher (each is loaded once)."""
    return OmegaConf.to_yaml(tc)


def check_multitask(cfg) -> None:
    """Weights at least 0 with a positive sum, a known mode, teachers only for tasks of the mixture."""
    mt = cfg.multitask
    if not mt.tasks:
        if mt.teachers:
            raise UserError("multitask.teachers: names teachers, but multitask.tasks is empty")
        return
    if mt.mode not in MULTITASK_MODES:
        raise UserError(f"multitask.mode: '{mt.mode}' is not one of: {', '.join(MULTITASK_MODES)}")
    typed = entries(cfg)
    for name, entry in typed.items():
        if not 0 <= entry.weight < float("inf"):
            raise UserError(f"multitask.tasks.{name}.weight: must be a finite number >= 0, got {entry.weight}")
    if sum(e.weight for e in typed.values()) <= 0:
        raise UserError("multitask.tasks: the weights must sum to a positive number")
    for name in mt.teachers:
        if name not in mt.tasks:
            raise UserError(
                f"multitask.teachers.{name}: no task '{name}' in multitask.tasks (tasks: {', '.join(mt.tasks)})"
            )


class Alternation:
    """``multitask.mode=alternate``: each step one task, in proportion to the weights, spread evenly (a smooth
    weighted round-robin: each step every task gains its weight, the one with the most is chosen and pays the
    sum of the weights). Weights 1 and 1 alternate; 2 and 1 give a, b, a, a, b, a, ...
    """

    def __init__(self, weights: list[float]) -> None:
        self.weights = weights
        self._credit = [0.0] * len(weights)
        self._counts = [0] * len(weights)
        self._step = 0  # the last step whose task was chosen

    def task(self, step: int) -> tuple[int, int]:
        """The task of step ``step`` (1-based) and how many of steps 1..step it trained on (its own step)."""
        if step < self._step:
            self.__init__(self.weights)
        while self._step < step:
            self._credit = [c + w for c, w in zip(self._credit, self.weights, strict=True)]
            pick = max(range(len(self.weights)), key=lambda i: (self._credit[i], -i))
            self._credit[pick] -= sum(self.weights)
            self._counts[pick] += 1
            self._step += 1
            self._last = pick
        return self._last, self._counts[self._last]


def task_weights(cfg) -> list[float]:
    """``multitask.tasks``' weights, in order."""
    return [float(e.weight) for e in entries(cfg).values()]
