"""The data that passes between the stages of a step.

A rollout engine returns a ``RolloutBatch`` (prompt and response ids in one left-padded
layout, masks, the sampler's log-probs); a teacher backend returns a ``TeacherSupport``
(flat over the batch's response tokens in row-major order). Every other stage reads these.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch


def chunk_bounds(n: int, chunk: int) -> list[tuple[int, int]]:
    return [(s, min(s + chunk, n)) for s in range(0, n, chunk)]


@dataclass
class RolloutBatch:
    """B sequences of length L = P + T (P prompt columns, T response columns).

    Prompts are left-padded into the first P columns, responses right-padded into
    the last T. Token j is predicted by the model's output at position j - 1.
    """

    input_ids: torch.Tensor  # [B, L] long
    attention_mask: torch.Tensor  # [B, L] long, 1 for real tokens (prompt and response incl. EOS)
    response_mask: torch.Tensor  # [B, L] bool, response tokens up to and including the first EOS
    old_logprobs: torch.Tensor  # [B, L] float, sampler log-prob of each response token (0 elsewhere)
    truncated: torch.Tensor  # [B] bool, response hit max_new_tokens without EOS
    prompt_index: torch.Tensor  # [B] long, which prompt of the request each sequence answers
    prompt_len: int  # P
    # [B, L] float, the sampler's temperature-1 entropy at each response token (0 elsewhere), when recorded
    entropy: torch.Tensor | None = None

    @property
    def position_ids(self) -> torch.Tensor:
        return position_ids(self.attention_mask)

    def select(self, rows: torch.Tensor) -> RolloutBatch:
        """The sub-batch of the given rows (e.g. a micro-batch), without columns that are padding in all of them."""
        used = self.attention_mask[rows].bool().any(0).nonzero().squeeze(-1)
        lo = min(int(used[0]), self.prompt_len - 1)
        cols = slice(lo, int(used[-1]) + 1)
        return RolloutBatch(
            self.input_ids[rows, cols],
            self.attention_mask[rows, cols],
            self.response_mask[rows, cols],
            self.old_logprobs[rows, cols],
            self.truncated[rows],
            self.prompt_index[rows],
            self.prompt_len - lo,
            None if self.entropy is None else self.entropy[rows, cols],
        )

    def prompt_groups(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The first row of each run of rows answering the same prompt, and each row's run number."""
        new = torch.ones_like(self.prompt_index, dtype=torch.bool)
        new[1:] = self.prompt_index[1:] != self.prompt_index[:-1]
        return new.nonzero().squeeze(-1), new.long().cumsum(0) - 1


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted from each row's first real token, as ``generate`` does.

    Scoring a left-padded batch without these would shift every position by the
    row's padding.
    """
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def response_mask_from(response: torch.Tensor, eos_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask of response tokens up to and including the first EOS; and rows with no EOS.

    ``response`` is [B, T] of generated ids (anything after the first EOS is padding).
    """
    is_eos = response == eos_id
    after_eos = (is_eos.long().cumsum(-1) - is_eos.long()) > 0  # strictly after the first EOS
    return ~after_eos, ~is_eos.any(-1)


