"""The filters of ``opd-data teacher-rollouts`` on hand-made responses with known answers, and how a
sample becomes a data set row (training/teacher_rollouts.py, commands/data.py). The command end to end
is in tests/commands/test_data.py."""

from types import SimpleNamespace

import pytest
import torch
from hydra import compose, initialize_config_dir

from opd_cli.batch import build_batch
from opd_cli.commands.data import judge, teacher_prompts
from opd_cli.config.schema import register_configs
from opd_cli.config.validate import validate_data
from opd_cli.errors import UserError
from opd_cli.tasks.checking import check_exact
from opd_cli.tasks.problems import Problem, arith_problems
from opd_cli.training.teacher_rollouts import (
    Sample,
    batch_samples,
    drop_reason,
    incorrect,
    repeat_fraction,
    repetitive,
    summary,
    truncated,
    without_eos,
)

from ..conftest import REPO

EOS = 0


@pytest.mark.parametrize(
    "tokens,max_new_tokens,want",
    [
        ([5, 6, EOS], 3, False),  # EOS at the last allowed position
        ([EOS], 3, False),  # an empty response that finished
        ([5, 6, 7], 3, True),  # cut off at the limit
        ([5, 6, 7, EOS], 3, True),  # an EOS past the limit does not count
        ([], 3, True),
    ],
)
def test_truncated_means_no_eos_within_the_limit(tokens, max_new_tokens, want):
    assert truncated(tokens, EOS, max_new_tokens) is want


@pytest.mark.parametrize(
    "tokens,n,want",
    [
        ([1, 2, 1, 2, 1], 2, 2 / 4),  # 12 21 12 21: 2 of 4 repeat an earlier one
        ([1, 2, 3, 4], 2, 0.0),  # every bigram distinct
        ([7] * 10, 3, 7 / 8),  # 8 trigrams, 1 distinct
        ([1, 1, 2], 1, 1 / 3),  # unigrams: the second 1 repeats
        ([1, 2], 3, 0.0),  # shorter than n: no n-grams
        ([], 2, 0.0),
        ([1, 2, 3, 1, 2, 3, 1, 2, 3], 3, 4 / 7),  # 123 231 312 123 231 312 123: 3 distinct of 7
    ],
)
def test_repeat_fraction_counts_ngrams_that_repeat_an_earlier_one(tokens, n, want):
    assert repeat_fraction(tokens, n) == pytest.approx(want)


def test_repetitive_is_strictly_above_the_limit_and_one_keeps_all():
    loop = [1, 2, 1, 2, 1]  # fraction 0.5 at n=2
    assert not repetitive(loop, 2, 0.5)
    assert repetitive(loop, 2, 0.49)
    assert not repetitive([7] * 100, 1, 1.0)  # 99/100 < 1: a limit of 1 drops nothing


@pytest.mark.parametrize(
    "correct,drop,want",
    [(False, True, True), (True, True, False), (None, True, False), (False, False, False)],
)
def test_incorrect_only_when_asked_and_checked(correct, drop, want):
    assert incorrect(correct, drop) is want


@pytest.mark.parametrize(
    "flags,want",
    [
        ((True, True, True), "truncated"),
        ((False, True, True), "repetitive"),
        ((True, False, True), "truncated"),
        ((False, False, True), "incorrect"),
        ((False, False, False), None),
    ],
)
def test_drop_reason_is_the_first_in_the_fixed_order(flags, want):
    assert drop_reason(*flags) == want


def test_without_eos():
    assert without_eos([4, 5, EOS], EOS) == [4, 5]
    assert without_eos([4, 5], EOS) == [4, 5]
    assert without_eos([EOS], EOS) == []


def test_batch_samples_maps_rows_to_problems_and_keeps_tokens_up_to_eos():
    pad = 9
    prompts = torch.tensor([[pad, 3, 4], [5, 6, 7]])
    attn = (prompts != pad).long()
    response = torch.tensor([[1, EOS, pad], [2, 2, 2], [EOS, pad, pad], [3, EOS, pad]])  # 2 prompts x 2 samples
    batch = build_batch(prompts, attn, response, torch.zeros(response.shape), EOS, 2)
    got = batch_samples(batch, [10, 42], 2)
    assert got == [
        Sample(10, 0, [1, EOS]),
        Sample(10, 1, [2, 2, 2]),
        Sample(42, 0, [EOS]),
        Sample(42, 1, [3, EOS]),
    ]


