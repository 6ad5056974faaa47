"""Training engines: plain torch (one process) and DeepSpeed ZeRO (one or many processes).

Both wrap the student in ``StudentLoss`` (hidden states -> objective, one module
forward, so ZeRO-3 can gather the LM head the objective reads) and offer:

- ``loss(micro, x, objective, chunk_tokens, bucket_tokens, diagnostics)`` -> (loss sum, diagnostics' sums;
  without the student's full-vocabulary diagnostics where ``diagnostics`` is False)
- ``backward(loss)``; ``optimizer_step()`` -> gradient norm before clipping
- ``end_step()``: the LR schedule advances once per training step, not per optimizer step
- ``save(run_dir, step, tokenizer, state)`` and ``load(ckpt)`` -> state
- ``model`` (the HF student, for sampling and evaluation) and ``sharded``
  (ZeRO-3: every rank must run the same number of forward passes while sampling).
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from opd_cli.dist import Rank, barrier
from opd_cli.models.loading import lm_head_weight
from opd_cli.models.packed import response_hidden
from opd_cli.models.student import save_student
from opd_cli.objectives.student_pass import student_loss_and_metrics
from opd_cli.training.checkpoint import STATE_FILE, checkpoint_dirs, commit, load_rng, load_state, save_rng


class StudentLoss(torch.nn.Module):
    """The student's loss on one micro-batch as a module forward."""

    def __init__(self, model) -> None:
        super().__init__()
        self.model = model

    def forward(self, micro, x, objective, chunk_tokens: int, bucket_tokens: int, diagnostics: bool = True):
        hidden, _ = response_hidden(self.model, micro)
        weight = lm_head_weight(self.model)
        return student_loss_and_metrics(hidden, weight, x, objective, chunk_tokens, bucket_tokens, diagnostics)


def optimizer_and_schedule(
    params, tcfg, fused: bool = False
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW and the LR schedule over training steps (linear warmup, then constant or cosine).

    ``fused``: torch's one-kernel AdamW (CPU and CUDA; 0.4 instead of 0.9 ms per step on the
    demo); not for DeepSpeed, which rewrites the parameter groups into its own partitions.
    """
    optimizer = torch.optim.AdamW(
        params, lr=tcfg.lr, betas=tuple(tcfg.betas), weight_decay=tcfg.weight_decay, fused=fused or None
    )

    def factor(step: int) -> float:
        if step < tcfg.warmup_steps:
            return (step + 1) / tcfg.warmup_steps
        if tcfg.lr_schedule == "cosine":
            done = (step - tcfg.warmup_steps) / max(1, tcfg.max_steps - tcfg.warmup_steps)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, done)))
        return 1.0

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _fresh_tmp(run_dir: Path, step: int, rank: Rank) -> tuple[Path, Path]:
    tmp, final = checkpoint_dirs(run_dir, step)
    if rank.main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    return tmp, final


class MasterWeights:
    """float32 master copies of a bfloat16 model's parameters (``trainer.precision=bf16-mixed``).

    The model computes (samples, forward, backward) in bfloat16; after each backward its
    gradients are added into the masters' float32 gradients, the optimizer steps the
    masters, and the model gets them back rounded to bfloat16. An update far below
    bfloat16's resolution (lr 2e-6 on weights of size 1e-2) accumulates in the masters
    instead of rounding away, as in DeepSpeed's bf16 optimizer and FSDP's mixed precision.
    """

    def __init__(self, model) -> None:
        """Masters from ``model``'s (float32) parameters; the model is then cast to bfloat16."""
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.masters = [p.detach().float().clone().requires_grad_() for p in self.params]
        model.to(torch.bfloat16)

    def accumulate(self) -> None:
        """Move the model's gradients into the masters' float32 gradients."""
        for p, m in zip(self.params, self.masters, strict=True):
            if p.grad is None:
                continue
            if m.grad is None:
                m.grad = p.grad.float()
            else:
                m.grad.add_(p.grad)
            p.grad = None

    @torch.no_grad()
    def push(self) -> None:
        """Round the masters into the model's parameters."""
        for p, m in zip(self.params, self.masters, strict=True):
            p.copy_(m)

    def state(self) -> list[torch.Tensor]:
        return [m.detach().clone() for m in self.masters]

    @torch.no_grad()
    def load(self, tensors: list[torch.Tensor]) -> None:
        for m, t in zip(self.masters, tensors, strict=True):
            m.copy_(t)
        self.push()


