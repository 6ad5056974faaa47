"""Which prompts each training step sees, and the seeds of its rollouts (training/data.py).

The run resumes exactly because a step's prompts and seeds come from the step number alone:
these tests check that, and that the order is a fresh seeded shuffle of every prompt each epoch.
"""

import random

import pytest

from opd_cli.training.data import eval_seed, rollout_seed, step_prompts

PROMPTS = [f"prompt {i}" for i in range(10)]


def run_order(per_step: int, steps: int, seed: int) -> list[str]:
    """The prompts of steps 1..steps in the order a run from scratch trains on them."""
    return [p for step in range(1, steps + 1) for p in step_prompts(PROMPTS, per_step, step, seed)]


@pytest.mark.parametrize("per_step", [1, 3, 5, 10, 25])  # 3 and 25: steps that straddle an epoch's end
def test_every_prompt_once_per_epoch(per_step):
    order = run_order(per_step, steps=3 * len(PROMPTS), seed=0)  # at least three epochs
    epochs = [order[e * len(PROMPTS) : (e + 1) * len(PROMPTS)] for e in range(3)]
    for epoch in epochs:
        assert sorted(epoch) == sorted(PROMPTS)
    assert all(len(step_prompts(PROMPTS, per_step, s, 0)) == per_step for s in (1, 7))


def test_orders_differ_between_epochs_and_seeds():
    n = len(PROMPTS)
    seed0, seed1 = run_order(n, steps=3, seed=0), run_order(n, steps=3, seed=1)
    epochs0 = [tuple(seed0[e * n : (e + 1) * n]) for e in range(3)]
    assert len(set(epochs0)) == 3  # each epoch its own shuffle
    assert tuple(PROMPTS) not in epochs0  # shuffled, not the file's order
    assert seed0 != seed1
    assert seed0 == run_order(n, steps=3, seed=0)  # and the same again for the same seed


@pytest.mark.parametrize("per_step", [3, 4])
def test_a_steps_prompts_depend_on_the_step_alone(per_step):
    """Resume: step s asked for first (a run restarted from a checkpoint at s - 1), with the global
    random state anywhere, gives the prompts that step got in the run that went through 1..s."""
    uninterrupted = run_order(per_step, steps=12, seed=5)
    for step in (12, 7, 1, 8):  # any order of calls, no call for the steps before
        random.seed(step)  # the global random state is not the data order's
        got = step_prompts(PROMPTS, per_step, step, 5)
        assert got == uninterrupted[(step - 1) * per_step : step * per_step], step
    random.seed(0)
    before = random.random()
    random.seed(0)
    step_prompts(PROMPTS, per_step, 3, 5)
    assert random.random() == before  # nor does it draw from (and so shift) the global stream


def test_rollout_seeds_are_distinct_across_steps_and_ranks():
    """No two (step, rank) pairs of a run share a rollout seed (1000 steps on 64 ranks, 20000 steps on
    8), and no rollout shares the evaluation's seed."""
    for seed in (0, 1, 42):
        for steps, ranks in ((1000, 64), (20000, 8)):
            seeds = {rollout_seed(seed, step, rank) for step in range(1, steps + 1) for rank in range(ranks)}
            assert len(seeds) == steps * ranks, (seed, steps, ranks)
            assert eval_seed(seed) not in seeds, seed
    assert rollout_seed(0, 5, 1) == rollout_seed(0, 5, 1)  # a function of (seed, step, rank) only
    assert rollout_seed(0, 5, 0) != rollout_seed(1, 5, 0)
