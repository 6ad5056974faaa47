"""Accuracy estimators over several samples per problem."""

from __future__ import annotations

from math import comb


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from ``n`` samples of which ``c`` are correct: ``1 - C(n-c, k) / C(n, k)``.

    The chance that at least one of ``k`` samples drawn without replacement from the
    ``n`` is correct (Chen et al., 2021). Needs ``k <= n``.
    """
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - comb(n - c, k) / comb(n, k)


def avg_at_k(correct: list[list[bool]]) -> float:
    """avg@k: the mean correctness over all samples of all problems (k samples each)."""
    flat = [x for row in correct for x in row]
    return sum(flat) / len(flat) if flat else 0.0


def mean_pass_at_k(correct: list[list[bool]], k: int) -> float:
    """pass@k averaged over problems, each from its own samples."""
    return sum(pass_at_k(len(row), sum(row), k) for row in correct) / len(correct) if correct else 0.0


def gap_recovery(acc: float, teacher: float, baseline: float) -> float | None:
    """The share of the teacher's lead over the baseline the student recovered: ``(acc - baseline) /
    (teacher - baseline)``; None where the teacher is not better than the baseline (no gap to recover)."""
    return (acc - baseline) / (teacher - baseline) if teacher > baseline else None
