"""One divergence between student and teacher on a support, with knobs.

Every objective except the sampled-token ones is one ``SupportDivergence`` with a
``DivergenceSpec`` (support, renormalize, tail bucket, stop-gradient, direction, form);
``conf/loss/*.yaml`` names the papers' settings, docs/objectives.md lists them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace

import torch

from opd_cli.objectives import policy_gradient
from opd_cli.objectives.base import Objective
from opd_cli.objectives.inputs import TokenInputs
from opd_cli.objectives.math import (
    MASKED_LOG,
    clip_log_ratio,
    full_logprobs,
    gather_logits,
    log1m_sum,
    log_renormalize,
    log_tail,
    no_clip,
    reverse_terms,
    support_slots,
    topk_fill,
    upcast,
)
from opd_cli.objectives.policy_gradient import PolicyGradient

# the allowed values of each DivergenceSpec knob that is a choice (loss.<knob> in the config)
KNOB_CHOICES: dict[str, tuple[str, ...]] = {
    "support": ("teacher", "student", "union", "intersection", "symdiff", "full"),
    "stop_grad": ("none", "log_ratio", "student_log"),
    "direction": ("reverse", "forward", "jsd"),
    "form": ("direct", "pg"),
    "teacher_values": ("exact", "topk_fill"),
    "pg_weight": ("student_p", "teacher_p", "none"),
}


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
        outcome_only = replace(x, advantage=x.outcome_advantage, outcome_advantage=None)
        extra, _ = self.outcome.token_loss(hidden, weight, outcome_only)
        return loss + extra, flags


def build(loss_cfg, teacher_head: torch.Tensor | None = None) -> Objective:
    """``loss.objective=support_divergence``: the ``DivergenceSpec`` the loss config sets; with
    ``loss.outcome_weight`` a PPO term on the outcome advantage is added (``WithOutcome``)."""
    spec = DivergenceSpec(**{f.name: getattr(loss_cfg, f.name) for f in fields(DivergenceSpec)})
    objective = SupportDivergence(spec, loss_cfg.k, loss_cfg.name, teacher_head)
    return WithOutcome(objective, policy_gradient.build(loss_cfg)) if loss_cfg.outcome_weight else objective


def degenerate(loss_cfg) -> str | None:
    """Why a divergence setting trains nothing, or None: renormalized on a support of one token, the student's
    and the teacher's distributions are both 1 there, so the loss and its gradient are exactly 0."""
    one_token = loss_cfg.k == 1 and loss_cfg.support in ("teacher", "student")
    if loss_cfg.objective == "support_divergence" and one_token and loss_cfg.renormalize and not loss_cfg.tail:
        return (
            f"loss.k=1 with loss.support={loss_cfg.support} renormalized: both distributions are 1 on the one "
            "token, so the loss and its gradient are exactly 0 and this run trains nothing "
            "(a K sweep's baseline; use loss.k >= 2, loss.tail=true, or loss=sampled_token to train)"
        )
    return None
