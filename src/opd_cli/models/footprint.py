"""The memory a training process needs for its models' state, known before any weight is loaded.

A lower bound, per process: the student's weights, gradients and optimizer state (AdamW's two
moments, and float32 master weights under bf16-mixed), each divided over the ranks where the
ZeRO stage shards it, plus the in-process teacher's weights. Activations, the LM head's chunks
and vLLM's engines come on top. A run whose bound already exceeds the device's memory cannot
start (``opd-train`` refuses it in one line, before any model is loaded, instead of running out
of memory minutes later).

Bytes per trained parameter, by ``trainer.precision`` (ZeRO's accounting, 16 bytes for mixed
precision Adam, adjusted to what each engine keeps):

| precision | weights | gradients | optimizer |
|---|---|---|---|
| fp32 | 4 | 4 | 8 (m, v) |
| bf16-mixed, torch engine | 2 | 4 (the masters' float32 gradients) | 12 (float32 masters, m, v) |
| bf16-mixed, DeepSpeed | 2 | 2 | 12 |
| bf16-pure | 2 | 2 | 4 (m, v in bfloat16) |

ZeRO stage 1 shards the optimizer state, stage 2 also the gradients, stage 3 also the weights.
A LoRA student trains only its adapters, whose state is left out: its bound is its weights.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

# bytes per parameter of each parameter dtype
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
GIB = 2**30


@dataclass(frozen=True)
class Footprint:
    """Bytes one training process holds, by kind (see the module docstring)."""

    weights: int
    gradients: int
    optimizer: int
    teacher: int

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.teacher


def meta_model(directory: Path, trust_remote_code: bool = False) -> torch.nn.Module:
    """The causal LM whose ``config.json`` is in ``directory``, built on the meta device: its modules and
    shapes, no memory, no weights read."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(directory, local_files_only=True, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)


def parameter_count(model: torch.nn.Module) -> int:
    """The number of distinct parameters of ``model`` (tied weights count once)."""
    return sum(p.numel() for p in model.parameters())


def training_footprint(
    params: int,
    precision: str,
    engine: str,
    stage: int,
    world: int,
    lora: bool = False,
    teacher_params: int = 0,
    teacher_dtype: str = "float32",
    teacher_sharded: bool = False,
) -> Footprint:
    """Per-process bytes of a student of ``params`` parameters trained at ``precision`` (fp32,
    bf16-mixed or bf16-pure) by ``engine`` (torch or deepspeed, ZeRO ``stage`` over ``world``
    ranks), with an in-process teacher of ``teacher_params`` (0: none in this process)."""
    weight_b = 4 if precision == "fp32" else 2
    grad_b = {"fp32": 4, "bf16-pure": 2}.get(precision, 2 if engine == "deepspeed" else 4)
    optim_b = {"fp32": 8, "bf16-pure": 4}.get(precision, 12)
    trained = 0 if lora else params
    stage = stage if engine == "deepspeed" else 0
    teacher = teacher_params * DTYPE_BYTES[teacher_dtype]
    return Footprint(
        weights=params * weight_b // (world if stage >= 3 else 1),
        gradients=trained * grad_b // (world if stage >= 2 else 1),
        optimizer=trained * optim_b // (world if stage >= 1 else 1),
        teacher=teacher // (world if teacher_sharded else 1),
    )


def device_memory(device: str, ranks_per_node: int) -> tuple[int, str]:
    """Bytes one process may use on ``device`` (cpu or cuda), and the device's name.

    A GPU is one rank's; on a CPU the node's physical memory is shared by its ranks.
    """
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        return props.total_memory, f"the GPU ({props.name})"
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    share = f", shared by {ranks_per_node} ranks" if ranks_per_node > 1 else ""
    return total // ranks_per_node, f"this machine's memory ({total / GIB:.0f} GiB{share})"
