"""pass@k and avg@k, math answer checking (equivalences, wrong and hostile answers), benchmark loading."""

import itertools
import time
from math import comb

import pytest

from opd_cli.errors import UserError
from opd_cli.tasks.checking import check_math_verify, plausible_length
from opd_cli.tasks.problems import load_problems
from opd_cli.tasks.scores import avg_at_k, mean_pass_at_k, pass_at_k

from ..conftest import REPO, compose_cfg

FIXTURES = REPO / "tests/fixtures"


@pytest.mark.parametrize("n", [1, 2, 5, 8])
def test_pass_at_k_is_the_subset_probability(n):
    """Against brute force: the share of all k-subsets of the n samples that hold a correct one."""
    for c in range(n + 1):
        samples = [True] * c + [False] * (n - c)
        for k in range(1, n + 1):
            subsets = list(itertools.combinations(range(n), k))
            want = sum(any(samples[i] for i in s) for s in subsets) / len(subsets)
            assert pass_at_k(n, c, k) == pytest.approx(want, abs=1e-12)
            assert pass_at_k(n, c, k) == pytest.approx(1 - comb(n - c, k) / comb(n, k), abs=1e-12)


def test_pass_at_1_is_the_mean_and_bad_arguments_raise():
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)
    with pytest.raises(ValueError):
        pass_at_k(4, 1, 5)
    rows = [[True, False, False, False], [True, True, False, False]]
    assert avg_at_k(rows) == pytest.approx(3 / 8)
    assert mean_pass_at_k(rows, 2) == pytest.approx((pass_at_k(4, 1, 2) + pass_at_k(4, 2, 2)) / 2)


@pytest.mark.parametrize(
    "gold,response",
    [
        ("\\frac{1}{2}", "so \\boxed{0.5}"),
        ("0.5", "\\boxed{\\frac{1}{2}}"),
        ("1024", "\\boxed{2^{10}}"),
        ("\\frac{3}{4}", "\\boxed{\\dfrac{3}{4}}"),
        ("[1, 2)", "the set is \\boxed{[1,2)}"),
        ("5", "\\boxed{5 \\text{ cm}}"),
        ("27.0", "\\boxed{27}"),
        ("5\\sqrt{2}", "\\boxed{\\sqrt{50}}"),
    ],
)
def test_equivalent_answers(gold, response):
    assert check_math_verify(response, gold)


@pytest.mark.parametrize(
    "gold,response",
    [("24", "\\boxed{25}"), ("24", "the answer is 24"), ("[1, 2)", "\\boxed{(1,2]}"), ("3", "\\boxed{}")],
)
def test_wrong_or_missing_answers(gold, response):
    assert not check_math_verify(response, gold)


@pytest.mark.parametrize(
    "response",
    [
        "\\boxed{9^{9^{9^{9}}}}",
        "\\boxed{" + "+".join(["x"] * 3333) + "}",  # about 10,000 characters
        "\\boxed{\\frac{1}{2",  # unbalanced braces
        "\\boxed{" + "{" * 500 + "1" + "}" * 499,
        "\\boxed{10^{10^{8}}}",  # short enough to be parsed: the alarm ends the comparison
    ],
)
def test_hostile_answers_get_a_verdict_within_the_timeout(response):
    t0 = time.perf_counter()
    assert check_math_verify(response, "1", timeout_s=4) is False
    assert time.perf_counter() - t0 < 4.5


@pytest.mark.parametrize(
    "response",
    [
        "\\boxed{" + "+".join(["1"] * 1000) + "}",  # math-verify alone scores this as 1
        "\\boxed{" + "+".join(["1"] * 10_000) + "}",
        "\\boxed{" + "\\sqrt{" * 60 + "1" + "}" * 60 + "}",  # nested: equal to 1, and scored so alone
        "\\boxed{" + "\\cdot".join(["1"] * 2000) + "}",
        "\\boxed{1" + "+0" * 3000 + "}",
    ],
    ids=["sum-1000", "sum-10000", "sqrt-nested-60", "product-2000", "plus-zero-3000"],
)
def test_implausibly_long_answers_are_wrong_before_parsing(response):
    t0 = time.perf_counter()
    assert check_math_verify(response, "1") is False
    assert time.perf_counter() - t0 < 0.1  # judged on its length: not parsed


