"""``eval.patterns``: the share of evaluated responses each regular expression matches (training/evaluation.py),
the metrics and summary keys it becomes (training/loop.py), and the check of its values (config/validate.py)."""

import pytest

from opd_cli.config.validate import check_patterns, validate
from opd_cli.errors import UserError
from opd_cli.rollout.hf import HFRollout
from opd_cli.tasks.checking import make_checker
from opd_cli.tasks.problems import arith_problems
from opd_cli.tasks.prompts import format_prompt
from opd_cli.training.evaluation import evaluate, evaluate_patterns, pattern_rates
from opd_cli.training.loop import pattern_metrics, pattern_summary
from opd_cli.training.samples import Recording

from ..conftest import compose_cfg

TENS_FIRST = r"^\s*Tens first"


def test_pattern_rates_are_the_share_of_responses_searched():
    texts = [" Tens first: 40 and 30 make 70.", "7+8=15, write 5 carry 1.", "Tens first", "no Tens first here"]
    rates = pattern_rates(texts, {"tens_first": TENS_FIRST, "carry": "carry", "anywhere": "Tens first"})
    assert rates == {"tens_first": 0.5, "carry": 0.25, "anywhere": 0.75}
    assert pattern_rates([], {"x": "a"}) == {"x": 0.0}
    assert pattern_rates(texts, {}) == {}


def test_rates_come_from_the_evaluations_own_samples(tiny_model, tiny_tokenizer):
    """The accuracy is the plain evaluation's, and each rate is over exactly the responses it sampled."""
    cfg = compose_cfg(["eval.k=2", "eval.max_new_tokens=6", "eval.batch_size=4"])
    problems = arith_problems(0, "train", 64)[-5:]
    prompts = [format_prompt(q, cfg.task, tiny_tokenizer) for q in problems]
    checker = make_checker(cfg.task)
    recording = Recording(HFRollout(tiny_model, tiny_tokenizer))
    patterns = {"digit": r"\d", "never": "(?!)", "always": ""}
    acc, rates = evaluate_patterns(recording, problems, prompts, checker, cfg.eval, 3, "eval", patterns)
    assert acc == evaluate(HFRollout(tiny_model, tiny_tokenizer), problems, prompts, checker, cfg.eval, 3)
    assert len(recording.texts) == 10
    assert rates == pattern_rates(recording.texts, patterns)
    assert rates["never"] == 0.0 and rates["always"] == 1.0


def test_metric_and_summary_names():
    assert pattern_metrics({"tens_first": 0.25}) == {"eval/pattern/tens_first": 0.25}
    assert pattern_metrics({"tens_first": 1.0}, "_teacher") == {"eval/pattern/tens_first_teacher": 1.0}
    assert pattern_summary({"a": 0.0}, {"a": 0.5}, {"a": 1.0}) == {
        "pattern/a_before": 0.0,
        "pattern/a_after": 0.5,
        "pattern/a_teacher": 1.0,
    }
    assert pattern_summary({"a": 0.0}, {"a": 0.5}, {}) == {"pattern/a_before": 0.0, "pattern/a_after": 0.5}
    assert pattern_summary({}, {}, {}) == {}


def test_the_default_has_no_patterns_and_the_documented_override_adds_one():
    assert dict(compose_cfg().eval.patterns) == {}
    cfg = compose_cfg([f"+eval.patterns.tens_first='{TENS_FIRST}'"])  # as conf/train.yaml shows it
    assert dict(cfg.eval.patterns) == {"tens_first": TENS_FIRST}
    validate(cfg)


@pytest.mark.parametrize("pattern", ["(unclosed", "*x", "[a-"])
def test_a_bad_regular_expression_is_refused_naming_its_key(pattern):
    with pytest.raises(UserError, match=r"^eval\.patterns\.rule: not a regular expression \("):
        check_patterns({"ok": "fine", "rule": pattern})
    cfg = compose_cfg()
    cfg.eval.patterns = {"rule": pattern}
    with pytest.raises(UserError, match=r"^eval\.patterns\.rule: "):
        validate(cfg)
