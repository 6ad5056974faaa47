"""opd-train on malformed data files: one line naming task.path, exit code 2, nothing written."""

import subprocess

import pytest

from ..tasks.bad_data import BAD_FILES, write
from .conftest import CLI_ENV, REPO, cli_argv

# a few of the cases tests/config/test_validate.py checks in-process: a line, a row, a file
CASES = {"not-json", "no-answer", "text-named-parquet"}


def tree(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.mark.cli
def test_opd_train_refuses_bad_data_before_making_the_run_dir(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    cases = [(write(data, name, content), end) for case, name, content, end in BAD_FILES if case in CASES]
    assert len(cases) == len(CASES)
    before = tree(tmp_path)
    for path, end in cases:
        argv = cli_argv(tmp_path / "run", tmp_path / "models", "task.name=hub", f"task.path={path}", "task.n_eval=1")
        argv += ["model=qwen2.5-7b-instruct", "teacher=openthinker3", "logger=none"]
        out = subprocess.run(argv, capture_output=True, text=True, cwd=REPO, env=CLI_ENV, timeout=300)
        assert out.returncode == 2, out.stderr[-3000:]
        assert "Traceback" not in out.stderr
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"error: task.path: {path}{end}"), out.stderr
    assert not (tmp_path / "run").exists()
    assert tree(tmp_path) == before
