"""Start-up checks of a composed config: one ``UserError`` naming the first bad key.

``validate`` runs from a Hydra callback before the run directory is created, so a bad
value never touches an existing run directory. The allowed values of the keys that pick a
part (objective, rollout engine, teacher backend, answer checker) come from those parts'
registries.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import traceback
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from hydra import compose
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException, MissingConfigException, OverrideParseException
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, open_dict, read_write
from omegaconf.errors import OmegaConfBaseException

from opd_cli.config.rundir import check_empty, check_fresh, check_steps_ahead, check_writable, restore, saved_config
from opd_cli.config.schema import LoraConfig, RolloutConfig, TrainConfig
from opd_cli.envs.registry import env_factory
from opd_cli.envs.runner import ENV_FORMATS, env_instances
from opd_cli.errors import UserError, fail, one_line_errors
from opd_cli.models.demo import DEMO_ROLES, TEACHER_STYLES
from opd_cli.models.footprint import GIB, device_memory, meta_model, parameter_count, training_footprint
from opd_cli.models.loading import DTYPES, check_same_vocabulary, looks_local
from opd_cli.models.preflight import check_hub_reachable, offline, preflight
from opd_cli.objectives.advantages import AGG_MODES
from opd_cli.objectives.divergence import KNOB_CHOICES
from opd_cli.objectives.masks import MASK_MODES
from opd_cli.objectives.registry import OBJECTIVES, make_objective, needs_teacher
from opd_cli.rollout.dataset import open_dataset
from opd_cli.rollout.registry import DATA_ENGINES, ROLLOUT_ENGINES, SAMPLING_ENGINES
from opd_cli.tasks.alignment import model_path, read_texts
from opd_cli.tasks.checking import check_task_checker
from opd_cli.tasks.multitask import check_multitask, task_entries, task_teacher, teacher_key
from opd_cli.tasks.problems import check_task_data, mix_problems, mix_weights, task_config
from opd_cli.tasks.prompts import CHAT_TEMPLATE_FROM, check_template
from opd_cli.teacher.context import (
    QUESTION_FIELDS,
    SELF,
    SELF_WEIGHTS,
    check_teacher_prompt,
    differs,
    is_live,
    is_self,
)
from opd_cli.teacher.registry import TEACHER_BACKENDS, backend_supplies, check_teacher_supplies

# the dtype the student's parameters are loaded in, and the dtype it computes (and samples) in
PARAM_DTYPE = {"fp32": "float32", "bf16-mixed": "float32", "bf16-pure": "bfloat16"}
COMPUTE_DTYPE = {"fp32": "float32", "bf16-mixed": "bfloat16", "bf16-pure": "bfloat16"}


def choices() -> dict[str, tuple[str, ...]]:
    """The allowed values of each key that is a choice. The keys that pick a part take the names
    in that part's registry (read at the call, so a family registered later counts); the
    divergence knobs take the values ``DivergenceSpec`` defines."""
    return {
        "loss.objective": tuple(OBJECTIVES),
        **{f"loss.{knob}": values for knob, values in KNOB_CHOICES.items()},
        "loss.mask_mode": MASK_MODES,
        "loss.agg": AGG_MODES,
        "model.dtype": tuple(DTYPES),
        "teacher.dtype": tuple(DTYPES),
        "teacher.backend": tuple(TEACHER_BACKENDS),
        "rollout.engine": tuple(ROLLOUT_ENGINES),
        "task.name": ("arith", "hub", "reasoning_gym", "env"),
        "task.chat_template_from": CHAT_TEMPLATE_FROM,
        "teacher.self_weights": SELF_WEIGHTS,
        "teacher.prompt.chat_template_from": CHAT_TEMPLATE_FROM,
        "trainer.engine": ("torch", "deepspeed"),
        "trainer.device": DEVICES,
        "trainer.lr_schedule": ("constant", "cosine"),
        "trainer.cpu_linear": ("auto", "onednn", "blas"),
        "trainer.precision": ("auto", *PARAM_DTYPE),
        "logger.backend": ("wandb", "none"),
    }


# where a command runs: auto (a GPU if visible, else the CPU), cpu or cuda
DEVICES = ("auto", "cpu", "cuda")
AT_LEAST_ONE = [
    "loss.k",
    "loss.chunk_tokens",
    "loss.gap_bucket_tokens",
    "rollout.n",
    "rollout.max_new_tokens",
    "rollout.max_prompt_tokens",
    "trainer.max_steps",
    "trainer.prompts_per_step",
    "trainer.mini_batches",
    "trainer.micro_batch_size",
    "trainer.nproc_per_node",
    "trainer.nnodes",
    "trainer.rdzv_timeout",
    "trainer.stop_timeout_s",
    "teacher.micro_batch_size",
    "eval.k",
    "eval.n_problems",
    "eval.max_new_tokens",
    "eval.batch_size",
    "task.answer_timeout_s",
    "demo.num_layers",
    "demo.teacher_steps",
    "demo.batch_size",
    "logger.samples_per_step",
]


AT_LEAST_ZERO = [
    "trainer.save_every",
    "trainer.warmup_steps",
    "eval.every",
    "demo.student_steps",
    "task.n_eval",
    "logger.samples_every",
    "logger.samples_tokens",
    "logger.diagnostics_every",
]


def _get(cfg: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = cfg[part] if isinstance(cfg, dict | DictConfig) else getattr(cfg, part)
    return cfg


def check_divergence(loss: Any) -> None:
    """Combinations of the divergence knobs that have no meaning."""
    if not 0 <= loss.beta <= 1:
        raise UserError(f"loss.beta: must be in [0, 1], got {loss.beta}")
    if loss.log_ratio_clip is not None and loss.log_ratio_clip <= 0:
        raise UserError(f"loss.log_ratio_clip: must be > 0 or null, got {loss.log_ratio_clip}")
    if loss.objective != "support_divergence":
        return
    if loss.tail and (loss.renormalize or loss.support not in ("teacher", "student")):
        raise UserError("loss.tail: a tail bucket needs loss.renormalize=false and loss.support teacher or student")
    if loss.tail and (loss.direction != "reverse" or loss.form != "direct"):
        raise UserError("loss.tail: a tail bucket needs loss.direction=reverse and loss.form=direct")
    if loss.stop_grad != "none" and (loss.direction != "reverse" or loss.form != "direct"):
        raise UserError("loss.stop_grad: stop-gradient variants need loss.direction=reverse and loss.form=direct")
    if loss.log_ratio_clip is not None and loss.direction != "reverse":
        raise UserError("loss.log_ratio_clip: clamps the reverse KL's log-ratio; set loss.direction=reverse")
    if loss.form == "pg" and loss.direction != "reverse":
        raise UserError("loss.form: the policy-gradient form is a reverse KL; set loss.direction=reverse")
    if loss.support == "full" and loss.teacher_values != "exact":
        raise UserError("loss.teacher_values: the full support needs the teacher's exact log-probs ('exact')")


def student_precision(cfg: Any) -> str:
    """``trainer.precision`` with ``auto`` resolved from ``model.dtype``: fp32, bf16-mixed or bf16-pure.

    ``auto`` never steps half-precision weights without a float32 master copy: a bfloat16
    student trains bf16-mixed. bf16-pure happens only when asked for by name.
    """
    precision = cfg.trainer.precision
    if precision != "auto":
        return precision
    if cfg.model.dtype == "float16":
        raise UserError(
            "model.dtype: float16 training needs loss scaling, which opd-train does not do; "
            "use bfloat16 (trainer.precision=bf16-mixed) or float32"
        )
    return "fp32" if cfg.model.dtype == "float32" else "bf16-mixed"


def check_precision(cfg: Any) -> None:
    """The student's precision and the engine's own mixed-precision keys must not disagree."""
    precision = student_precision(cfg)
    ds = cfg.trainer.deepspeed or {}
    for key in ("bf16", "fp16"):
        if key in ds:
            raise UserError(
                f"trainer.deepspeed.{key}: set trainer.precision instead (fp32, bf16-mixed or bf16-pure); "
                "opd-train writes DeepSpeed's mixed-precision keys from it"
            )
    if precision == "bf16-pure" and cfg.trainer.engine == "deepspeed":
        raise UserError(
            "trainer.precision: bf16-pure (no float32 master weights) is for trainer.engine=torch; "
            "DeepSpeed trains bf16 with float32 master weights: use bf16-mixed"
        )


def check_world(trainer: Any) -> None:
    """Values that depend on the number of processes."""
    world = trainer.nproc_per_node * trainer.nnodes
    if world > 1 and trainer.engine != "deepspeed":
        raise UserError(
            f"trainer.engine: {world} processes need the deepspeed engine (trainer=zero1|zero2|zero3), "
            f"not '{trainer.engine}'"
        )
    if trainer.prompts_per_step % world:
        raise UserError(
            f"trainer.prompts_per_step: {trainer.prompts_per_step} prompts cannot be split evenly over {world} processes"
        )
    if not 0 <= trainer.node_rank < trainer.nnodes:
        raise UserError(f"trainer.node_rank: must be in [0, {trainer.nnodes}), got {trainer.node_rank}")
    if not 0 <= trainer.master_port < 65536:
        raise UserError(f"trainer.master_port: must be a port number (0: pick a free one), got {trainer.master_port}")
    stage = zero_stage(trainer)
    if stage not in (0, 1, 2, 3):
        raise UserError(f"trainer.deepspeed.zero_optimization.stage: must be 0, 1, 2 or 3, got {stage}")


def check_devices(cfg: Any) -> None:
    """What needs a GPU is refused where torch sees none, before any rank or engine starts."""
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if cfg.trainer.device == "cuda" and not gpus:
        raise UserError("trainer.device: cuda asked for, but torch sees no CUDA device; use trainer.device=auto or cpu")
    if cfg.trainer.device != "cpu" and gpus and cfg.trainer.nproc_per_node > gpus:
        raise UserError(
            f"trainer.nproc_per_node: {cfg.trainer.nproc_per_node} ranks on a node where torch sees {gpus} GPU(s)"
        )
    engines = {"rollout.sleep": cfg.rollout.engine == "vllm", "teacher.sleep": cfg.teacher.backend == "vllm"}
    for key, vllm in engines.items():
        if _get(cfg, key) and vllm and not gpus:
            raise UserError(f"{key}=true: vLLM's sleep mode needs a GPU (CUDA, ROCm or XPU); this machine has none")


# logger.mode, and WANDB_MODE where logger.mode is null
WANDB_MODES = ("offline", "online", "disabled")


def check_logger(logger: Any, env: Mapping[str, str]) -> None:
    """``logger.mode``, or where it is null (the environment decides) the ``WANDB_MODE`` it takes."""
    if logger.mode is not None and logger.mode not in WANDB_MODES:
        raise UserError(f"logger.mode: '{logger.mode}' is not one of: {', '.join(WANDB_MODES)} (or null: WANDB_MODE)")
    wandb_mode = env.get("WANDB_MODE", "").strip()
    if logger.backend == "wandb" and logger.mode is None and wandb_mode and wandb_mode not in WANDB_MODES:
        raise UserError(
            f"logger.mode: null takes WANDB_MODE from the environment, which is '{wandb_mode}', not one of: "
            f"{', '.join(WANDB_MODES)}; set logger.mode or WANDB_MODE"
        )


def check_lora(cfg: Any) -> None:
    """``model.lora``: its values, and the engines a LoRA student trains and samples under."""
    lora = cfg.model.lora
    if not lora.enabled:
        defaults = dataclasses.asdict(LoraConfig())
        if changed := [k for k, v in defaults.items() if k != "enabled" and _get(lora, k) != v]:
            raise UserError(
                f"model.lora.enabled: model.lora.{changed[0]} is set but LoRA is off; add model.lora.enabled=true"
            )
        return
    if lora.r < 1:
        raise UserError(f"model.lora.r: must be an integer >= 1, got {lora.r}")
    if not 0 < lora.alpha < math.inf:
        raise UserError(f"model.lora.alpha: must be a finite number > 0, got {lora.alpha}")
    if not 0 <= lora.dropout < 1:
        raise UserError(f"model.lora.dropout: must be in [0, 1), got {lora.dropout}")
    if not lora.target_modules or not all(lora.target_modules):
        raise UserError(
            f"model.lora.target_modules: give the names of the linear layers that get adapters, e.g. [q_proj,v_proj]; "
            f"got {list(lora.target_modules)}"
        )
    if "lm_head" in lora.target_modules:
        raise UserError("model.lora.target_modules: lm_head cannot get an adapter (the objectives read its weight)")
    stage = zero_stage(cfg.trainer)
    if cfg.trainer.engine == "deepspeed" and stage == 3:
        raise UserError(
            "model.lora.enabled: LoRA does not train under DeepSpeed ZeRO stage 3; use trainer=zero1 or trainer=zero2"
        )


# the rollout keys only a data set engine reads (rollout=dataset)
DATA_KEYS = ("path", "question_key", "response_key")


def check_rollout_data(cfg: Any) -> None:
    """A data set's responses (``rollout=dataset``) train only an objective that needs nothing from the teacher
    (``sft``), and that objective trains only on a data set, which must be there with the columns it reads."""
    rc, loss = cfg.rollout, cfg.loss
    from_data, teacher = rc.engine in DATA_ENGINES, needs_teacher(loss)
    if from_data and teacher:
        raise UserError(
            f"loss: '{loss.name}' distills on the student's own samples, which rollout=dataset does not make "
            "(it trains on a data set's fixed responses); use loss=sft with rollout=dataset, or rollout=hf|vllm"
        )
    if not from_data and not teacher:
        raise UserError(
            f"rollout.engine: loss={loss.name} fine-tunes on a data set's responses, not on the student's samples; "
            "use rollout=dataset rollout.path=<dir>"
        )
    if not from_data:
        defaults = dataclasses.asdict(RolloutConfig())
        if changed := [k for k in DATA_KEYS if _get(rc, k) != defaults[k]]:
            raise UserError(
                f"rollout.{changed[0]}: only rollout=dataset reads a data set (rollout.engine is '{rc.engine}')"
            )
        return
    if loss.outcome_weight:
        raise UserError(f"loss.outcome_weight: loss={loss.name} has no outcome term; set loss.outcome_weight=0")
    open_dataset(rc)


def check_question_regex(pattern: str | None) -> None:
    """``task.question_regex`` must compile and name a group ``question``."""
    if pattern is None:
        return
    try:
        groups = re.compile(pattern).groupindex
    except re.error as e:
        raise UserError(f"task.question_regex: not a regular expression ({e})") from None
    if "question" not in groups:
        raise UserError("task.question_regex: needs a named group (?P<question>...)")


def check_task_source(task: Any) -> None:
    """Where the ``task``'s rows come from: a hub data set (reachable unless offline) or a local file."""
    if task.name == "hub" and not (task.dataset or task.path):
        raise UserError("task.dataset: a hub task needs task.dataset or task.path")
    if task.name == "hub" and not task.path and not offline():
        check_hub_reachable(task.dataset, "task.dataset")
    if task.name == "reasoning_gym" and (task.path or task.dataset):
        key = "task.path" if task.path else "task.dataset"
        raise UserError(f"{key}: a reasoning_gym task makes its problems (task.rg); set {key}=null")
    if task.path and not Path(task.path).exists():
        raise UserError(f"task.path: file not found: {task.path}")


