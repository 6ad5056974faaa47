"""The rollout engines by name (``rollout.engine``).

An engine is built from the ``rollout`` config and a ``RolloutSpec`` (the student and what
the engine must hold). Adding one is a module with a class that keeps the ``RolloutEngine``
contract (``opd_cli.contracts``) and one line in ``ROLLOUT_ENGINES``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from opd_cli.contracts import RolloutEngine
from opd_cli.models.checks import check_attention_mask, choose_decoder
from opd_cli.models.loading import load_model
from opd_cli.models.vllm import colocated_engine
from opd_cli.rollout.dataset import DatasetRollout, open_dataset
from opd_cli.rollout.hf import HFRollout
from opd_cli.rollout.vllm import VLLMRollout


@dataclass
class RolloutSpec:
    """What a rollout engine is built from, besides the ``rollout`` config."""

    model: torch.nn.Module | None  # the live student; None where the engine loads its own copy (vLLM)
    tokenizer: Any
    path: str  # the student's weights on disk
    max_len: int  # the longest prompt + response the engine must hold
    dtype: str  # the dtype it samples in
    seed: int = 0
    sharded: bool = False  # the student is partitioned across ranks (ZeRO-3)
    ranks: bool = False  # one engine per rank of a DeepSpeed job
    entropy: bool = False  # record the sampler's entropy at each token (loss.entropy_top_ratio)
    task: Any = None  # the task config: how a data set's questions become prompts (rollout=dataset)
    max_logprobs: int = 20  # log-probs per position a vLLM engine may return (a live self-teacher's K scores there)


def hf_engine(rc, spec: RolloutSpec) -> RolloutEngine:
    """Our decoding loop on the live student (no copy of the weights, nothing to sync)."""
    return HFRollout(spec.model, spec.tokenizer, sharded=spec.sharded, entropy=spec.entropy)


def vllm_engine(rc, spec: RolloutSpec) -> RolloutEngine:
    """An in-process vLLM engine loaded from the student's path, fed its weights after every update."""
    memory = colocated_engine(
        spec.path, spec.dtype, spec.max_len, spec.max_logprobs, rc.gpu_memory_utilization, spec.seed, spec.ranks,
        rc.sleep, 2,
        "rollout.sleep",
    )  # fmt: skip
    return VLLMRollout(memory.llm, spec.tokenizer, memory)


def dataset_engine(rc, spec: RolloutSpec) -> RolloutEngine:
    """No sampling: each step's batch is rows of the data set at ``rollout.path`` (SFT); the student's
    evaluation samples with our decoding loop on the live student."""
    sampler = HFRollout(spec.model, spec.tokenizer, sharded=spec.sharded)
    return DatasetRollout(open_dataset(rc), rc, spec.task, spec.tokenizer, sampler)


# rollout.engine -> builder
ROLLOUT_ENGINES: dict[str, Callable[[Any, RolloutSpec], RolloutEngine]] = {
    "hf": hf_engine,
    "vllm": vllm_engine,
    "dataset": dataset_engine,
}
# the engines whose training batches are a data set's rows, not the student's samples (``DatasetEngine``)
DATA_ENGINES = frozenset({"dataset"})
# the engines that sample (the commands that need samples, opd-eval, opd-data, opd-study, take only these)
SAMPLING_ENGINES = tuple(e for e in ROLLOUT_ENGINES if e not in DATA_ENGINES)


def make_rollout(rc, spec: RolloutSpec) -> RolloutEngine:
    """The sampling engine ``rollout.engine`` (``rc.engine``) names."""
    return ROLLOUT_ENGINES[rc.engine](rc, spec)


def model_sampler(
    rc, path: str, key: str, dtype: str, trust_remote_code: bool, tokenizer, device, max_len: int, seed: int
) -> RolloutEngine:
    """A sampling engine (``rollout.engine``, ``rc``) of the model at ``path`` outside training (opd-eval,
    opd-data, opd-study): for ``hf`` the transformers model loaded here and checked as every sampler is
    (sampling reads the model's own logits; our decoders only where they equal its forward); vLLM loads
    its own copy."""
    model = None
    if rc.engine == "hf":
        model = load_model(path, key, dtype, device, trust_remote_code)
        check_attention_mask(model, key)
        choose_decoder(model)
    return make_rollout(rc, RolloutSpec(model, tokenizer, path, max_len, dtype, seed))
