"""Rewards to advantages and the loss aggregation weights (objectives/advantages.py), against hand computations."""

import math

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