def check_training_task(task: Any, episodes: bool = False) -> None:
    """The ``task`` whose training split a command reads: its data (a local file's every row, and
    ``task.n_eval`` against the row count), template, question regex and checker; an environment's
    (``check_env_task``) where the command plays episodes (``episodes``: opd-train), else one line."""
    if task.eval_only:
        where = task.path or task.dataset
        raise UserError(f"task.eval_only: '{where}' is an evaluation benchmark; train on another task")
    if task.name == "env" and not episodes:
        raise UserError("task.name: an environment task's episodes are played by opd-train only; use a data task")
    if task.name == "env":
        check_env_task(task)
        return
    check_task_source(task)
    check_template(task.template)
    check_question_regex(task.question_regex)
    check_task_checker(task)
    check_task_data(task)


def check_env_task(task: Any) -> None:
    """``task.env``: a known environment that its ``args`` build, budgets of at least one, a known format,
    stop strings that are not empty, and fewer held-out instances than the environment has."""
    ec = task.env
    for key in ("max_turns", "turn_tokens"):
        if ec[key] < 1:
            raise UserError(f"task.env.{key}: must be an integer >= 1, got {ec[key]}")
    if ec.format not in ENV_FORMATS:
        raise UserError(f"task.env.format: '{ec.format}' is not one of: {', '.join(ENV_FORMATS)}")
    if any(not s for s in ec.stop):
        raise UserError("task.env.stop: a stop string must not be empty")
    env_instances(task, env_factory(ec.name, dict(ec.args)))


