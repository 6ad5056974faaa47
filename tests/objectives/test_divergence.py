"""Every loss preset against a slow float64 full-vocabulary reference: values and gradients.

The reference works token by token on Python sets of ids and the full
distributions, straight from the definitions in shared/docs/methods.md; the
objectives under test work on gathered or chunked tensors from hidden states and
the LM head.
"""

import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from opd_cli.objectives import math as objective_math
from opd_cli.objectives import student_pass
from opd_cli.objectives.advantages import discounted_returns, group_advantage
from opd_cli.objectives.diagnostics import repetition_counts, teacher_rank
from opd_cli.objectives.inputs import TokenInputs
from opd_cli.objectives.math import gather_logits, ppo_token_loss
from opd_cli.objectives.registry import make_objective
from opd_cli.objectives.student_pass import student_loss_and_metrics

from ..conftest import REPO

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


@pytest.mark.parametrize("dense", [False, True], ids=["gathered", "dense"])
def test_gather_logits_matches_dense_reference(dense, monkeypatch):
    g = torch.Generator().manual_seed(5)
    h = torch.randn(9, 4, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(13, 4, generator=g, dtype=torch.float64, requires_grad=True)
    ids = torch.randint(0, 13, (9, 3), generator=g)  # repeated ids: dW must accumulate
    coef = torch.randn(9, 3, generator=g, dtype=torch.float64)
    monkeypatch.setattr(objective_math, "DENSE_VOCAB_PER_K", 10**9 if dense else 0)
    (coef * gather_logits(h, w, ids)).sum().backward()
    gh, gw = h.grad.clone(), w.grad.clone()
    if not dense:  # the gathered path in chunks of 2 rows
        h.grad = w.grad = None
        (coef * objective_math._GatherLogits.apply(h, w, ids, 2)).sum().backward()
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
    # verl: pg_clipfrac counts the ratio clip (clipped branch strictly larger), pg_clipfrac_lower the
    # dual clip (negative advantage, loss above -A c), each over the supervised tokens
    ratio, a = torch.exp(logp - x.old_logprob), x.advantage
    upper = -a * ratio.clamp(0.8, 1.2) > -a * ratio
    lower = (a < 0) & (torch.maximum(-a * ratio, -a * ratio.clamp(0.8, 1.2)) > -a * (dual or math.inf))
    for name, flag in (("pg_clipfrac", upper), ("pg_clipfrac_lower", lower)):
        want = (flag.double() * x.weight).sum() / x.weight.sum()
        assert sums.means()[name] == pytest.approx(want.item()), name
    assert sums.means()["pg_clipfrac"] > 0  # the stale old policy puts some ratios outside the clip range


def test_ppo_clip_by_hand():
    logp = torch.log(torch.tensor([1.5, 1.5, 0.5, 0.5, 1.0]))
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0, -4.0])
    loss, clipped = ppo_token_loss(logp, torch.zeros(5), adv, 0.2, 0.2, None)
    # ratio 1.5, A>0: clipped to 1.2 -> -1.2; ratio 1.5, A<0: unclipped 1.5; ratio 0.5, A>0: -0.5;
    # ratio 0.5, A<0: clipped at 0.8 -> 0.8; ratio 1, A=-4: 4.
    torch.testing.assert_close(loss, torch.tensor([-1.2, 1.5, -0.5, 0.8, 4.0]))
    assert clipped.tolist() == [[True, False], [False, False], [False, False], [True, False], [False, False]]
    loss, clipped = ppo_token_loss(torch.log(torch.tensor([5.0])), torch.zeros(1), torch.tensor([-1.0]), 0.2, 0.2, 3.0)
    assert loss.item() == pytest.approx(3.0) and clipped.tolist() == [[False, True]]


def test_discounted_returns_by_hand():
    r = torch.tensor([[1.0, 2.0, 3.0, 0.0], [4.0, 0.0, 0.0, 5.0]])
    torch.testing.assert_close(discounted_returns(r, 0.0), r)
    # gamma = 1: undiscounted reward-to-go, resetting per row (each row is one sequence)
    torch.testing.assert_close(discounted_returns(r, 1.0), torch.tensor([[6.0, 5.0, 3.0, 0.0], [9.0, 5.0, 5.0, 5.0]]))
    torch.testing.assert_close(
        discounted_returns(r, 0.5), torch.tensor([[1 + 1 + 0.75, 2 + 1.5, 3.0, 0.0], [4 + 5 / 8, 5 / 4, 5 / 2, 5.0]])
    )


# --------------------------------------------------------------------------- diagnostics


