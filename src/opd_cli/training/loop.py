"""The OPD training loop: rollout -> teacher scoring -> objective -> optimizer step.

``train(cfg, run_dir)`` is what ``opd-train`` calls and what tests call; ``opd_step`` is
one step, each phase a call on one part (``opd_cli.contracts``): the rollout engine
samples, the teacher backend scores, the trainer runs the objective and steps.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
from pathlib import Path

import torch
from omegaconf import OmegaConf

from opd_cli.batch import RolloutBatch, TeacherSupport, chunk_bounds, merge_supports
from opd_cli.config.rundir import RUN_CONFIG, check_fresh, check_same_run, saved_config
from opd_cli.config.validate import validate
from opd_cli.contracts import DatasetEngine, TeacherBackend, Trainer
from opd_cli.dist import Rank, all_reduce, all_reduce_named, barrier, init_process_group, pick_device, shard, this_rank
from opd_cli.envs.base import Episode
from opd_cli.envs.registry import env_factory
from opd_cli.envs.runner import EpisodeRunner, env_instances, episode_means, episode_metrics
from opd_cli.errors import Stopped, UserError
from opd_cli.objectives.advantages import aggregation_weights, group_advantage
from opd_cli.objectives.base import Objective
from opd_cli.objectives.diagnostics import MetricSums, diagnostics_due, repetition_counts
from opd_cli.objectives.inputs import TokenInputs, token_inputs
from opd_cli.objectives.registry import teacher_k
from opd_cli.progress import Progress
from opd_cli.tasks.multitask import Alternation, task_entries, task_teacher, task_weights
from opd_cli.tasks.problems import Problem, load_problems, mix_problems
from opd_cli.tasks.scores import gap_recovery
from opd_cli.training.build import Parts, build, with_task
from opd_cli.training.checkpoint import explain_failed_save, latest_checkpoint, remove_stale_saves
from opd_cli.training.clock import PHASES, PhaseClock, peak_memory_gb
from opd_cli.training.data import eval_seed, rollout_seed, step_indices, step_prompts
from opd_cli.training.evaluation import evaluate_patterns, pattern_rates
from opd_cli.training.launch import StopRequest
from opd_cli.training.logger import MetricsLogger, NullLogger
from opd_cli.training.samples import Recording, SampleLog

log = logging.getLogger(__name__)

# the progress labels of the evaluations (samples.jsonl phases); a benchmark's is its phase, eval/<name>
EVAL_LABELS = {"eval": "eval student", "eval_teacher": "eval teacher"}


def update(
    trainer: Trainer,
    batch: RolloutBatch,
    x: TokenInputs,
    offsets: torch.Tensor,
    objective: Objective,
    cfg,
    world: int,
    clock: PhaseClock,
    diagnostics: bool = True,
) -> tuple[float, MetricSums, list[float]]:
    """Forward, backward and one optimizer step per mini-batch of a rollout batch (this rank's share).

    Each mini-batch's loss aggregates its tokens as ``loss.agg`` says, over every rank's
    share of it (``aggregation_weights``; the divisors are summed across ranks), so neither
    micro-batching nor the number of ranks changes it. Returns the mean over the step's
    optimizer steps of their losses, the diagnostics' sums and the gradient norms. ``diagnostics``
    False leaves out the student's full-vocabulary diagnostics (the loss and gradient are the same).
    """
    rows = batch.input_ids.shape[0]  # the same on every rank
    bounds = chunk_bounds(rows, math.ceil(rows / cfg.trainer.mini_batches))
    coefs, local = [], {}
    for i, (r0, r1) in enumerate(bounds):
        weight, starts = x.weight[offsets[r0] : offsets[r1]], offsets[r0 : r1 + 1] - offsets[r0]
        coef, local[f"divisor/{i}"] = aggregation_weights(weight, starts, cfg.loss.agg, cfg.rollout.max_new_tokens)
        local[f"supervised/{i}"] = weight.sum().item()
        coefs.append(coef)
    total = all_reduce_named(local)
    x.loss_weight = torch.cat([c / max(total[f"divisor/{i}"], 1e-30) for i, c in enumerate(coefs)])
    trainer.model.train()
    sums, losses, norms = MetricSums(), [], []
    for i, (r0, r1) in enumerate(bounds):
        if total[f"supervised/{i}"] == 0:
            continue  # every token of this mini-batch is masked, on every rank
        loss = 0.0
        with clock.phase("student"):
            for m0, m1 in chunk_bounds(r1 - r0, cfg.trainer.micro_batch_size):
                micro = batch.select(torch.arange(r0 + m0, r0 + m1))
                xm = x.slice(offsets[r0 + m0], offsets[r0 + m1]).to(trainer.model.device)
                loss_sum, msums = trainer.loss(
                    micro, xm, objective, cfg.loss.chunk_tokens, cfg.loss.gap_bucket_tokens, diagnostics
                )
                # the trainer averages gradients over ranks: scale by the world size to get the mini-batch's loss
                trainer.backward(loss_sum * world)
                loss += loss_sum.item()
                sums.merge(msums)
        losses.append(loss)
        with clock.phase("optimizer"):
            norms.append(trainer.optimizer_step())
    return all_reduce([sum(losses)])[0] / max(1, len(losses)), sums, norms


def outcome_scores(batch: RolloutBatch, prompts: list[str], p: Parts) -> torch.Tensor:
    """The task's checker on every response of the batch: 1.0 correct, 0.0 not (``loss.outcome_weight``)."""
    answers = [p.answers[prompts[int(i)]] for i in batch.prompt_index]
    texts = p.rollout.decode_responses(batch)
    return torch.tensor([float(p.checker(t, a)) for t, a in zip(texts, answers, strict=True)])


def step_batch(
    step: int, prompts: list[str], p: Parts, cfg, rank: Rank
) -> tuple[list[str], RolloutBatch, list[Episode] | None]:
    """This rank's batch of a step, the prompts its ``prompt_index`` points into, and its episodes (an
    environment task's; else None): the student's samples for ``prompts`` (an environment's: episodes of
    the instances they name), or, from a data set (``rollout=dataset``), its share of the step's rows.

    A step takes ``trainer.prompts_per_step * rollout.n`` data set rows (as many sequences as a
    sampled step), the next positions of one seeded shuffle of the rows per epoch (``step_indices``).
    """
    rc = cfg.rollout
    if isinstance(p.rollout, DatasetEngine):
        per_step = cfg.trainer.prompts_per_step * rc.n
        return (
            *p.rollout.batch_of(shard(step_indices(p.rollout.num_rows, per_step, step, cfg.trainer.seed), rank)),
            None,
        )
    seed = rollout_seed(cfg.trainer.seed, step, rank.rank)
    if p.episodes is not None:
        instances = [int(q) for q in prompts]
        return p.episodes.run(p.rollout, instances, rc.n, rc.temperature, rc.top_p, rc.max_new_tokens, seed)
    return prompts, p.rollout.generate(prompts, rc.n, rc.temperature, rc.top_p, rc.max_new_tokens, seed), None


def opd_step(
    step: int, prompts: list[str], p: Parts, cfg, rank: Rank, samples: SampleLog | None = None
) -> dict[str, float]:
    """One training step on this rank's share of the prompts (or of a data set's rows); returns the job's metrics.

    ``time/<phase>_s`` says where the step's wall time went: rollout, teacher scoring,
    student forward + backward (with the objective and diagnostics), optimizer, and
    the weight push into a separate rollout engine. Without a teacher (``sft``) nothing is scored.
    """
    trainer, lc = p.trainer, cfg.loss
    clock = PhaseClock(trainer.model.device)
    with clock.phase("rollout"):
        prompts, batch, episodes = step_batch(step, prompts, p, cfg, rank)
        if not p.live_teacher:  # a live self-teacher scores with the rollout's engine: it sleeps after that
            p.rollout.release()  # sleep mode: a vLLM engine's GPU memory is free until sync brings new weights
    with clock.phase("teacher"):
        support = None
        if p.teacher is not None:  # after the teacher's own prompts, where teacher.prompt gives them
            support = teacher_scores(p, batch, prompts, teacher_k(lc), "full" in p.objective.teacher_needs)
        if p.live_teacher:
            p.rollout.release()
    if samples is not None and samples.due(step):  # logger.samples_every: a few responses to samples.jsonl
        samples.train(step, prompts, batch, support, p.episodes or p.rollout)
    with clock.phase("student"):
        scores = None
        if lc.outcome_weight:  # an episode's outcome is its return
            scores = episode_returns(episodes) if episodes is not None else outcome_scores(batch, prompts, p)
        outcome = None if scores is None else lc.outcome_weight * group_advantage(scores, batch.prompt_index)
        x, offsets = token_inputs(batch, support, p.mask_ids, lc, outcome)
    diagnostics = diagnostics_due(step, cfg.logger.diagnostics_every)  # logger.diagnostics_every
    loss, sums, norms = update(trainer, batch, x, offsets, p.objective, cfg, rank.world, clock, diagnostics)
    check_finite(step, loss, norms)
    with clock.phase("optimizer"):
        lr = trainer.end_step()
    with clock.phase("sync"):
        p.rollout.sync(trainer.model, trainer.sharded)  # a vLLM engine gets the new weights
    metrics = step_metrics(batch, scores, loss, sums, norms, lr, clock)
    if episodes is not None:
        metrics.update(episode_means(all_reduce_named(episode_metrics(episodes))))
    return metrics


def teacher_scores(p: Parts, batch: RolloutBatch, prompts: list[str], k: int, full: bool) -> TeacherSupport:
    """The teacher's scores of a batch; under ``multitask.mode=mixed`` each row's by its own task's teacher (the
    rows of each teacher scored together, the supports merged back in row order)."""
    if p.routes is None:
        return p.teacher.score(p.teacher_view(batch, prompts), k, keep_hidden=full)
    groups: dict[int, tuple[TeacherBackend, list[int]]] = {}
    for row, i in enumerate(batch.prompt_index.tolist()):
        teacher = p.tasks[p.routes[prompts[i]]].teacher
        groups.setdefault(id(teacher), (teacher, []))[1].append(row)
    if len(groups) == 1:
        return next(iter(groups.values()))[0].score(batch, k, keep_hidden=full)
    lengths = batch.response_mask.sum(1).tolist()
    parts = [(rows, t.score(batch.select(torch.tensor(rows)), k, keep_hidden=full)) for t, rows in groups.values()]
    return merge_supports(parts, lengths)


def task_problems(task_cfg, n_eval: int) -> tuple[list[Problem], list[Problem]]:
    """A task's (train, held-out) problems, at most ``n_eval`` (``eval.n_problems``) held out for evaluation: an
    environment's instance numbers, or the task's data."""
    if task_cfg.name == "env":  # instance numbers: the first task.n_eval held out
        train, held = env_instances(task_cfg, env_factory(task_cfg.env.name, dict(task_cfg.env.args)))
    else:
        train, held = load_problems(task_cfg)
    return train, held[:n_eval]


def task_metrics(metrics: dict[str, float], name: str, names: list[str]) -> dict[str, float]:
    """A multitask step's metrics again as ``task/<name>/<metric>`` (its task's), and each task's share of the
    step (``data/task_<name>``: 1 for the step's task under ``multitask.mode=alternate``)."""
    own = {f"task/{name}/{k}": v for k, v in metrics.items() if not k.startswith(("time/", "data/"))}
    return own | {f"data/task_{n}": float(n == name) for n in names}


def episode_returns(episodes: list[Episode]) -> torch.Tensor:
    """Each episode's return (the sum of its rewards), as ``outcome_scores`` scores a response."""
    return torch.tensor([float(e.reward) for e in episodes])


def check_finite(step: int, loss: float, norms: list[float]) -> None:
    """Stop at the first non-finite loss or gradient norm, before the step's checkpoint is written.

    Every rank sees the same values (the loss is reduced over ranks, the norm is global), so all stop.
    """
    values = [("loss", loss), *(("gradient norm", n) for n in norms)]
    if bad := next(((name, v) for name, v in values if not math.isfinite(v)), None):
        raise UserError(
            f"step {step}: the {bad[0]} is {bad[1]}; the run stopped before saving this step (the last checkpoint "
            "is kept). Lower trainer.lr or trainer.max_grad_norm, or check the data"
        )


def step_metrics(
    batch: RolloutBatch,
    scores: torch.Tensor | None,
    loss: float,
    sums: MetricSums,
    norms: list[float],
    lr: float,
    clock: PhaseClock,
) -> dict[str, float]:
    """The step's metrics over every rank: loss, diagnostics, response statistics, time and memory."""
    lengths = batch.response_mask.sum(1).float()
    responses = [row[m].tolist() for row, m in zip(batch.input_ids, batch.response_mask, strict=True)]
    repeats, repetition_tokens = repetition_counts(responses)
    local = {
        "tokens": lengths.sum().item(),
        "rows": float(batch.input_ids.shape[0]),
        "truncated": batch.truncated.sum().item(),
        "repeats": float(repeats),
        "repetition_tokens": float(repetition_tokens),
        **sums.named(),
    }
    if scores is not None:
        local["outcome_score"] = scores.sum().item()
    total = all_reduce_named(local)
    peak = all_reduce_named({"length_max": lengths.max().item(), "peak_mem": peak_memory_gb(clock.device)}, op="max")
    step_time = clock.total()
    metrics = {"loss": loss, **MetricSums.from_named(total).means()}
    if scores is not None:
        metrics["outcome_score"] = total["outcome_score"] / total["rows"]  # share of responses the checker accepts
    metrics.update(
        repetition=total["repeats"] / max(1.0, total["repetition_tokens"]),
        grad_norm=sum(norms) / max(1, len(norms)),
        response_clip_ratio=total["truncated"] / total["rows"],
        response_length=total["tokens"] / total["rows"],
        response_length_max=peak["length_max"],
        lr=lr,
        tokens_per_s=total["tokens"] / step_time,
        step_time_s=step_time,
        peak_mem_gb=peak["peak_mem"],
        **{f"time/{k}_s": clock.seconds.get(k, 0.0) for k in PHASES},
    )
    return metrics


def pattern_metrics(rates: dict[str, float], suffix: str = "") -> dict[str, float]:
    """``eval.patterns``' match rates as logged metrics: ``eval/pattern/<name><suffix>``."""
    return {f"eval/pattern/{name}{suffix}": rate for name, rate in rates.items()}


def pattern_summary(before: dict[str, float], after: dict[str, float], teacher: dict[str, float]) -> dict[str, float]:
    """``eval.patterns``' match rates for summary.json: ``pattern/<name>_before``, ``_after``, ``_teacher``
    (the teacher's only where one was evaluated)."""
    out = {}
    for name in before:
        out[f"pattern/{name}_before"] = before[name]
        out[f"pattern/{name}_after"] = after[name]
        if name in teacher:
            out[f"pattern/{name}_teacher"] = teacher[name]
    return out


def _fmt(value: float | None) -> str:
    return "none" if value is None else f"{value:.3f}"


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def start_run(cfg, run_dir: Path, resume: bool) -> None:
    """Keep the run directory's identity (``opd_cli.config.rundir``): a new run needs an unused directory,
    a resumed one the config it was started with; rank 0 records that config when the run starts."""
    saved = saved_config(run_dir)
    if not resume:
        check_fresh(run_dir, "hydra.run.dir")
    elif saved is not None:
        check_same_run(saved, cfg, run_dir)
    barrier()  # every rank checked before rank 0 writes
    if this_rank().main and not (run_dir / RUN_CONFIG).exists():
        tmp = run_dir / f".{RUN_CONFIG}.tmp"
        OmegaConf.save(cfg, tmp)
        os.replace(tmp, run_dir / RUN_CONFIG)


def parameters_finite(model) -> bool:
    """No parameter holds inf or NaN (this rank's shards under ZeRO-3)."""
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


def save(p: Parts, run_dir: Path, step: int, state: dict) -> None:
    """The checkpoint of ``step``, of finite parameters only; a save that fills the disk is one line."""
    if not parameters_finite(p.trainer.model):
        raise UserError(f"step {step}: the student's parameters are not finite; nothing was saved. Lower trainer.lr")
    free = shutil.disk_usage(run_dir).free
    try:
        p.trainer.save(run_dir, step, p.tokenizer, state)
    except Exception as e:
        if this_rank().main and (message := explain_failed_save(run_dir, step, free, e)):
            raise UserError(message) from None
        raise


def train(cfg, run_dir: Path) -> dict:
    """Run OPD as configured on this rank; returns the run summary (rank 0 writes it)."""
    validate(cfg)
    stop = StopRequest()  # from here on SIGTERM ends the run at the next step boundary, with a checkpoint
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    rank = this_rank()
    device = pick_device(cfg.trainer.device, rank)
    if cfg.trainer.engine == "deepspeed":
        rank = init_process_group(device)
    torch.manual_seed(cfg.trainer.seed)
    random.seed(cfg.trainer.seed)

    # a job SLURM requeued (preemption, or a time limit with hydra.launcher.max_num_timeout) resumes by itself
    resume = cfg.trainer.resume or int(os.environ.get("SLURM_RESTART_COUNT") or 0) > 0
    start_run(cfg, run_dir, resume)
    config_dict = OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else {}
    names, more, evals = [], [], {}
    if cfg.multitask.tasks:  # the first task runs as `task` (with its teacher); the others ride along
        entries = task_entries(cfg)
        names = [name for name, _ in entries]
        for name, tcfg in entries[1:]:
            train, evals[name] = task_problems(tcfg, cfg.eval.n_problems)
            more.append((name, tcfg, task_teacher(cfg, name), train, evals[name]))
        cfg = with_task(cfg, entries[0][1], task_teacher(cfg, names[0]))
    train_problems, eval_problems = task_problems(cfg.task, cfg.eval.n_problems)
    if names:
        evals[names[0]] = eval_problems
    if rank.main:
        remove_stale_saves(run_dir)  # saves a killed process never committed
    barrier()
    ckpt = latest_checkpoint(run_dir) if resume else None
    if resume and ckpt is None:
        log.warning("trainer.resume=true but %s has no checkpoint: starting from scratch", run_dir)
    p = build(cfg, rank, device, ckpt, train_problems, eval_problems, more, names[0] if names else "")
    state: dict = {}
    if ckpt is not None:
        state = p.trainer.load(ckpt)
        log.info("resuming from %s (step %d)", ckpt, state["step"])
    start = state.get("step", 0)
    if start > cfg.trainer.max_steps:
        raise UserError(f"trainer.max_steps: the run is already at step {start}; give trainer.max_steps >= {start}")
    logger = MetricsLogger(run_dir, cfg.logger, config_dict, start if ckpt else None) if rank.main else NullLogger()
    seed = eval_seed(cfg.trainer.seed)
    samples = None
    if rank.main and cfg.logger.samples_every:
        every = train_problems + [q for problems in mix_problems(cfg.task) for q in problems]  # task.mix's too
        samples = SampleLog.of_run(cfg.logger, logger, p, every, cfg.task)

    def evaluated(
        engine,
        problems,
        prompts,
        checker,
        step: int,
        phase: str,
        by_teacher: bool = False,
        patterns=None,
        episodes: EpisodeRunner | None = None,
    ) -> tuple[float, dict[str, float]]:
        """avg@k of ``engine`` (progress labelled ``phase``) and its ``patterns``' match rates (``eval.patterns``);
        a few of its responses to samples.jsonl. With ``episodes``: the environment's success rate."""
        desc = EVAL_LABELS.get(phase, phase)
        if episodes is not None:
            acc, texts = episodes.evaluate(engine, problems, cfg.eval, seed, desc)
            return acc, pattern_rates(texts, patterns or {})
        engine = engine if samples is None else Recording(engine)
        acc, rates = evaluate_patterns(engine, problems, prompts, checker, cfg.eval, seed, desc, patterns)
        if samples is not None:
            answers = {q: e.answer for q, e in zip(prompts, problems, strict=True)}
            samples.eval(step, engine, answers, phase, checker, by_teacher)
        return acc, rates

    def evaluate_student(step: int) -> tuple[float, dict[str, float]]:
        return evaluated(
            p.rollout, eval_problems, p.eval_prompts, p.checker, step, "eval", patterns=cfg.eval.patterns,
            episodes=p.episodes,
        )  # fmt: skip

    def evaluate_tasks(step: int, first: float | None, teacher: bool = False) -> dict[str, float]:
        """Each multitask task's accuracy (or success rate): the student's, or before training its teacher's; the
        first task's is ``first`` (``eval/acc``, ``eval/acc_teacher``)."""
        out = {} if first is None or not names else {names[0]: first}
        for name, tp in list(p.tasks.items())[1:]:
            engine = tp.teacher_sampler if teacher else p.rollout
            if engine is None or (tp.episodes is not None and not hasattr(engine, "generate_ids")):
                continue
            phase = f"eval/{name}" + ("_teacher" if teacher else "")
            out[name] = evaluated(
                engine, evals[name], tp.eval_prompts, tp.checker, step, phase, teacher, None, tp.episodes
            )[0]
        return out

    def stop_here(step: int, saved: bool) -> None:
        """A stop request: save this step (unless just saved) and end with ``Stopped``."""
        if not saved:
            save(p, run_dir, step, state)
        log.warning("stop requested (SIGTERM): saved the checkpoint of step %d", step)
        raise Stopped(step)

    try:
        if "acc_before" not in state:
            # no teacher is loaded for an objective that needs nothing from it (sft): no teacher accuracy
            state["acc_teacher"], state["patterns_teacher"] = None, {}
            log.info("evaluating %sthe student before training", "" if p.teacher is None else "the teacher and ")
            # an environment's episodes need a sampler of token ids (not a teacher server's)
            if p.teacher_sampler is not None and (p.episodes is None or hasattr(p.teacher_sampler, "generate_ids")):
                teacher_prompts = p.teacher_eval_prompts or p.eval_prompts  # teacher.prompt: with what it sees
                state["acc_teacher"], state["patterns_teacher"] = evaluated(
                    p.teacher_sampler,
                    eval_problems,
                    teacher_prompts,
                    p.checker,
                    0,
                    "eval_teacher",
                    by_teacher=True,
                    patterns=cfg.eval.patterns,
                    episodes=p.episodes,
                )
            state["acc_before"], state["patterns_before"] = evaluate_student(0)
            has_teacher = p.teacher is not None
            state["tasks_teacher"] = evaluate_tasks(0, state["acc_teacher"], teacher=True) if has_teacher else {}
            state["tasks_before"] = evaluate_tasks(0, state["acc_before"])
            at_start = {
                "eval/acc": state["acc_before"],
                "eval/acc_teacher": state["acc_teacher"],
                **pattern_metrics(state["patterns_before"]),
                **pattern_metrics(state["patterns_teacher"], "_teacher"),
                **{f"eval/{name}/acc": acc for name, acc in state["tasks_before"].items()},
                **{f"eval/{name}/acc_teacher": acc for name, acc in state["tasks_teacher"].items()},
            }
            logger.log(0, {k: v for k, v in at_start.items() if v is not None})
            if stop.requested():  # during the evaluation: step 0 keeps its results, a resume starts training
                stop_here(0, saved=False)
        log.info("accuracy: teacher %s, student %.3f", _fmt(state["acc_teacher"]), state["acc_before"])
        acc = state.get("acc_last", state["acc_before"])
        steps = range(start + 1, cfg.trainer.max_steps + 1)
        desc = "OPD" if p.teacher is not None else "SFT"
        alternation = Alternation(task_weights(cfg)) if names and cfg.multitask.mode == "alternate" else None
        with Progress(cfg.trainer.max_steps, desc, unit="steps", initial=start) as bar:
            for step in steps:
                tp, name, k = p, None, step
                if alternation is not None:  # multitask: this step's task, and its own count of steps
                    i, k = alternation.task(step)
                    name = names[i]
                    tp = p.tasks[name]
                drawn, mixed = step_prompts(tp.train_prompts, cfg.trainer.prompts_per_step, k, cfg.trainer.seed), {}
                if p.mix is not None:  # task.mix: the step's prompts from several sources, and their shares
                    drawn, counts = p.mix.step(step)
                    mixed = p.mix.metrics(counts)
                metrics = opd_step(step, shard(drawn, rank), tp, cfg, rank, samples) | mixed
                if name is not None:
                    metrics |= task_metrics(metrics, name, names)
                last = step == cfg.trainer.max_steps
                if last or (cfg.eval.every and step % cfg.eval.every == 0):
                    acc, state["patterns_last"] = evaluate_student(step)
                    metrics["eval/acc"] = state["acc_last"] = acc
                    metrics.update(pattern_metrics(state["patterns_last"]))
                    state["tasks_last"] = evaluate_tasks(step, acc)
                    metrics.update({f"eval/{name}/acc": acc for name, acc in state["tasks_last"].items()})
                    for name, b in p.benchmarks.items():
                        metrics[f"eval/{name}/acc"] = evaluated(
                            p.rollout, b.problems, b.prompts, b.checker, step, f"eval/{name}"
                        )[0]
                logger.log(step, metrics)
                shown = {"loss": f"{metrics['loss']:.3f}", "acc": f"{acc:.2f}"}
                if "logprob_gap" in metrics:  # a teacher scored the step
                    shown["gap"] = f"{metrics['logprob_gap']:.2f}"
                bar.update(1, **shown)
                saved = last or bool(cfg.trainer.save_every and step % cfg.trainer.save_every == 0)
                if saved:
                    save(p, run_dir, step, state)
                if not last and stop.requested():  # asked after the save too: a SIGTERM during it stops here
                    stop_here(step, saved)
        after, teacher = state.get("acc_last", state["acc_before"]), state["acc_teacher"]
        summary = {
            "acc_before": state["acc_before"],
            "acc_after": after,
            "acc_teacher": teacher,
            "gap_recovery": None if teacher is None else gap_recovery(after, teacher, state["acc_before"]),
            "step": cfg.trainer.max_steps,
            **pattern_summary(
                state.get("patterns_before", {}),
                state.get("patterns_last", state.get("patterns_before", {})),
                state.get("patterns_teacher", {}),
            ),
        }
        for name, before in state.get("tasks_before", {}).items():
            summary[f"{name}/acc_before"] = before
            summary[f"{name}/acc_after"] = state.get("tasks_last", {}).get(name, before)
            summary[f"{name}/acc_teacher"] = state.get("tasks_teacher", {}).get(name)
        if rank.main:
            _write_json(run_dir / "summary.json", summary)
        logger.summary(summary)
        log.info("summary: %s", summary)
    finally:
        logger.close()
    return summary
