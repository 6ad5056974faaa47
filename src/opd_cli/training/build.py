"""Building a run's parts from its config: models, tokenizer, prompts, teacher, objective, trainer, rollout."""

from __future__ import annotations

import copy
import logging
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from omegaconf import open_dict
from transformers import PreTrainedTokenizerBase

from opd_cli.batch import RolloutBatch
from opd_cli.config.validate import COMPUTE_DTYPE, PARAM_DTYPE, student_precision
from opd_cli.contracts import RolloutEngine, Sampler, TeacherBackend, Trainer
from opd_cli.dist import Rank, barrier
from opd_cli.envs.runner import EpisodeRunner
from opd_cli.errors import UserError
from opd_cli.models.checks import check_model
from opd_cli.models.loading import check_same_vocabulary, lm_head_weight, load_model, load_tokenizer, resolve_path
from opd_cli.models.student import ADAPTER_DIR, add_lora, enable_checkpointing
from opd_cli.objectives.base import Objective
from opd_cli.objectives.divergence import degenerate
from opd_cli.objectives.masks import mask_token_ids
from opd_cli.objectives.registry import make_objective, needs_teacher, teacher_k
from opd_cli.rollout.registry import DATA_ENGINES, RolloutSpec, make_rollout
from opd_cli.tasks.checking import Checker, make_checker
from opd_cli.tasks.multitask import task_weights, teacher_key
from opd_cli.tasks.problems import mix_problems, mix_weights
from opd_cli.tasks.prompts import format_prompt, with_chat_template
from opd_cli.teacher.context import TeacherPrompts, differs, is_live, teacher_model_name, teacher_prompt
from opd_cli.teacher.registry import check_teacher_supplies, live_teacher, make_teacher
from opd_cli.training.data import Mix, prompt_length, training_prompts
from opd_cli.training.evaluation import Benchmark, load_benchmarks
from opd_cli.training.trainers import make_trainer

log = logging.getLogger(__name__)


def resolve_models(cfg, ckpt: Path | None, rank: Rank, teacher: bool = True) -> tuple[str, str | None]:
    """Student and teacher paths (the teacher's None unless ``teacher``); rank 0 builds the demo models
    (first use) while the others wait. ``teacher=self``'s is the student's starting model, also on resume.

    A resumed student comes from the checkpoint, except under LoRA: then from its base (the
    adapter is loaded onto it, ``build``)."""
    resumed = ckpt is not None and not cfg.model.lora.enabled
    for turn in (True, False):
        if rank.main == turn:
            s_path = str(ckpt / "model") if resumed else resolve_path(cfg.model.name_or_path, cfg)
            t_path = resolve_path(teacher_model_name(cfg), cfg) if teacher else None
        barrier()
    return s_path, t_path


@dataclass
class Parts:
    """Everything a training step needs, built from the config (see ``build``)."""

    tokenizer: PreTrainedTokenizerBase  # the student's
    train_prompts: list[str]
    answers: dict[str, str]  # training prompt -> its gold answer (loss.outcome_weight)
    eval_prompts: list[str]
    teacher: TeacherBackend | None  # None: the objective needs nothing from it (sft), so none is loaded
    teacher_sampler: Sampler | None  # the teacher sampling, for its accuracy before training
    objective: Objective
    mask_ids: list[int]  # token ids of loss.mask_tokens
    checker: Checker
    trainer: Trainer
    rollout: RolloutEngine
    benchmarks: dict[str, Benchmark]  # scored during training (eval.benchmarks)
    mix: Mix | None = None  # task.mix: each step's prompts drawn from several sources
    teacher_prompts: TeacherPrompts | None = None  # teacher.prompt: the teacher's own prompt of each training prompt
    teacher_eval_prompts: list[str] | None = None  # the eval prompts as the teacher sees them (its evaluation)
    live_teacher: bool = False  # teacher=self with live weights: scored by the rollout's own engine (kept awake)
    episodes: EpisodeRunner | None = None  # task.name=env: prompts are instance numbers, rollouts are episodes
    # multitask: each task's parts by name (the first is this one), sharing the student, rollout and objective
    tasks: dict[str, Parts] = field(default_factory=dict)
    # multitask.mode=mixed: training prompt -> its task's name (each row is scored by its own task's teacher)
    routes: dict[str, str] | None = None

    def teacher_view(self, batch: RolloutBatch, prompts: list[str]) -> RolloutBatch:
        """``batch`` as the teacher scores it: after its own prompts, where ``teacher.prompt`` gives them."""
        return batch if self.teacher_prompts is None else self.teacher_prompts.view(batch, prompts)


