"""opd-report (commands/report.py): its one-line errors, and a report of a real sweep (integration)."""

import subprocess
import sys

import pytest

from ..conftest import CLI_ENV, REPO, cli_argv


@pytest.mark.cli
@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "no run directory"),
        (["smooth=1.5"], "error: smooth: the EMA weight of the past, a number in [0, 1)"),
        (["formats=[png,eps]"], "error: formats: each one of png, pdf, svg, got 'eps'"),
        (["metrics=[pg_clipfrac]"], "error: metrics: pg_clipfrac is meaningful only for loss.objective=sampled_token"),
    ],
)
def test_report_errors_in_one_line(tmp_path, args, message):
    if args:  # a run whose objective does not clip
        (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0, "pg_clipfrac": 0.0}\n')
        (tmp_path / "run_config.yaml").write_text("trainer: {seed: 0}\nloss: {objective: support_divergence, k: 4}\n")
    out = subprocess.run(
        [sys.executable, "-m", "opd_cli.commands.report", str(tmp_path), *args], capture_output=True, text=True
    )
    assert out.returncode == 2 and out.stderr.strip().count("\n") == 0, out.stderr
    assert message in out.stderr
    assert not (tmp_path / "report").exists()


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
    # as the README says: make report REPORT_DIR=... ARGS=... (-o: never reinstall the environment here)
    report = ["make", "-o", ".venv/.installed", "report", f"REPORT_DIR={sweep}", "ARGS=smooth=0.5"]
    out = subprocess.run(report, capture_output=True, text=True, cwd=REPO, env=CLI_ENV)
    assert out.returncode == 0, out.stderr
    text = (sweep / "report/report.md").read_text()
    assert "| loss.k=2 | 2 |" in text and "| loss.k=4 | 2 |" in text
    for name in ("loss", "grad_norm", "entropy", "logprob_gap", "overlap_ratio", "eval_acc"):
        assert (sweep / f"report/{name}.png").stat().st_size > 5000, name
        assert (sweep / f"report/{name}.pdf").stat().st_size > 5000, name
    # topk_lsm does not clip: no clip-fraction plot, and a note says why; K = 2 and 4 in separate panels
    assert not list((sweep / "report").glob("pg_clipfrac*"))
    assert "pg_clipfrac: not drawn for runs with loss.objective=support_divergence" in text
    assert "overlap_ratio: runs with different K (loss.diag_k or loss.k: 2, 4)" in text
