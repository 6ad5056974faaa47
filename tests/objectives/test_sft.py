"""``loss=sft`` (objectives/sft.py): the negative log-likelihood of the response tokens, against its closed form.

test_divergence.py checks it with every preset against the float64 reference, chunked and checkpointed;
here its gradient against ``softmax - onehot`` and what it asks of the teacher and the diagnostics.
"""

from dataclasses import replace

import pytest
import torch

from opd_cli.objectives.inputs import no_teacher
from opd_cli.objectives.registry import make_objective, needs_teacher
from opd_cli.objectives.student_pass import student_loss_and_metrics

from .synthetic import N, V, make_inputs, preset


def test_loss_and_gradient_are_the_nll_and_softmax_minus_onehot():
    """With W = I the hidden states are the logits: d/dz of sum_t w_t (-log softmax(z_t)[y_t]) is
    w_t (softmax(z_t) - onehot(y_t))."""
    h, w, _, x, _ = make_inputs(4, identity_head=True)
    t = no_teacher(N)  # what stands in without a teacher (NaN), and no sampler log-probs: neither is read
    x = replace(
        x, teacher_logprob=t.sampled_logprob, teacher_topk_ids=t.topk_ids, teacher_topk_logprobs=t.topk_logprobs,
        teacher_entropy=t.entropy, teacher_hidden=None, old_logprob=torch.full((N,), float("nan")),
    )  # fmt: skip
    h = h.clone().requires_grad_(True)
    loss, sums = student_loss_and_metrics(h, w, x, make_objective(preset("sft")), chunk_tokens=3)
    loss.backward()
    logp = torch.log_softmax(h.detach(), -1)
    nll = -logp.gather(-1, x.target[:, None]).squeeze(-1)
    torch.testing.assert_close(loss, (x.weight * nll).sum(), rtol=1e-12, atol=1e-12)
    onehot = torch.nn.functional.one_hot(x.target, V).double()
    torch.testing.assert_close(h.grad, x.weight[:, None] * (logp.exp() - onehot), rtol=1e-10, atol=1e-12)
    means = sums.means()
    assert set(means) == {"entropy", "nll", "pg_clipfrac", "pg_clipfrac_lower"}  # nothing that needs the teacher
    assert means["nll"] == pytest.approx(((x.weight * nll).sum() / x.weight.sum()).item(), rel=1e-12)


def test_sft_needs_nothing_from_the_teacher():
    assert make_objective(preset("sft")).teacher_needs == frozenset()
    assert not needs_teacher(preset("sft")) and needs_teacher(preset("sampled_token"))
