"""The self-distillation demo presets (conf/experiment/demo_opsd_*.yaml, make opsd-rule / opsd-answer) run end to
end for two steps on the tiny demo: the demo student is built, the teacher is the student under its privileged
prompt, and eval.patterns reaches metrics.jsonl and summary.json."""

import json
import re

import pytest
from omegaconf import OmegaConf

from .conftest import REPO, metrics, opd_train

pytestmark = pytest.mark.integration

# two steps, the evaluation before and after only, few short samples
TWO_STEPS = ["trainer.max_steps=2", "eval.every=0", "eval.n_problems=4", "eval.k=1", "logger=none"]


def make_command(target: str) -> str:
    """The command line of a Makefile target's recipe."""
    recipe = re.search(rf"^{target}:.*\n\t(.*)$", (REPO / "Makefile").read_text(), re.M)
    assert recipe, target
    return recipe.group(1)


def test_the_rule_preset_trains_and_measures_the_rule(tmp_path, models_dir):
    assert make_command("opsd-rule") == "$(VENV)/bin/opd-train experiment=demo_opsd_rule $(ARGS)"
    run_dir = tmp_path / "rule"
    opd_train(run_dir, models_dir, "experiment=demo_opsd_rule", *TWO_STEPS)
    config = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    assert config.model.name_or_path == "demo:rule" and config.teacher.prompt.system == "Add the tens first."
    rows = metrics(run_dir)
    start = rows[0]
    for key in ("eval/pattern/tens_first", "eval/pattern/tens_first_teacher"):
        assert 0.0 <= start[key] <= 1.0, key
    assert "eval/pattern/tens_first" in rows[-1] and rows[-1]["step"] == 2
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["pattern/tens_first_before"] == start["eval/pattern/tens_first"]
    assert summary["pattern/tens_first_teacher"] == start["eval/pattern/tens_first_teacher"]
    assert summary["pattern/tens_first_after"] == rows[-1]["eval/pattern/tens_first"]
    assert any(p.name.startswith("rule-") for p in models_dir.glob("arith-demo-*/*"))


def test_the_answer_preset_trains_with_the_hinted_teacher(tmp_path, models_dir):
    assert make_command("opsd-answer") == "$(VENV)/bin/opd-train experiment=demo_opsd_answer $(ARGS)"
    run_dir = tmp_path / "answer"
    opd_train(run_dir, models_dir, "experiment=demo_opsd_answer", *TWO_STEPS)
    config = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    assert config.model.name_or_path == "demo:hint"
    assert config.teacher.prompt.question == "{question} The answer is {answer}."
    rows = metrics(run_dir)
    assert rows[0]["eval/acc_teacher"] is not None and [r["step"] for r in rows][-1] == 2
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["acc_teacher"] == rows[0]["eval/acc_teacher"]
    assert not any(k.startswith("pattern/") for k in summary)
    assert any(p.name.startswith("hint-") for p in models_dir.glob("arith-demo-*/*"))
