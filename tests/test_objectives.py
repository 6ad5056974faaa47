"""Every loss preset against a slow float64 full-vocabulary reference: values and gradients.

The reference works token by token on Python sets of ids and the full
distributions, straight from the definitions in shared/docs/methods.md; the
objectives under test work on gathered or chunked tensors from hidden states and
the LM head.
"""

import math
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from opd_cli import objectives
from opd_cli.objectives import (
    TokenInputs,
    discounted_returns,
    gather_logits,
    make_objective,
    ppo_token_loss,
    repetition,
    student_loss_and_metrics,
    teacher_rank,
)

from .conftest import REPO

N, V, D, DT = 11, 37, 8, 6
PRESETS = sorted(p.stem for p in Path(REPO / "conf/loss").glob("*.yaml") if p.stem != "_base")


def preset(name: str, **overrides):
    base = OmegaConf.load(REPO / "conf/loss/_base.yaml")
    own = OmegaConf.load(REPO / f"conf/loss/{name}.yaml")
    own.pop("defaults", None)
    return OmegaConf.merge(base, own, overrides)


def make_inputs(k, seed=0, ties=False, disjoint=False, identity_head=False):
    """Random student (hidden, head) and teacher (hidden, head), and the batch's TokenInputs.

    ties: six ids share the top teacher logit and four share a student logit.
    disjoint: the teacher ranks ids in the opposite order to the student, so small
    top-k sets do not meet. identity_head: W = I, so hidden states are the logits.
    """
    g = torch.Generator().manual_seed(seed)
    d = V if identity_head else D
    h = torch.randn(N, d, generator=g, dtype=torch.float64) * (2 if identity_head else 1)
    w = torch.eye(V, dtype=torch.float64) if identity_head else torch.randn(V, D, generator=g, dtype=torch.float64)
    th = torch.randn(N, DT, generator=g, dtype=torch.float64)
    tw = torch.randn(V, DT, generator=g, dtype=torch.float64) * 1.5
    if ties:
        th = th.abs()
        tw[0] = tw[0].abs() * 3
        tw[1:6] = tw[0]  # ids 0-5 tie at the top of every teacher distribution
        if not identity_head:
            w[10:14] = w[9]
    if disjoint:
        th, tw = h, -w  # teacher logits = -student logits
    t_logp = torch.log_softmax(th @ tw.T, -1)
    top = t_logp.topk(k, dim=-1)
    y = torch.randint(0, V, (N,), generator=g)
    old = torch.log_softmax(h @ w.T, -1).gather(-1, y[:, None]).squeeze(-1)
    old = old + 0.3 * torch.randn(N, generator=g, dtype=torch.float64)  # a stale policy: ratios differ from 1
    x = TokenInputs(
        target=y,
        weight=(torch.rand(N, generator=g) > 0.2).double(),
        position=torch.arange(N) % 5,
        old_logprob=old,
        advantage=torch.randn(N, generator=g, dtype=torch.float64),
        teacher_logprob=t_logp.gather(-1, y[:, None]).squeeze(-1),
        teacher_topk_ids=top.indices,
        teacher_topk_logprobs=top.values,
        teacher_entropy=-(t_logp.exp() * t_logp).sum(-1),
        teacher_hidden=th,
    )
    return h, w, tw, x, t_logp


def ref_token_loss(logits, t_logp, x, n, cfg):
    """One token's loss from the definitions: sets of ids, full float64 distributions."""
    logp = torch.log_softmax(logits, -1)
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
    if cfg.form == "pg":
        z = sum(logp[v].detach().exp() for v in support)
        return -sum((logp[v].detach().exp() / z * (lq[v] - lp[v].detach())) * lp[v] for v in support)
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
    if cfg.stop_grad == "log_ratio":
        loss = sum(lp[v].exp() * (lp[v] - lq[v]).detach() for v in support)
    elif cfg.stop_grad == "student_log":
        loss = sum(lp[v].exp() * (lp[v].detach() - lq[v]) for v in support)
    else:
        loss = sum(lp[v].exp() * (lp[v] - lq[v]) for v in support)
    if cfg.tail and len(support) < V:
        p_tail = 1 - sum(lp[v].exp() for v in support)
        # the filled teacher values can sum past 1: the teacher's tail is floored at 1e-30 (documented)
        q_tail = torch.clamp(1 - sum(lq[v].exp() for v in support), min=1e-30)
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
    monkeypatch.setattr(objectives, "DENSE_VOCAB_PER_K", 10**9 if dense else 0)
    check_preset(name, k)


