"""The registries: a new objective family is one module (here, this file) plus one registry line,
and the config's allowed values follow the registries."""

import pytest
import torch

from opd_cli.config.validate import validate
from opd_cli.errors import UserError
from opd_cli.objectives import registry
from opd_cli.objectives.base import Objective
from opd_cli.objectives.inputs import TokenInputs
from opd_cli.objectives.math import gather_logits, log_renormalize, no_clip
from opd_cli.objectives.student_pass import student_loss_and_metrics
from opd_cli.rollout.registry import ROLLOUT_ENGINES
from opd_cli.tasks.checking import CHECKERS, RG_CHECKER
from opd_cli.teacher.registry import TEACHER_BACKENDS

from ..conftest import compose_cfg


class TopKTotalVariation(Objective):
    """A family written the way docs/design.md shows: total variation between student and teacher,
    both renormalized on the teacher's top-K."""

    chunked = False

    def __init__(self, k: int, name: str) -> None:
        self.k, self.name = k, name

    def token_loss(self, hidden, weight, x):
        ids = x.teacher_topk_ids[:, : self.k]
        valid = torch.ones_like(ids, dtype=torch.bool)
        p = log_renormalize(gather_logits(hidden, weight, ids), valid).exp()
        q = log_renormalize(x.teacher_topk_logprobs[:, : self.k].to(p.dtype), valid).exp()
        return no_clip(0.5 * (p - q).abs().sum(-1))


def build(loss_cfg, teacher_head=None) -> Objective:
    return TopKTotalVariation(loss_cfg.k, loss_cfg.name)


def test_a_new_family_is_one_module_and_one_registry_line(monkeypatch):
    monkeypatch.setitem(registry.OBJECTIVES, "tvd", build)  # the one line
    cfg = compose_cfg(["loss.objective=tvd", "loss.name=tvd", "loss.k=3"])
    validate(cfg)  # the config accepts it: its allowed values are the registry's
    objective = registry.make_objective(cfg.loss)
    assert isinstance(objective, TopKTotalVariation) and objective.diag_k == 3
    # it runs in the student pass, and its loss is TV against a float64 full-vocabulary reference
    g = torch.Generator().manual_seed(0)
    n, d, vocab = 5, 8, 11
    hidden, weight = (
        torch.randn(n, d, generator=g, dtype=torch.float64),
        torch.randn(vocab, d, generator=g, dtype=torch.float64),
    )
    hidden.requires_grad_()
    t_logp = torch.randn(n, vocab, generator=g, dtype=torch.float64).log_softmax(-1)
    top = t_logp.topk(3, dim=-1)
    x = TokenInputs(
        target=top.indices[:, 0], weight=torch.ones(n, dtype=torch.float64), position=torch.arange(n),
        old_logprob=torch.zeros(n, dtype=torch.float64), advantage=torch.zeros(n, dtype=torch.float64),
        teacher_logprob=top.values[:, 0], teacher_topk_ids=top.indices, teacher_topk_logprobs=top.values,
        teacher_entropy=torch.zeros(n, dtype=torch.float64),
    )  # fmt: skip
    loss, _ = student_loss_and_metrics(hidden, weight, x, objective, chunk_tokens=2, diagnostics=False)
    p = (hidden @ weight.T).gather(-1, top.indices).softmax(-1)
    q = top.values.softmax(-1)
    torch.testing.assert_close(loss, 0.5 * (p - q).abs().sum())
    loss.backward()
    assert hidden.grad.abs().sum() > 0


@pytest.mark.parametrize(
    ("key", "registry_keys"),
    [("loss.objective", registry.OBJECTIVES), ("rollout.engine", ROLLOUT_ENGINES),
     ("teacher.backend", TEACHER_BACKENDS), ("task.checker", [*CHECKERS, RG_CHECKER])],
)  # fmt: skip
def test_allowed_values_are_the_registries(key, registry_keys):
    cfg = compose_cfg([f"{key}=nope"]) if key != "task.checker" else compose_cfg(["task.checker=nope"])
    tail = ", nor a 'package.module:function' path" if key == "task.checker" else ""  # a checker may be a path
    with pytest.raises(UserError, match=f"^{key}: 'nope' is not one of: {', '.join(registry_keys)}{tail}$"):
        validate(cfg)
