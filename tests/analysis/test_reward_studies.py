"""The reward studies' model-facing steps (analysis/reward_studies.py) on a tiny real Qwen2: the sampled responses'
bookkeeping, the teacher reward against a direct recomputation, and continuations of given token ids.

The commands end to end are in tests/commands/test_reward_studies.py.
"""

import copy
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from opd_cli.analysis.reward_studies import (
    CONTINUATION_SEED,
    auroc_markdown,
    continue_prefixes,
    sample_study,
    teacher_rewards,
)
from opd_cli.rollout.hf import HFRollout
from opd_cli.tasks.problems import arith_problems
from opd_cli.teacher.hf import HFTeacher

from ..conftest import perturbed_copy


def settings(**kw):
    base = dict(n=2, temperature=1.0, top_p=1.0, max_new_tokens=10, batch_size=4, seed=5, continuations=2)
    return SimpleNamespace(**(base | kw))


@pytest.fixture(scope="module")
def sampled(tiny_model, tiny_tokenizer):
    problems = arith_problems(0, "test", 16)[:3]
    prompts = [f"Question: {p.question}\nAnswer:" for p in problems]
    engine = HFRollout(tiny_model, tiny_tokenizer)
    # a checker of our own: the verdict depends on the text only, so that both classes occur
    return sample_study(engine, problems, prompts, lambda text, gold: len(text) % 2 == 0, settings(), "test")


def test_sampled_responses_keep_their_problem_sample_and_ids(sampled, tiny_tokenizer):
    assert [(r.problem, r.sample) for r in sampled.responses] == [(i, j) for i in range(3) for j in range(2)]
    assert len(sampled.batches) == 2  # batch_size 4 = two problems of n=2 per call
    for r in sampled.responses:
        assert tiny_tokenizer.decode(r.ids, skip_special_tokens=True) == r.text
        assert tiny_tokenizer.decode(r.prompt_ids) == sampled.prompts[r.problem]
        assert r.correct == (len(r.text) % 2 == 0)
        assert r.truncated == (tiny_tokenizer.eos_token_id not in r.ids) and 1 <= len(r.ids) <= 10


def direct_reward(teacher, student, prompt_ids, ids) -> float:
    """mean over response tokens of log q - log p, each from one unpadded forward."""
    seq = torch.tensor([prompt_ids + ids])
    with torch.no_grad():
        lq, lp = (torch.log_softmax(m(input_ids=seq).logits[0].double(), -1) for m in (teacher, student))
    pos = torch.arange(len(prompt_ids) - 1, seq.shape[1] - 1)
    target = seq[0, pos + 1]
    return float((lq[pos, target] - lp[pos, target]).mean())


def test_teacher_rewards_are_the_sequence_mean_log_ratio(sampled, tiny_model):
    other = perturbed_copy(tiny_model, scale=0.05, seed=3)
    got = teacher_rewards(HFTeacher(copy.deepcopy(other), 3, 7), sampled.batches, "test")
    want = [direct_reward(other, tiny_model, r.prompt_ids, r.ids) for r in sampled.responses]
    np.testing.assert_allclose(got, want, atol=1e-4)
    assert np.abs(got).max() > 1e-2  # the perturbed teacher does differ
    # the student as its own teacher: zero reward on every response (log-probs aligned token by token)
    same = teacher_rewards(HFTeacher(copy.deepcopy(tiny_model), 3, 7), sampled.batches, "test")
    assert np.abs(same).max() < 1e-4


def test_continuations_follow_the_given_ids_and_are_judged_with_their_prefix(sampled, tiny_model, tiny_tokenizer):
    engine = HFRollout(tiny_model, tiny_tokenizer)
    cut = [r.ids[:2] for r in sampled.responses[:3]]
    inputs = [r.prompt_ids + c for r, c in zip(sampled.responses, cut, strict=False)]
    judged = []

    def checker(text, gold):
        judged.append((text, gold))
        return gold == "a"

    cfg = settings(batch_size=2)  # one prefix per call: three calls
    got = continue_prefixes(engine, tiny_tokenizer, inputs, cut, ["a", "b", "a"], checker, cfg, "test")
    assert [len(g) for g in got] == [2, 2, 2] and [[c["correct"] for c in g] for g in got] == [[1, 1], [0, 0], [1, 1]]
    for i, g in enumerate(got):
        # the call that continued prefix i (one per call), again: the judged text is prefix + continuation ids
        batch = engine.generate_ids(inputs[i : i + 1], 2, 1.0, 1.0, 10, cfg.seed + CONTINUATION_SEED + i)
        for j, c in enumerate(g):
            ids = batch.input_ids[j][batch.response_mask[j]].tolist()
            assert c["text"] == judged[2 * i + j][0] == tiny_tokenizer.decode(cut[i] + ids, skip_special_tokens=True)
    # seeded: the same continuations again
    again = continue_prefixes(engine, tiny_tokenizer, inputs, cut, ["a", "b", "a"], checker, cfg, "test")
    assert again == got


@pytest.mark.parametrize("n_correct, note", [(1, "Only 1 of the responses are correct"), (50, None), (95, "Only 5 of")])
def test_auroc_report_says_when_one_class_is_small(n_correct, note):
    settings_ = dict(model="m", engine="hf", task="arith", split="train", n_problems=10, temperature=1.0, top_p=1.0)
    settings_ |= dict(max_new_tokens=8, seed=0, bootstrap=100)
    result = dict(auroc=0.75, ci_low=0.6, ci_high=0.9, reward_correct=0.1, reward_wrong=-0.2)
    data = dict(settings=settings_, n_responses=100, n_correct=n_correct, n_truncated=0, teachers={"t": result})
    report = auroc_markdown(data)
    assert "| t | 0.750 | [0.600, 0.900] | 0.1000 | -0.2000 |" in report
    assert (note in report) if note else ("Only" not in report)
