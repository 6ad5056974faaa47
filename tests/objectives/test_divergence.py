"""Every loss preset against a slow float64 full-vocabulary reference: values and gradients.

The reference works token by token on Python sets of ids and the full
distributions, straight from the definitions in shared/docs/methods.md; the
objectives under test work on gathered or chunked tensors from hidden states and
the LM head.
"""

import math
from dataclasses import replace

import pytest
import torch
from omegaconf import OmegaConf

from opd_cli.objectives import math as objective_math
from opd_cli.objectives import student_pass
from opd_cli.objectives.registry import make_objective
from opd_cli.objectives.student_pass import student_loss_and_metrics

from .synthetic import PRESETS, N, V, make_inputs, preset


def ref_token_loss(logits, t_logp, x, n, cfg):
    """One token's loss from the definitions: sets of ids, full float64 distributions."""
    logp = torch.log_softmax(logits, -1)
    if cfg.objective == "sft":  # the negative log-likelihood of the token
        return -logp[x.target[n]]
    if cfg.objective in ("sampled_token", "sampled_token_is"):
        a, lp_y = x.advantage[n], logp[x.target[n]]
        ratio = torch.exp(lp_y - x.old_logprob[n])
        if cfg.objective == "sampled_token_is":
            return -ratio * a
        loss = torch.maximum(-a * ratio, -a * ratio.clamp(1 - cfg.clip_ratio_low, 1 + cfg.clip_ratio_high))
        return -a * cfg.dual_clip if cfg.dual_clip is not None and a < 0 and loss > -a * cfg.dual_clip else loss
    k = min(cfg.k, V)
    s_p = set(logp.detach().topk(k).indices.tolist())
    s_q = set(x.teacher_topk_ids[n].tolist())
    support = {
        "teacher": s_q,
        "student": s_p,
        "union": s_p | s_q,
        "intersection": s_p & s_q,
        "symdiff": s_p ^ s_q,
        "full": set(range(V)),
    }[cfg.support]
    support = sorted(support)
    if not support:
        return logits.sum() * 0
    if cfg.teacher_values == "exact" or cfg.support == "full":
        lq = {v: t_logp[n, v] for v in support}
    else:  # paper C: the teacher's top-K values; the student's own log-prob where the teacher has none
        lq = {v: t_logp[n, v] if v in s_q else logp[v].detach() for v in support}
    lp = {v: logp[v] for v in support}
    if cfg.form == "pg":  # paper B: A(v) = w(v) (log q(v) - log p(v)), loss -sum A(v) p(v) / sg(p(v))
        raw = {"student_p": lambda v: lp[v].detach().exp(), "teacher_p": lambda v: lq[v].exp(), "none": lambda v: 1}
        w = {v: raw[cfg.pg_weight](v) for v in support}
        z = sum(w.values()) if cfg.renormalize else 1
        c = cfg.log_ratio_clip if cfg.log_ratio_clip is not None else math.inf
        gap = {v: torch.clamp(lq[v] - lp[v].detach(), -c, c) for v in support}
        return -sum(w[v] / z * gap[v] * (lp[v] - lp[v].detach()).exp() for v in support)
    if cfg.renormalize:
        zp = torch.logsumexp(torch.stack([lp[v] for v in support]), 0)
        zq = torch.logsumexp(torch.stack([lq[v] for v in support]), 0)
        lp = {v: lp[v] - zp for v in support}
        lq = {v: lq[v] - zq for v in support}
    if cfg.direction == "forward" or (cfg.direction == "jsd" and cfg.beta == 0):
        return sum(lq[v].exp() * (lq[v] - lp[v]) for v in support)
    if cfg.direction == "jsd" and cfg.beta < 1:
        b = cfg.beta
        total = 0
        for v in support:
            m = b * lq[v].exp() + (1 - b) * lp[v].exp()
            total = total + b * lq[v].exp() * (lq[v] - m.log()) + (1 - b) * lp[v].exp() * (lp[v] - m.log())
        return total
    c = cfg.log_ratio_clip if cfg.log_ratio_clip is not None else math.inf  # paper A's clip_log_ratio

    def clamp(d):
        return torch.clamp(d, -c, c)

    if cfg.stop_grad == "log_ratio":
        loss = sum(lp[v].exp() * clamp(lp[v] - lq[v]).detach() for v in support)
    elif cfg.stop_grad == "student_log":
        loss = sum(lp[v].exp() * clamp(lp[v].detach() - lq[v]) for v in support)
    else:
        loss = sum(lp[v].exp() * clamp(lp[v] - lq[v]) for v in support)
    if cfg.tail and len(support) < V:
        # paper C floors both tails at 1e-8 (the filled teacher values can sum past 1)
        p_tail = torch.clamp(1 - sum(lp[v].exp() for v in support), min=cfg.tail_floor)
        q_tail = torch.clamp(1 - sum(lq[v].exp() for v in support), min=cfg.tail_floor)
        loss = loss + p_tail * (p_tail.log() - q_tail.log())
    return loss


def ref_total(h, w, t_logp, x, cfg):
    logits = h @ w.T
    return sum(x.weight[n] * ref_token_loss(logits[n], t_logp, x, n, cfg) for n in range(N))


def grads(fn, h, w):
    h = h.clone().requires_grad_(True)
    w = w.clone().requires_grad_(True)
    out = fn(h, w)
    out.backward()
    return out.detach(), h.grad, w.grad


def check_preset(name, k, chunk=1024, cfg_overrides=None, **kw):
    cfg = preset(name, k=k, **(cfg_overrides or {}))
    h, w, tw, x, t_logp = make_inputs(k, **kw)
    obj = make_objective(cfg, tw)
    per_token = obj.token_loss(h, w, x)[0]
    logits = h @ w.T
    want_per_token = torch.stack([ref_token_loss(logits[n], t_logp, x, n, cfg) for n in range(N)])
    torch.testing.assert_close(per_token, want_per_token.to(per_token.dtype), rtol=1e-7, atol=1e-9)
    got, gh, gw = grads(lambda h, w: student_loss_and_metrics(h, w, x, obj, chunk)[0], h, w)
    want, rh, rw = grads(lambda h, w: ref_total(h, w, t_logp, x, cfg), h, w)
    torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(gh, rh, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(gw, rw, rtol=1e-6, atol=1e-9)
    return got


@pytest.mark.parametrize("name", PRESETS)
@pytest.mark.parametrize("k", [1, 5, V])
@pytest.mark.parametrize("dense", [False, True], ids=["gathered", "dense"])
def test_preset_matches_reference(name, k, dense, monkeypatch):
    """``dense``: gather_logits multiplies by the whole head and picks columns (small vocabularies)."""
    monkeypatch.setattr(objective_math, "DENSE_VOCAB_PER_K", 10**9 if dense else 0)
    check_preset(name, k)


@pytest.mark.parametrize("name", PRESETS)
def test_preset_gradient_wrt_logits(name):
    """With W = I the hidden states are the logits: the gradient is d loss / d logits."""
    check_preset(name, 5, identity_head=True)


@pytest.mark.parametrize("name", PRESETS)
@pytest.mark.parametrize("checkpointed", [False, True], ids=["kept", "checkpointed"])
def test_preset_with_ties_and_chunks(name, checkpointed, monkeypatch):
    """Chunks of 3 tokens, with their intermediates kept (small N x V) or recomputed in the backward."""
    monkeypatch.setattr(student_pass, "CHECKPOINT_ABOVE", 0 if checkpointed else 10**12)
    check_preset(name, 5, chunk=3, ties=True)


@pytest.mark.parametrize("name", ["topk_intersect_sg_norm", "overlap_only", "nonoverlap_only", "student_topk"])
def test_preset_with_disjoint_supports(name):
    """The teacher ranks ids in the student's reverse order: top-3 sets never meet."""
    loss = check_preset(name, 3, disjoint=True)
    if name in ("topk_intersect_sg_norm", "overlap_only"):
        assert loss.item() == 0.0  # the empty intersection contributes nothing


def test_masked_tokens_contribute_nothing():
    cfg = preset("full_rkl")
    h, w, tw, x, _ = make_inputs(4)
    obj = make_objective(cfg, tw)
    x.weight[:] = 0
    x.weight[3] = 1
    total, _ = student_loss_and_metrics(h.requires_grad_(True), w, x, obj, 1024)
    total.backward()
    assert h.grad[torch.arange(N) != 3].abs().max() == 0
    assert h.grad[3].abs().max() > 0


def test_topk_lsm_is_zero_when_student_matches_teacher_on_support():
    h, w, tw, x, _ = make_inputs(6)
    x.teacher_topk_logprobs = torch.log_softmax(h @ w.T, -1).gather(-1, x.teacher_topk_ids) - 2.0
    total, _ = student_loss_and_metrics(h, w, x, make_objective(preset("topk_lsm", k=6)), 1024)
    assert abs(total.item()) < 1e-12


@pytest.mark.parametrize("beta", [0.1, 0.3, 0.8])
def test_jsd_other_betas(beta):
    """beta != 0.5 tells the mixture m = beta q + (1 - beta) p from its mirror image."""
    check_preset("jsd", 5, cfg_overrides={"beta": beta})


def test_jsd_endpoints_are_the_kls():
    h, w, tw, x, _ = make_inputs(4)
    for beta, other in ((0.0, "fkl"), (1.0, "full_rkl")):
        jsd = student_loss_and_metrics(h, w, x, make_objective(preset("jsd", beta=beta), tw), 1024)[0]
        kl = student_loss_and_metrics(h, w, x, make_objective(preset(other), tw), 1024)[0]
        torch.testing.assert_close(jsd, kl)


@pytest.mark.parametrize("dual", [None, 3.0])
def test_sampled_token_clipfrac(dual):
    cfg = preset("sampled_token", dual_clip=dual)
    h, w, tw, x, _ = make_inputs(4, seed=1)
    _, sums = student_loss_and_metrics(h, w, x, make_objective(cfg), 4)
    logp = torch.log_softmax(h @ w.T, -1).gather(-1, x.target[:, None]).squeeze(-1)
    # verl: pg_clipfrac counts the ratio clip (clipped branch strictly larger), pg_clipfrac_lower the
    # dual clip (negative advantage, loss above -A c), each over the supervised tokens
    ratio, a = torch.exp(logp - x.old_logprob), x.advantage
    upper = -a * ratio.clamp(0.8, 1.2) > -a * ratio
    lower = (a < 0) & (torch.maximum(-a * ratio, -a * ratio.clamp(0.8, 1.2)) > -a * (dual or math.inf))
    for name, flag in (("pg_clipfrac", upper), ("pg_clipfrac_lower", lower)):
        want = (flag.double() * x.weight).sum() / x.weight.sum()
        assert sums.means()[name] == pytest.approx(want.item()), name
    assert sums.means()["pg_clipfrac"] > 0  # the stale old policy puts some ratios outside the clip range


# --------------------------------------------------------------------------- diagnostics


# --------------------------------------------------------------------------- teacher requirements


@pytest.mark.parametrize("pg_weight", ["student_p", "teacher_p", "none"])
@pytest.mark.parametrize("name", ["student_topk_pg", "overlap_only", "nonoverlap_only"])
@pytest.mark.parametrize("renormalize", [True, False])
def test_pg_weights_match_reference(name, pg_weight, renormalize):
    """Paper B's reward_weight_mode, renormalized on the support or raw (its non-overlap run)."""
    check_preset(name, 5, cfg_overrides={"pg_weight": pg_weight, "renormalize": renormalize})


def test_tail_floor_is_reached_on_a_peaked_teacher():
    """A teacher whose top-K holds all its mass: its tail is floored (paper C: 1e-8), not 1e-30."""
    h, w, tw, x, t_logp = make_inputs(5, seed=3)
    x.teacher_topk_logprobs = torch.log_softmax(x.teacher_topk_logprobs * 50, -1)  # top-5 mass exactly 1
    base = preset("topk_tail", k=5)
    losses = {
        f: make_objective(OmegaConf.merge(base, {"tail_floor": f}), tw).token_loss(h, w, x)[0] for f in (1e-8, 1e-30)
    }
    assert not torch.allclose(losses[1e-8], losses[1e-30])


@pytest.mark.parametrize(
    "name", ["topk_lsm", "full_rkl", "topk_notail_sg", "topk_intersect_sg_norm", "student_topk_pg"]
)
def test_log_ratio_clip_matches_reference(name):
    """Paper A's clip_log_ratio (c = 5 there; 0.5 here so that the clamp binds on random inputs)."""
    loss = check_preset(name, 5, cfg_overrides={"log_ratio_clip": 0.5})
    assert not torch.allclose(loss, check_preset(name, 5))


@pytest.mark.parametrize("name", ["topk_lsm", "full_rkl", "topk_notail_sg"])
def test_outcome_weight_adds_a_ppo_term_to_a_divergence(name):
    """loss.outcome_weight: the divergence plus verl's PPO loss on the sampled token with the outcome advantage."""
    cfg = preset(name, k=5, outcome_weight=1.0)
    h, w, tw, x, t_logp = make_inputs(5, seed=6)
    x.outcome_advantage = torch.randn(N, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    obj = make_objective(cfg, tw)
    got, gh, gw = grads(lambda h, w: student_loss_and_metrics(h, w, x, obj, 4)[0], h, w)
    pg_cfg, x_pg = preset("sampled_token"), replace(x, advantage=x.outcome_advantage)

    def reference(h, w):
        logits = h @ w.T
        return sum(
            x.weight[n]
            * (ref_token_loss(logits[n], t_logp, x, n, cfg) + ref_token_loss(logits[n], t_logp, x_pg, n, pg_cfg))
            for n in range(N)
        )

    want, rh, rw = grads(reference, h, w)
    torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(gh, rh, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(gw, rw, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("name", ["topk_lsm", "topk_intersect_sg_norm", "topk_notail", "topk_tail"])
def test_a_longer_teacher_list_than_the_loss_k(name):
    """loss.diag_k > loss.k: the teacher supplies 8 ids, the loss's teacher top-K is their first 5, and
    paper C's fill looks values up in all 8 (its teacher map holds max(opd_topk, stats_topk) ids)."""
    h, w, tw, x8, t_logp = make_inputs(8, seed=7)
    cfg = preset(name, k=5, diag_k=8)
    obj = make_objective(cfg, tw)
    got = obj.token_loss(h, w, x8)[0]
    logits = h @ w.T
    if cfg.support == "student":  # the reference's fill reads x.teacher_topk_ids: all 8
        want = torch.stack([ref_token_loss(logits[n], t_logp, x8, n, cfg) for n in range(N)])
    else:  # teacher top-K sets: the first 5 of the list
        x5 = replace(
            x8, teacher_topk_ids=x8.teacher_topk_ids[:, :5], teacher_topk_logprobs=x8.teacher_topk_logprobs[:, :5]
        )
        want = torch.stack([ref_token_loss(logits[n], t_logp, x5, n, cfg) for n in range(N)])
    torch.testing.assert_close(got, want.to(got.dtype), rtol=1e-7, atol=1e-9)
