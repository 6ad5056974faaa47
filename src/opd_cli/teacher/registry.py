"""The teacher backends by name (``teacher.backend``), and the check that one supplies what the objective needs.

A backend is built from the config, the teacher's path, its tokenizer, the device and the
longest sequence it must score; it returns the ``TeacherBackend``, a ``Sampler`` for the
teacher's own evaluation, and the number of rows of the teacher's LM head (checked against
the student's). Adding one is a module keeping the ``TeacherBackend`` contract
(``opd_cli.contracts``) and one line in ``TEACHER_BACKENDS``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers import AutoConfig

from opd_cli.contracts import Sampler, TeacherBackend
from opd_cli.errors import UserError
from opd_cli.models.checks import check_model
from opd_cli.models.loading import lm_head_weight, load_model
from opd_cli.models.vllm import colocated_engine
from opd_cli.objectives.base import Objective
from opd_cli.objectives.registry import teacher_k
from opd_cli.rollout.hf import HFRollout
from opd_cli.rollout.vllm import VLLMRollout
from opd_cli.teacher.context import is_live
from opd_cli.teacher.hf import HFTeacher
from opd_cli.teacher.server import VLLMServerTeacher
from opd_cli.teacher.vllm import VLLMTeacher

Built = tuple[TeacherBackend, Sampler, int]


def check_teacher_supplies(objective: Objective, supplies: frozenset[str], backend: str) -> None:
    """Refuse, in one line, an objective that needs what the teacher backend cannot give."""
    if missing := objective.teacher_needs - supplies:
        raise UserError(
            f"loss: '{objective.name}' needs {', '.join(sorted(missing))} from the teacher, which "
            f"teacher.backend={backend} cannot supply (it gives {', '.join(sorted(supplies))})"
        )


def hf_backend(cfg, path: str, tokenizer, device: torch.device, max_len: int) -> Built:
    """The teacher as an in-process transformers model (optionally ZeRO-3 sharded: ``teacher.shard``)."""
    tc = cfg.teacher
    model = load_model(path, "teacher.name_or_path", tc.dtype, device, tc.trust_remote_code, cfg.trainer.cpu_linear)
    check_model(model, "teacher.name_or_path", sampling=True)  # before a ZeRO-3 teacher partitions it
    rows = lm_head_weight(model).shape[0]
    teacher = HFTeacher(model, tc.micro_batch_size, cfg.loss.chunk_tokens, tc.shard, tc.temperature)
    return teacher, HFRollout(model, tokenizer, sharded=teacher.sharded), rows


def vllm_backend(cfg, path: str, tokenizer, device: torch.device, max_len: int) -> Built:
    """An in-process vLLM engine, or the server at ``teacher.url``."""
    tc = cfg.teacher
    if tc.url:
        server = VLLMServerTeacher(tc.url, tokenizer)
        return server, server, AutoConfig.from_pretrained(path, trust_remote_code=tc.trust_remote_code).vocab_size
    ranks = cfg.trainer.engine == "deepspeed"
    # scoring reads prompt + response and asks for one more token
    memory = colocated_engine(
        path, tc.dtype, max_len + 1, max(20, teacher_k(cfg.loss)), tc.gpu_memory_utilization, cfg.trainer.seed,
        ranks, tc.sleep, 1, "teacher.sleep",
    )  # fmt: skip
    rows = memory.llm.llm_engine.model_config.get_vocab_size()
    return VLLMTeacher(memory.llm, memory), VLLMRollout(memory.llm, tokenizer, memory), rows


def live_teacher(cfg, model, sharded: bool, rollout) -> tuple[TeacherBackend, Sampler]:
    """The student's current weights as its own teacher (``teacher=self teacher.self_weights=live``), and the
    sampler of its evaluation (the student's rollout engine, after the teacher's prompts): the trained model
    itself (hf), or the rollout's vLLM engine, which holds the weights that sampled the step (vllm)."""
    tc = cfg.teacher
    if tc.backend == "vllm":
        return VLLMTeacher(rollout.llm), rollout
    return HFTeacher(model, tc.micro_batch_size, cfg.loss.chunk_tokens, False, tc.temperature, True, sharded), rollout


def backend_supplies(tc, student_sharded: bool = False) -> frozenset[str]:
    """What the teacher backend ``tc`` (a teacher config) supplies, known before it is built
    (``student_sharded``: the student is ZeRO-3 partitioned, which a live self-teacher shares)."""
    if tc.backend == "vllm":
        return VLLMTeacher.supplies
    partitioned = tc.shard or (is_live(tc) and student_sharded)
    return frozenset({"sampled_logprob", "topk"}) if partitioned else HFTeacher.supplies


# teacher.backend -> builder
TEACHER_BACKENDS: dict[str, Callable[..., Built]] = {"hf": hf_backend, "vllm": vllm_backend}


def make_teacher(cfg, path: str, tokenizer, device: torch.device, max_len: int) -> Built:
    """The teacher backend ``teacher.backend`` names, a sampler for its evaluation, and its head's rows."""
    return TEACHER_BACKENDS[cfg.teacher.backend](cfg, path, tokenizer, device, max_len)
