"""Rollout samples: a few of the student's responses, for reading, in ``<run dir>/samples.jsonl``.

Every ``logger.samples_every`` training steps the step's rollout, and every evaluation (the
teacher's before training, the student's before training and at each ``eval.every`` step, and
each ``eval.benchmarks`` benchmark's), give at most ``logger.samples_per_step`` rows each
(``sample_rows``): the step, the phase (``train``, ``eval`` for the student's held-out problems,
``eval_teacher``, ``eval/<benchmark>``), the prompt, the response decoded by the rollout engine exactly as the checker reads
it, the gold answer and the checker's verdict, the response length in tokens (up to and
including EOS), whether it hit the length limit, and the mean log-prob of the sampled tokens
under the student (the sampler's recorded ``old_logprobs``) and the teacher (its
``sampled_logprob``, the one the loss uses). At an evaluation only the model that samples has
log-probs: the student's, or at ``eval_teacher`` the teacher's (the other is null). In SFT no
teacher is loaded, and a data set's responses (``rollout=dataset``) have no student log-probs:
nothing sampled them. ``logger.samples_tokens`` adds the first that many token ids with both log-probs.

Rank 0 writes the samples of its own share of a step's prompts: a sample needs no other rank's
share, so sampling adds no communication between ranks. Every rank evaluates the same problems,
so evaluation samples are the same on every rank.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import cached_property
from typing import Any

import torch

from opd_cli.batch import RolloutBatch, TeacherSupport
from opd_cli.contracts import Sampler
from opd_cli.tasks.checking import Checker
from opd_cli.tasks.problems import Problem
from opd_cli.tasks.prompts import format_prompt
from opd_cli.training.build import Parts


def pick_rows(prompt_index: torch.Tensor, limit: int) -> list[int]:
    """Up to ``limit`` rows of a batch, spread over its prompts: each prompt's first response, then each
    prompt's second, and so on; in batch order."""
    seen: dict[int, int] = {}
    nth = []
    for i in prompt_index.tolist():
        nth.append(seen.get(i, 0))
        seen[i] = nth[-1] + 1
    return sorted(sorted(range(len(nth)), key=lambda r: (nth[r], r))[:limit])


def _mean(values: torch.Tensor | None) -> float | None:
    return None if values is None or values.numel() == 0 else values.double().mean().item()


def sample_rows(
    step: int,
    phase: str,
    prompts: Sequence[str],
    batch: RolloutBatch,
    rows: Sequence[int],
    texts: Sequence[str],
    answers: Callable[[str], str | None],
    checker: Checker,
    teacher_logprob: torch.Tensor | None,
    max_tokens: int,
    by_teacher: bool = False,
) -> list[dict[str, Any]]:
    """One JSON-ready row per response ``rows`` names; ``texts[i]`` is row ``rows[i]`` decoded by the engine.

    ``prompts`` are the prompts the batch answers (``batch.prompt_index`` indexes them), ``answers``
    gives a prompt's gold answer, and ``teacher_logprob`` (or None) is the teacher's log-prob of each
    response token of the batch, flat in row-major order as ``TeacherSupport`` holds it.
    ``by_teacher``: the teacher sampled the batch, so its recorded log-probs are the teacher's.
    """
    lengths = batch.response_mask.sum(1)
    offsets = [0, *lengths.cumsum(0).tolist()]
    sampler = batch.old_logprobs[batch.response_mask]  # flat, row-major, like the teacher's
    if sampler.isnan().any():  # a data set's responses (rollout=dataset): no sampler log-probs
        sampler = None
    student, teacher_logprob = (None, sampler) if by_teacher else (sampler, teacher_logprob)
    out = []
    for r, text in zip(rows, texts, strict=True):
        prompt = prompts[int(batch.prompt_index[r])]
        answer = answers(prompt)  # None for a prompt without one: no verdict
        s = None if student is None else student[offsets[r] : offsets[r + 1]]
        t = None if teacher_logprob is None else teacher_logprob[offsets[r] : offsets[r + 1]]
        row = {
            "step": step,
            "phase": phase,
            "prompt": prompt,
            "response": text,
            "answer": answer,
            "correct": None if answer is None else bool(checker(text, answer)),
            "length": int(lengths[r]),
            "truncated": bool(batch.truncated[r]),
            "student_logprob_mean": _mean(s),
            "teacher_logprob_mean": _mean(t),
        }
        if max_tokens:
            ids = batch.input_ids[r][batch.response_mask[r]]
            row["token_ids"] = ids[:max_tokens].tolist()
            row["student_logprobs"] = None if s is None else s[:max_tokens].tolist()
            row["teacher_logprobs"] = None if t is None else t[:max_tokens].tolist()
        out.append(row)
    return out


