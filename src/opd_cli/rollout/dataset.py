"""``rollout.engine=dataset``: training batches from a saved data set instead of the student's samples (SFT).

The data set is a Hugging Face ``datasets.Dataset`` saved with ``save_to_disk`` at ``rollout.path``
(``opd-data teacher-rollouts`` writes one), a question and a response text per row (columns
``rollout.question_key`` and ``rollout.response_key``). A row becomes one sequence of a
``RolloutBatch``, laid out as the sampling engines lay out theirs:

- the prompt is the question through ``task.template`` and the student's chat template
  (``format_prompt``), encoded as ``encode_prompts`` encodes every training prompt;
- the response is ``tokenizer(response, add_special_tokens=False)`` plus the student's EOS, cut at
  ``rollout.max_new_tokens`` tokens (a cut row has no EOS and counts as ``truncated``, so the
  step's ``response_clip_ratio`` is the share of its rows that were cut);
- nothing was sampled, so ``old_logprobs`` is NaN at every response token: only an objective that
  reads neither it nor the teacher (``loss=sft``) may train on this engine (``config.validate``).

Which rows a step trains on is the loop's choice (``training.data.step_indices``); ``batch_of``
makes the batch of given row indices. Rows whose prompt is longer than ``rollout.max_prompt_tokens``
are left out when the engine is built, as the sampling engines' training prompts are. The
student's evaluation samples with ``HFRollout`` (``generate``).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from opd_cli.batch import RolloutBatch, TokenizerDecoding, encode_prompts
from opd_cli.errors import UserError
from opd_cli.rollout.hf import HFRollout
from opd_cli.tasks.problems import Problem
from opd_cli.tasks.prompts import format_prompt

log = logging.getLogger(__name__)


def open_dataset(rc) -> Any:
    """The data set at ``rollout.path`` (``rc``: the rollout config), checked: one split, at least one row, and
    text columns ``rollout.question_key`` and ``rollout.response_key``; one ``UserError`` line otherwise."""
    import datasets

    path = rc.path
    if not path:
        raise UserError(
            "rollout.path: rollout=dataset trains on a data set saved with save_to_disk (opd-data teacher-rollouts "
            "writes <out>/data); give rollout.path=<dir>"
        )
    if not Path(path).exists():
        raise UserError(f"rollout.path: not found: {path}")
    if _saved_without_rows(Path(path)):  # load_from_disk fails on one (an IndexError)
        raise UserError(f"rollout.path: the data set at {path} has no rows")
    try:
        data = datasets.load_from_disk(str(path))
    except Exception as e:  # not a save_to_disk directory, or an unreadable one
        first = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise UserError(f"rollout.path: {path} is not a data set saved with save_to_disk ({first})") from None
    if isinstance(data, datasets.DatasetDict):
        splits = list(data)
        raise UserError(
            f"rollout.path: {path} holds several splits ({', '.join(splits)}); give one split's directory, "
            f"e.g. {Path(path) / splits[0]}"
        )
    if data.num_rows == 0:
        raise UserError(f"rollout.path: the data set at {path} has no rows")
    for key in ("question_key", "response_key"):
        column = getattr(rc, key)
        if column not in data.column_names:
            raise UserError(
                f"rollout.{key}: the data set at {path} has no column '{column}' "
                f"(its columns: {', '.join(data.column_names)})"
            )
        feature = data.features[column]
        if getattr(feature, "dtype", None) not in ("string", "large_string"):
            raise UserError(f"rollout.{key}: column '{column}' of the data set at {path} holds {feature}, not text")
    return data


def _saved_without_rows(path: Path) -> bool:
    """A ``save_to_disk`` directory of a data set with no rows: its state lists no data files."""
    try:
        return json.loads((path / "state.json").read_text()).get("_data_files") == []
    except (OSError, ValueError, AttributeError):
        return False


def response_ids(tokenizer, responses: list[str], max_new_tokens: int) -> tuple[list[list[int]], list[bool]]:
    """Each response's token ids with the tokenizer's EOS appended, cut at ``max_new_tokens``; and which were cut."""
    eos = tokenizer.eos_token_id
    enc = tokenizer(list(responses), add_special_tokens=False)["input_ids"] if responses else []
    full = [ids + [eos] for ids in enc]
    return [ids[:max_new_tokens] for ids in full], [len(ids) > max_new_tokens for ids in full]


def fixed_batch(
    prompt_ids: torch.Tensor, prompt_attn: torch.Tensor, responses: list[list[int]], cut: list[bool], pad: int
):
    """A ``RolloutBatch`` of given responses, one per left-padded prompt (``prompt_index`` is the row).

    Responses are right-padded with ``pad``; ``old_logprobs`` is NaN at response tokens (nothing sampled them).
    """
    B, P = prompt_ids.shape
    T = max(len(r) for r in responses)
    response = torch.full((B, T), pad, dtype=torch.long)
    mask = torch.zeros((B, T), dtype=torch.bool)
    for i, r in enumerate(responses):
        response[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = True
    zeros = torch.zeros((B, P), dtype=torch.bool)
    return RolloutBatch(
        input_ids=torch.cat([prompt_ids, response], dim=1),
        attention_mask=torch.cat([prompt_attn, mask.long()], dim=1),
        response_mask=torch.cat([zeros, mask], dim=1),
        old_logprobs=torch.cat([zeros.float(), torch.full((B, T), float("nan")).masked_fill(~mask, 0.0)], dim=1),
        truncated=torch.tensor(cut, dtype=torch.bool),
        prompt_index=torch.arange(B),
        prompt_len=P,
    )


class DatasetRollout(TokenizerDecoding):
    """Training batches from a data set's rows (``batch_of``); evaluation samples from the live student."""

    def __init__(self, data, rc, task_cfg, tokenizer, sampler: HFRollout) -> None:
        """``data``: the checked data set (``open_dataset``); ``rc``: the rollout config; ``task_cfg``: how prompts
        are formatted; ``sampler``: what ``generate`` (the student's evaluation) samples with."""
        self.tokenizer, self.sampler, self.max_new_tokens = tokenizer, sampler, rc.max_new_tokens
        questions = list(data[rc.question_key])
        self.responses = data.select_columns([rc.response_key])
        self.response_key = rc.response_key
        # one prompt per distinct question: its text and length, to leave out prompts that are too long
        prompts = {q: format_prompt(Problem(q, ""), task_cfg, tokenizer) for q in dict.fromkeys(questions)}
        encoded = tokenizer(list(prompts.values()), add_special_tokens=False)["input_ids"]
        lengths = {q: len(ids) for q, ids in zip(prompts, encoded, strict=True)}
        self.rows = [i for i, q in enumerate(questions) if lengths[q] <= rc.max_prompt_tokens]
        self.prompts = [prompts[questions[i]] for i in self.rows]
        if len(self.rows) < len(questions):
            log.warning(
                "%d of %d data set rows have a prompt longer than rollout.max_prompt_tokens and are left out",
                len(questions) - len(self.rows), len(questions),
            )  # fmt: skip
        if not self.rows:
            raise UserError("rollout.max_prompt_tokens: every data set row's prompt is longer than this")

    @property
    def num_rows(self) -> int:
        """Rows a step may draw from (those whose prompt fits ``rollout.max_prompt_tokens``)."""
        return len(self.rows)

    def batch_of(self, indices: list[int]) -> tuple[list[str], RolloutBatch]:
        """The prompts and the batch of rows ``indices`` (in ``range(num_rows)``), in that order."""
        prompts = [self.prompts[i] for i in indices]
        texts = self.responses[[self.rows[i] for i in indices]][self.response_key]
        ids, attn = encode_prompts(self.tokenizer, prompts)
        responses, cut = response_ids(self.tokenizer, texts, self.max_new_tokens)
        return prompts, fixed_batch(ids, attn, responses, cut, self.tokenizer.pad_token_id)

    def generate(
        self, prompts: list[str], n: int, temperature: float, top_p: float, max_new_tokens: int, seed: int
    ) -> RolloutBatch:
        """The student's samples (its evaluation), from the live model."""
        return self.sampler.generate(prompts, n, temperature, top_p, max_new_tokens, seed)

    def release(self) -> None:
        """Nothing to do: this engine holds no memory of its own."""

    def sync(self, model, sharded: bool) -> None:
        """Nothing to do: its sampler is the live model."""
