"""The reward analyses' arithmetic (analysis/reward_stats.py) against brute force and hand-made cases."""

import itertools
import math

import numpy as np
import pytest

from opd_cli.analysis.reward_stats import (
    Prefix,
    auroc,
    bootstrap_interval,
    depth_prefixes,
    depth_rows,
    midranks,
    roc_curve,
    sequence_rewards,
)


def pairwise_auroc(scores, labels) -> float:
    """Every (positive, negative) pair: 1 where the positive scores higher, 1/2 for a tie."""
    pos = [s for s, y in zip(scores, labels, strict=True) if y]
    neg = [s for s, y in zip(scores, labels, strict=True) if not y]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


@pytest.mark.parametrize(
    "scores, labels, want",
    [
        ([3, 2, 1, 0], [1, 1, 0, 0], 1.0),  # separated
        ([0, 1, 2, 3], [1, 1, 0, 0], 0.0),  # separated the wrong way
        ([1, 1, 1, 1], [1, 0, 1, 0], 0.5),  # all tied
        ([2, 1, 1, 0], [1, 1, 0, 0], 0.875),  # one tie across the classes: (1 + 1 + 0.5 + 1) / 4
        ([0.3, 0.1, 0.2], [True, False, True], 1.0),
        ([0.1, 0.3, 0.2], [True, False, True], 0.0),
        ([0.2, 0.2, 0.1, 0.3], [True, False, True, False], 0.125),  # one tie of four pairs: 0.5 / 4
    ],
)
def test_auroc_of_hand_made_cases(scores, labels, want):
    assert auroc(scores, labels) == pytest.approx(want)
    assert pairwise_auroc(scores, labels) == pytest.approx(want)


@pytest.mark.parametrize("seed", range(20))
def test_auroc_equals_the_pairwise_count_on_random_inputs(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 40))
    scores = rng.integers(0, 6, n).astype(float) if seed % 2 else rng.normal(size=n)  # ties on even seeds
    labels = rng.random(n) < 0.4
    labels[:2] = [True, False]
    assert auroc(scores, labels) == pytest.approx(pairwise_auroc(scores, labels), abs=1e-12)
    fpr, tpr = roc_curve(scores, labels)
    assert np.trapezoid(tpr, fpr) == pytest.approx(auroc(scores, labels), abs=1e-12)
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0, 0, 1, 1) and np.all(np.diff(fpr) >= 0)


def test_auroc_is_undefined_with_one_class():
    assert math.isnan(auroc([1, 2, 3], [True, True, True])) and math.isnan(auroc([1, 2], [False, False]))


def test_midranks_share_tied_ranks():
    assert midranks(np.array([10, 20, 10, 30, 20, 20])).tolist() == [1.5, 4, 1.5, 6, 4, 4]


def test_sequence_rewards_are_per_response_means_of_the_log_ratio():
    q = np.array([-1.0, -2.0, -3.0, -0.5, -0.5, -0.5])
    p = np.array([-1.0, -1.0, -1.0, -1.5, -0.5, -2.5])
    assert sequence_rewards(q, p, [1, 2, 3]).tolist() == pytest.approx([0.0, -1.5, 1.0])
    with pytest.raises(ValueError):
        sequence_rewards(q, p, [1, 2])


def separable_data(seed: int, n_problems: int = 30, per: int = 4, shift: float = 1.0):
    """Scores of ``n_problems * per`` responses: correct ones shifted up by ``shift`` (true AUROC
    Phi(shift / sqrt 2) = 0.76 for shift 1), and each response's problem."""
    rng = np.random.default_rng(seed)
    labels = rng.random(n_problems * per) < 0.5
    scores = rng.normal(size=labels.shape) + shift * labels
    return scores, labels, np.repeat(np.arange(n_problems), per)


def test_bootstrap_interval_holds_the_estimate_and_repeats_with_its_seed():
    scores, labels, problems = separable_data(0)

    def stat(idx):
        return auroc(scores[idx], labels[idx])

    low, high, used = bootstrap_interval(stat, problems, 300, seed=7)
    assert low < auroc(scores, labels) < high and used == 300
    assert bootstrap_interval(stat, problems, 300, seed=7) == (low, high, used)
    assert bootstrap_interval(stat, problems, 300, seed=8) != (low, high, used)
    # more data, a narrower interval
    big_scores, big_labels, big_problems = separable_data(0, n_problems=300)
    big = bootstrap_interval(lambda i: auroc(big_scores[i], big_labels[i]), big_problems, 300, seed=7)
    assert big[1] - big[0] < (high - low) / 2


def test_bootstrap_interval_covers_the_true_auroc_most_of_the_time():
    true = 0.5 * (1 + math.erf(1.0 / 2))  # Phi(1 / sqrt 2)
    covered = 0
    for seed in range(40):
        scores, labels, problems = separable_data(100 + seed)
        low, high, _ = bootstrap_interval(lambda i, s=scores, y=labels: auroc(s[i], y[i]), problems, 200, seed)
        covered += low <= true <= high
    assert covered >= 32  # nominal 95 %: 38 of 40; a broken interval misses far more often


def test_bootstrap_leaves_out_undefined_resamples():
    labels = np.array([True, False, False, False])  # one positive: some resamples miss it
    low, high, used = bootstrap_interval(lambda i: auroc(labels[i] * 1.0, labels[i]), [0, 1, 2, 3], 200, 0)
    assert 0 < used < 200 and low == high == 1.0
    assert bootstrap_interval(lambda i: math.nan, [0, 1], 10, 0)[2] == 0


def test_depth_prefixes_only_where_the_response_is_longer():
    # rollout 0: 5 tokens, rollout 1: 12, rollout 2: 3 (its EOS is token 3)
    got = depth_prefixes([5, 12, 3], [2, 4, 8, 12])
    assert got == [Prefix(0, 2), Prefix(1, 2), Prefix(2, 2), Prefix(0, 4), Prefix(1, 4), Prefix(1, 8)]


def test_depth_rows_aggregate_each_depth_on_its_own():
    prefixes = [Prefix(0, 2), Prefix(1, 2), Prefix(0, 4)]
    teacher = [[True, True], [True, False], [False, False]]
    student = [[False, False], [True, False], [False, True]]
    problems = [0, 1, 0]
    rows = depth_rows(prefixes, teacher, student, problems, [2, 4, 8], 50, 0)
    assert [r["depth"] for r in rows] == [2, 4, 8] and [r["n_prefixes"] for r in rows] == [2, 1, 0]
    assert rows[0]["teacher_acc"] == 0.75 and rows[0]["student_acc"] == 0.25 and rows[0]["advantage"] == 0.5
    # per-prefix advantages 1.0 and 0.0: sd 0.707, se 0.5
    assert rows[0]["se"] == pytest.approx(0.5) and 0.0 <= rows[0]["ci_low"] <= rows[0]["ci_high"] <= 1.0
    assert rows[1]["advantage"] == -0.5 and rows[1]["se"] is None and rows[1]["ci_low"] == rows[1]["ci_high"] == -0.5
    assert rows[2]["advantage"] is None and rows[2]["teacher_acc"] is None
