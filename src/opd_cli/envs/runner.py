"""A ``task.name=env`` task's episodes: its instances, turn format and budgets, its metrics and evaluation.

The task's problems are instance numbers (``env_instances``): the first ``task.n_eval`` are held out for
evaluation, the rest are trained on. ``EpisodeRunner.run`` plays ``n`` episodes per instance with any
sampler that has ``generate_ids`` (HF or vLLM: one call per turn for every live episode), the ``n``
episodes of an instance adjacent and sharing its ``prompt_index``, like ``n`` samples of one prompt.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from opd_cli.batch import RolloutBatch, chunk_bounds
from opd_cli.envs.base import Environment, Episode
from opd_cli.envs.registry import env_factory
from opd_cli.envs.rollout import Budget, PlainFormat, TurnFormat, run_episodes
from opd_cli.errors import UserError
from opd_cli.progress import Progress
from opd_cli.tasks.problems import Problem

# task.env.format's choices
ENV_FORMATS = ("plain", "chat")

# the assistant text that marks where a turn's content goes when the chat template renders a conversation
_PLACEHOLDER = "\x00ACTION\x00"


@dataclass(frozen=True)
class ChatFormat:
    """Observations as user turns and actions as assistant turns of the tokenizer's chat template.

    A turn ends at the tokenizer's EOS (the chat model's end-of-turn token): ``after`` then starts with
    what the template writes after that token; a turn cut at its token cap is closed by the format
    (the closing text is context, not the student's). ``system``: a system message first, or None.
    """

    tokenizer: object
    system: str | None = None
    kwargs: tuple = ()  # task.chat_template_kwargs, as (key, value) pairs

    def _render(self, messages: list[dict], generation_prompt: bool) -> str:
        head = [] if self.system is None else [{"role": "system", "content": self.system}]
        return self.tokenizer.apply_chat_template(
            head + messages, tokenize=False, add_generation_prompt=generation_prompt, **dict(self.kwargs)
        )

    def first(self, observation: str) -> str:
        return self._render([{"role": "user", "content": observation}], True)

    def after(self, observation: str, closed: bool = True) -> str:
        talk = [{"role": "user", "content": "x"}, {"role": "assistant", "content": _PLACEHOLDER}]
        text = self._render([*talk, {"role": "user", "content": observation}], True)
        tail = text[text.index(_PLACEHOLDER) + len(_PLACEHOLDER) :]
        eos = self.tokenizer.eos_token or ""
        return tail[len(eos) :] if closed and eos and tail.startswith(eos) else tail


def turn_format(env_cfg, tokenizer, task_cfg) -> TurnFormat:
    """``task.env.format``: plain (observation, then ``task.env.cue``) or the student's chat template."""
    if env_cfg.format == "plain":
        return PlainFormat(env_cfg.cue)
    if tokenizer.chat_template is None:
        raise UserError("task.env.format: the student's tokenizer has no chat template; use task.env.format=plain")
    return ChatFormat(tokenizer, env_cfg.system, tuple(dict(task_cfg.chat_template_kwargs or {}).items()))


def env_instances(task_cfg, make_env: Callable[[], Environment]) -> tuple[list[Problem], list[Problem]]:
    """(train, held-out) problems of an environment task: instance numbers as questions, no gold answers."""
    n = make_env().num_instances(task_cfg.seed)
    if task_cfg.n_eval >= n:
        raise UserError(
            f"task.n_eval: the environment {task_cfg.env.name!r} has {n} instances; hold out fewer than that"
        )
    problems = [Problem(question=str(i), answer="") for i in range(n)]
    return problems[task_cfg.n_eval :], problems[: task_cfg.n_eval]


def episode_metrics(episodes: Sequence[Episode]) -> dict[str, float]:
    """Sums over a batch's episodes, to be reduced over ranks and divided by ``env/episodes``."""
    turns = sum(len(e.turns) for e in episodes)
    return {
        "env/episodes": float(len(episodes)),
        "env/success": float(sum(e.success for e in episodes)),
        "env/turns": float(turns),
        "env/action_tokens": float(sum(t.action_tokens for e in episodes for t in e.turns)),
        "env/truncated": float(sum(e.truncated for e in episodes)),
        "env/failed": float(sum(e.failed for e in episodes)),
        "env/return": float(sum(e.reward for e in episodes)),
    }


def episode_means(total: dict[str, float]) -> dict[str, float]:
    """The logged episode metrics from summed ``episode_metrics``: rates and means per episode, and the
    student's tokens per turn."""
    n = max(1.0, total["env/episodes"])
    out = {k: total[k] / n for k in ("env/success", "env/turns", "env/truncated", "env/failed", "env/return")}
    out["env/tokens_per_turn"] = total["env/action_tokens"] / max(1.0, total["env/turns"])
    return out


@dataclass
class EpisodeRunner:
    """How a run plays its environment's episodes (``task.env``), for training and evaluation."""

    make_env: Callable[[], Environment]
    fmt: TurnFormat
    tokenizer: object
    seed: int  # task.seed: which instance set
    max_turns: int
    turn_tokens: int
    stop: tuple[str, ...]

    @classmethod
    def of_task(cls, task_cfg, tokenizer) -> EpisodeRunner:
        ec = task_cfg.env
        return cls(
            env_factory(ec.name, dict(ec.args)), turn_format(ec, tokenizer, task_cfg), tokenizer, task_cfg.seed,
            ec.max_turns, ec.turn_tokens, tuple(ec.stop),
        )  # fmt: skip

    def longest_prompt(self, limit: int = 256) -> int:
        """The longest first prompt in tokens over the environment's instances (the first ``limit``)."""
        env = self.make_env()
        n = min(limit, env.num_instances(self.seed))
        encode = lambda text: self.tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
        return max(len(encode(self.fmt.first(env.reset(self.seed, i)))) for i in range(n))

    def run(
        self, sampler, instances: Sequence[int], n: int, temperature: float, top_p: float, max_tokens: int, seed: int
    ) -> tuple[list[str], RolloutBatch, list[Episode]]:
        """``n`` episodes of each instance (adjacent rows); their prompts' text (``prompt_index`` indexes it),
        the batch and the episodes. ``max_tokens`` bounds each episode's tokens after its prompt."""
        rows = [int(i) for i in instances for _ in range(n)]
        envs = [self.make_env() for _ in rows]
        budget = Budget(self.max_turns, max_tokens, self.turn_tokens)
        try:
            batch, episodes = run_episodes(
                sampler, self.tokenizer, envs, [(self.seed, i) for i in rows], self.fmt, budget, temperature, top_p,
                seed, self.stop,
            )  # fmt: skip
        finally:  # a game's interpreter (TextWorld, ALFWorld) is freed at once, not when collected
            for env in envs:
                if callable(close := getattr(env, "close", None)):
                    close()
        batch.prompt_index = torch.arange(len(instances)).repeat_interleave(n)
        P = batch.prompt_len
        prompts = [
            self.tokenizer.decode(batch.input_ids[r * n, :P][batch.attention_mask[r * n, :P].bool()])
            for r in range(len(instances))
        ]
        return prompts, batch, episodes

    def decode_responses(self, batch: RolloutBatch) -> list[str]:
        """Each row's transcript after its prompt, actions and observations (the samples log reads it)."""
        P = batch.prompt_len
        return [
            self.tokenizer.decode(row[P:][m[P:].bool()], skip_special_tokens=True)
            for row, m in zip(batch.input_ids, batch.attention_mask, strict=True)
        ]

    @torch.no_grad()
    def evaluate(
        self, sampler, problems: Sequence[Problem], ecfg, seed: int, desc: str = "eval"
    ) -> tuple[float, list[str]]:
        """The success rate of ``eval.k`` episodes per held-out instance, and every episode's transcript."""
        per_call = max(1, ecfg.batch_size // ecfg.k)
        wins, texts = 0, []
        with Progress(len(problems) * ecfg.k, desc, unit="episodes") as bar:
            for s, e in chunk_bounds(len(problems), per_call):
                instances = [int(q.question) for q in problems[s:e]]
                _, batch, episodes = self.run(
                    sampler, instances, ecfg.k, ecfg.temperature, ecfg.top_p, ecfg.max_new_tokens, seed + s
                )
                wins += sum(ep.success for ep in episodes)
                texts += self.decode_responses(batch)
                bar.update(len(episodes), success=f"{wins / len(texts):.3f}")
        return wins / max(1, len(texts)), texts
