"""OPD objectives as pure functions of tensors, and the chunked student pass.

Shapes: N supervised tokens, V vocabulary, K support size, d hidden size.
The student side is computed from final hidden states ``h [N, d]`` and the LM
head ``W [V, d]`` (logits = h @ W.T), chunk by chunk over tokens under
activation checkpointing, so at most one chunk of ``[chunk, V]`` logits exists
at a time, in the backward pass too. ``topk_lsm`` never forms ``[*, V]`` logits
for its loss: it gathers the K rows of the head it needs.

Definitions follow ``shared/docs/methods.md``; ``docs/objectives.md`` documents them.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

# --------------------------------------------------------------------------- pure math


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


def ppo_token_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantage: torch.Tensor,
    clip_low: float,
    clip_high: float,
    dual_clip: float | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO clipped surrogate per token, and where a clipped branch is taken.

    ``rho = exp(logp - old_logp)``; loss ``max(-A rho, -A clip(rho, 1-lo, 1+hi))``;
    with ``dual_clip = c`` the loss of a negative advantage is capped at ``-A c``.
    """
    ratio = torch.exp(logp - old_logp)
    loss1 = -advantage * ratio
    loss2 = -advantage * ratio.clamp(1 - clip_low, 1 + clip_high)
    loss = torch.maximum(loss1, loss2)
    clipped = loss2 > loss1
    if dual_clip is not None:
        cap = -advantage * dual_clip
        dual = (advantage < 0) & (loss > cap)
        loss = torch.where(dual, cap, loss)
        clipped = clipped | dual
    return loss, clipped


