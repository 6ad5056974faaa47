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
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import OmegaConf
from tqdm import tqdm

from opd_cli.checkpoint import latest_checkpoint
from opd_cli.config import COMPUTE_DTYPE, PARAM_DTYPE, student_precision, teacher_k, validate
from opd_cli.distributed import (
    Rank,
    StopRequest,
    all_keys,
    all_reduce,
    barrier,
    init_process_group,
    shard,
    this_rank,
)
from opd_cli.engines import make_trainer
from opd_cli.errors import Stopped, UserError
from opd_cli.logger import MetricsLogger, NullLogger
from opd_cli.masks import entropy_top_keep, mask_token_ids, special_token_keep
from opd_cli.models import check_same_vocabulary, load_model, load_tokenizer, resolve_path
from opd_cli.objectives import (
    MetricSums,
    TokenInputs,
    aggregation_weights,
    chunk_bounds,
    clip_log_ratio,
    discounted_returns,
    group_advantage,
    make_objective,
    repetition_counts,
)
from opd_cli.rollout import HFRollout, RolloutBatch
from opd_cli.scores import avg_at_k
from opd_cli.tasks import Problem, format_prompt, load_problems, make_checker, task_config
from opd_cli.teacher import HFTeacher, TeacherSupport, check_teacher_supplies, lm_head_weight

log = logging.getLogger(__name__)


