"""The objective families by name (``loss.objective``), and the objective a loss config describes.

A family is a module with ``build(loss_cfg, teacher_head) -> Objective``; adding one is that
module plus one line in ``OBJECTIVES`` (docs/design.md shows a worked example). The config's
allowed values of ``loss.objective`` are this registry's keys.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from opd_cli.objectives import divergence, policy_gradient, sft
from opd_cli.objectives.base import Objective

# loss.objective -> the builder of that family's objective from the loss config (and the teacher's head)
OBJECTIVES: dict[str, Callable[[Any, torch.Tensor | None], Objective]] = {
    "sampled_token": policy_gradient.build,
    "sampled_token_is": policy_gradient.build,
    "support_divergence": divergence.build,
    "sft": sft.build,
}


def make_objective(loss_cfg, teacher_head: torch.Tensor | None = None) -> Objective:
    """The objective a ``loss`` config describes (``teacher_head``: for objectives needing the full q)."""
    objective = OBJECTIVES[loss_cfg.objective](loss_cfg, teacher_head)
    objective.diag_k = loss_cfg.diag_k or loss_cfg.k
    return objective


def needs_teacher(loss_cfg) -> bool:
    """Whether the objective of ``loss_cfg`` needs anything from the teacher; where not (``sft``), no
    teacher is loaded or called and the diagnostics that compare with it are not computed."""
    return bool(make_objective(loss_cfg).teacher_needs)


def teacher_k(loss: Any) -> int:
    """How many top ids the teacher supplies: the loss's K, or the diagnostics' if larger (``loss.diag_k``)."""
    return max(loss.k, loss.diag_k or 0)
