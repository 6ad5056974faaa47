"""The OPD training loop: rollout -> teacher scoring -> objective -> optimizer step.

``train(cfg, run_dir)`` is what ``opd-train`` calls and what tests call. Each
phase is one module with a small interface (rollout engine, teacher backend,
objective), so later engines (vLLM, DeepSpeed) replace a part, not the loop.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import resource
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf
from tqdm import tqdm

from opd_cli.batch import RolloutBatch, chunk_bounds
from opd_cli.config.validate import validate
from opd_cli.dist import Rank, all_keys, all_reduce, init_process_group, pick_device, shard, this_rank
from opd_cli.errors import Stopped
from opd_cli.objectives.advantages import aggregation_weights, group_advantage
from opd_cli.objectives.diagnostics import MetricSums, repetition_counts
from opd_cli.objectives.inputs import TokenInputs, token_inputs
from opd_cli.objectives.registry import teacher_k
from opd_cli.tasks.problems import load_problems
from opd_cli.training.build import Parts, build
from opd_cli.training.checkpoint import latest_checkpoint
from opd_cli.training.data import step_prompts
from opd_cli.training.evaluation import evaluate
from opd_cli.training.launch import StopRequest
from opd_cli.training.logger import MetricsLogger, NullLogger

log = logging.getLogger(__name__)


class PhaseClock:
    """Wall time per phase of a step; waits for queued GPU work so each phase is charged its own."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.seconds: dict[str, float] = {}
        self.last = self._now()

    def _now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def lap(self, phase: str) -> None:
        """Charge the time since the previous lap to ``phase``."""
        now = self._now()
        self.seconds[phase] = self.seconds.get(phase, 0.0) + now - self.last
        self.last = now


PHASES = ("rollout", "teacher", "student", "optimizer", "sync")


def update(trainer, batch: RolloutBatch, x: TokenInputs, offsets, objective, cfg, world: int, clock: PhaseClock):
    """Forward, backward and one optimizer step per mini-batch of a rollout batch (this rank's share).

    Each mini-batch's loss aggregates its tokens as ``loss.agg`` says, over every rank's
    share of it (``aggregation_weights``; the divisors are summed across ranks), so neither
    micro-batching nor the number of ranks changes it. Returns the mean over the step's
    optimizer steps of their losses, the diagnostics' sums and the gradient norms.
    """
    rows = batch.input_ids.shape[0]  # the same on every rank
    bounds = chunk_bounds(rows, math.ceil(rows / cfg.trainer.mini_batches))
    coefs, local = [], []
    for r0, r1 in bounds:
        weight, starts = x.weight[offsets[r0] : offsets[r1]], offsets[r0 : r1 + 1] - offsets[r0]
        coef, divisor = aggregation_weights(weight, starts, cfg.loss.agg, cfg.rollout.max_new_tokens)
        coefs.append(coef)
        local += [divisor, weight.sum().item()]
    total = all_reduce(local)
    divisors, supervised = total[0::2], total[1::2]
    x.loss_weight = torch.cat([c / max(d, 1e-30) for c, d in zip(coefs, divisors, strict=True)])
    trainer.model.train()
    sums, losses, norms = MetricSums(), [], []
    for (r0, r1), n_supervised in zip(bounds, supervised, strict=True):
        if n_supervised == 0:
            continue  # every token of this mini-batch is masked, on every rank
        loss = 0.0
        for m0, m1 in chunk_bounds(r1 - r0, cfg.trainer.micro_batch_size):
            micro = batch.select(torch.arange(r0 + m0, r0 + m1))
            xm = x.slice(offsets[r0 + m0], offsets[r0 + m1]).to(trainer.model.device)
            loss_sum, msums = trainer.loss(micro, xm, objective, cfg.loss.chunk_tokens, cfg.loss.gap_bucket_tokens)
            # the engine averages gradients over ranks: scale by the world size to get the mini-batch's loss
            trainer.backward(loss_sum * world)
            loss += loss_sum.item()
            sums.merge(msums)
        losses.append(loss)
        clock.lap("student")
        norms.append(trainer.optimizer_step())
        clock.lap("optimizer")
    return sum(all_reduce(losses)) / max(1, len(losses)), sums, norms


