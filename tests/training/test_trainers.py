"""Training precision (trainer.precision): bf16-mixed keeps float32 master weights.

At the papers' learning rate (2e-6) an AdamW update is far below bfloat16's resolution
for weights of size ~1e-2, so stepping bfloat16 weights directly (bf16-pure) loses most
of it; bf16-mixed must move the weights as float32 training does. The reference is the
same steps in float32 on the same rollouts and teacher scores.
"""

import copy
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

from opd_cli.objectives.inputs import token_inputs
from opd_cli.objectives.registry import make_objective
from opd_cli.rollout.hf import HFRollout
from opd_cli.teacher.hf import HFTeacher
from opd_cli.training.trainers import TorchTrainer

from ..conftest import REPO, perturbed_copy

PROMPTS = ["Question: Ann has 12 pens and buys 30 more.\nAnswer:", "Question: 3+4?\nAnswer:"]
TCFG = SimpleNamespace(
    lr=2e-6,
    betas=[0.9, 0.999],
    weight_decay=0.0,
    warmup_steps=0,
    lr_schedule="constant",
    max_steps=10,
    max_grad_norm=1.0,
)
STEPS = 6


@pytest.fixture(scope="module")
def data(tiny_model, tiny_tokenizer):
    """One rollout batch of the student and the teacher's scores of it (a perturbed copy of the student)."""
    teacher = perturbed_copy(tiny_model)
    batch = HFRollout(tiny_model, tiny_tokenizer).generate(PROMPTS, 4, 1.0, 1.0, 16, seed=3)
    loss_cfg = OmegaConf.merge(OmegaConf.load(REPO / "conf/loss/_base.yaml"), {"k": 8})
    support = HFTeacher(teacher, 8, 1024).score(batch, loss_cfg.k)
    x, _ = token_inputs(batch, support, [], loss_cfg)
    return batch, x, make_objective(loss_cfg)


def train_steps(model, data, precision: str) -> TorchTrainer:
    batch, x, objective = data
    trainer = TorchTrainer(model, TCFG, precision)
    for _ in range(STEPS):
        loss, _ = trainer.loss(batch, x, objective, 1024, 1024)
        trainer.backward(loss / x.weight.sum())
        trainer.optimizer_step()
    return trainer


def weights(params) -> torch.Tensor:
    return torch.cat([p.detach().double().flatten() for p in params])


def test_bf16_mixed_moves_the_weights_as_float32_does(tiny_model, data):
    start = weights(tiny_model.parameters())
    fp32 = weights(train_steps(copy.deepcopy(tiny_model), data, "fp32").params) - start
    mixed_trainer = train_steps(copy.deepcopy(tiny_model), data, "bf16-mixed")
    mixed = weights(mixed_trainer.params) - start  # the float32 master weights
    bf16 = copy.deepcopy(tiny_model).to(torch.bfloat16)
    pure = weights(train_steps(copy.deepcopy(bf16), data, "bf16-pure").params) - weights(bf16.parameters())
    err = {name: ((d - fp32).norm() / fp32.norm()).item() for name, d in (("mixed", mixed), ("pure", pure))}
    moved = (pure != 0).double().mean().item()
    print(
        f"update error vs float32: bf16-mixed {err['mixed']:.3f}, bf16-pure {err['pure']:.3f}; bf16-pure moved {moved:.1%}"
    )
    assert err["mixed"] < 0.15, err  # bfloat16 gradients: a few per cent off the float32 update
    assert err["pure"] > 0.5, err  # the update mostly rounds away (the error this precision fixes)
    # the model computes with the masters rounded to bfloat16
    model = mixed_trainer.model
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    for p, m in zip(mixed_trainer.masters.params, mixed_trainer.masters.masters, strict=True):
        assert p.equal(m.detach().to(torch.bfloat16))


def test_master_weights_survive_a_checkpoint(tiny_model, tiny_tokenizer, data, tmp_path):
    trainer = train_steps(copy.deepcopy(tiny_model), data, "bf16-mixed")
    trainer.save(tmp_path, 1, tiny_tokenizer, {})
    fresh = TorchTrainer(copy.deepcopy(tiny_model), TCFG, "bf16-mixed")
    fresh.load(tmp_path / "checkpoints/step_000001")
    for a, b in zip(trainer.params, fresh.params, strict=True):
        assert a.equal(b)  # float32, not the rounded bfloat16 export
