"""opd-study auroc and reward-depth end to end on the tiny demo (HF engines, small n): every output, and what
they say agrees with the per-response and per-prefix records; bad input is one line before the directory exists.

The tiny demo's responses are all wrong by the arith checker, so the runs judge with a checker of our own
(``task.checker=study_checks:even``: correct where the response has an even number of characters), which gives
both verdicts.
"""

import json
import subprocess
import sys

import numpy as np
import pytest

from opd_cli.analysis.reward_stats import auroc

from .conftest import CLI_ENV, REPO, TINY_DEMO

pytestmark = pytest.mark.integration

CHECKS = "def even(response, gold):\n    return len(response) % 2 == 0\n"
# the README's examples, run as written with the short settings after them
README_AUROC = ["auroc", "teachers=[demo:teacher,demo:student]", "n=16"]
README_DEPTH = ["reward-depth", "depths=[4,8,16]", "continuations=8"]


def study(tmp_path, models_dir, args, checker=True):
    (tmp_path / "study_checks.py").write_text(CHECKS)
    short = [f"paths.models={models_dir}", *TINY_DEMO, "n_problems=6", "bootstrap=100", "max_new_tokens=24"]
    short += ["task.checker=study_checks:even"] if checker else []
    return subprocess.run(
        [sys.executable, "-m", "opd_cli.commands.study", *args, *short, f"hydra.run.dir={tmp_path / 'out'}"],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**CLI_ENV, "PYTHONPATH": f"{tmp_path}:{CLI_ENV.get('PYTHONPATH', '')}"},
        timeout=600,
    )


def test_auroc_study_writes_every_output(tmp_path, models_dir):
    out = study(tmp_path, models_dir, [*README_AUROC, "n=4"])
    assert out.returncode == 0, out.stderr[-3000:]
    run = tmp_path / "out"
    data = json.loads((run / "auroc.json").read_text())
    rows = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == data["n_responses"] == 24 and data["settings"]["n"] == 4
    assert [(r["problem"], r["sample"]) for r in rows] == [(i, j) for i in range(6) for j in range(4)]
    labels = np.array([r["correct"] for r in rows])
    assert data["n_correct"] == labels.sum() and 0 < labels.sum() < 24
    assert all(r["correct"] == (len(r["response"]) % 2 == 0) for r in rows)
    assert list(data["teachers"]) == ["demo:teacher", "demo:student"]
    for name, result in data["teachers"].items():
        rewards = np.array([r["reward"][name] for r in rows])
        assert result["auroc"] == pytest.approx(auroc(rewards, labels))
        assert result["ci_low"] <= result["auroc"] <= result["ci_high"] and result["resamples_used"] > 50
    # the student as its own teacher: log q = log p on every token
    assert max(abs(r["reward"]["demo:student"]) for r in rows) < 1e-4
    assert max(abs(r["reward"]["demo:teacher"]) for r in rows) > 1e-3
    assert (run / "roc.png").stat().st_size > 5000
    report = (run / "auroc.md").read_text()
    assert f"| demo:teacher | {data['teachers']['demo:teacher']['auroc']:.3f} |" in report
    assert "demo:student" in report and '{"demo:teacher": ' in out.stdout


def test_auroc_with_one_class_of_verdicts_is_one_line(tmp_path, models_dir):
    out = study(tmp_path, models_dir, ["auroc", "n=2", "n_problems=2"], checker=False)  # all wrong
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and lines[-1].startswith("error: n: all 12 responses were wrong"), out.stderr[-2000:]
    assert "raise n or n_problems" in lines[-1] and "Traceback" not in out.stderr
    assert len((tmp_path / "out" / "samples.jsonl").read_text().splitlines()) == 12


def test_reward_depth_study_writes_every_output(tmp_path, models_dir):
    out = study(tmp_path, models_dir, [*README_DEPTH, "n=2", "continuations=2"])
    assert out.returncode == 0, out.stderr[-3000:]
    run = tmp_path / "out"
    data = json.loads((run / "reward_depth.json").read_text())
    prefixes = [json.loads(line) for line in (run / "continuations.jsonl").read_text().splitlines()]
    assert data["n_responses"] == data["n_kept"] == 12 and [r["depth"] for r in data["depths"]] == [4, 8, 16]
    for row in data["depths"]:
        at = [p for p in prefixes if p["depth"] == row["depth"]]
        assert row["n_prefixes"] == len(at) > 0
        t = np.mean([[c["correct"] for c in p["teacher"]] for p in at])
        s = np.mean([[c["correct"] for c in p["student"]] for p in at])
        assert (row["teacher_acc"], row["student_acc"]) == (pytest.approx(t), pytest.approx(s))
        assert row["advantage"] == pytest.approx(t - s) and row["ci_low"] <= row["advantage"] <= row["ci_high"]
    for p in prefixes:
        assert len(p["teacher"]) == len(p["student"]) == 2
        # what was judged: the prefix and the continuation, decoded together
        assert all(c["correct"] == (len(c["text"]) % 2 == 0) for c in p["teacher"] + p["student"])
    assert (run / "reward_depth.png").stat().st_size > 5000
    assert "| 8 |" in (run / "reward_depth.md").read_text()


@pytest.mark.parametrize("args, message", [
    (["reward-depth", "depths=[8,24]"], "error: depths: 24 is not in [1, max_new_tokens=24)"),
    (["auroc", "rollout.top_p=0.5"], "error: rollout.top_p: opd-study samples with its own keys; set top_p"),
    (["auroc", "+n_samples=3"], "error: n_samples: not a key of the config"),
])  # fmt: skip
def test_bad_input_is_one_line_before_the_directory_exists(tmp_path, models_dir, args, message):
    out = study(tmp_path, models_dir, args)
    assert out.returncode == 2 and out.stderr.strip().splitlines() == [out.stderr.strip()], out.stderr[-2000:]
    assert out.stderr.startswith(message), out.stderr
    assert not (tmp_path / "out").exists()
