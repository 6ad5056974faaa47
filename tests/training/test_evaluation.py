"""The evaluation's progress (opd_cli.progress through training/evaluation.py) on a tiny real model.

Where stderr is not a terminal (here: pytest captures it) progress is plain lines, at most one
per ``LOG_EVERY_S`` seconds (0 here: one per call of ``eval.batch_size`` samples), and the end is
one log record; on a terminal it is a tqdm bar; off rank 0 it is nothing. No timing is asserted.
"""

import io
import logging
from types import SimpleNamespace

import pytest

from opd_cli import progress
from opd_cli.rollout.hf import HFRollout
from opd_cli.tasks.problems import arith_problems
from opd_cli.training.evaluation import evaluate

# 6 problems x 2 samples, 4 samples (2 problems) per generate call: 3 calls
ECFG = SimpleNamespace(k=2, batch_size=4, temperature=1.0, top_p=1.0, max_new_tokens=4)


def run_eval(tiny_model, tiny_tokenizer) -> float:
    problems = arith_problems(0, "eval", 16)[:6]
    prompts = [f"Question: {p.question}\nAnswer:" for p in problems]
    return evaluate(HFRollout(tiny_model, tiny_tokenizer), problems, prompts, lambda t, a: False, ECFG, 0, "eval x")


def test_evaluation_reports_progress_per_call_and_logs_its_end(tiny_model, tiny_tokenizer, capsys, caplog, monkeypatch):
    monkeypatch.setattr(progress, "LOG_EVERY_S", 0.0)
    with caplog.at_level(logging.INFO, logger="opd_cli.progress"):
        assert run_eval(tiny_model, tiny_tokenizer) == 0.0
    lines = capsys.readouterr().err.splitlines()
    # one line after each call but the last (whose count the end record gives)
    assert [line.split(" (")[0] for line in lines] == ["eval x: 4/12 samples", "eval x: 8/12 samples"]
    assert all("samples/s" in line and "elapsed" in line and "acc=0.000" in line for line in lines)
    assert "\r" not in "".join(lines)  # no bar redraws in a log
    ends = [r.getMessage() for r in caplog.records if r.name == "opd_cli.progress"]
    assert len(ends) == 1 and ends[0].startswith("eval x: 12/12 samples (100%), ")


def test_no_progress_off_rank_0(tiny_model, tiny_tokenizer, capsys, caplog, monkeypatch):
    monkeypatch.setattr(progress, "LOG_EVERY_S", 0.0)
    monkeypatch.setenv("RANK", "1")
    with caplog.at_level(logging.INFO, logger="opd_cli.progress"):
        run_eval(tiny_model, tiny_tokenizer)
    assert capsys.readouterr().err == ""
    assert not [r for r in caplog.records if r.name == "opd_cli.progress"]


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize(("file", "mode"), [(Terminal(), "bar"), (io.StringIO(), "lines")])
def test_a_terminal_gets_a_bar_a_log_gets_lines(file, mode):
    bar = progress.Progress(12, "eval x", unit="samples", file=file, every_s=0.0)
    assert bar.mode == mode
    for _ in range(3):
        bar.update(4, acc="0.500")
    bar.close()
    out = file.getvalue()
    if mode == "bar":
        assert out.startswith("\reval x:") and "/12 [" in out  # tqdm's bar (how often it redraws is timing)
    else:
        assert out.splitlines()[-1].startswith("eval x: 8/12 samples (67%), ")


def test_progress_line():
    line = progress.progress_line("eval", 256, 1024, "samples", 64.0, {"acc": "0.420"})
    assert line == "eval: 256/1024 samples (25%), 4 samples/s, 1m04s elapsed, ~3m12s left, acc=0.420"
    assert progress.duration(7500) == "2h05m"


def test_a_resumed_phase_counts_its_rate_from_where_it_started():
    line = progress.progress_line("OPD", 300, 400, "steps", 50.0, {}, initial=200)
    assert line == "OPD: 300/400 steps (75%), 2 steps/s, 50s elapsed, ~50s left"
    log = io.StringIO()
    bar = progress.Progress(400, "OPD", unit="steps", file=log, every_s=0.0, initial=200)
    bar.update(1, loss="0.1")
    assert log.getvalue().startswith("OPD: 201/400 steps (50%), ") and "\r" not in log.getvalue()
