"""The objective contract: a per-token loss of the student's hidden states against the teacher."""

from __future__ import annotations

import torch

from opd_cli.objectives.inputs import TokenInputs


class Objective:
    """A per-token loss of the student's hidden states against the teacher.

    ``teacher_needs`` names what the teacher must supply: ``sampled_logprob``
    (log q of the sampled token), ``topk`` (top-K ids and log-probs), ``full``
    (log-probs at any id: the in-process teacher's hidden states and head).
    ``token_loss`` returns the per-token loss [c] and per-token bools [c, 2]: whether the
    PPO ratio clip and the dual clip were taken (all False for non-clipped objectives).
    """

    name: str = ""
    teacher_needs: frozenset[str] = frozenset({"sampled_logprob", "topk"})
    # K of the overlap diagnostics (loss.diag_k, else loss.k); None: the width of the teacher's list
    diag_k: int | None = None
    # run token_loss chunk by chunk under activation checkpointing (it forms [chunk, V] tensors)
    chunked: bool = True

    def token_loss(
        self, hidden: torch.Tensor, weight: torch.Tensor, x: TokenInputs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError
