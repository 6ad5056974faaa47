"""The demo models (models/demo.py): the tokenizer round trip, the model shape, each role's SFT data and cache."""

import re

from transformers import AutoTokenizer

from opd_cli.models.demo import build_model
from opd_cli.tasks.problems import arith_problems


def test_tokenizer_reload_keeps_ids(tiny_tokenizer, tiny_model, tmp_path):
    """Saved beside a Qwen2 config, AutoTokenizer (and vLLM) rebuild it as Qwen2's tokenizer."""
    tiny_model.save_pretrained(tmp_path)
    tiny_tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    texts = [p.question + " " + p.solution for p in arith_problems(1, "test", 500)]
    texts += ["37 + 48 = 85", "  spaces\tand\nnewlines  ", "Ünïcödé 12345 <|im_end|>"]
    for text in texts:
        assert reloaded(text)["input_ids"] == tiny_tokenizer(text)["input_ids"], text


def test_demo_model_has_head_size_64(tiny_tokenizer):
    from types import SimpleNamespace

    model = build_model(tiny_tokenizer, SimpleNamespace(hidden_size=128, num_layers=1, seed=0))
    assert model.config.hidden_size // model.config.num_attention_heads == 64


def test_the_tens_first_teacher_is_cached_apart_and_the_default_cache_is_unchanged():
    """demo.teacher_style=tens_first names its own teacher directory beside the shared tokenizer; the default
    demo keeps the cache directory (and so the models) it had before the key existed."""
    from opd_cli.models.demo import demo_dir, demo_model_dir

    from ..conftest import compose_cfg

    default, other = compose_cfg(), compose_cfg(["demo.teacher_style=tens_first"])
    assert demo_dir("m", default.demo, default.task).name == "arith-demo-db5c649b96"
    assert demo_dir("m", other.demo, other.task) == demo_dir("m", default.demo, default.task)
    assert demo_model_dir("m", default.demo, default.task, "teacher").name == "teacher-800"
    assert demo_model_dir("m", other.demo, other.task, "teacher").name == "teacher-tens_first-800"
    assert demo_model_dir("m", other.demo, other.task, "student").name == "student-300"


def test_tens_first_solutions_differ_from_the_first_word_and_end_in_the_sum():
    """The mismatched teacher's SFT data: another wording from its first token on, the right boxed sum."""
    from opd_cli.models.demo import sft_pairs
    from opd_cli.tasks.checking import check_exact

    from ..conftest import compose_cfg

    task = compose_cfg().task
    columns, tens = sft_pairs(task), sft_pairs(task, style="tens_first")
    answers = [p.answer for p in arith_problems(task.seed, "train", task.n_eval)]
    assert [p for p, _ in columns] == [p for p, _ in tens]
    for (_, c), (_, t), answer in zip(columns, tens, answers, strict=True):
        assert t.startswith(" Tens first: ") and not c.startswith(" Tens")
        assert t.endswith(f"\\boxed{{{answer}}}.") and check_exact(t, answer)


def test_the_rule_models_data_pairs_each_problem_with_and_without_the_system_line():
    """demo:rule's SFT mix: every training problem twice, with the system line (as format_prompt writes it, the
    teacher's prompt under teacher.prompt.system) and a tens-first solution, without it and a column solution;
    both with the right sum, so the line alone tells the two apart."""
    from opd_cli.models.demo import rule_pairs
    from opd_cli.tasks.checking import check_exact

    from ..conftest import compose_cfg

    cfg = compose_cfg()
    task, system = cfg.task, cfg.demo.rule_system
    assert system == "Add the tens first."
    pairs = rule_pairs(task, system)
    problems = arith_problems(task.seed, "train", task.n_eval)
    assert len(pairs) == 2 * len(problems)
    with_line, without = pairs[0::2], pairs[1::2]
    for p, (ruled, tens), (plain, columns) in zip(problems, with_line, without, strict=True):
        assert plain == task.template.format(question=p.question)
        assert ruled == f"{system}\n{plain}"
        assert tens.startswith(" Tens first: ") and check_exact(tens, p.answer)
        assert not columns.startswith(" Tens") and " write " in columns and check_exact(columns, p.answer)
    assert rule_pairs(task, "Other rule.")[0][0].startswith("Other rule.\nQuestion: ")


def test_the_hint_models_data_is_the_students_plus_the_hinted_problems_solved():
    """demo:hint's SFT mix: the demo student's pairs (random column sums) and, for every problem, its question
    with the answer appended (demo.hint_question) and the correct column solution."""
    from opd_cli.models.demo import hint_pairs, sft_pairs
    from opd_cli.tasks.checking import check_exact

    from ..conftest import compose_cfg

    cfg = compose_cfg()
    task, question = cfg.task, cfg.demo.hint_question
    assert question == "{question} The answer is {answer}."
    pairs = hint_pairs(task, question)
    problems = arith_problems(task.seed, "train", task.n_eval)
    plain, hinted = pairs[0::2], pairs[1::2]
    assert plain == sft_pairs(task, wrong_sums=True)
    assert sum(check_exact(r, p.answer) for p, (_, r) in zip(problems, plain, strict=True)) < len(problems) // 10
    for p, (prompt, response) in zip(problems, hinted, strict=True):
        assert prompt == task.template.format(question=f"{p.question} The answer is {p.answer}.")
        assert response == " " + p.solution and check_exact(response, p.answer)
    other = hint_pairs(task, "{question} Hint: {answer}")[1][0]
    assert other.endswith(f"Hint: {problems[0].answer}\nAnswer:")


def test_the_self_distillation_students_are_cached_by_their_prompt_text():
    """demo:rule and demo:hint live beside the other roles (the shared directory keeps its name) under names
    that carry a hash of their prompt text and their SFT steps (the teacher's for rule, the student's for hint)."""
    from opd_cli.models.demo import demo_dir, demo_model_dir

    from ..conftest import compose_cfg

    default = compose_cfg()
    other = compose_cfg(["demo.rule_system=Think in tens.", "demo.hint_question='{question} Hint: {answer}'"])
    root = demo_dir("m", default.demo, default.task)
    assert root.name == "arith-demo-db5c649b96" and demo_dir("m", other.demo, other.task) == root
    rule, hint = (demo_model_dir("m", default.demo, default.task, r) for r in ("rule", "hint"))
    assert rule.parent == root and rule.name.startswith("rule-") and rule.name.endswith("-800")
    assert hint.parent == root and hint.name.startswith("hint-") and hint.name.endswith("-300")
    assert demo_model_dir("m", other.demo, other.task, "rule") not in (rule, hint)
    assert demo_model_dir("m", other.demo, other.task, "hint") not in (rule, hint)


def test_a_hint_template_that_cannot_be_filled_in_is_refused_naming_its_key():
    """demo.hint_question is checked (when demo:hint is used) before anything is built: unknown placeholders,
    stray braces and a template without {question} are one-line errors."""
    import pytest

    from opd_cli.config.validate import validate
    from opd_cli.errors import UserError

    from ..conftest import compose_cfg

    for template, says in [
        ("{q} is {answer}", "unknown placeholder '{q}'"),
        ("{question} {", "a stray brace"),
        ("The answer is {answer}.", "must contain '{question}'"),
    ]:
        cfg = compose_cfg(["model.name_or_path=demo:hint"])
        cfg.demo.hint_question = template
        with pytest.raises(UserError, match=rf"^demo\.hint_question: {re.escape(says)}"):
            validate(cfg)
    validate(compose_cfg(["model.name_or_path=demo:hint"]))
    cfg = compose_cfg()  # the default student does not use the template
    cfg.demo.hint_question = "{q}"
    validate(cfg)
