"""Rewards to advantages and the loss aggregation weights (objectives/advantages.py), against hand computations."""

import math
import statistics

import pytest
import torch

from opd_cli.objectives.advantages import AGG_MODES, aggregation_weights, discounted_returns, group_advantage


def test_modes_weigh_tokens_differently():
    """A long and a short sequence: each mode's coefficients, written out."""
    weight = torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0])  # sequence 0: 4 tokens (3 supervised), sequence 1: 1
    offsets = torch.tensor([0, 4, 5])
    got = {m: aggregation_weights(weight, offsets, m, 8) for m in AGG_MODES}
    assert got["token-mean"][1] == 4
    torch.testing.assert_close(got["seq-mean-token-mean"][0], torch.tensor([1 / 3, 1 / 3, 1 / 3, 0.0, 1.0]))
    assert got["seq-mean-token-mean"][1] == got["seq-mean-token-sum"][1] == 2
    torch.testing.assert_close(got["seq-mean-token-sum-norm"][0], weight / 8)


def test_discounted_returns_by_hand():
    r = torch.tensor([[1.0, 2.0, 3.0, 0.0], [4.0, 0.0, 0.0, 5.0]])
    torch.testing.assert_close(discounted_returns(r, 0.0), r)
    # gamma = 1: undiscounted reward-to-go, resetting per row (each row is one sequence)
    torch.testing.assert_close(discounted_returns(r, 1.0), torch.tensor([[6.0, 5.0, 3.0, 0.0], [9.0, 5.0, 5.0, 5.0]]))
    torch.testing.assert_close(
        discounted_returns(r, 0.5), torch.tensor([[1 + 1 + 0.75, 2 + 1.5, 3.0, 0.0], [4 + 5 / 8, 5 / 4, 5 / 2, 5.0]])
    )


def test_group_advantage_by_hand():
    """verl's GRPO outcome advantage: (s - group mean) / (unbiased group std + 1e-6); a lone response keeps s."""
    scores = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0])
    group = torch.tensor([0, 0, 0, 1, 1, 1, 2])
    got = group_advantage(scores, group)
    std0 = math.sqrt(((2 / 3) ** 2 + 2 * (1 / 3) ** 2) / 2)
    want = [(2 / 3) / (std0 + 1e-6), -(1 / 3) / (std0 + 1e-6), -(1 / 3) / (std0 + 1e-6), 0, 0, 0, 0.0]
    torch.testing.assert_close(got, torch.tensor(want))


def reward_to_go(rewards: list[float], gamma: float) -> list[float]:
    """``A_t = sum_{t' >= t} gamma^(t' - t) r_t'``, written as the double sum."""
    return [sum(gamma ** (u - t) * rewards[u] for u in range(t, len(rewards))) for t in range(len(rewards))]


@pytest.mark.parametrize("gamma", [0.0, 0.3, 0.9, 1.0])
def test_discounted_returns_equal_the_double_sum(gamma):
    """Random rewards, any leading shape: each row's reward-to-go, and nothing crosses from one row to the next."""
    rewards = torch.randn(2, 3, 9, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    got = discounted_returns(rewards, gamma)
    want = [[reward_to_go(row, gamma) for row in block] for block in rewards.tolist()]
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64))
    assert got.data_ptr() != rewards.data_ptr()  # a new tensor, the rewards untouched (gamma = 0 too)


def test_group_advantage_equals_the_per_group_statistics():
    """Interleaved groups of 1 to 5 responses: (s - mean) / (sample std + 1e-6) with Python's statistics
    module; a group of one takes mean 0 and std 1 (verl), so keeps its score; a group whose scores all
    agree gets 0."""
    g = torch.Generator().manual_seed(3)
    group = torch.tensor([4, 0, 2, 0, 1, 2, 0, 4, 1, 4, 4, 3, 4, 2, 2, 2])  # 4: five responses, 3: one
    scores = torch.rand(len(group), generator=g, dtype=torch.float64)
    scores[group == 1] = 0.7  # a group whose responses all score the same
    got = group_advantage(scores, group)
    s, gid = scores.tolist(), group.tolist()
    for i in range(len(s)):
        members = [s[j] for j in range(len(s)) if gid[j] == gid[i]]
        if len(members) == 1:
            want = (s[i] - 0) / (1 + 1e-6)
        else:
            want = (s[i] - statistics.mean(members)) / (statistics.stdev(members) + 1e-6)
        assert got[i].item() == pytest.approx(want, rel=1e-9, abs=1e-12), i
    assert got[group == 1].abs().max() < 1e-9
    assert got[group == 3].item() == pytest.approx(s[11], rel=1e-5)
