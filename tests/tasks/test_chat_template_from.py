"""task.chat_template_from=teacher: the student's prompts in the teacher tokenizer's chat template."""

import copy
import json
import shutil

import pytest

from opd_cli.config.validate import validate
from opd_cli.errors import UserError
from opd_cli.models.demo import ensure_demo_model
from opd_cli.tasks.problems import arith_problems
from opd_cli.tasks.prompts import with_chat_template
from opd_cli.training.data import training_prompts

from ..conftest import TINY_DEMO, compose_cfg, opd_train

STUDENT_TEMPLATE = "{% for m in messages %}<s>{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}A:{% endif %}"
TEACHER_TEMPLATE = (
    "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}[assistant] {% endif %}"
)


def tokenizers(tiny_tokenizer):
    student, teacher = copy.deepcopy(tiny_tokenizer), copy.deepcopy(tiny_tokenizer)
    student.chat_template, teacher.chat_template = STUDENT_TEMPLATE, TEACHER_TEMPLATE
    return student, teacher


def test_student_prompt_ids_are_the_teacher_template_formatting(tiny_tokenizer):
    student, teacher = tokenizers(tiny_tokenizer)
    cfg = compose_cfg(["task.chat_template=true", "task.chat_template_from=teacher"])
    problems = arith_problems(0, "train", 256)[:3]
    own, _ = training_prompts(problems, cfg, copy.deepcopy(student))
    switched, _ = training_prompts(problems, cfg, with_chat_template(student, teacher))
    for p, mine, theirs in zip(problems, own, switched, strict=True):
        messages = [{"role": "user", "content": cfg.task.template.format(question=p.question)}]
        want = teacher.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=False)
        assert student(theirs, add_special_tokens=False)["input_ids"] == list(want)
        assert theirs.startswith("[user] ") and mine.startswith("<s>") and theirs != mine


def test_a_teacher_without_a_chat_template_is_refused(tiny_tokenizer):
    student, _ = tokenizers(tiny_tokenizer)
    with pytest.raises(UserError, match=r"^task\.chat_template_from: the teacher's tokenizer has no chat template"):
        with_chat_template(student, tiny_tokenizer)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["task.chat_template_from=tutor"], r"^task\.chat_template_from: 'tutor' is not one of: student, teacher"),
        (["task.chat_template_from=teacher"], r"^task\.chat_template_from: .* only with task\.chat_template=true"),
    ],
)
def test_bad_values_are_refused(overrides, message):
    with pytest.raises(UserError, match=message):
        validate(compose_cfg(overrides))


@pytest.mark.cli
def test_a_run_trains_and_evaluates_on_the_teacher_template(tmp_path, models_dir):
    """Demo models copied with different chat templates: the run's prompts (samples.jsonl) are the teacher's
    formatting, and its checkpoint's tokenizer carries that template."""
    cfg = compose_cfg([f"paths.models={models_dir}", *TINY_DEMO])
    for role, template in (("student", STUDENT_TEMPLATE), ("teacher", TEACHER_TEMPLATE)):
        src = ensure_demo_model(str(models_dir), cfg.demo, cfg.task, role)
        shutil.copytree(src, tmp_path / role)
        config = json.loads((tmp_path / role / "tokenizer_config.json").read_text())
        (tmp_path / role / "tokenizer_config.json").write_text(json.dumps(config | {"chat_template": template}))
    run = tmp_path / "run"
    opd_train(
        run, models_dir, f"model.name_or_path={tmp_path / 'student'}", f"teacher.name_or_path={tmp_path / 'teacher'}",
        "task.chat_template=true", "task.chat_template_from=teacher", "trainer.max_steps=1", "logger=none",
        "logger.samples_every=1", "eval.n_problems=2", "eval.k=1",
    )  # fmt: skip
    rows = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
    assert {r["phase"] for r in rows} >= {"train", "eval"}
    assert all(r["prompt"].startswith("[user] Question: ") and r["prompt"].endswith("[assistant] ") for r in rows)
    saved = json.loads(next(run.glob("checkpoints/*/model/tokenizer_config.json")).read_text())
    assert saved.get("chat_template") == TEACHER_TEMPLATE or (
        (next(run.glob("checkpoints/*/model")) / "chat_template.jinja").read_text() == TEACHER_TEMPLATE
    )
