"""The rollout engines by name (``rollout.engine``).

An engine is built from the config, the student (the live HF model, its path on disk),
its tokenizer, the longest sequence it must hold, the dtype it samples in and whether the
student is sharded (ZeRO-3). Adding one is a module with a class that keeps the
``RolloutEngine`` contract (``opd_cli.contracts``) and one line in ``ROLLOUT_ENGINES``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from opd_cli.contracts import RolloutEngine
from opd_cli.models.vllm import colocated_engine
from opd_cli.rollout.hf import HFRollout
from opd_cli.rollout.vllm import VLLMRollout


def hf_engine(cfg, model: torch.nn.Module, tokenizer, path: str, max_len: int, dtype: str, sharded: bool):
    """Our decoding loop on the live student (no copy of the weights, nothing to sync)."""
    return HFRollout(model, tokenizer, sharded=sharded, entropy=cfg.loss.entropy_top_ratio is not None)


def vllm_engine(cfg, model: torch.nn.Module, tokenizer, path: str, max_len: int, dtype: str, sharded: bool):
    """An in-process vLLM engine loaded from the student's path, fed its weights after every update."""
    rc = cfg.rollout
    ranks = cfg.trainer.engine == "deepspeed"
    memory = colocated_engine(
        path, dtype, max_len, 20, rc.gpu_memory_utilization, cfg.trainer.seed, ranks, rc.sleep, 2, "rollout.sleep"
    )
    return VLLMRollout(memory.llm, tokenizer, memory)


# rollout.engine -> builder
ROLLOUT_ENGINES: dict[str, Callable[..., RolloutEngine]] = {"hf": hf_engine, "vllm": vllm_engine}


def make_rollout(
    cfg, model: torch.nn.Module, tokenizer, path: str, max_len: int, dtype: str, sharded: bool
) -> RolloutEngine:
    """The student's sampling engine ``rollout.engine`` names."""
    return ROLLOUT_ENGINES[cfg.rollout.engine](cfg, model, tokenizer, path, max_len, dtype, sharded)
