"""The environment interface of multi-turn rollouts, and the record of one episode.

An environment is reset to one instance (deterministic per ``(seed, instance)``) and answers
the first observation; each action (the student's turn, as text) gets an observation, a
reward and whether the episode is over; ``success`` says at the end whether the task was
solved. This is gymnasium's ``reset``/``step`` with text in and out, as in the multi-turn
environments of the ``verifiers`` package.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable


@dataclass(frozen=True)
class StepResult:
    """What the environment answers to one action."""

    observation: str  # shown to the student before its next turn (ignored when ``done``)
    reward: float
    done: bool  # the episode is over (solved, failed for good, or the environment's own turn limit)


@runtime_checkable
class Environment(Protocol):
    """A text environment that one episode at a time runs in.

    An instance is one object per live episode: a rollout of B episodes holds B of them.
    """

    def num_instances(self, seed: int) -> int:
        """How many distinct instances ``reset`` has under ``seed`` (instance ``i`` and ``i + n`` are the same).

        A run holds out instances ``0 .. task.n_eval - 1`` for evaluation and trains on the rest."""
        ...

    def reset(self, seed: int, instance: int) -> str:
        """Start instance ``instance`` of the environment's set under ``seed``; the first observation.

        The same ``(seed, instance)`` must give the same episode for the same actions.
        """
        ...

    def step(self, action: str) -> StepResult:
        """Apply the student's action (its turn's text, stop string and EOS removed)."""
        ...

    def success(self) -> bool:
        """Whether the episode so far solved the task (read once it is over)."""
        ...


@dataclass(frozen=True)
class Turn:
    """One student turn and the environment's answer to it."""

    action: str
    # the environment's answer: not shown to the student when the episode ended here; "" if it raised
    observation: str
    reward: float
    action_tokens: int  # tokens the student generated this turn (stop string / EOS included)


@dataclass
class Episode:
    """One episode of a multi-turn rollout.

    ``truncated``: it ran out of the rollout's turn or token budget before the environment said
    done. ``failed``: the environment raised while stepping; ``error`` holds the exception's
    message, and the episode ends there (its tokens so far stay in the batch).
    """

    seed: int
    instance: int
    first_observation: str
    turns: list[Turn] = field(default_factory=list)
    success: bool = False
    truncated: bool = False
    failed: bool = False
    error: str | None = None

    @property
    def reward(self) -> float:
        """The episode's return: the sum of its turns' rewards."""
        return sum(t.reward for t in self.turns)