class TorchTrainer:
    """One process, plain PyTorch: AdamW, LR schedule, gradient clipping.

    ``precision``: fp32 and bf16-pure step the model's own parameters; bf16-mixed steps
    float32 master copies of a bfloat16 model (``MasterWeights``).
    """

    sharded = False

    def __init__(self, model, tcfg, precision: str = "fp32") -> None:
        self.model = model
        self.net = StudentLoss(model)
        self.max_grad_norm = tcfg.max_grad_norm
        self.masters = MasterWeights(model) if precision == "bf16-mixed" else None
        # only what trains: under LoRA the adapters (the base weights are frozen)
        self.params = self.masters.masters if self.masters else [p for p in model.parameters() if p.requires_grad]
        self.optimizer, self.scheduler = optimizer_and_schedule(self.params, tcfg, fused=True)

    def loss(self, *args):
        return self.net(*args)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()
        if self.masters:
            self.masters.accumulate()

    def optimizer_step(self) -> float:
        """Clip, step, zero; returns the global gradient norm before clipping."""
        norm = torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
        if torch.isfinite(norm):  # a non-finite gradient is not applied: the run stops on it (loop.check_finite)
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.masters:
            self.masters.push()
        return norm.item()

    def end_step(self) -> float:
        """Advance the LR schedule by one training step; returns the learning rate that step used."""
        lr = self.scheduler.get_last_lr()[0]
        self.scheduler.step()
        return lr

    def save(self, run_dir: Path, step: int, tokenizer, state: dict) -> Path:
        tmp, final = _fresh_tmp(run_dir, step, Rank())
        save_student(self.model, tmp, tokenizer)
        save_rng(tmp, 0)
        extra = {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}
        if self.masters:
            extra["master_weights"] = self.masters.state()
        torch.save({**state, **extra, "step": step}, tmp / STATE_FILE)
        return commit(tmp, final)

    def load(self, ckpt: Path) -> dict:
        state = load_state(ckpt)
        self.optimizer.load_state_dict(state.pop("optimizer"))
        self.scheduler.load_state_dict(state.pop("scheduler"))
        if self.masters:
            self.masters.load(state.pop("master_weights"))
        load_rng(ckpt, 0)
        return state


class DeepSpeedTrainer:
    """DeepSpeed ZeRO (stage from ``trainer.deepspeed``) over every rank of the job.

    Gradient accumulation is ours: DeepSpeed runs unmanaged (``backward`` only
    accumulates; ``optimizer_step`` reduces across ranks and updates), so a
    mini-batch may hold any number of micro-batches.
    """

    def __init__(self, model, tcfg, rank: Rank, precision: str = "fp32") -> None:

        import deepspeed

        self.rank = rank
        ds_cfg = tcfg.deepspeed
        ds = OmegaConf.to_container(ds_cfg, resolve=True) if isinstance(ds_cfg, DictConfig) else dict(ds_cfg)
        ds.update(
            # bf16-mixed: DeepSpeed runs the module in bfloat16 and steps float32 master weights and
            # optimizer state (ZeRO's float32 partitions)
            bf16={"enabled": precision == "bf16-mixed"},
            train_micro_batch_size_per_gpu=tcfg.micro_batch_size,
            gradient_accumulation_steps=1,
            gradient_clipping=tcfg.max_grad_norm,
            managed_gradient_accumulation=False,
            steps_per_print=10**9,
        )
        self.stage = ds.get("zero_optimization", {}).get("stage", 0)
        net = StudentLoss(model)
        trained = [p for p in net.parameters() if p.requires_grad]  # under LoRA the adapters only
        optimizer, self.scheduler = optimizer_and_schedule(trained, tcfg)
        self.engine, *_ = deepspeed.initialize(model=net, optimizer=optimizer, config=ds)
        self.model = self.engine.module.model
        self.sharded = self.stage == 3
        if self.stage == 3:
            # the objective reads the LM head outside the head's own forward
            deepspeed.zero.register_external_parameter(self.engine.module, lm_head_weight(self.model))

    def loss(self, *args):
        return self.engine(*args)

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss, scale_wrt_gas=False)

    def optimizer_step(self) -> float:
        self.engine.step()
        return float(self.engine.get_global_grad_norm())

    def end_step(self) -> float:
        """Advance the LR schedule by one training step; returns the learning rate that step used."""
        lr = self.scheduler.get_last_lr()[0]
        self.scheduler.step()
        return lr

    def _export(self, directory: Path, tokenizer) -> None:
        """The student in HF format (``save_student``) on rank 0, gathered from the ZeRO-3 shards if need be."""

        import deepspeed

        params = list(self.model.parameters()) if self.stage == 3 else []
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None, enabled=self.stage == 3):
            if self.rank.main:
                save_student(self.model, directory, tokenizer)

    def save(self, run_dir: Path, step: int, tokenizer, state: dict) -> Path:
        tmp, final = _fresh_tmp(run_dir, step, self.rank)
        # frozen weights (the base under LoRA) are the model's own files, not training state
        self.engine.save_checkpoint(str(tmp), tag="deepspeed", save_latest=False, exclude_frozen_parameters=True)
        save_rng(tmp, self.rank.rank)
        self._export(tmp, tokenizer)
        if self.rank.main:
            torch.save({**state, "scheduler": self.scheduler.state_dict(), "step": step}, tmp / STATE_FILE)
        barrier()
        if self.rank.main:
            commit(tmp, final)
        barrier()
        return final

    def load(self, ckpt: Path) -> dict:
        frozen = any(not p.requires_grad for p in self.model.parameters())  # saved without them (LoRA)
        self.engine.load_checkpoint(
            str(ckpt), tag="deepspeed", load_lr_scheduler_states=False, load_module_strict=not frozen
        )
        state = load_state(ckpt)
        self.scheduler.load_state_dict(state.pop("scheduler"))
        load_rng(ckpt, self.rank.rank)
        return state


def make_trainer(model, tcfg, rank: Rank, precision: str = "fp32"):
    """The training engine of ``trainer.engine`` for ``precision`` (resolved: fp32, bf16-mixed or bf16-pure)."""
    if tcfg.engine == "deepspeed":
        return DeepSpeedTrainer(model, tcfg, rank, precision)
    return TorchTrainer(model, tcfg, precision)
