"""Start-up checks of ``opd-study auroc`` and ``opd-study reward-depth``: one ``UserError`` naming the first bad
key, raised from a Hydra callback (``StudyCallback``) before the study's directory is made."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import torch
from hydra import compose
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, read_write

from opd_cli.config.rundir import check_writable
from opd_cli.config.validate import (
    DEVICES,
    _get,
    check_added_keys,
    check_models,
    check_question_regex,
    check_task_source,
    checks_end_the_process,
    sweep_points,
)
from opd_cli.errors import UserError
from opd_cli.models.loading import DTYPES
from opd_cli.rollout.registry import SAMPLING_ENGINES
from opd_cli.tasks.checking import check_task_checker
from opd_cli.tasks.problems import check_task_data
from opd_cli.tasks.prompts import check_template

STUDIES = ("auroc", "reward_depth")
SPLITS = ("train", "held_out")
# the rollout keys the studies use: which engine samples, and its GPU memory; the sampling settings are top-level
STUDY_ROLLOUT_KEYS = ("engine", "gpu_memory_utilization", "sleep")
# the teacher keys the studies do not use, at the only value they are right at
UNUSED_TEACHER_KEYS = {"backend": "hf", "url": None, "shard": False, "temperature": 1.0}


def teacher_names(cfg: Any) -> list[str]:
    """The teachers a study compares: ``teachers``, or the one ``teacher.name_or_path`` names."""
    return list(cfg.teachers) if cfg.get("teachers") is not None else [cfg.teacher.name_or_path]


def check_rollout_overrides(overrides: list[str]) -> None:
    """A rollout sampling key on the command line would be ignored: the studies sample with their own keys."""
    for item in overrides:
        key = item.split("=", 1)[0].lstrip("+~")
        group, _, name = key.partition(".")
        if group == "rollout" and name and name not in STUDY_ROLLOUT_KEYS:
            instead = f"set {name} (top level)" if name in ("n", "temperature", "top_p", "max_new_tokens") else ""
            raise UserError(f"{key}: opd-study samples with its own keys; {instead or 'it has no effect here'}")


def unused_teacher_key(name: str, study: str) -> str:
    """Why the teacher key ``teacher.<name>`` has no effect on the study."""
    if name == "temperature":
        return (
            "the rewards are raw temperature-1 log-probs"
            if study == "auroc"
            else "the teacher samples at `temperature`"
        )
    return "the teacher scores as a transformers model" if study == "auroc" else "the teacher samples in rollout.engine"


def check_teacher_keys(cfg: Any, study: str) -> None:
    """The teacher is a transformers model in this process (auroc scores with it, reward-depth samples it with
    ``rollout.engine``); keys for other ways of running it would be ignored."""
    for name, value in UNUSED_TEACHER_KEYS.items():
        if _get(cfg, f"teacher.{name}") != value:
            shown = json.dumps(value).strip('"')  # as YAML writes it: hf, null, false, 1.0
            raise UserError(
                f"teacher.{name}: not used by opd-study {study.replace('_', '-')} ({unused_teacher_key(name, study)}); "
                f"leave it at {shown}"
            )


def check_numbers(cfg: Any, study: str) -> None:
    at_least_one = ["n_problems", "n", "max_new_tokens", "batch_size", "bootstrap", "teacher.micro_batch_size"]
    if study == "reward_depth":
        at_least_one.append("continuations")
    for key in at_least_one:
        if _get(cfg, key) < 1:
            raise UserError(f"{key}: must be an integer >= 1, got {_get(cfg, key)}")
    if not 0 < cfg.temperature < math.inf:
        raise UserError(f"temperature: must be a finite number > 0, got {cfg.temperature}")
    for key in ("top_p", "rollout.gpu_memory_utilization"):
        if not 0 < _get(cfg, key) <= 1:
            raise UserError(f"{key}: must be in (0, 1], got {_get(cfg, key)}")
    if study == "reward_depth":
        check_depths(list(cfg.depths), cfg.max_new_tokens)
        if cfg.min_response_tokens < 0:
            raise UserError(f"min_response_tokens: must be >= 0, got {cfg.min_response_tokens}")


def check_depths(depths: list[int], max_new_tokens: int) -> None:
    """Distinct prefix lengths, each at least one token and shorter than the longest response."""
    if not depths:
        raise UserError("depths: give at least one prefix length, e.g. depths=[8,16,32]")
    if len(set(depths)) != len(depths):
        raise UserError(f"depths: each prefix length once, got {depths}")
    if bad := [d for d in depths if not 1 <= d < max_new_tokens]:
        raise UserError(
            f"depths: {bad[0]} is not in [1, max_new_tokens={max_new_tokens}): a prefix must be shorter than the "
            "response it is cut from; raise max_new_tokens or lower the depth"
        )


def check_task(cfg: Any) -> None:
    task = cfg.task
    check_task_source(task)
    if task.eval_only and cfg.split == "train":
        raise UserError(
            f"split: '{task.path or task.dataset}' is an evaluation benchmark (every row held out); set split=held_out"
        )
    check_template(task.template)
    check_question_regex(task.question_regex)
    check_task_checker(task)
    check_task_data(task)


def check_study_models(cfg: Any) -> None:
    """The student and every teacher exist and share one vocabulary (``check_models`` on each pair)."""
    names = teacher_names(cfg)
    if cfg.get("teachers") is not None and (not names or len(set(names)) != len(names)):
        raise UserError(f"teachers: give each teacher once, at least one (or null: teacher.name_or_path), got {names}")
    for name in names:
        view = copy.deepcopy(cfg)
        with read_write(view):
            view.teacher.name_or_path = name
        try:
            check_models(view, ("model.name_or_path", "teacher.name_or_path"))
        except UserError as e:
            head, _, rest = str(e).partition(": ")
            if head == "teacher.name_or_path" and cfg.get("teachers"):
                raise UserError(f"teachers: '{name}': {rest}") from None
            raise


def validate_study(cfg: Any, study: str, overrides: list[str] = ()) -> None:
    """Raise ``UserError`` naming the first key of the study ``study`` (auroc, reward_depth) that is not allowed;
    ``overrides`` are the command line's, so that a rollout sampling key is refused instead of ignored."""
    check_rollout_overrides(list(overrides))
    allowed = {
        "split": SPLITS,
        "rollout.engine": SAMPLING_ENGINES,
        "model.dtype": tuple(DTYPES),
        "teacher.dtype": tuple(DTYPES),
        "device": DEVICES,
    }
    for key, values in allowed.items():
        if _get(cfg, key) not in values:
            raise UserError(f"{key}: '{_get(cfg, key)}' is not one of: {', '.join(values)}")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise UserError("device: cuda asked for, but torch sees no CUDA device; use device=auto or cpu")
    if cfg.model.lora.enabled:
        raise UserError("model.lora.enabled: opd-study reads a model as saved (a LoRA checkpoint's model/ loads as is)")
    check_teacher_keys(cfg, study)
    check_numbers(cfg, study)
    check_task(cfg)
    check_study_models(cfg)


class StudyCallback(Callback):
    """Hydra callback: check a study's config (``study``: auroc or reward_depth) before its directory is made;
    a sweep's every job before the first starts."""

    def __init__(self, study: str) -> None:
        if study not in STUDIES:
            raise ValueError(f"unknown study {study!r}")
        self.study = study

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        with checks_end_the_process():
            overrides = list(config.hydra.overrides.task)
            check_added_keys(config, overrides)
            validate_study(config, self.study, overrides)
            check_writable(Path(config.hydra.run.dir), "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        with checks_end_the_process():
            check_writable(Path(config.hydra.sweep.dir), "hydra.sweep.dir")
            points, swept = sweep_points(config) if "BasicSweeper" in config.hydra.sweeper._target_ else ([[]], set())
            for point in points:
                job = compose(config_name=config.hydra.job.config_name, overrides=point)
                try:
                    check_added_keys(job, point)
                    validate_study(job, self.study, point)
                except UserError as e:
                    which = " ".join(o for o in point if o.split("=", 1)[0].lstrip("+~") in swept)
                    raise UserError(f"{e} (in the sweep's job {which})" if which else str(e)) from None