@dataclass
class TaskData:
    """One more task of a multitask run: what its steps and evaluations read (``Parts``' fields of its own)."""

    train_prompts: list[str]
    eval_prompts: list[str]
    answers: dict[str, str]
    checker: Checker
    episodes: EpisodeRunner | None
    longest: int  # its longest prompt, in tokens


def task_data(tcfg, cfg, train_problems, eval_problems, tokenizer) -> TaskData:
    """A task's prompts (an environment's: instance numbers), gold answers and checker, as ``build`` makes the
    first task's."""
    if tcfg.name == "env":
        episodes = EpisodeRunner.of_task(tcfg, tokenizer)
        train, evals = [q.question for q in train_problems], [q.question for q in eval_problems]
        return TaskData(train, evals, {}, make_checker(tcfg), episodes, episodes.longest_prompt())
    train, longest = training_prompts(train_problems, with_task(cfg, tcfg), tokenizer)
    evals = [format_prompt(q, tcfg, tokenizer) for q in eval_problems]
    answers = {format_prompt(q, tcfg, tokenizer): q.answer for q in train_problems}
    longest = max([longest] + [prompt_length(tokenizer, q) for q in evals])
    return TaskData(train, evals, answers, make_checker(tcfg), None, longest)


def with_task(cfg, task=None, teacher=None):
    """A copy of the run's config with another ``task`` and/or ``teacher`` section."""
    out = copy.deepcopy(cfg)
    with open_dict(out):
        if task is not None:
            out.task = task
        if teacher is not None:
            out.teacher = teacher
    return out


def load_teacher(cfg, tc, rank: Rank, device, s_tok, s_rows: int, max_len: int):
    """Teacher ``tc`` of a multitask run's task (its model resolved by rank 0 first), and its sampler."""
    c = with_task(cfg, teacher=tc)
    for turn in (True, False):
        if rank.main == turn:
            path = resolve_path(tc.name_or_path, c)
        barrier()
    t_tok = load_tokenizer(path, "multitask.teachers", tc.trust_remote_code)
    teacher, sampler, rows = make_teacher(c, path, t_tok, device, max_len)
    check_same_vocabulary(s_tok, t_tok, s_rows, rows)
    return teacher, sampler


def check_positions(model, max_len: int, longest: int, engine: str) -> None:
    """vLLM refuses a context longer than the model's positions: say so in one line (HF sampling goes on; RoPE
    has no learned positions). ``VLLM_ALLOW_LONG_MAX_MODEL_LEN=1`` lets vLLM go on too."""
    limit = getattr(model.config, "max_position_embeddings", None)
    if engine == "vllm" and limit and max_len > limit and os.environ.get("VLLM_ALLOW_LONG_MAX_MODEL_LEN") != "1":
        raise UserError(
            f"rollout.max_new_tokens: the longest prompt ({longest} tokens) and the longest response "
            f"(max of rollout.max_new_tokens, eval.max_new_tokens) make {max_len} tokens, more than the student's "
            f"{int(limit)} positions (max_position_embeddings); shorten them, or set VLLM_ALLOW_LONG_MAX_MODEL_LEN=1"
        )


