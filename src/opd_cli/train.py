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

from opd_cli.checkpoint import latest_checkpoint, load_trainer_state, save_checkpoint
from opd_cli.config import validate
from opd_cli.errors import UserError
from opd_cli.logger import MetricsLogger
from opd_cli.masks import mask_token_ids, special_token_keep
from opd_cli.models import check_same_vocabulary, load_model, load_tokenizer, resolve_path
from opd_cli.objectives import (
    MetricSums,
    TokenInputs,
    chunk_bounds,
    discounted_returns,
    make_objective,
    repetition,
    student_loss_and_metrics,
)
from opd_cli.rollout import HFRollout, RolloutBatch
from opd_cli.tasks import CHECKERS, Problem, format_prompt, load_problems
from opd_cli.teacher import HFTeacher, TeacherSupport, check_teacher_supplies, lm_head_weight, response_hidden

log = logging.getLogger(__name__)


def token_inputs(
    batch: RolloutBatch, support: TeacherSupport, mask_ids: list[int], loss_cfg
) -> tuple[TokenInputs, torch.Tensor]:
    """Flat per-token inputs of a batch, and row offsets into them ([B + 1])."""
    rm = batch.response_mask
    keep = special_token_keep(batch.input_ids, rm, mask_ids, loss_cfg.mask_mode)[rm].float()
    rewards = torch.zeros(rm.shape, dtype=torch.float32)
    rewards[rm] = (support.sampled_logprob - batch.old_logprobs[rm]) * keep
    advantage = discounted_returns(rewards, loss_cfg.gamma)[rm]
    x = TokenInputs(
        target=batch.input_ids[rm],
        weight=keep,
        position=(rm.cumsum(1) - 1)[rm],
        old_logprob=batch.old_logprobs[rm],
        advantage=advantage,
        teacher_logprob=support.sampled_logprob,
        teacher_topk_ids=support.topk_ids,
        teacher_topk_logprobs=support.topk_logprobs,
        teacher_entropy=support.entropy,
        teacher_hidden=support.hidden,
    )
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), rm.sum(1).cumsum(0)])
    return x, offsets


def step_prompts(prompts: list[str], per_step: int, step: int, seed: int) -> list[str]:
    """The prompts of training step ``step`` (1-based): seeded epochs, derived from the step alone.

    Deriving the data position from the step makes resume exact without saving a cursor.
    """
    out = []
    for pos in range((step - 1) * per_step, step * per_step):
        epoch, i = divmod(pos, len(prompts))
        order = list(range(len(prompts)))
        random.Random(seed * 100_003 + epoch).shuffle(order)
        out.append(prompts[order[i]])
    return out


