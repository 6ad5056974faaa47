"""opd-report (commands/report.py): its one-line errors, and a report of a real sweep (integration)."""

import subprocess
import sys

import pytest

from ..conftest import CLI_ENV, REPO, cli_argv


@pytest.mark.cli
def test_report_errors_in_one_line(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "opd_cli.commands.report", str(tmp_path)], capture_output=True, text=True
    )
    assert out.returncode == 2 and out.stderr.strip().count("\n") == 0
    assert "no run directory" in out.stderr


@pytest.mark.integration
def test_report_of_a_real_sweep(tmp_path, models_dir):
    sweep = tmp_path / "sweep"
    argv = cli_argv(tmp_path / "unused", models_dir, "trainer.max_steps=2", "logger=none")
    argv.remove(f"hydra.run.dir={tmp_path / 'unused'}")
    argv[3:3] = ["-m"]
    out = subprocess.run(
        [*argv, "loss=topk_lsm", "loss.k=2,4", f"hydra.sweep.dir={sweep}"],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=CLI_ENV,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    out = subprocess.run([sys.executable, "-m", "opd_cli.commands.report", str(sweep)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    text = (sweep / "report/report.md").read_text()
    assert "| loss.k=2 | 2 |" in text and "| loss.k=4 | 2 |" in text
    for name in ("loss", "grad_norm", "entropy", "logprob_gap", "overlap_ratio", "eval_acc", "pg_clipfrac"):
        assert (sweep / f"report/{name}.png").stat().st_size > 5000, name
