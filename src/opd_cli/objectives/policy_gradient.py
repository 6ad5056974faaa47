"""Sampled-token OPD: a policy gradient on the reward ``log q(y) - log pi_old(y)``."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from opd_cli.objectives.base import Objective
from opd_cli.objectives.math import full_logprobs, no_clip, ppo_token_loss


@dataclass
class PolicyGradient(Objective):
    """Sampled-token OPD on the reward ``log q(y) - log pi_old(y)`` (``x.advantage``).

    With a verifiable outcome reward (``loss.outcome_weight``) its group advantage
    (``x.outcome_advantage``) is added to every token's advantage, as paper B's code does.

    ``clip=True``: PPO clipped surrogate (optional dual clip); ``clip=False``: the
    importance-sampling form ``-rho A`` (Tinker).
    """

    name: str = "sampled_token"
    clip: bool = True
    clip_low: float = 0.2
    clip_high: float = 0.2
    dual_clip: float | None = None

    def token_loss(self, hidden, weight, x):
        logp = full_logprobs(hidden, weight).gather(-1, x.target[:, None]).squeeze(-1)
        adv = x.advantage if x.outcome_advantage is None else x.advantage + x.outcome_advantage
        if self.clip:
            return ppo_token_loss(logp, x.old_logprob, adv, self.clip_low, self.clip_high, self.dual_clip)
        return no_clip(-torch.exp(logp - x.old_logprob) * adv)


def build(loss_cfg, teacher_head: torch.Tensor | None = None) -> PolicyGradient:
    """``loss.objective=sampled_token`` (PPO clip) or ``sampled_token_is`` (importance sampling, no clip)."""
    return PolicyGradient(
        name=loss_cfg.name,
        clip=loss_cfg.objective != "sampled_token_is",
        clip_low=loss_cfg.clip_ratio_low,
        clip_high=loss_cfg.clip_ratio_high,
        dual_clip=loss_cfg.dual_clip,
    )
