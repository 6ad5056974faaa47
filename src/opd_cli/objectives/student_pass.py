"""The student's side of the loss: per-token losses chunk by chunk, and the diagnostics.

Each chunk's loss runs under activation checkpointing, so at most one ``[chunk, V]``
block exists at a time, in the backward pass too.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from opd_cli.batch import chunk_bounds
from opd_cli.objectives.base import Objective
from opd_cli.objectives.diagnostics import MetricSums, student_metrics, token_metrics
from opd_cli.objectives.inputs import TokenInputs
from opd_cli.objectives.math import upcast

# A micro-batch's full-vocabulary losses run without activation checkpointing when its N x V
# logits have at most this many entries (16 MB in float32 per [N, V] intermediate).
CHECKPOINT_ABOVE = 1 << 22


def student_loss_and_metrics(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    x: TokenInputs,
    objective: Objective,
    chunk_tokens: int,
    bucket_tokens: int = 1024,
    diagnostics: bool = True,
) -> tuple[torch.Tensor, MetricSums]:
    """Sum of the per-token loss times ``x.loss_weight`` (with gradient), and the diagnostics (unless told not to).

    Each chunk's loss runs under activation checkpointing: its ``[chunk, V]``
    intermediates are freed after the forward and recomputed one chunk at a time in
    the backward (unless all ``N x V`` is at most ``CHECKPOINT_ABOVE`` entries, where
    keeping them is cheaper than recomputing). Diagnostics run per chunk without gradient; an objective
    that needs nothing from the teacher gets only those that need none (``student_metrics``).
    """
    total = upcast(hidden).new_zeros(())
    metrics = MetricSums()
    # checkpointing holds one [chunk, V] block at a time but recomputes each chunk in the backward;
    # when the whole [N, V] is small, keeping every chunk's intermediates is cheaper (full_rkl on the
    # demo: 20 -> 13 ms per micro-batch)
    checkpointed = objective.chunked and hidden.shape[0] * weight.shape[0] > CHECKPOINT_ABOVE
    # A gathered objective runs once over all tokens: gather_logits already works in small
    # chunks and keeps nothing large, and one call means one [V, d] head gradient, not one per chunk.
    loss_chunk = chunk_tokens if objective.chunked else hidden.shape[0]
    for s, e in chunk_bounds(hidden.shape[0], loss_chunk):
        xc = x.slice(s, e)
        if checkpointed:
            loss, clipped = checkpoint(objective.token_loss, hidden[s:e], weight, xc, use_reentrant=False)
        else:
            loss, clipped = objective.token_loss(hidden[s:e], weight, xc)
        total = total + (loss * (xc.weight if xc.loss_weight is None else xc.loss_weight)).sum()
        metrics.add("pg_clipfrac", clipped[:, 0].to(xc.weight.dtype), xc.weight)
        metrics.add("pg_clipfrac_lower", clipped[:, 1].to(xc.weight.dtype), xc.weight)
    if diagnostics:  # without gradient
        for s, e in chunk_bounds(hidden.shape[0], chunk_tokens):
            if objective.teacher_needs:
                metrics.merge(token_metrics(hidden[s:e], weight, x.slice(s, e), bucket_tokens, objective.diag_k))
            else:
                metrics.merge(student_metrics(hidden[s:e], weight, x.slice(s, e)))
    return total, metrics
