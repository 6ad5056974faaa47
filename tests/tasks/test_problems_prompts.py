"""The demo task, answer extraction, prompts, and loading problems from local files in hub layouts."""

import copy
import json

import pytest

from opd_cli.errors import UserError
from opd_cli.tasks.checking import check_exact, last_boxed
from opd_cli.tasks.problems import (
    Problem,
    arith_problems,
    check_task_data,
    hub_problems,
    load_problems,
    read_problems,
    split_held_out,
)
from opd_cli.tasks.prompts import check_template, format_prompt
from opd_cli.training.data import training_prompts

from ..conftest import compose_cfg
from .bad_data import BAD_FILES, GOOD_ROW, write


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
    with pytest.raises(UserError, match=r"^task\.path: .*bad\.jsonl line 2: not JSON"):
        hub_problems(None, str(path), "train", "question", "answer")
    path.write_text('{"question": "q", "answer": 1}\n{"question": "q2"}\n')
    with pytest.raises(UserError, match=r"^task\.path: .*bad\.jsonl line 2: no field 'answer'"):
        hub_problems(None, str(path), "train", "question", "answer")
    with pytest.raises(UserError, match="^task.path: file not found"):
        hub_problems(None, str(tmp_path / "missing.jsonl"), "train", "question", "answer")


@pytest.mark.parametrize("case,name,content,end", BAD_FILES, ids=[c[0] for c in BAD_FILES])
def test_bad_data_files_get_one_line_naming_key_file_and_line(case, name, content, end, tmp_path):
    path = write(tmp_path, name, content)
    with pytest.raises(UserError) as err:
        read_problems(path, "question", "answer", "eval.benchmark_paths.amc23")
    assert str(err.value).startswith(f"eval.benchmark_paths.amc23: {path}{end}"), str(err.value)
    assert "\n" not in str(err.value)


def test_a_directory_is_not_a_data_file(tmp_path):
    with pytest.raises(UserError, match=f"^task.path: {tmp_path} is a directory; give a jsonl or parquet file$"):
        read_problems(tmp_path, "question", "answer")


def test_good_rows_load_with_numbers_as_answers_and_a_byte_order_mark(tmp_path):
    path = write(
        tmp_path, "ok.jsonl", b'\xef\xbb\xbf{"question": "q1", "answer": 7}\n\n{"question": "q2", "answer": "x"}\n'
    )
    assert read_problems(path, "question", "answer") == [Problem("q1", "7"), Problem("q2", "x")]


def test_a_file_is_read_again_when_it_changes(tmp_path):
    """The start-up check and the run share one cached read, keyed by the file's time and size."""
    path = write(tmp_path, "data.jsonl", GOOD_ROW * 3)
    assert len(read_problems(path, "question", "answer")) == 3
    path.write_bytes(GOOD_ROW * 3 + b"{oops\n")
    with pytest.raises(UserError, match="line 4: not JSON"):
        read_problems(path, "question", "answer")


def _hub_task(path, n_eval):
    cfg = compose_cfg(["task.name=hub", f"task.path={path}", f"task.n_eval={n_eval}"]).task
    return cfg


def test_n_eval_must_leave_rows_to_train_on(tmp_path):
    path = write(tmp_path, "three.jsonl", GOOD_ROW * 3)
    train, held = load_problems(_hub_task(path, 2))
    assert len(train) == 1 and len(held) == 2
    check_task_data(_hub_task(path, 2))
    message = f"task.n_eval: {path} has 3 rows, need more than task.n_eval=3 (held out; the rest are trained on)"
    for call in (load_problems, check_task_data):
        with pytest.raises(UserError) as err:
            call(_hub_task(path, 3))
        assert str(err.value) == message


def test_the_arith_task_has_8100_problems():
    cfg = compose_cfg(["task.n_eval=8099"]).task
    check_task_data(cfg)
    assert len(load_problems(cfg)[0]) == 1
    cfg.n_eval = 8100
    message = (
        "task.n_eval: the arith task has 8100 rows, need more than task.n_eval=8100 (held out; the rest are trained on)"
    )
    for call in (load_problems, check_task_data):
        with pytest.raises(UserError) as err:
            call(cfg)
        assert str(err.value) == message


@pytest.mark.parametrize(
    "template,message",
    [
        ("Q: {questoin}", "unknown placeholder '{questoin}'; the template may use {question}"),
        ("{question} {foo}", "unknown placeholder '{foo}'; the template may use {question}"),
        ("{question} in \\boxed{}", "unknown placeholder '{}'; the template may use {question}"),
        ("{0} {question}", "unknown placeholder '{0}'; the template may use {question}"),
        ("{question.upper}", "unknown placeholder '{question.upper}'; the template may use {question}"),
        ("{question} }", "a stray brace (Single '}' encountered in format string)"),
        ("{question", "a stray brace (expected '}' before end of string)"),
        ("{question:d}", "cannot fill in {question} (Unknown format code 'd' for object of type 'str')"),
        ("no placeholder", "must contain '{question}'"),
    ],
)
def test_bad_templates_are_named(template, message):
    with pytest.raises(UserError) as err:
        check_template(template)
    assert str(err.value).startswith(f"task.template: {message}"), str(err.value)


@pytest.mark.parametrize("template", ["{question} {foo}", "{question} }", "{question:d}"])
def test_the_prompt_builder_names_a_bad_template_the_same_way(template):
    """Should a template reach it unchecked, the prompt builder gives the start-up check's line."""
    cfg = compose_cfg().task
    cfg.template = template
    with pytest.raises(UserError) as err:
        format_prompt(Problem("q", "a"), cfg, None)
    with pytest.raises(UserError) as want:
        check_template(template)
    assert str(err.value) == str(want.value)


@pytest.mark.parametrize("template", ["{question}", "Q: {question}\nA:", "{question} \\boxed{{}}", "{question!s:>3}"])
def test_good_templates_pass(template):
    check_template(template)


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


def test_no_chat_template_names_the_key_of_the_command(tiny_tokenizer):
    """opd-train's key is task.chat_template (its prompts come from training_prompts); opd-eval passes
    its own top-level chat_template (see tests/commands/test_evaluate.py)."""
    assert tiny_tokenizer.chat_template is None
    cfg = compose_cfg(["task.chat_template=true"])
    with pytest.raises(UserError, match=r"^task\.chat_template: the model's tokenizer has no chat template; "):
        training_prompts([Problem("q", "a")], cfg, tiny_tokenizer)
    with pytest.raises(
        UserError, match=r"^chat_template: the model's tokenizer has no chat template; set chat_template=false"
    ):
        format_prompt(Problem("q", "a"), cfg.task, tiny_tokenizer, "chat_template")