def check_env_run(cfg: Any, task: Any = None) -> None:
    """What an environment task (``task``, default the run's) cannot combine with: a data set's fixed responses,
    other prompt sources, a ZeRO-3 student sampling with HF, a teacher prompt of its own (the teacher reads the
    student's transcript as it is)."""
    task = cfg.task if task is None else task
    if task.name != "env":
        return
    if cfg.rollout.engine in DATA_ENGINES:
        raise UserError(f"rollout.engine: an environment task samples its episodes; {cfg.rollout.engine} cannot")
    if task.mix:
        raise UserError("task.mix: an environment task's instances are its only prompts")
    if cfg.rollout.engine == "hf" and cfg.trainer.engine == "deepspeed" and zero_stage(cfg.trainer) == 3:
        # a sharded student samples in lockstep across ranks, but each rank's episodes take their own turns
        raise UserError(
            "trainer: an environment task cannot sample with a ZeRO-3 student; use zero1/zero2 or rollout=vllm"
        )
    if needs_teacher(cfg.loss) and differs(cfg.teacher):
        raise UserError("teacher.prompt: the teacher scores an episode's transcript as the student saw it; unset it")


def check_multitask_run(cfg: Any) -> None:
    """``multitask``: its weights, mode and teachers (``check_multitask``), each task's preset, overrides and data
    as a training task's, each named teacher's model, and what a multitask run does not combine with."""
    check_multitask(cfg)
    if not cfg.multitask.tasks:
        return
    entries = task_entries(cfg)
    for name, task in entries:
        try:
            check_training_task(task, episodes=True)
            check_env_run(cfg, task)
        except UserError as e:  # name the entry: its task keys are the preset's and the overrides'
            raise UserError(f"multitask.tasks.{name}: {e}") from None
    if cfg.task.mix or any(task.mix for _, task in entries):
        raise UserError("task.mix: a multitask run draws its prompts from multitask.tasks; use their weights")
    if needs_teacher(cfg.loss) and differs(cfg.teacher):
        raise UserError("teacher.prompt: a multitask run's teachers score the student's own prompts; unset it")
    teachers = {teacher_key(task_teacher(cfg, name)) for name, _ in entries}
    for name, value in cfg.multitask.teachers.items():
        tc = task_teacher(cfg, name)
        if is_self(tc):
            raise UserError(f"multitask.teachers.{name}: teacher=self is not a per-task teacher; name a model")
        role = tc.name_or_path.removeprefix("demo:")
        if tc.name_or_path.startswith("demo:") and role not in DEMO_ROLES:
            raise UserError(f"multitask.teachers.{name}: '{value}' is not a teacher preset, a model path or one of: "
                            + ", ".join(f"demo:{r}" for r in DEMO_ROLES))  # fmt: skip
        if looks_local(tc.name_or_path) and not Path(tc.name_or_path).expanduser().exists():
            raise UserError(f"multitask.teachers.{name}: '{value}' is not a teacher preset, and no such model path")
    if cfg.multitask.mode == "mixed" and (env := next((n for n, t in entries if t.name == "env"), None)):
        raise UserError(
            f"multitask.mode: mixed batches single-turn prompts; task '{env}' plays episodes (use alternate)"
        )
    if cfg.multitask.mode == "mixed" and any(task_teacher(cfg, name).shard for name, _ in entries):
        # each rank routes its own rows: a sharded teacher's ranks would not run the same forward passes
        raise UserError("teacher.shard: multitask.mode=mixed scores each rank's rows by task; use an unsharded teacher")
    if cfg.multitask.mode == "mixed" and cfg.loss.outcome_weight:
        raise UserError("loss.outcome_weight: multitask.mode=mixed has no per-task outcome check; use alternate")
    if len(teachers) > 1 and "full" in make_objective(cfg.loss).teacher_needs:
        raise UserError(f"loss: '{cfg.loss.name}' needs the teacher's head, which differs between the tasks' teachers")


