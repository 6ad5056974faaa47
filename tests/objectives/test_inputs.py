"""The per-token inputs of an objective (objectives/inputs.py) from a real rollout and teacher scores."""

import copy
from dataclasses import replace

import pytest
import torch
from omegaconf import OmegaConf

from opd_cli.batch import TeacherSupport, build_batch
from opd_cli.envs.rollout import Transcript, to_batch
from opd_cli.models.loading import lm_head_weight
from opd_cli.objectives.inputs import token_inputs
from opd_cli.objectives.registry import make_objective
from opd_cli.rollout.hf import HFRollout
from opd_cli.teacher.hf import HFTeacher

from ..conftest import REPO, perturbed_copy
from .test_advantages import reward_to_go

PROMPTS = ["Question: Ann has 12 pens and buys 30 more.\nAnswer:", "Question: 3+4?\nAnswer:", "Q: 57 coins\nA:"]
MAX_NEW = 12


@pytest.fixture(scope="module")
def rollout(tiny_model, tiny_tokenizer):
    """A float64 student and a batch of its rollouts (3 prompts x 3 samples)."""
    student = copy.deepcopy(tiny_model).double()
    return student, HFRollout(student, tiny_tokenizer).generate(PROMPTS, 3, 1.0, 1.0, MAX_NEW, seed=5)


def test_token_inputs_clip_the_reward_and_leave_out_long_responses(tiny_model, tiny_tokenizer):
    """The sampled-token reward log q - log pi_old clamped (paper A's clip_log_ratio); responses longer
    than loss.max_response_tokens get weight 0 (paper C's opd_distill_max_response_len)."""
    batch = HFRollout(tiny_model, tiny_tokenizer).generate(PROMPTS, 2, 1.0, 1.0, MAX_NEW, seed=1)
    batch.response_mask[0, batch.prompt_len + 5 :] = False  # a shorter response, as if it ended there
    base = OmegaConf.merge(OmegaConf.load(REPO / "conf/loss/_base.yaml"), {"k": 4})
    teacher = perturbed_copy(tiny_model)
    support = HFTeacher(teacher, 4, 1024).score(batch, 4)
    plain, offsets = token_inputs(batch, support, [], base)
    lengths = offsets.diff()
    assert lengths.min() < lengths.max()  # responses of different lengths
    limit = int(lengths.max()) - 1
    x, _ = token_inputs(
        batch, support, [], OmegaConf.merge(base, {"log_ratio_clip": 0.01, "max_response_tokens": limit})
    )
    torch.testing.assert_close(x.advantage, (plain.advantage.clamp(-0.01, 0.01) * x.weight))
    assert plain.advantage.abs().max() > 0.01
    for r, n in enumerate(lengths.tolist()):
        assert x.weight[offsets[r] : offsets[r + 1]].eq(0 if n > limit else 1).all()


def test_outcome_advantage_reaches_the_objective(rollout):
    """token_inputs spreads each response's outcome advantage over its tokens and keeps the
    sampled-token advantage apart; the sampled-token objective adds the two (paper B), so its loss
    equals the loss of the summed advantage."""
    model, batch = rollout
    support = HFTeacher(perturbed_copy(model), 4, 1024).score(batch, 8)
    outcome = torch.arange(batch.input_ids.shape[0], dtype=torch.float64)
    cfg = OmegaConf.merge(OmegaConf.load(REPO / "conf/loss/_base.yaml"), {"objective": "sampled_token"})
    plain, offsets = token_inputs(batch, support, [], cfg)
    x, _ = token_inputs(batch, support, [], cfg, outcome)
    per_token = torch.repeat_interleave(outcome, offsets.diff()).to(x.advantage.dtype)
    torch.testing.assert_close(x.outcome_advantage, per_token)
    torch.testing.assert_close(x.advantage, plain.advantage)
    objective = make_objective(cfg)
    hidden = torch.randn(x.target.shape[0], model.config.hidden_size, dtype=torch.float64)
    weight = lm_head_weight(model).detach().double()
    with_outcome, _ = objective.token_loss(hidden, weight, x)
    summed = replace(x, advantage=x.advantage + per_token, outcome_advantage=None)
    torch.testing.assert_close(with_outcome, objective.token_loss(hidden, weight, summed)[0])
    assert not torch.allclose(with_outcome, objective.token_loss(hidden, weight, plain)[0])