@torch.no_grad()
def evaluate(model, tokenizer, problems: list[Problem], prompts: list[str], checker, ecfg, seed: int) -> float:
    """avg@k accuracy: mean correctness over ``eval.k`` samples per problem."""
    engine = HFRollout(model, tokenizer, max_prompt_tokens=10**9)
    correct = 0
    per_call = max(1, ecfg.batch_size // ecfg.k)
    for s, e in chunk_bounds(len(problems), per_call):
        batch = engine.generate(prompts[s:e], ecfg.k, ecfg.temperature, ecfg.top_p, ecfg.max_new_tokens, seed + s)
        texts = engine.decode_responses(batch)
        correct += sum(checker(t, problems[s + i // ecfg.k].answer) for i, t in enumerate(texts))
    return correct / (len(problems) * ecfg.k)


class TorchTrainer:
    """Plain-torch training engine: AdamW, LR schedule, gradient clipping."""

    def __init__(self, model, tcfg) -> None:
        self.model = model
        self.max_grad_norm = tcfg.max_grad_norm
        self.optimizer = torch.optim.AdamW(
            model.parameters(), lr=tcfg.lr, betas=tuple(tcfg.betas), weight_decay=tcfg.weight_decay
        )

        def factor(step: int) -> float:
            if step < tcfg.warmup_steps:
                return (step + 1) / tcfg.warmup_steps
            if tcfg.lr_schedule == "cosine":
                done = (step - tcfg.warmup_steps) / max(1, tcfg.max_steps - tcfg.warmup_steps)
                return 0.5 * (1 + math.cos(math.pi * min(1.0, done)))
            return 1.0

        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, factor)

    def optimizer_step(self) -> float:
        """Clip, step, zero; returns the global gradient norm before clipping."""
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm.item()

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])


def opd_step(step, prompts, rollout, teacher, objective, trainer, mask_ids, cfg) -> dict[str, float]:
    """One training step; returns its metrics."""
    t0 = time.perf_counter()
    rc = cfg.rollout
    batch = rollout.generate(prompts, rc.n, rc.temperature, rc.top_p, rc.max_new_tokens, cfg.trainer.seed * 7919 + step)
    t1 = time.perf_counter()
    support = teacher.score(batch, cfg.loss.k, keep_hidden="full" in objective.teacher_needs)
    t2 = time.perf_counter()
    x, offsets = token_inputs(batch, support, mask_ids, cfg.loss)
    model = trainer.model
    model.train()
    device = model.device
    sums = MetricSums()
    loss_total = 0.0
    norms = []
    rows = batch.input_ids.shape[0]
    for r0, r1 in chunk_bounds(rows, math.ceil(rows / cfg.trainer.mini_batches)):
        mb_weight = x.weight[offsets[r0] : offsets[r1]].sum().item()
        if mb_weight == 0:
            continue  # every token of this mini-batch is masked
        for m0, m1 in chunk_bounds(r1 - r0, cfg.trainer.micro_batch_size):
            micro = batch.select(torch.arange(r0 + m0, r0 + m1))
            xm = x.slice(offsets[r0 + m0], offsets[r0 + m1]).to(device)
            hidden, _ = response_hidden(model, micro)
            loss_sum, msums = student_loss_and_metrics(
                hidden, lm_head_weight(model), xm, objective, cfg.loss.chunk_tokens, cfg.loss.gap_bucket_tokens
            )
            (loss_sum / mb_weight).backward()
            loss_total += loss_sum.item()
            sums.merge(msums)
        norms.append(trainer.optimizer_step())
    trainer.scheduler.step()
    t3 = time.perf_counter()
    n_weight = max(x.weight.sum().item(), 1.0)
    lengths = batch.response_mask.sum(1).float()
    metrics = {"loss": loss_total / n_weight, **sums.means()}
    metrics.update(
        repetition=repetition([row[m].tolist() for row, m in zip(batch.input_ids, batch.response_mask, strict=True)]),
        grad_norm=sum(norms) / max(1, len(norms)),
        response_clip_ratio=batch.truncated.float().mean().item(),
        response_length=lengths.mean().item(),
        response_length_max=lengths.max().item(),
        lr=trainer.scheduler.get_last_lr()[0],
        tokens_per_s=lengths.sum().item() / (t3 - t0),
        step_time_s=t3 - t0,
        peak_mem_gb=peak_memory_gb(device),
        **{"time/rollout_s": t1 - t0, "time/teacher_s": t2 - t1, "time/train_s": t3 - t2},
    )
    return metrics


def peak_memory_gb(device: torch.device) -> float:
    """Peak GPU memory allocated by torch on CUDA; the process's peak resident set on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("trainer.device: 'cuda' was asked for but no GPU is visible")
    return torch.device(name)


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def train(cfg, run_dir: Path) -> dict:
    """Run OPD as configured; returns (and writes) the run summary."""
    validate(cfg)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    device = pick_device(cfg.trainer.device)
    torch.manual_seed(cfg.trainer.seed)
    random.seed(cfg.trainer.seed)

    train_problems, eval_problems = load_problems(cfg.task)
    eval_problems = eval_problems[: cfg.eval.n_problems]

    ckpt = latest_checkpoint(run_dir) if cfg.trainer.resume else None
    if cfg.trainer.resume and ckpt is None:
        log.warning("trainer.resume=true but %s has no checkpoint: starting from scratch", run_dir)
    s_path = str(ckpt / "model") if ckpt else resolve_path(cfg.model.name_or_path, cfg)
    t_path = resolve_path(cfg.teacher.name_or_path, cfg)
    s_tok = load_tokenizer(s_path, "model.name_or_path", cfg.model.trust_remote_code)
    t_tok = load_tokenizer(t_path, "teacher.name_or_path", cfg.teacher.trust_remote_code)
    student = load_model(s_path, "model.name_or_path", cfg.model.dtype, device, cfg.model.trust_remote_code)
    t_model = load_model(t_path, "teacher.name_or_path", cfg.teacher.dtype, device, cfg.teacher.trust_remote_code)
    check_same_vocabulary(s_tok, t_tok, student, t_model)

    teacher = HFTeacher(t_model, cfg.teacher.micro_batch_size, cfg.loss.chunk_tokens)
    objective = make_objective(cfg.loss, teacher.head)
    check_teacher_supplies(objective, teacher.supplies, cfg.teacher.backend)
    mask_ids = mask_token_ids(s_tok, list(cfg.loss.mask_tokens))
    train_prompts = [format_prompt(p, cfg.task, s_tok) for p in train_problems]
    too_long = sum(
        len(s_tok(p, add_special_tokens=False)["input_ids"]) > cfg.rollout.max_prompt_tokens for p in train_prompts
    )
    if too_long:
        log.warning("%d prompts longer than rollout.max_prompt_tokens are left out", too_long)
        train_prompts = [
            p
            for p in train_prompts
            if len(s_tok(p, add_special_tokens=False)["input_ids"]) <= cfg.rollout.max_prompt_tokens
        ]
    if not train_prompts:
        raise UserError("rollout.max_prompt_tokens: every training prompt is longer than this")
    eval_prompts = [format_prompt(p, cfg.task, s_tok) for p in eval_problems]
    checker = CHECKERS[cfg.task.checker]

    trainer = TorchTrainer(student, cfg.trainer)
    state: dict = {}
    if ckpt is not None:
        state = load_trainer_state(ckpt)
        trainer.load_state_dict(state)
        log.info("resuming from %s (step %d)", ckpt, state["step"])
    start = state.get("step", 0)
    config_dict = OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else {}
    logger = MetricsLogger(run_dir, cfg.logger, config_dict, resume_step=start if ckpt else None)
    eval_seed = cfg.trainer.seed * 104_729
    try:
        if "acc_teacher" not in state:
            log.info("evaluating the teacher and the student before training")
            state["acc_teacher"] = evaluate(t_model, t_tok, eval_problems, eval_prompts, checker, cfg.eval, eval_seed)
            state["acc_before"] = evaluate(student, s_tok, eval_problems, eval_prompts, checker, cfg.eval, eval_seed)
            logger.log(0, {"eval/acc": state["acc_before"], "eval/acc_teacher": state["acc_teacher"]})
        log.info("accuracy: teacher %.3f, student %.3f", state["acc_teacher"], state["acc_before"])
        rollout = HFRollout(student, s_tok, cfg.rollout.max_prompt_tokens)
        acc = state.get("acc_last", state["acc_before"])
        bar = tqdm(
            range(start + 1, cfg.trainer.max_steps + 1),
            desc="OPD",
            initial=start,
            total=cfg.trainer.max_steps,
            dynamic_ncols=True,
        )
        for step in bar:
            prompts = step_prompts(train_prompts, cfg.trainer.prompts_per_step, step, cfg.trainer.seed)
            metrics = opd_step(step, prompts, rollout, teacher, objective, trainer, mask_ids, cfg)
            last = step == cfg.trainer.max_steps
            if last or (cfg.eval.every and step % cfg.eval.every == 0):
                acc = evaluate(student, s_tok, eval_problems, eval_prompts, checker, cfg.eval, eval_seed)
                metrics["eval/acc"] = state["acc_last"] = acc
            logger.log(step, metrics)
            bar.set_postfix(loss=f"{metrics['loss']:.3f}", gap=f"{metrics['logprob_gap']:.2f}", acc=f"{acc:.2f}")
            if last or (cfg.trainer.save_every and step % cfg.trainer.save_every == 0):
                save_checkpoint(run_dir, step, student, s_tok, {**state, **trainer.state_dict()})
        gap = state["acc_teacher"] - state["acc_before"]
        summary = {
            "acc_before": state["acc_before"],
            "acc_after": state.get("acc_last", state["acc_before"]),
            "acc_teacher": state["acc_teacher"],
            "gap_recovery": (state.get("acc_last", state["acc_before"]) - state["acc_before"]) / gap
            if gap > 0
            else None,
            "step": cfg.trainer.max_steps,
        }
        _write_json(run_dir / "summary.json", summary)
        logger.summary(summary)
        log.info("summary: %s", summary)
    finally:
        logger.close()
    return summary
