"""The demo task, answer extraction, prompts, and loading problems from local files in hub layouts."""

import copy
import json

import pytest

from opd_cli.errors import UserError
from opd_cli.tasks.checking import check_exact, last_boxed
from opd_cli.tasks.problems import Problem, arith_problems, hub_problems, split_held_out
from opd_cli.tasks.prompts import format_prompt

from ..conftest import compose_cfg


def test_arith_split_is_disjoint_and_solutions_are_right():
    train = arith_problems(0, "train", 256)
    test = arith_problems(0, "test", 256)
    assert len(test) == 256 and len(train) == 90 * 90 - 256
    key = lambda p: p.solution.split("So ")[1]  # noqa: E731  "a+b=\boxed{s}."
    assert not {key(p) for p in train} & {key(p) for p in test}
    for p in train[:500] + test:
        a, b = key(p).split("=")[0].split("+")
        assert int(a) + int(b) == int(p.answer)
        assert check_exact(p.solution, p.answer)
        assert str(a) in p.question and str(b) in p.question
    assert arith_problems(0, "test", 256) == test  # fixed by seed


@pytest.mark.parametrize(
    "text,want",
    [
        ("so \\boxed{12}.", "12"),
        ("\\boxed{1} then \\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
        ("no box here", None),
        ("\\boxed{unbalanced", None),
    ],
)
def test_last_boxed(text, want):
    assert last_boxed(text) == want


def test_check_exact():
    assert check_exact("x \\boxed{ 42 }", "42")
    assert not check_exact("x \\boxed{41}", "42")
    assert not check_exact("42", "42")


def test_hub_problems_from_local_jsonl_in_dapo_layout(tmp_path):
    rows = [
        {
            "data_source": "math_dapo",
            "prompt": [{"content": f"Compute {i}+1.", "role": "user"}],
            "reward_model": {"ground_truth": str(i + 1), "style": "rule"},
        }
        for i in range(10)
    ]
    path = tmp_path / "dapo.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    problems = hub_problems(None, str(path), "train", "prompt.0.content", "reward_model.ground_truth")
    assert [p.answer for p in problems] == [str(i + 1) for i in range(10)]
    train, held = split_held_out(problems, 0, 3)
    assert len(held) == 3 and len(train) == 7 and not set(train) & set(held)


def test_hub_problems_bad_rows(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"question": "q", "answer": 1}\n{not json\n')
    with pytest.raises(UserError, match=r"bad.jsonl:2: not valid JSON"):
        hub_problems(None, str(path), "train", "question", "answer")
    path.write_text('{"question": "q", "answer": 1}\n{"question": "q2"}\n')
    with pytest.raises(UserError, match=r"bad.jsonl row 1: row has no field 'answer'"):
        hub_problems(None, str(path), "train", "question", "answer")
    with pytest.raises(UserError, match="file not found"):
        hub_problems(None, str(tmp_path / "missing.jsonl"), "train", "question", "answer")


DAPO_PREFIX = (
    "Solve the following math problem step by step. The last line of your response should be of the form "
    "Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\n"
)
DAPO_SUFFIX = '\n\nRemember to put your answer on its own line after "Answer:".'


@pytest.mark.parametrize("experiment", ["paper_a_lsm", "paper_b_topk", "paper_c_sg"])
def test_paper_prompts_take_the_problem_out_of_dapo_rows(experiment):
    """Each paper asks for \\boxed{} around the bare problem; DAPO's "Answer:" instructions are gone."""
    cfg = compose_cfg([f"experiment={experiment}", "task.chat_template=false"])
    problem = "Let $x^2 = 4$ and $x > 0$. Find {x}."
    text = format_prompt(Problem(DAPO_PREFIX + problem + DAPO_SUFFIX, "2"), cfg.task, None)
    assert problem in text and "Answer:" not in text and "\\boxed{}" in text
    assert text == cfg.task.template.replace("{question}", problem).replace("{{}}", "{}")
    # a row in another layout keeps its text
    assert format_prompt(Problem("What is 2+2?", "4"), cfg.task, None).startswith(("What is 2+2?", "Math problem"))


def test_chat_template_kwargs_reach_the_template(tiny_tokenizer):
    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = (
        "{% if enable_thinking is defined and not enable_thinking %}NOTHINK {% endif %}{{ messages[0]['content'] }}"
    )
    cfg = compose_cfg(["task.chat_template=true"]).task
    cfg.template = "{question}"
    assert format_prompt(Problem("q", "a"), cfg, tok) == "q"
    cfg.chat_template_kwargs = {"enable_thinking": False}
    assert format_prompt(Problem("q", "a"), cfg, tok) == "NOTHINK q"