def token_inputs(
    batch: RolloutBatch, support: TeacherSupport, mask_ids: list[int], loss_cfg, outcome: torch.Tensor | None = None
) -> tuple[TokenInputs, torch.Tensor]:
    """Flat per-token inputs of a batch, and row offsets into them ([B + 1]).

    ``outcome [B]`` is each response's weighted outcome advantage (``loss.outcome_weight``): a
    sampled-token objective gets it added to every token's advantage (paper B), a divergence
    reads it from ``outcome_advantage``.
    """
    rm = batch.response_mask
    keep = special_token_keep(batch.input_ids, rm, mask_ids, loss_cfg.mask_mode)
    if loss_cfg.entropy_top_ratio is not None:  # paper A: only each response's highest-entropy tokens
        keep &= entropy_top_keep(batch.entropy, rm, loss_cfg.entropy_top_ratio)
    if loss_cfg.max_response_tokens is not None:  # paper C leaves over-long responses out of the loss
        keep &= (rm.sum(1) <= loss_cfg.max_response_tokens)[:, None]
    keep = keep[rm].float()
    rewards = torch.zeros(rm.shape, dtype=support.sampled_logprob.dtype)
    log_ratio = clip_log_ratio(support.sampled_logprob - batch.old_logprobs[rm], loss_cfg.log_ratio_clip)
    rewards[rm] = log_ratio * keep
    advantage = discounted_returns(rewards, loss_cfg.gamma)[rm]
    per_token = None if outcome is None else outcome.to(advantage.dtype)[:, None].expand(rm.shape)[rm]
    if per_token is not None and loss_cfg.objective != "support_divergence":
        advantage = advantage + per_token
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
        outcome_advantage=per_token,
    )
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), rm.sum(1).cumsum(0)])
    x.seq_tokens = torch.repeat_interleave(torch.segment_reduce(keep, "sum", lengths=rm.sum(1)), rm.sum(1))
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
def sample_correctness(
    engine, problems: list[Problem], prompts: list[str], checker, ecfg, seed: int
) -> list[list[bool]]:
    """Correctness of ``eval.k`` samples per problem from a sampling engine: ``[problem][sample]``."""
    out: list[list[bool]] = []
    per_call = max(1, ecfg.batch_size // ecfg.k)
    for s, e in chunk_bounds(len(problems), per_call):
        batch = engine.generate(prompts[s:e], ecfg.k, ecfg.temperature, ecfg.top_p, ecfg.max_new_tokens, seed + s)
        texts = engine.decode_responses(batch)
        for i in range(e - s):
            out.append([checker(t, problems[s + i].answer) for t in texts[i * ecfg.k : (i + 1) * ecfg.k]])
    return out


def evaluate(engine, problems: list[Problem], prompts: list[str], checker, ecfg, seed: int) -> float:
    """avg@k accuracy of a sampling engine: mean correctness over ``eval.k`` samples per problem.

    Every rank evaluates the same problems with the same seeds (so ZeRO-3 ranks run
    the same forward passes); rank 0 reports.
    """
    return avg_at_k(sample_correctness(engine, problems, prompts, checker, ecfg, seed))


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


def pick_device(name: str, rank: Rank) -> torch.device:
    """The device of this rank: its local GPU, or the CPU."""
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("trainer.device: 'cuda' was asked for but no GPU is visible")
    if name == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    torch.cuda.set_device(rank.local_rank)
    return torch.device("cuda", rank.local_rank)


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def prompt_length(tokenizer, prompt: str) -> int:
    return len(tokenizer(prompt, add_special_tokens=False)["input_ids"])


def training_prompts(problems: list[Problem], cfg, tokenizer) -> tuple[list[str], int]:
    """The formatted training prompts, leaving out those longer than ``rollout.max_prompt_tokens``,
    and the longest length kept."""
    prompts = [format_prompt(p, cfg.task, tokenizer) for p in problems]
    lengths = [prompt_length(tokenizer, p) for p in prompts]
    fits = [p for p, n in zip(prompts, lengths, strict=True) if n <= cfg.rollout.max_prompt_tokens]
    if len(fits) < len(prompts):
        log.warning("%d prompts longer than rollout.max_prompt_tokens are left out", len(prompts) - len(fits))
    if not fits:
        raise UserError("rollout.max_prompt_tokens: every training prompt is longer than this")
    return fits, max(n for n in lengths if n <= cfg.rollout.max_prompt_tokens)


def make_teacher(cfg, path: str, tokenizer, device: torch.device, max_len: int):
    """The teacher backend, a sampler for its evaluation, and its vocabulary size."""
    if cfg.teacher.url:
        from transformers import AutoConfig

        from opd_cli.vllm_engine import VLLMServerTeacher

        server = VLLMServerTeacher(cfg.teacher.url, tokenizer)
        rows = AutoConfig.from_pretrained(path, trust_remote_code=cfg.teacher.trust_remote_code).vocab_size
        return server, server, rows
    if cfg.teacher.backend == "vllm":
        from opd_cli.vllm_engine import EngineMemory, VLLMRollout, VLLMTeacher, make_llm, sleep_level

        memory, ranks = cfg.teacher.gpu_memory_utilization, cfg.trainer.engine == "deepspeed"
        level = sleep_level(cfg.teacher.sleep, 1, "teacher.sleep")
        # scoring reads prompt + response and asks for one more token
        llm = make_llm(
            path,
            cfg.teacher.dtype,
            max_len + 1,
            max(20, teacher_k(cfg.loss)),
            memory,
            cfg.trainer.seed,
            ranks,
            level > 0,
        )
        rows = llm.llm_engine.model_config.get_vocab_size()
        engine_memory = EngineMemory(llm, level)
        return VLLMTeacher(llm, engine_memory), VLLMRollout(llm, tokenizer, engine_memory), rows
    model = load_model(
        path, "teacher.name_or_path", cfg.teacher.dtype, device, cfg.teacher.trust_remote_code, cfg.trainer.cpu_linear
    )
    rows = lm_head_weight(model).shape[0]  # before a ZeRO-3 teacher partitions it
    teacher = HFTeacher(
        model, cfg.teacher.micro_batch_size, cfg.loss.chunk_tokens, cfg.teacher.shard, cfg.teacher.temperature
    )
    sampler = HFRollout(model, tokenizer, synced=teacher.synced_generation)
    return teacher, sampler, rows


def make_rollout(cfg, trainer, tokenizer, path: str, max_len: int):
    """The student's sampling engine: the live HF model (our decoding loop), or a vLLM engine fed its weights."""
    if cfg.rollout.engine == "vllm":
        from opd_cli.vllm_engine import EngineMemory, VLLMRollout, make_llm, sleep_level

        memory, ranks = cfg.rollout.gpu_memory_utilization, cfg.trainer.engine == "deepspeed"
        level = sleep_level(cfg.rollout.sleep, 2, "rollout.sleep")
        dtype = COMPUTE_DTYPE[student_precision(cfg)]
        llm = make_llm(path, dtype, max_len, 20, memory, cfg.trainer.seed, ranks, level > 0)
        return VLLMRollout(llm, tokenizer, EngineMemory(llm, level))
    entropy = cfg.loss.entropy_top_ratio is not None
    return HFRollout(trainer.model, tokenizer, synced=trainer.synced_generation, entropy=entropy)


def resolve_models(cfg, ckpt: Path | None, rank: Rank) -> tuple[str, str]:
    """Student and teacher paths; rank 0 builds the demo models (first use) while the others wait."""
    for turn in (True, False):
        if rank.main == turn:
            s_path = str(ckpt / "model") if ckpt else resolve_path(cfg.model.name_or_path, cfg)
            t_path = resolve_path(cfg.teacher.name_or_path, cfg)
        barrier()
    return s_path, t_path


@dataclass
class Parts:
    """Everything a training step needs, built from the config (see ``build``)."""

    tokenizer: object
    train_prompts: list[str]
    answers: dict  # training prompt -> its gold answer (loss.outcome_weight)
    eval_prompts: list[str]
    teacher: object
    teacher_sampler: object
    objective: object
    mask_ids: list[int]
    checker: object
    trainer: object
    rollout: object
    benchmarks: dict  # name -> (problems, prompts, checker), scored during training (eval.benchmarks)


def load_benchmarks(cfg, tokenizer) -> dict:
    """The ``eval.benchmarks`` tasks: problems, prompts, checker.

    Prompts take the training task's template and chat template settings, so the policy is
    scored under the prompt it is trained on (as the papers evaluate during training).
    """
    out = {}
    for name in cfg.eval.benchmarks:
        path = cfg.eval.benchmark_paths.get(name)
        tcfg = task_config(name, path, "eval.benchmarks", f"eval.benchmark_paths.{name}")
        for key in ("template", "chat_template", "chat_template_kwargs"):
            tcfg[key] = cfg.task[key]
        problems = load_problems(tcfg)[1][: cfg.eval.n_problems]
        out[name] = (problems, [format_prompt(p, tcfg, tokenizer) for p in problems], make_checker(tcfg))
    return out


def build(cfg, rank: Rank, device: torch.device, ckpt: Path | None, train_problems, eval_problems) -> Parts:
    """Load the models and make the engines, teacher and objective of a run (``opd-train`` and ``make bench``)."""
    s_path, t_path = resolve_models(cfg, ckpt, rank)
    s_tok = load_tokenizer(s_path, "model.name_or_path", cfg.model.trust_remote_code)
    t_tok = load_tokenizer(t_path, "teacher.name_or_path", cfg.teacher.trust_remote_code)
    precision = student_precision(cfg)
    # bf16-mixed loads float32 weights: the engine keeps them as master weights and computes in bfloat16
    cpu_linear = cfg.trainer.cpu_linear if COMPUTE_DTYPE[precision] == "float32" else "blas"
    student = load_model(
        s_path, "model.name_or_path", PARAM_DTYPE[precision], device, cfg.model.trust_remote_code, cpu_linear
    )
    train_prompts, longest = training_prompts(train_problems, cfg, s_tok)
    answers = {}
    if cfg.loss.outcome_weight:
        answers = {format_prompt(q, cfg.task, s_tok): q.answer for q in train_problems}
    eval_prompts = [format_prompt(p, cfg.task, s_tok) for p in eval_problems]
    benchmarks = load_benchmarks(cfg, s_tok)
    every_eval_prompt = eval_prompts + [q for _, prompts, _ in benchmarks.values() for q in prompts]
    longest = max([longest] + [prompt_length(s_tok, p) for p in every_eval_prompt])
    max_len = longest + max(cfg.rollout.max_new_tokens, cfg.eval.max_new_tokens)
    teacher, teacher_sampler, t_rows = make_teacher(cfg, t_path, t_tok, device, max_len)
    check_same_vocabulary(s_tok, t_tok, lm_head_weight(student).shape[0], t_rows)
    objective = make_objective(cfg.loss, teacher.head)
    check_teacher_supplies(objective, teacher.supplies, cfg.teacher.backend)
    mask_ids = mask_token_ids(s_tok, list(cfg.loss.mask_tokens))
    trainer = make_trainer(student, cfg.trainer, rank, precision)
    rollout = make_rollout(cfg, trainer, s_tok, s_path, max_len)
    return Parts(
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
    )


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