class Recording:
    """A sampler that passes every call to ``engine`` and keeps what it sampled: the prompts and decoded
    responses of every call, in order, and the first call's batch (all an evaluation sample needs)."""

    def __init__(self, engine: Sampler) -> None:
        self.engine = engine
        self.prompts: list[str] = []  # of every generate call, in order
        self.texts: list[str] = []  # every decoded response, in order
        self.first: tuple[list[str], RolloutBatch, list[str]] | None = None  # prompts, batch, texts
        self._batch: RolloutBatch | None = None
        self._prompts: list[str] = []

    def generate(
        self, prompts: list[str], n: int, temperature: float, top_p: float, max_new_tokens: int, seed: int
    ) -> RolloutBatch:
        batch = self.engine.generate(prompts, n, temperature, top_p, max_new_tokens, seed)
        self._batch, self._prompts = batch, list(prompts)
        self.prompts += prompts
        return batch

    def decode_responses(self, batch: RolloutBatch) -> list[str]:
        texts = self.engine.decode_responses(batch)
        self.texts += texts
        if self.first is None and batch is self._batch:
            self.first = (self._prompts, batch, texts)
        return texts


class SampleLog:
    """Which responses of a run go to the logger's ``samples`` (rank 0, with ``logger.samples_every`` > 0).

    ``train`` takes a training step's rollout and the teacher's scores of it; an evaluation samples
    through a ``Recording`` of the rollout engine, which ``eval`` then reads.
    """

    def __init__(self, lcfg, logger, checker: Checker, train_answers: Callable[[], dict[str, str]]) -> None:
        """``train_answers`` makes the map of training prompt -> gold answer, called at the first sampled step."""
        self.every, self.per_step, self.max_tokens = lcfg.samples_every, lcfg.samples_per_step, lcfg.samples_tokens
        self.logger, self.checker = logger, checker
        self.make_train_answers = train_answers

    @classmethod
    def of_run(cls, lcfg, logger, p: Parts, train_problems: list[Problem], task_cfg):
        """The samples of a run: its training prompts' answers are the run's own map (``loss.outcome_weight``),
        else built from the problems."""

        def train_answers() -> dict[str, str]:
            return p.answers or {format_prompt(q, task_cfg, p.tokenizer): q.answer for q in train_problems}

        return cls(lcfg, logger, p.checker, train_answers)

    @cached_property
    def train_answers(self) -> dict[str, str]:
        return self.make_train_answers()

    def due(self, step: int) -> bool:
        return bool(self.every) and step % self.every == 0

    def train(self, step: int, prompts: list[str], batch: RolloutBatch, support: TeacherSupport | None, engine) -> None:
        """A step's rows; ``support`` None where no teacher scored them (``sft``)."""
        rows = pick_rows(batch.prompt_index, self.per_step)
        texts = engine.decode_responses(batch.select(torch.tensor(rows)))  # as outcome_scores decodes them
        teacher = None if support is None else support.sampled_logprob.detach().float().cpu()
        out = sample_rows(
            step, "train", prompts, batch, rows, texts, self.train_answers.get, self.checker, teacher, self.max_tokens
        )
        self.logger.samples(step, out)

    def eval(
        self,
        step: int,
        recording: Recording,
        answers: dict[str, str],
        phase: str = "eval",
        checker: Checker | None = None,
        by_teacher: bool = False,
    ) -> None:
        """The first responses of an evaluation that sampled through ``recording``: its prompts' gold
        ``answers``, its ``checker`` (default the task's), and whether the teacher sampled (``by_teacher``)."""
        if recording.first is None:
            return
        prompts, batch, texts = recording.first
        rows = pick_rows(batch.prompt_index, self.per_step)
        out = sample_rows(
            step, phase, prompts, batch, rows, [texts[r] for r in rows], answers.get, checker or self.checker, None,
            self.max_tokens, by_teacher,
        )  # fmt: skip
        self.logger.samples(step, out)
