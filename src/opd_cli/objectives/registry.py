"""The objective families by name (``loss.objective``), and the objective a loss config describes."""

from __future__ import annotations

from dataclasses import fields
from typing import Any

import torch

from opd_cli.objectives.base import Objective
from opd_cli.objectives.divergence import DivergenceSpec, SupportDivergence, WithOutcome
from opd_cli.objectives.policy_gradient import PolicyGradient


def make_objective(loss_cfg, teacher_head: torch.Tensor | None = None) -> Objective:
    """The objective a ``loss`` config describes (``teacher_head``: for objectives needing the full q).

    With ``loss.outcome_weight`` a sampled-token objective finds the outcome advantage already
    in ``x.advantage`` (paper B adds the two); a divergence gets a PPO term of its own (``WithOutcome``).
    """
    pg = PolicyGradient(
        name=loss_cfg.name,
        clip=loss_cfg.objective != "sampled_token_is",
        clip_low=loss_cfg.clip_ratio_low,
        clip_high=loss_cfg.clip_ratio_high,
        dual_clip=loss_cfg.dual_clip,
    )
    if loss_cfg.objective in ("sampled_token", "sampled_token_is"):
        objective = pg
    else:
        spec = DivergenceSpec(**{f.name: getattr(loss_cfg, f.name) for f in fields(DivergenceSpec)})
        objective = SupportDivergence(spec, loss_cfg.k, loss_cfg.name, teacher_head)
        objective = WithOutcome(objective, pg) if loss_cfg.outcome_weight else objective
    objective.diag_k = loss_cfg.diag_k or loss_cfg.k
    return objective


def teacher_k(loss: Any) -> int:
    """How many top ids the teacher supplies: the loss's K, or the diagnostics' if larger (``loss.diag_k``)."""
    return max(loss.k, loss.diag_k or 0)