def refuse_training_only_task_keys(task: Any, command: str) -> None:
    """``task.mix`` and ``task.chat_template_from`` shape opd-train's prompts; another command would ignore them."""
    if task.mix:
        raise UserError(f"task.mix: only opd-train mixes prompt sources; {command} reads the task's own problems")
    if task.chat_template_from != "student":
        raise UserError(f"task.chat_template_from: only opd-train switches the student's chat template ({command})")


def check_mix(cfg: Any) -> None:
    """``task.mix``: each source's weight in (0, 1) with the task's own share (1 minus their sum) above 0,
    names that differ, every row of each file readable with the task's keys, and a sampling engine."""
    if not cfg.task.mix:
        return
    if cfg.rollout.engine in DATA_ENGINES:
        raise UserError("task.mix: mixes the prompts the student samples; rollout=dataset trains on a data set's rows")
    for i, m in enumerate(cfg.task.mix):
        if not 0 < m.weight < 1:
            raise UserError(f"task.mix.{i}.weight: must be in (0, 1) (the step's share from {m.path}), got {m.weight}")
    names, weights = mix_weights(cfg.task)
    if weights[0] <= 0:
        raise UserError(
            f"task.mix: the weights add up to {sum(weights[1:]):g}; they must add up to less than 1 "
            "(the task's own prompts get the rest)"
        )
    for i, name in enumerate(names[1:]):
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", name) or name in names[: i + 1]:
            raise UserError(
                f"task.mix.{i}.name: '{name}' names the metric data/mix_<name>: letters, digits, _ . - only, "
                "and unlike the other sources' names (task is the task's own)"
            )
    mix_problems(cfg.task)


def check_patterns(patterns: Mapping[str, str]) -> None:
    """Each ``eval.patterns`` value must compile as a Python regular expression."""
    for name, pattern in patterns.items():
        try:
            re.compile(pattern)
        except re.error as e:
            raise UserError(
                f"eval.patterns.{name}: not a regular expression ({e}); give a Python re pattern, "
                "e.g. '^\\s*Tens first'"
            ) from None


def check_hint_question(template: str) -> None:
    """``demo.hint_question`` is a ``str.format`` template of {question}, {answer} and {solution}, with {question}."""
    check_template(template, "demo.hint_question", QUESTION_FIELDS, required="question")


def validate(cfg: Any) -> None:
    """Raise ``UserError`` naming the first key whose value is not allowed."""
    for key, allowed in choices().items():
        if _get(cfg, key) not in allowed:
            raise UserError(f"{key}: '{_get(cfg, key)}' is not one of: {', '.join(allowed)}")
    for key in AT_LEAST_ONE:
        if _get(cfg, key) < 1:
            raise UserError(f"{key}: must be an integer >= 1, got {_get(cfg, key)}")
    for key in AT_LEAST_ZERO:
        if _get(cfg, key) < 0:
            raise UserError(f"{key}: must be >= 0, got {_get(cfg, key)}")
    for key in ("rollout.top_p", "eval.top_p", "rollout.gpu_memory_utilization", "teacher.gpu_memory_utilization"):
        if not 0 < _get(cfg, key) <= 1:
            raise UserError(f"{key}: must be in (0, 1], got {_get(cfg, key)}")
    for key in (
        "rollout.temperature",
        "eval.temperature",
        "teacher.temperature",
        "trainer.lr",
        "trainer.max_grad_norm",
    ):
        if not 0 < _get(cfg, key) < math.inf:
            raise UserError(f"{key}: must be a finite number > 0, got {_get(cfg, key)}")
    if not 0 <= cfg.trainer.weight_decay < math.inf:
        raise UserError(f"trainer.weight_decay: must be a finite number >= 0, got {cfg.trainer.weight_decay}")
    betas = list(cfg.trainer.betas)
    if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
        raise UserError(f"trainer.betas: must be two numbers in [0, 1) (AdamW's beta1, beta2), got {betas}")
    if not 0 <= cfg.loss.gamma <= 1:
        raise UserError(f"loss.gamma: must be in [0, 1], got {cfg.loss.gamma}")
    for key in ("loss.clip_ratio_low", "loss.clip_ratio_high"):
        if not 0 <= _get(cfg, key) < 1:
            raise UserError(f"{key}: must be in [0, 1), got {_get(cfg, key)}")
    if cfg.loss.entropy_top_ratio is not None and not 0 < cfg.loss.entropy_top_ratio <= 1:
        raise UserError(f"loss.entropy_top_ratio: must be in (0, 1] or null, got {cfg.loss.entropy_top_ratio}")
    if cfg.loss.entropy_top_ratio is not None and cfg.rollout.engine != "hf":
        raise UserError("loss.entropy_top_ratio: needs the sampler's entropies, which rollout.engine=hf records")
    if cfg.loss.diag_k is not None and cfg.loss.diag_k < 1:
        raise UserError(f"loss.diag_k: must be an integer >= 1 or null, got {cfg.loss.diag_k}")
    if cfg.loss.outcome_weight < 0:
        raise UserError(f"loss.outcome_weight: must be >= 0, got {cfg.loss.outcome_weight}")
    if not 0 < cfg.loss.tail_floor < 1:
        raise UserError(f"loss.tail_floor: must be in (0, 1), got {cfg.loss.tail_floor}")
    if cfg.loss.max_response_tokens is not None and cfg.loss.max_response_tokens < 1:
        raise UserError(
            f"loss.max_response_tokens: must be an integer >= 1 or null, got {cfg.loss.max_response_tokens}"
        )
    if cfg.loss.dual_clip is not None and cfg.loss.dual_clip <= 1:
        raise UserError(f"loss.dual_clip: must be > 1 or null, got {cfg.loss.dual_clip}")
    check_divergence(cfg.loss)
    check_logger(cfg.logger, os.environ)
    check_world(cfg.trainer)
    check_devices(cfg)
    check_env_run(cfg)
    check_rollout_data(cfg)
    student_sharded = zero_stage(cfg.trainer) == 3 and cfg.trainer.engine == "deepspeed"
    check_teacher_supplies(
        make_objective(cfg.loss), backend_supplies(cfg.teacher, student_sharded), cfg.teacher.backend
    )
    check_precision(cfg)
    check_lora(cfg)
    if cfg.teacher.url is not None and cfg.teacher.backend != "vllm":
        raise UserError("teacher.url: a teacher server needs teacher.backend=vllm")
    if cfg.teacher.url is not None and not cfg.teacher.url.startswith(("http://", "https://")):
        raise UserError(f"teacher.url: must start with http:// or https://, got {cfg.teacher.url}")
    if cfg.teacher.temperature != 1 and cfg.teacher.backend != "hf":
        raise UserError("teacher.temperature: vLLM's prompt_logprobs are temperature-1 values; use teacher.backend=hf")
    if cfg.teacher.shard and cfg.teacher.backend != "hf":
        raise UserError("teacher.shard: only the hf teacher backend is sharded (vLLM keeps its own copy)")
    if cfg.teacher.shard and cfg.trainer.engine != "deepspeed":
        raise UserError("teacher.shard: sharding the teacher needs the deepspeed engine (trainer=zero1|zero2|zero3)")
    check_self_teacher(cfg)
    check_training_task(cfg.task, episodes=True)
    check_multitask_run(cfg)
    check_mix(cfg)
    if cfg.task.chat_template_from == "teacher" and not cfg.task.chat_template:
        raise UserError(
            "task.chat_template_from: the teacher's chat template is used only with task.chat_template=true"
        )
    if "patterns" in cfg.eval:  # opd-train's evaluation during training
        check_patterns(cfg.eval.patterns)
    if "benchmarks" in cfg.eval:  # opd-train's evaluation during training
        for name in cfg.eval.benchmarks:
            key = f"eval.benchmark_paths.{name}"
            check_task_data(task_config(name, cfg.eval.benchmark_paths.get(name), "eval.benchmarks", key), key, key)
    if needs_teacher(cfg.loss):
        check_teacher_prompt(
            cfg.teacher, cfg.task, has_solutions=cfg.task.name == "arith" or bool(cfg.task.solution_key)
        )
    # no teacher is loaded for an objective that needs nothing from it (sft)
    teacher = needs_teacher(cfg.loss) or "teacher" in (
        cfg.task.chat_template_from,
        cfg.teacher.prompt.chat_template_from,
    )
    check_models(cfg, ("model.name_or_path", "teacher.name_or_path") if teacher else ("model.name_or_path",))


def zero_stage(tcfg: Any) -> int:
    """The ZeRO stage of ``trainer.deepspeed`` (0: none)."""
    return tcfg.deepspeed.get("zero_optimization", {}).get("stage", 0) if tcfg.deepspeed else 0


def check_self_teacher(cfg: Any) -> None:
    """``teacher=self``: live weights are scored where they live (the trained model, or the rollout's vLLM
    engine), so nothing that would hold another copy of them goes with it."""
    tc = cfg.teacher
    if tc.self_weights == "live" and not is_self(tc):
        raise UserError(
            "teacher.self_weights: live weights are the student's own; set teacher.name_or_path=self (teacher=self) "
            "or teacher.self_weights=initial"
        )
    if not is_live(tc):
        return
    if tc.url is not None:
        raise UserError("teacher.url: a teacher server holds its own weights, not the live student's; "
                        "use teacher.self_weights=initial or drop teacher.url")  # fmt: skip
    if tc.shard:
        raise UserError(
            "teacher.shard: the live self-teacher is the student, sharded as the student is (trainer=zero3)"
        )
    if tc.backend == "vllm" and cfg.rollout.engine != "vllm":
        raise UserError(
            "teacher.backend: a live self-teacher on vllm scores with the rollout's vLLM engine; set rollout=vllm, "
            "or teacher.backend=hf (the trained model scores)"
        )


def resumes(cfg: Any) -> bool:
    """Whether opd-train resumes (as training/loop.py decides): its student then comes from the run's
    latest checkpoint, if any (training/build.py ``resolve_models``), which is found after this check."""
    return "trainer" in cfg and (cfg.trainer.resume or int(os.environ.get("SLURM_RESTART_COUNT") or 0) > 0)


