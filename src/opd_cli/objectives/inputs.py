"""``TokenInputs``: everything per supervised token that objectives and diagnostics read,
flat over a batch's response tokens, and how a rollout batch and its teacher support make them.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from opd_cli.batch import RolloutBatch, TeacherSupport
from opd_cli.objectives.advantages import discounted_returns
from opd_cli.objectives.masks import entropy_top_keep, special_token_keep
from opd_cli.objectives.math import clip_log_ratio


@dataclass
class TokenInputs:
    """Everything per supervised token that objectives and metrics read; flat over N.

    Rows are the response tokens of a batch in row-major order; ``weight`` is 0
    for tokens excluded from the loss (masked special tokens), else 1; ``loss_weight``
    (``aggregation_weights`` over a mini-batch) weighs each token's loss, ``weight`` its diagnostics.
    """

    target: torch.Tensor  # [N] long, the sampled token y_t
    weight: torch.Tensor  # [N] float, 1 supervised / 0 masked
    position: torch.Tensor  # [N] long, index of the token within its response (0-based)
    old_logprob: torch.Tensor  # [N] float, log pi_old(y_t) from the sampler
    advantage: torch.Tensor  # [N] float, discounted reward-to-go (policy-gradient objectives)
    teacher_logprob: torch.Tensor  # [N] float, log q(y_t)
    teacher_topk_ids: torch.Tensor  # [N, K] long
    teacher_topk_logprobs: torch.Tensor  # [N, K] float, full-vocabulary normalized
    teacher_entropy: torch.Tensor  # [N] float, H(q_t) over the full vocabulary
    teacher_hidden: torch.Tensor | None = None  # [N, d_t], when the objective needs the full q_t
    # [N] float, supervised tokens of each token's sequence (per-sequence means of diagnostics); None: 1
    seq_tokens: torch.Tensor | None = None
    # [N] float, the weighted group advantage of the response's verifiable outcome (loss.outcome_weight)
    outcome_advantage: torch.Tensor | None = None
    # [N] float, each token's coefficient in its mini-batch's loss (loss.agg); None: ``weight``
    loss_weight: torch.Tensor | None = None

    def slice(self, start: int, stop: int) -> TokenInputs:
        return TokenInputs(**{f.name: _apply(getattr(self, f.name), lambda t: t[start:stop]) for f in fields(self)})

    def to(self, device: torch.device) -> TokenInputs:
        return TokenInputs(**{f.name: _apply(getattr(self, f.name), lambda t: t.to(device)) for f in fields(self)})


def _apply(t, fn):
    return None if t is None else fn(t)


def no_teacher(n: int) -> TeacherSupport:
    """What stands in for the teacher's support of ``n`` tokens when the objective needs nothing from it
    (``sft``): no top-K ids, NaN log-probs and entropies (never read: neither the objective nor its
    diagnostics, ``student_metrics``, look at them)."""
    nan = torch.full((n,), float("nan"))
    return TeacherSupport(torch.zeros((n, 0), dtype=torch.long), torch.zeros((n, 0)), nan, nan.clone())


def left_aligned(values: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's ``values`` at ``mask`` moved to the row's start, ``[B, max per row]``, and where they are.

    ``compact[kept]`` is ``values[mask]`` (row-major). A multi-turn response holds observation
    tokens between its actions: discounting over the compacted row counts only the student's
    tokens as steps. Single-turn responses are contiguous, and this changes nothing.
    """
    counts = mask.sum(1)
    kept = torch.arange(int(counts.max()))[None, :] < counts[:, None]
    compact = values.new_zeros(kept.shape)
    compact[kept] = values[mask]
    return compact, kept


def token_inputs(
    batch: RolloutBatch,
    support: TeacherSupport | None,
    mask_ids: list[int],
    loss_cfg,
    outcome: torch.Tensor | None = None,
) -> tuple[TokenInputs, torch.Tensor]:
    """Flat per-token inputs of a batch, and row offsets into them ([B + 1]).

    ``support`` None: no teacher was called (an objective that needs nothing from it); the teacher's
    fields are ``no_teacher``'s and the advantage (of the teacher's reward) is 0.

    ``outcome [B]`` is each response's weighted outcome advantage (``loss.outcome_weight``),
    spread over its tokens as ``outcome_advantage``: a sampled-token objective adds it to every
    token's advantage (paper B), a divergence gets a PPO term on it (``WithOutcome``).
    """
    rm = batch.response_mask
    keep = special_token_keep(batch.input_ids, rm, mask_ids, loss_cfg.mask_mode)
    if loss_cfg.entropy_top_ratio is not None:  # paper A: only each response's highest-entropy tokens
        keep &= entropy_top_keep(batch.entropy, rm, loss_cfg.entropy_top_ratio)
    if loss_cfg.max_response_tokens is not None:  # paper C leaves over-long responses out of the loss
        keep &= (rm.sum(1) <= loss_cfg.max_response_tokens)[:, None]
    keep = keep[rm].float()
    rewards = torch.zeros(rm.shape, dtype=torch.float32 if support is None else support.sampled_logprob.dtype)
    if support is None:
        support = no_teacher(int(rm.sum()))
    else:
        log_ratio = clip_log_ratio(support.sampled_logprob - batch.old_logprobs[rm], loss_cfg.log_ratio_clip)
        rewards[rm] = log_ratio * keep
    compact, kept = left_aligned(rewards, rm)
    advantage = discounted_returns(compact, loss_cfg.gamma)[kept]
    per_token = None if outcome is None else outcome.to(advantage.dtype)[:, None].expand(rm.shape)[rm]
    x = TokenInputs(
        target=batch.input_ids[rm],
        weight=keep,
        position=(rm.cumsum(1) - 1)[rm],
        old_logprob=batch.old_logprobs[rm],
        advantage=advantage,
        teacher_logprob=support.sampled_logprob,
        teacher_topk_ids=support.topk_ids,
        teacher_topk_logprobs=support.topk_logprobs,
        teacher_entropy=support.entropy,
        teacher_hidden=support.hidden,
        outcome_advantage=per_token,
    )
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), rm.sum(1).cumsum(0)])
    x.seq_tokens = torch.repeat_interleave(torch.segment_reduce(keep, "sum", lengths=rm.sum(1)), rm.sum(1))
    return x, offsets