@pytest.mark.parametrize(
    "gold,response",
    [
        ("\\frac{\\sqrt{3}}{2}", "\\boxed{\\dfrac{\\sqrt{3}}{2}}"),
        ("\\frac{\\sqrt{3}}{2}", "\\boxed{\\frac{1}{2}\\sqrt{3}}"),
        ("\\left[-\\frac{1}{2}, \\frac{3}{2}\\right)", "so \\boxed{\\left[ -\\dfrac{1}{2},\\ \\dfrac{3}{2} \\right)}"),
        ("1", "\\boxed{\\frac{\\sqrt{2}\\cdot\\sqrt{2}}{2}}"),
        (
            "(-\\infty, -2) \\cup (3, \\infty)",
            "\\boxed{\\left(-\\infty,\\,-2\\right)\\cup\\left(3,\\,+\\infty\\right)}",
        ),
    ],
)
def test_long_but_plausible_answers_still_count(gold, response):
    assert check_math_verify(response, gold)


def test_the_length_rule():
    """At most max(64, 8 x len(gold)) characters, whitespace not counted."""
    assert plausible_length("x" * 64, "1") and not plausible_length("x" * 65, "1")
    assert plausible_length("x" * 80, "y" * 10) and not plausible_length("x" * 81, "y" * 10)
    assert plausible_length(" ".join("x" * 64), " 1 ")


def test_the_checker_refuses_to_run_off_the_main_thread():
    """Off the main thread math-verify's alarms cannot be set: the check would score every answer
    wrong (or, without its timeouts, could hang), so it refuses."""
    import threading

    errors = []

    def check():
        try:
            check_math_verify("\\boxed{1}", "1")
        except RuntimeError as e:
            errors.append(str(e))

    thread = threading.Thread(target=check)
    thread.start()
    thread.join()
    assert errors and "main thread" in errors[0]
    assert check_math_verify("\\boxed{1}", "1")


@pytest.mark.parametrize(
    "task,file,n,first_answer",
    [
        ("aime24", "aime24.jsonl", 2, "24"),
        ("aime25", "aime25.jsonl", 2, "91"),
        ("amc23", "amc23.jsonl", 2, "0.75"),
        ("math500", "math500.jsonl", 2, "5\\sqrt{2}"),
    ],
)
def test_benchmarks_load_from_files_in_the_hub_layout(task, file, n, first_answer):
    cfg = compose_cfg([f"task={task}", f"task.path={FIXTURES / file}"])
    train, held = load_problems(cfg.task)
    assert train == [] and len(held) == n  # an evaluation benchmark: every row held out
    assert held[0].answer == first_answer and held[0].question
    assert cfg.task.checker == "math_verify" and cfg.task.eval_only


def test_dapo_math_loads_from_parquet_in_the_hub_layout():
    cfg = compose_cfg(["task=dapo_math", f"task.path={FIXTURES / 'dapo_math.parquet'}", "task.n_eval=2"])
    train, held = load_problems(cfg.task)
    assert len(train) == 4 and len(held) == 2
    assert all(p.question.startswith("Solve: what is") for p in train + held)
    assert sorted(int(p.answer) for p in train + held) == [0, 2, 4, 6, 8, 10]


def test_training_on_an_evaluation_benchmark_is_refused(tmp_path):
    from opd_cli.training.loop import train

    cfg = compose_cfg(["task=aime24", f"task.path={FIXTURES / 'aime24.jsonl'}"])
    with pytest.raises(UserError, match="is an evaluation benchmark"):
        train(cfg, tmp_path)
