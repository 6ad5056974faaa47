"""Multi-turn rollouts: the student's turns alternate with the environment's observations.

Each round, one turn is sampled for every live episode at once (``generate_ids`` on each
episode's token ids so far, so the student sees the whole transcript); a turn ends at EOS, at
a stop string or at the per-turn token cap. Its text goes to the episode's environment, and
the observation's tokens are appended as context. An episode ends when the environment says
done, when an environment raises (that episode is ``failed``, the others go on), or at the
rollout's turn or token budget (``truncated``).

The result is one ``RolloutBatch``: the prompt columns hold the first observation (as the
``TurnFormat`` renders it), the response columns every later token, actions and observations
alike. ``attention_mask`` is 1 on all of them; ``response_mask`` only on the student's action
tokens, which alone get a loss and a teacher's reward (the scoring pass attends over the
observations: ``opd_cli.models.packed``); ``old_logprobs`` holds the sampler's log-prob at each
action token.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from opd_cli.batch import RolloutBatch, left_pad
from opd_cli.envs.base import Environment, Episode, Turn

log = logging.getLogger(__name__)


class TurnSampler(Protocol):
    """What samples a turn: ``PromptSampling.generate_ids`` (e.g. ``HFRollout``)."""

    def generate_ids(
        self, prompt_ids: list[list[int]], n: int, temperature: float, top_p: float, max_new_tokens: int, seed: int
    ) -> RolloutBatch: ...


class TurnFormat(Protocol):
    """How observations become text around the student's turns (a plain template or a chat template)."""

    def first(self, observation: str) -> str:
        """The prompt: the first observation and whatever cues the student's first turn."""
        ...

    def after(self, observation: str, closed: bool = True) -> str:
        """The text appended after a student's turn: the observation and the cue of the next turn.

        ``closed``: the turn ended at EOS (its tokens hold it); else the format closes the turn itself."""
        ...


@dataclass(frozen=True)
class PlainFormat:
    """A plain template: each observation on its own line, then ``cue`` (the student writes after it)."""

    cue: str = "\nAction:"

    def first(self, observation: str) -> str:
        return observation + self.cue

    def after(self, observation: str, closed: bool = True) -> str:
        return "\n" + observation + self.cue


@dataclass(frozen=True)
class Budget:
    """The rollout's limits on an episode; an episode that reaches one before done is ``truncated``."""

    max_turns: int  # student turns
    max_tokens: int  # tokens after the prompt: actions and observations together
    turn_tokens: int  # tokens of one student turn

    def __post_init__(self) -> None:
        for name in ("max_turns", "max_tokens", "turn_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"Budget.{name} must be at least 1, not {getattr(self, name)}")


@dataclass
class Transcript:
    """One episode's token ids: its prompt, then every later token, each an action token or not."""

    prompt: list[int]
    tokens: list[int] = field(default_factory=list)
    action: list[bool] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)  # the sampler's, 0 at observation tokens
    entropy: list[float] | None = field(default_factory=list)  # the sampler's, when every turn recorded it

    def add_action(self, ids: list[int], logprobs: list[float], entropy: list[float] | None) -> None:
        if len(logprobs) != len(ids) or (entropy is not None and len(entropy) != len(ids)):
            raise ValueError(f"an action of {len(ids)} tokens needs as many log-probs (and entropies, if any)")
        self.tokens += ids
        self.action += [True] * len(ids)
        self.logprobs += logprobs
        if entropy is None:
            self.entropy = None
        elif self.entropy is not None:
            self.entropy += entropy

    def add_observation(self, ids: list[int]) -> None:
        self.tokens += ids
        self.action += [False] * len(ids)
        self.logprobs += [0.0] * len(ids)
        if self.entropy is not None:
            self.entropy += [0.0] * len(ids)


def turn_length(ids: list[int], eos_id: int, stop: Sequence[str], decode: Callable[[list[int]], str]) -> int:
    """How many of a turn's generated tokens it keeps: up to and including the first EOS or the token
    that completes a stop string; all of them when neither occurs."""
    for k in range(1, len(ids) + 1):
        if ids[k - 1] == eos_id or (stop and any(s in decode(ids[:k]) for s in stop)):
            return k
    return len(ids)


def action_text(text: str, stop: Sequence[str]) -> str:
    """A turn's text as the environment gets it: everything before the first stop string."""
    cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=len(text))
    return text[:cut]


def prompt_runs(prompts: list[list[int]]) -> torch.Tensor:
    """``prompt_index``: adjacent rows with the same prompt share one (the packed pass encodes it once)."""
    index = [0]
    for prev, cur in zip(prompts, prompts[1:], strict=False):
        index.append(index[-1] + (cur != prev))
    return torch.tensor(index, dtype=torch.long)


