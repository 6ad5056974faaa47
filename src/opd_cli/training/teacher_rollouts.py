"""The teacher's responses to the training prompts as an SFT data set (``opd-data teacher-rollouts``).

Each sampled response is kept or dropped by three filters, each a pure function of the response:
``truncated`` (no EOS within ``data.max_new_tokens``), ``repetitive`` (``repeat_fraction`` of its
token n-grams above ``data.max_repeat_fraction``) and, with ``data.drop_incorrect``, ``incorrect``
(the task's checker says the answer is wrong). A response dropped for several reasons counts under
the first of ``DROP_REASONS``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from opd_cli.batch import RolloutBatch

# the order in which a dropped response's reason is named
DROP_REASONS = ("truncated", "repetitive", "incorrect")


def truncated(tokens: Sequence[int], eos_id: int, max_new_tokens: int) -> bool:
    """Whether the sampled ``tokens`` have no EOS within their first ``max_new_tokens``: the response was cut off."""
    return eos_id not in tokens[:max_new_tokens]


def repeat_fraction(tokens: Sequence[int], n: int) -> float:
    """The fraction of the response's token n-grams that repeat an earlier one.

    ``tokens`` (EOS not included) has ``m = len(tokens) - n + 1`` n-grams (contiguous windows of
    ``n`` tokens); with ``d`` of them distinct, the fraction is ``(m - d) / m``: 0 when no n-gram
    occurs twice, near 1 when one n-gram fills the response. A response shorter than ``n`` tokens
    has none and gives 0. E.g. ``[1, 2, 1, 2, 1]`` with ``n = 2``: n-grams 12 21 12 21, 2 distinct of 4: 0.5.
    """
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    return (len(grams) - len(set(grams))) / len(grams) if grams else 0.0


def repetitive(tokens: Sequence[int], n: int, max_fraction: float) -> bool:
    """Whether ``repeat_fraction(tokens, n)`` is above ``max_fraction`` (1: never, the fraction is below 1)."""
    return repeat_fraction(tokens, n) > max_fraction


def incorrect(correct: bool | None, drop_incorrect: bool) -> bool:
    """Whether a response is dropped as wrong: only when asked, and only when its answer was checked."""
    return drop_incorrect and correct is False


def drop_reason(is_truncated: bool, is_repetitive: bool, is_incorrect: bool) -> str | None:
    """The first reason in ``DROP_REASONS`` that holds, or None (the response is kept)."""
    flags = dict(zip(DROP_REASONS, (is_truncated, is_repetitive, is_incorrect), strict=True))
    return next((reason for reason, bad in flags.items() if bad), None)


@dataclass(frozen=True)
class Sample:
    """One sampled response: its prompt's index, its index among the prompt's samples, and the
    sampled tokens as generated (up to and including the EOS, if any)."""

    problem: int
    sample: int
    tokens: list[int]


def batch_samples(batch: RolloutBatch, problems: Sequence[int], n: int) -> list[Sample]:
    """The samples of a rollout batch of ``n`` responses per prompt; ``problems`` are the prompts' indices."""
    out = []
    for r in range(batch.input_ids.shape[0]):
        row, mask = batch.input_ids[r, batch.prompt_len :], batch.response_mask[r, batch.prompt_len :]
        out.append(Sample(problems[r // n], r % n, row[mask].tolist()))
    return out


def without_eos(tokens: list[int], eos_id: int) -> list[int]:
    """The response's tokens before its EOS (all of them when it has none)."""
    return tokens[: tokens.index(eos_id)] if eos_id in tokens else tokens


def summary(rows: list[dict], reasons: list[str | None]) -> dict:
    """The counts of ``stats.json``: kept, dropped per reason, the kept responses' length, and the
    accuracy of every sample whose answer was checked (``rows`` holds every sample, ``reasons`` each one's
    drop reason or None)."""
    kept = [r["response_tokens"] for r, why in zip(rows, reasons, strict=True) if why is None]
    checked = [r["correct"] for r in rows if r["correct"] is not None]
    return {
        "sampled": len(rows),
        "kept": len(kept),
        "dropped": {reason: reasons.count(reason) for reason in DROP_REASONS},
        "response_tokens": {"mean": sum(kept) / len(kept) if kept else None, "max": max(kept, default=None)},
        "accuracy": sum(checked) / len(checked) if checked else None,
    }
