"""opd-train refuses model files it cannot train with in one line, before Hydra makes the run directory.

The case that needs the real CLI: a teacher whose vocabulary differs from the student's, both tiny
models saved to disk (the other cases of models/preflight.py are unit tests in tests/models/test_preflight.py
and tests/config/test_validate.py)."""

import re
import subprocess

import pytest

from ..models.tiny import other_vocabulary_model, save_model
from .conftest import CLI_ENV, REPO, cli_argv


@pytest.mark.cli
def test_a_teacher_of_another_vocabulary_is_refused_before_the_run_directory(
    tiny_model, tiny_tokenizer, models_dir, tmp_path
):
    student = save_model(tmp_path / "student", tiny_model, tiny_tokenizer)
    teacher = other_vocabulary_model(tmp_path / "teacher")
    run_dir = tmp_path / "run"
    argv = cli_argv(
        run_dir, models_dir, f"model.name_or_path={student}", f"teacher.name_or_path={teacher}", "logger=none"
    )
    out = subprocess.run(argv, capture_output=True, text=True, cwd=REPO, env=CLI_ENV, timeout=300)
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert re.fullmatch(
        r"error: teacher\.name_or_path: the teacher's vocabulary does not match the student's "
        r"\(280 vs 300 tokens, 20 token-id pairs differ\)",
        lines[0],
    ), lines[0]
    assert not run_dir.exists()
