"""The teacher as an in-process transformers model (``teacher.backend=hf``).

One forward pass over prompt + response per sequence (the packed scoring pass), without
gradient; it supplies everything an objective can need, the full distribution included.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch

from opd_cli.batch import RolloutBatch, TeacherSupport, chunk_bounds
from opd_cli.models.loading import lm_head_weight
from opd_cli.models.packed import response_hidden
from opd_cli.objectives.math import entropy, full_logprobs


def scaled_head(weight: torch.Tensor, temperature: float) -> torch.Tensor:
    """The head whose logits are the teacher's divided by ``temperature`` (``teacher.temperature``)."""
    return weight if temperature == 1 else weight / temperature


class TeacherScorer(torch.nn.Module):
    """One micro-batch of teacher scoring as a module forward (so ZeRO-3 can gather the head it reads)."""

    def __init__(self, model, temperature: float = 1.0, gather_head: bool = False) -> None:
        super().__init__()
        self.model = model
        self.temperature = temperature
        self.gather_head = gather_head  # a ZeRO-3 partitioned model read outside its engine (the live student)

    def forward(self, micro: RolloutBatch, k: int, chunk_tokens: int, keep_hidden: bool):
        h, y = response_hidden(self.model, micro)
        ids, lps, sampled, entropies = [], [], [], []
        with gathered(lm_head_weight(self.model), self.gather_head):
            weight = scaled_head(lm_head_weight(self.model), self.temperature)
            for s, e in chunk_bounds(h.shape[0], chunk_tokens):
                logp = full_logprobs(h[s:e], weight)
                top = logp.topk(k, dim=-1)
                ids.append(top.indices.cpu())
                lps.append(top.values.cpu())
                sampled.append(logp.gather(-1, y[s:e, None]).squeeze(-1).cpu())
                entropies.append(entropy(logp).cpu())
        kept = h.cpu() if keep_hidden else h.new_empty(0).cpu()
        return kept, torch.cat(ids), torch.cat(lps), torch.cat(sampled), torch.cat(entropies)


def gathered(weight: torch.Tensor, enabled: bool):
    """The whole of a ZeRO-3 partitioned ``weight`` inside the block (every rank must enter it), when ``enabled``."""
    if not enabled:
        return nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters([weight], modifier_rank=None)


class HFTeacher:
    """The teacher as an in-process transformers model, scored without gradient.

    ``temperature`` divides the teacher's logits before everything it supplies (top-K,
    sampled-token log-probs, entropy, the full ``q``): paper B's ``teacher_temperature``.

    ``shard=True`` (DeepSpeed engine only) partitions its parameters across ranks with
    ZeRO-3 inference instead of keeping a full copy on every rank. Its head is then not
    available outside the scoring pass, so it supplies top-K and sampled log-probs only.

    ``live=True`` scores with the student being trained (``teacher=self teacher.self_weights=live``):
    the same parameters, no copy, left trainable, scored in eval mode without gradient. ``sharded``
    then says the student is ZeRO-3 partitioned (its head is gathered for the scoring pass only,
    so the full q is not supplied). An objective that needs the full q gets a copy of the head as
    it was when the step was scored (the student's own head moves with every optimizer step).
    """

    supplies = frozenset({"sampled_logprob", "topk", "full"})  # unsharded; see __init__

    def __init__(
        self,
        model,
        micro_batch_size: int,
        chunk_tokens: int,
        shard: bool = False,
        temperature: float = 1.0,
        live: bool = False,
        sharded: bool = False,
    ) -> None:
        self.live = live
        self.model = model if live else model.eval().requires_grad_(False)
        self.micro_batch_size = micro_batch_size
        self.chunk_tokens = chunk_tokens
        self.temperature = temperature
        head = lm_head_weight(model)
        self.vocab_size = getattr(head, "ds_shape", head.shape)[0]  # a ZeRO-3 partitioned head is empty here
        self.scorer = TeacherScorer(self.model, temperature, gather_head=live and sharded)
        self._head: torch.Tensor | None = None  # live: a copy of the head as it was at the last scoring
        self.sharded = shard or (live and sharded)
        if live and sharded:
            self.supplies = frozenset({"sampled_logprob", "topk"})
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
        if not self.live:
            return scaled_head(lm_head_weight(self.model), self.temperature)
        if self._head is None and not self.sharded:  # made on first use: only objectives needing the full q ask
            self._head = scaled_head(lm_head_weight(self.model).detach(), self.temperature).clone()
        return self._head

    @torch.no_grad()
    def score(self, batch: RolloutBatch, k: int, keep_hidden: bool = False) -> TeacherSupport:
        """Top-K, sampled-token log-prob and entropy, ``chunk_tokens`` positions at a time.

        ``keep_hidden`` also returns the final hidden states (``[N, d_t]``, the model's
        dtype), from which an objective recomputes the full ``q_t`` one chunk at a time.
        """
        parts = []
        k = min(k, self.vocab_size)
        training = self.model.training
        self.model.eval()  # the live student is in training mode between steps
        try:
            for r0, r1 in chunk_bounds(batch.input_ids.shape[0], self.micro_batch_size):
                parts.append(self.scorer(batch.select(torch.arange(r0, r1)), k, self.chunk_tokens, keep_hidden))
        finally:
            self.model.train(training)
        if self._head is not None:  # live: the head the objective reads is the one that scored
            self._head.copy_(scaled_head(lm_head_weight(self.model).detach(), self.temperature))
        hidden, ids, lps, sampled, ent = (torch.cat(p) for p in zip(*parts, strict=True))
        return TeacherSupport(ids, lps, sampled, ent, hidden if keep_hidden else None)
