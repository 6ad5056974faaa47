"""Which prompts a step trains on, and the seeds of each phase.

Everything here is derived from the config and the step number alone, so a resumed run
sees exactly the prompts and seeds it would have seen.
"""

from __future__ import annotations

import logging
import random

from opd_cli.errors import UserError
from opd_cli.tasks.problems import Problem
from opd_cli.tasks.prompts import format_prompt

log = logging.getLogger(__name__)

# Primes that spread the seeds of different phases, steps, ranks and epochs apart, so that no two
# (phase, step, rank) pairs share a random stream. Changing one changes every run's samples.
STEP_STRIDE = 7919  # trainer.seed -> the rollout seeds of its steps
RANK_STRIDE = 1_000_003  # a rank's rollout seed apart from the next rank's
EPOCH_STRIDE = 100_003  # trainer.seed -> the shuffle of each pass over the prompts
EVAL_STRIDE = 104_729  # trainer.seed -> the seed of every evaluation


def rollout_seed(seed: int, step: int, rank: int) -> int:
    """The seed of a training step's rollout on one rank (``trainer.seed``, 1-based step)."""
    return seed * STEP_STRIDE + step + RANK_STRIDE * rank


def eval_seed(seed: int) -> int:
    """The seed of every evaluation of a run: each evaluation samples the same way."""
    return seed * EVAL_STRIDE


def step_indices(n: int, per_step: int, step: int, seed: int) -> list[int]:
    """The indices into ``n`` items of training step ``step`` (1-based): positions ``[(step - 1) * per_step,
    step * per_step)`` of one seeded permutation of ``range(n)`` per epoch, epoch after epoch.

    Deriving the data position from the step makes resume exact without saving a cursor.
    """
    out: list[int] = []
    orders: dict[int, list[int]] = {}  # each epoch's permutation, made once per call
    for pos in range((step - 1) * per_step, step * per_step):
        epoch, i = divmod(pos, n)
        if epoch not in orders:
            orders[epoch] = list(range(n))
            random.Random(seed * EPOCH_STRIDE + epoch).shuffle(orders[epoch])
        out.append(orders[epoch][i])
    return out


def step_prompts(prompts: list[str], per_step: int, step: int, seed: int) -> list[str]:
    """The prompts of training step ``step`` (1-based): seeded epochs, derived from the step alone."""
    return [prompts[i] for i in step_indices(len(prompts), per_step, step, seed)]


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
