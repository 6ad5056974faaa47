"""OPD objectives as pure functions of tensors, and the chunked student pass.

Shapes: N supervised tokens, V vocabulary, K support size, M = size of a support
built from two top-K sets (K or 2K), d hidden size.

The student side is computed from final hidden states ``h [N, d]`` and the LM
head ``W [V, d]`` (logits = h @ W.T), chunk by chunk over tokens under
activation checkpointing, so at most one chunk of ``[chunk, V]`` exists at a
time, in the backward pass too. An objective that renormalizes on a support it
already knows (teacher top-K) never forms ``[*, V]`` logits: it gathers the K
rows of the head it needs (``gather_logits``, itself chunked).

Every objective except the policy-gradient ones is one ``SupportDivergence``
with knobs (support, renormalize, tail bucket, stop-gradient, direction, form);
``conf/loss/*.yaml`` names the papers' settings. Definitions follow
``shared/docs/methods.md``; ``docs/objectives.md`` lists every preset.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from opd_cli.cpu_linear import linear

# A finite stand-in for log(0) on masked support slots: exp() of it is exactly 0,
# and unlike -inf it keeps 0 * (a - b) finite in the forward and backward pass.
MASKED_LOG = -1e9

# --------------------------------------------------------------------------- pure math


def chunk_bounds(n: int, chunk: int) -> list[tuple[int, int]]:
    return [(s, min(s + chunk, n)) for s in range(0, n, chunk)]


def upcast(t: torch.Tensor) -> torch.Tensor:
    """float32 for half types; float32 and float64 stay as they are."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


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
# A micro-batch's full-vocabulary losses run without activation checkpointing when its N x V
# logits have at most this many entries (16 MB in float32 per [N, V] intermediate).
CHECKPOINT_ABOVE = 1 << 22


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


@dataclass(frozen=True)
class DivergenceSpec:
    """The knobs of ``support_loss``; each ``conf/loss`` preset is one setting of them."""

    support: str = "teacher"  # teacher | student | union | intersection | symdiff | full
    renormalize: bool = True  # renormalize both sides on the support
    tail: bool = False  # add the bucket of mass outside the support (un-renormalized only)
    stop_grad: str = "none"  # none | log_ratio: p sg(log p - log q) | student_log: p (sg(log p) - log q)
    direction: str = "reverse"  # reverse KL(p||q) | forward KL(q||p) | jsd (generalized JSD, beta)
    beta: float = 0.5  # jsd only: 0 forward KL, 1 reverse KL
    form: str = "direct"  # direct: differentiate the divergence | pg: paper B's policy-gradient form
    teacher_values: str = "exact"  # exact: teacher log-probs at any id | topk_fill: paper C's fill
    pg_weight: str = "student_p"  # pg form: candidate weights student_p | teacher_p | none (paper B)
    tail_floor: float = 1e-8  # tail bucket: floor of both tail masses (paper C: 1e-8)
    log_ratio_clip: float | None = None  # clamp log p - log q to [-c, c] (paper A's clip_log_ratio: 5)