@pytest.mark.parametrize("name", PRESETS)
def test_preset_gradient_wrt_logits(name):
    """With W = I the hidden states are the logits: the gradient is d loss / d logits."""
    check_preset(name, 5, identity_head=True)


@pytest.mark.parametrize("name", PRESETS)
@pytest.mark.parametrize("checkpointed", [False, True], ids=["kept", "checkpointed"])
def test_preset_with_ties_and_chunks(name, checkpointed, monkeypatch):
    """Chunks of 3 tokens, with their intermediates kept (small N x V) or recomputed in the backward."""
    monkeypatch.setattr(objectives, "CHECKPOINT_ABOVE", 0 if checkpointed else 10**12)
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


@pytest.mark.parametrize("dense", [False, True], ids=["gathered", "dense"])
def test_gather_logits_matches_dense_reference(dense, monkeypatch):
    g = torch.Generator().manual_seed(5)
    h = torch.randn(9, 4, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(13, 4, generator=g, dtype=torch.float64, requires_grad=True)
    ids = torch.randint(0, 13, (9, 3), generator=g)  # repeated ids: dW must accumulate
    coef = torch.randn(9, 3, generator=g, dtype=torch.float64)
    monkeypatch.setattr(objectives, "DENSE_VOCAB_PER_K", 10**9 if dense else 0)
    (coef * gather_logits(h, w, ids)).sum().backward()
    gh, gw = h.grad.clone(), w.grad.clone()
    if not dense:  # the gathered path in chunks of 2 rows
        h.grad = w.grad = None
        (coef * objectives._GatherLogits.apply(h, w, ids, 2)).sum().backward()
        torch.testing.assert_close(gh, h.grad)
        torch.testing.assert_close(gw, w.grad)
    h.grad = w.grad = None
    (coef * (h @ w.T).gather(-1, ids)).sum().backward()
    torch.testing.assert_close(gh, h.grad)
    torch.testing.assert_close(gw, w.grad)


@pytest.mark.parametrize("dual", [None, 3.0])
def test_sampled_token_clipfrac(dual):
    cfg = preset("sampled_token", dual_clip=dual)
    h, w, tw, x, _ = make_inputs(4, seed=1)
    _, sums = student_loss_and_metrics(h, w, x, make_objective(cfg), 4)
    logp = torch.log_softmax(h @ w.T, -1).gather(-1, x.target[:, None]).squeeze(-1)
    _, clipped = ppo_token_loss(logp, x.old_logprob, x.advantage, 0.2, 0.2, dual)
    want = (clipped.double() * x.weight).sum() / x.weight.sum()
    assert sums.means()["pg_clipfrac"] == pytest.approx(want.item())
    assert want > 0  # the stale old policy puts some ratios outside the clip range


def test_ppo_clip_by_hand():
    logp = torch.log(torch.tensor([1.5, 1.5, 0.5, 0.5, 1.0]))
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0, -4.0])
    loss, clipped = ppo_token_loss(logp, torch.zeros(5), adv, 0.2, 0.2, None)
    # ratio 1.5, A>0: clipped to 1.2 -> -1.2; ratio 1.5, A<0: unclipped 1.5; ratio 0.5, A>0: -0.5;
    # ratio 0.5, A<0: clipped at 0.8 -> 0.8; ratio 1, A=-4: 4.
    torch.testing.assert_close(loss, torch.tensor([-1.2, 1.5, -0.5, 0.8, 4.0]))
    assert clipped.tolist() == [True, False, False, True, False]
    loss, clipped = ppo_token_loss(torch.log(torch.tensor([5.0])), torch.zeros(1), torch.tensor([-1.0]), 0.2, 0.2, 3.0)
    assert loss.item() == pytest.approx(3.0) and clipped.item()


def test_discounted_returns_by_hand():
    r = torch.tensor([[1.0, 2.0, 3.0, 0.0], [4.0, 0.0, 0.0, 5.0]])
    torch.testing.assert_close(discounted_returns(r, 0.0), r)
    # gamma = 1: undiscounted reward-to-go, resetting per row (each row is one sequence)
    torch.testing.assert_close(discounted_returns(r, 1.0), torch.tensor([[6.0, 5.0, 3.0, 0.0], [9.0, 5.0, 5.0, 5.0]]))
    torch.testing.assert_close(
        discounted_returns(r, 0.5), torch.tensor([[1 + 1 + 0.75, 2 + 1.5, 3.0, 0.0], [4 + 5 / 8, 5 / 4, 5 / 2, 5.0]])
    )