def diagnostics_reference(logp, t_logp, x, k, s_top):
    """Per-token rows of each diagnostic from the papers' definitions, given the student's top-K ids."""
    rows = {key: [] for key in ("entropy", "t_entropy", "gap", "ratio", "mass_p", "mass_q", "egap", "rank")}
    adv, adv_w, adv_n, mass_w = [], [], [], []
    for n in range(N):
        p, q = logp[n].exp(), t_logp[n].exp()
        s_p, s_q = s_top[n], set(x.teacher_topk_ids[n].tolist())
        ov = sorted(s_p & s_q)
        h_p, h_q = -(p * logp[n]).sum(), -(q * t_logp[n]).sum()
        rows["entropy"].append(h_p)
        rows["t_entropy"].append(h_q)
        rows["gap"].append(t_logp[n, x.target[n]] - logp[n, x.target[n]])
        rows["ratio"].append(len(ov) / k)  # paper B: |TopK(p) ∩ TopK(q)| / K
        # paper B: the overlap masses over tokens whose overlap is not empty
        rows["mass_p"].append(sum(p[v] for v in ov) if ov else 0.0)
        rows["mass_q"].append(sum(q[v] for v in ov) if ov else 0.0)
        mass_w.append(x.weight[n] if ov else 0.0)
        rows["egap"].append(abs(h_q - h_p))
        ranked = t_logp[n].argsort(descending=True).tolist()
        r = ranked.index(int(x.target[n])) + 1
        rows["rank"].append(r if r <= k else k + 1)
        # paper B's adv_intersection: every (token, overlap id) entry, p_bar renormalized on the student's top-K
        z = sum(p[v] for v in s_p)
        for v in ov:
            adv.append(p[v] / z * (math.log(q[v]) - math.log(p[v])))
            adv_w.append(x.weight[n])
            adv_n.append(n)
    return rows, (adv, adv_w, adv_n), mass_w


