"""Rollouts: the student samples responses to prompts.

``HFRollout`` uses transformers' ``generate``. A rollout engine returns a
``RolloutBatch``: prompt and response ids in one left-padded layout, masks, and
the sampler's log-probs of the sampled tokens (``old_logprobs``).

``old_logprobs`` are the student's temperature-1 log-probs of each sampled token
over the full vocabulary at rollout time (before temperature and top-p), which
is exactly what the training loss recomputes: the importance ratio is 1 on the
first mini-batch of a step. They are recorded during generation, with no
second forward pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


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

    @property
    def position_ids(self) -> torch.Tensor:
        return position_ids(self.attention_mask)

    def select(self, rows: torch.Tensor) -> RolloutBatch:
        """The sub-batch of the given rows (e.g. a micro-batch)."""
        return RolloutBatch(
            self.input_ids[rows],
            self.attention_mask[rows],
            self.response_mask[rows],
            self.old_logprobs[rows],
            self.truncated[rows],
            self.prompt_index[rows],
            self.prompt_len,
        )


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


class _SampledLogprobRecorder:
    """A logits processor that records log p(sampled token) without changing the logits.

    It runs before temperature and top-p (transformers puts custom processors
    first), sees the raw next-token logits at step t, and at step t + 1 reads which
    token was chosen. Only one step of [B, V] log-probs is held at a time.
    """

    def __init__(self) -> None:
        self.prev: torch.Tensor | None = None
        self.picked: list[torch.Tensor] = []

    def _collect(self, chosen: torch.Tensor) -> None:
        if self.prev is not None:
            self.picked.append(self.prev.gather(-1, chosen[:, None]).squeeze(-1))

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self._collect(input_ids[:, -1])
        self.prev = torch.log_softmax(scores.float(), dim=-1)
        return scores

    def finish(self, last_tokens: torch.Tensor) -> torch.Tensor:
        self._collect(last_tokens)
        return torch.stack(self.picked, dim=1)


def encode_prompts(tokenizer, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompt ids and attention mask, ``[B, P]``."""
    enc = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    width = max(len(e) for e in enc)
    ids = torch.full((len(enc), width), tokenizer.pad_token_id, dtype=torch.long)
    attn = torch.zeros((len(enc), width), dtype=torch.long)
    for i, e in enumerate(enc):
        ids[i, width - len(e) :] = torch.tensor(e)
        attn[i, width - len(e) :] = 1
    return ids, attn


def build_batch(
    ids: torch.Tensor,
    attn: torch.Tensor,
    response: torch.Tensor,
    logps: torch.Tensor,
    eos_id: int,
    n_prompts: int,
    n: int,
) -> RolloutBatch:
    """A ``RolloutBatch`` from left-padded prompts ``[B, P]`` and right-padded responses ``[B, T]``.

    ``logps`` holds the sampler's log-prob of each response token; anything after a
    row's first EOS is padding.
    """
    resp_mask, truncated = response_mask_from(response, eos_id)
    B, P = ids.shape
    zeros = torch.zeros((B, P), dtype=torch.bool)
    return RolloutBatch(
        input_ids=torch.cat([ids, response], dim=1),
        attention_mask=torch.cat([attn, resp_mask.long()], dim=1),
        response_mask=torch.cat([zeros, resp_mask], dim=1),
        old_logprobs=torch.cat([zeros.float(), logps * resp_mask], dim=1),
        truncated=truncated,
        prompt_index=torch.arange(n_prompts).repeat_interleave(n),
        prompt_len=P,
    )


def decode_responses(tokenizer, batch: RolloutBatch) -> list[str]:
    return [
        tokenizer.decode(row[batch.prompt_len :][m[batch.prompt_len :]], skip_special_tokens=True)
        for row, m in zip(batch.input_ids, batch.response_mask, strict=True)
    ]


class HFRollout:
    """Sampling with transformers' ``generate`` from the live student model."""

    def __init__(self, model, tokenizer, synced: bool = False) -> None:
        self.model = model
        self.tokenizer = tokenizer
        # ZeRO-3: every rank keeps running forward passes until all ranks are done (HF's synced_gpus)
        self.synced = synced

    @torch.no_grad()
    def generate(
        self,
        prompts: list[str],
        n: int,
        temperature: float,
        top_p: float,
        max_new_tokens: int,
        seed: int,
    ) -> RolloutBatch:
        """``n`` samples for each prompt, the samples of one prompt adjacent."""
        from transformers import GenerationConfig, LogitsProcessorList

        ids, attn = encode_prompts(self.tokenizer, prompts)
        ids, attn = ids.repeat_interleave(n, 0), attn.repeat_interleave(n, 0)
        device = self.model.device
        eos = self.tokenizer.eos_token_id
        recorder = _SampledLogprobRecorder()
        gen_cfg = GenerationConfig(
            do_sample=True,
            temperature=temperature,
            top_p=top_p,
            top_k=0,
            max_new_tokens=max_new_tokens,
            eos_token_id=eos,
            pad_token_id=self.tokenizer.pad_token_id,
        )
        torch.manual_seed(seed)
        was_training = self.model.training
        self.model.eval()
        out = self.model.generate(
            input_ids=ids.to(device),
            attention_mask=attn.to(device),
            generation_config=gen_cfg,
            logits_processor=LogitsProcessorList([recorder]),
            synced_gpus=self.synced,
        ).cpu()
        self.model.train(was_training)
        response = out[:, ids.shape[1] :]
        logps = recorder.finish(response[:, -1].to(device)).cpu()
        return build_batch(ids, attn, response, logps, eos, len(prompts), n)

    def decode_responses(self, batch: RolloutBatch) -> list[str]:
        return decode_responses(self.tokenizer, batch)

    def sync(self, model, zero3: bool) -> None:
        """Nothing to do: this engine samples from the live model."""