# --------------------------------------------------------------------------- diagnostics


def test_diagnostics_match_reference():
    k = 5
    h, w, tw, x, t_logp = make_inputs(k, seed=2)
    _, sums = student_loss_and_metrics(h, w, x, make_objective(preset("topk_lsm", k=k)), 4, bucket_tokens=2)
    got = sums.means()
    logp = torch.log_softmax(h @ w.T, -1)
    wt = x.weight
    rows = {key: [] for key in ("entropy", "gap", "ratio", "mass_p", "mass_q", "egap", "rank")}
    adv, adv_w = [], []
    for n in range(N):
        p, q = logp[n].exp(), t_logp[n].exp()
        s_p, s_q = set(logp[n].topk(k).indices.tolist()), set(x.teacher_topk_ids[n].tolist())
        ov = sorted(s_p & s_q)
        h_p, h_q = -(p * logp[n]).sum(), -(q * t_logp[n]).sum()
        rows["entropy"].append(h_p)
        rows["gap"].append(t_logp[n, x.target[n]] - logp[n, x.target[n]])
        rows["ratio"].append(len(ov) / k)
        rows["mass_p"].append(sum(p[v] for v in ov) if ov else 0.0)
        rows["mass_q"].append(sum(q[v] for v in ov) if ov else 0.0)
        rows["egap"].append(abs(h_q - h_p))
        ranked = t_logp[n].argsort(descending=True).tolist()
        r = ranked.index(int(x.target[n])) + 1
        rows["rank"].append(r if r <= k else k + 1)
        if ov:
            zp, zq = sum(p[v] for v in ov), sum(q[v] for v in ov)
            adv.append(sum(p[v] / zp * (math.log(q[v] / zq) - math.log(p[v] / zp)) for v in ov) / len(ov))
            adv_w.append(wt[n])

    def mean(vals, weights=wt):
        return sum(float(a) * float(b) for a, b in zip(vals, weights, strict=True)) / float(sum(weights))

    names = {
        "entropy": "entropy",
        "gap": "logprob_gap",
        "ratio": "overlap_ratio",
        "mass_p": "overlap_mass_student",
        "mass_q": "overlap_mass_teacher",
        "egap": "entropy_gap",
        "rank": "teacher_rank",
    }
    for key, metric in names.items():
        assert got[metric] == pytest.approx(mean(rows[key]), rel=1e-9), metric
    assert got["overlap_adv"] == pytest.approx(mean(adv, adv_w), rel=1e-9)
    for b in range(3):  # positions 0..4 in buckets of 2 tokens
        sel = [(x.position[n] // 2) == b for n in range(N)]
        want = mean([g for g, s in zip(rows["gap"], sel, strict=True) if s], [wt[n] for n in range(N) if sel[n]])
        assert got[f"logprob_gap/bucket_{b}"] == pytest.approx(want, rel=1e-9)


def test_teacher_rank_by_hand():
    ids = torch.tensor([[4, 2, 7], [1, 0, 3]])
    assert teacher_rank(ids, torch.tensor([7, 9])).tolist() == [3, 4]


def test_repetition_by_hand():
    # "a b c a b c": 3-grams abc bca cab abc -> 3 unique of 4; a response shorter than 3 counts 0
    assert repetition([[1, 2, 3, 1, 2, 3], [5, 6]]) == pytest.approx((1 - 3 / 4 + 0) / 2)


# --------------------------------------------------------------------------- teacher requirements

TOPK_ONLY = frozenset({"sampled_logprob", "topk"})  # what a vLLM teacher gives (prompt_logprobs)


@pytest.mark.parametrize("name", PRESETS)
def test_teacher_requirements(name):
    from opd_cli.errors import UserError
    from opd_cli.teacher import HFTeacher, check_teacher_supplies

    obj = make_objective(preset(name))
    check_teacher_supplies(obj, HFTeacher.supplies, "hf")  # the in-process teacher supplies everything
    needs_full = name in {"full_rkl", "fkl", "jsd", "student_topk", "student_topk_pg", "nonoverlap_only"}
    if needs_full:
        with pytest.raises(UserError, match=rf"^loss: '{name}' needs full from the teacher, which teacher.backend"):
            check_teacher_supplies(obj, TOPK_ONLY, "vllm")
    else:
        check_teacher_supplies(obj, TOPK_ONLY, "vllm")