def build(
    cfg,
    rank: Rank,
    device: torch.device,
    ckpt: Path | None,
    train_problems,
    eval_problems,
    more_tasks=(),
    first: str = "",
) -> Parts:
    """Load the models and make the engines, teacher and objective of a run (``opd-train`` and ``make bench``).

    The teacher is loaded only if the objective needs something from it (not for ``sft``). ``more_tasks``: a
    multitask run's other tasks, ``(name, task config, teacher config, train problems, eval problems)`` each;
    ``cfg`` holds the first task (named ``first``) and its teacher. Each distinct teacher is loaded once."""
    uses_teacher = needs_teacher(cfg.loss)
    live = uses_teacher and is_live(cfg.teacher)
    teacher_template = cfg.task.chat_template_from == "teacher" or cfg.teacher.prompt.chat_template_from == "teacher"
    s_path, t_path = resolve_models(cfg, ckpt, rank, (uses_teacher and not live) or teacher_template)
    s_tok = load_tokenizer(s_path, "model.name_or_path", cfg.model.trust_remote_code)
    t_tok = s_tok if t_path is None else load_tokenizer(t_path, "teacher.name_or_path", cfg.teacher.trust_remote_code)
    if cfg.task.chat_template_from == "teacher":  # the student's prompts in the teacher's chat template
        s_tok = with_chat_template(s_tok, t_tok)
    precision = student_precision(cfg)
    # bf16-mixed loads float32 weights: the engine keeps them as master weights and computes in bfloat16
    cpu_linear = cfg.trainer.cpu_linear if COMPUTE_DTYPE[precision] == "float32" else "blas"
    student = load_model(
        s_path, "model.name_or_path", PARAM_DTYPE[precision], device, cfg.model.trust_remote_code, cpu_linear
    )
    if cfg.model.lora.enabled:  # a resume's adapter from its checkpoint
        student = add_lora(student, cfg.model.lora, ckpt / ADAPTER_DIR if ckpt else None)
    if cfg.trainer.gradient_checkpointing:
        enable_checkpointing(student)
    # logits must be hidden @ W.T; the packed pass and our decoders only where they equal the model's forward
    check_model(student, "model.name_or_path", sampling=cfg.rollout.engine in ("hf", *DATA_ENGINES))
    episodes = None
    if cfg.task.name == "env":  # the prompts are instance numbers; an episode's prompt is its first observation
        episodes = EpisodeRunner.of_task(cfg.task, s_tok)
        train_prompts, longest = [q.question for q in train_problems], episodes.longest_prompt()
    else:
        train_prompts, longest = training_prompts(train_problems, cfg, s_tok)
    mix = None
    if cfg.task.mix:  # task.mix: each source's prompts, as the task's own are chosen
        extra = mix_problems(cfg.task)
        sources = [train_prompts] + [training_prompts(problems, cfg, s_tok)[0] for problems in extra]
        longest = max(prompt_length(s_tok, q) for q in (q for source in sources for q in source))
        names, weights = mix_weights(cfg.task)
        mix = Mix(sources, weights, cfg.trainer.prompts_per_step, cfg.trainer.seed, names)
        train_problems = train_problems + [q for problems in extra for q in problems]
    answers = {}
    if cfg.loss.outcome_weight:
        answers = {format_prompt(q, cfg.task, s_tok): q.answer for q in train_problems}
    eval_prompts = [p.question if episodes else format_prompt(p, cfg.task, s_tok) for p in eval_problems]
    benchmarks = load_benchmarks(cfg, s_tok)
    every_eval_prompt = ([] if episodes else eval_prompts) + [q for b in benchmarks.values() for q in b.prompts]
    longest = max([longest] + [prompt_length(s_tok, p) for p in every_eval_prompt])
    teacher_prompts = teacher_eval_prompts = None
    if uses_teacher and differs(cfg.teacher):  # teacher.prompt: the teacher scores after its own prompts
        pc, t_fmt = cfg.teacher.prompt, t_tok if cfg.teacher.prompt.chat_template_from == "teacher" else s_tok
        pairs = {format_prompt(q, cfg.task, s_tok): teacher_prompt(q, cfg.task, pc, t_fmt) for q in train_problems}
        teacher_prompts = TeacherPrompts(pairs, t_tok)
        teacher_eval_prompts = [teacher_prompt(q, cfg.task, pc, t_fmt) for q in eval_problems]
        longest = max([longest, teacher_prompts.longest()] + [prompt_length(t_tok, q) for q in teacher_eval_prompts])
    more = {name: task_data(tc, cfg, tr, ev, s_tok) for name, tc, _, tr, ev in more_tasks}
    longest = max([longest] + [d.longest for d in more.values()])
    max_len = longest + max(cfg.rollout.max_new_tokens, cfg.eval.max_new_tokens)
    check_positions(student, max_len, longest, cfg.rollout.engine)
    teacher = teacher_sampler = None
    if uses_teacher and not live:
        teacher, teacher_sampler, t_rows = make_teacher(cfg, t_path, t_tok, device, max_len)
        # config.validate.check_models compares the files before the run directory exists; this costs nothing
        # and covers what it could not see (a resumed student, a hub model downloaded just now)
        check_same_vocabulary(s_tok, t_tok, lm_head_weight(student).shape[0], t_rows)
    mask_ids = mask_token_ids(s_tok, list(cfg.loss.mask_tokens))
    s_rows = lm_head_weight(student).shape[0]  # before ZeRO-3 partitions it
    trainer = make_trainer(student, cfg.trainer, rank, precision)
    spec = RolloutSpec(
        trainer.model, s_tok, s_path, max_len, COMPUTE_DTYPE[precision], cfg.trainer.seed, trainer.sharded,
        ranks=cfg.trainer.engine == "deepspeed", entropy=cfg.loss.entropy_top_ratio is not None, task=cfg.task,
        max_logprobs=max(20, teacher_k(cfg.loss)) if live else 20,
    )  # fmt: skip
    rollout = make_rollout(cfg.rollout, spec)
    if ckpt is not None and cfg.model.lora.enabled:
        rollout.sync(trainer.model, trainer.sharded)  # a vLLM engine loaded the base: give it the adapted weights
    if live:  # the student's current weights score: no second copy
        teacher, teacher_sampler = live_teacher(cfg, trainer.model, trainer.sharded, rollout)
    needs = make_objective(cfg.loss).teacher_needs
    objective = make_objective(cfg.loss, teacher.head if teacher is not None and "full" in needs else None)
    if rank.main and (why := degenerate(cfg.loss)):
        log.warning(why)
    if teacher is not None:
        check_teacher_supplies(objective, teacher.supplies, cfg.teacher.backend)
    p = Parts(
        s_tok,
        train_prompts,
        answers,
        eval_prompts,
        teacher,
        teacher_sampler,
        objective,
        mask_ids,
        make_checker(cfg.task),
        trainer,
        rollout,
        benchmarks,
        mix,
        teacher_prompts,
        teacher_eval_prompts,
        live,
        episodes,
    )
    if more_tasks:  # each task's parts: its prompts, checker and teacher (one load per distinct teacher)
        teachers = {teacher_key(cfg.teacher): (teacher, teacher_sampler)}
        p.tasks = {first: p}
        for name, _, tc, _, _ in more_tasks:
            key = teacher_key(tc)
            if uses_teacher and key not in teachers:
                teachers[key] = load_teacher(cfg, tc, rank, device, s_tok, s_rows, max_len)
            t, sampler = teachers.get(key, (None, None))
            d = more[name]
            p.tasks[name] = replace(
                p, train_prompts=d.train_prompts, eval_prompts=d.eval_prompts, answers=d.answers, checker=d.checker,
                episodes=d.episodes, teacher=t, teacher_sampler=sampler, benchmarks={}, mix=None, tasks={},
            )  # fmt: skip
        if cfg.multitask.mode == "mixed":  # each step's prompts drawn from every task, routed back by prompt
            names = list(p.tasks)
            p.routes = {q: name for name in reversed(names) for q in p.tasks[name].train_prompts}
            p.answers = {q: a for name in names for q, a in p.tasks[name].answers.items()}
            weights = task_weights(cfg)
            sources = [p.tasks[n].train_prompts for n in names]
            p.mix = Mix(
                sources,
                [w / sum(weights) for w in weights],
                cfg.trainer.prompts_per_step,
                cfg.trainer.seed,
                names,
                "task",
            )
    return p
