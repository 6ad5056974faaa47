"""Random student and teacher inputs for the objective tests, and the loss presets as the CLI composes them."""

from pathlib import Path

import torch
from omegaconf import OmegaConf

from opd_cli.objectives.inputs import TokenInputs

from ..conftest import REPO

# tokens, vocabulary, student hidden size, teacher hidden size
N, V, D, DT = 11, 37, 8, 6


PRESETS = sorted(p.stem for p in Path(REPO / "conf/loss").glob("*.yaml") if p.stem != "_base")


def preset(name: str, **overrides):
    base = OmegaConf.load(REPO / "conf/loss/_base.yaml")
    own = OmegaConf.load(REPO / f"conf/loss/{name}.yaml")
    own.pop("defaults", None)
    return OmegaConf.merge(base, own, overrides)


def make_inputs(k, seed=0, ties=False, disjoint=False, identity_head=False):
    """Random student (hidden, head) and teacher (hidden, head), and the batch's TokenInputs.

    ties: six ids share the top teacher logit and four share a student logit.
    disjoint: the teacher ranks ids in the opposite order to the student, so small
    top-k sets do not meet. identity_head: W = I, so hidden states are the logits.
    """
    g = torch.Generator().manual_seed(seed)
    d = V if identity_head else D
    h = torch.randn(N, d, generator=g, dtype=torch.float64) * (2 if identity_head else 1)
    w = torch.eye(V, dtype=torch.float64) if identity_head else torch.randn(V, D, generator=g, dtype=torch.float64)
    th = torch.randn(N, DT, generator=g, dtype=torch.float64)
    tw = torch.randn(V, DT, generator=g, dtype=torch.float64) * 1.5
    if ties:
        th = th.abs()
        tw[0] = tw[0].abs() * 3
        tw[1:6] = tw[0]  # ids 0-5 tie at the top of every teacher distribution
        if not identity_head:
            w[10:14] = w[9]
    if disjoint:
        th, tw = h, -w  # teacher logits = -student logits
    t_logp = torch.log_softmax(th @ tw.T, -1)
    top = t_logp.topk(k, dim=-1)
    y = torch.randint(0, V, (N,), generator=g)
    old = torch.log_softmax(h @ w.T, -1).gather(-1, y[:, None]).squeeze(-1)
    old = old + 0.3 * torch.randn(N, generator=g, dtype=torch.float64)  # a stale policy: ratios differ from 1
    x = TokenInputs(
        target=y,
        weight=(torch.rand(N, generator=g) > 0.2).double(),
        position=torch.arange(N) % 5,
        old_logprob=old,
        advantage=torch.randn(N, generator=g, dtype=torch.float64),
        teacher_logprob=t_logp.gather(-1, y[:, None]).squeeze(-1),
        teacher_topk_ids=top.indices,
        teacher_topk_logprobs=top.values,
        teacher_entropy=-(t_logp.exp() * t_logp).sum(-1),
        teacher_hidden=th,
    )
    return h, w, tw, x, t_logp
