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
    return window_indices(n, (step - 1) * per_step, per_step, seed)


def window_indices(n: int, start: int, count: int, seed: int) -> list[int]:
    """Positions ``[start, start + count)`` of the endless sequence of seeded permutations of ``range(n)``
    (one per epoch)."""
    out: list[int] = []
    orders: dict[int, list[int]] = {}  # each epoch's permutation, made once per call
    for pos in range(start, start + count):
        epoch, i = divmod(pos, n)
        if epoch not in orders:
            orders[epoch] = list(range(n))
            random.Random(seed * EPOCH_STRIDE + epoch).shuffle(orders[epoch])
        out.append(orders[epoch][i])
    return out


def step_prompts(prompts: list[str], per_step: int, step: int, seed: int) -> list[str]:
    """The prompts of training step ``step`` (1-based): seeded epochs, derived from the step alone."""
    return [prompts[i] for i in step_indices(len(prompts), per_step, step, seed)]


# trainer.seed -> the draw of each step's sources under task.mix, and a source's shuffle apart from the next's
MIX_STRIDE = 1_000_033
SOURCE_STRIDE = 15_485_863


def mix_draw(weights: list[float], per_step: int, step: int, seed: int) -> list[int]:
    """The source of each of step ``step``'s ``per_step`` prompts, drawn with probabilities ``weights``
    (summing to 1) by a generator seeded from (``seed``, ``step``) alone."""
    return random.Random(seed * MIX_STRIDE + step).choices(range(len(weights)), weights=weights, k=per_step)


def mix_counts(weights: list[float], per_step: int, step: int, seed: int) -> list[int]:
    """How many of step ``step``'s prompts each source gives (``mix_draw``)."""
    draw = mix_draw(weights, per_step, step, seed)
    return [draw.count(i) for i in range(len(weights))]


class Mix:
    """Each step's prompts drawn from several sources (the task's own, then ``task.mix``'s) with given weights.

    Every source is read in its own seeded epochs (source 0 with ``seed`` itself, as ``step_prompts``),
    from the position its earlier steps reached: a pure function of (seed, step), so a resume needs no
    cursor. The positions of the steps already asked for are kept, so a run costs one pass of draws.
    """

    def __init__(
        self,
        sources: list[list[str]],
        weights: list[float],
        per_step: int,
        seed: int,
        names: list[str] = (),
        label: str = "mix",
    ) -> None:
        self.sources, self.weights, self.per_step, self.seed = sources, weights, per_step, seed
        self.label = label  # the metrics' prefix: data/<label>_<name>
        self.names = list(names) or [str(i) for i in range(len(sources))]  # of the metrics data/mix_<name>
        self._starts: dict[int, list[int]] = {1: [0] * len(sources)}  # step -> each source's first position

    def starts(self, step: int) -> list[int]:
        """Each source's position at the start of step ``step`` (1-based): the sum of its earlier counts."""
        last = max(s for s in self._starts if s <= step)
        pos = list(self._starts[last])
        for s in range(last, step):
            pos = [p + c for p, c in zip(pos, mix_counts(self.weights, self.per_step, s, self.seed), strict=True)]
        self._starts = {1: self._starts[1], last: self._starts[last], step: pos}
        return pos

    def step(self, step: int) -> tuple[list[str], list[int]]:
        """Step ``step``'s prompts, in the order their sources were drawn (so every rank's shard mixes them
        alike), and how many came from each source."""
        draw = mix_draw(self.weights, self.per_step, step, self.seed)
        counts = [draw.count(i) for i in range(len(self.sources))]
        taken = [
            iter([prompts[j] for j in window_indices(len(prompts), start, count, self.seed + SOURCE_STRIDE * i)])
            for i, (prompts, start, count) in enumerate(zip(self.sources, self.starts(step), counts, strict=True))
        ]
        return [next(taken[source]) for source in draw], counts

    def metrics(self, counts: list[int]) -> dict[str, float]:
        """The realised share of a step's prompts from each source: ``data/mix_<name>`` (``data/<label>_<name>``)."""
        return {f"data/{self.label}_{name}": c / self.per_step for name, c in zip(self.names, counts, strict=True)}


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
