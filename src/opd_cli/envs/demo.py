"""The built-in demo environment: reach a target number by adding or subtracting single digits.

Small enough for the demo models to learn. The observation names the current number and the
target (both two-digit); an action is ``add N`` or ``sub N`` with N a single digit 1-9. The
episode is done when the number equals the target (reward 1, success) or after ``max_turns``
actions. An action that does not parse changes nothing and says so. Each instance starts 10-36
away from its target, so the expert (``expert_action``: the largest step towards the target)
needs 2-4 turns, and its action follows from the observation alone.
"""

from __future__ import annotations

import functools
import random
import re

from opd_cli.envs.base import StepResult

ACTION = re.compile(r"^\s*(add|sub)\s+([1-9])\s*$")
OBSERVATION = re.compile(r"Number: (\d+)\. Target: (\d+)\.")

# instances start this far (inclusive) from their target: ceil(distance / 9) = 2..4 expert turns
DISTANCE = (10, 36)


@functools.cache
def instance_pairs(seed: int) -> tuple[tuple[int, int], ...]:
    """Every (start, target) pair of two-digit numbers 10-36 apart, in one order shuffled by ``seed``."""
    pairs = [(a, b) for a in range(10, 100) for b in range(10, 100) if DISTANCE[0] <= abs(a - b) <= DISTANCE[1]]
    random.Random(f"reach-target/{seed}").shuffle(pairs)
    return tuple(pairs)


def instance_numbers(seed: int, instance: int) -> tuple[int, int]:
    """The start and target of instance ``instance`` under ``seed``: distinct pairs for the instances
    ``0 .. len(instance_pairs(seed)) - 1`` (so held-out instances never appear in training), then again."""
    pairs = instance_pairs(seed)
    return pairs[instance % len(pairs)]


def observation(number: int, target: int) -> str:
    return f"Number: {number}. Target: {target}."


def expert_action(obs: str) -> str:
    """The shortest way to the target, one step of at most 9 at a time, read from an observation."""
    m = OBSERVATION.search(obs)
    if m is None:
        raise ValueError(f"not an observation of the reach-target environment: {obs!r}")
    gap = int(m.group(2)) - int(m.group(1))
    return f"add {min(gap, 9)}" if gap > 0 else f"sub {min(-gap, 9)}"


class ReachTarget:
    """The demo environment (module docstring); one object per live episode."""

    def __init__(self, max_turns: int = 6) -> None:
        self.max_turns = max_turns
        self.number = self.target = self.turns = 0

    def num_instances(self, seed: int) -> int:
        return len(instance_pairs(seed))

    def reset(self, seed: int, instance: int) -> str:
        self.number, self.target = instance_numbers(seed, instance)
        self.turns = 0
        return observation(self.number, self.target)

    def step(self, action: str) -> StepResult:
        self.turns += 1
        m = ACTION.match(action)
        if m is None:
            prefix = "Invalid action. "  # short: the demo models read it on every later turn
        else:
            n = int(m.group(2))
            # stay two-digit: a step past 10 or 99 stops there
            self.number = min(99, max(10, self.number + (n if m.group(1) == "add" else -n)))
            prefix = ""
        solved = self.success()
        done = solved or self.turns >= self.max_turns
        return StepResult(prefix + observation(self.number, self.target), 1.0 if solved else 0.0, done)

    def success(self) -> bool:
        return self.number == self.target
