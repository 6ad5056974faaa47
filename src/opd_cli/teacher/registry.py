"""The teacher backends by name (``teacher.backend``), and the check that one supplies what the objective needs."""

from __future__ import annotations

import torch

from opd_cli.errors import UserError
from opd_cli.models.loading import lm_head_weight, load_model
from opd_cli.models.vllm import EngineMemory, make_llm, sleep_level
from opd_cli.objectives.base import Objective
from opd_cli.objectives.registry import teacher_k
from opd_cli.rollout.hf import HFRollout
from opd_cli.rollout.vllm import VLLMRollout
from opd_cli.teacher.hf import HFTeacher
from opd_cli.teacher.server import VLLMServerTeacher
from opd_cli.teacher.vllm import VLLMTeacher


def check_teacher_supplies(objective: Objective, supplies: frozenset[str], backend: str) -> None:
    """Refuse, in one line, an objective that needs what the teacher backend cannot give."""
    if missing := objective.teacher_needs - supplies:
        raise UserError(
            f"loss: '{objective.name}' needs {', '.join(sorted(missing))} from the teacher, which "
            f"teacher.backend={backend} cannot supply (it gives {', '.join(sorted(supplies))})"
        )


def make_teacher(cfg, path: str, tokenizer, device: torch.device, max_len: int):
    """The teacher backend, a sampler for its evaluation, and its vocabulary size."""
    if cfg.teacher.url:
        from transformers import AutoConfig

        server = VLLMServerTeacher(cfg.teacher.url, tokenizer)
        rows = AutoConfig.from_pretrained(path, trust_remote_code=cfg.teacher.trust_remote_code).vocab_size
        return server, server, rows
    if cfg.teacher.backend == "vllm":
        memory, ranks = cfg.teacher.gpu_memory_utilization, cfg.trainer.engine == "deepspeed"
        level = sleep_level(cfg.teacher.sleep, 1, "teacher.sleep")
        # scoring reads prompt + response and asks for one more token
        llm = make_llm(
            path,
            cfg.teacher.dtype,
            max_len + 1,
            max(20, teacher_k(cfg.loss)),
            memory,
            cfg.trainer.seed,
            ranks,
            level > 0,
        )
        rows = llm.llm_engine.model_config.get_vocab_size()
        engine_memory = EngineMemory(llm, level)
        return VLLMTeacher(llm, engine_memory), VLLMRollout(llm, tokenizer, engine_memory), rows
    model = load_model(
        path, "teacher.name_or_path", cfg.teacher.dtype, device, cfg.teacher.trust_remote_code, cfg.trainer.cpu_linear
    )
    rows = lm_head_weight(model).shape[0]  # before a ZeRO-3 teacher partitions it
    teacher = HFTeacher(
        model, cfg.teacher.micro_batch_size, cfg.loss.chunk_tokens, cfg.teacher.shard, cfg.teacher.temperature
    )
    sampler = HFRollout(model, tokenizer, synced=teacher.synced_generation)
    return teacher, sampler, rows
