"""Teacher scoring: one forward pass over prompt + response per sequence.

A teacher backend fills a ``TeacherSupport``, flat over the batch's response
tokens in row-major order (the order ``response_hidden`` uses for the student):
the teacher's top-K ids and log-probs at each response position and its
log-prob of each sampled token. ``supplies`` says what a backend can give; an
objective whose ``teacher_needs`` are not covered is refused at start-up.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from opd_cli.errors import UserError
from opd_cli.objectives import Objective, chunk_bounds, full_logprobs
from opd_cli.packed import response_hidden
from opd_cli.rollout import RolloutBatch


@dataclass
class TeacherSupport:
    topk_ids: torch.Tensor  # [N, K] long, the teacher's K most likely ids (descending)
    topk_logprobs: torch.Tensor  # [N, K] float, their log-probs (full-vocabulary normalized)
    sampled_logprob: torch.Tensor  # [N] float, log q(y_t) of the sampled token
    entropy: torch.Tensor  # [N] float, H(q_t) over the full vocabulary
    hidden: torch.Tensor | None = None  # [N, d_t] final hidden states, when "full" is asked for


def check_teacher_supplies(objective: Objective, supplies: frozenset[str], backend: str) -> None:
    """Refuse, in one line, an objective that needs what the teacher backend cannot give."""
    if missing := objective.teacher_needs - supplies:
        raise UserError(
            f"loss: '{objective.name}' needs {', '.join(sorted(missing))} from the teacher, which "
            f"teacher.backend={backend} cannot supply (it gives {', '.join(sorted(supplies))})"
        )


def lm_head_weight(model) -> torch.Tensor:
    """The [V, d] output embedding; logits = hidden @ W.T (no bias, no soft-capping)."""
    return model.get_output_embeddings().weight


def scaled_head(weight: torch.Tensor, temperature: float) -> torch.Tensor:
    """The head whose logits are the teacher's divided by ``temperature`` (``teacher.temperature``)."""
    return weight if temperature == 1 else weight / temperature


class TeacherScorer(torch.nn.Module):
    """One micro-batch of teacher scoring as a module forward (so ZeRO-3 can gather the head it reads)."""

    def __init__(self, model, temperature: float = 1.0) -> None:
        super().__init__()
        self.model = model
        self.temperature = temperature

    def forward(self, micro: RolloutBatch, k: int, chunk_tokens: int, keep_hidden: bool):
        h, y = response_hidden(self.model, micro)
        weight = scaled_head(lm_head_weight(self.model), self.temperature)
        ids, lps, sampled, entropy = [], [], [], []
        for s, e in chunk_bounds(h.shape[0], chunk_tokens):
            logp = full_logprobs(h[s:e], weight)
            top = logp.topk(k, dim=-1)
            ids.append(top.indices.cpu())
            lps.append(top.values.cpu())
            sampled.append(logp.gather(-1, y[s:e, None]).squeeze(-1).cpu())
            entropy.append(-(logp.exp() * logp).sum(-1).cpu())
        kept = h.cpu() if keep_hidden else h.new_empty(0).cpu()
        return kept, torch.cat(ids), torch.cat(lps), torch.cat(sampled), torch.cat(entropy)


class HFTeacher:
    """The teacher as an in-process transformers model, scored without gradient.

    ``temperature`` divides the teacher's logits before everything it supplies (top-K,
    sampled-token log-probs, entropy, the full ``q``): paper B's ``teacher_temperature``.

    ``shard=True`` (DeepSpeed engine only) partitions its parameters across ranks with
    ZeRO-3 inference instead of keeping a full copy on every rank. Its head is then not
    available outside the scoring pass, so it supplies top-K and sampled log-probs only.
    """

    supplies = frozenset({"sampled_logprob", "topk", "full"})  # unsharded; see __init__

    def __init__(
        self, model, micro_batch_size: int, chunk_tokens: int, shard: bool = False, temperature: float = 1.0
    ) -> None:
        self.model = model.eval().requires_grad_(False)
        self.micro_batch_size = micro_batch_size
        self.chunk_tokens = chunk_tokens
        self.temperature = temperature
        self.vocab_size = lm_head_weight(model).shape[0]
        self.scorer = TeacherScorer(self.model, temperature)
        self.synced_generation = shard
        if shard:
            import deepspeed

            ds = {"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": 1}
            ds["bf16"] = {"enabled": next(model.parameters()).dtype == torch.bfloat16}
            self.scorer, *_ = deepspeed.initialize(model=self.scorer, config=ds)
            deepspeed.zero.register_external_parameter(self.scorer.module, lm_head_weight(self.model))
            self.supplies = frozenset({"sampled_logprob", "topk"})

    @property
    def head(self) -> torch.Tensor:
        """The LM head objectives use with ``TeacherSupport.hidden`` for the full ``q_t`` (temperature applied)."""
        return scaled_head(lm_head_weight(self.model), self.temperature)

    @torch.no_grad()
    def score(self, batch: RolloutBatch, k: int, keep_hidden: bool = False) -> TeacherSupport:
        """Top-K, sampled-token log-prob and entropy, ``chunk_tokens`` positions at a time.

        ``keep_hidden`` also returns the final hidden states (``[N, d_t]``, the model's
        dtype), from which an objective recomputes the full ``q_t`` one chunk at a time.
        """
        parts = []
        k = min(k, self.vocab_size)
        for r0, r1 in chunk_bounds(batch.input_ids.shape[0], self.micro_batch_size):
            parts.append(self.scorer(batch.select(torch.arange(r0, r1)), k, self.chunk_tokens, keep_hidden))
        hidden, ids, lps, sampled, entropy = (torch.cat(p) for p in zip(*parts, strict=True))
        return TeacherSupport(ids, lps, sampled, entropy, hidden if keep_hidden else None)