def test_diagnostics_match_reference():
    k = 5
    h, w, tw, x, t_logp = make_inputs(k, seed=2)
    _, sums = student_loss_and_metrics(h, w, x, make_objective(preset("topk_lsm", k=k)), 4, bucket_tokens=2)
    got = sums.means()
    logp = torch.log_softmax(h @ w.T, -1)
    wt = x.weight
    s_top = [set(logp[n].topk(k).indices.tolist()) for n in range(N)]
    rows, (adv, adv_w, adv_n), mass_w = diagnostics_reference(logp, t_logp, x, k, s_top)

    def mean(vals, weights=wt):
        return sum(float(a) * float(b) for a, b in zip(vals, weights, strict=True)) / float(sum(weights))

    names = {
        "entropy": "entropy",
        "t_entropy": "teacher_entropy",
        "gap": "logprob_gap",
        "ratio": "overlap_ratio",
        "egap": "entropy_gap",
        "rank": "teacher_rank",
    }
    for key, metric in names.items():
        assert got[metric] == pytest.approx(mean(rows[key]), rel=1e-9), metric
    assert got["overlap_mass_student"] == pytest.approx(mean(rows["mass_p"], mass_w), rel=1e-9)
    assert got["overlap_mass_teacher"] == pytest.approx(mean(rows["mass_q"], mass_w), rel=1e-9)
    assert got["overlap_adv"] == pytest.approx(mean(adv, adv_w), rel=1e-9)
    # paper C's mismatch metrics: per-sequence token means (sequences of 5 tokens: positions 0..4), then
    # the mean over sequences
    seqs = [list(range(s, min(s + 5, N))) for s in range(0, N, 5)]
    x.seq_tokens = torch.cat([wt[sq].sum().repeat(len(sq)) for sq in seqs])
    _, sums = student_loss_and_metrics(h, w, x, make_objective(preset("topk_lsm", k=k)), 4, bucket_tokens=2)
    d = logp.gather(-1, x.target[:, None])[:, 0] - x.old_logprob
    for metric, values in (("train_rollout_logprob_abs_diff", d.abs()), ("train_rollout_k3_kl", d.exp() - d - 1)):
        per_seq = [float((values[sq] * wt[sq]).sum() / wt[sq].sum()) for sq in seqs if wt[sq].sum() > 0]
        assert sums.means()[metric] == pytest.approx(sum(per_seq) / len(per_seq), rel=1e-9), metric
    for b in range(3):  # positions 0..4 in buckets of 2 tokens
        sel = [(x.position[n] // 2) == b for n in range(N)]
        for key, metric in (("gap", "logprob_gap"), ("ratio", "overlap_ratio")):
            want = mean([g for g, s in zip(rows[key], sel, strict=True) if s], [wt[n] for n in range(N) if sel[n]])
            assert got[f"{metric}/bucket_{b}"] == pytest.approx(want, rel=1e-9)
        in_b = [i for i, n in enumerate(adv_n) if sel[n]]
        if in_b:  # B's adv_intersection per chunk: the entries of the bucket's tokens
            want = mean([adv[i] for i in in_b], [adv_w[i] for i in in_b])
            assert got[f"overlap_adv/bucket_{b}"] == pytest.approx(want, rel=1e-9)


def test_overlap_ratio_counts_k_ids_with_ties():
    """Five student logits tie across the K-th place: a top-K set holds K ids, whichever tied ids it takes
    (paper B's torch.topk), so the overlap ratio stays between the fewest and the most tied teacher ids a
    top-K set can hold (counting every tied id in would exceed it)."""
    k = 5
    h, w, tw, x, t_logp = make_inputs(k, seed=4, identity_head=True)
    order = h.argsort(-1, descending=True)
    for n in range(N):  # ranks 3..7 (0-based) share one logit: the K-th place is tied
        h[n, order[n, 3:8]] = h[n, order[n, 3]].item()
    x.teacher_topk_ids = order[:, [0, 4, 5, 6, 9]]  # one sure overlap id, three tied ones, one outside
    _, sums = student_loss_and_metrics(h, w, x, make_objective(preset("topk_lsm", k=k)), 4)
    logp = torch.log_softmax(h @ w.T, -1)
    lo = hi = 0.0
    for n in range(N):
        kth = logp[n].topk(k).values[-1]
        above = set((logp[n] > kth + 1e-12).nonzero().squeeze(-1).tolist())
        tied = set((abs(logp[n] - kth) <= 1e-12).nonzero().squeeze(-1).tolist())
        t = set(x.teacher_topk_ids[n].tolist())
        free = k - len(above)  # slots the tied ids fill
        fixed, t_tied, o_tied = len(above & t), len(tied & t), len(tied - t)
        lo += float(x.weight[n]) * (fixed + max(0, free - o_tied)) / k
        hi += float(x.weight[n]) * (fixed + min(free, t_tied)) / k
    total = float(x.weight.sum())
    assert lo / total - 1e-12 <= sums.means()["overlap_ratio"] <= hi / total + 1e-12
    assert sums.means()["overlap_ratio"] <= 1


def test_teacher_rank_by_hand():
    ids = torch.tensor([[4, 2, 7], [1, 0, 3]])
    assert teacher_rank(ids, torch.tensor([7, 9])).tolist() == [3, 4]


def test_repetition_by_hand():
    # paper C: "a b c a b c" -> the last token ends "a b c" seen before: 1 repeat in 6 tokens; "a b c b c b c":
    # "b c b" at 5 and "c b c" at 6 were seen before; a response shorter than 3 has none
    assert repetition_counts([[1, 2, 3, 1, 2, 3], [5, 6]]) == (1, 8)
    assert repetition_counts([[1, 2, 3, 2, 3, 2, 3]]) == (2, 7)


# --------------------------------------------------------------------------- teacher requirements

TOPK_ONLY = frozenset({"sampled_logprob", "topk"})  # what a vLLM teacher gives (prompt_logprobs)


@pytest.mark.parametrize("name", PRESETS)
def test_teacher_requirements(name):
    from opd_cli.errors import UserError
    from opd_cli.teacher.hf import HFTeacher
    from opd_cli.teacher.registry import check_teacher_supplies

    obj = make_objective(preset(name))
    check_teacher_supplies(obj, HFTeacher.supplies, "hf")  # the in-process teacher supplies everything
    needs_full = name in {"full_rkl", "fkl", "jsd", "student_topk", "student_topk_pg", "nonoverlap_only"}
    if needs_full:
        with pytest.raises(UserError, match=rf"^loss: '{name}' needs full from the teacher, which teacher.backend"):
            check_teacher_supplies(obj, TOPK_ONLY, "vllm")
    else:
        check_teacher_supplies(obj, TOPK_ONLY, "vllm")


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


def test_group_advantage_by_hand():
    """verl's GRPO outcome advantage: (s - group mean) / (unbiased group std + 1e-6); a lone response keeps s."""
    scores = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0])
    group = torch.tensor([0, 0, 0, 1, 1, 1, 2])
    got = group_advantage(scores, group)
    std0 = math.sqrt(((2 / 3) ** 2 + 2 * (1 / 3) ** 2) / 2)
    want = [(2 / 3) / (std0 + 1e-6), -(1 / 3) / (std0 + 1e-6), -(1 / 3) / (std0 + 1e-6), 0, 0, 0, 0.0]
    torch.testing.assert_close(got, torch.tensor(want))


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


def test_diagnostics_use_diag_k():
    """The overlap diagnostics at loss.diag_k = 5 from a teacher list of 8: as if the teacher had given 5."""
    h, w, tw, x8, t_logp = make_inputs(8, seed=8)
    x5 = replace(x8, teacher_topk_ids=x8.teacher_topk_ids[:, :5], teacher_topk_logprobs=x8.teacher_topk_logprobs[:, :5])
    _, got = student_loss_and_metrics(h, w, x8, make_objective(preset("topk_lsm", k=8, diag_k=5)), 4)
    _, want = student_loss_and_metrics(h, w, x5, make_objective(preset("topk_lsm", k=5)), 4)
    _, at_8 = student_loss_and_metrics(h, w, x8, make_objective(preset("topk_lsm", k=8)), 4)
    for name in ("overlap_ratio", "overlap_adv", "overlap_mass_student", "teacher_rank"):
        assert got.means()[name] == pytest.approx(want.means()[name], rel=1e-12), name
    assert got.means()["overlap_ratio"] != pytest.approx(at_8.means()["overlap_ratio"])
