"""The objectives' math as pure functions of tensors.

Shapes: N supervised tokens, V vocabulary, K support size, M = size of a support built
from two top-K sets (K or 2K), d hidden size. Student logits are ``h @ W.T`` (final hidden
states times the LM head); ``gather_logits`` forms them at given ids only, so an objective
on the teacher's top-K never forms ``[*, V]`` logits. Definitions follow docs/objectives.md.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from opd_cli.batch import chunk_bounds
from opd_cli.cpu_linear import linear

# A finite stand-in for log(0) on masked support slots: exp() of it is exactly 0,
# and unlike -inf it keeps 0 * (a - b) finite in the forward and backward pass.
MASKED_LOG = -1e9


def upcast(t: torch.Tensor) -> torch.Tensor:
    """float32 for half types; float32 and float64 stay as they are."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def ppo_token_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantage: torch.Tensor,
    clip_low: float,
    clip_high: float,
    dual_clip: float | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO clipped surrogate per token, and which clip is taken: ``[c, 2]`` bool (ratio clip, dual clip).

    ``rho = exp(logp - old_logp)``; loss ``max(-A rho, -A clip(rho, 1-lo, 1+hi))``;
    with ``dual_clip = c`` the loss of a negative advantage is capped at ``-A c`` (verl's
    ``clip_ratio_c``). The two flags are verl's ``pg_clipfrac`` (the clipped branch is
    strictly larger) and ``pg_clipfrac_lower`` (a negative advantage's loss above the cap).
    """
    ratio = torch.exp(logp - old_logp)
    loss1 = -advantage * ratio
    loss2 = -advantage * ratio.clamp(1 - clip_low, 1 + clip_high)
    loss = torch.maximum(loss1, loss2)
    dual = torch.zeros_like(loss, dtype=torch.bool)
    if dual_clip is not None:
        cap = -advantage * dual_clip
        dual = (advantage < 0) & (loss > cap)
        loss = torch.where(dual, cap, loss)
    return loss, torch.stack([loss2 > loss1, dual], -1)


def no_clip(loss: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(loss, flags)`` of an objective that never clips (``Objective.token_loss``)."""
    return loss, torch.zeros(*loss.shape, 2, dtype=torch.bool, device=loss.device)


class _GatherLogits(torch.autograd.Function):
    """``logits[n, k] = h[n] . W[ids[n, k]]``, computed ``rows`` tokens at a time.

    Neither pass keeps ``W[ids]`` (``[N, K, d]``) alive: the forward saves only its
    inputs, and the backward re-gathers a chunk at a time and scatters into ``dW``.
    """

    @staticmethod
    def forward(ctx, hidden, weight, ids, rows):
        ctx.save_for_backward(hidden, weight, ids)
        ctx.rows = rows
        out = hidden.new_empty(ids.shape)
        for s, e in chunk_bounds(ids.shape[0], rows):
            out[s:e] = torch.einsum("nd,nkd->nk", hidden[s:e], weight[ids[s:e]])
        return out

    @staticmethod
    def backward(ctx, grad):
        hidden, weight, ids = ctx.saved_tensors
        d_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        d_weight = torch.zeros_like(weight) if ctx.needs_input_grad[1] else None
        grad = grad.to(hidden.dtype)
        for s, e in chunk_bounds(ids.shape[0], ctx.rows):
            if d_hidden is not None:
                d_hidden[s:e] = torch.einsum("nk,nkd->nd", grad[s:e], weight[ids[s:e]])
            if d_weight is not None:
                rows = grad[s:e, :, None] * hidden[s:e, None, :]
                d_weight.index_add_(0, ids[s:e].reshape(-1), rows.reshape(-1, hidden.shape[-1]))
        return d_hidden, d_weight, None, None


# Below this many vocabulary entries per gathered id, multiplying by the whole head and picking
# K columns is faster than gathering K head rows per token (measured on CPU: the two cross at
# V / K of about 30-50 for hidden sizes 128 and 896, see docs/design.md).
DENSE_VOCAB_PER_K = 32


def gather_logits(hidden: torch.Tensor, weight: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Logits at given ids only, ``[N, d] x W [V, d] at ids [N, K] -> [N, K]``, in ~16 MB chunks (float32).

    For a small vocabulary (``V <= DENSE_VOCAB_PER_K * K``) each chunk's ``[rows, V]``
    logits are formed and K columns picked (autograd frees the logits after the pick);
    otherwise K head rows are gathered per token (``_GatherLogits``).
    """
    V, K = weight.shape[0], ids.shape[-1]
    if V <= DENSE_VOCAB_PER_K * K:
        rows = max(1, (1 << 22) // V)
        chunks = chunk_bounds(ids.shape[0], rows)
        return torch.cat([linear(hidden[s:e], weight).gather(-1, ids[s:e]) for s, e in chunks])
    rows = max(1, (1 << 22) // max(1, K * hidden.shape[-1]))
    return _GatherLogits.apply(hidden, weight, ids, rows)


def full_logprobs(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Full-vocabulary log-probs of one chunk, ``[c, V]`` (at least float32)."""
    return F.log_softmax(upcast(linear(hidden, weight)), dim=-1)


@torch.no_grad()
def entropy(logp: torch.Tensor) -> torch.Tensor:
    """``-sum p log p`` of each row of log-probs ``[c, V]`` (no gradient), with one ``[c, V]`` temporary
    (``p``, multiplied in place) instead of two."""
    return -logp.exp().mul_(logp).sum(-1)


def log_renormalize(logv: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Log of a distribution renormalized on the valid slots; masked slots get ``MASKED_LOG``.

    ``logv`` may be log-probs or raw logits: the normalizer cancels. A row with no
    valid slot comes back uniform (finite); callers multiply its terms by ``valid``.
    """
    return F.log_softmax(logv.masked_fill(~valid, MASKED_LOG), dim=-1).masked_fill(~valid, MASKED_LOG)


def membership(ids: torch.Tensor, among: torch.Tensor) -> torch.Tensor:
    """``[c, M]`` bool: whether ``ids[n, m]`` is one of ``among[n, :]``."""
    return (ids[:, :, None] == among[:, None, :]).any(-1)


def support_slots(kind: str, student_ids: torch.Tensor, teacher_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Support ids ``[c, M]`` and which slots are in the support ``[c, M]`` (each id once).

    teacher: TopK(q); student: TopK(p); intersection: TopK(p) ∩ TopK(q) (slots of
    the student's list); union and symdiff: the student's list then the teacher's.
    """
    if kind == "teacher":
        return teacher_ids, torch.ones_like(teacher_ids, dtype=torch.bool)
    if kind == "student":
        return student_ids, torch.ones_like(student_ids, dtype=torch.bool)
    s_in_t = membership(student_ids, teacher_ids)
    if kind == "intersection":
        return student_ids, s_in_t
    t_in_s = membership(teacher_ids, student_ids)
    ids = torch.cat([student_ids, teacher_ids], -1)
    if kind == "union":
        return ids, torch.cat([torch.ones_like(s_in_t), ~t_in_s], -1)
    if kind == "symdiff":
        return ids, torch.cat([~s_in_t, ~t_in_s], -1)
    raise ValueError(f"unknown support {kind!r}")


def topk_fill(ids: torch.Tensor, teacher_ids: torch.Tensor, teacher_logprobs: torch.Tensor, fill: torch.Tensor):
    """Teacher log-probs at ``ids`` from its top-K list; ``fill`` (paper C: the student's) where absent."""
    match = ids[:, :, None] == teacher_ids[:, None, :]
    found = (match * teacher_logprobs[:, None, :].to(fill.dtype)).sum(-1)
    return torch.where(match.any(-1), found, fill)


def clip_log_ratio(d: torch.Tensor, bound: float | None) -> torch.Tensor:
    """``d`` clamped to ``[-bound, bound]`` (paper A's ``clip_log_ratio``: 5); unchanged for None."""
    return d if bound is None else d.clamp(-bound, bound)


def reverse_terms(lp: torch.Tensor, lq: torch.Tensor, stop_grad: str, bound: float | None = None) -> torch.Tensor:
    """``p (log p - log q)`` per slot, with the stop-gradient variants of ``DivergenceSpec.stop_grad``
    and the log-ratio clamped to ``[-bound, bound]``."""
    if stop_grad == "log_ratio":
        return lp.exp() * clip_log_ratio(lp - lq, bound).detach()
    if stop_grad == "student_log":
        return lp.exp() * clip_log_ratio(lp.detach() - lq, bound)
    return lp.exp() * clip_log_ratio(lp - lq, bound)


def log_tail(logp_full: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """``log(1 - sum_{v in ids} p(v))`` exactly, as the logsumexp of the ids not in the support."""
    outside = torch.ones_like(logp_full, dtype=torch.bool).scatter(-1, ids, False)
    return logp_full.masked_fill(~outside, MASKED_LOG).logsumexp(-1)


def log1m_sum(logv: torch.Tensor, floor: float) -> torch.Tensor:
    """``log(1 - sum exp(logv))`` along the last dim, floored at ``floor`` (a constant: no gradient)."""
    return torch.log((1 - logv.exp().sum(-1)).clamp_min(floor))
