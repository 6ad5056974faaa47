"""opd-report on a real 2-job sweep (integration), and run labelling."""

import json
import subprocess
import sys

import pytest

from opd_cli.analysis.report import labels, write_report

from ..conftest import CLI_ENV, REPO, cli_argv


def fake_run(path, overrides, steps=3):
    (path / ".hydra").mkdir(parents=True)
    (path / ".hydra/overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    rows = [{"step": 0, "eval/acc": 0.1}] + [{"step": s, "loss": 1.0 / s, "entropy": 0.5} for s in range(1, steps)]
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_labels_are_the_overrides_that_differ(tmp_path):
    a = fake_run(tmp_path / "0", ["loss.k=1", "logger=none", "paths.models=/x"])
    b = fake_run(tmp_path / "1", ["loss.k=4", "logger=none", "paths.models=/x"])
    assert labels([a, b]) == ["loss.k=1", "loss.k=4"]
    assert labels([a]) == ["0"]  # a single run: nothing differs, its directory names it


def test_report_of_fake_runs(tmp_path):
    fake_run(tmp_path / "0", ["loss.k=1"])
    fake_run(tmp_path / "1", ["loss.k=4"])
    report = write_report(tmp_path)
    text = report.read_text()
    assert "| loss.k=1 | 2 |" in text and "| loss.k=4 | 2 |" in text
    assert (tmp_path / "report/loss.png").exists() and (tmp_path / "report/eval_acc.png").exists()
    assert not (tmp_path / "report/grad_norm.png").exists()  # no run logged it: no empty plot


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