def check_models(cfg: Any, keys: tuple[str, ...]) -> None:
    """The models named by ``keys`` exist (a demo role, a local directory, or a hub id), and the demo's recipe is valid.

    The files of a local directory or a cached hub id are checked without loading weights
    (``models.preflight``; a resumed student only for its directory's existence), then the student's
    vocabulary against the teacher's.
    """
    if cfg.demo.hidden_size < 64 or cfg.demo.hidden_size % 64:
        raise UserError(
            f"demo.hidden_size: must be a positive multiple of 64 (head size 64), got {cfg.demo.hidden_size}"
        )
    if cfg.demo.teacher_style not in TEACHER_STYLES:
        raise UserError(f"demo.teacher_style: '{cfg.demo.teacher_style}' is not one of: {', '.join(TEACHER_STYLES)}")
    found = {}
    for key in keys:
        value = _get(cfg, key)
        if key == "teacher.name_or_path" and value == SELF:  # the student's own model, checked as the student
            continue
        if value.startswith("demo:"):
            if value.removeprefix("demo:") not in DEMO_ROLES:
                raise UserError(f"{key}: '{value}' is not one of: {', '.join(f'demo:{r}' for r in DEMO_ROLES)}")
            if cfg.task.name not in ("arith", "env"):
                raise UserError(f"{key}: the demo models are built for task=arith and the environment tasks only")
            if value == "demo:hint":
                check_hint_question(cfg.demo.hint_question)
            continue
        if looks_local(value) and not Path(value).expanduser().exists():
            raise UserError(f"{key}: local model path not found: {value}")
        if not (key == "model.name_or_path" and resumes(cfg)):
            group = key.split(".")[0]
            server = group == "teacher" and cfg.teacher.url is not None  # the server holds the weights
            found[key] = preflight(value, key, _get(cfg, f"{group}.trust_remote_code"), weights=not server)
    student, teacher = found.get("model.name_or_path"), found.get("teacher.name_or_path")
    if "teacher.name_or_path" in keys and is_self(cfg.teacher) and not is_live(cfg.teacher):
        teacher = student  # a frozen copy of the student's starting model
    if (
        teacher
        and "trainer" in cfg
        and cfg.task.chat_template_from == "teacher"
        and not teacher.tokenizer.chat_template
    ):
        raise UserError(
            "task.chat_template_from: the teacher's tokenizer has no chat template; set task.chat_template_from=student"
        )
    if student and teacher:
        check_same_vocabulary(student.tokenizer, teacher.tokenizer, student.rows, teacher.rows)
    if student and "trainer" in cfg:
        model = meta_model(student.directory, cfg.model.trust_remote_code)
        if cfg.model.lora.enabled:
            check_lora_targets(model, cfg.model.lora.target_modules)
        check_memory(cfg, model, teacher.directory if teacher else None)


def check_lora_targets(model: torch.nn.Module, targets: list[str]) -> None:
    """Every ``model.lora.target_modules`` name ends the name of one of ``model``'s linear layers (peft's
    matching of a name: the whole name, or its end after a dot), so each target gets adapters."""
    from transformers.pytorch_utils import Conv1D

    names = [n for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, Conv1D))]
    if missing := [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]:
        last = sorted({n.rsplit(".", 1)[-1] for n in names})
        raise UserError(
            f"model.lora.target_modules: {', '.join(missing)} names no linear layer of the student; "
            f"its linear layers are: {', '.join(last)}"
        )


def check_memory(
    cfg: Any, student: torch.nn.Module, teacher: Path | None, capacity: tuple[int, str] | None = None
) -> None:
    """Refuse a run whose models' state alone (``models.footprint``) exceeds one process's memory.

    ``student``: the student on the meta device; ``teacher``: its model directory (None: no
    teacher in the process, or not a local one). ``capacity``: bytes and a description (default:
    the device the run trains on).
    """
    t = cfg.trainer
    world = t.nproc_per_node * t.nnodes
    stage = zero_stage(t)
    params = parameter_count(student)
    in_process = teacher is not None and cfg.teacher.backend == "hf" and cfg.teacher.url is None
    teacher_params = parameter_count(meta_model(teacher, cfg.teacher.trust_remote_code)) if in_process else 0
    precision = student_precision(cfg)
    need = training_footprint(
        params, precision, t.engine, stage, world, cfg.model.lora.enabled,
        teacher_params, cfg.teacher.dtype, bool(cfg.teacher.shard),
    )  # fmt: skip
    if capacity is None:
        cuda = t.device == "cuda" or (t.device == "auto" and torch.cuda.is_available())
        capacity = device_memory("cuda" if cuda else "cpu", t.nproc_per_node)
    if need.total > capacity[0]:
        setup = f"{precision}, " + (
            f"ZeRO stage {stage} over {world} processes" if t.engine == "deepspeed" else "one process"
        )
        teacher_part = f" and {need.teacher / GIB:.0f} GiB of teacher weights" if need.teacher else ""
        raise UserError(
            f"trainer.nproc_per_node: a {params / 1e9:.1f}B-parameter student ({setup}) needs at least "
            f"{(need.total - need.teacher) / GIB:.0f} GiB per process for its weights, gradients and optimizer "
            f"state{teacher_part}, more than the {capacity[0] / GIB:.0f} GiB of {capacity[1]}; shard it "
            "(trainer=zero3 trainer.nproc_per_node=<GPUs>) or train adapters (model.lora.enabled=true)"
        )


# opd-eval samples with eval.*: these opd-train sampling keys have an eval.* counterpart
EVAL_INSTEAD = {"n": "eval.k", "temperature": "eval.temperature", "top_p": "eval.top_p"}
EVAL_INSTEAD["max_new_tokens"] = "eval.max_new_tokens"
# the rollout keys opd-eval uses: which engine samples, and how much GPU memory vLLM may take
EVAL_ROLLOUT_KEYS = ("engine", "gpu_memory_utilization")


def refuse_unused_keys(
    overrides: list[str], command: str, used: Mapping[str, tuple[str, ...]], own: str, instead: Mapping[str, str]
) -> None:
    """A key of a group in ``used`` that ``command`` does not read (not in the group's tuple), set on the
    command line, is refused: it would be ignored. ``own`` is the group the command samples with
    (``eval``, ``data``); ``instead`` maps a key's name to the key to set in its place, where there is one."""
    for item in overrides:
        key = item.split("=", 1)[0].lstrip("+~")
        group, _, name = key.partition(".")
        if group in used and name and name not in used[group]:
            hint = f"set {instead[name]}" if name in instead else "it has no effect here"
            raise UserError(f"{key}: {command} samples with the {own}.* keys; {hint}")


