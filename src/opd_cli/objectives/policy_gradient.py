"""Sampled-token OPD: a policy gradient on the reward ``log q(y) - log pi_old(y)``."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from opd_cli.objectives.base import Objective
from opd_cli.objectives.math import full_logprobs, no_clip, ppo_token_loss


@dataclass
class PolicyGradient(Objective):
    """Sampled-token OPD on the reward ``log q(y) - log pi_old(y)`` (``x.advantage``).

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
        if self.clip:
            return ppo_token_loss(logp, x.old_logprob, x.advantage, self.clip_low, self.clip_high, self.dual_clip)
        return no_clip(-torch.exp(logp - x.old_logprob) * x.advantage)
