"""teacher=self on the demo through opd-train: the student scored after a privileged prompt it does not see."""

import pytest

from ..conftest import metrics, opd_train

pytestmark = pytest.mark.integration

PRIVILEGED = ["teacher=self", "teacher.prompt.system=Add the tens first.", "logger=none", "trainer.max_steps=2"]


def test_live_and_initial_self_teachers_take_the_same_first_step(tmp_path, models_dir):
    """At step 1 the live weights are the starting ones, so the live teacher's step equals the frozen copy's: it
    adds no gradient of its own. At step 2 (the same rollouts: the students took the same first step) only the
    teacher differs, the live one having moved with the student."""
    for weights in ("initial", "live"):
        opd_train(tmp_path / weights, models_dir, *PRIVILEGED, f"teacher.self_weights={weights}")
    frozen, live = metrics(tmp_path / "initial"), metrics(tmp_path / "live")
    assert frozen[0]["eval/acc_teacher"] == live[0]["eval/acc_teacher"]  # the student after the teacher's prompt
    for key in ("loss", "grad_norm", "logprob_gap"):
        assert live[1][key] == pytest.approx(frozen[1][key], rel=1e-5), key
    assert live[2]["response_length"] == frozen[2]["response_length"]
    assert live[2]["loss"] != pytest.approx(frozen[2]["loss"], rel=1e-6)