def validate_evaluate(cfg: Any, overrides: list[str] = ()) -> None:
    """``opd-eval``'s checks; ``overrides`` are the command line's, so that a rollout sampling key
    opd-eval would not use is refused instead of ignored."""
    refuse_unused_keys(overrides, "opd-eval", {"rollout": EVAL_ROLLOUT_KEYS}, "eval", EVAL_INSTEAD)
    if not cfg.tasks:
        raise UserError("tasks: give at least one benchmark, e.g. tasks=[aime24,math500]")
    if cfg.model.lora.enabled:
        raise UserError(
            "model.lora.enabled: opd-eval evaluates a model as saved (a LoRA checkpoint's model/ directory loads as is)"
        )
    # opd-eval samples: an engine that reads a data set instead (rollout=dataset) has nothing to evaluate
    allowed = {**choices(), "device": DEVICES, "rollout.engine": SAMPLING_ENGINES}
    for key in ("rollout.engine", "model.dtype", "device"):
        if _get(cfg, key) not in allowed[key]:
            raise UserError(f"{key}: '{_get(cfg, key)}' is not one of: {', '.join(allowed[key])}")
    for key in ("eval.k", "eval.n_problems", "eval.max_new_tokens", "eval.batch_size"):
        if _get(cfg, key) < 1:
            raise UserError(f"{key}: must be an integer >= 1, got {_get(cfg, key)}")
    for key in ("eval.top_p", "rollout.gpu_memory_utilization"):
        if not 0 < _get(cfg, key) <= 1:
            raise UserError(f"{key}: must be in (0, 1], got {_get(cfg, key)}")
    if not 0 < cfg.eval.temperature < math.inf:
        raise UserError(f"eval.temperature: must be a finite number > 0, got {cfg.eval.temperature}")
    for k in cfg.pass_k:
        if not 1 <= k <= cfg.eval.k:
            raise UserError(f"pass_k: {k} must be between 1 and eval.k ({cfg.eval.k})")
    for name in cfg.tasks:
        key = f"task_paths.{name}"
        check_task_data(task_config(name, cfg.task_paths.get(name), "tasks", key), key, key)
    check_models(cfg, ("model.name_or_path",))


# opd-data teacher-rollouts samples with data.*: the rollout and teacher keys it reads, and the keys to set instead
DATA_USED = {
    "rollout": ("engine", "gpu_memory_utilization", "max_prompt_tokens"),
    "teacher": ("name_or_path", "dtype", "trust_remote_code"),
}
DATA_INSTEAD = {k: f"data.{k}" for k in ("n", "temperature", "top_p", "max_new_tokens")}
DATA_INSTEAD["gpu_memory_utilization"] = "rollout.gpu_memory_utilization"


def validate_data(cfg: Any, overrides: list[str] = ()) -> None:
    """``opd-data teacher-rollouts``' checks; ``overrides`` are the command line's, so that a rollout or
    teacher key it would not read is refused instead of ignored."""
    refuse_unused_keys(overrides, "opd-data teacher-rollouts", DATA_USED, "data", DATA_INSTEAD)
    allowed = {**choices(), "device": DEVICES, "rollout.engine": SAMPLING_ENGINES}
    for key in ("rollout.engine", "teacher.dtype", "task.name", "device"):
        if _get(cfg, key) not in allowed[key]:
            raise UserError(f"{key}: '{_get(cfg, key)}' is not one of: {', '.join(allowed[key])}")
    at_least_one = ("n_problems", "n", "max_new_tokens", "batch_size", "repeat_ngram")
    for key in [f"data.{k}" for k in at_least_one] + ["rollout.max_prompt_tokens", "task.answer_timeout_s"]:
        if _get(cfg, key) < 1:
            raise UserError(f"{key}: must be an integer >= 1, got {_get(cfg, key)}")
    for key in ("data.top_p", "data.max_repeat_fraction", "rollout.gpu_memory_utilization"):
        if not 0 < _get(cfg, key) <= 1:
            raise UserError(f"{key}: must be in (0, 1], got {_get(cfg, key)}")
    if not 0 < cfg.data.temperature < math.inf:
        raise UserError(f"data.temperature: must be a finite number > 0, got {cfg.data.temperature}")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise UserError("device: cuda asked for, but torch sees no CUDA device; use device=auto or cpu")
    check_training_task(cfg.task)
    refuse_training_only_task_keys(cfg.task, "opd-data teacher-rollouts (the teacher's own template)")
    check_models(cfg, ("teacher.name_or_path",))


def validate_aligned(cfg: Any, overrides: list[str] = ()) -> None:
    """``opd-data aligned-prompts``' checks: the task's training data, the reference file and its column, the
    selection's bounds, and the embedding model found offline."""
    for key, allowed in (("task.name", ("arith", "hub")), ("device", DEVICES)):
        if _get(cfg, key) not in allowed:
            raise UserError(f"{key}: '{_get(cfg, key)}' is not one of: {', '.join(allowed)}")
    sel = cfg.select
    if sel.n is None and (sel.fraction is None or not 0 < sel.fraction <= 1):
        raise UserError(f"select.fraction: must be in (0, 1] (the share of the candidates kept), got {sel.fraction}")
    for key in ("select.top_m", "embedding.batch_size") + (("select.n",) if sel.n is not None else ()):
        if _get(cfg, key) < 1:
            raise UserError(f"{key}: must be an integer >= 1, got {_get(cfg, key)}")
    if not -1 <= sel.min_similarity <= 1:
        raise UserError(f"select.min_similarity: must be a cosine similarity in [-1, 1], got {sel.min_similarity}")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise UserError("device: cuda asked for, but torch sees no CUDA device; use device=auto or cpu")
    check_training_task(cfg.task)
    refuse_training_only_task_keys(cfg.task, "opd-data aligned-prompts")
    if not cfg.reference.path:
        raise UserError("reference.path: give the teacher's post-training prompts, a local jsonl or parquet file")
    read_texts(cfg.reference.path, cfg.reference.question_key)
    model_path(cfg.embedding.model)


