"""The contracts between the stages of a step, as ``typing.Protocol`` classes.

A training step is: a ``RolloutEngine`` samples responses (``RolloutBatch``), a
``TeacherBackend`` scores them (``TeacherSupport``), an ``Objective``
(``opd_cli.objectives.base``) turns both into per-token losses, and a ``Trainer``
runs the student's forward and backward and steps the optimizer. Each protocol
states the rules an implementation must keep; the registries (``rollout.registry``,
``teacher.registry``, ``objectives.registry``, ``training.trainers``) map config
values to implementations.

``sharded`` is one name for one fact everywhere: the model's parameters are
partitioned across ranks (DeepSpeed ZeRO-3), so every rank must run the same number
of forward passes, and reading a weight outside a module's forward needs a gather.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, runtime_checkable

import torch

from opd_cli.batch import RolloutBatch, TeacherSupport


@runtime_checkable
class Sampler(Protocol):
    """Samples responses to prompts (the student's rollout engine, or a teacher for its evaluation)."""

    def generate(
        self, prompts: list[str], n: int, temperature: float, top_p: float, max_new_tokens: int, seed: int
    ) -> RolloutBatch:
        """``n`` responses per prompt, the responses of one prompt in adjacent rows (``prompt_index``).

        The same ``seed`` and weights give the same samples: each sample's randomness is
        derived from ``seed`` (and its position), not from a global generator.
        """
        ...

    def decode_responses(self, batch: RolloutBatch) -> list[str]:
        """Each row's response as text, special tokens left out."""
        ...


@runtime_checkable
class RolloutEngine(Sampler, Protocol):
    """The student's sampler during training (``rollout.engine``).

    The one rule every engine keeps: ``RolloutBatch.old_logprobs`` holds, at each sampled
    token, the student's log-prob of it over the full vocabulary at temperature 1 (before
    temperature and top-p), from the weights that sampled it. The trainer recomputes exactly
    this, so the importance ratio of a step's first mini-batch is 1.
    """

    def release(self) -> None:
        """Give back memory the engine holds between rollouts (vLLM's sleep mode); may do nothing."""
        ...

    def sync(self, model: torch.nn.Module, sharded: bool) -> None:
        """Sample from ``model``'s current weights from now on (gathering them first when ``sharded``).

        An engine that samples from the live model has nothing to do.
        """
        ...


@runtime_checkable
class DatasetEngine(RolloutEngine, Protocol):
    """A rollout engine whose training batches are rows of a data set, not samples (``rollout=dataset``: SFT).

    The loop picks each step's rows (``training.data.step_indices`` over ``num_rows``) and asks for
    their batch; ``generate`` still samples from the student, for its evaluation. Its batches break
    ``RolloutEngine``'s rule on ``old_logprobs`` (nothing sampled them: NaN), so only an objective that
    reads neither them nor the teacher trains on one.
    """

    @property
    def num_rows(self) -> int: ...

    def batch_of(self, indices: list[int]) -> tuple[list[str], RolloutBatch]:
        """The prompts of rows ``indices`` (each in ``range(num_rows)``) and their batch, one sequence per row
        in that order (``prompt_index`` is the row's position)."""
        ...


@runtime_checkable
class TeacherBackend(Protocol):
    """Scores a rollout batch with the teacher (``teacher.backend``).

    ``supplies`` names what it can give (``sampled_logprob``, ``topk``, ``full``); an
    objective whose ``teacher_needs`` are not covered is refused at start-up. ``head`` is
    the teacher's LM head for objectives that need the full distribution (with
    ``TeacherSupport.hidden``), or None.
    """

    supplies: frozenset[str]
    sharded: bool

    @property
    def head(self) -> torch.Tensor | None: ...

    def score(self, batch: RolloutBatch, k: int, keep_hidden: bool = False) -> TeacherSupport:
        """The teacher's top-``k`` ids and log-probs, its log-prob of each sampled token and its
        entropy at every response token, flat in row-major order over ``batch.response_mask``
        (the order the student's pass uses); full-vocabulary, temperature-1 values unless the
        config asks for a teacher temperature."""
        ...


@runtime_checkable
class Trainer(Protocol):
    """Runs the student's forward and backward and owns its optimizer and LR schedule (``trainer.engine``).

    ``model`` is the live HF student (sampled from, evaluated, saved). ``loss`` returns a
    micro-batch's loss sum (already weighted by ``TokenInputs.loss_weight``) and its
    diagnostics; ``backward`` accumulates its gradient; ``optimizer_step`` clips, steps and
    zeroes, returning the gradient norm before clipping; ``end_step`` advances the LR schedule
    once per training step and returns the learning rate the step used.
    """

    model: torch.nn.Module
    sharded: bool

    def loss(self, micro: RolloutBatch, x, objective, chunk_tokens: int, bucket_tokens: int): ...

    def backward(self, loss: torch.Tensor) -> None: ...

    def optimizer_step(self) -> float: ...

    def end_step(self) -> float: ...

    def save(self, run_dir: Path, step: int, tokenizer, state: dict) -> Path: ...

    def load(self, ckpt: Path) -> dict: ...
