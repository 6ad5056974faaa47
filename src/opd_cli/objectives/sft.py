"""Supervised fine-tuning: the negative log-likelihood of the response tokens under the student."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from opd_cli.cpu_linear import linear
from opd_cli.objectives.base import Objective
from opd_cli.objectives.math import no_clip, upcast


class NegativeLogLikelihood(Objective):
    """``-log p(y_t)`` of each response token ``y_t`` (``x.target``), over the full vocabulary.

    It needs nothing from the teacher (the loop then loads none) and reads no sampler log-probs,
    so it trains on a data set's responses (``rollout=dataset``). The ``[chunk, V]`` logits
    exist one chunk at a time, as for the other full-vocabulary objectives.
    """

    name = "sft"
    teacher_needs: frozenset[str] = frozenset()
    chunked = True

    def __init__(self, name: str = "sft") -> None:
        self.name = name

    def token_loss(self, hidden: torch.Tensor, weight: torch.Tensor, x) -> tuple[torch.Tensor, torch.Tensor]:
        logits = upcast(linear(hidden, weight))
        return no_clip(F.cross_entropy(logits, x.target, reduction="none"))


def build(loss_cfg, teacher_head: torch.Tensor | None = None) -> NegativeLogLikelihood:
    """``loss.objective=sft``."""
    return NegativeLogLikelihood(loss_cfg.name)