def opd_step(step: int, prompts: list[str], p: Parts, cfg, rank: Rank) -> dict[str, float]:
    """One training step on this rank's share of the prompts; returns the job's metrics.

    ``time/<phase>_s`` says where the step's wall time went: rollout, teacher scoring,
    student forward + backward (with the objective and diagnostics), optimizer, and
    the weight push into a separate rollout engine.
    """
    trainer, rc = p.trainer, cfg.rollout
    device = trainer.model.device
    clock = PhaseClock(device)
    seed = cfg.trainer.seed * 7919 + step + 1_000_003 * rank.rank
    batch = p.rollout.generate(prompts, rc.n, rc.temperature, rc.top_p, rc.max_new_tokens, seed)
    p.rollout.release()  # sleep mode: a vLLM engine's GPU memory is free until sync brings new weights
    clock.lap("rollout")
    support = p.teacher.score(batch, teacher_k(cfg.loss), keep_hidden="full" in p.objective.teacher_needs)
    clock.lap("teacher")
    scores = outcome = None
    if cfg.loss.outcome_weight:  # the task's checker on every response: GRPO's group advantage
        answers = [p.answers[prompts[int(i)]] for i in batch.prompt_index]
        texts = p.rollout.decode_responses(batch)
        scores = torch.tensor([float(p.checker(t, a)) for t, a in zip(texts, answers, strict=True)])
        outcome = cfg.loss.outcome_weight * group_advantage(scores, batch.prompt_index)
    x, offsets = token_inputs(batch, support, p.mask_ids, cfg.loss, outcome)
    loss_total, sums, norms = update(trainer, batch, x, offsets, p.objective, cfg, rank.world, clock)
    trainer.scheduler.step()
    p.rollout.sync(trainer.model, trainer.synced_generation)  # a vLLM engine gets the new weights
    clock.lap("sync")
    step_time = sum(clock.seconds.values())
    lengths = batch.response_mask.sum(1).float()
    responses = [row[m].tolist() for row, m in zip(batch.input_ids, batch.response_mask, strict=True)]
    rows = batch.input_ids.shape[0]
    keys = all_keys(list(sums.sums))
    local = [lengths.sum().item(), float(rows), batch.truncated.sum().item(), *repetition_counts(responses)]
    local.append(0.0 if scores is None else scores.sum().item())
    total = all_reduce(local + [sums.sums.get(k, 0.0) for k in keys] + [sums.weights.get(k, 0.0) for k in keys])
    n_tokens, n_rows, n_truncated, repeats, rep_tokens, score_sum = total[:6]
    job = MetricSums()
    job.sums = dict(zip(keys, total[6 : 6 + len(keys)], strict=True))
    job.weights = dict(zip(keys, total[6 + len(keys) :], strict=True))
    length_max, peak_mem = all_reduce([lengths.max().item(), peak_memory_gb(device)], op="max")
    metrics = {"loss": loss_total, **job.means()}
    if scores is not None:
        metrics["outcome_score"] = score_sum / n_rows  # the share of this step's responses the checker accepts
    metrics.update(
        repetition=repeats / max(1.0, rep_tokens),
        grad_norm=sum(norms) / max(1, len(norms)),
        response_clip_ratio=n_truncated / n_rows,
        response_length=n_tokens / n_rows,
        response_length_max=length_max,
        lr=trainer.scheduler.get_last_lr()[0],
        tokens_per_s=n_tokens / step_time,
        step_time_s=step_time,
        peak_mem_gb=peak_mem,
        **{f"time/{k}_s": clock.seconds.get(k, 0.0) for k in PHASES},
    )
    return metrics


def peak_memory_gb(device: torch.device) -> float:
    """Peak GPU memory allocated by torch on CUDA; the process's peak resident set on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def train(cfg, run_dir: Path) -> dict:
    """Run OPD as configured on this rank; returns the run summary (rank 0 writes it)."""
    validate(cfg)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    rank = this_rank()
    device = pick_device(cfg.trainer.device, rank)
    if cfg.trainer.engine == "deepspeed":
        rank = init_process_group(device)
    torch.manual_seed(cfg.trainer.seed)
    random.seed(cfg.trainer.seed)

    train_problems, eval_problems = load_problems(cfg.task)
    eval_problems = eval_problems[: cfg.eval.n_problems]
    # a job SLURM requeued (preemption, or a time limit with hydra.launcher.max_num_timeout) resumes by itself
    resume = cfg.trainer.resume or int(os.environ.get("SLURM_RESTART_COUNT") or 0) > 0
    ckpt = latest_checkpoint(run_dir) if resume else None
    if resume and ckpt is None:
        log.warning("trainer.resume=true but %s has no checkpoint: starting from scratch", run_dir)
    p = build(cfg, rank, device, ckpt, train_problems, eval_problems)
    state: dict = {}
    if ckpt is not None:
        state = p.trainer.load(ckpt)
        log.info("resuming from %s (step %d)", ckpt, state["step"])
    start = state.get("step", 0)
    config_dict = OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else {}
    logger = MetricsLogger(run_dir, cfg.logger, config_dict, start if ckpt else None) if rank.main else NullLogger()
    eval_seed = cfg.trainer.seed * 104_729

    def evaluate_student() -> float:
        return evaluate(p.rollout, eval_problems, p.eval_prompts, p.checker, cfg.eval, eval_seed)

    try:
        if "acc_teacher" not in state:
            log.info("evaluating the teacher and the student before training")
            state["acc_teacher"] = evaluate(
                p.teacher_sampler, eval_problems, p.eval_prompts, p.checker, cfg.eval, eval_seed
            )
            state["acc_before"] = evaluate_student()
            logger.log(0, {"eval/acc": state["acc_before"], "eval/acc_teacher": state["acc_teacher"]})
        log.info("accuracy: teacher %.3f, student %.3f", state["acc_teacher"], state["acc_before"])
        acc = state.get("acc_last", state["acc_before"])
        steps = range(start + 1, cfg.trainer.max_steps + 1)
        bar = tqdm(steps, desc="OPD", initial=start, total=cfg.trainer.max_steps, disable=not rank.main)
        stop = StopRequest()
        for step in bar:
            prompts = shard(step_prompts(p.train_prompts, cfg.trainer.prompts_per_step, step, cfg.trainer.seed), rank)
            metrics = opd_step(step, prompts, p, cfg, rank)
            last = step == cfg.trainer.max_steps
            if last or (cfg.eval.every and step % cfg.eval.every == 0):
                acc = metrics["eval/acc"] = state["acc_last"] = evaluate_student()
                for name, (problems, prompts, checker) in p.benchmarks.items():
                    metrics[f"eval/{name}/acc"] = evaluate(p.rollout, problems, prompts, checker, cfg.eval, eval_seed)
            logger.log(step, metrics)
            bar.set_postfix(loss=f"{metrics['loss']:.3f}", gap=f"{metrics['logprob_gap']:.2f}", acc=f"{acc:.2f}")
            if last or (cfg.trainer.save_every and step % cfg.trainer.save_every == 0):
                p.trainer.save(run_dir, step, p.tokenizer, state)
            elif stop.requested():
                p.trainer.save(run_dir, step, p.tokenizer, state)
                log.warning("stop requested (SIGTERM): saved the checkpoint of step %d", step)
                raise Stopped(step)
        after = state.get("acc_last", state["acc_before"])
        gap = state["acc_teacher"] - state["acc_before"]
        summary = {
            "acc_before": state["acc_before"],
            "acc_after": after,
            "acc_teacher": state["acc_teacher"],
            "gap_recovery": (after - state["acc_before"]) / gap if gap > 0 else None,
            "step": cfg.trainer.max_steps,
        }
        if rank.main:
            _write_json(run_dir / "summary.json", summary)
        logger.summary(summary)
        log.info("summary: %s", summary)
    finally:
        logger.close()
    return summary
