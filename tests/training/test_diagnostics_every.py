"""logger.diagnostics_every: the student's diagnostics on some steps only, the loss and gradient unchanged.

The code under test is the training loop's ``update`` (the real trainer, objective and teacher on the tiny
model) with and without the diagnostics, and ``diagnostics_due``, which ``opd_step`` asks with its step.
"""

import copy

import pytest
import torch
from omegaconf import OmegaConf

from opd_cli.objectives.diagnostics import diagnostics_due
from opd_cli.objectives.inputs import token_inputs
from opd_cli.objectives.registry import make_objective
from opd_cli.rollout.hf import HFRollout
from opd_cli.teacher.hf import HFTeacher
from opd_cli.training.clock import PhaseClock
from opd_cli.training.loop import update

from ..conftest import REPO, perturbed_copy
from .test_loss_agg import TCFG, GradientRecorder

PROMPTS = ["Question: Ann has 12 pens and buys 30 more.\nAnswer:", "Question: 3+4?\nAnswer:"]
# the student's diagnostics of a teacher-scored step (the loss's own pg_clipfrac is always there)
DIAGNOSTICS = ["entropy", "logprob_gap", "overlap_ratio", "teacher_rank"]


@pytest.mark.parametrize(
    "every,due",
    [(1, [1, 2, 3, 4, 5, 6]), (0, []), (3, [3, 6]), (2, [2, 4, 6])],
)
def test_the_step_number_decides_which_steps_compute_diagnostics(every, due):
    assert [s for s in range(1, 7) if diagnostics_due(s, every)] == due


@pytest.fixture(scope="module")
def step(tiny_model, tiny_tokenizer):
    student = copy.deepcopy(tiny_model).double()
    batch = HFRollout(student, tiny_tokenizer).generate(PROMPTS, 2, 1.0, 1.0, 12, seed=3)
    loss_cfg = OmegaConf.merge(OmegaConf.load(REPO / "conf/loss/_base.yaml"), {"k": 8})
    support = HFTeacher(perturbed_copy(student), 4, 1024).score(batch, loss_cfg.k)
    x, offsets = token_inputs(batch, support, [], loss_cfg)
    cfg = OmegaConf.create(
        {
            "trainer": {"mini_batches": 2, "micro_batch_size": 1},
            "loss": {"agg": "token-mean", "chunk_tokens": 5, "gap_bucket_tokens": 1024},
            "rollout": {"max_new_tokens": 12},
        }
    )
    return student, batch, x, offsets, make_objective(loss_cfg), cfg


def run_update(step, diagnostics: bool):
    student, batch, x, offsets, objective, cfg = step
    trainer = GradientRecorder(copy.deepcopy(student), TCFG)
    trainer.grads = []
    loss, sums, _ = update(
        trainer, batch, copy.deepcopy(x), offsets, objective, cfg, 1, PhaseClock(torch.device("cpu")), diagnostics
    )
    return loss, trainer.grads, sums.means()


def test_the_loss_and_gradient_are_the_same_without_diagnostics_and_only_the_diagnostics_go(step):
    loss, grads, metrics = run_update(step, diagnostics=True)
    loss_off, grads_off, metrics_off = run_update(step, diagnostics=False)
    assert loss_off == loss
    assert len(grads_off) == len(grads) == 2  # one optimizer step per mini-batch
    for mb, mb_off in zip(grads, grads_off, strict=True):
        assert all(torch.equal(g, g_off) for g, g_off in zip(mb, mb_off, strict=True))
    assert all(key in metrics for key in DIAGNOSTICS), sorted(metrics)
    assert not any(key.split("/")[0] in DIAGNOSTICS for key in metrics_off), sorted(metrics_off)
    assert "pg_clipfrac" in metrics_off and metrics_off["pg_clipfrac"] == metrics["pg_clipfrac"]