def encode_prompts(tokenizer, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompt ids and attention mask, ``[B, P]``."""
    enc = tokenizer(list(prompts), add_special_tokens=False)["input_ids"]  # one call: the batch at once
    return left_pad(enc, tokenizer.pad_token_id)


def left_pad(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id lists as left-padded ids and attention mask, ``[B, max length]``."""
    width = max(len(e) for e in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    attn = torch.zeros((len(rows), width), dtype=torch.long)
    for i, e in enumerate(rows):
        ids[i, width - len(e) :] = torch.tensor(e, dtype=torch.long)
        attn[i, width - len(e) :] = 1
    return ids, attn


def build_batch(
    prompt_ids: torch.Tensor,
    prompt_attn: torch.Tensor,
    response: torch.Tensor,
    logps: torch.Tensor,
    eos_id: int,
    n: int,
    entropy: torch.Tensor | None = None,
) -> RolloutBatch:
    """A ``RolloutBatch`` from left-padded prompts ``[n_prompts, P]`` and their ``n`` right-padded
    responses each, ``[n_prompts * n, T]`` (a prompt's responses in adjacent rows).

    ``logps`` (and ``entropy``, if recorded) hold the sampler's log-prob of each response
    token (its distribution's entropy); anything after a row's first EOS is padding.
    """
    n_prompts = prompt_ids.shape[0]
    ids, attn = prompt_ids.repeat_interleave(n, 0), prompt_attn.repeat_interleave(n, 0)
    resp_mask, truncated = response_mask_from(response, eos_id)
    B, P = ids.shape
    zeros = torch.zeros((B, P), dtype=torch.bool)
    if entropy is not None:
        entropy = torch.cat([zeros.float(), entropy * resp_mask], dim=1)
    return RolloutBatch(
        input_ids=torch.cat([ids, response], dim=1),
        attention_mask=torch.cat([attn, resp_mask.long()], dim=1),
        response_mask=torch.cat([zeros, resp_mask], dim=1),
        old_logprobs=torch.cat([zeros.float(), logps * resp_mask], dim=1),
        truncated=truncated,
        prompt_index=torch.arange(n_prompts).repeat_interleave(n),
        prompt_len=P,
        entropy=entropy,
    )


class TokenizerDecoding:
    """``decode_responses`` for a sampler that holds the tokenizer it encoded the prompts with."""

    tokenizer: Any

    def decode_responses(self, batch: RolloutBatch) -> list[str]:
        return decode_responses(self.tokenizer, batch)


class PromptSampling(TokenizerDecoding):
    """``generate`` (prompts as text) and ``generate_ids`` (as token ids) for an engine whose ``_sample``
    samples from left-padded prompt ids and their attention mask."""

    def generate(
        self, prompts: list[str], n: int, temperature: float, top_p: float, max_new_tokens: int, seed: int
    ) -> RolloutBatch:
        """``n`` samples for each prompt, the samples of one prompt adjacent."""
        ids, attn = encode_prompts(self.tokenizer, prompts)
        return self._sample(ids, attn, n, temperature, top_p, max_new_tokens, seed)

    def generate_ids(
        self, prompt_ids: list[list[int]], n: int, temperature: float, top_p: float, max_new_tokens: int, seed: int
    ) -> RolloutBatch:
        """``generate`` from prompts given as token ids (e.g. a prompt and the start of a response, to continue)."""
        ids, attn = left_pad(prompt_ids, self.tokenizer.pad_token_id)
        return self._sample(ids, attn, n, temperature, top_p, max_new_tokens, seed)

    def _sample(self, ids, attn, n, temperature, top_p, max_new_tokens, seed) -> RolloutBatch:
        raise NotImplementedError


def decode_responses(tokenizer, batch: RolloutBatch) -> list[str]:
    return [
        tokenizer.decode(row[batch.prompt_len :][m[batch.prompt_len :]], skip_special_tokens=True)
        for row, m in zip(batch.input_ids, batch.response_mask, strict=True)
    ]


@dataclass
class TeacherSupport:
    topk_ids: torch.Tensor  # [N, K] long, the teacher's K most likely ids (descending)
    topk_logprobs: torch.Tensor  # [N, K] float, their log-probs (full-vocabulary normalized)
    sampled_logprob: torch.Tensor  # [N] float, log q(y_t) of the sampled token
    entropy: torch.Tensor  # [N] float, H(q_t) over the full vocabulary
    hidden: torch.Tensor | None = None  # [N, d_t] final hidden states, when "full" is asked for


def merge_supports(parts: list[tuple[list[int], TeacherSupport]], lengths: list[int]) -> TeacherSupport:
    """One batch's ``TeacherSupport`` from the supports of disjoint sets of its rows (each a row subset's, flat
    over that subset's response tokens in row order), back in the batch's row order; ``lengths[r]`` is row
    ``r``'s number of response tokens. Every part supplies the same fields."""
    pieces: dict[int, dict[str, torch.Tensor | None]] = {}
    names = [f.name for f in dataclasses.fields(TeacherSupport)]
    for rows, support in parts:
        split = {
            n: None if getattr(support, n) is None else getattr(support, n).split([lengths[r] for r in rows])
            for n in names
        }
        for j, r in enumerate(rows):
            pieces[r] = {n: None if split[n] is None else split[n][j] for n in names}
    if sorted(pieces) != list(range(len(lengths))):
        raise ValueError("merge_supports: the parts must cover every row of the batch once")
    order = [pieces[r] for r in range(len(lengths))]
    return TeacherSupport(**{n: None if order[0][n] is None else torch.cat([o[n] for o in order]) for n in names})
