"""Objectives against slow float64 full-vocabulary references, values and gradients."""

import pytest
import torch

from opd_cli.objectives import (
    SampledToken,
    TokenInputs,
    TopKLSM,
    discounted_returns,
    local_support_kl,
    ppo_token_loss,
    student_loss_and_metrics,
)

N, V, D = 11, 37, 8


def make_inputs(k: int, seed: int = 0, ties: bool = False):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, D, generator=g)
    w = torch.randn(V, D, generator=g)
    t_logits = torch.randn(N, V, generator=g) * 2
    if ties:
        t_logits[:, :6] = 3.0  # six-way tie at the top of the teacher's distribution
    t_logp = torch.log_softmax(t_logits.double(), -1)
    top = t_logp.topk(k, dim=-1)
    y = torch.randint(0, V, (N,), generator=g)
    old = torch.log_softmax((h @ w.T).double(), -1).gather(-1, y[:, None]).squeeze(-1)
    old = old + 0.3 * torch.randn(N, generator=g).double()  # a stale policy, so ratios differ from 1
    x = TokenInputs(
        target=y,
        weight=(torch.rand(N, generator=g) > 0.2).float(),
        old_logprob=old.float(),
        advantage=torch.randn(N, generator=g),
        teacher_logprob=t_logp.gather(-1, y[:, None]).squeeze(-1).float(),
        teacher_topk_ids=top.indices,
        teacher_topk_logprobs=top.values.float(),
    )
    return h, w, x, t_logp


def ref_topk_lsm(h, w, x):
    """Full-vocabulary float64 reference: renormalize both sides on the support, token by token."""
    logits = h.double() @ w.double().T
    total = torch.zeros((), dtype=torch.float64)
    for n in range(N):
        support = torch.zeros(V, dtype=torch.bool)
        support[x.teacher_topk_ids[n]] = True
        p = torch.where(support, logits[n].exp(), torch.zeros(()))
        p = p / p.sum()
        q = torch.zeros(V, dtype=torch.float64)
        q[x.teacher_topk_ids[n]] = x.teacher_topk_logprobs[n].double().exp()
        q = q / q.sum()
        kl = sum(p[v] * (p[v].log() - q[v].log()) for v in range(V) if support[v])
        total = total + x.weight[n].double() * kl
    return total


def ref_sampled_token(h, w, x, lo, hi, dual):
    logp = torch.log_softmax(h.double() @ w.double().T, -1).gather(-1, x.target[:, None]).squeeze(-1)
    total = torch.zeros((), dtype=torch.float64)
    clipped = 0.0
    for n in range(N):
        a = x.advantage[n].double()
        r = torch.exp(logp[n] - x.old_logprob[n].double())
        l1, l2 = -a * r, -a * r.clamp(1 - lo, 1 + hi)
        loss = torch.maximum(l1, l2)
        is_clipped = bool(l2 > l1)
        if dual is not None and a < 0 and loss > -a * dual:
            loss, is_clipped = -a * dual, True
        total = total + x.weight[n].double() * loss
        clipped += float(x.weight[n]) * is_clipped
    return total, clipped


def grads(fn, h, w):
    h = h.clone().requires_grad_(True)
    w = w.clone().requires_grad_(True)
    out = fn(h, w)
    out.backward()
    return out.detach(), h.grad, w.grad


@pytest.mark.parametrize("k", [1, 5, V])
@pytest.mark.parametrize("chunk", [3, 1024])
@pytest.mark.parametrize("ties", [False, True])
def test_topk_lsm_matches_reference(k, chunk, ties):
    h, w, x, _ = make_inputs(k, ties=ties)
    got, gh, gw = grads(lambda h, w: student_loss_and_metrics(h, w, x, TopKLSM(), chunk)[0], h, w)
    want, rh, rw = grads(lambda h, w: ref_topk_lsm(h.double(), w.double(), x), h.double(), w.double())
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gh.double(), rh, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(gw.double(), rw, rtol=1e-4, atol=1e-6)


def test_topk_lsm_is_zero_when_student_matches_teacher_on_support():
    logits = torch.randn(4, 6)
    teacher = torch.log_softmax(logits, -1) - 2.0  # same shape on the support, other normalizer
    torch.testing.assert_close(local_support_kl(logits, teacher), torch.zeros(4), atol=1e-6, rtol=0)


def test_topk_lsm_gradient_wrt_logits_matches_reference():
    g = torch.Generator().manual_seed(3)
    z = torch.randn(5, 7, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.log_softmax(torch.randn(5, 7, generator=g, dtype=torch.float64), -1)
    local_support_kl(z, t).sum().backward()
    # Closed form: d KL(p||q) / dz_v = p_v (log p_v - log q_v - KL)
    p = torch.softmax(z.detach(), -1)
    lp, lq = torch.log_softmax(z.detach(), -1), torch.log_softmax(t, -1)
    kl = (p * (lp - lq)).sum(-1, keepdim=True)
    torch.testing.assert_close(z.grad, p * (lp - lq - kl))


@pytest.mark.parametrize("dual", [None, 3.0])
@pytest.mark.parametrize("chunk", [4, 1024])
def test_sampled_token_matches_reference(dual, chunk):
    h, w, x, _ = make_inputs(4, seed=1)
    obj = SampledToken(0.2, 0.2, dual)
    clip_sum = {}

    def run(h, w):
        total, sums = student_loss_and_metrics(h, w, x, obj, chunk)
        clip_sum["got"] = sums["pg_clipfrac"]
        return total

    got, gh, gw = grads(run, h, w)
    want, rh, rw = grads(lambda h, w: ref_sampled_token(h, w, x, 0.2, 0.2, dual)[0], h.double(), w.double())
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gh.double(), rh, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(gw.double(), rw, rtol=1e-4, atol=1e-6)
    assert clip_sum["got"] == pytest.approx(ref_sampled_token(h, w, x, 0.2, 0.2, dual)[1])
    assert clip_sum["got"] > 0  # the stale old policy puts some ratios outside the clip range


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


def test_metrics_match_reference():
    h, w, x, t_logp = make_inputs(5, seed=2)
    _, sums = student_loss_and_metrics(h, w, x, TopKLSM(), 4)
    logp = torch.log_softmax(h.double() @ w.double().T, -1)
    wt = x.weight.double()
    entropy = -(logp.exp() * logp).sum(-1)
    gap = x.teacher_logprob.double() - logp.gather(-1, x.target[:, None]).squeeze(-1)
    overlap = torch.tensor(
        [len(set(logp[n].topk(5).indices.tolist()) & set(x.teacher_topk_ids[n].tolist())) / 5 for n in range(N)]
    )
    assert sums["entropy"] == pytest.approx((wt * entropy).sum().item(), rel=1e-5)
    assert sums["logprob_gap"] == pytest.approx((wt * gap).sum().item(), rel=1e-5)
    assert sums["overlap_ratio"] == pytest.approx((wt * overlap.double()).sum().item(), rel=1e-6)