def test_summary_counts_reasons_lengths_and_accuracy():
    rows = [
        {"response_tokens": 4, "correct": True},
        {"response_tokens": 10, "correct": False},
        {"response_tokens": 64, "correct": False},
        {"response_tokens": 7, "correct": None},
    ]
    got = summary(rows, [None, None, "truncated", "incorrect"])
    assert got == {
        "sampled": 4,
        "kept": 2,
        "dropped": {"truncated": 1, "repetitive": 0, "incorrect": 1},
        "response_tokens": {"mean": 7.0, "max": 10},
        "accuracy": 1 / 3,  # of the three checked
    }


D = SimpleNamespace(max_new_tokens=16, repeat_ngram=2, max_repeat_fraction=0.5, drop_incorrect=True)


def test_judge_decodes_without_eos_and_checks_the_answer(tiny_tokenizer):
    eos = tiny_tokenizer.eos_token_id
    body = tiny_tokenizer("So 12+34=\\boxed{46}.", add_special_tokens=False)["input_ids"]
    problem = Problem("What is 12+34?", "46")
    row, why = judge(Sample(3, 1, [*body, eos]), problem, tiny_tokenizer, check_exact, D)
    assert why is None
    assert row == {
        "question": "What is 12+34?",
        "answer": "46",
        "response": "So 12+34=\\boxed{46}.",
        "response_tokens": len(body),
        "correct": True,
        "problem": 3,
        "sample": 1,
    }
    wrong = Problem("What is 12+35?", "47")
    assert judge(Sample(3, 1, [*body, eos]), wrong, tiny_tokenizer, check_exact, D)[1] == "incorrect"
    assert judge(Sample(3, 1, body), wrong, tiny_tokenizer, check_exact, D)[1] == "truncated"
    no_gold = judge(Sample(0, 0, [*body, eos]), Problem("q", ""), tiny_tokenizer, check_exact, D)
    assert no_gold[0]["correct"] is None and no_gold[1] is None  # nothing to check against: kept


def data_cfg(overrides=()):
    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(config_name="data_teacher_rollouts", overrides=list(overrides))


def test_teacher_prompts_leave_out_the_long_ones_and_keep_their_indices(tiny_tokenizer):
    problems = arith_problems(0, "train", 256)[:6]
    prompts = [f"Question: {p.question}\nAnswer:" for p in problems]
    lengths = [len(tiny_tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    limit = sorted(lengths)[3]
    index, kept, longest = teacher_prompts(problems, data_cfg([f"rollout.max_prompt_tokens={limit}"]), tiny_tokenizer)
    assert index == [i for i, n in enumerate(lengths) if n <= limit] and len(index) < 6
    assert kept == [prompts[i] for i in index] and longest == max(lengths[i] for i in index)
    with pytest.raises(UserError, match="^rollout.max_prompt_tokens: every training prompt is longer"):
        teacher_prompts(problems, data_cfg(["rollout.max_prompt_tokens=1"]), tiny_tokenizer)


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["data.n=0"], "data.n: must be an integer >= 1, got 0"),
        (["data.max_repeat_fraction=0"], "data.max_repeat_fraction: must be in (0, 1], got 0.0"),
        (["data.max_repeat_fraction=1.5"], "data.max_repeat_fraction: must be in (0, 1], got 1.5"),
        (["data.repeat_ngram=0"], "data.repeat_ngram: must be an integer >= 1, got 0"),
        (["data.top_p=0"], "data.top_p: must be in (0, 1], got 0.0"),
        (["data.temperature=0"], "data.temperature: must be a finite number > 0, got 0.0"),
        (["rollout.engine=nope"], "rollout.engine: 'nope' is not one of: hf, vllm"),
        (["task.path=/no/file.jsonl", "task.name=hub"], "task.path: file not found: /no/file.jsonl"),
        (["teacher.name_or_path=/no/model"], "teacher.name_or_path: local model path not found: /no/model"),
    ],
)
def test_validate_data_names_the_key(overrides, message):
    with pytest.raises(UserError) as err:
        validate_data(data_cfg(overrides), overrides)
    assert str(err.value) == message


@pytest.mark.parametrize(
    "override,message",
    [
        ("rollout.n=8", "rollout.n: opd-data teacher-rollouts samples with the data.* keys; set data.n"),
        ("rollout.top_p=0.9", "rollout.top_p: opd-data teacher-rollouts samples with the data.* keys; set data.top_p"),
        ("teacher.temperature=0.7", "teacher.temperature: opd-data teacher-rollouts samples with the data.* keys; "),
        ("teacher.backend=vllm", "teacher.backend: opd-data teacher-rollouts samples with the data.* keys; it has no"),
    ],
)
def test_validate_data_refuses_keys_it_would_ignore(override, message):
    with pytest.raises(UserError) as err:
        validate_data(data_cfg([override]), [override])
    assert str(err.value).startswith(message)


def test_the_default_config_validates():
    validate_data(data_cfg(), [])
