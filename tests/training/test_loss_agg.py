"""loss.agg: each mode's gradient against a slow per-sequence reference.

The reference runs one plain forward per unpadded sequence, takes each token's loss
from the objective, and aggregates the mini-batch in Python straight from the
definitions (token mean, or a mean over sequences of token means / sums). The code
under test is the training loop's ``update``: packed micro-batches, gradient
accumulation and one optimizer step per mini-batch.
"""

import copy
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

from opd_cli.models.loading import lm_head_weight
from opd_cli.objectives.advantages import AGG_MODES
from opd_cli.objectives.inputs import token_inputs
from opd_cli.objectives.registry import make_objective
from opd_cli.rollout.hf import HFRollout
from opd_cli.teacher.hf import HFTeacher
from opd_cli.training.clock import PhaseClock
from opd_cli.training.loop import update
from opd_cli.training.trainers import TorchTrainer

from ..conftest import REPO, perturbed_copy

PROMPTS = ["Question: Ann has 12 pens and buys 30 more.\nAnswer:", "Question: 3+4?\nAnswer:", "Q: 57 coins\nA:"]
MAX_NEW = 12
TCFG = SimpleNamespace(
    lr=0.0, betas=[0.9, 0.999], weight_decay=0.0, warmup_steps=0, lr_schedule="constant", max_steps=1, max_grad_norm=1e9
)


class GradientRecorder(TorchTrainer):
    """The real trainer; it keeps a copy of the gradient each optimizer step sees (lr 0: the weights stay)."""

    grads: list

    def optimizer_step(self) -> float:
        self.grads.append([p.grad.detach().clone() for p in self.params])
        return super().optimizer_step()


@pytest.fixture(scope="module")
def setup(tiny_model, tiny_tokenizer):
    student = copy.deepcopy(tiny_model).double()
    teacher = perturbed_copy(student)
    batch = HFRollout(student, tiny_tokenizer).generate(PROMPTS, 3, 1.0, 1.0, MAX_NEW, seed=5)
    loss_cfg = OmegaConf.merge(OmegaConf.load(REPO / "conf/loss/_base.yaml"), {"k": 8})
    support = HFTeacher(teacher, 4, 1024).score(batch, loss_cfg.k)
    x, offsets = token_inputs(batch, support, [], loss_cfg)
    g = torch.Generator().manual_seed(0)
    x.weight = (torch.rand(x.weight.shape, generator=g) > 0.3).to(x.weight.dtype)
    x.weight[offsets[4] : offsets[5]] = 0  # one sequence with no supervised token
    return student, batch, x, offsets, make_objective(loss_cfg)


def reference_grads(model, batch, x, offsets, objective, rows, mode):
    """The mini-batch's loss from per-sequence forwards, aggregated from the definitions."""
    head = lm_head_weight(model)
    seq_losses, seq_tokens = [], []
    for r in rows:
        real = batch.attention_mask[r].bool()
        ids = batch.input_ids[r][real]
        n_resp = int(batch.response_mask[r].sum())
        hidden = model(input_ids=ids[None], output_hidden_states=True).hidden_states[-1][0]
        h = hidden[len(ids) - n_resp - 1 : len(ids) - 1]  # the positions that predict the response tokens
        xs = x.slice(offsets[r], offsets[r + 1])
        loss, _ = objective.token_loss(h, head, xs)
        seq_losses.append((loss * xs.weight).sum())
        seq_tokens.append(xs.weight.sum())
    if mode == "token-mean":
        total = sum(seq_losses) / sum(seq_tokens)
    elif mode == "seq-mean-token-mean":
        total = sum(s / n if n > 0 else s * 0 for s, n in zip(seq_losses, seq_tokens, strict=True)) / len(rows)
    elif mode == "seq-mean-token-sum":
        total = sum(seq_losses) / len(rows)
    else:
        total = sum(s / MAX_NEW for s in seq_losses) / len(rows)
    return torch.autograd.grad(total, list(model.parameters()))


@pytest.mark.parametrize("mode", AGG_MODES)
def test_each_mode_matches_the_per_sequence_reference(mode, setup):
    model, batch, x, offsets, objective = setup
    cfg = SimpleNamespace(
        trainer=SimpleNamespace(mini_batches=2, micro_batch_size=2),
        loss=SimpleNamespace(agg=mode, chunk_tokens=5, gap_bucket_tokens=1024),
        rollout=SimpleNamespace(max_new_tokens=MAX_NEW),
    )
    trainer = GradientRecorder(copy.deepcopy(model), TCFG)
    trainer.grads = []
    update(trainer, batch, x, offsets, objective, cfg, 1, PhaseClock(torch.device("cpu")))
    rows = batch.input_ids.shape[0]
    assert len(trainer.grads) == 2
    for got, mb in zip(trainer.grads, (range(0, 5), range(5, rows)), strict=True):
        want = reference_grads(model, batch, x, offsets, objective, list(mb), mode)
        got_flat, want_flat = torch.cat([g.flatten() for g in got]), torch.cat([g.flatten() for g in want])
        assert (got_flat - want_flat).norm() <= 1e-5 * want_flat.norm(), mode