def check_added_keys(cfg: DictConfig, overrides: list[str]) -> None:
    """A ``+key=value`` override adds a key; only a free-form dictionary (``trainer.deepspeed``,
    ``task.chat_template_kwargs``) takes new keys. Elsewhere a ``+`` key is a typo that would be ignored."""
    for o in OverridesParser.create().parse_overrides(overrides):
        key = o.key_or_group
        if not o.is_add() and not o.is_force_add() or key.startswith(("hydra.", "hydra/")):
            continue
        parent_key, _, name = key.rpartition(".")
        parent = OmegaConf.select(cfg, parent_key) if parent_key else cfg
        schema = OmegaConf.get_type(parent) if isinstance(parent, DictConfig) else None
        if schema is None or not dataclasses.is_dataclass(schema):
            continue
        known = [f.name for f in dataclasses.fields(schema)]
        if name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            hint = f"; did you mean {parent_key + '.' if parent_key else ''}{close[0]}?" if close else ""
            where = f"'{parent_key}'" if parent_key else "the config"
            raise UserError(f"{key}: not a key of {where} (a '+' adds keys only to free-form maps){hint}")


def sweep_points(config: DictConfig) -> tuple[list[list[str]], set[str]]:
    """The overrides of each job of a multirun sweep (Hydra's basic sweeper: the cartesian product), and
    the keys the sweep varies."""
    parsed = OverridesParser.create().parse_overrides(list(config.hydra.overrides.task))
    swept = {o.key_or_group for o in parsed if o.is_sweep_override()}
    return [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch], swept


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


@contextmanager
def checks_end_the_process() -> Iterator[None]:
    """Bad input ends the process in one line; so does a crash of a check (with its traceback), which Hydra
    would otherwise turn into a warning before running on with an unchecked config."""
    with one_line_errors():
        try:
            yield
        except (UserError, SystemExit):
            raise
        except (HydraException, OmegaConfBaseException) as e:  # composing a sweep's job
            fail(describe_config_error(e))
        except Exception:
            traceback.print_exc()
            raise SystemExit(1) from None


# ValidateCallback's command -> its checks of a composed config and the command line's overrides
CHECKS = {
    "train": lambda cfg, overrides: validate(cfg),
    "evaluate": validate_evaluate,
    "data": validate_data,
    "aligned": validate_aligned,
}
# the commands that write into a new, empty directory (opd-data's)
FRESH_OUTPUT = ("data", "aligned")


class ValidateCallback(Callback):
    """Hydra callback: check the composed config before any run directory is made or touched.

    ``command``: ``train`` (opd-train's checks), ``evaluate`` (opd-eval's), ``aligned`` (opd-data aligned-prompts') or ``data`` (opd-data
    teacher-rollouts', which also refuses an output directory that is not empty). For opd-train it
    also keeps a run directory's identity (``opd_cli.config.rundir``): a directory holding a run
    is refused unless ``trainer.resume=true``, and a resume runs the saved config. Hydra turns an
    exception raised in a callback into a warning and runs on, so a bad value ends the process here.
    """

    def __init__(self, command: str = "train") -> None:
        self.command = command

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        with checks_end_the_process():
            overrides = list(config.hydra.overrides.task)
            check_added_keys(config, overrides)
            if self.command != "train":
                CHECKS[self.command](config, overrides)
                check_writable(Path(config.hydra.run.dir), "hydra.run.dir")
                if self.command in FRESH_OUTPUT:
                    check_empty(Path(config.hydra.run.dir), "hydra.run.dir")
                return
            validate(config)
            run_dir = Path(config.hydra.run.dir)
            check_writable(run_dir, "hydra.run.dir")
            if config.trainer.resume:
                resume_in_place(config, run_dir, overrides)
            else:
                check_fresh(run_dir, "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        """Every job of the sweep is checked before the first starts; a used sweep directory needs a resume."""
        with checks_end_the_process():
            sweep_dir = Path(config.hydra.sweep.dir)
            check_writable(sweep_dir, "hydra.sweep.dir")
            points, swept = sweep_points(config) if "BasicSweeper" in config.hydra.sweeper._target_ else ([[]], set())
            for point in points:
                job = compose(config_name=config.hydra.job.config_name, overrides=point)
                try:
                    check_added_keys(job, point)
                    CHECKS[self.command](job, point)
                except UserError as e:
                    which = " ".join(o for o in point if o.split("=", 1)[0].lstrip("+~") in swept)
                    raise UserError(f"{e} (in the sweep's job {which})" if which else str(e)) from None
            if self.command in FRESH_OUTPUT:
                for job_dir in sorted(p for p in sweep_dir.glob("*") if p.is_dir()) if sweep_dir.is_dir() else ():
                    check_empty(job_dir, "hydra.sweep.dir")
            if self.command != "train":
                return
            if not config.trainer.resume:
                for job_dir in sorted(p for p in sweep_dir.glob("*") if p.is_dir()) if sweep_dir.is_dir() else ():
                    check_fresh(job_dir, "hydra.sweep.dir")
            else:  # each job compares its config with its saved one; keep the jobs' first .hydra records
                with read_write(config.hydra.overrides), open_dict(config.hydra.overrides):
                    config.hydra.overrides.hydra.append(f"hydra.output_subdir={resume_record_dir(sweep_dir)}")


def resume_record_dir(run_dir: Path) -> str:
    """Where Hydra records a resume's command (``.hydra/resume-<n>``), so that the run's own ``.hydra`` stays."""
    records = [*Path(run_dir).glob(".hydra/resume-*"), *Path(run_dir).glob("*/.hydra/resume-*")]
    found = [int(m.group(1)) for p in records if (m := re.fullmatch(r"resume-(\d+)", p.name))]
    n = max(found, default=0) + 1
    return f".hydra/resume-{n}"


def resume_in_place(config: DictConfig, run_dir: Path, overrides: list[str]) -> None:
    """Turn the composed config of ``trainer.resume=true`` into the run's saved config, with the overrides a
    resume may make (``rundir.restore``), checked again; Hydra records the resume apart from the run's record."""
    saved = saved_config(run_dir)
    if saved is None:
        return  # nothing to continue: the run starts from scratch (train warns)
    task = OmegaConf.to_container(config, resolve=False)
    task.pop("hydra")
    restored = restore(saved, OmegaConf.create(task), overrides, set(config.hydra.runtime.choices), run_dir)
    typed = OmegaConf.merge(OmegaConf.structured(TrainConfig), restored)  # exactly the saved values, typed
    with read_write(config), open_dict(config):
        for key in typed:
            config[key] = typed[key]
        config.trainer.resume = True
        config.hydra.output_subdir = resume_record_dir(run_dir)
    validate(config)
    check_steps_ahead(run_dir, config.trainer.max_steps)