def to_batch(transcripts: list[Transcript], truncated: list[bool], pad_id: int) -> RolloutBatch:
    """The ``RolloutBatch`` of finished transcripts (layout: module docstring)."""
    prompt_ids, prompt_attn = left_pad([t.prompt for t in transcripts], pad_id)
    B, T = len(transcripts), max(1, max(len(t.tokens) for t in transcripts))
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    attn = torch.zeros((B, T), dtype=torch.long)
    action = torch.zeros((B, T), dtype=torch.bool)
    logps = torch.zeros((B, T))
    with_entropy = all(t.entropy is not None for t in transcripts)
    ents = torch.zeros((B, T))
    for r, t in enumerate(transcripts):
        n = len(t.tokens)
        ids[r, :n] = torch.tensor(t.tokens, dtype=torch.long)
        attn[r, :n] = 1
        action[r, :n] = torch.tensor(t.action, dtype=torch.bool)
        logps[r, :n] = torch.tensor(t.logprobs)
        if with_entropy:
            ents[r, :n] = torch.tensor(t.entropy)
    zeros = torch.zeros(prompt_ids.shape)
    return RolloutBatch(
        input_ids=torch.cat([prompt_ids, ids], dim=1),
        attention_mask=torch.cat([prompt_attn, attn], dim=1),
        response_mask=torch.cat([zeros.bool(), action], dim=1),
        old_logprobs=torch.cat([zeros, logps], dim=1),
        truncated=torch.tensor(truncated, dtype=torch.bool),
        prompt_index=prompt_runs([t.prompt for t in transcripts]),
        prompt_len=prompt_ids.shape[1],
        entropy=torch.cat([zeros, ents], dim=1) if with_entropy else None,
    )


def run_episodes(
    sampler: TurnSampler,
    tokenizer,
    envs: Sequence[Environment],
    instances: Sequence[tuple[int, int]],
    fmt: TurnFormat,
    budget: Budget,
    temperature: float,
    top_p: float,
    seed: int,
    stop: Sequence[str] = (),
) -> tuple[RolloutBatch, list[Episode]]:
    """Run one episode per environment, ``envs[i]`` reset to ``instances[i] = (seed, instance)``.

    Returns the batch (module docstring; row i is episode i) and the episodes. Round ``r``
    samples with seed ``seed + r``. An environment that raises in ``reset`` is not caught: there is
    no episode to record.
    """
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
    eos = tokenizer.eos_token_id
    episodes, transcripts = [], []
    for env, (s, i) in zip(envs, instances, strict=True):
        obs = env.reset(s, i)
        episodes.append(Episode(s, i, obs))
        transcripts.append(Transcript(encode(fmt.first(obs))))
    live = list(range(len(envs)))
    rnd = 0
    while live:
        # every live episode has room for at least one more token (checked when its observation was added)
        caps = [min(budget.turn_tokens, budget.max_tokens - len(transcripts[e].tokens)) for e in live]
        out = sampler.generate_ids(
            [transcripts[e].prompt + transcripts[e].tokens for e in live], 1, temperature, top_p, max(caps), seed + rnd
        )
        P = out.prompt_len
        still = []
        for row, (e, cap) in enumerate(zip(live, caps, strict=True)):
            m = out.response_mask[row, P:]
            ids = out.input_ids[row, P:][m].tolist()[:cap]
            k = turn_length(ids, eos, stop, decode)
            ids = ids[:k]
            lps = out.old_logprobs[row, P:][m].tolist()[:k]
            ents = None if out.entropy is None else out.entropy[row, P:][m].tolist()[:k]
            transcripts[e].add_action(ids, lps, ents)
            ep, action = episodes[e], action_text(decode(ids), stop)
            try:
                res = envs[e].step(action)
            except Exception as exc:  # noqa: BLE001 - any error of the environment ends only its episode
                log.warning("environment of episode %d (instance %d) raised in step: %r", e, ep.instance, exc)
                ep.turns.append(Turn(action, "", 0.0, k))
                ep.failed, ep.error = True, f"{type(exc).__name__}: {exc}"
                continue
            ep.turns.append(Turn(action, res.observation, res.reward, k))
            if res.done:
                continue
            obs_ids = encode(fmt.after(res.observation, bool(ids) and ids[-1] == eos))
            # out of turns, or no room for the observation and one token of a next turn
            if len(ep.turns) >= budget.max_turns or len(transcripts[e].tokens) + len(obs_ids) >= budget.max_tokens:
                ep.truncated = True
                continue
            transcripts[e].add_observation(obs_ids)
            still.append(e)
        live, rnd = still, rnd + 1
    for ep, env in zip(episodes, envs, strict=True):
        if not ep.failed:
            ep.success = bool(env.success())
    batch = to_batch(transcripts, [ep.truncated for ep in episodes], tokenizer.pad_token_id)
    return batch, episodes
