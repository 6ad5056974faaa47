"""The arithmetic of paper B's reward analyses (``opd-study auroc`` and ``opd-study reward-depth``): pure numpy.

- ``sequence_rewards``: the sequence-mean teacher reward ``mean_t (log q(y_t) - log p(y_t))`` of each response.
- ``auroc`` and ``roc_curve``: how well a score separates correct from wrong responses (ties count 1/2).
- ``bootstrap_interval``: a seeded percentile interval, resampling clusters (a problem's responses) with
  replacement: responses to one problem are not independent.
- ``depth_prefixes`` and ``depth_rows``: which prefix of which rollout is continued at each depth, and
  the per-depth accuracies of the teacher's and the student's continuations.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

# the confidence level of every interval the studies report
LEVEL = 0.95


def sequence_rewards(teacher_logprobs: np.ndarray, student_logprobs: np.ndarray, lengths: Sequence[int]) -> np.ndarray:
    """Per response, the mean over its tokens of ``log q - log p``; the log-probs are flat over the responses'
    tokens in order (``lengths[i]`` tokens for response ``i``, each >= 1)."""
    gap = np.asarray(teacher_logprobs, dtype=float) - np.asarray(student_logprobs, dtype=float)
    ends = np.cumsum(lengths)
    if len(gap) != (ends[-1] if len(ends) else 0):
        raise ValueError(f"{len(gap)} log-probs for responses of {int(sum(lengths))} tokens")
    return np.array([seg.mean() for seg in np.split(gap, ends[:-1])]) if len(ends) else np.zeros(0)


def midranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n of ``x``, tied values sharing the mean of their ranks."""
    x = np.asarray(x, dtype=float)
    order = np.argsort(x, kind="stable")
    xs = x[order]
    starts = np.flatnonzero(np.r_[True, xs[1:] != xs[:-1]])  # first index of each group of equal values
    ends = np.r_[starts[1:], len(xs)]
    group_rank = (starts + 1 + ends) / 2  # mean of ranks starts+1 .. ends
    ranks = np.empty(len(x))
    ranks[order] = np.repeat(group_rank, ends - starts)
    return ranks


def auroc(scores: Sequence[float], labels: Sequence[bool]) -> float:
    """The area under the ROC curve: the probability that a random positive scores above a random negative,
    a tie counting 1/2 (the Mann-Whitney U over ``n_pos * n_neg``). NaN where either class is empty."""
    scores, labels = np.asarray(scores, dtype=float), np.asarray(labels, dtype=bool)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return math.nan
    u = midranks(scores)[labels].sum() - n_pos * (n_pos + 1) / 2
    return float(u / (n_pos * n_neg))


def roc_curve(scores: Sequence[float], labels: Sequence[bool]) -> tuple[np.ndarray, np.ndarray]:
    """False and true positive rates as the threshold falls past each distinct score, from (0, 0) to (1, 1);
    the trapezoids under it add up to ``auroc`` (a tie is a diagonal step)."""
    scores, labels = np.asarray(scores, dtype=float), np.asarray(labels, dtype=bool)
    order = np.argsort(-scores, kind="stable")
    s, y = scores[order], labels[order]
    last = np.r_[s[1:] != s[:-1], True]  # the last of each group of equal scores
    tp, fp = np.cumsum(y)[last], np.cumsum(~y)[last]
    return np.r_[0.0, fp / max(1, fp[-1])], np.r_[0.0, tp / max(1, tp[-1])]


def bootstrap_interval(
    statistic: Callable[[np.ndarray], float], clusters: Sequence[int], resamples: int, seed: int, level: float = LEVEL
) -> tuple[float, float, int]:
    """The percentile interval (``level``) of ``statistic`` over ``resamples`` cluster-bootstrap resamples.

    ``clusters[i]`` is the cluster of item ``i`` (e.g. its problem); each resample draws as many clusters
    as there are, with replacement, and ``statistic`` gets the indices of their items. Resamples where the
    statistic is undefined (NaN: e.g. an AUROC with one class) are left out. Returns (low, high, the number
    of resamples used); (NaN, NaN, 0) where none was defined. The same ``seed`` gives the same resamples.
    """
    _, inverse = np.unique(np.asarray(clusters), return_inverse=True)
    members = [np.flatnonzero(inverse == c) for c in range(int(inverse.max(initial=-1)) + 1)]
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(resamples):
        picked = rng.integers(0, len(members), len(members))
        value = statistic(np.concatenate([members[c] for c in picked]))
        if np.isfinite(value):
            values.append(value)
    if not values:
        return math.nan, math.nan, 0
    low, high = np.quantile(values, [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high), len(values)


@dataclass(frozen=True)
class Prefix:
    """The first ``depth`` response tokens of rollout number ``rollout``."""

    rollout: int
    depth: int


def depth_prefixes(lengths: Sequence[int], depths: Sequence[int]) -> list[Prefix]:
    """Every (rollout, depth) whose response (``lengths``, tokens up to and including EOS) is longer than the
    depth, by depth then rollout: a prefix never holds the EOS, and every prefix leaves something to continue."""
    return [Prefix(r, d) for d in depths for r, n in enumerate(lengths) if n > d]


def standard_error(values: Sequence[float]) -> float | None:
    """The standard error of the mean (sample standard deviation, ddof 1); None for fewer than two values."""
    values = np.asarray(values, dtype=float)
    return float(values.std(ddof=1) / math.sqrt(len(values))) if len(values) > 1 else None


def depth_rows(
    prefixes: Sequence[Prefix],
    teacher: Sequence[Sequence[bool]],
    student: Sequence[Sequence[bool]],
    clusters: Sequence[int],
    depths: Sequence[int],
    resamples: int,
    seed: int,
) -> list[dict]:
    """One row per depth: the number of prefixes, the mean accuracy of the teacher's and of the student's
    continuations (``teacher[i]``, ``student[i]``: the verdicts of prefix ``i``'s continuations), the advantage
    (teacher minus student), its standard error over prefixes (each prefix's own advantage), and its
    bootstrap interval resampling the prefixes' ``clusters`` (the rollout's problem). A depth without
    prefixes has ``n_prefixes`` 0 and None elsewhere."""
    rows = []
    for d in depths:
        at = [i for i, p in enumerate(prefixes) if p.depth == d]
        t = np.array([np.mean(teacher[i]) for i in at])
        s = np.array([np.mean(student[i]) for i in at])
        row: dict = {"depth": d, "n_prefixes": len(at)}
        if not at:
            rows.append(row | dict.fromkeys(("teacher_acc", "student_acc", "advantage", "se", "ci_low", "ci_high")))
            continue
        gain = t - s
        low, high, _ = bootstrap_interval(
            lambda idx, gain=gain: float(gain[idx].mean()), [clusters[i] for i in at], resamples, seed + d
        )
        row |= {"teacher_acc": float(t.mean()), "student_acc": float(s.mean()), "advantage": float(gain.mean())}
        row |= {"se": standard_error(gain), "ci_low": low, "ci_high": high}
        rows.append(row)
    return rows
