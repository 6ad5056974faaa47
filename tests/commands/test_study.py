"""opd-study (commands/study.py): a tiny variance study writes every output; bad input gives one line."""

import json
import subprocess
import sys

import pytest

from ..conftest import REPO

pytestmark = pytest.mark.cli


def test_tiny_study_writes_every_output(tmp_path):
    args = ["iterations=12", "seeds=[42,43]", "gammas=[0,1]", "teacher_iterations=5", "visit_iterations=4"]
    out = subprocess.run(
        [sys.executable, "-m", "opd_cli.commands.study", "variance", *args, f"hydra.run.dir={tmp_path}"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    data = json.loads((tmp_path / "variance.json").read_text())
    assert set(data) == {"0.0", "1.0"} and set(data["0.0"]) == {"42", "43"}
    assert len(data["1.0"]["43"]["variance"]) == 12 and all(v >= 0 for v in data["1.0"]["43"]["variance"])
    for png in ("variance.png", "drift.png", "visits.png"):
        assert (tmp_path / png).stat().st_size > 5000
    report = (tmp_path / "report.md").read_text()
    assert "| 0.0 |" in report and "| 1.0 |" in report and "Median variance grows with gamma" in report


def test_bad_study_input(tmp_path):
    run = [sys.executable, "-m", "opd_cli.commands.study"]
    out = subprocess.run([*run, "nope"], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 2 and out.stderr.startswith("error: usage: opd-study")
    out = subprocess.run(
        [*run, "variance", "micro_batches=7", f"hydra.run.dir={tmp_path}"], capture_output=True, text=True, cwd=REPO
    )
    assert out.returncode == 2 and "micro_batches: must divide batch" in out.stderr
