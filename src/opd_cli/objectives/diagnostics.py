"""Per-token diagnostics as the papers' code computes them, and their weighted sums."""

from __future__ import annotations

import numpy as np
import torch

from opd_cli.objectives.inputs import TokenInputs
from opd_cli.objectives.math import entropy, full_logprobs


def diagnostics_due(step: int, every: int) -> bool:
    """Whether training step ``step`` (from 1) computes the student's diagnostics (``logger.diagnostics_every``:
    every this many steps, 0 never). The step number alone decides, so every rank agrees."""
    return every > 0 and step % every == 0


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

    def named(self) -> dict[str, float]:
        """The sums and weights as one flat dict (``sum/<metric>``, ``weight/<metric>``), e.g. to reduce across ranks."""
        return {**{f"sum/{k}": v for k, v in self.sums.items()}, **{f"weight/{k}": v for k, v in self.weights.items()}}

    @classmethod
    def from_named(cls, named: dict[str, float]) -> MetricSums:
        """The inverse of ``named`` (other keys are ignored)."""
        out = cls()
        out.sums = {k.removeprefix("sum/"): v for k, v in named.items() if k.startswith("sum/")}
        out.weights = {k.removeprefix("weight/"): v for k, v in named.items() if k.startswith("weight/")}
        return out

    def means(self) -> dict[str, float]:
        return {k: self.sums[k] / self.weights[k] for k in self.sums if self.weights[k] > 0}


# Up to this vocabulary size numpy's partition finds a row's K largest values faster than torch.topk on
# CPU (1 against 15 ms for [1024, 400]); above it topk is faster (104 against 305 ms at V = 32,000, 0.3
# against 4 s at Qwen's 151,936; K = 32, docs/benchmarks.md).
PARTITION_MAX_VOCAB = 4096


def top_values(x: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` largest values of each row of ``x [c, V]``, ``[c, k]`` in no particular order (no gradient).

    Their minimum is the row's k-th largest value. On CPU with a small vocabulary, numpy's
    introselect partition; otherwise ``torch.topk`` (``PARTITION_MAX_VOCAB``).
    """
    if x.device.type == "cpu" and x.shape[-1] <= PARTITION_MAX_VOCAB:
        cut = x.shape[-1] - k
        return torch.from_numpy(np.partition(x.detach().numpy(), cut, axis=-1)[:, cut:])
    return x.detach().topk(k, dim=-1, sorted=False).values


def in_student_topk(logp: torch.Tensor, ids: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Which of ``ids [c, M]`` are in a top-k set of ``logp [c, V]`` (each set exactly k ids), and each
    set's probability mass ``[c]``.

    Ids above the k-th largest value are in; of the ids tied at it, as many as the set has room
    for, first as they come in ``ids`` (the teacher's list, best first). A top-k set is then k
    ids, as ``torch.topk``'s in paper B's code; which tied ids it holds, torch leaves open. Its
    mass is the sum of the k largest probabilities, whichever tied ids hold them: read off the k
    largest values, so nothing but their selection runs over ``[c, V]``.
    """
    top = top_values(logp, k)
    kth = top.min(-1, keepdim=True).values
    room = k - (top > kth).sum(-1, keepdim=True)  # >= 1: the slots the tied ids fill
    at = logp.gather(-1, ids)
    tied = at == kth
    member = (at > kth) | (tied & (tied.cumsum(-1) <= room))
    return member, top.exp().sum(-1)


@torch.no_grad()
def student_metrics(hidden: torch.Tensor, weight: torch.Tensor, x: TokenInputs) -> MetricSums:
    """The per-token diagnostics of one chunk that need no teacher, for an objective that needs nothing from
    it (``sft``): the student's entropy ``H(p)`` and the negative log-likelihood ``-log p(y)`` of each token."""
    m = MetricSums()
    logp = full_logprobs(hidden, weight)
    m.add("entropy", entropy(logp), x.weight)
    m.add("nll", -logp.gather(-1, x.target[:, None]).squeeze(-1), x.weight)
    return m


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
    h_p = entropy(logp)
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
    m.add("entropy", h_p, w)
    m.add("teacher_entropy", x.teacher_entropy.to(logp.dtype), w)
    m.add("logprob_gap", gap, w)
    m.add("overlap_ratio", ratio, w)
    m.add("overlap_mass_student", lp_t.exp().masked_fill(~in_overlap, 0).sum(-1), any_overlap)
    m.add("overlap_mass_teacher", t_lps.exp().masked_fill(~in_overlap, 0).sum(-1), any_overlap)
    m.add("overlap_adv", adv / n_overlap.clamp_min(1), w * n_overlap)
    m.add("entropy_gap", (x.teacher_entropy.to(logp.dtype) - h_p).abs(), w)
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
