"""The plain-torch trainer (training/trainers.py): the LR schedule, gradient clipping, and precision.

Precision (trainer.precision): bf16-mixed keeps float32 master weights. At the papers' learning
rate (2e-6) an AdamW update is far below bfloat16's resolution for weights of size ~1e-2, so
stepping bfloat16 weights directly (bf16-pure) loses most of it; bf16-mixed must move the weights
as float32 training does. The reference is the same steps in float32 on the same rollouts and
teacher scores.
"""

import copy
import math
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

from opd_cli.objectives.inputs import token_inputs
from opd_cli.objectives.registry import make_objective
from opd_cli.rollout.hf import HFRollout
from opd_cli.teacher.hf import HFTeacher
from opd_cli.training.trainers import TorchTrainer, optimizer_and_schedule

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


# --------------------------------------------------------------------------- LR schedule and clipping

C4, C6 = math.cos(math.pi / 4), math.cos(math.pi / 6)
# the factor of trainer.lr each training step 1..8 uses: linear warmup over 2 steps, then constant or a
# cosine to 0 at max_steps = 6 (4 steps after the warmup), 0 after; no warmup: the cosine from step 1
SCHEDULES = {
    ("constant", 2): [0.5, 1, 1, 1, 1, 1, 1, 1],
    ("cosine", 2): [0.5, 1, 1, (1 + C4) / 2, 0.5, (1 - C4) / 2, 0, 0],
    ("cosine", 0): [1, (1 + C6) / 2, 0.75, 0.5, 0.25, (1 - C6) / 2, 0, 0],
}


def schedule_cfg(lr_schedule: str, warmup: int, lr: float = 1e-3, max_grad_norm: float = 1e9) -> SimpleNamespace:
    return SimpleNamespace(
        lr=lr,
        betas=[0.9, 0.999],
        weight_decay=0.0,
        warmup_steps=warmup,
        lr_schedule=lr_schedule,
        max_steps=6,
        max_grad_norm=max_grad_norm,
    )


@pytest.mark.parametrize(("lr_schedule", "warmup"), list(SCHEDULES))
def test_lr_schedule_is_warmup_then_constant_or_cosine(lr_schedule, warmup):
    param = torch.nn.Parameter(torch.zeros(3))
    optimizer, scheduler = optimizer_and_schedule([param], schedule_cfg(lr_schedule, warmup, lr=0.3))
    used = []
    for _ in range(8):
        used.append(optimizer.param_groups[0]["lr"])  # what this step's optimizer.step() uses
        optimizer.step()  # no gradient: moves nothing
        scheduler.step()
    assert used == pytest.approx([0.3 * f for f in SCHEDULES[lr_schedule, warmup]], abs=1e-12)


class Recorder:
    """The learning rate and the gradients each of a trainer's optimizer steps saw (a step pre-hook)."""

    def __init__(self, trainer: TorchTrainer) -> None:
        self.lrs: list[float] = []
        self.grads: list[list[torch.Tensor]] = []

        def record(optimizer, args, kwargs):
            self.lrs.append(optimizer.param_groups[0]["lr"])
            self.grads.append([p.grad.detach().clone() for p in trainer.params])

        trainer.optimizer.register_step_pre_hook(record)


def set_grads(params, seed: int, norm: float) -> list[torch.Tensor]:
    """Seeded random gradients scaled to a total L2 norm of ``norm``; returns copies of them."""
    g = torch.Generator().manual_seed(seed)
    grads = [torch.randn(p.shape, generator=g) for p in params]
    scale = norm / math.sqrt(sum(float((x.double() ** 2).sum()) for x in grads))
    for p, x in zip(params, grads, strict=True):
        p.grad = x * scale
    return [p.grad.clone() for p in params]


def test_end_step_returns_the_rate_the_step_used(tiny_model):
    """Two optimizer steps (mini-batches) per training step: both at the step's rate, which end_step
    returns before the schedule moves on."""
    trainer = TorchTrainer(copy.deepcopy(tiny_model), schedule_cfg("cosine", 2))
    recorder = Recorder(trainer)
    returned = []
    for step in range(8):
        for mini_batch in range(2):
            set_grads(trainer.params, 10 * step + mini_batch, 1.0)
            trainer.optimizer_step()
        returned.append(trainer.end_step())
    want = [1e-3 * f for f in SCHEDULES["cosine", 2]]
    assert returned == pytest.approx(want, abs=1e-15)
    assert recorder.lrs == pytest.approx([lr for lr in want for _ in range(2)], abs=1e-15)


@pytest.mark.parametrize("norm", [10.0, 0.5], ids=["clipped", "under_the_limit"])
def test_optimizer_step_clips_to_max_grad_norm_and_returns_the_norm_before(tiny_model, norm):
    """The gradients the optimizer steps with are scaled to max_grad_norm = 1 (when above it), the
    returned norm is the one before clipping, and the weights move as torch's own AdamW moves them
    with gradients clipped by torch.nn.utils.clip_grad_norm_."""
    model = copy.deepcopy(tiny_model)
    start = [p.detach().clone() for p in model.parameters()]
    trainer = TorchTrainer(model, schedule_cfg("constant", 0, lr=1e-2, max_grad_norm=1.0))
    recorder = Recorder(trainer)
    grads = set_grads(trainer.params, 0, norm)

    reference = [torch.nn.Parameter(p.clone()) for p in start]
    for p, g in zip(reference, grads, strict=True):
        p.grad = g.clone()
    ref_norm = torch.nn.utils.clip_grad_norm_(reference, 1.0)
    got_norm = trainer.optimizer_step()

    assert got_norm == pytest.approx(norm, rel=1e-5) and got_norm == pytest.approx(ref_norm.item(), rel=1e-6)
    factor = min(1.0, 1.0 / (norm + 1e-6))
    for seen, g, ref in zip(recorder.grads[0], grads, reference, strict=True):
        torch.testing.assert_close(seen, g * factor)
        torch.testing.assert_close(seen, ref.grad)
    seen_norm = math.sqrt(sum(float((x.double() ** 2).sum()) for x in recorder.grads[0]))
    assert seen_norm == pytest.approx(min(norm, 1.0), rel=1e-5)
    torch.optim.AdamW(reference, lr=1e-2, betas=(0.9, 0.999), weight_decay=0.0, foreach=False).step()
    for p, ref in zip(trainer.params, reference, strict=True):
        torch.testing.assert_close(p.detach(), ref.detach())
        assert p.grad is None  # zeroed for the next mini-batch
    assert any(not p.equal(s) for p, s in zip(trainer.params, start, strict=True))
