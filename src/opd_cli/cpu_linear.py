"""Float32 linear layers through oneDNN on x86-64 CPUs (``trainer.cpu_linear``).

On a CPU, PyTorch hands float32 matrix products to MKL, which on AMD processors runs
its AVX2 code even where the CPU has AVX-512. oneDNN, which ships inside PyTorch, uses
the CPU's widest instructions: on the 2-core AMD EPYC of docs/benchmarks.md a 2048^3
product ran at 490 instead of 235 GFLOP/s, and the demo's shapes 1.2-2.3x faster.
``use_onednn(model)`` turns the model's ``nn.Linear`` layers into ``OneDNNLinear``: the
same modules with the same parameters (checkpoints do not change), whose forward and
backward call oneDNN.
"""

from __future__ import annotations

import platform

import torch
import torch.nn.functional as F
from torch import nn


def _product(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ weight.T + bias`` by oneDNN (``x`` may have leading dimensions; a transposed one is copied)."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


class _Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _product(x, weight, bias)

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dx = _product(dy, weight.t())  # dy @ W
        dy2, x2 = dy.reshape(-1, dy.shape[-1]), x.reshape(-1, x.shape[-1])
        if ctx.needs_input_grad[1]:  # dy^T @ x
            dw = weight_gradient(dy2, x2)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = dy2.sum(0)
        return dx, dw, db


# oneDNN copies the transposed inputs of a weight gradient; from this many weight entries it is
# still faster than MKL (3000 rows: 128 x 128 took 484 us by MKL, 555 by oneDNN; 256 x 256 1773 and 1130)
MIN_GRADIENT_WEIGHT = 1 << 15


def weight_gradient(dy: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``dy.T @ x`` for ``dy [M, N]``, ``x [M, K]``; by oneDNN with the wider side as the output's rows."""
    if dy.shape[1] * x.shape[1] < MIN_GRADIENT_WEIGHT:
        return dy.t() @ x
    return _product(x.t(), dy.t()).t() if dy.shape[1] >= x.shape[1] else _product(dy.t(), x.t())


# a product goes to oneDNN from this many multiply-adds (rows x weight entries): below it MKL's lower
# per-call cost wins (decoding-step products on the demo: 64 rows x 128 x 128 took 12 us by MKL,
# 15 by oneDNN; 64 x 128 x 1024 took 84 by MKL, 47 by oneDNN)
MIN_WORK = 1 << 21


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear``, by oneDNN (with its gradients) when ``use_onednn`` marked ``weight`` and the product is large."""
    if not getattr(weight, "_opd_onednn", False) or x.numel() // x.shape[-1] * weight.numel() < MIN_WORK:
        return F.linear(x, weight, bias)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias)):
        return _Linear.apply(x, weight, bias)
    return _product(x, weight, bias)


class OneDNNLinear(nn.Linear):
    """An ``nn.Linear`` whose large products run through oneDNN (see ``linear``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


def wanted(choice: str, model: nn.Module) -> bool:
    """Whether ``choice`` (``trainer.cpu_linear``: auto, onednn or blas) puts this model's linear layers on oneDNN.

    ``auto`` does so for float32 models on an x86-64 CPU, ``onednn`` for any float32 CPU model.
    """
    param = next(model.parameters())
    if choice == "blas" or param.device.type != "cpu" or param.dtype != torch.float32:
        return False
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")):
        return False
    return choice == "onednn" or platform.machine().lower() in ("x86_64", "amd64")


def use_onednn(model: nn.Module, choice: str = "auto") -> nn.Module:
    """Move ``model``'s ``nn.Linear`` layers onto oneDNN where ``wanted``; the model is returned."""
    if wanted(choice, model):
        for module in model.modules():
            if type(module) is nn.Linear:
                module.__class__ = OneDNNLinear
                module.weight._opd_onednn = True  # also read by the decoding loop and the objectives
    return model