def support_loss(
    lp: torch.Tensor,
    lq: torch.Tensor,
    valid: torch.Tensor | None,
    spec: DivergenceSpec,
    tail: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Per-token divergence ``[c]`` on a support, from log-values at its slots.

    ``lp`` (with gradient) and ``lq`` are ``[c, M]``: full-vocabulary log-probs, or
    any log-values when ``spec.renormalize`` (the normalizer cancels). ``valid``
    marks the slots in the support; a token with no valid slot has loss 0.
    ``valid=None`` is the whole vocabulary (``lp`` and ``lq`` normalized log-probs
    over all of it): renormalizing is then the identity and nothing is masked, so
    both passes are skipped.
    ``tail = (log p_tail, log q_tail)``, each ``[c]``, adds ``p_tail log(p_tail / q_tail)``.
    """
    if spec.form == "pg":
        valid = torch.ones_like(lp, dtype=torch.bool) if valid is None else valid
        # paper B's code: A(v) = w(v) (log q(v) - log p(v)) on full-vocabulary log-probs, w from
        # spec.pg_weight (renormalized on the support or raw); loss -sum_v A(v) rho(v), rho = p / sg(p):
        # its value is -sum_v A(v) (as B logs it), its gradient -sum_v A(v) grad log p(v)
        gap = clip_log_ratio(lq - lp.detach(), spec.log_ratio_clip)
        adv = (pg_weights(lp.detach(), lq, valid, spec) * gap).masked_fill(~valid, 0)
        return -(adv * torch.exp(lp - lp.detach())).masked_fill(~valid, 0).sum(-1)
    if valid is not None and spec.renormalize:
        lp, lq = log_renormalize(lp, valid), log_renormalize(lq, valid)
    elif valid is not None:
        lp, lq = lp.masked_fill(~valid, MASKED_LOG), lq.masked_fill(~valid, MASKED_LOG)
    if spec.direction == "forward" or (spec.direction == "jsd" and spec.beta == 0):
        terms = lq.exp() * (lq - lp)
    elif spec.direction == "jsd" and spec.beta < 1:
        b = spec.beta
        lm = torch.logaddexp(lq + math.log(b), lp + math.log(1 - b))  # m = beta q + (1 - beta) p
        terms = b * lq.exp() * (lq - lm) + (1 - b) * lp.exp() * (lp - lm)
    else:
        terms = reverse_terms(lp, lq, spec.stop_grad, spec.log_ratio_clip)
    loss = (terms if valid is None else terms.masked_fill(~valid, 0)).sum(-1)
    if tail is not None:
        lp_tail, lq_tail = tail
        loss = loss + lp_tail.exp() * (lp_tail - lq_tail)
    return loss


def pg_weights(lp: torch.Tensor, lq: torch.Tensor, valid: torch.Tensor, spec: DivergenceSpec) -> torch.Tensor:
    """Paper B's candidate weights ``[c, M]`` (its ``reward_weight_mode``), no gradient.

    ``student_p`` weighs by the student's probability, ``teacher_p`` by the teacher's, ``none``
    uniformly; with ``spec.renormalize`` the weights are renormalized on the support (B's
    student top-k and overlap runs), otherwise raw (B's non-overlap run: ``exp(log p)``, or 1).
    """
    logw = {"student_p": lp, "teacher_p": lq, "none": torch.zeros_like(lp)}[spec.pg_weight].detach()
    if spec.renormalize:
        return log_renormalize(logw, valid).exp().masked_fill(~valid, 0)
    return logw.exp().masked_fill(~valid, 0)


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


# --------------------------------------------------------------------------- token inputs


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


# --------------------------------------------------------------------------- objectives


class Objective:
    """A per-token loss of the student's hidden states against the teacher.

    ``teacher_needs`` names what the teacher must supply: ``sampled_logprob``
    (log q of the sampled token), ``topk`` (top-K ids and log-probs), ``full``
    (log-probs at any id: the in-process teacher's hidden states and head).
    ``token_loss`` returns the per-token loss [c] and per-token bools [c, 2]: whether the
    PPO ratio clip and the dual clip were taken (all False for non-clipped objectives).
    """

    name: str = ""
    teacher_needs: frozenset[str] = frozenset({"sampled_logprob", "topk"})
    # K of the overlap diagnostics (loss.diag_k, else loss.k); None: the width of the teacher's list
    diag_k: int | None = None
    # run token_loss chunk by chunk under activation checkpointing (it forms [chunk, V] tensors)
    chunked: bool = True

    def token_loss(
        self, hidden: torch.Tensor, weight: torch.Tensor, x: TokenInputs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError


@dataclass
class PolicyGradient(Objective):
    """Sampled-token OPD on the reward ``log q(y) - log pi_old(y)`` (``x.advantage``).

    ``clip=True``: PPO clipped surrogate (optional dual clip); ``clip=False``: the
    importance-sampling form ``-rho A`` (Tinker).
    """

    name: str = "sampled_token"
    clip: bool = True
    clip_low: float = 0.2
    clip_high: float = 0.2
    dual_clip: float | None = None

    def token_loss(self, hidden, weight, x):
        logp = full_logprobs(hidden, weight).gather(-1, x.target[:, None]).squeeze(-1)
        if self.clip:
            return ppo_token_loss(logp, x.old_logprob, x.advantage, self.clip_low, self.clip_high, self.dual_clip)
        return no_clip(-torch.exp(logp - x.old_logprob) * x.advantage)


class SupportDivergence(Objective):
    """One divergence between student and teacher on a support (see ``DivergenceSpec``).

    Memory: with the teacher's support and renormalization only the K gathered
    logits exist; otherwise one ``[chunk, V]`` block of student log-probs (with
    gradient when the full normalizer is needed) and, for ``exact`` teacher values
    off the teacher's top-K, one ``[chunk, V]`` block of teacher log-probs (no gradient).
    """

    def __init__(self, spec: DivergenceSpec, k: int, name: str = "", teacher_head: torch.Tensor | None = None):
        self.spec, self.k, self.name = spec, k, name or "support_divergence"
        self.teacher_head = teacher_head
        s = spec.support
        self.gathered_only = s == "teacher" and spec.renormalize and spec.form == "direct"
        self.chunked = not self.gathered_only
        # the student's full normalizer (with gradient) is needed unless both sides are renormalized
        # on the support, or paper C's fill puts student log-probs among the teacher's values
        self.needs_normalizer = (
            s == "full"
            or spec.form == "pg"
            or not spec.renormalize
            or (spec.teacher_values == "topk_fill" and s in ("student", "union", "symdiff"))
        )
        full_q = s == "full" or (spec.teacher_values == "exact" and s != "teacher" and s != "intersection")
        self.teacher_needs = Objective.teacher_needs | ({"full"} if full_q else set())

    def teacher_logprobs(self, x: TokenInputs) -> torch.Tensor:
        """The teacher's full log-probs for this chunk (no gradient)."""
        if x.teacher_hidden is None or self.teacher_head is None:
            raise RuntimeError(f"{self.name} needs the teacher's hidden states and head")
        with torch.no_grad():
            return full_logprobs(x.teacher_hidden, self.teacher_head)

    def token_loss(self, hidden, weight, x):
        spec = self.spec
        # the teacher's top-K of the loss; its whole list (longer with loss.diag_k) supplies paper C's values
        t_all, t_lps_all = x.teacher_topk_ids, upcast(x.teacher_topk_logprobs)
        t_ids, t_lps = t_all[:, : self.k], t_lps_all[:, : self.k]
        if self.gathered_only:
            lp = upcast(gather_logits(hidden, weight, t_ids))
            return no_clip(support_loss(lp, t_lps.to(lp.dtype), torch.ones_like(t_ids, dtype=torch.bool), spec))
        if self.needs_normalizer:
            logp_full = full_logprobs(hidden, weight)
        else:
            with torch.no_grad():
                logp_full = full_logprobs(hidden, weight)
        if spec.support == "full":
            lp, lq = logp_full, self.teacher_logprobs(x).to(logp_full.dtype)
            return no_clip(support_loss(lp, lq, None, spec))
        s_ids = logp_full.detach().topk(min(self.k, logp_full.shape[-1]), dim=-1).indices
        ids, valid = support_slots(spec.support, s_ids, t_ids)
        if self.needs_normalizer:
            lp = logp_full.gather(-1, ids)
        else:
            lp = upcast(gather_logits(hidden, weight, ids))
        if spec.teacher_values == "exact" and spec.support not in ("teacher", "intersection"):
            lq = self.teacher_logprobs(x).to(lp.dtype).gather(-1, ids)
        else:  # every slot is in the teacher's top-K, or paper C's fill with the student's log-prob
            lq = topk_fill(ids, t_all, t_lps_all, logp_full.detach().gather(-1, ids))
        tail = None
        if spec.tail:  # paper C floors both tail masses (1e-8 in its code)
            floor = math.log(spec.tail_floor)
            lq_tail = log1m_sum(lq.masked_fill(~valid, MASKED_LOG), spec.tail_floor)
            tail = (log_tail(logp_full, ids).clamp_min(floor), lq_tail)
        return no_clip(support_loss(lp, lq.to(lp.dtype), valid, spec, tail))


class WithOutcome(Objective):
    """A divergence plus a PPO term on the sampled token whose advantage is ``x.outcome_advantage``
    (a verifiable outcome reward's group advantage, ``loss.outcome_weight``).

    It reads the sampled token's full-vocabulary log-prob, so it runs chunked like the
    full-vocabulary objectives, whatever the divergence.
    """

    chunked = True

    def __init__(self, base: Objective, outcome: PolicyGradient) -> None:
        self.base, self.outcome = base, outcome
        self.name, self.teacher_needs = base.name, base.teacher_needs

    def token_loss(self, hidden, weight, x):
        loss, flags = self.base.token_loss(hidden, weight, x)
        extra, _ = self.outcome.token_loss(hidden, weight, replace(x, advantage=x.outcome_advantage))
        return loss + extra, flags


def make_objective(loss_cfg, teacher_head: torch.Tensor | None = None) -> Objective:
    """The objective a ``loss`` config describes (``teacher_head``: for objectives needing the full q).

    With ``loss.outcome_weight`` a sampled-token objective finds the outcome advantage already
    in ``x.advantage`` (paper B adds the two); a divergence gets a PPO term of its own (``WithOutcome``).
    """
    pg = PolicyGradient(
        name=loss_cfg.name,
        clip=loss_cfg.objective != "sampled_token_is",
        clip_low=loss_cfg.clip_ratio_low,
        clip_high=loss_cfg.clip_ratio_high,
        dual_clip=loss_cfg.dual_clip,
    )
    if loss_cfg.objective in ("sampled_token", "sampled_token_is"):
        objective = pg
    else:
        spec = DivergenceSpec(**{f.name: getattr(loss_cfg, f.name) for f in fields(DivergenceSpec)})
        objective = SupportDivergence(spec, loss_cfg.k, loss_cfg.name, teacher_head)
        objective = WithOutcome(objective, pg) if loss_cfg.outcome_weight else objective
    objective.diag_k = loss_cfg.diag_k or loss_cfg.k
    return objective


# --------------------------------------------------------------------------- diagnostics


def teacher_rank(ids: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The teacher's rank of each sampled token: 1..K within its top-K ``ids``, K + 1 outside."""
    match = ids == target[:, None]
    k = ids.shape[-1]
    return torch.where(match.any(-1), match.float().argmax(-1) + 1, torch.full_like(target, k + 1))


def repetition_counts(responses: list[list[int]], n: int = 3) -> tuple[int, int]:
    """Paper C's repetition (``opd_token_stats_repeat_ratio``): how many response tokens end an
    n-gram already seen earlier in the same response, and how many tokens there are.

    The ratio pooled over a batch's tokens is the first sum over the second.
    """
    repeats = tokens = 0
    for r in responses:
        seen: set[tuple[int, ...]] = set()
        for end in range(n - 1, len(r)):
            gram = tuple(r[end - n + 1 : end + 1])
            repeats += gram in seen
            seen.add(gram)
        tokens += len(r)
    return repeats, tokens


class MetricSums:
    """Weighted sums of per-token diagnostics; each metric is a mean over its own weight."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.weights: dict[str, float] = {}

    def add(self, name: str, values: torch.Tensor, weight: torch.Tensor) -> None:
        self.sums[name] = self.sums.get(name, 0.0) + (values * weight).sum().item()
        self.weights[name] = self.weights.get(name, 0.0) + weight.sum().item()

    def merge(self, other: MetricSums) -> None:
        for name in other.sums:
            self.sums[name] = self.sums.get(name, 0.0) + other.sums[name]
            self.weights[name] = self.weights.get(name, 0.0) + other.weights[name]

    def means(self) -> dict[str, float]:
        return {k: self.sums[k] / self.weights[k] for k in self.sums if self.weights[k] > 0}


def kth_largest(x: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th largest value of each row of ``x [c, V]`` (no gradient).

    On CPU, numpy's introselect partition is 3-4x faster than ``torch.topk`` for a few
    thousand rows of a small vocabulary.
    """
    if x.device.type == "cpu":
        cut = x.shape[-1] - k
        return torch.from_numpy(np.partition(x.detach().numpy(), cut, axis=-1)[:, cut])
    return x.topk(k, dim=-1).values[:, -1]


def in_student_topk(logp: torch.Tensor, ids: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Which of ``ids [c, M]`` are in a top-k set of ``logp [c, V]`` (each set exactly k ids), and each
    set's probability mass ``[c]``.

    Ids above the k-th largest value are in; of the ids tied at it, as many as the set has room
    for, first as they come in ``ids`` (the teacher's list, best first). A top-k set is then k
    ids, as ``torch.topk``'s in paper B's code; which tied ids it holds, torch leaves open.
    """
    kth = kth_largest(logp, k)[:, None]
    above = logp > kth
    room = k - above.sum(-1, keepdim=True)  # >= 1: the slots the tied ids fill
    at = logp.gather(-1, ids)
    tied = at == kth
    member = (at > kth) | (tied & (tied.cumsum(-1) <= room))
    mass = logp.exp().masked_fill(~above, 0).sum(-1) + room[:, 0] * kth[:, 0].exp()
    return member, mass


@torch.no_grad()
def token_metrics(
    hidden: torch.Tensor, weight: torch.Tensor, x: TokenInputs, bucket_tokens: int, k: int | None = None
) -> MetricSums:
    """Per-token diagnostics of one chunk, as the papers' code computes them, without gradient.

    K is ``k`` (``loss.diag_k`` or ``loss.k``; None: all the teacher's ids) and ``O = TopK(p) ∩ TopK(q)``
    by id, each top-K a set of K ids (``in_student_topk``), as in paper B's code. B's ``overlap_ratio`` is ``|O| / K`` pooled over tokens; its overlap masses ``sum_O p`` and
    ``sum_O q`` are averaged over tokens with a non-empty overlap; its ``overlap_adv``
    (``adv_intersection``) is the mean over all (token, id in O) of the advantage
    ``p_bar(v) (log q(v) - log p(v))``, ``p_bar`` the student renormalized on its top-K.
    """
    m = MetricSums()
    logp = full_logprobs(hidden, weight)
    w = x.weight
    entropy = -(logp.exp() * logp).sum(-1)
    logp_y = logp.gather(-1, x.target[:, None]).squeeze(-1)
    gap = x.teacher_logprob.to(logp.dtype) - logp_y
    t_ids, t_lps = x.teacher_topk_ids[:, :k], x.teacher_topk_logprobs[:, :k].to(logp.dtype)
    k = t_ids.shape[-1]
    in_overlap, mass_s = in_student_topk(logp, t_ids, k)  # [c, K]: the teacher's slots in TopK(p)
    lp_t = logp.gather(-1, t_ids)
    # B's advantage on the overlap: p_bar (log q - log p), p_bar the student renormalized on its top-K
    adv = (lp_t.exp() / mass_s[:, None] * (t_lps - lp_t)).masked_fill(~in_overlap, 0).sum(-1)
    n_overlap = in_overlap.sum(-1).to(logp.dtype)
    any_overlap = w * (n_overlap > 0).to(w.dtype)
    ratio = n_overlap / k
    m.add("entropy", entropy, w)
    m.add("teacher_entropy", x.teacher_entropy.to(logp.dtype), w)
    m.add("logprob_gap", gap, w)
    m.add("overlap_ratio", ratio, w)
    m.add("overlap_mass_student", lp_t.exp().masked_fill(~in_overlap, 0).sum(-1), any_overlap)
    m.add("overlap_mass_teacher", t_lps.exp().masked_fill(~in_overlap, 0).sum(-1), any_overlap)
    m.add("overlap_adv", adv / n_overlap.clamp_min(1), w * n_overlap)
    m.add("entropy_gap", (x.teacher_entropy.to(logp.dtype) - entropy).abs(), w)
    m.add("teacher_rank", teacher_rank(t_ids, x.target).to(logp.dtype), w)
    # paper C's train/rollout mismatch: the sampler's log-probs against this pass's (before the first
    # update of the step), a token mean per sequence, then the mean over sequences (slime's sum_of_sample_mean)
    per_seq = w if x.seq_tokens is None else w / x.seq_tokens.clamp_min(1)
    d = logp_y - x.old_logprob.to(logp.dtype)
    m.add("train_rollout_logprob_abs_diff", d.abs(), per_seq)
    m.add("train_rollout_k3_kl", d.exp() - d - 1, per_seq)
    bucket = x.position // bucket_tokens
    for b in bucket.unique().tolist():
        in_b = (bucket == b).to(w.dtype)
        m.add(f"logprob_gap/bucket_{b}", gap, w * in_b)
        m.add(f"overlap_ratio/bucket_{b}", ratio, w * in_b)
        m.add(f"overlap_adv/bucket_{b}", adv / n_overlap.clamp_min(1), w * n_overlap * in_b)
    return m


# --------------------------------------------------------------------------- student pass


def student_loss_and_metrics(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    x: TokenInputs,
    objective: Objective,
    chunk_tokens: int,
    bucket_tokens: int = 1024,
    diagnostics: bool = True,
) -> tuple[torch.Tensor, MetricSums]:
    """Sum of the per-token loss times ``x.loss_weight`` (with gradient), and the diagnostics (unless told not to).

    Each chunk's loss runs under activation checkpointing: its ``[chunk, V]``
    intermediates are freed after the forward and recomputed one chunk at a time in
    the backward (unless all ``N x V`` is at most ``CHECKPOINT_ABOVE`` entries, where
    keeping them is cheaper than recomputing). Diagnostics run per chunk without gradient.
    """
    total = upcast(hidden).new_zeros(())
    metrics = MetricSums()
    # checkpointing holds one [chunk, V] block at a time but recomputes each chunk in the backward;
    # when the whole [N, V] is small, keeping every chunk's intermediates is cheaper (full_rkl on the
    # demo: 20 -> 13 ms per micro-batch)
    checkpointed = objective.chunked and hidden.shape[0] * weight.shape[0] > CHECKPOINT_ABOVE
    # A gathered objective runs once over all tokens: gather_logits already works in small
    # chunks and keeps nothing large, and one call means one [V, d] head gradient, not one per chunk.
    loss_chunk = chunk_tokens if objective.chunked else hidden.shape[0]
    for s, e in chunk_bounds(hidden.shape[0], loss_chunk):
        xc = x.slice(s, e)
        if checkpointed:
            loss, clipped = checkpoint(objective.token_loss, hidden[s:e], weight, xc, use_reentrant=False)
        else:
            loss, clipped = objective.token_loss(hidden[s:e], weight, xc)
        total = total + (loss * (xc.weight if xc.loss_weight is None else xc.loss_weight)).sum()
        metrics.add("pg_clipfrac", clipped[:, 0].to(xc.weight.dtype), xc.weight)
        metrics.add("pg_clipfrac_lower", clipped[:, 1].to(xc.weight.dtype), xc.weight)
    if diagnostics:  # token_metrics runs without gradient
        for s, e in chunk_bounds(hidden.shape[0], chunk_tokens):
            metrics.merge(token_metrics(hidden[s:e], weight, x.slice(s, e), bucket_tokens, objective.diag_k))
    return total, metrics
