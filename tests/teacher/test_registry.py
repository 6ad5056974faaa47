"""What each objective needs from the teacher (teacher/registry.py), for every loss preset."""

import pytest

from opd_cli.objectives.registry import make_objective

from ..objectives.synthetic import PRESETS, preset

TOPK_ONLY = frozenset({"sampled_logprob", "topk"})  # what a vLLM teacher gives (prompt_logprobs)


@pytest.mark.parametrize("name", PRESETS)
def test_teacher_requirements(name):
    from opd_cli.errors import UserError
    from opd_cli.teacher.hf import HFTeacher
    from opd_cli.teacher.registry import check_teacher_supplies

    obj = make_objective(preset(name))
    check_teacher_supplies(obj, HFTeacher.supplies, "hf")  # the in-process teacher supplies everything
    needs_full = name in {"full_rkl", "fkl", "jsd", "student_topk", "student_topk_pg", "nonoverlap_only"}
    if needs_full:
        with pytest.raises(UserError, match=rf"^loss: '{name}' needs full from the teacher, which teacher.backend"):
            check_teacher_supplies(obj, TOPK_ONLY, "vllm")
    else:
        check_teacher_supplies(obj, TOPK_ONLY, "vllm")
