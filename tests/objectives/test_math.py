"""Pure objective math (objectives/math.py): gathered logits and the PPO token loss, against direct computations."""

import pytest
import torch

from opd_cli.objectives import math as objective_math
from opd_cli.objectives.math import gather_logits, ppo_token_loss


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
