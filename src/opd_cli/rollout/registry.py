"""The rollout engines by name (``rollout.engine``)."""

from __future__ import annotations

from opd_cli.config.validate import COMPUTE_DTYPE, student_precision
from opd_cli.models.vllm import EngineMemory, make_llm, sleep_level
from opd_cli.rollout.hf import HFRollout
from opd_cli.rollout.vllm import VLLMRollout


def make_rollout(cfg, trainer, tokenizer, path: str, max_len: int):
    """The student's sampling engine: the live HF model (our decoding loop), or a vLLM engine fed its weights."""
    if cfg.rollout.engine == "vllm":
        memory, ranks = cfg.rollout.gpu_memory_utilization, cfg.trainer.engine == "deepspeed"
        level = sleep_level(cfg.rollout.sleep, 2, "rollout.sleep")
        dtype = COMPUTE_DTYPE[student_precision(cfg)]
        llm = make_llm(path, dtype, max_len, 20, memory, cfg.trainer.seed, ranks, level > 0)
        return VLLMRollout(llm, tokenizer, EngineMemory(llm, level))
    entropy = cfg.loss.entropy_top_ratio is not None
    return HFRollout(trainer.model, tokenizer, synced=trainer.synced_generation, entropy=entropy)
