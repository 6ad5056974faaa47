"""Rewards to advantages, and per-token losses to a mini-batch's loss (``loss.agg``)."""

from __future__ import annotations

import torch


def discounted_returns(rewards: torch.Tensor, gamma: float) -> torch.Tensor:
    """Reward-to-go ``A_t = sum_{t' >= t} gamma^(t'-t) r_t'`` along the last dim.

    ``rewards`` is [B, T]; each row is one sequence, so the sum resets at each
    sequence's end. Put zeros where there is no reward (prompt, padding, masked
    tokens). ``gamma = 0`` returns the per-token reward, ``gamma = 1`` the
    undiscounted reward-to-go.
    """
    if gamma == 0:
        return rewards.clone()
    out = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[..., 0])
    for t in range(rewards.shape[-1] - 1, -1, -1):
        running = rewards[..., t] + gamma * running
        out[..., t] = running
    return out


# loss.agg: how per-token losses make a mini-batch's loss (verl's loss_agg_mode names)
AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")


def aggregation_weights(
    weight: torch.Tensor, offsets: torch.Tensor, mode: str, norm_tokens: int
) -> tuple[torch.Tensor, float]:
    """Each token's coefficient in a mini-batch's loss, before one shared divisor, and this share's divisor.

    ``weight [N]`` marks the supervised tokens (1) of the sequences whose tokens start at
    ``offsets [B + 1]``. The mini-batch's loss is ``sum_t coef_t l_t / D``, where ``D`` is
    the sum of the divisors of every share of the mini-batch (micro-batches, ranks), so
    the loss does not depend on how the mini-batch is split. With ``n_i`` supervised
    tokens in sequence ``i`` of the mini-batch's ``S`` sequences:

    - ``token-mean``: ``sum_t l_t / sum_i n_i``
    - ``seq-mean-token-mean``: ``(1/S) sum_i (1/n_i) sum_{t in i} l_t``
    - ``seq-mean-token-sum``: ``(1/S) sum_i sum_{t in i} l_t``
    - ``seq-mean-token-sum-norm``: ``(1/S) sum_i sum_{t in i} l_t / norm_tokens`` (a constant
      length, the response limit, as in Dr. GRPO)

    A sequence with no supervised token counts in ``S`` (as in paper C's slime and paper A's
    verl; paper B's verl leaves it out).
    """
    seq = torch.repeat_interleave(torch.arange(len(offsets) - 1), offsets.diff())
    n = torch.zeros(len(offsets) - 1, dtype=weight.dtype).index_add_(0, seq, weight)
    if mode == "token-mean":
        return weight, float(n.sum())
    sequences = float(len(n))
    if mode == "seq-mean-token-mean":
        return weight / n.clamp_min(1)[seq], sequences
    if mode == "seq-mean-token-sum":
        return weight, sequences
    if mode == "seq-mean-token-sum-norm":
        return weight / norm_tokens, sequences
    raise ValueError(f"unknown loss aggregation {mode!r}")


def group_advantage(scores: torch.Tensor, group: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """GRPO's outcome advantage ``[B]``: each score minus its group's mean, over the group's std + eps.

    ``group [B]`` says which prompt each response answers. As verl's
    ``compute_grpo_outcome_advantage``: the std is unbiased, and a group of one response keeps
    its raw score (mean 0, std 1).
    """
    out = torch.empty_like(scores)
    for g in group.unique():
        s = scores[group == g]
        mean, std = (s.mean(), s.std()) if s.numel() > 1 else (s.new_zeros(()), s.new_ones(()))
        out[group == g] = (s - mean) / (std + eps)
    return out