@pytest.mark.parametrize("gamma,clip", [(0.0, None), (0.5, None), (1.0, None), (0.8, 0.3)])
def test_rewards_become_each_responses_discounted_reward_to_go(gamma, clip):
    """The sampled-token reward r_t = clip(log q(y_t) - log pi_old(y_t)) on kept tokens, 0 on masked ones,
    and A_t its discounted sum over the rest of the same response (loss.gamma), from a hand-made batch of
    left-padded prompts and responses of different lengths, one per list in Python."""
    eos, masked = 1, 9
    prompts = torch.tensor([[0, 5, 6], [7, 8, 5]])
    attn = torch.tensor([[0, 1, 1], [1, 1, 1]])
    response = torch.tensor(
        [[4, 9, 4, 1, 0, 0], [3, 3, 3, 3, 3, 3], [9, 1, 0, 0, 0, 0], [2, 9, 9, 2, 2, 1]]
    )  # EOS-ended, cut at the limit, 2 tokens, EOS-ended with the masked id twice
    g = torch.Generator().manual_seed(0)
    batch = build_batch(prompts, attn, response, -torch.rand(response.shape, generator=g), eos, 2)
    n = int(batch.response_mask.sum())
    support = TeacherSupport(
        topk_ids=torch.zeros(n, 2, dtype=torch.long),
        topk_logprobs=torch.zeros(n, 2),
        sampled_logprob=-torch.rand(n, generator=g),
        entropy=torch.zeros(n),
    )
    cfg = OmegaConf.merge(
        OmegaConf.load(REPO / "conf/loss/_base.yaml"), {"gamma": gamma, "log_ratio_clip": clip, "mask_mode": "all"}
    )
    x, offsets = token_inputs(batch, support, [masked], cfg)
    want, flat = [], 0
    for row in range(4):
        ids = batch.input_ids[row][batch.response_mask[row]].tolist()
        old = batch.old_logprobs[row][batch.response_mask[row]].tolist()
        q = support.sampled_logprob[flat : flat + len(ids)].tolist()
        ratio = [a - b if clip is None else min(clip, max(-clip, a - b)) for a, b in zip(q, old, strict=True)]
        want += reward_to_go([0.0 if y == masked else r for y, r in zip(ids, ratio, strict=True)], gamma)
        flat += len(ids)
    assert offsets.tolist() == [0, 4, 10, 12, 18]
    assert x.weight.tolist() == [0.0 if y == masked else 1.0 for y in x.target.tolist()]
    torch.testing.assert_close(x.advantage, torch.tensor(want, dtype=x.advantage.dtype))


@pytest.mark.parametrize("gamma", [0.5, 1.0])
def test_a_multiturn_rows_reward_to_go_counts_its_action_tokens_only(gamma):
    """Observations between a multi-turn row's actions are no steps of the student: the discount runs
    over the supervised tokens as if they were one contiguous response."""
    a = Transcript([3, 4])
    a.add_action([5, 6], [-0.5, -0.5], None)
    a.add_observation([7, 7, 7, 7])
    a.add_action([8], [-0.5], None)
    b = Transcript([3])
    b.add_action([5, 6, 8], [-0.25] * 3, None)
    batch = to_batch([a, b], [False, False], 0)
    n = int(batch.response_mask.sum())
    support = TeacherSupport(
        topk_ids=torch.zeros(n, 2, dtype=torch.long),
        topk_logprobs=torch.zeros(n, 2),
        sampled_logprob=-torch.arange(1, n + 1, dtype=torch.float32) / 8,
        entropy=torch.zeros(n),
    )
    cfg = OmegaConf.merge(OmegaConf.load(REPO / "conf/loss/_base.yaml"), {"gamma": gamma, "log_ratio_clip": None})
    x, offsets = token_inputs(batch, support, [], cfg)
    r = (support.sampled_logprob - batch.old_logprobs[batch.response_mask]).tolist()
    want = reward_to_go(r[:3], gamma) + reward_to_go(r[3:], gamma)
    assert offsets.tolist() == [0, 3, 6] and x.position.tolist() == [0, 1, 2, 0, 1, 2]
    torch.testing.assert_close(x.advantage, torch.tensor(want, dtype=x.advantage.dtype))