def local_support_kl(student_logits: torch.Tensor, teacher_logprobs: torch.Tensor) -> torch.Tensor:
    """Teacher top-K local support matching (paper A, eqs. 6-8), per token.

    Both arguments are [N, K] on the same support ids. Each side is renormalized
    on the support (a softmax restricted to the K ids), so the full-vocabulary
    normalizer cancels: ``sum_v p_hat(v) (log p_hat(v) - log q_hat(v))``.
    """
    log_p = F.log_softmax(student_logits.float(), dim=-1)
    log_q = F.log_softmax(teacher_logprobs.float(), dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def gathered_logits(hidden: torch.Tensor, weight: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Logits at given ids only: ``[N, d] x W[ids] [N, K, d] -> [N, K]``."""
    return torch.einsum("nd,nkd->nk", hidden, weight[ids])


def full_logprobs(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Full-vocabulary log-probs of one chunk, ``[c, V]`` in float32."""
    return F.log_softmax((hidden @ weight.T).float(), dim=-1)


# --------------------------------------------------------------------------- token inputs


@dataclass
class TokenInputs:
    """Everything per supervised token that objectives and metrics read; flat over N.

    Rows are the response tokens of a batch in row-major order; ``weight`` is 0
    for tokens excluded from the loss (masked special tokens), else 1.
    """

    target: torch.Tensor  # [N] long, the sampled token y_t
    weight: torch.Tensor  # [N] float, 1 supervised / 0 masked
    old_logprob: torch.Tensor  # [N] float, log pi_old(y_t) from the sampler
    advantage: torch.Tensor  # [N] float, discounted reward-to-go (policy-gradient objectives)
    teacher_logprob: torch.Tensor  # [N] float, log q(y_t)
    teacher_topk_ids: torch.Tensor  # [N, K] long
    teacher_topk_logprobs: torch.Tensor  # [N, K] float, full-vocabulary normalized

    def slice(self, start: int, stop: int) -> TokenInputs:
        return TokenInputs(**{f.name: getattr(self, f.name)[start:stop] for f in fields(self)})

    def to(self, device: torch.device) -> TokenInputs:
        return TokenInputs(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})


# --------------------------------------------------------------------------- objectives


class Objective:
    """A per-token loss of the student's hidden states against the teacher.

    ``teacher_needs`` names what the teacher must supply (see teacher.py).
    ``token_loss`` returns the per-token loss [c] and a per-token bool [c] that is
    True where a clipped branch was taken (all False for non-PG objectives).
    """

    name: str = ""
    teacher_needs: frozenset[str] = frozenset()

    def token_loss(
        self, hidden: torch.Tensor, weight: torch.Tensor, x: TokenInputs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError


@dataclass
class SampledToken(Objective):
    """Sampled-token OPD: PPO on reward ``log q(y) - log pi_old(y)`` (``x.advantage``)."""

    clip_low: float = 0.2
    clip_high: float = 0.2
    dual_clip: float | None = None
    name = "sampled_token"
    teacher_needs = frozenset({"sampled_logprob"})

    def token_loss(self, hidden, weight, x):
        logp = full_logprobs(hidden, weight).gather(-1, x.target[:, None]).squeeze(-1)
        return ppo_token_loss(logp, x.old_logprob, x.advantage, self.clip_low, self.clip_high, self.dual_clip)


@dataclass
class TopKLSM(Objective):
    """Teacher top-K local support matching; gathers K head rows, never [*, V] logits."""

    name = "topk_lsm"
    teacher_needs = frozenset({"topk"})

    def token_loss(self, hidden, weight, x):
        logits = gathered_logits(hidden, weight, x.teacher_topk_ids)
        loss = local_support_kl(logits, x.teacher_topk_logprobs)
        return loss, torch.zeros_like(loss, dtype=torch.bool)


OBJECTIVES = {"sampled_token": SampledToken, "topk_lsm": TopKLSM}


def make_objective(loss_cfg) -> Objective:
    if loss_cfg.objective == "sampled_token":
        return SampledToken(loss_cfg.clip_ratio_low, loss_cfg.clip_ratio_high, loss_cfg.dual_clip)
    return OBJECTIVES[loss_cfg.objective]()


# --------------------------------------------------------------------------- student pass


def chunk_bounds(n: int, chunk: int) -> list[tuple[int, int]]:
    return [(s, min(s + chunk, n)) for s in range(0, n, chunk)]


@torch.no_grad()
def token_metric_sums(hidden: torch.Tensor, weight: torch.Tensor, x: TokenInputs) -> dict[str, float]:
    """Weighted sums over one chunk of the per-token diagnostics (no gradient).

    entropy: H(p_t) over the full vocabulary; logprob_gap: log q(y) - log p(y);
    overlap_ratio: |TopK(p) ∩ TopK(q)| / K with K the teacher's support size.
    """
    logp = full_logprobs(hidden, weight)
    w = x.weight
    entropy = -(logp.exp() * logp).sum(-1)
    logp_y = logp.gather(-1, x.target[:, None]).squeeze(-1)
    k = x.teacher_topk_ids.shape[-1]
    student_top = logp.topk(k, dim=-1).indices
    overlap = (student_top[:, :, None] == x.teacher_topk_ids[:, None, :]).any(-1).sum(-1) / k
    return {
        "entropy": (w * entropy).sum().item(),
        "logprob_gap": (w * (x.teacher_logprob - logp_y)).sum().item(),
        "overlap_ratio": (w * overlap).sum().item(),
    }


def student_loss_and_metrics(
    hidden: torch.Tensor, weight: torch.Tensor, x: TokenInputs, objective: Objective, chunk_tokens: int
) -> tuple[torch.Tensor, dict[str, float]]:
    """Weighted sum of the per-token loss (with gradient) and metric sums.

    Each chunk's loss runs under activation checkpointing: its ``[chunk, V]`` (or
    ``[chunk, K, d]``) intermediates are freed after the forward and recomputed
    one chunk at a time in the backward.
    """
    total = hidden.new_zeros((), dtype=torch.float32)
    sums: dict[str, float] = {"pg_clipfrac": 0.0}
    for s, e in chunk_bounds(hidden.shape[0], chunk_tokens):
        xc = x.slice(s, e)
        loss, clipped = checkpoint(objective.token_loss, hidden[s:e], weight, xc, use_reentrant=False)
        total = total + (loss * xc.weight).sum()
        sums["pg_clipfrac"] += (clipped.float() * xc.weight).sum().item()
        for key, val in token_metric_sums(hidden[s:e].detach(), weight.detach(), xc).items():
            sums[key] = sums.get(key, 0.0) + val
    return total, sums
